"""The fds_schedules experiment: tiny run end to end (every method, equal budgets, plots),
the HD hypergradient against hg.Greedy(), the training scan against hg.solve, and the
projection, grid and selection helpers."""

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import problems
import pytest

import hypergrad_jax as hg
from experiments import cli, common
from experiments import config as cfg_lib
from experiments.fds import schedules
from hypergrad_jax.problem import batch_at

MODULE = "experiments.fds.schedules"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny run through ``hypergrad run fds_schedules --tiny``."""
    return problems.run_tiny("fds_schedules", tmp_path_factory.mktemp("fds_schedules"))


def test_tiny_run_end_to_end(tiny):
    code, run, config, stdout, stderr = tiny
    assert code == 0, stderr[-3000:]
    T, seeds = config.inner.num_steps, config.eval.seeds  # noqa: N806
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    k = len(metrics)
    assert 1 <= k <= config.outer.num_steps and [m["step"] for m in metrics] == list(range(k))
    for m in metrics:
        assert m["status"] == 0 and m["outer_loss"] > 0
        assert len(m["lr"]) == config.hparams.lr_blocks and len(m["momentum"]) == 1
        assert min(m["lr"]) >= 0 and 0 <= m["momentum"][0] <= 0.99 and m["weight_decay"][0] >= 0
        assert len(m["step_lr"]) == config.hparams.lr_blocks
    # A metrics line holds the hyperparameters its inner run trained with: zero at first.
    # From zero, the first sign step raises every learning rate by exactly 0.1; momentum
    # and weight decay have a zero hypergradient while the network does not move.
    assert metrics[0]["lr"] == [0.0] * config.hparams.lr_blocks
    assert k >= 2, "the tiny preset must take at least two outer steps"
    np.testing.assert_allclose(metrics[1]["lr"], 0.1)
    assert metrics[1]["momentum"] == [0.0] and metrics[1]["weight_decay"] == [0.0]

    summary = json.loads((run / "summary.json").read_text())
    assert summary["outer_steps"] == k and summary["search_runs"] == k
    rows = {r["method"]: r for r in summary["table"]}
    assert list(rows) == list(schedules.METHODS)
    for r in rows.values():  # equal budgets: (K outer steps or K runs + seeds) × T steps
        assert r["search_inner_steps"] == k * T and r["final_inner_steps"] == seeds * T
        assert r["inner_steps"] == (k + seeds) * T
        assert 0 <= r["test_accuracy"] <= 1 and len(r["test_accuracy_per_seed"]) == seeds
        assert r["test_accuracy"] == pytest.approx(np.mean(r["test_accuracy_per_seed"]))
    assert rows["fds"]["search_val_accuracy"] is None
    # The learned values are one sign step (by the logged step size) past the last line's.
    moved = np.abs(np.subtract(summary["learned"]["lr"], metrics[-1]["lr"]))
    np.testing.assert_allclose(moved, metrics[-1]["step_lr"], rtol=1e-6)
    for name in ("FDS (learned)", "greedy HD", "random search", str(run / "plots")):
        assert name in stdout
    for name in ("learned_schedule.png", "hyperparameters.png", "comparison.png"):
        png = (run / "plots" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


CLASSIFIER = common.Classifier(common.MLP(10, (8,)))


def _small_problem(key):
    data = hg.data.load("digits", num_samples=200, seed=0)
    train = hg.data.to_batch(hg.data.split(data, val_fraction=0.1, test_fraction=0.1).train)
    sampler = hg.data.minibatch_sampler(train, 16)
    k_init, k_data = jax.random.split(key)
    return CLASSIFIER.init(k_init, 64), sampler, k_data


def test_hd_hypergradient_is_hg_greedy():
    """HD's h_t = −∇L(θ_t; batch_t)·v_t is exactly hg.Greedy() (one-step unrolled
    differentiation) of the training loss on batch t, for the run stopped after step
    t−1 with the HD learning rates as a per-step schedule. float64 (conftest)."""
    params0, sampler, key = _small_problem(jax.random.key(3))
    T, t, beta, clip = 12, 9, 0.01, 3.0  # noqa: N806
    sched = {
        "lr": jnp.full(T, 0.05),
        "momentum": jnp.full(T, 0.9),
        "weight_decay": jnp.full(T, 1e-3),
    }
    _, lrs, hs = schedules.train_run(CLASSIFIER, sched, beta, params0, sampler, key, T, clip)
    assert lrs.dtype == jnp.float64 and hs[0] == 0
    np.testing.assert_allclose(lrs[1:], np.maximum(lrs[:-1] - beta * hs[1:], 0), rtol=1e-12)
    assert np.ptp(np.asarray(lrs)) > 0  # HD did move the rate

    run = schedules.inner_run(t, clip)
    hparams = {k: v[:t] for k, v in sched.items()} | {"lr": lrs[:t]}
    grad, info = hg.hypergradient(
        CLASSIFIER.problem(),
        run,
        hg.Greedy(),
        hparams,
        params0,
        sampler,
        batch_at(sampler, key, t),
        key=key,
    )
    assert int(info.status) == 0
    g = np.asarray(grad["lr"])
    np.testing.assert_array_equal(g[:-1], 0.0)
    assert g[-1] == pytest.approx(float(hs[t]), rel=1e-10)
    assert abs(g[-1]) > 1e-6


def test_training_scan_equals_hg_solve_on_block_schedules():
    """With beta = 0 the experiment's scan on expanded per-step schedules is the library's
    run with N-block Shared schedules (what FDS learned), to rounding."""
    params0, sampler, key = _small_problem(jax.random.key(4))
    T = 10  # noqa: N806
    blocks = {
        "lr": jnp.array([0.0, 0.2, 0.05, 0.1]),
        "momentum": jnp.array([0.5, 0.9]),
        "weight_decay": jnp.array([1e-3]),
    }
    expected = hg.solve(
        CLASSIFIER.problem(),
        schedules.inner_run(T, 3.0),
        hg.Unrolled(),
        blocks,
        params0,
        sampler,
        key=key,
    )
    per_step = {k: jnp.asarray(schedules.expand(v, T)) for k, v in blocks.items()}
    np.testing.assert_array_equal(schedules.expand(blocks["lr"], T)[:4], [0, 0, 0, 0.2])
    params, lrs, _ = schedules.train_run(CLASSIFIER, per_step, 0.0, params0, sampler, key, T, 3.0)
    np.testing.assert_allclose(lrs, per_step["lr"])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_projection_grid_and_selection():
    h = {
        "lr": jnp.array([-0.1, 0.0, 0.3]),
        "momentum": jnp.array([-0.05, 0.5, 1.2]),
        "weight_decay": jnp.array([-3e-4, 6e-4]),
    }
    p = schedules.project(h, 0.99)
    np.testing.assert_array_equal(p["lr"], [0.0, 0.0, 0.3])
    np.testing.assert_array_equal(p["momentum"], [0.0, 0.5, 0.99])
    np.testing.assert_array_equal(p["weight_decay"], [0.0, 6e-4])

    assert schedules.search_size(0) == 1 and schedules.search_size(7) == 7
    pairs = schedules.hd_grid((0.01, 0.1), 1e-6, 1e-2, 5)
    assert len(pairs) == 5 and [a for a, _ in pairs] == [0.01, 0.1, 0.01, 0.1, 0.01]
    assert pairs[0][1] == pytest.approx(1e-6) and pairs[-1][1] == pytest.approx(1e-2)

    assert schedules.pick([0.5, 0.7, 0.7], [1.0, 0.9, 0.8]) == 2  # tie: lower loss
    assert schedules.pick([0.1, 0.1], [np.nan, 2.0]) == 1  # a diverged run loses ties
    np.testing.assert_allclose(schedules.cosine(2.0, 4), [2.0, 1 + 0.5**0.5, 1.0, 1 - 0.5**0.5])


def test_config_validation_and_presets(monkeypatch):
    cases = [
        ({"hparams": {"init_momentum": 1.0}}, "hparams.init_momentum: expected a value >= 0"),
        ({"hparams": {"lr_blocks": 0}}, "hparams.lr_blocks: expected a value >= 1"),
        ({"data": {"name": "cifar10"}}, "data.name: expected one of 'digits', 'breast_cancer'"),
        ({"outer": {"step_lr": 0}}, "outer.step_lr: expected a value > 0"),
    ]
    for data, message in cases:
        with pytest.raises(cfg_lib.ConfigError) as err:
            cfg_lib.from_dict(schedules.Config, data, "fds_schedules.yaml")
        assert message in str(err.value), str(err.value)
    monkeypatch.setitem(cli.EXPERIMENTS, "fds_schedules", MODULE)
    path = cli.find_config("fds_schedules")
    for preset in (None, "tiny", "digits"):
        data = cfg_lib.resolve(cfg_lib.load_yaml(path), str(path), preset)
        module, config = cli.load_config(data, str(path))
        assert module.__name__ == MODULE and config.experiment == "fds_schedules"
        if preset is None:
            assert config.inner.num_steps >= 2000 and 5 <= config.hparams.lr_blocks <= 10
            assert config.eval.seeds >= 3 and config.data.name == "mnist1d"
            assert config.hparams.init_lr == config.hparams.init_momentum == 0
        if preset == "digits":
            assert config.data.name == "digits" and config.data.num_samples is None


def test_stretch_keeps_block_proportions():
    values = np.array([3.0, 1.0, 2.0, 5.0])
    # a block schedule over T = 8 replayed over 24 steps is the same blocks over 24 steps
    np.testing.assert_array_equal(
        schedules.stretch(schedules.expand(values, 8), 24), schedules.expand(values, 24)
    )
    np.testing.assert_array_equal(schedules.stretch(np.full((2, 5), 0.3), 7), np.full((2, 7), 0.3))
    np.testing.assert_array_equal(schedules.stretch(np.arange(4.0), 2), [0.0, 2.0])


def test_retrain_at_a_longer_horizon(tmp_path):
    # The final schedule is retrained from scratch over eval.num_steps = 2T: every method's
    # schedule stretched (FDS's blocks keep their proportions), budgets still equal.
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(cli.EXPERIMENTS, "fds_schedules", MODULE)
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(
                [
                    "run",
                    "fds_schedules",
                    "--tiny",
                    "--quiet",
                    "--out",
                    str(tmp_path),
                    "--set",
                    "eval.num_steps=80",
                    "--set",
                    "outer.num_steps=2",
                ]
            )
    assert code == 0
    (run,) = tmp_path.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_steps"] == 40 and summary["eval_num_steps"] == 80
    seeds = summary["eval_seeds"]
    assert {r["final_inner_steps"] for r in summary["table"]} == {seeds * 80}
    assert all(0 <= r["test_accuracy"] <= 1 for r in summary["table"])
