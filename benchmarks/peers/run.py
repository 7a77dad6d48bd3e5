"""Peer comparison: hg.Unrolled() against PyTorch unrolls, hg.Implicit(CG) against jaxopt.

1. Unrolled: the horizon setting of ``benchmarks/estimators.py`` (MLP 64 -> 32 -> 10 on sklearn
   digits, ``T`` steps of minibatch SGD with momentum, 12 hyperparameters: a 10-block shared
   learning-rate schedule, momentum, weight decay), one hypergradient of the validation loss
   by ``hg.Unrolled()`` (jitted) and by PyTorch: a hand-written ``torch.autograd`` unroll,
   higher, TorchOpt and ``torch.func`` (``benchmarks/peers/unrolled_torch.py``). The
   minibatch rows of every step are drawn by the JAX sampler and fed to PyTorch, so both
   sides compute the same number; their agreement is recorded. The sides are timed
   interleaved in one process (round r runs every method once, in an order rotated by r),
   with the same number of intra-op threads on both sides (`--threads`, default 1).
   JAX's compile time is reported separately; every method gets one untimed warm-up call.
2. Implicit: ``benchmarks.estimators.implicit_comparison`` (``Implicit(CG)`` against jaxopt's
   ``custom_root`` with the same CG settings).

Libraries that are not installed (the default install has no torch, higher or TorchOpt: they
are the optional ``peers`` extra) are skipped with a note. Nothing is asserted.

Run:  python benchmarks/peers/run.py            # T in {100, 1000}, ~2 minutes on 2 cores
      python benchmarks/peers/run.py --quick    # T = 100, few repeats: a smoke test
      --out DIR writes DIR/peers.{json,md} (default benchmarks/results); --threads N sets
      the intra-op threads of both XLA and torch (default 1).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
PARSER = argparse.ArgumentParser(description=__doc__.splitlines()[0])
PARSER.add_argument("--quick", action="store_true", help="T = 100, few repeats")
PARSER.add_argument("--out", type=Path, default=RESULTS, help=f"output folder (default {RESULTS})")
PARSER.add_argument(
    "--threads",
    type=int,
    default=1,
    help="intra-op threads of both XLA and torch (default 1: at these sizes neither side "
    "gains from a second thread, and torch's spinning OpenMP workers stall on a shared core)",
)


def xla_thread_flags(threads: int) -> str:
    """XLA's CPU flags for an intra-op pool of ``threads`` (1: no Eigen pool at all)."""
    eigen = "true" if threads > 1 else "false"
    return f"--xla_cpu_multi_thread_eigen={eigen} intra_op_parallelism_threads={threads}"


if __name__ == "__main__":  # XLA reads its flags when JAX starts: before the import below
    _threads = PARSER.parse_args().threads
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " " + xla_thread_flags(_threads)
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(ROOT))  # the benchmarks and experiments packages, when run as a script

import hypergrad_jax as hg  # noqa: E402
from benchmarks.estimators import (  # noqa: E402
    BATCH,
    CLASSIFIER,
    compile_all,
    implicit_comparison,
    load_data,
    machine,
    make_sampler,
    schedule_hparams,
    schedule_hypergradient,
)
from hypergrad_jax.data import batch_at  # noqa: E402

OURS = "hg.Unrolled() (JAX)"


def load_torch() -> tuple[object | None, dict[str, str]]:
    """The PyTorch side, or None, and ``{library: version or why not importable}``."""
    try:
        from benchmarks.peers import unrolled_torch
    except ImportError as e:
        reason = f"not importable: {type(e).__name__}: {e}"
        others = dict.fromkeys(("higher", "torchopt"), "not run (needs torch)")
        return None, {"torch": reason, **others}
    return unrolled_torch, unrolled_torch.available()


def importable(version: str) -> bool:
    return not version.startswith(("not importable", "not run"))


def batch_indices(key, num_steps: int, n: int) -> np.ndarray:
    """``[T, BATCH]`` rows: what ``make_sampler`` picks at each step of an inner run (the
    sampler applied to the row numbers themselves, at ``batch_at``'s per-step key)."""
    sampler = make_sampler({"y": jnp.arange(n, dtype=jnp.int32)})
    steps = jnp.arange(num_steps, dtype=jnp.int32)
    return np.asarray(jax.vmap(lambda t: batch_at(sampler, key, t)["y"])(steps))


def hparam_vector(g) -> np.ndarray:
    """``[α_0 .. α_9, β, ξ]`` of a hypergradient with ``schedule_hparams()``'s structure."""
    opt = g["optimizer"]
    parts = [opt["lr"].values, opt["momentum"], opt["weight_decay"]]
    return np.concatenate([np.asarray(p, np.float64).reshape(-1) for p in parts])


def spread(times: list[float]) -> dict:
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return {
        "median_s": statistics.median(times),
        "q1_s": q1,
        "q3_s": q3,
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
    }


def interleaved(calls: dict, rounds: int) -> dict[str, list[float]]:
    """Round r times every call once, starting at the (r mod k)-th: no method always runs
    first or after the same neighbour."""
    names = list(calls)
    times = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def unrolled_rows(horizons, rounds, train, val, params0, key, torch_side, libs) -> list[dict]:
    hparams = schedule_hparams()
    args = (hparams, params0, key, train, val)
    jobs = []
    for horizon in horizons:
        run = hg.InnerRun(optimizer=hg.optim.sgd_momentum(), num_steps=horizon)
        jobs.append((partial(schedule_hypergradient, run, hg.Unrolled()), args))
    print(f"compiling {len(jobs)} JAX functions ...", flush=True)
    compiled = compile_all(jobs)
    opt = hparams["optimizer"]
    rows = []
    for horizon, (exe, compile_s) in zip(horizons, compiled, strict=True):
        t0 = time.perf_counter()
        g, info = jax.block_until_ready(exe(*args))  # the JAX warm-up call
        first = {OURS: time.perf_counter() - t0}
        ours = hparam_vector(g)
        calls = {OURS: lambda exe=exe: jax.block_until_ready(exe(*args))}
        values = {OURS: (ours, float(info.outer_value))}
        if torch_side is not None:
            idx = batch_indices(key, horizon, train["y"].shape[0])
            s = torch_side.setting(
                train, val, params0, idx, opt["lr"].values, opt["momentum"], opt["weight_decay"]
            )
            for name, (fn, needs) in torch_side.METHODS.items():
                if needs is not None and not importable(libs[needs]):
                    print(f"T={horizon}: {name} skipped: {libs[needs]}", flush=True)
                    continue
                t0 = time.perf_counter()
                values[name] = fn(s)  # the torch warm-up call
                first[name] = time.perf_counter() - t0
                print(f"T={horizon}: {name} first call {first[name]:.2f} s", flush=True)
                calls[name] = partial(fn, s)
        times = interleaved(calls, rounds[horizon])
        base = statistics.median(times[OURS])
        for name, ts in times.items():
            vec, outer = values[name]
            row = {"T": horizon, "method": name, "rounds": rounds[horizon], **spread(ts)}
            row["ratio_to_ours"] = row["median_s"] / base
            # the same round shares the machine's load: a paired ratio, steadier under load
            paired = [t / t_ours for t, t_ours in zip(ts, times[OURS], strict=True)]
            row["paired_ratio_median"] = statistics.median(paired)
            row["first_call_s"] = first[name]
            row["max_abs_diff"] = float(np.max(np.abs(vec - ours)))
            row["rel_diff"] = row["max_abs_diff"] / float(np.max(np.abs(ours)))
            row["outer_value"] = outer
            row["outer_abs_diff"] = abs(outer - values[OURS][1])
            row["hypergradient"] = vec.tolist()
            if name == OURS:
                row["compile_s"] = compile_s
                row["status"] = hg.Status(int(info.status)).name
            rows.append(row)
            print(
                f"T={horizon:>5} {name:<22} median {row['median_s']:8.4f} s "
                f"[{row['q1_s']:.4f}, {row['q3_s']:.4f}]  x{row['ratio_to_ours']:5.2f} ours  "
                f"rel diff {row['rel_diff']:.1e}",
                flush=True,
            )
    return rows


# ----------------------------------------------------------------------------- reporting


def markdown(record: dict) -> str:
    m, libs, imp = record["machine"], record["libraries"], record["implicit"]
    versions = ", ".join(f"{k} {v}" for k, v in libs.items())
    cmd = "python benchmarks/peers/run.py" + (" --quick" if record["quick"] else "")
    lines = [
        "# Against other libraries: hypergradients in JAX and PyTorch",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, jax {m['jax']} ({m['backend']}), Python "
        f"{m['python']}; {versions}; {m['date']}; 1-minute load average "
        f"{m['load_average_at_start']:.2f} at start, {m['load_average_at_end']:.2f} at end "
        "(above ~0.5, other processes shared the cores: the ratios, measured interleaved, "
        f"are steadier than the absolute times). Command: `{cmd}` "
        f"({record['elapsed_s']:.0f} s in all).",
        "",
        "Setting (that of `benchmarks/estimators.py`): MLP 64 -> 32 -> 10 (tanh) on sklearn "
        "digits (1000 train / 400 validation, standardised), cross-entropy on minibatches of "
        f"{BATCH}, T steps of SGD with momentum in the PyTorch convention (v' = βv + g + ξθ, "
        "θ' = θ − α_j v') with 12 hyperparameters: a 10-block shared learning-rate schedule α, "
        "momentum β, weight decay ξ; one hypergradient of the validation cross-entropy, "
        "float32. The minibatch rows of every step are drawn by the JAX sampler and fed to "
        "PyTorch, so every method computes the same number: *rel diff* is "
        "max|g − g_ours| / max|g_ours| over the 12 values. JAX: `hg.hypergradient(..., "
        "hg.Unrolled(), ...)` jitted, compile time in its own column, not in the times. "
        "PyTorch (CPU wheel, eager): a hand-written loop of `torch.autograd.grad(..., "
        "create_graph=True)`; higher's `innerloop_ctx` over `torch.optim.SGD` with the "
        "hyperparameters as tensor overrides; TorchOpt's `MetaSGD` with the schedule as a "
        "callable and a tensor momentum (TorchOpt cannot take a tensor weight decay: it "
        "calls `g.add(p, alpha=weight_decay)`, so ξ enters as ξ/2‖θ‖² in the inner loss, the "
        "same gradient); `torch.func.grad` of the unrolled loop. Threads: "
        f"{record['xla_threads']} intra-op thread(s) on both sides (XLA_FLAGS "
        f"`{record['xla_flags']}`; `torch.set_num_threads({record['torch_threads']})`): at "
        "these sizes neither side gains from a second thread, while torch's spinning OpenMP "
        "workers stall when other processes share the cores (`--threads N` changes it). "
        "Times: every method once per round, in an order rotated each round, after one "
        "untimed warm-up call; median over the rounds, IQR (quartiles) and min–max beside "
        "it; *× ours* = median / median of hg.Unrolled(); *× ours per round*: the median "
        "over rounds of the ratio within a round (the calls of a round share the machine's "
        "load at that moment). *first call*: the untimed warm-up (JAX: after compilation; "
        "PyTorch: includes lazy imports, e.g. `torch.optim` loading `torch._dynamo`).",
        "",
        "| T | method | median (s) | IQR (s) | min–max (s) | × ours | × ours per round "
        "| compile (s) | first call (s) | max abs diff | rel diff | rounds |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["unrolled"]:
        compile_s = f"{r['compile_s']:.2f}" if "compile_s" in r else ""
        lines.append(
            f"| {r['T']} | {r['method']} | {r['median_s']:.4f} | {r['q1_s']:.4f}–{r['q3_s']:.4f} "
            f"| {r['min_s']:.4f}–{r['max_s']:.4f} | {r['ratio_to_ours']:.2f} "
            f"| {r['paired_ratio_median']:.2f} | {compile_s} "
            f"| {r['first_call_s']:.2f} | {r['max_abs_diff']:.1e} | {r['rel_diff']:.1e} "
            f"| {r['rounds']} |"
        )
    for note in record["notes"]:
        lines += ["", f"Note: {note}"]
    cg = imp["cg"]
    lines += [
        "",
        "## Implicit: hg.Implicit(CG) against jaxopt `custom_root`",
        "",
        "`benchmarks.estimators.implicit_comparison`: full-batch inner loss (1000 examples) "
        f"plus a per-layer L2 penalty exp(log_l2)/2 ‖θ‖² (2 hyperparameters), "
        f"{imp['inner_steps']} steps of `sgd_momentum` (lr 1.0, momentum 0.9); both sides "
        f"solve with CG (maxiter={cg['maxiter']}, tol={cg['tol']}, ridge={cg['ridge']}); jaxopt "
        "differentiates `custom_root(grad of the inner loss, solve=solve_cg)` around the same "
        "inner run. Both jitted, compilation excluded; median of "
        f"{record['implicit_repeats']} calls after a warm-up; times include the inner run.",
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| plain {imp['inner_steps']}-step run (s) | {imp['plain_run_s']:.4f} |",
        f"| hg.Implicit(CG) hypergradient (s) | {imp['ours_s']:.4f} |",
        f"| inner residual ‖∇θ g(θ_T)‖ / CG iterations (ours) | {imp['inner_residual']:.1e} / "
        f"{imp['cg_iterations']} |",
    ]
    if imp.get("jaxopt"):
        lines += [
            f"| jaxopt custom_root hypergradient (s) | {imp['jaxopt_s']:.4f} |",
            f"| × ours (jaxopt / ours) | {imp['jaxopt_s'] / imp['ours_s']:.2f} |",
            f"| rel diff of the hypergradients | {imp['rel_diff']:.1e} |",
        ]
    else:
        lines.append("| jaxopt | not installed (the `bench` extra): skipped |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = PARSER.parse_args()
    start = time.perf_counter()
    info = machine()  # records the 1-minute load average at start
    if args.quick:
        horizons, rounds, imp_steps, imp_repeats = (100,), {100: 3}, 500, 1
    else:
        horizons, rounds, imp_steps, imp_repeats = (100, 1000), {100: 20, 1000: 7}, 2000, 5

    torch_side, libs = load_torch()
    try:
        import jaxopt  # noqa: F401

        libs["jaxopt"] = importlib.metadata.version("jaxopt")
    except ImportError as e:
        libs["jaxopt"] = f"not importable: {e}"
    notes = [f"{k}: {v}; no {k} column." for k, v in libs.items() if not importable(v)]
    torch_threads = None
    if torch_side is not None:
        import torch

        torch.set_num_threads(args.threads)
        torch_threads = torch.get_num_threads()
    print(f"{info['cpu']}, {info['cores']} cores, load {info['load_average_at_start']:.2f}; {libs}")

    train, val = load_data()
    params0 = CLASSIFIER.init(jax.random.key(0), 64, dtype=jnp.float32)
    key = jax.random.key(1)
    rows = unrolled_rows(horizons, rounds, train, val, params0, key, torch_side, libs)
    cg = hg.CG(maxiter=300, tol=1e-5, ridge=1e-4)
    imp = implicit_comparison(train, val, params0, imp_steps, cg, imp_repeats)

    info["load_average_at_end"] = os.getloadavg()[0]
    elapsed = time.perf_counter() - start
    record = {
        "machine": info,
        "libraries": libs,
        "xla_threads": args.threads,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "torch_threads": torch_threads,
        "quick": args.quick,
        "elapsed_s": elapsed,
        "notes": notes,
        "unrolled": rows,
        "implicit": imp,
        "implicit_repeats": imp_repeats,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "peers.md").write_text(markdown(record))
    print(f"wrote {args.out}/peers.{{json,md}} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
