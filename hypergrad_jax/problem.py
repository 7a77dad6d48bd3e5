"""The bilevel problem, the inner run, and the inner training loop.

A bilevel problem is two user functions with one signature, ``(params, hparams, batch)
-> scalar``: the inner loss ``g`` (minimised over params by the inner run) and the outer
loss ``f`` (evaluated at the run's end point). An inner run is a fixed-length
``lax.scan`` of an :class:`~hypergrad_jax.optim.InnerOptimizer` over batches.

Inner data is either a batch (a pytree of arrays used at every step: full batch) or a
jittable sampler ``(key, step) -> batch`` called with ``fold_in(key, step)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from hypergrad_jax import optim
from hypergrad_jax.data import batch_at
from hypergrad_jax.static import typed

PyTree = Any


@typed
class BilevelProblem(NamedTuple):
    """``min_λ f(θ_T(λ), λ)`` where ``θ_T(λ)`` trains ``g(·, λ)``.

    Attributes:
      inner_loss: ``(params, hparams, batch) -> scalar`` (``g``).
      outer_loss: ``(params, hparams, batch) -> scalar`` (``f``).
    """

    inner_loss: Callable
    outer_loss: Callable


def optimizer_hparams(hparams: PyTree) -> PyTree:
    """Default selector: the optimizer's hyperparameters are ``hparams["optimizer"]``."""
    if not isinstance(hparams, dict) or "optimizer" not in hparams:
        raise ValueError(
            "hparams: the default InnerRun.optimizer_hparams reads hparams['optimizer']; "
            f"hparams is a {type(hparams).__name__} with "
            f"{sorted(hparams) if isinstance(hparams, dict) else 'no keys'}. Put the "
            "optimizer's hyperparameters there, or pass optimizer_hparams=lambda h: {...}"
        )
    return hparams["optimizer"]


@typed
class InnerRun(NamedTuple):
    """A fixed-length inner training run.

    Attributes:
      optimizer: the inner optimizer (``hypergrad_jax.optim``).
      num_steps: number of optimizer steps ``T``.
      optimizer_hparams: ``hparams -> dict`` of the optimizer's hyperparameters, which may
        contain :class:`~hypergrad_jax.optim.Shared` schedules and transforms such as
        ``jnp.exp`` for log-space parameterisations. Defaults to ``hparams["optimizer"]``.
    """

    optimizer: optim.InnerOptimizer
    num_steps: int
    optimizer_hparams: Callable = optimizer_hparams


class InnerState(NamedTuple):
    params: PyTree  # the model parameters θ_t
    opt_state: PyTree  # the inner optimizer's state


def initial_params(params0: PyTree | Callable, hparams: PyTree) -> PyTree:
    """``params0``, or ``params0(hparams)`` when the initialisation is a hyperparameter."""
    return params0(hparams) if callable(params0) else params0


def init_state(run: InnerRun, hparams: PyTree, params: PyTree) -> InnerState:
    """The inner run's starting state at ``params`` (optimizer state from its ``init``)."""
    ohp = _optimizer_hparams_at(run, hparams, jnp.int32(0))
    return InnerState(params, run.optimizer.init(params, ohp))


def _optimizer_hparams_at(run: InnerRun, hparams: PyTree, step) -> dict:
    ohp = run.optimizer.resolve(run.optimizer_hparams(hparams))
    return optim.at_step(ohp, step, run.num_steps)


def optimizer_update(run: InnerRun, hparams, grads, state: InnerState, step) -> InnerState:
    """One update of ``run``'s optimizer from ``grads`` at inner step ``step`` (its
    hyperparameters, schedules resolved, at that step)."""
    ohp = _optimizer_hparams_at(run, hparams, step)
    params, opt_state = run.optimizer.update(grads, state.opt_state, state.params, ohp, step)
    return InnerState(params, opt_state)


def inner_step(problem, run, hparams, data, key, state: InnerState, step) -> InnerState:
    """One optimizer step on the batch of ``step``."""
    grads = jax.grad(problem.inner_loss)(state.params, hparams, batch_at(data, key, step))
    return optimizer_update(run, hparams, grads, state, step)


def run_steps(
    problem: BilevelProblem,
    run: InnerRun,
    hparams: PyTree,
    state: InnerState,
    data: PyTree | Callable,
    key: jax.Array | None,
    start: int,
    length: int,
    remat: bool = False,
) -> InnerState:
    """Steps ``start .. start + length - 1`` as one ``lax.scan``.

    Under reverse mode each step is rematerialised (``jax.checkpoint``): the backward pass
    stores only the carry (parameters and optimizer state) per step and recomputes the
    step's interior (the batch, the loss's activations and gradient). On the benchmark MLP
    this is faster than storing the interior (3.2x vs 4.4x a plain run at T = 1000, 8x
    less memory: ``benchmarks/results/estimators.md``); without reverse mode it changes
    nothing.

    With ``remat``, the steps are also grouped in blocks of ``ceil(sqrt(length))`` whose
    bodies are rematerialised: only block boundaries and one block's carries are stored,
    so the memory of differentiating the run grows like ``sqrt(length)``, at the cost of
    one more forward pass.
    """

    @jax.checkpoint
    def body(s, t):
        return inner_step(problem, run, hparams, data, key, s, t), None

    def segment(state, first, n):
        return jax.lax.scan(body, state, first + jnp.arange(n, dtype=jnp.int32))[0]

    if length <= 0:
        return state
    if not remat:
        return segment(state, start, length)
    block = math.isqrt(length - 1) + 1  # ceil(sqrt(length))
    num_blocks, rest = divmod(length, block)
    block_fn = jax.checkpoint(lambda s, first: segment(s, first, block))
    firsts = start + block * jnp.arange(num_blocks, dtype=jnp.int32)
    state = jax.lax.scan(lambda s, f: (block_fn(s, f), None), state, firsts)[0]
    return segment(state, start + num_blocks * block, rest)


def optimality_batch(run: InnerRun, data: PyTree | Callable, key: jax.Array | None) -> PyTree:
    """The batch on which the inner optimality condition is evaluated: the full batch, or
    the sampler's batch for step ``T`` (a fresh minibatch) when the data is a sampler."""
    return batch_at(data, key, jnp.int32(run.num_steps))


def inner_residual(problem, params, hparams, batch) -> jax.Array:
    """``||∇θ g(θ, λ; batch)||``: how far the run's end point is from inner optimality."""
    g = jax.grad(problem.inner_loss)(params, hparams, batch)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(g)))


# --------------------------------------------------------------------------- validation


def _describe(tree) -> str:
    return str(jax.tree.map(lambda x: f"{jnp.result_type(x)}{list(jnp.shape(x))}", tree))


def float_literals(tree: PyTree) -> PyTree:
    """Python ``int`` leaves as ``float`` (``{"log_l2": -2}`` means -2.0); integer *arrays*
    are left alone, and rejected by :func:`validate` (an explicit integer dtype has no
    gradient)."""
    return jax.tree.map(
        lambda x: float(x) if isinstance(x, int) and not isinstance(x, bool) else x, tree
    )


def _check_float_leaves(tree, name: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not hasattr(leaf, "dtype") and not isinstance(leaf, (int, float)):
            raise TypeError(
                f"{name}: leaf {jax.tree_util.keystr(path)} is a {type(leaf).__name__}; "
                "expected arrays or Python floats"
            )
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"{name}: leaf {jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; "
                "expected a floating-point dtype (hypergradients need float leaves)"
            )


def _check_scalar_loss(fn, name, params, hparams, batch) -> None:
    try:
        out = jax.eval_shape(fn, params, hparams, batch)
    except Exception as e:  # noqa: BLE001 -- re-raised with the structures that were passed
        raise type(e)(
            f"{name}(params, hparams, batch) failed on params {_describe(params)}, "
            f"hparams {_describe(hparams)}, batch {_describe(batch)}: {e}"
        ) from e
    if not hasattr(out, "shape") or out.shape != () or not jnp.issubdtype(out.dtype, jnp.inexact):
        raise ValueError(
            f"{name} must return a float scalar; it returned {_describe(out)}. "
            "Reduce it (e.g. jnp.mean) before returning."
        )


_NO_OUTER = object()


def validate(problem, run, hparams, params0, inner_data, key, outer_data=_NO_OUTER) -> None:
    """Checks shapes and types at trace time (``jax.eval_shape``: no compute).

    Raises ``TypeError``/``ValueError`` naming the argument and what was expected.
    """
    if not isinstance(problem, BilevelProblem):
        raise TypeError(f"problem: expected a BilevelProblem, got {type(problem).__name__}")
    if not isinstance(run, InnerRun):
        raise TypeError(f"run: expected an InnerRun, got {type(run).__name__}")
    if not isinstance(run.num_steps, int) or run.num_steps < 1:
        raise ValueError(f"run.num_steps: expected a positive int, got {run.num_steps!r}")
    _check_float_leaves(hparams, "hparams")
    params = jax.eval_shape(lambda h: initial_params(params0, h), hparams)
    _check_float_leaves(params, "params0")
    if callable(inner_data):
        if key is None:
            raise ValueError("key: required when inner_data is a sampler (key, step) -> batch")
        try:
            batch = jax.eval_shape(inner_data, key, jnp.int32(0))
        except Exception as e:  # noqa: BLE001
            raise TypeError(
                f"inner_data: a sampler must be a jittable (key, step) -> batch; calling it "
                f"raised {type(e).__name__}: {e}"
            ) from e
        bad = [x for x in jax.tree.leaves(batch) if not hasattr(x, "shape")]
        if bad or not jax.tree.leaves(batch):
            raise TypeError(
                f"inner_data: the sampler must return a pytree of arrays; it returned {batch!r}"
            )
    else:
        batch = inner_data
    _check_scalar_loss(problem.inner_loss, "inner_loss", params, hparams, batch)
    if outer_data is not _NO_OUTER:
        _check_scalar_loss(problem.outer_loss, "outer_loss", params, hparams, outer_data)
    ohp = run.optimizer.resolve(run.optimizer_hparams(hparams))
    for name, value in ohp.items():  # a per-parameter value must match params
        optim.per_param(optim.at_step(value, 0, run.num_steps), params, name, run.optimizer.name)
