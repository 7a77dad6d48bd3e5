"""The exact test problems and the public hypergradient check."""

import jax
import jax.numpy as jnp
import numpy as np

import hypergrad_jax as hg


def test_quadratic_problem_conditioning(getkey):
    tp = hg.testing.quadratic_problem(getkey(), dim=6, mu=0.5, L=40.0)
    eig = jnp.linalg.eigvalsh(tp.inner_data["A"])
    np.testing.assert_allclose([eig[0], eig[-1]], [0.5, 40.0], rtol=1e-12)
    # the exact hypergradient is the derivative of the exact objective
    np.testing.assert_allclose(
        tp.exact_hypergradient(tp.hparams), jax.grad(tp.objective)(tp.hparams), rtol=1e-12
    )


def test_check_hypergradient_agrees_with_exact_values(getkey):
    # Exact gradients pass at 1e-6 (central differences are ~1e-10 accurate here) ...
    for tp in (
        hg.testing.quadratic_problem(getkey(), mu=1.0, L=100.0),
        hg.testing.ridge_regression(getkey()),
    ):
        result = hg.testing.check_hypergradient(
            tp.objective, tp.hparams, tp.exact_hypergradient(tp.hparams)
        )
        assert result.ok and result.relative_error <= 1e-6
    # ... a gradient that is 1e-4 off fails, in both modes.
    tp = hg.testing.quadratic_problem(getkey(), num_hparams=4)
    wrong = tp.exact_hypergradient(tp.hparams) * (1 + 1e-4)
    assert not hg.testing.check_hypergradient(tp.objective, tp.hparams, wrong).ok
    random_dirs = hg.testing.check_hypergradient(
        tp.objective, tp.hparams, tp.exact_hypergradient(tp.hparams), num_directions=5, key=getkey()
    )
    assert random_dirs.ok and random_dirs.finite_difference.shape == (5,)


def test_check_hypergradient_on_a_pytree(getkey):
    hparams = {"a": jnp.array([0.3, -1.2]), "b": jnp.asarray(2.0)}
    objective = lambda h: jnp.sum(jnp.sin(h["a"]) * h["b"] ** 2)
    assert hg.testing.check_hypergradient(objective, hparams, jax.grad(objective)(hparams)).ok
