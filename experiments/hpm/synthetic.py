"""HPM on a synthetic landscape with many local minima and an exact hypergradient.

The inner problem is ``hg.testing.quadratic_problem`` (``θ ∈ R^dim``, ``d`` hyperparameters
``λ``, inner Hessian spectrum in ``[1, 10]``, gradient descent run to convergence from the
warm start), so ``θ*(λ)`` is linear in ``λ`` and the implicit hypergradient with a Cholesky
solve is exact. The validation loss gets a Rastrigin term in the hyperparameters::

    F(λ) = ½ ||P θ*(λ) − t||² + ½ r ||λ||² + a Σ_j (1 − cos(2π λ_j))

a convex bowl with ripples of period 1 and height ``2a`` in every coordinate: one local
minimum per unit cell near the bowl's bottom, where hypergradient descent gets stuck. The
``λ`` are read as log-hyperparameters (PBT's ``Perturb`` adds ``log f``). The initial
population is uniform in ``[−task.init_range, task.init_range]^d``.

The five methods of :mod:`experiments.hpm.compare` search it at equal budget; a member's
score is the exact ``F`` at its current hyperparameters. The summary reports the best ``F``
found per method against a reference minimum (the best of many gradient-descent starts on the
exact ``F``), over ``compare.seeds`` seeds.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import field
from typing import Literal

import jax
import jax.numpy as jnp

import hypergrad_jax as hg
from experiments.common import RunConfig
from experiments.config import bounds
from experiments.harness import Experiment
from experiments.hpm.compare import CompareConfig, Task, build_comparison


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    num_hparams: int = field(default=4, metadata=bounds(ge=1))  # d
    dim: int = field(default=10, metadata=bounds(ge=1))  # θ
    ripple: float = field(default=1.0, metadata=bounds(ge=0))  # a
    outer_reg: float = field(default=0.1, metadata=bounds(ge=0))  # r
    init_range: float = field(default=4.0, metadata=bounds(gt=0))
    reference_starts: int = field(default=4096, metadata=bounds(ge=1))


@dataclasses.dataclass(frozen=True)
class Config:
    experiment: Literal["hpm_synthetic"] = "hpm_synthetic"
    seed: int = field(default=0, metadata=bounds(ge=0))  # the problem and the populations
    task: TaskConfig = TaskConfig()
    compare: CompareConfig = CompareConfig()
    run: RunConfig = RunConfig()


def make_task(cfg: Config) -> tuple[Task, float]:
    """The :class:`~experiments.hpm.compare.Task` and the reference minimum of ``F``."""
    t = cfg.task
    exact = hg.testing.quadratic_problem(
        jax.random.key(cfg.seed), dim=t.dim, num_hparams=t.num_hparams, outer_reg=t.outer_reg
    )
    ripple = lambda h: t.ripple * jnp.sum(1 - jnp.cos(2 * math.pi * h))  # noqa: E731
    quadratic = exact.problem.outer_loss
    problem = exact.problem._replace(outer_loss=lambda p, h, b: quadratic(p, h, b) + ripple(h))
    objective = lambda h: exact.objective(h) + ripple(h)  # noqa: E731
    dtype = exact.hparams.dtype
    task = Task(
        problem=problem,
        run=exact.run,
        estimator=hg.Implicit(hg.Cholesky()),
        sample_hparams=lambda key: jax.random.uniform(
            key, (t.num_hparams,), dtype, -t.init_range, t.init_range
        ),
        params0=lambda key: exact.params0,
        inner_data=exact.inner_data,
        outer_data=exact.outer_data,
        transform=hg.population.Transform("log"),
        evaluate=lambda params, h: {"objective": objective(h)},
        score_fn=lambda params, h: objective(h),
        names=tuple(f"λ{j}" for j in range(t.num_hparams)),
        natural=lambda h: h,
    )
    return task, reference_minimum(objective, exact.objective, t, dtype, cfg.seed)


def reference_minimum(objective, bowl, t: TaskConfig, dtype, seed: int) -> float:
    """The best ``F`` of exact gradient descent (step 0.01 < 2 / (a (2π)² + the bowl's
    curvature), 2,000 steps) from every point of the integer lattice within 2 of the bowl's
    minimum (where the ripples' minima are; ``5^d`` starts, capped) and from
    ``t.reference_starts`` uniform starts in twice the initial box: an upper bound on the
    global minimum, which it finds in practice for small ``d``."""
    # The bowl (F without the ripples) is quadratic: its minimum is one Newton step from 0.
    zero = jnp.zeros(t.num_hparams, dtype)
    center = -jnp.linalg.solve(jax.hessian(bowl)(zero), jax.grad(bowl)(zero))
    lattice = itertools.islice(itertools.product(range(-2, 3), repeat=t.num_hparams), 4096)
    lattice = jnp.round(center)[None, :] + jnp.asarray(list(lattice), dtype)
    uniform = jax.random.uniform(
        jax.random.fold_in(jax.random.key(seed), 1),
        (t.reference_starts, t.num_hparams),
        dtype,
        -2 * t.init_range,
        2 * t.init_range,
    )
    grad = jax.vmap(jax.grad(objective))

    @jax.jit
    def descend(h):
        return jax.lax.fori_loop(0, 2000, lambda _, h: h - 0.01 * grad(h), h)

    ends = descend(jnp.concatenate([lattice, uniform]))
    return float(jnp.min(jax.vmap(objective)(ends)))


def build(cfg: Config) -> Experiment:
    task, reference = make_task(cfg)

    def report(summary, rundir):
        summary["reference_minimum"] = reference
        for row in summary["methods"].values():
            row["regret"] = row["score"] - reference
        if rundir.primary:
            print_table(summary, rundir)

    return build_comparison(task, cfg.compare, cfg.run, cfg.seed, report)


def print_table(summary, rundir):
    n = summary["seeds"]
    print(
        f"\nBest F found in {summary['member_intervals']} member-intervals "
        f"(K = {summary['population']}, {summary['intervals']} intervals of "
        f"{summary['interval']} outer steps), mean ± std over {n} seeds; reference minimum "
        f"{summary['reference_minimum']:.4f}:"
    )
    print(f"{'method':<34}{'best F':>16}{'regret':>10}{'HPM better':>12}{'time s':>9}")
    for row in summary["methods"].values():
        better = row.get("hpm_better_seeds")
        print(
            f"{row['label']:<34}{row['score']:>9.4f} ± {row['score_std']:.4f}"
            f"{row['regret']:>10.4f}{'' if better is None else f'{better}/{n}':>12}"
            f"{row['seconds']:>9.2f}"
        )
    print(f"run directory: {rundir.path}\nplots: {rundir.plots}")
