"""Hypergradient estimators side by side: time per hypergradient and compiled peak memory.

What it measures, in one process, on one small problem (an MLP 64 -> 32 -> 10 on sklearn's
``load_digits``, 1000 train / 400 validation examples):

1. Horizons T in {100, 1000, 10000} of minibatch SGD with momentum, with 12 hyperparameters
   (a 10-block shared learning-rate schedule, momentum, weight decay): the time of one
   hypergradient by ``Unrolled()``, ``Unrolled(remat=True)`` and ``Forward()``, the time of a
   plain training run of the same T, and XLA's compiled memory analysis of each jitted
   function (temporaries; arguments + outputs + temporaries).
2. ``Implicit(CG)`` against ``jaxopt.implicit_diff.custom_root`` with the same CG settings, on a
   full-batch inner loss with a per-layer L2 penalty (the log-coefficients are the
   hyperparameters), trained long enough for the implicit function theorem to apply.

Every timed function is jitted; compilation is excluded (a warm-up call, then the median of
a few calls, each ended by ``block_until_ready``). Nothing is asserted: it measures and writes
``benchmarks/results/estimators.json`` and ``benchmarks/results/estimators.md``.

Run:  python benchmarks/estimators.py           # full (T up to 10000), a few minutes on 2 cores
      python benchmarks/estimators.py --quick   # T in {100, 1000}, fewer repeats: a smoke test
      --out DIR writes the results there instead (e.g. a smoke test that should not overwrite
      the committed full-run numbers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from sklearn.datasets import load_digits

import hypergrad_jax as hg
from experiments import common

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 128
HIDDEN = 32
CLASSIFIER = common.Classifier(common.MLP(10, (HIDDEN,)))  # a flax MLP: 64 -> 32 -> 10
LAYERS = ("Dense_0", "Dense_1")
MIB = 2**20
L2 = 3e-2  # the implicit comparison's L2 coefficient: strong enough for a PD Hessian

# ----------------------------------------------------------------------------- problem


def load_data(seed: int = 0, n_train: int = 1000, n_val: int = 400):
    """Standardised digits (train statistics), a seeded train/validation split."""
    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    tr, va = perm[:n_train], perm[n_train : n_train + n_val]
    mean, std = x[tr].mean(0), x[tr].std(0)
    x = (x - mean) / np.where(std > 0, std, 1.0)

    def split(idx):
        return {"x": jnp.asarray(x[idx], jnp.float32), "y": jnp.asarray(y[idx], jnp.int32)}

    return split(tr), split(va)


def make_sampler(train):
    """A jittable ``(key, step) -> batch`` drawing BATCH examples with replacement."""

    def sample(key, step):
        del step
        idx = jax.random.randint(key, (BATCH,), 0, train["y"].shape[0])
        return jax.tree.map(lambda a: a[idx], train)

    return sample


# The horizon benchmark: the hyperparameters are those of the optimizer (read by InnerRun).
SCHEDULE_PROBLEM = CLASSIFIER.problem()


def schedule_hparams():
    return {
        "optimizer": {
            "lr": hg.Shared(jnp.full(10, 0.05, jnp.float32)),
            "momentum": jnp.asarray(0.9, jnp.float32),
            "weight_decay": jnp.asarray(1e-4, jnp.float32),
        }
    }


def l2_inner_loss(params, hparams, batch):
    """Cross-entropy plus ``exp(log_l2[layer]) / 2 * ||layer||²`` on every parameter."""
    penalty = sum(
        jnp.exp(hparams["log_l2"][layer]) * common.sq_norm(params[layer]) for layer in LAYERS
    )
    return CLASSIFIER.loss(params, batch) + 0.5 * penalty


L2_PROBLEM = hg.BilevelProblem(
    inner_loss=l2_inner_loss, outer_loss=lambda p, h, b: CLASSIFIER.loss(p, b)
)

# ----------------------------------------------------------------------------- measuring


def tree_rel_diff(a, b) -> float:
    """``max|a - b| / max|b|`` over all leaves."""
    a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def compile_all(jobs) -> list[tuple]:
    """``jit(fn).lower(*args).compile()`` for each ``(fn, args)``, as many at a time as there
    are cores (XLA's CPU compiler is single-threaded, and compiling dominates short runs);
    returns ``(compiled, seconds)`` pairs."""

    def compile_one(job):
        fn, args = job
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        return compiled, time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(compile_one, jobs))


def measure(compiled: list, args, repeats: int) -> list[tuple[dict, object]]:
    """For each compiled function: one warm-up call, then the median time of ``repeats``
    calls, and the memory analysis. The calls are interleaved (one round calls every
    function once), so a change in the machine's load falls on every function alike and
    their ratios stay comparable."""
    outs = [jax.block_until_ready(exe(*args)) for exe, _ in compiled]
    times = [[] for _ in compiled]
    for _ in range(repeats):
        for (exe, _), record in zip(compiled, times, strict=True):
            t0 = time.perf_counter()
            jax.block_until_ready(exe(*args))
            record.append(time.perf_counter() - t0)
    results = []
    for (exe, compile_s), record, out in zip(compiled, times, outs, strict=True):
        row = {"time_s": statistics.median(record), "times_s": record, "compile_s": compile_s}
        mem = exe.memory_analysis()
        if mem is not None:
            row["temp_bytes"] = int(mem.temp_size_in_bytes)
            row["total_bytes"] = int(
                mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            )
        results.append((row, out))
    return results


ESTIMATORS = {
    "Unrolled()": hg.Unrolled(),
    "Unrolled(remat=True)": hg.Unrolled(remat=True),
    "Forward()": hg.Forward(),
}


def plain_run(run, hparams, params0, key, train, val):
    del val
    return hg.solve(
        SCHEDULE_PROBLEM, run, hg.Unrolled(), hparams, params0, make_sampler(train), key=key
    )


def schedule_hypergradient(run, estimator, hparams, params0, key, train, val):
    sampler = make_sampler(train)
    return hg.hypergradient(
        SCHEDULE_PROBLEM, run, estimator, hparams, params0, sampler, val, key=key
    )


def horizon_rows(horizons, repeats, train, val, params0, key) -> list[dict]:
    args = (schedule_hparams(), params0, key, train, val)
    cases = []  # (horizon, name, function)
    for horizon in horizons:
        run = hg.InnerRun(optimizer=hg.optim.sgd_momentum(), num_steps=horizon)
        cases.append((horizon, "plain run (no grad)", partial(plain_run, run)))
        cases += [
            (horizon, name, partial(schedule_hypergradient, run, est))
            for name, est in ESTIMATORS.items()
        ]
    print(f"compiling {len(cases)} functions ...", flush=True)
    compiled = compile_all([(fn, args) for _, _, fn in cases])
    measured = []
    for horizon in horizons:
        same = [i for i, case in enumerate(cases) if case[0] == horizon]
        measured += measure([compiled[i] for i in same], args, repeats[horizon])
    rows, base, reference = [], None, None
    for (horizon, name, _), (row, out) in zip(cases, measured, strict=True):
        row.update(T=horizon, estimator=name, repeats=repeats[horizon])
        if name.startswith("plain"):
            base, reference = row, None
        else:
            g, info = out
            reference = g if reference is None else reference
            row.update(
                rel_diff_vs_unrolled=tree_rel_diff(g, reference),
                status=hg.Status(int(info.status)).name,
                outer_value=float(info.outer_value),
            )
        row["ratio"] = row["time_s"] / base["time_s"]
        rows.append(row)
        print(
            f"T={horizon:>6} {name:<22} {row['time_s']:8.3f} s  x{row['ratio']:6.2f} plain  "
            f"temp {row.get('temp_bytes', 0) / MIB:8.2f} MiB  {row.get('status', '')}",
            flush=True,
        )
    return rows


def implicit_comparison(train, val, params0, steps, cg, repeats) -> dict:
    """Our ``Implicit(CG)`` against jaxopt's ``custom_root`` with the same CG settings."""
    hparams = {"log_l2": {layer: jnp.log(jnp.float32(L2)) for layer in LAYERS}}
    run = hg.InnerRun(
        optimizer=hg.optim.sgd_momentum(),
        num_steps=steps,
        optimizer_hparams=lambda h: {"lr": 1.0, "momentum": 0.9},
    )
    args = (hparams, params0, train, val)
    out = {"inner_steps": steps, "l2": L2, "cg": cg._asdict()}

    def plain(h, p0, train, val):
        return hg.solve(L2_PROBLEM, run, hg.Unrolled(), h, p0, train)

    def ours(h, p0, train, val):
        return hg.hypergradient(L2_PROBLEM, run, hg.Implicit(cg), h, p0, train, val)

    cases = {"plain": plain, "ours": ours}
    try:
        from jaxopt.implicit_diff import custom_root
        from jaxopt.linear_solve import solve_cg
    except ImportError as e:
        print(f"implicit: jaxopt not importable ({e}); skipping the jaxopt comparison", flush=True)
    else:

        def theirs(h, p0, train, val):
            def optimality(params, h):
                return jax.grad(l2_inner_loss)(params, h, train)

            solve = partial(solve_cg, maxiter=cg.maxiter, tol=cg.tol, ridge=cg.ridge)

            @custom_root(optimality, solve=solve)
            def inner_solver(p0, h):
                return hg.solve(L2_PROBLEM, run, hg.Unrolled(), h, p0, train)

            return jax.grad(lambda h: CLASSIFIER.loss(inner_solver(p0, h), val))(h)

        cases["jaxopt"] = theirs
    print(f"implicit: compiling {len(cases)} functions ...", flush=True)
    compiled = dict(zip(cases, compile_all([(fn, args) for fn in cases.values()]), strict=True))
    results = dict(zip(cases, measure(list(compiled.values()), args, repeats), strict=True))

    out["plain_run_s"] = results["plain"][0]["time_s"]
    row, (g_ours, info) = results["ours"]
    out.update(
        ours_s=row["time_s"],
        inner_residual=float(info.inner_residual),
        cg_iterations=int(info.solve.iterations),
        cg_residual=float(info.solve.residual),
        status=hg.Status(int(info.status)).name,
        grad_ours=jax.tree.map(float, g_ours),
    )
    print(
        f"implicit: plain {steps}-step run {out['plain_run_s']:.3f} s; ours {row['time_s']:.3f} s, "
        f"inner residual {out['inner_residual']:.2e}, CG {out['cg_iterations']} its, "
        f"residual {out['cg_residual']:.2e}, {out['status']}",
        flush=True,
    )
    out["jaxopt"] = "jaxopt" in results
    if out["jaxopt"]:
        row, g_jaxopt = results["jaxopt"]
        out.update(
            jaxopt_s=row["time_s"],
            ratio_ours_over_jaxopt=out["ours_s"] / row["time_s"],
            rel_diff=tree_rel_diff(g_ours, g_jaxopt),
            grad_jaxopt=jax.tree.map(float, g_jaxopt),
        )
        print(
            f"implicit: jaxopt {row['time_s']:.3f} s, ours/jaxopt "
            f"{out['ratio_ours_over_jaxopt']:.2f}, rel diff {out['rel_diff']:.2e}",
            flush=True,
        )
    return out


# ----------------------------------------------------------------------------- reporting


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_at_start": os.getloadavg()[0],  # > 0.5: something else was running
    }


def markdown(info: dict, rows: list[dict], imp: dict, elapsed: float, quick: bool) -> str:
    m = info
    lines = [
        "# Hypergradient estimators: time and memory",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, jax {m['jax']} ({m['backend']}), "
        f"Python {m['python']}; {m['date']}; 1-minute load average at start "
        f"{m['load_average_at_start']:.2f}. "
        f"Command: `python benchmarks/estimators.py{' --quick' if quick else ''}` "
        f"({elapsed:.0f} s in all).",
        "",
        "Problem: MLP 64 -> 32 -> 10 (tanh) on sklearn digits (1000 train / 400 validation, "
        f"standardised); inner loss: cross-entropy on minibatches of {BATCH} drawn by a jittable "
        "sampler; outer loss: validation cross-entropy; inner optimizer `sgd_momentum` with "
        "12 hyperparameters (a 10-block `Shared` learning-rate schedule, momentum, weight "
        "decay), float32.",
        "",
        "Time: median seconds per call of the jitted function, compilation excluded (one "
        "warm-up call first; the calls of one T interleaved, one round calling every function "
        "once, so a change in the machine's load falls on all alike); `x plain` divides by "
        "a plain training run of the same T "
        "(`hg.solve(..., Unrolled(), ...)` jitted, not differentiated). Memory: XLA's compiled "
        "memory analysis of the jitted function (`.lower(...).compile().memory_analysis()`), "
        "i.e. the buffers XLA plans statically, not a measured process RSS: *temp* is "
        "`temp_size_in_bytes` (scratch, including what reverse mode stores per step: each "
        "step's carry, parameters and momentum, since every step is rematerialised); "
        "*total* is arguments + outputs + temp (the arguments include the data: train "
        "0.25 MiB, and validation 0.1 MiB except in the plain run, which does not use it). "
        "`rel diff` is max|g - g_Unrolled| / max|g_Unrolled| "
        "(float32). Compile times are wall-clock with the functions compiled "
        f"{m['cores']} at a time in threads.",
        "",
        "| T | method | time (s) | x plain | temp (MiB) | total (MiB) | compile (s) "
        "| rel diff vs Unrolled | repeats |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        diff = r.get("rel_diff_vs_unrolled")
        lines.append(
            f"| {r['T']} | {r['estimator']} | {r['time_s']:.4f} | {r['ratio']:.2f} "
            f"| {r.get('temp_bytes', float('nan')) / MIB:.2f} "
            f"| {r.get('total_bytes', float('nan')) / MIB:.2f} | {r['compile_s']:.2f} "
            f"| {'' if diff is None else f'{diff:.1e}'} | {r['repeats']} |"
        )
    cg = imp["cg"]
    lines += [
        "",
        "## Implicit(CG) vs jaxopt `custom_root`",
        "",
        f"Full-batch inner loss (1000 examples) + per-layer L2 penalty `exp(log_l2)/2 ||θ||²` "
        f"(log_l2 = log {L2:g} for both layers: the 2 hyperparameters), {imp['inner_steps']} "
        "steps of `sgd_momentum` (lr 1.0, momentum 0.9). Both sides use CG with "
        f"maxiter={cg['maxiter']}, tol={cg['tol']}, ridge={cg['ridge']}; jaxopt differentiates "
        "`custom_root(grad of inner loss, solve=partial(solve_cg, ...))` wrapped around the "
        "same inner run with `jax.grad`. Times include the inner run.",
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| plain {imp['inner_steps']}-step run (s) | {imp['plain_run_s']:.4f} |",
        f"| ours: Implicit(CG) hypergradient (s) | {imp['ours_s']:.4f} |",
        f"| inner residual ‖∇θ g(θ_T)‖ | {imp['inner_residual']:.2e} |",
        f"| CG iterations / relative residual (ours) | {imp['cg_iterations']} / "
        f"{imp['cg_residual']:.1e} |",
        f"| status (ours) | {imp['status']} |",
    ]
    if imp.get("jaxopt"):
        lines += [
            f"| jaxopt custom_root hypergradient (s) | {imp['jaxopt_s']:.4f} |",
            f"| ratio ours / jaxopt | {imp['ratio_ours_over_jaxopt']:.2f} |",
            f"| differentiation overhead over the plain run (s): ours / jaxopt "
            f"| {imp['ours_s'] - imp['plain_run_s']:.4f} / "
            f"{imp['jaxopt_s'] - imp['plain_run_s']:.4f} |",
            f"| rel diff of hypergradients | {imp['rel_diff']:.1e} |",
        ]
    else:
        lines.append("| jaxopt | not installed: skipped |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T in {100, 1000}, fewer repeats")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"output folder (default {RESULTS})"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    if args.quick:
        horizons, repeats, imp_repeats = (100, 1000), {100: 3, 1000: 1}, 1
    else:
        horizons, repeats, imp_repeats = (100, 1000, 10000), {100: 10, 1000: 5, 10000: 3}, 5
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, jax {info['jax']} ({info['backend']})")

    train, val = load_data()
    params0 = CLASSIFIER.init(jax.random.key(0), 64, dtype=jnp.float32)
    key = jax.random.key(1)
    rows = horizon_rows(horizons, repeats, train, val, params0, key)
    cg = hg.CG(maxiter=300, tol=1e-5, ridge=1e-4)
    imp = implicit_comparison(train, val, params0, 2000, cg, imp_repeats)

    elapsed = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"machine": info, "quick": args.quick, "elapsed_s": elapsed, "horizons": rows}
    record["implicit"] = imp
    (args.out / "estimators.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "estimators.md").write_text(markdown(info, rows, imp, elapsed, args.quick))
    print(f"wrote {args.out}/estimators.{{json,md}} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
