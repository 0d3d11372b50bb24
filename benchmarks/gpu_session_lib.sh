# Shared by the gpu_session*.sh scripts (sourced, not run): the FA4 set-up in two device calls,
# a per-part clock, `step` (one benchmark under its own `timeout`, cut to what the part has left), the GPU clock
# logger `clocks` with `wait_runs` and `stop_clocks`, `install_xfuser`, `build` (a random-weight model folder),
# `cold` (cold_start.py on one GPU), `xfuser` (xfuser_bench.py on one GPU), and the NCCL settings every part
# runs with.
#
# Set-up (the machine must stay warm between the calls; a fresh machine needs both again):
#   part setup   carry [".whl", ".fa4/p1"]          project wheels into /tmp/site; first half of the cu13 wheel
#   next part    carry [".fa4/p2", ".fa4/wheels"]   second half, unpack, flash-attn-4 (benchmarks/fa4_setup.sh)
# No model folders are needed: every benchmark here builds random full-size weights on the GPU.
# SMOKE=1 runs the same steps on the CPU with the tiny models (checks this shell logic without a GPU).

export PYTHONUNBUFFERED=1 XDIT_COGVIDEO_CACHE=${XDIT_COGVIDEO_CACHE:-/tmp/xdit-cache} CU13X=/tmp/cu13x
export NCCL_DEBUG=WARN TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PART_S=${PART_S:-520}   # seconds one part may take (a device call allows at most 600 s; keep a margin)
T0=$(date +%s)
say() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }
left() { echo $(( PART_S - ($(date +%s) - T0) )); }

if [ -n "$SMOKE" ]; then
  TINY="--tiny --device cpu"
else
  TINY=""
fi

setup_first() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "setup: .whl wheels did not install (carry .whl)"; exit 3; }
  cp .fa4/p1/part.aa /tmp/cu13.part.aa || { echo "setup: carry .fa4/p1"; exit 3; }
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
  df -h /tmp | tail -1
  say "setup (first half) done"
}

ensure_env() {
  [ -n "$SMOKE" ] && { export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}; return 0; }
  if [ ! -f /tmp/site/.xdit_setup_done ]; then
    [ -f /tmp/cu13.part.aa ] || { echo "no set-up here: run part 'setup' first (carry .whl, .fa4/p1)"; exit 3; }
    [ -f .fa4/p2/part.ab ] || { echo "set-up unfinished: carry .fa4/p2 and .fa4/wheels with this part"; exit 3; }
    cat /tmp/cu13.part.aa .fa4/p2/part.ab > /tmp/cu13.whl && mkdir -p $CU13X && \
      python3 -m zipfile -e /tmp/cu13.whl $CU13X
  fi
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  . benchmarks/fa4_setup.sh || { echo "FA4 set-up failed"; exit 3; }
  say "environment ready"
}

# step NAME LIMIT_S CMD...: run CMD under `timeout`, cut to what the part has left; "@BUDGET@" in CMD becomes the
# seconds the command may plan with (its own limit minus 40 s for the interpreter start and a margin). Skipped when
# less than 90 s are left. Output goes to $OUT/NAME.log; its last lines (without warnings) are echoed.
step() {
  local name=$1 limit=$2; shift 2
  local have; have=$(left)
  [ "$have" -lt "$limit" ] && limit=$have
  if [ "$limit" -lt 90 ]; then say "SKIP $name: only ${have} s left in this part"; return 0; fi
  local budget=$(( limit - 40 )) args=() a
  for a in "$@"; do args+=("${a//@BUDGET@/$budget}"); done
  say "$name (limit ${limit} s): ${args[*]}"
  timeout -k 10 "$limit" "${args[@]}" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -av "Warning\|warnings.warn\|Loading\|it/s\]\|float32\|^\s*$" "$OUT/$name.log" | cut -c1-300 | tail -30
  say "$name rc=$rc$([ $rc = 124 ] && echo ' (timed out)')"
}

# clocks: log SM clock, power and throttle reasons every 0.5 s to $OUT/<part>_clocks.csv in the background.
clocks() {
  local q="index,timestamp,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,utilization.gpu"
  if nvidia-smi --query-gpu=$q,clocks_event_reasons.active --format=csv,noheader >/dev/null 2>&1; then
    q="$q,clocks_event_reasons.active"
  fi
  nvidia-smi --query-gpu=$q --format=csv -lms 500 > "$OUT/${part}_clocks.csv" 2>&1 &
  CLOCKS_PID=$!
}
# wait for the benchmarks only (a bare `wait` would also wait for the endless clock logger)
wait_runs() { local j; for j in $(jobs -p); do [ "$j" = "$CLOCKS_PID" ] || wait "$j"; done; }
stop_clocks() { [ -n "$CLOCKS_PID" ] && kill "$CLOCKS_PID" 2>/dev/null; }

# install_xfuser: xfuser 0.7.0 and its own dependencies into /tmp/xdit (the part carries .fa4/xfuser)
install_xfuser() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/xdit \
      .fa4/xfuser/*.whl || { echo "part $part: carry .fa4/xfuser"; exit 3; }
}

# cold NAME GPU MODEL LIMIT [ARGS...]: cold_start.py for MODEL on GPU (no second job; the caches under /tmp/cold)
cold() {
  local name=$1 gpu=$2 model=$3 limit=$4; shift 4
  CUDA_VISIBLE_DEVICES=$gpu step "$name" "$limit" python3 benchmarks/cold_start.py --models "$model" --no-second-job \
      --models-dir /tmp/models --cache-root /tmp/cold "$@" --out "$OUT/$name.json"
}
# build GPU MODEL: pool_bench.build_folder's random-weight diffusers folder under /tmp/models
build() {
  CUDA_VISIBLE_DEVICES=$1 python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from pool_bench import build_folder
print(build_folder('$2', Path('/tmp/models'), False, 'cuda:0'), flush=True)
" > "$OUT/A_build_$2.log" 2>&1
}
# xfuser NAME GPU LIMIT ARGS...: xfuser_bench.py on one GPU under torchrun (one rendezvous port per GPU, so two
# run side by side; session 7's N3 lost one to EADDRINUSE)
xfuser() {
  local name=$1 gpu=$2 limit=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu PYTHONPATH=/tmp/xdit:$PYTHONPATH step "$name" "$limit" torchrun --nproc_per_node=1 \
      --master_port=$((29500 + gpu)) benchmarks/xfuser_bench.py "$@" --out "$OUT/$name.json"
}
