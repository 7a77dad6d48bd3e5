"""What the stochastic methods share: oracle counts, the method's view of the state, and the
pieces every method's step is built from (key streams, outer gradients, HVPs, the mixed
product, SGD). Their outer loop is :func:`hypergrad_jax.outer.step`, as for every estimator."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hypergrad_jax import linalg
from hypergrad_jax.problem import InnerRun, init_state, run_steps

PyTree = Any


class Oracles(NamedTuple):
    """Minibatch oracle calls in one outer step (int32 scalars). Per-sample gradients of a
    minibatch (``vmap(grad)``) count as one gradient: they cost about as much."""

    grads: jax.Array  # ∇_θ g on a minibatch
    hvps: jax.Array  # ∂²_{θθ} g · v
    mixed: jax.Array  # ∂²_{λθ} g · v
    outer: jax.Array  # ∇ f on an outer batch

    @property
    def total(self) -> jax.Array:
        return self.grads + self.hvps + self.mixed + self.outer


def oracles(grads=0, hvps=0, mixed=1, outer=1) -> Oracles:
    return Oracles(*(jnp.asarray(x, jnp.int32) for x in (grads, hvps, mixed, outer)))


class Stats(NamedTuple):
    outer_value: jax.Array  # f(θ, λ) on the outer batch, at the θ the hypergradient used
    inner_residual: jax.Array  # ||∇_θ g(θ, λ)|| on the mixed product's minibatch (no extra oracle)
    oracles: Oracles


class State(NamedTuple):
    """A method's view of :class:`hypergrad_jax.outer.OuterState` (the same fields)."""

    params: PyTree  # θ: the inner iterate, warm-started across outer steps
    adjoint: PyTree  # v ≈ H⁻¹ ∇_θ f (AmIGO, SOBA, SolveAfter), zeros for the others
    method: PyTree  # the method's own state: NHGD's curvature state, () for the others
    step: jax.Array  # int32[]: outer steps done


def start_state(params, method=()) -> State:
    zeros = jax.tree.map(jnp.zeros_like, params)
    return State(params, zeros, method, jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------- shared pieces


def check_positive(method, **fields) -> None:
    for name, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(
                f"{type(method).__name__}.{name}: expected a positive number, got {value!r}"
            )


def check_steps(method, **fields) -> None:
    for name, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{type(method).__name__}.{name}: expected a positive int, got {value!r}"
            )


def split_keys(key):
    """Independent streams: inner SGD batches, linear-system batches, outer batch."""
    if key is None:
        raise ValueError("key: a PRNG key is required by the stochastic methods")
    return jax.random.split(key, 3)


def outer_batch(outer_data, key):
    return outer_data(key) if callable(outer_data) else outer_data


def outer_gradients(problem, params, hparams, batch):
    """``f`` and its gradients ``(∇_θ f, ∇_λ f)``: one outer oracle call."""
    value, (f_theta, f_hparams) = jax.value_and_grad(problem.outer_loss, argnums=(0, 1))(
        params, hparams, batch
    )
    return value, f_theta, f_hparams


def hvp_operator(problem, params, hparams, batch):
    return lambda v: linalg.hvp(problem.inner_loss, params, v, hparams, batch)


def mixed_hypergradient(problem, params, hparams, batch, v, f_hparams):
    """``(∇_λ f − ∂²_{λθ} g · v, ||∇_θ g||)``: one mixed product (a VJP of ``λ -> ∇_θ g``),
    whose primal output gives the inner residual on ``batch`` for free."""
    g, vjp = jax.vjp(lambda h: jax.grad(problem.inner_loss)(params, h, batch), hparams)
    return optax.tree.sub(f_hparams, vjp(v)[0]), optax.tree.norm(g)


def inner_loop(problem, run: InnerRun, hparams, params, inner_data, key):
    """``run``'s inner loop from ``params`` on the sampler's batches ``0 .. T − 1``: ``θ``
    warm-started, the optimizer's own state (momentum, Adam moments) started afresh every
    outer step, as for the estimators."""
    state = init_state(run, hparams, params)
    return run_steps(problem, run, hparams, state, inner_data, key, 0, run.num_steps).params


def check_run(method, run) -> None:
    """The stateful methods take their inner loop from ``run``."""
    if not isinstance(run, InnerRun):
        raise TypeError(
            f"run: {type(method).__name__} takes its inner loop from an hg.InnerRun (its "
            f"optimizer and num_steps); got {type(run).__name__}"
        )


def single_loop_state(method, run, hparams, params):
    """The inner state of a single-loop method's one ``θ`` step per outer step (SOBA, SABA,
    SRBA, MA-SOBA): ``run`` must be one step (``num_steps == 1``) of a
    stateless optimizer such as ``hg.optim.sgd()``, since no inner run persists whose
    momentum or Adam moments could carry over."""
    name = type(method).__name__
    check_run(method, run)
    if run.num_steps != 1:
        raise ValueError(
            f"run.num_steps: {name} takes one inner step per outer step; expected 1, "
            f"got {run.num_steps}"
        )
    inner = init_state(run, hparams, params)
    if jax.tree.leaves(inner.opt_state):
        raise ValueError(
            f"run.optimizer: {name} needs a stateless optimizer such as hg.optim.sgd(); "
            f"{run.optimizer.name!r} keeps state that would restart at every step"
        )
    return inner
