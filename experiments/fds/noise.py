"""FDS noise: learning-rate hypergradient noise against the sharing width W.

Micaelli & Storkey (2021) share one hyperparameter value over ``W`` contiguous inner steps
and claim that this averages ``W`` per-step hypergradients and so lowers their noise,
``MSE_W < (1 + c(W-1))/W · MSE_1 + L²(W²-1)/12`` (``c``: the average correlation of the
per-step hypergradients within a block, ``L``: how fast their mean drifts per step), with
``W ≈ 50`` best. This experiment measures both terms on a small problem.

Setup. An MLP on sklearn's digits (or MNIST-1D) is trained for ``T = inner.num_steps``
minibatch steps of ``hg.optim.sgd_momentum(clip=...)`` with momentum and weight decay
fixed. The learning rate is an ``hg.Shared`` schedule of ``N = T/W`` blocks, all at the
same value ``inner.lr``. For every width ``W`` and every one of ``S = noise.seeds`` seeds
(a seed fixes the network initialisation and the minibatch sequence; the same ``S`` seeds
are used for every ``W``, so the comparison between widths is paired) we compute the
hypergradient of the validation cross-entropy at ``θ_T`` with respect to the ``N`` block
values in two ways:

* long horizon: ``hg.Forward()`` through all ``T`` steps (forward mode, ``N`` tangents);
* greedy (one step): for each step ``t``, ``h_t = ∂ f(θ_{t+1}) / ∂α_t`` with ``θ_t`` and
  the velocity ``v_t`` held fixed (``= -∇f(θ_{t+1})·v_{t+1}``; Baydin et al.'s hypergradient
  descent with the validation loss ``f``; this is exactly what ``hg.Greedy()`` returns for a
  run that ends at step ``t+1``). Under sharing, block ``j``'s greedy hypergradient is
  ``Σ_{t in block j} h_t``: every step's one-step look-ahead with respect to the value it
  uses. (``hg.Greedy()`` on the whole ``T``-step run differentiates only step ``T-1``, so
  it would give zero for every block but the last: not a per-block estimate.) It is
  computed by our own scan, the same inner step as the library's, with the block values
  as a ``Shared`` schedule, so sharing is genuinely applied, not assumed.

Normalisation. Block gradients are sums over ``W`` steps, so they are divided by ``W``:
the per-step estimate at step ``t`` is ``ĝ_W(t) = ∂F/∂λ_{j(t)} / W``, the block mean of
the per-step hypergradients, comparable across widths. Because all blocks hold the same
value, the inner trajectory of a seed is the same for every ``W`` and ``∂F/∂λ_j`` is
*exactly* the sum of the ``W = 1`` per-step hypergradients over block ``j`` (sharing =
summing per-step tangents; asserted by the tests).

Statistics, per width and per estimator, averaged over the ``T`` steps (equivalently
over the blocks), with ``g(t) = E[ĝ_1(t)]`` the true mean per-step hypergradient that
``W = 1`` estimates without bias:

* ``variance``: the across-seed variance of ``ĝ_W(t)`` (unbiased, ``ddof = 1``);
* ``bias2``: ``(E[ĝ_W(t)] − g(t))²``, the squared difference between the block mean and the
  per-step mean of the hypergradient — the bound's ``L²(W²−1)/12`` term. It is estimated
  without bias from the per-seed differences ``d = ĝ_W − ĝ_1`` as ``mean(d)² − var(d)/S``
  (the plain ``mean(d)²`` would add the reference's own noise); it can come out slightly
  negative where the true bias is far below the noise;
* ``mse = variance + bias2``, the error against the true per-step hypergradient, and its
  ratio to ``mse_1``;
* ``c_implied``: the ``c`` that makes ``variance_W = variance_1 (1 + c(W−1)) / W``;
* ``mse_norm`` (with ``variance_norm``, ``bias2_norm``): the same MSE with step ``t``
  weighted by ``1 / variance_1(t)``, so that every step counts equally. The plain
  averages above are dominated by the steps whose hypergradients are noisiest (early
  training here), and the two weightings can rank widths differently. ``mse_norm`` is 1
  at ``W = 1`` by construction; with weights estimated from ``S`` seeds it is biased
  against ``W > 1`` by up to ``(S−1)/(S−3)`` (~12% at 20 seeds);
* ``mse_vs_mean``: the plain mean squared error against the across-seed mean of the
  ``W = 1`` hypergradients (the same seeds: it understates the noise at small ``W``).

Averaging the reference into the same blocks would make the bias identically zero (by
linearity), which is why the reference here stays per step. Greedy statistics use the
greedy ``W = 1`` hypergradients as their reference: they measure the greedy estimator's own
noise; how far greedy is from the long-horizon hypergradient is summarised separately.

Harness mapping: there is no outer optimisation. One "outer step" is one width: step ``i``
computes the hypergradients for ``noise.widths[i]`` (one jitted function per width; seeds
run by ``lax.map``, ``noise.seed_batch`` of them vmapped together: 1, the default, since the
``N`` forward-mode tangents already batch the work, and vmapping seeds on top compiled and
ran slower on 2 CPU cores) and logs one line
of that width's statistics. The state holds the per-step estimates of every width done so
far, so checkpoints and ``--resume`` work. ``noise.widths`` must start at 1 (the reference)
and be increasing. ``finish`` bootstraps over seeds for error bars, writes
``plots/noise_vs_width.png``, ``plots/per_step_hypergradients.png`` and
``hypergradients.npz`` (the raw per-step estimates), and prints a table.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import field
from functools import partial
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import hypergrad_jax as hg
from experiments import common, plots
from experiments.config import ConfigError, bounds
from experiments.harness import Experiment


@dataclasses.dataclass(frozen=True)
class InnerConfig:
    num_steps: int = field(default=250, metadata=bounds(ge=1))
    lr: float = field(default=0.05, metadata=bounds(gt=0))
    momentum: float = field(default=0.9, metadata=bounds(ge=0, lt=1))
    weight_decay: float = field(default=0.0005, metadata=bounds(ge=0))
    clip: float = field(default=3.0, metadata=bounds(gt=0))


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    widths: tuple[int, ...] = (1, 5, 10, 25, 50, 125, 250)
    seeds: int = field(default=20, metadata=bounds(ge=2))
    seed_batch: int = field(default=1, metadata=bounds(ge=1))
    bootstrap: int = field(default=500, metadata=bounds(ge=0))


@dataclasses.dataclass(frozen=True)
class Config:
    experiment: Literal["fds_noise"] = "fds_noise"
    seed: int = field(default=0, metadata=bounds(ge=0))
    data: common.DataConfig = common.DataConfig(test_fraction=0.0)
    model: common.ModelConfig = common.ModelConfig(hidden=(32,))
    inner: InnerConfig = InnerConfig()
    noise: NoiseConfig = NoiseConfig()
    run: common.RunConfig = common.RunConfig(checkpoint_every=1)

    def __post_init__(self):
        common.no_data_parallel(
            self.run, "fds_noise", "its seeds are mapped and vmapped on one device"
        )
        common.no_val_batch(self.data, "fds_noise", "every seed's hypergradient is of one loss")
        widths, steps = list(self.noise.widths), self.inner.num_steps
        if not widths or widths[0] != 1 or any(a >= b for a, b in zip(widths, widths[1:])):
            raise ConfigError(
                f"noise.widths: {widths}; expected increasing widths starting at 1 "
                "(W = 1, no sharing, is the per-step reference)"
            )
        bad = [w for w in widths if steps % w]
        if bad:
            raise ConfigError(
                f"noise.widths: {bad} do not divide inner.num_steps = {steps}; expected "
                "divisors of the horizon (equal blocks)"
            )


# ----------------------------------------------------------------------------- the problem


class Setup(NamedTuple):
    """The static (hashable) part of the computation: equal setups share compiled code."""

    classifier: common.Classifier
    num_steps: int
    lr: float
    momentum: float
    weight_decay: float
    clip: float
    seed_batch: int


def _optimizer_hparams(momentum, weight_decay, hparams):
    return {"lr": hg.Shared(hparams["lr"]), "momentum": momentum, "weight_decay": weight_decay}


def inner_run(setup: Setup) -> hg.InnerRun:
    """SGD with momentum, the learning rate a ``Shared`` schedule ``hparams["lr"]``."""
    select = partial(_optimizer_hparams, setup.momentum, setup.weight_decay)
    return hg.InnerRun(hg.optim.sgd_momentum(clip=setup.clip), setup.num_steps, select)


def lr_hparams(setup: Setup, width: int) -> dict:
    """``N = T / W`` learning-rate blocks, all at the base value."""
    return {"lr": jnp.full(setup.num_steps // width, setup.lr)}


def greedy_hypergradient(problem, run, hparams, params0, sampler, outer_data, key):
    """``Σ_{t in block j} ∂f(θ_{t+1})/∂λ_j`` with ``(θ_t, v_t)`` fixed at every step: the
    one-step (greedy) hypergradients of the run, summed into the blocks of ``hparams``.

    Each step is the inner run's computation (same batch, same resolved schedule, same
    optimizer update), differentiated only through its own update.
    """

    def resolved(h, t):
        return hg.optim.at_step(run.optimizer.resolve(run.optimizer_hparams(h)), t, run.num_steps)

    state0 = (params0, run.optimizer.init(params0, resolved(hparams, 0)))

    def body(carry, t):
        (params, opt_state), total = carry
        batch = hg.data.batch_at(sampler, key, t)
        grads = jax.grad(problem.inner_loss)(params, hparams, batch)

        def one_step(h):
            new = run.optimizer.update(grads, opt_state, params, resolved(h, t), t)
            return problem.outer_loss(new[0], h, outer_data), new

        g, new_state = jax.grad(one_step, has_aux=True)(hparams)
        return (new_state, jax.tree.map(jnp.add, total, g)), None

    zeros = jax.tree.map(jnp.zeros_like, hparams)
    steps = jnp.arange(run.num_steps, dtype=jnp.int32)
    (_, total), _ = jax.lax.scan(body, (state0, zeros), steps)
    return total


@partial(jax.jit, static_argnums=(0, 1))
def block_hypergradients(setup: Setup, width: int, params0, data_keys, sampler, outer_data):
    """Block hypergradients of every seed at one width.

    Args:
      setup, width: static; one compiled program per ``(setup, width)``.
      params0: initial network parameters, stacked over seeds (leading axis ``S``).
      data_keys: ``(S,)`` PRNG keys of the minibatch sequences.
      sampler: the inner minibatch sampler; outer_data: the validation batch.

    Returns:
      ``(forward, greedy, outer_loss, status)``: ``(S, N)`` long-horizon (``hg.Forward()``)
      and greedy block hypergradients, ``(S,)`` validation losses at ``θ_T`` and
      ``hg.Status`` codes.
    """
    run = inner_run(setup)
    hparams = lr_hparams(setup, width)
    problem = setup.classifier.problem()

    def one_seed(args):
        p0, key = args
        g, info = hg.hypergradient(
            problem, run, hg.Forward(), hparams, p0, sampler, outer_data, key=key
        )
        greedy = greedy_hypergradient(problem, run, hparams, p0, sampler, outer_data, key)
        return g["lr"], greedy["lr"], info.outer_value, info.status

    batch = None if setup.seed_batch == 1 else setup.seed_batch
    return jax.lax.map(one_seed, (params0, data_keys), batch_size=batch)


def per_step(block_grads, width: int) -> np.ndarray:
    """``(S, N)`` block hypergradients -> ``(S, T)`` per-step estimates (block grad / W)."""
    return np.repeat(np.asarray(block_grads) / width, width, axis=1)


class Inputs(NamedTuple):
    """Everything the per-width computation takes, the same for every width."""

    setup: Setup
    params0: dict  # initial MLP parameters, stacked over seeds (leading axis S)
    data_keys: jax.Array  # (S,) PRNG keys of the minibatch sequences
    sampler: hg.data.Sampler  # training minibatches
    val: dict  # the validation batch (the outer loss's data)


def prepare(cfg: Config) -> Inputs:
    """Data, seeds and initial networks for ``cfg``: seed ``s`` is one network
    initialisation and one minibatch sequence, the same for every width."""
    data, splits = cfg.data.load(cfg.seed)
    train, val = hg.data.to_batch(splits.train), hg.data.to_batch(splits.val)
    sampler = hg.data.minibatch_sampler(train, cfg.data.batch_size)
    classifier = common.Classifier(common.MLP(data.num_classes, cfg.model.hidden))
    num_features = int(np.prod(data.x.shape[1:]))
    keys = jax.random.split(jax.random.key(cfg.seed), (cfg.noise.seeds, 2))
    params0 = jax.vmap(lambda k: classifier.init(k, num_features))(keys[:, 0])
    setup = Setup(
        classifier,
        cfg.inner.num_steps,
        cfg.inner.lr,
        cfg.inner.momentum,
        cfg.inner.weight_decay,
        cfg.inner.clip,
        cfg.noise.seed_batch,
    )
    return Inputs(setup, params0, keys[:, 1], sampler, val)


# ----------------------------------------------------------------------------- statistics


def noise_stats(estimate: np.ndarray, reference: np.ndarray, weights: np.ndarray) -> dict:
    """Noise of per-step estimates ``(S, T)`` at one width against the ``W = 1`` ones.

    See the module docstring: ``variance`` (ddof 1), ``bias2`` (unbiased: ``mean(d)² −
    var(d)/S`` with ``d = estimate − reference`` per seed), ``mse = variance + bias2`` and
    ``mse_vs_mean`` (plain error against the across-seed mean of ``reference``), each
    averaged over steps; the ``*_norm`` versions weight step ``t`` by ``weights[t]``
    (``1 / variance_1(t)``), so that every step counts equally.
    """
    estimate, reference = np.asarray(estimate, np.float64), np.asarray(reference, np.float64)
    s = estimate.shape[0]
    variance = estimate.var(axis=0, ddof=1)
    d = estimate - reference
    bias2 = d.mean(axis=0) ** 2 - d.var(axis=0, ddof=1) / s
    return {
        "variance": float(np.mean(variance)),
        "bias2": float(np.mean(bias2)),
        "mse": float(np.mean(variance + bias2)),
        "mse_vs_mean": float(np.mean((estimate - reference.mean(axis=0)) ** 2)),
        "variance_norm": float(np.mean(weights * variance)),
        "bias2_norm": float(np.mean(weights * bias2)),
        "mse_norm": float(np.mean(weights * (variance + bias2))),
    }


def width_stats(estimates: np.ndarray, widths) -> list[dict]:
    """Statistics of every width from stacked per-step estimates ``(len(widths), S, T)``
    (index 0 is ``W = 1``), with ratios to ``W = 1`` and the implied correlation ``c``."""
    estimates = np.asarray(estimates, np.float64)
    variance_1 = estimates[0].var(axis=0, ddof=1)
    positive = variance_1 > 0
    weights = np.where(positive, 1 / np.where(positive, variance_1, 1), 0.0)
    weights = weights * (weights.size / max(int(positive.sum()), 1))  # mean 1 where defined
    rows = [noise_stats(est, estimates[0], weights) for est in estimates]
    base = rows[0]
    for w, row in zip(widths, rows):
        row["width"] = int(w)
        row["variance_ratio"] = _ratio(row["variance"], base["variance"])
        row["mse_ratio"] = _ratio(row["mse"], base["mse"])
        ratio = row["variance_ratio"]
        row["c_implied"] = None if w == 1 or ratio is None else (w * ratio - 1) / (w - 1)
    return rows


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _nan_if_none(x):
    return np.nan if x is None else x


def bootstrap(estimates: np.ndarray, widths, num: int, seed: int) -> dict:
    """Seed bootstrap (seeds resampled jointly for all widths: they are paired): the
    16th/50th/84th percentiles of ``variance_ratio``, ``mse_ratio`` and ``mse_norm`` per
    width, and how often each width has the smallest ``mse`` and ``mse_norm``.

    Approximate: a resample repeats seeds, which the ``bias2`` debiasing (``var(d)/S``)
    does not account for, so resampled MSEs lean high where the bias is small.
    """
    if num == 0:
        return {}
    rng = np.random.default_rng(seed)
    s = estimates.shape[1]
    keys = ("variance_ratio", "mse_ratio", "mse_norm")
    samples = {k: [] for k in keys}
    best = {k: np.zeros(len(widths)) for k in ("mse", "mse_norm")}
    for _ in range(num):
        rows = width_stats(estimates[:, rng.integers(0, s, s)], widths)
        for k in keys:
            samples[k].append([_nan_if_none(r[k]) for r in rows])
        for k, counts in best.items():
            counts[int(np.argmin([r[k] for r in rows]))] += 1
    out = {
        f"{k}_q16_50_84": np.nanpercentile(np.asarray(v, float), [16, 50, 84], axis=0).T.tolist()
        for k, v in samples.items()
    }
    for k, counts in best.items():
        out[f"best_width_frequency_{k}"] = {int(w): float(c / num) for w, c in zip(widths, counts)}
    return out


# ----------------------------------------------------------------------------- experiment


def build(cfg: Config) -> Experiment:
    inputs = prepare(cfg)
    widths, num_seeds, num_steps = cfg.noise.widths, cfg.noise.seeds, cfg.inner.num_steps
    dtype = jnp.result_type(float)

    def init_state():
        shape = (len(widths), num_seeds, num_steps)
        return {
            "step": jnp.zeros((), jnp.int32),  # widths done
            "forward": jnp.zeros(shape, dtype),  # per-step estimates ĝ_W(t), long horizon
            "greedy": jnp.zeros(shape, dtype),  # per-step estimates, one-step horizon
            "val_loss": jnp.zeros((len(widths), num_seeds), dtype),  # f(θ_T) per seed
            "status": jnp.zeros(len(widths), jnp.int32),  # worst hg.Status over seeds
        }

    def step(state):
        i = int(state["step"])
        width = widths[i]
        fwd, greedy, loss, status = block_hypergradients(inputs.setup, width, *inputs[1:])
        state = {
            "step": jnp.asarray(state["step"]) + 1,
            "forward": jnp.asarray(state["forward"]).at[i].set(per_step(fwd, width)),
            "greedy": jnp.asarray(state["greedy"]).at[i].set(per_step(greedy, width)),
            "val_loss": jnp.asarray(state["val_loss"]).at[i].set(loss),
            "status": jnp.asarray(state["status"]).at[i].set(jnp.max(status)),
        }
        done = widths[: i + 1]
        metrics = {"width": width, "blocks": num_steps // width}
        for name, key in (("long", "forward"), ("greedy", "greedy")):
            row = width_stats(np.asarray(state[key][: i + 1]), done)[-1]
            metrics |= {f"{name}_{k}": v for k, v in row.items() if k != "width"}
        metrics |= {"outer_loss": jnp.mean(loss), "status": jnp.max(status)}
        return state, metrics

    def finish(state, rundir):
        t0 = time.perf_counter()
        n = int(state["step"])
        done = widths[:n]
        arrays = {k: np.asarray(state[k][:n], np.float64) for k in ("forward", "greedy")}
        np.savez(
            rundir.path / "hypergradients.npz",
            widths=np.asarray(done),
            val_loss=np.asarray(state["val_loss"][:n]),
            **arrays,
        )
        results = {}
        for name, key in (("long_horizon", "forward"), ("greedy", "greedy")):
            rows = width_stats(arrays[key], done)
            results[name] = {
                "rows": rows,
                "bootstrap": bootstrap(arrays[key], done, cfg.noise.bootstrap, cfg.seed),
                "best_width": int(done[int(np.argmin([r["mse"] for r in rows]))]),
                "best_width_norm": int(done[int(np.argmin([r["mse_norm"] for r in rows]))]),
            }
        mean_long, mean_greedy = (arrays[k][0].mean(axis=0) for k in ("forward", "greedy"))
        cosine = float(
            mean_long @ mean_greedy / (np.linalg.norm(mean_long) * np.linalg.norm(mean_greedy))
        )
        metrics = rundir.metrics()
        summary = {
            "experiment": "fds_noise",
            "widths_done": [int(w) for w in done],
            "num_steps": num_steps,
            "seeds": num_seeds,
            "lr": cfg.inner.lr,
            "normalisation": "per-step estimate = block hypergradient / W",
            "long_horizon": results["long_horizon"],
            "greedy": results["greedy"],
            "mean_val_loss": float(np.mean(np.asarray(state["val_loss"][:n]))),
            "val_loss_spread_across_widths": float(
                np.ptp(np.asarray(state["val_loss"][:n]), 0).max()
            ),
            "greedy_long_mean_cosine": cosine,
            "compute_s": float(sum(m["time_s"] for m in metrics)),
            "status": int(np.max(state["status"][:n])),
        }
        write_plots(rundir, summary, arrays, done)
        summary["finish_s"] = time.perf_counter() - t0
        print_table(summary, rundir)
        return summary

    return Experiment(len(widths), init_state, step, finish, cfg.run.checkpoint_every)


# ----------------------------------------------------------------------------- output


COLOURS = {"long_horizon": "C0", "greedy": "C1"}
LABELS = {"long_horizon": "long horizon (Forward)", "greedy": "greedy (one step)"}
PANELS = (
    ("variance_ratio", "variance / variance at W = 1", "across-seed variance (all steps pooled)"),
    ("mse_ratio", "MSE / MSE at W = 1", "MSE vs true per-step hypergradient (pooled)"),
    ("mse_norm", "mean over t of MSE(t) / variance₁(t)", "MSE, every step weighted equally"),
)


def write_plots(rundir, summary, arrays, widths):
    w = np.asarray(widths, float)
    fig, axes = plots.subplots(1, len(PANELS), figsize=(15, 4.4))
    for ax, (key, ylabel, title) in zip(axes, PANELS):
        for name in ("long_horizon", "greedy"):
            rows, boot = summary[name]["rows"], summary[name]["bootstrap"]
            y = np.asarray([_pos(r[key]) for r in rows])
            if boot:
                q = np.asarray(boot[f"{key}_q16_50_84"], float)
                err = np.stack([np.clip(y - q[:, 0], 0, None), np.clip(q[:, 2] - y, 0, None)])
                err = np.where(np.isfinite(err), err, 0.0)
                ax.errorbar(w, y, yerr=err, marker="o", capsize=3, color=COLOURS[name],
                            label=LABELS[name])  # fmt: skip
            else:
                ax.plot(w, y, marker="o", color=COLOURS[name], label=LABELS[name])
            if key != "variance_ratio":  # the bias² part of the MSE, same units
                base = rows[0]["mse"] if key == "mse_ratio" else 1.0
                bias = "bias2" if key == "mse_ratio" else "bias2_norm"
                b2 = [_pos(r[bias] / base) if base > 0 else np.nan for r in rows]
                ax.plot(w, b2, ls=":", marker=".", color=COLOURS[name],
                        label=f"{LABELS[name]}: bias²")  # fmt: skip
        ax.plot(w, 1 / w, "k--", lw=1, label="1/W (independent steps)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sharing width W (steps per learning-rate value)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize="medium")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="x-small")
    boot = " bars: 16–84% seed bootstrap;" if summary["long_horizon"]["bootstrap"] else ""
    fig.suptitle(
        f"Learning-rate hypergradient noise vs sharing width (T = {summary['num_steps']}, "
        f"{summary['seeds']} seeds;{boot} per-step estimate = block gradient / W)",
        fontsize="medium",
    )
    fig.tight_layout()
    fig.savefig(rundir.plots / "noise_vs_width.png", dpi=120)

    # The mean per-step hypergradient and its spread: where the bias term comes from.
    t = np.arange(arrays["forward"].shape[2])
    fig, axes = plots.subplots(2, 1, figsize=(8, 6), sharex=True)
    for ax, name, key in zip(axes, ("long_horizon", "greedy"), ("forward", "greedy")):
        per = arrays[key][0]
        mean, std = per.mean(axis=0), per.std(axis=0, ddof=1)
        ax.fill_between(t, mean - std, mean + std, color=COLOURS[name], alpha=0.2,
                        label="± 1 std over seeds, W = 1")  # fmt: skip
        ax.plot(t, mean, color=COLOURS[name], lw=1, label="mean over seeds, W = 1")
        best = summary[name]["best_width_norm"]
        k = list(widths).index(best)
        ax.step(t, arrays[key][k].mean(axis=0), where="post", color="k", lw=1,
                label=f"mean, W = {best} (lowest equal-weight MSE)")  # fmt: skip
        ax.axhline(0, color="grey", lw=0.5)
        if name == "greedy":
            ax.set_yscale("symlog", linthresh=float(np.abs(mean).min() + std.min()) or 1e-12)
        ax.set_ylabel("∂f/∂α_t (per step)")
        ax.set_title(LABELS[name], fontsize="medium")
        ax.legend(fontsize="x-small")
    axes[-1].set_xlabel("inner step t")
    fig.tight_layout()
    fig.savefig(rundir.plots / "per_step_hypergradients.png", dpi=120)


def _pos(x):
    """For log axes: non-positive or missing values are not drawn."""
    return x if x is not None and x > 0 else np.nan


def print_table(summary, rundir):
    lh, gr = summary["long_horizon"], summary["greedy"]
    print(
        f"\nLearning-rate hypergradient noise vs sharing width W (T = {summary['num_steps']}, "
        f"{summary['seeds']} seeds; per-step estimate = block gradient / W).\n"
        "var, MSE: pooled over steps, as ratios to W = 1; eqMSE: every step weighted by "
        "1/variance(t) at W = 1."
    )
    print(
        f"{'':>13}{'long horizon (Forward)':^63}{'greedy (one step)':^27}\n"
        f"{'W':>5}{'blocks':>8}{'variance':>11}{'bias²':>11}{'MSE':>11}{'var':>8}{'MSE':>8}"
        f"{'c':>6}{'eqMSE':>8}{'var':>9}{'MSE':>9}{'eqMSE':>9}"
    )
    for row, grow in zip(lh["rows"], gr["rows"]):
        c = "" if row["c_implied"] is None else f"{row['c_implied']:.2f}"
        print(
            f"{row['width']:>5}{summary['num_steps'] // row['width']:>8}"
            f"{row['variance']:>11.3g}{row['bias2']:>11.3g}{row['mse']:>11.3g}"
            f"{_fmt(row['variance_ratio']):>8}{_fmt(row['mse_ratio']):>8}{c:>6}"
            f"{_fmt(row['mse_norm']):>8}{_fmt(grow['variance_ratio']):>9}"
            f"{_fmt(grow['mse_ratio']):>9}{_fmt(grow['mse_norm']):>9}"
        )
    for name, res in (("long horizon", lh), ("greedy", gr)):
        parts = []
        for key, text in (("mse", "pooled MSE"), ("mse_norm", "eqMSE")):
            best = res["best_width" if key == "mse" else "best_width_norm"]
            freq = res["bootstrap"].get(f"best_width_frequency_{key}", {})
            share = f" ({freq[best]:.0%} of seed bootstraps)" if freq else ""
            parts.append(f"{text} at W = {best}{share}")
        print(f"lowest, {name}: " + "; ".join(parts))
    print(
        f"validation loss at T: {summary['mean_val_loss']:.3f}; cosine(mean greedy, mean long "
        f"horizon per-step hypergradients) = {summary['greedy_long_mean_cosine']:.2f}"
    )
    print(f"run directory: {rundir.path}\nplots: {rundir.plots}")


def _fmt(x):
    return "" if x is None else f"{x:.3g}"
