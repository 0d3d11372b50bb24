"""Where a new engine's seconds go before its first step, on a machine that already compiled (cProfile).

    python benchmarks/cold_start.py --models 2b --cache-root /tmp/cold ...      # compiles and fills the caches
    python benchmarks/first_step_profile.py --model 2b --cache-root /tmp/cold --out first_step_2b.json

In this process (the code a pool worker runs for its first job, without the pool; its imports done first, outside
the profile, as a worker does them before it connects): the engine's load with the
kernel probe and the T5 preload on their threads, then a 2-step job from a prompt under the default compile
policy, which finds ``--cache-root``'s compiled graphs. On Python 3.12 cProfile records every thread (the kernel
probe's, T5's, the compile prefetch's), so its totals add up across threads: read it for which functions run at
all, and the engine's own timings for the critical path. The JSON holds both, with the top functions by cumulative
and by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, TINY_MODELS, environment, log  # noqa: E402
from cold_start import CACHE_ENV  # noqa: E402  (also sets XDIT_COGVIDEO_COMPILE=auto)
from pool_bench import PROMPT  # noqa: E402


def top(profile: cProfile.Profile, key: str, count: int) -> str:
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats(key).print_stats(count)
    return text.getvalue()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2b", choices=sorted(MODELS))
    p.add_argument("--models-dir", default="/tmp/models")
    p.add_argument("--cache-root", required=True, help="cold_start.py's --cache-root (holds <model>/inductor ...)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--count", type=int, default=60, help="functions listed per table")
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="cold_start.py --tiny's folder (a CPU smoke test)")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    caches = Path(args.cache_root) / args.model
    names = dict(zip(CACHE_ENV, ("xdit", "inductor", "triton", "fa4", "cuda")))
    for name, sub in names.items():
        if not (caches / sub).is_dir():
            raise SystemExit(f"{caches / sub} does not exist: run cold_start.py with --cache-root {args.cache_root}")
        os.environ[name] = str(caches / sub)
    os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] = "1"

    from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest
    from comfyui_xdit_cogvideo.loading import import_model_classes

    import_model_classes()  # what a pool worker imports before its first job (worker._imports), outside the profile

    frames, height, width = (TINY_MODELS if args.tiny else MODELS)[args.model]["size"]
    folder = Path(args.models_dir) / (f"tiny-{args.model}" if args.tiny else args.model)
    profile = cProfile.Profile()
    marks = {"start": time.perf_counter()}
    profile.enable()
    engine = CogVideoEngine(str(folder), dtype="bf16" if args.device == "cuda" else "fp32", device=args.device,
                            preload_text=True)
    marks["loaded"] = time.perf_counter()
    request = GenerationRequest(prompt=PROMPT, frames=frames, height=height, width=width, steps=args.steps, seed=42)
    engine.generate(request)
    marks["job"] = time.perf_counter()
    profile.disable()
    out = {"command": " ".join(sys.argv), "env": environment(args.device),
           "load_s": round(marks["loaded"] - marks["start"], 3), "job_s": round(marks["job"] - marks["loaded"], 3),
           "load_timings": engine.load_timings, "timings": engine.timings,
           "compile": engine.optimizer.compile_report() if engine.optimizer else None,
           "cumulative": top(profile, "cumulative", args.count), "own": top(profile, "tottime", args.count)}
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    log(f"{args.model}: load {out['load_s']} s {engine.load_timings}; {args.steps}-step job {out['job_s']} s "
        f"{engine.timings}; compile {json.dumps(out['compile'])[:400]}")


if __name__ == "__main__":
    main()
