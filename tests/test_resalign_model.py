"""The model side of the ResAlign experiment: the DDPM's noising and sampling, LoRA adapters,
the judge and its Fréchet distance, and the pre-training cache."""

import dataclasses
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import scipy.linalg

from experiments.resalign import diffusion as d

MODEL = d.TINY_DDPM.model()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The default cache folder, emptied for the test."""
    monkeypatch.setenv("HYPERGRAD_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def base():
    return d.init_denoiser(jax.random.key(0), MODEL)


# --------------------------------------------------------------------------- DDPM


def test_schedule_closed_form():
    s = d.make_schedule(100)
    betas = np.linspace(1e-3, 0.2, 100)
    abar = np.array([np.prod(1 - betas[: t + 1]) for t in range(100)])
    np.testing.assert_allclose(s.alphas_cumprod, abar, rtol=1e-12)
    assert s.num_steps == 100 and s.alphas_cumprod[-1] < 1e-4
    # The posterior q(x_{t-1} | x_t, x0) by Bayes' rule: precision and mean of a product of
    # N(x_{t-1}; x_t / √α_t, β_t / α_t) and N(x_{t-1}; √ᾱ_{t-1} x0, 1 − ᾱ_{t-1}), t >= 1.
    a, prev = 1 - betas[1:], abar[:-1]
    var = 1 / (a / betas[1:] + 1 / (1 - prev))
    np.testing.assert_allclose(s.posterior_variance[1:], var, rtol=1e-10)
    np.testing.assert_allclose(s.posterior_mean_coef1[1:], var * np.sqrt(prev) / (1 - prev))
    np.testing.assert_allclose(s.posterior_mean_coef2[1:], var * np.sqrt(a) / betas[1:])
    assert s.posterior_variance[0] == 0 and s.posterior_mean_coef1[0] == pytest.approx(1)
    with pytest.raises(ValueError, match="num_steps"):
        d.make_schedule(0)


def test_q_sample_exact_and_statistics(getkey):
    s = d.make_schedule(100)
    x0 = jax.random.uniform(getkey(), (5, 64), minval=-1, maxval=1)
    t = jnp.array([0, 10, 50, 90, 99])
    noise = jax.random.normal(getkey(), (5, 64))
    abar = np.asarray(s.alphas_cumprod)[np.asarray(t)][:, None]
    want = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    xt = d.q_sample(s, x0, t, noise)
    assert xt.shape == (5, 64)
    np.testing.assert_allclose(xt, want, rtol=1e-12, atol=1e-12)
    # q(x_t | x0) = N(√ᾱ_t x0, (1 − ᾱ_t) I), from many draws at one x0 and t = 30.
    n, t30 = 20_000, jnp.full((20_000,), 30)
    x0s = jnp.broadcast_to(x0[:1], (n, 64))
    draws = d.q_sample(s, x0s, t30, jax.random.normal(getkey(), (n, 64)))
    mean, var = float(s.sqrt_alphas_cumprod[30]) * x0[0], 1 - float(s.alphas_cumprod[30])
    np.testing.assert_allclose(draws.mean(0), mean, atol=5 * np.sqrt(var / n))
    np.testing.assert_allclose(draws.var(0), var, rtol=5 * np.sqrt(2 / n))
    with pytest.raises(ValueError, match="t: shape"):
        d.q_sample(s, x0, t[:2], noise)


def test_denoiser_and_sample_shapes(base, getkey):
    n_params = sum(p.size for p in jax.tree.leaves(base))
    assert 80_000 < n_params < 200_000, n_params
    x, t, y = jnp.zeros((3, 64)), jnp.array([0, 5, 99]), jnp.array([0, 4, 9])
    assert d.denoiser_apply(MODEL)(base, x, t, y).shape == (3, 64)
    s = d.make_schedule(100)
    sampler = jax.jit(functools.partial(d.sample, d.denoiser_apply(MODEL)))
    labels = jnp.array([0, 1, 2, 3, 7])
    key = getkey()
    images = sampler(base, key, labels, s)
    assert images.shape == (5, 64) and images.dtype == jnp.float64
    assert bool(jnp.all(jnp.abs(images) <= 1))
    np.testing.assert_array_equal(images, sampler(base, key, labels, s))
    with pytest.raises(ValueError, match="labels"):
        d.sample(d.denoiser_apply(MODEL), base, key, labels[:, None], s)


def test_diffusion_loss_decreases_on_two_classes():
    train = d.digits(0).train
    keep = train.y < 2
    two = train._replace(x=train.x[keep], y=train.y[keep])
    s, key = d.make_schedule(100), jax.random.key(3)
    apply_fn = d.denoiser_apply(MODEL)
    batch = {"x": jnp.asarray(two.x, jnp.float64), "y": jnp.asarray(two.y)}

    def loss(params):  # over 8 draws of (t, ε) per example
        keys = jax.random.split(jax.random.key(99), 8)
        return float(
            jnp.mean(jax.vmap(lambda k: d.diffusion_loss(apply_fn, params, batch, k, s))(keys))
        )

    before = loss(d.init_denoiser(jax.random.split(key)[0], MODEL))  # train_ddpm's init
    after = loss(d.train_ddpm(key, two, steps=200, ema=0.0, model=MODEL, schedule=s, quiet=True))
    assert after < 0.5 * before, (before, after)


# --------------------------------------------------------------------------- LoRA


def test_lora_zero_init_is_base_and_merge_equals_adapted(base, getkey):
    adapters = d.lora_init(getkey(), base, rank=4)
    paths = {"time", "input", "output"} | {
        f"block{i}/{name}" for i in range(MODEL.num_blocks) for name in ("dense1", "cond", "dense2")
    }
    assert set(adapters) == paths
    assert adapters["input"]["a"].shape == (64, 4) and adapters["output"]["b"].shape == (4, 64)
    x = jax.random.normal(getkey(), (6, 64))
    t, y = jnp.array([0, 1, 20, 50, 98, 99]), jnp.arange(6)
    plain, adapted = d.denoiser_apply(MODEL), d.adapted_apply(MODEL, scale=2.0)
    np.testing.assert_array_equal(
        adapted(d.LoRAParams(base, adapters), x, t, y), plain(base, x, t, y)
    )

    # non-zero b: merging the adapters into the kernels changes nothing
    adapters = jax.tree.map(lambda a: jax.random.normal(getkey(), a.shape) / 4, adapters)
    merged = d.merge(base, adapters, scale=2.0)
    out = adapted(d.LoRAParams(base, adapters), x, t, y)
    assert float(jnp.max(jnp.abs(out - plain(base, x, t, y)))) > 1e-3
    np.testing.assert_allclose(out, plain(merged, x, t, y), rtol=0, atol=1e-12)
    # and so do their gradients in the adapters
    loss_adapted = lambda ad: jnp.sum(adapted(d.LoRAParams(base, ad), x, t, y) ** 2)
    loss_merged = lambda ad: jnp.sum(plain(d.merge(base, ad, scale=2.0), x, t, y) ** 2)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-10, atol=1e-10)
    jax.tree.map(close, jax.grad(loss_adapted)(adapters), jax.grad(loss_merged)(adapters))

    with pytest.raises(ValueError, match="adapters: 'nope'"):
        d.merge(base, {"nope": adapters["input"]})
    with pytest.raises(ValueError, match=r"adapters\['input'\]"):
        d.merge(base, {"input": {"a": adapters["input"]["a"], "b": adapters["output"]["b"].T}})


# --------------------------------------------------------------------------- judge


def test_judge_accuracy_features_and_cache(cache, monkeypatch):
    calls = []
    train = d.train_judge
    monkeypatch.setattr(d, "train_judge", lambda *a, **k: calls.append(1) or train(*a, **k))
    params = d.pretrain_judge(d.JudgeConfig(), quiet=True)
    test = d.digits(0).test
    classifier = d.judge_classifier()
    assert classifier.accuracy(params, {"x": test.x, "y": test.y}) >= 0.95
    x = jnp.asarray(test.x[:20], jnp.float64)
    np.testing.assert_allclose(d.judge_logits(params, x), classifier.logits(params, x), atol=1e-12)
    assert d.judge_features(params, x).shape == (20, 128)
    again = d.pretrain_judge(d.JudgeConfig(), quiet=True)
    assert len(calls) == 1
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 5))
    assert abs(d.frechet_distance(f, f)) < 1e-9

    def exact(mu, cov, n=400):
        """Samples whose sample mean and covariance (ddof 1) are exactly mu and cov."""
        z = rng.normal(size=(n, len(mu)))
        z -= z.mean(0)
        z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
        return z @ np.linalg.cholesky(cov).T + mu

    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    closed = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    got = d.frechet_distance(exact(mu_a, np.diag(var_a)), exact(mu_b, np.diag(var_b)))
    np.testing.assert_allclose(got, closed, rtol=1e-10)

    m = rng.normal(size=(3, 3))
    cov_a, cov_b = m @ m.T + np.eye(3), np.array([[2.0, 0.5, 0], [0.5, 1.0, 0.3], [0, 0.3, 1.5]])
    sqrtm = scipy.linalg.sqrtm(cov_a @ cov_b).real
    closed = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * sqrtm)
    got = d.frechet_distance(exact(mu_a, cov_a), exact(mu_b, cov_b))
    np.testing.assert_allclose(got, closed, rtol=1e-9)
    with pytest.raises(ValueError, match="feats_a, feats_b"):
        d.frechet_distance(f, f[:, :2])


# --------------------------------------------------------------------------- cache


def test_pretrain_cache_loads_and_retrains_when_unusable(cache, monkeypatch, capsys):
    calls = []
    train = d.train_ddpm
    monkeypatch.setattr(d, "train_ddpm", lambda *a, **k: calls.append(1) or train(*a, **k))
    config = dataclasses.replace(d.TINY_DDPM, steps=20)
    params = d.pretrain(config, quiet=True)
    assert len(calls) == 1
    folder = d.cache_folder("ddpm", dataclasses.asdict(config))
    assert folder.startswith(str(cache)) and os.path.isdir(folder)
    again = d.pretrain(config, quiet=True)
    assert len(calls) == 1  # loaded
    jax.tree.map(np.testing.assert_array_equal, again, params)

    # a tree of another model stored under this setting's name: shapes differ, retrained
    other = d.init_denoiser(jax.random.key(1), dataclasses.replace(MODEL, width=16))
    path = os.path.join(folder, "params")
    shutil.rmtree(folder)
    with ocp.StandardCheckpointer() as writer:
        writer.save(path, other)
    retrained = d.pretrain(config, quiet=True)
    assert len(calls) == 2 and "unusable" in capsys.readouterr().err
    jax.tree.map(np.testing.assert_array_equal, retrained, params)  # deterministic

    # a damaged file: retrained again
    files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
    for file in files:
        with open(file, "r+b") as f:
            f.truncate(3)
    d.pretrain(config, quiet=True)
    assert len(calls) == 3 and "unusable" in capsys.readouterr().err
    d.pretrain(config, quiet=True)
    assert len(calls) == 3
