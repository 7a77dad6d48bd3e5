"""HPM on an MLP for sklearn's digits: seven regularisation and optimisation hyperparameters.

A flax MLP (:class:`experiments.common.MLP`, ``model.hidden`` tanh layers) is trained by SGD
with momentum on minibatches of ``data.batch_size``; every member of a population carries
its network across outer steps (warm start, as in PBT: a member is one training run). The
seven hyperparameters, each learned in an unconstrained space (the transform in brackets):

* three dropout rates, on the input and on each hidden layer's input (logit), through the
  concrete relaxation (:func:`experiments.common.concrete_dropout`, Gal et al. 2017) so
  that hypergradients reach them;
* the standard deviation of Gaussian noise added to the inputs (log);
* the L2 weight ``½ exp(log_l2) ||θ||²`` in the training loss (log);
* the learning rate and the momentum of the inner SGD (log, logit).

One outer step is an inner run of ``inner.num_steps`` minibatch steps; its hypergradient is
``hg.Unrolled()`` through that run (a short horizon, as in HPM) of the clean (no dropout, no
noise) validation cross-entropy. A ready interval is ``compare.interval`` outer steps (by
default 4 × 5 × 64 = 1,280 examples, about one epoch of the training part). The initial
population draws dropout rates in [0.05, 0.5], the noise in [0.01, 1], the L2 weight in
[1e-5, 0.1], the learning rate in [0.001, 1] (log-uniform) and momentum in [0.5, 0.99].

A member's score is its last outer step's validation loss; at every interval the runner keeps,
per seed, the best-scored member's validation and test loss and accuracy.
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
from experiments.hpm.compare import CompareConfig, Task, build_comparison

# Flattening order of the hyperparameters (sorted keys), with their transforms.
TRANSFORM = {
    "log_l2": "log",
    "log_lr": "log",
    "log_noise": "log",
    "logit_dropout": "logit",
    "logit_momentum": "logit",
}
NAMES = ("L2", "lr", "input noise", "dropout in", "dropout h1", "dropout h2", "momentum")
RANGES = {  # natural values of the initial population: (low, high, log-uniform?)
    "log_l2": (1e-5, 0.1, True),
    "log_lr": (1e-3, 1.0, True),
    "log_noise": (0.01, 1.0, True),
    "logit_dropout": (0.05, 0.5, False),
    "logit_momentum": (0.5, 0.99, False),
}


@dataclasses.dataclass(frozen=True)
class InnerConfig:
    num_steps: int = field(default=5, metadata=bounds(ge=1))  # per outer step
    clip: float = field(default=3.0, metadata=bounds(gt=0))


@dataclasses.dataclass(frozen=True)
class Config:
    experiment: Literal["hpm_digits"] = "hpm_digits"
    seed: int = field(default=0, metadata=bounds(ge=0))  # split and populations
    data: common.DataConfig = common.DataConfig(val_fraction=0.2, test_fraction=0.2)
    model: common.ModelConfig = common.ModelConfig(hidden=(32, 32))
    inner: InnerConfig = InnerConfig()
    compare: CompareConfig = CompareConfig(
        population=16, intervals=30, interval=4, seeds=3, outer_optimizer="adam", outer_lr=0.05
    )
    run: RunConfig = RunConfig()

    def __post_init__(self):
        common.no_data_parallel(self.run, "hpm_digits", "its populations are vmapped")


def natural(h: dict) -> jax.Array:
    """The seven natural values, in :data:`NAMES` order."""
    return jnp.concatenate(
        [
            jnp.exp(jnp.stack([h["log_l2"], h["log_lr"], h["log_noise"]])),
            jax.nn.sigmoid(h["logit_dropout"]),
            jax.nn.sigmoid(h["logit_momentum"])[None],
        ]
    )


def sample_hparams(key: jax.Array, dtype) -> dict:
    """One member's initial hyperparameters (module docstring), unconstrained."""
    keys = dict(zip(RANGES, jax.random.split(key, len(RANGES))))
    shapes = {"logit_dropout": (3,)}
    out = {}
    for name, (low, high, log) in RANGES.items():
        shape = shapes.get(name, ())
        if log:
            out[name] = jax.random.uniform(keys[name], shape, dtype, np.log(low), np.log(high))
        else:
            p = jax.random.uniform(keys[name], shape, dtype, low, high)
            out[name] = jnp.log(p) - jnp.log1p(-p)
    return out


def make_task(cfg: Config) -> Task:
    if len(cfg.model.hidden) != 2:
        raise ConfigError(
            f"model.hidden: {list(cfg.model.hidden)}; expected two hidden layers (three "
            "dropout rates)"
        )
    data, splits = cfg.data.load(cfg.seed, require=("val", "test"))
    train, val, test = (hg.data.to_batch(s) for s in splits)
    classifier = common.Classifier(common.MLP(data.num_classes, cfg.model.hidden))
    num_features = int(np.prod(data.x.shape[1:]))
    sampler = hg.data.minibatch_sampler(train, cfg.data.batch_size)
    dtype = train["x"].dtype

    def inner_data(key, step):  # a minibatch and the key of its noise and dropout masks
        return {**sampler(key, step), "key": jax.random.fold_in(key, step)}

    def inner_loss(params, h, batch):
        k_noise, k_drop = jax.random.split(batch["key"])
        x = batch["x"] + jnp.exp(h["log_noise"]) * jax.random.normal(k_noise, batch["x"].shape)
        rates = jax.nn.sigmoid(h["logit_dropout"])
        logits = classifier.model.apply({"params": params}, x, dropout=rates, key=k_drop)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))
        return nll + 0.5 * jnp.exp(h["log_l2"]) * common.sq_norm(params)

    problem = hg.BilevelProblem(inner_loss, lambda p, h, b: classifier.loss(p, b))
    run = hg.InnerRun(
        hg.optim.sgd_momentum(clip=cfg.inner.clip),
        cfg.inner.num_steps,
        lambda h: {
            "lr": jnp.exp(h["log_lr"]),
            "momentum": jax.nn.sigmoid(h["logit_momentum"]),
            "weight_decay": 0.0,
        },
    )

    def evaluate(params, h):
        del h
        return {
            "val_loss": classifier.loss(params, val),
            "val_acc": classifier.accuracy(params, val),
            "test_loss": classifier.loss(params, test),
            "test_acc": classifier.accuracy(params, test),
        }

    return Task(
        problem=problem,
        run=run,
        estimator=hg.Unrolled(),
        sample_hparams=lambda key: sample_hparams(key, dtype),
        params0=lambda key: classifier.init(key, num_features, dtype=dtype),
        inner_data=inner_data,
        outer_data=val,
        transform=hg.population.Transform(TRANSFORM),
        evaluate=evaluate,
        score_fn=None,
        names=NAMES,
        natural=natural,
    )


def build(cfg: Config) -> Experiment:
    task = make_task(cfg)
    examples = cfg.compare.interval * cfg.inner.num_steps * cfg.data.batch_size

    def report(summary, rundir):
        summary["examples_per_interval"] = examples
        if rundir.primary:
            print_table(summary, rundir)

    return build_comparison(task, cfg.compare, cfg.run, cfg.seed, report)


def print_table(summary, rundir):
    n = summary["seeds"]
    print(
        f"\nBest member (lowest validation loss) found in {summary['member_intervals']} "
        f"member-intervals (K = {summary['population']}, {summary['intervals']} intervals of "
        f"{summary['examples_per_interval']} training examples), mean ± std over {n} seeds:"
    )
    print(f"{'method':<34}{'val loss':>16}{'test loss':>16}{'test acc':>16}{'time s':>9}")
    for row in summary["methods"].values():
        print(
            f"{row['label']:<34}{row['val_loss']:>9.4f} ± {row['val_loss_std']:.4f}"
            f"{row['test_loss']:>9.4f} ± {row['test_loss_std']:.4f}"
            f"{row['test_acc']:>9.4f} ± {row['test_acc_std']:.4f}{row['seconds']:>9.1f}"
        )
    print(f"run directory: {rundir.path}\nplots: {rundir.plots}")
