"""HPM populations: one vmapped ready interval against a Python loop over the members, and
the cost of exploit/explore (Gaussian mutation, the HPM teacher) inside the interval.

What it measures, in one process, on one small problem (an MLP 16 -> 32 -> 1, tanh, on a
synthetic regression task, 256 train / 256 validation examples; per member 3
hyperparameters: a log learning rate and two per-layer log weight decays; ``hg.Unrolled()``
through 20 full-batch SGD steps per outer step, warm-started; outer optimizer Adam(0.05)):

1. One ready interval (5 outer steps of every member) for K members: the jitted
   ``hg.population.step`` (members vmapped on one device, ``fraction=0``: no exploit, so
   the same work as the loop) against a Python loop that calls a jitted per-member interval
   (a ``lax.scan`` of 5 ``hg.outer.step``) K times, and a Python loop of 5 K jitted
   ``hg.outer.step`` calls. Seconds per interval and the ratio loop / vmapped (> 1: the
   vmapped population is faster). The vmapped step and the loop again with
   ``hg.Unrolled(remat=True)`` (same numbers, a smaller working set: the contrast that
   tells whether the batch's memory traffic decides the ratio on a CPU).
2. The overhead of exploit/explore as a fraction of the interval: the jitted step with
   (a) ``fraction=0``, (b) ``fraction=0.2`` and ``Gaussian(0.1)``, (c) ``fraction=0.2`` and
   ``Teacher()``; overhead (b − a) / a and (c − a) / a. ``fraction`` is raised to 1/K where
   0.2 K < 1 (K = 4: 0.25, one member replaced), since ``hg.population.step`` needs at least
   one top and one bottom member.

Every timed function is jitted and compiled ahead (``jit(...).lower(...).compile()``, its
seconds reported apart); after one warm-up call the variants of one K are timed in turn,
in a rotating order, each call ended by ``block_until_ready``, and the median of the
repeats is reported (per-repeat times are in the json). The process's CPU time per call
is recorded beside the wall time: on a machine shared with other jobs it is the steadier
measure of the work, and CPU / wall time is the number of cores a call kept busy. Nothing
is asserted; it writes ``benchmarks/results/population.json`` and ``population.md``.

Run:  python benchmarks/population.py            # K in {4, 16, 64}, a few minutes on 2 cores
      python benchmarks/population.py --quick    # K in {4, 8}, fewer repeats: a smoke test
      --out DIR writes the results there instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks package, when run as a script

import hypergrad_jax as hg  # noqa: E402
from benchmarks.estimators import machine  # noqa: E402

P = hg.population
RESULTS = Path(__file__).resolve().parent / "results"
INTERVAL = 5  # outer steps per ready interval
INNER_STEPS = 20  # unrolled SGD steps per outer step
FRACTION = 0.2
N_IN, HIDDEN, N_TRAIN, N_VAL = 16, 32, 256, 256
OPTIMIZER = optax.adam(0.05)
METHOD = hg.Unrolled()  # every measurement
REMAT = hg.Unrolled(remat=True)  # the contrast: vmapped step and loop only

# ----------------------------------------------------------------------------- problem


def mlp(params, x):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return (hidden @ params["w2"] + params["b2"])[:, 0]


def mse(params, batch):
    x, y = batch
    r = mlp(params, x) - y
    return jnp.mean(r * r)


def inner_loss(params, hparams, batch):
    """Training MSE + ``exp(log_wd[l]) / 2 · ||W_l||²`` per layer."""
    wd = jnp.exp(hparams["log_wd"])
    penalty = wd[0] * jnp.sum(params["w1"] ** 2) + wd[1] * jnp.sum(params["w2"] ** 2)
    return mse(params, batch) + 0.5 * penalty


PROBLEM = hg.BilevelProblem(inner_loss, lambda p, h, b: mse(p, b))
RUN = hg.InnerRun(
    hg.optim.sgd(), INNER_STEPS, optimizer_hparams=lambda h: {"lr": jnp.exp(h["log_lr"])}
)


def make_data(key):
    """``y = sin(x · w) + 0.1 ε`` with ``x ~ N(0, I_16)``: a train and a validation split."""
    kw, kx, kn = jax.random.split(key, 3)
    w = jax.random.normal(kw, (N_IN,)) / math.sqrt(N_IN) * 2.0
    x = jax.random.normal(kx, (N_TRAIN + N_VAL, N_IN))
    y = jnp.sin(x @ w) + 0.1 * jax.random.normal(kn, (N_TRAIN + N_VAL,))
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def init_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (N_IN, HIDDEN)) / math.sqrt(N_IN),
        "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, 1)) / math.sqrt(HIDDEN),
        "b2": jnp.zeros(1),
    }


def sample_hparams(key):
    """One member's unconstrained hyperparameters: lr in [0.03, 0.3], wd in [1e-4, 1e-2]."""
    k1, k2 = jax.random.split(key)
    return {
        "log_lr": jax.random.uniform(k1, (), minval=math.log(0.03), maxval=math.log(0.3)),
        "log_wd": jax.random.uniform(k2, (2,), minval=math.log(1e-4), maxval=math.log(1e-2)),
    }


# ----------------------------------------------------------------------------- measuring


def compiled(fn, *args):
    """``jit(fn)`` compiled for ``args`` and the seconds that took."""
    t0 = time.perf_counter()
    exe = jax.jit(fn).lower(*args).compile()
    return exe, time.perf_counter() - t0


def temp_mib(exe) -> float:
    """XLA's planned temporaries of a compiled function (MiB; NaN when not reported)."""
    mem = exe.memory_analysis()
    return float("nan") if mem is None else mem.temp_size_in_bytes / 2**20


class MemberFns:
    """One member's jitted interval (``lax.scan`` of ``INTERVAL`` outer steps) and outer
    step for ``method``: compiled once, for every K (a member's shapes do not depend on K)."""

    def __init__(self, method, data, member):
        inner, outer = data

        def one_step(m):
            return hg.outer.step(PROBLEM, RUN, method, OPTIMIZER, m, inner, outer)

        def interval(m):
            return jax.lax.scan(lambda s, _: one_step(s), m, None, length=INTERVAL)

        self.interval, self.interval_compile_s = compiled(interval, member)
        self.interval_temp_mib = temp_mib(self.interval)
        self.step, self.step_compile_s = compiled(one_step, member)

    def loop(self, members):
        """The Python loop: one call per member, dispatched asynchronously, all awaited."""
        return jax.block_until_ready([self.interval(m) for m in members])

    def step_loop(self, members):
        """``INTERVAL`` jitted outer steps per member: ``INTERVAL · K`` calls."""
        outs = []
        for m in members:
            for _ in range(INTERVAL):
                m, _ = self.step(m)
            outs.append(m)
        return jax.block_until_ready(outs)


def time_rotating(calls: dict, repeats: int) -> tuple[dict, dict]:
    """Wall and process CPU seconds of each ``calls[name]()`` (already warmed up),
    ``repeats`` times each, the variants interleaved in a rotating order so load drift hits
    them alike."""
    names = list(calls)
    wall, cpu = {name: [] for name in names}, {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            calls[name]()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - t0)
    return wall, cpu


def fraction_for(size: int) -> float:
    """``FRACTION``, raised to ``1 / size`` when fewer than one member would be replaced."""
    return FRACTION if math.floor(FRACTION * size + 1e-9) >= 1 else 1.0 / size


def rel_diff(a, b) -> float:
    """``max |a − b| / max |b|`` over the leaves."""
    return max(
        float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def bench_size(size, data, key, fns: dict, repeats: int) -> dict:
    """Every variant at population size ``size``; ``fns``: ``MemberFns`` per method name
    (``"unrolled"``, ``"remat"``)."""
    inner, outer = data
    k_h, k_init = jax.random.split(jax.random.fold_in(key, size))
    hparams = jax.vmap(sample_hparams)(jax.random.split(k_h, size))
    frac = fraction_for(size)
    variants = {  # name: (method, mutation, fraction)
        "vmapped": (METHOD, None, 0.0),
        "gaussian": (METHOD, P.Gaussian(0.1), frac),
        "teacher": (METHOD, P.Teacher(), frac),
        "remat_vmapped": (REMAT, None, 0.0),
    }
    row = {"K": size, "fraction": frac, "replaced": math.floor(frac * size + 1e-9)}
    calls, compile_s, temp, warm = {}, {}, {}, {}
    for name, (method, mutation, fraction) in variants.items():
        state = P.init(OPTIMIZER, hparams, init_params, k_init, mutation=mutation)

        def pop_step(s, method=method, mutation=mutation, fraction=fraction):
            return P.step(
                PROBLEM, RUN, method, OPTIMIZER, mutation, s, inner, outer,
                interval=INTERVAL, fraction=fraction,
            )  # fmt: skip

        exe, compile_s[name] = compiled(pop_step, state)
        temp[name] = temp_mib(exe)
        warm[name] = jax.block_until_ready(exe(state))[0]  # warm-up
        if mutation is not None:  # steady state: the interval after one exploit/explore
            state = warm[name]
        calls[name] = lambda exe=exe, state=state: jax.block_until_ready(exe(state))
    # every variant starts from the same members (the mutation only adds its own state)
    start = P.init(OPTIMIZER, hparams, init_params, k_init).members
    members = [jax.tree.map(lambda x, i=i: x[i], start) for i in range(size)]
    loops = {"loop": fns["unrolled"].loop, "remat_loop": fns["remat"].loop}
    loops["step_loop"] = fns["unrolled"].step_loop
    looped = {}
    for name, fn in loops.items():
        looped[name] = fn(members)  # warm-up
        calls[name] = lambda fn=fn: fn(members)

    times, cpu = time_rotating(calls, repeats)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    cmed = {name: statistics.median(ts) for name, ts in cpu.items()}
    cores_used = {name: cmed[name] / med[name] for name in times}
    c1, _, c3 = statistics.quantiles(cpu["vmapped"], n=4)

    def stacked(outs):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *[m.hparams for m, _ in outs])

    def paired(num, den, shift=0.0):
        return statistics.median(x / y - shift for x, y in zip(times[num], times[den]))

    low = {name: min(ts) for name, ts in times.items()}
    q1, _, q3 = statistics.quantiles(times["vmapped"], n=4)
    a = med["vmapped"]
    row.update(
        vmapped_s=a,
        loop_s=med["loop"],
        step_loop_s=med["step_loop"],
        loop_over_vmapped=med["loop"] / a,
        step_loop_over_vmapped=med["step_loop"] / a,
        paired_loop_over_vmapped=paired("loop", "vmapped"),
        remat_vmapped_s=med["remat_vmapped"],
        remat_loop_s=med["remat_loop"],
        remat_loop_over_vmapped=med["remat_loop"] / med["remat_vmapped"],
        paired_remat_loop_over_vmapped=paired("remat_loop", "remat_vmapped"),
        gaussian_s=med["gaussian"],
        teacher_s=med["teacher"],
        gaussian_overhead=(med["gaussian"] - a) / a,
        teacher_overhead=(med["teacher"] - a) / a,
        paired_gaussian_overhead=paired("gaussian", "vmapped", 1.0),
        paired_teacher_overhead=paired("teacher", "vmapped", 1.0),
        noise=(q3 - q1) / a,  # interquartile range of (a)'s repeats / their median
        cpu_s=cmed,
        cpu_loop_over_vmapped=cmed["loop"] / cmed["vmapped"],
        cpu_remat_loop_over_vmapped=cmed["remat_loop"] / cmed["remat_vmapped"],
        cpu_gaussian_overhead=cmed["gaussian"] / cmed["vmapped"] - 1,
        cpu_teacher_overhead=cmed["teacher"] / cmed["vmapped"] - 1,
        cpu_noise=(c3 - c1) / cmed["vmapped"],
        min_loop_over_vmapped=low["loop"] / low["vmapped"],
        min_remat_loop_over_vmapped=low["remat_loop"] / low["remat_vmapped"],
        min_gaussian_overhead=low["gaussian"] / low["vmapped"] - 1,
        min_teacher_overhead=low["teacher"] / low["vmapped"] - 1,
        rel_diff_loop_vs_vmapped=rel_diff(warm["vmapped"].members.hparams, stacked(looped["loop"])),
        rel_diff_remat_loop_vs_vmapped=rel_diff(
            warm["remat_vmapped"].members.hparams, stacked(looped["remat_loop"])
        ),
        cores_used=cores_used,
        temp_mib=temp,
        compile_s=compile_s,
        repeats=repeats,
        times_s=times,
        cpu_times_s=cpu,
    )
    print(
        f"K={size:>3}: vmapped {a * 1e3:8.2f} ms, loop {med['loop'] * 1e3:8.2f} ms "
        f"(x{row['loop_over_vmapped']:.2f}), step loop {med['step_loop'] * 1e3:8.2f} ms; "
        f"remat: vmapped {med['remat_vmapped'] * 1e3:8.2f} ms, loop "
        f"{med['remat_loop'] * 1e3:8.2f} ms (x{row['remat_loop_over_vmapped']:.2f}); "
        f"overhead gaussian {row['gaussian_overhead']:+.1%}, teacher "
        f"{row['teacher_overhead']:+.1%}",
        flush=True,
    )
    return row


# ----------------------------------------------------------------------------- report


def verdict(ratios: list[float]) -> str:
    if all(r > 1.1 for r in ratios):
        return "the vmapped population beats the loop"
    if all(r < 0.9 for r in ratios):
        return "the vmapped population is slower than the loop"
    if all(r < 1.1 for r in ratios):
        return "the vmapped population does not beat the loop"
    return "the vmapped population beats the loop only at some K"


def interpret(rec: dict) -> str:
    """What the measured numbers say, worded from them (5 sentences)."""
    rows = rec["sizes"]
    last = rows[-1]
    sizes = ", ".join(str(r["K"]) for r in rows)

    def listed(key):
        return ", ".join(f"{r[key]:.2f}" for r in rows)

    def span(fn):
        lo, hi = min(fn(r) for r in rows), max(fn(r) for r in rows)
        return f"{lo:.1f}" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}-{hi:.1f}"

    def per_member(key):
        return span(lambda r: r[key] / r["K"] * 1e3)

    per_call = statistics.median(
        (r["step_loop_s"] - r["loop_s"]) / ((INTERVAL - 1) * r["K"]) * 1e3 for r in rows
    )
    dispatch = (
        f"cost {per_call:.2f} ms per extra call, median over K"
        if per_call > 0
        else "cost no measurable extra time here"
    )
    used_v = max(r["cores_used"]["vmapped"] for r in rows)
    cores_v = span(lambda r: r["cores_used"]["vmapped"])
    cores_l = span(lambda r: r["cores_used"]["loop"])
    cpu_ratios = [r["cpu_loop_over_vmapped"] for r in rows]
    cpu_listed = listed("cpu_loop_over_vmapped")
    if all(x < 0.9 for x in cpu_ratios) and used_v >= 1.3:
        work = (
            f"In CPU time, though, the vmapped step does more work (loop / vmapped = "
            f"{cpu_listed}): what it gains in wall time comes from XLA spreading the batched "
            f"program over {cores_v} cores where the loop's per-member kernels keep "
            f"{cores_l} busy, so with one free core (other jobs holding the second) it "
            "would lose in wall time by about the CPU-time ratio."
        )
    elif all(x < 0.9 for x in cpu_ratios):
        work = (
            f"It also does more work (loop / vmapped = {cpu_listed} in CPU time) and found "
            f"no parallelism to make up for it: the vmapped step kept {cores_v} cores busy "
            f"and the loop {cores_l}."
        )
    elif all(x > 1.1 for x in cpu_ratios):
        work = (
            f"It also does less work (loop / vmapped = {cpu_listed} in CPU time): batching "
            f"amortises per-member costs; cores busy: vmapped {cores_v}, loop {cores_l}."
        )
    else:
        work = (
            f"In CPU time the two do about the same work (loop / vmapped = {cpu_listed}); "
            f"cores busy: vmapped {cores_v}, loop {cores_l}."
        )
    shrink = last["temp_mib"]["vmapped"] / last["temp_mib"]["remat_vmapped"]
    cpu = last["cpu_s"]  # CPU time: steadier than wall time on a shared machine
    recompute_loop = cpu["remat_loop"] / cpu["loop"] - 1
    recompute_v = cpu["remat_vmapped"] / cpu["vmapped"] - 1
    gap = cpu["vmapped"] / cpu["loop"] - 1
    saved = 1 - (1 + recompute_v) / (1 + recompute_loop)
    head = (
        f"at K = {last['K']} recomputation costs the loop {recompute_loop:+.0%} of CPU time "
        f"and the vmapped step {recompute_v:+.0%}"
    )
    if gap <= 0:
        contrast = f"{head}, with the vmapped step already ahead of the loop"
    else:
        amount = f"about {saved:.0%}" if saved > 0.02 else "nothing measurable"
        share = "most" if saved > gap / 2 else "part" if saved > gap / 4 else "little, if any,"
        contrast = (
            f"{head}, so the {shrink:.0f}x smaller working set saves the vmapped step "
            f"{amount} against a vmapped / loop gap of {gap:+.0%}: memory traffic explains "
            f"{share} of the gap"
            + (
                ""
                if share == "most"
                else "; the rest more likely comes from XLA:CPU's code for the batched "
                "operations (not profiled here)"
            )
        )

    # A cost is resolved when it exceeds twice the spread of (a)'s repeats at its K and any
    # negative cost (which can only be noise); judged on CPU time, the steadier measure.
    def resolved_at(r):
        gauss, teach = r["cpu_gaussian_overhead"], r["cpu_teacher_overhead"]
        floor = max(2 * r["cpu_noise"], -gauss, -teach, 0.02)
        return [
            (r["K"], name, c) for name, c in (("Gaussian", gauss), ("teacher", teach)) if c > floor
        ]

    resolved = [x for r in rows for x in resolved_at(r)]
    noise = span(lambda r: 100 * r["cpu_noise"])
    wall_noise = span(lambda r: 100 * r["noise"])
    overheads = "; ".join(
        f"K = {r['K']}: {r['cpu_gaussian_overhead']:+.1%} / {r['cpu_teacher_overhead']:+.1%} "
        f"({r['gaussian_overhead']:+.1%} / {r['teacher_overhead']:+.1%})"
        for r in rows
    )
    parts = [
        f"In wall time on this {rec['machine']['cores']}-core CPU, with `Unrolled()`, "
        f"{verdict([r['loop_over_vmapped'] for r in rows])} (loop / vmapped = "
        f"{listed('loop_over_vmapped')} at K = {sizes}); the loop's dispatch is small next "
        f"to a member's {per_member('loop_s')} ms interval (the step loop's {INTERVAL}x as "
        f"many calls {dispatch}).",
        work,
        "Vmapping multiplies the working set by K (XLA plans "
        f"{last['temp_mib']['vmapped']:.0f} MiB of temporaries for the vmapped interval at "
        f"K = {last['K']} against {rec['member']['unrolled']['temp_mib']:.1f} MiB for one "
        "member: the reverse pass stores every inner step's activations), and a member costs "
        f"{span(lambda r: r['cpu_s']['vmapped'] / r['K'] * 1e3)} ms of CPU time vmapped "
        f"against {span(lambda r: r['cpu_s']['loop'] / r['K'] * 1e3)} ms looped.",
        "With `Unrolled(remat=True)` "
        f"({last['temp_mib']['remat_vmapped']:.0f} MiB at K = {last['K']}) loop / vmapped = "
        f"{listed('remat_loop_over_vmapped')} (CPU time {listed('cpu_remat_loop_over_vmapped')})"
        f": {contrast}.",
        "Exploit/explore costs (Gaussian / teacher, share of the interval in CPU time, "
        f"wall time in brackets) {overheads}, against a run-to-run spread of {noise}% in "
        f"CPU time and {wall_noise}% in wall time (interquartile range of (a) / median): "
        + (
            "in CPU time none exceeds twice its spread, so next to "
            f"K x {INTERVAL * INNER_STEPS} "
            "differentiated "
            "inner steps the selection, the copy, the teacher's attention over K members "
            "and its one Adam step cost less than this measurement resolves."
            if not resolved
            else "above twice the CPU-time spread: "
            + ", ".join(f"{name} {c:+.1%} at K = {k}" for k, name, c in resolved)
            + "; the rest cost less than this measurement resolves."
        ),
    ]
    return " ".join(parts)


def markdown(info: dict, rec: dict, quick: bool) -> str:
    m, rows = info, rec["sizes"]
    shared = (
        "shared with other jobs while this ran, so timings are noisy: medians of interleaved "
        "repeats"
        if m["load_average_at_start"] > 0.5
        else "otherwise idle"
    )
    member = rec["member"]
    lines = [
        "# HPM population: vmapped interval vs a loop, exploit/explore overhead",
        "",
        f"Machine: {m['cpu']}, {m['cores']} CPU cores ({shared}), jax {m['jax']} "
        f"({m['backend']}, {jax.device_count()} device), Python {m['python']}; {m['date']}; "
        f"1-minute load average {m['load_average_at_start']:.2f} at the start, "
        f"{rec['load_average_at_end']:.2f} at the end. Command: "
        f"`python benchmarks/population.py{' --quick' if quick else ''}` "
        f"({rec['elapsed_s']:.0f} s in all).",
        "",
        f"Problem: an MLP {N_IN} -> {HIDDEN} -> 1 (tanh, {rec['problem']['params']} "
        f"parameters) regressing `y = sin(x·w) + 0.1ε` ({N_TRAIN} train / {N_VAL} validation "
        "examples, float32); inner loss: training MSE + per-layer weight decay "
        "`exp(log_wd_l)/2 ||W_l||²`; outer loss: validation MSE; 3 hyperparameters per "
        "member (log learning rate, 2 log weight decays), drawn log-uniformly. Each outer "
        f"step is `hg.Unrolled()` through {INNER_STEPS} full-batch SGD steps, warm-started "
        f"from the last; outer optimizer Adam(0.05); one ready interval = {INTERVAL} outer "
        f"steps per member, i.e. {INTERVAL * INNER_STEPS} differentiated inner steps.",
        "",
        "Timing: seconds per interval, the median over the repeats; compilation excluded "
        "(each function compiled ahead, one warm-up call; compile seconds reported apart), "
        "every call ended by `block_until_ready`; all variants of one K interleaved in a "
        "rotating order. *vmapped*: the jitted `hg.population.step(..., fraction=0)` (no "
        f"exploit). *loop*: a jitted per-member interval (`lax.scan` of {INTERVAL} "
        "`hg.outer.step`, compiled once for every K) called K times from Python, "
        "dispatched asynchronously, then all awaited: the same work. *step loop*: "
        f"{INTERVAL}·K calls of a jitted `hg.outer.step`. *temp*: XLA's compiled memory "
        "analysis (`temp_size_in_bytes`), not a measured RSS. *cores used*: the process's CPU "
        "seconds / wall seconds of a call (medians; 1 = one core busy). *CPU time*: the "
        "same ratios from the process's CPU seconds, which do not count the time slices "
        "other jobs took, so they are steadier here (while about one core is busy they "
        "measure the work). *rel diff*: "
        "max |λ_vmapped − λ_loop| / max |λ_loop| after the interval (float32). Not "
        "measured: accelerators, where K members fill a device that one member leaves idle, "
        "and `mesh=` sharding of the members over devices.",
        "",
        "## Vmapped population vs a Python loop over the members",
        "",
        "| K | vmapped (ms) | loop (ms) | loop / vmapped | CPU time: loop / vmapped "
        "| step loop (ms) "
        "| step loop / vmapped | per member: vmapped / loop (ms) | cores used: vmapped / "
        "loop | temp vmapped (MiB) | compile vmapped (s) | rel diff | repeats |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['K']} | {r['vmapped_s'] * 1e3:.2f} | {r['loop_s'] * 1e3:.2f} "
            f"| {r['loop_over_vmapped']:.2f} | {r['cpu_loop_over_vmapped']:.2f} "
            f"| {r['step_loop_s'] * 1e3:.2f} | {r['step_loop_over_vmapped']:.2f} "
            f"| {r['vmapped_s'] / r['K'] * 1e3:.2f} / {r['loop_s'] / r['K'] * 1e3:.2f} "
            f"| {r['cores_used']['vmapped']:.2f} / {r['cores_used']['loop']:.2f} "
            f"| {r['temp_mib']['vmapped']:.1f} | {r['compile_s']['vmapped']:.2f} "
            f"| {r['rel_diff_loop_vs_vmapped']:.0e} | {r['repeats']} |"
        )
    u, rm = member["unrolled"], member["remat"]
    lines += [
        "",
        f"One member (the loop's function): temp {u['temp_mib']:.1f} MiB; compile "
        f"{u['interval_compile_s']:.2f} s (interval), {u['step_compile_s']:.2f} s "
        "(`hg.outer.step`).",
        "",
        "The same with `hg.Unrolled(remat=True)` (same hypergradient, inner steps recomputed "
        "in the reverse pass instead of stored):",
        "",
        "| K | vmapped (ms) | loop (ms) | loop / vmapped | CPU time: loop / vmapped "
        "| per member: vmapped / loop (ms) | cores used: vmapped / loop | temp vmapped (MiB) "
        "| compile vmapped (s) | rel diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['K']} | {r['remat_vmapped_s'] * 1e3:.2f} | {r['remat_loop_s'] * 1e3:.2f} "
            f"| {r['remat_loop_over_vmapped']:.2f} | {r['cpu_remat_loop_over_vmapped']:.2f} "
            f"| {r['remat_vmapped_s'] / r['K'] * 1e3:.2f} / "
            f"{r['remat_loop_s'] / r['K'] * 1e3:.2f} "
            f"| {r['cores_used']['remat_vmapped']:.2f} / {r['cores_used']['remat_loop']:.2f} "
            f"| {r['temp_mib']['remat_vmapped']:.1f} "
            f"| {r['compile_s']['remat_vmapped']:.2f} "
            f"| {r['rel_diff_remat_loop_vs_vmapped']:.0e} |"
        )
    lines += [
        "",
        f"One member: temp {rm['temp_mib']:.1f} MiB; compile {rm['interval_compile_s']:.2f} s.",
        "",
        "## Exploit/explore overhead",
        "",
        "(a) `fraction=0`; (b) `Gaussian(0.1)`; (c) `Teacher()` (HPM: its update from the "
        "last interval's first-step hypergradients, then the attention module's mutation); "
        f"(b) and (c) with `fraction` {FRACTION} (1/K where {FRACTION} K < 1), timed on the "
        "state after one exploit. Overhead = (b − a)/a and (c − a)/a from the medians; "
        "*Spread*: the interquartile range of (a)'s repeats over their median, the noise "
        "level the overheads are to be read against. The same in CPU time. Paired and "
        "minimum-based ratios are in the json.",
        "",
        "| K | fraction (replaced) | (a) ms | (b) Gaussian ms | (c) Teacher ms "
        "| Gaussian overhead | Teacher overhead | spread | CPU time: Gaussian / Teacher "
        "overhead | CPU time spread | compile a / b / c (s) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        c = r["compile_s"]
        lines.append(
            f"| {r['K']} | {r['fraction']:g} ({r['replaced']}) | {r['vmapped_s'] * 1e3:.2f} "
            f"| {r['gaussian_s'] * 1e3:.2f} | {r['teacher_s'] * 1e3:.2f} "
            f"| {r['gaussian_overhead']:+.1%} | {r['teacher_overhead']:+.1%} "
            f"| {r['noise']:.0%} | {r['cpu_gaussian_overhead']:+.1%} / "
            f"{r['cpu_teacher_overhead']:+.1%} | {r['cpu_noise']:.0%} "
            f"| {c['vmapped']:.1f} / {c['gaussian']:.1f} / {c['teacher']:.1f} |"
        )
    lines += ["", "## What the numbers mean", "", interpret(rec)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K in {4, 8}, fewer repeats")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"output folder (default {RESULTS})"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, jax {info['jax']} ({info['backend']})")
    repeats = {4: 5, 8: 5} if args.quick else {4: 25, 16: 19, 64: 15}

    key = jax.random.key(0)
    data = make_data(jax.random.fold_in(key, 1))
    one = P.init(OPTIMIZER, jax.vmap(sample_hparams)(key[None]), init_params, key).members
    member = jax.tree.map(lambda x: x[0], one)
    fns = {"unrolled": MemberFns(METHOD, data, member), "remat": MemberFns(REMAT, data, member)}
    rows = [bench_size(size, data, key, fns, reps) for size, reps in repeats.items()]

    elapsed = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": info,
        "quick": args.quick,
        "elapsed_s": elapsed,
        "load_average_at_end": os.getloadavg()[0],
        "problem": {
            "model": f"MLP {N_IN}-{HIDDEN}-1 tanh",
            "params": int(sum(x.size for x in jax.tree.leaves(member.params))),
            "hparams": 3,
            "n_train": N_TRAIN,
            "n_val": N_VAL,
            "estimator": "Unrolled() (contrast: Unrolled(remat=True))",
            "inner_steps": INNER_STEPS,
            "interval": INTERVAL,
            "outer_optimizer": "adam(0.05)",
        },
        "member": {
            name: {
                "interval_compile_s": f.interval_compile_s,
                "step_compile_s": f.step_compile_s,
                "temp_mib": f.interval_temp_mib,
            }
            for name, f in fns.items()
        },
        "sizes": rows,
    }
    (args.out / "population.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "population.md").write_text(markdown(info, record, args.quick))
    print(f"wrote {args.out}/population.{{json,md}} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
