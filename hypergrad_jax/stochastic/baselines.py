"""The stochastic baselines NHGD is measured against (each cites its paper).

stocBiO, AmIGO and "solve after" are one method, :class:`SolveAfter`: the inner loop (the
``hg.InnerRun``'s optimizer and steps; plain SGD in the papers), the outer gradients, a
stochastic linear solve of ``H v = ∇_θ f``, one mixed product. They differ
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
import optax

from hypergrad_jax import linalg
from hypergrad_jax.data import batch_at
from hypergrad_jax.problem import optimizer_update
from hypergrad_jax.static import typed
from hypergrad_jax.stochastic.common import (
    State,
    Stats,
    check_positive,
    check_run,
    check_steps,
    hvp_operator,
    inner_loop,
    mixed_hypergradient,
    oracles,
    outer_batch,
    outer_gradients,
    single_loop_state,
    split_keys,
    start_state,
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
            p = optax.tree.add_scale(p, -self.eta, hvp(p, j))
            return (p, optax.tree.add(p, total)), None

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
            return optax.tree.add_scale(v, -self.lr, optax.tree.sub(hvp(v, j), b)), None

        steps = jnp.arange(self.steps, dtype=jnp.int32)
        return jax.lax.scan(step, v, steps)[0], self.steps


STOCHASTIC_SOLVERS = (StochasticNeumann, StochasticSGD)


@typed
class SolveAfter(NamedTuple):
    """Inner loop → outer gradients → a stochastic linear solve → one mixed product.

    ``run``'s inner loop (its optimizer, ``T = run.num_steps`` steps) from the previous
    outer step's ``θ``; ``∇_θ f``,
    ``∇_λ f`` on the outer batch; ``v ≈ H⁻¹ ∇_θ f`` by ``solver``, warm-started from the
    previous ``v`` if ``warm_start``; ``ĥ = ∇_λ f − ∂²_{λθ} g · v`` on a fresh minibatch.

    ``solver``: a :data:`STOCHASTIC_SOLVERS` value (a fresh minibatch per HVP), or any
    :mod:`hypergrad_jax.linalg` solver, which then solves ``(H + ridge I) v = ∇_θ f`` on the
    mixed product's minibatch (its HVP count includes the initial and the reported final
    residual).
    """

    solver: Any = linalg.CG(maxiter=10, tol=1e-6)
    warm_start: bool = True

    def init(self, params, hparams):
        del hparams
        if isinstance(self.solver, STOCHASTIC_SOLVERS):
            self.solver.check()
        return start_state(params)

    def step(self, problem, run, state, hparams, inner_data, outer_data, key):
        check_run(self, run)
        k_inner, k_linear, k_outer = split_keys(key)
        params = inner_loop(problem, run, hparams, state.params, inner_data, k_inner)
        value, f_theta, f_hparams = outer_gradients(
            problem, params, hparams, outer_batch(outer_data, k_outer)
        )
        batch = batch_at(inner_data, k_inner, jnp.int32(run.num_steps))
        x0 = state.adjoint if self.warm_start else None
        if isinstance(self.solver, STOCHASTIC_SOLVERS):

            def hvp(v, j):
                return hvp_operator(problem, params, hparams, batch_at(inner_data, k_linear, j))(v)

            v, hvps = self.solver(hvp, f_theta, x0)
        else:
            v, info = self.solver(hvp_operator(problem, params, hparams, batch), f_theta, x0)
            hvps = info.iterations + 2
        grad, residual = mixed_hypergradient(problem, params, hparams, batch, v, f_hparams)
        stats = Stats(value, residual, oracles(grads=run.num_steps, hvps=hvps))
        return State(params, v, (), state.step + 1), grad, stats


def StocBiO(neumann_steps: int = 10, neumann_lr: float = 0.1) -> SolveAfter:  # noqa: N802
    """stocBiO (Ji, Yang, Liang 2021): the inner loop, then the Neumann series on fresh
    minibatch Hessians (``neumann_steps − 1`` HVPs), then one mixed product."""
    return SolveAfter(StochasticNeumann(neumann_steps, neumann_lr), warm_start=False)


def AmIGO(linear_steps: int = 10, linear_lr: float = 0.1) -> SolveAfter:  # noqa: N802
    """AmIGO (Arbel & Mairal 2022): the warm-started inner loop, then ``linear_steps`` SGD
    steps on the linear system on fresh minibatches, ``v`` warm-started from the previous
    outer step; then one mixed product."""
    return SolveAfter(StochasticSGD(linear_steps, linear_lr), warm_start=True)


@typed
class SOBA(NamedTuple):
    """SOBA (Dagréou, Ablin, Vaiter, Moreau 2022): a single loop. Per outer step, on one
    minibatch at the current ``(θ, v)``: ``ĥ = ∇_λ f − ∂²_{λθ} g · v``, one step of
    ``run``'s optimizer on ``θ`` with ``∇_θ g`` (``θ ← θ − α ∇_θ g`` for ``hg.optim.sgd``),
    ``v ← v − γ (H v − ∇_θ f)``. The gradient, HVP and mixed product come from one
    linearisation of ``∇_θ g`` in ``(θ, λ)``.

    Where it must be plain SGD: ``run.num_steps`` must be 1 (one inner step per outer
    step), and the optimizer must be stateless (e.g. ``hg.optim.sgd``): there is no inner
    run whose optimizer state could persist, so momentum or Adam moments would restart at
    every step.
    """

    linear_lr: float = 0.1

    def init(self, params, hparams):
        del hparams
        check_positive(self, linear_lr=self.linear_lr)
        return start_state(params)

    def step(self, problem, run, state, hparams, inner_data, outer_data, key):
        inner = single_loop_state(self, run, hparams, state.params)
        k_inner, _, k_outer = split_keys(key)
        params, v = state.params, state.adjoint
        value, f_theta, f_hparams = outer_gradients(
            problem, params, hparams, outer_batch(outer_data, k_outer)
        )
        batch = batch_at(inner_data, k_inner, state.step)
        g, vjp = jax.vjp(lambda p, h: jax.grad(problem.inner_loss)(p, h, batch), params, hparams)
        hv, mixed = vjp(v)  # H is symmetric: the VJP in θ is H v
        grad = optax.tree.sub(f_hparams, mixed)
        params = optimizer_update(run, hparams, g, inner, jnp.int32(0)).params
        v = optax.tree.add_scale(v, -self.linear_lr, optax.tree.sub(hv, f_theta))
        stats = Stats(value, optax.tree.norm(g), oracles(grads=1, hvps=1))
        return State(params, v, (), state.step + 1), grad, stats
