"""hg.Moreau (ResAlign's proximal hypergradient; implicit MAML) and hg.Richardson, against
closed forms, a long unrolled run of proximal gradient descent and dense solves. float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergrad_jax as hg

DIM, GAMMA = 6, 2.0


def _quadratic(key):
    """Fine-tuning loss ``g(φ, λ) = ½ φᵀAφ − (Bμ + c)ᵀφ`` (A's spectrum in [0.5, 3]) and
    outer loss ``f(φ, λ) = ½ ||Pφ − t||² + ½ r ||θ₀||²``; ``λ = {"theta0", "mu"}``."""
    kq, kb, kc, kp, kt, kh, km = jax.random.split(key, 7)
    q, _ = jnp.linalg.qr(jax.random.normal(kq, (DIM, DIM)))
    a = (q * jnp.linspace(0.5, 3.0, DIM)[None, :]) @ q.T
    a = 0.5 * (a + a.T)
    b, c = jax.random.normal(kb, (DIM, 2)), jax.random.normal(kc, (DIM,))
    p, t = jax.random.normal(kp, (DIM, DIM)) / np.sqrt(DIM), jax.random.normal(kt, (DIM,))
    reg = 0.1

    def inner(phi, h, batch):
        del batch
        return 0.5 * phi @ a @ phi - (b @ h["mu"] + c) @ phi

    def outer(phi, h, batch):
        del batch
        r = p @ phi - t
        return 0.5 * r @ r + 0.5 * reg * h["theta0"] @ h["theta0"]

    hparams = {"theta0": jax.random.normal(kh, (DIM,)), "mu": jax.random.normal(km, (2,))}

    def closed_form(h, theta):
        """The Moreau rule at the end point ``theta``: ``v = (A + γI)⁻¹ ∇_φ f(theta)``,
        ``∇_θ₀ F = r θ₀ + γ v``, ``∇_μ F = Bᵀ v`` (A is the Hessian everywhere)."""
        v = jnp.linalg.solve(a + GAMMA * jnp.eye(DIM), p.T @ (p @ theta - t))
        return {"theta0": reg * h["theta0"] + GAMMA * v, "mu": b.T @ v}

    def proximal_point(h):
        return jnp.linalg.solve(a + GAMMA * jnp.eye(DIM), b @ h["mu"] + c + GAMMA * h["theta0"])

    return hg.BilevelProblem(inner, outer), hparams, closed_form, proximal_point


def _proximal_gd() -> hg.InnerOptimizer:
    """Gradient descent on the proximal objective ``g + γ/2 ||φ − φ₀||²``: the optimizer keeps
    the start ``φ₀`` as its state (a fine-tuning run regularised towards its start)."""

    def update(grads, anchor, params, hparams, step):
        del step
        return params - hparams["lr"] * (grads + GAMMA * (params - anchor)), anchor

    return hg.InnerOptimizer(lambda params, hparams: params, update, "proximal_gd", ("lr",))


def _runs():
    # A + γI has its spectrum in [2.5, 5]: step 2 / 7.5 contracts by 1/3 per step.
    long = hg.InnerRun(_proximal_gd(), 40, lambda h: {"lr": 2 / 7.5})
    short = hg.InnerRun(hg.optim.sgd(), 3, lambda h: {"lr": 0.1})  # plain GD on g, 3 steps
    return long, short


def _params0(h):
    return h["theta0"]  # the learned initialisation


def test_moreau_is_the_imaml_closed_form_at_the_proximal_point():
    problem, h, closed_form, proximal_point = _quadratic(jax.random.key(0))
    long, _ = _runs()
    grad, info = hg.hypergradient(
        problem, long, hg.Moreau(GAMMA, hg.Cholesky()), h, _params0, None, None
    )
    assert int(info.status) == hg.Status.OK
    # 40 steps contract the start's error by 3^-40 ~ 1e-19: θ_T is the proximal point.
    np.testing.assert_allclose(info.params, proximal_point(h), rtol=1e-12, atol=1e-13)
    expected = closed_form(h, proximal_point(h))
    for k in h:  # rounding of a 6×6 solve: ~1e-15; 1e-10 is the bar
        np.testing.assert_allclose(grad[k], expected[k], rtol=1e-10, atol=1e-12)


def test_moreau_equals_grad_through_a_long_run_on_the_proximal_objective():
    """Unrolled differentiates the 40 proximal-GD steps exactly (the start enters through
    the optimizer's anchor): their derivative has converged to the proximal point's."""
    problem, h, _, _ = _quadratic(jax.random.key(1))
    long, _ = _runs()
    moreau, _ = hg.hypergradient(problem, long, hg.Moreau(GAMMA), h, _params0, None, None)
    unrolled, _ = hg.hypergradient(problem, long, hg.Unrolled(), h, _params0, None, None)
    for k in h:  # CG's default tol 1e-10 (float64) bounds the agreement
        np.testing.assert_allclose(moreau[k], unrolled[k], rtol=1e-8, atol=1e-10)


def test_moreau_is_evaluated_at_the_end_point_of_the_run_actually_run():
    """A short plain fine-tuning run (not the proximal problem): the rule at its θ_T."""
    problem, h, closed_form, proximal_point = _quadratic(jax.random.key(2))
    _, short = _runs()
    grad, info = hg.hypergradient(
        problem, short, hg.Moreau(GAMMA, hg.Cholesky()), h, _params0, None, None
    )
    assert float(jnp.max(jnp.abs(info.params - proximal_point(h)))) > 1e-2  # not the prox
    expected = closed_form(h, info.params)
    for k in h:
        np.testing.assert_allclose(grad[k], expected[k], rtol=1e-10, atol=1e-12)


def test_moreau_first_order_limit_and_grad_of_solution():
    """``γ → ∞``: ``γ (H + γI)⁻¹ ∇f → ∇f`` (ResAlign's first-order variant); and ``jax.grad``
    of ``hg.solve`` uses the same rule (vjp through the proximal IFT)."""
    problem, h, _, _ = _quadratic(jax.random.key(3))
    _, short = _runs()
    big = 1e6
    grad, info = hg.hypergradient(
        problem, short, hg.Moreau(big, hg.Cholesky()), h, _params0, None, None
    )
    f_theta = jax.grad(problem.outer_loss)(info.params, h, None)
    np.testing.assert_allclose(grad["theta0"] - 0.1 * h["theta0"], f_theta, rtol=1e-5)

    def objective(hh):
        theta = hg.solve(problem, short, hg.Moreau(GAMMA, hg.Cholesky()), hh, _params0, None)
        return problem.outer_loss(theta, hh, None)

    direct = jax.grad(objective)(h)
    expected, _ = hg.hypergradient(
        problem, short, hg.Moreau(GAMMA, hg.Cholesky()), h, _params0, None, None
    )
    for k in h:
        np.testing.assert_allclose(direct[k], expected[k], rtol=1e-10, atol=1e-12)


def _spd(key, low, high):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (DIM, DIM)))
    m = (q * jnp.linspace(low, high, DIM)[None, :]) @ q.T
    return 0.5 * (m + m.T)


def test_richardson_converges_to_the_dense_solve():
    a = _spd(jax.random.key(4), 1.0, 4.0)
    b = jax.random.normal(jax.random.key(5), (DIM,))
    # step 0.4: ||I − 0.4 A|| = 0.6 < 1, the error contracts by 0.6 per step; 80 steps: 1e-18.
    x, info = hg.Richardson(iters=80, step=0.4).run(lambda v: a @ v, b)
    np.testing.assert_allclose(x, jnp.linalg.solve(a, b), rtol=1e-12, atol=1e-13)
    assert bool(info.converged) and not bool(info.fell_back) and int(info.iterations) == 79


def test_richardson_halves_its_step_then_falls_back():
    a = _spd(jax.random.key(6), 1.0, 5.0)
    b = jax.random.normal(jax.random.key(7), (DIM,))
    # step 1: I − A has eigenvalues down to −4 (amplifies); 0.5: −1.5 (amplifies); 0.25: the
    # spectrum of I − A/4 is in [−0.25, 0.75]: the third attempt succeeds.
    x, info = hg.Richardson(iters=6, step=1.0, halvings=5).run(lambda v: a @ v, b)
    expected = 0.25 * sum(jnp.linalg.matrix_power(jnp.eye(DIM) - 0.25 * a, k) @ b for k in range(6))
    np.testing.assert_allclose(x, expected, rtol=1e-12)
    assert int(info.iterations) == 3 * 5 and not bool(info.fell_back)
    # One halving only: both attempts amplify, the solver returns 0 and says so.
    x, info = hg.Richardson(iters=6, step=1.0, halvings=1).run(lambda v: a @ v, b)
    assert bool(info.fell_back) and not bool(info.converged)
    np.testing.assert_array_equal(x, jnp.zeros(DIM))
    # max_norm: a result larger than the bound fails every attempt as well.
    _, info = hg.Richardson(iters=6, step=0.2, halvings=2, max_norm=1e-6).run(lambda v: a @ v, b)
    assert bool(info.fell_back)


def test_a_fallback_is_reported_and_gives_the_direct_gradient():
    problem, h, _, _ = _quadratic(jax.random.key(8))
    _, short = _runs()
    solver = hg.Richardson(iters=4, step=10.0, halvings=2)  # always amplifies (A + γI ≥ 2.5)
    grad, info = hg.hypergradient(problem, short, hg.Moreau(GAMMA, solver), h, _params0, None, None)
    assert int(info.status) == hg.Status.SOLVE_FELL_BACK and bool(info.solve.fell_back)
    direct = jax.grad(problem.outer_loss, argnums=1)(info.params, h, None)  # ∂_λ f alone
    for k in h:
        np.testing.assert_allclose(grad[k], direct[k], rtol=1e-12, atol=1e-15)
    with pytest.raises(hg.HypergradientError, match="SOLVE_FELL_BACK"):
        hg.raise_if_failed(info)


@pytest.mark.parametrize(
    "value,message",
    [
        (hg.Richardson(halvings=-1), "Richardson.halvings: expected an int >= 0"),
        (hg.Richardson(step=0.0), "Richardson.step: expected a float > 0"),
        (hg.Richardson(iters=0), "Richardson.iters: expected a positive int"),
        (hg.Richardson(max_norm=-1.0), "Richardson.max_norm: expected None or a float > 0"),
    ],
)
def test_bad_solver_options_name_the_field(value, message):
    with pytest.raises(ValueError, match=message):
        value.run(lambda v: v, jnp.ones(3))


def test_bad_gamma_names_the_field():
    problem, h, _, _ = _quadratic(jax.random.key(9))
    _, short = _runs()
    with pytest.raises(ValueError, match="Moreau.gamma: expected a float > 0"):
        hg.hypergradient(problem, short, hg.Moreau(0.0), h, _params0, None, None)
