"""Curvature surrogates for NHGD: an online inverse ``A ≈ F̂⁻¹`` of the empirical Fisher.

NHGD (natural hypergradient descent; Kong, Chen, Zhang, Mou 2026) replaces the linear solve
of implicit differentiation by ``A ∇_θ f`` with ``A`` built from the inner loop's own
gradients, inside the same ``lax.scan``. Every curvature here is a value (a NamedTuple of
options) implementing :class:`Curvature`::

    state = curvature.init(params)
    state = curvature.update(state, u, per_sample_grads)   # one inner step's samples
    w = curvature.apply(state, tree)                        # A · tree

``u = √B ḡ`` is the step's minibatch mean gradient scaled by the batch size's square root
(one rank-1 Fisher sample), ``per_sample_grads`` the ``B`` per-sample gradients stacked on a
leading axis (``None`` unless ``curvature.per_sample``). A curvature whose ``factored`` is
true (:class:`KFACFisher`) also takes them as :class:`DenseLayerSamples`, the factors
``(a_i, δ_i)`` of dense layers' rank-one per-sample gradients ``a_i δ_iᵀ``, which
:func:`flax_dense_samples` gets from one forward and one backward pass (opt-in:
``NHGD(per_sample_grads="flax_dense")``).

* :class:`DenseFisher`: a dense ``F̂`` (``O(|θ|²)``): rank-1 or rank-``B`` updates of ``A``
  (Sherman–Morrison / Woodbury) or of ``F̂`` with one Cholesky solve at the end.
* :class:`KFACFisher`: block-diagonal Kronecker factors per dense layer.
* :func:`flax_dense_samples`: per-sample gradients of flax ``nn.Dense`` layers in factored
  form (:class:`DenseLayerSamples`) without ``vmap``; :func:`dense_layer_grads` expands them.
* The recursions they are built from: :func:`inverse_init`, :func:`ema_update`,
  :func:`mean_update`, :func:`ema_update_batch`, :func:`mean_update_batch`,
  :func:`woodbury`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from hypergrad_jax.static import typed

PyTree = Any


class Curvature(Protocol):
    """What NHGD needs of a curvature surrogate (see the module docstring)."""

    @property
    def per_sample(self) -> bool:
        """Whether :meth:`update` needs the per-sample gradients."""
        ...

    def init(self, params: PyTree) -> PyTree:
        """The state before any sample: the prior."""
        ...

    def update(self, state: PyTree, u: PyTree, per_sample_grads: PyTree | None) -> PyTree:
        """The state after one inner step's Fisher samples."""
        ...

    def apply(self, state: PyTree, tree: PyTree) -> PyTree:
        """``A · tree`` with ``A ≈ F̂⁻¹``."""
        ...


# --------------------------------------------------------------------------- recursions
# The inverse A ≈ F⁻¹ of a dense Fisher estimate, updated in O(d²) per sample instead of
# inverting.


class FisherInverse(NamedTuple):
    inverse: jax.Array  # float[d, d]: A ≈ F⁻¹ (symmetric positive definite)
    count: jax.Array  # int32[]: updates so far (the running mean's weights use it)


def inverse_init(dim: int, damping: float, dtype=None) -> FisherInverse:
    """``A_0 = I / damping``: the inverse of the prior ``F_0 = damping · I``."""
    if damping <= 0:
        raise ValueError(f"damping: expected > 0, got {damping}")
    eye = jnp.eye(dim, dtype=dtype or jnp.result_type(float))
    return FisherInverse(eye / damping, jnp.zeros((), jnp.int32))


def _sherman_morrison(a, u, keep, add):
    """``(keep · A⁻¹ + add · u uᵀ)⁻¹`` from ``A``:
    ``[A − add (Au)(Au)ᵀ / (keep + add uᵀAu)] / keep``."""
    au = a @ u
    return (a - add * jnp.outer(au, au) / (keep + add * (u @ au))) / keep


def ema_update(state: FisherInverse, u: jax.Array, beta) -> FisherInverse:
    """EMA Fisher ``F' = β F + (1−β) u uᵀ``; its inverse by Sherman–Morrison::

    A' = (1/β) [A − (1−β)(Au)(Au)ᵀ / (β + (1−β) uᵀAu)]
    """
    return FisherInverse(_sherman_morrison(state.inverse, u, beta, 1 - beta), state.count + 1)


def mean_update(state: FisherInverse, u: jax.Array) -> FisherInverse:
    """Running mean with the prior as one pseudo-sample: after ``t`` updates
    ``F_t = (F_0 + Σ_s u_s u_sᵀ) / (t + 1)``, i.e. ``F' = (1−c) F + c u uᵀ`` with
    ``c = 1 / (t + 2)``; its inverse by Sherman–Morrison."""
    c = 1.0 / (state.count + 2).astype(state.inverse.dtype)
    return FisherInverse(_sherman_morrison(state.inverse, u, 1 - c, c), state.count + 1)


def woodbury(a, us, keep, add):
    """``(keep · A⁻¹ + add/B · UᵀU)⁻¹`` from ``A`` with one ``B × B`` solve::

    [A − A Uᵀ (keep·B/add · I + U A Uᵀ)⁻¹ U A] / keep
    """
    b = us.shape[0]
    ua = us @ a  # (B, d); A is symmetric so U A = (A Uᵀ)ᵀ
    inner = (keep * b / add) * jnp.eye(b, dtype=a.dtype) + ua @ us.T
    new = (a - ua.T @ jnp.linalg.solve(inner, ua)) / keep
    # Symmetrise: in float32 the rounding's antisymmetric part otherwise grows every update.
    return 0.5 * (new + new.T)


def ema_update_batch(state: FisherInverse, us: jax.Array, beta) -> FisherInverse:
    """EMA with a batch of ``B`` samples (rows of ``us``, e.g. per-sample gradients from
    ``vmap(grad)``): ``F' = β F + (1−β)/B · UᵀU``, inverted with one rank-``B`` Woodbury
    update (a ``B × B`` solve)::

        A' = (1/β) [A − A Uᵀ (β B/(1−β) I + U A Uᵀ)⁻¹ U A]
    """
    return FisherInverse(woodbury(state.inverse, us, beta, 1 - beta), state.count + 1)


def mean_update_batch(state: FisherInverse, us: jax.Array) -> FisherInverse:
    """Running mean of per-update batch Fishers: ``F' = (1−c) F + c/B · UᵀU``, ``c = 1/(t+2)``
    (the prior counts as one update), inverted with one rank-``B`` Woodbury update."""
    c = 1.0 / (state.count + 2).astype(state.inverse.dtype)
    return FisherInverse(woodbury(state.inverse, us, 1 - c, c), state.count + 1)


# --------------------------------------------------------------------------- dense


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
        return inverse_init(flat.size, self.damping, flat.dtype)

    def update(self, state, u, per_sample_grads):
        """One inner step's update from ``u = √B ḡ`` (``samples="mean"``) or the per-sample
        gradients."""
        if self.samples == "mean":
            rows = ravel_pytree(u)[0][None]
        else:
            rows = jax.vmap(lambda g: ravel_pytree(g)[0])(per_sample_grads)
        if self.inverse == "solve":
            return self._update_matrix(state, rows)
        ema = self.average == "ema"
        if self.samples == "mean":
            if ema:
                return ema_update(state, rows[0], self.beta)
            return mean_update(state, rows[0])
        if self.samples == "woodbury":
            if ema:
                return ema_update_batch(state, rows, self.beta)
            return mean_update_batch(state, rows)
        one = (lambda s, r: ema_update(s, r, self.beta)) if ema else mean_update
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
        """``A · tree``: the online inverse's product, or one Cholesky solve with ``F̂ + ρ I``."""
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


# --------------------------------------------------------------------------- K-FAC
# Block-diagonal Kronecker-factored online Fisher inverse for NHGD (K-FAC: Martens & Grosse
# 2015).
#
# A dense Fisher inverse costs O(|θ|²) memory and O(|θ|² B) per update; for a neural network
# that is out of reach. ``KFACFisher`` keeps, for every dense layer ``s = a·W + b``
# (``W: [din, dout]``, ``b: [dout]``, row-vector convention ``x @ w + b``), two small factors and
# treats the Fisher as block diagonal over layers (cross-layer blocks are dropped).
#
# **Kronecker factorisation.** One sample's gradient of a dense layer is rank one::
#
#     ∂W = a δᵀ,   ∂b = δ,   i.e.  G = [∂W; ∂bᵀ] = ā δᵀ   with  ā = [a; 1]  (din+1),
#
# where ``a`` is the layer's input and ``δ = ∂loss/∂s`` its back-propagated signal. With the
# row-major ``vec`` (``vec(G)[k·dout + j] = G[k, j]``, i.e. ``G.reshape(-1)``),
# ``vec(ā δᵀ) = ā ⊗ δ``, so the layer's Fisher block is::
#
#     F_layer = E[(ā ⊗ δ)(ā ⊗ δ)ᵀ] = E[ā āᵀ ⊗ δ δᵀ]  ≈  E[ā āᵀ] ⊗ E[δ δᵀ] = Ā ⊗ S.
#
# The approximation **assumes ā and δ independent** (more precisely, that ``ā āᵀ`` and ``δ δᵀ``
# are uncorrelated); it is exact when one of them is constant, or e.g. for a softmax output
# layer with labels drawn from the model when ``E[δ δᵀ | x] = diag p(x) − p(x) p(x)ᵀ`` does not
# depend on ``x``; otherwise it is an approximation that degrades as that dependence grows.
# Its inverse is ``Ā⁻¹ ⊗ S⁻¹``, which acts on a layer's gradient block as::
#
#     (Ā⁻¹ ⊗ S⁻¹) vec(G) = vec(Ā⁻¹ G S⁻¹)        (Ā, S symmetric).
#
# **Recovering a and δ from per-sample gradients.** The curvature protocol gets per-sample
# gradients, not activations (unless they come factored, as :class:`DenseLayerSamples`: the
# "factored samples" section below, which skips this recovery). Since ``∂W_i = a_i δ_iᵀ`` and
# ``∂b_i = δ_i``::
#
#     δ_i = ∂b_i,      a_i = ∂W_i δ_i / |δ_i|²      (exact whenever ∂W_i is rank one).
#
# A sample with ``|δ_i|² ≤ DELTA_SQ_FLOOR = 1e-30`` (absolute) carries no curvature information
# for that layer (e.g. a dead ReLU layer, or a saturated loss), and its ``a_i`` would be rounding
# noise: ``∂W_i δ_i`` is of order ``|a_i| |δ_i|²`` and is subnormal in float32 once that is below
# ~1e-38. Such samples get zero weight in ``Ā``'s batch estimate (renormalised over the rest); if
# no sample of the batch is valid, ``Ā`` is left unchanged. ``S``'s estimate always averages all
# ``B`` samples (a zero ``δ_i`` contributes the exact outer product zero).
#
# **Online inverses.** The state holds ``Ā⁻¹`` and ``S⁻¹`` (never the factors), updated per batch
# like :func:`ema_update_batch` / :func:`mean_update_batch`: with batch estimates
# ``Â = Σ_i w_i ā_i ā_iᵀ`` (``Σ w_i = 1``) and ``Ŝ = (1/B) Σ_i δ_i δ_iᵀ``::
#
#     EMA  ("ema"):  X' = β X + (1−β) X̂
#     mean ("mean"): X' = (1−c) X + c X̂,  c = 1/(count + 2)   (the prior counts as one update)
#
# each inverted with a rank-``B`` Woodbury update (a ``B × B`` solve) when ``B < dim``, and with
# the equivalent ``dim × dim`` solve ``X'⁻¹ = (keep·I + X⁻¹ M)⁻¹ X⁻¹`` (``M`` the added term)
# otherwise; both are exact in exact arithmetic, the results are symmetrised. The weighted
# ``Â`` uses the rows ``√(B w_i) ā_i`` so that ``(1/B) UᵀU = Σ w_i ā_i ā_iᵀ``.
#
# **Damping.** The prior is ``F_0 = damping · I`` for every layer block, i.e. each factor starts
# at ``√damping · I`` (so ``Ā_0 ⊗ S_0 = damping · I``). Under the EMA the prior decays like
# ``β^t``, under the running mean like ``1/(t+1)``; it is *not* re-added at every step.
#
# *Caveat.* Directions the data never excite keep only the decaying prior, so their inverse
# grows like ``β^(−t)/√damping`` under the EMA. Such directions are common: a softmax output
# layer's ``δ`` always sums to zero (``S`` is singular along ``1``), and always-zero inputs
# (e.g. MNIST border pixels) make ``Ā`` singular. Over long EMA runs (hundreds of updates at
# ``β = 0.95``) rounding in those directions is amplified and ``A`` loses definiteness (float32:
# non-finite after ~3000 updates). The running mean only grows them like ``t``. Prefer
# ``"mean"`` or resetting the state for long runs.
#
# **Cost.** Memory ``O(Σ_layers (din+1)² + dout²)`` instead of ``O(|θ|²)``. An update costs
# ``O(B d²)`` per factor of dimension ``d`` (Woodbury ``O(B d² + B³)`` with ``B < d``, the solve
# ``O(B d² + d³)`` with ``d ≤ B``), i.e. ``O(Σ_layers B ((din+1)² + dout²))`` instead of
# ``O(B |θ|²)``; ``apply`` costs ``O(Σ_layers (din+1)² dout + (din+1) dout²)``.


DELTA_SQ_FLOOR = 1e-30  # |δ_i|² at or below this: sample i carries no information on ā


class KFACState(NamedTuple):
    a_inv: tuple[jax.Array, ...]  # per layer float[din+1, din+1]: Ā⁻¹ (symmetric positive definite)
    s_inv: tuple[jax.Array, ...]  # per layer float[dout, dout]: S⁻¹ (symmetric positive definite)
    count: jax.Array  # int32[]: updates so far (the running mean's weights use it)


class KFACFactors(NamedTuple):
    """``KFACFisher(inverse="solve")``'s state: the factors themselves, no prior."""

    a: tuple[jax.Array, ...]  # per layer float[din+1, din+1]: Ā (symmetric positive semidefinite)
    s: tuple[jax.Array, ...]  # per layer float[dout, dout]: S (symmetric positive semidefinite)
    count: jax.Array  # int32[]: updates so far


# --------------------------------------------------------------------------- pure helpers


def recover_rank_one(dw: jax.Array, db: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Layer inputs and back-propagated signals from per-sample dense-layer gradients.

    ``dw: [B, din, dout]``, ``db: [B, dout]`` with ``dw_i = a_i δ_iᵀ``, ``db_i = δ_i``. Returns
    ``(a, δ, valid)``: ``a_i = dw_i δ_i / |δ_i|²`` ``[B, din]``, ``δ = db`` ``[B, dout]`` and
    ``valid_i = |δ_i|² > DELTA_SQ_FLOOR`` ``bool[B]`` (``a_i = 0`` where not valid).
    """
    sq = jnp.sum(db * db, axis=-1)
    valid = sq > DELTA_SQ_FLOOR
    safe = jnp.where(valid, sq, 1.0)
    a = jnp.einsum("bij,bj->bi", dw, db) / safe[:, None]
    return jnp.where(valid[:, None], a, 0.0), db, valid


def _augment(a: jax.Array) -> jax.Array:
    """``ā = [a; 1]`` per row: ``[B, din] -> [B, din+1]``."""
    return jnp.concatenate([a, jnp.ones_like(a[:, :1])], axis=1)


def _weighted_rows(abar: jax.Array, valid: jax.Array) -> jax.Array:
    """Rows ``u_i = √(B w_i) ā_i`` with ``w_i = valid_i / #valid``, so that
    ``(1/B) UᵀU = Σ_i w_i ā_i ā_iᵀ``; all zero when no sample is valid."""
    b = abar.shape[0]
    n = jnp.maximum(jnp.sum(valid), 1).astype(abar.dtype)
    scale = jnp.where(valid, jnp.sqrt(b / n), 0.0).astype(abar.dtype)
    return abar * scale[:, None]


def _inverse_update(x_inv: jax.Array, us: jax.Array, keep, add) -> jax.Array:
    """``(keep · X + add/B · UᵀU)⁻¹`` from ``X⁻¹`` (``U: [B, d]``), symmetrised.

    ``B < d``: Woodbury, one ``B × B`` solve (:func:`woodbury`). Otherwise the ``d × d``
    solve ``(keep·I + X⁻¹ M)⁻¹ X⁻¹`` with ``M = add/B · UᵀU``, which needs no factor ``X``.
    """
    b, d = us.shape
    if b < d:
        new = woodbury(x_inv, us, keep, add)
    else:
        m = (add / b) * (us.T @ us)
        new = jnp.linalg.solve(keep * jnp.eye(d, dtype=x_inv.dtype) + x_inv @ m, x_inv)
    return 0.5 * (new + new.T)


def _split(layer_block: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[din+1, dout] -> (w [din, dout], b [dout])``: the bias is the last row."""
    return layer_block[:-1], layer_block[-1]


def _stack(w: jax.Array, b: jax.Array) -> jax.Array:
    """``G = [w; bᵀ]``: ``(w [din, dout], b [dout]) -> [din+1, dout]``."""
    return jnp.concatenate([w, b[None, :]], axis=0)


def _weights(count, beta, mean: bool, dtype):
    """``(keep, add)`` of ``X' = keep·X + add·X̂``: ``(β, 1−β)`` for the EMA, ``(1−c, c)`` with
    ``c = 1/(count+2)`` for the running mean."""
    if not mean:
        return beta, 1.0 - beta
    c = 1.0 / (count + 2).astype(dtype)
    return 1.0 - c, c


def _update_factors(a_inv, s_inv, a, delta, valid, count, beta, mean: bool, solve: bool):
    """One layer's ``(Ā⁻¹, S⁻¹) -> (Ā'⁻¹, S'⁻¹)`` with ``X' = keep·X + add·X̂`` (the K-FAC
    section above) from the per-sample inputs ``a [B, din]`` (zero where not ``valid``) and
    signals ``δ [B, dout]``; with ``solve``, ``(Ā, S) -> (Ā', S')`` (``inverse="solve"``:
    ``keep = 1 − 1/(count+1)`` for the mean, no prior)."""
    if solve:
        if mean:
            keep = 1.0 - 1.0 / (count + 1).astype(a_inv.dtype)
            add = 1.0 - keep
        else:
            keep, add = beta, 1.0 - beta
        step = lambda x, us: keep * x + (add / us.shape[0]) * (us.T @ us)  # noqa: E731
    else:
        keep, add = _weights(count, beta, mean, a_inv.dtype)
        step = lambda x, us: _inverse_update(x, us, keep, add)  # noqa: E731
    new_a = step(a_inv, _weighted_rows(_augment(a), valid))
    new_a = jnp.where(jnp.any(valid), new_a, a_inv)  # no valid sample: Ā unchanged
    return new_a, step(s_inv, delta)


@functools.partial(jax.jit, static_argnames=("mean", "solve"))
def _update_layer(a_inv, s_inv, dw, db, count, beta, mean: bool, solve: bool = False):
    """:func:`_update_factors` from per-sample gradients ``dw [B, din, dout]``, ``db [B, dout]``
    (:func:`recover_rank_one`).

    Jitted so that eager use compiles one kernel per layer shape instead of one per op; inside
    an outer ``jit``/``scan`` it is simply inlined.
    """
    a, delta, valid = recover_rank_one(dw.astype(a_inv.dtype), db.astype(s_inv.dtype))
    return _update_factors(a_inv, s_inv, a, delta, valid, count, beta, mean, solve)


@functools.partial(jax.jit, static_argnames=("mean", "solve"))
def _update_layer_factored(a_inv, s_inv, a, delta, count, beta, mean: bool, solve: bool):
    """:func:`_update_factors` from the factors themselves (:class:`DenseLayerSamples`): the
    same validity rule as :func:`recover_rank_one` (``|δ_i|² > DELTA_SQ_FLOOR``), no
    recovery."""
    a, delta = a.astype(a_inv.dtype), delta.astype(s_inv.dtype)
    valid = jnp.sum(delta * delta, axis=-1) > DELTA_SQ_FLOOR
    a = jnp.where(valid[:, None], a, 0.0)
    return _update_factors(a_inv, s_inv, a, delta, valid, count, beta, mean, solve)


@jax.jit
def _apply_layer(a_inv, s_inv, w, b):
    """``(w, b) ↦ Ā⁻¹ G S⁻¹`` split back, with ``G = [w; bᵀ]``."""
    return _split(a_inv @ _stack(w, b) @ s_inv)


@jax.jit
def _solve_layer(a, s, w, b, ridge):
    """``(w, b) ↦ (Ā ⊗ S + ρ I)⁻¹ vec G`` split back: with ``Ā = Q_A diag(α) Q_Aᵀ`` and
    ``S = Q_S diag(σ) Q_Sᵀ``, ``Q_A [(Q_Aᵀ G Q_S) ⊘ (α σᵀ + ρ)] Q_Sᵀ``."""
    alpha, qa = jnp.linalg.eigh(a)
    sigma, qs = jnp.linalg.eigh(s)
    # Both factors are PSD by construction; clip rounding's negative eigenvalues at 0.
    scale = jnp.maximum(alpha, 0)[:, None] * jnp.maximum(sigma, 0)[None, :] + ridge
    return _split(qa @ ((qa.T @ _stack(w, b) @ qs) / scale) @ qs.T)


# --------------------------------------------------------------------------- the curvature


def _path(key) -> tuple:
    """A layer spec entry as a path of dict keys: ``"w0"`` -> ``("w0",)``."""
    return tuple(key) if isinstance(key, tuple | list) else (key,)


def _name(path: tuple) -> str:
    return "/".join(map(str, path))


def _at(tree, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _leaf_paths(params) -> list[tuple]:
    """Every leaf's path of dict keys; params must be a (nested) dict."""
    paths = []
    for keys, _ in jax.tree_util.tree_leaves_with_path(params):
        if not keys or not all(isinstance(k, jax.tree_util.DictKey) for k in keys):
            raise ValueError(
                f"layers: KFACFisher needs params as a (nested) dict of dense layers, "
                f"got {type(params).__name__}"
            )
        paths.append(tuple(k.key for k in keys))
    return paths


def flax_dense_layers(params: PyTree) -> tuple:
    """The :class:`KFACFisher` layer spec of every flax ``nn.Dense`` in ``params`` (a
    module's variables, e.g. ``model.init(key, x)``): the ``(kernel path, bias path)`` of
    each dict holding a 2-D ``kernel`` and a 1-D ``bias``, in flattening order."""
    layers = []
    for path in _leaf_paths(params):
        if path[-1] == "kernel" and jnp.ndim(_at(params, path)) == 2:
            bias = (*path[:-1], "bias")
            try:
                ok = jnp.ndim(_at(params, bias)) == 1
            except (KeyError, TypeError):
                ok = False
            if ok:
                layers.append((path, bias))
    return tuple(layers)


# --------------------------------------------------------------------------- factored samples
# A dense layer's per-sample gradient is the outer product ``∂W_i = a_i δ_iᵀ``, ``∂b_i = δ_i``
# (the K-FAC section above). ``vmap`` of the loss's gradient over batches of one materialises
# ``B`` such ``[din, dout]`` blocks, and K-FAC then recovers ``a_i`` from them; the factors
# themselves come from one batched forward pass (the layer inputs ``a``) and one backward pass
# (``δ_i = B ∂L/∂s_i`` for a mean loss ``L = (1/B) Σ_i ℓ_i``, through a zero perturbation of
# each layer's output ``s``), the same passes that give the minibatch gradient.


class DenseLayerSamples(NamedTuple):
    """Per-sample gradients of dense layers in factored form: sample ``i``'s gradient of
    layer ``l`` is ``∂W = a_i δ_iᵀ``, ``∂b = δ_i`` (``a = inputs[l]``, ``δ = signals[l]``);
    layers in the order of a :class:`KFACFisher` ``layers`` spec."""

    inputs: tuple[jax.Array, ...]  # per layer float[B, din]: a_i, the layer's input
    signals: tuple[jax.Array, ...]  # per layer float[B, dout]: δ_i = ∂ℓ_i/∂s_i at s = a W + b

    def scale(self, s: jax.Array) -> DenseLayerSamples:
        """Every sample's gradient times ``s_i`` (``s: [B]``): the signals are scaled."""
        return DenseLayerSamples(self.inputs, tuple(d * s[:, None] for d in self.signals))


def dense_layer_grads(samples: DenseLayerSamples, layers: tuple, params: PyTree) -> PyTree:
    """The per-sample gradients ``params``-like with a leading batch axis: ``a_i δ_iᵀ`` for
    each weight, ``δ_i`` for each bias of ``layers`` (which must cover every leaf)."""
    blocks = {}
    for (w, b), a, d in zip(layers, samples.inputs, samples.signals, strict=True):
        blocks[_path(w)] = jnp.einsum("bi,bj->bij", a, d)
        blocks[_path(b)] = d

    def leaf(keys, _):
        path = tuple(k.key for k in keys)
        if path not in blocks:
            raise ValueError(f"layers: the leaf {_name(path)!r} is in no dense layer")
        return blocks[path]

    return jax.tree_util.tree_map_with_path(leaf, params)


def _flax_layer_index(module_path: tuple, keys: list[tuple]) -> int | None:
    """The layer whose kernel lives at ``module_path`` (the variables' ``"params"``
    collection or its content), or ``None``."""
    n = len(module_path)
    hits = [
        i
        for i, key in enumerate(keys)
        if key[len(key) - n :] == module_path and key[: len(key) - n] in ((), ("params",))
    ]
    if len(hits) > 1:
        raise ValueError(f"layers: the module at {module_path} matches layers {hits}")
    return hits[0] if hits else None


def flax_dense_samples(
    loss: Callable, params: PyTree, layers: tuple, batch_size: int
) -> tuple[PyTree, DenseLayerSamples]:
    """``(∇L(params), DenseLayerSamples)`` from one forward and one backward pass: the
    minibatch gradient and every sample's gradient of each dense layer in factored form.

    Opt-in structure (what ``jax.vmap`` of per-sample gradients does not need): ``loss``
    (``params -> scalar``) must be ``L = (1/B) Σ_i ℓ_i(params) + R(params)``, a mean over the
    ``B = batch_size`` samples plus terms ``R`` without per-sample structure (a ridge), and
    every layer of ``layers`` (``(kernel path, bias path)`` pairs, e.g.
    :func:`flax_dense_layers`) a flax ``nn.Dense`` called exactly once, on a ``[B, din]``
    input whose row ``i`` is sample ``i``'s alone (no batch statistics, no sequence axis).
    Then ``δ_i = B ∂L/∂s_i`` (``s`` the layer's output) is ``∂ℓ_i/∂s_i``, and sample ``i``'s
    gradient of ``ℓ_i`` is ``a_i δ_iᵀ``, ``δ_i``. ``R``'s gradient is in ``∇L`` but in no
    sample's factors, whereas ``vmap`` of the loss on batches of one adds ``∇R`` to every
    sample's gradient; otherwise the two agree up to rounding.

    The layers are found with ``flax.linen.intercept_methods``: each ``nn.Dense`` call's
    input is recorded and a zero perturbation added to its output, whose gradient is
    ``∂L/∂s``. A structure that does not fit raises ``ValueError`` at trace time.
    """
    import flax.linen as nn  # lazily: plain-JAX users of this module do not need flax

    keys = [_path(w)[:-1] if _path(w)[-1] == "kernel" else None for w, _ in layers]
    if None in keys:
        raise ValueError(
            f"layers: flax_dense_samples needs flax nn.Dense layers, whose weight path ends "
            f"in 'kernel'; got {layers}"
        )

    def traced(params, perturb):
        """``loss`` with each layer's input recorded (and ``perturb[l]`` added to its output
        unless ``perturb`` is ``None``): ``(value, inputs, output shapes)``."""
        inputs, outputs = [None] * len(layers), [None] * len(layers)

        def interceptor(next_fun, args, kwargs, context):
            if not (isinstance(context.module, nn.Dense) and context.method_name == "__call__"):
                return next_fun(*args, **kwargs)
            index = _flax_layer_index(tuple(context.module.scope.path), keys)
            if index is None:  # a Dense outside `layers`: not this curvature's concern
                return next_fun(*args, **kwargs)
            if inputs[index] is not None:
                raise ValueError(
                    f"layers: the nn.Dense at {_name(keys[index])!r} is called more than once "
                    "by the loss; factored per-sample gradients need one call per layer"
                )
            x = args[0] if args else kwargs["inputs"]
            out = next_fun(*args, **kwargs)
            inputs[index], outputs[index] = x, out
            if perturb is not None:
                out = out + perturb[index].astype(out.dtype)
            return out

        with nn.intercept_methods(interceptor):
            value = loss(params)
        return value, inputs, outputs

    _, in_shapes, out_shapes = jax.eval_shape(lambda p: traced(p, None), params)
    for key, x, s in zip(keys, in_shapes, out_shapes, strict=True):
        if x is None:
            raise ValueError(f"layers: the loss never calls the nn.Dense at {_name(key)!r}")
        if len(x.shape) != 2 or x.shape[0] != batch_size or s.shape[:1] != (batch_size,):
            raise ValueError(
                f"layers: the nn.Dense at {_name(key)!r} sees input {x.shape} and output "
                f"{s.shape}; factored per-sample gradients need [B, din] -> [B, dout] with "
                f"B = {batch_size} (one row per sample)"
            )
    zeros = tuple(jnp.zeros(s.shape, s.dtype) for s in out_shapes)

    def value(params, perturb):
        value, inputs, _ = traced(params, perturb)
        return value, tuple(inputs)

    (grad, d_out), inputs = jax.grad(value, argnums=(0, 1), has_aux=True)(params, zeros)
    signals = tuple(batch_size * d for d in d_out)
    return grad, DenseLayerSamples(tuple(jax.lax.stop_gradient(inputs)), signals)


@typed
class KFACFisher(NamedTuple):
    """Block-diagonal K-FAC Fisher inverse over the dense layers of an MLP (see the K-FAC
    section above).

    ``layers`` lists ``(weight, bias)`` per dense layer (``w: [din, dout]``, ``b: [dout]``,
    ``x @ w + b``), each a key of a flat dict of params (``("w0", "b0")``) or a path of keys
    into a nested one: a flax ``nn.Dense`` is ``(("params", "Dense_0", "kernel"),
    ("params", "Dense_0", "bias"))``, and :func:`flax_dense_layers` lists them all. Together
    they must cover every leaf. ``average``: ``"ema"`` (factor ``β``) or ``"mean"`` (running
    mean, the prior counting as one update). ``damping``: prior ``F_0 = damping · I`` per
    block (each factor ``√damping · I``).

    ``inverse``: ``"online"`` (default, the K-FAC section above): the state is ``(Ā⁻¹,
    S⁻¹)``, updated by rank-``B`` Woodbury steps every inner step, ``O(B d² + B³)`` per
    factor of dimension ``d`` (a ``d × d`` solve when ``B ≥ d``). ``"solve"``: the state is
    the factors ``(Ā, S)`` themselves (:class:`KFACFactors`: the same batch estimates, no
    prior; ``"mean"`` averages every update, ``"ema"`` is bias-corrected by ``1/(1−β^t)``
    per factor), one ``O(B d²)`` product per factor per inner step, and :meth:`apply` is
    ``(Ā ⊗ S + damping · I)⁻¹`` per layer block, exactly, from eigendecompositions of both
    factors (``O(d³)`` once per hypergradient). There ``damping`` is a constant ridge, as
    in ``DenseFisher(inverse="solve")``: set it to the inner loss's own ridge, which the
    Hessian has and the gradients' Fisher lacks. It keeps no inverse that rounding can
    make indefinite (the caveat above).
    """

    layers: tuple
    average: str = "ema"
    beta: float = 0.95
    damping: float = 1e-3
    inverse: str = "online"

    @property
    def per_sample(self) -> bool:
        """Needs per-sample gradients (the rank-one structure recovers ``a_i`` and ``δ_i``)."""
        return True

    @property
    def factored(self) -> bool:
        """:meth:`update` also takes :class:`DenseLayerSamples` (in ``layers``' order)."""
        return True

    @property
    def _paths(self) -> list[tuple[tuple, tuple]]:
        return [(_path(w), _path(b)) for w, b in self.layers]

    # ---------------------------------------------------------------- validation

    def _check_options(self) -> None:
        if self.average not in ("ema", "mean"):
            raise ValueError(f"average: expected 'ema' or 'mean', got {self.average!r}")
        if self.inverse not in ("online", "solve"):
            raise ValueError(f"inverse: expected 'online' or 'solve', got {self.inverse!r}")
        if self.average == "ema" and not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta: expected 0 < beta < 1, got {self.beta}")
        if not self.damping > 0:
            raise ValueError(f"damping: expected > 0, got {self.damping}")

    def _check_layers(self, params: PyTree) -> None:
        if not isinstance(params, dict):
            raise ValueError(
                f"layers: KFACFisher needs params as a (nested) dict of dense layers, "
                f"got {type(params).__name__}"
            )
        if not self.layers:
            raise ValueError("layers: expected at least one (weight, bias) pair")
        if any(not (isinstance(p, tuple | list) and len(p) == 2) for p in self.layers):
            raise ValueError(f"layers: expected (weight, bias) pairs, got {self.layers}")
        named = [_name(p) for pair in self._paths for p in pair]
        leaves = [_name(p) for p in _leaf_paths(params)]
        dup = sorted({k for k in named if named.count(k) > 1})
        missing = sorted(set(leaves) - set(named))
        extra = sorted(set(named) - set(leaves))
        if dup or missing or extra:
            raise ValueError(
                f"layers must name every leaf of params exactly once: "
                f"missing {missing}, extra {extra}, repeated {dup}"
            )
        for wp, bp in self._paths:
            w, b = jnp.shape(_at(params, wp)), jnp.shape(_at(params, bp))
            if len(w) != 2 or b != w[1:]:
                raise ValueError(
                    f"layers: ({_name(wp)!r}, {_name(bp)!r}) is not a dense layer: expected "
                    f"{_name(wp)}: [din, dout] and {_name(bp)}: [dout], got shapes {w} and {b}"
                )

    # ---------------------------------------------------------------- protocol

    def init(self, params: PyTree) -> KFACState | KFACFactors:
        """``Ā⁻¹_0 = I/√damping`` (``din+1``) and ``S⁻¹_0 = I/√damping`` (``dout``) per layer;
        ``inverse="solve"``: zero factors (:class:`KFACFactors`)."""
        self._check_options()
        self._check_layers(params)
        dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
        if not jnp.issubdtype(dtype, jnp.floating):
            dtype = jnp.result_type(float)
        scale = 0.0 if self.inverse == "solve" else 1 / np.sqrt(self.damping)
        eye = lambda n: jnp.asarray(np.eye(n) * scale, dtype)  # noqa: E731 -- no compile
        shapes = [jnp.shape(_at(params, wp)) for wp, _ in self._paths]
        a_inv = tuple(eye(din + 1) for din, _ in shapes)
        s_inv = tuple(eye(dout) for _, dout in shapes)
        kind = KFACFactors if self.inverse == "solve" else KFACState
        return kind(a_inv, s_inv, jnp.asarray(0, jnp.int32))

    def update(self, state, u: PyTree, per_sample_grads: PyTree):
        """One batch: recover ``(ā_i, δ_i)`` per layer, update ``Ā⁻¹`` and ``S⁻¹`` (see the
        K-FAC section above; ``inverse="solve"``: ``Ā`` and ``S``).

        ``u`` (the scaled minibatch mean gradient) is unused; ``per_sample_grads`` is
        params-like with a leading batch axis ``B``, or :class:`DenseLayerSamples` (one
        ``(a, δ)`` per layer, in ``layers``' order): the same update without the recovery
        (equal to it up to rounding when every per-sample gradient is rank one).
        """
        del u
        options = dict(mean=self.average == "mean", solve=self.inverse == "solve")
        factored = isinstance(per_sample_grads, DenseLayerSamples)
        if factored and (
            len(per_sample_grads.inputs) != len(self.layers)
            or len(per_sample_grads.signals) != len(self.layers)
        ):
            raise ValueError(
                f"per_sample_grads: DenseLayerSamples with {len(per_sample_grads.inputs)} "
                f"inputs and {len(per_sample_grads.signals)} signals for {len(self.layers)} "
                "layers"
            )
        a_new, s_new = [], []
        for i, ((wp, bp), ai, si) in enumerate(zip(self._paths, state[0], state[1], strict=True)):
            if factored:
                a, d = per_sample_grads.inputs[i], per_sample_grads.signals[i]
                if a.ndim != 2 or d.ndim != 2 or a.shape[0] != d.shape[0]:
                    raise ValueError(
                        f"per_sample_grads: layer {_name(wp)!r} expected inputs [B, din] and "
                        f"signals [B, dout], got {a.shape} and {d.shape}"
                    )
                new_a, new_s = _update_layer_factored(
                    ai, si, a, d, state.count, self.beta, **options
                )
            else:
                dw, db = _at(per_sample_grads, wp), _at(per_sample_grads, bp)
                if dw.ndim != 3 or db.ndim != 2 or dw.shape[::2] != db.shape:
                    raise ValueError(
                        f"per_sample_grads: ({_name(wp)!r}, {_name(bp)!r}) expected "
                        f"[B, din, dout] and [B, dout], got {dw.shape} and {db.shape}"
                    )
                new_a, new_s = _update_layer(ai, si, dw, db, state.count, self.beta, **options)
            a_new.append(new_a)
            s_new.append(new_s)
        return type(state)(tuple(a_new), tuple(s_new), state.count + 1)

    def apply(self, state, tree: PyTree) -> PyTree:
        """``A · tree`` with ``A = blockdiag(Ā⁻¹ ⊗ S⁻¹)``: per layer ``G ↦ Ā⁻¹ G S⁻¹`` with
        ``G = [w-part; b-part as last row]``; the result has ``tree``'s structure.
        ``inverse="solve"``: ``A = blockdiag((Ā ⊗ S + damping · I)⁻¹)`` (EMA factors
        bias-corrected)."""
        blocks = {}
        for (wp, bp), x, y in zip(self._paths, state[0], state[1], strict=True):
            w, b = _at(tree, wp), _at(tree, bp)
            if self.inverse == "solve":
                if self.average == "ema":  # each factor's EMA started from 0
                    weight = 1 - jnp.asarray(self.beta, x.dtype) ** state.count
                    weight = jnp.where(state.count > 0, weight, 1)
                    x, y = x / weight, y / weight
                blocks[wp], blocks[bp] = _solve_layer(x, y, w, b, self.damping)
            else:
                blocks[wp], blocks[bp] = _apply_layer(x, y, w, b)
        return jax.tree_util.tree_map_with_path(
            lambda keys, _: blocks[tuple(k.key for k in keys)], tree
        )
