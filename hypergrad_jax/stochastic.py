"""Stochastic bilevel methods on minibatch oracles: NHGD and the baselines it is measured against.

Every method is a value (a NamedTuple of its settings) with two pure, jittable functions::

    state = method.init(params, hparams)
    state, grad, stats = method.step(problem, state, hparams, inner_data, outer_data, key)

``inner_data`` is a minibatch sampler ``(key, step) -> batch`` (or one batch used at every
step); ``outer_data`` a batch or ``key -> batch``. ``grad`` estimates ``∇F(λ)``; the caller
applies any optax transformation to the hyperparameters (:func:`outer_init` and
:func:`outer_step` do exactly that). ``state`` carries what a method keeps between outer
steps: the inner iterate ``θ`` (always warm-started), the linear-system variable ``v``
(AmIGO, SOBA, :class:`SolveAfter`) and NHGD's Fisher-inverse state. ``stats.oracles`` counts
the minibatch oracle calls of the step: gradients, Hessian-vector products and mixed
products ``∂²_{λθ} g · v`` of the inner loss, and gradients of the outer loss.

Methods (ALGORITHMS.md §1, §3), all with inner SGD at a fixed step ``lr``:

* :class:`NHGD`: ``num_steps`` SGD steps whose gradients also update an online inverse
  ``A ≈ F̂⁻¹`` of the empirical Fisher in the same ``lax.scan`` ("optimize-and-approximate");
  then ``ĥ = ∇_λ f − ∂²_{λθ} g · (A ∇_θ f)``: one mixed product, no linear solve.
* :class:`StocBiO`: SGD steps, then a Neumann series on fresh minibatch HVPs.
* :class:`AmIGO`: SGD steps, then SGD on the linear system ``H v = ∇_θ f`` warm-started
  from the previous outer step's ``v``.
* :class:`SOBA`: single loop; one step each on ``θ``, ``v`` and (by the caller) ``λ``.
* :class:`SolveAfter`: SGD steps, then a :mod:`~hypergrad_jax.linalg` solver (``CG``,
  ``Neumann``) on one minibatch's Hessian ("optimize-then-approximate").

The inner loss must be a mean over the leading axis of the batch for the per-sample Fisher
options (each sample's gradient is the loss's gradient on a batch of one).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from hypergrad_jax import linalg
from hypergrad_jax.linalg import tree_axpy
from hypergrad_jax.problem import batch_at
from hypergrad_jax.static import typed

PyTree = Any


class Oracles(NamedTuple):
    """Minibatch oracle calls in one outer step (int32 scalars). Per-sample gradients of a
    minibatch (``vmap(grad)``) count as one gradient: they cost about as much."""

    grads: jax.Array  # ∇_θ g on a minibatch
    hvps: jax.Array  # ∂²_{θθ} g · v
    mixed: jax.Array  # ∂²_{λθ} g · v
    outer: jax.Array  # ∇ f on an outer batch

    @property
    def total(self) -> jax.Array:
        return self.grads + self.hvps + self.mixed + self.outer


def _oracles(grads=0, hvps=0, mixed=1, outer=1) -> Oracles:
    return Oracles(*(jnp.asarray(x, jnp.int32) for x in (grads, hvps, mixed, outer)))


class Stats(NamedTuple):
    outer_value: jax.Array  # f(θ, λ) on the outer batch, at the θ the hypergradient used
    oracles: Oracles


class State(NamedTuple):
    params: PyTree  # θ: the inner iterate, warm-started across outer steps
    adjoint: PyTree  # v ≈ H⁻¹ ∇_θ f (AmIGO, SOBA, SolveAfter), zeros for the others
    fisher: PyTree  # NHGD's Fisher-inverse state, () for the others
    step: jax.Array  # int32[]: outer steps done


def _init_state(params, fisher=()) -> State:
    zeros = jax.tree.map(jnp.zeros_like, params)
    return State(params, zeros, fisher, jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------- shared pieces


def _check_positive(method, **fields) -> None:
    for name, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(
                f"{type(method).__name__}.{name}: expected a positive number, got {value!r}"
            )


def _check_steps(method, **fields) -> None:
    for name, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{type(method).__name__}.{name}: expected a positive int, got {value!r}"
            )


def _keys(key):
    """Independent streams: inner SGD batches, linear-system batches, outer batch."""
    if key is None:
        raise ValueError("key: a PRNG key is required by the stochastic methods")
    return jax.random.split(key, 3)


def _outer_batch(outer_data, key):
    return outer_data(key) if callable(outer_data) else outer_data


def _outer_grads(problem, params, hparams, batch):
    """``f`` and its gradients ``(∇_θ f, ∇_λ f)``: one outer oracle call."""
    value, (f_theta, f_hparams) = jax.value_and_grad(problem.outer_loss, argnums=(0, 1))(
        params, hparams, batch
    )
    return value, f_theta, f_hparams


def _hvp(problem, params, hparams, batch):
    return lambda v: linalg.hvp(problem.inner_loss, params, v, hparams, batch)


def _mixed_hypergradient(problem, params, hparams, batch, v, f_hparams):
    """``∇_λ f − ∂²_{λθ} g · v``: one mixed product (a VJP of ``λ -> ∇_θ g``)."""
    _, vjp = jax.vjp(lambda h: jax.grad(problem.inner_loss)(params, h, batch), hparams)
    return tree_axpy(-1.0, vjp(v)[0], f_hparams)


def _sgd(problem, hparams, params, inner_data, key, num_steps, lr):
    """``num_steps`` SGD steps on the sampler's batches ``0 .. num_steps − 1``."""

    def body(p, t):
        g = jax.grad(problem.inner_loss)(p, hparams, batch_at(inner_data, key, t))
        return tree_axpy(-lr, g, p), None

    return jax.lax.scan(body, params, jnp.arange(num_steps, dtype=jnp.int32))[0]


def _batch_size(batch) -> int:
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "inner_data: NHGD's Fisher samples need the batch size (u = √B ḡ, or B "
            "per-sample gradients), so every batch leaf must share a leading (sample) axis; "
            f"got leading sizes {sorted(map(str, sizes))}"
        )
    return sizes.pop()


def _per_sample_grads(problem, params, hparams, batch):
    """Each sample's gradient (the loss on a batch of one), stacked on a leading axis."""
    one = lambda b: jax.grad(problem.inner_loss)(  # noqa: E731
        params, hparams, jax.tree.map(lambda x: x[None], b)
    )
    return jax.vmap(one)(batch)


# --------------------------------------------------------------------------- Fisher


class FisherMatrix(NamedTuple):
    matrix: jax.Array  # float[d, d]: the Fisher estimate F itself (DenseFisher(inverse="solve"))
    count: jax.Array  # int32[]: updates so far


@typed
class DenseFisher(NamedTuple):
    """A dense empirical Fisher ``F̂`` and its inverse ``A`` (``O(|θ|²)`` memory).

    Attributes:
      average: ``"ema"`` (``F' = β F + (1−β) F_sample``) or ``"mean"`` (the running mean
        of every sample so far).
      beta: the EMA factor.
      damping: ``ρ``. With ``inverse="online"``, the prior ``F_0 = ρ I`` (``A_0 = I / ρ``),
        which decays like ``β^t`` (EMA) or ``1/t`` (mean, the prior counting as one
        sample): it regularises the early inverse only. With ``inverse="solve"``, a
        constant ridge: ``A = (F̂ + ρ I)⁻¹``; set it to the inner loss's own ridge, which
        the Hessian has and the gradients' Fisher lacks.
      samples: how a minibatch becomes Fisher samples. ``"mean"``: one rank-1 sample
        ``u = √B ḡ`` from the minibatch mean gradient the SGD step uses (no extra cost;
        ``E[ḡḡᵀ] = F/B + ∇g∇gᵀ``, unbiased at the optimum). ``"woodbury"``: the ``B``
        per-sample gradients in one rank-``B`` update (online: a ``B × B`` Woodbury solve).
        ``"sequential"``: ``B`` rank-1 updates, one per sample (with ``"ema"`` the decay per
        inner step is ``β^B``).
      inverse: ``"online"`` (the paper's): ``A`` itself is the state, updated by
        Sherman–Morrison / Woodbury every inner step, ``O(B d²)`` per step and no solve
        after the loop. ``"solve"``: ``F̂`` is the state (the same rank-``B`` updates of
        ``F`` instead of ``A``; EMA bias-corrected by ``1/(1−β^t)``), and ``A ∇_θ f`` is one
        Cholesky solve with ``F̂ + ρ I`` after the loop, ``O(d³/3)``: cheaper when
        ``d < 3 T B``, and numerically robust.

    Caveat (online EMA): where the Fisher is (nearly) singular — softmax outputs (every
    sample's gradient is orthogonal to the all-ones class direction), constant or
    low-variance input features — only the decaying prior remains and ``A`` grows like
    ``β^{-t}/ρ`` there; in float32 the recursion then loses precision within a few hundred
    updates. Use ``inverse="solve"``, ``average="mean"``, ``NHGD(reset=True)`` or a larger
    damping for long carried runs.
    """

    average: str = "ema"
    beta: float = 0.95
    damping: float = 1e-3
    samples: str = "mean"
    inverse: str = "online"

    @property
    def per_sample(self) -> bool:
        return self.samples != "mean"

    def init(self, params):
        for name, allowed in (
            ("average", ("ema", "mean")),
            ("samples", ("mean", "woodbury", "sequential")),
            ("inverse", ("online", "solve")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"DenseFisher.{name}: expected one of {allowed}, got {getattr(self, name)!r}"
                )
        if isinstance(self.beta, (int, float)) and not 0 < self.beta < 1:
            raise ValueError(f"DenseFisher.beta: expected 0 < beta < 1, got {self.beta!r}")
        flat, _ = ravel_pytree(params)
        if self.inverse == "solve":
            zeros = jnp.zeros((flat.size, flat.size), flat.dtype)
            return FisherMatrix(zeros, jnp.zeros((), jnp.int32))
        return linalg.fisher_init(flat.size, self.damping, flat.dtype)

    def update(self, state, u, per_sample_grads):
        """One inner step's update from ``u = √B ḡ`` or the per-sample gradients."""
        if self.samples == "mean":
            rows = ravel_pytree(u)[0][None]
        else:
            rows = jax.vmap(lambda g: ravel_pytree(g)[0])(per_sample_grads)
        if self.inverse == "solve":
            return self._update_matrix(state, rows)
        ema = self.average == "ema"
        if self.samples == "mean":
            if ema:
                return linalg.fisher_ema_update(state, rows[0], self.beta)
            return linalg.fisher_mean_update(state, rows[0])
        if self.samples == "woodbury":
            if ema:
                return linalg.fisher_ema_update_batch(state, rows, self.beta)
            return linalg.fisher_mean_update_batch(state, rows)
        one = (
            (lambda s, r: linalg.fisher_ema_update(s, r, self.beta))
            if ema
            else linalg.fisher_mean_update
        )
        return jax.lax.scan(lambda s, r: (one(s, r), None), state, rows)[0]

    def _update_matrix(self, state: FisherMatrix, rows) -> FisherMatrix:
        """``F' = keep·F + (1 − keep)/B · UᵀU`` (sequential: one row at a time)."""
        groups = rows[:, None] if self.samples == "sequential" else rows[None]

        def one(state, us):
            if self.average == "ema":
                keep = jnp.asarray(self.beta, rows.dtype)
            else:  # the mean of every update so far: F_t = mean of the batch Fishers
                keep = 1.0 - 1.0 / (state.count + 1).astype(rows.dtype)
            batch = us.T @ us / us.shape[0]
            return FisherMatrix(keep * state.matrix + (1 - keep) * batch, state.count + 1), None

        return jax.lax.scan(one, state, groups)[0]

    def apply(self, state, tree):
        flat, unravel = ravel_pytree(tree)
        if self.inverse == "online":
            return unravel(state.inverse @ flat)
        matrix = state.matrix
        if self.average == "ema":  # bias correction: the EMA started from F = 0
            weight = 1 - jnp.asarray(self.beta, matrix.dtype) ** state.count
            matrix = matrix / jnp.where(state.count > 0, weight, 1)
        eye = jnp.eye(flat.size, dtype=matrix.dtype)
        factor = jax.scipy.linalg.cho_factor(matrix + self.damping * eye)
        return unravel(jax.scipy.linalg.cho_solve(factor, flat))


# --------------------------------------------------------------------------- methods

SAMPLE_WEIGHT_FLOOR = 1e-3  # NHGD.sample_weights: amplification of unweighted terms <= ~32x


@typed
class NHGD(NamedTuple):
    """Natural hypergradient descent (Kong, Chen, Zhang, Mou 2026; ALGORITHMS.md §3).

    ``num_steps`` inner SGD steps; each step's gradients also update ``A ≈ F̂⁻¹`` inside the
    same ``lax.scan`` (the Fisher equals the inner Hessian at the optimum of a
    well-specified negative log-likelihood). Then ``ĥ = ∇_λ f − ∂²_{λθ} g · (A ∇_θ f)`` at
    ``θ_T`` with one mixed product on a fresh minibatch. Oracles per outer step:
    ``num_steps`` gradients, 0 HVPs, 1 mixed product, 1 outer gradient.

    Attributes:
      num_steps, lr: inner SGD steps per outer step and their step size.
      fisher: :class:`DenseFisher` or :class:`hypergrad_jax.kfac.KFACFisher` (block
        diagonal, for MLPs).
      reset: start each outer step from the prior (``True``) or carry ``A`` over (default).
      sample_weights: ``(hparams, batch) -> float[B]``, for inner losses that are weighted
        likelihoods ``Σ w_i ℓ_i``: their Hessian is ``Σ w_i ∇²ℓ_i ≈ Σ w_i F_i`` while the
        gradients' second moment is ``Σ w_i² ∇ℓ_i∇ℓ_iᵀ``, so per-sample gradients are divided
        by ``√w_i`` before the Fisher update (per-sample Fishers only). Weights are floored
        at :data:`SAMPLE_WEIGHT_FLOOR`: a sample's gradient also carries the loss's
        unweighted terms (e.g. a ridge), which the division would otherwise blow up.
      parallel: run the Fisher update on a second device, concurrently with the inner SGD
        (the paper's parallel implementation; needs two devices): same numbers as the fused
        loop, per-step critical path ``max(gradient, Fisher update) + transfer`` instead of
        their sum. See :func:`_parallel_inner_loop`.
    """

    num_steps: int
    lr: float
    fisher: Any = DenseFisher()
    reset: bool = False
    sample_weights: Callable | None = None
    parallel: bool = False

    def init(self, params, hparams):
        del hparams
        _check_steps(self, num_steps=self.num_steps)
        _check_positive(self, lr=self.lr)
        if self.sample_weights is not None and not self.fisher.per_sample:
            raise ValueError(
                "NHGD.sample_weights: needs per-sample Fisher updates (e.g. "
                "DenseFisher(samples='woodbury') or KFACFisher); the fisher given uses "
                "the minibatch mean gradient"
            )
        if self.parallel and jax.device_count() < 2:
            raise ValueError(
                f"NHGD.parallel: needs 2 devices, {jax.device_count()} available (on CPU set "
                "XLA_FLAGS=--xla_force_host_platform_device_count=2 before JAX starts, or "
                "`hypergrad run ... --local-devices 2`)"
            )
        return _init_state(params, self.fisher.init(params))

    def samples(self, problem, hparams, params, batch):
        """One inner step's gradient and its Fisher samples ``(u = √B ḡ, per-sample)``."""
        per = None
        if self.fisher.per_sample:
            per = _per_sample_grads(problem, params, hparams, batch)
            grad = jax.tree.map(lambda x: jnp.mean(x, axis=0), per)
            if self.sample_weights is not None:
                w = self.sample_weights(hparams, batch)
                scale = jax.lax.rsqrt(jnp.maximum(w, SAMPLE_WEIGHT_FLOOR))
                per = jax.tree.map(lambda x: x * scale.reshape((-1,) + (1,) * (x.ndim - 1)), per)
        else:
            grad = jax.grad(problem.inner_loss)(params, hparams, batch)
        u = jax.tree.map(lambda g: g * math.sqrt(_batch_size(batch)), grad)
        return grad, (u, per)

    def step(self, problem, state, hparams, inner_data, outer_data, key):
        k_inner, _, k_outer = _keys(key)
        fisher = self.fisher.init(state.params) if self.reset else state.fisher
        loop = _parallel_inner_loop if self.parallel else _fused_inner_loop
        params, fisher = loop(self, problem, hparams, state.params, fisher, inner_data, k_inner)
        value, f_theta, f_hparams = _outer_grads(
            problem, params, hparams, _outer_batch(outer_data, k_outer)
        )
        w = self.fisher.apply(fisher, f_theta)
        batch = batch_at(inner_data, k_inner, jnp.int32(self.num_steps))
        grad = _mixed_hypergradient(problem, params, hparams, batch, w, f_hparams)
        new = State(params, state.adjoint, fisher, state.step + 1)
        return new, grad, Stats(value, _oracles(grads=self.num_steps))


def _fused_inner_loop(method, problem, hparams, params, fisher, inner_data, key):
    """NHGD's inner loop on one device: each step's gradient moves ``θ`` and updates ``A``."""

    def body(carry, t):
        params, fisher = carry
        batch = batch_at(inner_data, key, t)
        grad, samples = method.samples(problem, hparams, params, batch)
        fisher = method.fisher.update(fisher, *samples)
        return (tree_axpy(-method.lr, grad, params), fisher), None

    steps = jnp.arange(method.num_steps, dtype=jnp.int32)
    return jax.lax.scan(body, (params, fisher), steps)[0]


_ROLE = "nhgd_role"


def _parallel_inner_loop(method, problem, hparams, params, fisher, inner_data, key):
    """NHGD's inner loop on two devices, pipelined: at step ``t`` device 0 computes the
    gradient at ``θ_t`` and steps ``θ``, while device 1 updates ``A`` with step ``t − 1``'s
    Fisher samples; the samples then move 0 → 1 (``ppermute``). Device 1 applies the last
    samples after the loop. The sequence of updates, hence every number, is the fused
    loop's. Both devices run one SPMD program; ``lax.cond`` on the device index selects
    each device's role at run time.
    """
    mesh = jax.make_mesh(
        (2,), (_ROLE,), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2]
    )
    probe = batch_at(inner_data, key, jnp.int32(0))
    _, empty = jax.eval_shape(lambda: method.samples(problem, hparams, params, probe))
    empty = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), empty)

    def roles(params, fisher, hparams, key):
        me = jax.lax.axis_index(_ROLE)

        def optimize(carry, t):  # device 0
            params, fisher, _ = carry
            grad, samples = method.samples(problem, hparams, params, batch_at(inner_data, key, t))
            return tree_axpy(-method.lr, grad, params), fisher, samples

        def approximate(carry, t):  # device 1: the samples of step t − 1
            params, fisher, inbox = carry
            fisher = jax.lax.cond(
                t > 0, lambda: method.fisher.update(fisher, *inbox), lambda: fisher
            )
            return params, fisher, inbox

        def body(carry, t):
            params, fisher, outbox = jax.lax.cond(me == 0, optimize, approximate, carry, t)
            return (params, fisher, jax.lax.ppermute(outbox, _ROLE, [(0, 1)])), None

        steps = jnp.arange(method.num_steps, dtype=jnp.int32)
        params, fisher, inbox = jax.lax.scan(body, (params, fisher, empty), steps)[0]
        fisher = method.fisher.update(fisher, *inbox)
        # Each device keeps what it owns; hand it to both (a masked sum over the axis).
        own = lambda x, owner: jax.lax.psum(jnp.where(me == owner, x, jnp.zeros_like(x)), _ROLE)  # noqa: E731
        return jax.tree.map(lambda x: own(x, 0), params), jax.tree.map(lambda x: own(x, 1), fisher)

    spec = jax.sharding.PartitionSpec()
    run = jax.shard_map(
        roles, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec, spec), check_vma=False
    )
    return run(params, fisher, hparams, key)


@typed
class StocBiO(NamedTuple):
    """stocBiO (Ji, Yang, Liang 2021): ``num_steps`` SGD steps, then the Neumann series
    ``v = η Σ_{j<Q} Π_{i<j} (I − η H_i) ∇_θ f`` with a fresh minibatch Hessian ``H_i`` per
    term (``Q − 1`` HVPs), then one mixed product."""

    num_steps: int
    lr: float
    neumann_steps: int = 10
    neumann_lr: float = 0.1

    def init(self, params, hparams):
        del hparams
        _check_steps(self, num_steps=self.num_steps, neumann_steps=self.neumann_steps)
        _check_positive(self, lr=self.lr, neumann_lr=self.neumann_lr)
        return _init_state(params)

    def step(self, problem, state, hparams, inner_data, outer_data, key):
        k_inner, k_linear, k_outer = _keys(key)
        params = _sgd(problem, hparams, state.params, inner_data, k_inner, self.num_steps, self.lr)
        value, f_theta, f_hparams = _outer_grads(
            problem, params, hparams, _outer_batch(outer_data, k_outer)
        )

        def term(carry, j):
            p, total = carry
            hp = _hvp(problem, params, hparams, batch_at(inner_data, k_linear, j))(p)
            p = tree_axpy(-self.neumann_lr, hp, p)
            return (p, tree_axpy(1.0, p, total)), None

        steps = jnp.arange(self.neumann_steps - 1, dtype=jnp.int32)
        _, total = jax.lax.scan(term, (f_theta, f_theta), steps)[0]
        v = jax.tree.map(lambda x: self.neumann_lr * x, total)
        batch = batch_at(inner_data, k_inner, jnp.int32(self.num_steps))
        grad = _mixed_hypergradient(problem, params, hparams, batch, v, f_hparams)
        stats = Stats(value, _oracles(grads=self.num_steps, hvps=self.neumann_steps - 1))
        return State(params, v, (), state.step + 1), grad, stats


@typed
class AmIGO(NamedTuple):
    """AmIGO (Arbel & Mairal 2022): ``num_steps`` warm-started SGD steps, then
    ``linear_steps`` SGD steps ``v ← v − γ (H_j v − ∇_θ f)`` on fresh minibatches, ``v``
    warm-started from the previous outer step; then one mixed product."""

    num_steps: int
    lr: float
    linear_steps: int = 10
    linear_lr: float = 0.1

    def init(self, params, hparams):
        del hparams
        _check_steps(self, num_steps=self.num_steps, linear_steps=self.linear_steps)
        _check_positive(self, lr=self.lr, linear_lr=self.linear_lr)
        return _init_state(params)

    def step(self, problem, state, hparams, inner_data, outer_data, key):
        k_inner, k_linear, k_outer = _keys(key)
        params = _sgd(problem, hparams, state.params, inner_data, k_inner, self.num_steps, self.lr)
        value, f_theta, f_hparams = _outer_grads(
            problem, params, hparams, _outer_batch(outer_data, k_outer)
        )

        def sgd_step(v, j):
            hv = _hvp(problem, params, hparams, batch_at(inner_data, k_linear, j))(v)
            return tree_axpy(-self.linear_lr, tree_axpy(-1.0, f_theta, hv), v), None

        steps = jnp.arange(self.linear_steps, dtype=jnp.int32)
        v = jax.lax.scan(sgd_step, state.adjoint, steps)[0]
        batch = batch_at(inner_data, k_inner, jnp.int32(self.num_steps))
        grad = _mixed_hypergradient(problem, params, hparams, batch, v, f_hparams)
        stats = Stats(value, _oracles(grads=self.num_steps, hvps=self.linear_steps))
        return State(params, v, (), state.step + 1), grad, stats


@typed
class SOBA(NamedTuple):
    """SOBA (Dagréou, Ablin, Vaiter, Moreau 2022): a single loop. Per outer step, on one
    minibatch at the current ``(θ, v)``: ``ĥ = ∇_λ f − ∂²_{λθ} g · v``,
    ``θ ← θ − α ∇_θ g``, ``v ← v − γ (H v − ∇_θ f)``. The gradient, HVP and mixed product
    come from one linearisation of ``∇_θ g`` in ``(θ, λ)``."""

    lr: float
    linear_lr: float = 0.1

    def init(self, params, hparams):
        del hparams
        _check_positive(self, lr=self.lr, linear_lr=self.linear_lr)
        return _init_state(params)

    def step(self, problem, state, hparams, inner_data, outer_data, key):
        k_inner, _, k_outer = _keys(key)
        params, v = state.params, state.adjoint
        value, f_theta, f_hparams = _outer_grads(
            problem, params, hparams, _outer_batch(outer_data, k_outer)
        )
        batch = batch_at(inner_data, k_inner, state.step)
        g, vjp = jax.vjp(lambda p, h: jax.grad(problem.inner_loss)(p, h, batch), params, hparams)
        hv, mixed = vjp(v)  # H is symmetric: the VJP in θ is H v
        grad = tree_axpy(-1.0, mixed, f_hparams)
        params = tree_axpy(-self.lr, g, params)
        v = tree_axpy(-self.linear_lr, tree_axpy(-1.0, f_theta, hv), v)
        stats = Stats(value, _oracles(grads=1, hvps=1))
        return State(params, v, (), state.step + 1), grad, stats


@typed
class SolveAfter(NamedTuple):
    """Optimize-then-approximate: ``num_steps`` SGD steps, then ``(H + ridge I) v = ∇_θ f``
    solved by ``solver`` (:class:`~hypergrad_jax.linalg.CG`, ``Neumann``) on one fresh
    minibatch's Hessian, warm-started from the previous ``v`` if ``warm_start``. The HVP
    count includes the initial and the reported final residual."""

    num_steps: int
    lr: float
    solver: Any = linalg.CG(maxiter=10, tol=1e-6)
    warm_start: bool = True

    def init(self, params, hparams):
        del hparams
        _check_steps(self, num_steps=self.num_steps)
        _check_positive(self, lr=self.lr)
        return _init_state(params)

    def step(self, problem, state, hparams, inner_data, outer_data, key):
        k_inner, _, k_outer = _keys(key)
        params = _sgd(problem, hparams, state.params, inner_data, k_inner, self.num_steps, self.lr)
        value, f_theta, f_hparams = _outer_grads(
            problem, params, hparams, _outer_batch(outer_data, k_outer)
        )
        batch = batch_at(inner_data, k_inner, jnp.int32(self.num_steps))
        x0 = state.adjoint if self.warm_start else None
        v, info = self.solver(_hvp(problem, params, hparams, batch), f_theta, x0)
        grad = _mixed_hypergradient(problem, params, hparams, batch, v, f_hparams)
        stats = Stats(value, _oracles(grads=self.num_steps, hvps=info.iterations + 2))
        return State(params, v, (), state.step + 1), grad, stats


METHODS = (NHGD, StocBiO, AmIGO, SOBA, SolveAfter)


# --------------------------------------------------------------------------- outer loop


class OuterState(NamedTuple):
    hparams: PyTree
    opt_state: PyTree  # the optax state of the outer optimizer
    method: State
    key: jax.Array


def outer_init(method, optimizer, hparams, params, key) -> OuterState:
    """The state before the first outer step (validates the method's settings)."""
    hparams, params = jax.tree.map(lambda x: jnp.array(x, jnp.result_type(x)), (hparams, params))
    return OuterState(hparams, optimizer.init(hparams), method.init(params, hparams), key)


def outer_step(problem, method, optimizer, state: OuterState, inner_data, outer_data):
    """One outer step: ``method.step`` then the optax update of the hyperparameters.
    Returns ``(state, (grad, stats))``."""
    key, sub = jax.random.split(state.key)
    inner, grad, stats = method.step(
        problem, state.method, state.hparams, inner_data, outer_data, sub
    )
    updates, opt_state = optimizer.update(grad, state.opt_state, state.hparams)
    hparams = jax.tree.map(lambda h, u: (h + u).astype(h.dtype), state.hparams, updates)
    return OuterState(hparams, opt_state, inner, key), (grad, stats)


# --------------------------------------------------------------------------- reference


def dense_hypergradient(problem, hparams, params, inner_batch, outer_batch, newton_steps=20):
    """The exact implicit hypergradient of a small problem, for reference: ``θ*`` by
    ``newton_steps`` Newton iterations on ``g(·, λ; inner_batch)`` from ``params`` (dense
    Hessian), then ``∇_λ f − ∂²_{λθ} g H⁻¹ ∇_θ f`` with a dense solve. Returns
    ``(grad, θ*)``. ``O(|θ|²)`` memory, ``O(|θ|³)`` time."""
    flat0, unravel = ravel_pytree(params)
    loss = lambda x: problem.inner_loss(unravel(x), hparams, inner_batch)  # noqa: E731

    def newton(x, _):
        return x - jnp.linalg.solve(jax.hessian(loss)(x), jax.grad(loss)(x)), None

    flat = jax.lax.scan(newton, flat0, None, length=newton_steps)[0]
    theta = unravel(flat)
    _, f_theta, f_hparams = _outer_grads(problem, theta, hparams, outer_batch)
    v = unravel(jnp.linalg.solve(jax.hessian(loss)(flat), ravel_pytree(f_theta)[0]))
    return _mixed_hypergradient(problem, theta, hparams, inner_batch, v, f_hparams), theta
