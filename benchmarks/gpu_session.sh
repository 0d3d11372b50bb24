#!/bin/bash
# One device session on nvidia-h200-x2 for issues 14, 15, 16 and 18's leftovers, in stages that each fit one device
# call; later stages need what the earlier ones set up (call each right after the last, while the machine is warm).
# Independent one-GPU benchmarks run side by side, one per GPU (CUDA_VISIBLE_DEVICES), to halve the device time.
#   S1 carry [.whl, .fa4/p1]                         wheels; the pool over 2 GPUs with tiny models (every layout);
#                                                    random full-size model folders 2b (GPU 0) and 5b (GPU 1)
#   S2 carry [.fa4/p2, .fa4/wheels, .fa4/xfuser]     FA4 set-up; GPU 0: formats_bench 5b (folder, native bf16,
#                                                    fp8 upcast) | GPU 1: lora_bench 5b rank 64; then xfuser ring 2
#                                                    with its cuDNN backend (its FA4 backend refuses ring)
#   S3 carry [.fa4/ffmpeg]                           GPU 0: memory_plans 2b | GPU 1: memory_plans 5b (card caps)
#   S4 (nothing)                                     FSDP over both GPUs (5b, 24 GiB cap); then GPU 0: formats_bench
#                                                    (fp8 resident, fp8 scaled) | GPU 1: pool_bench 5b on one GPU
stage=$1
export PYTHONUNBUFFERED=1 NCCL_DEBUG=WARN TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export XDIT_COGVIDEO_CACHE=/tmp/xdit-cache CU13X=/tmp/cu13x
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s)
say() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }
on() { local gpu=$1; shift; CUDA_VISIBLE_DEVICES=$gpu "$@"; }

if [ "$stage" = S1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  cp .fa4/p1/part.aa /tmp/cu13.part.aa
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
  timeout -k 5 150 python3 benchmarks/pool_bench.py --tiny --pools "0,1=1,cfg2,ulysses2,ring2" \
      --models 5b --steps 6 --cold-steps 2 --no-diffusers --models-dir /tmp/models --out "$OUT/S1_pool_tiny.json" \
      > "$OUT/S1_pool_tiny.log" 2>&1
  say "pool tiny rc=$?"; grep "^\[" "$OUT/S1_pool_tiny.log" | cut -c1-260
  for pair in 0:2b 1:5b; do
    on "${pair%%:*}" python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from pool_bench import build_folder
print(build_folder('${pair##*:}', Path('/tmp/models'), False, 'cuda:0'), flush=True)
" > "$OUT/S1_build_${pair##*:}.log" 2>&1 &
  done
  wait; say "model folders built"; tail -n 2 "$OUT"/S1_build_*.log; du -sh /tmp/models/*
fi

if [ "$stage" = S2 ]; then
  [ -f /tmp/cu13.part.aa ] || { echo "S1's files are gone (machine was given back): run S1 again"; exit 3; }
  cat /tmp/cu13.part.aa .fa4/p2/part.ab > /tmp/cu13.whl && mkdir -p $CU13X && python3 -m zipfile -e /tmp/cu13.whl $CU13X
  . benchmarks/fa4_setup.sh
  say "fa4 set up"
  on 0 timeout -k 5 330 python3 benchmarks/formats_bench.py --model 5b --device cuda --dir /tmp/formats \
      --out "$OUT/S2_formats_a.json" --steps 5 --formats diffusers-folder,native-bf16,fp8-upcast \
      > "$OUT/S2_formats_a.log" 2>&1 &
  on 1 timeout -k 5 330 python3 benchmarks/lora_bench.py --model 5b --rank 64 --steps 8 --out "$OUT/S2_lora_5b.json" \
      > "$OUT/S2_lora_5b.log" 2>&1 &
  wait; say "formats a + lora done"
  grep -v "Warning\|warn" "$OUT/S2_formats_a.log" | grep "^\[" | cut -c1-240; grep -v "Warning\|warn" "$OUT/S2_lora_5b.log" | tail -n 14
  PYTHONPATH=$XDIT_PATH:$PYTHONPATH timeout -k 5 150 torchrun --nproc_per_node=2 benchmarks/xfuser_bench.py \
      --out "$OUT/S2_xfuser_ring2_cudnn.json" --models 2b,5b --budget 130 --ring 2 --attention-backend CUDNN \
      > "$OUT/S2_xfuser_ring2_cudnn.log" 2>&1
  say "xfuser ring2 cudnn rc=$?"; grep "xfuser \(2b\|5b\)" "$OUT/S2_xfuser_ring2_cudnn.log" | cut -c1-300
fi

if [ "$stage" = S3 ] || [ "$stage" = S4 ]; then
  [ -f /tmp/site/.xdit_setup_done ] || { echo "S2's set-up is gone (machine was given back)"; exit 3; }
  . benchmarks/fa4_setup.sh > /dev/null
  [ -d /tmp/ffmpeg ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ffmpeg .fa4/ffmpeg/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/ffmpeg
fi

if [ "$stage" = S3 ]; then
  for pair in 0:2b 1:5b; do
    on "${pair%%:*}" timeout -k 5 540 python3 benchmarks/memory_plans.py --models "${pair##*:}" --steps 6 --budget 480 \
        --run-timeout 240 --out "$OUT/S3_mem_${pair##*:}.json" > "$OUT/S3_mem_${pair##*:}.log" 2>&1 &
  done
  wait; say "memory plans done"
  for m in 2b 5b; do grep "^\[" "$OUT/S3_mem_$m.log" | cut -c1-330; done
fi

if [ "$stage" = S4 ]; then
  timeout -k 5 200 torchrun --nproc_per_node=2 benchmarks/memory_plans.py --fsdp --models 5b --caps 24 --steps 6 \
      --out "$OUT/S4_fsdp2_5b.json" > "$OUT/S4_fsdp2_5b.log" 2>&1
  say "fsdp rc=$?"; grep "^\[" "$OUT/S4_fsdp2_5b.log" | cut -c1-330
  on 0 timeout -k 5 240 python3 benchmarks/formats_bench.py --model 5b --device cuda --dir /tmp/formats \
      --out "$OUT/S4_formats_b.json" --steps 5 --formats fp8-resident,fp8-scaled-upcast > "$OUT/S4_formats_b.log" 2>&1 &
  on 1 timeout -k 5 250 python3 benchmarks/pool_bench.py --models 5b --pools "0=1" --cold-steps 2 \
      --models-dir /tmp/models --out "$OUT/S4_pool_5b_1gpu.json" > "$OUT/S4_pool_5b_1gpu.log" 2>&1 &
  wait; say "formats b + pool 5b done"
  grep "^\[" "$OUT/S4_formats_b.log" | cut -c1-240; grep "^\[" "$OUT/S4_pool_5b_1gpu.log" | cut -c1-300
fi
say "stage $stage done"
