"""Linear solvers against dense solves; HVPs against dense Hessians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import tour_problem

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


# ------------------------------------------------------------ converged means the residual test

ALL_SOLVERS = [
    hg.CG(maxiter=3),
    hg.CG(),
    hg.Neumann(steps=5, eta=0.01),
    hg.Neumann(steps=20, eta=0.03),  # 0.03 > 2 / λmax = 0.02: diverges
    hg.Neumann(),
    hg.Cholesky(),
    hg.LU(),
]


@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=repr)
def test_converged_is_the_residual_test_on_the_result(getkey, solver):
    a = spd(getkey(), 8, 100.0)  # eigenvalues 1 .. 100
    b = jax.random.normal(getkey(), (8,))
    x, info = solver(lambda v: a @ v, b)
    # The residual is recomputed here from the returned x, independently of the solver.
    residual = jnp.linalg.norm(a @ x - b) / jnp.linalg.norm(b)
    np.testing.assert_allclose(info.residual, residual, rtol=1e-6)
    tol = hg.linalg.default_tol(b) if solver.tol is None else solver.tol
    assert bool(info.converged) == bool(residual <= tol)


def test_divergent_neumann_series_is_not_converged(getkey):
    a = spd(getkey(), 8, 100.0)
    b = jax.random.normal(getkey(), (8,))
    _, info = hg.Neumann(steps=20, eta=0.03)(lambda v: a @ v, b)
    assert float(info.residual) > 1.0 and not bool(info.converged)


def test_neumann_on_the_tour_problem():
    problem, run, hparams, params0, train, val = tour_problem()
    exact, info = hg.hypergradient(
        problem, run, hg.Implicit(hg.Cholesky()), hparams, params0, train, val
    )
    assert int(info.status) == hg.Status.OK
    # The reported case: 10 terms at step 1.0 gave 52.6 (true 0.185) with converged=True.
    g, info = hg.hypergradient(
        problem, run, hg.Implicit(hg.Neumann(10, 1.0)), hparams, params0, train, val
    )
    assert abs(float(g["log_l2"])) > 10 * abs(float(exact["log_l2"]))
    assert int(info.status) == hg.Status.SOLVE_NOT_CONVERGED and float(info.solve.residual) > 1
    # The default step comes from power iterations and converges on the same problem.
    neumann = hg.Implicit(hg.Neumann())
    g, info = hg.hypergradient(problem, run, neumann, hparams, params0, train, val)
    assert int(info.status) == hg.Status.OK
    np.testing.assert_allclose(g["log_l2"], exact["log_l2"], rtol=1e-8)


def test_bfloat16_solve_is_judged_in_bfloat16(getkey):
    a = spd(getkey(), 16, 10.0)
    b = jax.random.normal(getkey(), (16,))
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    x, info = hg.CG(tol=1e-10)(lambda v: a16 @ v, b16)
    assert x.dtype == jnp.bfloat16
    # A bfloat16 solution cannot meet 1e-10: reported, not claimed.
    assert not bool(info.converged) and float(info.residual) > 1e-4
    # The residual of the bf16 result under the operator in its own precision (bf16 A x),
    # with the norms in float32.
    r = (a16 @ x).astype(jnp.float32) - b16.astype(jnp.float32)
    residual = jnp.linalg.norm(r) / jnp.linalg.norm(b16.astype(jnp.float32))
    np.testing.assert_allclose(info.residual, residual, rtol=1e-5)
    # The default tolerance for 16-bit results is 1e-2: met, and the solution is as good as
    # bfloat16 can hold (relative error a few units of its 2^-8 rounding).
    x, info = hg.CG()(lambda v: a16 @ v, b16)
    assert bool(info.converged)
    exact = jnp.linalg.solve(a16.astype(jnp.float64), b16.astype(jnp.float64))
    assert float(jnp.linalg.norm(x - exact) / jnp.linalg.norm(exact)) < 0.05


@pytest.mark.parametrize(
    "solver,message",
    [
        (hg.CG(maxiter=0), "CG.maxiter: expected a positive int, got 0"),
        (hg.CG(maxiter=-3), "CG.maxiter: expected a positive int, got -3"),
        (hg.CG(maxiter=2.5), "CG.maxiter: expected a positive int, got 2.5"),
        (hg.CG(tol=-1.0), "CG.tol: expected None or a float >= 0, got -1.0"),
        (hg.CG(ridge=-0.1), "CG.ridge: expected a float >= 0, got -0.1"),
        (hg.Neumann(steps=0), "Neumann.steps: expected a positive int, got 0"),
        (hg.Neumann(eta=0.0), r"Neumann.eta: expected None \(automatic\) or a float > 0"),
        (hg.Neumann(power_iterations=0), "Neumann.power_iterations: expected a positive int"),
        (hg.Cholesky(tol=-1e-3), "Cholesky.tol: expected None or a float >= 0"),
    ],
)
def test_bad_solver_options_are_one_clear_error(solver, message):
    with pytest.raises(ValueError, match=message):
        solver(lambda v: 2.0 * v, jnp.ones(3))
    with pytest.raises(ValueError, match=message):  # through the estimator too
        problem, run, hparams, params0, train, val = tour_problem()
        hg.hypergradient(problem, run, hg.Implicit(solver), hparams, params0, train, val)
