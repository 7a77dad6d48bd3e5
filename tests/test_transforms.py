"""Transform contracts (jit, vmap, grad, jvp, hessian) and the traps of other libraries."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.flatten_util import ravel_pytree
from problems import MLP_PROBLEM, logistic_data, mlp_params

import hypergrad_jax as hg


def args(tp):
    return tp.problem, tp.run


def test_jit_traces_once_across_hyperparameter_values(getkey):
    tp = hg.testing.ridge_regression(getkey())

    @jax.jit
    @chex.assert_max_traces(n=1)  # a new hyperparameter value never retraces
    def f(h):
        return hg.hypergradient(
            *args(tp), hg.Implicit(), h, tp.params0, tp.inner_data, tp.outer_data
        )[0]

    values = [f(jnp.asarray(v)) for v in (-1.2, -1.0, -0.9)]
    for v, g in zip((-1.2, -1.0, -0.9), values):
        np.testing.assert_allclose(g, tp.exact_hypergradient(jnp.asarray(v)), rtol=1e-8)


@pytest.mark.parametrize("estimator", [hg.Unrolled(), hg.Implicit(), hg.Forward()])
def test_vmap_equals_python_loop_and_grad_of_vmap(getkey, estimator):
    tp = hg.testing.quadratic_problem(getkey(), dim=6, num_hparams=2, mu=1.0, L=5.0)
    batch = jax.random.normal(getkey(), (3, 2))

    def hypergrad(h):
        return hg.hypergradient(*args(tp), estimator, h, tp.params0, tp.inner_data, tp.outer_data)[
            0
        ]

    batched = jax.vmap(hypergrad)(batch)
    looped = jnp.stack([hypergrad(h) for h in batch])
    np.testing.assert_allclose(batched, looped, rtol=1e-12, atol=1e-14)

    def objective(h):
        return tp.problem.outer_loss(
            hg.solve(*args(tp), estimator, h, tp.params0, tp.inner_data), h, tp.outer_data
        )

    # grad of vmap and vmap of grad agree with the exact per-row hypergradient.
    grad_of_vmap = jax.grad(lambda hs: jnp.sum(jax.vmap(objective)(hs)))(batch)
    exact = jax.vmap(tp.exact_hypergradient)(batch)
    np.testing.assert_allclose(grad_of_vmap, exact, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(jax.vmap(jax.grad(objective))(batch), exact, rtol=1e-9, atol=1e-12)


def test_hessian_through_implicit_matches_finite_differences(getkey):
    tp = hg.testing.quadratic_problem(getkey(), dim=8, num_hparams=3, mu=1.0, L=20.0)

    def objective(h):
        return tp.problem.outer_loss(
            hg.solve(*args(tp), hg.Implicit(), h, tp.params0, tp.inner_data), h, tp.outer_data
        )

    def hypergrad(h):
        return hg.hypergradient(
            *args(tp), hg.Implicit(), h, tp.params0, tp.inner_data, tp.outer_data
        )[0]

    # Central differences of the (analytic) hypergradient: O(h²) truncation with h = 1e-5
    # and rounding ~1e-16 / 1e-5: 1e-7 relative is loose enough for both.
    h = 1e-5
    eye = jnp.eye(3)
    fd = jnp.stack(
        [(hypergrad(tp.hparams + h * e) - hypergrad(tp.hparams - h * e)) / (2 * h) for e in eye]
    )
    exact = jax.hessian(tp.objective)(tp.hparams)
    np.testing.assert_allclose(fd, exact, rtol=1e-7, atol=1e-9)
    for hess in (
        jax.hessian(objective)(tp.hparams),
        jax.jacfwd(hypergrad)(tp.hparams),
        jax.jacrev(hypergrad)(tp.hparams),
    ):
        np.testing.assert_allclose(hess, fd, rtol=1e-7, atol=1e-9)


def test_jvp_through_implicit_passes_dot_product_test(getkey):
    # <J u, w> = <u, Jᵀ w> for the solution map's JVP (forward) and VJP (reverse).
    tp = hg.testing.quadratic_problem(getkey(), dim=7, num_hparams=3)

    def solution(h):
        return hg.solve(*args(tp), hg.Implicit(), h, tp.params0, tp.inner_data)

    u = jax.random.normal(getkey(), (3,))
    w = jax.random.normal(getkey(), (7,))
    _, ju = jax.jvp(solution, (tp.hparams,), (u,))
    _, vjp = jax.vjp(solution, tp.hparams)
    np.testing.assert_allclose(jnp.vdot(ju, w), jnp.vdot(u, vjp(w)[0]), rtol=1e-12)
    np.testing.assert_allclose(ju, jax.jacobian(tp.solution)(tp.hparams) @ u, rtol=1e-10)


def test_closed_over_arrays_are_differentiated(getkey):
    # jaxopt-style custom_vjp rules silently give zero for arrays the loss closes over.
    tp = hg.testing.quadratic_problem(getkey(), dim=5, num_hparams=2, mu=1.0, L=4.0)
    shift = jax.random.normal(getkey(), (5,))

    def total(s, estimator):
        def inner(p, h, b):
            return tp.problem.inner_loss(p, h, b) + p @ s  # closes over s

        problem = hg.BilevelProblem(inner, tp.problem.outer_loss)
        p = hg.solve(problem, tp.run, estimator, tp.hparams, tp.params0, tp.inner_data)
        return problem.outer_loss(p, tp.hparams, tp.outer_data)

    g_implicit = jax.grad(total)(shift, hg.Implicit())
    g_unrolled = jax.grad(total)(shift, hg.Unrolled())
    # θ*(s) = θ*(0) − A⁻¹ s, so d f / d s = −A⁻¹ ∂θ f.
    theta = tp.solution(tp.hparams) - jnp.linalg.solve(tp.inner_data["A"], shift)
    f_theta = tp.outer_data["P"].T @ (tp.outer_data["P"] @ theta - tp.outer_data["t"])
    exact = -jnp.linalg.solve(tp.inner_data["A"], f_theta)
    assert float(jnp.max(jnp.abs(g_implicit))) > 0
    np.testing.assert_allclose(g_implicit, exact, rtol=1e-9)
    np.testing.assert_allclose(g_unrolled, exact, rtol=1e-9)
    # forward mode through the closure too
    np.testing.assert_allclose(jax.jacfwd(total)(shift, hg.Implicit()), exact, rtol=1e-9)


def test_scalar_and_python_float_hyperparameters(getkey):
    tp = hg.testing.ridge_regression(getkey())
    exact = tp.exact_hypergradient(tp.hparams)
    for h in (tp.hparams, float(tp.hparams)):
        for est in (hg.Implicit(), hg.Unrolled(), hg.Forward()):
            g, info = hg.hypergradient(*args(tp), est, h, tp.params0, tp.inner_data, tp.outer_data)
            assert jnp.shape(g) == ()
            np.testing.assert_allclose(g, exact, rtol=1e-8)


def _adam_problem(getkey):
    data = logistic_data(getkey(), n=16)
    # "unused" only enters the L2 penalty: its gradient e^λ·u is exactly zero at u = 0, and
    # Adam's second moment stays 0 there, where d sqrt(v) / dv is infinite.
    params0 = {**mlp_params(getkey()), "unused": jnp.zeros(3)}
    problem = hg.BilevelProblem(
        MLP_PROBLEM.inner_loss,
        lambda p, h, b: MLP_PROBLEM.outer_loss(p, h, b) + jnp.sum(p["unused"]),
    )
    hparams = {"optimizer": {"lr": jnp.asarray(0.05)}, "log_l2": jnp.asarray(-2.0)}
    return problem, hparams, params0, data


def test_adam_without_eps_root_is_reported_not_silent(getkey):
    problem, hparams, params0, data = _adam_problem(getkey)
    run = hg.InnerRun(hg.optim.adam(eps_root=0.0), 5)
    g, info = hg.hypergradient(problem, run, hg.Unrolled(), hparams, params0, data, data)
    assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
    assert int(info.status) == hg.Status.NONFINITE
    with pytest.raises(hg.HypergradientError, match="NONFINITE"):
        hg.raise_if_failed(info)
    with pytest.raises(hg.HypergradientError, match="NONFINITE"):  # the exact type
        hg.hypergradient(problem, run, hg.Unrolled(), hparams, params0, data, data, throw=True)

    # Under an outer jit the status is traced: a checkify check, functionalized by the user.
    def traced(h):
        return hg.hypergradient(problem, run, hg.Unrolled(), h, params0, data, data, throw=True)

    err, _ = checkify.checkify(jax.jit(traced))(hparams)
    with pytest.raises(checkify.JaxRuntimeError, match="hypergradient failed: status 1"):
        err.throw()
    # A batched status (vmap) fails if any member failed, naming how many.
    _, infos = jax.vmap(
        lambda h: hg.hypergradient(problem, run, hg.Unrolled(), h, params0, data, data)
    )(jax.tree.map(lambda x: jnp.stack([x, x]), hparams))
    with pytest.raises(hg.HypergradientError, match=r"NONFINITE \(2 of 2\)"):
        hg.raise_if_failed(infos)
    with pytest.raises(TypeError, match="raise_if_failed: info.status is traced"):
        jax.jit(
            lambda h: hg.raise_if_failed(
                hg.hypergradient(problem, run, hg.Unrolled(), h, params0, data, data)[1]
            )
        )(hparams)

    run = hg.InnerRun(hg.optim.adam(), 5)  # eps_root = 1e-12 by default
    g, info = hg.hypergradient(
        problem, run, hg.Unrolled(), hparams, params0, data, data, throw=True
    )
    assert int(info.status) == hg.Status.OK
    chex.assert_tree_all_finite(g)


def test_bf16_params_with_float32_hyperparameters(getkey):
    data = logistic_data(getkey(), dtype=jnp.float32)
    params32 = mlp_params(getkey(), dtype=jnp.float32)
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params32)
    hparams = {
        "optimizer": {"lr": jnp.float32(0.3), "momentum": jnp.float32(0.5)},
        "log_l2": jnp.float32(-3.0),
    }
    run = hg.InnerRun(hg.optim.sgd_momentum(), 10)
    g32, _ = hg.hypergradient(MLP_PROBLEM, run, hg.Unrolled(), hparams, params32, data, data)
    for est in (hg.Unrolled(), hg.Forward()):
        data16 = (data[0].astype(jnp.bfloat16), data[1])
        g16, info = hg.hypergradient(MLP_PROBLEM, run, est, hparams, params16, data16, data16)
        assert int(info.status) == hg.Status.OK
        for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
            assert a.dtype == jnp.float32  # hypergradients in the hyperparameters' dtype
            # bf16 has 8 bits of mantissa (~4e-3 relative per op, compounded over 10 steps).
            np.testing.assert_allclose(a, b, rtol=0.1, atol=0.02)


def test_unhashable_estimator_options_and_cache_hits(getkey):
    # Estimators are static arguments of the internal jit: equal values share a compiled
    # function, unhashable ones (an array-valued option) fall back to identity.
    from hypergrad_jax.api import _hypergradient

    tp = hg.testing.ridge_regression(getkey())
    exact = tp.exact_hypergradient(tp.hparams)
    before = _hypergradient._cache_size()
    for est in (hg.Implicit(hg.CG(tol=jnp.asarray(1e-10))), hg.Implicit(), hg.Implicit()):
        g, _ = hg.hypergradient(
            *args(tp), est, tp.hparams, tp.params0, tp.inner_data, tp.outer_data
        )
        np.testing.assert_allclose(g, exact, rtol=1e-8)
    assert _hypergradient._cache_size() == before + 2


# ------------------------------------------------------------------ integer leaves in the batch


def _softmax_regression(getkey):
    """Multinomial logistic regression with a learned log-L2 penalty; the batch carries
    integer labels and integer row indices (both used by the losses). Strongly convex:
    200 GD steps at lr 0.5 contract the error by (1 − 0.5 e^{−1})^200 ≈ 1e-17, so the
    run's end point is the inner minimiser and the implicit estimators are exact too."""
    n, d, c = 24, 4, 3
    x = jax.random.normal(getkey(), (n, d))
    y = jnp.argmax(x @ jax.random.normal(getkey(), (d, c)), axis=1).astype(jnp.int32)
    batch = {"x": x, "y": y, "row": jnp.arange(n, dtype=jnp.int32)}
    weight = 1.0 + 0.5 * jnp.sin(jnp.arange(n))

    def ce(w, b):
        logp = jax.nn.log_softmax(b["x"] @ w)
        nll = -jnp.take_along_axis(logp, b["y"][:, None], axis=1)[:, 0]
        return jnp.mean(weight[b["row"]] * nll)

    problem = hg.BilevelProblem(
        lambda w, h, b: ce(w, b) + 0.5 * jnp.exp(h["log_l2"]) * jnp.sum(w**2),
        lambda w, h, b: ce(w, b),
    )
    hparams = {"optimizer": {"lr": jnp.asarray(0.5)}, "log_l2": jnp.asarray(-1.0)}
    return problem, hg.InnerRun(hg.optim.sgd(), 200), hparams, jnp.zeros((d, c)), batch


INTEGER_LEAF_ESTIMATORS = [
    hg.Unrolled(),
    hg.Unrolled(remat=True),
    hg.Unrolled(truncate=20),
    hg.Forward(),
    hg.Greedy(),
    hg.Implicit(hg.CG()),
    hg.Implicit(hg.Neumann(steps=300)),
    hg.Implicit(hg.Cholesky()),
    hg.Implicit(hg.LU()),
]


@pytest.mark.parametrize("estimator", INTEGER_LEAF_ESTIMATORS, ids=repr)
def test_grad_jvp_hessian_through_solve_with_integer_leaves(getkey, estimator):
    problem, run, hparams, params0, batch = _softmax_regression(getkey)

    def objective(h):
        return problem.outer_loss(hg.solve(problem, run, estimator, h, params0, batch), h, batch)

    def hypergrad(h):
        return hg.hypergradient(problem, run, estimator, h, params0, batch, batch)[0]

    # grad through solve against hg.hypergradient (a separate code path for Implicit: the
    # explicit adjoint rather than the transposed JVP rule). Same solves to rounding.
    ref = hypergrad(hparams)
    chex.assert_trees_all_close(jax.grad(objective)(hparams), ref, rtol=1e-8, atol=1e-12)
    # jvp: <∇F, t> for a random tangent.
    t = jax.tree.map(lambda x: jax.random.normal(getkey(), x.shape), hparams)
    _, jvp = jax.jvp(objective, (hparams,), (t,))
    np.testing.assert_allclose(jvp, hg.linalg.tree_vdot(ref, t), rtol=1e-8)
    # hessian (in flat coordinates: a dense matrix) against central differences of
    # hg.hypergradient: O(h²) truncation with h = 1e-5 and rounding 1e-16 / 1e-5, so 1e-6
    # relative (atol 1e-8) covers both.
    flat, unravel = ravel_pytree(hparams)
    hess = jax.hessian(lambda f: objective(unravel(f)))(flat)
    flat_grad = lambda f: ravel_pytree(hypergrad(unravel(f)))[0]  # noqa: E731
    if getattr(estimator, "truncate", None) is not None:
        # A truncated estimate is not the derivative of F, and its own derivative holds the
        # untruncated prefix fixed: compare with forward-over-reverse of hg.hypergradient.
        np.testing.assert_allclose(hess, jax.jacfwd(flat_grad)(flat), rtol=1e-8, atol=1e-12)
        return
    eps = 1e-5
    fd = jnp.stack(
        [(flat_grad(flat + eps * e) - flat_grad(flat - eps * e)) / (2 * eps) for e in jnp.eye(2)]
    )
    np.testing.assert_allclose(hess, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("estimator", [hg.Unrolled(), hg.Implicit(hg.CG())], ids=repr)
def test_integer_leaves_in_a_sampler_through_solve(getkey, estimator):
    # A hg.data.Sampler is a pytree of its data (integer labels and indices included),
    # traced into the rule rather than closed over.
    problem, run, hparams, params0, batch = _softmax_regression(getkey)
    sampler = hg.data.minibatch_sampler(batch, 8)
    key = getkey()

    def objective(h):
        theta = hg.solve(problem, run, estimator, h, params0, sampler, key=key)
        return problem.outer_loss(theta, h, batch)

    ref, _ = hg.hypergradient(problem, run, estimator, hparams, params0, sampler, batch, key=key)
    chex.assert_trees_all_close(jax.grad(objective)(hparams), ref, rtol=1e-8, atol=1e-12)
    t = jax.tree.map(lambda x: jax.random.normal(getkey(), x.shape), hparams)
    _, jvp = jax.jvp(objective, (hparams,), (t,))
    np.testing.assert_allclose(jvp, hg.linalg.tree_vdot(ref, t), rtol=1e-8)
