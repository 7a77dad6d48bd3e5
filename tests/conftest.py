"""Test harness: float64 for correctness, rank promotion raises, fresh PRNG keys."""

import itertools

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """Returns a function giving a fresh, deterministic PRNG key per call."""
    counter = itertools.count()
    return lambda: jax.random.key(next(counter))
