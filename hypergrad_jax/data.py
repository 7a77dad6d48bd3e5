"""In-memory datasets and jittable minibatch samplers; nothing is downloaded at run time.

Supported data (nothing is downloaded at run time):

* ``"digits"`` and ``"breast_cancer"``: scikit-learn's bundled copies (1797 8×8 digit
  images flattened to 64 features, 10 classes; 569 tumours with 30 features, 2 classes).
* ``"mnist1d"``: MNIST-1D (40-sample 1-D signals, 10 classes) generated offline by the
  ``mnist1d`` package's ``make_dataset`` and cached on disk as ``.npz``, keyed by the
  number of samples, the seed and the package version.
* ``"npz"``: a user file with arrays ``x`` (features) and ``y`` (integer labels), or
  arrays already in memory through :func:`from_arrays`.

A :class:`Dataset` holds NumPy arrays (float32 features, int32 labels). :func:`split`
makes seeded train/val/test splits standardised with training statistics only,
:func:`to_batch` turns a dataset into the batch format losses take (``{"x", "y"}``) and
:func:`minibatch_sampler` into a jittable sampler ``(key, step) -> batch`` for the inner
run. :func:`corrupt_labels` flips a fraction of labels for data hyper-cleaning.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import random
import tempfile
import zipfile
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

DATASETS = ("digits", "breast_cancer", "mnist1d", "npz")

#: The ``mnist1d`` package's default number of samples (its ``get_dataset_args``).
MNIST1D_NUM_SAMPLES = 5000
_MNIST1D_NUM_CLASSES = 10


class Dataset(NamedTuple):
    """A labelled dataset held in memory.

    Attributes:
      x: features, ``np.ndarray`` of float32 with shape ``(n, ...)``.
      y: class labels, ``np.ndarray`` of int32 with shape ``(n,)``, in ``[0, num_classes)``.
      num_classes: number of classes.
      name: where the data came from (used in messages and plots).
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str


class Splits(NamedTuple):
    """Disjoint train / validation / test parts of one :class:`Dataset`."""

    train: Dataset
    val: Dataset
    test: Dataset


# --------------------------------------------------------------------------- loading


def load(
    name: str,
    *,
    path: str | os.PathLike | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Loads one of :data:`DATASETS`, without network access.

    Args:
      name: ``"digits"``, ``"breast_cancer"``, ``"mnist1d"`` or ``"npz"``.
      path: the ``.npz`` file (``name="npz"`` only), with arrays ``x`` (real numbers, shape
        ``(n, ...)``) and ``y`` (non-negative integer labels, shape ``(n,)``);
        ``num_classes`` is ``max(y) + 1``.
      num_samples: for ``"mnist1d"``, how many examples to generate (a positive multiple
        of 10, as the generator makes ``num_samples // 10`` per class; default
        :data:`MNIST1D_NUM_SAMPLES`, the package's default). For the other datasets, keep
        a random subset of this many examples (chosen with ``seed``, in the original
        order); default: all of them.
      seed: non-negative int: the generator's seed for ``"mnist1d"`` (the package's own
        default is 42), the subset's seed otherwise.
      cache_dir: where generated ``"mnist1d"`` data is cached. Default: the environment
        variable ``HYPERGRAD_CACHE``, else ``~/.cache/hypergrad_jax``.

    Returns:
      A :class:`Dataset` with float32 ``x`` and int32 ``y``.

    Raises:
      ValueError: an unknown ``name``, invalid arguments, or a malformed ``.npz`` file.
      FileNotFoundError: ``path`` does not exist.
      ModuleNotFoundError: ``"mnist1d"`` without the ``mnist1d`` package installed.
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"name: unknown dataset {name!r}; expected one of {DATASETS}")
    if name == "npz" and path is None:
        raise ValueError("path: required with name='npz' (an .npz file with arrays 'x' and 'y')")
    if name != "npz" and path is not None:
        raise ValueError(f"path: only used with name='npz'; got path={path!r} with name={name!r}")
    _check_seed(seed)
    if num_samples is not None:
        _check_positive_int("num_samples", num_samples)

    if name == "mnist1d":
        n = MNIST1D_NUM_SAMPLES if num_samples is None else num_samples
        return _load_mnist1d(n, seed, cache_dir)
    if name == "npz":
        ds = _load_npz(path)
    else:
        from sklearn import datasets as skd

        loader = skd.load_digits if name == "digits" else skd.load_breast_cancer
        x, y = loader(return_X_y=True)
        ds = Dataset(x.astype(np.float32), y.astype(np.int32), int(y.max()) + 1, name)
    return _subset(ds, num_samples, seed)


def from_arrays(x: Any, y: Any, *, num_classes: int | None = None, name: str = "arrays") -> Dataset:
    """A :class:`Dataset` from arrays in memory, checked like a loaded ``.npz`` file.

    Args:
      x: real-valued (or boolean) finite features of shape ``(n, ...)``, ``n >= 1``.
      y: non-negative integer labels of shape ``(n,)`` (an integer dtype, below ``2**31``).
      num_classes: default ``max(y) + 1``; if given, must exceed every label.
      name: the dataset's name.

    Raises:
      ValueError: naming the array, what was found and what was expected.
    """
    return _validated(x, y, num_classes, name, where=lambda key: key)


def _validated(x, y, num_classes, name, where: Callable[[str], str]) -> Dataset:
    x, y = np.asarray(x), np.asarray(y)
    kind = x.dtype.kind
    if kind not in "biuf":
        raise ValueError(
            f"{where('x')}: dtype {x.dtype}; expected real numbers (a float, integer or bool array)"
        )
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{where('x')}: shape {x.shape}; expected (n, ...) with n >= 1 examples")
    if kind == "f" and not np.isfinite(x).all():
        raise ValueError(
            f"{where('x')}: {int(np.size(x) - np.isfinite(x).sum())} NaN or infinite values; "
            "expected finite features"
        )
    if y.ndim != 1:
        raise ValueError(f"{where('y')}: shape {y.shape}; expected labels of shape (n,)")
    if y.dtype.kind not in "iu":
        raise ValueError(
            f"{where('y')}: dtype {y.dtype}; expected integer class labels "
            "(e.g. y.astype(np.int32); one-hot labels: y.argmax(-1))"
        )
    if y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{where('x')} has {x.shape[0]} examples but {where('y')} has {y.shape[0]} labels; "
            "expected the same number"
        )
    if y.min() < 0:
        raise ValueError(
            f"{where('y')}: smallest label {int(y.min())}; expected non-negative labels 0, 1, ..."
        )
    if y.max() >= 2**31 - 1:
        raise ValueError(f"{where('y')}: largest label {int(y.max())}; expected labels < 2**31 - 1")
    observed = int(y.max()) + 1
    if num_classes is None:
        num_classes = observed
    elif isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes: expected an int or None, got {num_classes!r}")
    elif num_classes < observed:
        raise ValueError(
            f"num_classes: {num_classes}, but {where('y')} has label {observed - 1}; expected "
            f"num_classes >= {observed}"
        )
    return Dataset(x.astype(np.float32), y.astype(np.int32), int(num_classes), name)


_NPZ_EXPECTED = "expected an .npz archive with arrays 'x' and 'y' (np.savez(path, x=x, y=y))"


def _load_npz(path) -> Dataset:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: {path!r} does not exist; {_NPZ_EXPECTED}")
    if os.path.isdir(path):
        raise ValueError(f"path: {path!r} is a directory; {_NPZ_EXPECTED}")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"path: {path!r} is not a readable .npz file ({e}); {_NPZ_EXPECTED}"
        ) from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(
            f"path: {path!r} holds a single {data.dtype}{list(data.shape)} array (.npy format); "
            f"{_NPZ_EXPECTED}"
        )
    with data:
        missing = [k for k in ("x", "y") if k not in data.files]
        if missing:
            raise ValueError(
                f"path: {path!r} has arrays {sorted(data.files)}, missing {missing}; "
                f"{_NPZ_EXPECTED}"
            )
        arrays = {}
        for key in ("x", "y"):
            try:
                arrays[key] = data[key]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise ValueError(
                    f"path: {path!r}: array {key!r} cannot be read ({e}); expected a numeric "
                    "array (object arrays are not loaded)"
                ) from e
    name = f"npz:{os.path.basename(path)}"
    return _validated(
        arrays["x"], arrays["y"], None, name, where=lambda key: f"path {path!r}: array {key!r}"
    )


def _subset(ds: Dataset, num_samples: int | None, seed: int) -> Dataset:
    n = ds.y.shape[0]
    if num_samples is None:
        return ds
    if num_samples > n:
        raise ValueError(
            f"num_samples: {num_samples}, but dataset {ds.name!r} has {n} examples; expected "
            f"at most {n} (or None for all)"
        )
    keep = np.sort(np.random.default_rng(seed).choice(n, num_samples, replace=False))
    return ds._replace(x=ds.x[keep], y=ds.y[keep])


# --------------------------------------------------------------------------- MNIST-1D


def default_cache_dir() -> str:
    """``$HYPERGRAD_CACHE`` if set and non-empty, else ``~/.cache/hypergrad_jax``."""
    return os.environ.get("HYPERGRAD_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "hypergrad_jax"
    )


def _mnist1d_version() -> str:
    try:
        return importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            "name='mnist1d' needs the mnist1d package (its offline generator): "
            "pip install 'mnist1d>=0.0.2'"
        ) from None


def _load_mnist1d(num_samples: int, seed: int, cache_dir) -> Dataset:
    if num_samples % _MNIST1D_NUM_CLASSES:
        raise ValueError(
            f"num_samples: {num_samples}; expected a positive multiple of "
            f"{_MNIST1D_NUM_CLASSES} (mnist1d generates num_samples // 10 examples per class)"
        )
    version = _mnist1d_version()
    folder = os.fspath(default_cache_dir() if cache_dir is None else cache_dir)
    file = os.path.join(folder, f"mnist1d-{version}-n{num_samples}-seed{seed}.npz")
    cached = _read_cache(file, num_samples)
    if cached is None:
        x, y = _generate_mnist1d(num_samples, seed)
        os.makedirs(folder, exist_ok=True)
        _write_npz_atomic(file, x=x, y=y)
    else:
        x, y = cached
    return Dataset(x, y, _MNIST1D_NUM_CLASSES, "mnist1d")


def _read_cache(file: str, num_samples: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, or None if the file is missing or unusable (then regenerated)."""
    try:
        with np.load(file, allow_pickle=False) as data:
            x, y = data["x"], data["y"]
    except (FileNotFoundError, ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile):
        return None
    if x.dtype != np.float32 or y.dtype != np.int32 or x.ndim != 2:
        return None
    if x.shape[0] != num_samples or y.shape != (num_samples,):
        return None
    return x, y


def _generate_mnist1d(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs ``mnist1d.data.make_dataset`` with its default arguments (offline: the digit
    templates are defined in its code) and joins its train/test parts."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    # make_dataset seeds NumPy's and Python's global generators; leave the caller's alone.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int32)
    return x, y


def _write_npz_atomic(file: str, **arrays: np.ndarray) -> None:
    """Writes a temporary file in the same folder, then renames it over ``file``: readers
    see the old file or the complete new one, never a partial write."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(file) or ".", prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------- splitting


def split(
    ds: Dataset,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    standardize: bool = True,
    max_train: int | None = None,
) -> Splits:
    """Seeded train / validation / test split.

    The examples are shuffled with ``seed``; the test part takes
    ``round(test_fraction * n)`` of them, the validation part ``round(val_fraction * n)``,
    and the training part the rest, capped at ``max_train``. The validation and test parts
    do not depend on ``max_train``.

    Args:
      ds: the dataset.
      val_fraction, test_fraction: each in ``[0, 1)``, with ``val_fraction + test_fraction
        < 1``. A part may be empty (0 examples).
      seed: non-negative int seeding the shuffle.
      standardize: centre and scale every feature by the training part's mean and
        standard deviation (applied to all three parts). Features constant on the
        training part are only centred (they become 0 there), not divided by zero.
      max_train: keep at most this many training examples (positive int); default all.

    Returns:
      :class:`Splits` of float32 / int32 datasets with ``ds``'s ``num_classes`` and name.
    """
    if not isinstance(ds, Dataset):
        raise TypeError(
            f"ds: expected a Dataset (from load or from_arrays), got {type(ds).__name__}"
        )
    for arg, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not _is_real(value) or not 0 <= value < 1:
            raise ValueError(f"{arg}: expected a number in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction + test_fraction: {val_fraction} + {test_fraction} = "
            f"{val_fraction + test_fraction}; expected < 1 so that training examples remain"
        )
    _check_seed(seed)
    if max_train is not None:
        _check_positive_int("max_train", max_train)
    if not isinstance(standardize, bool):
        raise ValueError(f"standardize: expected a bool, got {standardize!r}")

    n = ds.y.shape[0]
    n_test, n_val = round(test_fraction * n), round(val_fraction * n)
    if n - n_test - n_val < 1:
        raise ValueError(
            f"val_fraction={val_fraction}, test_fraction={test_fraction}: of {n} examples "
            f"{n_val} go to validation and {n_test} to test, none to training; expected "
            "smaller fractions or more data"
        )
    perm = np.random.default_rng(seed).permutation(n)
    parts = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :][:max_train]
    test, val, train = (ds._replace(x=ds.x[i], y=ds.y[i]) for i in parts)
    if standardize:
        x = train.x.astype(np.float64)
        mean, std = x.mean(axis=0), x.std(axis=0)
        constant = x.max(axis=0) == x.min(axis=0)
        mean = np.where(constant, x[0], mean)  # constant features centre to exactly 0
        scale = np.where(constant, 1.0, std)
        train, val, test = (
            d._replace(x=((d.x - mean) / scale).astype(np.float32)) for d in (train, val, test)
        )
    return Splits(train, val, test)


# --------------------------------------------------------------------------- batches


def to_batch(ds: Dataset) -> dict[str, jax.Array]:
    """The batch format losses take: ``{"x": jnp.ndarray, "y": jnp.ndarray}``."""
    if not isinstance(ds, Dataset):
        raise TypeError(f"ds: expected a Dataset, got {type(ds).__name__}")
    return {"x": jnp.asarray(ds.x), "y": jnp.asarray(ds.y)}


def batch_at(data: PyTree | Callable, key: jax.Array | None, step) -> PyTree:
    """The batch an inner run uses at step ``step``: ``data`` itself (a full batch), or
    ``data(fold_in(key, step), step)`` for a sampler. For loops of your own (e.g. a baseline
    that must see exactly the minibatches the estimators see)."""
    if callable(data):
        return data(jax.random.fold_in(key, step), step)
    return data


@jax.tree_util.register_pytree_node_class
class Sampler:
    """A jittable minibatch sampler ``(key, step) -> batch``; build it with
    :func:`minibatch_sampler`.

    It is a pytree whose leaves are the data, so passing it as an argument of a ``jit``-ed
    function traces the data instead of embedding it in the compiled program as constants
    (what happens to arrays a function closes over).

    Attributes:
      batch: the full batch (a pytree of arrays with a common leading dimension ``n``).
      batch_size: rows per minibatch.
      replace: whether rows are drawn with replacement.
    """

    def __init__(self, batch: PyTree, batch_size: int, replace: bool):
        self.batch, self.batch_size, self.replace = batch, batch_size, replace

    @property
    def num_examples(self) -> int:
        """``n``, the number of rows sampled from."""
        return jax.tree.leaves(self.batch)[0].shape[0]

    def __call__(self, key: jax.Array, step: int | jax.Array) -> PyTree:
        """The minibatch for ``(key, step)``: rows picked with ``fold_in(key, step)``."""
        key = jax.random.fold_in(key, step)
        n = self.num_examples
        if self.replace:
            idx = jax.random.randint(key, (self.batch_size,), 0, n, dtype=jnp.int32)
        else:
            # Gumbel-top-k with uniform keys: the rows with the batch_size largest of n iid
            # uniforms form a uniformly random subset, in random order. One O(n) pass
            # (measured 7-40x faster on CPU than jax.random.permutation's sort rounds).
            # float32 keys: the same batches with and without jax_enable_x64.
            u = jax.random.uniform(key, (n,), jnp.float32)
            idx = jax.lax.top_k(u, self.batch_size)[1]
        return jax.tree.map(lambda a: a[idx], self.batch)

    def __repr__(self) -> str:
        return (
            f"Sampler(n={self.num_examples}, batch_size={self.batch_size}, replace={self.replace})"
        )

    def tree_flatten(self):
        return (self.batch,), (self.batch_size, self.replace)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)


def minibatch_sampler(batch: PyTree, batch_size: int, replace: bool = False) -> Sampler:
    """A jittable sampler ``(key, step) -> batch`` of ``batch_size`` rows of ``batch``.

    Deterministic given ``(key, step)`` (the step is folded into the key, so one key gives
    a different minibatch per step); works under ``jit``, ``vmap`` over keys and inside
    ``lax.scan``. Use it as the ``inner_data`` of an inner run.

    Args:
      batch: a dict such as :func:`to_batch`'s (or any pytree) of arrays sharing a leading
        dimension ``n >= 1``.
      batch_size: positive int; at most ``n`` unless ``replace``.
      replace: ``False``: distinct rows within each minibatch (uniformly random subset,
        in random order); ``True``: rows drawn independently and uniformly.

    Returns:
      A :class:`Sampler` (callable as ``sampler(key, step)``).
    """
    if isinstance(batch, Dataset):
        raise TypeError("batch: got a Dataset; expected a batch dict, e.g. to_batch(ds)")
    if not isinstance(replace, bool):
        raise ValueError(f"replace: expected a bool, got {replace!r}")
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves:
        raise ValueError(f"batch: expected a dict (or pytree) of arrays, got {batch!r}")
    sizes = {}
    for path, leaf in leaves:
        if not hasattr(leaf, "shape") or np.ndim(leaf) < 1:
            raise ValueError(
                f"batch: leaf {jax.tree_util.keystr(path) or '(root)'} is "
                f"{type(leaf).__name__} of shape {np.shape(leaf)}; expected arrays with a "
                "leading example dimension"
            )
        sizes[jax.tree_util.keystr(path) or "(root)"] = leaf.shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch: leading dimensions differ: {sizes}; expected one n for all")
    n = next(iter(sizes.values()))
    if n < 1:
        raise ValueError("batch: 0 examples; expected at least 1")
    _check_positive_int("batch_size", batch_size)
    if not replace and batch_size > n:
        raise ValueError(
            f"batch_size: {batch_size} > n = {n} examples; expected at most {n} without "
            "replacement (or pass replace=True)"
        )
    return Sampler(jax.tree.map(jnp.asarray, batch), int(batch_size), replace)


# --------------------------------------------------------------------------- label noise


def corrupt_labels(
    y: Any, fraction: float, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Label noise for data hyper-cleaning: changes ``round(fraction * n)`` labels.

    A random subset of the examples is chosen with ``seed``; each chosen label is
    replaced by one drawn uniformly from the *other* ``num_classes - 1`` classes, so every
    chosen label really changes.

    Args:
      y: integer labels of shape ``(n,)`` in ``[0, num_classes)`` (NumPy or JAX array).
      fraction: number in ``[0, 1]``.
      num_classes: int ``>= 2``.
      seed: non-negative int.

    Returns:
      ``(y_noisy, corrupted)``: int32 labels and the boolean mask of changed examples,
      NumPy arrays of shape ``(n,)``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes: {num_classes}; expected >= 2 (a label needs another class)")
    if not _is_real(fraction) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction: expected a number in [0, 1], got {fraction!r}")
    _check_seed(seed)
    y = np.asarray(y)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ValueError(f"y: {y.dtype}{list(y.shape)}; expected integer labels of shape (n,)")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"y: labels range over [{int(y.min())}, {int(y.max())}]; expected labels in "
            f"[0, {num_classes}) for num_classes={num_classes}"
        )
    n = y.shape[0]
    rng = np.random.default_rng(seed)
    idx = rng.choice(n, round(fraction * n), replace=False)
    shift = rng.integers(1, num_classes, size=idx.shape[0])
    y_noisy = y.astype(np.int32)  # a copy
    y_noisy[idx] = (y_noisy[idx] + shift) % num_classes
    corrupted = np.zeros(n, dtype=bool)
    corrupted[idx] = True
    return y_noisy, corrupted


# --------------------------------------------------------------------------- validation


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_positive_int(arg: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{arg}: expected a positive int, got {value!r}")


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
