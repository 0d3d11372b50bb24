"""xfuser 0.7.0's CogVideoX pipeline (xFuserCogVideoXPipeline) on random full-size weights, timed per step.

Run under torchrun (xfuser initializes torch.distributed from the environment):

    PYTHONPATH=/tmp/xdit:$PYTHONPATH torchrun --nproc_per_node=1 benchmarks/xfuser_bench.py --out x.json --models 2b,5b
    torchrun --nproc_per_node=4 benchmarks/xfuser_bench.py --out x.json --models 5b --ulysses 2 --cfg

It builds the same random weights as the suite (same seeds, built on the GPU), wraps a diffusers
CogVideoXPipeline exactly as xfuser's own ``xFuserCogVideoXPipeline.from_pretrained`` does (``cls(pipeline,
engine_config)``) but without writing ~20 GB of random weights to disk and reading them back, and times
denoising steps with CUDA events at step boundaries, from prompt embeddings (T5 and VAE are the same diffusers
modules as in the suite, timed there). With one GPU xfuser takes its "naive" path (the plain diffusers forward).
``--whole-job DIR`` instead loads saved folders the way xfuser's example script does and times whole jobs
(prompt -> T5 -> steps -> decode), cold (first job, with xfuser's compile under ``--compile``) and warm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (StepTimer, build_transformer, compare, log, median_after, model_spec, peak_gib,  # noqa: E402
                    random_embeds, reset_peak, scheduler_for, step_flops)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="2b,5b")
    p.add_argument("--steps", default="2b=8,5b=6,1.5-5b=4")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ulysses", type=int, default=1)
    p.add_argument("--ring", type=int, default=1)
    p.add_argument("--cfg", action="store_true", help="--use_cfg_parallel")
    p.add_argument("--compile", action="store_true", help="--use_torch_compile (xfuser compiles the whole forward)")
    p.add_argument("--attention-backend", default=None, help="xfuser AttentionBackendType name, e.g. CUDNN")
    p.add_argument("--whole-job", metavar="MODELS_DIR", default=None,
                   help="instead of per-step timing: load MODELS_DIR/<model> (a diffusers folder, e.g. pool_bench's) "
                        "as xfuser's example script does and time two whole jobs (prompt -> T5 -> steps -> decode)")
    p.add_argument("--job-steps", type=int, default=50)
    p.add_argument("--jobs", type=int, choices=(1, 2), default=2, help="whole jobs after the load (1: the cold one)")
    p.add_argument("--first-job-steps", type=int, default=None,
                   help="steps of the first whole job (default --job-steps): fewer still pay --compile's compile, "
                        "so the second, warm job fits a time limit at 1.5-5b")
    p.add_argument("--budget", type=float, default=300)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    start = time.time()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    out: dict = {"layout": dict(world=world, ulysses=args.ulysses, ring=args.ring, cfg=2 if args.cfg else 1,
                                compile=args.compile),
                 "models": {}}

    def save():
        if rank == world - 1:
            Path(args.out).write_text(json.dumps(out, indent=1, default=str))

    try:
        if args.tiny:
            _patch_for_cpu()
        import xfuser  # noqa: F401  (fail here, inside the try, when xfuser is not installed)
        from importlib.metadata import version

        out["xfuser"] = version("xfuser")
        from diffusers import CogVideoXPipeline
        _flash_attn_version_for_xfuser()
        from xfuser import xFuserArgs, xFuserCogVideoXPipeline
        from xfuser.core.distributed import get_runtime_state
    except Exception as error:  # noqa: BLE001
        out["error"] = f"import: {type(error).__name__}: {error}"
        out["traceback"] = traceback.format_exc()[-3000:]
        save()
        print(out["traceback"])
        return 1

    device = torch.device(f"cuda:{local}") if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    steps_table = dict(kv.split("=") for kv in args.steps.split(","))
    first = True
    for name in [m for m in args.models.split(",") if m]:
        if time.time() - start > args.budget - 30:
            out["models"][name] = {"skipped": "time budget"}
            save()
            continue
        frames, height, width = model_spec(name, args.tiny)["size"]
        steps = int(steps_table.get(name, 6)) if not args.tiny else 3
        if args.whole_job:
            folder = Path(args.whole_job) / (f"tiny-{name}" if args.tiny else name)
            if first:  # xfuser's runtime is set up once per process, by the first create_config
                engine_config, _ = xFuserArgs(model=str(folder), height=height, width=width, num_frames=frames,
                                              num_inference_steps=args.job_steps, warmup_steps=0,
                                              ulysses_degree=args.ulysses, ring_degree=args.ring,
                                              use_cfg_parallel=args.cfg, use_torch_compile=args.compile).create_config()
                first = False
            out["models"][name] = whole_jobs(folder, (frames, height, width), engine_config, args, device, dtype, world)
            log(f"xfuser {name} whole jobs: {out['models'][name]}")
            save()
            continue
        try:
            transformer = build_transformer(name, device, dtype, tiny=args.tiny)
            pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                     scheduler=scheduler_for(transformer))
            kwargs = dict(model="random-weights-in-memory", height=height, width=width, num_frames=frames,
                          num_inference_steps=steps, warmup_steps=0, ulysses_degree=args.ulysses,
                          ring_degree=args.ring, use_cfg_parallel=args.cfg, use_torch_compile=args.compile)
            if args.attention_backend:
                kwargs["attention_backend"] = args.attention_backend
            if first:
                engine_config, input_config = xFuserArgs(**kwargs).create_config()
                first = False
            xpipe = xFuserCogVideoXPipeline(pipe, engine_config)
            row = dict(naive_forward=bool(xpipe.use_naive_forward()),
                       attention_backend=str(getattr(get_runtime_state(), "attention_backend", None)))
            pos, neg = random_embeds(transformer.config.text_embed_dim, device, dtype)
            timer = StepTimer(device)

            def cb(*a, **k):
                timer.step()
                return {}

            reset_peak(device)
            timer.begin()
            latents = xpipe(prompt_embeds=pos, negative_prompt_embeds=neg, height=height, width=width,
                            num_frames=frames, num_inference_steps=steps, guidance_scale=6.0,
                            generator=torch.Generator("cpu").manual_seed(42), output_type="latent",
                            callback_on_step_end=cb).frames
            times = timer.times()
            med = median_after(times, args.warmup)
            flops = step_flops(dict(transformer.config), (frames, height, width))["total"]
            row.update(steps=steps, step_times=[round(t, 4) for t in times], s_per_step=round(med, 4),
                       first_step_s=round(times[0], 2), peak_gib=round(peak_gib(device) or 0, 2),
                       tflops=round(flops / med / 1e12, 1))
            if latents is not None and world == 1:
                # the same weights and inputs through the plain pipeline: xfuser's single-GPU path must match
                ref = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, height=height, width=width,
                           num_frames=frames, num_inference_steps=steps, guidance_scale=6.0,
                           generator=torch.Generator("cpu").manual_seed(42), output_type="latent").frames
                row["vs_diffusers"] = compare(latents, ref)
            out["models"][name] = row
            log(f"xfuser {name}: {row}")
            del transformer, pipe, xpipe, latents
        except Exception as error:  # noqa: BLE001
            out["models"][name] = dict(error=f"{type(error).__name__}: {error}"[:600],
                                       traceback=traceback.format_exc()[-3000:])
            log(f"xfuser {name} FAILED: {error}")
            traceback.print_exc()
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["seconds"] = round(time.time() - start, 1)
    save()
    try:
        get_runtime_state().destroy_distributed_env()
    except Exception:  # noqa: BLE001
        pass
    return 0


def whole_jobs(folder: Path, size: tuple, engine_config, args, device: torch.device, dtype: torch.dtype,
               world: int) -> dict:
    """xfuser as its examples/cogvideox_example.py runs (from_pretrained, .to(device), pipe(prompt=...)): load, then
    two whole jobs on the wall clock, the first paying xfuser's compile when ``--compile`` is on."""
    from xfuser import xFuserCogVideoXPipeline

    from pool_bench import PROMPT

    if not (folder / "model_index.json").exists():
        return {"error": f"no diffusers folder at {folder} (pool_bench.build_folder writes one)"}
    frames, height, width = size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        t = time.perf_counter()
        xpipe = xFuserCogVideoXPipeline.from_pretrained(str(folder), engine_config=engine_config, torch_dtype=dtype)
        xpipe = xpipe.to(device)
        sync()
        row: dict = {"load_s": round(time.perf_counter() - t, 2), "steps": args.job_steps, "world": world}
        row["first_job_steps"] = args.first_job_steps or args.job_steps
        for job, steps in (("first_job", row["first_job_steps"]), ("second_job", args.job_steps))[:args.jobs]:
            t = time.perf_counter()
            video = xpipe(prompt=PROMPT, height=height, width=width, num_frames=frames,
                          num_inference_steps=steps, guidance_scale=6.0,
                          generator=torch.Generator("cpu").manual_seed(42), output_type="pt").frames
            sync()
            row[f"{job}_s"] = round(time.perf_counter() - t, 2)
            log(f"xfuser whole job so far: {row}")  # a time limit in the second job keeps the first's figures
            row["frames_shape"] = list(video.shape) if video is not None else None
        row["first_job_with_load_s"] = round(row["load_s"] + row["first_job_s"], 2)
        return row
    except Exception as error:  # noqa: BLE001
        return {"error": f"{type(error).__name__}: {error}"[:600], "traceback": traceback.format_exc()[-3000:]}


def _flash_attn_version_for_xfuser() -> None:
    """xfuser 0.7.0's --use_torch_compile reads ``flash_attn.__version__`` whenever a ``flash_attn`` module is
    loaded; flash-attn-4's namespace package has none (AttributeError). Give it the installed distribution's."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    if importlib.util.find_spec("flash_attn") is None:
        return
    import flash_attn

    if not hasattr(flash_attn, "__version__"):
        try:
            flash_attn.__version__ = version("flash-attn-4")
        except PackageNotFoundError:
            flash_attn.__version__ = "0"


def _patch_for_cpu():
    """xfuser refuses to start without an accelerator; for the CPU smoke test only (see notes/xfuser_cpu_check)."""
    import importlib.util

    torch.version.cuda = "13.0"
    spec = importlib.util.find_spec("xfuser")
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["xfuser"] = pkg
    import xfuser.envs as E

    E.PACKAGES_CHECKER.packages_info["has_long_ctx_attn"] = True
    E.get_device_version = lambda: "13.0"
    E.get_torch_distributed_backend = lambda: "gloo"
    E.get_device_name = lambda: "cpu"
    E.get_device = lambda r: torch.device("cpu")
    spec.loader.exec_module(pkg)
    import xfuser.model_executor.layers.usp as U
    from yunchang.globals import PROCESS_GROUP

    U.PROCESS_GROUP = PROCESS_GROUP


if __name__ == "__main__":
    sys.exit(main())
