"""Fisher-inverse recursions (NHGD) against direct inversion; the information equality."""

import jax
import jax.numpy as jnp
import numpy as np

from hypergrad_jax import fisher


def samples(key, n, d):
    return jax.random.normal(key, (n, d)) * jnp.linspace(0.5, 2.0, d)[None, :]


def test_sherman_morrison_ema_and_mean_equal_direct_inversion(getkey):
    # Each recursion keeps A = F⁻¹ exactly in exact arithmetic; F stays well conditioned
    # (damping 0.5, 40 samples in 6 dimensions), so float64 rounding leaves ~1e-14.
    d, rho, beta = 6, 0.5, 0.9
    us = samples(getkey(), 40, d)
    ema, mean = fisher.inverse_init(d, rho), fisher.inverse_init(d, rho)
    f_ema = f_sum = rho * jnp.eye(d)
    for t, u in enumerate(us):
        ema = fisher.ema_update(ema, u, beta)
        mean = fisher.mean_update(mean, u)
        f_ema = beta * f_ema + (1 - beta) * jnp.outer(u, u)
        f_sum = f_sum + jnp.outer(u, u)
        for a, f in ((ema.inverse, f_ema), (mean.inverse, f_sum / (t + 2))):
            np.testing.assert_allclose(a, jnp.linalg.inv(f), rtol=1e-10, atol=1e-12)
    assert int(ema.count) == int(mean.count) == 40


def test_woodbury_batch_update_equals_direct_inversion(getkey):
    d, rho, beta, b = 7, 0.3, 0.8, 4
    state = fisher.inverse_init(d, rho)
    f = rho * jnp.eye(d)
    for _ in range(5):
        us = samples(getkey(), b, d)
        state = fisher.ema_update_batch(state, us, beta)
        f = beta * f + (1 - beta) / b * us.T @ us
        np.testing.assert_allclose(state.inverse, jnp.linalg.inv(f), rtol=1e-10, atol=1e-12)


def test_woodbury_mean_update_equals_direct_inversion(getkey):
    d, rho, b = 7, 0.3, 4
    state = fisher.inverse_init(d, rho)
    f_sum = rho * jnp.eye(d)
    for t in range(5):
        us = samples(getkey(), b, d)
        state = fisher.mean_update_batch(state, us)
        f_sum = f_sum + us.T @ us / b
        np.testing.assert_allclose(
            state.inverse, jnp.linalg.inv(f_sum / (t + 2)), rtol=1e-10, atol=1e-12
        )


def test_information_matrix_equality_on_a_well_specified_logistic_model(getkey):
    # At the true parameters of a well-specified model, E[∇ℓ ∇ℓᵀ] = E[∇²ℓ]: the empirical
    # Fisher converges to the Hessian like 1/sqrt(n).
    d = 4
    w = jnp.array([1.0, -0.5, 0.25, 0.8])
    key = getkey()

    def loss(w, x, y):
        z = x @ w
        return jnp.logaddexp(0.0, z) - y * z

    distances = []
    for n in (200, 2000, 20000):
        kx, ky = jax.random.split(jax.random.fold_in(key, n))
        x = jax.random.normal(kx, (n, d))
        y = jax.random.bernoulli(ky, jax.nn.sigmoid(x @ w)).astype(x.dtype)
        grads = jax.vmap(jax.grad(loss), (None, 0, 0))(w, x, y)
        empirical = grads.T @ grads / n
        hessian = jax.hessian(lambda w: jnp.mean(jax.vmap(loss, (None, 0, 0))(w, x, y)))(w)
        distances.append(float(jnp.linalg.norm(empirical - hessian) / jnp.linalg.norm(hessian)))
    assert distances[0] > distances[1] > distances[2]
    assert distances[2] < 0.05


def test_damping_must_be_positive():
    import pytest

    with pytest.raises(ValueError, match="damping: expected > 0"):
        fisher.inverse_init(3, 0.0)


# --------------------------------------------------------------------------- factored samples


def _flax_mlp_task(ridge=0.0, b=8):
    """A 2-layer tanh flax MLP (5 -> 4 -> 3, float64 params), a weighted cross-entropy
    inner loss (mean over the batch, ``+ ½ ridge |θ|²``) and one batch."""
    import flax.linen as nn

    import hypergrad_jax as hg

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, param_dtype=jnp.float64)(
                jnp.tanh(nn.Dense(4, param_dtype=jnp.float64)(x))
            )

    model = MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 5)))["params"]
    rng = np.random.default_rng(3)
    batch = {
        "x": jnp.asarray(rng.normal(size=(b, 5))),
        "y": jnp.asarray(rng.integers(0, 3, b)),
        "idx": jnp.arange(b),
    }
    hparams = {"v": jnp.asarray(rng.normal(size=b))}

    def inner(p, h, batch):
        logp = jax.nn.log_softmax(model.apply({"params": p}, batch["x"]))
        nll = -jnp.take_along_axis(logp, batch["y"][:, None], axis=1)[:, 0]
        ridge_term = 0.5 * ridge * sum(jnp.sum(x * x) for x in jax.tree.leaves(p))
        return jnp.mean(jax.nn.sigmoid(h["v"][batch["idx"]]) * nll) + ridge_term

    weights = lambda h, batch: jax.nn.sigmoid(h["v"][batch["idx"]])  # noqa: E731
    return hg.BilevelProblem(inner, inner), params, hparams, batch, weights, model


def test_factored_per_sample_path_equals_vmap_of_per_sample_gradients():
    # NHGD(per_sample_grads="flax_dense") (one forward + one backward, factors a_i, δ_i) and
    # the reference "vmap" path (per-sample gradients on batches of one) give the same
    # minibatch gradient, per-sample gradients and curvature updates. Same maths, different
    # contraction orders (K-FAC's vmap path recovers a_i = ∂W_i δ_i / |δ_i|²): float64
    # rounding is ~1e-16 relative, the online inverses (condition numbers ≲ 1e3 here) amplify
    # it to ≲ 1e-13 over three updates; 1e-10 leaves a wide margin.
    from hypergrad_jax import stochastic as st

    problem, params, hparams, batch, weights, _ = _flax_mlp_task()
    layers = fisher.flax_dense_layers(params)
    for curvature in (
        fisher.KFACFisher(layers, average="mean", damping=0.1),
        fisher.DenseFisher(samples="woodbury", damping=0.1),
    ):
        reference = st.NHGD(curvature, sample_weights=weights)
        fast = reference._replace(per_sample_grads="flax_dense")
        grad0, (u0, per0) = reference.samples(problem, hparams, params, batch)
        grad1, (u1, per1) = fast.samples(problem, hparams, params, batch)
        for a, b in zip(jax.tree.leaves((grad0, u0)), jax.tree.leaves((grad1, u1))):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
        if isinstance(per1, fisher.DenseLayerSamples):  # K-FAC gets the factors
            expanded = fisher.dense_layer_grads(per1, layers, params)
        else:  # other curvatures the outer products
            expanded = per1
        for a, b in zip(jax.tree.leaves(per0), jax.tree.leaves(expanded)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
        s0 = s1 = curvature.init(params)
        for _ in range(3):
            s0, s1 = curvature.update(s0, u0, per0), curvature.update(s1, u1, per1)
        for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_factored_per_sample_path_leaves_the_ridge_out_and_checks_the_model():
    import pytest

    from hypergrad_jax import stochastic as st

    # A ridge is in the minibatch gradient but in no sample's factors: the per-sample
    # gradients are those of the ridge-free loss (vmap adds ridge·θ to every sample's).
    problem, params, hparams, batch, _, _ = _flax_mlp_task(ridge=0.3)
    free, *_ = _flax_mlp_task(ridge=0.0)
    dense = fisher.DenseFisher(samples="woodbury")
    fast = st.NHGD(dense, per_sample_grads="flax_dense")
    grad, (_, per) = fast.samples(problem, hparams, params, batch)
    _, (_, per_free) = st.NHGD(dense).samples(free, hparams, params, batch)
    full = jax.grad(problem.inner_loss)(params, hparams, batch)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(full)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(jax.tree.leaves(per), jax.tree.leaves(per_free)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)

    # A layer called twice is not one rank-one term per sample: a clear error.
    _, params, hparams, batch, _, model = _flax_mlp_task()

    def twice(p):
        return jnp.sum(
            model.apply({"params": p}, batch["x"]) + model.apply({"params": p}, batch["x"])
        )

    with pytest.raises(ValueError, match="called more than once"):
        fisher.flax_dense_samples(twice, params, fisher.flax_dense_layers(params), 8)
    with pytest.raises(ValueError, match="B = 5"):
        fisher.flax_dense_samples(
            lambda p: jnp.sum(model.apply({"params": p}, batch["x"])),
            params,
            fisher.flax_dense_layers(params),
            5,
        )
    with pytest.raises(ValueError, match="per_sample_grads"):
        st.NHGD(per_sample_grads="jacrev").init(params, None)
