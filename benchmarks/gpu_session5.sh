#!/bin/bash
# Session 5's last device call on nvidia-h200-x2 (issues 17 and 18), on a fresh machine after
# `bash benchmarks/gpu_session4.sh S` (carry .whl .fa4/p1: wheels, model folders):
#   W carry [.fa4/p2, .fa4/wheels, .fa4/xfuser]
#     GPU 0: cold_start.py 2b: plain diffusers' first job, a never-compiled machine, a compiled machine, the same
#            with prestarted worker processes (spares), a warm job
#     then both GPUs: xfuser 0.7.0 ring 2 with cuDNN attention (its FLASH_4 backend refuses ring parallelism)
# Raw logs and JSON under $OUT; BENCHMARKS.md "Session 5" has the tables made from them.
# Planned for the next session (issue 17's 1.5-5b whole jobs, not run yet), two calls on a fresh nvidia-h200-x2:
#   N1 carry [.whl, .fa4/p1]                 wheels; the 1.5-5b random-weight folder (GPU 0)
#   N2 carry [.fa4/p2, .fa4/wheels]          GPU 0: plain diffusers' 1.5-5b jobs (cold short job, then 50 steps);
#                                            GPU 1: ours (new pool: short job, then 50 steps), same folder
part=$1
PART_S=${PART_S:-420}
. benchmarks/gpu_session_lib.sh

if [ "$part" = W ]; then
  ensure_env
  install_xfuser
  clocks
  CUDA_VISIBLE_DEVICES=0 step W_cold_2b 300 python3 benchmarks/cold_start.py --models 2b --models-dir /tmp/models \
      --cache-root /tmp/cold --no-second-job --out "$OUT/W_cold_2b.json"
  PYTHONPATH=/tmp/xdit:$PYTHONPATH step W_xfuser_ring_cudnn 110 torchrun --nproc_per_node=2 \
      benchmarks/xfuser_bench.py --ring 2 --attention-backend CUDNN --models 2b,5b --steps 2b=6,5b=5 --warmup 2 \
      --budget @BUDGET@ --out "$OUT/W_xfuser_ring_cudnn.json"
  stop_clocks
fi
if [ "$part" = N1 ]; then
  setup_first
  export PYTHONPATH=/tmp/site:$PWD
  CUDA_VISIBLE_DEVICES=0 python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from pool_bench import build_folder
print(build_folder('1.5-5b', Path('/tmp/models'), False, 'cuda:0'), flush=True)
" > "$OUT/N1_build_15.log" 2>&1
  tail -n 1 "$OUT/N1_build_15.log"; du -sh /tmp/models/*
fi

if [ "$part" = N2 ]; then
  ensure_env
  CUDA_VISIBLE_DEVICES=0 step N2_diffusers_15 540 python3 benchmarks/pool_bench.py --models 1.5-5b --pools "" \
      --cold-steps 2 --models-dir /tmp/models --out "$OUT/N2_diffusers_15.json" &
  CUDA_VISIBLE_DEVICES=1 step N2_ours_15 540 python3 benchmarks/pool_bench.py --models 1.5-5b --no-diffusers \
      --pools "0=1" --cold-steps 2 --models-dir /tmp/models --out "$OUT/N2_ours_15.json" &
  wait
fi
say "part $part done"
