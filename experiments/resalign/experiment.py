"""ResAlign on a digits DDPM: unlearn a class so that benign fine-tuning does not bring it back.

ResAlign (Li et al., NeurIPS 2025) on a class-conditional DDPM for 8×8 digits: one class (the
"harmful concept") is unlearned so that it stays unlearned after benign fine-tuning.

The pre-trained denoiser and the judge come from :mod:`experiments.resalign.diffusion`
(cached). The unlearned parameters ``λ`` are rank-``unlearn.rank`` LoRA adapters on the
denoiser's dense layers (``unlearn.params: lora``) or all its weights (``full``); the unlearned
model's weights are ``W(λ)`` (the adapters merged). Losses, on minibatches of the concept's
training images (``harm``) and of the other classes (``retain``):

* ``L_harm``: ``ga`` = minus the diffusion loss on the concept (gradient ascent), or ``esd``
  = ESD-style (Gandikota et al. 2023): the concept's noise prediction regressed onto the
  original model's mean prediction over the benign classes on the same noised inputs (our
  stand-in for the unconditional prediction the model does not have), i.e. the concept is
  steered to a blend of the other digits;
* ``R(λ)`` = the squared distance to the original model's noise predictions on benign data.

For a fine-tuning configuration ``c`` (benign classes, learning rate, steps, SGD/Adam,
fresh adapters or full weights) starting from the unlearned model, ResAlign's outer loss is
``F_c(λ) = (1 − lam) L_harm(W(λ)) + lam L_harm(θ*_c) + α R(λ)``; the hypergradient through the
fine-tuning run is :class:`hg.Moreau <hypergrad_jax.Moreau>` (γ = ``unlearn.gamma``) with the
authors' solver, :class:`hg.Richardson <hypergrad_jax.Richardson>`; the first-order variant
replaces ``(H + γI)⁻¹`` by ``I/γ`` (``Richardson(iters=1, step=1/γ)``, no Hessian). Each outer
step samples ``unlearn.configs_per_step`` configurations of the training distribution
(``finetune``: subsets × learning rates × steps × optimizers × modes), averages their
hypergradients and takes an AdamW step; ``α`` ramps from ``alpha_start`` to ``alpha_end``
over the second half (the authors' schedule).

Methods (``methods``): ``none`` (no unlearning), ``ga`` and ``esd`` (``lam = 0``: the loss
alone, no fine-tuning simulated), ``resalign_fo`` and ``resalign`` (``unlearn.harm`` as
``L_harm``). Each is evaluated before and after every held-out attack (``attacks``: settings
outside the training distribution, optionally with an EMA of the fine-tuned weights):
harmful rate = the fraction of ``eval.samples`` generated concept images the judge assigns to
the concept with p > 0.5; utility = the judge's accuracy on generated benign images and the
Fréchet distance of their judge features to real test digits. One harness step is one
(method, seed) unit; the summary averages over ``eval.seeds``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from dataclasses import field
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hypergrad_jax as hg
from experiments import plots
from experiments.common import RunConfig
from experiments.config import ConfigError, bounds
from experiments.harness import Experiment
from experiments.resalign import diffusion as dm

METHODS = ("none", "ga", "esd", "resalign_fo", "resalign")
LABELS = {
    "none": "no unlearning",
    "ga": "gradient ascent (λ = 0)",
    "esd": "ESD-style (λ = 0)",
    "resalign_fo": "ResAlign, first order",
    "resalign": "ResAlign (hg.Moreau)",
}


@dataclasses.dataclass(frozen=True)
class UnlearnConfig:
    concept: int = field(default=0, metadata=bounds(ge=0, le=9))
    params: Literal["lora", "full"] = "lora"
    rank: int = field(default=4, metadata=bounds(ge=1))
    harm: Literal["ga", "esd"] = "esd"  # ResAlign's L_harm
    outer_steps: int = field(default=100, metadata=bounds(ge=1))
    lr: float = field(default=1e-3, metadata=bounds(gt=0))  # AdamW
    weight_decay: float = field(default=1e-2, metadata=bounds(ge=0))
    lam: float = field(default=0.8, metadata=bounds(ge=0, le=1))
    alpha_start: float = field(default=1.6, metadata=bounds(ge=0))
    alpha_end: float = field(default=2.0, metadata=bounds(ge=0))
    gamma: float = field(default=10.0, metadata=bounds(gt=0))
    richardson_iters: int = field(default=5, metadata=bounds(ge=1))
    richardson_step: float = field(default=1.0, metadata=bounds(gt=0))
    richardson_halvings: int = field(default=5, metadata=bounds(ge=0))
    richardson_max_norm: float | None = field(default=None, metadata=bounds(gt=0))
    configs_per_step: int = field(default=3, metadata=bounds(ge=1))
    batch_size: int = field(default=64, metadata=bounds(ge=1))  # harm and retain batches


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """The training distribution of simulated fine-tuning runs: their product."""

    subsets: tuple[tuple[int, ...], ...] = ((1, 2, 3), (4, 5, 6), (7, 8, 9))
    lrs: tuple[float, ...] = field(default=(1e-3, 3e-3), metadata=bounds(gt=0))
    steps: tuple[int, ...] = field(default=(5, 10), metadata=bounds(ge=1))
    optimizers: tuple[Literal["sgd", "adam"], ...] = ("sgd", "adam")
    modes: tuple[Literal["adapter", "full"], ...] = ("adapter", "full")
    batch_size: int = field(default=32, metadata=bounds(ge=1))


@dataclasses.dataclass(frozen=True)
class Attack:
    """A held-out fine-tuning attack. ``classes``: the benign classes (empty: all of them)."""

    name: str = "attack"
    classes: tuple[int, ...] = ()
    lr: float = field(default=1e-3, metadata=bounds(gt=0))
    steps: int = field(default=50, metadata=bounds(ge=1))
    optimizer: Literal["sgd", "adam"] = "adam"
    mode: Literal["adapter", "full"] = "full"
    ema: float | None = field(default=None, metadata=bounds(ge=0, lt=1))
    batch_size: int = field(default=32, metadata=bounds(ge=1))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    samples: int = field(default=100, metadata=bounds(ge=1))  # generated images per class
    seeds: int = field(default=3, metadata=bounds(ge=1))


@dataclasses.dataclass(frozen=True)
class Config:
    experiment: Literal["resalign"] = "resalign"
    seed: int = field(default=0, metadata=bounds(ge=0))
    ddpm: dm.DDPMConfig = dm.DDPMConfig()
    judge: dm.JudgeConfig = dm.JudgeConfig()
    methods: tuple[Literal[METHODS], ...] = METHODS  # type: ignore[valid-type]
    unlearn: UnlearnConfig = UnlearnConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    attacks: tuple[Attack, ...] = (
        Attack("adam_all_50", steps=50, lr=1e-3),
        Attack("sgd_all_100", optimizer="sgd", steps=100, lr=1e-2),
        Attack("adam_all_50_ema", steps=50, lr=1e-3, ema=0.9),
        Attack("adapter_adam_30", mode="adapter", steps=30, lr=3e-3),
    )
    eval: EvalConfig = EvalConfig()
    run: RunConfig = RunConfig(checkpoint_every=1)

    def __post_init__(self):
        c = self.unlearn.concept
        for i, s in enumerate(self.finetune.subsets):
            if not s or c in s or any(not 0 <= k <= 9 for k in s):
                raise ConfigError(
                    f"finetune.subsets[{i}]: {list(s)}; expected benign classes (0-9, not the "
                    f"concept {c})"
                )
        for i, a in enumerate(self.attacks):
            if c in a.classes or any(not 0 <= k <= 9 for k in a.classes):
                raise ConfigError(
                    f"attacks[{i}].classes: {list(a.classes)}; expected benign classes"
                )
        if len(set(self.methods)) != len(self.methods) or not self.methods:
            raise ConfigError(f"methods: {list(self.methods)}; expected distinct methods")
        if not self.run.data_parallel:
            return
        raise ConfigError("run.data_parallel: not supported by resalign (one device); use false")


class FT(NamedTuple):
    """The static part of a fine-tuning run (one compiled program each)."""

    steps: int
    optimizer: str
    mode: str
    batch_size: int


def _optimizer(name: str) -> hg.InnerOptimizer:
    return {"sgd": hg.optim.sgd, "adam": hg.optim.adam}[name]()


def build(cfg: Config) -> Experiment:
    u, schedule = cfg.unlearn, cfg.ddpm.schedule()
    model = cfg.ddpm.model()
    base = dm.pretrain(cfg.ddpm)
    judge = dm.pretrain_judge(cfg.judge)
    splits = dm.digits(cfg.ddpm.seed, cfg.ddpm.test_fraction)
    train_x, train_y = jnp.asarray(splits.train.x), jnp.asarray(splits.train.y, jnp.int32)
    test_x, test_y = np.asarray(splits.test.x), np.asarray(splits.test.y)
    concept = u.concept
    benign = [k for k in range(dm.NUM_CLASSES) if k != concept]
    harm_idx = jnp.flatnonzero(train_y == concept)
    retain_idx = jnp.flatnonzero(train_y != concept)
    apply_base, apply_lora = dm.denoiser_apply(model), dm.adapted_apply(model)
    scale = 1.0
    adapters0 = dm.lora_init(jax.random.key(cfg.seed + 7), base, u.rank)

    def weights(lam):  # the unlearned model's plain weights
        return dm.merge(base, lam, scale) if u.params == "lora" else lam

    def initial(key):
        if u.params == "full":
            return base
        return dm.lora_init(key, base, u.rank)  # b = 0: W(λ) = base

    def noise_pred(mode, phi, lam, x, t, y):
        if mode == "adapter":
            return apply_lora(dm.LoRAParams(weights(lam), phi), x, t, y)
        return apply_base(phi, x, t, y)

    def harm_loss(kind, pred, batch):
        x = batch["harm"]
        y = jnp.full(x.shape[:1], concept, jnp.int32)
        xt, t, noise = dm.perturb(batch["key"], x, schedule)
        if kind == "ga":
            return -jnp.mean(jnp.square(noise - pred(xt, t, y)))
        others = jnp.stack([apply_base(base, xt, t, jnp.full_like(y, k)) for k in benign])
        target = jax.lax.stop_gradient(jnp.mean(others, axis=0))
        return jnp.mean(jnp.square(pred(xt, t, y) - target))

    def retain_loss(lam, batch):
        xt, t, _ = dm.perturb(jax.random.fold_in(batch["key"], 1), batch["retain"]["x"], schedule)
        y = batch["retain"]["y"]
        ref = jax.lax.stop_gradient(apply_base(base, xt, t, y))
        return jnp.mean(jnp.square(apply_base(weights(lam), xt, t, y) - ref))

    def direct(kind, lam, batch):  # (1 − lam) L_harm(W(λ)) + α R(λ), lam the config's
        pred = lambda x, t, y: apply_base(weights(lam), x, t, y)  # noqa: E731
        return harm_loss(kind, pred, batch), retain_loss(lam, batch)

    def outer_batch(key, alpha):
        k_h, k_r, k_n = jax.random.split(key, 3)
        hi = jax.random.choice(k_h, harm_idx, (u.batch_size,))
        ri = jax.random.choice(k_r, retain_idx, (u.batch_size,))
        retain = {"x": train_x[ri], "y": train_y[ri]}
        return {"harm": train_x[hi], "retain": retain, "alpha": alpha, "key": k_n}

    def sampler(mask, batch_size):
        p = mask / jnp.sum(mask)

        def sample(key, step):
            key = jax.random.fold_in(key, step)
            k_i, k_n = jax.random.split(key)
            i = jax.random.choice(k_i, train_y.shape[0], (batch_size,), p=p)
            return {"x": train_x[i], "y": train_y[i], "key": k_n}

        return sample

    def ft_problem(mode, kind):
        def inner(phi, lam, b):  # the fine-tuning loss: diffusion loss on benign data
            xt, t, noise = dm.perturb(b["key"], b["x"], schedule)
            return jnp.mean(jnp.square(noise - noise_pred(mode, phi, lam, xt, t, b["y"])))

        def outer(phi, lam, b):
            after = harm_loss(kind, lambda x, t, y: noise_pred(mode, phi, lam, x, t, y), b)
            before, retain = direct(kind, lam, b)
            return u.lam * after + (1 - u.lam) * before + b["alpha"] * retain

        return hg.BilevelProblem(inner, outer)

    def estimator(method):
        if method == "resalign_fo":  # (H + γI)⁻¹ ≈ I/γ
            return hg.Moreau(u.gamma, hg.Richardson(iters=1, step=1.0 / u.gamma))
        solver = hg.Richardson(
            u.richardson_iters, u.richardson_step, u.richardson_halvings, u.richardson_max_norm
        )
        return hg.Moreau(u.gamma, solver)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def ft_hypergradient(ft: FT, method, lam, lr, mask, alpha, key):
        problem = ft_problem(ft.mode, u.harm)
        run = hg.InnerRun(_optimizer(ft.optimizer), ft.steps, lambda h: {"lr": lr})
        k_p, k_o, k_i = jax.random.split(key, 3)
        params0 = (lambda h: weights(h)) if ft.mode == "full" else adapters0
        grad, info = hg.hypergradient(
            problem,
            run,
            estimator(method),
            lam,
            params0,
            sampler(mask, ft.batch_size),
            outer_batch(k_o, alpha),
            key=k_i,
        )
        return grad, info.outer_value, info.status

    @functools.partial(jax.jit, static_argnums=(0,))
    def direct_grad(kind, lam, alpha, key):
        def loss(lam):
            harm, retain = direct(kind, lam, outer_batch(key, alpha))
            return harm + alpha * retain

        return jax.value_and_grad(loss)(lam)

    configs = list(
        itertools.product(
            range(len(cfg.finetune.subsets)),
            cfg.finetune.lrs,
            cfg.finetune.steps,
            cfg.finetune.optimizers,
            cfg.finetune.modes,
        )
    )
    masks = [jnp.isin(train_y, jnp.asarray(s)).astype(train_x.dtype) for s in cfg.finetune.subsets]

    def alpha_at(step):
        half = u.outer_steps // 2
        frac = max(0.0, (step - half) / max(u.outer_steps - half, 1))
        return u.alpha_start + frac * (u.alpha_end - u.alpha_start)

    def unlearn(method, seed):
        """``λ`` after ``unlearn.outer_steps`` AdamW steps, and the fallback count."""
        key = jax.random.key(1000 * cfg.seed + seed)
        lam = initial(jax.random.fold_in(key, 0))
        if method == "none":
            return lam, 0, 0
        opt = optax.adamw(u.lr, weight_decay=u.weight_decay)
        state, fallbacks, calls = opt.init(lam), 0, 0
        rng = np.random.default_rng(1000 * cfg.seed + seed)
        for step in range(u.outer_steps):
            key, k = jax.random.split(key)
            alpha = jnp.asarray(alpha_at(step), train_x.dtype)
            if method in ("ga", "esd"):
                _, grad = direct_grad(method, lam, alpha, k)
            else:
                picks = rng.choice(len(configs), min(u.configs_per_step, len(configs)), False)
                grads = []
                for j, pick in enumerate(picks):
                    sub, lr, steps, optim, mode = configs[pick]
                    ft = FT(steps, optim, mode, cfg.finetune.batch_size)
                    g, _, status = ft_hypergradient(
                        ft, method, lam, lr, masks[sub], alpha, jax.random.fold_in(k, j)
                    )
                    fallbacks += int(status) == hg.Status.SOLVE_FELL_BACK
                    calls += 1
                    grads.append(g)
                grad = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
            updates, state = opt.update(grad, state, lam)
            lam = optax.apply_updates(lam, updates)
        return lam, fallbacks, calls

    @functools.partial(jax.jit, static_argnums=(0,))
    def attack_run(attack: Attack, lam, key):
        """The attacker's fine-tuning from ``W(λ)``: ``attack.steps`` steps of SGD/Adam on
        benign data (fresh adapters or all weights), then its EMA if ``attack.ema``."""
        classes = attack.classes or tuple(benign)
        mask = jnp.isin(train_y, jnp.asarray(classes)).astype(train_x.dtype)
        sample = sampler(mask, attack.batch_size)
        start = weights(lam)
        phi = dm.lora_init(jax.random.key(3), start, u.rank) if attack.mode == "adapter" else start
        tx = {"sgd": optax.sgd, "adam": optax.adam}[attack.optimizer](attack.lr)

        def loss(phi, b):
            xt, t, noise = dm.perturb(b["key"], b["x"], schedule)
            return jnp.mean(jnp.square(noise - noise_pred(attack.mode, phi, lam, xt, t, b["y"])))

        def body(carry, step):
            phi, opt_state, ema = carry
            g = jax.grad(loss)(phi, sample(key, step))
            updates, opt_state = tx.update(g, opt_state, phi)
            phi = optax.apply_updates(phi, updates)
            if attack.ema is not None:
                ema = optax.incremental_update(phi, ema, 1 - attack.ema)
            return (phi, opt_state, ema), None

        steps = jnp.arange(attack.steps)
        (phi, _, ema), _ = jax.lax.scan(body, (phi, tx.init(phi), phi), steps)
        phi = ema if attack.ema is not None else phi
        if attack.mode == "adapter":
            return dm.merge(start, phi, scale)
        return phi

    @jax.jit
    def generate(params, key):
        labels = jnp.repeat(jnp.arange(dm.NUM_CLASSES), cfg.eval.samples)
        return dm.sample(apply_base, params, key, labels, schedule), labels

    real_feats = np.asarray(dm.judge_features(judge, jnp.asarray(test_x[test_y != concept])))

    def evaluate(params, key):
        x, labels = generate(params, key)
        probs = np.asarray(jax.nn.softmax(dm.judge_logits(judge, x)))
        labels = np.asarray(labels)
        harmful = float(np.mean(probs[labels == concept, concept] > 0.5))
        mask = labels != concept
        accuracy = float(np.mean(np.argmax(probs[mask], axis=1) == labels[mask]))
        fd = dm.frechet_distance(np.asarray(dm.judge_features(judge, x[mask])), real_feats)
        return (harmful, accuracy, fd), np.asarray(x)

    units = [(m, s) for s in range(cfg.eval.seeds) for m in cfg.methods]
    stages = 1 + len(cfg.attacks)
    grid_n = min(8, cfg.eval.samples)

    def init_state():
        n = len(units)
        return {
            "done": jnp.zeros((), jnp.int32),
            "metrics": jnp.full((n, stages, 3), jnp.nan),  # harmful, accuracy, fd
            "fallbacks": jnp.zeros((n, 2)),  # Richardson fallbacks, hypergradients
            "seconds": jnp.zeros(n),
            "grids": jnp.zeros((len(cfg.methods), 2, dm.NUM_CLASSES * grid_n, 64)),
        }

    def step(state):
        state = jax.tree.map(jnp.asarray, state)  # numpy after a restore
        i = int(state["done"])
        method, seed = units[i]
        t0 = time.perf_counter()
        lam, fallbacks, calls = unlearn(method, seed)
        key = jax.random.key(10_000 + 100 * cfg.seed + seed)
        rows, grids = [], []
        params = weights(lam)
        for j, attack in enumerate((None, *cfg.attacks)):
            if attack is not None:
                params = attack_run(attack, lam, jax.random.fold_in(key, 2 * j))
            row, images = evaluate(params, jax.random.fold_in(key, 2 * j + 1))
            rows.append(row)
            if j <= 1:  # after unlearning, after the first attack
                per_class = images.reshape(dm.NUM_CLASSES, cfg.eval.samples, 64)
                grids.append(per_class[:, :grid_n].reshape(-1, 64))
        new = dict(state)
        new["metrics"] = state["metrics"].at[i].set(jnp.asarray(rows))
        new["fallbacks"] = state["fallbacks"].at[i].set(jnp.asarray([fallbacks, calls]))
        new["seconds"] = state["seconds"].at[i].set(time.perf_counter() - t0)
        if seed == 0:
            grids += [np.zeros_like(grids[0])] * (2 - len(grids))  # no attack configured
            new["grids"] = state["grids"].at[cfg.methods.index(method)].set(jnp.asarray(grids))
        new["done"] = jnp.asarray(i + 1, jnp.int32)
        return new, {"unit": i, "harmful_after_first_attack": rows[min(1, len(rows) - 1)][0]}

    def finish(state, rundir):
        summary = summarize(cfg, state)
        if rundir.primary:
            write_plots(rundir, cfg, state)
            print_table(summary, rundir)
        return summary

    return Experiment(len(units), init_state, step, finish, cfg.run.checkpoint_every)


METRICS = ("harmful_rate", "benign_accuracy", "frechet")


def summarize(cfg: Config, state) -> dict:
    """Per method and stage (after unlearning, after each attack): mean and std over seeds
    of the harmful rate, the benign accuracy and the Fréchet distance."""
    metrics = np.asarray(state["metrics"])  # [units, stages, 3]
    fallbacks, seconds = np.asarray(state["fallbacks"]), np.asarray(state["seconds"])
    names = ["unlearned", *(a.name for a in cfg.attacks)]
    rows = {}
    for k, method in enumerate(cfg.methods):
        idx = [s * len(cfg.methods) + k for s in range(cfg.eval.seeds)]
        m = metrics[idx]
        stages = {}
        for j, name in enumerate(names):
            stages[name] = {key: float(np.mean(m[:, j, c])) for c, key in enumerate(METRICS)}
            stages[name] |= {
                f"{key}_std": float(np.std(m[:, j, c])) for c, key in enumerate(METRICS)
            }
        rows[method] = {
            "label": LABELS[method],
            "stages": stages,
            "harmful_after_attacks": float(np.mean(m[:, 1:, 0])) if len(names) > 1 else None,
            "richardson_fallbacks": int(fallbacks[idx, 0].sum()),
            "hypergradients": int(fallbacks[idx, 1].sum()),
            "seconds": float(np.mean(seconds[idx])),
        }
    return {
        "concept": cfg.unlearn.concept,
        "seeds": cfg.eval.seeds,
        "stages": names,
        "methods": rows,
    }


def write_plots(rundir, cfg: Config, state) -> None:
    grids = np.asarray(state["grids"])  # [methods, 2, 10·n, 64]
    n = grids.shape[2] // dm.NUM_CLASSES
    fig, axes = plots.subplots(
        len(cfg.methods), 2, figsize=(6, 2.2 * len(cfg.methods)), squeeze=False
    )
    for k, method in enumerate(cfg.methods):
        for j, title in enumerate(
            ("after unlearning", f"after {cfg.attacks[0].name if cfg.attacks else ''}")
        ):
            tiles = grids[k, j].reshape(dm.NUM_CLASSES, n, 8, 8)  # [class, sample, row, col]
            image = tiles.transpose(1, 2, 0, 3).reshape(n * 8, dm.NUM_CLASSES * 8)
            ax = axes[k, j]
            ax.imshow(image, cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{LABELS[method]}: {title}", fontsize="x-small")
    fig.suptitle(f"Samples per class (columns: digits 0-9; concept {cfg.unlearn.concept}), seed 0")
    fig.tight_layout()
    fig.savefig(rundir.plots / "samples.png", dpi=110)


def print_table(summary: dict, rundir) -> None:
    stages = summary["stages"]
    print(
        f"\nHarmful rate (judge p(concept {summary['concept']}) > 0.5) and benign accuracy of "
        f"generated digits, mean over {summary['seeds']} seeds:"
    )
    head = "".join(f"{s[:16]:>18}" for s in stages)
    print(f"{'method':<26}{head}   benign acc, Fréchet (after unlearning)")
    for row in summary["methods"].values():
        cells = "".join(f"{row['stages'][s]['harmful_rate']:>18.3f}" for s in stages)
        first = row["stages"][stages[0]]
        utility = f"{first['benign_accuracy']:>10.3f}   {first['frechet']:>7.2f}"
        print(f"{row['label']:<26}{cells}   {utility}")
    print(f"run directory: {rundir.path}\nplots: {rundir.plots}")
