#!/bin/bash
# One device call: set up (idempotent), then the suite, logging everything under $OUT.
#   bash benchmarks/gpu_run.sh NAME LIMIT_S SUITE_ARGS...
# NAME names $OUT/NAME.json and $OUT/NAME.log; LIMIT_S is a hard stop for the suite (its own --budget should be
# ~60 s less so it ends by itself and writes its results).
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
name=$1; limit=$2; shift 2
t0=$(date +%s)
. benchmarks/fa4_setup.sh 2>&1 | tee "$OUT/$name.setup.log"
. benchmarks/fa4_setup.sh >/dev/null 2>&1 || { echo "setup failed"; exit 1; }  # exports in this shell (fast 2nd time)
echo "setup took $(( $(date +%s) - t0 )) s"
export XDIT_COGVIDEO_CACHE=/tmp/xdit-cache   # inductor + FA4 caches: kept while the machine stays warm
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,power.draw --format=csv | tee -a "$OUT/$name.setup.log"
set -o pipefail
timeout "$limit" python3 benchmarks/suite.py --out "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log" | \
  grep -v "Loading weights\|should be kept in float32"
echo "exit $? after $(( $(date +%s) - t0 )) s"
