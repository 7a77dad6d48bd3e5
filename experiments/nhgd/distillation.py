"""NHGD distillation: learn 5 images per class for a linear classifier, vs stochastic baselines.

The task (NHGD's dataset-distillation experiment; the paper used Fashion-MNIST, we use sklearn's
digits). Dataset distillation: the hyperparameters are ``task.images_per_class`` synthetic
images per class (``50 × 64`` for digits), on which an inner linear classifier is trained;
the outer objective is that classifier's cross-entropy on the *real* training data. The
stochastic bilevel methods of :mod:`hypergrad_jax.stochastic` (NHGD and its baselines) are
run on it by the shared runner :mod:`experiments.nhgd.compare`, which writes the comparison
table and the time-to-target plots.

Data. ``data.name`` (``digits``: 1797 × 64, 10 classes; or ``mnist1d``: 40 features,
generated offline) split once (``seed``) into real train / test parts, standardised with
the training part's statistics (``hg.data.split``; there is no validation part: the outer
objective is on the real training data, as in dataset distillation).

Hyperparameters ``λ = X̃``: ``float[C·K, d]``, row ``i`` an image of class ``i // K``
(``K = task.images_per_class``; the labels are fixed). Initialised as the class means of the
standardised real training data plus ``task.init_noise`` × N(0, 1) noise (seeded by
``seed``): the mean alone would make a class's ``K`` images identical, and identical
images get identical gradients and stay identical; the noise breaks that symmetry.

Inner problem: the tasks' linear classifier (:func:`experiments.nhgd.task.linear_classifier`:
logits ``[x @ w + b, 0]``, a reference class so the likelihood is identifiable; one flax
``Dense`` layer for K-FAC) trained on the learned images, a mean over a minibatch of them plus
a ridge (strongly convex in ``θ``)::

    g(θ, X̃) = mean_{i ∈ batch} NLL(θ; X̃_i, y_i) + ½ ridge |θ|²

The inner sampler draws ``data.batch_size`` of the ``C·K`` image *indices* per step (the
batch is ``{"idx", "y"}`` and ``g`` gathers ``X̃[idx]``, so the images stay differentiable
hyperparameters). Outer problem: ``f(θ) = mean NLL`` on a minibatch of ``data.val_batch``
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
from experiments.nhgd.task import Task, linear_task

# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The distillation task (module docstring)."""

    images_per_class: int = field(default=5, metadata=bounds(ge=1))
    init_noise: float = field(default=0.1, metadata=bounds(ge=0))  # std around class means
    ridge: float = field(default=1e-2, metadata=bounds(gt=0))


@dataclasses.dataclass(frozen=True)
class Config:
    experiment: Literal["nhgd_distillation"] = "nhgd_distillation"
    seed: int = field(default=0, metadata=bounds(ge=0))  # subset, split, initial noise
    # batch_size: learned images per inner step; val_batch: real training examples per outer
    # step (the outer loss is on the real training part: val_fraction must be 0).
    data: common.DataConfig = common.DataConfig(
        val_fraction=0.0, test_fraction=0.25, batch_size=10, val_batch=128
    )
    task: TaskConfig = TaskConfig()
    compare: CompareConfig = CompareConfig()
    run: RunConfig = RunConfig()

    def __post_init__(self):
        if self.data.val_fraction != 0:
            raise ConfigError(
                f"data.val_fraction: {self.data.val_fraction}; expected 0 (distillation's "
                "outer loss is on the real training examples)"
            )


# --------------------------------------------------------------------------- the problem


def inner_loss(
    classifier: common.Classifier, params: dict, images: jax.Array, batch: dict, ridge: float
) -> jax.Array:
    """``mean_{i ∈ batch} NLL(θ; X̃[idx_i], y_i) + ½ ridge |θ|²``."""
    real = {"x": images[batch["idx"]], "y": batch["y"]}
    return classifier.loss(params, real) + 0.5 * ridge * common.sq_norm(params)


def class_means(x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, d]`` per-class means of ``x``."""
    return np.stack([x[y == c].mean(axis=0) for c in range(num_classes)])


def init_images(key, x, y, num_classes: int, per_class: int, noise: float) -> jax.Array:
    """``[C·K, d]``: class ``i // K``'s mean plus ``noise`` × N(0, 1)."""
    means = np.repeat(class_means(np.asarray(x), np.asarray(y), num_classes), per_class, axis=0)
    means = jnp.asarray(means, jnp.float32)
    return means + noise * jax.random.normal(key, means.shape, means.dtype)


# --------------------------------------------------------------------------- the task


def make_task(cfg: Config) -> Task:
    """The distillation :class:`~experiments.nhgd.task.Task` (module docstring)."""
    d, t = cfg.data, cfg.task
    data, splits = d.load(cfg.seed, require=("test",), check_batches=False)
    real, test = hg.data.to_batch(splits.train), hg.data.to_batch(splits.test)
    num_classes, num_features = data.num_classes, data.x.shape[1]
    missing = sorted(set(range(num_classes)) - set(splits.train.y.tolist()))
    if missing:
        raise ConfigError(
            f"data.num_samples: {d.num_samples} leaves classes {missing} without real "
            "training examples; their images cannot be initialised at the class means"
        )
    num_images = num_classes * t.images_per_class
    common.check_batch("data.batch_size", d.batch_size, num_images, "learned-image")
    common.check_batch("data.val_batch", d.val_batch, real["y"].shape[0], "real training")

    labels = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), t.images_per_class)
    images = init_images(
        jax.random.key(cfg.seed),
        splits.train.x,
        splits.train.y,
        num_classes,
        t.images_per_class,
        t.init_noise,
    )
    train = {"idx": jnp.arange(num_images, dtype=jnp.int32), "y": labels}
    ridge = t.ridge

    def metrics(classifier, params, hparams):
        del hparams
        return {
            "train_acc": classifier.accuracy(params, real),
            "test_loss": classifier.loss(params, test),
            "test_acc": classifier.accuracy(params, test),
        }

    return linear_task(
        f"distillation/{d.name}",
        d,
        num_features,
        num_classes,
        lambda c, p, h, b: inner_loss(c, p, h, b, ridge),
        images,
        train,
        real,
        metrics,
    )


def build(cfg: Config) -> Experiment:
    return build_comparison(make_task(cfg), cfg.compare, cfg.run)
