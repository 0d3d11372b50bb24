#!/bin/bash
# Two-GPU device session (kind nvidia-h200-x2): the memory plan 'low' (FSDP2 over both ranks) for real, 5b, whole
# 49 x 480 x 720 jobs (T5-XXL encode on rank 0, 50 steps, VAE decode spread over the ranks), each rank capped like a
# 24 GiB and a 16 GiB card, with CFG parallel (cfg2 + FSDP) and with Ulysses (ulysses2 + FSDP). Per-rank peaks per
# phase, s/step and phase times in $OUT/fsdp_5b.json. Usage: bash benchmarks/gpu_session_fsdp.sh PART
#
#   part   carry                            what                                                       estimate
#   setup  [".whl", ".fa4/p1"]              wheels, first half of the cu13 wheel                        ~30 s
#   fsdp   [".fa4/p2", ".fa4/wheels"]       (finishes the FA4 set-up) torchrun 2 ranks: 24 GiB cfg2,    ~6-7 min
#                                           24 GiB ulysses2, 16 GiB cfg2, 16 GiB ulysses2 (in that order;
#                                           what the budget cannot fit is skipped and listed)
part=$1
cd "$(dirname "$0")/.." || exit 3
. benchmarks/gpu_session_lib.sh
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1}
STEPS=${STEPS:-50}
[ -n "$SMOKE" ] && STEPS=3

case "$part" in
  setup)
    [ -n "$SMOKE" ] || setup_first ;;
  fsdp)
    ensure_env
    step fsdp_5b 480 torchrun --nproc_per_node=2 benchmarks/memory_plans.py --fsdp --models 5b --caps 24,16 \
        --layouts cfg2,ulysses2 --steps "$STEPS" --pg-timeout 120 --budget @BUDGET@ --out "$OUT/fsdp_5b.json" $TINY ;;
  *)
    echo "usage: $0 setup|fsdp"; exit 2 ;;
esac
say "part $part done"
