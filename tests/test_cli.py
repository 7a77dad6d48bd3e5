"""End to end: `hypergrad run` at tiny size, `list`, and resume after SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import cli

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def env():
    """The subprocesses' environment: conftest's persistent compilation cache included."""
    return dict(os.environ)


def hypergrad(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )


def only_run(out: Path) -> Path:
    (run,) = out.iterdir()
    return run


def test_quickstart_tiny_end_to_end(tmp_path, env):
    result = hypergrad(env, "run", "--tiny", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(tmp_path)
    assert "learned" in result.stdout and str(run / "plots") in result.stdout
    assert "3/3" in result.stderr  # the progress bar
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert all(m["status"] == 0 and m["outer_loss"] > 0 for m in metrics)
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["learned"]["test_accuracy"] <= 1
    assert summary["outer_steps"] == 3
    assert sorted(p.name for p in (run / "plots").iterdir()) == [
        "hyperparameters.png",
        "lr_schedule.png",
        "outer_loss.png",
    ]
    assert (run / "checkpoints").is_dir()
    assert "inner:\n  num_steps: 20" in (run / "config.yaml").read_text()  # resolved preset


def checkpoint_steps(run: Path) -> list[int]:
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, env):
    # 16 outer steps of a small but not trivial run (~0.2 s each with a checkpoint every 2).
    args = [
        "run",
        "--tiny",
        "--quiet",
        "--set",
        "outer.num_steps=16",
        "--set",
        "inner.num_steps=200",
        "--set",
        "model.hidden=[32]",
    ]
    full, killed = tmp_path / "full", tmp_path / "killed"
    result = hypergrad(env, *args, "--out", str(full))
    assert result.returncode == 0, result.stderr[-3000:]

    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.cli", *args, "--out", str(killed)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            runs = list(killed.glob("*")) if killed.exists() else []
            if runs and any(s >= 4 for s in checkpoint_steps(runs[0])):
                break
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    run = only_run(killed)
    if (run / "summary.json").exists():
        pytest.fail("the run finished before it could be killed: make it longer")
    assert proc.returncode == -signal.SIGKILL
    last = checkpoint_steps(run)[-1]
    assert 4 <= last < 16

    result = hypergrad(env, "run", "--resume", str(run), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = json.loads((run / "summary.json").read_text())
    reference = json.loads((only_run(full) / "summary.json").read_text())
    # Same compiled step, same restored state and key: bitwise equal on CPU.
    assert resumed["learned_lr_schedule"] == reference["learned_lr_schedule"]
    assert resumed["learned_weight_decay"] == reference["learned_weight_decay"]
    losses = [json.loads(x)["outer_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    ref_losses = [
        json.loads(x)["outer_loss"]
        for x in (only_run(full) / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses == ref_losses  # one line per step, none lost or repeated


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~50 s (three processes compile): tests/test_parallel.py runs two processes
def test_two_process_run_matches_single_process(tmp_path, env):
    # The same data-parallel run over 4 CPU devices: one process with 4, then two processes
    # with 2 each (jax.distributed on 127.0.0.1, gloo collectives). The compiled programs
    # are the same; only the all-reduce is implemented differently, so results agree to
    # float32 rounding (1e-6 relative), and here they are in fact identical.
    args = ["run", "--tiny", "--quiet", "--set", "run.data_parallel=true"]
    single = hypergrad(env, *args, "--local-devices", "4", "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-3000:]
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.cli",
                *args,
                "--out",
                str(tmp_path / "two"),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--local-devices",
                "2",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    one, two = only_run(tmp_path / "one"), only_run(tmp_path / "two")  # process 0 wrote
    a = json.loads((one / "summary.json").read_text())
    b = json.loads((two / "summary.json").read_text())
    np.testing.assert_allclose(b["learned_lr_schedule"], a["learned_lr_schedule"], rtol=1e-6)
    np.testing.assert_allclose(b["learned_weight_decay"], a["learned_weight_decay"], rtol=1e-6)
    losses = [
        [json.loads(x)["outer_loss"] for x in (r / "metrics.jsonl").read_text().splitlines()]
        for r in (one, two)
    ]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)


# ---------------------------------------------------------------- damaged newest checkpoint

RESUME_ARGS = ["--tiny", "--quiet", "--set", "outer.num_steps=6", "--set", "run.checkpoint_every=2"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted run: checkpoints at outer steps 4 and 6 kept (the last two)."""
    out = tmp_path_factory.mktemp("finished")
    assert cli.main(["run", *RESUME_ARGS, "--out", str(out)]) == 0
    run = only_run(out)
    assert checkpoint_steps(run) == [4, 6]
    return run


def _damage(step_dir: Path, how: str) -> None:
    item = step_dir / "default"
    if how == "truncated array file":
        for f in (item / "ocdbt.process_0" / "d").iterdir():
            f.write_bytes(f.read_bytes()[:10])
    elif how == "empty metadata":
        (item / "_METADATA").write_text("")
    elif how == "missing folder":
        shutil.rmtree(item)


def _outcome(run: Path):
    summary = json.loads((run / "summary.json").read_text())
    lines = (run / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(x)["outer_loss"] for x in lines]
    return summary["learned_lr_schedule"], summary["learned_weight_decay"], losses


@pytest.mark.parametrize("how", ["truncated array file", "empty metadata", "missing folder"])
def test_resume_falls_back_from_a_damaged_newest_checkpoint(tmp_path, capsys, finished_run, how):
    # The newest checkpoint (6) is damaged after the run; resuming falls back to 4, says so
    # in one line, keeps the damaged step aside, and recomputes steps 4-5 to the same bits.
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "summary.json").unlink()
    _damage(run / "checkpoints" / "6", how)
    capsys.readouterr()
    assert cli.main(["run", "--resume", str(run), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("hypergrad: checkpoint step 6 does not restore (")
    assert err[0].endswith(f"moved to {run / 'damaged_checkpoints' / '6'}")
    assert (run / "damaged_checkpoints" / "6").is_dir()  # kept, not deleted
    assert checkpoint_steps(run) == [4, 6]  # 6 written anew
    assert _outcome(run) == _outcome(finished_run)


def test_resume_with_no_restorable_checkpoint_is_one_line(tmp_path, capsys, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    _damage(run / "checkpoints" / "6", "empty metadata")
    _damage(run / "checkpoints" / "4", "missing folder")
    capsys.readouterr()
    assert cli.main(["run", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hypergrad: error: --resume: no checkpoint in ")
    assert "(step 6: JSONDecodeError" in err[0] and "; step 4: FileNotFoundError" in err[0]
    assert err[0].endswith("start a new run")
    assert sorted(p.name for p in (run / "damaged_checkpoints").iterdir()) == ["4", "6"]


def test_the_cli_keeps_compiled_programs_in_its_cache(tmp_path):
    """Without a cache given to JAX, ``hypergrad run`` compiles into ``$HYPERGRAD_CACHE/xla``
    by default, and into nothing with ``HYPERGRAD_COMPILE_CACHE=off``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "HYPERGRAD_"))}
    clean["HYPERGRAD_CACHE"] = str(tmp_path)
    args = ["run", "quickstart", "--tiny", "--quiet", "--out", str(tmp_path / "runs")]
    done = hypergrad(clean | {"HYPERGRAD_COMPILE_CACHE": "off"}, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "xla").exists()
    done = hypergrad(clean, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((tmp_path / "xla").glob("*-cache"))
