"""Pieces shared by experiments: an MLP classifier, estimator and optimizer builders."""

from __future__ import annotations

import dataclasses
from dataclasses import field

import jax
import jax.numpy as jnp
import optax

import hypergrad_jax as hg
from experiments.config import ConfigError, bounds

ESTIMATORS = ("forward", "unrolled", "unrolled_remat", "implicit", "greedy")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How a run is executed (shared by every experiment's config)."""

    checkpoint_every: int = field(default=10, metadata=bounds(ge=1))
    out_dir: str = "runs"
    # Split inner minibatches over every device (of every process) with shard_map.
    data_parallel: bool = False


def no_data_parallel(run: RunConfig, experiment: str, why: str) -> None:
    """``run.data_parallel`` is rejected by name where an experiment does not support it
    (never silently ignored)."""
    if run.data_parallel:
        raise ConfigError(f"run.data_parallel: not supported by {experiment} ({why}); use false")


def maybe_data_parallel(problem: hg.BilevelProblem, run: RunConfig) -> hg.BilevelProblem:
    """The problem with its inner loss data-parallel over all devices, if configured (the
    outer loss stays whole: validation sets need not divide evenly)."""
    if not run.data_parallel:
        return problem
    return hg.parallel.data_parallel(problem, hg.parallel.make_mesh(), outer=False)


OUTER_OPTIMIZERS = ("adam", "sgd", "sign")


# --------------------------------------------------------------------------- data


def check_fractions(section: str, val_fraction: float, test_fraction: float) -> None:
    """The cross-field check of a data section: training examples must remain."""
    if val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"{section}.val_fraction + {section}.test_fraction: {val_fraction} + "
            f"{test_fraction} >= 1; expected < 1 so that training examples remain"
        )


def check_batch(key: str, size: int | None, available: int, part: str) -> None:
    """A minibatch size no larger than its data (sampled without replacement)."""
    if size is not None and size > available:
        raise ConfigError(
            f"{key}: {size} > {available} {part} examples; expected at most {available}"
        )


def load_splits(
    section: str,
    name: str,
    *,
    seed: int,
    num_samples: int | None = None,
    val_fraction: float,
    test_fraction: float,
    batch_size: int | None = None,
    val_batch: int | None = None,
) -> tuple[hg.data.Dataset, hg.data.Splits]:
    """``(dataset, splits)`` for a config's data section, with every value that depends on
    the data checked right after loading (so before a run directory exists): the number of
    samples against what the dataset has, each needed part non-empty, the minibatch sizes
    against the parts they draw from. Errors are ``ConfigError``s naming ``section.key``."""
    if name == "mnist1d" and num_samples is not None and num_samples % 10:
        raise ConfigError(
            f"{section}.num_samples: {num_samples}; mnist1d generates a multiple of 10 examples"
        )
    try:  # the library names its argument, which is the config key in ``section``
        data = hg.data.load(name, num_samples=num_samples, seed=seed)
        splits = hg.data.split(
            data, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
        )
    except ValueError as e:
        raise ConfigError(f"{section}.{e}") from e
    parts = [("val_fraction", val_fraction, splits.val, "validation")]
    parts.append(("test_fraction", test_fraction, splits.test, "test"))
    for key, fraction, part, label in parts:
        if fraction > 0 and part.y.shape[0] < 1:
            raise ConfigError(
                f"{section}.{key}: {fraction} of {data.y.shape[0]} examples leaves no "
                f"{label} examples; expected a larger fraction or more data"
            )
    check_batch(f"{section}.batch_size", batch_size, splits.train.y.shape[0], "training")
    check_batch(f"{section}.val_batch", val_batch, splits.val.y.shape[0], "validation")
    return data, splits


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
