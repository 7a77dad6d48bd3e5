"""The fds_noise experiment: tiny run end to end, sharing = summing per-step hypergradients,
the greedy estimate against hg.Greedy(), and the noise statistics on known answers."""

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import problems
import pytest

import hypergrad_jax as hg
from experiments import cli
from experiments import config as cfg_lib
from experiments.fds import noise
from experiments.harness import execute
from experiments.rundir import RunDir

MODULE = "experiments.fds.noise"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny run through ``hypergrad run fds_noise --tiny``."""
    return problems.run_tiny("fds_noise", tmp_path_factory.mktemp("fds_noise"))


def test_tiny_run_end_to_end(tiny):
    code, run, config, stdout, stderr = tiny
    assert code == 0, stderr[-3000:]
    widths = list(config.noise.widths)
    assert widths == [1, 5, 20] and config.inner.num_steps == 20
    assert "lowest, long horizon" in stdout and str(run / "plots") in stdout
    assert f"{len(widths)}/{len(widths)}" in stderr  # the progress bar: one step per width

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(len(widths)))
    assert [m["width"] for m in metrics] == widths
    assert [m["blocks"] for m in metrics] == [20 // w for w in widths]
    for m in metrics:
        assert m["status"] == 0 and m["outer_loss"] > 0
        for prefix in ("long", "greedy"):
            assert m[f"{prefix}_variance"] > 0
            assert m[f"{prefix}_mse"] == pytest.approx(
                m[f"{prefix}_variance"] + m[f"{prefix}_bias2"]
            )
    first = metrics[0]
    assert first["long_bias2"] == 0 and first["long_variance_ratio"] == 1
    assert first["long_c_implied"] is None
    # Same seeds, same trajectory: the validation loss does not depend on W.
    assert len({m["outer_loss"] for m in metrics}) == 1

    summary = json.loads((run / "summary.json").read_text())
    assert summary["widths_done"] == widths and summary["seeds"] == 3
    assert summary["val_loss_spread_across_widths"] < 1e-12
    for name in ("long_horizon", "greedy"):
        res = summary[name]
        assert [r["width"] for r in res["rows"]] == widths
        assert res["best_width"] in widths and res["best_width_norm"] in widths
        assert res["rows"][0]["mse_norm"] == pytest.approx(1.0)
        freq = res["bootstrap"]["best_width_frequency_mse"]
        assert sum(freq.values()) == pytest.approx(1.0)
    assert -1 <= summary["greedy_long_mean_cosine"] <= 1

    for name in ("noise_vs_width.png", "per_step_hypergradients.png"):
        png = (run / "plots" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (run / "checkpoints").is_dir()
    assert "noise:\n  widths:\n  - 1\n  - 5\n  - 20" in (run / "config.yaml").read_text()


def test_sharing_sums_per_step_hypergradients(tiny):
    """With every block at the same value the trajectory does not depend on W, so the
    block hypergradient of width W is exactly the sum of the W = 1 per-step hypergradients
    over the block (forward tangents add up), for the long-horizon (hg.Forward) and the
    greedy estimates alike. float64 (conftest): agreement to rounding."""
    _, run, config, _, _ = tiny
    saved = np.load(run / "hypergradients.npz")
    widths, steps = list(saved["widths"]), config.inner.num_steps
    for key in ("forward", "greedy"):
        per_step = saved[key]  # (widths, seeds, T): block gradient / W at every step
        assert per_step.dtype == np.float64 and per_step.shape == (len(widths), 3, steps)
        unshared = per_step[0]
        for i, w in enumerate(widths):
            blocks = per_step[i][:, ::w] * w  # the block hypergradients themselves
            sums = unshared.reshape(3, steps // w, w).sum(axis=2)
            scale = np.abs(sums).max()
            np.testing.assert_allclose(blocks, sums, rtol=0, atol=1e-10 * scale)
            # ... and the estimate is constant within each block.
            np.testing.assert_array_equal(per_step[i], np.repeat(per_step[i][:, ::w], w, axis=1))
    np.testing.assert_allclose(saved["val_loss"], saved["val_loss"][:1].repeat(3, 0), atol=1e-12)


def test_greedy_is_hg_greedy_on_a_run_ending_after_that_step(tiny):
    """Greedy per-step value h_t = ∂f(θ_{t+1})/∂α_t with (θ_t, v_t) fixed: exactly
    hg.Greedy() (Unrolled(truncate=1)) on the same seed's run stopped after step t, whose
    gradient is zero for every other step's learning rate."""
    _, run, config, _, _ = tiny
    saved = np.load(run / "hypergradients.npz")
    inputs = noise.prepare(config)
    seed, t = 1, 11
    params0 = jax.tree.map(lambda x: x[seed], inputs.params0)
    short = noise.inner_run(inputs.setup)._replace(num_steps=t + 1)
    hparams = {"lr": jnp.full(t + 1, config.inner.lr)}
    grad, info = hg.hypergradient(
        inputs.setup.classifier.problem(),
        short,
        hg.Greedy(),
        hparams,
        params0,
        inputs.sampler,
        inputs.val,
        key=inputs.data_keys[seed],
    )
    assert int(info.status) == 0
    g = np.asarray(grad["lr"])
    np.testing.assert_array_equal(g[:-1], 0.0)
    expected = saved["greedy"][0, seed, t]
    assert g[-1] == pytest.approx(expected, rel=1e-10)
    assert abs(expected) > 0


def test_resume_after_the_last_step_reproduces_the_summary(tiny):
    """Restoring the checkpointed state (all widths done) and finishing again gives the same
    numbers: the state holds everything the statistics need."""
    _, run, config, _, _ = tiny
    before = json.loads((run / "summary.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        execute(noise.build(config), RunDir.open(run), quiet=True, resume=True)
    after = json.loads((run / "summary.json").read_text())
    for key in ("long_horizon", "greedy", "mean_val_loss", "greedy_long_mean_cosine"):
        assert after[key] == before[key]


def test_noise_statistics_on_known_answers():
    rng = np.random.default_rng(0)
    seeds, steps, slope = 4000, 60, 0.3
    widths = [1, 3, 12]
    mean = slope * np.arange(steps)  # a linearly drifting true hypergradient
    unshared = mean + rng.normal(size=(seeds, steps))  # independent unit noise per step
    estimates = np.stack(
        [np.repeat(unshared.reshape(seeds, -1, w).mean(axis=2), w, axis=1) for w in widths]
    )
    rows = noise.width_stats(estimates, widths)
    for w, row in zip(widths, rows):
        # Independent steps: variance 1/W. Linear drift: bias² = L²(W²−1)/12 exactly in
        # expectation (the bound's second term); the debiased estimator is unbiased, its
        # standard error here is ~0.4% of the value (+ ~1e-3 at W = 1..3): 4-5 sigma bounds.
        assert row["variance"] == pytest.approx(1 / w, rel=0.05)
        assert row["bias2"] == pytest.approx(slope**2 * (w * w - 1) / 12, rel=0.02, abs=5e-3)
        assert row["mse"] == pytest.approx(row["variance"] + row["bias2"])
        assert row["mse_norm"] == pytest.approx(row["mse"], rel=0.05)  # unit variance per step
    assert rows[0]["bias2"] == 0 and rows[0]["variance_ratio"] == 1
    assert rows[1]["c_implied"] == pytest.approx(0.0, abs=0.03)  # uncorrelated steps

    # Perfectly correlated steps within a block: sharing removes no noise (c = 1).
    shared = np.repeat(rng.normal(size=(seeds, steps // 12)), 12, axis=1)
    same = np.stack([shared, shared])
    assert noise.width_stats(same, [1, 12])[1]["c_implied"] == pytest.approx(1.0)


def test_config_validation():
    good = cfg_lib.from_dict(
        noise.Config, {"inner": {"num_steps": 20}, "noise": {"widths": [1, 4]}}
    )
    assert good.noise.widths == (1, 4)
    cases = [
        ({"noise": {"widths": [5, 10]}}, "noise.widths: [5, 10]; expected increasing widths"),
        ({"noise": {"widths": [1, 10, 5]}}, "expected increasing widths starting at 1"),
        ({"noise": {"widths": [1, 7]}}, "noise.widths: [7] do not divide inner.num_steps = 250"),
        ({"noise": {"seeds": 1}}, "noise.seeds: expected a value >= 2, got 1"),
        ({"data": {"name": "cifar10"}}, "data.name: expected one of 'digits', 'breast_cancer'"),
        ({"data": {"val_batch": 10}}, "data.val_batch: not supported by fds_noise"),
        ({"experiment": "quickstart"}, "experiment: expected one of 'fds_noise'"),
    ]
    for data, message in cases:
        with pytest.raises(cfg_lib.ConfigError) as err:
            cfg_lib.from_dict(noise.Config, data, "fds_noise.yaml")
        assert message in str(err.value), str(err.value)


def test_yaml_config_and_tiny_preset_validate(monkeypatch):
    monkeypatch.setitem(cli.EXPERIMENTS, "fds_noise", MODULE)
    path = cli.find_config("fds_noise")
    for preset in (None, "tiny"):
        data = cfg_lib.resolve(cfg_lib.load_yaml(path), str(path), preset)
        module, config = cli.load_config(data, str(path))
        assert module.__name__ == MODULE and config.experiment == "fds_noise"
    full = cfg_lib.from_dict(noise.Config, cfg_lib.resolve(cfg_lib.load_yaml(path), "x"))
    assert full.noise.widths[:6] == (1, 5, 10, 25, 50, 125) and full.noise.seeds >= 10
