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


def tour_problem():
    """The README tour's problem (ridge-like regression with a learned log-L2, SGD with
    momentum and a 2-block lr schedule): Hessian eigenvalues 1.8-3.8, where a Neumann step
    of 1.0 (the old default) diverges. Returns ``(problem, run, hparams, params0, train,
    val)``; float32 unless x64 is on."""
    kx, kv, kw = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(kw, (5,))
    xt, xv = jax.random.normal(kx, (50, 5)), jax.random.normal(kv, (50, 5))

    def inner(p, h, b):
        return jnp.mean((b[0] @ p - b[1]) ** 2) + jnp.exp(h["log_l2"]) * p @ p

    def outer(p, h, b):
        return jnp.mean((b[0] @ p - b[1]) ** 2)

    problem = hg.BilevelProblem(inner, outer)
    run = hg.InnerRun(hg.optim.sgd_momentum(), num_steps=200)
    hparams = {
        "optimizer": {"lr": hg.Shared(jnp.array([0.1, 0.05])), "momentum": 0.5},
        "log_l2": jnp.asarray(-2.0),
    }
    return problem, run, hparams, jnp.zeros(5), (xt, xt @ w + 0.5), (xv, xv @ w)


def tiny_config(experiment: str, preset: str | None = "tiny", **sets):
    """The typed config of ``configs/<experiment>.yaml`` at ``preset`` with ``--set``-style
    overrides (``tiny_config("quickstart", **{"data.batch_size": 8})``)."""
    from experiments import cli
    from experiments import config as cfg_lib

    path = cli.find_config(experiment)
    data = cfg_lib.resolve(cfg_lib.load_yaml(path), str(path), preset, list(sets.items()))
    return cli.load_config(data, str(path))[1]


def run_cli(out, *args) -> tuple[int, str, str]:
    """``hypergrad run *args --out out`` in this process: ``(exit code, stdout, stderr)``."""
    import contextlib
    import io

    from experiments import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["run", *args, "--out", str(out)])
    return code, stdout.getvalue(), stderr.getvalue()


def run_tiny(experiment: str, out):
    """One ``hypergrad run <experiment> --tiny`` into the empty folder ``out``: ``(exit
    code, run directory, typed config, stdout, stderr)``."""
    code, stdout, stderr = run_cli(out, experiment, "--tiny")
    (run,) = out.iterdir()
    return code, run, tiny_config(experiment), stdout, stderr
