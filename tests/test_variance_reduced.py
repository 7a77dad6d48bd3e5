"""hypergrad_jax.stochastic.variance_reduced: SABA, SRBA, MA-SOBA.

Reference: a small finite-sum quadratic bilevel problem (float64, conftest) whose value
function F(λ) is a strongly convex quadratic with a closed-form minimiser λ*; exact
identities where the methods reduce to SOBA (one block; a restart at every step; averaging
weight 1); the SAGA table against oracles recomputed at the recorded iterates.
"""

import json
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergrad_jax as hg
from hypergrad_jax import stochastic as st

N, M, D, P, B = 32, 16, 4, 2, 8  # inner / outer samples, dim θ, dim λ, block size
RIDGE = 0.1  # the outer loss's ½ r ||λ||²


def _inner(theta, lam, batch):
    quad = 0.5 * jnp.einsum("i,nij,j->n", theta, batch["A"], theta)
    return jnp.mean(quad + jnp.einsum("i,nij,j->n", lam, batch["C"], theta) + batch["a"] @ theta)


def _outer(theta, lam, batch):
    quad = 0.5 * jnp.einsum("i,nij,j->n", theta, batch["F"], theta)
    return jnp.mean(quad + batch["f"] @ theta) + 0.5 * RIDGE * lam @ lam


PROBLEM = hg.BilevelProblem(_inner, _outer)


@pytest.fixture(scope="module")
def finite_sum():
    """Per-sample A_i = x_i x_iᵀ + 0.5 I (each g_i strongly convex), random C_i, a_i; outer
    F_j = y_j y_jᵀ. F(λ) is quadratic: λ* solves ∇²F λ = −∇F(0) (two dense solves)."""
    k = jax.random.split(jax.random.key(0), 5)
    x, y = jax.random.normal(k[0], (N, D)), jax.random.normal(k[3], (M, D))
    inner = {
        "A": x[:, :, None] * x[:, None, :] + 0.5 * jnp.eye(D)[None],
        "C": 0.5 * jax.random.normal(k[1], (N, P, D)),
        "a": jax.random.normal(k[2], (N, D)),
    }
    outer = {"F": y[:, :, None] * y[:, None, :], "f": jax.random.normal(k[4], (M, D))}
    a, c = inner["A"].mean(0), inner["C"].mean(0)
    jac, theta0 = -jnp.linalg.solve(a, c.T), -jnp.linalg.solve(a, inner["a"].mean(0))
    f_bar = outer["F"].mean(0)
    hessian = jac.T @ f_bar @ jac + RIDGE * jnp.eye(P)
    lam_star = -jnp.linalg.solve(hessian, jac.T @ (f_bar @ theta0 + outer["f"].mean(0)))
    return inner, outer, lam_star


def sgd(lr, num_steps=1):
    return hg.InnerRun(hg.optim.sgd(), num_steps, lambda h: {"lr": lr})


def _samplers(inner, outer):
    inner_sampler = hg.data.minibatch_sampler(inner, B)
    outer_sampler = hg.data.minibatch_sampler(outer, B)
    return inner_sampler, lambda key: outer_sampler(key, 0)


def _run(method, inner_data, outer_data, steps, lr=0.2, lam0=None):
    """``steps`` outer steps of ``method`` through hg.outer.step (SGD at ``lr`` on θ, v and
    λ), one jitted scan: ``(final state, λ after each step, oracle calls per step)``."""
    optimizer = optax.sgd(lr)
    lam0 = jnp.zeros(P) if lam0 is None else lam0
    state = hg.outer.init(optimizer, lam0, jnp.zeros(D), jax.random.key(1), method)

    def body(s, _):
        s, metrics = hg.outer.step(PROBLEM, sgd(lr), method, optimizer, s, inner_data, outer_data)
        return s, (s.hparams, metrics.oracles)

    final, (lams, calls) = jax.jit(lambda s: jax.lax.scan(body, s, None, length=steps))(state)
    return final, lams, calls


def _error(lams, lam_star):
    return float(jnp.linalg.norm(lams[-1] - lam_star) / jnp.linalg.norm(lam_star))


def test_variance_reduction_converges_where_soba_stalls(finite_sum):
    # Constant steps 0.2 on θ, v and λ, 1500 outer steps. SOBA's minibatch directions keep
    # their variance at the solution, so λ hovers at a noise floor (measured: relative error
    # 0.3 .. 0.8 over steps 500 .. 3000); SABA's and SRBA's estimates lose theirs, so they
    # converge linearly (measured: 2e-5 at step 500, 5e-10 at 1000, 1e-14 at 1500). Same
    # oracle calls per step for SABA and SOBA (4): SABA must end 1e8 times closer.
    inner, outer, lam_star = finite_sum
    _, soba, soba_calls = _run(st.SOBA(linear_lr=0.2), *_samplers(inner, outer), 1500)
    _, saba, saba_calls = _run(st.SABA(N, M, B, linear_lr=0.2), inner, outer, 1500)
    _, srba, _ = _run(st.SRBA(N, M, B, linear_lr=0.2), inner, outer, 1500)
    assert int(saba_calls.total.sum()) == int(soba_calls.total.sum()) == 4 * 1500
    assert _error(soba, lam_star) > 1e-2
    assert _error(saba, lam_star) < 1e-10
    assert _error(saba, lam_star) < 1e-8 * _error(soba, lam_star)
    assert _error(srba, lam_star) < 1e-10


def _block(data, b):
    return jax.tree.map(lambda x: x[b * B : (b + 1) * B], data)


def test_saba_table_after_one_epoch_holds_each_blocks_oracles(finite_sum):
    # Random reshuffling visits each of the N / B = 4 inner blocks once in steps 0..3 (and
    # the 2 outer blocks once in steps 0..1 and again in 2..3): after them, row b of each
    # table is block b's oracles at the iterate where it was visited, recomputed here from
    # the recorded iterates (1e-12: the same arithmetic), and the running mean equals the
    # rows' mean.
    inner, outer, _ = finite_sum
    method, run, optimizer = st.SABA(N, M, B, linear_lr=0.2), sgd(0.2), optax.sgd(0.2)
    state = hg.outer.init(optimizer, jnp.ones(P), jnp.zeros(D), jax.random.key(3), method)
    step = jax.jit(lambda s: hg.outer.step(PROBLEM, run, method, optimizer, s, inner, outer))
    states = [state]
    for _ in range(4):
        states.append(step(states[-1])[0])
    memory = states[-1].method
    inner_order, outer_order = memory.inner_order, memory.outer_order
    assert sorted(inner_order.tolist()) == list(range(4))
    for k in range(4):
        s = states[k]
        b = int(inner_order[k])
        g, vjp = jax.vjp(
            lambda p, h, b=b: jax.grad(_inner)(p, h, _block(inner, b)), s.params, s.hparams
        )
        expected = (g, *vjp(s.adjoint))
        chex.assert_trees_all_close(
            jax.tree.map(lambda r, b=b: r[b], memory.inner.rows), expected, rtol=1e-12
        )
    for k in (2, 3):  # the second outer epoch
        s, b = states[k], int(outer_order[k - 2])
        expected = jax.grad(_outer, argnums=(0, 1))(s.params, s.hparams, _block(outer, b))
        chex.assert_trees_all_close(
            jax.tree.map(lambda r, b=b: r[b], memory.outer.rows), expected, rtol=1e-12
        )
    for table in (memory.inner, memory.outer):
        chex.assert_trees_all_close(
            table.mean, jax.tree.map(lambda r: r.mean(axis=0), table.rows), rtol=1e-12
        )


@pytest.mark.parametrize(
    "method",
    [
        st.SABA(N, M, batch_size=N, outer_batch_size=M, linear_lr=0.2),  # one block: SAGA = GD
        st.SRBA(N, M, B, linear_lr=0.2, period_frac=1e-9),  # a full-batch restart every step
    ],
    ids=["saba_one_block", "srba_restart_every_step"],
)
def test_full_batch_cases_are_deterministic_soba(finite_sum, method):
    # SABA with one block per sum (its estimate new − row + mean is new) and SRBA restarted
    # at every step both take SOBA's full-batch steps: the same trajectory as SOBA given
    # the whole data as its batch (1e-12: means over blocks vs over all samples).
    inner, outer, _ = finite_sum
    _, expected, _ = _run(st.SOBA(linear_lr=0.2), inner, outer, 20, lam0=jnp.ones(P))
    _, got, _ = _run(method, inner, outer, 20, lam0=jnp.ones(P))
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_masoba_with_full_averaging_is_soba(finite_sum):
    # h = (1 − 1)·h + 1·D_λ = D_λ: MA-SOBA at averaging 1 is SOBA, same batches, exactly.
    inner, outer, _ = finite_sum
    samplers = _samplers(inner, outer)
    _, expected, _ = _run(st.SOBA(linear_lr=0.2), *samplers, 30)
    _, got, _ = _run(st.MASOBA(linear_lr=0.2, averaging=1.0), *samplers, 30)
    np.testing.assert_array_equal(got, expected)


def test_masoba_projects_v_onto_the_ball(finite_sum):
    inner, outer, _ = finite_sum
    final, _, _ = _run(st.MASOBA(linear_lr=0.2, radius=1e-3), *_samplers(inner, outer), 5)
    assert float(jnp.linalg.norm(final.adjoint)) <= 1e-3 * (1 + 1e-12)


def test_oracle_counts(finite_sum):
    # SRBA (period q = ⌊0.5 · (4 + 2)⌋ = 3): steps 0 and 3 restart from full batches (one
    # call per block: 4 inner, 2 outer), the others evaluate the two points on one block.
    inner, outer, _ = finite_sum
    samplers = _samplers(inner, outer)
    _, _, saba = _run(st.SABA(N, M, B), inner, outer, 2)
    _, _, masoba = _run(st.MASOBA(), *samplers, 2)
    srba_method = st.SRBA(N, M, B)
    assert srba_method.period == 3
    _, _, srba = _run(srba_method, inner, outer, 4)
    for calls in (saba, masoba):
        assert np.asarray(calls).T.tolist() == [[1, 1, 1, 1]] * 2
    assert np.asarray(srba).T.tolist() == [[4, 4, 4, 2], [2, 2, 2, 2], [2, 2, 2, 2], [4, 4, 4, 2]]


def test_bad_arguments_raise_naming_them(finite_sum):
    inner, outer, _ = finite_sum
    params, lam = jnp.zeros(D), jnp.zeros(P)
    cases = [
        (st.SABA(30, M, B), "SABA.batch_size: 8 does not divide num_inner = 30"),
        (st.SRBA(N, 20, B), r"SRBA.batch_size \(also the outer block size\): 8 does not"),
        (st.SRBA(N, M, B, outer_batch_size=5), "SRBA.outer_batch_size: 5 does not divide"),
        (st.SABA(0, M), "SABA.num_inner: expected a positive int"),
        (st.SABA(N, M, batch_size=2.0), "SABA.batch_size: expected a positive int"),
        (st.SABA(N, M, linear_lr=-1.0), "SABA.linear_lr: expected a positive number"),
        (st.SRBA(N, M, period_frac=0.0), "SRBA.period_frac: expected a positive number"),
        (st.MASOBA(averaging=1.5), r"MASOBA.averaging: expected a number in \(0, 1\]"),
        (st.MASOBA(radius=-1.0), "MASOBA.radius: expected a positive number"),
    ]
    for method, message in cases:
        with pytest.raises(ValueError, match=message):
            method.init(params, lam)

    def step(method, run, inner_data, outer_data):
        state = method.init(params, lam)
        return method.step(PROBLEM, run, state, lam, inner_data, outer_data, jax.random.key(0))

    saba = st.SABA(N, M, B)
    sampler, outer_sampler = _samplers(inner, outer)
    with pytest.raises(TypeError, match="inner_data: SABA draws its own minibatches"):
        step(saba, sgd(0.1), sampler, outer)
    with pytest.raises(TypeError, match="outer_data: SRBA draws its own minibatches"):
        step(st.SRBA(N, M, B), sgd(0.1), inner, outer_sampler)
    short = jax.tree.map(lambda x: x[:8], outer)
    with pytest.raises(ValueError, match="outer_data: SABA.num_outer = 16, but the data's"):
        step(saba, sgd(0.1), inner, short)
    with pytest.raises(ValueError, match="run.num_steps: SABA takes one inner step"):
        step(saba, sgd(0.1, num_steps=5), inner, outer)
    momentum = hg.InnerRun(hg.optim.sgd_momentum(), 1, lambda h: {"lr": 0.1, "momentum": 0.9})
    with pytest.raises(ValueError, match="run.optimizer: MASOBA needs a stateless optimizer"):
        step(st.MASOBA(), momentum, sampler, outer_sampler)
    with pytest.raises(TypeError, match="run: SRBA takes its inner loop from an hg.InnerRun"):
        step(st.SRBA(N, M, B), None, inner, outer)
    with pytest.raises(ValueError, match="key: a PRNG key is required"):
        saba.step(PROBLEM, sgd(0.1), saba.init(params, lam), lam, inner, outer, None)


def test_methods_are_exported():
    for cls in (st.SABA, st.SRBA, st.MASOBA):
        assert cls in st.METHODS and cls.__name__ in st.__all__


@pytest.mark.slow
def test_bilevel_quadratic_benchmark_quick(tmp_path):
    script = pathlib.Path(__file__).parents[1] / "benchmarks" / "bilevel_quadratic.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "bilevel_quadratic.json").read_text())
    rows = {r["method"]: r for r in data["methods"]}
    assert {"soba", "stocbio", "amigo", "amigo_iid", "saba", "srba", "masoba"} <= rows.keys()
    assert rows["saba"]["final_suboptimality"] < rows["soba"]["final_suboptimality"]
    assert (tmp_path / "bilevel_quadratic.png").stat().st_size > 0
    assert (tmp_path / "bilevel_quadratic.md").read_text().startswith("# Stochastic bilevel")
