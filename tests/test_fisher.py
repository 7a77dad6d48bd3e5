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
