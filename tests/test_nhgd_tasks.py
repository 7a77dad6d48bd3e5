"""The NHGD comparison tasks experiments.nhgd.regularization and .distillation.

At their configs' ``tiny`` task settings: the Task contract holds, the losses are finite, the
exact hypergradient the runner uses as its reference (``hg.testing.implicit_hypergradient``)
equals float64 central finite differences of ``F(λ) = f(θ*(λ), λ)`` (``θ*`` by Newton), and
one NHGD and one SOBA step run. The tiny comparison end to end through the CLI is marked
slow (compiling one program per method variant dominates it).
"""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
import threadpoolctl
from jax.flatten_util import ravel_pytree
from problems import tiny_config

import hypergrad_jax as hg
from experiments import cli, common
from experiments.config import ConfigError
from experiments.nhgd import distillation, regularization
from hypergrad_jax import stochastic as st

MODULES = {"regularization": regularization, "distillation": distillation}


@pytest.fixture(scope="module", params=list(MODULES))
def task(request):
    return MODULES[request.param].make_task(tiny_config(f"nhgd_{request.param}"))


def _f64(tree):
    return jax.tree.map(
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def test_task_contract_and_finite_losses(task):
    problem = task.problem
    # one flax Dense layer, K-FAC's single block: it covers every leaf
    assert task.kfac_layers == hg.fisher.flax_dense_layers(task.params)
    layer = task.params["Dense_0"]
    assert len(jax.tree.leaves(task.params)) == 2
    assert layer["kernel"].shape[1:] == layer["bias"].shape

    @jax.jit  # one program: eager calls would compile op by op
    def values(key):
        loss = lambda b: problem.inner_loss(task.params, task.hparams, b)  # noqa: E731
        batch = task.inner_data(key, 1)
        n = jax.tree.leaves(batch)[0].shape[0]
        head, tail = (jax.tree.map(lambda x, s=s: x[s], batch) for s in (slice(0, 1), slice(1, n)))
        outer = task.outer_data(key) if callable(task.outer_data) else task.outer_data
        return {
            "inner": loss(batch),
            "split": (loss(head) + (n - 1) * loss(tail)) / n,
            "full": loss(task.train),
            "outer": problem.outer_loss(task.params, task.hparams, outer),
            "val": problem.outer_loss(task.params, task.hparams, task.val),
            "metrics": task.evaluate(task.params, task.hparams),
        }

    v = values(jax.random.key(0))
    chex.assert_tree_all_finite(v)
    assert {"val_loss", task.primary} <= set(v["metrics"])
    # val_loss is the outer objective on the whole validation data.
    np.testing.assert_allclose(v["metrics"]["val_loss"], v["val"], rtol=1e-6)
    # The inner loss is a mean over the batch's samples (the per-sample Fisher needs it).
    np.testing.assert_allclose(v["split"], v["inner"], rtol=1e-5)


def test_dense_hypergradient_equals_finite_differences(task):
    # One BLAS thread: OpenBLAS's threads make a 585² Cholesky 50× slower on a busy 2-core box.
    with threadpoolctl.threadpool_limits(1):
        _check_dense_hypergradient(task)


def _check_dense_hypergradient(task):
    problem = task.problem
    hparams, params, train, val = _f64((task.hparams, task.params, task.train, task.val))
    flat0, unravel = ravel_pytree(params)
    flat_h, unravel_h = ravel_pytree(hparams)
    flat_h = np.asarray(flat_h)

    @jax.jit
    def newton_system(x, h):
        loss = lambda x: problem.inner_loss(unravel(x), unravel_h(h), train)  # noqa: E731
        return jax.grad(loss)(x), jax.hessian(loss)(x)

    # θ*(λ) by Newton from θ = 0, 12 steps (measured: 10 reach ~3e-17 on both tasks); solves
    # by LAPACK's Cholesky (H is positive definite).
    x = np.asarray(flat0)
    for _ in range(12):
        g, hess = newton_system(x, flat_h)
        x = x - scipy.linalg.cho_solve(scipy.linalg.cho_factor(np.asarray(hess)), np.asarray(g))
    g, hess = newton_system(x, flat_h)
    assert float(np.max(np.abs(g))) < 1e-12
    flat_theta, factor = x, scipy.linalg.cho_factor(np.asarray(hess))

    # The reference as the runner uses it: the dense solve at the converged θ*.
    theta = unravel(jnp.asarray(flat_theta))
    reference = jax.jit(
        lambda h, t: hg.testing.implicit_hypergradient(problem, h, t, train, val, 0)[0]
    )
    hypergrad = np.asarray(ravel_pytree(reference(hparams, theta))[0])
    outer = jax.jit(lambda x, h: problem.outer_loss(unravel(x), unravel_h(h), val))

    def big_f(h):
        # θ*(λ ± eps e_i) by Newton's chord variant from θ*(λ), reusing H(θ*(λ), λ)'s
        # factor: the start and the Hessian are O(eps) = 1e-5 off, so each step shrinks
        # the error by a factor ~1e-5 |∂H| / μ; 4 steps reach rounding level.
        x = flat_theta
        for _ in range(4):
            x = x - scipy.linalg.cho_solve(factor, np.asarray(newton_system(x, h)[0]))
        assert float(np.max(np.abs(newton_system(x, h)[0]))) < 1e-12
        return float(outer(x, h))

    scale = float(np.max(np.abs(hypergrad)))
    assert scale > 0
    # The coordinates with the two largest hypergradients and a middling one.
    order = np.argsort(-np.abs(hypergrad))
    eps = 1e-5
    for i in (order[0], order[1], order[len(order) // 4]):
        e = np.zeros_like(flat_h)
        e[i] = eps
        fd = (big_f(flat_h + e) - big_f(flat_h - e)) / (2 * eps)
        # Central differences: truncation eps² |F⁽³⁾| / 6 and rounding ~1e-16 |F| / eps ~ 1e-12
        # (θ* is converged to rounding, ~1e-16 / μ with the strong-convexity floor
        # μ >= 1e-4). Measured: at most 1e-9 of the largest entry (|∇F|_∞ ~ 1e-2);
        # the tolerance 1e-7 leaves a factor 100.
        assert abs(fd - hypergrad[i]) <= 1e-7 * scale, (i, fd, hypergrad[i])


def test_one_nhgd_and_one_soba_step_run(task):
    methods = {
        "nhgd": (st.NHGD(hg.fisher.DenseFisher(samples="woodbury")), 3),
        "soba": (st.SOBA(0.1), 1),
    }
    optimizer = optax.sgd(0.1)
    for name, (method, num_steps) in methods.items():
        run = hg.InnerRun(hg.optim.sgd(), num_steps, lambda h: {"lr": 0.1})

        @jax.jit  # one program: eager initialisation would compile op by op
        def two_steps(key, method=method, run=run):
            state = hg.outer.init(optimizer, task.hparams, task.params, key, method)
            step = lambda s: hg.outer.step(  # noqa: E731
                task.problem, run, method, optimizer, s, task.inner_data, task.outer_data
            )
            new, metrics = jax.lax.scan(lambda s, _: step(s), state, None, length=2)
            return state, new, jax.tree.map(lambda x: x[-1], metrics)

        # SOBA's linear-system variable starts at 0, and ∂_λ f = 0 here: its first
        # hypergradient is exactly 0; the second is not.
        state, new, metrics = two_steps(jax.random.key(0))
        grad = metrics.grad
        assert jax.tree.structure(grad) == jax.tree.structure(task.hparams), name
        chex.assert_tree_all_finite((grad, new.hparams, new.params, metrics.outer_loss))
        assert int(metrics.status) == hg.Status.OK and float(metrics.inner_residual) > 0, name
        assert float(jnp.max(jnp.abs(ravel_pytree(grad)[0]))) > 0, name
        assert not np.array_equal(new.hparams, state.hparams), name


@pytest.mark.parametrize(
    "name,override,expected",
    [
        ("regularization", {"data.batch_size": 10_000}, "data.batch_size: 10000 >"),
        ("regularization", {"data.val_batch": 10_000}, "data.val_batch: 10000 >"),
        ("regularization", {"data.num_samples": 10_000}, "data.num_samples: 10000, but"),
        ("distillation", {"data.batch_size": 21}, "data.batch_size: 21 > 20 learned-image"),
        ("distillation", {"data.val_batch": 10_000}, "data.val_batch: 10000 >"),
        ("distillation", {"data.val_fraction": 0.1}, "data.val_fraction: 0.1; expected 0"),
        ("regularization", {"data.val_fraction": 0.0}, "data.val_fraction: 0.0; expected > 0"),
    ],
)
def test_sizes_beyond_the_data_name_the_config_key(name, override, expected):
    with pytest.raises(ConfigError, match=expected):
        MODULES[name].make_task(tiny_config(f"nhgd_{name}", **override))


def test_fractions_leaving_no_training_data_are_rejected():
    with pytest.raises(ConfigError, match="data.val_fraction \\+ data.test_fraction"):
        common.DataConfig(val_fraction=0.5, test_fraction=0.5)


def test_distillation_images_start_at_the_class_means():
    cfg = tiny_config("nhgd_distillation")
    task = distillation.make_task(cfg)
    images = np.asarray(task.hparams)
    labels = np.asarray(task.train["y"])
    real_x, real_y = np.asarray(task.val["x"]), np.asarray(task.val["y"])
    k = cfg.task.images_per_class
    assert images.shape == (10 * k, real_x.shape[1])
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), k))
    for c in range(10):
        mean = real_x[real_y == c].mean(axis=0)
        noise = images[labels == c] - mean
        # noise ~ init_noise · N(0, 1): its std over the class's k·d entries.
        assert abs(noise.std() - cfg.task.init_noise) < 0.5 * cfg.task.init_noise


@pytest.mark.parametrize("name", ["nhgd_regularization", "nhgd_distillation"])
def test_tiny_config_runs_end_to_end_with_two_methods(tmp_path, name):
    # The task's path through the runner and the CLI with one NHGD variant and one baseline
    # (compiling is most of the time); every variant runs in the slow test below and in
    # hyper_cleaning's tiny run (tests/test_nhgd_experiments.py).
    args = ["run", name, "--tiny", "--quiet", "--out", str(tmp_path)]
    assert cli.main([*args, "--set", "compare.methods=[nhgd_dense,soba]"]) == 0
    (run,) = tmp_path.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert [r["status"] for r in summary["table"]] == ["ok", "ok"]
    for r in summary["table"]:
        assert np.isfinite(r["final"]["val_loss"]) and np.isfinite(r["final"]["test_acc"])


@pytest.mark.slow  # ~30-45 s each: one compiled program per method variant
@pytest.mark.parametrize("name", ["nhgd_regularization", "nhgd_distillation"])
def test_tiny_comparison_end_to_end(tmp_path, name):
    assert cli.main(["run", name, "--tiny", "--quiet", "--out", str(tmp_path)]) == 0
    (run,) = tmp_path.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    ok = [r for r in summary["table"] if r["status"] == "ok"]
    assert {r["method"] for r in ok} >= {"nhgd_dense", "nhgd_kfac", "soba", "cg"}
    for r in ok:
        assert np.isfinite(r["final"]["val_loss"]) and np.isfinite(r["final"]["test_acc"])
    assert (run / "comparison.md").is_file() and (run / "plots" / "time_to_target.png").is_file()
