"""The experiment driver: outer steps with metrics, progress, checkpoints and resume."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from experiments.rundir import Progress, RunDir


class Experiment(NamedTuple):
    """What an experiment module's ``build(config)`` returns.

    Attributes:
      num_steps: outer steps.
      init_state: ``() -> state`` (a pytree: the whole outer state).
      step: ``state -> (state, metrics)``, a jitted outer step; metrics a dict of scalars
        or small arrays (one ``metrics.jsonl`` line).
      finish: ``(state, run_dir) -> summary`` after the last step: evaluation, plots,
        the printed result table.
      checkpoint_every: outer steps between checkpoints.
      done: optional ``state -> bool`` for early stopping (checked after each step).
    """

    num_steps: int
    init_state: Callable[[], Any]
    step: Callable[[Any], tuple[Any, dict]]
    finish: Callable[[Any, RunDir], dict]
    checkpoint_every: int
    done: Callable[[Any], bool] | None = None


def execute(exp: Experiment, run: RunDir, *, quiet: bool = False, resume: bool = False) -> dict:
    """Runs (or resumes) ``exp`` in ``run`` and returns its summary."""
    state, start = exp.init_state(), 0
    restored = run.restore(state) if resume else None
    if restored is not None:
        start, state = restored
        run.keep_metrics_before(start)
        if not quiet:
            print(f"resuming {run.path} from outer step {start}")
    if start > 0 and exp.done is not None and bool(exp.done(state)):
        start = exp.num_steps  # it had stopped early: nothing left to run
    progress = Progress(exp.num_steps, start, quiet)
    try:
        for i in range(start, exp.num_steps):
            t0 = time.perf_counter()
            state, metrics = exp.step(state)
            metrics = jax.device_get(metrics)
            run.log({"step": i, **metrics, "time_s": time.perf_counter() - t0})
            progress.update(**{k: float(metrics[k]) for k in ("outer_loss",) if k in metrics})
            finished = i + 1 == exp.num_steps or (exp.done is not None and bool(exp.done(state)))
            if (i + 1) % exp.checkpoint_every == 0 or finished:
                run.save(i + 1, state)
            if finished:
                break
    finally:
        progress.close()
    summary = exp.finish(state, run)
    run.write_summary(summary)
    run.close()
    return summary
