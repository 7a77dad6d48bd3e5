"""The two entry points: :func:`solve` and :func:`hypergradient`."""

from __future__ import annotations

import enum
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from hypergrad_jax.linalg import SolveInfo
from hypergrad_jax.problem import (
    BilevelProblem,
    InnerRun,
    float_literals,
    inner_residual,
    optimality_batch,
    validate,
)
from hypergrad_jax.static import Static

PyTree = Any


class Status(enum.IntEnum):
    """Outcome codes carried in :class:`Info` (``int32``): failure is a value by default."""

    OK = 0
    NONFINITE = 1  # the hypergradient or the outer loss has a NaN/inf
    SOLVE_NOT_CONVERGED = 2  # the linear solve stopped at maxiter above its tolerance
    SOLVE_FELL_BACK = 3  # the solver gave up (Richardson): the direct gradient ∂_λ f only


class Info(NamedTuple):
    outer_value: jax.Array  # float[]: f(θ_T, λ)
    params: PyTree  # θ_T, the inner run's end point (e.g. a warm start for the next run)
    inner_residual: jax.Array  # float32[]: ||∇_θ g(θ_T, λ)|| on the optimality batch
    status: jax.Array  # int32[]: a Status
    solve: SolveInfo | None  # the linear solve (Implicit only)
    adjoint: PyTree | None  # v = (H + ridge I)⁻¹ ∂_θ f (Implicit only): a warm start; a
    # linalg.Warm (v and the preconditioner's state) when the solver has a preconditioner


class HypergradientError(RuntimeError):
    """Raised by :func:`raise_if_failed` (or ``throw=True``) for a non-OK status."""


def _check_estimator(estimator) -> None:
    if not (hasattr(estimator, "grad") and hasattr(estimator, "solution")):
        raise TypeError(
            "estimator: expected an estimator value such as hg.Unrolled(), hg.Forward(), "
            f"hg.Implicit() or hg.Greedy(); got {estimator!r}"
        )


def solve(
    problem: BilevelProblem,
    run: InnerRun,
    estimator,
    hparams: PyTree,
    params0: PyTree | Callable,
    inner_data: PyTree | Callable,
    *,
    key: jax.Array | None = None,
) -> PyTree:
    """The end point ``θ_T(λ)`` of the inner run, differentiable by ``estimator``'s rule.

    Compose it with any transform: ``jax.grad(lambda h: f(solve(..., h, ...), h))``,
    ``jax.jvp``, ``jax.hessian``, ``jax.vmap``.

    Args:
      problem, run: the bilevel problem and the inner run.
      estimator: ``Unrolled``, ``Forward`` (same solution as ``Unrolled``), ``Implicit``,
        ``Greedy``.
      hparams: pytree of float hyperparameters.
      params0: initial params, or ``hparams -> params`` when the initialisation is learned.
      inner_data: a batch, or a jittable sampler ``(key, step) -> batch``.
      key: PRNG key, required with a sampler.
    """
    _check_estimator(estimator)
    hparams = float_literals(hparams)
    validate(problem, run, hparams, params0, inner_data, key)
    static, params0, inner_data = _split(problem, run, estimator, params0, inner_data)
    return _solve(static, params0, inner_data, hparams, key)


def _is_function(x) -> bool:
    """A callable that is a pytree leaf (a plain function): a static argument. A callable
    pytree of arrays (e.g. :class:`hypergrad_jax.data.Sampler`) is traced instead, so its
    data is not baked into the compiled program as constants."""
    leaves = jax.tree.leaves(x)
    return callable(x) and len(leaves) == 1 and leaves[0] is x


def _split(problem, run, estimator, params0, inner_data):
    """Functions (the problem, run, estimator, function-valued ``params0``/``inner_data``)
    become one static argument of the internal ``jit``; pytrees stay traced."""
    fns = tuple(x if _is_function(x) else None for x in (params0, inner_data))
    trees = tuple(None if _is_function(x) else x for x in (params0, inner_data))
    return Static((problem, run, estimator, *fns)), *trees


def _join(fn, tree):
    return tree if fn is None else fn


# The entry points are jitted internally: eager op-by-op dispatch of a scan-based run is
# seconds per call, and under an outer jit/grad/vmap an inner jit is simply inlined. A new
# closure (a fresh lambda sampler each call) is a new static argument and recompiles.
@partial(jax.jit, static_argnums=0)
def _solve(static, params0, inner_data, hparams, key):
    problem, run, estimator, params0_fn, data_fn = static.value
    return estimator.solution(
        problem, run, hparams, _join(params0_fn, params0), _join(data_fn, inner_data), key
    )


def hypergradient(
    problem: BilevelProblem,
    run: InnerRun,
    estimator,
    hparams: PyTree,
    params0: PyTree | Callable,
    inner_data: PyTree | Callable,
    outer_data: PyTree,
    *,
    key: jax.Array | None = None,
    warm_start: PyTree | None = None,
    throw: bool = False,
) -> tuple[PyTree, Info]:
    """``dF/dλ`` for ``F(λ) = f(θ_T(λ), λ; outer_data)``, computed by ``estimator``.

    Jit it with the problem, run and estimator closed over or static; hyperparameter
    values are traced, so new values never recompile. ``vmap`` over ``hparams`` or
    ``key`` gives a batch of hypergradients, and the result is itself differentiable
    (second order) for ``Unrolled``, ``Forward`` and ``Implicit``.

    Args:
      outer_data: the batch the outer loss is evaluated on.
      warm_start: initial guess for ``Implicit``'s linear solve (e.g. the previous
        ``info.adjoint``); ignored by the others.
      throw: raise when the status is not OK. Default: report it in ``info.status``.
        Called eagerly (the usual case: this function jits internally), it raises
        :class:`HypergradientError`. Under an outer ``jit``/``vmap``/``grad`` the status is
        not known until the transformed function runs, so it becomes a
        ``jax.experimental.checkify`` check: wrap the transformed function in
        ``checkify.checkify`` and call ``err.throw()``, which raises checkify's
        ``JaxRuntimeError`` (message ``hypergradient failed: status ...``); an outer
        ``jit`` without ``checkify`` fails at trace time with JAX's "not functionalized"
        error. For the exact type, return ``info`` and call :func:`raise_if_failed` on it.
      (other arguments as in :func:`solve`)

    Returns:
      ``(grad, info)``: ``grad`` has the structure of ``hparams``; ``info`` is an
      :class:`Info`.
    """
    _check_estimator(estimator)
    hparams = float_literals(hparams)
    validate(problem, run, hparams, params0, inner_data, key, outer_data)
    static, params0, inner_data = _split(problem, run, estimator, params0, inner_data)
    g, info = _hypergradient(static, params0, inner_data, hparams, outer_data, key, warm_start)
    if throw:
        if isinstance(info.status, jax.core.Tracer):
            checkify.check(
                jnp.all(info.status == Status.OK),
                "hypergradient failed: status {status} (1 NONFINITE, 2 SOLVE_NOT_CONVERGED, "
                "3 SOLVE_FELL_BACK)",
                status=info.status,
            )
        else:
            raise_if_failed(info)
    return g, info


@partial(jax.jit, static_argnums=0)
def _hypergradient(static, params0, inner_data, hparams, outer_data, key, warm_start):
    problem, run, estimator, params0_fn, data_fn = static.value
    params0, inner_data = _join(params0_fn, params0), _join(data_fn, inner_data)
    g, value, theta, solve_info, adjoint = estimator.grad(
        problem, run, hparams, params0, inner_data, outer_data, key, warm_start
    )
    residual = jax.lax.stop_gradient(
        inner_residual(problem, theta, hparams, optimality_batch(run, inner_data, key))
    )
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((g, value))]))
    status = jnp.where(finite, Status.OK, Status.NONFINITE)
    if solve_info is not None:
        status = jnp.where(
            (status == Status.OK) & ~solve_info.converged, Status.SOLVE_NOT_CONVERGED, status
        )
        status = jnp.where(
            (status != Status.NONFINITE) & solve_info.fell_back, Status.SOLVE_FELL_BACK, status
        )
    info = Info(value, theta, residual, status.astype(jnp.int32), solve_info, adjoint)
    return g, info


def raise_if_failed(info: Info) -> None:
    """Raises :class:`HypergradientError` if ``info.status`` is not OK: call it on concrete
    results, outside ``jit``. A batched status (from ``vmap``) fails if any entry does."""
    if isinstance(info.status, jax.core.Tracer):
        raise TypeError(
            "raise_if_failed: info.status is traced; call it on the result of the "
            "jitted/vmapped function, outside the transformation"
        )
    codes = np.asarray(info.status).ravel()
    failed = sorted({Status(int(c)).name for c in codes if c != Status.OK})
    if failed:
        where = "" if codes.size == 1 else f" ({int(np.sum(codes != Status.OK))} of {codes.size})"
        raise HypergradientError(f"hypergradient failed with status {', '.join(failed)}{where}")
