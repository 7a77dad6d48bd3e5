"""Inner optimizers whose hyperparameters are explicit, traced inputs.

An inner optimizer is a pair of pure functions (the shape of optax's
``GradientTransformation``, without closure-captured hyperparameters)::

    init(params, hparams) -> state
    update(grads, state, params, hparams, step) -> (new_params, new_state)

``hparams`` is a dict of the optimizer's hyperparameters *at this step*: scalars, or
pytrees with the structure of ``params`` for per-parameter values. Because they are
arguments, a new value never recompiles and ``grad``/``jvp``/``vmap`` over them work.

Shared (piecewise-constant) schedules: any optimizer hyperparameter may be a
:class:`Shared` of ``N`` values; step ``t`` of a ``T``-step run uses value
``j(t) = floor(N * t / T)`` (equal contiguous blocks, as in FDS: Micaelli & Storkey 2021).
Schedules are resolved by the inner run before ``update`` is called, so every optimizer
supports them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hypergrad_jax.static import typed

PyTree = Any


@typed
class InnerOptimizer(NamedTuple):
    """An inner optimizer: pure ``init``/``update`` plus the hyperparameters it reads.

    Attributes:
      init: ``(params, hparams) -> state``.
      update: ``(grads, state, params, hparams, step) -> (params, state)``.
      name: used in error messages.
      required: hyperparameter names that must be given.
      defaults: hyperparameter names that may be given, with their default values
        (``None``: left to the optimizer, not filled in).
    """

    init: Callable
    update: Callable
    name: str
    required: tuple[str, ...]
    defaults: tuple[tuple[str, float], ...] = ()

    def resolve(self, hparams: Any) -> dict:
        """Checks the optimizer's hyperparameters and fills in defaults.

        Raises:
          TypeError / ValueError naming the missing or unknown keys.
        """
        if not isinstance(hparams, dict):
            raise TypeError(
                f"optimizer {self.name!r}: its hyperparameters must be a dict with keys "
                f"{sorted(self.required)} (optional {sorted(k for k, _ in self.defaults)}); "
                f"got {type(hparams).__name__}"
            )
        known = set(self.required) | {k for k, _ in self.defaults}
        missing = sorted(set(self.required) - set(hparams))
        unknown = sorted(set(hparams) - known)
        if missing or unknown:
            raise ValueError(
                f"optimizer {self.name!r}: hyperparameters missing {missing}, unknown {unknown}; "
                f"it takes {sorted(self.required)} and optionally "
                f"{sorted(k for k, _ in self.defaults)}"
            )
        return {**{k: v for k, v in self.defaults if v is not None}, **hparams}


class Shared(NamedTuple):
    """A piecewise-constant schedule: ``values[floor(N * step / num_steps)]``.

    Attributes:
      values: array of shape ``(N,)`` (or ``(N, ...)`` for a per-parameter schedule).
    """

    values: jax.Array


def shared_index(num_values: int, step: jax.Array, num_steps: int) -> jax.Array:
    """Block index ``floor(N * t / T)`` of step ``t``; a longer run stretches the blocks."""
    return jnp.minimum((num_values * step) // num_steps, num_values - 1)


def at_step(hparams: PyTree, step: jax.Array, num_steps: int) -> PyTree:
    """Replaces every :class:`Shared` in ``hparams`` by its value at ``step``."""

    def value(h):
        if isinstance(h, Shared):
            return h.values[shared_index(h.values.shape[0], step, num_steps)]
        return h

    return jax.tree.map(value, hparams, is_leaf=lambda h: isinstance(h, Shared))


def per_param(value: Any, params: PyTree, name: str, opt: str) -> PyTree:
    """Broadcasts a scalar hyperparameter over ``params``, or checks a per-parameter tree."""
    leaves = jax.tree.leaves(value)
    if len(leaves) == 1 and jnp.ndim(leaves[0]) == 0 and not isinstance(value, (dict, list, tuple)):
        return jax.tree.map(lambda _: value, params)
    if jax.tree.structure(value) != jax.tree.structure(params):
        raise ValueError(
            f"optimizer {opt!r}: hyperparameter {name!r} must be a scalar (or a Shared "
            f"schedule of scalars) or a pytree with the structure of params; got structure "
            f"{jax.tree.structure(value)} with shapes {[jnp.shape(x) for x in leaves]}, "
            f"params structure {jax.tree.structure(params)}"
        )
    return value


def _step_like(param, new):
    # Hyperparameters stay float32 while params may be bf16: keep the carry's dtype stable.
    return new.astype(param.dtype)


def sgd() -> InnerOptimizer:
    """Plain gradient descent ``θ ← θ − α g``. Hyperparameters: ``lr``."""

    def init(params, hparams):
        del params, hparams
        return ()

    def update(grads, state, params, hparams, step):
        del step
        lr = per_param(hparams["lr"], params, "lr", "sgd")
        new = jax.tree.map(lambda p, g, a: _step_like(p, p - a * g), params, grads, lr)
        return new, state

    return InnerOptimizer(init, update, "sgd", ("lr",))


class MomentumState(NamedTuple):
    velocity: PyTree  # like params


def sgd_momentum(
    momentum: float = 0.0, weight_decay: float = 0.0, clip: float | None = None
) -> InnerOptimizer:
    """SGD with momentum and weight decay in the PyTorch convention (as FDS uses it)::

        g = clip(∇θ L, ±c)       v' = β v + g + ξ θ       θ' = θ − α v'

    Hyperparameters: ``lr`` (α), optional ``momentum`` (β) and ``weight_decay`` (ξ), whose
    defaults are the constructor's arguments. ``clip`` (elementwise gradient clipping, the
    FDS default is 3.0) is structural, not a hyperparameter.
    """

    def init(params, hparams):
        del hparams
        return MomentumState(jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params, hparams, step):
        del step
        a, b, xi = (
            per_param(hparams[k], params, k, "sgd_momentum")
            for k in ("lr", "momentum", "weight_decay")
        )
        if clip is not None:
            grads = jax.tree.map(lambda g: jnp.clip(g, -clip, clip), grads)
        vel = jax.tree.map(
            lambda v, g, p, b_, x_: _step_like(v, b_ * v + g + x_ * p),
            state.velocity,
            grads,
            params,
            b,
            xi,
        )
        new = jax.tree.map(lambda p, v, a_: _step_like(p, p - a_ * v), params, vel, a)
        return new, MomentumState(vel)

    return InnerOptimizer(
        init,
        update,
        "sgd_momentum",
        ("lr",),
        (("momentum", momentum), ("weight_decay", weight_decay)),
    )


class AdamState(NamedTuple):
    mu: PyTree  # first moment, like params
    nu: PyTree  # second moment, like params


def adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 1e-12
) -> InnerOptimizer:
    """Adam, differentiable in its hyperparameters::

        m' = β1 m + (1−β1) g        v' = β2 v + (1−β2) g²
        θ' = θ − α m̂ / (sqrt(v̂ + eps_root) + eps)      (m̂, v̂ bias-corrected)

    ``eps_root > 0`` keeps ``d sqrt(v)/dv`` finite where a gradient is exactly zero;
    with ``eps_root = 0`` hypergradients through such a step are NaN, which
    :func:`hypergrad_jax.hypergradient` reports as ``Status.NONFINITE``.

    Hyperparameters: ``lr``, optional ``b1``, ``b2``, ``eps`` (constructor defaults).
    """

    def init(params, hparams):
        del hparams
        zeros = jax.tree.map(jnp.zeros_like, params)
        return AdamState(zeros, zeros)

    def update(grads, state, params, hparams, step):
        t = jnp.asarray(step + 1, jnp.result_type(float))  # the default float dtype
        a, beta1, beta2, e = (hparams[k] for k in ("lr", "b1", "b2", "eps"))
        lr = per_param(a, params, "lr", "adam")
        mu = jax.tree.map(lambda m, g: _step_like(m, beta1 * m + (1 - beta1) * g), state.mu, grads)
        nu = jax.tree.map(
            lambda v, g: _step_like(v, beta2 * v + (1 - beta2) * g * g), state.nu, grads
        )

        def move(p, m, v, a_):
            m_hat = m / (1 - beta1**t)
            v_hat = v / (1 - beta2**t)
            return _step_like(p, p - a_ * m_hat / (jnp.sqrt(v_hat + eps_root) + e))

        return jax.tree.map(move, params, mu, nu, lr), AdamState(mu, nu)

    return InnerOptimizer(init, update, "adam", ("lr",), (("b1", b1), ("b2", b2), ("eps", eps)))


def from_optax(factory: Callable[..., optax.GradientTransformation]) -> InnerOptimizer:
    """Wraps an optax optimizer factory so that its numeric arguments come from ``hparams``.

    ``from_optax(optax.adamw)`` reads ``hparams = {"learning_rate": ..., "weight_decay":
    ...}``; the factory is called with them inside ``update`` (they are traced values), the
    way ``optax.inject_hyperparams`` does. The factory's required arguments must be given;
    its keyword defaults may be.

    Its state must not depend on the hyperparameters' values (true of optax's optimizers).
    """
    sig = inspect.signature(factory)
    required = tuple(
        n
        for n, p in sig.parameters.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )
    optional = tuple(
        (n, None)
        for n, p in sig.parameters.items()
        if p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )
    name = getattr(factory, "__name__", "optax")

    def init(params, hparams):
        return factory(**hparams).init(params)

    def update(grads, state, params, hparams, step):
        del step
        updates, state = factory(**hparams).update(grads, state, params)
        new = jax.tree.map(lambda p, u: _step_like(p, p + u), params, updates)
        return new, state

    return InnerOptimizer(init, update, name, required, optional)
