"""Bilevel problems with exact hypergradients, and a finite-difference hypergradient check.

* :func:`quadratic_problem`: ``g(θ, λ) = ½ θᵀAθ + θᵀ(Bλ + c)``, ``f(θ, λ) = ½||Pθ − t||²
  + ½ r||λ||²`` with ``A``'s spectrum in ``[mu, L]`` (strong convexity, smoothness) and a
  cross-coupling ``B`` of chosen scale; the exact hypergradient is two dense solves.
* :func:`ridge_regression`: log-ridge penalty tuned on validation data; closed-form inner
  solution.
* :func:`inner_minimizer` and :func:`implicit_hypergradient`: the exact implicit
  hypergradient of any small problem (damped Newton-CG to the inner minimiser, then a dense
  Hessian solve), the reference the NHGD experiments and tests measure against.
* :func:`check_hypergradient`: float64 central differences for any ``hparams -> scalar``.

Exact values need float64: enable it with ``jax.config.update("jax_enable_x64", True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from hypergrad_jax import linalg, optim
from hypergrad_jax.problem import BilevelProblem, InnerRun

PyTree = Any


class ExactProblem(NamedTuple):
    """A bilevel problem bundled with its data and exact answers.

    Attributes:
      problem, run, hparams, params0, inner_data, outer_data: arguments for
        :func:`hypergrad_jax.hypergradient`.
      solution: ``hparams -> θ*(λ)``, the exact inner minimiser.
      objective: ``hparams -> F(λ) = f(θ*(λ), λ)``.
      exact_hypergradient: ``hparams -> ∇F(λ)``.
    """

    problem: BilevelProblem
    run: InnerRun
    hparams: PyTree
    params0: PyTree
    inner_data: PyTree
    outer_data: PyTree
    solution: Callable
    objective: Callable
    exact_hypergradient: Callable


def _quadratic_inner(params, hparams, batch):
    return 0.5 * params @ batch["A"] @ params + params @ (batch["B"] @ hparams + batch["c"])


def _quadratic_outer(params, hparams, batch):
    r = batch["P"] @ params - batch["t"]
    return 0.5 * r @ r + 0.5 * batch["reg"] * hparams @ hparams


def _steps_to(rate: float, tol: float, cap: int) -> int:
    return int(min(cap, math.ceil(math.log(tol) / math.log(max(rate, 1e-300)))) + 1)


def quadratic_problem(
    key: jax.Array,
    dim: int = 10,
    num_hparams: int = 3,
    mu: float = 1.0,
    L: float = 10.0,  # noqa: N803 -- the smoothness constant's usual name
    coupling: float = 1.0,
    outer_reg: float = 0.1,
    num_steps: int | None = None,
    dtype=None,
) -> ExactProblem:
    """A quadratic bilevel problem with controlled conditioning ``L / mu``.

    The inner run is gradient descent with the optimal constant step ``2 / (mu + L)``; by
    default ``num_steps`` makes it contract the error by ``1e-14`` (capped at 50,000), so
    the run's end point is the minimiser to float64 precision.

    Args:
      key: PRNG key.
      dim, num_hparams: sizes of θ and λ.
      mu, L: smallest and largest eigenvalue of the inner Hessian ``A``.
      coupling: scale of ``B = ∂²_{θλ} g`` (entries ``N(0, coupling² / dim)``).
      outer_reg: ``r``, the outer loss's ridge on λ (gives ``∂_λ f ≠ 0``).
      num_steps: inner steps (``None``: enough to converge).
      dtype: float dtype of the data (default: float64 when x64 is enabled).
    """
    if not 0 < mu <= L:
        raise ValueError(f"mu, L: expected 0 < mu <= L, got mu={mu}, L={L}")
    dtype = dtype or jnp.result_type(float)
    kq, kb, kc, kp, kt, kh = jax.random.split(key, 6)
    q, _ = jnp.linalg.qr(jax.random.normal(kq, (dim, dim), dtype))
    a = (q * jnp.linspace(mu, L, dim, dtype=dtype)[None, :]) @ q.T
    a = 0.5 * (a + a.T)
    inner_data = {
        "A": a,
        "B": coupling * jax.random.normal(kb, (dim, num_hparams), dtype) / math.sqrt(dim),
        "c": jax.random.normal(kc, (dim,), dtype),
    }
    outer_data = {
        "P": jax.random.normal(kp, (dim, dim), dtype) / math.sqrt(dim),
        "t": jax.random.normal(kt, (dim,), dtype),
        "reg": jnp.asarray(outer_reg, dtype),
    }
    lr = 2.0 / (mu + L)
    if num_steps is None:
        num_steps = _steps_to((L - mu) / (L + mu), 1e-14, 50_000)
    run = InnerRun(optim.sgd(), num_steps, optimizer_hparams=lambda h: {"lr": lr})
    problem = BilevelProblem(_quadratic_inner, _quadratic_outer)

    def solution(h):
        return -jnp.linalg.solve(inner_data["A"], inner_data["B"] @ h + inner_data["c"])

    def objective(h):
        return _quadratic_outer(solution(h), h, outer_data)

    def exact_hypergradient(h):
        theta = solution(h)
        f_theta = outer_data["P"].T @ (outer_data["P"] @ theta - outer_data["t"])
        return outer_reg * h - inner_data["B"].T @ jnp.linalg.solve(inner_data["A"], f_theta)

    hparams = jax.random.normal(kh, (num_hparams,), dtype)
    return ExactProblem(
        problem,
        run,
        hparams,
        jnp.zeros(dim, dtype),
        inner_data,
        outer_data,
        solution,
        objective,
        exact_hypergradient,
    )


def _ridge_inner(params, hparams, batch):
    x, y = batch
    r = x @ params - y
    return 0.5 * jnp.mean(r * r) + 0.5 * jnp.exp(hparams) * params @ params


def _ridge_outer(params, hparams, batch):
    del hparams
    x, y = batch
    r = x @ params - y
    return 0.5 * jnp.mean(r * r)


def ridge_regression(
    key: jax.Array,
    num_train: int = 40,
    num_val: int = 40,
    dim: int = 8,
    noise: float = 0.5,
    log_ridge: float = -1.0,
    num_steps: int | None = None,
    dtype=None,
) -> ExactProblem:
    """Tune the log-ridge penalty ``λ`` (a scalar) of linear least squares on validation data.

    ``θ*(λ) = (XᵀX/n + e^λ I)⁻¹ Xᵀy/n`` in closed form; the exact hypergradient
    differentiates through that solve. The inner run is gradient descent with step
    ``2 / (mu + L)`` for the inner Hessian's extreme eigenvalues, long enough to converge.
    """
    dtype = dtype or jnp.result_type(float)
    kx, kw, kn, kv, kvn = jax.random.split(key, 5)
    w = jax.random.normal(kw, (dim,), dtype)
    x = jax.random.normal(kx, (num_train, dim), dtype)
    y = x @ w + noise * jax.random.normal(kn, (num_train,), dtype)
    xv = jax.random.normal(kv, (num_val, dim), dtype)
    yv = xv @ w + noise * jax.random.normal(kvn, (num_val,), dtype)
    hparams = jnp.asarray(log_ridge, dtype)

    def solution(h):
        gram = x.T @ x / num_train + jnp.exp(h) * jnp.eye(dim, dtype=dtype)
        return jnp.linalg.solve(gram, x.T @ y / num_train)

    def objective(h):
        return _ridge_outer(solution(h), h, (xv, yv))

    eig = jnp.linalg.eigvalsh(x.T @ x / num_train) + math.exp(log_ridge)
    mu, L = float(eig[0]), float(eig[-1])  # noqa: N806
    if num_steps is None:
        num_steps = _steps_to((L - mu) / (L + mu), 1e-14, 50_000)
    lr = 2.0 / (mu + L)
    run = InnerRun(optim.sgd(), num_steps, optimizer_hparams=lambda h: {"lr": lr})
    return ExactProblem(
        BilevelProblem(_ridge_inner, _ridge_outer),
        run,
        hparams,
        jnp.zeros(dim, dtype),
        (x, y),
        (xv, yv),
        solution,
        objective,
        jax.grad(objective),
    )


class CheckResult(NamedTuple):
    ok: bool  # relative_error <= rtol
    relative_error: float  # max |fd − analytic| / max(max |analytic|, max |fd|)
    finite_difference: jax.Array  # central differences (per coordinate or direction)
    analytic: jax.Array  # the same components of the given hypergradient


def check_hypergradient(
    objective: Callable[[PyTree], jax.Array],
    hparams: PyTree,
    grad: PyTree,
    *,
    rtol: float = 1e-6,
    num_directions: int | None = None,
    key: jax.Array | None = None,
) -> CheckResult:
    """Checks a hypergradient against float64 central finite differences of ``objective``.

    Per coordinate when ``hparams`` has at most 64 elements (or ``num_directions`` is
    None and no key is given), else along ``num_directions`` random unit directions
    ``v`` comparing ``(F(λ+hv) − F(λ−hv)) / 2h`` with ``⟨grad, v⟩``.

    The step ``h = eps^{1/3} · max(1, |λ|)`` balances the central difference's truncation
    error ``O(h² F''')`` against rounding ``O(eps |F| / h)``: both are ``O(eps^{2/3})``
    ≈ 4e-11 relative in float64, so ``rtol = 1e-6`` leaves room for moderate curvature.

    Args:
      objective: ``hparams -> scalar``, e.g. the outer loss after the inner run.
      hparams: float64 pytree at which to check.
      grad: the hypergradient to check (structure of ``hparams``).
      rtol: tolerance on :attr:`CheckResult.relative_error`.
      num_directions, key: random-direction mode for many hyperparameters.

    Raises:
      ValueError: if x64 is disabled, ``hparams`` is not float64, or the structures differ.
    """
    flat, unravel = ravel_pytree(hparams)
    flat_grad, _ = ravel_pytree(grad)
    if not jax.config.jax_enable_x64 or flat.dtype != jnp.float64:
        raise ValueError(
            "hparams: check_hypergradient needs float64 hyperparameters with "
            "jax.config.update('jax_enable_x64', True); got dtype "
            f"{flat.dtype} with x64 {'on' if jax.config.jax_enable_x64 else 'off'}"
        )
    if jax.tree.structure(grad) != jax.tree.structure(hparams) or flat_grad.shape != flat.shape:
        raise ValueError(
            f"grad: expected the structure of hparams {jax.tree.structure(hparams)}, got "
            f"{jax.tree.structure(grad)}"
        )
    flat_grad = flat_grad.astype(jnp.float64)
    fn = jax.jit(lambda f: objective(unravel(f)))
    eps = jnp.finfo(jnp.float64).eps ** (1.0 / 3.0)
    if num_directions is None and (flat.size <= 64 or key is None):
        directions = jnp.eye(flat.size, dtype=jnp.float64)
        steps = eps * jnp.maximum(1.0, jnp.abs(flat))
    else:
        if key is None or num_directions is None:
            raise ValueError("num_directions, key: give both for random-direction checks")
        directions = jax.random.normal(key, (num_directions, flat.size), jnp.float64)
        directions /= jnp.linalg.norm(directions, axis=1, keepdims=True)
        steps = jnp.full(num_directions, eps * jnp.maximum(1.0, jnp.max(jnp.abs(flat))))
    fd = jnp.array(
        [(fn(flat + h * v) - fn(flat - h * v)) / (2 * h) for v, h in zip(directions, steps)]
    )
    analytic = directions @ flat_grad
    scale = jnp.maximum(jnp.max(jnp.abs(analytic)), jnp.max(jnp.abs(fd)))
    err = float(jnp.max(jnp.abs(fd - analytic)) / jnp.where(scale > 0, scale, 1.0))
    return CheckResult(err <= rtol, err, fd, analytic)


# --------------------------------------------------------------------------- reference


def inner_minimizer(problem, hparams, params, batch, steps: int, cg_maxiter=100, cg_tol=1e-7):
    """``θ*(λ) = argmin_θ g(θ, λ; batch)`` by ``steps`` damped Newton-CG steps from ``params``.

    Each step solves ``H d = ∇g`` by CG (``cg_maxiter`` HVPs at most, relative tolerance
    ``cg_tol``) and takes the largest step ``t = 2^-k`` (``k < 12``) that satisfies Armijo's
    condition, up to rounding; ``t = 0`` if none does. Plain Newton diverges from far away
    on weakly regularised problems: the line search makes the reference safe from any
    start. Returns ``(θ*, ||∇_θ g(θ*)||)``; jittable (``steps`` may be traced).
    """
    flat0, unravel = ravel_pytree(params)
    loss = lambda x: problem.inner_loss(unravel(x), hparams, batch)  # noqa: E731
    ts = 0.5 ** jnp.arange(12, dtype=flat0.dtype)
    eps = jnp.finfo(flat0.dtype).eps

    def newton(_, x):
        f, g = jax.value_and_grad(loss)(x)
        hvp = lambda v: jax.jvp(jax.grad(loss), (x,), (v,))[1]  # noqa: E731
        d, _ = linalg.CG(maxiter=cg_maxiter, tol=cg_tol)(hvp, g)
        trial = jax.vmap(lambda t: loss(x - t * d))(ts)
        ok = trial <= f - 1e-4 * ts * (g @ d) + 8 * eps * jnp.abs(f)
        t = jnp.where(jnp.any(ok), ts[jnp.argmax(ok)], 0.0)
        return x - t * d

    flat = jax.lax.fori_loop(0, steps, newton, flat0)
    return unravel(flat), jnp.linalg.norm(jax.grad(loss)(flat))


def implicit_hypergradient(problem, hparams, params, inner_batch, outer_batch, newton_steps=20):
    """The exact implicit hypergradient of a small problem: ``θ*`` by
    :func:`inner_minimizer` (``newton_steps`` damped Newton-CG steps from ``params``; 0:
    ``params`` is taken as ``θ*``), then ``∇_λ f − ∂²_{λθ} g H⁻¹ ∇_θ f`` at ``θ*`` with the
    dense Hessian and one dense solve. Returns ``(grad, θ*)``. ``O(|θ|²)`` memory,
    ``O(|θ|³)`` time."""
    theta = params
    if newton_steps:
        theta, _ = inner_minimizer(problem, hparams, params, inner_batch, newton_steps)
    flat, unravel = ravel_pytree(theta)
    loss = lambda x: problem.inner_loss(unravel(x), hparams, inner_batch)  # noqa: E731
    f_theta, f_hparams = jax.grad(problem.outer_loss, argnums=(0, 1))(theta, hparams, outer_batch)
    v = unravel(jnp.linalg.solve(jax.hessian(loss)(flat), ravel_pytree(f_theta)[0]))
    _, vjp = jax.vjp(lambda h: jax.grad(problem.inner_loss)(theta, h, inner_batch), hparams)
    return optax.tree.sub(f_hparams, vjp(v)[0]), theta
