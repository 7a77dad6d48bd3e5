"""NHGD regularization: per-feature L2 weights (log space) of logistic regression vs baselines.

The task (NHGD's regularization experiment). Learn one L2 weight per input feature of a linear
classifier, ``λ_j = log`` of the weight, on a validation split, by the stochastic bilevel
methods of :mod:`hypergrad_jax.stochastic` (NHGD and its baselines); the shared runner
:mod:`experiments.nhgd.compare` runs them all and writes the comparison table and the
time-to-target plots.

Data. ``data.name`` (sklearn's ``breast_cancer``, 569 × 30, 2 classes, by default, or
``digits``, 1797 × 64, 10 classes) split once (``seed``) into train / validation / test,
every feature standardised with the training part's statistics (``hg.data.split``).
Features constant on the training part (digits' always-blank border pixels) are dropped:
their weight is 0 at every ``θ*`` and their ``λ_j`` would get a zero hypergradient, while
their inner curvature ``exp(λ_j)`` is invisible to the empirical Fisher (see the caveat).
Digits' *rare* pixels (non-blank on a few training images) remain and give near-null
directions of the Fisher; breast_cancer's 30 continuous features have none.

Model: :func:`experiments.nhgd.task.linear_classifier`, multinomial logistic regression with
a *reference class* (logits ``[x @ w + b, 0]``, ``w: [d, C−1]``; for two classes exactly
binary logistic regression), one flax ``Dense`` layer, so K-FAC applies; ``θ`` starts at 0.

Inner problem (strongly convex in ``θ = (w, b)``; mean over the batch's samples)::

    g(θ, λ) = mean_i NLL(θ; x_i, y_i) + ½ Σ_j exp(λ_j) Σ_c w_jc² + ½ ridge |θ|²

``ridge`` (``task.ridge``, 1e-4) is a floor that keeps ``g`` strongly convex whatever ``λ``
(and covers the bias, which ``λ`` does not penalise). Outer problem: the validation NLL
(mean cross-entropy) ``f(θ)``, on a minibatch of ``data.val_batch`` validation examples per
outer step (all of them if null); ``evaluate``'s ``val_loss`` is ``f`` on the whole validation
split, the exact hypergradient's outer data. ``λ`` starts at ``log(task.init_l2)`` for every
feature; ``θ`` at zero.

Metrics (``evaluate``): ``val_loss`` (above), ``val_acc``, ``test_acc`` (the primary
metric), ``test_loss`` and ``train_loss``. With 30 (or 64) hyperparameters and a validation
split of 142 (449) examples, the learned ``λ`` can overfit the validation data: long exact
hypergradient descent lowers ``val_loss`` while ``test_loss`` rises. Compare methods on
``val_loss``, the objective they optimise; ``test_acc`` moves by a few of the 142 test
examples.

Caveats for NHGD (its premise: the empirical Fisher of the inner gradients ≈ the inner
Hessian). (1) The gradients' covariance never contains the deterministic penalty's curvature
``diag(exp λ) ⊗ I + ridge I``: NHGD's ``A ≈ F̂⁻¹`` approximates the inverse of the NLL's
Hessian alone, too large where the penalty dominates — which is most directions once the fit
is good, and the more so as learned ``λ_j`` grow. (2) Even for the NLL alone, the *empirical*
Fisher ``mean (p_i − y_i)² x̄_i x̄_iᵀ`` (observed labels) is not the Hessian
``mean p_i (1 − p_i) x̄_i x̄_iᵀ`` (equal to the model's Fisher for logistic regression): for
confidently right examples ``(p − y)² ≪ p (1 − p)``, so on near-separable data such as
breast_cancer F̂ underestimates H by orders of magnitude: at ``λ_0`` the hypergradient from
a nearly undamped ``F̂⁻¹`` is nearly orthogonal to the exact one and orders of magnitude too
long, while adding the penalty's Hessian to ``F̂``, or a damping the size of ``exp λ_0``,
brings it close. NHGD's damping decays (``β^t``), so it does not play that role for long.
(3) The penalty makes a single sample's gradient ``x̄_i δ_iᵀ + (exp(λ) ⊙ w, 0)`` not rank
one, so K-FAC's recovery of ``(a_i, δ_i)`` from it is only approximate; with ``δ_i`` small
(well-fitted examples) the recovered ``a_i`` is dominated by the penalty term.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

import hypergrad_jax as hg
from experiments import common
from experiments.common import RunConfig
from experiments.config import bounds
from experiments.harness import Experiment
from experiments.nhgd.compare import CompareConfig, build_comparison
from experiments.nhgd.task import Task, linear_task

# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The regularization task (module docstring)."""

    init_l2: float = field(default=0.01, metadata=bounds(gt=0))  # λ_0 = log(init_l2)
    ridge: float = field(default=1e-4, metadata=bounds(gt=0))  # strong-convexity floor


@dataclasses.dataclass(frozen=True)
class Config:
    experiment: Literal["nhgd_regularization"] = "nhgd_regularization"
    seed: int = field(default=0, metadata=bounds(ge=0))  # subset and split
    data: common.DataConfig = common.DataConfig(name="breast_cancer", batch_size=32)
    task: TaskConfig = TaskConfig()
    compare: CompareConfig = CompareConfig()
    run: RunConfig = RunConfig()


# --------------------------------------------------------------------------- the problem


def inner_loss(
    classifier: common.Classifier, params: dict, hparams: jax.Array, batch: dict, ridge: float
) -> jax.Array:
    """``mean NLL + ½ Σ_j exp(λ_j) Σ_c w_jc² + ½ ridge |θ|²``."""
    w = params["Dense_0"]["kernel"]
    penalty = jnp.sum(jnp.exp(hparams)[:, None] * jnp.square(w))
    return classifier.loss(params, batch) + 0.5 * penalty + 0.5 * ridge * common.sq_norm(params)


# --------------------------------------------------------------------------- the task


def make_task(cfg: Config) -> Task:
    """The regularization :class:`~experiments.nhgd.task.Task` (module docstring)."""
    data, splits = cfg.data.load(cfg.seed, require=("val", "test"))
    keep = np.ptp(splits.train.x, axis=0) > 0  # drop features constant on the training part
    train, val, test = (hg.data.to_batch(s._replace(x=s.x[:, keep])) for s in splits)
    num_features, num_classes = int(keep.sum()), data.num_classes

    ridge = cfg.task.ridge
    hparams = jnp.full((num_features,), math.log(cfg.task.init_l2), jnp.float32)

    def metrics(classifier, params, hparams):
        del hparams
        return {
            "val_acc": classifier.accuracy(params, val),
            "test_loss": classifier.loss(params, test),
            "test_acc": classifier.accuracy(params, test),
            "train_loss": classifier.loss(params, train),
        }

    return linear_task(
        f"regularization/{cfg.data.name}",
        cfg.data,
        num_features,
        num_classes,
        lambda c, p, h, b: inner_loss(c, p, h, b, ridge),
        hparams,
        train,
        val,
        metrics,
    )


def build(cfg: Config) -> Experiment:
    return build_comparison(make_task(cfg), cfg.compare, cfg.run)
