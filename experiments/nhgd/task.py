"""What a comparison task provides to the NHGD comparison runner (``compare.py``), and the
model the three tasks share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

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
