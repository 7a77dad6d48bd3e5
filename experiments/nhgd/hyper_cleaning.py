"""NHGD hyper-cleaning: learn per-sample weights σ(v_i) of noisy training data, vs baselines.

The task (Franceschi et al. 2017's data hyper-cleaning, as in the NHGD paper). Half of
the training labels are corrupted; a weight ``σ(v_i)`` per training example is learned so that
a classifier trained on the weighted data does well on clean validation data. The stochastic
bilevel methods of :mod:`hypergrad_jax.stochastic` (NHGD, dense and K-FAC, fused and
parallel, and its baselines) are run by the shared runner :mod:`experiments.nhgd.compare`,
which writes the comparison table and the time-to-target plots.

Data. ``data.name``: sklearn's ``digits`` (1797 × 64, default) or ``mnist1d`` (the package's
offline generator, ``data.num_samples`` examples, 40 features; the ``mnist1d`` preset
generates 10,000). Split once (``seed``) into train / validation / test, every feature
standardised with the training part's statistics (``hg.data.split``); features constant on
the training part (digits' always-blank border pixels) are dropped. With ``task.pca = k``
(default 32; ``null`` keeps the features) the features are then the top ``k`` principal
components of the training part, each scaled to unit variance (PCA whitening, fitted on the
training part only).

Why PCA by default. Digits' pixels include rare ones (non-blank in a handful of images): a
pixel that is blank on every training image of a (noisy) label class makes directions in
which *every* per-sample gradient vanishes. There the inner Hessian is only the ridge, while
the empirical Fisher — NHGD's surrogate — is exactly zero, so NHGD's EMA inverse grows like
``β^{-t}/damping`` and overflows (dozens of such directions on the raw features; float32
NaN within tens of outer steps at β = 0.9, even with a symmetrised update). Whitened
principal components are dense combinations of pixels: no null directions (the smallest
Fisher eigenvalue is ~1e-5 at k = 32). The classifier is still linear in the pixels.

Label noise. ``round(task.corrupt_fraction · n_train)`` training labels (default 50%) are
replaced by ``hg.data.corrupt_labels``: each chosen label is redrawn uniformly from the *other*
``C − 1`` classes, so every corrupted label is wrong (resampling from all ``C`` classes would
leave ``1/C`` of them right by chance; here the corrupted mask is exactly the wrong labels,
which the F1 score needs). Validation and test labels stay clean.

Model: :func:`experiments.nhgd.task.linear_classifier`, multinomial logistic regression with
a *reference class* (logits ``[x @ w + b, 0]``: the usual ``C`` columns leave the likelihood
invariant under adding one vector to every column, a direction in which the Fisher is zero),
one flax ``Dense`` layer, so K-FAC applies; ``θ`` starts at 0.

Bilevel problem. Hyperparameters ``λ = {"v": float[n_train]}``, all starting at
``task.init_logit`` (default 0: ``σ = 0.5``, every example equally trusted; since flags are
``σ(v_i) < 0.5``, nothing is flagged at the start and F1 is 0 there). The inner batch carries
each example's index ``idx`` into ``v``::

    g(θ, λ) = mean_i σ(v_idx_i) · CE(θ; x_i, ỹ_i) + ½ ridge |θ|²      (ỹ: noisy labels)
    f(θ)    = mean_j CE(θ; x_j, y_j)                               (clean validation data)

``ridge`` (``task.ridge``, 1e-3) keeps ``g`` strongly convex whatever ``λ`` (the exact
reference is a Newton solve). ``g`` is a weighted likelihood, so ``sample_weights`` returns
``σ(v_i)`` of the batch (NHGD rescales per-sample gradients by ``1/√σ`` for its Fisher). Note:
the ridge's gradient ``ridge · w`` is part of every per-sample gradient, so a sample's gradient
is not exactly rank one and K-FAC's recovery of ``(a_i, δ_i)`` is approximate (the error is
of order ``ridge |w| / |δ_i|``).

Outer data: the whole validation split (``data.val_batch: null``) or a minibatch of it per
outer step. Metrics (``evaluate``): ``val_loss`` (``f`` on all validation data), ``test_acc``
(the primary metric), ``f1``: the F1 score of flagging example ``i`` as corrupted when
``σ(v_i) < 0.5`` (:func:`f1_score`).
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
    """The hyper-cleaning task (module docstring)."""

    corrupt_fraction: float = field(default=0.5, metadata=bounds(ge=0, le=1))
    # Features: the top `pca` principal components of the training part, each scaled to unit
    # variance (null: the standardised raw features). See the module docstring.
    pca: int | None = field(default=32, metadata=bounds(ge=1))
    ridge: float = field(default=1e-3, metadata=bounds(gt=0))  # ½ ridge |θ|² in g
    init_logit: float = 0.0  # v_i at the start (σ(0) = 0.5)


@dataclasses.dataclass(frozen=True)
class Config:
    experiment: Literal["nhgd_hyper_cleaning"] = "nhgd_hyper_cleaning"
    seed: int = field(default=0, metadata=bounds(ge=0))  # data, split and label noise
    data: common.DataConfig = common.DataConfig(val_fraction=0.2, test_fraction=0.2, batch_size=128)
    task: TaskConfig = TaskConfig()
    compare: CompareConfig = CompareConfig()
    run: RunConfig = RunConfig()


# --------------------------------------------------------------------------- the problem


def inner_loss(
    classifier: common.Classifier, params: dict, hparams: dict, batch: dict, ridge: float
) -> jax.Array:
    """``mean_i σ(v_idx_i) CE_i + ½ ridge |θ|²`` (module docstring)."""
    weights = jax.nn.sigmoid(hparams["v"][batch["idx"]])
    ce = classifier.nll(params, batch)
    return jnp.mean(weights * ce) + 0.5 * ridge * common.sq_norm(params)


def sample_weights(hparams: dict, batch: dict) -> jax.Array:
    """``σ(v_i)`` of the batch's examples: ``g`` is a likelihood weighted by them."""
    return jax.nn.sigmoid(hparams["v"][batch["idx"]])


def f1_score(flagged: jax.Array, corrupted: jax.Array) -> jax.Array:
    """F1 of the boolean predictions ``flagged`` against the truth ``corrupted``:
    ``2 TP / (2 TP + FP + FN)``, and 0 when nothing is flagged or corrupted (TP = FP = FN = 0).
    Jittable."""
    flagged, corrupted = jnp.asarray(flagged, bool), jnp.asarray(corrupted, bool)
    tp = jnp.sum(flagged & corrupted)
    wrong = jnp.sum(flagged != corrupted)  # FP + FN
    denom = 2 * tp + wrong
    return jnp.where(denom > 0, 2 * tp / jnp.maximum(denom, 1), 0.0)


# --------------------------------------------------------------------------- the task


def load_splits(cfg: Config):
    """The standardised splits with constant features dropped (module docstring)."""
    data, splits = cfg.data.load(cfg.seed, require=("val", "test"))
    keep = np.ptp(splits.train.x, axis=0) > 0
    splits = hg.data.Splits(*(s._replace(x=s.x[:, keep]) for s in splits))
    if cfg.task.pca is not None:
        splits = whiten(splits, cfg.task.pca)
    return splits, data.num_classes


def whiten(splits, k: int):
    """Every split projected on the top ``k`` principal components of the (centred,
    standardised) training part, each component scaled to unit variance there."""
    x = splits.train.x.astype(np.float64)
    if k > x.shape[1]:
        raise ConfigError(f"task.pca: {k} > {x.shape[1]} non-constant features")
    mean = x.mean(axis=0)
    var, vecs = np.linalg.eigh(np.cov(x - mean, rowvar=False, bias=True))
    top = np.argsort(var)[::-1][:k]
    basis = vecs[:, top] / np.sqrt(var[top])  # unit variance on the training part
    return hg.data.Splits(
        *(s._replace(x=((s.x - mean) @ basis).astype(np.float32)) for s in splits)
    )


def make_task(cfg: Config) -> tuple[Task, np.ndarray]:
    """The hyper-cleaning :class:`~experiments.nhgd.task.Task` and the corrupted mask."""
    splits, num_classes = load_splits(cfg)
    d, t = cfg.data, cfg.task
    train, val, test = (hg.data.to_batch(s) for s in splits)
    n_train, num_features = splits.train.x.shape
    noisy, corrupted = hg.data.corrupt_labels(
        splits.train.y, t.corrupt_fraction, num_classes, cfg.seed
    )
    train = {
        "x": train["x"],
        "y": jnp.asarray(noisy, jnp.int32),
        "idx": jnp.arange(n_train, dtype=jnp.int32),
    }
    corrupted_arr = jnp.asarray(corrupted)
    ridge, dtype = t.ridge, train["x"].dtype
    hparams = {"v": jnp.full((n_train,), t.init_logit, dtype)}

    def metrics(classifier, params, hparams):
        flagged = jax.nn.sigmoid(hparams["v"]) < 0.5
        return {
            "test_acc": classifier.accuracy(params, test),
            "f1": f1_score(flagged, corrupted_arr),
        }

    task = linear_task(
        f"hyper_cleaning/{d.name}",
        d,
        num_features,
        num_classes,
        lambda c, p, h, b: inner_loss(c, p, h, b, ridge),
        hparams,
        train,
        val,
        metrics,
        sample_weights=sample_weights,
        dtype=dtype,
    )
    return task, corrupted


def build(cfg: Config) -> Experiment:
    task, _ = make_task(cfg)
    return build_comparison(task, cfg.compare, cfg.run)
