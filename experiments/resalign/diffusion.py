"""The model side of the ResAlign experiment: a class-conditional DDPM on 8×8 digits, LoRA
adapters on its dense layers, a digits classifier that judges samples, and cached pre-training.

* **Data**: scikit-learn's digits (1797 8×8 images, 10 classes), pixels ``0..16`` scaled to
  ``[-1, 1]`` (:func:`digits`), split train/test with the seed.
* **DDPM** (Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models"): a linear
  beta schedule over ``T`` steps (:func:`make_schedule`), the forward process
  ``x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε`` (:func:`q_sample`), an ε-prediction denoiser
  (:class:`Denoiser`: an MLP with a sinusoidal time embedding and a learned class embedding),
  the simple loss ``E_{t, ε} |ε − ε_θ(x_t, t, y)|²`` (:func:`diffusion_loss`) and ancestral
  sampling (:func:`sample`).
* **LoRA** (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): rank-``r``
  adapters ``W + s·A B`` on every ``nn.Dense`` of the denoiser, kept as a separate pytree
  ``{"<module path>": {"a": [d_in, r], "b": [r, d_out]}}`` (:func:`lora_init`, ``B = 0`` so
  the adapted model starts as the base one), applied without merging by intercepting the
  dense layers (:func:`adapted_apply`) or merged into the kernels (:func:`merge`).
* **Judge**: a flax MLP classifier (:class:`experiments.common.MLP`) trained on the real
  training digits (:func:`train_judge`); its penultimate activations
  (:func:`judge_features`) give a Fréchet distance between sample sets
  (:func:`frechet_distance`, Heusel et al. 2017).
* **Pre-training** (:func:`pretrain`, :func:`pretrain_judge`): trained once per setting and
  cached with orbax under ``$HYPERGRAD_CACHE`` (default ``~/.cache/hypergrad_jax``) in a
  folder named by a hash of the settings; a cached tree whose structure, shapes or dtypes do
  not match the model's is reported in one line and retrained.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import field
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import hypergrad_jax as hg
from experiments.common import MLP, Classifier
from experiments.config import bounds
from experiments.rundir import Progress, quiet_background

PyTree = Any
#: ``apply_fn(params, x_t, t, y) -> ε̂``: the denoiser's noise prediction ``[B, 64]``.
ApplyFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array], jax.Array]

NUM_CLASSES = 10
NUM_FEATURES = 64  # 8×8 pixels

#: Bumped when the training code changes what a cached setting produces.
CACHE_VERSION = 1

# --------------------------------------------------------------------------- data


def digits(seed: int = 0, test_fraction: float = 0.25) -> hg.data.Splits:
    """scikit-learn's digits with pixels ``0..16`` scaled to ``[-1, 1]`` (``x / 8 − 1``),
    split into a training and a test part with ``seed`` (no validation part)."""
    data = hg.data.load("digits")
    splits = hg.data.split(
        data, val_fraction=0.0, test_fraction=test_fraction, seed=seed, standardize=False
    )
    scaled = (d._replace(x=(d.x / 8.0 - 1.0).astype(np.float32)) for d in splits)
    return hg.data.Splits(*scaled)


# --------------------------------------------------------------------------- DDPM


class Schedule(NamedTuple):
    """The noise schedule of a DDPM (Ho et al. 2020), each array ``[T]``, indexed by the
    0-based step ``t`` (the paper's ``t + 1``): ``betas`` ``β_t``, ``alphas`` ``1 − β_t``,
    ``alphas_cumprod`` ``ᾱ_t = Π_{s≤t} α_s``, ``alphas_cumprod_prev`` ``ᾱ_{t−1}`` (1 at
    ``t = 0``), their square roots as used by :func:`q_sample`, and the posterior
    ``q(x_{t−1} | x_t, x₀) = N(c₁ x₀ + c₂ x_t, β̃_t)`` with
    ``β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)``, ``c₁ = β_t √ᾱ_{t−1} / (1 − ᾱ_t)``,
    ``c₂ = (1 − ᾱ_{t−1}) √α_t / (1 − ᾱ_t)`` (the paper's eq. 7)."""

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array

    @property
    def num_steps(self) -> int:
        """``T``."""
        return self.betas.shape[0]


def make_schedule(
    num_steps: int = 100, beta_start: float | None = None, beta_end: float | None = None
) -> Schedule:
    """A linear beta schedule from ``beta_start`` to ``beta_end`` over ``num_steps`` steps.

    The defaults are Ho et al.'s ``1e-4 → 0.02`` for ``T = 1000`` scaled by ``1000 / T``
    (Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models"), so a short
    chain still ends near pure noise: for ``T = 100``, ``β`` runs ``1e-3 → 0.2`` and
    ``ᾱ_T ≈ 4e-5``. Computed in float64, returned in JAX's default float.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected a positive int, got {num_steps!r}")
    beta_start = 1e-4 * 1000 / num_steps if beta_start is None else beta_start
    beta_end = 0.02 * 1000 / num_steps if beta_end is None else beta_end
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(
            f"beta_start, beta_end: {beta_start}, {beta_end}; expected 0 < beta_start <= "
            "beta_end < 1 (fewer than ~20 steps need explicit values)"
        )
    betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    arrays = (
        betas,
        alphas,
        abar,
        abar_prev,
        np.sqrt(abar),
        np.sqrt(1.0 - abar),
        betas * (1.0 - abar_prev) / (1.0 - abar),
        betas * np.sqrt(abar_prev) / (1.0 - abar),
        (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
    )
    dtype = jnp.result_type(float)
    return Schedule(*(jnp.asarray(a, dtype) for a in arrays))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """``x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε``, a draw of ``q(x_t | x₀)`` (Ho et al. 2020, eq. 4),
    for ``x0`` and ``noise`` ``[B, D]`` and integer steps ``t`` ``[B]`` in ``[0, T)``."""
    if x0.ndim != 2 or noise.shape != x0.shape:
        raise ValueError(
            f"x0, noise: shapes {x0.shape}, {noise.shape}; expected the same [B, D] shape"
        )
    if t.shape != x0.shape[:1]:
        raise ValueError(f"t: shape {t.shape}; expected one step per example, ({x0.shape[0]},)")
    mean = schedule.sqrt_alphas_cumprod[t][:, None]
    std = schedule.sqrt_one_minus_alphas_cumprod[t][:, None]
    return mean * x0 + std * noise


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """The sinusoidal embedding ``[sin(t ω_i), cos(t ω_i)]`` with ``ω_i = max_period^{−i/h}``,
    ``h = dim / 2`` (Vaswani et al. 2017, as used for the step by Ho et al. 2020), ``[B, dim]``
    for integer (or real) steps ``t`` ``[B]``."""
    if dim % 2:
        raise ValueError(f"dim: {dim}; expected an even embedding width")
    half = dim // 2
    dtype = jnp.result_type(float)
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=dtype) / half)
    args = t.astype(dtype)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)


class ResBlock(nn.Module):
    """``h + Dense(silu(Dense(silu(LayerNorm(h))) + Dense(silu(c)))))``: a pre-norm residual
    block with the conditioning ``c`` (time and class) projected and added in the middle."""

    width: int

    @nn.compact
    def __call__(self, h: jax.Array, cond: jax.Array) -> jax.Array:
        z = nn.Dense(self.width, name="dense1")(nn.silu(nn.LayerNorm(name="norm")(h)))
        z = z + nn.Dense(self.width, name="cond")(nn.silu(cond))
        z = nn.Dense(self.width, name="dense2")(nn.silu(z))
        return h + z


class Denoiser(nn.Module):
    """The noise prediction ``ε_θ(x_t, t, y)`` ``[B, features]`` of a class-conditional DDPM:
    an MLP of ``num_blocks`` :class:`ResBlock` s of width ``width`` on ``x_t``, conditioned on
    ``silu(Dense(sinusoidal(t))) + Embed(y)``. Every linear map is an ``nn.Dense`` (the layers
    LoRA adapts); the class embedding is an ``nn.Embed`` and is not adapted."""

    num_classes: int = NUM_CLASSES
    features: int = NUM_FEATURES
    width: int = 128
    num_blocks: int = 2
    time_dim: int = 64

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        """``x`` ``[B, features]``, integer steps ``t`` ``[B]`` and labels ``y`` ``[B]``."""
        temb = timestep_embedding(t, self.time_dim).astype(x.dtype)
        cond = nn.silu(nn.Dense(self.width, name="time")(temb))
        cond = cond + nn.Embed(self.num_classes, self.width, name="label")(y).astype(x.dtype)
        h = nn.Dense(self.width, name="input")(x)
        for i in range(self.num_blocks):
            h = ResBlock(self.width, name=f"block{i}")(h, cond)
        h = nn.silu(nn.LayerNorm(name="norm")(h))
        return nn.Dense(self.features, name="output")(h)


def init_denoiser(key: jax.Array, model: Denoiser, dtype=None) -> dict:
    """The denoiser's ``"params"`` (flax's default initialisation) in ``dtype`` (default:
    JAX's default float, float64 under ``jax_enable_x64``)."""
    one = jnp.zeros((1,), jnp.int32)
    params = model.init(key, jnp.zeros((1, model.features)), one, one)["params"]
    dtype = jnp.result_type(float) if dtype is None else dtype
    return jax.tree.map(lambda p: p.astype(dtype), params)


def denoiser_apply(model: nn.Module) -> ApplyFn:
    """``apply_fn(params, x_t, t, y) -> ε̂`` of a flax denoiser."""
    return lambda params, x, t, y: model.apply({"params": params}, x, t, y)


def perturb(
    key: jax.Array, x0: jax.Array, schedule: Schedule
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(x_t, t, ε)`` with per-example steps ``t ~ U{0, …, T−1}`` and noise ``ε ~ N(0, I)``:
    the noised inputs of :func:`diffusion_loss`, for losses of one's own on the same draws
    (e.g. the distance to another model's predictions)."""
    key_t, key_eps = jax.random.split(key)
    t = jax.random.randint(key_t, x0.shape[:1], 0, schedule.num_steps, dtype=jnp.int32)
    noise = jax.random.normal(key_eps, x0.shape, x0.dtype)
    return q_sample(schedule, x0, t, noise), t, noise


def diffusion_losses(
    apply_fn: ApplyFn, params: PyTree, batch: dict, key: jax.Array, schedule: Schedule
) -> jax.Array:
    """Per-example ``mean_pixels (ε − ε_θ(x_t, t, y))²`` ``[B]`` (see :func:`diffusion_loss`)."""
    xt, t, noise = perturb(key, batch["x"], schedule)
    return jnp.mean(jnp.square(noise - apply_fn(params, xt, t, batch["y"])), axis=1)


def diffusion_loss(
    apply_fn: ApplyFn, params: PyTree, batch: dict, key: jax.Array, schedule: Schedule
) -> jax.Array:
    """Ho et al.'s simple objective ``E_{t, ε} |ε − ε_θ(√ᾱ_t x₀ + √(1 − ᾱ_t) ε, t, y)|²``
    (their eq. 14, as a mean over pixels), one uniform step ``t`` and one ``ε`` per example
    of ``batch = {"x": [B, 64], "y": [B]}``, averaged over the batch."""
    return jnp.mean(diffusion_losses(apply_fn, params, batch, key, schedule))


def sample(
    apply_fn: ApplyFn,
    params: PyTree,
    key: jax.Array,
    labels: jax.Array,
    schedule: Schedule,
    *,
    num_features: int = NUM_FEATURES,
) -> jax.Array:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) of one image per label ``[N]``,
    ``[N, num_features]`` in ``[-1, 1]``.

    From ``x_T ~ N(0, I)``, each step predicts ``x̂₀ = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t``, clips
    it to ``[-1, 1]`` (the data range, as in the authors' sampler) and draws ``x_{t−1}`` from
    the posterior ``N(c₁ x̂₀ + c₂ x_t, β̃_t)`` (no noise at the last step); a ``lax.scan``
    over the ``T`` steps. Jittable with ``apply_fn`` bound (``functools.partial``).
    """
    if labels.ndim != 1:
        raise ValueError(f"labels: shape {labels.shape}; expected one class per sample, (N,)")
    n = labels.shape[0]
    dtype = jnp.result_type(float)
    key_init, key_steps = jax.random.split(key)
    x = jax.random.normal(key_init, (n, num_features), dtype)
    s = schedule

    def step(x, inputs):
        t, key = inputs
        tt = jnp.full((n,), t, jnp.int32)
        eps = apply_fn(params, x, tt, labels)
        x0 = (x - s.sqrt_one_minus_alphas_cumprod[t] * eps) / s.sqrt_alphas_cumprod[t]
        x0 = jnp.clip(x0, -1.0, 1.0)
        mean = s.posterior_mean_coef1[t] * x0 + s.posterior_mean_coef2[t] * x
        noise = jax.random.normal(key, x.shape, x.dtype)
        return mean + jnp.sqrt(s.posterior_variance[t]) * noise, None

    steps = jnp.arange(s.num_steps - 1, -1, -1, dtype=jnp.int32)
    x, _ = jax.lax.scan(step, x, (steps, jax.random.split(key_steps, s.num_steps)))
    return jnp.clip(x, -1.0, 1.0)


# --------------------------------------------------------------------------- LoRA


class LoRAParams(NamedTuple):
    """The parameters of a LoRA-adapted model: the ``base`` parameters (a flax ``"params"``
    tree) and the ``adapters`` (``{"<module path>": {"a": [d_in, r], "b": [r, d_out]}}``)."""

    base: dict
    adapters: dict


def dense_kernels(params: dict) -> dict[str, jax.Array]:
    """Every dense layer's kernel by module path (``"block0/dense1"``): each sub-dict of a
    flax ``"params"`` tree that holds a 2-D ``"kernel"``."""
    found = {}

    def walk(tree, path):
        for name, sub in tree.items():
            if name == "kernel" and not isinstance(sub, dict) and np.ndim(sub) == 2:
                found["/".join(path)] = sub
            elif isinstance(sub, dict):
                walk(sub, (*path, name))

    walk(params, ())
    return found


def lora_init(key: jax.Array, base_params: dict, rank: int = 4) -> dict:
    """Rank-``rank`` LoRA adapters (Hu et al. 2021) on every dense layer of ``base_params``:
    ``a ~ N(0, 1/d_in)`` ``[d_in, rank]`` and ``b = 0`` ``[rank, d_out]``, so the adapted
    layer ``x W + s (x a) b`` starts equal to the base one (the paper's initialisation, with
    its ``A``, ``B`` transposed for row vectors), in the kernels' dtypes."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected a positive int, got {rank!r}")
    kernels = dense_kernels(base_params)
    if not kernels:
        raise ValueError("base_params: no dense layer (a sub-dict with a 2-D 'kernel') found")
    adapters = {}
    for i, (path, w) in enumerate(sorted(kernels.items())):
        d_in, d_out = w.shape
        a = jax.random.normal(jax.random.fold_in(key, i), (d_in, rank), w.dtype)
        adapters[path] = {"a": a / math.sqrt(d_in), "b": jnp.zeros((rank, d_out), w.dtype)}
    return adapters


def _check_adapters(base_params: dict, adapters: dict) -> dict[str, jax.Array]:
    """The base kernels, after checking that every adapter names a dense layer of
    ``base_params`` and fits its shape."""
    kernels = dense_kernels(base_params)
    if not isinstance(adapters, dict):
        raise ValueError(f"adapters: expected a dict by layer path, got {type(adapters).__name__}")
    for path, ad in adapters.items():
        if path not in kernels:
            raise ValueError(
                f"adapters: {path!r} is not a dense layer of the base parameters; "
                f"expected some of {sorted(kernels)}"
            )
        if not isinstance(ad, dict) or set(ad) != {"a", "b"}:
            raise ValueError(f"adapters[{path!r}]: expected a dict with keys 'a' and 'b'")
        a, b, w = ad["a"], ad["b"], kernels[path]
        fits = a.ndim == b.ndim == 2 and a.shape[1] == b.shape[0]
        if not fits or (a.shape[0], b.shape[1]) != w.shape:
            raise ValueError(
                f"adapters[{path!r}]: a {list(a.shape)}, b {list(b.shape)}; expected "
                f"a [{w.shape[0]}, r] and b [r, {w.shape[1]}] for the kernel {list(w.shape)}"
            )
    return kernels


def merge(base_params: dict, adapters: dict, scale: float = 1.0) -> dict:
    """``base_params`` with each adapted kernel replaced by ``W + scale · a b`` (``scale`` is
    LoRA's ``α / r``): the plain parameters of the adapted model."""
    _check_adapters(base_params, adapters)

    def walk(tree, path):
        out = {}
        for name, sub in tree.items():
            key = "/".join(path)
            if name == "kernel" and key in adapters:
                ad = adapters[key]
                out[name] = sub + scale * (ad["a"] @ ad["b"])
            else:
                out[name] = walk(sub, (*path, name)) if isinstance(sub, dict) else sub
        return out

    return walk(base_params, ())


def lora_interceptor(adapters: dict, scale: float = 1.0):
    """A flax method interceptor (for ``nn.intercept_methods``) that adds ``scale · (x a) b``
    to the output of every ``nn.Dense`` whose module path (``"block0/dense1"``) has an
    adapter: the adapted forward pass without forming the merged kernel."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return out
        ad = adapters.get("/".join(module.path))
        if ad is None:
            return out
        x = args[0] if args else kwargs["inputs"]
        return out + scale * ((x @ ad["a"]) @ ad["b"])

    return interceptor


def adapted_apply(model: nn.Module, scale: float = 1.0) -> ApplyFn:
    """``apply_fn(LoRAParams(base, adapters), x_t, t, y) -> ε̂``: the denoiser with every
    adapted dense layer computing ``x W + b + scale · (x a) b`` (Hu et al. 2021, eq. 3),
    unmerged; equal to ``denoiser_apply(model)(merge(base, adapters, scale), …)``."""

    def apply_fn(params: LoRAParams, x, t, y):
        _check_adapters(params.base, params.adapters)
        with nn.intercept_methods(lora_interceptor(params.adapters, scale)):
            return model.apply({"params": params.base}, x, t, y)

    return apply_fn


# --------------------------------------------------------------------------- the judge


def judge_classifier(hidden: tuple[int, ...] = (128,)) -> Classifier:
    """The digits judge: :class:`experiments.common.MLP` (``tanh`` hidden layers) with 10
    logits, and its losses."""
    return Classifier(MLP(num_classes=NUM_CLASSES, hidden=tuple(hidden)))


def _judge_layers(params: dict) -> list[dict]:
    n = sum(1 for name in params if name.startswith("Dense_"))
    if n < 2 or any(f"Dense_{i}" not in params for i in range(n)):
        raise ValueError(
            f"params: layers {sorted(params)}; expected a judge MLP's Dense_0, ..., Dense_L "
            "with at least one hidden layer"
        )
    return [params[f"Dense_{i}"] for i in range(n)]


def judge_features(params: dict, x: jax.Array) -> jax.Array:
    """The judge's penultimate activations ``[N, hidden[-1]]`` (after the last ``tanh``),
    the feature space of :func:`frechet_distance` (as FID uses an Inception network's)."""
    for layer in _judge_layers(params)[:-1]:
        x = jnp.tanh(x @ layer["kernel"] + layer["bias"][None, :])
    return x


def judge_logits(params: dict, x: jax.Array) -> jax.Array:
    """The judge's logits ``[N, 10]`` (equal to its :class:`Classifier`'s ``logits``)."""
    last = _judge_layers(params)[-1]
    return judge_features(params, x) @ last["kernel"] + last["bias"][None, :]


def class_accuracy(judge_params: dict, x: jax.Array, labels: jax.Array) -> np.ndarray:
    """Per class ``c`` ``[10]``, the fraction of the images ``x`` labelled ``c`` that the judge
    assigns to ``c`` (NaN for a class without images)."""
    pred = np.asarray(jnp.argmax(judge_logits(judge_params, x), axis=1))
    labels = np.asarray(labels)
    return np.array(
        [
            np.mean(pred[labels == c] == c) if np.any(labels == c) else np.nan
            for c in range(NUM_CLASSES)
        ]
    )


def frechet_distance(feats_a, feats_b) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets ``[N, d]``
    (Dowson & Landau 1982; as FID, Heusel et al. 2017):

        d² = |μ_a − μ_b|² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2}),

    with sample means and covariances (``ddof = 1``), in float64 NumPy. The trace of the
    matrix square root is computed as ``Σ_i √λ_i`` over the eigenvalues of the symmetric
    ``Σ_a^{1/2} Σ_b Σ_a^{1/2}`` (similar to ``Σ_a Σ_b``), negative round-off clipped to 0.
    """
    stats = []
    for name, f in (("feats_a", feats_a), ("feats_b", feats_b)):
        f = np.asarray(f, np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"{name}: shape {f.shape}; expected [N, d] with N >= 2")
        stats.append((f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))))
    (mu_a, cov_a), (mu_b, cov_b) = stats
    if mu_a.shape != mu_b.shape:
        raise ValueError(
            f"feats_a, feats_b: {mu_a.shape[0]} and {mu_b.shape[0]} features; expected the same"
        )
    return gaussian_frechet_distance(mu_a, cov_a, mu_b, cov_b)


def gaussian_frechet_distance(mu_a, cov_a, mu_b, cov_b) -> float:
    """``|μ_a − μ_b|² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2})`` for given means and covariances
    (the squared 2-Wasserstein distance between the two Gaussians, Dowson & Landau 1982)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    w, v = np.linalg.eigh((cov_a + cov_a.T) / 2)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root_a @ cov_b @ root_a
    tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)))
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)


# --------------------------------------------------------------------------- training


def _fit(
    loss_fn: Callable[[PyTree, dict, jax.Array], jax.Array],
    params: PyTree,
    data: dict,
    key: jax.Array,
    *,
    steps: int,
    batch_size: int,
    optimizer: optax.GradientTransformation,
    ema: float,
    quiet: bool,
    chunk: int = 50,
) -> tuple[PyTree, np.ndarray]:
    """``steps`` optimizer steps on minibatches of ``data`` (drawn without replacement,
    ``fold_in(key, step)``), ``loss_fn(params, batch, key)``; returns the parameters (their
    exponential moving average with decay ``ema`` if ``ema > 0``) and the per-step losses.
    Steps run ``chunk`` at a time in one jitted ``lax.scan``; a progress bar on stderr."""
    n = jax.tree.leaves(data)[0].shape[0]
    sampler = hg.data.minibatch_sampler(data, min(batch_size, n))
    key_data, key_loss = jax.random.split(key)

    @functools.partial(jax.jit, static_argnames="length")
    def run(state, sampler, start, length):
        def step(state, i):
            params, opt_state, avg = state
            batch = sampler(key_data, i)
            key = jax.random.fold_in(key_loss, i)
            loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            decay = jnp.minimum(ema, (1.0 + i) / (10.0 + i))  # warm-up: early steps forgotten
            avg = jax.tree.map(lambda a, p: decay * a + (1 - decay) * p, avg, params)
            return (params, opt_state, avg), loss

        return jax.lax.scan(step, state, start + jnp.arange(length))

    state = (params, optimizer.init(params), params)
    losses = []
    progress = Progress(steps, quiet=quiet, label="pre-training steps")
    try:
        for start in range(0, steps, chunk):
            length = min(chunk, steps - start)
            state, chunk_losses = run(state, sampler, start, length)
            losses.append(np.asarray(chunk_losses))
            for _ in range(length):
                progress.update(loss=float(losses[-1].mean()))
    finally:
        progress.close()
    params, _, avg = state
    return (avg if ema > 0 else params), np.concatenate(losses)


def train_ddpm(
    key: jax.Array,
    train: hg.data.Dataset,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    ema: float = 0.999,
    model: Denoiser | None = None,
    schedule: Schedule | None = None,
    quiet: bool = False,
) -> dict:
    """A :class:`Denoiser` (default ``Denoiser()``) trained from flax's initialisation (with
    ``key``) on the images and labels of ``train`` by Adam on :func:`diffusion_loss` with a
    cosine learning-rate decay from ``lr`` to ``lr / 10``; returns the parameters' moving
    average (as Ho et al. 2020 sample from), with decay ``min(ema, (1 + i) / (10 + i))`` at
    step ``i`` so that the first, poor iterates are soon forgotten in short runs (``ema = 0``:
    the last iterate)."""
    model = Denoiser() if model is None else model
    schedule = make_schedule() if schedule is None else schedule
    key_init, key_fit = jax.random.split(key)
    params = init_denoiser(key_init, model)
    apply_fn = denoiser_apply(model)
    loss_fn = lambda p, batch, k: diffusion_loss(apply_fn, p, batch, k, schedule)  # noqa: E731
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.1))
    data = {"x": jnp.asarray(train.x, params["input"]["kernel"].dtype), "y": jnp.asarray(train.y)}
    params, _ = _fit(
        loss_fn,
        params,
        data,
        key_fit,
        steps=steps,
        batch_size=batch_size,
        optimizer=optimizer,
        ema=ema,
        quiet=quiet,
    )
    return params


def train_judge(
    key: jax.Array,
    train: hg.data.Dataset,
    steps: int,
    *,
    hidden: tuple[int, ...] = (128,),
    batch_size: int = 128,
    lr: float = 1e-3,
    quiet: bool = False,
) -> dict:
    """The judge (:func:`judge_classifier`) trained on ``train`` (images in ``[-1, 1]``,
    :func:`digits`) by Adam on the cross-entropy, from flax's initialisation with ``key``."""
    classifier = judge_classifier(hidden)
    key_init, key_fit = jax.random.split(key)
    params = classifier.init(key_init, NUM_FEATURES)
    loss_fn = lambda p, batch, k: classifier.loss(p, batch)  # noqa: E731
    dtype = params["Dense_0"]["kernel"].dtype
    data = {"x": jnp.asarray(train.x, dtype), "y": jnp.asarray(train.y)}
    params, _ = _fit(
        loss_fn,
        params,
        data,
        key_fit,
        steps=steps,
        batch_size=batch_size,
        optimizer=optax.adam(lr),
        ema=0.0,
        quiet=quiet,
    )
    return params


# --------------------------------------------------------------------------- pre-training


@dataclasses.dataclass(frozen=True)
class DDPMConfig:
    """Pre-training of the class-conditional DDPM on all 10 classes of the training part of
    :func:`digits` (``seed`` picks the split, as for the judge, and the initialisation)."""

    seed: int = field(default=0, metadata=bounds(ge=0))
    steps: int = field(default=8000, metadata=bounds(ge=1))
    batch_size: int = field(default=128, metadata=bounds(ge=1))
    lr: float = field(default=2e-3, metadata=bounds(gt=0))
    ema: float = field(default=0.999, metadata=bounds(ge=0, lt=1))
    width: int = field(default=128, metadata=bounds(ge=1))
    num_blocks: int = field(default=2, metadata=bounds(ge=1))
    num_steps: int = field(default=100, metadata=bounds(ge=21))  # T (the default betas need > 20)
    test_fraction: float = field(default=0.25, metadata=bounds(gt=0, lt=1))

    def model(self) -> Denoiser:
        return Denoiser(width=self.width, num_blocks=self.num_blocks)

    def schedule(self) -> Schedule:
        return make_schedule(self.num_steps)


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """Training of the digits judge on the training part of :func:`digits`."""

    seed: int = field(default=0, metadata=bounds(ge=0))
    steps: int = field(default=2000, metadata=bounds(ge=1))
    batch_size: int = field(default=128, metadata=bounds(ge=1))
    lr: float = field(default=1e-3, metadata=bounds(gt=0))
    hidden: tuple[int, ...] = field(default=(128,), metadata=bounds(ge=1))
    test_fraction: float = field(default=0.25, metadata=bounds(gt=0, lt=1))


#: Settings for tests: the default models trained for a few hundred steps (too few for the
#: DDPM's samples to be reliably recognisable digits).
TINY_DDPM = DDPMConfig(steps=300)
TINY_JUDGE = JudgeConfig(steps=300)


def pretrain(
    config: DDPMConfig = DDPMConfig(),
    *,
    cache_dir: str | os.PathLike | None = None,
    quiet: bool = False,
) -> dict:
    """The pre-trained denoiser's parameters for ``config`` (:func:`train_ddpm`), from the
    cache if there (see :func:`cached`), else trained (with a progress bar) and cached."""
    model = config.model()
    template = jax.eval_shape(lambda: init_denoiser(jax.random.key(0), model))

    def train():
        splits = digits(config.seed, config.test_fraction)
        return train_ddpm(
            jax.random.key(config.seed),
            splits.train,
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            ema=config.ema,
            model=model,
            schedule=config.schedule(),
            quiet=quiet,
        )

    return cached("ddpm", dataclasses.asdict(config), template, train, cache_dir=cache_dir)


def pretrain_judge(
    config: JudgeConfig = JudgeConfig(),
    *,
    cache_dir: str | os.PathLike | None = None,
    quiet: bool = False,
) -> dict:
    """The judge's parameters for ``config`` (:func:`train_judge`), cached like
    :func:`pretrain`."""
    classifier = judge_classifier(config.hidden)
    template = jax.eval_shape(lambda: classifier.init(jax.random.key(0), NUM_FEATURES))

    def train():
        splits = digits(config.seed, config.test_fraction)
        return train_judge(
            jax.random.key(config.seed),
            splits.train,
            config.steps,
            hidden=config.hidden,
            batch_size=config.batch_size,
            lr=config.lr,
            quiet=quiet,
        )

    return cached("judge", dataclasses.asdict(config), template, train, cache_dir=cache_dir)


def cache_folder(kind: str, settings: dict, cache_dir: str | os.PathLike | None = None) -> str:
    """``<cache_dir>/resalign/<kind>-<hash>``: the hash (sha256, 16 hex digits) covers
    ``settings``, ``kind``, :data:`CACHE_VERSION` and JAX's default float; ``cache_dir``
    defaults to ``hg.data.default_cache_dir()`` (``$HYPERGRAD_CACHE`` or
    ``~/.cache/hypergrad_jax``)."""
    root = hg.data.default_cache_dir() if cache_dir is None else os.fspath(cache_dir)
    described = {
        "kind": kind,
        "version": CACHE_VERSION,
        "dtype": jnp.dtype(jnp.result_type(float)).name,
        "settings": settings,
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(root, "resalign", f"{kind}-{digest}")


def cached(
    kind: str,
    settings: dict,
    template: PyTree,
    train: Callable[[], PyTree],
    *,
    cache_dir: str | os.PathLike | None = None,
) -> PyTree:
    """``train()``'s pytree, stored once with orbax in :func:`cache_folder` and read back on
    later calls. A stored tree must have ``template``'s structure, shapes and dtypes and be
    finite; one that does not (or does not restore: a truncated or missing file) is reported
    in one line on stderr, removed and retrained. Writes go to a temporary folder renamed
    when complete, so a killed run never leaves a partial cache."""
    folder = cache_folder(kind, settings, cache_dir)
    if os.path.exists(folder):
        try:
            return _restore(folder, template)
        except Exception as e:  # noqa: BLE001 -- any failure to read means "retrain"
            lines = str(e).strip().splitlines()
            why = f"{type(e).__name__}: {lines[0] if lines else ''}"[:160]
            message = f"hypergrad: cached {kind} {folder} unusable ({why}); retraining"
            print(message, file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
    tree = train()
    _save(folder, tree, {"kind": kind, "version": CACHE_VERSION, "settings": settings})
    return tree


def _restore(folder: str, template: PyTree) -> PyTree:
    abstract = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    with quiet_background(), ocp.StandardCheckpointer(multiprocessing_options=_alone()) as reader:
        tree = reader.restore(os.path.join(os.path.abspath(folder), "params"), abstract)
    stored, expected = jax.tree.structure(tree), jax.tree.structure(abstract)
    if stored != expected:
        raise ValueError(f"tree {stored}, expected {expected}")
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    for (path, got), want in zip(leaves, jax.tree.leaves(abstract)):
        got = np.asarray(got)
        where = jax.tree_util.keystr(path)
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(
                f"{where} is {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
            )
        if not np.all(np.isfinite(got)):
            raise ValueError(f"{where} has non-finite values")
    return jax.tree.map(jnp.asarray, tree)


def _save(folder: str, tree: PyTree, described: dict) -> None:
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}-")
    try:
        with ocp.StandardCheckpointer(multiprocessing_options=_alone()) as writer:
            writer.save(os.path.join(tmp, "params"), jax.device_get(tree))
            writer.wait_until_finished()
        with open(os.path.join(tmp, "settings.json"), "w") as f:
            json.dump(described, f, indent=2, sort_keys=True)
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process stored the same setting meanwhile: keep theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alone() -> ocp.options.MultiprocessingOptions:
    """Orbax options for a read or write by this process alone (no cross-process barrier)."""
    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
