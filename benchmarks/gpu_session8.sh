#!/bin/bash
# Issue 17's last cells, on a fresh nvidia-h200-x2, after `gpu_session6.sh A`
# (carry [.whl, .fa4/p1]: wheels; folders 2b, 5b, 1.5-5b), chained on one warm machine (/tmp/cold is shared, so E2
# finds the compiled machine E1 left):
#   E1 carry [.fa4/p2, .fa4/wheels]
#      GPU 0: cold_start.py 2b, every stage and prestarted workers on a never-compiled machine, with diffusers' warm
#             job in its process (warm against warm); then ours without flash-attn-4 (--attention cudnn), a new pool
#             on a never-compiled and on a compiled machine (its own caches)
#      GPU 1: cold_start.py 5b: diffusers (first and warm job), a never-compiled machine
#   E2 carry [.fa4/xfuser]
#      GPU 0: xfuser 0.7.0's whole jobs on 5b without its compile (two 50-step jobs)
#      GPU 1: cold_start.py 5b on E1's compiled machine: a new pool (first and warm job), prestarted workers
#   E3 carry [.fa4/xfuser]
#      GPU 0: xfuser --use_torch_compile on 1.5-5b: its 50-step first job (compile inside), cold
#      GPU 1: xfuser without its compile on 1.5-5b: its 50-step first job
#   E4 carry []  (added with the last 5 device minutes; ran as the same commands typed inline, PART_S=200)
#      GPU 0: ours without flash-attn-4 on 5b, a new pool on a never-compiled machine (its own caches)
#      GPU 1: ours without flash-attn-4 on 2b, prestarted workers on a never-compiled machine (its own caches)
# Ran 2026-11-30 (session 8): raw logs and JSON in benchmarks/results/2026-11-30-h200x2-session8/, tables in
# BENCHMARKS.md "Session 8".
part=$1
PART_S=${PART_S:-565}
. benchmarks/gpu_session_lib.sh

if [ "$part" = E1 ]; then
  ensure_env
  clocks
  ( cold E1_cold_2b 0 2b 400 --prestarted-never-compiled
    cold E1_cudnn_cold_2b 0 2b 160 --attention cudnn --stages never_compiled,compiled_machine \
        --cache-root /tmp/cold-cudnn --no-diffusers ) &
  cold E1_cold_5b 1 5b 540 --stages diffusers,never_compiled &
  wait_runs
  stop_clocks
fi

if [ "$part" = E2 ]; then
  ensure_env
  install_xfuser
  clocks
  xfuser E2_xfuser_5b_jobs 0 400 --whole-job /tmp/models --models 5b &
  cold E2_cold_5b 1 5b 400 --stages compiled_machine,prestarted &
  wait_runs
  stop_clocks
fi

if [ "$part" = E3 ]; then
  ensure_env
  install_xfuser
  clocks
  xfuser E3_xfuser_15_compile_job 0 565 --whole-job /tmp/models --models 1.5-5b --compile --jobs 1 &
  xfuser E3_xfuser_15_job 1 565 --whole-job /tmp/models --models 1.5-5b --jobs 1 &
  wait_runs
  stop_clocks
fi
if [ "$part" = E4 ]; then
  ensure_env
  clocks
  cold E4_cudnn_cold_5b 0 5b 190 --attention cudnn --stages never_compiled --warm-timeout 5 --cache-root /tmp/cold-cudnn &
  cold E4_cudnn_pre_2b 1 2b 150 --attention cudnn --stages prestarted_never_compiled \
      --cache-root /tmp/cold-cudnn-pre &
  wait_runs
  stop_clocks
fi
say "part $part done"
