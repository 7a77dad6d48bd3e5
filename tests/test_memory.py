"""Memory scaling in the horizon T, read from XLA's compiled memory analysis.

These are properties of the compiled program (bytes of temporaries), deterministic on a
given backend, not timings: reverse mode stores every step (linear in T), √T-block
rematerialisation stores block boundaries plus one block (∝ √T), forward mode stores
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
    ratio = {
        name: temp_bytes(est, 1600, key) / temp_bytes(est, 100, key)
        for name, est in [
            ("unrolled", hg.Unrolled()),
            ("remat", hg.Unrolled(remat=True)),
            ("forward", hg.Forward()),
        ]
    }
    # T grows 16x: linear -> ~16x, √T -> ~4x, flat -> 1x (margins for fixed overheads).
    assert ratio["unrolled"] > 12
    assert 2 < ratio["remat"] < 6
    assert ratio["forward"] == 1.0
