"""FDS memory: peak memory of forward mode against reverse mode as the horizon T grows.

FDS's point (Micaelli & Storkey 2021, claim (d)): forward-mode hypergradients of a few
shared hyperparameters need memory independent of the horizon, while reverse mode
stores the trajectory (O(T)) or, rematerialised, O(√T) of it. The problem is the FDS
setting of the other experiments: an MLP on digits trained by ``sgd_momentum(clip=3)``
with a shared learning-rate schedule, momentum and weight decay as hyperparameters.

Memory is XLA's compiled memory analysis of the jitted hypergradient (temporary buffers:
what reverse mode stores per step, the tangents forward mode carries), not a process RSS:
deterministic on a backend, with no allocator noise. Time per hypergradient (compilation
excluded, one call after a warm-up) and its ratio to a plain training run are recorded
too, on whatever machine runs it.

Harness mapping: one "outer step" per horizon T (all estimators for that T).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import field
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

import hypergrad_jax as hg
from experiments import common, plots
from experiments.config import bounds
from experiments.harness import Experiment

ESTIMATORS = ("forward", "unrolled", "unrolled_remat")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    horizons: tuple[int, ...] = (100, 1000, 10000)
    lr_blocks: int = field(default=10, metadata=bounds(ge=1))
    estimators: tuple[Literal[ESTIMATORS], ...] = ESTIMATORS  # type: ignore[valid-type]


@dataclasses.dataclass(frozen=True)
class Config:
    experiment: Literal["fds_memory"] = "fds_memory"
    seed: int = field(default=0, metadata=bounds(ge=0))
    data: common.DataConfig = common.DataConfig(val_fraction=0.2, test_fraction=0.0, batch_size=128)
    model: common.ModelConfig = common.ModelConfig(hidden=(32,))
    memory: MemoryConfig = MemoryConfig()
    run: common.RunConfig = common.RunConfig(checkpoint_every=1)

    def __post_init__(self):
        common.no_data_parallel(self.run, "fds_memory", "it measures one device's compiled memory")
        common.no_val_batch(self.data, "fds_memory", "it measures one fixed validation batch")


def measure(fn, *args) -> tuple[int, float]:
    """Compiled temporary bytes and the seconds of one call after a warm-up."""
    compiled = jax.jit(fn).lower(*args).compile()
    analysis = compiled.memory_analysis()
    jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return int(analysis.temp_size_in_bytes), time.perf_counter() - start


def build(cfg: Config) -> Experiment:
    data, splits = cfg.data.load(cfg.seed)
    train, val = hg.data.to_batch(splits.train), hg.data.to_batch(splits.val)
    sampler = hg.data.minibatch_sampler(train, cfg.data.batch_size)
    classifier = common.Classifier(common.MLP(data.num_classes, cfg.model.hidden))
    problem = classifier.problem()
    key = jax.random.key(cfg.seed)
    params0 = classifier.init(key, int(np.prod(data.x.shape[1:])))
    hparams = {
        "optimizer": {
            "lr": hg.Shared(jnp.full(cfg.memory.lr_blocks, 0.05)),
            "momentum": jnp.asarray(0.9),
            "weight_decay": jnp.asarray(5e-4),
        }
    }
    horizons, names = cfg.memory.horizons, cfg.memory.estimators
    optimizer = hg.optim.sgd_momentum(clip=3.0)

    def init_state():
        shape = (len(horizons), len(names) + 1)  # the last column: a plain training run
        return {"temp_bytes": np.zeros(shape, np.int64), "seconds": np.zeros(shape)}

    def step(state):
        i = int(np.count_nonzero(state["seconds"][:, -1]))  # horizons done so far
        run = hg.InnerRun(optimizer, horizons[i])
        state = jax.tree.map(np.array, state)
        for j, name in enumerate(names):
            est = common.make_estimator(name)
            fn = lambda h, p, s, v, k, est=est, run=run: hg.hypergradient(  # noqa: E731
                problem, run, est, h, p, s, v, key=k
            )[0]
            state["temp_bytes"][i, j], state["seconds"][i, j] = measure(
                fn, hparams, params0, sampler, val, key
            )
        plain = lambda h, p, s, k, run=run: hg.solve(problem, run, hg.Unrolled(), h, p, s, key=k)  # noqa: E731
        state["temp_bytes"][i, -1], state["seconds"][i, -1] = measure(
            plain, hparams, params0, sampler, key
        )
        mib = state["temp_bytes"][i] / 2**20
        metrics = {f"{n}_temp_mib": mib[j] for j, n in enumerate(names)}
        metrics |= {
            f"{n}_x_plain": state["seconds"][i, j] / state["seconds"][i, -1]
            for j, n in enumerate(names)
        }
        return state, {"T": horizons[i], **metrics}

    def finish(state, rundir):
        mib = state["temp_bytes"] / 2**20
        ratio = state["seconds"][:, :-1] / state["seconds"][:, -1:]
        rows = [
            {
                "T": t,
                **{f"{n}_temp_mib": mib[i, j] for j, n in enumerate(names)},
                **{f"{n}_x_plain": ratio[i, j] for j, n in enumerate(names)},
            }
            for i, t in enumerate(horizons)
        ]
        growth = {n: mib[-1, j] / mib[0, j] for j, n in enumerate(names)}
        summary = {
            "experiment": "fds_memory",
            "hyperparameters": cfg.memory.lr_blocks + 2,
            "rows": rows,
            "memory_growth_first_to_last_T": growth,
        }
        if rundir.primary:
            plots.curves(
                rundir.plots / "memory_vs_horizon.png",
                {n: (horizons, mib[:, j]) for j, n in enumerate(names)},
                xlabel="horizon T (inner steps)",
                ylabel="compiled temporary memory (MiB)",
                logy=True,
                logx=True,
                title=f"Hypergradient memory, {cfg.memory.lr_blocks + 2} hyperparameters",
            )
            print(f"\n{'T':>7}" + "".join(f"{n + ' MiB':>22}{'x plain':>9}" for n in names))
            for r in rows:
                print(
                    f"{r['T']:>7}"
                    + "".join(
                        f"{r[f'{n}_temp_mib']:>22.2f}{r[f'{n}_x_plain']:>9.2f}" for n in names
                    )
                )
            print(f"plots: {rundir.plots}")
        return summary

    return Experiment(len(horizons), init_state, step, finish, cfg.run.checkpoint_every)
