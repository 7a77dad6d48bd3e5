"""FDS schedules: learn lr/momentum/weight-decay schedules from zero, against baselines.

Micaelli & Storkey (2021) learn a shared (piecewise-constant) schedule of the learning
rate, momentum and weight decay of SGD over a long horizon with forward-mode
hypergradients, from all-zero hyperparameters, with a sign-based outer step. This
experiment reproduces that in small form and compares the learned schedule with four
baselines given the same number of inner training steps.

Setup. An MLP (``model.hidden``) on MNIST-1D (default; ``--preset digits`` for sklearn's
digits) is trained for ``T = inner.num_steps`` minibatch steps of
``hg.optim.sgd_momentum(clip=inner.clip)`` (PyTorch convention, elementwise clipping at
±3 as in FDS). The data is split once into train / validation pool / test.

FDS (the outer steps of the harness). Hyperparameters: ``lr`` (``hparams.lr_blocks``
values), ``momentum`` (``hparams.momentum_blocks``, default 1: a constant) and
``weight_decay`` (``hparams.weight_decay_blocks``, default 1), each an ``hg.Shared``
schedule (step ``t`` uses block ``floor(N t / T)``), all starting at 0 by default. One
outer step = ``hg.outer.step`` with ``hg.Forward()`` (memory flat in T), re-initialising
the network (``reinit``), a fresh minibatch sequence, and a fresh validation batch of
``data.val_batch`` examples drawn without replacement from the validation pool (FDS
draws 5% of the training set; we draw from a held-out pool so the training data is the
same for every method), then ``hg.outer.sign_adaptive`` with initial steps
``outer.step_lr/step_momentum/step_weight_decay`` (FDS: 0.1, 0.1, 3e-4). After each
update the hyperparameters are projected onto their valid ranges — ``lr >= 0``,
``0 <= momentum <= hparams.max_momentum`` (0.99), ``weight_decay >= 0`` — by
:func:`project` (the sign step can overshoot below 0 from a 0 start). The run stops when
FDS's rule holds (every step size below ``outer.tolerance`` = 5% of its hyperparameter,
``hg.outer.sign_adaptive_converged``) or after ``outer.num_steps`` outer steps. Note the
rule never holds while a hyperparameter sits at 0 (e.g. a weight decay projected to 0).

Budget (counted in inner training steps). FDS used ``K`` outer steps of ``T`` inner steps
(``K`` = outer steps actually run): a search budget of ``K·T``. Each baseline gets
``R = K`` full training runs of ``T`` steps for its search (HD: ``R`` runs too), selects
its setting on the full validation pool, and every method (FDS included) is then
retrained from scratch ``eval.seeds`` times for ``T`` steps (or ``eval.num_steps``, with
every schedule stretched to that horizon: :func:`stretch`) on the training data and
evaluated on the test data (the same seeds for every method: paired). So every method
uses ``K·T + eval.seeds·T_eval`` inner steps; the table reports them. (A forward-mode FDS step
costs ~``1 + |λ|`` times a plain step in compute; the budget counts steps, as the issue
asks, and the wall-clock times are reported separately.)

Baselines (momentum ``baselines.momentum`` and weight decay ``baselines.weight_decay``
fixed, except random search):

* ``constant``: ``R`` learning rates log-spaced in ``[lr_min, lr_max]``;
* ``cosine``: ``lr_t = peak · (1 + cos(π t / T)) / 2``, ``R`` peaks log-spaced likewise;
* ``greedy_hd``: hypergradient descent (Baydin et al. 2018), online during one run:
  ``lr_t = max(0, lr_{t-1} − β h_t)`` with ``h_t = ∂L_train(θ_t; batch_t)/∂lr_{t-1} =
  −∇L_train(θ_t; batch_t) · v_t`` (the one-step hypergradient through the momentum
  update ``θ_t = θ_{t−1} − lr_{t−1} v_t``; equal to ``hg.Greedy()`` on the run stopped at
  step ``t``, a tested identity), then step ``t`` uses ``lr_t``. The ``R`` runs cover
  ``baselines.hd_lr0`` × ``β`` log-spaced in ``[hd_beta_min, hd_beta_max]`` (the first
  ``R`` pairs); the selected pair is rerun on the evaluation seeds;
* ``random_search``: ``R`` settings with ``lr`` log-uniform in ``[lr_min, lr_max]``,
  ``1 − momentum`` log-uniform in ``[0.01, 1]`` and ``weight_decay`` log-uniform in
  ``[wd_min, wd_max]``, constant over the run.

Every candidate and every evaluation seed of the constant, cosine, random-search and FDS
schedules is one call of a single ``jax.vmap``-ed training function on per-step
schedules (a ``Shared`` of ``T`` values; FDS's blocks are expanded exactly), so the
search compiles once; HD has its own vmapped scan.

``finish`` writes ``plots/learned_schedule.png``, ``plots/hyperparameters.png`` and
``plots/comparison.png`` and a summary with the comparison table, and prints the table.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import field
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hypergrad_jax as hg
from experiments import common
from experiments.config import bounds
from experiments.harness import Experiment

METHODS = ("fds", "constant", "cosine", "greedy_hd", "random_search")
LABELS = {
    "fds": "FDS (learned)",
    "constant": "constant lr",
    "cosine": "cosine",
    "greedy_hd": "greedy HD",
    "random_search": "random search",
}
HPARAMS = ("lr", "momentum", "weight_decay")


@dataclasses.dataclass(frozen=True)
class InnerConfig:
    num_steps: int = field(default=2000, metadata=bounds(ge=1))
    clip: float = field(default=3.0, metadata=bounds(gt=0))


@dataclasses.dataclass(frozen=True)
class HparamConfig:
    lr_blocks: int = field(default=8, metadata=bounds(ge=1))
    momentum_blocks: int = field(default=1, metadata=bounds(ge=1))
    weight_decay_blocks: int = field(default=1, metadata=bounds(ge=1))
    init_lr: float = field(default=0.0, metadata=bounds(ge=0))
    init_momentum: float = field(default=0.0, metadata=bounds(ge=0, lt=1))
    init_weight_decay: float = field(default=0.0, metadata=bounds(ge=0))
    max_momentum: float = field(default=0.99, metadata=bounds(ge=0, lt=1))


@dataclasses.dataclass(frozen=True)
class OuterConfig:
    num_steps: int = field(default=40, metadata=bounds(ge=1))  # the maximum
    step_lr: float = field(default=0.1, metadata=bounds(gt=0))
    step_momentum: float = field(default=0.1, metadata=bounds(gt=0))
    step_weight_decay: float = field(default=0.0003, metadata=bounds(gt=0))
    tolerance: float = field(default=0.05, metadata=bounds(gt=0))


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    momentum: float = field(default=0.9, metadata=bounds(ge=0, lt=1))
    weight_decay: float = field(default=0.0005, metadata=bounds(ge=0))
    lr_min: float = field(default=0.001, metadata=bounds(gt=0))
    lr_max: float = field(default=1.0, metadata=bounds(gt=0))
    wd_min: float = field(default=1e-6, metadata=bounds(gt=0))
    wd_max: float = field(default=0.01, metadata=bounds(gt=0))
    hd_lr0: tuple[float, ...] = (0.01, 0.1)
    hd_beta_min: float = field(default=1e-6, metadata=bounds(gt=0))
    hd_beta_max: float = field(default=1e-2, metadata=bounds(gt=0))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    seeds: int = field(default=3, metadata=bounds(ge=1))
    # Horizon of the final retrain (None: the search horizon inner.num_steps). A different
    # horizon stretches every schedule: FDS's blocks keep their proportions (block
    # floor(N t / T_eval)), cosine is recomputed over T_eval, constants stay constant.
    num_steps: int | None = field(default=None, metadata=bounds(ge=1))


@dataclasses.dataclass(frozen=True)
class Config:
    experiment: Literal["fds_schedules"] = "fds_schedules"
    seed: int = field(default=0, metadata=bounds(ge=0))
    data: common.DataConfig = common.DataConfig(
        name="mnist1d", num_samples=4000, val_fraction=0.2, test_fraction=0.2, val_batch=400
    )
    model: common.ModelConfig = common.ModelConfig()
    inner: InnerConfig = InnerConfig()
    hparams: HparamConfig = HparamConfig()
    outer: OuterConfig = OuterConfig()
    baselines: BaselineConfig = BaselineConfig()
    eval: EvalConfig = EvalConfig()
    run: common.RunConfig = common.RunConfig()

    def __post_init__(self):
        common.no_data_parallel(
            self.run, "fds_schedules", "its baselines' runs are vmapped on one device"
        )


# ----------------------------------------------------------------------------- pieces


def _select(h):
    return {k: hg.Shared(h[k]) for k in HPARAMS}


def inner_run(num_steps: int, clip: float) -> hg.InnerRun:
    """SGD with momentum (clipped), every hyperparameter a ``Shared`` schedule of
    ``hparams["lr" | "momentum" | "weight_decay"]``."""
    return hg.InnerRun(hg.optim.sgd_momentum(clip=clip), num_steps, _select)


def project(hparams: dict, max_momentum: float) -> dict:
    """The valid ranges: ``lr >= 0``, ``0 <= momentum <= max_momentum``, ``wd >= 0``."""
    return {
        "lr": jnp.maximum(hparams["lr"], 0.0),
        "momentum": jnp.clip(hparams["momentum"], 0.0, max_momentum),
        "weight_decay": jnp.maximum(hparams["weight_decay"], 0.0),
    }


def expand(values, num_steps: int) -> np.ndarray:
    """Blocks ``(N,)`` -> per-step values ``(T,)``: ``values[floor(N t / T)]``."""
    values = np.asarray(values)
    n = values.shape[0]
    t = np.arange(num_steps)
    return values[np.minimum((n * t) // num_steps, n - 1)]


def stretch(per_step, num_steps: int) -> np.ndarray:
    """A per-step schedule ``(..., T)`` replayed over ``num_steps`` steps (step ``t`` takes
    step ``floor(T t / num_steps)``): exact for constants and block schedules whose block
    length divides ``T``."""
    per_step = np.asarray(per_step)
    length = per_step.shape[-1]
    return per_step[..., np.minimum((length * np.arange(num_steps)) // num_steps, length - 1)]


def cosine(peak, num_steps: int) -> np.ndarray:
    """``peak · (1 + cos(π t / T)) / 2`` for ``t = 0 .. T-1``."""
    t = np.arange(num_steps)
    return np.asarray(peak) * 0.5 * (1 + np.cos(np.pi * t / num_steps))


def search_size(outer_steps: int) -> int:
    """Full runs a baseline may use for its search: as many as FDS's outer steps."""
    return max(int(outer_steps), 1)


def hd_grid(lr0s, beta_min: float, beta_max: float, runs: int) -> list[tuple[float, float]]:
    """The first ``runs`` pairs of ``lr0s × β`` (β log-spaced), lr0 varying fastest."""
    per = math.ceil(runs / len(lr0s))
    betas = np.geomspace(beta_min, beta_max, per)
    return [(float(a), float(b)) for b, a in itertools.product(betas, lr0s)][:runs]


def train_run(classifier, schedule, beta, params0, sampler, key, num_steps: int, clip: float):
    """One training run of ``sgd_momentum(clip)`` on per-step schedules, optionally with
    hypergradient descent (HD, Baydin et al. 2018) on the learning rate.

    Args:
      schedule: ``{"lr", "momentum", "weight_decay"}``, each of shape ``(T,)``.
      beta: the HD rate. ``beta == 0``: step ``t`` uses ``schedule["lr"][t]`` (the same
        run as ``hg.solve`` with ``Shared`` schedules of ``T`` values; tested). ``beta >
        0``: ``lr_t = max(0, lr_{t−1} − β h_t)`` from ``lr_{−1} = schedule["lr"][0]``.

    Returns ``(params_T, lrs, hs)``: ``lrs[t]`` the rate step ``t`` used and ``hs[t] =
    −∇L(θ_t; batch_t) · v_t = ∂L(θ_t; batch_t)/∂lr_{t−1}``, the one-step hypergradient
    through ``θ_t = θ_{t−1} − lr_{t−1} v_t`` (0 at ``t = 0``), computed from the gradient
    the step needs anyway.
    """
    opt = hg.optim.sgd_momentum(clip=clip)
    state0 = opt.init(params0, None)

    def body(carry, xs):
        params, state, lr_hd = carry
        t, lr_t, momentum, weight_decay = xs
        grads = jax.grad(classifier.loss)(params, hg.data.batch_at(sampler, key, t))
        h = -optax.tree.vdot(grads, state.velocity)
        lr_hd = jnp.maximum(lr_hd - beta * h, 0.0)
        lr = jnp.where(beta > 0, lr_hd, lr_t)
        ohp = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        params, state = opt.update(grads, state, params, ohp, t)
        return (params, state, lr_hd), (lr, h)

    xs = (jnp.arange(num_steps, dtype=jnp.int32), *(schedule[k] for k in HPARAMS))
    init = (params0, state0, schedule["lr"][0])
    (params, _, _), (lrs, hs) = jax.lax.scan(body, init, xs)
    return params, lrs, hs


def _scores(classifier, params, val, test):
    loss = classifier.loss(params, val)
    return {
        "val_accuracy": classifier.accuracy(params, val),
        "val_loss": jnp.where(jnp.isfinite(loss), loss, jnp.inf),
        "test_accuracy": classifier.accuracy(params, test),
    }


def pick(val_accuracy, val_loss) -> int:
    """Best validation accuracy, ties broken by the lower validation loss."""
    acc, loss = np.asarray(val_accuracy), np.nan_to_num(np.asarray(val_loss), nan=np.inf)
    return int(np.lexsort((loss, -acc))[0])


# ----------------------------------------------------------------------------- the experiment


def build(cfg: Config) -> Experiment:
    data, splits = cfg.data.load(cfg.seed, require=("val", "test"))
    train, val, test = (hg.data.to_batch(s) for s in splits)
    sampler = hg.data.minibatch_sampler(train, cfg.data.batch_size)
    n_val = int(val["y"].shape[0])
    val_batch = n_val if cfg.data.val_batch is None else cfg.data.val_batch
    classifier = common.Classifier(common.MLP(data.num_classes, cfg.model.hidden))
    num_features = int(np.prod(data.x.shape[1:]))
    num_steps, clip = cfg.inner.num_steps, cfg.inner.clip
    run = inner_run(num_steps, clip)
    problem = classifier.problem()
    reinit = lambda key: classifier.init(key, num_features)  # noqa: E731
    h = cfg.hparams
    hparams0 = {
        "lr": jnp.full(h.lr_blocks, h.init_lr),
        "momentum": jnp.full(h.momentum_blocks, h.init_momentum),
        "weight_decay": jnp.full(h.weight_decay_blocks, h.init_weight_decay),
    }
    o = cfg.outer
    optimizer = hg.outer.sign_adaptive(
        {"lr": o.step_lr, "momentum": o.step_momentum, "weight_decay": o.step_weight_decay}
    )
    key = jax.random.key(cfg.seed)

    def draw_val(k):
        idx = jax.random.choice(k, n_val, (val_batch,), replace=False)
        return jax.tree.map(lambda a: a[idx], val)

    def init_state():
        return hg.outer.init(optimizer, hparams0, reinit(key), key)

    @jax.jit
    def step(state):
        new, m = hg.outer.step(
            problem, run, hg.Forward(), optimizer, state, sampler, draw_val, reinit=reinit
        )
        new = new._replace(hparams=project(new.hparams, h.max_momentum))
        # One metrics line describes one inner run: the hyperparameters it trained with next
        # to the outer loss it reached (before this step's update), and the step sizes this
        # step moved them by (after its halvings).
        return new, {
            **m._asdict(),
            **state.hparams,
            **{f"step_{k}": v for k, v in new.opt_state.step_size.items()},
        }

    def done(state):
        return bool(hg.outer.sign_adaptive_converged(state.opt_state, state.hparams, o.tolerance))

    def finish(state, rundir):
        summary = evaluate(cfg, classifier, state, sampler, val, test, reinit)
        if rundir.primary:
            write_plots(rundir, summary, num_steps)
            print_table(summary, rundir)
        return summary

    return Experiment(o.num_steps, init_state, step, finish, cfg.run.checkpoint_every, done)


def make_trainer(classifier, num_steps: int, clip: float, reinit):
    """``(schedules, betas, keys, sampler, val, test) -> (scores, lrs)``: :func:`train_run`
    vmapped over candidates (``schedules`` of shape ``(C, T)``, ``betas`` and ``keys``
    ``(C,)``). One program serves every method of one batch size."""

    @jax.jit
    def train(schedules, betas, keys, sampler, val, test):
        def one(sched, beta, key):
            k_init, k_data = jax.random.split(key)
            params, lrs, _ = train_run(
                classifier, sched, beta, reinit(k_init), sampler, k_data, num_steps, clip
            )
            return _scores(classifier, params, val, test), lrs

        return jax.vmap(one)(schedules, betas, keys)

    return train


def _keys(seed: int, n: int) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


def _constant(values, num_steps):
    return np.repeat(np.asarray(values, np.float64)[:, None], num_steps, axis=1)


def evaluate(cfg: Config, classifier, state, sampler, val, test, reinit) -> dict:
    """Baseline searches at FDS's budget, then every method retrained on the same seeds."""
    t_start = time.perf_counter()
    T, b = cfg.inner.num_steps, cfg.baselines  # noqa: N806
    outer_steps = int(state.step)
    runs = search_size(outer_steps)
    seeds = cfg.eval.seeds
    train = make_trainer(classifier, T, cfg.inner.clip, reinit)
    fdt = np.float64 if jax.config.jax_enable_x64 else np.float32

    # --- searches: R runs per baseline, selected on the full validation pool; all 4R
    # candidates in one vmapped call (HD: the same scan with beta > 0).
    grid = np.geomspace(b.lr_min, b.lr_max, runs)
    rng = np.random.default_rng(cfg.seed + 1)
    rs = {
        "lr": np.exp(rng.uniform(np.log(b.lr_min), np.log(b.lr_max), runs)),
        "momentum": 1 - np.exp(rng.uniform(np.log(0.01), 0.0, runs)),
        "weight_decay": np.exp(rng.uniform(np.log(b.wd_min), np.log(b.wd_max), runs)),
    }
    pairs = hd_grid(b.hd_lr0, b.hd_beta_min, b.hd_beta_max, runs)
    candidates = {
        "constant": {"lr": _constant(grid, T)},
        "cosine": {"lr": np.stack([cosine(p, T) for p in grid])},
        "greedy_hd": {"lr": _constant([p[0] for p in pairs], T)},
        "random_search": {k: _constant(v, T) for k, v in rs.items()},
    }
    for c in candidates.values():
        c.setdefault("momentum", _constant(np.full(runs, b.momentum), T))
        c.setdefault("weight_decay", _constant(np.full(runs, b.weight_decay), T))
        c["beta"] = np.zeros(runs)
    candidates["greedy_hd"]["beta"] = np.asarray([p[1] for p in pairs])
    names = list(candidates)

    # The search (4R runs) and the final retrain (5·seeds runs) are one program if their
    # sizes are padded to the same batch; worth it (compiling dominates) when the pad is
    # at most the smaller size. Padded rows repeat row 0 and are dropped.
    sizes = (len(names) * runs, (len(names) + 1) * seeds)
    batch = max(sizes) if max(sizes) <= 2 * min(sizes) else None

    def call(cands, keys, trainer=train, pad_to=batch):
        rows = {k: np.concatenate([c[k] for c in cands]) for k in (*HPARAMS, "beta")}
        n = len(rows["beta"])
        pad = 0 if pad_to is None else pad_to - n
        rows = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in rows.items()}
        keys = jnp.concatenate([keys, jnp.repeat(keys[:1], pad)])
        betas = jnp.asarray(rows.pop("beta"), fdt)
        scheds = {k: jnp.asarray(v, fdt) for k, v in rows.items()}
        out = jax.device_get(trainer(scheds, betas, keys, sampler, val, test))
        return jax.tree.map(lambda x: np.asarray(x)[:n], out)

    t0 = time.perf_counter()
    scores, _ = call([candidates[n] for n in names], _keys(cfg.seed + 1, len(names) * runs))
    search_s = time.perf_counter() - t0

    chosen, search_val = {}, {}
    for i, name in enumerate(names):
        part = slice(i * runs, (i + 1) * runs)
        j = pick(scores["val_accuracy"][part], scores["val_loss"][part])
        chosen[name] = {k: candidates[name][k][j] for k in (*HPARAMS, "beta")}
        search_val[name] = float(scores["val_accuracy"][part][j])
        if name == "random_search":
            chosen_setting = {k: float(rs[k][j]) for k in HPARAMS}
        elif name == "cosine":
            cos_peak = float(grid[j])
        elif name == "constant":
            const_lr = float(grid[j])
        else:
            hd_choice = {"lr0": pairs[j][0], "beta": pairs[j][1]}

    # --- final retrain from scratch on the same seeds for every method (one call), over
    # the retrain horizon: schedules stretched to it if it differs from the search's.
    learned = jax.device_get(state.hparams)
    t_eval = cfg.eval.num_steps or T
    chosen = {
        n: {k: v if k == "beta" else stretch(v, t_eval) for k, v in c.items()}
        for n, c in chosen.items()
    }
    chosen["cosine"]["lr"] = cosine(cos_peak, t_eval)
    chosen["fds"] = {k: expand(learned[k], t_eval) for k in HPARAMS} | {"beta": 0.0}
    final_names = ["fds", *names]
    tiled = [
        {k: np.tile(chosen[n][k], (seeds, 1) if k != "beta" else seeds) for k in chosen[n]}
        for n in final_names
    ]
    eval_keys = _keys(cfg.seed + 10_000, seeds)
    t0 = time.perf_counter()
    final_keys = jnp.concatenate([eval_keys] * len(final_names))
    if t_eval == T:
        final, final_lrs = call(tiled, final_keys)
    else:  # another horizon: another program
        trainer = make_trainer(classifier, t_eval, cfg.inner.clip, reinit)
        final, final_lrs = call(tiled, final_keys, trainer, None)
    eval_s = time.perf_counter() - t0

    per_seed = {}
    for i, name in enumerate(final_names):
        part = slice(i * seeds, (i + 1) * seeds)
        per_seed[name] = {k: np.asarray(v[part]) for k, v in final.items()}
    hd_lrs = final_lrs[final_names.index("greedy_hd") * seeds]
    search_steps = {m: (outer_steps if m == "fds" else runs) * T for m in METHODS}
    search_val["fds"] = None
    table = []
    for m in METHODS:
        s = per_seed[m]
        table.append(
            {
                "method": m,
                "test_accuracy": float(np.mean(s["test_accuracy"])),
                "test_accuracy_std": float(np.std(s["test_accuracy"])),
                "val_accuracy": float(np.mean(s["val_accuracy"])),
                "val_accuracy_std": float(np.std(s["val_accuracy"])),
                "search_val_accuracy": search_val[m],
                "test_accuracy_per_seed": s["test_accuracy"].tolist(),
                "search_inner_steps": search_steps[m],
                "final_inner_steps": seeds * t_eval,
                "inner_steps": search_steps[m] + seeds * t_eval,
            }
        )
    fds_test = per_seed["fds"]["test_accuracy"]
    paired = {
        m: {
            "mean": float(np.mean(fds_test - per_seed[m]["test_accuracy"])),
            "std": float(np.std(fds_test - per_seed[m]["test_accuracy"])),
        }
        for m in METHODS[1:]
    }
    return {
        "experiment": "fds_schedules",
        "dataset": cfg.data.name,
        "num_steps": T,
        "eval_num_steps": t_eval,
        "outer_steps": outer_steps,
        "converged": bool(
            hg.outer.sign_adaptive_converged(state.opt_state, state.hparams, cfg.outer.tolerance)
        ),
        "search_runs": runs,
        "eval_seeds": seeds,
        "table": table,
        "fds_minus_method_test_accuracy": paired,
        "learned": {k: np.asarray(learned[k]).tolist() for k in HPARAMS},
        "learned_step_sizes": {
            k: np.asarray(v).tolist() for k, v in jax.device_get(state.opt_state.step_size).items()
        },
        "constant_lr": const_lr,
        "cosine_peak": cos_peak,
        "random_search_choice": chosen_setting,
        "greedy_hd_choice": hd_choice,
        "greedy_hd_lr_trajectory": np.asarray(hd_lrs)[:: max(t_eval // 200, 1)].tolist(),
        "greedy_hd_lr_trajectory_stride": max(t_eval // 200, 1),
        "baseline_momentum": b.momentum,
        "baseline_weight_decay": b.weight_decay,
        "search_time_s": search_s,
        "eval_time_s": eval_s,
        "finish_time_s": time.perf_counter() - t_start,
    }


# ----------------------------------------------------------------------------- output


def write_plots(rundir, summary, num_steps):
    from experiments import plots

    T = num_steps  # noqa: N806
    t = np.arange(T)
    learned = summary["learned"]
    fig, axes = plots.subplots(3, 1, figsize=(7, 7.5), sharex=True)
    axes[0].step(t, expand(learned["lr"], T), where="post", color="C0", lw=2, label="FDS")
    axes[0].plot(t, np.full(T, summary["constant_lr"]), "C1--", label="constant (tuned)")
    axes[0].plot(t, cosine(summary["cosine_peak"], T), "C2--", label="cosine (tuned)")
    stride = summary["greedy_hd_lr_trajectory_stride"]
    hd = np.asarray(summary["greedy_hd_lr_trajectory"])
    axes[0].plot(np.arange(len(hd)) * stride, hd, "C3:", label="greedy HD (seed 0)")
    axes[0].set_ylabel("learning rate")
    axes[0].legend(fontsize="x-small")
    for ax, k, label in ((axes[1], "momentum", "momentum"), (axes[2], "weight_decay", "wd")):
        ax.step(t, expand(learned[k], T), where="post", color="C0", lw=2, label="FDS")
        ax.axhline(summary[f"baseline_{k}"], color="C1", ls="--", label="baselines (fixed)")
        ax.set_ylabel(label)
        ax.legend(fontsize="x-small")
    axes[-1].set_xlabel("inner step t")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Learned schedule ({summary['dataset']}, T = {T}, {summary['outer_steps']} outer steps)",
        fontsize="medium",
    )
    fig.tight_layout()
    fig.savefig(rundir.plots / "learned_schedule.png", dpi=120)

    metrics = rundir.metrics()
    # Line k: the run trained with the values after k updates, and the loss it reached.
    steps = [m["step"] for m in metrics]
    fig, axes = plots.subplots(2, 2, figsize=(9, 6))
    for ax, k in zip(axes.flat[:3], HPARAMS):
        values = np.asarray([m[k] for m in metrics]).reshape(len(metrics), -1)
        for j in range(values.shape[1]):
            ax.plot(steps, values[:, j], label=f"block {j}")
        ax.set_title(k, fontsize="medium")
        if values.shape[1] > 1:
            ax.legend(fontsize="xx-small", ncol=2)
    axes.flat[3].plot(steps, [m["outer_loss"] for m in metrics], color="k")
    axes.flat[3].set_title("validation loss (fresh batch)", fontsize="medium")
    for ax in axes.flat:
        ax.set_xlabel("outer updates applied")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(rundir.plots / "hyperparameters.png", dpi=120)

    rows = summary["table"]
    fig, ax = plots.subplots(figsize=(7, 4))
    x = np.arange(len(rows))
    ax.bar(
        x,
        [r["test_accuracy"] for r in rows],
        yerr=[r["test_accuracy_std"] for r in rows],
        color=[f"C{i}" for i in range(len(rows))],
        capsize=4,
    )
    ax.set_xticks(x, [LABELS[r["method"]] for r in rows], fontsize="small")
    lo = min(r["test_accuracy"] - r["test_accuracy_std"] for r in rows)
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(r["test_accuracy"] for r in rows) + 0.05))
    ax.set_ylabel("test accuracy")
    ax.set_title(
        f"{summary['dataset']}: mean ± std over {summary['eval_seeds']} seeds, "
        f"equal budget ({rows[0]['inner_steps']} inner steps)",
        fontsize="medium",
    )
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(rundir.plots / "comparison.png", dpi=120)


def print_table(summary, rundir):
    n = summary["eval_seeds"]
    stop = "5% rule" if summary["converged"] else "max outer steps"
    print(
        f"\n{summary['dataset']}, T = {summary['num_steps']}: FDS ran {summary['outer_steps']} "
        f"outer steps (stopped by {stop}); each baseline searched {summary['search_runs']} "
        f"full runs; all retrained on {n} seeds (paired) for T = {summary['eval_num_steps']}."
    )
    print(
        f"{'method':<16}{'test acc':>17}{'val acc':>17}{'search val':>12}{'inner steps':>13}"
        f"{'FDS − it':>17}"
    )
    for r in summary["table"]:
        sv = "" if r["search_val_accuracy"] is None else f"{r['search_val_accuracy']:.3f}"
        d = summary["fds_minus_method_test_accuracy"].get(r["method"])
        diff = "" if d is None else f"{d['mean']:+.3f} ± {d['std']:.3f}"
        print(
            f"{LABELS[r['method']]:<16}{r['test_accuracy']:>10.3f} ± {r['test_accuracy_std']:.3f}"
            f"{r['val_accuracy']:>10.3f} ± {r['val_accuracy_std']:.3f}{sv:>12}"
            f"{r['inner_steps']:>13}{diff:>17}"
        )
    learned = summary["learned"]
    lr = ", ".join(f"{v:.3g}" for v in learned["lr"])
    mom = ", ".join(f"{v:.3g}" for v in learned["momentum"])
    wd = ", ".join(f"{v:.3g}" for v in learned["weight_decay"])
    print(f"learned lr: [{lr}]  momentum: [{mom}]  weight decay: [{wd}]")
    hd = summary["greedy_hd_choice"]
    print(
        f"tuned: constant lr {summary['constant_lr']:.3g}, cosine peak "
        f"{summary['cosine_peak']:.3g}, HD lr0 {hd['lr0']:.3g} β {hd['beta']:.3g}, random "
        + ", ".join(f"{k} {v:.3g}" for k, v in summary["random_search_choice"].items())
    )
    print(f"run directory: {rundir.path}\nplots: {rundir.plots}")
