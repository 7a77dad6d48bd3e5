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
the training part (digits' always-blank border pixels) are dropped. With ``data.pca = k``
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

Label noise. ``round(data.corrupt_fraction · n_train)`` training labels (default 50%) are
replaced by ``hg.data.corrupt_labels``: each chosen label is redrawn uniformly from the *other*
``C − 1`` classes, so every corrupted label is wrong (resampling from all ``C`` classes would
leave ``1/C`` of them right by chance; here the corrupted mask is exactly the wrong labels,
which the F1 score needs). Validation and test labels stay clean.

Model: a multinomial logistic regression with a *reference class*, ``params = {"w": [d, C−1],
"b": [C−1]}``, logits ``[x @ w + b, 0]`` (the usual ``C`` columns leave the likelihood
invariant under adding one vector to every column: a direction in which the Fisher is zero).
``params`` is one dense layer, so K-FAC applies (``kfac_layers = (("w", "b"),)``).

Bilevel problem. Hyperparameters ``λ = {"v": float[n_train]}``, all starting at
``model.init_logit`` (default 0: ``σ = 0.5``, every example equally trusted; since flags are
``σ(v_i) < 0.5``, nothing is flagged at the start and F1 is 0 there). The inner batch carries
each example's index ``idx`` into ``v``::

    g(θ, λ) = mean_i σ(v_idx_i) · CE(θ; x_i, ỹ_i) + ½ ridge |θ|²      (ỹ: noisy labels)
    f(θ)    = mean_j CE(θ; x_j, y_j)                               (clean validation data)

``ridge`` (``model.ridge``, 1e-3) keeps ``g`` strongly convex whatever ``λ`` (the exact
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
from experiments.nhgd.task import Task

# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: Literal["digits", "mnist1d"] = "digits"
    # mnist1d: examples generated (a multiple of 10); digits: a random subset (null: all 1797).
    num_samples: int | None = field(default=None, metadata=bounds(ge=10))
    val_fraction: float = field(default=0.2, metadata=bounds(gt=0, lt=1))
    test_fraction: float = field(default=0.2, metadata=bounds(gt=0, lt=1))
    corrupt_fraction: float = field(default=0.5, metadata=bounds(ge=0, le=1))
    batch_size: int = field(default=128, metadata=bounds(ge=1))  # inner minibatch
    # Validation examples per outer step (drawn without replacement); null: all of them.
    val_batch: int | None = field(default=None, metadata=bounds(ge=1))
    # Features: the top `pca` principal components of the training part, each scaled to unit
    # variance (null: the standardised raw features). See the module docstring.
    pca: int | None = field(default=32, metadata=bounds(ge=1))

    def __post_init__(self):
        common.check_fractions("data", self.val_fraction, self.test_fraction)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    ridge: float = field(default=1e-3, metadata=bounds(gt=0))  # ½ ridge |θ|² in g
    init_logit: float = 0.0  # v_i at the start (σ(0) = 0.5)


@dataclasses.dataclass(frozen=True)
class Config:
    experiment: Literal["nhgd_hyper_cleaning"] = "nhgd_hyper_cleaning"
    seed: int = field(default=0, metadata=bounds(ge=0))  # data, split and label noise
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    compare: CompareConfig = CompareConfig()
    run: RunConfig = RunConfig()


# --------------------------------------------------------------------------- the model


def logits(params: dict, x: jax.Array) -> jax.Array:
    """``[x @ w + b, 0]``: ``C`` logits, the last class the reference (logit 0)."""
    z = x @ params["w"] + params["b"][None, :]
    return jnp.concatenate([z, jnp.zeros_like(z[:, :1])], axis=1)


def per_sample_ce(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits(params, x))
    return -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]


def inner_loss(params: dict, hparams: dict, batch: dict, ridge: float) -> jax.Array:
    """``mean_i σ(v_idx_i) CE_i + ½ ridge |θ|²`` (module docstring)."""
    weights = jax.nn.sigmoid(hparams["v"][batch["idx"]])
    ce = per_sample_ce(params, batch["x"], batch["y"])
    sq = sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))
    return jnp.mean(weights * ce) + 0.5 * ridge * sq


def outer_loss(params: dict, hparams: dict, batch: dict) -> jax.Array:
    del hparams
    return jnp.mean(per_sample_ce(params, batch["x"], batch["y"]))


def sample_weights(hparams: dict, batch: dict) -> jax.Array:
    """``σ(v_i)`` of the batch's examples: ``g`` is a likelihood weighted by them."""
    return jax.nn.sigmoid(hparams["v"][batch["idx"]])


def accuracy(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits(params, x), axis=1) == y)


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
    d = cfg.data
    data, splits = common.load_splits(
        "data",
        d.name,
        seed=cfg.seed,
        num_samples=d.num_samples,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        batch_size=d.batch_size,
        val_batch=d.val_batch,
    )
    keep = np.ptp(splits.train.x, axis=0) > 0
    splits = hg.data.Splits(*(s._replace(x=s.x[:, keep]) for s in splits))
    if d.pca is not None:
        splits = whiten(splits, d.pca)
    return splits, data.num_classes


def whiten(splits, k: int):
    """Every split projected on the top ``k`` principal components of the (centred,
    standardised) training part, each component scaled to unit variance there."""
    x = splits.train.x.astype(np.float64)
    if k > x.shape[1]:
        raise ConfigError(f"data.pca: {k} > {x.shape[1]} non-constant features")
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
    d, m = cfg.data, cfg.model
    train, val, test = (hg.data.to_batch(s) for s in splits)
    n_train, num_features = splits.train.x.shape
    noisy, corrupted = hg.data.corrupt_labels(
        splits.train.y, d.corrupt_fraction, num_classes, cfg.seed
    )
    train = {
        "x": train["x"],
        "y": jnp.asarray(noisy, jnp.int32),
        "idx": jnp.arange(n_train, dtype=jnp.int32),
    }
    corrupted_arr = jnp.asarray(corrupted)
    ridge = m.ridge
    problem = hg.BilevelProblem(
        inner_loss=lambda p, h, b: inner_loss(p, h, b, ridge), outer_loss=outer_loss
    )
    dtype = train["x"].dtype
    params = {
        "w": jnp.zeros((num_features, num_classes - 1), dtype),
        "b": jnp.zeros((num_classes - 1,), dtype),
    }
    hparams = {"v": jnp.full((n_train,), m.init_logit, dtype)}

    def evaluate(params, hparams):
        flagged = jax.nn.sigmoid(hparams["v"]) < 0.5
        return {
            "val_loss": outer_loss(params, None, val),
            "test_acc": accuracy(params, test["x"], test["y"]),
            "f1": f1_score(flagged, corrupted_arr),
        }

    if d.val_batch is None:
        outer_data = val
    else:
        val_sampler = hg.data.minibatch_sampler(val, d.val_batch)
        outer_data = lambda key: val_sampler(key, 0)  # noqa: E731
    task = Task(
        name=f"hyper_cleaning/{d.name}",
        problem=problem,
        hparams=hparams,
        params=params,
        inner_data=hg.data.minibatch_sampler(train, d.batch_size),
        outer_data=outer_data,
        train=train,
        val=val,
        evaluate=evaluate,
        primary="test_acc",
        kfac_layers=(("w", "b"),),
        sample_weights=sample_weights,
    )
    return task, corrupted


def build(cfg: Config) -> Experiment:
    task, _ = make_task(cfg)
    return build_comparison(task, cfg.compare, cfg.run)
