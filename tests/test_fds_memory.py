"""The fds_memory experiment at its tiny size: forward mode's memory is flat in T."""

import json

from experiments import cli


def test_tiny_run(tmp_path, capsys):
    assert cli.main(["run", "fds_memory", "--tiny", "--quiet", "--out", str(tmp_path)]) == 0
    (run,) = tmp_path.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    rows = summary["rows"]
    assert [r["T"] for r in rows] == [10, 40]
    # XLA's compiled temporaries: forward mode carries tangents only (flat in T, up to a
    # few hundred bytes of buffer layout); reverse mode stores every step's carry: 30 more
    # steps add 30 carries (params + velocity, ~9 KiB each here) to a fixed ~0.3 MiB.
    assert abs(rows[1]["forward_temp_mib"] / rows[0]["forward_temp_mib"] - 1) < 0.01
    assert rows[1]["unrolled_temp_mib"] > 1.5 * rows[0]["unrolled_temp_mib"]
    assert rows[1]["unrolled_remat_temp_mib"] < rows[1]["unrolled_temp_mib"]
    assert (run / "plots" / "memory_vs_horizon.png").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert "forward MiB" in capsys.readouterr().out
