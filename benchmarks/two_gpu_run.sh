#!/bin/bash
# The 2-GPU run of issue 18 on nvidia-h200-x2, in stages that each fit one device call; later stages need the
# machine the earlier ones prepared (call each right after the last, while the machine is warm). Logs under $OUT.
#   A  carry [.whl, .fa4/p1]          hang-fix check through the pool (tiny, one rank of two, then every
#                                     layout), then random full-size model folders (2b, 5b)
#   B  carry [.fa4/p2, .fa4/wheels, .fa4/xfuser]   FA4 set-up; multi_gpu.py (every layout vs 1 GPU, both models);
#                                     xfuser 0.7.0 at 2 GPUs (cfg, ulysses 2, ring 2)
#   C  carry [.fa4/ffmpeg]            pool_bench 2b (diffusers, 1 GPU, 2 GPUs x layouts, whole 50-step jobs);
#                                     one CLI job on --gpus 0,1
#   D  (nothing)                      pool_bench 5b (diffusers and 2 GPUs; 1-GPU s/step comes from stage B)
#   E  carry [.fa4/p2, .fa4/wheels, .whl] after a call that left /tmp/cu13.part.aa (A, or just
#                                     `cp .fa4/p1/part.aa /tmp/cu13.part.aa` with carry [.fa4/p1]): the copy-free
#                                     Ulysses/Ring attention as the code stands: multi_gpu.py 2b and 5b, 1 GPU vs
#                                     ulysses2 and ring2 (~4 min), then a torch.profiler breakdown of 5b (~3 min)
# .fa4/p1 and .fa4/p2 are the two halves of the nvidia-cutlass-dsl-libs-cu13 wheel (`split -b 46M`; 92 MB is over
# one call's carry); fa4_setup.sh says how to make the other folders.
stage=$1
export PYTHONUNBUFFERED=1 NCCL_DEBUG=WARN TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export XDIT_COGVIDEO_CACHE=/tmp/xdit-cache CU13X=/tmp/cu13x
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s)
say() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }
filter() { grep -v "Warning\|warnings.warn\|float32\|Loading\|it/s\]" ; }

if [ "$stage" = A ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  cp .fa4/p1/part.aa /tmp/cu13.part.aa
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
  timeout -k 5 150 python3 benchmarks/pool_bench.py --tiny --pools "0,1=1,cfg2,ulysses2,ring2" \
      --models 5b --steps 6 --cold-steps 2 --no-diffusers --models-dir /tmp/models --out "$OUT/A_pool_tiny.json" \
      > "$OUT/A_pool_tiny.log" 2>&1
  say "pool tiny rc=$?"; grep "^\[" "$OUT/A_pool_tiny.log" | cut -c1-260
  python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from pool_bench import build_folder
for name in ('2b', '5b'):
    print(build_folder(name, Path('/tmp/models'), False, 'cuda:0'), flush=True)
"
  say "model folders built"; du -sh /tmp/models/*
fi

if [ "$stage" = B ]; then
  [ -f /tmp/cu13.part.aa ] || { echo "stage A's files are gone (machine was given back): run A again"; exit 3; }
  cat /tmp/cu13.part.aa .fa4/p2/part.ab > /tmp/cu13.whl && mkdir -p $CU13X && python3 -m zipfile -e /tmp/cu13.whl $CU13X
  . benchmarks/fa4_setup.sh
  say "fa4 set up"
  timeout -k 5 250 torchrun --nproc_per_node=2 benchmarks/multi_gpu.py --out "$OUT/B_multi_gpu.json" \
      --models 2b,5b --layouts auto --steps 2b=7,5b=6 --warmup 2 --pg-timeout 200 --budget 215 --bandwidth \
      > "$OUT/B_multi_gpu.log" 2>&1
  say "multi_gpu rc=$?"; grep "^\[ \|bandwidth" "$OUT/B_multi_gpu.log"
  for flags in "--cfg" "--ulysses 2" "--ring 2"; do
    name=$(echo "$flags" | tr -d ' -')
    PYTHONPATH=$XDIT_PATH:$PYTHONPATH timeout -k 5 85 torchrun --nproc_per_node=2 benchmarks/xfuser_bench.py \
        --out "$OUT/B_xfuser_$name.json" --models 2b,5b --budget 75 $flags > "$OUT/B_xfuser_$name.log" 2>&1
    say "xfuser $flags rc=$?"; grep "xfuser \(2b\|5b\)" "$OUT/B_xfuser_$name.log" | cut -c1-300
  done
fi

if [ "$stage" = E ]; then
  if [ ! -f /tmp/site/.xdit_setup_done ]; then
    [ -f /tmp/cu13.part.aa ] || { echo "no /tmp/cu13.part.aa: run A (or cp .fa4/p1/part.aa) first"; exit 3; }
    cat /tmp/cu13.part.aa .fa4/p2/part.ab > /tmp/cu13.whl && mkdir -p $CU13X && python3 -m zipfile -e /tmp/cu13.whl $CU13X
  fi
  . benchmarks/fa4_setup.sh
  say "fa4 set up"
  timeout -k 5 250 torchrun --nproc_per_node=2 benchmarks/multi_gpu.py --out "$OUT/E_multi_gpu.json" \
      --models 2b,5b --layouts "ulysses2;ring2" --steps 2b=7,5b=6 --warmup 2 --pg-timeout 200 --budget 230 \
      > "$OUT/E_multi_gpu.log" 2>&1
  say "multi_gpu rc=$?"; grep "^\[ " "$OUT/E_multi_gpu.log"
  timeout -k 5 250 torchrun --nproc_per_node=2 benchmarks/profile_layouts.py --out "$OUT/E_prof_5b.json" --model 5b \
      --layouts "1;ulysses2;ring2" > "$OUT/E_prof_5b.log" 2>&1
  say "profile rc=$?"; grep "^rank 0" "$OUT/E_prof_5b.log" | cut -c1-400
fi

if [ "$stage" = C ] || [ "$stage" = D ]; then
  [ -f /tmp/site/.xdit_setup_done ] || { echo "stage B's set-up is gone (machine was given back)"; exit 3; }
  . benchmarks/fa4_setup.sh > /dev/null
fi

if [ "$stage" = C ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ffmpeg .fa4/ffmpeg/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/ffmpeg
  timeout -k 5 330 python3 benchmarks/pool_bench.py --models 2b --pools "0=1;0,1=cfg2,ulysses2,ring2" --cold-steps 2 \
      --models-dir /tmp/models --out "$OUT/C_pool_2b.json" > "$OUT/C_pool_2b.log" 2>&1
  say "pool_bench 2b rc=$?"; grep "^\[" "$OUT/C_pool_2b.log" | cut -c1-400
  [ -n "$SKIP_CLI" ] || /usr/bin/time -v timeout -k 5 150 python3 -m comfyui_xdit_cogvideo generate --model /tmp/models/2b --gpus 0,1 \
      --prompt "a red fox running through fresh snow" --steps 50 --output "$OUT/C_cli_2gpu.mp4" \
      > "$OUT/C_cli.log" 2> "$OUT/C_cli.err"
  say "CLI rc=$?"; cat "$OUT/C_cli.log"; grep -v "^\s" "$OUT/C_cli.err" | tail -5; grep "Elapsed" "$OUT/C_cli.err"
fi

if [ "$stage" = D ]; then
  timeout -k 5 500 python3 benchmarks/pool_bench.py --models 5b --pools "0,1=cfg2,ulysses2,ring2" --cold-steps 2 \
      --models-dir /tmp/models --out "$OUT/D_pool_5b.json" > "$OUT/D_pool_5b.log" 2>&1
  say "pool_bench 5b rc=$?"; grep "^\[" "$OUT/D_pool_5b.log" | cut -c1-400
fi
say "stage $stage done"
