"""Memory scaling in the horizon T, read from XLA's compiled memory analysis.

These are properties of the compiled program (bytes of temporaries), deterministic on a
given backend, not timings: reverse mode stores every step's carry (linear in T), √T-block
rematerialisation stores block boundaries plus one block's carries (∝ √T), forward mode stores
nothing per step (flat in T).
"""

import jax
import jax.numpy as jnp
import pytest
from problems import MLP_PROBLEM, logistic_data, mlp_params

import hypergrad_jax as hg


def temp_bytes(estimator, num_steps, key):
    data = logistic_data(key, n=40, dtype=jnp.float32)
    params0 = mlp_params(key, dtype=jnp.float32)
    hparams = {"optimizer": {"lr": jnp.float32(0.1)}, "log_l2": jnp.float32(-3.0)}
    run = hg.InnerRun(hg.optim.sgd(), num_steps)
    fn = jax.jit(lambda h: hg.hypergradient(MLP_PROBLEM, run, estimator, h, params0, data, data)[0])
    analysis = fn.lower(hparams).compile().memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    return analysis.temp_size_in_bytes


def test_memory_scaling_in_the_horizon(getkey):
    key = getkey()
    growth = {}
    for name, est in [
        ("unrolled", hg.Unrolled()),
        ("remat", hg.Unrolled(remat=True)),
        ("forward", hg.Forward()),
    ]:
        small, mid, large = (temp_bytes(est, T, key) for T in (400, 1600, 6400))
        # the growth of the second 4x step of T over the first's: a fixed overhead cancels;
        # linear -> 4, √T -> 2 (block boundaries and one block's carries), flat -> no growth
        growth[name] = (large - mid) / (mid - small) if mid != small else 0.0
        if name == "forward":
            assert small == mid == large
    assert 3.5 < growth["unrolled"] < 4.5, growth
    assert 1.5 < growth["remat"] < 2.5, growth
