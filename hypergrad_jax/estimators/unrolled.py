"""Reverse and forward mode through the unrolled inner run."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hypergrad_jax.problem import init_state, initial_params, run_steps
from hypergrad_jax.static import typed


def unrolled_solution(problem, run, hparams, params0, inner_data, key, remat=False, truncate=None):
    """``θ_T(λ)`` by running the inner scan; differentiable through the last ``truncate`` steps
    (all steps when ``None``), with those steps rematerialised in √T blocks if ``remat``."""
    num_steps = run.num_steps
    if truncate is not None and (not isinstance(truncate, int) or truncate < 1):
        raise ValueError(f"truncate: expected a positive int or None, got {truncate!r}")
    kept = num_steps if truncate is None else min(truncate, num_steps)
    state = init_state(run, hparams, initial_params(params0, hparams))
    if kept < num_steps:
        state = run_steps(problem, run, hparams, state, inner_data, key, 0, num_steps - kept)
        state = jax.lax.stop_gradient(state)
    state = run_steps(
        problem, run, hparams, state, inner_data, key, num_steps - kept, kept, remat=remat
    )
    return state.params


def _differentiate(transform, problem, solution, hparams, outer_data):
    """``transform`` (``jax.grad`` or ``jax.jacfwd``) of ``F(λ) = f(solution(λ), λ)``;
    returns ``(dF/dλ, F, θ_T)`` with ``F`` and ``θ_T`` as auxiliary outputs."""

    def objective(h):
        params = solution(h)
        value = problem.outer_loss(params, h, outer_data)
        return value, (value, params)

    g, (value, params) = transform(objective, has_aux=True)(hparams)
    return g, value, params


@typed
class Unrolled(NamedTuple):
    """Reverse-mode differentiation through the inner run (``lax.scan`` + VJP).

    ``dF/dλ`` of ``F(λ) = f(θ_T(λ), λ)`` exactly for the finite run. Memory grows like
    ``T·|θ|`` (the scan stores every carry), like ``√T·|θ|`` with ``remat=True`` (one extra
    forward pass). ``truncate=K`` differentiates only the last ``K`` steps: ``O(K·|θ|)``
    memory, biased unless the run has converged before step ``T − K``.

    Supports ``grad``, ``jvp``/``jacfwd`` (the run is plain JAX code), ``vmap`` and
    higher order.
    """

    remat: bool = False
    truncate: int | None = None

    def solution(self, problem, run, hparams, params0, inner_data, key):
        return unrolled_solution(
            problem, run, hparams, params0, inner_data, key, self.remat, self.truncate
        )

    def grad(self, problem, run, hparams, params0, inner_data, outer_data, key, warm_start):
        del warm_start
        solution = lambda h: self.solution(problem, run, h, params0, inner_data, key)  # noqa: E731
        return (*_differentiate(jax.grad, problem, solution, hparams, outer_data), None, None)


def Greedy() -> Unrolled:  # noqa: N802 -- an estimator value, named like the others
    """The greedy one-step hypergradient (hypergradient descent, Baydin et al. 2018).

    Differentiates only the last inner step: ``Unrolled(truncate=1)``. ``O(|θ|)`` memory and
    one extra gradient; the short-horizon bias is large early in training.
    """
    return Unrolled(truncate=1)


@typed
class Forward(NamedTuple):
    """Forward-mode differentiation through the inner run (``jax.jacfwd`` over the scan).

    Carries one tangent ``dθ_t/dλ_i`` per hyperparameter leaf element alongside the run and
    stores nothing per step: memory ``O(|θ|·|λ|)`` independent of ``T``, cost ``≈ |λ|`` extra
    JVPs per step. For few hyperparameters (e.g. shared learning-rate/momentum/weight-decay
    schedules, FDS); equals :class:`Unrolled` to rounding.
    """

    def solution(self, problem, run, hparams, params0, inner_data, key):
        return unrolled_solution(problem, run, hparams, params0, inner_data, key)

    def grad(self, problem, run, hparams, params0, inner_data, outer_data, key, warm_start):
        del warm_start
        solution = lambda h: self.solution(problem, run, h, params0, inner_data, key)  # noqa: E731
        # jacfwd of a scalar has the gradient's structure; the primal run is not batched
        # over the basis tangents, so it runs once.
        g, value, params = _differentiate(jax.jacfwd, problem, solution, hparams, outer_data)
        # jacfwd returns the output's dtype (bf16 for a bf16 loss); match grad's convention.
        g = jax.tree.map(lambda d, h: d.astype(jnp.result_type(h)), g, hparams)
        return g, value, params, None, None
