"""The benchmark scripts run (smoke test, results to a temporary folder; nothing timed).

Marked slow (~45 s, compile-bound): outside the default run and CI, which the compiled-
memory checks of tests/test_memory.py and tests/test_fds_memory.py cover. Run it with
``python -m pytest -m slow``.
"""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def _run_quick(name: str, out, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python benchmarks/<name>.py --quick --out <out>``, its output captured."""
    script = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick", "--out", str(out)]
    return subprocess.run(script, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_estimators_benchmark_quick(tmp_path):
    result = _run_quick("estimators", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "estimators.json").read_text())
    assert (tmp_path / "estimators.md").read_text().startswith("# Hypergradient estimators")
    assert {row["T"] for row in data["horizons"]} == {100, 1000}
    assert all(row.get("status", "OK") == "OK" for row in data["horizons"])
    # forward mode's compiled memory is flat in T, reverse mode's grows (XLA's analysis)
    temp = {(r["T"], r["estimator"]): r["temp_bytes"] for r in data["horizons"]}
    assert temp[1000, "Forward()"] == temp[100, "Forward()"]
    assert temp[1000, "Unrolled()"] > 5 * temp[100, "Unrolled()"]
    assert data["implicit"]["status"] == "OK"


@pytest.mark.slow
def test_nhgd_benchmark_quick(tmp_path):
    result = _run_quick("nhgd", tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "nhgd.json").read_text())
    rows = {r["method"]: r for r in data["time_to_target"]["rows"]}
    assert rows["nhgd_dense"]["time_ratio"] == 1.0
    assert {"stocbio", "amigo", "soba", "cg", "neumann"} <= rows.keys()
    assert all(r["fused_s"] > 0 and r["parallel_s"] > 0 for r in data["critical_path"])


@pytest.mark.slow
def test_population_benchmark_quick(tmp_path):
    result = _run_quick("population", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "population.json").read_text())
    assert (tmp_path / "population.md").read_text().startswith("# HPM population")
    assert [row["K"] for row in data["sizes"]] == [4, 8]
    for row in data["sizes"]:
        for key in ("vmapped_s", "loop_s", "step_loop_s", "gaussian_s", "teacher_s"):
            assert row[key] > 0, key
        assert row["loop_over_vmapped"] > 0 and row["remat_loop_over_vmapped"] > 0
        assert {"gaussian_overhead", "teacher_overhead"} <= row.keys()
        assert row["replaced"] >= 1  # fraction raised to 1/K where 0.2 K < 1
        # the vmapped population and the loop compute the same interval (float32)
        assert row["rel_diff_loop_vs_vmapped"] < 1e-4


@pytest.mark.slow
def test_nhgd_scaling_benchmark_quick(tmp_path):
    result = _run_quick("nhgd_scaling", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "nhgd_scaling.json").read_text())
    assert (tmp_path / "nhgd_scaling.md").read_text().startswith("# NHGD scaling")
    assert (tmp_path / "nhgd_scaling.png").stat().st_size > 0
    rows = data["rows"]
    assert {(r["width"], r["kappa"]) for r in rows} == {
        (16, 1.0),
        (16, 100.0),
        (32, 1.0),
        (32, 100.0),
    }
    for row in rows:
        assert row["params"] == row["width"] * (row["width"] + 1)
        methods = {r["method"] for r in row["results"]}
        assert {"nhgd_kfac", "nhgd_kfac_online", "nhgd_kfac_vmap", "cg", "cg_full"} <= methods
        assert {"neumann", "stocbio", "nhgd_dense"} <= methods  # |θ| <= 2000: dense too
        for r in row["results"]:
            assert all(-1.0 <= c <= 1.0 for c in r["cosines"]), r
            assert -1.0 <= r["cosine"] <= 1.0 and r["time_s"] > 0
            assert r["theta_rel_diff"] < 1e-3  # every method ran the same inner trajectory
        assert set(row["targets"]) == {"0.9", "0.99"}
        for t in row["targets"].values():
            assert t["verdict"] in {
                "nhgd faster", "baseline faster", "only nhgd", "only baselines", "neither"
            }  # fmt: skip
            assert (t["ratio"] is None) == (t["verdict"] not in {"nhgd faster", "baseline faster"})


@pytest.mark.slow
def test_implicit_reuse_benchmark_quick(tmp_path):
    pytest.importorskip("jaxopt")  # the bench extra
    result = _run_quick("implicit_reuse", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "implicit_reuse.json").read_text())
    assert [p["problem"].split(",")[0] for p in data["problems"]] == ["MLP", "logistic regression"]
    for p in data["problems"]:
        assert set(p["total_solve_s"]) == {
            "jaxopt", "ours cold", "ours warm", "ours warm + Hutchinson"
        }  # fmt: skip
        # float32 solves to tol 1e-5 on systems with condition numbers ~1e3: every solver's
        # hypergradient within 1e-3 of the float64 dense reference
        assert all(e["max"] < 1e-3 for e in p["rel_err_vs_float64"].values()), p
        # cold CG is jaxopt's algorithm: the same hypergradients to float32 rounding
        errors = p["rel_err_vs_float64"]
        assert abs(errors["ours cold"]["median"] - errors["jaxopt"]["median"]) < 1e-5
        assert p["bounds_last_step"]["plain"] > 0
