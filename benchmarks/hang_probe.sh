#!/bin/bash
# Hang hunt for the 2-GPU benchmark (issue 18): the 2b layouts through benchmarks/multi_gpu.py with a short
# process-group timeout, NCCL warnings and every thread's stack dumped on a timer, first without compile/FA4,
# then with the default optimizations; then every layout through the pool on tiny-5b. Logs under $OUT.
#   bash benchmarks/hang_probe.sh        (on a 2-GPU machine, .whl carried)
export PYTHONUNBUFFERED=1 NCCL_DEBUG=WARN TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD STACKS_DIR=$OUT XDIT_COGVIDEO_CACHE=/tmp/xdit-cache
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'gpus', torch.cuda.device_count(), 'diffusers', diffusers.__version__)"
run() {  # name timeout args...
  local name=$1 limit=$2; shift 2; local t0=$(date +%s)
  STACKS_DIR=$OUT/$name; mkdir -p "$STACKS_DIR"; export STACKS_DIR
  timeout -k 5 "$limit" torchrun --nproc_per_node=2 benchmarks/multi_gpu.py --out "$OUT/$name.json" --models 2b \
      --layouts auto --steps 2b=3 --warmup 1 "$@" > "$OUT/$name.log" 2>&1
  local rc=$?; echo "== $name rc=$rc in $(( $(date +%s) - t0 )) s"; grep -v "Warning\|warnings.warn\|float32" "$OUT/$name.log" | tail -25
  return $rc
}
run plain 150 --optimize none --attention cudnn --pg-timeout 60 --stack-dump 40 && \
run compiled 240 --optimize auto --attention cudnn --pg-timeout 150 --stack-dump 60
t0=$(date +%s)
timeout -k 5 150 python3 benchmarks/pool_bench.py --tiny --pools "0,1" --layouts "1;cfg2;ulysses2;ring2" \
    --models 5b --steps 6 --cold-steps 2 --no-diffusers --out "$OUT/pool_tiny.json" > "$OUT/pool_tiny.log" 2>&1
echo "== pool_tiny rc=$? in $(( $(date +%s) - t0 )) s"; grep "^\[" "$OUT/pool_tiny.log" | cut -c1-300
