"""Pieces shared by experiments: the run and data sections, the flax classifier, estimator
and optimizer builders."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Literal, NamedTuple

import flax.linen as nn
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

DATASETS = ("digits", "breast_cancer", "mnist1d")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The ``data:`` section, the same keys in every experiment; each experiment sets its own
    defaults (``data: DataConfig = DataConfig(name="mnist1d", ...)``) and rejects by name
    a value it cannot use."""

    name: Literal[DATASETS] = "digits"  # type: ignore[valid-type]
    # mnist1d: examples generated (a multiple of 10); otherwise a random subset (null: all).
    num_samples: int | None = field(default=None, metadata=bounds(ge=10))
    val_fraction: float = field(default=0.25, metadata=bounds(ge=0, lt=1))
    test_fraction: float = field(default=0.25, metadata=bounds(ge=0, lt=1))
    batch_size: int = field(default=64, metadata=bounds(ge=1))  # inner minibatch
    # Validation examples per outer step (drawn without replacement); null: all of them.
    val_batch: int | None = field(default=None, metadata=bounds(ge=1))

    def __post_init__(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction: {self.val_fraction} + "
                f"{self.test_fraction} >= 1; expected < 1 so that training examples remain"
            )

    def load(
        self, seed: int, *, require: tuple[str, ...] = ("val",), check_batches: bool = True
    ) -> tuple[hg.data.Dataset, hg.data.Splits]:
        """``(dataset, splits)``, with every value that depends on the data checked right
        after loading (so before a run directory exists): the number of samples against
        what the dataset has, each part in ``require`` (``"val"``, ``"test"``) and each part
        with a positive fraction non-empty, and (``check_batches``) ``batch_size`` against
        the training part and ``val_batch`` against the validation part. Errors are
        ``ConfigError``s naming ``data.<key>``."""
        if self.name == "mnist1d" and self.num_samples is not None and self.num_samples % 10:
            raise ConfigError(
                f"data.num_samples: {self.num_samples}; mnist1d generates a multiple of 10 examples"
            )
        fractions = {"val": self.val_fraction, "test": self.test_fraction}
        for part in require:
            if fractions[part] <= 0:
                raise ConfigError(
                    f"data.{part}_fraction: {fractions[part]}; expected > 0 (this experiment "
                    f"uses a {part} part)"
                )
        try:  # the library names its argument, which is the config key in ``data``
            data = hg.data.load(self.name, num_samples=self.num_samples, seed=seed)
            splits = hg.data.split(
                data, val_fraction=self.val_fraction, test_fraction=self.test_fraction, seed=seed
            )
        except ValueError as e:
            raise ConfigError(f"data.{e}") from e
        parts = [("val_fraction", self.val_fraction, splits.val, "validation")]
        parts.append(("test_fraction", self.test_fraction, splits.test, "test"))
        for key, fraction, part, label in parts:
            if fraction > 0 and part.y.shape[0] < 1:
                raise ConfigError(
                    f"data.{key}: {fraction} of {data.y.shape[0]} examples leaves no "
                    f"{label} examples; expected a larger fraction or more data"
                )
        if check_batches:
            check_batch("data.batch_size", self.batch_size, splits.train.y.shape[0], "training")
            check_batch("data.val_batch", self.val_batch, splits.val.y.shape[0], "validation")
        return data, splits


def check_batch(key: str, size: int | None, available: int, part: str) -> None:
    """A minibatch size no larger than its data (sampled without replacement)."""
    if size is not None and size > available:
        raise ConfigError(
            f"{key}: {size} > {available} {part} examples; expected at most {available}"
        )


def no_val_batch(data: DataConfig, experiment: str, why: str) -> None:
    """``data.val_batch`` rejected by name where an experiment uses a fixed outer batch."""
    if data.val_batch is not None:
        raise ConfigError(f"data.val_batch: not supported by {experiment} ({why}); use null")


@jax.tree_util.register_pytree_node_class
class KeySampler:
    """``key -> batch``: a :class:`hg.data.Sampler`'s minibatch for ``(key, 0)``. A pytree
    whose leaves are the data, so the runner passes it to its jitted programs as an argument
    instead of embedding the data as constants (what a closure would do)."""

    def __init__(self, sampler: hg.data.Sampler):
        self.sampler = sampler

    def __call__(self, key: jax.Array) -> dict:
        return self.sampler(key, 0)

    def tree_flatten(self):
        return (self.sampler,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls(children[0])


def outer_data(val: dict, val_batch: int | None):
    """The outer data: the whole validation batch, or ``key -> minibatch`` of it."""
    if val_batch is None:
        return val
    return KeySampler(hg.data.minibatch_sampler(val, val_batch))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The ``model:`` section of the MLP experiments: hidden layer widths (tanh)."""

    hidden: tuple[int, ...] = field(default=(64,), metadata=bounds(ge=1))


# --------------------------------------------------------------------------- the model


class MLP(nn.Module):
    """A classifier: ``Dense`` layers of widths ``hidden`` with ``tanh`` between, then
    ``num_classes`` logits. ``reference_class``: the last class's logit is fixed at 0 and the
    output layer has ``num_classes − 1`` units (an identifiable likelihood: the usual ``C``
    columns leave it invariant under adding one vector to every column, a direction in which
    the Fisher is zero). With ``hidden = ()`` it is (multinomial) logistic regression."""

    num_classes: int
    hidden: tuple[int, ...] = ()
    reference_class: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, dropout=None, key=None) -> jax.Array:
        """Logits of ``x``; ``dropout``: a drop rate for the input of every ``Dense`` layer
        (``len(hidden) + 1`` of them), applied by :func:`concrete_dropout` with ``key``."""
        keys = (
            [None] * (len(self.hidden) + 1)
            if dropout is None
            else jax.random.split(key, len(dropout))
        )
        for i, width in enumerate(self.hidden):
            x = x if dropout is None else concrete_dropout(keys[i], x, dropout[i])
            x = jnp.tanh(nn.Dense(width)(x))
        x = x if dropout is None else concrete_dropout(keys[-1], x, dropout[-1])
        z = nn.Dense(self.num_classes - self.reference_class)(x)
        if self.reference_class:
            z = jnp.concatenate([z, jnp.zeros_like(z[:, :1])], axis=1)
        return z


def concrete_dropout(key: jax.Array, x: jax.Array, rate, temperature: float = 0.1) -> jax.Array:
    """Dropout with a relaxed Bernoulli mask (Gal, Hron & Kendall 2017, "Concrete Dropout"),
    differentiable in the drop rate ``p``: ``z = σ((logit p + logit u) / temperature)``,
    ``u ~ U(0, 1)``, and ``x (1 − z) / (1 − p)``. As ``temperature → 0`` the mask becomes
    Bernoulli(``p``) dropout."""
    eps = 1e-7
    u = jax.random.uniform(key, x.shape, x.dtype, eps, 1 - eps)
    rate = jnp.clip(rate, eps, 1 - eps)
    logit = jnp.log(rate) - jnp.log1p(-rate) + jnp.log(u) - jnp.log1p(-u)
    drop = jax.nn.sigmoid(logit / temperature)
    return x * (1 - drop) / (1 - rate)


class Classifier(NamedTuple):
    """A flax classifier and its losses on ``{"x", "y"}`` batches. ``params`` is the
    module's ``"params"`` collection: the inner ``params`` pytree of every experiment, and
    K-FAC's layers are ``hg.fisher.flax_dense_layers(params)``."""

    model: MLP

    def init(self, key: jax.Array, num_features: int, *, zeros: bool = False, dtype=None) -> dict:
        """flax's default initialisation (LeCun normal kernels, zero biases), or all zeros
        (the convex, linear tasks), in ``dtype`` (default: JAX's default float, float64
        under ``jax_enable_x64``)."""
        params = self.model.init(key, jnp.zeros((1, num_features)))["params"]
        dtype = jnp.result_type(float) if dtype is None else dtype
        init = jnp.zeros_like if zeros else lambda p: p
        return jax.tree.map(lambda p: init(p).astype(dtype), params)

    def logits(self, params: dict, x: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, x)

    def nll(self, params: dict, batch: dict) -> jax.Array:
        """Per-example cross-entropy ``[B]`` of the labels ``batch["y"]``."""
        logp = jax.nn.log_softmax(self.logits(params, batch["x"]))
        return -jnp.take_along_axis(logp, batch["y"][:, None], axis=1)[:, 0]

    def loss(self, params: dict, batch: dict) -> jax.Array:
        """Mean cross-entropy."""
        return jnp.mean(self.nll(params, batch))

    def accuracy(self, params: dict, batch: dict) -> jax.Array:
        return jnp.mean(jnp.argmax(self.logits(params, batch["x"]), axis=1) == batch["y"])

    def problem(self) -> hg.BilevelProblem:
        """Cross-entropy at both levels, the hyperparameters acting through the inner
        optimizer only (learning rates, momenta, weight decay)."""
        loss = lambda params, hparams, batch: self.loss(params, batch)  # noqa: E731
        return hg.BilevelProblem(inner_loss=loss, outer_loss=loss)


def sq_norm(tree) -> jax.Array:
    """``|θ|²`` of a pytree."""
    return optax.tree.norm(tree, squared=True)


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
