"""Linear solvers against dense solves; HVPs against dense Hessians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergrad_jax as hg


def spd(key, n, cond):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (n, n)))
    return (q * jnp.geomspace(1.0, cond, n)[None, :]) @ q.T


def as_tree(x):  # solvers work on pytrees: split a vector into two leaves
    return {"a": x[:3], "b": x[3:].reshape(-1, 1)}


def from_tree(t):
    return jnp.concatenate([t["a"], t["b"].ravel()])


@pytest.mark.parametrize(
    "solver,tol",
    [
        (hg.CG(maxiter=100, tol=1e-12), 1e-9),
        (hg.Cholesky(), 1e-11),
        (hg.LU(), 1e-11),
        # Neumann with eta = 1/λmax = 0.01 contracts by 0.99 per term: 3000 terms -> 1e-13.
        (hg.Neumann(steps=3000, eta=0.01), 1e-9),
    ],
)
@pytest.mark.parametrize("ridge", [0.0, 0.5])
def test_solvers_match_dense_solve(getkey, solver, tol, ridge):
    a = spd(getkey(), 8, 100.0)
    b = jax.random.normal(getkey(), (8,))
    x, info = solver._replace(ridge=ridge)(lambda v: as_tree(a @ from_tree(v)), as_tree(b))
    exact = jnp.linalg.solve(a + ridge * jnp.eye(8), b)
    np.testing.assert_allclose(from_tree(x), exact, rtol=tol, atol=tol)
    assert float(info.residual) <= 1e-8 and bool(info.converged)


def test_cg_iterations_and_warm_start(getkey):
    a = spd(getkey(), 30, 1e3)
    b = jax.random.normal(getkey(), (30,))
    x, info = hg.CG(tol=1e-10)(lambda v: a @ v, b)
    _, warm = hg.CG(tol=1e-10)(lambda v: a @ v, b, x0=x + 1e-6)
    assert 0 < int(warm.iterations) < int(info.iterations) <= 100
    _, stopped = hg.CG(maxiter=3)(lambda v: a @ v, b)
    assert int(stopped.iterations) == 3 and not bool(stopped.converged)


def test_lu_solves_nonsymmetric(getkey):
    a = jax.random.normal(getkey(), (6, 6)) + 6 * jnp.eye(6)
    b = jax.random.normal(getkey(), (6,))
    x, _ = hg.LU()(lambda v: a @ v, b)
    np.testing.assert_allclose(x, jnp.linalg.solve(a, b), rtol=1e-12)


def test_hvp_matches_dense_hessian(getkey):
    w = jax.random.normal(getkey(), (5,))
    v = jax.random.normal(getkey(), (5,))
    fun = lambda p, s: jnp.sum(jnp.sin(p * s)) + jnp.sum(p**4)
    np.testing.assert_allclose(
        hg.linalg.hvp(fun, w, v, 2.0), jax.hessian(fun)(w, 2.0) @ v, rtol=1e-12
    )
