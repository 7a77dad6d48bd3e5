"""Small non-quadratic problems shared by the tests."""

import jax
import jax.numpy as jnp

import hypergrad_jax as hg


def logistic_data(key, n=32, d=5, classes=3, dtype=jnp.float64):
    kx, kw, kv = jax.random.split(key, 3)
    x = jax.random.normal(kx, (n, d), dtype)
    w = jax.random.normal(kw, (d, classes), dtype)
    y = jnp.argmax(x @ w + 0.5 * jax.random.normal(kv, (n, classes), dtype), axis=1)
    return x, y


def mlp_params(key, d=5, hidden=4, classes=3, dtype=jnp.float64):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (d, hidden), dtype) / jnp.sqrt(d),
        "b1": jnp.zeros(hidden, dtype),
        "w2": jax.random.normal(k2, (hidden, classes), dtype) / jnp.sqrt(hidden),
    }


def mlp_loss(params, hparams, batch):
    """Cross-entropy of a one-hidden-layer tanh MLP plus a learned log-L2 penalty."""
    x, y = batch
    logits = jnp.tanh(x @ params["w1"] + params["b1"][None, :]) @ params["w2"]
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
    l2 = sum(jnp.sum(p**2) for p in jax.tree.leaves(params))
    return ce + 0.5 * jnp.exp(hparams["log_l2"]) * l2


def mlp_outer(params, hparams, batch):
    x, y = batch
    logits = jnp.tanh(x @ params["w1"] + params["b1"][None, :]) @ params["w2"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


MLP_PROBLEM = hg.BilevelProblem(mlp_loss, mlp_outer)


def minibatch_sampler(data, batch_size):
    """A jittable sampler (key, step) -> batch drawing rows uniformly (with replacement)."""
    x, y = data

    def sample(key, step):
        del step
        idx = jax.random.randint(key, (batch_size,), 0, x.shape[0])
        return x[idx], y[idx]

    return sample
