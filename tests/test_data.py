"""Datasets, splits, samplers and label noise (hypergrad_jax.data)."""

import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hypergrad_jax import data

# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    "name, shape, num_classes", [("digits", (1797, 64), 10), ("breast_cancer", (569, 30), 2)]
)
def test_bundled_datasets(name, shape, num_classes):
    ds = data.load(name)
    assert isinstance(ds, data.Dataset)
    assert ds.x.shape == shape and ds.x.dtype == np.float32
    assert ds.y.shape == shape[:1] and ds.y.dtype == np.int32
    assert ds.num_classes == num_classes and ds.name == name
    assert set(np.unique(ds.y)) == set(range(num_classes))


def test_num_samples_keeps_a_seeded_subset():
    full = data.load("breast_cancer")
    a = data.load("breast_cancer", num_samples=100, seed=1)
    b = data.load("breast_cancer", num_samples=100, seed=1)
    c = data.load("breast_cancer", num_samples=100, seed=2)
    assert a.x.shape == (100, 30) and a.num_classes == 2
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.x, c.x)
    rows = {r.tobytes() for r in full.x}
    assert all(r.tobytes() in rows for r in a.x)
    with pytest.raises(ValueError, match="num_samples: 570.*569"):
        data.load("breast_cancer", num_samples=570)


def test_mnist1d_generated_then_cached(tmp_path, monkeypatch):
    pytest.importorskip("mnist1d")
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    ds = data.load("mnist1d", num_samples=200, seed=3, cache_dir=tmp_path)
    # the generator's global seeding does not leak into the caller's generators
    assert (np.random.rand(), random.random()) == (expected_np, expected_py)
    assert ds.x.shape == (200, 40) and ds.x.dtype == np.float32
    assert ds.y.shape == (200,) and ds.y.dtype == np.int32
    assert ds.num_classes == 10 and ds.name == "mnist1d"
    np.testing.assert_array_equal(np.bincount(ds.y), np.full(10, 20))
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith("-n200-seed3.npz")  # no temp file left

    def fail(*args):
        raise AssertionError("generator called despite the cache")

    monkeypatch.setattr(data, "_generate_mnist1d", fail)
    again = data.load("mnist1d", num_samples=200, seed=3, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.x, ds.x)
    np.testing.assert_array_equal(again.y, ds.y)
    # other arguments are other cache entries
    with pytest.raises(AssertionError, match="generator called"):
        data.load("mnist1d", num_samples=200, seed=4, cache_dir=tmp_path)


def test_mnist1d_cache_dir_from_env_and_bad_cache_regenerated(tmp_path, monkeypatch):
    calls = []

    def fake(num_samples, seed):
        calls.append((num_samples, seed))
        x = np.full((num_samples, 40), seed, np.float32)
        return x, np.arange(num_samples, dtype=np.int32) % 10

    monkeypatch.setattr(data, "_generate_mnist1d", fake)
    monkeypatch.setattr(data, "_mnist1d_version", lambda: "test")
    monkeypatch.setenv("HYPERGRAD_CACHE", str(tmp_path / "env"))
    data.load("mnist1d", num_samples=30, seed=1)
    file = tmp_path / "env" / "mnist1d-test-n30-seed1.npz"
    assert file.exists()
    file.write_bytes(b"truncated")
    ds = data.load("mnist1d", num_samples=30, seed=1)
    assert calls == [(30, 1), (30, 1)] and ds.x.shape == (30, 40)
    assert data.load("mnist1d", num_samples=30, seed=1).x[0, 0] == 1
    assert len(calls) == 2


def test_mnist1d_num_samples_multiple_of_10(tmp_path):
    with pytest.raises(ValueError, match="num_samples: 205; expected a positive multiple of 10"):
        data.load("mnist1d", num_samples=205, cache_dir=tmp_path)
    assert not os.listdir(tmp_path)


def test_load_argument_errors():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*'digits'.*'npz'"):
        data.load("mnist")
    with pytest.raises(ValueError, match="path: required"):
        data.load("npz")
    with pytest.raises(ValueError, match="path: only used with name='npz'"):
        data.load("digits", path="x.npz")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed: expected a non-negative int"):
            data.load("digits", seed=bad)
    with pytest.raises(ValueError, match="num_samples: expected a positive int"):
        data.load("digits", num_samples=0)


# --------------------------------------------------------------------------- npz files


def test_npz_round_trip(tmp_path):
    path = tmp_path / "mine.npz"
    x = np.random.default_rng(0).normal(size=(12, 3, 2))
    y = np.array([0, 1, 4] * 4, dtype=np.int64)
    np.savez(path, x=x, y=y)
    ds = data.load("npz", path=path)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int32
    np.testing.assert_allclose(ds.x, x, rtol=1e-6)
    np.testing.assert_array_equal(ds.y, y)
    assert ds.num_classes == 5 and ds.name == "npz:mine.npz"
    assert data.load("npz", path=str(path), num_samples=5).x.shape == (5, 3, 2)


def test_npz_missing_file(tmp_path):
    path = tmp_path / "absent.npz"
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        data.load("npz", path=path)


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "case, match",
    [
        ("not_npz", "not a readable .npz file"),
        ("npy", r"single float64\[3\] array \(.npy format\)"),
        ("missing_y", r"has arrays \['x'\], missing \['y'\]"),
        ("lengths", "array 'x' has 4 examples but .* array 'y' has 3 labels"),
        ("float_labels", "array 'y'.*dtype float64; expected integer class labels"),
        ("negative_labels", "array 'y'.*smallest label -1; expected non-negative"),
        ("labels_2d", r"array 'y'.*shape \(4, 1\); expected labels of shape \(n,\)"),
        ("string_x", "array 'x'.*dtype <U1; expected real numbers"),
        ("complex_x", "array 'x'.*dtype complex128; expected real numbers"),
        ("nan_x", "array 'x'.*1 NaN or infinite values"),
        ("empty", r"array 'x'.*shape \(0, 2\); expected \(n, ...\) with n >= 1"),
        ("object_x", "array 'x' cannot be read"),
    ],
)
def test_npz_malformed(tmp_path, case, match):
    path = tmp_path / f"{case}.npz"
    x, y = np.ones((4, 2)), np.arange(4)
    if case == "not_npz":
        path.write_text("x,y\n1,2\n")
    elif case == "npy":
        np.save(tmp_path / "a.npy", np.ones(3))
        os.replace(tmp_path / "a.npy", path)
    elif case == "missing_y":
        _write(path, x=x)
    elif case == "lengths":
        _write(path, x=x, y=y[:3])
    elif case == "float_labels":
        _write(path, x=x, y=y.astype(float))
    elif case == "negative_labels":
        _write(path, x=x, y=y - 1)
    elif case == "labels_2d":
        _write(path, x=x, y=y[:, None])
    elif case == "string_x":
        _write(path, x=np.array(list("abcd")), y=y)
    elif case == "complex_x":
        _write(path, x=x + 1j, y=y)
    elif case == "nan_x":
        x[1, 1] = np.nan
        _write(path, x=x, y=y)
    elif case == "empty":
        _write(path, x=np.ones((0, 2)), y=np.arange(0))
    elif case == "object_x":
        _write(path, x=np.array([1, "a", None, 2.0], dtype=object), y=y)
    with pytest.raises(ValueError, match=match) as info:
        data.load("npz", path=path)
    assert str(path) in str(info.value)


def test_from_arrays():
    ds = data.from_arrays(np.eye(3), [2, 0, 1], num_classes=4, name="mine")
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int32 and ds.num_classes == 4
    with pytest.raises(ValueError, match="num_classes: 2, but y has label 2"):
        data.from_arrays(np.eye(3), [2, 0, 1], num_classes=2)


# --------------------------------------------------------------------------- splits


def _toy(n=100, d=3):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(n, d)).astype(np.float32)
    x[:, 0] = 7.0  # a constant feature
    return data.Dataset(x, np.arange(n, dtype=np.int32) % 4, 4, "toy")


def test_split_sizes_disjoint_deterministic():
    ds = _toy()
    s = data.split(ds, val_fraction=0.15, test_fraction=0.25, seed=1, standardize=False)
    assert (len(s.train.y), len(s.val.y), len(s.test.y)) == (60, 15, 25)
    # labels here are distinct ids modulo 4; identify rows by their features instead
    rows = [{r.tobytes() for r in part.x} for part in s]
    assert sum(map(len, rows)) == 100 and len(set.union(*rows)) == 100
    again = data.split(ds, val_fraction=0.15, test_fraction=0.25, seed=1, standardize=False)
    for a, b in zip(s, again):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
    other = data.split(ds, val_fraction=0.15, test_fraction=0.25, seed=2, standardize=False)
    assert not np.array_equal(other.train.x, s.train.x)
    assert s.train.num_classes == 4 and s.test.name == "toy"


def test_split_max_train_keeps_val_and_test():
    ds = _toy()
    full = data.split(ds, seed=3, standardize=False)
    capped = data.split(ds, seed=3, standardize=False, max_train=10)
    assert len(capped.train.y) == 10
    np.testing.assert_array_equal(capped.test.x, full.test.x)
    np.testing.assert_array_equal(capped.val.x, full.val.x)
    np.testing.assert_array_equal(capped.train.x, full.train.x[:10])
    empty_val = data.split(ds, val_fraction=0.0)
    assert empty_val.val.x.shape == (0, 3) and len(empty_val.train.y) == 80


def test_split_standardizes_with_train_statistics():
    ds = _toy()
    raw = data.split(ds, seed=0, standardize=False)
    s = data.split(ds, seed=0)
    assert s.train.x.dtype == np.float32
    np.testing.assert_allclose(s.train.x[:, 1:].mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(s.train.x[:, 1:].std(0), 1.0, atol=1e-5)
    # the constant feature is centred, not divided by its zero std
    np.testing.assert_array_equal(s.train.x[:, 0], 0.0)
    np.testing.assert_array_equal(s.test.x[:, 0], 0.0)
    mean, std = raw.train.x[:, 1:].mean(0), raw.train.x[:, 1:].std(0)
    np.testing.assert_allclose(s.test.x[:, 1:], (raw.test.x[:, 1:] - mean) / std, atol=1e-5)
    assert abs(s.test.x[:, 1:].mean()) > 1e-3  # test statistics were not used


def test_split_digits_is_finite():
    s = data.split(data.load("digits"))
    assert all(np.isfinite(part.x).all() for part in s)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"val_fraction": 1.0}, r"val_fraction: expected a number in \[0, 1\)"),
        ({"test_fraction": -0.1}, r"test_fraction: expected a number in \[0, 1\)"),
        ({"val_fraction": "0.2"}, "val_fraction: expected a number"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ test_fraction.*< 1"),
        ({"val_fraction": 0.5, "test_fraction": 0.495}, "none to training"),
        ({"max_train": 0}, "max_train: expected a positive int"),
        ({"seed": -1}, "seed: expected a non-negative int"),
    ],
)
def test_split_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.split(_toy(), **kwargs)


def test_split_needs_a_dataset():
    with pytest.raises(TypeError, match="ds: expected a Dataset"):
        data.split({"x": np.ones((3, 1)), "y": np.zeros(3, int)})


# --------------------------------------------------------------------------- sampling


def _batch(n=50):
    return data.to_batch(data.from_arrays(np.arange(2 * n).reshape(n, 2), np.arange(n) % 3))


def test_to_batch():
    b = _batch()
    assert set(b) == {"x", "y"}
    assert isinstance(b["x"], jax.Array) and b["x"].dtype == jnp.float32
    assert b["y"].dtype == jnp.int32 and b["y"].shape == (50,)


@pytest.mark.parametrize("replace", [False, True])
def test_sampler_deterministic_shapes_rows(replace):
    batch = _batch()
    sampler = data.minibatch_sampler(batch, 8, replace=replace)
    key = jax.random.key(0)
    mb = sampler(key, 3)  # eagerly
    fn = jax.jit(sampler)
    jax.tree.map(np.testing.assert_array_equal, mb, fn(key, 3))
    assert mb["x"].shape == (8, 2) and mb["y"].shape == (8,)
    assert mb["x"].dtype == jnp.float32 and mb["y"].dtype == jnp.int32
    idx = np.asarray(mb["x"][:, 0]).astype(int) // 2  # row i has x = [2i, 2i + 1]
    np.testing.assert_array_equal(mb["x"][:, 1], 2 * idx + 1)
    np.testing.assert_array_equal(mb["y"], idx % 3)
    jax.tree.map(np.testing.assert_array_equal, mb, fn(key, 3))
    assert not np.array_equal(fn(key, 4)["x"], mb["x"])
    assert not np.array_equal(fn(jax.random.key(1), 3)["x"], mb["x"])


def test_sampler_without_replacement_has_no_duplicates():
    batch = _batch(20)
    sampler = jax.jit(data.minibatch_sampler(batch, 20))
    for step in range(10):
        rows = np.asarray(sampler(jax.random.key(7), step)["x"][:, 0])
        assert np.unique(rows).size == 20
    small = data.minibatch_sampler(batch, 15)
    keys = jax.random.split(jax.random.key(0), 64)
    rows = jax.jit(jax.vmap(small, in_axes=(0, None)))(keys, 0)["x"][:, :, 0]
    assert rows.shape == (64, 15)
    assert all(np.unique(r).size == 15 for r in np.asarray(rows))
    # every row gets picked across keys (a uniform subset, not a fixed window)
    assert np.unique(rows).size == 20


def test_sampler_in_scan_and_as_jit_argument():
    sampler = data.minibatch_sampler(_batch(), 5)
    key = jax.random.key(2)

    def body(total, step):
        mb = sampler(jax.random.fold_in(key, step), step)
        return total + mb["x"].sum(), mb["y"]

    total, ys = jax.jit(lambda: jax.lax.scan(body, 0.0, jnp.arange(6)))()
    assert ys.shape == (6, 5)
    fn = jax.jit(sampler)
    expected = sum(float(fn(jax.random.fold_in(key, t), t)["x"].sum()) for t in range(6))
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    # a pytree: its data is traced when passed to jit, not baked in as constants
    out = jax.jit(lambda s, k: s(k, 1))(sampler, key)
    jax.tree.map(np.testing.assert_array_equal, out, fn(key, 1))
    assert "Sampler(n=50, batch_size=5, replace=False)" == repr(sampler)


def test_sampler_legacy_uint32_keys():
    sampler = data.minibatch_sampler(_batch(), 4)
    assert sampler(jax.random.PRNGKey(0), 0)["x"].shape == (4, 2)


def test_sampler_errors():
    batch = _batch(10)
    with pytest.raises(ValueError, match="batch_size: 11 > n = 10.*replace=True"):
        data.minibatch_sampler(batch, 11)
    assert data.minibatch_sampler(batch, 11, replace=True)(jax.random.key(0), 0)["y"].shape == (11,)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="batch_size: expected a positive int"):
            data.minibatch_sampler(batch, bad)
    with pytest.raises(ValueError, match="leading dimensions differ"):
        data.minibatch_sampler({"x": jnp.ones((10, 2)), "y": jnp.ones(9)}, 2)
    with pytest.raises(ValueError, match="leaf \\['w'\\].*expected arrays"):
        data.minibatch_sampler({"x": jnp.ones((10, 2)), "w": 1.0}, 2)
    with pytest.raises(TypeError, match="got a Dataset.*to_batch"):
        data.minibatch_sampler(_toy(), 2)
    with pytest.raises(ValueError, match="replace: expected a bool"):
        data.minibatch_sampler(batch, 2, replace=1)


# --------------------------------------------------------------------------- label noise


@pytest.mark.parametrize("fraction, n_changed", [(0.0, 0), (0.3, 30), (0.333, 33), (1.0, 100)])
def test_corrupt_labels(fraction, n_changed):
    y = np.arange(100) % 4
    y_noisy, corrupted = data.corrupt_labels(y, fraction, 4, seed=0)
    assert y_noisy.dtype == np.int32 and corrupted.dtype == bool
    assert corrupted.sum() == n_changed
    np.testing.assert_array_equal(y_noisy != y, corrupted)
    assert y_noisy.min() >= 0 and y_noisy.max() < 4
    np.testing.assert_array_equal(y, np.arange(100) % 4)  # input untouched
    again = data.corrupt_labels(y, fraction, 4, seed=0)
    np.testing.assert_array_equal(again[0], y_noisy)


def test_corrupt_labels_covers_other_classes():
    y = np.zeros(3000, dtype=np.int32)
    y_noisy, corrupted = data.corrupt_labels(jnp.asarray(y), 1.0, 3, seed=1)
    counts = np.bincount(y_noisy, minlength=3)
    assert counts[0] == 0 and abs(counts[1] - 1500) < 150


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.arange(4), 1.5, 4, 0), r"fraction: expected a number in \[0, 1\]"),
        ((np.arange(4), 0.5, 1, 0), "num_classes: 1; expected >= 2"),
        ((np.arange(4), 0.5, 3, 0), r"labels range over \[0, 3\].*\[0, 3\)"),
        ((np.arange(4.0), 0.5, 4, 0), "y: float64.*expected integer labels"),
        ((np.arange(4), 0.5, 4, -3), "seed: expected a non-negative int"),
    ],
)
def test_corrupt_labels_errors(args, match):
    with pytest.raises(ValueError, match=match):
        data.corrupt_labels(*args)
