"""The NHGD comparison shared by the NHGD experiments (hyper-cleaning, regularization,
distillation): every method variant over a small grid on one :class:`~experiments.nhgd.task.Task`.
This module holds the config and the timed runner; the variants are one table in
:mod:`experiments.nhgd.registry`, the tables, curves and plots in :mod:`experiments.nhgd.report`.

Variants (:data:`~experiments.nhgd.registry.VARIANTS`, one table), all from
:mod:`hypergrad_jax.stochastic`, all with inner SGD at step ``lr`` and
``T = compare.inner_steps`` inner steps per outer step:

* ``nhgd_dense``: ``NHGD`` with a ``DenseFisher`` (EMA factor ``β``, prior ``nhgd_damping``,
  ``nhgd_dense_samples`` samples per step — the task's ``sample_weights`` correct per-sample
  samples; ``"mean"``, the paper's rank-1 ``√B ḡ``, has none to correct — and
  ``nhgd_dense_inverse``: ``"online"``, the
  paper's inverse updated every inner step, or ``"solve"``, one solve after the loop with
  ``nhgd_damping`` as a constant ridge);
* ``nhgd_kfac``: ``NHGD`` with ``hg.fisher.KFACFisher(task.kfac_layers)`` (EMA ``β``, same prior);
* ``nhgd_dense_parallel``, ``nhgd_kfac_parallel``: the same with ``NHGD(parallel=True)``, the
  Fisher update on a second device concurrently with the inner SGD. They need
  ``jax.device_count() >= 2`` (``--local-devices 2`` on CPU); otherwise they are *skipped* and
  the table says so;
* ``stocbio``: ``StocBiO`` (``linear_steps`` Neumann terms, step ``η``);
* ``amigo``: ``AmIGO`` (``linear_steps`` warm-started SGD steps on ``H v = ∇_θ f``, step ``γ``);
* ``soba``: ``SOBA`` (single loop: one step each on ``θ``, ``v``, ``λ``, linear-system step
  ``γ``). So that every method gets the same inner SGD steps, one SOBA "outer step" of the
  tables is ``T`` SOBA iterations, and (``soba_scale_outer_lr``, default) its outer learning
  rate is ``outer_lr / T``: per ``T`` inner steps ``λ`` then moves as far as the other
  methods' one update (exact for SGD, approximately for Adam whose steps are ≈ ``lr``);
* ``cg``: ``SolveAfter`` with ``hg.CG(maxiter)`` (``cg_tol``, ``cg_ridge``), warm-started;
* ``neumann``: ``SolveAfter`` with ``hg.Neumann(linear_steps, η)``, warm-started.

Fairness. Every variant uses the same outer optimizer (``outer_optimizer`` with the one
``outer_lr``), the same inner steps, the same minibatch streams (one PRNG seed,
``compare.seed``, for every run: paired), the same starting point ``(task.params,
task.hparams)`` and the same number of outer steps. Each gets a small grid: the shared inner
learning-rate grid ``inner_lrs`` × one method-specific knob (the registry's
``Variant.grid``): the EMA factor ``β`` of the Fisher (NHGD), the Neumann / linear-system
step size (stocBiO, AmIGO, SOBA, Neumann), CG's iteration cap (CG). The grids are part of
the config and are written with the results. The **best grid point** of a method is the
one with the lowest *final* ``val_loss`` (NaN counts as +inf).

Measurement. Each run (one method, one grid point: a *unit*) does ``outer_steps`` outer steps
(``hg.outer.step``) in jitted chunks of ``eval_every`` steps (a ``lax.scan``).
Compilation is excluded: a chunk is compiled ahead of time once per variant (the grid values
are traced arguments, so a variant's whole grid runs one program) and executed once as a
warm-up (discarded) before any clock starts. Each chunk is timed with ``block_until_ready``.
At each evaluation point (outer step 0 and every ``eval_every`` steps) the runner records,
outside the clock: the cumulative wall time, the cumulative oracle calls (``Stats.oracles``:
gradients, HVPs, mixed products, outer gradients, and their total), ``task.evaluate(θ, λ)``,
and the cosine between the method's last hypergradient and the exact implicit hypergradient
at the ``λ`` that hypergradient was computed at (the one before the last update). Against
noise from other processes on the machine each chunk is timed ``timing_repeats`` times from
the same state and its fastest time counts (as ``timeit`` does); the run continues from the
(identical) result.

The exact reference: ``θ*(λ)`` on ``task.train`` by ``hg.testing.inner_minimizer`` (damped
Newton-CG, ``reference_newton_steps`` steps warm-started from the previous evaluation's
``θ*``; the first from ``θ*(task.hparams)``, solved once from ``task.params`` with 3× the
steps), then ``hg.testing.implicit_hypergradient(problem, λ, θ*, task.train, task.val,
newton_steps=0)``: the dense Hessian at ``θ*`` and one dense solve. The reference's
residual ``|∇_θ g(θ*)|`` is recorded with the curves. At outer
step 0 there is no hypergradient yet: the cosine is NaN there. Note the cosine of a
stochastic estimate whose mixed product sees one minibatch (e.g. per-sample hyperparameters:
only the batch's entries are non-zero) is bounded well below 1 even when unbiased; compare
methods with each other. The table's "mean cosine" averages the evaluation points where the
cosine is defined.

Time to target. The target validation loss is ``target``: ``"worst_best"`` (default) the
largest of the methods' best final validation losses (every run method reaches it, at the
latest at its last evaluation), or ``"value"`` (``target_value``). A method's time (and
oracle calls) to target is that of its best grid point at the first evaluation point whose
``val_loss`` is at or below the target (so it is resolved to ``eval_every`` outer steps);
"time ratio" divides by ``nhgd_dense``'s.

Resume. The experiment's steps (``Experiment.num_steps``) are the units; its state is a set of
fixed-shape result arrays (every unit's curves) checkpointed after *every* unit (whatever
``run.checkpoint_every`` says), so a killed run resumes at the first unfinished unit and never
redoes a finished one. A skipped unit stays skipped on resume.

Outputs in the run directory: ``comparison.md`` (the table, the grids, every grid point),
``curves.json`` (every unit's curves), ``summary.json`` (the table), and
``plots/val_loss_time.png``, ``val_loss_oracles.png``, ``<primary>_time.png``, ``cosine.png``,
``time_to_target.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from dataclasses import field
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import hypergrad_jax as hg
from experiments import common
from experiments.common import RunConfig
from experiments.config import ConfigError, bounds
from experiments.harness import Experiment
from experiments.nhgd.registry import (  # noqa: F401 -- re-exported: the comparison's API
    METHODS,
    ORACLES,
    SKIP_REASONS,
    VARIANTS,
    chunk_length,
    make_method,
    outer_optimizer,
    skip_code,
)
from experiments.nhgd.report import (  # noqa: F401 -- re-exported
    DONE,
    PENDING,
    SKIPPED,
    best_units,
    first_reach,
    fmt,
    markdown,
    mean_finite,
    summarize,
    target_loss,
    write_outputs,
)
from experiments.nhgd.task import Task

COLD_START_FACTOR = 3  # Newton steps of a cold reference solve, × reference_newton_steps


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """The comparison's settings (module docstring); nest it under the key ``compare``."""

    methods: tuple[Literal[METHODS], ...] = METHODS  # type: ignore[valid-type]
    outer_steps: int = field(default=100, metadata=bounds(ge=1))  # per run
    eval_every: int = field(default=10, metadata=bounds(ge=1))  # must divide outer_steps
    inner_steps: int = field(default=10, metadata=bounds(ge=1))  # T
    outer_optimizer: Literal["adam", "sgd"] = "adam"
    outer_lr: float = field(default=0.1, metadata=bounds(gt=0))  # the same for every method
    soba_scale_outer_lr: bool = True  # SOBA's outer lr = outer_lr / inner_steps
    # Grids: the shared inner learning rates × one knob per method.
    inner_lrs: tuple[float, ...] = (0.1, 0.3)
    nhgd_betas: tuple[float, ...] = (0.9, 0.99)  # EMA factor of the Fisher (dense, K-FAC)
    stocbio_etas: tuple[float, ...] = (0.1, 0.3)  # Neumann step
    amigo_lrs: tuple[float, ...] = (0.1, 0.3)  # SGD step on H v = ∇_θ f
    soba_lrs: tuple[float, ...] = (0.1, 0.3)  # SGD step on H v = ∇_θ f
    cg_maxiters: tuple[int, ...] = (5, 10)
    neumann_etas: tuple[float, ...] = (0.1, 0.3)  # Richardson / Neumann step
    # Fixed settings.
    nhgd_damping: float = field(default=1e-3, metadata=bounds(gt=0))  # prior F_0 = ρ I
    nhgd_dense_samples: Literal["mean", "woodbury", "sequential"] = "woodbury"
    # "online": A updated every inner step (the paper's); "solve": F̂ kept, one Cholesky solve
    # with F̂ + nhgd_damping·I after the loop (then nhgd_damping is a constant ridge).
    nhgd_dense_inverse: Literal["online", "solve"] = "online"
    nhgd_reset: bool = False  # True: A starts from the prior at every outer step
    linear_steps: int = field(default=10, metadata=bounds(ge=1))  # stocBiO, AmIGO, Neumann
    cg_tol: float = field(default=1e-6, metadata=bounds(gt=0))
    cg_ridge: float = field(default=0.0, metadata=bounds(ge=0))  # CG and Neumann
    target: Literal["worst_best", "value"] = "worst_best"
    target_value: float | None = None  # with target: value
    # Damped Newton-CG steps of the reference's θ*, warm-started (3× from a cold start).
    reference_newton_steps: int = field(default=8, metadata=bounds(ge=1))
    seed: int = field(default=0, metadata=bounds(ge=0))  # minibatch streams (every run)
    # Each chunk is timed this many times from the same state; its time is the fastest
    # (the computation is deterministic, so every repeat computes the same numbers).
    timing_repeats: int = field(default=2, metadata=bounds(ge=1))

    def __post_init__(self):
        if not self.methods:
            raise ConfigError("compare.methods: expected at least one method")
        dup = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if dup:
            raise ConfigError(f"compare.methods: {dup[0]!r} is listed twice")
        if self.outer_steps % self.eval_every:
            raise ConfigError(
                f"compare.eval_every: {self.eval_every} does not divide compare.outer_steps "
                f"= {self.outer_steps}"
            )
        checks = {
            "inner_lrs": (lambda v: v > 0, "> 0"),
            "nhgd_betas": (lambda v: 0 < v < 1, "> 0 and < 1"),
            "stocbio_etas": (lambda v: v > 0, "> 0"),
            "amigo_lrs": (lambda v: v > 0, "> 0"),
            "soba_lrs": (lambda v: v > 0, "> 0"),
            "cg_maxiters": (lambda v: v >= 1, ">= 1"),
            "neumann_etas": (lambda v: v > 0, "> 0"),
        }
        for name, (ok, text) in checks.items():
            grid = getattr(self, name)
            if not grid:
                raise ConfigError(f"compare.{name}: expected at least one value")
            for i, v in enumerate(grid):
                if not ok(v):
                    raise ConfigError(f"compare.{name}[{i}]: expected a value {text}, got {v!r}")
        if self.target == "value" and self.target_value is None:
            raise ConfigError("compare.target_value: required with compare.target: value")
        if self.target != "value" and self.target_value is not None:
            raise ConfigError(
                f"compare.target_value: only used with compare.target: value "
                f"(compare.target is {self.target!r})"
            )

    def grid(self, method: str) -> list[tuple[float, float]]:
        """``method``'s grid: ``(inner lr, knob)`` pairs, inner lr varying slowest."""
        knobs = getattr(self, VARIANTS[method].grid)
        return [(lr, k) for lr in self.inner_lrs for k in knobs]


class Unit(NamedTuple):
    """One run: a method at one grid point."""

    method: str
    lr: float
    knob: float

    def setting(self) -> str:
        return f"lr={self.lr:g}, {VARIANTS[self.method].knob}={self.knob:g}"


def units_of(cfg: CompareConfig) -> list[Unit]:
    return [Unit(m, lr, k) for m in cfg.methods for lr, k in cfg.grid(m)]


# --------------------------------------------------------------------------- timed runner


def _is_arrays(tree) -> bool:
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves)


def make_chunk(name: str, task: Task, cfg: CompareConfig):
    """``(ostate, lr, knob, inner_data, outer_data) -> (ostate, oracles int32[4], last
    hypergradient, the λ it was computed at)``: ``chunk_length`` outer steps in one
    ``lax.scan``, jitted. Data that is a pytree of arrays is an argument (not a constant baked
    into the program); pass ``None`` for data the program closes over (a plain function)."""
    optimizer = outer_optimizer(name, cfg)
    length = chunk_length(name, cfg)

    def chunk(ostate, lr, knob, inner_data, outer_data):
        inner_data = task.inner_data if inner_data is None else inner_data
        outer_data = task.outer_data if outer_data is None else outer_data
        method, run = make_method(name, task, cfg, lr, knob)

        def body(carry, _):
            state, oracles, _, _ = carry
            before = state.hparams
            # skip_nonfinite=False: a diverging grid point shows as NaN, not as frozen λ.
            state, m = hg.outer.step(
                task.problem,
                run,
                method,
                optimizer,
                state,
                inner_data,
                outer_data,
                skip_nonfinite=False,
            )
            counts = jnp.stack([jnp.asarray(c, jnp.int32) for c in m.oracles])
            return (state, oracles + counts, m.grad, before), None

        zeros = jax.tree.map(jnp.zeros_like, ostate.hparams)
        init = (ostate, jnp.zeros(len(ORACLES), jnp.int32), zeros, zeros)
        return jax.lax.scan(body, init, None, length=length)[0]

    return jax.jit(chunk), optimizer


def cosine(a, b) -> float:
    """``⟨a, b⟩ / (|a| |b|)`` of two pytrees, in float64; NaN if either is zero or not finite."""
    x = np.asarray(ravel_pytree(a)[0], np.float64)
    y = np.asarray(ravel_pytree(b)[0], np.float64)
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if not (np.isfinite(nx) and np.isfinite(ny)) or nx == 0 or ny == 0:
        return math.nan
    return float(x @ y / (nx * ny))


# --------------------------------------------------------------------------- one unit


class Runner:
    """What every unit of one comparison shares: the task, the config, the compiled chunks
    (one per variant, compiled on first use) and the evaluation functions."""

    def __init__(self, task: Task, cfg: CompareConfig):
        self.task, self.cfg = task, cfg
        self.inner_arg = task.inner_data if _is_arrays(task.inner_data) else None
        self.outer_arg = task.outer_data if _is_arrays(task.outer_data) else None
        self.compiled: dict[str, Any] = {}
        self.evaluate = jax.jit(task.evaluate)
        problem = task.problem
        # θ* comes converged from inner_minimizer: no further Newton step is needed.
        self.reference = jax.jit(
            lambda h, p, train, val: hg.testing.implicit_hypergradient(problem, h, p, train, val, 0)
        )
        self._solve = None
        self._theta0 = None
        shapes = jax.eval_shape(task.evaluate, task.params, task.hparams)
        if not isinstance(shapes, dict):
            raise ValueError(f"task.evaluate: expected a dict of scalars, got {shapes!r}")
        for key in ("val_loss", task.primary):
            if key not in shapes:
                raise ValueError(
                    f"task.evaluate: returns {sorted(shapes)}; expected a {key!r} entry "
                    "(val_loss and the task's primary metric)"
                )
        bad = sorted(k for k, v in shapes.items() if v.shape != ())
        if bad:
            raise ValueError(f"task.evaluate: expected scalar metrics, {bad} are not")
        rest = sorted(k for k in shapes if k not in ("val_loss", task.primary))
        self.metric_names = ("val_loss", task.primary, *rest)

    @property
    def num_points(self) -> int:
        return self.cfg.outer_steps // self.cfg.eval_every + 1

    def init(self, unit: Unit):
        method, _ = make_method(unit.method, self.task, self.cfg, unit.lr, unit.knob)
        optimizer = outer_optimizer(unit.method, self.cfg)
        key = jax.random.key(self.cfg.seed)
        return hg.outer.init(optimizer, self.task.hparams, self.task.params, key, method)

    def chunk(self, unit: Unit, ostate):
        """The compiled chunk of ``unit``'s variant and the seconds spent now on compiling it
        and on one warm-up execution (first-call costs stay off the clock), both discarded."""
        if unit.method in self.compiled:
            return self.compiled[unit.method], 0.0
        t0 = time.perf_counter()
        fn, _ = make_chunk(unit.method, self.task, self.cfg)
        args = (ostate, unit.lr, unit.knob, self.inner_arg, self.outer_arg)
        compiled = fn.lower(*args).compile()
        jax.block_until_ready(compiled(*args))
        self.compiled[unit.method] = compiled
        return compiled, time.perf_counter() - t0

    def inner_solution(self, hparams, params, steps: int):
        """``(θ*(λ), |∇_θ g(θ*)|)`` by damped Newton-CG from ``params`` (one program)."""
        if self._solve is None:
            self._solve = jax.jit(functools.partial(hg.testing.inner_minimizer, self.task.problem))
        return self._solve(hparams, params, self.task.train, steps)

    @property
    def theta0(self):
        """``θ*(task.hparams)`` from ``task.params`` (cold: ``COLD_START_FACTOR`` × the steps),
        computed once: every run's first reference starts from it."""
        if self._theta0 is None:
            steps = COLD_START_FACTOR * self.cfg.reference_newton_steps
            self._theta0 = self.inner_solution(self.task.hparams, self.task.params, steps)[0]
        return self._theta0

    def measure(self, params, hparams, grad, grad_at, theta_ref):
        """Metrics at ``(θ, λ)`` and the cosine of ``grad`` with the exact hypergradient at
        ``grad_at``, its ``θ*`` warm-started from ``theta_ref`` (None: from :attr:`theta0`);
        returns ``(metrics, cosine, θ*, |∇_θ g(θ*)|)``."""
        metrics = jax.device_get(self.evaluate(params, hparams))
        values = [float(metrics[k]) for k in self.metric_names]
        if grad is None:
            return values, math.nan, theta_ref, math.nan
        start = self.theta0 if theta_ref is None else theta_ref
        theta, residual = self.inner_solution(grad_at, start, self.cfg.reference_newton_steps)
        residual = float(residual)
        if not math.isfinite(residual):  # a failed solve does not poison the next one
            return values, math.nan, None, residual
        exact, _ = self.reference(grad_at, theta, self.task.train, self.task.val)
        return values, cosine(grad, exact), theta, residual


def run_unit(runner: Runner, unit: Unit) -> dict:
    """One run of ``unit`` (module docstring): its curves at every evaluation point."""
    points = runner.num_points
    ostate = runner.init(unit)
    compiled, compile_s = runner.chunk(unit, ostate)
    times = np.zeros(points)
    oracles = np.zeros((points, len(ORACLES)), np.int64)
    metrics = np.full((points, len(runner.metric_names)), np.nan)
    cosines = np.full(points, np.nan)
    residuals = np.full(points, np.nan)
    t_eval = time.perf_counter()
    metrics[0], cosines[0], theta_ref, residuals[0] = runner.measure(
        ostate.params, ostate.hparams, None, None, None
    )
    eval_s = time.perf_counter() - t_eval
    elapsed, total = 0.0, np.zeros(len(ORACLES), np.int64)
    for e in range(1, points):
        fastest = math.inf
        for _ in range(runner.cfg.timing_repeats):
            t0 = time.perf_counter()
            out = compiled(ostate, unit.lr, unit.knob, runner.inner_arg, runner.outer_arg)
            out = jax.block_until_ready(out)
            fastest = min(fastest, time.perf_counter() - t0)
        elapsed += fastest
        ostate, counts, grad, grad_at = out
        total = total + np.asarray(counts, np.int64)
        times[e], oracles[e] = elapsed, total
        t_eval = time.perf_counter()
        metrics[e], cosines[e], theta_ref, residuals[e] = runner.measure(
            ostate.params, ostate.hparams, grad, grad_at, theta_ref
        )
        eval_s += time.perf_counter() - t_eval
    return {
        "time": times,
        "oracles": oracles,
        "metrics": metrics,
        "cosine": cosines,
        "residual": residuals,
        "compile_s": compile_s,
        "eval_s": eval_s,
        "load": _load_average(),
    }


def _load_average() -> float:
    """The machine's 1-minute load average (NaN where the OS does not report one): other
    processes competing for the cores make wall-clock times noisy; it is reported."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return math.nan


# --------------------------------------------------------------------------- the experiment


def init_results(num_units: int, num_points: int, num_metrics: int) -> dict:
    """The experiment's state: fixed-shape result arrays for every unit (host numpy)."""
    return {
        "next": np.zeros((), np.int64),  # the first unit not yet run
        "status": np.zeros(num_units, np.int32),  # PENDING, DONE, SKIPPED
        "skip": np.zeros(num_units, np.int32),  # SKIP_REASONS code
        "time": np.full((num_units, num_points), np.nan),  # s, cumulative, compile excluded
        "oracles": np.zeros((num_units, num_points, len(ORACLES)), np.int64),  # cumulative
        "metrics": np.full((num_units, num_points, num_metrics), np.nan),
        "cosine": np.full((num_units, num_points), np.nan),
        "residual": np.full((num_units, num_points), np.nan),  # |∇_θ g(θ*)| of the reference
        "compile_s": np.full(num_units, np.nan),
        "eval_s": np.full(num_units, np.nan),
        "load": np.full(num_units, np.nan),  # 1-minute load average at the unit's end
    }


def build_comparison(task: Task, compare: CompareConfig, run: RunConfig) -> Experiment:
    """The comparison of every ``compare.methods`` variant on ``task`` as an
    :class:`~experiments.harness.Experiment` whose steps are the units (module docstring)."""
    cfg = compare
    common.no_data_parallel(
        run,
        "the NHGD comparison",
        "its parallel variants place the Fisher update on a second device themselves",
    )
    runner = Runner(task, cfg)
    units = units_of(cfg)
    num_points = runner.num_points

    def init_state():
        return init_results(len(units), num_points, len(runner.metric_names))

    def step(state):
        state = {k: np.array(v) for k, v in state.items()}
        i = int(state["next"])
        unit = units[i]
        code = skip_code(unit.method, task)
        head = f"[{i + 1}/{len(units)}] {unit.method} {unit.setting()}"
        if code:
            state["status"][i], state["skip"][i] = SKIPPED, code
            record = {"unit": i, "method": unit.method, "status": "skipped"}
            _say(f"{head}: {SKIP_REASONS[code]}")
        else:
            out = run_unit(runner, unit)
            state["status"][i] = DONE
            keys = (
                "time",
                "oracles",
                "metrics",
                "cosine",
                "residual",
                "compile_s",
                "eval_s",
                "load",
            )
            for k in keys:
                state[k][i] = out[k]
            final = dict(zip(runner.metric_names, out["metrics"][-1]))
            record = {
                "unit": i,
                "method": unit.method,
                "lr": unit.lr,
                "knob": unit.knob,
                "status": "done",
                **{f"final_{k}": v for k, v in final.items()},
                "run_time_s": float(out["time"][-1]),
                "oracles": int(out["oracles"][-1].sum()),
                "compile_s": out["compile_s"],
                "eval_s": out["eval_s"],
            }
            shown = "  ".join(f"{k} {v:.4g}" for k, v in final.items())
            _say(
                f"{head}: {shown}  cos {fmt(mean_finite(out['cosine'][1:]), '.3f')}  "
                f"{out['time'][-1]:.2f} s (compile {out['compile_s']:.1f} s, "
                f"eval {out['eval_s']:.1f} s)"
            )
        state["next"] = np.asarray(i + 1, np.int64)
        return state, record

    def finish(state, rundir):
        summary = summarize(state, units, runner.metric_names, task, cfg)
        if rundir.primary:
            write_outputs(rundir, summary, state, units, runner.metric_names, task, cfg)
            _say(markdown(summary, cfg))
            _say(f"run directory: {rundir.path}\nplots: {rundir.plots}")
        return summary

    return Experiment(len(units), init_state, step, finish, checkpoint_every=1)


def _say(text: str) -> None:
    if jax.process_index() == 0:
        print(text, flush=True)
