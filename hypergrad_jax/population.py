"""A population of :mod:`hypergrad_jax.outer` states: HPM, "learning to mutate with
hypergradient guided population" (Tao et al., NeurIPS 2020), and its baselines.

    teacher = hg.population.Teacher(scale=1.0)
    state = hg.population.init(optimizer, hparams, params0, key, mutation=teacher)  # [K, ...]
    step = jax.jit(lambda s: hg.population.step(problem, run, hg.Implicit(), optimizer,
                                                teacher, s, inner_data, outer_data, interval=5))
    for _ in range(n):
        state, metrics = step(state)

A member is an :class:`~hypergrad_jax.outer.OuterState`; the population is that state with a
leading axis of size ``K``. One :func:`step` is one *ready interval*: ``interval`` outer steps
of every member at once (``vmap`` of ``hg.outer.step`` inside a ``lax.scan``: any estimator or
stateful method, any outer optimizer; members sharded over devices with
:func:`hypergrad_jax.parallel.population_map` when a ``mesh`` is given, same numbers), then a
score per member (lower is better, +inf when anything is non-finite), then *exploit* (the
bottom ``fraction`` copies the whole member state but its PRNG key from a uniformly drawn
member of the top ``fraction``: truncation selection, Jaderberg et al. 2017) and *explore*
(a mutation value changes the copied hyperparameters). The same function runs the baselines:

=================================  ===========================================================
HPM                                an estimator, ``Teacher()``
HPM without teacher (ablation)     an estimator, ``Gaussian(scale)``
PBT (Jaderberg et al. 2017)        ``NoHypergradient()``, ``Perturb()`` or ``Resample(...)``
hypergradient descent, K starts    an estimator, ``fraction=0`` (no exploit, no mutation)
random search                      ``NoHypergradient()``, ``fraction=0``
=================================  ===========================================================

Hyperparameter space (a choice). The problem takes its hyperparameters unconstrained (a log
learning rate, a logit dropout rate: ``hparams["log_lr"]``); the outer optimizer, the
hypergradients and every mutation act on those values, so no transform's Jacobian enters
anywhere and the teacher's credit uses ``metrics.grad`` as it is. :class:`Transform` maps
them to and from the natural values (``to_constrained`` inside a loss, ``to_unconstrained``
to build the initial population) and tells :class:`Perturb` how "multiply by a factor" reads
in the unconstrained space.

Mutations are values with three pure functions (any value with them plugs in)::

    init(key, hparams) -> state                        # hparams: the population, [K, ...]
    apply(state, key, hparams, context) -> (hparams, state, strengths)
    update(state, hypergrads) -> state                 # hypergrads: [K, ...]

``apply`` gets every member's hyperparameters after the copy and a :class:`Context`; only
the members in ``context.replaced`` take its result. ``update`` runs at the start of the next
exploit with each member's hypergradient at the first outer step of the interval just run,
which for a mutated child is the hypergradient at the hyperparameters the mutation gave it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from hypergrad_jax import outer
from hypergrad_jax.api import Status
from hypergrad_jax.estimators.unrolled import unrolled_solution
from hypergrad_jax.parallel import population_map
from hypergrad_jax.static import typed

PyTree = Any

# --------------------------------------------------------------------------- transforms

_TO_CONSTRAINED = {"identity": lambda h: h, "log": jnp.exp, "logit": jax.nn.sigmoid}
_TO_UNCONSTRAINED = {
    "identity": lambda x: x,
    "log": jnp.log,
    "logit": lambda p: jnp.log(p) - jnp.log1p(-p),
}


def _map_names(spec, fn, *trees):
    """``fn(name, *leaves)`` over ``trees``, each leaf's name read from ``spec`` (a name, or a
    pytree of names that is a prefix of the trees' structure)."""
    for name in jax.tree.leaves(spec):
        if not isinstance(name, str) or name not in _TO_CONSTRAINED:
            raise ValueError(
                f"transform: unknown name {name!r}; expected one of {sorted(_TO_CONSTRAINED)}"
            )
    leaf_map = lambda name, *subs: jax.tree.map(lambda *xs: fn(name, *xs), *subs)  # noqa: E731
    try:
        return jax.tree.map(leaf_map, spec, *trees)
    except ValueError as e:
        raise ValueError(
            f"transform: spec {spec!r} is not a prefix of the hyperparameters' structure: {e}"
        ) from e


@typed
class Transform(NamedTuple):
    """Per-hyperparameter map from the unconstrained value ``h`` to the natural one:
    ``"log"`` (a positive quantity, ``exp(h)``), ``"logit"`` (a rate in (0, 1),
    ``sigmoid(h)``), ``"identity"``. Works on one member's pytree or a population's.

    Attributes:
      spec: one name for every leaf, or a pytree of names that is a prefix of the
        hyperparameters' structure, e.g. ``{"log_lr": "log", "logit_dropout": "logit"}``.
    """

    spec: Any = "identity"

    def to_constrained(self, hparams: PyTree) -> PyTree:
        return _map_names(self.spec, lambda n, h: _TO_CONSTRAINED[n](h), hparams)

    def to_unconstrained(self, values: PyTree) -> PyTree:
        return _map_names(self.spec, lambda n, x: _TO_UNCONSTRAINED[n](x), values)


# --------------------------------------------------------------------------- mutations


class Context(NamedTuple):
    """What a mutation sees at an exploit (leading axis ``K``: the members)."""

    hparams: PyTree  # [K, ...]: every member's hyperparameters at the end of the interval
    scores: jax.Array  # float[K]: lower is better, +inf for a non-finite member
    top: jax.Array  # bool[K]: the top fraction, from which parents are drawn
    replaced: jax.Array  # bool[K]: the bottom fraction, replaced by copies: to mutate
    parents: jax.Array  # int32[K]: the member each one copied (itself when not replaced)


def _draw(key, tree, fn):
    """``fn(key, leaf)`` for every leaf of ``tree``, each leaf with its own key."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    return treedef.unflatten([fn(k, h) for k, h in zip(keys, leaves)])


def _keep(self, state, hypergrads):
    """``update`` of the mutations that do not learn."""
    del hypergrads
    return state


def _like(value, tree):
    """``value`` (one value for every leaf, or a pytree like one member) broadcast to the
    shape and dtype of every leaf of the population ``tree``."""
    cast = lambda v, h: jnp.broadcast_to(jnp.asarray(v, h.dtype), h.shape)  # noqa: E731
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(value)):
        return jax.tree.map(lambda h: cast(value, h), tree)
    return jax.tree.map(cast, value, tree)


@typed
class Perturb(NamedTuple):
    """PBT's perturbation (Jaderberg et al. 2017): each hyperparameter element's natural value
    times a factor drawn uniformly from ``factors``.

    In the unconstrained space: ``"log"`` adds ``log f``; ``"identity"`` multiplies by ``f``
    (0 stays 0); ``"logit"`` multiplies the rate and clips it into ``[1e-6, 1 − 1e-6]``.
    Strength reported: ``log f``.

    Attributes:
      factors: positive factors, drawn with equal probability.
      transform: the :class:`Transform` of the problem's hyperparameters; the default
        reads every hyperparameter as a log.
    """

    factors: tuple = (0.8, 1.2)
    transform: Transform = Transform("log")
    update = _keep

    def init(self, key, hparams):
        del key
        factors = tuple(self.factors) if isinstance(self.factors, (tuple, list)) else ()
        if not factors or not all(isinstance(f, (int, float)) and f > 0 for f in factors):
            raise ValueError(f"Perturb.factors: expected positive numbers, got {self.factors!r}")
        _map_names(self.transform.spec, lambda n, h: h, hparams)
        return ()

    def apply(self, state, key, hparams, context):
        del context
        logs = jnp.log(jnp.asarray(self.factors, float))
        draw = lambda k, h: logs[jax.random.randint(k, h.shape, 0, logs.size)].astype(h.dtype)  # noqa: E731
        logf = _draw(key, hparams, draw)
        return _map_names(self.transform.spec, _perturb, hparams, logf), state, logf


def _perturb(name, h, logf):
    if name == "log":
        return h + logf
    if name == "identity":
        return h * jnp.exp(logf)
    rate = jnp.clip(jax.nn.sigmoid(h) * jnp.exp(logf), 1e-6, 1 - 1e-6)
    return _TO_UNCONSTRAINED["logit"](rate)


@typed
class Resample(NamedTuple):
    """PBT's resampling (Jaderberg et al. 2017): each hyperparameter element is redrawn from
    the initial distribution with probability ``prob``, else kept.

    With ``k_draw, k_mask = jax.random.split(key)``, member ``i`` draws
    ``sampler(jax.random.split(k_draw, K)[i])``. Strength reported: 1 where redrawn, else 0.

    Attributes:
      sampler: ``key -> hparams`` of one member, in the problem's (unconstrained) space.
      prob: probability in [0, 1] of redrawing an element.
    """

    sampler: Callable
    prob: float = 0.25
    update = _keep

    def init(self, key, hparams):
        del key, hparams
        if not callable(self.sampler):
            raise ValueError(f"Resample.sampler: expected key -> hparams, got {self.sampler!r}")
        if not 0 <= self.prob <= 1:
            raise ValueError(f"Resample.prob: expected a probability in [0, 1], got {self.prob}")
        return ()

    def apply(self, state, key, hparams, context):
        del context
        k_draw, k_mask = jax.random.split(key)
        size = jax.tree.leaves(hparams)[0].shape[0]
        draws = jax.vmap(self.sampler)(jax.random.split(k_draw, size))
        masks = _draw(k_mask, hparams, lambda k, h: jax.random.bernoulli(k, self.prob, h.shape))
        child = jax.tree.map(
            lambda m, d, h: jnp.where(m, d, h).astype(h.dtype), masks, draws, hparams
        )
        return child, state, jax.tree.map(lambda m, h: m.astype(h.dtype), masks, hparams)


@typed
class Gaussian(NamedTuple):
    """``h + scale · ε``, ``ε ~ N(0, I)``, in the unconstrained space: fixed-strength
    exploration, HPM's ablation without the teacher (Tao et al. 2020). Strength: ``scale``.

    Attributes:
      scale: a non-negative float, or a pytree like one member's hyperparameters.
    """

    scale: Any = 0.1
    update = _keep

    def init(self, key, hparams):
        del key, hparams
        if not all(bool(jnp.all(jnp.asarray(s) >= 0)) for s in jax.tree.leaves(self.scale)):
            raise ValueError(f"Gaussian.scale: expected non-negative values, got {self.scale!r}")
        return ()

    def apply(self, state, key, hparams, context):
        del context
        noise = _draw(key, hparams, lambda k, h: jax.random.normal(k, h.shape, h.dtype))
        scale = _like(self.scale, hparams)
        return jax.tree.map(lambda h, s, e: h + s * e, hparams, scale, noise), state, scale


def _flatten(tree):
    """A population pytree ``[K, ...]`` as a matrix ``[K, d]``, one row per member."""
    return jax.vmap(lambda h: ravel_pytree(h)[0])(tree)


def _unflatten(flat, like):
    """Inverse of :func:`_flatten` for the structure, shapes and dtypes of ``like``."""
    return jax.vmap(ravel_pytree(jax.tree.map(lambda x: x[0], like))[1])(flat)


def _features(flat, scores):
    """``[h, score]`` per member, z-scored over the finite members (others: zeros)."""
    x = jnp.concatenate([flat, scores[:, None].astype(flat.dtype)], axis=1)
    ok = jnp.all(jnp.isfinite(x), axis=1, keepdims=True)
    n = jnp.maximum(jnp.sum(ok), 1)
    mean = jnp.sum(jnp.where(ok, x, 0), axis=0, keepdims=True) / n
    std = jnp.sqrt(jnp.sum(jnp.where(ok, x - mean, 0) ** 2, axis=0, keepdims=True) / n)
    return jnp.where(ok, (x - mean) / (std + 1e-8), 0)


class _TeacherNet(nn.Module):
    """One attention head (Vaswani et al. 2017) from each query to the top members, then an
    MLP on [query, attended] to ``d`` strengths in (0, 1)."""

    num_hparams: int
    features: int
    dtype: Any

    @nn.compact
    def __call__(self, query, memory, top):
        dense = lambda n: nn.Dense(n, dtype=self.dtype, param_dtype=self.dtype)  # noqa: E731
        q = dense(self.features)(query)
        k, v = dense(self.features)(memory), dense(self.features)(memory)
        logits = q @ k.T / math.sqrt(self.features)
        logits = jnp.where(top[None, :], logits, jnp.finfo(logits.dtype).min)
        attended = jax.nn.softmax(logits, axis=-1) @ v
        hidden = jnp.tanh(dense(self.features)(jnp.concatenate([q, attended], axis=-1)))
        return jax.nn.sigmoid(dense(self.num_hparams)(hidden))


class TeacherRecord(NamedTuple):
    """The last exploration, kept to recompute ``h_child(φ)`` at the next interval."""

    query: jax.Array  # float[K, d+1]: each member's parent's features (z-scored h, score)
    memory: jax.Array  # float[K, d+1]: every member's features
    top: jax.Array  # bool[K]: the members attended to
    noise: jax.Array  # float[K, d]: ε
    mutated: jax.Array  # bool[K]: the children awaiting credit


class TeacherState(NamedTuple):
    params: PyTree  # φ, the attention module's parameters
    opt_state: PyTree  # the teacher optimizer's state
    record: TeacherRecord


@typed
class Teacher(NamedTuple):
    """HPM's learned mutation (Tao et al., NeurIPS 2020), reconstructed from the paper's
    description (it has no public code); any mutation value with the same API replaces it.

    For a replaced member whose parent (a top member) has unconstrained hyperparameters
    ``h_p ∈ R^d`` (the pytree flattened) and score ``s_p``::

        m = sigmoid(MLP([q, Attention(q; keys, values = top members' features)])) ∈ (0,1)^d
        h_child = h_p + scale · m ⊙ ε,        ε ~ N(0, I)   (reparameterised)

    with features ``[h, score]`` z-scored over the population's finite members; the query
    ``q`` embeds the parent's. Strength reported: ``scale · m``.

    Credit assignment (first order). After the child's next interval, with ``L(φ)`` the mean
    over the mutated children of the validation loss ``F(h_child(φ))`` at the first outer
    step of that interval, ``dL/dφ = mean_i (∇F(h_child_i))ᵀ ∂h_child_i/∂φ``. ``∇F(h_child)``
    is the hypergradient the child computes anyway at that first step (``metrics.grad``,
    already in the unconstrained space the mutation acts in); :meth:`credit` applies it as
    the cotangent of one VJP through the recorded ``(query, memory, ε)``. The first step's
    hypergradient, not the last's: it is evaluated exactly at ``h_child``, so ``dL/dφ`` is
    exact whenever the estimator is; the last step's sits at hyperparameters the outer
    optimizer has moved since, whose dependence on φ the rule would ignore. Children with a
    non-finite hypergradient get no credit; with none credited φ is kept.

    Open choices, made here: the features (z-scored ``[h, score]``, all hyperparameters in
    one vector), the module (one head, ``features`` wide, ``tanh`` MLP), one ``optimizer``
    step per interval (at the next exploit, before the new mutation), and ``scale``.

    Attributes:
      scale: ``s``, the largest standard deviation of a mutation in unconstrained units.
      features: width of the attention and the MLP.
      optimizer: an optax transformation on φ.
    """

    scale: float = 1.0
    features: int = 16
    optimizer: optax.GradientTransformation = optax.adam(1e-3)

    def _net(self, record):
        return _TeacherNet(record.noise.shape[1], self.features, record.noise.dtype)

    def init(self, key, hparams):
        if not self.scale > 0:
            raise ValueError(f"Teacher.scale: expected a positive float, got {self.scale!r}")
        if type(self.features) is not int or self.features < 1:
            raise ValueError(f"Teacher.features: expected a positive int, got {self.features!r}")
        flat = _flatten(hparams)
        size, d = flat.shape
        feats = jnp.zeros((size, d + 1), flat.dtype)
        no = jnp.zeros(size, bool)
        record = TeacherRecord(feats, feats, no, jnp.zeros_like(flat), no)
        params = self._net(record).init(key, feats, feats, ~no)
        return TeacherState(params, self.optimizer.init(params), record)

    def strengths(self, params: PyTree, record: TeacherRecord) -> jax.Array:
        """``scale · m`` for every member, ``[K, d]``, from the recorded features."""
        return self.scale * self._net(record).apply(params, record.query, record.memory, record.top)

    def apply(self, state, key, hparams, context):
        flat = _flatten(hparams)
        feats = _features(_flatten(context.hparams), context.scores)
        noise = jax.random.normal(key, flat.shape, flat.dtype)
        record = TeacherRecord(feats[context.parents], feats, context.top, noise, context.replaced)
        strengths = self.strengths(state.params, record)
        child = _unflatten(flat + strengths * noise, hparams)
        return child, state._replace(record=record), _unflatten(strengths, hparams)

    def _credited(self, record, hypergrads):
        flat = _flatten(hypergrads)
        return flat, record.mutated & jnp.all(jnp.isfinite(flat), axis=1)

    def credit(self, state: TeacherState, hypergrads: PyTree) -> PyTree:
        """``dL/dφ`` (see the class docstring) from every member's hypergradient ``[K, ...]``
        at the first step of the interval after the recorded mutation."""
        record = state.record
        flat, ok = self._credited(record, hypergrads)
        cotangent = jnp.where(ok[:, None], flat, 0) / jnp.maximum(jnp.sum(ok), 1)
        _, vjp = jax.vjp(lambda p: self.strengths(p, record) * record.noise, state.params)
        return vjp(cotangent.astype(record.noise.dtype))[0]

    def update(self, state, hypergrads):
        any_ok = jnp.any(self._credited(state.record, hypergrads)[1])
        updates, opt_state = self.optimizer.update(
            self.credit(state, hypergrads), state.opt_state, state.params
        )
        new = (optax.apply_updates(state.params, updates), opt_state)
        params, opt_state = jax.tree.map(
            lambda a, b: jnp.where(any_ok, a, b), new, (state.params, state.opt_state)
        )
        record = state.record._replace(mutated=jnp.zeros_like(state.record.mutated))
        return TeacherState(params, opt_state, record)


# --------------------------------------------------------------------------- no hypergradient


@typed
class NoHypergradient(NamedTuple):
    """An estimator value that runs the inner run and the outer loss but returns a zero
    hypergradient: members move only by exploit/explore (PBT) or stay put (random search),
    through the same :func:`step`. With optax optimizers whose update of a zero gradient is
    zero (``sgd``, ``adam``, :func:`~hypergrad_jax.outer.sign_adaptive`; not a decoupled
    weight decay) the hyperparameters are unchanged by the outer step."""

    def solution(self, problem, run, hparams, params0, inner_data, key):
        theta = unrolled_solution(problem, run, hparams, params0, inner_data, key)
        return jax.lax.stop_gradient(theta)

    def grad(self, problem, run, hparams, params0, inner_data, outer_data, key, warm_start):
        del warm_start
        params = self.solution(problem, run, hparams, params0, inner_data, key)
        value = problem.outer_loss(params, hparams, outer_data)
        return jax.tree.map(jnp.zeros_like, hparams), value, params, None, None


# --------------------------------------------------------------------------- the population


class PopulationState(NamedTuple):
    members: outer.OuterState  # every member's outer state, leaves with a leading axis K
    mutation: PyTree  # the mutation's own state (the teacher's φ, optimizer, record), or ()
    key: jax.Array  # PRNG key of exploit and explore, split once per interval
    step: jax.Array  # int32[]: ready intervals done


class IntervalMetrics(NamedTuple):
    steps: outer.OuterMetrics  # every outer step of every member: leaves [K, interval, ...]
    hparams: PyTree  # [K, interval, ...]: each member's hyperparameters after each outer step
    scores: jax.Array  # float[K]: the evaluation, lower is better; +inf when non-finite
    status: jax.Array  # int32[K]: the last step's hg.Status; NONFINITE when scored +inf
    replaced: jax.Array  # bool[K]: replaced by exploit (then mutated) at the interval's end
    parents: jax.Array  # int32[K]: the member each one copied (itself when not replaced)
    strengths: PyTree  # like hparams [K, ...]: the mutation's strengths, 0 if not mutated


def _population_size(tree, name: str) -> int:
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(tree)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"{name}: every leaf needs the same leading (population) axis; got leading sizes "
            f"{sorted(map(str, sizes))}"
        )
    return sizes.pop()


def init(
    optimizer: optax.GradientTransformation,
    hparams: PyTree,
    params0: PyTree | Callable[[jax.Array], PyTree],
    key: jax.Array,
    *,
    mutation=None,
    method=None,
) -> PopulationState:
    """The population before the first interval: ``K`` members' :func:`hg.outer.init
    <hypergrad_jax.outer.init>` states and the mutation's state.

    Args:
      optimizer: the outer optax transformation (one per member, same settings).
      hparams: the initial population in the problem's (unconstrained) space, every leaf
        with a leading axis ``K``, e.g. ``jax.vmap(sampler)(jax.random.split(key, K))``.
      params0: every member's initial params (leading axis ``K``), or ``key -> params``
        called with one key per member.
      key: PRNG key (members' keys, initial params, the mutation, exploit).
      mutation: the mutation value given to :func:`step` (``None``: none).
      method: a stateful method (``hg.stochastic.NHGD(...)``), as in ``hg.outer.init``.
    """
    size = _population_size(hparams, "hparams")
    k_members, k_params, k_mutation, key = jax.random.split(key, 4)
    if callable(params0):
        params0 = jax.vmap(params0)(jax.random.split(k_params, size))
    elif _population_size(params0, "params0") != size:
        raise ValueError(
            f"params0: leading axis {_population_size(params0, 'params0')} differs from the "
            f"population size {size} of hparams; pass K params or key -> params"
        )
    keys = jax.random.split(k_members, size)
    members = jax.vmap(lambda h, p, k: outer.init(optimizer, h, p, k, method))(
        hparams, params0, keys
    )
    state = () if mutation is None else mutation.init(k_mutation, members.hparams)
    return PopulationState(members, state, key, jnp.zeros((), jnp.int32))


def _num_exploited(fraction, size: int) -> int:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"fraction: expected a number in [0, 0.5], got {fraction!r}")
    if not 0 <= fraction <= 0.5:
        raise ValueError(
            f"fraction: expected a number in [0, 0.5] (the share of members replaced, and of "
            f"members copied from), got {fraction!r}"
        )
    num = math.floor(fraction * size + 1e-9)
    if fraction > 0 and num == 0:
        raise ValueError(
            f"fraction: {fraction} of a population of {size} has no top or bottom member; use "
            f"K >= {math.ceil(1 / fraction - 1e-9)} members, fraction >= {1 / size:.3g}, or 0 "
            "to turn exploit off"
        )
    return num


def _where_members(mask, new, old):
    fn = lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)  # noqa: E731
    return jax.tree.map(fn, new, old)


def _truncation(scores, num: int, key):
    """Truncation selection: the ``num`` worst members copy uniformly drawn ones of the
    ``num`` best (ties broken by index)."""
    size = scores.shape[0]
    order = jnp.argsort(scores, stable=True)
    top, bottom = order[:num], order[size - num :]
    drawn = top[jax.random.randint(key, (num,), 0, num)]
    parents = jnp.arange(size, dtype=jnp.int32).at[bottom].set(drawn.astype(jnp.int32))
    flags = jnp.zeros(size, bool)
    return parents, flags.at[bottom].set(True), flags.at[top].set(True)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def step(
    problem,
    run,
    method,
    optimizer: optax.GradientTransformation,
    mutation,
    state: PopulationState,
    inner_data: PyTree | Callable,
    outer_data: PyTree | Callable,
    *,
    interval: int,
    fraction: float = 0.2,
    score_fn: Callable[[PyTree, PyTree], jax.Array] | None = None,
    reinit: Callable[[jax.Array], PyTree] | None = None,
    skip_nonfinite: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    axis_name: str = "population",
) -> tuple[PopulationState, IntervalMetrics]:
    """One ready interval: ``interval`` outer steps of every member, scores, exploit, explore.

    Pure and jittable (jit it, as ``hg.outer.step``: eagerly every call retraces).

    Args:
      problem, run, method, optimizer, inner_data, outer_data, reinit, skip_nonfinite: as in
        :func:`hypergrad_jax.outer.step`, shared by every member (samplers draw with each
        member's own key); ``method`` may be :class:`NoHypergradient`.
      mutation: :class:`Teacher`, :class:`Gaussian`, :class:`Perturb`, :class:`Resample`,
        any value with their API, or ``None`` (exploit copies, nothing mutates).
      state: a :class:`PopulationState` from :func:`init` (with the same ``mutation``).
      interval: outer steps per ready interval (>= 1).
      fraction: the share of members replaced (the bottom) and copied from (the top), in
        [0, 0.5]; ``floor(fraction · K)`` members each; 0 turns exploit and explore off.
      score_fn: ``(params, hparams) -> scalar`` of a member at the interval's end, lower is
        better. Default: the outer loss of the interval's last step (``f(θ_T, λ)`` at the
        hyperparameters before that step's update). Non-finite scores, params or
        hyperparameters score +inf, so such a member is replaced at this exploit whenever it
        is in the bottom fraction; it never stops the others.
      mesh, axis_name: split the members' outer steps across ``mesh``'s axis ``axis_name``
        with :func:`hypergrad_jax.parallel.population_map` (``K`` a multiple of its size);
        same numbers as on one device. Exploit and explore run on the gathered scores.

    Returns:
      ``(new_state, metrics)``: an :class:`IntervalMetrics`.
    """
    size = _population_size(state.members.step, "state.members")
    num = _num_exploited(fraction, size)
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval: expected a positive int (outer steps), got {interval!r}")
    if mutation is not None and not all(hasattr(mutation, f) for f in ("init", "apply", "update")):
        raise TypeError(f"mutation: expected a value with init/apply/update, got {mutation!r}")

    def train(member):
        def body(s, _):
            s, metrics = outer.step(
                problem, run, method, optimizer, s, inner_data, outer_data,
                reinit=reinit, skip_nonfinite=skip_nonfinite,
            )  # fmt: skip
            return s, (metrics, s.hparams)

        member, (steps, hparams) = jax.lax.scan(body, member, None, length=interval)
        score = (
            steps.outer_loss[-1] if score_fn is None else score_fn(member.params, member.hparams)
        )
        finite = _all_finite((member.params, member.hparams, score))
        return member, steps, hparams, jnp.where(finite, score, jnp.inf)

    mapped = jax.vmap(train) if mesh is None else population_map(train, mesh, axis_name)
    members, steps, hparams, scores = mapped(state.members)
    status = jnp.where(jnp.isfinite(scores), steps.status[:, -1], Status.NONFINITE)
    key, k_parent, k_mutate = jax.random.split(state.key, 3)
    strengths = jax.tree.map(jnp.zeros_like, members.hparams)
    parents, replaced = jnp.arange(size, dtype=jnp.int32), jnp.zeros(size, bool)
    mutation_state = state.mutation
    if num:
        if mutation is not None:
            first = jax.tree.map(lambda g: g[:, 0], steps.grad)
            mutation_state = mutation.update(mutation_state, first)
        parents, replaced, top = _truncation(scores, num, k_parent)
        trained = members
        members = jax.tree.map(lambda x: x[parents], trained._replace(key=None))
        members = members._replace(key=trained.key)  # each member keeps its own key
        if mutation is not None:
            context = Context(trained.hparams, scores, top, replaced, parents)
            child, mutation_state, new = mutation.apply(
                mutation_state, k_mutate, members.hparams, context
            )
            members = members._replace(hparams=_where_members(replaced, child, members.hparams))
            strengths = _where_members(replaced, new, strengths)
    metrics = IntervalMetrics(steps, hparams, scores, status, replaced, parents, strengths)
    return PopulationState(members, mutation_state, key, state.step + 1), metrics


__all__ = [
    "Context",
    "Gaussian",
    "IntervalMetrics",
    "NoHypergradient",
    "Perturb",
    "PopulationState",
    "Resample",
    "Teacher",
    "TeacherRecord",
    "TeacherState",
    "Transform",
    "init",
    "step",
]
