"""Preconditioned CG (a Hutchinson diagonal reused across solves) against dense solves, and
its warm start through the implicit estimator and the outer loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import tour_problem

import hypergrad_jax as hg
from hypergrad_jax.linalg import Hutchinson, Warm


def scaled_spd(key, n, spread):
    """``XᵀX / m + diag(d)`` with ``d`` log-uniform over ``spread`` decades: the diagonal
    carries the conditioning, as per-feature penalties do."""
    kx, kd = jax.random.split(key)
    x = jax.random.normal(kx, (2 * n, n))
    d = jnp.exp(jax.random.uniform(kd, (n,), minval=0.0, maxval=spread * jnp.log(10.0)))
    return x.T @ x / (2 * n) + jnp.diag(d)


def as_tree(x):
    return {"a": x[:5], "b": x[5:].reshape(-1, 5)}


def from_tree(t):
    return jnp.concatenate([t["a"], t["b"].ravel()])


def test_preconditioned_cg_matches_the_dense_solve_in_fewer_matvecs(getkey):
    a = scaled_spd(getkey(), 60, 4)  # cond ~1e4 from the diagonal
    b = jax.random.normal(getkey(), (60,))
    matvec = lambda v: as_tree(a @ from_tree(v))
    exact = jnp.linalg.solve(a, b)
    plain_x, plain = hg.CG(maxiter=500, tol=1e-10)(matvec, as_tree(b))
    # prior=0: the estimate is used in full at once (by default a young estimate is shrunk)
    cg = hg.CG(maxiter=500, tol=1e-10, precond=Hutchinson(probes=8, prior=0.0))
    x, info = cg(matvec, as_tree(b))
    _, shrunk = cg._replace(precond=Hutchinson(probes=8))(matvec, as_tree(b))
    assert int(info.iterations) < int(shrunk.iterations) < int(plain.iterations)
    # float64, tol 1e-10 on the relative residual, cond ~1e4: error <= cond * tol = 1e-6,
    # and in practice far below; the same bound for both
    for sol in (plain_x, x):
        np.testing.assert_allclose(from_tree(sol), exact, rtol=1e-6, atol=1e-9)
    assert bool(info.converged) and bool(plain.converged)
    # the probes are counted: 8 matvecs of estimation + CG's own + the final residual check
    assert int(info.iterations) < int(plain.iterations) / 2, (info.iterations, plain.iterations)
    assert isinstance(info.warm, Warm) and plain.warm is None
    jax.tree.map(np.testing.assert_array_equal, info.warm.x, x)


def test_the_diagonal_estimate_sharpens_across_solves(getkey):
    a = scaled_spd(getkey(), 40, 3)
    b = jax.random.normal(getkey(), (40,))
    cg = hg.CG(maxiter=500, tol=1e-10, precond=Hutchinson(probes=2, memory=0.9))
    solve = jax.jit(lambda warm: cg(lambda v: a @ v, b, warm)[1])
    warm, errors = hg.linalg.initial_warm(cg, b), []
    for _ in range(12):
        info = solve(warm)
        warm = info.warm._replace(x=jnp.zeros_like(b))  # reuse only the preconditioner
        d = warm.precond.total / warm.precond.count
        errors.append(float(jnp.max(jnp.abs(d - jnp.diag(a)) / jnp.diag(a))))
    # Hutchinson's estimate is unbiased; averaging more probes shrinks its error (2 probes
    # per solve, older ones kept at weight 0.9)
    assert errors[-1] < 0.5 * errors[0], errors
    assert int(warm.precond.solves) == 12
    # a fresh state would restart the estimate: the count grows only with the reuse
    np.testing.assert_allclose(warm.precond.count, 2 * (1 - 0.9**12) / (1 - 0.9), rtol=1e-6)


def test_a_warm_solution_needs_only_the_probes(getkey):
    a = scaled_spd(getkey(), 30, 2)
    b = jax.random.normal(getkey(), (30,))
    cg = hg.CG(maxiter=200, tol=1e-8, precond=Hutchinson(probes=3))
    _, info = cg(lambda v: a @ v, b)
    _, again = cg(lambda v: a @ v, b, info.warm)
    assert int(again.iterations) == 3 and bool(again.converged)
    # a solver without a preconditioner takes a Warm too (its x)
    _, plain = hg.CG(tol=1e-8)(lambda v: a @ v, b, info.warm)
    assert int(plain.iterations) == 0 and bool(plain.converged)


def test_implicit_with_a_preconditioner_matches_cholesky():
    problem, run, hparams, params0, train, val = tour_problem()
    exact, _ = hg.hypergradient(
        problem, run, hg.Implicit(hg.Cholesky()), hparams, params0, train, val
    )
    est = hg.Implicit(hg.CG(tol=1e-10, precond=Hutchinson()))
    g, info = hg.hypergradient(problem, run, est, hparams, params0, train, val)
    assert int(info.status) == hg.Status.OK
    assert isinstance(info.adjoint, Warm) and info.solve.warm is None
    # float64 solves to 1e-10 on a well-conditioned tour problem: 1e-8 relative
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-8), g, exact)
    # second order goes through the preconditioned solve too (custom_linear_solve)
    h_fn = lambda e: jax.grad(
        lambda h: hg.hypergradient(problem, run, e, h, params0, train, val)[0]["log_l2"]
    )(hparams)["log_l2"]
    np.testing.assert_allclose(h_fn(est), h_fn(hg.Implicit(hg.Cholesky())), rtol=1e-6)


def test_outer_loop_reuses_the_preconditioner_and_compiles_once(getkey):
    tp = hg.testing.ridge_regression(getkey(), num_steps=200)
    opt = optax.adam(0.1)
    key = getkey()

    def loop(est):
        state = hg.outer.init(opt, tp.hparams, tp.params0, key, method=est)
        step = jax.jit(
            lambda s: hg.outer.step(tp.problem, tp.run, est, opt, s, tp.inner_data, tp.outer_data)
        )
        grads = []
        for _ in range(4):
            state, metrics = step(state)
            assert int(metrics.status) == hg.Status.OK
            grads.append(metrics.grad)
        assert step._cache_size() == 1  # the state's structure never changed
        return state, jnp.stack(grads)

    state, grads = loop(hg.Implicit(hg.CG(tol=1e-10, precond=Hutchinson(probes=2))))
    assert isinstance(state.adjoint, Warm) and int(state.adjoint.precond.solves) == 4
    # the same loop with a dense solve: float64 CG to 1e-10 on a dim-8 system, 1e-8 relative
    _, dense = loop(hg.Implicit(hg.Cholesky()))
    np.testing.assert_allclose(grads, dense, rtol=1e-8)


@pytest.mark.parametrize(
    "precond,message",
    [
        (Hutchinson(probes=0), "Hutchinson.probes: expected a positive int, got 0"),
        (Hutchinson(memory=1.0), r"Hutchinson.memory: expected a float in \[0, 1\)"),
        (Hutchinson(floor=0.0), r"Hutchinson.floor: expected a float in \(0, 1\]"),
        (Hutchinson(prior=-1.0), "Hutchinson.prior: expected a float >= 0, got -1.0"),
        ("jacobi", "CG.precond: expected None or hg.linalg.Hutchinson"),
    ],
)
def test_bad_preconditioner_is_one_clear_error(precond, message):
    with pytest.raises((ValueError, TypeError), match=message):
        hg.CG(precond=precond)(lambda v: 2.0 * v, jnp.ones(3))
