"""Estimators against exact values, finite differences and each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import MLP_PROBLEM, logistic_data, minibatch_sampler, mlp_params

import hypergrad_jax as hg


def rel_err(a, b):
    a, b = jnp.ravel(jnp.asarray(a)), jnp.ravel(jnp.asarray(b))
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def tree_rel_err(a, b):
    return rel_err(jax.flatten_util.ravel_pytree(a)[0], jax.flatten_util.ravel_pytree(b)[0])


def hypergrad(tp, estimator, **kw):
    return hg.hypergradient(
        tp.problem, tp.run, estimator, tp.hparams, tp.params0, tp.inner_data, tp.outer_data, **kw
    )


@pytest.fixture
def schedule_setup(getkey):
    """A minibatch MLP run with shared learning-rate, momentum and weight-decay schedules."""
    data = logistic_data(getkey(), n=40)
    hparams = {
        "optimizer": {
            "lr": hg.Shared(jnp.array([0.3, 0.2, 0.1, 0.05])),
            "momentum": hg.Shared(jnp.array([0.5, 0.9])),
            "weight_decay": hg.Shared(jnp.array([1e-3, 2e-3, 3e-3])),
        },
        "log_l2": jnp.asarray(-3.0),
    }
    run = hg.InnerRun(hg.optim.sgd_momentum(clip=3.0), num_steps=30)
    return run, hparams, mlp_params(getkey()), minibatch_sampler(data, 8), data, getkey()


def test_forward_equals_reverse_with_shared_schedules(schedule_setup):
    # Forward and reverse mode compute the same derivative of the same float64 run; they
    # differ only by summation order, so ~1e-13 is expected; the issue asks for 1e-10.
    run, hparams, params0, sampler, data, key = schedule_setup
    args = (MLP_PROBLEM, run)
    g_rev, info_rev = hg.hypergradient(
        *args, hg.Unrolled(), hparams, params0, sampler, data, key=key
    )
    g_fwd, info_fwd = hg.hypergradient(
        *args, hg.Forward(), hparams, params0, sampler, data, key=key
    )
    g_remat, _ = hg.hypergradient(
        *args, hg.Unrolled(remat=True), hparams, params0, sampler, data, key=key
    )
    assert int(info_rev.status) == int(info_fwd.status) == hg.Status.OK
    for leaf in jax.tree.leaves(g_rev):
        assert jnp.all(leaf != 0)  # every block of every schedule received a gradient
    assert tree_rel_err(g_fwd, g_rev) <= 1e-10
    assert tree_rel_err(g_remat, g_rev) <= 1e-12  # the same computation, recomputed
    np.testing.assert_allclose(info_fwd.outer_value, info_rev.outer_value, rtol=1e-14)


def test_unrolled_matches_finite_differences(schedule_setup):
    run, hparams, params0, sampler, data, key = schedule_setup

    def objective(h):
        p = hg.solve(MLP_PROBLEM, run, hg.Unrolled(), h, params0, sampler, key=key)
        return MLP_PROBLEM.outer_loss(p, h, data)

    g, _ = hg.hypergradient(
        MLP_PROBLEM, run, hg.Unrolled(), hparams, params0, sampler, data, key=key
    )
    # Central differences in float64 are accurate to ~1e-9 here (see check_hypergradient).
    assert hg.testing.check_hypergradient(objective, hparams, g, rtol=1e-6).ok


@pytest.mark.parametrize("cond", [1.0, 10.0, 100.0, 1000.0])
def test_implicit_cg_exact_on_quadratics(getkey, cond):
    # The run converges to 1e-14 (testing.quadratic_problem picks T) and CG to tol 1e-12,
    # so the IFT is exact up to cond * 1e-14 rounding: 1e-8 leaves a wide margin.
    tp = hg.testing.quadratic_problem(getkey(), dim=12, num_hparams=4, mu=1.0, L=cond)
    g, info = hypergrad(tp, hg.Implicit(hg.CG(maxiter=200, tol=1e-12)))
    assert rel_err(g, tp.exact_hypergradient(tp.hparams)) <= 1e-8
    assert int(info.status) == hg.Status.OK and bool(info.solve.converged)
    assert float(info.solve.residual) <= 1e-11
    assert int(info.solve.iterations) <= 12  # CG is exact in dim steps (+ rounding)
    assert info.adjoint.shape == tp.params0.shape


@pytest.mark.parametrize("solver", [hg.Cholesky(), hg.LU()])
def test_implicit_dense_exact(getkey, solver):
    tp = hg.testing.quadratic_problem(getkey(), mu=0.5, L=50.0)
    g, _ = hypergrad(tp, hg.Implicit(solver))
    assert rel_err(g, tp.exact_hypergradient(tp.hparams)) <= 1e-10


def test_implicit_neumann_converges_as_terms_grow(getkey):
    # Neumann with eta = 1/L contracts the error by (1 - mu/L) per term: for L/mu = 10,
    # 10, 100 and 400 terms leave errors ~0.35, 3e-5 and 5e-19 (then rounding).
    tp = hg.testing.quadratic_problem(getkey(), mu=1.0, L=10.0)
    exact = tp.exact_hypergradient(tp.hparams)
    errors = [
        rel_err(hypergrad(tp, hg.Implicit(hg.Neumann(steps=k, eta=0.1)))[0], exact)
        for k in (10, 100, 400)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] <= 1e-10


def test_unrolled_approaches_exact_as_horizon_grows(getkey):
    # Gradient descent with the optimal step on a quadratic with L/mu = 20 contracts by
    # 19/21 per step, and so does the error of the unrolled hypergradient (times T).
    base = hg.testing.quadratic_problem(getkey(), mu=1.0, L=20.0)
    exact = base.exact_hypergradient(base.hparams)
    errors = []
    for steps in (5, 20, 80, 400):
        tp = base._replace(run=base.run._replace(num_steps=steps))
        errors.append(rel_err(hypergrad(tp, hg.Unrolled())[0], exact))
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] <= 1e-10


@pytest.mark.parametrize("truncate", [1, 5, 25])
def test_truncated_bias_has_its_closed_form(getkey, truncate):
    # On a converged run of GD with step a on g = ½θᵀAθ + θᵀ(Bλ + c), differentiating the last
    # K steps gives dθ/dλ = −(I − (I − aA)^K) A⁻¹B instead of −A⁻¹B: the truncation bias.
    tp = hg.testing.quadratic_problem(getkey(), mu=1.0, L=10.0)
    a_mat, b_mat = tp.inner_data["A"], tp.inner_data["B"]
    lr = 2.0 / 11.0
    theta = tp.solution(tp.hparams)
    f_theta = tp.outer_data["P"].T @ (tp.outer_data["P"] @ theta - tp.outer_data["t"])
    decay = jnp.linalg.matrix_power(jnp.eye(a_mat.shape[0]) - lr * a_mat, truncate)
    jac = -(jnp.eye(a_mat.shape[0]) - decay) @ jnp.linalg.solve(a_mat, b_mat)
    expected = tp.outer_data["reg"] * tp.hparams + jac.T @ f_theta
    estimator = hg.Greedy() if truncate == 1 else hg.Unrolled(truncate=truncate)
    g, _ = hypergrad(tp, estimator)
    assert rel_err(g, expected) <= 1e-10
    # ... and the bias is real: far from the exact hypergradient for short truncations.
    if truncate < 25:
        assert rel_err(g, tp.exact_hypergradient(tp.hparams)) > 1e-3


def test_implicit_on_ridge_regression(getkey):
    tp = hg.testing.ridge_regression(getkey())
    g, info = hypergrad(tp, hg.Implicit())
    assert rel_err(g, tp.exact_hypergradient(tp.hparams)) <= 1e-8
    assert float(info.inner_residual) <= 1e-10
    g_unrolled, _ = hypergrad(tp, hg.Unrolled())
    assert rel_err(g_unrolled, tp.exact_hypergradient(tp.hparams)) <= 1e-8


def test_implicit_warm_start_saves_iterations(getkey):
    tp = hg.testing.quadratic_problem(getkey(), dim=30, mu=1.0, L=1000.0)
    cold_g, cold = hypergrad(tp, hg.Implicit(hg.CG(tol=1e-10)))
    warm_g, warm = hypergrad(tp, hg.Implicit(hg.CG(tol=1e-10)), warm_start=cold.adjoint)
    assert int(warm.solve.iterations) < int(cold.solve.iterations)
    assert rel_err(warm_g, cold_g) <= 1e-8


def test_cg_not_converging_is_a_status(getkey):
    tp = hg.testing.quadratic_problem(getkey(), dim=20, mu=1.0, L=1000.0)
    g, info = hypergrad(tp, hg.Implicit(hg.CG(maxiter=2)))
    assert int(info.status) == hg.Status.SOLVE_NOT_CONVERGED
    assert not bool(info.solve.converged) and int(info.solve.iterations) == 2


def test_learned_initialisation(getkey):
    # MAML-style: the inner initialisation is a hyperparameter.
    data = logistic_data(getkey())
    hparams = {
        "optimizer": {"lr": jnp.asarray(0.5)},
        "log_l2": jnp.asarray(-2.0),
        "init": mlp_params(getkey()),
    }
    run = hg.InnerRun(hg.optim.sgd(), 10)
    init = lambda h: h["init"]
    g, _ = hg.hypergradient(MLP_PROBLEM, run, hg.Unrolled(), hparams, init, data, data)
    assert float(jnp.max(jnp.abs(g["init"]["w1"]))) > 0

    def objective(h):
        return MLP_PROBLEM.outer_loss(
            hg.solve(MLP_PROBLEM, run, hg.Unrolled(), h, init, data), h, data
        )

    assert hg.testing.check_hypergradient(objective, hparams, g).ok


def test_adam_and_optax_inner_optimizers(getkey):
    data = logistic_data(getkey())
    params0 = mlp_params(getkey())
    hparams = {"optimizer": {"learning_rate": jnp.asarray(0.05)}, "log_l2": jnp.asarray(-2.0)}
    import optax

    for run in (
        hg.InnerRun(hg.optim.from_optax(optax.adam), 15),
        hg.InnerRun(
            hg.optim.adam(), 15, optimizer_hparams=lambda h: {"lr": h["optimizer"]["learning_rate"]}
        ),
    ):
        g, info = hg.hypergradient(MLP_PROBLEM, run, hg.Unrolled(), hparams, params0, data, data)
        g_fwd, _ = hg.hypergradient(MLP_PROBLEM, run, hg.Forward(), hparams, params0, data, data)
        assert int(info.status) == hg.Status.OK
        assert tree_rel_err(g_fwd, g) <= 1e-10

        def objective(h, run=run):
            return MLP_PROBLEM.outer_loss(
                hg.solve(MLP_PROBLEM, run, hg.Unrolled(), h, params0, data), h, data
            )

        assert hg.testing.check_hypergradient(objective, hparams, g).ok
