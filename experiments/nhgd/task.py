"""What a comparison task provides to the NHGD comparison runner (``compare.py``), and the
model the three tasks share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import hypergrad_jax as hg
from experiments import common

PyTree = Any


class Task(NamedTuple):
    """A small bilevel problem every stochastic method is run on, with its evaluation.

    Attributes:
      name: short name for tables and plots (e.g. ``"hyper_cleaning/digits"``).
      problem: the bilevel problem; its inner loss must be a mean over the batch's leading
        (sample) axis (NHGD's per-sample Fisher options) and strongly convex in ``θ`` (the
        exact reference is a Newton solve).
      hparams, params: initial ``λ`` and ``θ``.
      inner_data: minibatch sampler ``(key, step) -> batch`` of the inner (training) data.
      outer_data: the outer batch, or ``key -> batch`` (a validation minibatch).
      train: the full inner batch: the exact implicit hypergradient's inner data.
      val: the full outer batch: the exact hypergradient's outer data.
      evaluate: jittable ``(params, hparams) -> dict`` of scalar metrics; must contain
        ``"val_loss"`` (the outer objective on the full validation data) and ``primary``.
      primary: the headline metric, e.g. ``"test_acc"``.
      kfac_layers: ``KFACFisher.layers`` for ``params`` (dense layers as (weight, bias) keys).
      sample_weights: ``(hparams, batch) -> float[B]`` when the inner loss is a weighted
        likelihood (``NHGD.sample_weights``), else ``None``.
    """

    name: str
    problem: hg.BilevelProblem
    hparams: PyTree
    params: PyTree
    inner_data: Callable
    outer_data: PyTree | Callable
    train: PyTree
    val: PyTree
    evaluate: Callable
    primary: str
    kfac_layers: tuple
    sample_weights: Callable | None = None


def linear_classifier(num_classes: int) -> common.Classifier:
    """The tasks' model: multinomial logistic regression with a reference class (logits
    ``[x @ w + b, 0]``; for two classes exactly binary logistic regression). The usual ``C``
    columns would leave the likelihood invariant under adding one vector to every column: a
    direction in which the inner Hessian is only the ridge floor and the empirical Fisher is
    (almost) zero, so NHGD's Fisher inverse would blow up there. ``params`` is one flax
    ``Dense`` layer (``{"Dense_0": {"kernel", "bias"}}``), so K-FAC applies."""
    return common.Classifier(common.MLP(num_classes, reference_class=True))


def linear_task(
    name: str,
    data: common.DataConfig,
    num_features: int,
    num_classes: int,
    inner_loss: Callable,
    hparams: PyTree,
    train: PyTree,
    val: PyTree,
    metrics: Callable,
    *,
    sample_weights: Callable | None = None,
    dtype=jnp.float32,
) -> Task:
    """A :class:`Task` on :func:`linear_classifier` (``θ`` starts at 0): the inner loss
    ``inner_loss(classifier, params, hparams, batch)`` on minibatches of ``data.batch_size``
    of ``train``, the outer loss the mean cross-entropy on ``val`` (a minibatch of
    ``data.val_batch`` per outer step, or all of it); ``evaluate`` reports ``val_loss`` and
    ``metrics(classifier, params, hparams)``, ``test_acc`` the primary metric."""
    classifier = linear_classifier(num_classes)
    problem = hg.BilevelProblem(
        inner_loss=lambda p, h, b: inner_loss(classifier, p, h, b),
        outer_loss=lambda p, h, b: classifier.loss(p, b),
    )
    params = classifier.init(jax.random.key(0), num_features, zeros=True, dtype=dtype)

    def evaluate(params, hparams):
        return {"val_loss": classifier.loss(params, val), **metrics(classifier, params, hparams)}

    return Task(
        name=name,
        problem=problem,
        hparams=hparams,
        params=params,
        inner_data=hg.data.minibatch_sampler(train, data.batch_size),
        outer_data=common.outer_data(val, data.val_batch),
        train=train,
        val=val,
        evaluate=evaluate,
        primary="test_acc",
        kfac_layers=hg.fisher.flax_dense_layers(params),
        sample_weights=sample_weights,
    )
