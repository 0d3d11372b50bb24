#!/bin/bash
# Session 5's last device call on nvidia-h200-x2 (issues 17 and 18), on a fresh machine after
# `bash benchmarks/gpu_session4.sh S` (carry .whl .fa4/p1: wheels, model folders):
#   W carry [.fa4/p2, .fa4/wheels, .fa4/xfuser]
#     GPU 0: cold_start.py 2b: plain diffusers' first job, a never-compiled machine, a compiled machine, the same
#            with prestarted worker processes (spares), a warm job
#     then both GPUs: xfuser 0.7.0 ring 2 with cuDNN attention (its FLASH_4 backend refuses ring parallelism)
# Raw logs and JSON under $OUT; BENCHMARKS.md "Session 5" has the tables made from them.
part=$1
export NCCL_DEBUG=WARN TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PART_S=${PART_S:-420}
. benchmarks/gpu_session_lib.sh

if [ "$part" = W ]; then
  ensure_env
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/xdit \
      .fa4/xfuser/*.whl || { echo "W: carry .fa4/xfuser"; exit 3; }
  nvidia-smi --query-gpu=index,clocks.sm,power.draw,utilization.gpu,clocks_event_reasons.active --format=csv \
      -lms 500 > "$OUT/W_clocks.csv" 2>&1 &
  CLOCKS_PID=$!
  CUDA_VISIBLE_DEVICES=0 step W_cold_2b 300 python3 benchmarks/cold_start.py --models 2b --models-dir /tmp/models \
      --cache-root /tmp/cold --no-second-job --out "$OUT/W_cold_2b.json"
  PYTHONPATH=/tmp/xdit:$PYTHONPATH step W_xfuser_ring_cudnn 110 torchrun --nproc_per_node=2 \
      benchmarks/xfuser_bench.py --ring 2 --attention-backend CUDNN --models 2b,5b --steps 2b=6,5b=5 --warmup 2 \
      --budget @BUDGET@ --out "$OUT/W_xfuser_ring_cudnn.json"
  kill "$CLOCKS_PID" 2>/dev/null
fi
say "part $part done"
