"""NHGD distillation: learn 5 images per class for a linear classifier, vs stochastic baselines.

The task (NHGD's dataset-distillation experiment; the paper used Fashion-MNIST, we use sklearn's
digits). Dataset distillation: the hyperparameters are ``task.images_per_class`` synthetic
images per class (``50 × 64`` for digits), on which an inner linear classifier is trained;
the outer objective is that classifier's cross-entropy on the *real* training data. The
stochastic bilevel methods of :mod:`hypergrad_jax.stochastic` (NHGD and its baselines) are
run on it by the shared runner :mod:`experiments.nhgd.compare`, which writes the comparison
table and the time-to-target plots.

Data. ``task.dataset`` (``digits``: 1797 × 64, 10 classes; or ``mnist1d``: 40 features,
generated offline) split once (``task.seed``) into real train / test parts, standardised with
the training part's statistics (``hg.data.split``; there is no validation part: the outer
objective is on the real training data, as in dataset distillation).

Hyperparameters ``λ = X̃``: ``float[C·K, d]``, row ``i`` an image of class ``i // K``
(``K = task.images_per_class``; the labels are fixed). Initialised as the class means of the
standardised real training data plus ``task.init_noise`` × N(0, 1) noise (seeded by
``task.seed``): the mean alone would make a class's ``K`` images identical, and identical
images get identical gradients and stay identical; the noise breaks that symmetry.

Inner problem: the linear classifier of :mod:`experiments.nhgd.regularization` (logits
``[x @ w + b, 0]``, a reference class so the likelihood is identifiable; ``params = {"w":
[d, C−1], "b": [C−1]}``, one dense layer for K-FAC) trained on the learned images, a mean
over a minibatch of them plus a ridge (strongly convex in ``θ``)::

    g(θ, X̃) = mean_{i ∈ batch} NLL(θ; X̃_i, y_i) + ½ ridge |θ|²

The inner sampler draws ``task.batch_size`` of the ``C·K`` image *indices* per step (the
batch is ``{"idx", "y"}`` and ``g`` gathers ``X̃[idx]``, so the images stay differentiable
hyperparameters). Outer problem: ``f(θ) = mean NLL`` on a minibatch of ``task.outer_batch``
real training examples per outer step (``outer_data = key -> batch``; all if null);
``val`` (the exact hypergradient's outer data) and ``evaluate``'s ``val_loss`` use the whole
real training part; ``test_acc`` (primary) and ``test_loss`` the held-out real test part.

Caveats for NHGD (its premise: the empirical Fisher of the inner gradients ≈ the inner
Hessian). (1) The inner loss is the NLL of *learned images with fixed labels*: at ``θ*`` the
model's predictions on them are not the labels' distribution, so the empirical Fisher of its
gradients equals the Hessian only approximately (NHGD's well-specified premise does not
hold). (2) There are only ``C·K`` (50) training points: the empirical Fisher — one gradient
``(p_i − y_i) ⊗ x̄_i`` per image — has rank at most ``C·K`` (measured: 49 of 585 at ``θ*``),
while the Hessian is ``⪰ ridge · I`` in every direction (the ridge's curvature never appears
in gradient covariances) and the real-data gradient ``∇_θ f`` has components everywhere. In
the remaining ~535 directions NHGD's ``A ≈ F̂⁻¹`` is set by its (decaying) damping alone,
so the norm of its hypergradient grows without bound as the damping shrinks while its
direction stays only roughly right (damping the size of ``ridge`` keeps the norm sane).
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

import hypergrad_jax as hg
from experiments import common
from experiments.common import RunConfig
from experiments.config import ConfigError, bounds
from experiments.harness import Experiment
from experiments.nhgd.compare import CompareConfig, build_comparison
from experiments.nhgd.regularization import (
    accuracy,
    init_linear,
    nll,
    outer_loss,
    outer_sampler,
    sq_norm,
)
from experiments.nhgd.task import Task

# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The distillation task (module docstring)."""

    dataset: Literal["digits", "mnist1d"] = "digits"
    # Keep a random subset of this many real examples (null: all; mnist1d: generate this many).
    num_samples: int | None = field(default=None, metadata=bounds(ge=10))
    test_fraction: float = field(default=0.25, metadata=bounds(gt=0, lt=1))
    seed: int = field(default=0, metadata=bounds(ge=0))  # subset, split, initial noise
    images_per_class: int = field(default=5, metadata=bounds(ge=1))
    init_noise: float = field(default=0.1, metadata=bounds(ge=0))  # std around class means
    batch_size: int = field(default=10, metadata=bounds(ge=1))  # learned images per inner step
    # Real training examples per outer step (drawn without replacement); null: all.
    outer_batch: int | None = field(default=128, metadata=bounds(ge=1))
    ridge: float = field(default=1e-2, metadata=bounds(gt=0))


@dataclasses.dataclass(frozen=True)
class Config:
    experiment: Literal["nhgd_distillation"] = "nhgd_distillation"
    task: TaskConfig = TaskConfig()
    compare: CompareConfig = CompareConfig()
    run: RunConfig = RunConfig()


# --------------------------------------------------------------------------- the problem


def inner_loss(params: dict, images: jax.Array, batch: dict, ridge: float) -> jax.Array:
    """``mean_{i ∈ batch} NLL(θ; X̃[idx_i], y_i) + ½ ridge |θ|²``."""
    return nll(params, images[batch["idx"]], batch["y"]) + 0.5 * ridge * sq_norm(params)


def class_means(x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, d]`` per-class means of ``x``."""
    return np.stack([x[y == c].mean(axis=0) for c in range(num_classes)])


def init_images(key, x, y, num_classes: int, per_class: int, noise: float) -> jax.Array:
    """``[C·K, d]``: class ``i // K``'s mean plus ``noise`` × N(0, 1)."""
    means = np.repeat(class_means(np.asarray(x), np.asarray(y), num_classes), per_class, axis=0)
    means = jnp.asarray(means, jnp.float32)
    return means + noise * jax.random.normal(key, means.shape, means.dtype)


# --------------------------------------------------------------------------- the task


def make_task(cfg: TaskConfig) -> Task:
    """The distillation :class:`~experiments.nhgd.task.Task` (module docstring)."""
    data, splits = common.load_splits(
        "task",
        cfg.dataset,
        seed=cfg.seed,
        num_samples=cfg.num_samples,
        val_fraction=0.0,
        test_fraction=cfg.test_fraction,
    )
    real, test = hg.data.to_batch(splits.train), hg.data.to_batch(splits.test)
    num_classes, num_features = data.num_classes, data.x.shape[1]
    missing = sorted(set(range(num_classes)) - set(splits.train.y.tolist()))
    if missing:
        raise ConfigError(
            f"task.num_samples: {cfg.num_samples} leaves classes {missing} without real "
            "training examples; their images cannot be initialised at the class means"
        )
    num_images = num_classes * cfg.images_per_class
    common.check_batch("task.batch_size", cfg.batch_size, num_images, "learned-image")
    common.check_batch("task.outer_batch", cfg.outer_batch, real["y"].shape[0], "real training")

    labels = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), cfg.images_per_class)
    images = init_images(
        jax.random.key(cfg.seed),
        splits.train.x,
        splits.train.y,
        num_classes,
        cfg.images_per_class,
        cfg.init_noise,
    )
    train = {"idx": jnp.arange(num_images, dtype=jnp.int32), "y": labels}
    ridge = cfg.ridge
    problem = hg.BilevelProblem(
        inner_loss=lambda p, h, b: inner_loss(p, h, b, ridge), outer_loss=outer_loss
    )

    def evaluate(params, hparams):
        del hparams
        return {
            "val_loss": nll(params, real["x"], real["y"]),
            "train_acc": accuracy(params, real["x"], real["y"]),
            "test_loss": nll(params, test["x"], test["y"]),
            "test_acc": accuracy(params, test["x"], test["y"]),
        }

    return Task(
        name=f"distillation/{cfg.dataset}",
        problem=problem,
        hparams=images,
        params=init_linear(num_features, num_classes),
        inner_data=hg.data.minibatch_sampler(train, cfg.batch_size),
        outer_data=outer_sampler(real, cfg.outer_batch),
        train=train,
        val=real,
        evaluate=evaluate,
        primary="test_acc",
        kfac_layers=(("w", "b"),),
    )


def build(cfg: Config) -> Experiment:
    return build_comparison(make_task(cfg.task), cfg.compare, cfg.run)
