"""Test harness: float64 for correctness, rank promotion raises, fresh PRNG keys, and one
persistent XLA compilation cache for the session.

Tiny runs rebuild the same programs from fresh closures (every ``build`` jits a new step
function), and subprocesses (CLI, notebook, multi-process tests) compile them again:
compiling dominates them. A persistent cache, shared with the subprocesses through the
environment, compiles each program once per session. It lives in a temporary directory
removed at exit, unless ``JAX_COMPILATION_CACHE_DIR`` is already set (then that one is
used and kept, e.g. to reuse it across local runs).
"""

import atexit
import itertools
import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hypergrad-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402 -- after the cache settings, which JAX reads when it starts
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
jax.config.update(
    "jax_persistent_cache_min_entry_size_bytes",
    int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """Returns a function giving a fresh, deterministic PRNG key per call."""
    counter = itertools.count()
    return lambda: jax.random.key(next(counter))
