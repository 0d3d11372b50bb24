#!/bin/bash
# Session 4 on nvidia-h200-x2 (issues 17 and 18): three device calls, each right after the last while the machine
# is warm. One-GPU benchmarks run side by side, one per GPU (CUDA_VISIBLE_DEVICES); every part logs the GPUs'
# clocks, power and throttle reasons twice a second ($OUT/<part>_clocks.csv) to explain sustained kernel speed.
#   T1 carry [.whl, .fa4/p1, .fa4/xfuser]   wheels, xfuser; no flash-attn-4 yet, i.e. the install without it:
#        GPU 0: pool_bench 2b (plain diffusers whole job vs the pool's, cuDNN attention), then xfuser 0.7.0 with
#               --use_torch_compile per step (2b, 5b) | GPU 1: pool_bench 5b (the same)
#   T2 carry [.fa4/p2, .fa4/wheels]         FA4 set-up; GPU 0: cold_start 2b (never-compiled machine, compiled
#               machine, warm), then xfuser --use_torch_compile whole jobs 2b | GPU 1: cold_start 5b
#   T3 (nothing; check out the branch under test first)   multi_gpu.py ulysses2 / ring2 vs 1 GPU, 2b and 5b
#               (latents compared); xfuser cfg parallel with --use_torch_compile on both GPUs
# Raw logs and JSON under $OUT; BENCHMARKS.md "Session 4" has the tables made from them.
# The next run (what session 4 built after its measurements: load, decode, the compile policy on Ulysses/Ring):
#   S  carry [.whl, .fa4/p1]                wheels; model folders 2b (GPU 0) and 5b (GPU 1), built side by side
#   U2 carry [.fa4/p2, .fa4/wheels]         FA4 set-up; GPU 0: cold_start 2b, then load_bench 2b | GPU 1: cold_start 5b
#   U3 (nothing)                            both GPUs: multi_gpu.py ulysses2/ring2 under compile=auto (the pool's
#               default); decode_bench (pools 0 and 0,1); pool_bench 2b ulysses2/ring2; a 5b profile of both
part=$1
PART_S=${PART_S:-555}
. benchmarks/gpu_session_lib.sh


if [ "$part" = T1 ]; then
  setup_first
  install_xfuser
  export PYTHONPATH=/tmp/site:$PWD
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
  clocks
  ( CUDA_VISIBLE_DEVICES=0 step T1_pool_2b 280 python3 benchmarks/pool_bench.py --models 2b --pools "0=1" \
        --cold-steps 2 --models-dir /tmp/models --out "$OUT/T1_pool_2b.json"
    CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/xdit:$PYTHONPATH step T1_xfuser_compile 270 torchrun --nproc_per_node=1 \
        benchmarks/xfuser_bench.py --compile --models 2b,5b --steps 2b=8,5b=7 --warmup 3 --budget @BUDGET@ \
        --out "$OUT/T1_xfuser_compile.json" ) &
  CUDA_VISIBLE_DEVICES=1 step T1_pool_5b 540 python3 benchmarks/pool_bench.py --models 5b --pools "0=1" \
      --cold-steps 2 --models-dir /tmp/models --out "$OUT/T1_pool_5b.json" &
  wait_runs
  du -sh /tmp/models/*
fi

if [ "$part" = T2 ]; then
  ensure_env
  clocks
  ( CUDA_VISIBLE_DEVICES=0 step T2_cold_2b 340 python3 benchmarks/cold_start.py --models 2b --models-dir /tmp/models \
        --cache-root /tmp/cold --out "$OUT/T2_cold_2b.json"
    CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$XDIT_PATH:$PYTHONPATH step T2_xfuser_compile_jobs 210 torchrun \
        --nproc_per_node=1 benchmarks/xfuser_bench.py --compile --whole-job /tmp/models --models 2b \
        --budget @BUDGET@ --out "$OUT/T2_xfuser_compile_jobs.json" ) &
  CUDA_VISIBLE_DEVICES=1 step T2_cold_5b 550 python3 benchmarks/cold_start.py --models 5b --no-second-job \
      --models-dir /tmp/models --cache-root /tmp/cold --out "$OUT/T2_cold_5b.json" &
  wait_runs
fi

if [ "$part" = T3 ]; then
  [ -f /tmp/site/.xdit_setup_done ] || { echo "T3: the set-up of T1/T2 is gone (machine was given back)"; exit 3; }
  ensure_env
  echo "attention module: $(grep -c pack_qkv comfyui_xdit_cogvideo/parallel/attention.py) pack_qkv lines (0 = main, >0 = the copy-free branch)"
  clocks
  step T3_multi_gpu 260 torchrun --nproc_per_node=2 benchmarks/multi_gpu.py --out "$OUT/T3_multi_gpu.json" \
      --models 2b,5b --layouts "ulysses2;ring2" --steps 2b=7,5b=6 --warmup 2 --pg-timeout 200 --budget @BUDGET@
  PYTHONPATH=$XDIT_PATH:$PYTHONPATH step T3_xfuser_cfg_compile 240 torchrun --nproc_per_node=2 \
      benchmarks/xfuser_bench.py --cfg --compile --models 2b,5b --steps 2b=8,5b=7 --warmup 3 --budget @BUDGET@ \
      --out "$OUT/T3_xfuser_cfg_compile.json"
fi
if [ "$part" = S ]; then
  setup_first
  export PYTHONPATH=/tmp/site:$PWD
  for pair in 0:2b 1:5b; do
    CUDA_VISIBLE_DEVICES=${pair%%:*} python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from pool_bench import build_folder
print(build_folder('${pair##*:}', Path('/tmp/models'), False, 'cuda:0'), flush=True)
" > "$OUT/S_build_${pair##*:}.log" 2>&1 &
  done
  wait
  say "model folders built"; tail -n 1 "$OUT"/S_build_*.log; du -sh /tmp/models/*
fi

if [ "$part" = U2 ]; then
  ensure_env
  clocks
  ( CUDA_VISIBLE_DEVICES=0 step U2_cold_2b 340 python3 benchmarks/cold_start.py --models 2b --models-dir /tmp/models \
        --cache-root /tmp/cold --out "$OUT/U2_cold_2b.json"
    CUDA_VISIBLE_DEVICES=0 step U2_load_2b 150 python3 benchmarks/load_bench.py --folder /tmp/models/2b --device cuda \
        --out "$OUT/U2_load_2b.json" ) &
  CUDA_VISIBLE_DEVICES=1 step U2_cold_5b 540 python3 benchmarks/cold_start.py --models 5b --no-second-job \
      --models-dir /tmp/models --cache-root /tmp/cold --out "$OUT/U2_cold_5b.json" &
  wait_runs
fi

if [ "$part" = U3 ]; then
  [ -f /tmp/site/.xdit_setup_done ] || { echo "U3: the set-up of S/U2 is gone (machine was given back)"; exit 3; }
  ensure_env
  clocks
  XDIT_COGVIDEO_COMPILE=auto step U3_multi_gpu_auto 200 torchrun --nproc_per_node=2 benchmarks/multi_gpu.py \
      --out "$OUT/U3_multi_gpu_auto.json" --models 2b,5b --layouts "ulysses2;ring2" --steps 2b=7,5b=6 --warmup 2 \
      --pg-timeout 150 --budget @BUDGET@
  step U3_decode 150 python3 benchmarks/decode_bench.py --out "$OUT/U3_decode.json" --models 2b,5b --pools "0;0,1"
  step U3_pool_u2r2 170 python3 benchmarks/pool_bench.py --models 2b --pools "0,1=ulysses2,ring2" --cold-steps 2 \
      --no-diffusers --models-dir /tmp/models --out "$OUT/U3_pool_u2r2.json"
  step U3_prof_5b 150 torchrun --nproc_per_node=2 benchmarks/profile_layouts.py --out "$OUT/U3_prof_5b.json" \
      --model 5b --layouts "1;ulysses2;ring2"
fi
stop_clocks
say "part $part done"
