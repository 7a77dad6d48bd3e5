"""NHGD: natural hypergradient descent (Kong, Chen, Zhang, Mou 2026).

The inner SGD's own gradients update an online Fisher-inverse surrogate (any
:class:`hypergrad_jax.fisher.Curvature`) inside the same ``lax.scan``; the hypergradient is
then one mixed product with ``A ∇_θ f``, no linear solve. The parallel variant runs the
Fisher update on a second device, pipelined with the SGD steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from hypergrad_jax import parallel
from hypergrad_jax.data import batch_at
from hypergrad_jax.fisher import (
    DenseFisher,
    dense_layer_grads,
    flax_dense_layers,
    flax_dense_samples,
)
from hypergrad_jax.problem import init_state, optimizer_update
from hypergrad_jax.static import typed
from hypergrad_jax.stochastic.common import (
    State,
    Stats,
    check_run,
    mixed_hypergradient,
    oracles,
    outer_batch,
    outer_gradients,
    split_keys,
    start_state,
)


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


SAMPLE_WEIGHT_FLOOR = 1e-3  # NHGD.sample_weights: amplification of unweighted terms <= ~32x


@typed
class NHGD(NamedTuple):
    """Natural hypergradient descent (Kong, Chen, Zhang, Mou 2026).

    The inner loop is ``run``'s (any :mod:`hypergrad_jax.optim` optimizer, ``T =
    run.num_steps`` steps, ``θ`` warm-started across outer steps); each step's minibatch
    gradients also update ``A ≈ F̂⁻¹`` inside the same ``lax.scan`` (the Fisher equals the
    inner Hessian at the optimum of a well-specified negative log-likelihood). Then
    ``ĥ = ∇_λ f − ∂²_{λθ} g · (A ∇_θ f)`` at ``θ_T`` with one mixed product on a fresh
    minibatch. Oracles per outer step: ``T`` gradients, 0 HVPs, 1 mixed product, 1 outer
    gradient. (The paper's inner loop is plain SGD; any optimizer's steps feed the same
    gradients to the Fisher.)

    Attributes:
      fisher: a :class:`hypergrad_jax.fisher.Curvature`: :class:`~hypergrad_jax.fisher.DenseFisher`
        or :class:`~hypergrad_jax.fisher.KFACFisher` (block diagonal, for MLPs).
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
      per_sample_grads: how the per-sample Fishers get their per-sample gradients.
        ``"vmap"`` (default, any inner loss that is a mean over the batch): ``jax.vmap`` of
        the loss's gradient on batches of one. ``"flax_dense"`` (opt-in, for models made of
        flax ``nn.Dense`` layers): one forward and one backward pass give the minibatch
        gradient and every sample's dense-layer gradient in factored form ``a_i δ_iᵀ``
        (:func:`hypergrad_jax.fisher.flax_dense_samples`, whose docstring states what the
        loss must satisfy); :class:`~hypergrad_jax.fisher.KFACFisher` uses the factors
        directly (no ``[B, din, dout]`` per-sample blocks, no recovery of ``a_i``), other
        curvatures get the outer products. Every leaf of ``params`` must be a dense layer's
        kernel or bias (``KFACFisher.layers``, else :func:`~hypergrad_jax.fisher.
        flax_dense_layers`). Same numbers as ``"vmap"`` up to rounding, except that terms of
        the loss without per-sample structure (a ridge) are in no sample's gradient, where
        ``"vmap"`` adds their gradient to every sample's.
    """

    fisher: Any = DenseFisher()
    reset: bool = False
    sample_weights: Callable | None = None
    parallel: bool = False
    per_sample_grads: str = "vmap"

    def init(self, params, hparams):
        del hparams
        if self.per_sample_grads not in ("vmap", "flax_dense"):
            raise ValueError(
                "NHGD.per_sample_grads: expected 'vmap' or 'flax_dense', got "
                f"{self.per_sample_grads!r}"
            )
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
        return start_state(params, self.fisher.init(params))

    def samples(self, problem, hparams, params, batch):
        """One inner step's gradient and its Fisher samples ``(u = √B ḡ, per-sample)``."""
        per = None
        if self.fisher.per_sample and self.per_sample_grads == "flax_dense":
            grad, per = self._factored_samples(problem, params, hparams, batch)
        elif self.fisher.per_sample:
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

    def _factored_samples(self, problem, params, hparams, batch):
        """``per_sample_grads="flax_dense"``: the minibatch gradient and the per-sample
        gradients as :class:`~hypergrad_jax.fisher.DenseLayerSamples` (for a ``factored``
        curvature) or their outer products (any other), weighted like ``"vmap"``'s."""
        factored = getattr(self.fisher, "factored", False)
        layers = self.fisher.layers if factored else flax_dense_layers(params)
        loss = lambda p: problem.inner_loss(p, hparams, batch)  # noqa: E731
        grad, per = flax_dense_samples(loss, params, layers, _batch_size(batch))
        if self.sample_weights is not None:
            w = self.sample_weights(hparams, batch)
            per = per.scale(jax.lax.rsqrt(jnp.maximum(w, SAMPLE_WEIGHT_FLOOR)))
        return grad, (per if factored else dense_layer_grads(per, layers, params))

    def inner_loop(self, problem, run, hparams, params, fisher, inner_data, key):
        """``run``'s inner loop from ``params`` with the Fisher updates of every step:
        ``(θ_T, curvature state)``, fused on one device or pipelined on two (``parallel``)."""
        loop = _parallel_inner_loop if self.parallel else _fused_inner_loop
        inner = init_state(run, hparams, params)
        return loop(self, problem, run, hparams, inner, fisher, inner_data, key)

    def step(self, problem, run, state, hparams, inner_data, outer_data, key):
        check_run(self, run)
        k_inner, _, k_outer = split_keys(key)
        fisher = self.fisher.init(state.params) if self.reset else state.method
        params, fisher = self.inner_loop(
            problem, run, hparams, state.params, fisher, inner_data, k_inner
        )
        value, f_theta, f_hparams = outer_gradients(
            problem, params, hparams, outer_batch(outer_data, k_outer)
        )
        w = self.fisher.apply(fisher, f_theta)
        batch = batch_at(inner_data, k_inner, jnp.int32(run.num_steps))
        grad, residual = mixed_hypergradient(problem, params, hparams, batch, w, f_hparams)
        new = State(params, state.adjoint, fisher, state.step + 1)
        return new, grad, Stats(value, residual, oracles(grads=run.num_steps))


def _fused_inner_loop(method, problem, run, hparams, inner, fisher, inner_data, key):
    """NHGD's inner loop on one device: each step's gradient moves ``θ`` (``run``'s
    optimizer) and updates ``A``. Returns ``(θ_T, A)``."""

    def body(carry, t):
        inner, fisher = carry
        batch = batch_at(inner_data, key, t)
        grad, samples = method.samples(problem, hparams, inner.params, batch)
        fisher = method.fisher.update(fisher, *samples)
        return (optimizer_update(run, hparams, grad, inner, t), fisher), None

    steps = jnp.arange(run.num_steps, dtype=jnp.int32)
    inner, fisher = jax.lax.scan(body, (inner, fisher), steps)[0]
    return inner.params, fisher


_ROLE = "nhgd_role"


def _parallel_inner_loop(method, problem, run, hparams, inner, fisher, inner_data, key):
    """NHGD's inner loop on two devices, pipelined: at step ``t`` device 0 computes the
    gradient at ``θ_t`` and steps ``θ``, while device 1 updates ``A`` with step ``t − 1``'s
    Fisher samples; the samples then move 0 → 1 (``ppermute``). Device 1 applies the last
    samples after the loop. The sequence of updates, hence every number, is the fused
    loop's. Both devices run one SPMD program; ``lax.cond`` on the device index selects
    each device's role at run time.
    """
    mesh = parallel.make_mesh(2, _ROLE)
    probe = batch_at(inner_data, key, jnp.int32(0))
    _, empty = jax.eval_shape(lambda: method.samples(problem, hparams, inner.params, probe))
    empty = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), empty)

    def roles(inner, fisher, hparams, key):
        me = jax.lax.axis_index(_ROLE)

        def optimize(carry, t):  # device 0
            inner, fisher, _ = carry
            batch = batch_at(inner_data, key, t)
            grad, samples = method.samples(problem, hparams, inner.params, batch)
            return optimizer_update(run, hparams, grad, inner, t), fisher, samples

        def approximate(carry, t):  # device 1: the samples of step t − 1
            inner, fisher, inbox = carry
            fisher = jax.lax.cond(
                t > 0, lambda: method.fisher.update(fisher, *inbox), lambda: fisher
            )
            return inner, fisher, inbox

        def body(carry, t):
            inner, fisher, outbox = jax.lax.cond(me == 0, optimize, approximate, carry, t)
            return (inner, fisher, jax.lax.ppermute(outbox, _ROLE, [(0, 1)])), None

        steps = jnp.arange(run.num_steps, dtype=jnp.int32)
        inner, fisher, inbox = jax.lax.scan(body, (inner, fisher, empty), steps)[0]
        fisher = method.fisher.update(fisher, *inbox)
        # Each device keeps what it owns; hand it to both (a masked sum over the axis).
        own = lambda x, owner: jax.lax.psum(jnp.where(me == owner, x, jnp.zeros_like(x)), _ROLE)  # noqa: E731
        params = jax.tree.map(lambda x: own(x, 0), inner.params)
        return params, jax.tree.map(lambda x: own(x, 1), fisher)

    spec = jax.sharding.PartitionSpec()
    pipelined = jax.shard_map(
        roles, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec, spec), check_vma=False
    )
    return pipelined(inner, fisher, hparams, key)
