"""Inner optimizers against their update equations; shared schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergrad_jax as hg


def test_shared_schedule_blocks():
    # j(t) = floor(N t / T): N = 3 values over T = 10 steps -> blocks of 4, 3, 3 steps.
    sched = hg.Shared(jnp.array([1.0, 2.0, 3.0]))
    got = [float(hg.optim.at_step({"lr": sched}, t, 10)["lr"]) for t in range(10)]
    assert got == [1.0] * 4 + [2.0] * 3 + [3.0] * 3
    # the same schedule stretched over a longer run keeps its proportions
    got = [float(hg.optim.at_step(sched, t, 20)) for t in range(20)]
    assert got == [1.0] * 7 + [2.0] * 7 + [3.0] * 6


def test_sgd_momentum_pytorch_convention():
    opt = hg.optim.sgd_momentum(clip=1.0)
    params = {"w": jnp.array([1.0, -2.0])}
    h = opt.resolve({"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01})
    state = opt.init(params, h)
    v = np.zeros(2)
    p = np.array([1.0, -2.0])
    for step, grad in enumerate([np.array([3.0, 0.5]), np.array([-0.2, -4.0])]):
        params, state = opt.update({"w": jnp.asarray(grad)}, state, params, h, step)
        v = 0.9 * v + np.clip(grad, -1, 1) + 0.01 * p
        p = p - 0.1 * v
        np.testing.assert_allclose(params["w"], p, rtol=1e-14)
        np.testing.assert_allclose(state.velocity["w"], v, rtol=1e-14)


@pytest.mark.parametrize(
    "ours,theirs,hparams",
    [
        (hg.optim.sgd(), optax.sgd(0.1), {"lr": 0.1}),
        (hg.optim.adam(eps_root=0.0), optax.adam(0.01), {"lr": 0.01}),
        (
            hg.optim.from_optax(optax.adamw),
            optax.adamw(0.01, weight_decay=0.1),
            {"learning_rate": 0.01, "weight_decay": 0.1},
        ),
        (
            hg.optim.from_optax(optax.sgd),
            optax.sgd(0.1, momentum=0.9),
            {"learning_rate": 0.1, "momentum": 0.9},
        ),
    ],
)
def test_matches_optax(getkey, ours, theirs, hparams):
    params = {"w": jax.random.normal(getkey(), (4,)), "b": jax.random.normal(getkey(), (2, 2))}
    h = ours.resolve(hparams)
    state, ref_state, ref = ours.init(params, h), theirs.init(params), params
    for step in range(4):
        grads = jax.tree.map(lambda p: jnp.sin(3 * p) + step, params)
        params, state = ours.update(grads, state, params, h, step)
        updates, ref_state = theirs.update(
            jax.tree.map(lambda p: jnp.sin(3 * p) + step, ref), ref_state, ref
        )
        ref = optax.apply_updates(ref, updates)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_from_optax_reads_signature():
    opt = hg.optim.from_optax(optax.sgd)
    assert opt.required == ("learning_rate",)
    # optional arguments may be given; the factory's defaults apply otherwise
    assert opt.resolve({"learning_rate": 0.1}) == {"learning_rate": 0.1}
    assert opt.resolve({"learning_rate": 0.1, "momentum": 0.9})["momentum"] == 0.9
    with pytest.raises(ValueError, match="missing \\['learning_rate'\\]"):
        opt.resolve({})
