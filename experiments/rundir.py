"""Run directories: resolved config, metrics, summary, plots, checkpoints, progress.

    runs/<experiment>-<YYYYmmdd-HHMMSS>/
      config.yaml      the resolved config (what ran, after presets and --set)
      metrics.jsonl    one JSON line per outer step
      summary.json     final numbers
      plots/*.png
      checkpoints/     orbax checkpoints of the full outer state

Checkpoints are written by orbax into a temporary folder and renamed when complete, and the
last two complete ones are kept, so a run killed mid-write still resumes from the last
good checkpoint. A complete checkpoint damaged afterwards (a truncated file, empty metadata,
a missing folder) is reported in one line on ``--resume``, moved to
``damaged_checkpoints/``, and the run continues from the newest one that restores.

Multi-process runs (``jax.distributed``): every process computes, process 0 alone writes
(the folder name is agreed by broadcast); the outer state is identical on every process,
so process 0 checkpoints its host copy and every process restores from the files.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import rich.console
import rich.progress
import yaml
from jax.experimental import multihost_utils

from experiments.config import load_yaml


def _jsonable(x: Any):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        arr = np.asarray(x)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    return x


class RunDir:
    """One run's folder (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.plots = self.path / "plots"
        self.metrics_file = self.path / "metrics.jsonl"
        self.primary = jax.process_index() == 0  # the process that writes files
        self._checkpoints = None

    @classmethod
    def create(cls, out_dir: str | Path, experiment: str, config: dict) -> RunDir:
        path = None
        if jax.process_index() == 0:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            base = Path(out_dir) / f"{experiment}-{stamp}"
            path, n = base, 1
            while path.exists():
                n += 1
                path = base.with_name(f"{base.name}-{n}")
            (path / "plots").mkdir(parents=True)
            (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return cls(Path(_from_process_0(str(path))))

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        path = Path(path)
        if not (path / "config.yaml").is_file():
            raise FileNotFoundError(f"--resume: {path} is not a run directory (no config.yaml)")
        return cls(path)

    def config(self) -> dict:
        return load_yaml(self.path / "config.yaml")

    # metrics ---------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if not self.primary:
            return
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    def metrics(self) -> list[dict]:
        """The logged records; a last line cut short by a kill is dropped."""
        if not self.metrics_file.exists():
            return []
        lines = [line for line in self.metrics_file.read_text().splitlines() if line]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise
        return records

    def keep_metrics_before(self, step: int) -> None:
        """Drops records of steps >= ``step`` (logged after the checkpoint we resume from)."""
        if not self.primary:
            return
        kept = [r for r in self.metrics() if r["step"] < step]
        self.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write_summary(self, summary: dict) -> None:
        if not self.primary:
            return
        text = json.dumps(_jsonable(summary), indent=2)
        (self.path / "summary.json").write_text(text + "\n")

    # checkpoints -----------------------------------------------------------------------
    @property
    def checkpoints(self) -> ocp.CheckpointManager:
        if self._checkpoints is None:
            me = jax.process_index()  # each process reads alone; process 0 alone writes
            folder = (self.path / "checkpoints").absolute()
            if self.primary:
                folder.mkdir(exist_ok=True)
            options = ocp.CheckpointManagerOptions(
                max_to_keep=2,
                create=False,
                enable_async_checkpointing=False,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    primary_host=me, active_processes={me}
                ),
            )
            self._checkpoints = ocp.CheckpointManager(folder, options=options)
        return self._checkpoints

    def save(self, step: int, state) -> None:
        if not self.primary:
            return
        host = jax.device_get(_storable(state))  # identical on every process
        self.checkpoints.save(step, args=ocp.args.StandardSave(host), force=True)
        self.checkpoints.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.checkpoints.latest_step()

    def restore(self, template):
        """``(step, state)`` from the newest checkpoint that restores, in the structure (and
        key types) of ``template``; ``None`` when there is no checkpoint.

        A step that fails to restore (a truncated array file, empty metadata, a missing
        folder: a disk filled or a copy cut short) is reported in one line on stderr and
        moved aside to ``damaged_checkpoints/<step>`` (never deleted), and the next older
        step is tried. Raises :class:`CheckpointError` when none restores.
        """
        stored = _storable(template)
        abstract = jax.tree.map(
            lambda x: np.zeros(np.shape(x), x.dtype), jax.device_get(stored)
        )  # host arrays: no device placement to agree on across processes
        steps = sorted(self.checkpoints.all_steps(), reverse=True)
        damaged, found = [], None
        for step in steps:
            try:
                leaves = jax.tree.leaves(self._read(step, abstract))
                _check_like(leaves, jax.tree.leaves(abstract))
            except Exception as e:  # noqa: BLE001 -- any failure to read means "damaged"
                damaged.append((step, _one_line(e)))
                continue
            found = (
                step,
                jax.tree.map(
                    _unstorable, template, jax.tree.unflatten(jax.tree.structure(stored), leaves)
                ),
            )
            break
        _sync("hypergrad-restore")  # every process has read before process 0 moves files
        moved = [(step, why, self._set_aside(step)) for step, why in damaged]
        if damaged:
            self.close()
            self._checkpoints = None  # a fresh manager lists the remaining steps
        if found is None and steps:
            whys = "; ".join(f"step {step}: {why}" for step, why, _ in moved)
            raise CheckpointError(
                f"--resume: no checkpoint in {self.path / 'checkpoints'} restores ({whys}); "
                f"moved to {self.path / 'damaged_checkpoints'}; start a new run"
            )
        for step, why, aside in moved if self.primary else ():
            print(
                f"hypergrad: checkpoint step {step} does not restore ({why}); moved to {aside}",
                file=sys.stderr,
            )
        return found

    def _read(self, step: int, abstract):
        """Checkpoint ``step`` read on its own (not through the manager, which infers the
        layout of every step from the newest one's), with the stray tracebacks that
        tensorstore's reader threads print when a read fails kept off the terminal."""
        me = jax.process_index()
        folder = (self.path / "checkpoints" / str(step) / "default").absolute()
        options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        with quiet_background():
            try:
                with ocp.StandardCheckpointer(multiprocessing_options=options) as reader:
                    return reader.restore(folder, abstract)
            except Exception:
                time.sleep(0.2)  # let the other reads of a failed restore finish quietly
                raise

    def _set_aside(self, step: int) -> Path:
        """Moves checkpoint ``step`` to ``damaged_checkpoints/`` (a fresh name if taken)."""
        folder = self.path / "damaged_checkpoints"
        target, n = folder / str(step), 1
        while target.exists():
            n += 1
            target = folder / f"{step}-{n}"
        if self.primary:
            folder.mkdir(exist_ok=True)
            (self.path / "checkpoints" / str(step)).rename(target)
        return target

    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.close()


@contextlib.contextmanager
def quiet_background():
    """Keeps what background callbacks raise or print (tensorstore's readers after one read
    of a restore failed: "Event loop is closed", unraisable in their threads) off stderr;
    the failure itself is raised in the calling thread and reported there."""
    hooks = threading.excepthook, sys.unraisablehook
    threading.excepthook = sys.unraisablehook = lambda args: None
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    except Exception:
        time.sleep(0.2)  # let the other reads of a failed restore finish quietly
        raise
    finally:
        threading.excepthook, sys.unraisablehook = hooks


class CheckpointError(RuntimeError):
    """No checkpoint of a run restores (reported as one line by the CLI)."""


def _one_line(e: Exception, limit: int = 160) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_like(leaves, expected) -> None:
    """Restored leaves must have the template's shapes and dtypes."""
    if len(leaves) != len(expected):
        raise ValueError(f"{len(leaves)} arrays stored, {len(expected)} expected")
    for got, want in zip(leaves, expected):
        if np.shape(got) != np.shape(want) or np.asarray(got).dtype != want.dtype:
            raise ValueError(
                f"an array is {np.asarray(got).dtype}{list(np.shape(got))}, "
                f"expected {want.dtype}{list(np.shape(want))}"
            )


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _from_process_0(text: str) -> str:
    """``text`` as process 0 has it (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return text
    buf = np.zeros(1024, np.uint8)
    if jax.process_index() == 0:
        raw = np.frombuffer(text.encode(), np.uint8)
        buf[: raw.size] = raw
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(out).rstrip(b"\0").decode()


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _storable(tree):
    """Typed PRNG keys as their raw data (orbax stores plain arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _unstorable(template_leaf, stored_leaf):
    if _is_key(template_leaf):
        return jax.random.wrap_key_data(stored_leaf, impl=jax.random.key_impl(template_leaf))
    return stored_leaf


class Progress:
    """Progress of a loop on stderr (``rich``): a bar, steps done, time left, the latest
    outer loss. When stderr is not a terminal (a log file, CI) there is no bar: one line when
    the loop ends instead. ``quiet`` (and every process but 0) shows nothing. ``label``
    names the steps ("outer steps", "pre-training steps")."""

    def __init__(self, total: int, start: int = 0, quiet: bool = False, label="outer steps"):
        self.total, self.start, self.done, self.label = total, start, start, label
        self.quiet = quiet or jax.process_index() != 0
        self.t0 = time.perf_counter()
        console = rich.console.Console(stderr=True)
        self.bar = None
        if not self.quiet and console.is_terminal:
            self.bar = rich.progress.Progress(
                rich.progress.TextColumn(label),
                rich.progress.BarColumn(),
                rich.progress.MofNCompleteColumn(),
                rich.progress.TimeRemainingColumn(),
                rich.progress.TextColumn("{task.fields[shown]}"),
                console=console,
            )
            self.task = self.bar.add_task("", total=total, completed=start, shown="")
            self.bar.start()

    def update(self, **shown) -> None:
        self.done += 1
        if self.bar is not None:
            text = "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()
            )
            self.bar.update(self.task, advance=1, shown=text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif not self.quiet:
            steps, seconds = self.done - self.start, time.perf_counter() - self.t0
            per = f" ({seconds / steps:.2f} s/step)" if steps else ""
            line = f"{self.done}/{self.total} {self.label}, {seconds:.1f} s{per}"
            print(line, file=sys.stderr)
