"""Quickstart: learn a learning-rate schedule and weight decay with forward mode.

An MLP on sklearn's digits is trained by SGD with momentum for ``inner.num_steps`` steps
from a poor setting (a learning rate far too small). The outer loop learns a
``lr_blocks``-block shared learning-rate schedule and the weight decay, in log space, by
forward-mode hypergradients of the validation loss (``hg.Forward()``), re-initialising the
network every outer step. Then both settings are retrained from scratch on fresh seeds and
compared on validation and test accuracy.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

import hypergrad_jax as hg
from experiments import common, plots
from experiments.config import bounds
from experiments.harness import Experiment


@dataclasses.dataclass(frozen=True)
class InnerConfig:
    num_steps: int = field(default=400, metadata=bounds(ge=1))
    momentum: float = field(default=0.9, metadata=bounds(ge=0, lt=1))
    clip: float = field(default=3.0, metadata=bounds(gt=0))


@dataclasses.dataclass(frozen=True)
class HparamConfig:
    lr_blocks: int = field(default=5, metadata=bounds(ge=1))
    init_lr: float = field(default=0.0003, metadata=bounds(gt=0))
    init_weight_decay: float = field(default=0.03, metadata=bounds(gt=0))


@dataclasses.dataclass(frozen=True)
class OuterConfig:
    estimator: Literal[common.ESTIMATORS] = "forward"  # type: ignore[valid-type]
    optimizer: Literal[common.OUTER_OPTIMIZERS] = "adam"  # type: ignore[valid-type]
    lr: float = field(default=0.2, metadata=bounds(gt=0))
    num_steps: int = field(default=50, metadata=bounds(ge=1))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    seeds: int = field(default=3, metadata=bounds(ge=1))


@dataclasses.dataclass(frozen=True)
class Config:
    experiment: Literal["quickstart"] = "quickstart"
    seed: int = field(default=0, metadata=bounds(ge=0))
    data: common.DataConfig = common.DataConfig()
    model: common.ModelConfig = common.ModelConfig()
    inner: InnerConfig = InnerConfig()
    hparams: HparamConfig = HparamConfig()
    outer: OuterConfig = OuterConfig()
    eval: EvalConfig = EvalConfig()
    run: common.RunConfig = common.RunConfig()


def optimizer_hparams(momentum: float):
    """Hyperparameters are learned in log space; momentum stays fixed."""

    def select(h):
        return {
            "lr": hg.Shared(jnp.exp(h["log_lr"])),
            "momentum": momentum,
            "weight_decay": jnp.exp(h["log_weight_decay"]),
        }

    return select


def build(cfg: Config) -> Experiment:
    data, splits = cfg.data.load(cfg.seed, require=("val", "test"))
    train, val, test = (hg.data.to_batch(s) for s in splits)
    outer_data = common.outer_data(val, cfg.data.val_batch)
    sampler = hg.data.minibatch_sampler(train, cfg.data.batch_size)
    classifier = common.Classifier(common.MLP(data.num_classes, cfg.model.hidden))
    num_features = int(np.prod(data.x.shape[1:]))
    problem = common.maybe_data_parallel(classifier.problem(), cfg.run)
    run = hg.InnerRun(
        hg.optim.sgd_momentum(clip=cfg.inner.clip),
        cfg.inner.num_steps,
        optimizer_hparams(cfg.inner.momentum),
    )
    reinit = lambda key: classifier.init(key, num_features)
    estimator = common.make_estimator(cfg.outer.estimator)
    optimizer = common.make_outer_optimizer(cfg.outer.optimizer, cfg.outer.lr)
    hparams0 = {
        "log_lr": jnp.full(cfg.hparams.lr_blocks, math.log(cfg.hparams.init_lr)),
        "log_weight_decay": jnp.asarray(math.log(cfg.hparams.init_weight_decay)),
    }
    key = jax.random.key(cfg.seed)

    def init_state():
        return hg.outer.init(optimizer, hparams0, reinit(key), key)

    @jax.jit
    def step(state):
        new, m = hg.outer.step(
            problem, run, estimator, optimizer, state, sampler, outer_data, reinit=reinit
        )
        # One metrics line describes one inner run: the hyperparameters it trained with, next
        # to the outer loss it reached (both before this step's update).
        return new, {
            **m._asdict(),
            "lr": jnp.exp(state.hparams["log_lr"]),
            "weight_decay": jnp.exp(state.hparams["log_weight_decay"]),
        }

    @jax.jit
    def evaluate(hparams, seed):
        k_init, k_data = jax.random.split(jax.random.key(seed))
        params = hg.solve(problem, run, hg.Unrolled(), hparams, reinit(k_init), sampler, key=k_data)
        return {
            "val_accuracy": classifier.accuracy(params, val),
            "test_accuracy": classifier.accuracy(params, test),
            "val_loss": classifier.loss(params, val),
        }

    def finish(state, rundir):
        seeds = [10_000 + cfg.seed * 100 + i for i in range(cfg.eval.seeds)]
        results = {}
        for name, h in (("initial", hparams0), ("learned", state.hparams)):
            evals = [jax.device_get(evaluate(h, s)) for s in seeds]
            results[name] = {k: float(np.mean([e[k] for e in evals])) for k in evals[0]}
            results[name] |= {f"{k}_std": float(np.std([e[k] for e in evals])) for k in evals[0]}
        summary = {
            "experiment": "quickstart",
            "outer_steps": int(state.step),
            "initial": results["initial"],
            "learned": results["learned"],
            "learned_lr_schedule": np.exp(np.asarray(state.hparams["log_lr"])).tolist(),
            "learned_weight_decay": float(np.exp(state.hparams["log_weight_decay"])),
            "eval_seeds": len(seeds),
        }
        if rundir.primary:  # every process evaluated (SPMD); one writes and prints
            write_plots(rundir, hparams0, state.hparams, cfg.inner.num_steps)
            print_table(summary, rundir)
        return summary

    return Experiment(cfg.outer.num_steps, init_state, step, finish, cfg.run.checkpoint_every)


def write_plots(rundir, hparams0, hparams, num_steps):
    metrics = rundir.metrics()
    # Line k: the run trained with the values after k updates, and the loss it reached.
    steps = [m["step"] for m in metrics]
    plots.curves(
        rundir.plots / "outer_loss.png",
        {"validation loss": (steps, [m["outer_loss"] for m in metrics])},
        xlabel="outer updates applied",
        ylabel="validation cross-entropy",
        title="Outer loss during hyperparameter learning",
    )
    lrs = np.asarray([m["lr"] for m in metrics])
    series = {f"lr block {j}": (steps, lrs[:, j]) for j in range(lrs.shape[1])}
    series["weight decay"] = (steps, [m["weight_decay"] for m in metrics])
    plots.curves(
        rundir.plots / "hyperparameters.png",
        series,
        xlabel="outer updates applied",
        ylabel="value",
        logy=True,
        title="Hyperparameter trajectories",
    )

    def schedule(h):
        values = np.exp(np.asarray(h["log_lr"]))
        n = len(values)
        t = np.arange(num_steps + 1)
        return t, values[np.minimum((n * t) // num_steps, n - 1)]

    plots.curves(
        rundir.plots / "lr_schedule.png",
        {"initial": schedule(hparams0), "learned": schedule(hparams)},
        xlabel="inner step",
        ylabel="learning rate",
        logy=True,
        step=True,
        title="Learning-rate schedule",
    )


def print_table(summary, rundir):
    init, learned = summary["initial"], summary["learned"]
    n = summary["eval_seeds"]
    print(f"\nRetrained from scratch, mean ± std over {n} seeds:")
    print(f"{'':<10}{'val acc':>16}{'test acc':>16}{'val loss':>12}")
    for name, r in (("initial", init), ("learned", learned)):
        print(
            f"{name:<10}{r['val_accuracy']:>10.3f} ± {r['val_accuracy_std']:.3f}"
            f"{r['test_accuracy']:>10.3f} ± {r['test_accuracy_std']:.3f}"
            f"{r['val_loss']:>12.3f}"
        )
    lr = ", ".join(f"{v:.3g}" for v in summary["learned_lr_schedule"])
    print(f"learned lr schedule: [{lr}]  weight decay: {summary['learned_weight_decay']:.3g}")
    print(f"run directory: {rundir.path}\nplots: {rundir.plots}")
