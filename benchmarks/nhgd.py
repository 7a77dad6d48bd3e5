"""NHGD against the stochastic bilevel baselines: time to a target validation loss, and the
critical path of the fused and the parallel (two-device) Fisher update.

What it measures, in one process, with every timed function jitted and compilation
excluded (a warm-up call first; each timed call ends with ``block_until_ready``):

1. Hyper-cleaning on digits (the ``nhgd_hyper_cleaning`` experiment's task: per-sample
   weights σ(v_i), 50% of training labels resampled, linear softmax classifier): every
   method at one setting runs the same number of outer steps in jitted chunks; the
   validation loss is evaluated between chunks (not timed). The target is the level every
   method reaches (the worst of the methods' best validation losses); each method's time
   and oracle calls to first reach it, as ratios to NHGD (dense Fisher, fused).
2. Critical path, per inner step, on two devices (two forced host devices on CPU): the
   SGD step alone, the Fisher-inverse update alone, NHGD's fused loop, and the parallel
   loop (the Fisher update on the second device, pipelined). Fused ≈ gradient + update,
   parallel ≈ max(gradient, update) + the transfer; on CPU host "devices" share the same
   cores, so the parallel gain is bounded by the cores, not by the model.

Nothing is asserted; it writes ``benchmarks/results/nhgd.json`` and ``nhgd.md``.

Run:  python benchmarks/nhgd.py            # a few minutes on 2 cores
      python benchmarks/nhgd.py --quick    # smoke test: fewer steps and repeats
      --out DIR writes the results there instead.
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Two CPU devices for the parallel variant: must be set before JAX starts.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the experiments package, when run as a script

import hypergrad_jax as hg  # noqa: E402
from benchmarks.estimators import machine  # noqa: E402
from hypergrad_jax import stochastic as st  # noqa: E402
from hypergrad_jax.fisher import DenseFisher, KFACFisher  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, args, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of a jitted ``fn`` after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- critical path


def critical_path(task, fishers: dict, num_steps: int, lr: float, repeats: int) -> list[dict]:
    """Per-inner-step seconds of each piece of NHGD's inner loop, fused and parallel."""
    problem, hparams, params, sampler = task.problem, task.hparams, task.params, task.inner_data
    key = jax.random.key(0)
    steps = jnp.arange(num_steps, dtype=jnp.int32)
    rows = []
    for name, fisher in fishers.items():
        method = st.NHGD(fisher, sample_weights=task.sample_weights)
        run = hg.InnerRun(hg.optim.sgd(), num_steps, lambda h: {"lr": lr})
        parallel = method._replace(parallel=True)
        state0 = fisher.init(params)
        _, samples = method.samples(problem, hparams, params, hg.data.batch_at(sampler, key, 0))

        @jax.jit
        def sgd_only(params, m=method):
            def body(p, t):
                grad, _ = m.samples(problem, hparams, p, hg.data.batch_at(sampler, key, t))
                return optax.tree.add_scale(p, -lr, grad), None

            return jax.lax.scan(body, params, steps)[0]

        @jax.jit
        def update_only(state, samples, m=method):
            def body(s, t):  # samples vary with t: XLA must not hoist their products
                scaled = jax.tree.map(lambda x: x * (1 + 1e-6 * t).astype(x.dtype), samples)
                return m.fisher.update(s, *scaled), None

            return jax.lax.scan(body, state, steps)[0]

        variants = (("fused", method), ("parallel", parallel))
        if jax.device_count() < 2:  # e.g. one GPU: the fused loop only
            variants = variants[:1]
        loops = {
            variant: jax.jit(
                lambda p, s, m=m: m.inner_loop(problem, run, hparams, p, s, sampler, key)
            )
            for variant, m in variants
        }
        row = {
            "fisher": name,
            "params": int(sum(x.size for x in jax.tree.leaves(params))),
            "sgd_step_s": timed(sgd_only, (params,), repeats) / num_steps,
            "fisher_update_s": timed(update_only, (state0, samples), repeats) / num_steps,
        }
        for variant, fn in loops.items():
            row[f"{variant}_s"] = timed(fn, (params, state0), repeats) / num_steps
        row.setdefault("parallel_s", None)
        row.update(max_abs_diff=None, parallel_over_fused=None)
        if "parallel" in loops:
            fused, par = loops["fused"](params, state0), loops["parallel"](params, state0)
            row["max_abs_diff"] = max(
                float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(par))
            )
            row["parallel_over_fused"] = row["parallel_s"] / row["fused_s"]
        rows.append(row)
        print(
            f"{name:>16}: sgd {row['sgd_step_s'] * 1e3:.3f} ms, update "
            f"{row['fisher_update_s'] * 1e3:.3f} ms, fused {row['fused_s'] * 1e3:.3f} ms, "
            f"parallel {_ms(row['parallel_s'])} ms per step"
        )
    return rows


# ----------------------------------------------------------------------------- time to target

# The settings each method is benchmarked at, as (inner lr, knob): by default the best grid
# points of a `nhgd_hyper_cleaning` run's summary.json (--settings), else these.
SETTINGS = {
    "nhgd_dense": (0.3, 0.99),
    "nhgd_kfac": (0.3, 0.99),
    "nhgd_dense_parallel": (0.3, 0.99),
    "nhgd_kfac_parallel": (0.3, 0.9),
    "stocbio": (0.3, 0.3),
    "amigo": (0.3, 0.3),
    "soba": (0.3, 0.3),
    "cg": (0.3, 10),
    "neumann": (0.3, 0.3),
}


def hyper_cleaning(preset: str | None, overrides: list[str]):
    """The ``nhgd_hyper_cleaning`` experiment's config (at ``preset``) and its task."""
    from experiments import config as cfg_lib
    from experiments.nhgd.hyper_cleaning import Config, make_task

    source = ROOT / "configs" / "nhgd_hyper_cleaning.yaml"
    data = cfg_lib.resolve(cfg_lib.load_yaml(source), str(source), preset, overrides)
    cfg = cfg_lib.from_dict(Config, data, str(source))
    return cfg, make_task(cfg)[0]


def settings_from(summary_path: Path) -> dict:
    """The best grid point of every method that ran, from a comparison's summary.json."""
    table = json.loads(summary_path.read_text())["table"]
    out = {}
    for row in table:
        if row.get("status") == "ok" and row["method"] in SETTINGS:
            lr, knob = row["best"].values()
            out[row["method"]] = (lr, knob)
    return out


def time_to_target(preset: str | None, overrides: list[str], repeats: int) -> dict:
    """Every method of :data:`SETTINGS` on the hyper-cleaning task, ``repeats`` paired runs
    (seeds 0..repeats−1) each; per run the time and oracle calls to the target."""
    from experiments.nhgd import compare

    cfg, task = hyper_cleaning(preset, overrides)
    methods = [m for m in SETTINGS if compare.skip_code(m, task) == 0]
    runs = {m: [] for m in methods}
    for seed in range(repeats):
        ccfg = dataclasses.replace(cfg.compare, methods=tuple(methods), seed=seed)
        runner = compare.Runner(task, ccfg)
        for m in methods:
            result = compare.run_unit(runner, compare.Unit(m, *SETTINGS[m]))
            runs[m].append(result)
            print(
                f"seed {seed} {m:>20}: final val loss {result['metrics'][-1, 0]:.4f} "
                f"in {result['time'][-1]:.2f} s"
            )
    # Target: the level every method reaches in every run (the worst of the best).
    finals = [float(np.nanmin(r["metrics"][:, 0])) for rs in runs.values() for r in rs]
    target = max(finals)
    rows = []
    for m, results in runs.items():
        hits = [compare.first_reach(r["metrics"][:, 0], target) for r in results]
        times = [float(r["time"][h]) for r, h in zip(results, hits)]
        calls = [int(r["oracles"][h].sum()) for r, h in zip(results, hits)]
        rows.append(
            {
                "method": m,
                "setting": {"inner_lr": SETTINGS[m][0], compare.VARIANTS[m].knob: SETTINGS[m][1]},
                "time_to_target_s": times,
                "oracles_to_target": calls,
                "final_val_loss": [float(r["metrics"][-1, 0]) for r in results],
                "final_test_acc": [float(r["metrics"][-1, 1]) for r in results],
                "run_time_s": [float(r["time"][-1]) for r in results],
            }
        )
    ref = next(r for r in rows if r["method"] == "nhgd_dense")
    for r in rows:
        r["time_ratio"] = statistics.median(
            a / b for a, b in zip(r["time_to_target_s"], ref["time_to_target_s"])
        )
        r["oracle_ratio"] = statistics.median(
            a / b for a, b in zip(r["oracles_to_target"], ref["oracles_to_target"])
        )
    return {
        "task": task.name,
        "preset": preset,
        "overrides": overrides,
        "outer_steps": cfg.compare.outer_steps,
        "eval_every": cfg.compare.eval_every,
        "inner_steps": cfg.compare.inner_steps,
        "repeats": repeats,
        "target_val_loss": target,
        "rows": rows,
    }


# ----------------------------------------------------------------------------- report


def _ms(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.3f}"


def markdown(info: dict, ttt: dict, paths: list[dict], elapsed: float, quick: bool) -> str:
    m = info
    lines = [
        "# NHGD against stochastic bilevel baselines",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, jax {m['jax']} ({m['backend']}, "
        f"{jax.device_count()} devices), Python {m['python']}; {m['date']}; 1-minute load "
        f"average at start {m['load_average_at_start']:.2f}. Command: "
        f"`python benchmarks/nhgd.py{' --quick' if quick else ''}` ({elapsed:.0f} s).",
        "",
        f"## Time to a target validation loss: {ttt['task']}",
        "",
        f"{ttt['outer_steps']} outer steps of {ttt['inner_steps']} inner SGD steps, evaluated "
        f"every {ttt['eval_every']}; {ttt['repeats']} paired runs (minibatch seeds) per method; "
        f"target validation loss {ttt['target_val_loss']:.4f} (the worst of the runs' best). "
        "Ratios are medians over the seeds of method / NHGD (dense, fused); > 1: slower "
        "than NHGD. Time excludes compilation and evaluation.",
        "",
        "| method | setting | time to target (s) | ratio | oracle calls to target | ratio "
        "| final val loss | final test acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ttt["rows"]:
        setting = ", ".join(f"{k}={v:g}" for k, v in r["setting"].items())
        lines.append(
            f"| {r['method']} | {setting} | "
            f"{statistics.median(r['time_to_target_s']):.3f} | {r['time_ratio']:.2f} | "
            f"{statistics.median(r['oracles_to_target']):.0f} | {r['oracle_ratio']:.2f} | "
            f"{statistics.median(r['final_val_loss']):.4f} | "
            f"{statistics.median(r['final_test_acc']):.3f} |"
        )
    lines += [
        "",
        "## Critical path per inner step: fused vs parallel Fisher update",
        "",
        "Fused: one device does the SGD step and the Fisher update. Parallel: the update runs "
        "on a second device, pipelined one step behind (`NHGD(parallel=True)`). "
        "`max |diff|` compares their end points and Fisher states (float32; the online "
        "per-sample inverse is ill-conditioned here, so a different fusion's rounding grows; "
        "in float64 the two agree to rounding, tests/test_parallel.py).",
        "",
        "| Fisher | params | SGD step (ms) | Fisher update (ms) | fused loop (ms/step) "
        "| parallel loop (ms/step) | parallel / fused | max diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in paths:
        ratio, diff = r["parallel_over_fused"], r["max_abs_diff"]
        lines.append(
            f"| {r['fisher']} | {r['params']} | {r['sgd_step_s'] * 1e3:.3f} | "
            f"{r['fisher_update_s'] * 1e3:.3f} | {r['fused_s'] * 1e3:.3f} | "
            f"{_ms(r['parallel_s'])} | {'n/a' if ratio is None else f'{ratio:.2f}'} | "
            f"{'n/a' if diff is None else f'{diff:.1e}'} |"
        )
    if any(r["parallel_s"] is None for r in paths):
        lines += ["", "n/a: one device only, so the parallel variant did not run."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, one repeat")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"output folder (default {RESULTS})"
    )
    parser.add_argument(
        "--settings",
        type=Path,
        default=RESULTS.parent.parent
        / "experiments/results/nhgd_hyper_cleaning_digits/summary.json",
        help="a nhgd_hyper_cleaning summary.json whose best grid points to use",
    )
    args = parser.parse_args()
    if args.settings.is_file() and not args.quick:
        SETTINGS.update(settings_from(args.settings))
    start = time.perf_counter()
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, jax {info['jax']} ({info['backend']})")
    if args.quick:
        ttt = time_to_target("tiny", [], repeats=1)
        path_steps, path_repeats = 10, 2
    else:
        ttt = time_to_target(None, [], repeats=3)
        path_steps, path_repeats = 100, 5
    _, task = hyper_cleaning("tiny" if args.quick else None, [])
    fishers = {  # the paper's rank-1 online inverse; the experiments' dense and K-FAC ones
        "dense rank-1 online": DenseFisher(samples="mean"),
        "dense per-sample solve": DenseFisher(samples="woodbury", inverse="solve"),
        "dense per-sample online": DenseFisher(samples="woodbury"),
        "kfac": KFACFisher(task.kfac_layers),
    }
    lr = SETTINGS["nhgd_dense"][0]
    paths = critical_path(task, fishers, path_steps, lr, path_repeats)
    elapsed = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": info,
        "quick": args.quick,
        "elapsed_s": elapsed,
        "time_to_target": ttt,
        "critical_path": paths,
    }
    (args.out / "nhgd.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "nhgd.md").write_text(markdown(info, ttt, paths, elapsed, args.quick))
    print(f"wrote {args.out}/nhgd.{{json,md}} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
