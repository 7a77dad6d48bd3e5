"""Pieces shared by experiments: an MLP classifier, estimator and optimizer builders."""

from __future__ import annotations

import dataclasses
from dataclasses import field

import jax
import jax.numpy as jnp
import optax

import hypergrad_jax as hg
from experiments.config import bounds

ESTIMATORS = ("forward", "unrolled", "unrolled_remat", "implicit", "greedy")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How a run is executed (shared by every experiment's config)."""

    checkpoint_every: int = field(default=10, metadata=bounds(ge=1))
    out_dir: str = "runs"
    # Split inner minibatches over every device (of every process) with shard_map.
    data_parallel: bool = False


def maybe_data_parallel(problem: hg.BilevelProblem, run: RunConfig) -> hg.BilevelProblem:
    """The problem with its inner loss data-parallel over all devices, if configured (the
    outer loss stays whole: validation sets need not divide evenly)."""
    if not run.data_parallel:
        return problem
    return hg.parallel.data_parallel(problem, hg.parallel.make_mesh(), outer=False)


OUTER_OPTIMIZERS = ("adam", "sgd", "sign")


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> dict:
    """``{"w0", "b0", "w1", ...}`` for layer sizes ``(in, hidden..., out)``; LeCun normal."""
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        params[f"w{i}"] = jax.random.normal(k, (n_in, n_out)) / jnp.sqrt(n_in)
        params[f"b{i}"] = jnp.zeros(n_out)
    return params


def mlp_logits(params: dict, x: jax.Array) -> jax.Array:
    depth = len(params) // 2
    for i in range(depth):
        x = x @ params[f"w{i}"] + params[f"b{i}"][None, :]
        if i < depth - 1:
            x = jnp.tanh(x)
    return x


def cross_entropy(params: dict, batch: dict) -> jax.Array:
    logp = jax.nn.log_softmax(mlp_logits(params, batch["x"]))
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def accuracy(params: dict, batch: dict) -> jax.Array:
    return jnp.mean(jnp.argmax(mlp_logits(params, batch["x"]), axis=1) == batch["y"])


def make_estimator(
    name: str, *, truncate: int | None = None, cg_maxiter: int = 50, ridge: float = 1e-4
):
    """An estimator value from its config name (see ``ESTIMATORS``)."""
    return {
        "forward": lambda: hg.Forward(),
        "unrolled": lambda: hg.Unrolled(truncate=truncate),
        "unrolled_remat": lambda: hg.Unrolled(remat=True, truncate=truncate),
        "implicit": lambda: hg.Implicit(hg.CG(maxiter=cg_maxiter, ridge=ridge)),
        "greedy": lambda: hg.Greedy(),
    }[name]()


def make_outer_optimizer(name: str, lr) -> optax.GradientTransformation:
    """An outer optimizer from its config name (see ``OUTER_OPTIMIZERS``); for ``sign`` the
    learning rate is the initial step size (a float or a pytree like the hyperparameters)."""
    if name == "sign":
        return hg.outer.sign_adaptive(lr)
    return {"adam": optax.adam, "sgd": optax.sgd}[name](lr)
