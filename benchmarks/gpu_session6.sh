#!/bin/bash
# Session 6's device calls on nvidia-h200-x2 (issue 17), chained on one warm machine:
#   A carry [.whl, .fa4/p1]              wheels; random-weight folders 2b (GPU 0), 5b (GPU 1), then 1.5-5b (GPU 0)
#   B carry [.fa4/p2, .fa4/wheels]       after the load's GIL hand-off and the spares' flash-attn-4 import:
#     check: a process that imported flash-attn-4 holds no CUDA context (what a prestarted worker does)
#     GPU 0: cold_start.py 2b with prestarted workers on a compiled and on a never-compiled machine; then
#            first_step_profile.py 2b (cProfile of a new engine up to its first steps on the compiled caches);
#            load_bench.py 2b (ours with and without the hand-off, diffusers)
#     GPU 1: cold_start.py 5b (no second job) with prestarted workers
#   N2 (gpu_session5.sh N2): 1.5-5b whole jobs, diffusers on GPU 0 beside ours on GPU 1
# Then, after the compile prefetch and the spares' compiler imports, on a fresh machine:
#   A2 carry [.whl, .fa4/p1]             wheels; the 2b folder (GPU 0)
#   C  carry [.fa4/p2, .fa4/wheels]      GPU 0: cold_start.py 2b as in B (prestarted, compiled and never compiled)
#                                        GPU 1: pool_bench.py 2b, diffusers beside ours on cuDNN attention (no FA4)
# Planned for the next session on a fresh nvidia-h200-x2 (issue 17's rest), after A (wheels and all three folders):
#   D  carry [.fa4/p2, .fa4/wheels]      GPU 0: cold_start.py 2b again (the prefetch after its review, 4cd668b);
#                                        GPU 1: cold_start.py 5b (its prestarted job now with the prefetch)
#   N3 carry [.fa4/xfuser]               GPU 0: xfuser 0.7.0 on 1.5-5b per step, with and without its compile;
#                                        GPU 1: ours on 1.5-5b without flash-attn-4 (cuDNN), per step, beside diffusers
# And on one GPU (nvidia-h200), whether a prestarted GPU worker holds GPU memory before it is taken:
#   K1 carry [.whl, .fa4/p1]             wheels
#   K2 carry [.fa4/p2, .fa4/wheels]      spare_memory.py: GPU memory.used before / with a ready spare / with a CUDA context
# Raw logs and JSON under $OUT; BENCHMARKS.md "Session 6" has the tables made from them.
part=$1
PART_S=${PART_S:-570}
. benchmarks/gpu_session_lib.sh

if [ "$part" = A ]; then
  setup_first
  export PYTHONPATH=/tmp/site:$PWD
  ( build 0 2b; build 0 1.5-5b ) &
  build 1 5b &
  wait
  say "model folders built"; tail -qn 1 "$OUT"/A_build_*.log; du -sh /tmp/models/*; df -h /tmp | tail -1
fi

if [ "$part" = B ]; then
  ensure_env
  CUDA_VISIBLE_DEVICES=0 python3 - > "$OUT/B_fa4_import_context.log" 2>&1 <<'PY'
import os, subprocess, time
t = time.perf_counter()
import flash_attn.cute  # noqa: F401
import torch
took = time.perf_counter() - t
apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"], capture_output=True,
                      text=True).stdout.split()
print({"import_s": round(took, 2), "torch_cuda_initialized": torch.cuda.is_initialized(),
       "pid_holds_a_context": str(os.getpid()) in apps, "compute_apps": apps})
PY
  cat "$OUT/B_fa4_import_context.log" | tail -n 2
  clocks
  ( cold B_cold_2b 0 2b 360 --prestarted-never-compiled
    CUDA_VISIBLE_DEVICES=0 step B_first_step_2b 90 python3 benchmarks/first_step_profile.py --model 2b \
        --cache-root /tmp/cold --out "$OUT/B_first_step_2b.json"
    CUDA_VISIBLE_DEVICES=0 step B_load_2b 120 python3 benchmarks/load_bench.py --folder /tmp/models/2b --device cuda \
        --rows ours_transformer,ours_transformer_5ms,diffusers_transformer,diffusers_pipeline \
        --out "$OUT/B_load_2b.json" ) &
  cold B_cold_5b 1 5b 560 &
  wait_runs
  stop_clocks
fi
if [ "$part" = A2 ]; then
  setup_first
  export PYTHONPATH=/tmp/site:$PWD
  build 0 2b
  say "model folder built"; tail -qn 1 "$OUT"/A_build_*.log; du -sh /tmp/models/*
fi

if [ "$part" = K1 ]; then
  setup_first
fi

if [ "$part" = K2 ]; then
  ensure_env
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/spare_memory.py --out "$OUT/K2_spare_memory.json" 2>&1 | tail -n 3
fi

if [ "$part" = D ]; then
  ensure_env
  clocks
  cold D_cold_2b 0 2b 420 --prestarted-never-compiled &
  cold D_cold_5b 1 5b 570 &
  wait_runs
  stop_clocks
fi

if [ "$part" = N3 ]; then
  ensure_env
  install_xfuser
  ( CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/xdit:$PYTHONPATH step N3_xfuser_15 250 torchrun --nproc_per_node=1 \
        benchmarks/xfuser_bench.py --models 1.5-5b --steps 1.5-5b=4 --warmup 2 --budget @BUDGET@ \
        --out "$OUT/N3_xfuser_15.json"
    CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/xdit:$PYTHONPATH step N3_xfuser_15_compile 300 torchrun \
        --nproc_per_node=1 benchmarks/xfuser_bench.py --models 1.5-5b --steps 1.5-5b=4 --warmup 2 --compile \
        --budget @BUDGET@ --out "$OUT/N3_xfuser_15_compile.json" ) &
  CUDA_VISIBLE_DEVICES=1 step N3_cudnn_15 560 python3 benchmarks/pool_bench.py --models 1.5-5b --pools "0=1" \
      --attention cudnn --steps 8 --cold-steps 2 --models-dir /tmp/models --out "$OUT/N3_cudnn_15.json" &
  wait
fi

if [ "$part" = C ]; then
  ensure_env
  clocks
  cold C_cold_2b 0 2b 420 --prestarted-never-compiled &
  CUDA_VISIBLE_DEVICES=1 step C_cudnn_2b 300 python3 benchmarks/pool_bench.py --models 2b --pools "0=1" \
      --attention cudnn --cold-steps 2 --models-dir /tmp/models --out "$OUT/C_cudnn_2b.json" &
  wait_runs
  stop_clocks
fi
say "part $part done"
