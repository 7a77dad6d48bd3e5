"""NHGD regularization: per-feature L2 weights (log space) of logistic regression vs baselines.

The task (NHGD's regularization experiment). Learn one L2 weight per input feature of a linear
classifier, ``λ_j = log`` of the weight, on a validation split, by the stochastic bilevel
methods of :mod:`hypergrad_jax.stochastic` (NHGD and its baselines); the shared runner
:mod:`experiments.nhgd.compare` runs them all and writes the comparison table and the
time-to-target plots.

Data. ``task.dataset`` (sklearn's ``breast_cancer``, 569 × 30, 2 classes, by default, or
``digits``, 1797 × 64, 10 classes) split once (``task.seed``) into train / validation / test,
every feature standardised with the training part's statistics (``hg.data.split``).
Features constant on the training part (digits' always-blank border pixels) are dropped:
their weight is 0 at every ``θ*`` and their ``λ_j`` would get a zero hypergradient, while
their inner curvature ``exp(λ_j)`` is invisible to the empirical Fisher (see the caveat).
Digits' *rare* pixels (non-blank on a few training images) remain and give near-null
directions of the Fisher; breast_cancer's 30 continuous features have none.

Model: a multinomial logistic regression with a *reference class*: ``params = {"w": [d, C−1],
"b": [C−1]}`` and logits ``[x @ w + b, 0]`` (class ``C−1`` has logit 0; for two classes this
is exactly binary logistic regression with ``w: [d, 1]``). The usual ``C`` columns would leave
the likelihood invariant under adding one vector to every column: a direction in which the
inner Hessian is only the ridge floor and the empirical Fisher is (almost) zero, so NHGD's
Fisher inverse would blow up there. With a reference class the likelihood is identifiable.
``params`` is a dict of one dense layer ``x @ w + b``, so K-FAC (``kfac_layers``) applies.

Inner problem (strongly convex in ``θ = (w, b)``; mean over the batch's samples)::

    g(θ, λ) = mean_i NLL(θ; x_i, y_i) + ½ Σ_j exp(λ_j) Σ_c w_jc² + ½ ridge |θ|²

``ridge`` (``task.ridge``, 1e-4) is a floor that keeps ``g`` strongly convex whatever ``λ``
(and covers the bias, which ``λ`` does not penalise). Outer problem: the validation NLL
(mean cross-entropy) ``f(θ)``, on a minibatch of ``task.val_batch`` validation examples per
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
from experiments.nhgd.task import Task

# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The regularization task (module docstring)."""

    dataset: Literal["breast_cancer", "digits"] = "breast_cancer"
    # Keep a random subset of this many examples (null: all of them).
    num_samples: int | None = field(default=None, metadata=bounds(ge=10))
    val_fraction: float = field(default=0.25, metadata=bounds(gt=0, lt=1))
    test_fraction: float = field(default=0.25, metadata=bounds(gt=0, lt=1))
    seed: int = field(default=0, metadata=bounds(ge=0))  # subset and split
    batch_size: int = field(default=32, metadata=bounds(ge=1))  # inner minibatch
    # Validation examples per outer step (drawn without replacement); null: all.
    val_batch: int | None = field(default=None, metadata=bounds(ge=1))
    init_l2: float = field(default=0.01, metadata=bounds(gt=0))  # λ_0 = log(init_l2)
    ridge: float = field(default=1e-4, metadata=bounds(gt=0))  # strong-convexity floor

    def __post_init__(self):
        common.check_fractions("task", self.val_fraction, self.test_fraction)


@dataclasses.dataclass(frozen=True)
class Config:
    experiment: Literal["nhgd_regularization"] = "nhgd_regularization"
    task: TaskConfig = TaskConfig()
    compare: CompareConfig = CompareConfig()
    run: RunConfig = RunConfig()


# --------------------------------------------------------------------------- the model


def init_linear(num_features: int, num_classes: int, dtype=jnp.float32) -> dict:
    """Zero ``{"w": [d, C−1], "b": [C−1]}``: a linear classifier with a reference class."""
    return {
        "w": jnp.zeros((num_features, num_classes - 1), dtype),
        "b": jnp.zeros((num_classes - 1,), dtype),
    }


def linear_logits(params: dict, x: jax.Array) -> jax.Array:
    """``[x @ w + b, 0]``: ``C`` logits, the last class the reference (logit 0)."""
    z = x @ params["w"] + params["b"][None, :]
    return jnp.concatenate([z, jnp.zeros_like(z[:, :1])], axis=1)


def nll(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean cross-entropy of the labels ``y`` under :func:`linear_logits`."""
    logp = jax.nn.log_softmax(linear_logits(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def accuracy(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(linear_logits(params, x), axis=1) == y)


def sq_norm(tree) -> jax.Array:
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


def inner_loss(params: dict, hparams: jax.Array, batch: dict, ridge: float) -> jax.Array:
    """``mean NLL + ½ Σ_j exp(λ_j) Σ_c w_jc² + ½ ridge |θ|²``."""
    penalty = jnp.sum(jnp.exp(hparams)[:, None] * jnp.square(params["w"]))
    return nll(params, batch["x"], batch["y"]) + 0.5 * penalty + 0.5 * ridge * sq_norm(params)


def outer_loss(params: dict, hparams: jax.Array, batch: dict) -> jax.Array:
    del hparams
    return nll(params, batch["x"], batch["y"])


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


def outer_sampler(val: dict, val_batch: int | None):
    """The outer data: the whole validation batch, or ``key -> minibatch`` of it."""
    if val_batch is None:
        return val
    return KeySampler(hg.data.minibatch_sampler(val, val_batch))


# --------------------------------------------------------------------------- the task


def make_task(cfg: TaskConfig) -> Task:
    """The regularization :class:`~experiments.nhgd.task.Task` (module docstring)."""
    data, splits = common.load_splits(
        "task",
        cfg.dataset,
        seed=cfg.seed,
        num_samples=cfg.num_samples,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        batch_size=cfg.batch_size,
        val_batch=cfg.val_batch,
    )
    keep = np.ptp(splits.train.x, axis=0) > 0  # drop features constant on the training part
    train, val, test = (hg.data.to_batch(s._replace(x=s.x[:, keep])) for s in splits)
    num_features, num_classes = int(keep.sum()), data.num_classes

    ridge = cfg.ridge
    problem = hg.BilevelProblem(
        inner_loss=lambda p, h, b: inner_loss(p, h, b, ridge), outer_loss=outer_loss
    )
    hparams = jnp.full((num_features,), math.log(cfg.init_l2), jnp.float32)
    params = init_linear(num_features, num_classes)

    def evaluate(params, hparams):
        del hparams
        return {
            "val_loss": nll(params, val["x"], val["y"]),
            "val_acc": accuracy(params, val["x"], val["y"]),
            "test_loss": nll(params, test["x"], test["y"]),
            "test_acc": accuracy(params, test["x"], test["y"]),
            "train_loss": nll(params, train["x"], train["y"]),
        }

    return Task(
        name=f"regularization/{cfg.dataset}",
        problem=problem,
        hparams=hparams,
        params=params,
        inner_data=hg.data.minibatch_sampler(train, cfg.batch_size),
        outer_data=outer_sampler(val, cfg.val_batch),
        train=train,
        val=val,
        evaluate=evaluate,
        primary="test_acc",
        kfac_layers=(("w", "b"),),
    )


def build(cfg: Config) -> Experiment:
    return build_comparison(make_task(cfg.task), cfg.compare, cfg.run)
