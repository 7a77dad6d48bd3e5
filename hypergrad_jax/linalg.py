"""Matrix-free linear algebra on pytrees: HVPs and solvers for ``(H + ridge I) x = b``.

Every solver is a value (a NamedTuple of options) called as
``solver(matvec, b, x0=None) -> (x, SolveInfo)``. ``matvec`` must be linear and, for
``CG`` and ``Neumann``, symmetric positive (semi-)definite; ``ridge`` adds ``ridge * x`` to
it. Solvers are not differentiated through: the implicit estimator wraps them in
``lax.custom_linear_solve``, which differentiates the *solution* instead of the iterations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

PyTree = Any


class SolveInfo(NamedTuple):
    residual: jax.Array  # float[]: ||A x - b|| / ||b|| (0 when b = 0)
    iterations: jax.Array  # int32[]: matvecs used (dense solvers: the dimension)
    converged: jax.Array  # bool[]: residual <= tol (dense and Neumann: always True)


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
    """``alpha * x + y``, keeping each leaf's dtype."""
    return jax.tree.map(lambda u, v: (alpha * u + v).astype(v.dtype), x, y)


def tree_norm(a: PyTree) -> jax.Array:
    return jnp.sqrt(tree_vdot(a, a).real)


def hvp(fun: Callable, params: PyTree, v: PyTree, *args) -> PyTree:
    """Hessian-vector product of ``fun(params, *args)`` in ``params``, forward-over-reverse."""
    return jax.jvp(lambda p: jax.grad(fun)(p, *args), (params,), (v,))[1]


def damped(matvec: Callable, ridge: float) -> Callable:
    """``v -> matvec(v) + ridge * v``."""
    if ridge == 0:
        return matvec
    return lambda v: tree_axpy(ridge, v, matvec(v))


def _relative_residual(matvec, x, b):
    r = tree_axpy(-1.0, matvec(x), b)
    nb = tree_norm(b)
    return jnp.where(nb > 0, tree_norm(r) / jnp.where(nb > 0, nb, 1.0), tree_norm(r))


def _call(self, matvec, b, x0=None):
    """Solves ``(matvec + ridge I) x = b``; returns ``(x, SolveInfo)``."""
    return self.run(damped(matvec, self.ridge), b, x0)


class CG(NamedTuple):
    """Conjugate gradient for symmetric positive definite ``H + ridge I``.

    The default for implicit differentiation: it needs only HVPs and converges in
    ``O(sqrt(cond))`` iterations. Stops when ``||r|| <= tol * ||b||`` or after ``maxiter``.
    """

    maxiter: int = 100
    tol: float = 1e-10
    ridge: float = 0.0

    __call__ = _call

    def run(self, matvec, b, x0=None):
        """Solves ``matvec(x) = b`` (``matvec`` already damped)."""
        x = jax.tree.map(jnp.zeros_like, b) if x0 is None else x0
        r = tree_axpy(-1.0, matvec(x), b)
        bound = (self.tol * tree_norm(b)) ** 2

        def cond(c):
            _, r, _, rr, k = c
            return (rr > bound) & (k < self.maxiter)

        def body(c):
            x, r, p, rr, k = c
            ap = matvec(p)
            alpha = rr / tree_vdot(p, ap)
            x = tree_axpy(alpha, p, x)
            r = tree_axpy(-alpha, ap, r)
            rr_new = tree_vdot(r, r)
            p = tree_axpy(rr_new / rr, p, r)
            return x, r, p, rr_new, k + 1

        rr = tree_vdot(r, r)
        x, r, _, rr, k = jax.lax.while_loop(cond, body, (x, r, r, rr, jnp.int32(0)))
        res = _relative_residual(matvec, x, b)
        return x, SolveInfo(res, k, rr <= bound)


class Neumann(NamedTuple):
    """Truncated Neumann series ``x = eta * sum_{j<steps} (I - eta A)^j b`` (+ ``x0`` term).

    Converges when ``0 < eta < 2 / lambda_max(A)``; with ``steps`` terms the error
    contracts like ``(1 - eta * lambda_min)^steps``. The solver stocBiO uses.
    """

    steps: int = 50
    eta: float = 1.0
    ridge: float = 0.0

    __call__ = _call

    def run(self, matvec, b, x0=None):
        # Richardson iteration x <- x + eta (b - A x): from x0 = 0 its k-th iterate is the
        # k-term Neumann series, and a warm start x0 is used as given.
        x = jax.tree.map(jnp.zeros_like, b) if x0 is None else x0

        def body(_, x):
            return tree_axpy(self.eta, tree_axpy(-1.0, matvec(x), b), x)

        x = jax.lax.fori_loop(0, self.steps, body, x)
        res = _relative_residual(matvec, x, b)
        return x, SolveInfo(res, jnp.int32(self.steps), jnp.isfinite(res))


def _dense_run(matvec, b, dense_solve):
    """Materialises ``matvec`` as a matrix (``n`` matvecs) and applies ``dense_solve``."""
    flat_b, unravel = ravel_pytree(b)
    mat = jax.jacfwd(lambda f: ravel_pytree(matvec(unravel(f)))[0])(flat_b)
    x = unravel(dense_solve(mat, flat_b))
    res = _relative_residual(matvec, x, b)
    return x, SolveInfo(res, jnp.int32(flat_b.size), jnp.isfinite(res))


class Cholesky(NamedTuple):
    """Dense Cholesky solve: materialises ``A`` with ``n`` matvecs. Small problems only."""

    ridge: float = 0.0

    __call__ = _call

    def run(self, matvec, b, x0=None):
        del x0
        return _dense_run(
            matvec, b, lambda m, f: jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(m), f)
        )


class LU(NamedTuple):
    """Dense LU solve for non-symmetric or indefinite ``A``. Small problems only."""

    ridge: float = 0.0

    __call__ = _call

    def run(self, matvec, b, x0=None):
        del x0
        return _dense_run(matvec, b, jnp.linalg.solve)


# --------------------------------------------------------------------------- Fisher inverse
# NHGD (ALGORITHMS.md §3) keeps A ≈ F⁻¹, the inverse of an empirical Fisher estimate built
# from the inner loop's own gradients, updated in O(d²) per sample instead of inverting.


class FisherInverse(NamedTuple):
    inverse: jax.Array  # float[d, d]: A ≈ F⁻¹ (symmetric positive definite)
    count: jax.Array  # int32[]: updates so far (the running mean's weights use it)


def fisher_init(dim: int, damping: float, dtype=None) -> FisherInverse:
    """``A_0 = I / damping``: the inverse of the prior ``F_0 = damping · I``."""
    if damping <= 0:
        raise ValueError(f"damping: expected > 0, got {damping}")
    eye = jnp.eye(dim, dtype=dtype or jnp.result_type(float))
    return FisherInverse(eye / damping, jnp.zeros((), jnp.int32))


def _sherman_morrison(a, u, keep, add):
    """``(keep · A⁻¹ + add · u uᵀ)⁻¹`` from ``A``:
    ``[A − add (Au)(Au)ᵀ / (keep + add uᵀAu)] / keep``."""
    au = a @ u
    return (a - add * jnp.outer(au, au) / (keep + add * (u @ au))) / keep


def fisher_ema_update(state: FisherInverse, u: jax.Array, beta) -> FisherInverse:
    """EMA Fisher ``F' = β F + (1−β) u uᵀ``; its inverse by Sherman–Morrison::

    A' = (1/β) [A − (1−β)(Au)(Au)ᵀ / (β + (1−β) uᵀAu)]
    """
    return FisherInverse(_sherman_morrison(state.inverse, u, beta, 1 - beta), state.count + 1)


def fisher_mean_update(state: FisherInverse, u: jax.Array) -> FisherInverse:
    """Running mean with the prior as one pseudo-sample: after ``t`` updates
    ``F_t = (F_0 + Σ_s u_s u_sᵀ) / (t + 1)``, i.e. ``F' = (1−c) F + c u uᵀ`` with
    ``c = 1 / (t + 2)``; its inverse by Sherman–Morrison."""
    c = 1.0 / (state.count + 2).astype(state.inverse.dtype)
    return FisherInverse(_sherman_morrison(state.inverse, u, 1 - c, c), state.count + 1)


def _woodbury(a, us, keep, add):
    """``(keep · A⁻¹ + add/B · UᵀU)⁻¹`` from ``A`` with one ``B × B`` solve::

    [A − A Uᵀ (keep·B/add · I + U A Uᵀ)⁻¹ U A] / keep
    """
    b = us.shape[0]
    ua = us @ a  # (B, d); A is symmetric so U A = (A Uᵀ)ᵀ
    inner = (keep * b / add) * jnp.eye(b, dtype=a.dtype) + ua @ us.T
    new = (a - ua.T @ jnp.linalg.solve(inner, ua)) / keep
    # Symmetrise: in float32 the rounding's antisymmetric part otherwise grows every update.
    return 0.5 * (new + new.T)


def fisher_ema_update_batch(state: FisherInverse, us: jax.Array, beta) -> FisherInverse:
    """EMA with a batch of ``B`` samples (rows of ``us``, e.g. per-sample gradients from
    ``vmap(grad)``): ``F' = β F + (1−β)/B · UᵀU``, inverted with one rank-``B`` Woodbury
    update (a ``B × B`` solve)::

        A' = (1/β) [A − A Uᵀ (β B/(1−β) I + U A Uᵀ)⁻¹ U A]
    """
    return FisherInverse(_woodbury(state.inverse, us, beta, 1 - beta), state.count + 1)


def fisher_mean_update_batch(state: FisherInverse, us: jax.Array) -> FisherInverse:
    """Running mean of per-update batch Fishers: ``F' = (1−c) F + c/B · UᵀU``, ``c = 1/(t+2)``
    (the prior counts as one update), inverted with one rank-``B`` Woodbury update."""
    c = 1.0 / (state.count + 2).astype(state.inverse.dtype)
    return FisherInverse(_woodbury(state.inverse, us, 1 - c, c), state.count + 1)
