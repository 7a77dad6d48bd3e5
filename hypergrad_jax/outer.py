"""THE outer loop: one pure outer step on one pytree state, for every estimator and every
stateful method.

    state = hg.outer.init(optimizer, hparams, params0, key)
    step = jax.jit(lambda s: hg.outer.step(problem, run, estimator, optimizer, s,
                                           inner_data, outer_data))
    for _ in range(n):
        state, metrics = step(state)

    # a stateful stochastic method: the same call, its own state inside the outer state
    state = hg.outer.init(optimizer, hparams, params0, key, method=nhgd)
    state, metrics = hg.outer.step(problem, run, nhgd, optimizer, state, sampler, val)

The outer optimizer is any ``optax.GradientTransformation`` acting on the hyperparameters,
including :func:`sign_adaptive`, the sign-based step of FDS (Micaelli & Storkey 2021). The whole
state — hyperparameters, optimizer state, inner warm start, the linear-solve warm start,
the method's own state (NHGD's curvature), PRNG key and step counter — is one pytree, so it
checkpoints and ``vmap``s as a unit. Every step reports the same :class:`OuterMetrics`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hypergrad_jax import linalg
from hypergrad_jax.api import Status, hypergradient
from hypergrad_jax.problem import float_literals
from hypergrad_jax.stochastic.common import State

PyTree = Any


class OuterState(NamedTuple):
    hparams: PyTree  # λ, the hyperparameters being learned
    opt_state: PyTree  # the outer optimizer's state
    params: PyTree  # θ of the last inner run: the warm start of the next one
    adjoint: PyTree  # the last linear-solve solution (Implicit, stochastic methods), else zeros;
    # with a preconditioned solver a linalg.Warm (solution + preconditioner state)
    method: PyTree  # a stateful method's own state (NHGD's curvature), () for estimators
    key: jax.Array  # PRNG key, split once per outer step
    step: jax.Array  # int32[]: outer steps done


class OuterMetrics(NamedTuple):
    outer_loss: jax.Array  # f(θ_T, λ) before the update
    grad_norm: jax.Array  # ||∇F(λ)|| of the estimate used
    inner_residual: jax.Array  # ||∇_θ g(θ_T, λ)|| (stochastic methods: on a minibatch)
    status: jax.Array  # int32 hg.Status of the hypergradient
    grad: PyTree  # the hypergradient estimate, like hparams
    oracles: PyTree  # minibatch oracle counts (hg.stochastic.Oracles), None for estimators


def _stateful(method) -> bool:
    """A method with state of its own across outer steps (``hg.stochastic``), as opposed to
    an estimator value (``hg.Unrolled()``, ``hg.Implicit()``, ...)."""
    return hasattr(method, "init") and hasattr(method, "step")


def init(
    optimizer: optax.GradientTransformation,
    hparams: PyTree,
    params0: PyTree,
    key: jax.Array,
    method=None,
) -> OuterState:
    """The state before the first outer step.

    ``method``: a stateful method (``hg.stochastic.NHGD(...)``, ...), whose ``init``
    validates its settings and builds its own state; ``None`` or the estimator otherwise.
    Pass an ``Implicit``/``Moreau`` estimator whose solver has a preconditioner
    (``hg.CG(precond=hg.linalg.Hutchinson())``) so the state starts with the
    preconditioner's warm start (a ``linalg.Warm``) that every step reuses; without it the
    first step changes the state's structure (a jitted step then compiles twice).

    Leaves are made strongly typed (``jnp.asarray(0.1)`` is weakly typed, the updated
    values are not), so a jitted step compiles once, not twice.
    """
    hparams, params0 = jax.tree.map(_strong, (float_literals(hparams), params0))
    if _stateful(method):
        adjoint = jax.tree.map(jnp.zeros_like, params0)
        method_state = method.init(params0, hparams).method
    else:
        adjoint, method_state = linalg.initial_warm(getattr(method, "solver", None), params0), ()
    step = jnp.zeros((), jnp.int32)
    return OuterState(hparams, optimizer.init(hparams), params0, adjoint, method_state, key, step)


def _strong(x):
    x = jnp.asarray(x)
    return jnp.array(x, dtype=x.dtype)


def step(
    problem,
    run,
    method,
    optimizer: optax.GradientTransformation,
    state: OuterState,
    inner_data: PyTree | Callable,
    outer_data: PyTree | Callable,
    *,
    reinit: Callable[[jax.Array], PyTree] | None = None,
    skip_nonfinite: bool = True,
) -> tuple[OuterState, OuterMetrics]:
    """One outer step: a hypergradient, then the outer optimizer's update.

    Args:
      problem, run: as in :func:`hypergrad_jax.hypergradient` (the stochastic methods run
        ``run``'s inner loop too).
      method: an estimator (``hg.Forward()``, ``hg.Implicit(...)``, ...) or a stateful
        method (``hg.stochastic.NHGD(...)``, ``SolveAfter``, ``SOBA``; give it to
        :func:`init` too).
      optimizer: an optax transformation on the hyperparameters.
      state: the :class:`OuterState`.
      inner_data: a batch or a sampler ``(key, step) -> batch`` (given this step's key).
      outer_data: a batch, or ``key -> batch`` (e.g. a fresh validation split per step).
      reinit: ``key -> params`` re-initialises the network every outer step (FDS);
        ``None`` warm-starts from the previous step's end point (NHGD, implicit methods).
        Estimators only: the stochastic methods always warm-start.
      skip_nonfinite: keep the hyperparameters and the optimizer state when the
        hypergradient or the outer loss is not finite (``Status.NONFINITE``, reported), so
        one diverging member does not poison a population. An unconverged solve
        (``SOLVE_NOT_CONVERGED``) still gives a usable estimate and is applied.

    Returns:
      ``(new_state, metrics)``.
    """
    if _stateful(method):
        new, grad, metrics = _stateful_step(
            problem, run, method, state, inner_data, outer_data, reinit
        )
    else:
        new, grad, metrics = _estimator_step(
            problem, run, method, state, inner_data, outer_data, reinit
        )
    updates, opt_state = optimizer.update(grad, state.opt_state, state.hparams)
    hparams = optax.apply_updates(state.hparams, updates)
    if skip_nonfinite:
        ok = metrics.status != Status.NONFINITE
        hparams, opt_state = jax.tree.map(
            lambda new, old: jnp.where(ok, new, old),
            (hparams, opt_state),
            (state.hparams, state.opt_state),
        )
    return new._replace(hparams=hparams, opt_state=opt_state), metrics


def _estimator_step(problem, run, estimator, state, inner_data, outer_data, reinit):
    key, k_init, k_inner, k_outer = jax.random.split(state.key, 4)
    params0 = state.params if reinit is None else reinit(k_init)
    batch = outer_data(k_outer) if callable(outer_data) else outer_data
    grad, info = hypergradient(
        problem,
        run,
        estimator,
        state.hparams,
        params0,
        inner_data,
        batch,
        key=k_inner,
        warm_start=state.adjoint,
    )
    adjoint = state.adjoint if info.adjoint is None else info.adjoint
    new = state._replace(params=info.params, adjoint=adjoint, key=key, step=state.step + 1)
    norm = optax.tree.norm(grad)
    metrics = OuterMetrics(info.outer_value, norm, info.inner_residual, info.status, grad, None)
    return new, grad, metrics


def _stateful_step(problem, run, method, state, inner_data, outer_data, reinit):
    if reinit is not None:
        name = type(method).__name__
        raise ValueError(f"reinit: {name} warm-starts θ across outer steps; pass reinit=None")
    key, sub = jax.random.split(state.key)
    view = State(state.params, state.adjoint, state.method, state.step)
    data = (inner_data, outer_data)
    inner, grad, stats = method.step(problem, run, view, state.hparams, *data, sub)
    leaves = jax.tree.leaves((grad, stats.outer_value))
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in leaves]))
    status = jnp.where(finite, Status.OK, Status.NONFINITE).astype(jnp.int32)
    new = OuterState(
        state.hparams, state.opt_state, inner.params, inner.adjoint, inner.method, key, inner.step
    )
    norm = optax.tree.norm(grad)
    metrics = OuterMetrics(
        stats.outer_value, norm, stats.inner_residual, status, grad, stats.oracles
    )
    return new, grad, metrics


class SignAdaptiveState(NamedTuple):
    step_size: PyTree  # s, per hyperparameter element, like hparams
    last_sign: PyTree  # sign of the previous hypergradient (0 before the first step)


def sign_adaptive(initial_step: PyTree | float) -> optax.GradientTransformation:
    """The sign-based outer step of FDS (Micaelli & Storkey 2021)::

        λ ← λ − sign(∇F) · s,     s ← s / 2 wherever sign(∇F) flipped since the last step

    Robust to the hypergradient's scale, which varies by orders of magnitude between
    learning rates, momenta and weight decays. Stop with :func:`sign_adaptive_converged`.

    Args:
      initial_step: ``s`` at the start: a float, or a pytree like ``hparams`` (per leaf,
        broadcast over the leaf's elements), e.g. 0.1 for learning rates and momenta and
        3e-4 for weight decays.
    """

    def init_fn(params):
        if isinstance(initial_step, (int, float)):
            steps = jax.tree.map(lambda p: jnp.full_like(p, initial_step), params)
        else:
            steps = jax.tree.map(
                lambda s, p: jnp.broadcast_to(s, jnp.shape(p)).astype(jnp.result_type(p)),
                initial_step,
                params,
            )
        return SignAdaptiveState(steps, jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        sign = jax.tree.map(jnp.sign, updates)
        step_size = jax.tree.map(
            lambda s, new, old: jnp.where(new * old < 0, s / 2, s),
            state.step_size,
            sign,
            state.last_sign,
        )
        moves = jax.tree.map(lambda s, g: -s * g, step_size, sign)
        return moves, SignAdaptiveState(step_size, sign)

    return optax.GradientTransformation(init_fn, update_fn)


def sign_adaptive_converged(
    opt_state: SignAdaptiveState, hparams: PyTree, threshold: float = 0.05
) -> jax.Array:
    """FDS's stopping rule: every step is below ``threshold`` of its hyperparameter,
    ``s / |λ| < threshold`` (never true while some ``λ`` is 0)."""
    ratios = jax.tree.map(lambda s, h: s < threshold * jnp.abs(h), opt_state.step_size, hparams)
    return jnp.all(jnp.array([jnp.all(r) for r in jax.tree.leaves(ratios)]))
