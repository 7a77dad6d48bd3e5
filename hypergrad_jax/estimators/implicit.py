"""Implicit differentiation at the end point of the inner run (implicit function theorem).

Design choice (deliberate): the solution map ``λ -> θ*(λ)`` is a
``jax.custom_jvp`` whose tangent is

    dθ* = −(H + ridge I)⁻¹ (∂²_{θλ} g · dλ),      H = ∂²_{θθ} g(θ*, λ),

solved with ``lax.custom_linear_solve(..., symmetric=True)``. That tangent is linear in
``dλ`` and JAX can transpose it, so one rule serves ``jax.jvp``/``jacfwd`` (forward mode),
``jax.grad``/``vjp`` (reverse mode, one linear solve with the same symmetric operator) and
second order (``jax.hessian``: the rule is itself differentiable, the solution's dependence
inside it goes back through the rule, ``custom_linear_solve`` has its own derivative).
A ``custom_vjp`` (jaxopt's choice) cannot give ``jax.jvp``. The cost of the choice: reverse
mode goes through linearise-and-transpose, which traces the rule once more.

Every value the user's functions and the run close over (arrays captured by a loss, the
batch, a sampler's data, the PRNG key) is hoisted out of the closure and becomes an explicit
input of the rule, so derivatives with respect to them are exact, not silently zero, and
integer values (class labels, indices) are inputs with no tangent rather than traced
constants the rule cannot lower. The end point does not depend on ``params0`` (nor on the
optimizer's hyperparameters) to first order: the IFT differentiates the optimality
condition, not the path.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import optax

from hypergrad_jax.linalg import CG, damped
from hypergrad_jax.problem import init_state, initial_params, optimality_batch, run_steps
from hypergrad_jax.static import typed


@partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _root(run_fn, grad_fn, solver, hparams, batch, grad_consts, params0, run_consts):
    del grad_fn, solver, batch, grad_consts
    return run_fn(hparams, params0, *run_consts)


@_root.defjvp
def _root_jvp(run_fn, grad_fn, solver, primals, tangents):
    hparams, batch, grad_consts, _, _ = primals
    d_hparams, d_batch, d_consts, _, _ = tangents
    theta = _root(run_fn, grad_fn, solver, *primals)
    _, rhs = jax.jvp(
        lambda h, b, c: grad_fn(theta, h, b, *c),
        (hparams, batch, grad_consts),
        (d_hparams, d_batch, d_consts),
    )
    hessian = _hessian_matvec(grad_fn, theta, hparams, batch, grad_consts, solver.ridge)
    d_theta = jax.lax.custom_linear_solve(
        hessian,
        jax.tree.map(jnp.negative, rhs),
        lambda mv, b: solver.run(mv, b)[0],
        symmetric=True,
    )
    return theta, d_theta


def _hessian_matvec(grad_fn, theta, hparams, batch, consts, ridge):
    hvp = lambda v: jax.jvp(lambda p: grad_fn(p, hparams, batch, *consts), (theta,), (v,))[1]  # noqa: E731
    return damped(hvp, ridge)


def _hoist(fn, *args):
    """``jax.closure_convert`` that hoists every value ``fn`` closes over, whatever its dtype.

    ``closure_convert`` hoists only float tracers: an integer tracer left in the closure (the
    labels of a batch under ``jit``) becomes a constant of the rule's primal program under
    ``grad``, which XLA cannot lower ("No constant handler for type: DynamicJaxprTracer").
    Returns ``(converted, consts)`` with ``converted(*args, *consts) == fn(*args)``.
    """
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    out_tree, num_args = jax.tree.structure(out_shape), len(args)

    def converted(*args_and_consts):
        args, consts = args_and_consts[:num_args], args_and_consts[num_args:]
        out = jax.extend.core.jaxpr_as_fun(jax.extend.core.ClosedJaxpr(closed.jaxpr, consts))
        return jax.tree.unflatten(out_tree, out(*jax.tree.leaves(args)))

    return converted, tuple(closed.consts)


def _optimality_grad(problem, params0, gamma):
    """``∇_θ`` of the objective whose optimality condition the rule differentiates: the
    inner loss ``g``, plus for :class:`Moreau` the proximal term ``γ/2 ||θ − θ₀(λ)||²``
    (``θ₀ = params0``, or ``params0(λ)`` when it is a function of the hyperparameters)."""
    grad_g = jax.grad(problem.inner_loss)
    if gamma is None:
        return grad_g

    def grad(theta, hparams, batch):
        theta0 = initial_params(params0, hparams)
        pull = lambda g, t, t0: g + gamma * (t - t0)  # noqa: E731
        return jax.tree.map(pull, grad_g(theta, hparams, batch), theta, theta0)

    return grad


def implicit_solution(problem, run, solver, hparams, params0, inner_data, key, gamma=None):
    """``θ_T(λ)`` from the inner run, differentiated by the implicit function theorem (of
    the proximal objective when ``gamma`` is given: :class:`Moreau`)."""
    theta0 = initial_params(params0, hparams)
    batch = optimality_batch(run, inner_data, key)

    def run_fn(h, p0):
        return run_steps(
            problem, run, h, init_state(run, h, p0), inner_data, key, 0, run.num_steps
        ).params

    run_conv, run_consts = _hoist(run_fn, hparams, theta0)
    grad_fn = _optimality_grad(problem, params0, gamma)
    grad_conv, grad_consts = _hoist(grad_fn, theta0, hparams, batch)
    return _root(run_conv, grad_conv, solver, hparams, batch, grad_consts, theta0, run_consts)


def implicit_grad(
    solver, gamma, problem, run, hparams, params0, inner_data, outer_data, key, warm_start
):
    """``(∇F, F, θ_T, SolveInfo, v)`` of :class:`Implicit` (``gamma=None``) and
    :class:`Moreau`: ``∇F = ∂_λ f − ∂_λ(∇_θ G)ᵀ v``, ``(∇²_θ G + ridge I) v = ∂_θ f`` at
    ``θ_T`` with ``G`` the inner loss (plus the proximal term)."""
    theta = implicit_solution(problem, run, solver, hparams, params0, inner_data, key, gamma)
    batch = optimality_batch(run, inner_data, key)
    value, (f_theta, f_hparams) = jax.value_and_grad(problem.outer_loss, argnums=(0, 1))(
        theta, hparams, outer_data
    )
    grad_fn = _optimality_grad(problem, params0, gamma)
    hessian = _hessian_matvec(grad_fn, theta, hparams, batch, (), solver.ridge)
    # custom_linear_solve keeps this differentiable (second order through hypergradient).
    v, solve_info = jax.lax.custom_linear_solve(
        hessian,
        f_theta,
        lambda mv, b: solver.run(mv, b, warm_start),
        symmetric=True,
        has_aux=True,
    )
    _, mixed_vjp = jax.vjp(lambda h: grad_fn(theta, h, batch), hparams)
    g = optax.tree.sub(f_hparams, mixed_vjp(v)[0])
    # a preconditioned solve's warm start carries its preconditioner too (linalg.Warm)
    adjoint = v if solve_info.warm is None else solve_info.warm
    return g, value, theta, solve_info._replace(warm=None), adjoint


@typed
class Implicit(NamedTuple):
    """Implicit differentiation (IFT) at the end point of the inner run.

    ``∇F = ∂_λ f − ∂²_{λθ} g · v``,  ``(H + ridge I) v = ∂_θ f``  at ``θ_T``, with ``H`` applied
    matrix-free (forward-over-reverse HVPs). Exact when ``θ_T`` is an inner minimiser and the
    solve converges; ``info`` reports the inner residual ``||∇_θ g(θ_T)||`` and the linear
    solve's residual and iterations. Memory ``O(|θ|)``; cost one run plus the solver's HVPs.

    Supports ``grad``, ``jvp``/``jacfwd``, ``hessian``, ``vmap`` (see the module docstring
    for why it is a ``custom_jvp``).

    Attributes:
      solver: a :mod:`hypergrad_jax.linalg` solver (``CG`` by default; ``Neumann``,
        ``Cholesky``, ``LU``), carrying its ``ridge``.
    """

    solver: Any = CG()

    def solution(self, problem, run, hparams, params0, inner_data, key):
        return implicit_solution(problem, run, self.solver, hparams, params0, inner_data, key)

    def grad(self, problem, run, hparams, params0, inner_data, outer_data, key, warm_start):
        args = (problem, run, hparams, params0, inner_data, outer_data, key, warm_start)
        return implicit_grad(self.solver, None, *args)


@typed
class Moreau(NamedTuple):
    """The Moreau-envelope hypergradient of a fine-tuning run (ResAlign, Li et al., NeurIPS
    2025).

    The inner run (fine-tuning from ``θ₀ = params0``, typically a function of the
    hyperparameters: a learned initialisation) is modelled as the proximal point of its
    start, ``θ* = argmin_φ g(φ, λ) + γ/2 ||φ − θ₀(λ)||²``, and differentiated by the implicit
    function theorem of that proximal objective, evaluated at the end point ``θ_T`` of the
    run actually run (the authors' practice: the run need not solve the proximal problem)::

        ∇F = ∂_λ f − ∂²_{λθ} g · v + γ (∂θ₀/∂λ)ᵀ v,     (∇²_θ g(θ_T) + γ I + ridge I) v = ∂_θ f

    With ``λ = θ₀`` this is ``γ (H + γI)⁻¹ ∇f(θ_T)``, the implicit-MAML meta-gradient
    (Rajeswaran et al., NeurIPS 2019). ``γ → ∞`` gives the first-order ``∇f(θ_T)``
    (``(H + γI)⁻¹ ≈ I/γ``). Same interface as the other estimators (``grad``, ``jvp``,
    ``hessian``, ``vmap``), the same ``info`` (solve residual, status).

    Attributes:
      gamma: ``γ > 0``, the proximal strength (the fine-tuning's inverse step length).
      solver: any :mod:`hypergrad_jax.linalg` solver, e.g. ``hg.Richardson()`` (the authors'
        truncated, step-halving solver) or ``CG`` (the default).
    """

    gamma: float = 1.0
    solver: Any = CG()

    def _check(self):
        if not (isinstance(self.gamma, (int, float)) and not isinstance(self.gamma, bool)):
            if not hasattr(self.gamma, "dtype"):
                raise ValueError(f"Moreau.gamma: expected a float > 0, got {self.gamma!r}")
        elif not self.gamma > 0:
            raise ValueError(f"Moreau.gamma: expected a float > 0, got {self.gamma!r}")

    def solution(self, problem, run, hparams, params0, inner_data, key):
        self._check()
        return implicit_solution(
            problem, run, self.solver, hparams, params0, inner_data, key, self.gamma
        )

    def grad(self, problem, run, hparams, params0, inner_data, outer_data, key, warm_start):
        self._check()
        args = (problem, run, hparams, params0, inner_data, outer_data, key, warm_start)
        return implicit_grad(self.solver, self.gamma, *args)
