"""Bad input gets one clear error naming the argument and what was expected."""

import chex
import jax
import jax.numpy as jnp
import pytest
from problems import MLP_PROBLEM, logistic_data, mlp_params

import hypergrad_jax as hg


@pytest.fixture
def setup(getkey):
    data = logistic_data(getkey(), n=8)
    hparams = {"optimizer": {"lr": jnp.asarray(0.1)}, "log_l2": jnp.asarray(-2.0)}
    return hg.InnerRun(hg.optim.sgd(), 3), hparams, mlp_params(getkey()), data


def call(run, hparams, params0, data, problem=MLP_PROBLEM, estimator=hg.Unrolled(), **kw):
    return hg.hypergradient(problem, run, estimator, hparams, params0, data, data, **kw)


def test_missing_optimizer_hyperparameters(setup):
    run, hparams, params0, data = setup
    with pytest.raises(ValueError, match=r"hparams\['optimizer'\]"):
        call(run, {"log_l2": hparams["log_l2"]}, params0, data)
    with pytest.raises(ValueError, match=r"'sgd'.*missing \['lr'\], unknown \['learning_rate'\]"):
        call(run, {**hparams, "optimizer": {"learning_rate": 0.1}}, params0, data)


def test_integer_hyperparameter(setup):
    run, hparams, params0, data = setup
    with pytest.raises(TypeError, match=r"hparams: leaf \['log_l2'\] has dtype int"):
        call(run, {**hparams, "log_l2": jnp.asarray(1)}, params0, data)
    # A Python int literal means the float: converted, not rejected.
    g, _ = call(run, {**hparams, "log_l2": -2}, params0, data)
    ref, _ = call(run, {**hparams, "log_l2": -2.0}, params0, data)
    chex.assert_trees_all_close(g, ref, rtol=0)


def test_per_parameter_hyperparameter_with_wrong_structure(setup):
    run, hparams, params0, data = setup
    bad = {"optimizer": {"lr": {"w1": 0.1, "w2": 0.1}}, "log_l2": hparams["log_l2"]}
    with pytest.raises(ValueError, match="'lr' must be a scalar.*structure of params"):
        call(run, bad, params0, data)
    good = {
        "optimizer": {"lr": jax.tree.map(lambda _: jnp.asarray(0.1), params0)},
        "log_l2": hparams["log_l2"],
    }
    g, info = call(run, good, params0, data)  # per-parameter learning rates are fine
    assert jax.tree.structure(g["optimizer"]["lr"]) == jax.tree.structure(params0)


def test_non_scalar_losses(setup):
    run, hparams, params0, data = setup
    vector = hg.BilevelProblem(lambda p, h, b: jnp.sum(p["w1"], axis=0), MLP_PROBLEM.outer_loss)
    with pytest.raises(ValueError, match=r"inner_loss must return a float scalar.*\[4\]"):
        call(run, hparams, params0, data, problem=vector)
    vector = hg.BilevelProblem(MLP_PROBLEM.inner_loss, lambda p, h, b: p["b1"])
    with pytest.raises(ValueError, match="outer_loss must return a float scalar"):
        call(run, hparams, params0, data, problem=vector)


def test_loss_failure_names_the_structures(setup):
    run, hparams, params0, data = setup
    with pytest.raises(KeyError, match=r"inner_loss\(params, hparams, batch\) failed on params"):
        call(run, hparams, {"w1": params0["w1"]}, data)


def test_sampler_errors(setup, getkey):
    run, hparams, params0, data = setup
    with pytest.raises(TypeError, match=r"inner_data: a sampler must be a jittable \(key, step\)"):
        call(run, hparams, params0, lambda key: data, key=getkey())
    with pytest.raises(TypeError, match="inner_data: the sampler must return a pytree of arrays"):
        call(run, hparams, params0, lambda key, step: None, key=getkey())
    with pytest.raises(ValueError, match="key: required when inner_data is a sampler"):
        call(run, hparams, params0, lambda key, step: data)


def test_bad_estimator_and_run(setup):
    run, hparams, params0, data = setup
    with pytest.raises(TypeError, match="estimator: expected an estimator value"):
        call(run, hparams, params0, data, estimator="implicit")
    with pytest.raises(ValueError, match="run.num_steps: expected a positive int, got 0"):
        call(run._replace(num_steps=0), hparams, params0, data)
    with pytest.raises(ValueError, match="truncate: expected a positive int or None, got 0"):
        call(run, hparams, params0, data, estimator=hg.Unrolled(truncate=0))
    with pytest.raises(TypeError, match="problem: expected a BilevelProblem"):
        hg.hypergradient(MLP_PROBLEM.inner_loss, run, hg.Unrolled(), hparams, params0, data, data)


def test_check_hypergradient_needs_float64():
    with pytest.raises(ValueError, match="hparams: check_hypergradient needs float64"):
        hg.testing.check_hypergradient(jnp.sum, jnp.ones(2, jnp.float32), jnp.ones(2))
    with pytest.raises(ValueError, match="grad: expected the structure of hparams"):
        hg.testing.check_hypergradient(jnp.sum, jnp.ones(2), jnp.ones(3))
