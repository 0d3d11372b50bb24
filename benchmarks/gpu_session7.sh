#!/bin/bash
# Session 7's device calls on nvidia-h200-x2 (issue 17's rest), chained on one warm machine:
#   A  = `gpu_session6.sh A`, carry [.whl, .fa4/p1]: wheels; random-weight folders 2b, 5b and 1.5-5b
#   D7 carry [.fa4/p2, .fa4/wheels, .fa4/xfuser]   the shared construction lock and the first prompt encoded by the
#                                                  T5 preload (this session's code):
#      GPU 0: cold_start.py 2b, every stage (prestarted workers on a never-compiled machine too); then xfuser 0.7.0's
#             whole jobs on 2b without its compile (two 50-step jobs after its load)
#      GPU 1: cold_start.py 5b: diffusers, a never-compiled machine, prestarted workers on the compiled machine (the
#             compile prefetch) and on a never-compiled one
#   N3 carry [.fa4/xfuser]  GPU 0: xfuser --use_torch_compile whole jobs on 1.5-5b (a 2-step first job pays the
#                                  compile; the second, 50 steps, is its warm job)
#                           GPU 1: diffusers' first job on 1.5-5b (load + 50 steps + decode, a fresh process);
#                                  xfuser per step on 1.5-5b without its compile
#   N4 carry []             GPU 0: ours on 1.5-5b without flash-attn-4 (cuDNN SDPA): a new pool's 2-step job, then
#                                  a warm 50-step job
#                           GPU 1: ours' 50-step first job on 1.5-5b, prestarted workers, never-compiled machine
# Raw logs and JSON under $OUT; BENCHMARKS.md "Session 7" has the tables made from them.
part=$1
PART_S=${PART_S:-565}
. benchmarks/gpu_session_lib.sh

if [ "$part" = D7 ]; then
  ensure_env
  install_xfuser
  clocks
  ( cold D7_cold_2b 0 2b 400 --prestarted-never-compiled
    xfuser D7_xfuser_2b_jobs 0 170 --whole-job /tmp/models --models 2b ) &
  cold D7_cold_5b 1 5b 565 --stages diffusers,never_compiled,prestarted,prestarted_never_compiled &
  wait_runs
  stop_clocks
fi

if [ "$part" = N3 ]; then
  ensure_env
  install_xfuser
  clocks
  xfuser N3_xfuser_15_compile_jobs 0 565 --whole-job /tmp/models --models 1.5-5b --compile --first-job-steps 2 &
  ( cold N3_diffusers_15 1 1.5-5b 460 --stages diffusers
    xfuser N3_xfuser_15_steps 1 110 --models 1.5-5b --steps 1.5-5b=3 --warmup 1 --budget @BUDGET@ ) &
  wait_runs
  stop_clocks
fi

if [ "$part" = N4 ]; then
  ensure_env
  clocks
  CUDA_VISIBLE_DEVICES=0 step N4_cudnn_15 540 python3 benchmarks/pool_bench.py --models 1.5-5b --no-diffusers \
      --pools "0=1" --attention cudnn --cold-steps 2 --models-dir /tmp/models --out "$OUT/N4_cudnn_15.json" &
  ( cold N4_cold_15 1 1.5-5b 440 --stages prestarted_never_compiled
    xfuser N4_xfuser_15_steps 1 110 --models 1.5-5b --steps 1.5-5b=3 --warmup 1 --budget @BUDGET@ ) &
  wait_runs
  stop_clocks
fi
say "part $part done"
