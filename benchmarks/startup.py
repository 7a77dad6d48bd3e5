"""Cold vs warm start of ``hypergrad run``: JAX's persistent compilation cache.

Runs ``hypergrad run <experiment> [--tiny] --quiet`` in fresh processes three ways: with the
cache turned off (``HYPERGRAD_COMPILE_CACHE=off``), with an empty cache folder (cold: every
program is compiled and written), and again with that folder (warm: programs are read back).
Writes ``benchmarks/results/startup.{json,md}``: wall seconds of each process (median of
``--repeats``), and the warm/cold ratio.

    python benchmarks/startup.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT))

from benchmarks.estimators import machine  # noqa: E402


def timed_run(args: list[str], cache: str, out: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["HYPERGRAD_COMPILE_CACHE"] = cache
    cmd = [sys.executable, "-m", "experiments.cli", "run", *args, "--quiet", "--out", out]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return seconds


def measure(args: list[str], repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        off = [timed_run(args, "off", tmp) for _ in range(repeats)]
        cold, warm = [], []
        for i in range(repeats):
            cache = os.path.join(tmp, f"cache{i}")
            cold.append(timed_run(args, cache, tmp))
            warm.append(timed_run(args, cache, tmp))
    row = {"command": "hypergrad run " + " ".join(args)}
    for name, values in (("off", off), ("cold", cold), ("warm", warm)):
        row[f"{name}_s"] = statistics.median(values)
    row["warm_over_cold"] = row["warm_s"] / row["cold_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quickstart's tiny run only")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = [["quickstart", "--tiny"]]
    if not args.quick:
        runs += [["quickstart"], ["hpm_synthetic", "--tiny"], ["nhgd_regularization", "--tiny"]]
    info = machine()
    rows = [measure(r, 1 if args.quick else args.repeats) for r in runs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    lines = [
        "# Cold vs warm start of `hypergrad run` (persistent compilation cache)",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, jax {info['jax']} ({info['backend']}); "
        f"{info['date']}. Wall seconds of a fresh process, median of "
        f"{1 if args.quick else args.repeats}. *off*: `HYPERGRAD_COMPILE_CACHE=off`; *cold*: "
        "an empty cache folder (compile and write); *warm*: the same folder again.",
        "",
        "| command | off (s) | cold (s) | warm (s) | warm / cold |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['command']}` | {r['off_s']:.1f} | {r['cold_s']:.1f} | {r['warm_s']:.1f} "
            f"| {r['warm_over_cold']:.2f} |"
        )
    (args.out / "startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
