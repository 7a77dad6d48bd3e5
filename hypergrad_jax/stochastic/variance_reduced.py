"""Single-loop bilevel methods with better directions than SOBA's: SABA and SRBA (variance
reduction on finite sums) and MA-SOBA (a moving average). Each class cites its paper.

SOBA moves three variables per step, each along a direction built from minibatch oracles at
the current point ``(θ, v, λ)``::

    D_θ = ∇_θ g,    D_v = ∇²_θθ g · v − ∇_θ f,    D_λ = ∇_λ f − ∂²_λθ g · v
    θ ← θ − α D_θ  (run's optimizer),    v ← v − γ D_v,    λ ← the outer optimizer on D_λ

These directions are unbiased but noisy, so with constant steps SOBA stalls at a noise
floor. The methods here keep the loop and change only how the three directions are
estimated: SAGA tables (:class:`SABA`), a SARAH recursion restarted from full batches
(:class:`SRBA`), a moving average of ``D_λ`` (:class:`MASOBA`).

Finite sums (SABA, SRBA). ``inner_data`` and ``outer_data`` are the whole training and
validation sets, pytrees of arrays whose leading axis indexes the ``n`` (``m``) samples,
not samplers: the method draws its minibatches itself. Each set is split into fixed blocks
of ``batch_size`` consecutive samples (the minibatches of the reference implementation,
benchopt's ``benchmark_bilevel``), so ``g = (1/N) Σ_b g_b`` with ``g_b`` the loss (a mean
over its batch) on block ``b`` of ``N = n / batch_size``. Blocks are drawn in random-
reshuffling order: a fresh permutation of the blocks, from the step's key, at the start of
every epoch of ``N`` steps (``State.step`` counts them). SAGA's memory holds one row per
block, not per sample: ``batch_size`` times smaller than per-sample tables, and no
per-sample gradients. Shuffle data whose order means something (sorted by class, say)
once beforehand, since the blocks are fixed. ``n`` and ``m`` are fields: the tables'
shapes are fixed by ``init``, which sees no data.

Oracle counts (:class:`~hypergrad_jax.stochastic.Oracles`): an oracle on one block is one
call; a full-batch oracle (SRBA's restarts) is one call per block, its cost in minibatch
units.

As for SOBA, ``θ`` takes one step of ``run``'s optimizer per outer step (``run.num_steps``
must be 1 and the optimizer stateless, e.g. ``hg.optim.sgd()``), ``v`` lives in
``State.adjoint``, and the returned ``grad`` is the ``λ`` direction, which the outer loop
(:func:`hypergrad_jax.outer.step`) hands to any optax optimizer (the papers: SGD).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hypergrad_jax.data import batch_at
from hypergrad_jax.problem import optimizer_update
from hypergrad_jax.static import typed
from hypergrad_jax.stochastic.common import (
    State,
    Stats,
    check_positive,
    check_steps,
    oracles,
    outer_batch,
    outer_gradients,
    single_loop_state,
    split_keys,
    start_state,
)

PyTree = Any


# --------------------------------------------------------------------------- shared pieces


def _inner_oracles(problem, params, hparams, v, batch):
    """``(∇_θ g, ∇²_θθ g · v, ∂²_λθ g · v)`` on ``batch``: one linearisation of ``∇_θ g`` in
    ``(θ, λ)`` (a gradient, an HVP and a mixed product; ``H`` is symmetric, so the VJP in
    ``θ`` is ``H v``)."""
    g, vjp = jax.vjp(lambda p, h: jax.grad(problem.inner_loss)(p, h, batch), params, hparams)
    hv, mixed = vjp(v)
    return g, hv, mixed


def _outer_oracles(problem, params, hparams, batch):
    """``(f, (∇_θ f, ∇_λ f))`` on ``batch``: one outer oracle call."""
    value, f_theta, f_hparams = outer_gradients(problem, params, hparams, batch)
    return value, (f_theta, f_hparams)


def _directions(inner, outer):
    """SOBA's ``(D_θ, D_v, D_λ)`` from (estimates of) the inner and outer oracles."""
    g, hv, mixed = inner
    f_theta, f_hparams = outer
    return g, optax.tree.sub(hv, f_theta), optax.tree.sub(f_hparams, mixed)


def _move(run, inner_state, hparams, d_theta, v, d_v, linear_lr):
    """``θ ← run's optimizer step on D_θ``, ``v ← v − γ D_v``."""
    params = optimizer_update(run, hparams, d_theta, inner_state, jnp.int32(0)).params
    return params, optax.tree.add_scale(v, -linear_lr, d_v)


class _FiniteSum(NamedTuple):
    """One finite sum as the methods see it: ``size`` samples in blocks of ``batch``."""

    arg: str  # the step's argument holding the data: "inner_data" or "outer_data"
    field: str  # the method's field giving its size
    size: int
    batch: int
    batch_field: str  # the method's field giving ``batch``, as said in errors

    @property
    def blocks(self) -> int:
        return self.size // self.batch

    def check(self, method) -> None:
        if self.size % self.batch:
            raise ValueError(
                f"{type(method).__name__}.{self.batch_field}: {self.batch} does not divide "
                f"{self.field} = {self.size}; expected a divisor (the finite sum is split into "
                f"fixed blocks of that many samples)"
            )

    def check_data(self, method, data) -> None:
        name = type(method).__name__
        if callable(data):
            raise TypeError(
                f"{self.arg}: {name} draws its own minibatches from the whole finite sum; "
                f"pass the data (a pytree of arrays whose leading axis indexes the "
                f"{self.size} samples), not a sampler (of an hg.data.Sampler, its .batch)"
            )
        sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(data)}
        if sizes != {self.size}:
            raise ValueError(
                f"{self.arg}: {name}.{self.field} = {self.size}, but the data's leaves have "
                f"leading sizes {sorted(map(str, sizes))}; expected every leaf to have a "
                f"leading (sample) axis of length {self.size}"
            )

    def block(self, data, index):
        """Block ``index``: samples ``index · batch .. (index + 1) · batch − 1``."""
        start = index * self.batch
        return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, self.batch), data)

    def draw(self, order, step, key):
        """Random reshuffling: ``(block, position in the epoch, this epoch's order)``; a new
        permutation of the blocks from ``key`` when an epoch starts."""
        position = step % self.blocks
        fresh = jax.random.permutation(key, self.blocks).astype(jnp.int32)
        order = jnp.where(position == 0, fresh, order)
        return order[position], position, order

    def mean(self, fn):
        """``(1/N) Σ_b fn(block b)``: a full-batch oracle as a loop over the blocks (the
        memory of one block)."""
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, jnp.int32(0))
        )
        blocks = jnp.arange(self.blocks, dtype=jnp.int32)
        total = jax.lax.scan(lambda acc, b: (optax.tree.add(acc, fn(b)), None), zeros, blocks)
        return jax.tree.map(lambda x: x / self.blocks, total[0])


def _finite_sums(method) -> tuple[_FiniteSum, _FiniteSum]:
    check_steps(method, num_inner=method.num_inner, num_outer=method.num_outer)
    check_steps(method, batch_size=method.batch_size)
    if method.outer_batch_size is None:
        outer, outer_field = method.batch_size, "batch_size (also the outer block size)"
    else:
        check_steps(method, outer_batch_size=method.outer_batch_size)
        outer, outer_field = method.outer_batch_size, "outer_batch_size"
    sums = (
        _FiniteSum("inner_data", "num_inner", method.num_inner, method.batch_size, "batch_size"),
        _FiniteSum("outer_data", "num_outer", method.num_outer, outer, outer_field),
    )
    for s in sums:
        s.check(method)
    return sums


def _stack(tree, count):
    return jax.tree.map(lambda x: jnp.zeros((count,) + jnp.shape(x), jnp.result_type(x)), tree)


def _first_order(count):
    return jnp.arange(count, dtype=jnp.int32)


# --------------------------------------------------------------------------- SABA


class Table(NamedTuple):
    """SAGA memory of one finite sum: the oracles last seen on each block, and their mean."""

    rows: PyTree  # like one block's oracles, with a leading axis: one row per block
    mean: PyTree  # (1/N) Σ_b rows[b], kept up to date incrementally


class SABAState(NamedTuple):
    """:class:`SABA`'s ``State.method``."""

    inner_order: jax.Array  # int32[N_inner]: this epoch's order of the inner blocks
    outer_order: jax.Array  # int32[N_outer]: this epoch's order of the outer blocks
    inner: Table  # rows (∇_θ g, ∇²_θθ g · v, ∂²_λθ g · v) per inner block
    outer: Table  # rows (∇_θ f, ∇_λ f) per outer block


def _saga(table: Table, index, position, new, count):
    """SAGA on block ``index``: the estimate ``new − rows[b] + mean`` and the table with
    ``rows[b] = new``. The mean is recomputed from the rows at each epoch's start (one pass
    over the table per epoch), so rounding in the incremental updates does not accumulate
    over a long run."""
    mean = jax.lax.cond(
        position == 0,
        lambda: jax.tree.map(lambda r: jnp.mean(r, axis=0), table.rows),
        lambda: table.mean,
    )
    delta = optax.tree.sub(new, jax.tree.map(lambda r: r[index], table.rows))
    estimate = optax.tree.add(delta, mean)
    rows = jax.tree.map(lambda r, x: r.at[index].set(x), table.rows, new)
    return estimate, Table(rows, optax.tree.add_scale(mean, 1.0 / count, delta))


def _start_step(method, run, state, hparams, inner_data, outer_data, key):
    """What SABA's and SRBA's steps begin with: the checked one-step inner run, the two
    checked finite sums, and this step's inner and outer blocks ``(block, position in the
    epoch, the epoch's order)``."""
    inner_run = single_loop_state(method, run, hparams, state.params)
    inner, outer = _finite_sums(method)
    inner.check_data(method, inner_data)
    outer.check_data(method, outer_data)
    k_inner, _, k_outer = split_keys(key)
    drawn_inner = inner.draw(state.method.inner_order, state.step, k_inner)
    drawn_outer = outer.draw(state.method.outer_order, state.step, k_outer)
    return inner_run, (inner, outer), (drawn_inner, drawn_outer)


@typed
class SABA(NamedTuple):
    """SABA, the Stochastic Average Bilevel Algorithm (Dagréou, Ablin, Vaiter, Moreau,
    "A framework for bilevel optimization that enables stochastic and global variance
    reduction algorithms", NeurIPS 2022): SOBA with each oracle replaced by its SAGA
    estimate.

    Per step, with inner block ``i`` and outer block ``j`` drawn (random reshuffling over
    the ``N_in = n / B`` and ``N_out = m / B'`` blocks), the oracles ``o_i = (∇_θ g_i,
    ∇²_θθ g_i · v_k, ∂²_λθ g_i · v_k)`` and ``p_j = (∇_θ f_j, ∇_λ f_j)`` at ``(θ_k, λ_k)``
    and the memories ``M_in`` (a row per inner block) and ``M_out``::

        (ĝ, ĥ, m̂) = o_i − M_in[i] + (1/N_in) Σ_b M_in[b],     then M_in[i] ← o_i
        (f̂_θ, f̂_λ) = p_j − M_out[j] + (1/N_out) Σ_b M_out[b],  then M_out[j] ← p_j
        θ_{k+1} = θ_k − α ĝ,   v_{k+1} = v_k − γ (ĥ − f̂_θ),   λ_{k+1} = λ_k − β (f̂_λ − m̂)

    (``α``: ``run``'s SGD step; ``γ``: ``linear_lr``; ``β``: the outer optimizer's.) The
    estimates' error (``o_i`` minus its stale row, against the rows' mean) vanishes as the
    iterates converge, so with constant steps the method converges linearly on strongly
    convex problems, where SOBA stalls at a noise floor. The memories start at zero (the
    reference's ``mode_init_memory="zero"``): directions are biased towards zero in the
    first epoch.
    Oracles per step: 1 gradient, 1 HVP, 1 mixed product, 1 outer gradient, as SOBA's.

    Attributes:
      num_inner, num_outer: ``n`` and ``m``, the sizes of the finite sums (the leading axis
        of ``inner_data`` and ``outer_data``).
      batch_size: ``B``, samples per inner block (a divisor of ``n``).
      linear_lr: ``γ``, the step on ``v``.
      outer_batch_size: ``B'``, samples per outer block (a divisor of ``m``); ``None``: ``B``.
    """

    num_inner: int
    num_outer: int
    batch_size: int = 64
    linear_lr: float = 0.1
    outer_batch_size: int | None = None

    def init(self, params, hparams):
        check_positive(self, linear_lr=self.linear_lr)
        inner, outer = _finite_sums(self)
        hparams = jax.tree.map(jnp.asarray, hparams)
        inner_proto, outer_proto = (params, params, hparams), (params, hparams)
        memory = SABAState(
            _first_order(inner.blocks),
            _first_order(outer.blocks),
            Table(_stack(inner_proto, inner.blocks), jax.tree.map(jnp.zeros_like, inner_proto)),
            Table(_stack(outer_proto, outer.blocks), jax.tree.map(jnp.zeros_like, outer_proto)),
        )
        return start_state(params, memory)

    def step(self, problem, run, state, hparams, inner_data, outer_data, key):
        inner_run, (inner, outer), drawn = _start_step(self, run, state, hparams, inner_data,
                                                       outer_data, key)  # fmt: skip
        (i, i_pos, inner_order), (j, j_pos, outer_order) = drawn
        memory, params, v = state.method, state.params, state.adjoint

        new_inner = _inner_oracles(problem, params, hparams, v, inner.block(inner_data, i))
        value, new_outer = _outer_oracles(problem, params, hparams, outer.block(outer_data, j))
        est_inner, inner_table = _saga(memory.inner, i, i_pos, new_inner, inner.blocks)
        est_outer, outer_table = _saga(memory.outer, j, j_pos, new_outer, outer.blocks)
        d_theta, d_v, d_hparams = _directions(est_inner, est_outer)
        params, v = _move(run, inner_run, hparams, d_theta, v, d_v, self.linear_lr)

        memory = SABAState(inner_order, outer_order, inner_table, outer_table)
        stats = Stats(value, optax.tree.norm(new_inner[0]), oracles(grads=1, hvps=1))
        return State(params, v, memory, state.step + 1), d_hparams, stats


# --------------------------------------------------------------------------- SRBA


class SRBAState(NamedTuple):
    """:class:`SRBA`'s ``State.method``."""

    inner_order: jax.Array  # int32[N_inner]: this epoch's order of the inner blocks
    outer_order: jax.Array  # int32[N_outer]: this epoch's order of the outer blocks
    previous: PyTree  # (θ, v, λ) of the previous step: the recursion's second point
    directions: PyTree  # (D_θ, D_v, D_λ): the recursive estimates of the last step


@typed
class SRBA(NamedTuple):
    """SRBA, the Stochastic Recursive Bilevel Algorithm (Dagréou, Moreau, Vaiter, Ablin,
    "A lower bound and a near-optimal algorithm for bilevel empirical risk minimization",
    AISTATS 2024): SOBA's directions estimated by a SARAH recursion, restarted from
    full-batch oracles every ``q`` steps.

    With ``D(θ, v, λ; i, j) = (D_θ, D_v, D_λ)`` SOBA's directions on inner block ``i`` and
    outer block ``j`` (random reshuffling over the blocks) and ``D̄`` the same on the full
    sums::

        k ≡ 0 (mod q):  (d_θ, d_v, d_λ) = D̄(θ_k, v_k, λ_k)
        otherwise:      (d_θ, d_v, d_λ) += D(θ_k, v_k, λ_k; i, j)
                                           − D(θ_{k−1}, v_{k−1}, λ_{k−1}; i, j)
        θ_{k+1} = θ_k − α d_θ,   v_{k+1} = v_k − γ d_v,   λ_{k+1} = λ_k − β d_λ

    Both points of a recursive step use the same blocks, so the estimate's error is that of
    a difference, which shrinks with the steps: linear convergence with constant steps on
    strongly convex problems, at ``(n + m)``-independent cost per recursive step.
    ``q = max(1, ⌊period_frac · (N_in + N_out)⌋)`` (``N`` the numbers of blocks; with one
    batch size, the reference's ``period_frac · (n + m) / B``). Oracles per step: 2
    gradients, 2 HVPs, 2 mixed products and 2 outer gradients; at a restart (the first step
    included) ``N_in``, ``N_in``, ``N_in`` and ``N_out``: with the default ``0.5`` and
    ``N_in = 4 N_out``, restarts take about 40% of the calls. As in the reference
    implementation, ``v`` is not projected (nothing bounds it explicitly).

    Attributes:
      num_inner, num_outer: ``n`` and ``m``, the sizes of the finite sums.
      batch_size: ``B``, samples per inner block (a divisor of ``n``).
      linear_lr: ``γ``, the step on ``v``.
      period_frac: ``q`` in units of full passes over both sums (see above).
      outer_batch_size: ``B'``, samples per outer block (a divisor of ``m``); ``None``: ``B``.
    """

    num_inner: int
    num_outer: int
    batch_size: int = 64
    linear_lr: float = 0.1
    period_frac: float = 0.5
    outer_batch_size: int | None = None

    @property
    def period(self) -> int:
        """``q``, the steps between full-batch restarts."""
        inner, outer = _finite_sums(self)
        return max(1, int(self.period_frac * (inner.blocks + outer.blocks)))

    def init(self, params, hparams):
        check_positive(self, linear_lr=self.linear_lr, period_frac=self.period_frac)
        inner, outer = _finite_sums(self)
        hparams = jax.tree.map(jnp.asarray, hparams)
        zeros = jax.tree.map(jnp.zeros_like, params)
        directions = (zeros, zeros, jax.tree.map(jnp.zeros_like, hparams))
        memory = SRBAState(
            _first_order(inner.blocks),
            _first_order(outer.blocks),
            (params, zeros, hparams),
            directions,
        )
        return start_state(params, memory)

    def step(self, problem, run, state, hparams, inner_data, outer_data, key):
        inner_run, (inner, outer), drawn = _start_step(self, run, state, hparams, inner_data,
                                                       outer_data, key)  # fmt: skip
        (i, _, inner_order), (j, _, outer_order) = drawn
        memory, params, v = state.method, state.params, state.adjoint
        restart = state.step % self.period == 0

        def at(p, v, h, inner_batch, outer_batch):
            o_in = _inner_oracles(problem, p, h, v, inner_batch)
            value, o_out = _outer_oracles(problem, p, h, outer_batch)
            return value, optax.tree.norm(o_in[0]), _directions(o_in, o_out)

        def full():
            o_in = inner.mean(
                lambda b: _inner_oracles(problem, params, hparams, v, inner.block(inner_data, b))
            )
            value, o_out = outer.mean(
                lambda b: _outer_oracles(problem, params, hparams, outer.block(outer_data, b))
            )
            return value, optax.tree.norm(o_in[0]), _directions(o_in, o_out)

        def recursive():
            batches = (inner.block(inner_data, i), outer.block(outer_data, j))
            value, residual, now = at(params, v, hparams, *batches)
            _, _, before = at(*memory.previous, *batches)
            return value, residual, optax.tree.add(memory.directions, optax.tree.sub(now, before))

        value, residual, directions = jax.lax.cond(restart, full, recursive)
        d_theta, d_v, d_hparams = directions
        new_params, new_v = _move(run, inner_run, hparams, d_theta, v, d_v, self.linear_lr)

        def count(full_batch, minibatch):
            return jnp.where(restart, full_batch, minibatch)

        calls = oracles(
            count(inner.blocks, 2),
            count(inner.blocks, 2),
            count(inner.blocks, 2),
            count(outer.blocks, 2),
        )
        memory = SRBAState(inner_order, outer_order, (params, v, hparams), directions)
        new = State(new_params, new_v, memory, state.step + 1)
        return new, d_hparams, Stats(value, residual, calls)


# --------------------------------------------------------------------------- MA-SOBA


class MASOBAState(NamedTuple):
    """:class:`MASOBA`'s ``State.method``."""

    average: PyTree  # h: the moving average of SOBA's λ direction, like hparams


@typed
class MASOBA(NamedTuple):
    """MA-SOBA, moving-average SOBA (Chen, Xiao, Balasubramanian, "Optimal algorithms for
    stochastic bilevel optimization under relaxed smoothness conditions", 2023,
    arXiv:2306.12067): SOBA whose ``λ`` step follows a moving average of its hypergradient
    estimates (the paper's result: the optimal ``O(ε⁻²)`` sample complexity for an
    ε-stationary point without higher-order smoothness of the inner objective).

    On one minibatch at ``(θ_k, v_k, λ_k)`` (drawn as SOBA draws it: ``inner_data`` a
    sampler or a batch, ``outer_data`` a batch or ``key -> batch``)::

        h_{k+1} = (1 − ρ) h_k + ρ D_λ,       h_0 = 0
        θ_{k+1} = θ_k − α D_θ,   v_{k+1} = Π_R(v_k − γ D_v),   λ_{k+1} = λ_k − β h_{k+1}

    with SOBA's ``D_θ, D_v, D_λ`` and ``Π_R`` the projection onto the ball ``||v|| ≤ R``
    (none when ``radius`` is ``None``). The returned direction is ``h_{k+1}``, which includes
    this step's estimate, so that ``averaging = 1`` is SOBA step for step (stepping with
    ``h_k`` instead would delay the average by one step). Constant ``ρ``; the paper's
    schedules (``ρ``, ``α``, ``γ`` decaying together) can be had through the outer
    optimizer's schedule for ``α`` only.
    Oracles per step: as SOBA's.

    Attributes:
      linear_lr: ``γ``, the step on ``v``.
      averaging: ``ρ ∈ (0, 1]``, the weight of the newest estimate in the average.
      radius: ``R`` of the projection of ``v``, or ``None``.
    """

    linear_lr: float = 0.1
    averaging: float = 0.1
    radius: float | None = None

    def init(self, params, hparams):
        check_positive(self, linear_lr=self.linear_lr)
        check_positive(self, averaging=self.averaging)
        if self.averaging > 1:
            raise ValueError(
                f"MASOBA.averaging: expected a number in (0, 1], got {self.averaging!r}"
            )
        if self.radius is not None:
            check_positive(self, radius=self.radius)
        average = jax.tree.map(lambda h: jnp.zeros_like(jnp.asarray(h)), hparams)
        return start_state(params, MASOBAState(average))

    def step(self, problem, run, state, hparams, inner_data, outer_data, key):
        inner_run = single_loop_state(self, run, hparams, state.params)
        k_inner, _, k_outer = split_keys(key)
        params, v = state.params, state.adjoint
        value, outer = _outer_oracles(problem, params, hparams, outer_batch(outer_data, k_outer))
        batch = batch_at(inner_data, k_inner, state.step)
        o_in = _inner_oracles(problem, params, hparams, v, batch)
        d_theta, d_v, d_hparams = _directions(o_in, outer)
        rho = self.averaging
        average = optax.tree.add_scale(
            optax.tree.scale(1.0 - rho, state.method.average), rho, d_hparams
        )
        params, v = _move(run, inner_run, hparams, d_theta, v, d_v, self.linear_lr)
        if self.radius is not None:
            norm = optax.tree.norm(v)
            v = optax.tree.scale(jnp.minimum(1.0, self.radius / jnp.maximum(norm, 1e-30)), v)
        stats = Stats(value, optax.tree.norm(o_in[0]), oracles(grads=1, hvps=1))
        return State(params, v, MASOBAState(average), state.step + 1), average, stats
