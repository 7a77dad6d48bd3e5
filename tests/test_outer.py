"""The outer step (for estimators and the stateful methods alike) and the sign-based
adaptive outer optimizer."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergrad_jax as hg


def test_sign_adaptive_halves_on_flips():
    opt = hg.outer.sign_adaptive({"a": 0.1, "b": 3e-4})
    params = {"a": jnp.asarray(1.0), "b": jnp.zeros(2)}
    state = opt.init(params)
    grads = [(1.0, [1.0, -1.0]), (2.0, [-1.0, -1.0]), (-1.0, [-3.0, 0.5]), (-5.0, [2.0, 2.0])]
    moves = []
    for a, b in grads:
        upd, state = opt.update({"a": jnp.asarray(a), "b": jnp.asarray(b)}, state)
        moves.append((float(upd["a"]), np.asarray(upd["b"]).tolist()))
    # a: signs + + - -  -> steps 0.1, 0.1, 0.05, 0.05
    assert [m[0] for m in moves] == [-0.1, -0.1, 0.05, 0.05]
    # b[0]: + - - +  -> 3e-4, 1.5e-4, 1.5e-4, 7.5e-5 ; b[1]: - - + +  -> 3e-4, 3e-4, 1.5e-4, 1.5e-4
    np.testing.assert_allclose(
        [m[1] for m in moves],
        [[-3e-4, 3e-4], [1.5e-4, 3e-4], [1.5e-4, -1.5e-4], [-7.5e-5, -1.5e-4]],
        rtol=1e-12,
    )


def test_sign_adaptive_stopping_rule():
    opt = hg.outer.sign_adaptive(0.1)
    h = {"lr": jnp.asarray(1.0), "wd": jnp.asarray(0.0)}
    state = opt.init(h)
    assert not bool(hg.outer.sign_adaptive_converged(state, h))  # 0.1/1 = 10% and wd = 0
    h = {"lr": jnp.asarray(1.0), "wd": jnp.asarray(3.0)}
    assert not bool(hg.outer.sign_adaptive_converged(state, h))
    state = state._replace(step_size={"lr": jnp.asarray(0.04), "wd": jnp.asarray(0.1)})
    assert bool(hg.outer.sign_adaptive_converged(state, h))  # 4% and 3.3%


def test_outer_loop_finds_the_best_ridge(getkey):
    # Ridge regression's validation loss in the log-ridge λ is smooth: Adam on λ converges
    # to a stationary point, where the exact hypergradient vanishes.
    tp = hg.testing.ridge_regression(getkey(), num_steps=400)
    opt = optax.adam(0.1)
    state = hg.outer.init(opt, tp.hparams, tp.params0, getkey())
    step = jax.jit(
        lambda s: hg.outer.step(
            tp.problem, tp.run, hg.Implicit(), opt, s, tp.inner_data, tp.outer_data
        )
    )
    losses = []
    for _ in range(60):
        state, metrics = step(state)
        losses.append(float(metrics.outer_loss))
        assert int(metrics.status) == hg.Status.OK
    assert losses[-1] < losses[0]
    assert abs(float(tp.exact_hypergradient(state.hparams))) < 0.05 * abs(
        float(tp.exact_hypergradient(tp.hparams))
    )
    assert int(state.step) == 60
    # the inner run was warm-started from the previous end point: the residual is tiny
    assert float(metrics.inner_residual) < 1e-8


def test_outer_step_reinit_and_callable_outer_data(getkey):
    tp = hg.testing.quadratic_problem(getkey(), dim=4, num_hparams=2)
    opt = hg.outer.sign_adaptive(0.1)
    seen = []

    def reinit(key):
        seen.append(key)
        return jax.random.normal(key, (4,))

    state = hg.outer.init(opt, tp.hparams, tp.params0, getkey())
    state, metrics = hg.outer.step(
        tp.problem,
        tp.run,
        hg.Unrolled(),
        opt,
        state,
        tp.inner_data,
        lambda key: tp.outer_data,
        reinit=reinit,
    )
    assert len(seen) == 1 and int(state.step) == 1
    g = tp.exact_hypergradient(tp.hparams)  # the run converges: sign moves against it
    np.testing.assert_allclose(state.hparams, tp.hparams - 0.1 * jnp.sign(g), rtol=1e-12)


def test_nonfinite_hypergradient_keeps_hyperparameters(getkey):
    tp = hg.testing.quadratic_problem(getkey(), dim=4, num_hparams=2)
    bad = tp.problem._replace(outer_loss=lambda p, h, b: jnp.sum(jnp.sqrt(h - 100.0)))
    opt = optax.sgd(0.1)
    state = hg.outer.init(opt, tp.hparams, tp.params0, getkey())
    new, metrics = hg.outer.step(
        bad, tp.run, hg.Unrolled(), opt, state, tp.inner_data, tp.outer_data
    )
    assert int(metrics.status) == hg.Status.NONFINITE
    np.testing.assert_array_equal(new.hparams, state.hparams)
    assert int(new.step) == 1


def test_unconverged_solve_is_reported_and_still_used(getkey):
    # skip_nonfinite skips NaN/inf only: a solve stopped at maxiter gives a finite (inexact)
    # hypergradient, reported as SOLVE_NOT_CONVERGED, and the step is taken.
    tp = hg.testing.quadratic_problem(getkey(), dim=8, num_hparams=2, mu=1.0, L=50.0)
    opt = optax.sgd(0.1)
    state = hg.outer.init(opt, tp.hparams, tp.params0, getkey())
    estimator = hg.Implicit(hg.CG(maxiter=1))
    new, metrics = hg.outer.step(
        tp.problem, tp.run, estimator, opt, state, tp.inner_data, tp.outer_data
    )
    assert int(metrics.status) == hg.Status.SOLVE_NOT_CONVERGED
    g, _ = hg.hypergradient(
        tp.problem, tp.run, estimator, tp.hparams, tp.params0, tp.inner_data, tp.outer_data
    )
    np.testing.assert_allclose(new.hparams, tp.hparams - 0.1 * g, rtol=1e-12)


def test_outer_state_is_one_pytree(getkey):
    tp = hg.testing.quadratic_problem(getkey(), dim=4, num_hparams=2)
    state = hg.outer.init(optax.adam(0.1), tp.hparams, tp.params0, getkey())
    leaves = jax.tree.leaves(state)
    rebuilt = jax.tree.unflatten(jax.tree.structure(state), leaves)
    assert isinstance(rebuilt, hg.outer.OuterState)


# ------------------------------------------------------------ one loop for the stateful methods


def _sgd(num_steps, lr=0.1):
    return hg.InnerRun(hg.optim.sgd(), num_steps, lambda h: {"lr": lr})


@pytest.mark.parametrize(
    "method,run",
    [
        (hg.stochastic.NHGD(), _sgd(5)),
        (hg.stochastic.StocBiO(), _sgd(5)),
        (hg.stochastic.SOBA(), _sgd(1)),
        (hg.stochastic.SolveAfter(hg.CG(maxiter=5)), _sgd(5)),
    ],
    ids=["NHGD", "StocBiO", "SOBA", "SolveAfter"],
)
def test_stateful_methods_run_through_the_one_outer_loop(getkey, method, run):
    # hg.outer.step equals the method's own step followed by the optax update, by hand
    # (same key stream: one split per outer step). Jitted against eager: XLA fuses the
    # arithmetic differently, so equal to rounding (1e-12 relative in float64), not bitwise.
    tp = hg.testing.quadratic_problem(getkey(), dim=6, num_hparams=2)
    opt, key = optax.adam(0.05), getkey()
    state = hg.outer.init(opt, tp.hparams, tp.params0, key, method)
    step = jax.jit(
        lambda s: hg.outer.step(tp.problem, run, method, opt, s, tp.inner_data, tp.outer_data)
    )
    view, hparams, opt_state = method.init(tp.params0, tp.hparams), tp.hparams, opt.init(tp.hparams)
    for _ in range(3):
        state, metrics = step(state)
        key, sub = jax.random.split(key)
        view, grad, stats = method.step(
            tp.problem, run, view, hparams, tp.inner_data, tp.outer_data, sub
        )
        updates, opt_state = opt.update(grad, opt_state, hparams)
        hparams = optax.apply_updates(hparams, updates)
        chex.assert_trees_all_close(metrics.grad, grad, rtol=1e-12, atol=1e-14)
        chex.assert_trees_all_equal(metrics.oracles, stats.oracles)
    chex.assert_trees_all_close(state.hparams, hparams, rtol=1e-12, atol=1e-14)
    chex.assert_trees_all_close(
        (state.params, state.adjoint, state.method), view[:3], rtol=1e-12, atol=1e-14
    )
    assert int(state.step) == 3 and int(metrics.status) == hg.Status.OK
    assert float(metrics.inner_residual) > 0 and float(metrics.grad_norm) > 0


def test_nonfinite_stateful_step_is_a_status_and_keeps_hyperparameters(getkey):
    tp = hg.testing.quadratic_problem(getkey(), dim=4, num_hparams=2)
    bad = tp.problem._replace(outer_loss=lambda p, h, b: jnp.sum(jnp.sqrt(h - 100.0)))
    method, opt = hg.stochastic.NHGD(), optax.sgd(0.1)
    state = hg.outer.init(opt, tp.hparams, tp.params0, getkey(), method)
    new, metrics = hg.outer.step(bad, _sgd(3), method, opt, state, tp.inner_data, tp.outer_data)
    assert int(metrics.status) == hg.Status.NONFINITE
    np.testing.assert_array_equal(new.hparams, state.hparams)


def test_stateful_methods_name_what_they_do_not_take(getkey):
    tp = hg.testing.quadratic_problem(getkey(), dim=4, num_hparams=2)
    method, opt = hg.stochastic.SOBA(), optax.sgd(0.1)
    state = hg.outer.init(opt, tp.hparams, tp.params0, getkey(), method)
    args = (method, opt, state, tp.inner_data, tp.outer_data)
    with pytest.raises(TypeError, match="run: SOBA takes its inner loop from an hg.InnerRun"):
        hg.outer.step(tp.problem, None, *args)
    with pytest.raises(ValueError, match="reinit: SOBA warm-starts"):
        hg.outer.step(tp.problem, _sgd(1), *args, reinit=lambda k: tp.params0)
    _, metrics = hg.outer.step(tp.problem, tp.run, hg.Unrolled(), *args[1:])
    assert metrics.oracles is None  # estimators have no minibatch oracle counts
