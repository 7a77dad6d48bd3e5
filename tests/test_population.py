"""hg.population: exploit/explore over a population of outer states, the mutations, the HPM
teacher's credit assignment, sharding, and failure isolation.

Tolerances: a vmapped population against a Python loop of hg.outer.step computes the same
float64 maths with batched kernels (assert 1e-12 relative); exploit copies and runs that
differ in one member are compared bit for bit (a copy is a gather, and vmapped members never
mix). The teacher's gradient is checked against central differences (rtol 1e-6, see
test_teacher_gradient_matches_finite_differences).
"""

import json
import os
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

P = hg.population
SCRIPT = pathlib.Path(__file__).parent / "parallel_scripts" / "hpm_population.py"


@pytest.fixture(scope="module", autouse=True)
def four_devices():
    """Starts the 4-device script at once, so that it runs beside this module's tests."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT)],
        cwd=SCRIPT.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
    if not proc.stdout.closed:  # not collected (e.g. the test was deselected)
        proc.communicate()


def _ridge():
    tp = hg.testing.ridge_regression(jax.random.key(0), num_train=24, num_val=16, dim=4)
    return tp._replace(run=tp.run._replace(num_steps=8))


def _members(tree, index):
    return jax.tree.map(lambda x: x[index], tree)


def _with_key_data(state):
    """A population state with its PRNG keys as raw key data, for exact comparisons."""
    members = state.members._replace(key=jax.random.key_data(state.members.key))
    return state._replace(members=members, key=jax.random.key_data(state.key))


def _without_key(members):
    return members._replace(key=None)


def _jit_step(tp, method, opt, mutation, **kw):
    return jax.jit(
        lambda s: P.step(
            tp.problem, tp.run, method, opt, mutation, s, tp.inner_data, tp.outer_data, **kw
        )
    )


def _context(hparams, size):
    everyone = jnp.ones(size, bool)
    return P.Context(hparams, jnp.zeros(size), everyone, everyone, jnp.arange(size))


# --------------------------------------------------------------------------- exploit


@pytest.mark.parametrize("mutation", [None, P.Gaussian(0.5)], ids=["copy", "gaussian"])
def test_exploit_copies_the_whole_member_but_its_key(mutation):
    tp, opt = _ridge(), optax.adam(0.1)
    state = P.init(
        opt,
        jnp.linspace(-4.0, 0.0, 5),
        lambda k: jax.random.normal(k, (4,)),
        jax.random.key(1),
        mutation=mutation,
    )
    trained, m0 = _jit_step(tp, hg.Unrolled(), opt, mutation, interval=2, fraction=0.0)(state)
    new, m = _jit_step(tp, hg.Unrolled(), opt, mutation, interval=2, fraction=0.4)(state)
    chex.assert_trees_all_equal((m.steps, m.scores), (m0.steps, m0.scores))
    order = np.argsort(np.asarray(m.scores))
    top, bottom = order[:2], order[3:]
    parents, replaced = np.asarray(m.parents), np.asarray(m.replaced)
    assert set(np.flatnonzero(replaced)) == set(bottom)
    assert set(parents[bottom]) <= set(top)
    np.testing.assert_array_equal(parents[order[:3]], order[:3])
    expected = _members(_without_key(trained.members), parents)
    keys = lambda s: jax.random.key_data(s.members.key)  # noqa: E731
    chex.assert_trees_all_equal(keys(new), keys(trained))  # each member keeps its own key
    if mutation is None:
        chex.assert_trees_all_equal(_without_key(new.members), expected)
        chex.assert_trees_all_equal(m.strengths, jnp.zeros(5))
        return
    # Gaussian: all but the hyperparameters copied; replaced members' hyperparameters moved.
    chex.assert_trees_all_equal(
        _without_key(new.members)._replace(hparams=None), expected._replace(hparams=None)
    )
    kept = order[:3]
    chex.assert_trees_all_equal(new.members.hparams[kept], expected.hparams[kept])
    assert np.all(np.asarray(new.members.hparams[bottom] != expected.hparams[bottom]))
    chex.assert_trees_all_equal(m.strengths, jnp.where(m.replaced, 0.5, 0.0))


def test_score_fn_ranks_members():
    # A score that reverses the ranking: the member with the lowest outer loss is replaced.
    tp, opt = _ridge(), optax.sgd(0.1)
    state = P.init(opt, jnp.linspace(-4.0, 0.0, 5), jnp.zeros((5, 4)), jax.random.key(2))
    score = lambda p, h: -tp.problem.outer_loss(p, h, tp.outer_data)  # noqa: E731
    trained, _ = _jit_step(tp, hg.Unrolled(), opt, None, interval=1, fraction=0.0)(state)
    _, m = _jit_step(tp, hg.Unrolled(), opt, None, interval=1, score_fn=score)(state)
    chex.assert_trees_all_close(m.scores, jax.vmap(score)(trained.members.params, None), rtol=1e-12)
    assert list(np.flatnonzero(m.replaced)) == [int(np.argmin(m.steps.outer_loss[:, -1]))]


# --------------------------------------------------------------------------- vmap vs a loop


def test_population_equals_a_loop_of_outer_steps():
    tp, opt, interval, size = _ridge(), optax.adam(0.1), 3, 4
    state = P.init(
        opt, jnp.linspace(-4.0, 0.0, size), lambda k: jax.random.normal(k, (4,)), jax.random.key(3)
    )
    one = jax.jit(
        lambda s: hg.outer.step(
            tp.problem, tp.run, hg.Unrolled(), opt, s, tp.inner_data, tp.outer_data
        )
    )
    finals, losses = [], []
    for i in range(size):
        s, trace = _members(state.members, i), []
        for _ in range(interval):
            s, metrics = one(s)
            trace.append(metrics.outer_loss)
        finals.append(s)
        losses.append(jnp.stack(trace))
    loop = jax.tree.map(lambda *x: jnp.stack(x), *finals)
    losses = jnp.stack(losses)

    new, m = _jit_step(tp, hg.Unrolled(), opt, None, interval=interval, fraction=0.0)(state)
    chex.assert_trees_all_close(_without_key(new.members), _without_key(loop), rtol=1e-12)
    chex.assert_trees_all_close(m.steps.outer_loss, losses, rtol=1e-12)
    assert not np.any(np.asarray(m.replaced)) and int(new.step) == 1

    # fraction 1/4 of 4 members: one top and one bottom member, so the exploit is
    # deterministic: the loop's worst member becomes a copy of its best.
    new, m = _jit_step(tp, hg.Unrolled(), opt, None, interval=interval, fraction=0.25)(state)
    best, worst = int(np.argmin(losses[:, -1])), int(np.argmax(losses[:, -1]))
    parents = np.arange(size)
    parents[worst] = best
    np.testing.assert_array_equal(m.parents, parents)
    chex.assert_trees_all_close(
        _without_key(new.members), _members(_without_key(loop), parents), rtol=1e-12
    )


# --------------------------------------------------------------------------- the teacher


def test_teacher_gradient_matches_finite_differences():
    # L(φ) = mean over the mutated children of their validation loss at h_child(φ), at the
    # first outer step of the next interval. The inner run converges (quadratic problem, GD
    # contracting the error by 1e-14) and Implicit/Cholesky is exact there, so the
    # first-order credit assignment is exact: dL/dφ = mean_i ∇F(h_i)ᵀ ∂h_i/∂φ. Central
    # differences in float64 carry O(eps^(2/3)) ~ 1e-10 relative error: rtol 1e-6.
    tp = hg.testing.quadratic_problem(jax.random.key(4), dim=4, num_hparams=3)
    opt, size = optax.sgd(0.05), 4
    teacher = P.Teacher(scale=0.5, features=4, optimizer=optax.sgd(1.0))
    hparams = tp.hparams[None] + jax.random.normal(jax.random.key(5), (size, 3))
    state = P.init(opt, hparams, jnp.zeros((size, 4)), jax.random.key(6), mutation=teacher)
    step = _jit_step(tp, hg.Implicit(hg.Cholesky()), opt, teacher, interval=1, fraction=0.5)

    def two_intervals(phi):
        first, m1 = step(state._replace(mutation=state.mutation._replace(params=phi)))
        second, m2 = step(first)
        return first, m1, second, m2

    phi = state.mutation.params
    first, m1, second, m2 = two_intervals(phi)
    children = m1.replaced
    assert int(jnp.sum(children)) == 2

    def loss(phi):
        m2 = two_intervals(phi)[3]
        return jnp.sum(jnp.where(children, m2.steps.outer_loss[:, 0], 0.0)) / 2

    grad = teacher.credit(first.mutation, jax.tree.map(lambda g: g[:, 0], m2.steps.grad))
    check = hg.testing.check_hypergradient(
        jax.jit(loss), phi, grad, num_directions=6, key=jax.random.key(7)
    )
    assert check.ok, check
    assert np.max(np.abs(np.asarray(check.analytic))) > 1e-3  # a non-trivial gradient
    # The update applied in the second interval is that gradient (sgd with rate 1).
    chex.assert_trees_all_close(
        second.mutation.params, jax.tree.map(lambda p, g: p - g, phi, grad), rtol=1e-12, atol=1e-15
    )


def test_teacher_strengths_are_in_the_unit_interval_times_scale():
    size, teacher = 6, P.Teacher(scale=0.3, features=4)
    hparams = {"a": jnp.linspace(-1.0, 1.0, size), "b": jnp.ones((size, 2))}
    state = teacher.init(jax.random.key(8), hparams)
    child, new, strengths = teacher.apply(
        state, jax.random.key(9), hparams, _context(hparams, size)
    )
    chex.assert_trees_all_equal_structs(child, hparams)
    flat = jnp.concatenate([strengths["a"][:, None], strengths["b"]], axis=1)
    assert np.all((np.asarray(flat) > 0) & (np.asarray(flat) < 0.3))
    moved = jnp.concatenate([child["a"][:, None] - hparams["a"][:, None], child["b"] - 1], 1)
    chex.assert_trees_all_close(moved, flat * new.record.noise, rtol=1e-12)


# --------------------------------------------------------------------------- 4 devices


def test_population_on_four_devices_equals_one_device(four_devices):
    try:
        out, _ = four_devices.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{SCRIPT.name} did not finish within 120 s")
    assert four_devices.returncode == 0, out[-4000:]
    result = json.loads(out.splitlines()[-1].removeprefix("RESULT "))
    bad = {k: v for k, v in result["errors"].items() if not v <= 1e-12}
    assert not bad, f"relative errors above 1e-12: {bad}"
    assert result["same_keys"] and result["replaced"] == [2, 2]
    assert "not divisible by the 4 devices" in result["message"]


# --------------------------------------------------------------------------- failures


def test_a_nonfinite_member_is_replaced_and_isolated():
    # Member 2's log-ridge is NaN in one run and large (the worst member) in the other: the
    # other members' trajectories are bit-identical, and after the exploit both runs hold
    # the same population (member 2 replaced by the same copy, mutated by the same draw).
    tp, opt, mutation = _ridge(), optax.adam(0.1), P.Gaussian(0.2)
    step = _jit_step(tp, hg.Unrolled(), opt, mutation, interval=2)
    runs = []
    for bad in (jnp.nan, 0.0):
        hparams = jnp.array([-4.0, -3.0, bad, -2.0, -1.5])
        state = P.init(opt, hparams, jnp.zeros((5, 4)), jax.random.key(10), mutation=mutation)
        first, m1 = step(state)
        runs.append((first, m1, *step(first)))
    (nan_state, nan_m, nan_state2, nan_m2), (ok_state, ok_m, ok_state2, ok_m2) = runs
    assert float(nan_m.scores[2]) == np.inf and int(nan_m.status[2]) == hg.Status.NONFINITE
    # The control run's member 2 is finite and the worst: the same member is replaced.
    assert np.all(np.isfinite(ok_m.scores)) and int(np.argmax(ok_m.scores)) == 2
    assert bool(nan_m.replaced[2]) and int(nan_m.parents[2]) != 2
    others = np.array([0, 1, 3, 4])
    chex.assert_trees_all_equal(_members(nan_m, others), _members(ok_m, others))
    chex.assert_trees_all_equal(_with_key_data(nan_state), _with_key_data(ok_state))
    chex.assert_trees_all_equal(nan_m2, ok_m2)  # the replaced member trains normally
    chex.assert_trees_all_equal(_with_key_data(nan_state2), _with_key_data(ok_state2))
    assert np.all(np.isfinite(np.asarray(nan_m2.scores)))


def test_no_hypergradient_keeps_hyperparameters():
    # Random search: members train and are scored, their hyperparameters stay put; the
    # outer loss is the one the estimators report.
    tp, opt = _ridge(), optax.adam(0.1)
    hparams = jnp.linspace(-4.0, 0.0, 4)
    state = P.init(opt, hparams, jnp.zeros((4, 4)), jax.random.key(11))
    new, m = _jit_step(tp, P.NoHypergradient(), opt, None, interval=2, fraction=0.0)(state)
    _, reference = _jit_step(tp, hg.Unrolled(), opt, None, interval=1, fraction=0.0)(state)
    chex.assert_trees_all_equal(new.members.hparams, hparams)
    chex.assert_trees_all_close(m.steps.outer_loss[:, 0], reference.steps.outer_loss[:, 0])
    chex.assert_trees_all_equal(m.steps.grad, jnp.zeros((4, 2)))


# --------------------------------------------------------------------------- mutations


def test_perturb_multiplies_by_a_factor():
    size = 64
    transform = P.Transform({"lr": "log", "wd": "identity", "p": "logit"})
    values = {
        "lr": jnp.full((size, 2), 0.1),
        "wd": jnp.full(size, 3e-4),
        "p": jnp.full(size, 0.3),
    }
    hparams = transform.to_unconstrained(values)
    mutation = P.Perturb((0.8, 1.2), transform)
    state = mutation.init(jax.random.key(12), hparams)
    child, _, logf = mutation.apply(state, jax.random.key(13), hparams, _context(hparams, size))
    ratios = jax.tree.map(lambda c, v: c / v, transform.to_constrained(child), values)
    chex.assert_trees_all_close(ratios, jax.tree.map(jnp.exp, logf), rtol=1e-12)
    for r in jax.tree.leaves(ratios):
        near = np.minimum(np.abs(np.asarray(r) - 0.8), np.abs(np.asarray(r) - 1.2))
        assert np.all(near < 1e-12)
        assert np.any(np.asarray(r) < 1) and np.any(np.asarray(r) > 1)  # both factors drawn


def test_resample_draws_from_the_sampler():
    size = 8
    sampler = lambda k: {"a": jax.random.uniform(k, (2,), minval=10.0, maxval=11.0)}  # noqa: E731
    hparams = {"a": jnp.zeros((size, 2))}
    key = jax.random.key(14)
    child, _, redrawn = P.Resample(sampler, 1.0).apply((), key, hparams, _context(hparams, size))
    draws = jax.vmap(sampler)(jax.random.split(jax.random.split(key)[0], size))
    chex.assert_trees_all_equal(child, draws)
    chex.assert_trees_all_equal(redrawn, {"a": jnp.ones((size, 2))})
    child, _, redrawn = P.Resample(sampler, 0.0).apply((), key, hparams, _context(hparams, size))
    chex.assert_trees_all_equal((child, redrawn), (hparams, hparams))


def test_gaussian_noise_has_the_given_scale():
    # 4000 members: the sample standard deviation of n normal draws has relative standard
    # error 1/sqrt(2n) (<= 1.2% here); 5% is beyond 4 standard errors. The mean's standard
    # error is scale/sqrt(n); we allow 5 of them.
    size = 4000
    hparams = {"a": jnp.zeros((size, 2)), "b": jnp.full(size, 3.0)}
    scale = {"a": 0.3, "b": 2.0}
    child, _, strengths = P.Gaussian(scale).apply(
        (), jax.random.key(15), hparams, _context(hparams, size)
    )
    for name in ("a", "b"):
        noise = np.ravel(np.asarray(child[name] - hparams[name]))
        assert abs(np.std(noise) / scale[name] - 1) < 0.05
        assert abs(np.mean(noise)) < 5 * scale[name] / np.sqrt(noise.size)
        np.testing.assert_array_equal(strengths[name], scale[name])


def test_transforms_round_trip():
    values = {"lr": jnp.array([1e-4, 0.1, 3.0]), "p": jnp.array([1e-3, 0.5, 0.9]), "x": -2.0}
    transform = P.Transform({"lr": "log", "p": "logit", "x": "identity"})
    h = transform.to_unconstrained(values)
    chex.assert_trees_all_close(h["lr"], jnp.log(values["lr"]), rtol=1e-14)
    chex.assert_trees_all_close(jax.nn.sigmoid(h["p"]), values["p"], rtol=1e-14)
    chex.assert_trees_all_close(transform.to_constrained(h), values, rtol=1e-14)
    chex.assert_trees_all_close(P.Transform("log").to_constrained({"a": 0.0}), {"a": 1.0})


# --------------------------------------------------------------------------- errors


def test_bad_input_names_the_argument():
    tp, opt = _ridge(), optax.sgd(0.1)
    state = P.init(opt, jnp.zeros(4), jnp.zeros((4, 4)), jax.random.key(16))
    run = lambda **kw: P.step(  # noqa: E731
        tp.problem, tp.run, hg.Unrolled(), opt, None, state, tp.inner_data, tp.outer_data, **kw
    )
    for fraction in (-0.1, 0.6, "0.2"):
        with pytest.raises(ValueError, match="fraction: expected a number in"):
            run(interval=1, fraction=fraction)
    with pytest.raises(ValueError, match="fraction: 0.2 of a population of 4 has no top"):
        run(interval=1, fraction=0.2)
    for interval in (0, 1.5):
        with pytest.raises(ValueError, match="interval: expected a positive int"):
            run(interval=interval, fraction=0.0)
    with pytest.raises(ValueError, match="transform: unknown name 'exp'"):
        P.Transform({"a": "exp"}).to_constrained({"a": 1.0})
    with pytest.raises(ValueError, match="transform: spec .* is not a prefix"):
        P.Transform({"a": "log"}).to_constrained({"b": 1.0})
    with pytest.raises(ValueError, match="params0: leading axis 3 differs"):
        P.init(opt, jnp.zeros(4), jnp.zeros((3, 4)), jax.random.key(0))
    with pytest.raises(ValueError, match="hparams: every leaf needs the same leading"):
        P.init(
            opt, {"a": jnp.zeros(4), "b": jnp.zeros(3)}, lambda k: jnp.zeros(4), jax.random.key(0)
        )
    for mutation, name in [
        (P.Perturb((0.0, 1.2)), "Perturb.factors"),
        (P.Gaussian(-1.0), "Gaussian.scale"),
        (P.Resample(lambda k: 0.0, 1.5), "Resample.prob"),
        (P.Teacher(scale=0.0), "Teacher.scale"),
        (P.Teacher(features=0), "Teacher.features"),
    ]:
        with pytest.raises(ValueError, match=name):
            mutation.init(jax.random.key(0), jnp.zeros(4))
