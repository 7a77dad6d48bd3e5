"""The NHGD comparison's method registry: one table of the variants it runs.

Each :class:`Variant` says how it is labelled, which ``CompareConfig`` field holds the grid
of its one knob, and how to build the ``hg.stochastic`` method at a grid point; the inner
loop is plain SGD at the grid's ``lr`` for every variant (SOBA, a single loop: one step
per outer step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import optax

import hypergrad_jax as hg
from hypergrad_jax import stochastic

ORACLES = ("grads", "hvps", "mixed", "outer")
SKIP_REASONS = {
    1: "skipped: needs >= 2 JAX devices (on CPU: --local-devices 2)",
    3: "skipped: the task has no kfac_layers",
}


class Variant(NamedTuple):
    label: str  # in tables and plots
    grid: str  # the CompareConfig field holding the knob's grid
    knob: str  # the knob's name
    make: Callable  # (task, cfg, knob) -> the hg.stochastic method; knob may be traced
    single_loop: bool = False  # SOBA: one inner step per outer step
    kfac: bool = False  # needs task.kfac_layers
    parallel: bool = False  # needs two devices


def _nhgd(kfac: bool, parallel: bool):
    def make(task, cfg, knob):
        if kfac:
            fisher = hg.fisher.KFACFisher(task.kfac_layers, "ema", knob, cfg.nhgd_damping)
        else:
            fisher = hg.fisher.DenseFisher(
                "ema", knob, cfg.nhgd_damping, cfg.nhgd_dense_samples, cfg.nhgd_dense_inverse
            )
        # The rank-1 mean-gradient sample (the paper's) has no per-sample weights to correct.
        weights = task.sample_weights if fisher.per_sample else None
        return stochastic.NHGD(fisher, cfg.nhgd_reset, weights, parallel)

    return make


def _stocbio(task, cfg, knob):
    return stochastic.StocBiO(cfg.linear_steps, knob)


def _amigo(task, cfg, knob):
    return stochastic.AmIGO(cfg.linear_steps, knob)


def _soba(task, cfg, knob):
    return stochastic.SOBA(knob)


def _cg(task, cfg, knob):
    return stochastic.SolveAfter(hg.CG(maxiter=knob, tol=cfg.cg_tol, ridge=cfg.cg_ridge))


def _neumann(task, cfg, knob):
    return stochastic.SolveAfter(hg.Neumann(steps=cfg.linear_steps, eta=knob, ridge=cfg.cg_ridge))


VARIANTS = {
    "nhgd_dense": Variant("NHGD dense", "nhgd_betas", "beta", _nhgd(False, False)),
    "nhgd_kfac": Variant("NHGD K-FAC", "nhgd_betas", "beta", _nhgd(True, False), kfac=True),
    "nhgd_dense_parallel": Variant(
        "NHGD dense, parallel", "nhgd_betas", "beta", _nhgd(False, True), parallel=True
    ),
    "nhgd_kfac_parallel": Variant(
        "NHGD K-FAC, parallel",
        "nhgd_betas",
        "beta",
        _nhgd(True, True),
        kfac=True,
        parallel=True,
    ),
    "stocbio": Variant("stocBiO", "stocbio_etas", "eta", _stocbio),
    "amigo": Variant("AmIGO", "amigo_lrs", "linear_lr", _amigo),
    "soba": Variant("SOBA", "soba_lrs", "linear_lr", _soba, single_loop=True),
    "cg": Variant("CG after", "cg_maxiters", "maxiter", _cg),
    "neumann": Variant("Neumann after", "neumann_etas", "eta", _neumann),
}
METHODS = tuple(VARIANTS)


def make_method(name: str, task, cfg, lr, knob):
    """``(method, run)``: variant ``name``'s ``hg.stochastic`` method at grid point
    ``(lr, knob)`` and its inner loop, plain SGD at ``lr`` (``cfg.inner_steps`` steps; a
    single-loop variant one per outer step). ``lr`` and ``knob`` may be tracers (the grid is
    a traced argument of one program)."""
    if name not in VARIANTS:
        raise ValueError(f"compare.methods: unknown method {name!r}; allowed: {METHODS}")
    variant = VARIANTS[name]
    steps = 1 if variant.single_loop else cfg.inner_steps
    run = hg.InnerRun(hg.optim.sgd(), steps, lambda h: {"lr": lr})
    return variant.make(task, cfg, knob), run


def skip_code(name: str, task) -> int:
    """0 if variant ``name`` can run here, else a :data:`SKIP_REASONS` code."""
    variant = VARIANTS[name]
    if variant.kfac and not task.kfac_layers:
        return 3
    if variant.parallel and jax.device_count() < 2:
        return 1
    return 0


def chunk_length(name: str, cfg) -> int:
    """Method iterations per chunk: ``eval_every`` outer steps (single loop: ``T`` iterations
    each, so that every variant gets the same inner steps)."""
    return cfg.eval_every * (cfg.inner_steps if VARIANTS[name].single_loop else 1)


def outer_optimizer(name: str, cfg) -> optax.GradientTransformation:
    lr = cfg.outer_lr
    if VARIANTS[name].single_loop and cfg.soba_scale_outer_lr:
        lr = lr / cfg.inner_steps
    return {"adam": optax.adam, "sgd": optax.sgd}[cfg.outer_optimizer](lr)
