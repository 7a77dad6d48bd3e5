"""Stochastic bilevel methods on benchmark_bilevel's simulated quadratic problem.

benchopt's ``benchmark_bilevel`` (github.com/benchopt/benchmark_bilevel, commit 3ad65dc of
2025-05-22) measures stochastic bilevel solvers on a simulated quadratic finite-sum problem
(``datasets/simulated.py`` with ``benchmark_utils/gen_matrices.py``). This script rebuilds
that problem with the same generator (re-implemented here, not imported: benchopt is not a
dependency), computes the value function's minimum in closed form (float64), and runs our
stochastic methods with the reference solvers' step and batch sizes:

* ``soba``, ``stocbio``, ``amigo`` (:mod:`hypergrad_jax.stochastic.baselines`): inner
  minibatches from a block sampler (a uniformly drawn block of ``B`` consecutive samples:
  the reference's minibatches are contiguous slices), outer minibatches drawn by this
  script's loop in the reference's random-reshuffling order (each block once per epoch);
* ``amigo_iid``: AmIGO again, its outer minibatch drawn iid by a ``key -> batch`` sampler
  (the usual way to call our methods): the source of the AmIGO plateau the issue reports;
  ``amigo_iid_lr0.1`` the same with our preset's default linear-system step;
* ``saba``, ``srba`` (:mod:`hypergrad_jax.stochastic.variance_reduced`), given the whole
  finite sums, drawing their own blocks in random-reshuffling order, as the reference's;
* ``masoba`` (no reference solver: SOBA's steps, averaging 0.1).

The problem (``g`` inner, ``f`` outer, ``θ ∈ R^100`` inner, ``λ ∈ R^10`` outer)::

    g(θ, λ) = (1/n) Σ_i ½ θᵀA_iθ + ½ λᵀB_iλ + λᵀC_iθ + a_iᵀθ + b_iᵀλ     (n = 4096)
    f(θ, λ) = (1/m) Σ_j ½ θᵀF_jθ + ½ λᵀH_jλ + λᵀK_jθ + f_jᵀθ + h_jᵀλ     (m = 1024)

with rank-one per-sample matrices (``A_i = x_i x_iᵀ``, ``x_i = z_i S`` for a fixed square
root ``S`` of spectrum ``[√μ, √L]``, ...) stored dense, as the reference stores them.
Suboptimality ``F(λ) − F(λ*) = ½ (λ − λ*)ᵀ ∇²F (λ − λ*)`` (``F`` is quadratic; this form
has no cancellation) in float64 from the mean matrices.

Time excludes compilation and evaluation: each method runs in jitted chunks of
``eval_every`` iterations (``lax.scan`` of :func:`hypergrad_jax.outer.step`), evaluated
between chunks, until its time budget is spent. Nothing is asserted; it writes
``benchmarks/results/bilevel_quadratic.{json,md,png}``.

Run:  python benchmarks/bilevel_quadratic.py            # ~3 minutes on 2 cores
      python benchmarks/bilevel_quadratic.py --quick    # smoke test: small problem, seconds
      --out DIR writes the results there instead; --x64 runs the methods in float64;
      --methods a,b runs a subset; --budget-scale X scales the time budgets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if "--x64" in sys.argv:
    os.environ["JAX_ENABLE_X64"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import hypergrad_jax as hg  # noqa: E402
from benchmarks.estimators import machine  # noqa: E402
from hypergrad_jax import stochastic as st  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = "benchopt/benchmark_bilevel@3ad65dc"

# --------------------------------------------------------------------------- the problem


class Settings(NamedTuple):
    """``datasets/simulated.py``'s parameters (its defaults, but the sizes of the issue)."""

    n_inner: int = 4096
    n_outer: int = 1024
    dim_inner: int = 100
    dim_outer: int = 10
    mu_inner: float = 0.1
    L_inner_inner: float = 1.0  # spectrum of the inner problem's Hessians in θ ...
    L_outer_inner: float = 1.0  # ... and in λ
    L_cross_inner: float = 0.1
    L_inner_outer: float = 1.0  # spectrum of the outer problem's Hessians in θ ...
    L_outer_outer: float = 1.0  # ... and in λ
    L_cross_outer: float = 0.1
    random_state: int = 2442


def _orthonormal(key, d):
    """A full orthonormal basis of R^d: the left singular vectors of a Gaussian vector."""
    return jnp.linalg.svd(jax.random.normal(key, (d, 1), jnp.float32))[0]


def _per_sample(n, d_inner, d_outer, l_inner, l_outer, l_cross, mu, key):
    """One finite sum's per-sample matrices, as ``gen_matrices`` builds them: Hessians
    ``x_iᵀ x_i`` with ``x_i = z_i S`` (``z_i`` standard normal, ``S`` symmetric with
    spectrum ``logspace(√μ, √L)``, so the mean Hessian has spectrum ``[μ, L]``; in λ one
    eigenvalue is 0), cross terms ``U D z_iᵀ z_i Vᵀ`` (``D`` with singular values
    ``logspace(μ, L_cross)``), standard normal linear terms."""
    keys = jax.random.split(key, 10)
    f32 = jnp.float32

    def hessians(k_basis, k_samples, d, spectrum):
        u = _orthonormal(k_basis, d)
        root = (u * spectrum[None, :]) @ u.T
        x = jax.random.normal(k_samples, (n, 1, d), f32) @ root
        return jnp.swapaxes(x, 1, 2) @ x

    sqrt_inner = jnp.logspace(np.log10(mu) / 2, np.log10(l_inner) / 2, d_inner, dtype=f32)
    hess_theta = hessians(keys[0], keys[1], d_inner, sqrt_inner)
    sqrt_outer = jnp.logspace(np.log10(mu) / 2, np.log10(l_outer) / 2, d_outer - 1, dtype=f32)
    hess_lambda = hessians(
        keys[2], keys[3], d_outer, jnp.concatenate([jnp.zeros(1, f32), sqrt_outer])
    )
    u, _, vt = jnp.linalg.svd(jax.random.normal(keys[4], (d_outer, d_inner), f32))
    k = min(d_outer, d_inner)
    singular = jnp.logspace(np.log10(mu), np.log10(l_cross), k, dtype=f32)
    diag = jnp.zeros((d_outer, d_inner), f32).at[:k, :k].set(jnp.diag(singular))
    z = jax.random.normal(keys[5], (n, 1, d_inner), f32)
    cross = (u @ diag @ jnp.swapaxes(z, 1, 2)) @ (z @ vt.T)
    return {
        "A": hess_theta,
        "B": hess_lambda,
        "C": cross,
        "a": jax.random.normal(keys[6], (n, d_inner), f32),
        "b": jax.random.normal(keys[7], (n, d_outer), f32),
    }


def generate(cfg: Settings) -> tuple[dict, dict]:
    """``(inner_data, outer_data)``: the per-sample matrices of ``g`` and ``f`` (float32, as
    the reference generates them), from ``PRNGKey(random_state)`` split in two as there.
    (The reference retries up to 20 times until its positivity check of ``∇²F`` passes,
    but never changes the key, so every retry draws the same matrices: one draw.)"""
    keys = jax.random.split(jax.random.PRNGKey(cfg.random_state), 2)
    inner = _per_sample(
        cfg.n_inner, cfg.dim_inner, cfg.dim_outer, cfg.L_inner_inner, cfg.L_outer_inner,
        cfg.L_cross_inner, cfg.mu_inner, keys[0],
    )  # fmt: skip
    outer = _per_sample(
        cfg.n_outer, cfg.dim_inner, cfg.dim_outer, cfg.L_inner_outer, cfg.L_outer_outer,
        cfg.L_cross_outer, cfg.mu_inner, keys[1],
    )  # fmt: skip
    return inner, outer


def quadratic(theta, lam, batch):
    """The mean over the batch of ``½ θᵀAθ + ½ λᵀBλ + λᵀCθ + aᵀθ + bᵀλ`` (``g`` or ``f``)."""
    per_sample = (
        0.5 * jnp.einsum("i,nij,j->n", theta, batch["A"], theta)
        + 0.5 * jnp.einsum("i,nij,j->n", lam, batch["B"], lam)
        + jnp.einsum("i,nij,j->n", lam, batch["C"], theta)
        + batch["a"] @ theta
        + batch["b"] @ lam
    )
    return jnp.mean(per_sample)


PROBLEM = hg.BilevelProblem(quadratic, quadratic)


class Exact(NamedTuple):
    """The value function ``F(λ) = f(θ*(λ), λ)`` in closed form (float64, from the mean
    matrices): ``θ*(λ) = J λ + θ₀`` with ``J = −Ā⁻¹C̄ᵀ``, ``∇²F = JᵀF̄J + H̄ + K̄J + JᵀK̄ᵀ``."""

    solve_inner: Any  # λ -> θ*(λ)
    hessian: np.ndarray  # ∇²F
    gradient_at_zero: np.ndarray  # ∇F(0)
    lam_star: np.ndarray
    value_star: float

    def suboptimality(self, lam) -> float:
        d = np.asarray(lam, np.float64) - self.lam_star
        return float(0.5 * d @ self.hessian @ d)

    def grad_norm2(self, lam) -> float:
        """``||∇F(λ)||²``: the reference's main metric (its ``value``)."""
        g = self.hessian @ np.asarray(lam, np.float64) + self.gradient_at_zero
        return float(g @ g)


def exact(inner: dict, outer: dict) -> Exact:
    mean = {k: np.asarray(v, np.float64).mean(axis=0) for k, v in inner.items()}
    out = {k: np.asarray(v, np.float64).mean(axis=0) for k, v in outer.items()}
    a_bar, c_bar = mean["A"], mean["C"]
    jac = -np.linalg.solve(a_bar, c_bar.T)
    theta0 = -np.linalg.solve(a_bar, mean["a"])
    kj = out["C"] @ jac
    hessian = jac.T @ out["A"] @ jac + out["B"] + kj + kj.T
    hessian = 0.5 * (hessian + hessian.T)
    # ∇F(λ) = ∇_λ f + Jᵀ ∇_θ f at θ*(λ); at λ = 0, θ* = θ₀
    grad0 = out["C"] @ theta0 + out["b"] + jac.T @ (out["A"] @ theta0 + out["a"])
    lam_star = -np.linalg.solve(hessian, grad0)

    def value(lam):
        th = jac @ lam + theta0
        return float(
            0.5 * th @ out["A"] @ th + 0.5 * lam @ out["B"] @ lam + lam @ out["C"] @ th
            + out["a"] @ th + out["b"] @ lam
        )  # fmt: skip

    return Exact(lambda lam: jac @ lam + theta0, hessian, grad0, lam_star, value(lam_star))


# --------------------------------------------------------------------------- the methods


@jax.tree_util.register_pytree_node_class
class BlockSampler:
    """``(key, step) -> batch`` (or ``key -> batch``): a uniformly drawn block of
    ``batch_size`` consecutive samples, as the reference's samplers slice contiguous blocks.
    A pytree whose leaves are the data, so a jitted function taking it traces the data
    instead of embedding it as constants."""

    def __init__(self, data, batch_size: int):
        self.data, self.batch_size = data, batch_size

    def __call__(self, key, step=0):
        n = jax.tree.leaves(self.data)[0].shape[0]
        b = jax.random.randint(jax.random.fold_in(key, step), (), 0, n // self.batch_size)
        start = b * self.batch_size
        return jax.tree.map(
            lambda x: jax.lax.dynamic_slice_in_dim(x, start, self.batch_size), self.data
        )

    def tree_flatten(self):
        return (self.data,), self.batch_size

    @classmethod
    def tree_unflatten(cls, batch_size, children):
        return cls(children[0], batch_size)


def epoch_block(data, batch_size, key, step):
    """The outer block of iteration ``step`` in random-reshuffling order: a fresh
    permutation of the ``m / batch_size`` blocks (from ``key`` and the epoch number) every
    epoch, so each block is used once per epoch, as the reference's sampler does."""
    count = jax.tree.leaves(data)[0].shape[0] // batch_size
    order = jax.random.permutation(jax.random.fold_in(key, step // count), count)
    start = order[step % count] * batch_size
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, batch_size), data)


class Method(NamedTuple):
    name: str
    method: Any
    inner_steps: int  # run.num_steps
    inner_lr: float
    outer_lr: Any  # float or optax schedule
    data: str  # "finite_sum": the whole data (SABA, SRBA); else the outer minibatch is drawn
    #   "epoch": by this script's loop, each outer block once per epoch (the reference's
    #   order) or "iid": by the method from a `key -> batch` sampler; inner minibatches from
    #   an iid block sampler in both cases
    budget: float  # seconds (scaled by --budget-scale)
    setting: str  # the settings, as the reference names them
    source: str  # where the reference's settings come from


BEST = "`config/quadratics_021424_best_params.yml`"


def methods(n_inner: int, n_outer: int, batch: int) -> list[Method]:
    single = {"inner_steps": 1, "inner_lr": 0.1}  # single loops: one θ step of 0.1
    amigo_run = {"inner_steps": 10, "inner_lr": 0.01, "outer_lr": 0.1}
    amigo_setting = (
        "step_size=0.01, outer_ratio=0.1 (θ and v steps 0.01, λ step 0.1, all constant), "
        "n_inner_steps=10 (θ and v), batch 64"
    )
    return [
        Method(
            "soba", st.SOBA(linear_lr=0.1), **single, outer_lr=lambda k: 0.1 / jnp.sqrt(k + 1.0),
            data="epoch", budget=15.0,
            setting="step_size=0.1, outer_ratio=1, batch 64; λ step 0.1/√(k+1) as the "
            "reference's, θ and v steps constant 0.1 (our SOBA has no schedule for them; the "
            "reference decays them as 1/√(k+1) too)",
            source="`solvers/soba.py` defaults (SOBA is not in the best-params config)",
        ),
        Method(
            "stocbio", st.StocBiO(neumann_steps=11, neumann_lr=0.1), inner_steps=10,
            inner_lr=0.1, outer_lr=0.1, data="epoch", budget=12.0,
            setting="step_size=0.1, outer_ratio=1 (all steps 0.1, constant), n_inner_steps=10, "
            "n_shia_steps=10 (11 Neumann terms, 10 HVPs), batch 64",
            source=BEST,
        ),
        Method(
            "amigo", st.AmIGO(linear_steps=10, linear_lr=0.01), **amigo_run, data="epoch",
            budget=20.0, setting=amigo_setting, source=BEST,
        ),
        Method(
            "amigo_iid", st.AmIGO(linear_steps=10, linear_lr=0.01), **amigo_run, data="iid",
            budget=20.0, setting=amigo_setting + "; outer minibatch drawn iid", source=BEST,
        ),
        Method(
            "amigo_iid_lr0.1", st.AmIGO(linear_steps=10, linear_lr=0.1), **amigo_run,
            data="iid", budget=15.0,
            setting="as amigo_iid, the v step at our preset's default 0.1",
            source="(diagnostic)",
        ),
        Method(
            "saba", st.SABA(n_inner, n_outer, batch, linear_lr=0.1), **single, outer_lr=0.1,
            data="finite_sum", budget=6.0,
            setting="step_size=0.1, outer_ratio=1 (constant), batch 64, mode_init_memory=zero",
            source=BEST,
        ),
        Method(
            "srba", st.SRBA(n_inner, n_outer, batch, linear_lr=0.1, period_frac=0.5), **single,
            outer_lr=0.1, data="finite_sum", budget=6.0,
            setting="step_size=0.1, outer_ratio=1 (constant), period_frac=0.5, batch 64",
            source=BEST,
        ),
        Method(
            "masoba", st.MASOBA(linear_lr=0.1, averaging=0.1), **single, outer_lr=0.1,
            data="epoch", budget=10.0,
            setting="θ, v, λ steps 0.1 (constant), averaging 0.1, no projection, batch 64",
            source="(no reference solver; SOBA's step sizes)",
        ),
    ]  # fmt: skip


# --------------------------------------------------------------------------- the runs


def run_method(m: Method, inner, outer, ex: Exact, args, dtype) -> dict:
    """``m`` from ``θ = 0``, ``λ = −2`` (the reference's starting point), in jitted chunks of
    ``args.eval_every`` iterations until its time budget (compilation and evaluation
    excluded) or ``args.max_iters``."""
    run = hg.InnerRun(hg.optim.sgd(), m.inner_steps, lambda h, lr=m.inner_lr: {"lr": lr})
    optimizer = optax.sgd(m.outer_lr)
    dim_inner, dim_outer = inner["a"].shape[1], inner["b"].shape[1]
    lam0, theta0 = -2.0 * jnp.ones(dim_outer, dtype), jnp.zeros(dim_inner, dtype)
    state = hg.outer.init(optimizer, lam0, theta0, jax.random.key(args.seed), m.method)
    sample_key = jax.random.key(args.seed + 1)
    if m.data == "finite_sum":
        data = (inner, outer)
    elif m.data == "iid":
        data = (BlockSampler(inner, args.batch_size), BlockSampler(outer, args.batch_size))
    else:
        data = (BlockSampler(inner, args.batch_size), outer)

    def chunk(state, data):
        def body(s, _):
            inner_data, outer_data = data
            if m.data == "epoch":
                outer_data = epoch_block(outer_data, args.batch_size, sample_key, s.step)
            s, metrics = hg.outer.step(PROBLEM, run, m.method, optimizer, s, inner_data, outer_data)
            return s, metrics.oracles.total

        state, calls = jax.lax.scan(body, state, None, length=args.eval_every)
        return state, jnp.sum(calls)

    start = time.perf_counter()
    compiled = jax.jit(chunk).lower(state, data).compile()
    compile_s = time.perf_counter() - start

    def record(iteration, seconds, calls, state):
        lam = np.asarray(state.hparams, np.float64)
        theta = np.asarray(state.params, np.float64)
        return {
            "iteration": iteration,
            "time_s": seconds,
            "oracle_calls": calls,
            "suboptimality": ex.suboptimality(lam),
            "grad_norm2": ex.grad_norm2(lam),
            "inner_distance2": float(np.sum((theta - ex.solve_inner(lam)) ** 2)),
        }

    load = os.getloadavg()[0]
    curve = [record(0, 0.0, 0, state)]
    elapsed, iteration, calls, fastest = 0.0, 0, 0, float("inf")
    budget = m.budget * args.budget_scale
    while elapsed < budget and iteration < args.max_iters:
        start = time.perf_counter()
        state, chunk_calls = compiled(state, data)
        jax.block_until_ready(state)
        seconds = time.perf_counter() - start
        elapsed, fastest = elapsed + seconds, min(fastest, seconds)
        iteration += args.eval_every
        calls += int(chunk_calls)
        curve.append(record(iteration, elapsed, calls, state))
        if not np.isfinite(curve[-1]["suboptimality"]):
            break
    subopt = np.array([r["suboptimality"] for r in curve])
    tail = subopt[1:][len(subopt[1:]) // 2 :]
    return {
        "method": m.name,
        "class": type(m.method).__name__,
        "setting": m.setting,
        "data": m.data,
        "source": m.source,
        "compile_s": compile_s,
        "iterations": iteration,
        "time_s": elapsed,
        "ms_per_iteration": 1e3 * elapsed / max(iteration, 1),
        # the fastest chunk's: the least disturbed by other work on shared cores
        "ms_per_iteration_best_chunk": 1e3 * fastest / args.eval_every,
        "load_average_at_start": load,
        "oracle_calls_per_iteration": calls / max(iteration, 1),
        "final_suboptimality": float(subopt[-1]),
        "best_suboptimality": float(np.nanmin(subopt)),
        "plateau_suboptimality": float(np.median(tail)),  # median over the last half
        "final_grad_norm2": curve[-1]["grad_norm2"],
        "curve": curve,
    }


def first_below(curve, level, key="suboptimality"):
    """``(iteration, seconds)`` of the first evaluation at or below ``level``, or ``None``."""
    for r in curve:
        if r[key] <= level:
            return r["iteration"], r["time_s"]
    return None


# --------------------------------------------------------------------------- the report

# The reference numbers this benchmark compares against: the measurement of the
# reference (benchopt's runs of benchmark_bilevel on this problem), stated in the issue.
# benchopt's objective for this dataset is the first key of `datasets/simulated.py`'s
# metrics, F(λ) (`func`), but its default plot is of `value` = ||∇F(λ)||²; the issue
# does not say which, so both are recorded here (they are within a factor ~2 on this
# problem at the levels that matter).
REFERENCE_LEVELS = {
    "soba": {"note": "same suboptimality-per-iteration curve as ours, similar time/iteration"},
    "stocbio": {"note": "same suboptimality-per-iteration curve as ours, similar time/iteration"},
    "amigo": {"level": 1e-3, "note": "plateaus at ~1e-3 (ours, measured then: ~5e-3)"},
    "amigo_iid": {"level": 1e-3, "note": "as amigo (the reference's AmIGO plateaus at ~1e-3)"},
    "saba": {"level": 1e-11, "time_s": 10.0, "note": "reaches 1e-11 in ~10 s"},
}


def fmt(x, spec=".1e"):
    return "—" if x is None else format(x, spec)


def _hit(row, level):
    h = first_below(row["curve"], level)
    return "—" if h is None else f"{h[0]} it, {h[1]:.1f} s"


def markdown(info, cfg, ex, rows, args, elapsed) -> str:
    m = info
    eig = np.linalg.eigvalsh(ex.hessian)
    by_name = {r["method"]: r for r in rows}
    lines = [
        "# Stochastic bilevel methods on benchmark_bilevel's quadratic",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, jax {m['jax']} ({m['backend']}), Python "
        f"{m['python']}; {m['date']}; 1-minute load average {m['load_average_at_start']:.2f} "
        f"at start, {m['load_average_at_end']:.2f} at end, per method in the table's `load` "
        f"column (the 2 cores are shared with other work: above 2, times are inflated "
        f"roughly by the load over 2; the fastest chunk is the least disturbed). Command: "
        f"`python benchmarks/bilevel_quadratic.py{' --quick' if args.quick else ''}"
        f"{' --x64' if args.x64 else ''}` ({elapsed:.0f} s). Methods in "
        f"{'float64' if args.x64 else 'float32 (as the reference)'}, metrics in float64.",
        "",
        f"Problem: `{REFERENCE}`'s `datasets/simulated.py` with `benchmark_utils/"
        f"gen_matrices.py`, re-implemented here: n_inner={cfg.n_inner}, n_outer={cfg.n_outer}, "
        f"dim_inner={cfg.dim_inner}, dim_outer={cfg.dim_outer} (the issue's sizes) and the "
        f"dataset's defaults mu_inner={cfg.mu_inner}, L_inner_inner={cfg.L_inner_inner}, "
        f"L_outer_inner={cfg.L_outer_inner}, L_cross_inner={cfg.L_cross_inner}, "
        f"L_inner_outer={cfg.L_inner_outer}, L_outer_outer={cfg.L_outer_outer}, "
        f"L_cross_outer={cfg.L_cross_outer}, random_state={cfg.random_state}; start θ = 0, "
        f"λ = −2 (`objective.py`). F(λ*) = {ex.value_star:.6f}; ∇²F has spectrum "
        f"[{eig[0]:.3g}, {eig[-1]:.3g}] (condition number {eig[-1] / eig[0]:.0f}).",
        "",
        "Suboptimality F(λ) − F(λ*) = ½(λ − λ*)ᵀ∇²F(λ − λ*), exact; ‖∇F‖² is the reference's "
        "`value` metric. Time excludes compilation and evaluation (jitted chunks of "
        f"{args.eval_every} iterations, evaluated between chunks); each method runs for its "
        f"time budget (× {args.budget_scale:g}). One seed. Plateau: the median suboptimality "
        "over the last half of the run (the level a constant-step method hovers at). "
        "First ≤ x: the iteration and time of the first evaluation at or below x.",
        "",
        "| method | sampling | load | iterations | ms / iteration (mean, fastest chunk) "
        "| oracle calls / iteration | final | plateau | best | final ‖∇F‖² | first ≤ 1e-3 "
        "| first ≤ 1e-11 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['data']} | {r['load_average_at_start']:.1f} | "
            f"{r['iterations']} | {r['ms_per_iteration']:.3f}, "
            f"{r['ms_per_iteration_best_chunk']:.3f} | "
            f"{r['oracle_calls_per_iteration']:.1f} | {fmt(r['final_suboptimality'])} | "
            f"{fmt(r['plateau_suboptimality'])} | {fmt(r['best_suboptimality'])} | "
            f"{fmt(r['final_grad_norm2'])} | {_hit(r, 1e-3)} | {_hit(r, 1e-11)} |"
        )
    lines += [
        "",
        "Sampling: `finite_sum`: the method gets the whole data and draws its own blocks of "
        "64 consecutive samples in random-reshuffling order (each block once per epoch), as "
        "the reference's samplers do; `epoch`: inner blocks drawn iid by a `(key, step) -> "
        "batch` sampler, outer blocks drawn by this script's loop in random-reshuffling order "
        "and passed as the outer batch; `iid`: outer blocks drawn iid by a `key -> batch` "
        "sampler, the usual way to call our methods.",
        "",
        "## Against the reference",
        "",
        "The reference numbers are the issue's measurement of benchopt's runs of this problem "
        "(no other reference numbers are available here: benchopt is not installed and the "
        "reference's run times depend on its machine).",
        "",
        "| method | reference (the issue) | ours | reaches the reference's level |",
        "|---|---|---|---|",
    ]
    for name, ref in REFERENCE_LEVELS.items():
        r = by_name.get(name)
        if r is None:
            continue
        ours = (
            f"plateau {fmt(r['plateau_suboptimality'])}, final {fmt(r['final_suboptimality'])} "
            f"after {r['iterations']} iterations ({r['ms_per_iteration']:.2f} ms each)"
        )
        verdict = "no reference level"
        if "level" in ref:
            ours += f"; first ≤ {ref['level']:.0e}: {_hit(r, ref['level'])}"
            hit = first_below(r["curve"], ref["level"])
            if "time_s" in ref:
                met = hit is not None and hit[1] <= ref["time_s"]
                verdict = (
                    f"{'yes' if met else 'no'}: ≤ {ref['level']:.0e} within {ref['time_s']:g} s"
                )
            else:
                met = r["plateau_suboptimality"] <= ref["level"]
                verdict = f"{'yes' if met else 'no'}: plateau ≤ {ref['level']:.0e}"
        lines.append(f"| {name} | {ref['note']} | {ours} | {verdict} |")
    saba = by_name.get("saba")
    if saba is not None:
        hit = first_below(saba["curve"], 1e-11)
        if hit is not None:
            lines += [
                "",
                f"Time per iteration: the reference's is not stated. Our SABA reaches 1e-11 "
                f"at iteration {hit[0]}; the reference's SABA is the same algorithm with the "
                f"same steps, blocks and sampling order, so if its curve per iteration matches "
                f"ours (as the issue found for SOBA and stocBiO), reaching 1e-11 in ~10 s "
                f"means ~{1e4 / hit[0]:.1f} ms per iteration there, against "
                f"{saba['ms_per_iteration']:.2f} ms here (under the load above).",
            ]
    amigo, iid = by_name.get("amigo"), by_name.get("amigo_iid")
    iid_v = by_name.get("amigo_iid_lr0.1")
    if amigo and iid:
        v_step = (
            ""
            if iid_v is None
            else f" (plateau {fmt(iid_v['plateau_suboptimality'])} with our preset's default "
            "0.1 instead of 0.01, `amigo_iid_lr0.1`)"
        )
        lines += [
            "",
            "## AmIGO's plateau",
            "",
            "Our AmIGO (`AmIGO(linear_steps=10, linear_lr=0.01)`, a 10-step SGD inner run at "
            "0.01, SGD at 0.1 on λ) runs the reference's AmIGO (`solvers/amigo.py`) step for "
            "step: the same constant steps (the reference's AmIGO has schedule exponents 0 for "
            "all three), 10 SGD steps on θ and 10 on v, both warm-started across outer steps, "
            "∇f on one outer block, the mixed product on a fresh inner block. With a constant "
            "λ step it hovers at a noise floor, the step times the variance of the "
            "hypergradient estimate, and that variance is what differs: the reference draws "
            "its minibatches in random-reshuffling order (`benchmark_utils/"
            "minibatch_sampler.py`: a permutation of the blocks per epoch), so within each "
            "epoch of 16 iterations every outer block's gradient enters λ's updates once and "
            "their deviations from the mean cancel; our methods draw the outer batch afresh "
            "from `outer_data(key)` at every step (iid across steps), so they do not. Same "
            f"method, same steps: plateau {fmt(iid['plateau_suboptimality'])} with iid outer "
            f"blocks (`amigo_iid`), {fmt(amigo['plateau_suboptimality'])} with the "
            "reference's epoch order (`amigo`). The v step is not the cause" + v_step + ". "
            "The preset is therefore unchanged. To reach the reference's level, draw the outer "
            "minibatches without replacement per epoch (pass each step's outer batch, as "
            "`epoch` does here; a `key -> batch` sampler cannot, since it does not see the "
            "step) or decay the outer step.",
        ]
    lines += [
        "",
        "## Generator check",
        "",
        "The re-implemented generator was compared once with the reference's own "
        "`benchmark_utils/gen_matrices.py` (run from the reference repository at the commit "
        "above, float32, same keys) at n_inner=512, n_outer=256: all ten arrays bit-identical.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(rows):
        t = [c["time_s"] for c in r["curve"]]
        it = [c["iteration"] for c in r["curve"]]
        s = [max(c["suboptimality"], 1e-17) for c in r["curve"]]
        style = "--" if r["method"].startswith("amigo_iid") else "-"
        axes[0].plot(t, s, style, color=f"C{i}", label=r["method"])
        axes[1].plot(it, s, style, color=f"C{i}", label=r["method"])
    for ax, xlabel in zip(axes, ("time (s, excluding evaluation)", "iteration")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("F(λ) − F(λ*)")
        ax.grid(True, which="major", alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].legend()
    fig.suptitle("benchmark_bilevel's simulated quadratic (n=4096, m=1024, dims 100/10)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: small problem")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--x64", action="store_true", help="run the methods in float64")
    parser.add_argument(
        "--budget-scale", type=float, default=None, help="times each method's time budget"
    )
    parser.add_argument("--max-iters", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--methods", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        cfg = Settings(n_inner=256, n_outer=128, dim_inner=20, dim_outer=5)
        args.batch_size = 32
        defaults = {"budget_scale": 0.1, "max_iters": 400, "eval_every": 100}
    else:
        cfg = Settings()
        args.batch_size = 64
        defaults = {"budget_scale": 1.0, "max_iters": 1_000_000, "eval_every": 256}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    begin = time.perf_counter()
    info = machine()
    dtype = jnp.float64 if args.x64 else jnp.float32
    inner, outer = generate(cfg)
    ex = exact(inner, outer)
    inner, outer = (jax.tree.map(lambda x: x.astype(dtype), d) for d in (inner, outer))
    chosen = methods(cfg.n_inner, cfg.n_outer, args.batch_size)
    if args.methods is not None:
        keep = args.methods.split(",")
        unknown = set(keep) - {m.name for m in chosen}
        if unknown:
            parser.error(
                f"--methods: unknown {sorted(unknown)}; expected names among "
                f"{[m.name for m in chosen]}"
            )
        chosen = [m for m in chosen if m.name in keep]
    rows = []
    for m in chosen:
        row = run_method(m, inner, outer, ex, args, dtype)
        print(
            f"{m.name:12s} {row['iterations']:7d} it  {row['ms_per_iteration']:.3f} ms/it  "
            f"final {row['final_suboptimality']:.2e}  best {row['best_suboptimality']:.2e}",
            flush=True,
        )
        rows.append(row)
    info["load_average_at_end"] = os.getloadavg()[0]
    elapsed = time.perf_counter() - begin
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": info,
        "reference": REFERENCE,
        "reference_levels": REFERENCE_LEVELS,
        "settings": cfg._asdict(),
        "dtype": "float64" if args.x64 else "float32",
        "value_star": ex.value_star,
        "hessian_eigenvalues": np.linalg.eigvalsh(ex.hessian).tolist(),
        "budget_scale": args.budget_scale,
        "eval_every": args.eval_every,
        "quick": args.quick,
        "elapsed_s": elapsed,
        "methods": rows,
    }
    (args.out / "bilevel_quadratic.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "bilevel_quadratic.md").write_text(markdown(info, cfg, ex, rows, args, elapsed))
    plot(rows, args.out / "bilevel_quadratic.png")
    print(f"wrote {args.out}/bilevel_quadratic.{{json,md,png}} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
