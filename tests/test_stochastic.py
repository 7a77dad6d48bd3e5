"""hypergrad_jax.stochastic: NHGD and the stochastic bilevel baselines.

References: the exact hypergradient of a quadratic problem (hg.testing, float64) for the
baselines, whose only approximation is the number of inner/linear steps; the dense implicit
hypergradient at the same end point for NHGD on a well-specified logistic model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergrad_jax as hg
from hypergrad_jax import stochastic as st


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def sgd(num_steps, lr):
    """The papers' inner loop: plain SGD at a fixed step, as an hg.InnerRun."""
    return hg.InnerRun(hg.optim.sgd(), num_steps, lambda h: {"lr": lr})


@pytest.fixture(scope="module")
def quad():
    # mu = 1, L = 4: a GD step 1/L contracts by 3/4; Neumann/linear SGD with eta = 1/L too.
    return hg.testing.quadratic_problem(jax.random.key(0), dim=6, num_hparams=3, mu=1.0, L=4.0)


def _one_step(method, run, quad, start):
    """One outer step of ``method`` from ``θ = start`` with the quadratic's full batch."""
    state = method.init(start, quad.hparams)
    data = (quad.inner_data, quad.outer_data)
    step = jax.jit(
        lambda s: method.step(quad.problem, run, s, quad.hparams, *data, jax.random.key(1))
    )
    return step(state)


@pytest.mark.parametrize(
    "make",
    [
        lambda k: st.StocBiO(neumann_steps=k, neumann_lr=0.25),
        lambda k: st.AmIGO(linear_steps=k, linear_lr=0.25),
        lambda k: st.SolveAfter(hg.Neumann(steps=k, eta=0.25)),
    ],
    ids=["stocbio", "amigo", "neumann_after"],
)
def test_linear_system_baselines_converge_to_the_exact_hypergradient(quad, make):
    # The inner loop converges to 1e-16 in 200 steps at rate 3/4; the linear-system error
    # contracts like (3/4)^k, so it falls monotonically and is 1e-10-small at k = 100
    # (0.75^100 ≈ 3e-13 times the O(1) initial error).
    exact = quad.exact_hypergradient(quad.hparams)
    start = jnp.zeros_like(quad.solution(quad.hparams))
    run = sgd(200, 0.25)
    errors = [_rel(_one_step(make(k), run, quad, start)[1], exact) for k in (5, 20, 100)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-10


def test_cg_after_the_loop_is_exact(quad):
    # CG on a 6-dim SPD system is exact in 6 iterations (to rounding): 1e-10.
    method = st.SolveAfter(hg.CG(maxiter=20, tol=1e-14))
    _, grad, stats = _one_step(method, sgd(200, 0.25), quad, jnp.zeros(6))
    np.testing.assert_allclose(grad, quad.exact_hypergradient(quad.hparams), rtol=1e-10)
    assert 6 <= int(stats.oracles.hvps) <= 22


def test_soba_converges_at_a_fixed_hyperparameter(quad):
    # SOBA's θ and v contract at rate 3/4 each (v follows θ); after 300 single-loop steps at
    # a fixed λ both are at their fixed points to ~1e-30, so the direction is exact (1e-10).
    method, run = st.SOBA(linear_lr=0.25), sgd(1, 0.25)
    state = method.init(jnp.zeros(6), quad.hparams)

    def body(state, key):
        data = (quad.inner_data, quad.outer_data)
        state, grad, _ = method.step(quad.problem, run, state, quad.hparams, *data, key)
        return state, grad

    _, grads = jax.jit(lambda s: jax.lax.scan(body, s, jax.random.split(jax.random.key(0), 300)))(
        state
    )
    exact = quad.exact_hypergradient(quad.hparams)
    assert _rel(grads[10], exact) > 1e-3
    np.testing.assert_allclose(grads[-1], exact, rtol=1e-10)


def test_oracle_counts(quad):
    run = sgd(7, 0.1)
    cases = [
        (st.NHGD(), run, (7, 0, 1, 1)),
        (st.StocBiO(neumann_steps=5), run, (7, 4, 1, 1)),
        (st.AmIGO(linear_steps=5), run, (7, 5, 1, 1)),
        (st.SOBA(), sgd(1, 0.1), (1, 1, 1, 1)),
        (st.SolveAfter(hg.Neumann(steps=5, eta=1.0)), run, (7, 7, 1, 1)),
        # eta=None adds 10 power iterations and the warm start's residual: 5 + 10 + 1 + 2.
        (st.SolveAfter(hg.Neumann(steps=5)), run, (7, 18, 1, 1)),
    ]
    for method, run, expected in cases:
        _, _, stats = _one_step(method, run, quad, jnp.zeros(6))
        assert tuple(int(x) for x in stats.oracles) == expected, type(method).__name__
        assert int(stats.oracles.total) == sum(expected)


# --------------------------------------------------------------------------- NHGD


def _nll(params, hparams, batch):
    del hparams
    z = batch["x"] @ params
    return jnp.mean(jnp.logaddexp(0.0, z) - batch["y"] * z)


RHO = 1e-3


def _inner(params, hparams, batch):
    # A well-specified logistic likelihood; λ is the centre of a weak prior (mixed = −ρ I).
    return _nll(params, hparams, batch) + 0.5 * RHO * jnp.sum((params - hparams) ** 2)


@pytest.fixture(scope="module")
def logistic():
    d, n = 4, 4000
    theta_true = jnp.array([1.0, -0.5, 0.25, 0.8])
    keys = jax.random.split(jax.random.key(3), 4)

    def draw(kx, ky, m):
        x = jax.random.normal(kx, (m, d))
        y = jax.random.bernoulli(ky, jax.nn.sigmoid(x @ theta_true)).astype(x.dtype)
        return {"x": x, "y": y}

    train, val = draw(keys[0], keys[1], n), draw(keys[2], keys[3], 1000)

    def sampler(key, step):
        del step
        idx = jax.random.randint(key, (32,), 0, n)
        return jax.tree.map(lambda a: a[idx], train)

    problem = hg.BilevelProblem(_inner, _nll)
    lam = jnp.zeros(d)
    _, theta_star = hg.testing.implicit_hypergradient(problem, lam, jnp.zeros(d), train, val)
    return problem, lam, train, val, sampler, theta_star


@pytest.mark.parametrize("samples", ["mean", "woodbury"])
def test_nhgd_approaches_the_implicit_hypergradient_on_a_well_specified_model(logistic, samples):
    # At the optimum of a well-specified likelihood the Fisher equals the Hessian, so the
    # running-mean Fisher of the inner SGD's own gradients (small step: iterates stay near
    # θ*) converges to H, and NHGD's ĥ to the implicit hypergradient at the same end point.
    # The floor is the finite-sample gap between empirical Fisher and Hessian at n = 4000
    # (measured 0.035 relative) plus the iterates' spread; observed errors at T = 3000 are
    # 0.011 (mean gradient) and 0.021 (per-sample), asserted < 0.1.
    problem, lam, train, val, sampler, theta_star = logistic
    errors, distances = [], []
    for num_steps in (30, 3000):
        fisher = hg.fisher.DenseFisher(average="mean", samples=samples, damping=1e-3)
        method, run = st.NHGD(fisher, reset=True), sgd(num_steps, 0.05)
        state = method.init(theta_star, lam)
        state, grad, _ = jax.jit(
            lambda s, m=method, r=run: m.step(problem, r, s, lam, sampler, val, jax.random.key(4))
        )(state)
        hessian = jax.hessian(lambda p: _inner(p, lam, train))(state.params)
        exact = RHO * jnp.linalg.solve(hessian, jax.grad(_nll)(state.params, lam, val))
        errors.append(_rel(grad, exact))
        distances.append(_rel(jnp.linalg.inv(state.method.inverse), hessian))
    assert errors[1] < errors[0] and distances[1] < distances[0]
    assert errors[1] < 0.1


def test_fused_fisher_equals_the_inverse_of_the_recorded_gradients(logistic):
    # The scan-fused recursion against direct inversion of (ρI + Σ_t B g_t g_tᵀ)/(T + 1)
    # from gradients recorded by a plain SGD loop on the same batches: 1e-9 (float64; the
    # Sherman–Morrison chain over 50 updates loses a few digits to conditioning ~1e3).
    problem, lam, _, val, sampler, theta_star = logistic
    rho, lr, steps = 0.1, 0.05, 50
    method = st.NHGD(hg.fisher.DenseFisher(average="mean", damping=rho), reset=True)
    key, run = jax.random.key(5), sgd(steps, lr)
    state, _, _ = method.step(problem, run, method.init(theta_star, lam), lam, sampler, val, key)
    k_inner = jax.random.split(key, 3)[0]
    params, fisher = theta_star, rho * jnp.eye(4)
    for t in range(steps):
        g = jax.grad(_inner)(params, lam, hg.data.batch_at(sampler, k_inner, t))
        fisher = fisher + 32 * jnp.outer(g, g)
        params = params - lr * g
    np.testing.assert_allclose(state.params, params, rtol=1e-12)
    np.testing.assert_allclose(
        state.method.inverse, jnp.linalg.inv(fisher / (steps + 1)), rtol=1e-9, atol=1e-9
    )


def test_nhgd_carries_or_resets_the_fisher(logistic):
    problem, lam, _, val, sampler, theta_star = logistic
    for reset, expected in ((False, 20), (True, 10)):
        method, run = st.NHGD(reset=reset), sgd(10, 0.05)
        state = method.init(theta_star, lam)
        for i in range(2):
            state, _, _ = method.step(problem, run, state, lam, sampler, val, jax.random.key(i))
        assert int(state.method.count) == expected


def test_outer_loop_with_optax_lowers_the_outer_loss(quad):
    # Adam on λ with SOBA's directions: the outer objective F(λ) decreases.
    method, optimizer, run = st.SOBA(linear_lr=0.25), optax.adam(0.05), sgd(1, 0.25)
    state = hg.outer.init(optimizer, quad.hparams, jnp.zeros(6), jax.random.key(0), method)
    step = jax.jit(
        lambda s: hg.outer.step(
            quad.problem, run, method, optimizer, s, quad.inner_data, quad.outer_data
        )
    )
    for _ in range(200):
        state, _ = step(state)
    assert float(quad.objective(state.hparams)) < 0.9 * float(quad.objective(quad.hparams))


def test_bad_settings_raise_naming_the_field(quad):
    params = jnp.zeros(3)
    with pytest.raises(ValueError, match="StochasticNeumann.eta"):
        st.StocBiO(neumann_lr=-1.0).init(params, None)
    with pytest.raises(ValueError, match="DenseFisher.samples"):
        st.NHGD(hg.fisher.DenseFisher(samples="all")).init(params, None)
    with pytest.raises(ValueError, match="NHGD.sample_weights"):
        st.NHGD(sample_weights=lambda h, b: b["w"]).init(params, None)
    with pytest.raises(TypeError, match="run: NHGD takes its inner loop from an hg.InnerRun"):
        _one_step(st.NHGD(), None, quad, jnp.zeros(6))
    with pytest.raises(ValueError, match="run.num_steps: SOBA takes one inner step"):
        _one_step(st.SOBA(), sgd(5, 0.1), quad, jnp.zeros(6))
    momentum = hg.InnerRun(hg.optim.sgd_momentum(), 1, lambda h: {"lr": 0.1, "momentum": 0.9})
    with pytest.raises(ValueError, match="run.optimizer: SOBA needs a stateless optimizer"):
        _one_step(st.SOBA(), momentum, quad, jnp.zeros(6))


def test_the_inner_loop_is_the_runs_optimizer(quad):
    # NHGD and SolveAfter run any hg.InnerRun: with SGD-momentum their θ_T is the same
    # run's end point (hg.solve with Unrolled, which runs the identical loop), to rounding.
    run = hg.InnerRun(hg.optim.sgd_momentum(), 30, lambda h: {"lr": 0.1, "momentum": 0.8})
    start = jnp.zeros(6)
    expected = hg.solve(quad.problem, run, hg.Unrolled(), quad.hparams, start, quad.inner_data)
    for method in (st.NHGD(), st.SolveAfter(), st.StocBiO()):
        state, _, _ = _one_step(method, run, quad, start)
        np.testing.assert_allclose(state.params, expected, rtol=1e-12)


def test_parallel_nhgd_needs_two_devices():
    if jax.device_count() >= 2:
        pytest.skip("this process has two devices")
    with pytest.raises(ValueError, match="NHGD.parallel: needs 2 devices"):
        st.NHGD(parallel=True).init(jnp.zeros(3), None)


@pytest.mark.parametrize("average", ["ema", "mean"])
def test_solve_mode_fisher_equals_the_damped_inverse_of_the_recorded_gradients(logistic, average):
    # inverse="solve" keeps F itself (bias-corrected EMA, or the mean of the batch Fishers)
    # and applies (F + ρI)⁻¹ with a Cholesky solve: against a direct solve with F built
    # from per-sample gradients recorded along a plain SGD loop on the same batches, 1e-10.
    problem, lam, _, val, sampler, theta_star = logistic
    rho, lr, steps, beta = 1e-3, 0.05, 20, 0.9
    fisher = hg.fisher.DenseFisher(average, beta, rho, samples="woodbury", inverse="solve")
    method, run = st.NHGD(fisher, reset=True), sgd(steps, lr)
    key = jax.random.key(6)
    state, grad, _ = method.step(problem, run, method.init(theta_star, lam), lam, sampler, val, key)
    k_inner = jax.random.split(key, 3)[0]
    params, batch_fishers = theta_star, []
    for t in range(steps):
        batch = hg.data.batch_at(sampler, k_inner, t)
        per = jax.vmap(lambda b: jax.grad(_inner)(params, lam, jax.tree.map(lambda x: x[None], b)))(
            batch
        )
        batch_fishers.append(per.T @ per / per.shape[0])
        params = params - lr * jnp.mean(per, axis=0)
    if average == "ema":
        weights = (1 - beta) * beta ** jnp.arange(steps - 1, -1, -1.0)
        f = sum(w * b for w, b in zip(weights, batch_fishers)) / (1 - beta**steps)
    else:
        f = sum(batch_fishers) / steps
    v = jax.grad(_nll)(state.params, lam, val)
    np.testing.assert_allclose(
        fisher.apply(state.method, v), jnp.linalg.solve(f + rho * jnp.eye(4), v), rtol=1e-10
    )


def test_nhgd_needs_a_shared_sample_axis():
    problem = hg.BilevelProblem(
        lambda p, h, b: jnp.sum(p**2) + jnp.sum(b["x"]) * h, lambda p, h, b: jnp.sum(p)
    )
    batch = {"x": jnp.ones((4, 2)), "y": jnp.ones(3)}
    method = st.NHGD()
    state = method.init(jnp.zeros(2), jnp.asarray(0.0))
    with pytest.raises(ValueError, match="inner_data: NHGD's Fisher samples need the batch"):
        method.step(problem, sgd(2, 0.1), state, jnp.asarray(0.0), batch, batch, jax.random.key(0))
