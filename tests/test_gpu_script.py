"""benchmarks/gpu.sh, the script for the day a GPU is lent, runs on CPU (``--smoke``: every
benchmark's ``--quick`` preset) and writes every result file. Marked slow (~2 minutes,
compile-bound), as the other benchmark smoke tests: ``python -m pytest -m slow``."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def test_bad_argument_is_one_clear_error(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--fast"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "unknown argument '--fast'" in result.stderr


@pytest.mark.slow
def test_gpu_script_smoke_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    status = (tmp_path / "status.txt").read_text()
    assert result.returncode == 0, status + result.stdout[-3000:] + result.stderr[-3000:]
    assert [line.split()[0] for line in status.splitlines()] == ["estimators", "nhgd", "peers"]
    device = json.loads((tmp_path / "device.json").read_text())
    assert device["backend"] == "cpu" and device["devices"]
    for name in ("estimators", "nhgd", "peers"):
        assert (tmp_path / f"{name}.json").is_file() and (tmp_path / f"{name}.md").is_file()
    rows = json.loads((tmp_path / "estimators.json").read_text())["horizons"]
    assert all(r.get("status", "OK") == "OK" for r in rows)
