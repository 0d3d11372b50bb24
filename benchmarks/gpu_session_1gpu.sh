#!/bin/bash
# One-GPU device session (kind nvidia-h200, CUDA_VISIBLE_DEVICES=0) for issues 14, 15 and 16, in parts that each fit
# one device call. Every benchmark runs under its own `timeout`, cut to what the part has left (PART_S, default
# 520 s); JSON results and logs go to $OUT. Usage: bash benchmarks/gpu_session_1gpu.sh PART
#
#   part   carry                            what                                                       estimate
#   setup  [".whl", ".fa4/p1"]              wheels, first half of the cu13 wheel                        ~30 s
#   1      [".fa4/p2", ".fa4/wheels"]       (finishes the FA4 set-up) formats_bench 5b: diffusers-folder,  ~6 min
#                                           native-bf16, fp8-upcast, fp8-resident, fp8-scaled-upcast
#   2      (none)                           lora_bench 5b rank 64; memory_plans 2b: uncapped fast       ~7.5 min
#                                           reference, auto's pick at 12, 16 and 24 GiB (full 50-step jobs)
#   3      (none)                           memory_plans 5b: reference, auto at 16 and 24 GiB           ~7 min
#   4      (none)                           memory_plans 5b: auto at 12 GiB (offload, T5 on the CPU);   ~7 min
#                                           lora_bench 5b under the offload plan (a LoRA merged into
#                                           group-offloaded blocks with CUDA streams)
# Parts 2-4 need only the set-up (the machine warm since 'setup'); whichever part runs first after 'setup' carries
# [".fa4/p2", ".fa4/wheels"]. Estimates: the measured s/step (2b 0.44, 5b 1.19) and session 3's per-run overheads
# (memory_plans.py: estimated_seconds); the scripts skip what their --budget cannot fit (listed in the JSON), so a
# part never overruns its call. The memory_plans jobs are full 49 x 480 x 720 jobs: a random full-size T5-XXL
# encode, 50 steps, the VAE decode, each under set_per_process_memory_fraction for its card.
part=$1
cd "$(dirname "$0")/.." || exit 3
. benchmarks/gpu_session_lib.sh
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
STEPS=${STEPS:-50}
[ -n "$SMOKE" ] && STEPS=3

mem() {  # mem NAME LIMIT ARGS...: memory_plans.py with the shared flags
  local name=$1 limit=$2; shift 2
  step "$name" "$limit" python3 benchmarks/memory_plans.py --out "$OUT/$name.json" --steps "$STEPS" \
      --budget @BUDGET@ $TINY "$@"
}

case "$part" in
  setup)
    [ -n "$SMOKE" ] || setup_first ;;
  1)
    ensure_env
    reuse=""; [ -f /tmp/models/5b/transformer/config.json ] && reuse="--reuse /tmp/models/5b"
    step formats_5b 470 python3 benchmarks/formats_bench.py --model 5b --dir /tmp/formats --steps 6 \
        --out "$OUT/formats_5b.json" --budget @BUDGET@ --per-format 70 $reuse $TINY
    rm -rf /tmp/formats  # ~22-33 GB of disk the later parts do not need
    ;;
  2)
    ensure_env
    step lora_5b 140 python3 benchmarks/lora_bench.py --model 5b --rank 64 --steps 8 --out "$OUT/lora_5b.json" $TINY
    mem mem_2b 370 --models 2b --caps 24,16,12 --plans auto ;;
  3)
    ensure_env
    mem mem_5b_24_16 470 --models 5b --caps 24,16 --plans auto ;;
  4)
    ensure_env
    mem mem_5b_12 250 --models 5b --caps 12 --plans auto --no-reference
    step lora_5b_offload 220 python3 benchmarks/lora_bench.py --model 5b --rank 64 --steps 4 --memory offload \
        --out "$OUT/lora_5b_offload.json" $TINY ;;
  *)
    echo "usage: $0 setup|1|2|3|4"; exit 2 ;;
esac
say "part $part done"
