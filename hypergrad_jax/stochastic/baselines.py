"""The stochastic baselines NHGD is measured against (ALGORITHMS.md §1).

stocBiO, AmIGO and "solve after" are one method, :class:`SolveAfter`: inner SGD, the outer
gradients, a stochastic linear solve of ``H v = ∇_θ f``, one mixed product. They differ
only in the solver (and whether ``v`` is warm-started):

* :func:`StocBiO`: :class:`StochasticNeumann`, a Neumann series with a fresh minibatch
  Hessian per term, from ``∇_θ f`` (no warm start);
* :func:`AmIGO`: :class:`StochasticSGD`, SGD on the linear system with a fresh minibatch per
  step, warm-started from the previous outer step's ``v``;
* ``SolveAfter(solver=hg.CG(...))`` (or any :mod:`hypergrad_jax.linalg` solver): the solve
  on one fresh minibatch's Hessian, warm-started ("optimize-then-approximate").

:class:`SOBA` is a single loop: one step each on ``θ``, ``v`` and (by the caller) ``λ``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from hypergrad_jax import linalg
from hypergrad_jax.linalg import tree_axpy
from hypergrad_jax.problem import batch_at
from hypergrad_jax.static import typed
from hypergrad_jax.stochastic.common import (
    State,
    Stats,
    check_positive,
    check_steps,
    hvp_operator,
    init_state,
    mixed_hypergradient,
    oracles,
    outer_batch,
    outer_gradients,
    sgd,
    split_keys,
)

PyTree = Any


@typed
class StochasticNeumann(NamedTuple):
    """The Neumann series ``v = η Σ_{j<Q} Π_{i<j} (I − η H_i) b`` with a fresh minibatch
    Hessian ``H_i`` per term (``Q − 1`` HVPs); ``x0`` is ignored. stocBiO's solver."""

    steps: int = 10
    eta: float = 0.1

    def check(self) -> None:
        check_steps(self, steps=self.steps)
        check_positive(self, eta=self.eta)

    def __call__(self, hvp, b, x0):
        """``hvp(v, j)``: ``H_j v`` on fresh minibatch ``j``. Returns ``(v, HVPs used)``."""
        del x0

        def term(carry, j):
            p, total = carry
            p = tree_axpy(-self.eta, hvp(p, j), p)
            return (p, tree_axpy(1.0, p, total)), None

        steps = jnp.arange(self.steps - 1, dtype=jnp.int32)
        _, total = jax.lax.scan(term, (b, b), steps)[0]
        return jax.tree.map(lambda x: self.eta * x, total), self.steps - 1


@typed
class StochasticSGD(NamedTuple):
    """``steps`` SGD steps ``v ← v − γ (H_j v − b)`` on the quadratic ``½ vᵀHv − bᵀv``, a fresh
    minibatch ``j`` per step, from ``x0`` (zeros if ``None``). AmIGO's solver."""

    steps: int = 10
    lr: float = 0.1

    def check(self) -> None:
        check_steps(self, steps=self.steps)
        check_positive(self, lr=self.lr)

    def __call__(self, hvp, b, x0):
        """``hvp(v, j)``: ``H_j v`` on fresh minibatch ``j``. Returns ``(v, HVPs used)``."""
        v = jax.tree.map(jnp.zeros_like, b) if x0 is None else x0

        def step(v, j):
            return tree_axpy(-self.lr, tree_axpy(-1.0, b, hvp(v, j)), v), None

        steps = jnp.arange(self.steps, dtype=jnp.int32)
        return jax.lax.scan(step, v, steps)[0], self.steps


STOCHASTIC_SOLVERS = (StochasticNeumann, StochasticSGD)


@typed
class SolveAfter(NamedTuple):
    """Inner SGD → outer gradients → a stochastic linear solve → one mixed product.

    ``num_steps`` SGD steps at ``lr`` from the previous outer step's ``θ``; ``∇_θ f``,
    ``∇_λ f`` on the outer batch; ``v ≈ H⁻¹ ∇_θ f`` by ``solver``, warm-started from the
    previous ``v`` if ``warm_start``; ``ĥ = ∇_λ f − ∂²_{λθ} g · v`` on a fresh minibatch.

    ``solver``: a :data:`STOCHASTIC_SOLVERS` value (a fresh minibatch per HVP), or any
    :mod:`hypergrad_jax.linalg` solver, which then solves ``(H + ridge I) v = ∇_θ f`` on the
    mixed product's minibatch (its HVP count includes the initial and the reported final
    residual).
    """

    num_steps: int
    lr: float
    solver: Any = linalg.CG(maxiter=10, tol=1e-6)
    warm_start: bool = True

    def init(self, params, hparams):
        del hparams
        check_steps(self, num_steps=self.num_steps)
        check_positive(self, lr=self.lr)
        if isinstance(self.solver, STOCHASTIC_SOLVERS):
            self.solver.check()
        return init_state(params)

    def step(self, problem, state, hparams, inner_data, outer_data, key):
        k_inner, k_linear, k_outer = split_keys(key)
        params = sgd(problem, hparams, state.params, inner_data, k_inner, self.num_steps, self.lr)
        value, f_theta, f_hparams = outer_gradients(
            problem, params, hparams, outer_batch(outer_data, k_outer)
        )
        batch = batch_at(inner_data, k_inner, jnp.int32(self.num_steps))
        x0 = state.adjoint if self.warm_start else None
        if isinstance(self.solver, STOCHASTIC_SOLVERS):

            def hvp(v, j):
                return hvp_operator(problem, params, hparams, batch_at(inner_data, k_linear, j))(v)

            v, hvps = self.solver(hvp, f_theta, x0)
        else:
            v, info = self.solver(hvp_operator(problem, params, hparams, batch), f_theta, x0)
            hvps = info.iterations + 2
        grad, residual = mixed_hypergradient(problem, params, hparams, batch, v, f_hparams)
        stats = Stats(value, residual, oracles(grads=self.num_steps, hvps=hvps))
        return State(params, v, (), state.step + 1), grad, stats


def StocBiO(num_steps: int, lr: float, neumann_steps: int = 10, neumann_lr: float = 0.1):  # noqa: N802
    """stocBiO (Ji, Yang, Liang 2021): ``num_steps`` SGD steps, then the Neumann series on
    fresh minibatch Hessians (``neumann_steps − 1`` HVPs), then one mixed product."""
    return SolveAfter(num_steps, lr, StochasticNeumann(neumann_steps, neumann_lr), False)


def AmIGO(num_steps: int, lr: float, linear_steps: int = 10, linear_lr: float = 0.1):  # noqa: N802
    """AmIGO (Arbel & Mairal 2022): ``num_steps`` warm-started SGD steps, then
    ``linear_steps`` SGD steps on the linear system on fresh minibatches, ``v`` warm-started
    from the previous outer step; then one mixed product."""
    return SolveAfter(num_steps, lr, StochasticSGD(linear_steps, linear_lr), True)


@typed
class SOBA(NamedTuple):
    """SOBA (Dagréou, Ablin, Vaiter, Moreau 2022): a single loop. Per outer step, on one
    minibatch at the current ``(θ, v)``: ``ĥ = ∇_λ f − ∂²_{λθ} g · v``,
    ``θ ← θ − α ∇_θ g``, ``v ← v − γ (H v − ∇_θ f)``. The gradient, HVP and mixed product
    come from one linearisation of ``∇_θ g`` in ``(θ, λ)``."""

    lr: float
    linear_lr: float = 0.1

    def init(self, params, hparams):
        del hparams
        check_positive(self, lr=self.lr, linear_lr=self.linear_lr)
        return init_state(params)

    def step(self, problem, state, hparams, inner_data, outer_data, key):
        k_inner, _, k_outer = split_keys(key)
        params, v = state.params, state.adjoint
        value, f_theta, f_hparams = outer_gradients(
            problem, params, hparams, outer_batch(outer_data, k_outer)
        )
        batch = batch_at(inner_data, k_inner, state.step)
        g, vjp = jax.vjp(lambda p, h: jax.grad(problem.inner_loss)(p, h, batch), params, hparams)
        hv, mixed = vjp(v)  # H is symmetric: the VJP in θ is H v
        grad = tree_axpy(-1.0, mixed, f_hparams)
        params = tree_axpy(-self.lr, g, params)
        v = tree_axpy(-self.linear_lr, tree_axpy(-1.0, f_theta, hv), v)
        stats = Stats(value, linalg.tree_norm(g), oracles(grads=1, hvps=1))
        return State(params, v, (), state.step + 1), grad, stats
