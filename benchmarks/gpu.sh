#!/usr/bin/env bash
# The benchmarks to run on a GPU the day one is lent, in one call, in under 8 minutes:
#   estimators (time and compiled memory of Unrolled / remat / Forward, Implicit vs jaxopt),
#   NHGD (the parallel Fisher update on 2 devices if there are 2, else the fused loop only),
#   peers (higher, TorchOpt, hand-written PyTorch, jaxopt: whichever is installed).
# Each writes its .json/.md (and a .log of its output) under OUT (benchmarks/results/gpu);
# device.json records what JAX (and PyTorch, if there) saw. A benchmark that fails or runs
# past its time share is recorded in status.txt and the others still run.
#
# Usage: benchmarks/gpu.sh [--smoke] [--out DIR]
#   --smoke   every benchmark's --quick preset (a CPU smoke test: tests/test_benchmarks.py)
#   PYTHON=.venv/bin/python benchmarks/gpu.sh   to choose the interpreter (default python3)
#
# The project needs no install on the GPU machine when its image has jax, flax, optax,
# chex, orbax and scikit-learn (run from the repository root; PYTHONPATH is set here).
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
OUT=benchmarks/results/gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$1' (expected --smoke, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
QUICK=()
[ "$SMOKE" = 1 ] && QUICK=(--quick)

"$PY" - "$OUT/device.json" <<'EOF'
import json, platform, sys
import jax
info = {"jax": jax.__version__, "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()], "python": platform.python_version()}
try:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.cuda.is_available()
except ImportError:
    info["torch"] = None
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(info)
EOF

: > "$OUT/status.txt"
# name, script, seconds: the shares add up to 7.5 minutes
for job in "estimators benchmarks/estimators.py 150" \
           "nhgd benchmarks/nhgd.py 180" \
           "peers benchmarks/peers/run.py 120"; do
  set -- $job
  start=$(date +%s)
  timeout "$3" "$PY" "$2" "${QUICK[@]}" --out "$OUT" > "$OUT/$1.log" 2>&1
  rc=$?
  echo "$1 rc=$rc $(( $(date +%s) - start ))s" | tee -a "$OUT/status.txt"
  tail -n 3 "$OUT/$1.log"
done
! grep -v " rc=0 " "$OUT/status.txt"
