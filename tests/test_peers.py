"""The peer comparison runs (``benchmarks/peers/run.py --quick``, results to a temporary
folder) and its hypergradients agree with ours. Nothing timed is asserted.

Marked slow (15-30 s on 2 shared cores: JAX compilation, the implicit comparison, PyTorch's
first calls): outside the default run and CI. Run it with
``python -m pytest tests/test_peers.py -m slow -n 0``.
The PyTorch side needs the optional ``peers`` extra; without it the script must still run and
say which columns it skipped.
"""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
OURS = "hg.Unrolled() (JAX)"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("peers")
    script = [sys.executable, str(ROOT / "benchmarks" / "peers" / "run.py"), "--quick"]
    result = subprocess.run(
        [*script, "--out", str(out)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "peers.json").read_text()), (out / "peers.md").read_text()


def test_runs_and_reports(quick):
    data, md = quick
    assert md.startswith("# Against other libraries")
    assert {"load_average_at_start", "load_average_at_end"} <= data["machine"].keys()
    ours = [r for r in data["unrolled"] if r["method"] == OURS]
    assert [r["T"] for r in ours] == [100]
    assert ours[0]["status"] == "OK" and ours[0]["compile_s"] > 0
    assert ours[0]["min_s"] <= ours[0]["median_s"] <= ours[0]["max_s"]
    assert data["implicit"]["status"] == "OK"
    for lib, version in data["libraries"].items():  # a missing library is a note, not a crash
        if version.startswith(("not importable", "not run")):
            assert any(note.startswith(f"{lib}:") for note in data["notes"])


def test_torch_hypergradients_agree(quick):
    pytest.importorskip("torch")
    data, md = quick
    rows = {r["method"]: r for r in data["unrolled"]}
    expected = {"hand-written torch", "torch.func"}
    for lib, name in (("higher", "higher"), ("torchopt", "TorchOpt")):
        if not data["libraries"][lib].startswith(("not importable", "not run")):
            expected.add(name)
    assert expected <= rows.keys()
    assert data["torch_threads"] == data["xla_threads"]
    for name in expected:
        # float32 on both sides, 100 steps whose roundings accumulate differently (XLA's
        # fused loop against PyTorch's eager ops): measured ~5e-7 relative; 1e-4 leaves room
        # for other BLAS builds and still catches a wrong update, schedule block or batch.
        assert rows[name]["rel_diff"] < 1e-4, (name, rows[name]["rel_diff"])
        assert rows[name]["outer_abs_diff"] < 1e-4, name  # the same trained network
        assert name in md
