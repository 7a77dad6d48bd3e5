"""The HPM comparison shared by ``hpm_synthetic`` and ``hpm_digits``: five ways to search
hyperparameters at equal budget, each one :func:`hg.population.step <hypergrad_jax.population.step>`
per ready interval, every seed's population vmapped in one program.

=================  ===========================================================================
``hd``             hypergradient descent from ``K`` random starts (no exploit)
``random``         random search: ``K`` random members, no hypergradient, no exploit
``pbt``            PBT: no hypergradient, truncation exploit, ``Perturb`` explore
``hpm_gaussian``   HPM without the teacher: hypergradients, exploit, ``Gaussian`` explore
``hpm``            HPM: hypergradients, exploit, the learned ``Teacher`` explore
=================  ===========================================================================

Equal budget: every method trains ``K`` members for the same number of outer steps (each
an inner run of the same length), so the same number of member-intervals (model-epochs);
the methods without a hypergradient still run the inner training and the validation loss.
Wall time is measured per method too (the hypergradient is not free).

Evaluation: at the end of each interval every member is scored (lower is better) and
evaluated (``task.evaluate``); per seed the runner keeps the best score found so far and the
evaluation of that member at that time: "the best configuration found within the budget".
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import field
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hypergrad_jax as hg
from experiments import plots
from experiments.config import ConfigError, bounds
from experiments.harness import Experiment

PyTree = Any
METHODS = ("hd", "random", "pbt", "hpm_gaussian", "hpm")
LABELS = {
    "hd": "hypergradient descent (K starts)",
    "random": "random search",
    "pbt": "PBT (perturb)",
    "hpm_gaussian": "HPM without teacher (Gaussian)",
    "hpm": "HPM (teacher)",
}


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    methods: tuple[Literal[METHODS], ...] = METHODS  # type: ignore[valid-type]
    population: int = field(default=10, metadata=bounds(ge=2))  # K members
    intervals: int = field(default=20, metadata=bounds(ge=1))  # ready intervals
    interval: int = field(default=5, metadata=bounds(ge=1))  # outer steps per interval
    fraction: float = field(default=0.2, metadata=bounds(gt=0, le=0.5))  # exploit share
    seeds: int = field(default=10, metadata=bounds(ge=1))
    outer_lr: float = field(default=0.02, metadata=bounds(gt=0))  # hypergradient methods
    outer_optimizer: Literal["sgd", "adam"] = "sgd"
    perturb_factors: tuple[float, ...] = field(default=(0.8, 1.2), metadata=bounds(gt=0))
    gaussian_scale: float = field(default=0.5, metadata=bounds(gt=0))
    teacher_scale: float = field(default=1.0, metadata=bounds(gt=0))
    teacher_features: int = field(default=16, metadata=bounds(ge=1))
    teacher_lr: float = field(default=0.01, metadata=bounds(gt=0))

    def __post_init__(self):
        if not self.methods:
            raise ConfigError("compare.methods: expected at least one method")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"compare.methods: {list(self.methods)} lists a method twice")
        if self.fraction * self.population < 1:
            raise ConfigError(
                f"compare.fraction: {self.fraction} of compare.population = {self.population} "
                "is no member; expected fraction · population >= 1"
            )


class Task(NamedTuple):
    """A hyperparameter search problem the methods are compared on.

    Attributes:
      problem, run, estimator: as in ``hg.outer.step`` (the hypergradient methods).
      sample_hparams: ``key -> hparams`` of one member, in the problem's unconstrained
        space: the initial population and random search.
      params0: ``key -> params``: a member's initial inner parameters.
      inner_data, outer_data: as in ``hg.outer.step``.
      transform: how ``Perturb`` reads the hyperparameters (``hg.population.Transform``).
      evaluate: jittable ``(params, hparams) -> dict`` of scalars of one member.
      score_fn: ``(params, hparams) -> scalar`` (lower is better), or ``None``: the last
        outer step's validation loss.
      names: a name per flattened hyperparameter (plots).
      natural: ``hparams -> flat natural values`` (plots and tables).
    """

    problem: hg.BilevelProblem
    run: hg.InnerRun
    estimator: Any
    sample_hparams: Callable
    params0: Callable
    inner_data: Any
    outer_data: Any
    transform: hg.population.Transform
    evaluate: Callable
    score_fn: Callable | None
    names: tuple[str, ...]
    natural: Callable


def method_parts(name: str, task: Task, cfg: CompareConfig):
    """``(method, mutation, fraction)`` of a method name: the one table of the comparison."""
    no_grad = hg.population.NoHypergradient()
    return {
        "hd": (task.estimator, None, 0.0),
        "random": (no_grad, None, 0.0),
        "pbt": (
            no_grad,
            hg.population.Perturb(tuple(cfg.perturb_factors), task.transform),
            cfg.fraction,
        ),
        "hpm_gaussian": (task.estimator, hg.population.Gaussian(cfg.gaussian_scale), cfg.fraction),
        "hpm": (
            task.estimator,
            hg.population.Teacher(
                cfg.teacher_scale, cfg.teacher_features, optax.adam(cfg.teacher_lr)
            ),
            cfg.fraction,
        ),
    }[name]


def outer_optimizer(cfg: CompareConfig) -> optax.GradientTransformation:
    return {"sgd": optax.sgd, "adam": optax.adam}[cfg.outer_optimizer](cfg.outer_lr)


def build_comparison(task: Task, cfg: CompareConfig, run_cfg, seed: int, report: Callable):
    """The :class:`~experiments.harness.Experiment`: one outer step of the harness is one
    ready interval of every method (every seed). ``report(summary, rundir)`` adds the
    experiment's own numbers to the shared summary and prints its table (on the primary
    process)."""
    optimizer = outer_optimizer(cfg)
    k, s, n = cfg.population, cfg.seeds, cfg.intervals
    keys = jax.random.split(jax.random.key(seed), s)
    dim = len(task.names)
    probe = jax.eval_shape(task.evaluate, task.params0(keys[0]), task.sample_hparams(keys[0]))
    parts = {m: method_parts(m, task, cfg) for m in cfg.methods}
    flat = jax.vmap(jax.vmap(lambda h: jax.flatten_util.ravel_pytree(h)[0]))

    def init_population(key, method, mutation):
        k_h, k_p = jax.random.split(key)
        hparams = jax.vmap(task.sample_hparams)(jax.random.split(k_h, k))
        return hg.population.init(
            optimizer, hparams, task.params0, k_p, mutation=mutation, method=method
        )

    def init_state():
        state = {"interval": jnp.zeros((), jnp.int32), "methods": {}}
        for m, (method, mutation, _) in parts.items():
            state["methods"][m] = {
                "population": jax.vmap(lambda key: init_population(key, method, mutation))(keys),
                "best": {"score": jnp.full(s, jnp.inf), **{e: jnp.zeros(s) for e in probe}},
                "trace": {
                    "score": jnp.zeros((n, s)),
                    **{e: jnp.zeros((n, s)) for e in probe},
                    "strength": jnp.zeros((n, s, dim)),
                    "hparams": jnp.zeros((n, s, k, dim)),
                },
                "seconds": jnp.zeros(()),
            }
        return state

    def make_step(method, mutation, fraction):
        def one(population):
            return hg.population.step(
                task.problem, task.run, method, optimizer, mutation, population,
                task.inner_data, task.outer_data,
                interval=cfg.interval, fraction=fraction, score_fn=task.score_fn,
            )  # fmt: skip

        @jax.jit
        def step(record, i):
            population, metrics = jax.vmap(one)(record["population"])
            # The best-scored member is in the top fraction, which exploit leaves as trained.
            idx = jnp.argmin(metrics.scores, axis=1)
            member = jax.tree.map(lambda x: x[jnp.arange(s), idx], population.members)
            found = {
                "score": metrics.scores[jnp.arange(s), idx],
                **jax.vmap(task.evaluate)(member.params, member.hparams),
            }
            better = found["score"] < record["best"]["score"]
            best = jax.tree.map(lambda a, b: jnp.where(better, a, b), found, record["best"])
            replaced = metrics.replaced[..., None]  # [S, K, 1]
            strength = jnp.sum(flat(metrics.strengths) * replaced, axis=1)
            strength = strength / jnp.maximum(jnp.sum(replaced, axis=1), 1)
            natural = jax.vmap(jax.vmap(task.natural))(population.members.hparams)
            row = {**best, "strength": strength, "hparams": natural}
            trace = {key: record["trace"][key].at[i].set(row[key]) for key in row}
            return {**record, "population": population, "best": best, "trace": trace}

        return step

    steps = {m: make_step(*parts[m]) for m in cfg.methods}

    def step(state):
        i, records = state["interval"], dict(state["methods"])
        for m in cfg.methods:
            t0 = time.perf_counter()
            record = jax.block_until_ready(steps[m](records[m], i))
            records[m] = {**record, "seconds": record["seconds"] + time.perf_counter() - t0}
        metrics = {f"{m}_best": jnp.mean(records[m]["best"]["score"]) for m in cfg.methods}
        metrics["outer_loss"] = metrics[f"{'hpm' if 'hpm' in cfg.methods else cfg.methods[0]}_best"]
        return {"interval": i + 1, "methods": records}, metrics

    def finish(state, rundir):
        summary = summarize(state, cfg, task)
        if rundir.primary:
            write_plots(rundir, state, cfg, task)
        report(summary, rundir)  # adds the experiment's numbers; prints on the primary
        return summary

    return Experiment(n, init_state, step, finish, run_cfg.checkpoint_every)


def summarize(state, cfg: CompareConfig, task: Task) -> dict:
    """Per method: the best configuration found (mean ± std over seeds of its score and
    evaluation), wall time, and how often HPM's best beat it (per seed)."""
    done = int(state["interval"])
    rows = {}
    for m in cfg.methods:
        record = jax.device_get(state["methods"][m])
        best = {key: np.asarray(v, float) for key, v in record["best"].items()}
        rows[m] = {
            "label": LABELS[m],
            **{key: float(np.mean(v)) for key, v in best.items()},
            **{f"{key}_std": float(np.std(v)) for key, v in best.items()},
            "seconds": float(record["seconds"]),
            "per_seed_score": best["score"].tolist(),
        }
    if "hpm" in rows:
        hpm = np.asarray(rows["hpm"]["per_seed_score"])
        for row in rows.values():
            row["hpm_better_seeds"] = int(np.sum(hpm < np.asarray(row["per_seed_score"])))
    return {
        "intervals": done,
        "population": cfg.population,
        "interval": cfg.interval,
        "seeds": cfg.seeds,
        "member_intervals": done * cfg.population,
        "hparam_names": list(task.names),
        "methods": rows,
    }


def write_plots(rundir, state, cfg: CompareConfig, task: Task) -> None:
    done = int(state["interval"])
    budget = np.arange(1, done + 1) * cfg.population  # member-intervals
    series = {}
    for m in cfg.methods:
        score = np.asarray(state["methods"][m]["trace"]["score"])[:done]
        series[LABELS[m]] = (budget, score.mean(axis=1))
    plots.curves(
        rundir.plots / "best_vs_budget.png",
        series,
        xlabel="budget (member-intervals)",
        ylabel="best score found (mean over seeds)",
        title="Best configuration found at equal budget",
    )
    for m in ("hpm", "hpm_gaussian"):
        if m not in cfg.methods:
            continue
        strength = np.asarray(state["methods"][m]["trace"]["strength"])[:done].mean(axis=1)
        plots.curves(
            rundir.plots / f"{m}_mutation_strength.png",
            {name: (np.arange(1, done + 1), strength[:, j]) for j, name in enumerate(task.names)},
            xlabel="ready interval",
            ylabel="mean mutation strength of replaced members",
            title=f"{LABELS[m]}: mutation schedule",
        )
    m = "hpm" if "hpm" in cfg.methods else cfg.methods[0]
    hist = np.asarray(state["methods"][m]["trace"]["hparams"])[:done, 0]  # seed 0: [n, K, d]
    cols = min(len(task.names), 4)
    rows = -(-len(task.names) // cols)
    fig, axes = plots.subplots(rows, cols, figsize=(3 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(task.names) :]:
        ax.set_visible(False)
    for j, (ax, name) in enumerate(zip(axes.flat, task.names)):
        ax.plot(np.arange(1, done + 1), hist[:, :, j], lw=0.8)
        ax.set_title(name, fontsize="small")
        ax.set_xlabel("ready interval")
    fig.suptitle(f"{LABELS[m]}: the population's hyperparameters (seed 0)")
    fig.tight_layout()
    fig.savefig(rundir.plots / "population_trajectories.png", dpi=110)
