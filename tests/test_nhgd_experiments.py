"""The NHGD comparison runner (experiments/nhgd/compare.py) and the hyper-cleaning task:
the tiny preset end to end through the CLI, interrupted inside a unit and resumed (outputs,
finite numbers, oracle counts against each method's formula, no finished unit redone), the
F1 score on a hand-computed case, the task's data and losses, and config validation.

Compiling dominates (one program per method variant): the whole tiny comparison runs once,
in a module fixture, split over the interrupted and the resumed process."""

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import problems
import pytest

from experiments import cli
from experiments import config as cfg_lib
from experiments.nhgd import compare, hyper_cleaning

NAME = "nhgd_hyper_cleaning"
MODULE = "experiments.nhgd.hyper_cleaning"
KILL_AT = 3  # the run is interrupted inside its 3rd executed unit


def tiny_config(**sets):
    return problems.tiny_config(NAME, **sets)


class KilledError(Exception):
    """Stands for SIGKILL: the process dies in the middle of a unit."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``hypergrad run nhgd_hyper_cleaning --tiny``, killed inside its ``KILL_AT``-th
    executed unit, then ``hypergrad run --resume``; records which units each process ran."""
    out = tmp_path_factory.mktemp(NAME)
    real = compare.run_unit
    ran = {"first": [], "resumed": []}
    phase = ["first"]

    def spy(runner, unit):
        index = compare.units_of(runner.cfg).index(unit)
        ran[phase[0]].append(index)
        if phase[0] == "first" and len(ran["first"]) == KILL_AT:
            raise KilledError
        return real(runner, unit)

    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(cli.EXPERIMENTS, NAME, MODULE)
        mp.setattr(compare, "run_unit", spy)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            with pytest.raises(KilledError):
                cli.main(["run", NAME, "--tiny", "--out", str(out)])
            (run,) = out.iterdir()
            phase[0] = "resumed"
            code = cli.main(["run", "--resume", str(run)])
    return code, run, ran, tiny_config(), stdout.getvalue(), stderr.getvalue()


def _runnable(config):
    task, _ = hyper_cleaning.make_task(config)
    units = compare.units_of(config.compare)
    return units, [i for i, u in enumerate(units) if not compare.skip_code(u.method, task)]


def test_tiny_run_writes_table_curves_and_plots(tiny):
    code, run, _, config, stdout, stderr = tiny
    assert code == 0, stderr[-3000:]
    units, runnable = _runnable(config)
    c = config.compare
    assert len(units) == len(compare.METHODS)  # tiny: one grid point per method

    table = (run / "comparison.md").read_text()
    assert "| method | best setting | final val loss | test_acc | f1 | time to target (s)" in table
    assert "lowest final val_loss" in table and "inner lr (every method): [0.1]" in table
    for m in compare.METHODS:
        assert f"| {m} |" in table
    assert table.split("## Grids")[0] in stdout  # the printed table

    summary = json.loads((run / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["table"]}
    assert list(rows) == list(compare.METHODS)
    target = summary["target_val_loss"]
    finals = [rows[units[i].method]["final"]["val_loss"] for i in runnable]
    assert target == pytest.approx(max(finals))  # the "worst_best" rule
    for i, u in enumerate(units):
        row = rows[u.method]
        if i not in runnable:  # e.g. the parallel variants on one device
            assert row["status"].startswith("skipped: ") and row["status"] in table
            continue
        assert row["status"] == "ok" and row["best"] == {
            "inner_lr": u.lr,
            compare.VARIANTS[u.method].knob: u.knob,
        }
        assert all(np.isfinite(v) for v in row["final"].values()), row
        assert 0 <= row["final"]["test_acc"] <= 1 and 0 <= row["final"]["f1"] <= 1
        assert row["time_to_target_s"] is not None and row["time_to_target_s"] > 0
        assert row["oracles_to_target"] > 0 and np.isfinite(row["mean_cosine"])
        assert -1 <= row["mean_cosine"] <= 1
    assert rows["nhgd_dense"]["time_ratio_to_nhgd_dense"] == pytest.approx(1.0)

    curves = json.loads((run / "curves.json").read_text())
    assert curves["config"]["inner_lrs"] == [0.1]
    points = c.outer_steps // c.eval_every + 1
    for i, item in enumerate(curves["units"]):
        if i not in runnable:
            assert item["status"] == "skipped" and item["reason"].startswith("skipped: ")
            continue
        assert item["status"] == "done" and item["outer_step"] == [0, 2, 4]
        t = item["time_s"]
        assert len(t) == points and t[0] == 0 and all(b > a for a, b in zip(t, t[1:]))
        assert all(np.isfinite(v) for k in item["metrics"] for v in item["metrics"][k])
        assert item["cosine"][0] is None and all(np.isfinite(item["cosine"][1:]))
        assert all(r < 1e-3 for r in item["reference_residual"][1:])  # θ* converged
        assert item["metrics"]["f1"][0] == 0  # σ(0) = 0.5: nothing flagged at the start
    for name in ("val_loss_time", "val_loss_oracles", "test_acc_time", "cosine", "time_to_target"):
        png = (run / "plots" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


def test_oracle_counts_follow_each_method(tiny):
    """Cumulative oracle calls at every evaluation point, against each method's formula
    (K outer steps so far, T inner steps, Q = linear_steps)."""
    _, run, _, config, _, _ = tiny
    c = config.compare
    T, Q = c.inner_steps, c.linear_steps  # noqa: N806
    (maxiter,) = c.cg_maxiters
    curves = json.loads((run / "curves.json").read_text())["units"]
    seen = set()
    for item in curves:
        if item["status"] != "done":
            continue
        m, o = item["method"], item["oracles"]
        seen.add(m)
        for j, K in enumerate(item["outer_step"]):  # noqa: N806
            got = {k: o[k][j] for k in ("grads", "hvps", "mixed", "outer", "total")}
            assert got["total"] == sum(got[k] for k in compare.ORACLES)
            if m == "soba":  # T single-loop iterations per outer step, 1 of each per iteration
                assert got == {
                    "grads": K * T,
                    "hvps": K * T,
                    "mixed": K * T,
                    "outer": K * T,
                    "total": 4 * K * T,
                }
                continue
            assert (got["grads"], got["mixed"], got["outer"]) == (K * T, K, K), (m, got)
            if m.startswith("nhgd"):
                assert got["hvps"] == 0
            elif m == "stocbio":
                assert got["hvps"] == K * (Q - 1)
            elif m == "amigo":
                assert got["hvps"] == K * Q
            elif m == "neumann":
                assert got["hvps"] == K * (Q + 2)
            else:  # cg: its iterations (<= maxiter) plus the initial and final residuals
                assert 2 * K <= got["hvps"] <= K * (maxiter + 2)
    assert {"nhgd_dense", "nhgd_kfac", "stocbio", "amigo", "soba", "cg", "neumann"} <= seen


def test_resume_does_not_redo_finished_units(tiny):
    code, run, ran, config, stdout, _ = tiny
    assert code == 0
    _, runnable = _runnable(config)
    killed = runnable[KILL_AT - 1]
    assert ran["first"] == runnable[:KILL_AT]  # the last one died half-way
    assert ran["resumed"] == runnable[KILL_AT - 1 :]  # from the killed unit on, nothing before
    assert f"resuming {run} from outer step {killed}" in stdout
    # every unit is logged exactly once, in order, though the first process logged some
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(len(compare.METHODS)))
    assert [r["unit"] for r in records] == list(range(len(compare.METHODS)))
    # the finished units' results came back from the checkpoint: the first process compiled
    # their programs; the resumed process compiled only the later variants'
    curves = json.loads((run / "curves.json").read_text())["units"]
    assert all(curves[i]["compile_s"] > 0 for i in runnable)


def test_f1_score_on_a_hand_computed_case():
    flagged = jnp.array([True, True, False, False, True, False])
    corrupted = jnp.array([True, False, True, False, True, False])
    # TP = 2 (0, 4), FP = 1 (1), FN = 1 (2): F1 = 2·2 / (2·2 + 1 + 1) = 2/3
    assert float(hyper_cleaning.f1_score(flagged, corrupted)) == pytest.approx(2 / 3)
    assert float(hyper_cleaning.f1_score(corrupted, corrupted)) == 1.0
    assert float(hyper_cleaning.f1_score(~corrupted, corrupted)) == 0.0
    nothing = jnp.zeros(6, bool)
    assert float(hyper_cleaning.f1_score(nothing, corrupted)) == 0.0
    assert float(hyper_cleaning.f1_score(nothing, nothing)) == 0.0  # 0/0 defined as 0
    assert float(jax.jit(hyper_cleaning.f1_score)(flagged, corrupted)) == pytest.approx(2 / 3)


def test_task_data_weights_and_losses():
    config = tiny_config()
    task, corrupted = hyper_cleaning.make_task(config)
    splits, num_classes = hyper_cleaning.load_splits(config)
    clean = splits.train.y
    noisy = np.asarray(task.train["y"])
    n = clean.shape[0]
    # exactly half the training labels, each changed to another class; val/test clean
    assert corrupted.sum() == round(0.5 * n)
    np.testing.assert_array_equal(noisy != clean, corrupted)
    np.testing.assert_array_equal(np.asarray(task.val["y"]), splits.val.y)
    np.testing.assert_array_equal(np.asarray(task.train["idx"]), np.arange(n))
    # whitened features: unit variance, uncorrelated on the training part
    x = np.asarray(task.train["x"], np.float64)
    assert x.shape[1] == config.task.pca
    np.testing.assert_allclose(np.cov(x.T, bias=True), np.eye(x.shape[1]), atol=1e-4)
    assert task.params["Dense_0"]["kernel"].shape == (config.task.pca, num_classes - 1)
    assert task.hparams["v"].shape == (n,) and float(jnp.max(jnp.abs(task.hparams["v"]))) == 0

    v = np.linspace(-2.0, 2.0, n, dtype=np.float32)
    hparams = {"v": jnp.asarray(v)}
    params = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), task.params)
    rows = np.array([3, 7, 11])
    batch = jax.tree.map(lambda a: a[rows], task.train)
    weights = jax.jit(task.sample_weights)(hparams, batch)
    np.testing.assert_allclose(weights, 1 / (1 + np.exp(-v[rows])), rtol=1e-6)
    # the inner loss is a mean over the batch's samples (NHGD's per-sample Fisher needs it)
    loss = jax.jit(task.problem.inner_loss)
    per = [
        loss(params, hparams, jax.tree.map(lambda a, i=i: a[i : i + 1], batch)) for i in range(3)
    ]
    assert float(loss(params, hparams, batch)) == pytest.approx(float(np.mean(per)), rel=1e-6)
    # flags: σ(v_i) < 0.5 exactly where v_i < 0
    exact = {"v": jnp.asarray(np.where(corrupted, -1.0, 1.0), jnp.float32)}
    metrics = jax.jit(task.evaluate)(params, exact)
    assert float(metrics["f1"]) == 1.0 and set(metrics) == {"val_loss", "test_acc", "f1"}


def test_config_validation_and_presets(monkeypatch):
    cases = [
        ({"compare": {"nhgd_betas": [0.9, 1.0]}}, "compare.nhgd_betas[1]: expected a value > 0"),
        ({"compare": {"inner_lrs": []}}, "compare.inner_lrs: expected at least one value"),
        ({"compare": {"cg_maxiters": [0]}}, "compare.cg_maxiters[0]: expected a value >= 1"),
        ({"compare": {"outer_steps": 10, "eval_every": 3}}, "compare.eval_every: 3 does not"),
        ({"compare": {"methods": ["soba", "soba"]}}, "compare.methods: 'soba' is listed twice"),
        ({"compare": {"methods": ["sgd"]}}, "compare.methods[0]: expected one of 'nhgd_dense'"),
        ({"compare": {"target": "value"}}, "compare.target_value: required with"),
        ({"compare": {"target_value": 0.5}}, "compare.target_value: only used with"),
        ({"compare": {"outer_lr": 0}}, "compare.outer_lr: expected a value > 0"),
        ({"task": {"corrupt_fraction": 1.5}}, "task.corrupt_fraction: expected a value >= 0"),
        ({"data": {"name": "cifar10"}}, "data.name: expected one of 'digits', 'breast_cancer'"),
    ]
    for data, message in cases:
        with pytest.raises(cfg_lib.ConfigError) as err:
            cfg_lib.from_dict(hyper_cleaning.Config, data, "nhgd_hyper_cleaning.yaml")
        assert message in str(err.value) and "nhgd_hyper_cleaning.yaml: " in str(err.value)
    with pytest.raises(cfg_lib.ConfigError, match="data.batch_size: 5000 > 240 training"):
        hyper_cleaning.make_task(tiny_config(**{"data.batch_size": 5000}))
    with pytest.raises(cfg_lib.ConfigError, match="task.pca: 99 > "):
        hyper_cleaning.make_task(tiny_config(**{"task.pca": 99}))

    monkeypatch.setitem(cli.EXPERIMENTS, NAME, MODULE)
    path = cli.find_config(NAME)
    for preset in (None, "mnist1d", "tiny"):
        data = cfg_lib.resolve(cfg_lib.load_yaml(path), str(path), preset)
        module, config = cli.load_config(data, str(path))
        assert module.__name__ == MODULE and config.experiment == NAME
        assert config.task.corrupt_fraction == 0.5 and config.compare == cfg_lib.from_dict(
            compare.CompareConfig, data["compare"]
        )
        if preset == "mnist1d":
            assert config.data.name == "mnist1d" and config.data.num_samples >= 10_000
        if preset is None:
            assert config.data.name == "digits" and set(config.compare.methods) == set(
                compare.METHODS
            )
            for m in compare.METHODS:  # a real grid search: 2-4 points per method
                assert 2 <= len(config.compare.grid(m)) <= 4


def test_target_selection_and_first_reach():
    assert compare.first_reach([3.0, 2.0, np.nan, 1.0], 2.0) == 1
    assert compare.first_reach([3.0, np.nan], 2.0) is None
    cfg = compare.CompareConfig()
    assert compare.target_loss(cfg, {"a": 0.5, "b": 0.7, "c": np.nan}) == 0.7
    assert compare.target_loss(compare.CompareConfig(target="value", target_value=0.3), {}) == 0.3
    units = [
        compare.Unit("soba", 0.1, 0.1),
        compare.Unit("soba", 0.3, 0.1),
        compare.Unit("cg", 0.1, 5),
    ]
    state = compare.init_results(3, 2, 1)
    state["status"][:] = [compare.DONE, compare.DONE, compare.SKIPPED]
    state["metrics"][:, -1, 0] = [np.nan, 0.4, 0.1]  # a diverged run never wins
    assert compare.best_units(state, units) == {"soba": 1, "cg": None}
    assert compare.mean_finite([np.nan, 1.0, 3.0]) == 2.0 and compare.mean_finite([np.nan]) is None
    assert compare.cosine({"a": jnp.array([1.0, 0.0])}, {"a": jnp.array([2.0, 2.0])}) == (
        pytest.approx(2**-0.5)
    )
    assert np.isnan(compare.cosine(jnp.zeros(2), jnp.ones(2)))
