"""Shared pieces of the multi-device scripts: a small float64 bilevel problem.

Multinomial logistic regression trained by SGD with a learned log-L2 penalty and a learned
log learning rate; tuned on a validation set.

The scripts run in subprocesses (their device count is fixed before JAX starts), import
this module from their own folder and print one JSON line with their results.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

import hypergrad_jax as hg

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

N_INNER, N_OUTER, DIM, CLASSES = 32, 16, 5, 3
NUM_STEPS, SAMPLER_BATCH = 12, 8


def data(key, n):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, DIM), jnp.float64)
    y = jnp.argmax(x @ jax.random.normal(kw, (DIM, CLASSES), jnp.float64), axis=1)
    return x, y


def cross_entropy(params, x, y):
    logp = jax.nn.log_softmax(x @ params["w"] + params["b"][None, :])
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def inner_loss(params, hparams, batch):
    """Mean cross-entropy plus a learned log-L2 penalty (independent of the batch)."""
    return cross_entropy(params, *batch) + 0.5 * jnp.exp(hparams["log_l2"]) * jnp.sum(
        params["w"] ** 2
    )


def outer_loss(params, hparams, batch):
    del hparams
    return cross_entropy(params, *batch)


PROBLEM = hg.BilevelProblem(inner_loss, outer_loss)
RUN = hg.InnerRun(
    hg.optim.sgd(), num_steps=NUM_STEPS, optimizer_hparams=lambda h: {"lr": jnp.exp(h["log_lr"])}
)


def setup():
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    params0 = {
        "w": 0.1 * jax.random.normal(k3, (DIM, CLASSES), jnp.float64),
        "b": jnp.zeros(CLASSES, jnp.float64),
    }
    hparams = {"log_l2": jnp.asarray(-2.0), "log_lr": jnp.asarray(jnp.log(0.5))}
    return hparams, params0, data(k1, N_INNER), data(k2, N_OUTER), k4


def sampler(inner):
    """A jittable minibatch sampler (key, step) -> batch over the closed-over inner data."""
    x, y = inner

    def sample(key, step):
        del step
        idx = jax.random.randint(key, (SAMPLER_BATCH,), 0, x.shape[0])
        return x[idx], y[idx]

    return sample


def estimators():
    return {
        "unrolled": hg.Unrolled(),
        "forward": hg.Forward(),
        "implicit": hg.Implicit(hg.CG(maxiter=100, tol=1e-12)),
    }


def rel_err(a, b):
    """``max |a - b| / max |b|`` over all leaves, on the host: results of different meshes
    (or of an Explicit and an Auto mesh) do not mix in jax.numpy."""
    a, b = (np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(t)]) for t in (a, b))
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def emit(results):
    print("RESULT " + json.dumps(results), flush=True)
