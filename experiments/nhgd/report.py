"""The NHGD comparison's report: the summary table (best grid point per method, time and
oracle calls to a common target), ``comparison.md``, ``curves.json`` and the plots."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import TYPE_CHECKING

import jax
import numpy as np

from experiments.nhgd.registry import METHODS, ORACLES, SKIP_REASONS, VARIANTS

if TYPE_CHECKING:  # annotations only: compare imports this module
    from experiments.nhgd.compare import CompareConfig, Unit
    from experiments.nhgd.task import Task

PENDING, DONE, SKIPPED = 0, 1, 2  # a unit's status in the comparison's state


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def mean_finite(values) -> float | None:
    """The mean of the finite entries, None if there are none."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def best_units(state, units: list[Unit]) -> dict[str, int | None]:
    """Per method, the finished unit with the lowest final val_loss (NaN: +inf); None if
    none finished."""
    final = np.nan_to_num(np.asarray(state["metrics"])[:, -1, 0], nan=np.inf)
    best = {}
    for m in dict.fromkeys(u.method for u in units):
        idx = [i for i, u in enumerate(units) if u.method == m and state["status"][i] == DONE]
        best[m] = min(idx, key=lambda i: final[i]) if idx else None
    return best


def first_reach(values, target: float) -> int | None:
    """The first index with ``values <= target`` (NaN never reaches), or None."""
    hit = np.flatnonzero(np.nan_to_num(np.asarray(values, np.float64), nan=np.inf) <= target)
    return int(hit[0]) if hit.size else None


def target_loss(cfg: CompareConfig, finals: dict[str, float]) -> float | None:
    """The target validation loss (module docstring) from the best final losses."""
    if cfg.target == "value":
        return float(cfg.target_value)
    reached = [v for v in finals.values() if math.isfinite(v)]
    return max(reached) if reached else None


def summarize(state, units, metric_names, task: Task, cfg: CompareConfig) -> dict:
    metrics = np.asarray(state["metrics"])
    times, cos = np.asarray(state["time"]), np.asarray(state["cosine"])
    total = np.asarray(state["oracles"]).sum(axis=-1)
    best = best_units(state, units)
    finals = {m: float(metrics[i, -1, 0]) for m, i in best.items() if i is not None}
    target = target_loss(cfg, finals)
    rows = []
    for m, i in best.items():
        row = {"method": m, "label": VARIANTS[m].label}
        if i is None:
            codes = [int(state["skip"][j]) for j, u in enumerate(units) if u.method == m]
            row["status"] = SKIP_REASONS.get(max(codes), "not run")
            rows.append(row)
            continue
        u = units[i]
        hit = None if target is None else first_reach(metrics[i, :, 0], target)
        row.update(
            status="ok",
            unit=i,
            best={"inner_lr": u.lr, VARIANTS[m].knob: u.knob},
            best_setting=u.setting(),
            final={k: _finite(metrics[i, -1, j]) for j, k in enumerate(metric_names)},
            run_time_s=float(times[i, -1]),
            oracles={k: int(state["oracles"][i, -1, j]) for j, k in enumerate(ORACLES)},
            time_to_target_s=None if hit is None else float(times[i, hit]),
            oracles_to_target=None if hit is None else int(total[i, hit]),
            outer_steps_to_target=None if hit is None else hit * cfg.eval_every,
            mean_cosine=mean_finite(cos[i, 1:]),
        )
        rows.append(row)
    ref = next((r for r in rows if r["method"] == "nhgd_dense" and r["status"] == "ok"), None)
    for r in rows:
        ok = r["status"] == "ok" and ref is not None and ref["time_to_target_s"]
        r["time_ratio_to_nhgd_dense"] = (
            r["time_to_target_s"] / ref["time_to_target_s"]
            if ok and r["time_to_target_s"] is not None
            else None
        )
    return {
        "task": task.name,
        "primary": task.primary,
        "metrics": list(metric_names),
        "target": cfg.target,
        "target_val_loss": target,
        "selection": "best grid point per method = lowest final val_loss",
        "outer_steps": cfg.outer_steps,
        "eval_every": cfg.eval_every,
        "inner_steps": cfg.inner_steps,
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "load_average": [mean_finite(state["load"]), _finite(np.nanmax(state["load"]))]
        if np.isfinite(state["load"]).any()
        else None,
        "grids": {
            m: {"inner_lr": list(cfg.inner_lrs), VARIANTS[m].knob: list(grid_of(cfg, m))}
            for m in cfg.methods
        },
        "table": rows,
    }


def grid_of(cfg: CompareConfig, method: str) -> tuple:
    return getattr(cfg, VARIANTS[method].grid)


def fmt(x, spec: str = ".4g") -> str:
    return "–" if x is None else format(x, spec)


def markdown(summary: dict, cfg: CompareConfig) -> str:
    """``comparison.md``: the table, the rules, the grids."""
    primary = summary["primary"]
    extras = [k for k in summary["metrics"] if k not in ("val_loss", primary)]
    rule = (
        "the largest of the methods' best final validation losses"
        if cfg.target == "worst_best"
        else "compare.target_value"
    )
    soba = f"; SOBA: {cfg.inner_steps} iterations per outer step" + (
        f", outer lr {cfg.outer_lr / cfg.inner_steps:g}" if cfg.soba_scale_outer_lr else ""
    )
    lines = [
        f"# NHGD comparison: {summary['task']}",
        "",
        f"{cfg.outer_steps} outer steps per run ({cfg.inner_steps} inner SGD steps each"
        f"{soba}), evaluated every {cfg.eval_every}; outer optimizer {cfg.outer_optimizer} "
        f"(lr {cfg.outer_lr:g}) for every method. Best grid point per method = lowest final "
        f"val_loss. Target val_loss = {fmt(summary['target_val_loss'])} ({rule}). Times: "
        "wall-clock seconds of the jitted outer steps (compilation and evaluation excluded) "
        f"on {len(summary['devices'])} device(s) ({summary['devices'][0]}). Cosine: the last "
        "hypergradient against the exact implicit one, mean over evaluation points.",
        "",
    ]
    head = [
        "method",
        "best setting",
        "final val loss",
        primary,
        *extras,
        "time to target (s)",
        "oracles to target",
        "time / nhgd_dense",
        "mean cosine",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["table"]:
        if r["status"] != "ok":
            cells = [r["method"], r["status"], *[""] * (len(head) - 2)]
        else:
            f = r["final"]
            cells = [
                r["method"],
                r["best_setting"],
                fmt(f["val_loss"]),
                fmt(f[primary], ".4f"),
                *[fmt(f[k], ".4f") for k in extras],
                fmt(r["time_to_target_s"], ".3f"),
                fmt(r["oracles_to_target"], "d"),
                fmt(r["time_ratio_to_nhgd_dense"], ".2f"),
                fmt(r["mean_cosine"], ".3f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Grids (shared inner lr × one knob per method)",
        "",
        f"- inner lr (every method): {list(cfg.inner_lrs)}",
    ]
    for m in cfg.methods:
        lines.append(f"- {m}: {VARIANTS[m].knob} ∈ {list(grid_of(cfg, m))}")
    lines += [
        f"- fixed: linear_steps {cfg.linear_steps}, nhgd_damping {cfg.nhgd_damping:g}, "
        f"nhgd_dense_samples {cfg.nhgd_dense_samples}, nhgd_dense_inverse "
        f"{cfg.nhgd_dense_inverse}, nhgd_reset {cfg.nhgd_reset}, "
        f"cg_tol {cfg.cg_tol:g}, cg_ridge {cfg.cg_ridge:g}, seed {cfg.seed}, "
        f"timing_repeats {cfg.timing_repeats}",
        "",
    ]
    load = summary.get("load_average")
    if load is not None:
        lines[2] += (
            f" Machine: {summary['cpu_count']} CPU cores, 1-minute load average after the "
            f"units: mean {load[0]:.2f}, max {load[1]:.2f} (above the core count, other "
            "processes competed for the cores and the times are noisy)."
        )
    return "\n".join(lines)


def _units_table(summary, state, units, metric_names) -> str:
    head = ["method", "setting", *metric_names, "run time (s)", "oracles", "mean cosine"]
    lines = ["## Every grid point (final values)", "", "| " + " | ".join(head) + " |"]
    lines.append("|" + "---|" * len(head))
    for i, u in enumerate(units):
        if state["status"][i] != DONE:
            reason = SKIP_REASONS.get(int(state["skip"][i]), "not run")
            lines.append("| " + " | ".join([u.method, u.setting(), reason]) + " |")
            continue
        cells = [
            u.method,
            u.setting(),
            *[fmt(_finite(state["metrics"][i, -1, j])) for j in range(len(metric_names))],
            fmt(float(state["time"][i, -1]), ".3f"),
            str(int(state["oracles"][i, -1].sum())),
            fmt(mean_finite(state["cosine"][i, 1:]), ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _none_nan(values) -> list:
    return [None if not math.isfinite(float(v)) else float(v) for v in np.asarray(values)]


def curves(state, units, metric_names, cfg: CompareConfig) -> list[dict]:
    """Every unit's curves (JSON-ready; NaN as null)."""
    steps = list(range(0, cfg.outer_steps + 1, cfg.eval_every))
    out = []
    for i, u in enumerate(units):
        status = int(state["status"][i])
        item = {
            "unit": i,
            "method": u.method,
            "inner_lr": u.lr,
            VARIANTS[u.method].knob: u.knob,
            "status": {PENDING: "pending", DONE: "done", SKIPPED: "skipped"}[status],
        }
        if status == SKIPPED:
            item["reason"] = SKIP_REASONS[int(state["skip"][i])]
        if status == DONE:
            oracles = np.asarray(state["oracles"][i])
            item.update(
                outer_step=steps,
                time_s=_none_nan(state["time"][i]),
                oracles={k: oracles[:, j].tolist() for j, k in enumerate(ORACLES)}
                | {"total": oracles.sum(axis=1).tolist()},
                metrics={
                    k: _none_nan(state["metrics"][i, :, j]) for j, k in enumerate(metric_names)
                },
                cosine=_none_nan(state["cosine"][i]),
                reference_residual=_none_nan(state["residual"][i]),
                compile_s=float(state["compile_s"][i]),
                eval_s=float(state["eval_s"][i]),
                load_average=_finite(state["load"][i]),
            )
        out.append(item)
    return out


def write_outputs(rundir, summary, state, units, metric_names, task, cfg) -> None:
    text = markdown(summary, cfg) + "\n" + _units_table(summary, state, units, metric_names)
    (rundir.path / "comparison.md").write_text(text)
    data = {
        "task": task.name,
        "config": dataclasses.asdict(cfg),
        "target_val_loss": summary["target_val_loss"],
        "best_unit": {r["method"]: r.get("unit") for r in summary["table"]},
        "units": curves(state, units, metric_names, cfg),
    }
    (rundir.path / "curves.json").write_text(json.dumps(data, indent=1) + "\n")
    write_plots(rundir.plots, summary, state, metric_names, cfg)


def write_plots(folder, summary, state, metric_names, cfg: CompareConfig) -> None:
    from experiments import plots

    best = {r["method"]: r["unit"] for r in summary["table"] if r["status"] == "ok"}
    metrics, times = np.asarray(state["metrics"]), np.asarray(state["time"])
    total = np.asarray(state["oracles"]).sum(axis=-1)
    steps = np.arange(0, cfg.outer_steps + 1, cfg.eval_every)
    target = summary["target_val_loss"]
    primary = summary["primary"]
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    style = {m: "--" if m.endswith("_parallel") else "-" for m in METHODS}

    def figure(name, x_of, y_of, xlabel, ylabel, hline=None, symlogx=False):
        fig, ax = plots.subplots(figsize=(7, 4.5))
        for m, i in best.items():
            label = VARIANTS[m].label
            ax.plot(x_of(i), y_of(i), style[m], color=colors[m], marker=".", label=label)
        if hline is not None:
            ax.axhline(hline, color="k", lw=0.8, ls=":", label="target")
        positive = [x for i in best.values() for x in np.asarray(x_of(i)) if x > 0]
        if symlogx and positive:  # times span orders of magnitude between methods
            ax.set_xscale("symlog", linthresh=min(positive))
            ax.set_xlim(left=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{summary['task']} (best grid point per method)", fontsize="medium")
        ax.grid(alpha=0.3)
        if best:
            ax.legend(fontsize="x-small")
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)

    j = metric_names.index(primary)
    figure(
        "val_loss_time.png",
        lambda i: times[i],
        lambda i: metrics[i, :, 0],
        "wall-clock time (s, compile excluded; symlog)",
        "validation loss",
        target,
        symlogx=True,
    )
    figure(
        "val_loss_oracles.png",
        lambda i: total[i],
        lambda i: metrics[i, :, 0],
        "oracle calls (gradients + HVPs + mixed + outer)",
        "validation loss",
        target,
    )
    figure(
        f"{primary}_time.png",
        lambda i: times[i],
        lambda i: metrics[i, :, j],
        "wall-clock time (s, compile excluded; symlog)",
        primary,
        symlogx=True,
    )
    figure(
        "cosine.png",
        lambda i: steps[1:],
        lambda i: np.asarray(state["cosine"])[i, 1:],
        "outer step",
        "cosine with the exact hypergradient",
    )

    rows = [r for r in summary["table"] if r["status"] == "ok"]
    fig, ax = plots.subplots(figsize=(7, 4))
    x = np.arange(len(rows))
    values = [r["time_to_target_s"] if r["time_to_target_s"] is not None else 0 for r in rows]
    ax.bar(x, values, color=[colors[r["method"]] for r in rows])
    for xi, r in zip(x, rows):
        if r["time_to_target_s"] is None:
            ax.text(xi, 0, "not\nreached", ha="center", va="bottom", fontsize="x-small")
    ax.set_xticks(x, [VARIANTS[r["method"]].label for r in rows], rotation=30, ha="right")
    ax.set_ylabel("time to target val loss (s)")
    ax.set_title(f"{summary['task']}: target val loss {fmt(target)}", fontsize="medium")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(folder / "time_to_target.png", dpi=110)
