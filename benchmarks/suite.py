"""Single-GPU benchmark suite: plain diffusers CogVideoXPipeline vs our engine, on the same GPU, same random
full-size weights, same inputs, in one process.

    python benchmarks/suite.py --out results.json --budget 500 --tasks env,kernels,2b,5b
    python benchmarks/suite.py --tiny --device cpu --out /tmp/r.json          # CPU smoke test, tiny models

Tasks (run in the order given; each checks the time budget first and is skipped cleanly when short):
  env        versions, GPU, driver; a bf16 matmul ceiling
  kernels    attention kernels (cuDNN / flash SDPA / FA4, with and without log-sum-exp) at CogVideoX shapes
  2b 5b 1.5-5b   per model: T5 encode, s/step + peak memory + latents equality for each variant, profiles,
             VAE decode, computed end-to-end; with --scaling the per-rank simulation for multi-GPU predictions,
             with --extras the inexact options (step cache, fp8) with PSNR on decoded frames
  xfuser     xfuser 0.7.0's CogVideoX pipeline on the same GPU (subprocess through torchrun)
Results are rewritten after every measurement, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (MODELS, Results, StepTimer, build_text_encoder, build_transformer, build_vae,  # noqa: E402
                    compare, environment, log, median_after, model_spec, peak_gib, psnr, reset_peak,
                    scheduler_for, step_flops, sync, time_fn)

PEAK_TFLOPS = 790.0  # dense bf16, measured on this workplace's H200s (KINDS.md: 769-798 on random data)

# name -> (kind, attention kernel, optimize flags, SDPA backend for diffusers)
VARIANTS = {
    "diffusers": ("diffusers", None, None, None),
    "diffusers-flash": ("diffusers", None, None, "flash"),
    "ours-cudnn-eager": ("ours", "cudnn", "none", None),
    "ours-fa4-eager": ("ours", "fa4", "none", None),
    "ours-fa4-fused": ("ours", "fa4", "fuse", None),
    "ours-fa4-compiled": ("ours", "fa4", "fuse,compile", None),
    "ours-cudnn-compiled": ("ours", "cudnn", "fuse,compile", None),
    "ours-fa4-compiled-cv": ("ours", "fa4", "fuse,compile,contiguous_v", None),
    "ours-fa4-compiled-ge": ("ours", "fa4", "fuse,compile,gelu_epilogue", None),
    "ours-fa4-compiled-v2": ("ours", "fa4", "fuse,compile,contiguous_v,gelu_epilogue", None),
    "ours-default": ("ours", "auto", "auto", None),  # what CogVideoEngine does by default
}
DEFAULT_VARIANTS = {
    "2b": "diffusers,diffusers-flash,ours-cudnn-eager,ours-fa4-eager,ours-fa4-fused,ours-fa4-compiled,"
          "ours-default,ours-cudnn-compiled",
    "5b": "diffusers,diffusers-flash,ours-fa4-fused,ours-fa4-compiled,ours-default",
    "1.5-5b": "diffusers,ours-default",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results JSON path")
    p.add_argument("--budget", type=float, default=500, help="seconds; tasks that would not fit are skipped")
    p.add_argument("--tasks", default="env,kernels,2b,5b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke test of every code path)")
    p.add_argument("--steps", default="2b=8,5b=6,1.5-5b=4", help="denoising steps per timed run, per model")
    p.add_argument("--warmup", type=int, default=2, help="steps dropped before the median")
    p.add_argument("--variants", action="append", default=[], help="MODEL=v1,v2,... (default per model)")
    p.add_argument("--kernels", default=None, help="attention kernels to time (default: all available)")
    p.add_argument("--profile", default="diffusers,ours-default", help="variants to profile (2 steps)")
    p.add_argument("--decode", default="2b,5b", help="models whose VAE decode is timed")
    p.add_argument("--decode-tiled", default="1.5-5b", help="models decoded with VAE tiling")
    p.add_argument("--scaling", default="", help="models for the per-rank multi-GPU simulation")
    p.add_argument("--extras", default="", help="models for step cache / fp8 with PSNR (50-step runs)")
    p.add_argument("--extras-steps", type=int, default=50)
    p.add_argument("--cache-runs", default="cache=0.05;cache=0.1",
                   help="';'-separated optimize flags added to the exact run's, one 50-step run each "
                        "(e.g. 'cache=1e-9' records the per-step distances without skipping)")
    p.add_argument("--extras-optimize", default="auto", help="optimize flags of the exact extras run")
    p.add_argument("--no-fp8", action="store_true")
    p.add_argument("--xfuser", default="2b,5b", help="models for the xfuser task")
    p.add_argument("--xfuser-path", default=os.environ.get("XDIT_PATH", "/tmp/xdit"))
    p.add_argument("--e2e-real", default="", help="models with a real 50-step end-to-end run (T5+steps+decode)")
    p.add_argument("--sync-check", action="store_true", default=True)
    return p.parse_args(argv)


def steps_for(args, name: str) -> int:
    table = dict(kv.split("=") for kv in args.steps.split(","))
    return int(table.get(name, 6)) if not args.tiny else 4


def variants_for(args, name: str) -> list[str]:
    for item in args.variants:
        model, _, names = item.partition("=")
        if model == name:
            return [n for n in names.split(",") if n]
    return DEFAULT_VARIANTS[name].split(",")


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ env

def task_env(args, R):
    env = environment(args.device)
    if args.device == "cuda":
        a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        t = time_fn(lambda: a @ b, "cuda", warmup=3, reps=10)
        env["matmul_bf16_8192_tflops"] = round(2 * 8192 ** 3 / t / 1e12, 1)
        del a, b
    try:
        from comfyui_xdit_cogvideo.parallel.kernels import available_kernels, kernel_works, resolve_kernel

        env["kernels_available"] = available_kernels(args.device)
        env["fa4_self_test"] = kernel_works("fa4", args.device) if "fa4" in env["kernels_available"] else None
        env["auto_kernel"] = resolve_kernel("auto", args.device)
    except Exception as error:  # noqa: BLE001
        env["kernels_error"] = repr(error)
    R.put("env", env)
    log(f"env: {env.get('gpu')} torch {env['torch']} diffusers {env['diffusers']} fa4 {env.get('flash-attn-4')} "
        f"matmul {env.get('matmul_bf16_8192_tflops')} TFLOP/s auto={env.get('auto_kernel')}")


# ------------------------------------------------------------------------------------------------ kernels

def task_kernels(args, R):
    from comfyui_xdit_cogvideo.parallel.kernels import KERNELS, available_kernels

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    names = args.kernels.split(",") if args.kernels else [n for n in available_kernels(device) if n != "sdpa"]
    if device == "cuda":
        names = [n for n in names if n in ("fa4", "fa3", "cudnn", "flash", "fa2")]
    text, video = 226, (17550 if not args.tiny else 18)
    seq = text + video
    h2, h5 = (30, 48) if not args.tiny else (4, 4)
    shapes = [
        ("2b full (B2, 30 heads)", 2, seq, seq, h2),
        ("5b full (B2, 48 heads)", 2, seq, seq, h5),
        ("5b cfg2 rank (B1)", 1, seq, seq, h5),
        ("5b ulysses2 rank (24 heads)", 2, seq, seq, h5 // 2),
        ("5b ulysses4 rank (12 heads)", 2, seq, seq, h5 // 4),
        ("5b ring2 block (half keys)", 2, seq, text + video // 2, h5),
    ]
    rows = []
    for label, b, sq, sk, h in shapes:
        if R.left() < 30:
            R.skip(f"kernels {label}", "time budget")
            break
        g = torch.Generator(device).manual_seed(0)
        q = torch.randn(b, sq, h, 64 if not args.tiny else 16, device=device, dtype=dtype, generator=g)
        k = torch.randn(b, sk, h, q.shape[-1], device=device, dtype=dtype, generator=g)
        v = torch.randn_like(k)
        flops = 4 * b * h * sq * sk * q.shape[-1]
        reference = None
        for name in names:
            for lse in (False, True):
                try:
                    t0 = time.time()
                    out, l = KERNELS[name](q, k, v, lse)
                    sync(device)
                    first = time.time() - t0
                    t = time_fn(lambda: KERNELS[name](q, k, v, lse), device, warmup=1, reps=5)
                    if reference is None:
                        reference = out.float()
                    row = dict(shape=label, B=b, Sq=sq, Sk=sk, H=h, kernel=name, lse=lse, ms=round(t * 1e3, 3),
                               tflops=round(flops / t / 1e12, 1), first_call_s=round(first, 2),
                               max_abs_vs_first=float((out.float() - reference).abs().max()),
                               lse_shape=list(l.shape) if l is not None else None)
                except Exception as error:  # noqa: BLE001
                    row = dict(shape=label, kernel=name, lse=lse, error=f"{type(error).__name__}: {error}"[:300])
                rows.append(row)
                R.put("kernels", rows)
                log(f"kernel {label:40s} {name:6s} lse={lse!s:5s} {row.get('ms', row.get('error'))} ms "
                    f"{row.get('tflops', '')} TFLOP/s")
        del q, k, v, reference
        free()


# ------------------------------------------------------------------------------------------------ models

class Bench:
    def __init__(self, args, R, name):
        self.args, self.R, self.name = args, R, name
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        spec = model_spec(name, args.tiny)
        self.config = spec["transformer"]
        self.frames, self.height, self.width = spec["size"]
        self.flops = step_flops(self.config, spec["size"])
        self.key = f"models/{name}"
        self.embeds = None
        self.ref = None
        self.floor = None
        self.results = {}

    def put(self, key, value):
        self.R.put(f"{self.key}/{key}", value)

    # -- pieces
    def build(self):
        t0 = time.time()
        self.transformer = build_transformer(self.name, self.device, self.dtype, tiny=self.args.tiny)
        sync(self.device)
        params = sum(p.numel() for p in self.transformer.parameters())
        self.put("build", dict(seconds=round(time.time() - t0, 1), params=params, config=self.config,
                               size=[self.frames, self.height, self.width], flops=self.flops))
        log(f"{self.name}: built transformer ({params / 1e9:.2f} B params) in {time.time() - t0:.1f}s; "
            f"{self.flops['tokens']} tokens, {self.flops['total'] / 1e12:.1f} TFLOP/step")

    def encode(self):
        from diffusers import CogVideoXPipeline

        t0 = time.time()
        tokenizer, encoder = build_text_encoder(self.device, self.dtype, tiny=self.args.tiny)
        sync(self.device)
        build_s = time.time() - t0
        pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=self.transformer,
                                 scheduler=scheduler_for(self.transformer))
        prompt = "a panda playing the guitar in a bamboo forest, slow motion, cinematic"

        def run():
            return pipe.encode_prompt(prompt, "", do_classifier_free_guidance=True, num_videos_per_prompt=1,
                                      max_sequence_length=226, device=self.device, dtype=self.dtype)

        t = time_fn(run, self.device, warmup=1, reps=3)
        self.embeds = run()
        self.put("t5_encode", dict(seconds=round(t, 4), build_s=round(build_s, 1),
                                   embeds_std=float(self.embeds[0].float().std())))
        log(f"{self.name}: T5 encode {t * 1e3:.1f} ms (built in {build_s:.1f}s)")
        del pipe, encoder
        free()

    def run_variant(self, vname: str, steps: int, profile: bool = False):
        kind, kernel, optimize, backend = VARIANTS[vname]
        if self.device.type == "cpu" and kernel in ("fa4", "cudnn"):
            kernel = "math"
        if self.device.type == "cpu" and backend == "flash":
            backend = None
        pos, neg = self.embeds
        timer = StepTimer(self.device)
        engine = None
        if kind == "diffusers":
            from diffusers import CogVideoXPipeline
            from torch.nn.attention import SDPBackend, sdpa_kernel

            pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=self.transformer,
                                     scheduler=scheduler_for(self.transformer))
            pipe.set_progress_bar_config(disable=True)

            def call(n, cb):
                import contextlib

                ctx = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if backend == "flash" else contextlib.nullcontext()
                with ctx:
                    return pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_frames=self.frames,
                                height=self.height, width=self.width, num_inference_steps=n, guidance_scale=6.0,
                                generator=torch.Generator("cpu").manual_seed(42), output_type="latent",
                                callback_on_step_end=cb).frames
        else:
            from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest

            t0 = time.time()
            engine = CogVideoEngine.from_components(self.transformer, attention=kernel, optimize=optimize)
            setup_s = time.time() - t0

            def call(n, cb):
                request = GenerationRequest(prompt_embeds=pos.cpu(), negative_prompt_embeds=neg.cpu(),
                                            frames=self.frames, height=self.height, width=self.width, steps=n,
                                            guidance=6.0, seed=42)
                return engine.generate(request, on_step=lambda i, total, latents: cb())

        reset_peak(self.device)
        caught = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sync_debug = self.args.sync_check and self.device.type == "cuda" and kind == "ours"
            if sync_debug:
                torch.cuda.set_sync_debug_mode(1)
            try:
                timer.begin()
                latents = call(steps, lambda *a, **k: timer.step() or {})
            finally:
                if sync_debug:
                    torch.cuda.set_sync_debug_mode(0)
        times = timer.times()
        sync_warnings = sorted({f"{w.filename}:{w.lineno}: {str(w.message)[:120]}" for w in caught
                                if "synchroniz" in str(w.message)})
        med = median_after(times, self.args.warmup)
        row = dict(kind=kind, kernel=kernel if kind == "ours" else (backend or "sdpa-default"),
                   optimize=optimize, steps=steps, step_times=[round(t, 4) for t in times],
                   s_per_step=round(med, 4) if med else None, first_step_s=round(times[0], 2),
                   peak_gib=round(peak_gib(self.device), 2) if peak_gib(self.device) else None,
                   host_sync_warnings=sync_warnings[:10] if kind == "ours" else None)
        if engine is not None:
            row["engine_setup_s"] = round(setup_s, 2)
            row["attention"] = engine.attention
        if med:
            row["tflops"] = round(self.flops["total"] / med / 1e12, 1)
            row["fraction_of_peak"] = round(row["tflops"] / PEAK_TFLOPS, 3)
        latents = latents.float().cpu()
        if vname == "diffusers":
            self.ref = latents
        elif self.ref is not None:
            row["vs_diffusers"] = compare(latents, self.ref)
            if vname == "diffusers-flash":
                self.floor = row["vs_diffusers"]
        self.results[vname] = row
        self.put(f"variants/{vname}", row)
        log(f"{self.name} {vname:22s} {row['s_per_step']} s/step (first {row['first_step_s']}s) "
            f"peak {row['peak_gib']} GiB {row.get('tflops')} TFLOP/s "
            f"rel_l2 {row.get('vs_diffusers', {}).get('rel_l2')} syncs {len(sync_warnings)}")
        self.latents = latents
        self.call = call
        self.engine = engine
        if profile:
            self.profile(vname, call)
        return row

    def profile(self, vname, call):
        if self.R.left() < 40:
            self.R.skip(f"{self.name} profile {vname}", "time budget")
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        steps = 2
        with profile(activities=activities) as prof:
            call(steps, lambda *a, **k: {})
            sync(self.device)
        rows = []
        total = 0.0
        events = prof.key_averages()
        # device kernels only: a CPU op (aten::addmm, FlashAttnFunc, an Inductor launcher) carries its kernels'
        # time too, so counting both would double it
        device_only = self.device.type == "cuda" and any("CUDA" in str(getattr(e, "device_type", "")) for e in events)
        for e in events:
            if self.device.type == "cpu":
                dt = e.self_cpu_time_total
            elif device_only and "CUDA" not in str(getattr(e, "device_type", "")):
                continue
            else:
                dt = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0
            if dt and dt > 0:
                rows.append((e.key, e.count, dt))
                total += dt
        rows.sort(key=lambda r: -r[2])
        buckets = {}
        for key, _, dt in rows:
            buckets[_bucket(key)] = buckets.get(_bucket(key), 0) + dt
        top = [dict(name=k[:140], calls_per_step=c / steps, ms_per_step=round(dt / steps / 1e3, 2),
                    pct=round(100 * dt / total, 1)) for k, c, dt in rows[:25]]
        result = dict(gpu_ms_per_step=round(total / steps / 1e3, 1), top=top,
                      buckets_ms_per_step={k: round(v / steps / 1e3, 1) for k, v in
                                           sorted(buckets.items(), key=lambda x: -x[1])})
        self.put(f"profiles/{vname}", result)
        log(f"{self.name} profile {vname}: {result['gpu_ms_per_step']} ms GPU/step; {result['buckets_ms_per_step']}")
        for t in top[:8]:
            log(f"    {t['ms_per_step']:8.2f} ms {t['pct']:5.1f}%  x{t['calls_per_step']:.0f}  {t['name'][:90]}")

    def decode(self, tiled: bool):
        from diffusers import CogVideoXPipeline

        vae = build_vae(self.name, self.device, self.dtype, tiny=self.args.tiny)
        pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=self.transformer,
                                 scheduler=scheduler_for(self.transformer))
        if tiled:
            vae.enable_tiling()
        latents = self.latents.to(self.device, self.dtype)
        reset_peak(self.device)
        times = []
        for _ in range(2 if self.R.left() > 120 else 1):
            t0 = time.time()
            video = pipe.decode_latents(latents)
            frames = pipe.video_processor.postprocess_video(video=video, output_type="np")
            sync(self.device)
            times.append(time.time() - t0)
        self.put("vae_decode", dict(seconds=round(times[-1], 3), all_s=[round(t, 2) for t in times], tiled=tiled,
                                    peak_gib=round(peak_gib(self.device) or 0, 2),
                                    frames=list(frames.shape)))
        log(f"{self.name}: VAE decode {times} s (tiled={tiled}), frames {frames.shape}")
        self.vae = vae
        self.vae_pipe = pipe
        return times[-1]

    def decode_frames(self, latents):
        video = self.vae_pipe.decode_latents(latents.to(self.device, self.dtype))
        return ((video.float() / 2 + 0.5).clamp(0, 1)).cpu()

    def computed_e2e(self):
        data = self.R.data["models"][self.name]
        enc = data.get("t5_encode", {}).get("seconds")
        dec = data.get("vae_decode", {}).get("seconds")
        out = {}
        for vname, row in data.get("variants", {}).items():
            if row.get("s_per_step") and enc is not None and dec is not None:
                out[vname] = round(enc + 50 * row["s_per_step"] + dec, 2)
        self.put("e2e_computed_50_steps", dict(formula="t5_encode + 50 x median s/step + vae_decode", seconds=out))
        log(f"{self.name}: computed end-to-end (50 steps): {out}")


def _bucket(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "attention", "attn", "cudnn", "sdpa", "flashattn")) and "gemm" not in n:
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "sm90_xmma", "cutlass", "matmul", "mm_", "_mm", "addmm")):
        return "gemm"
    if n.startswith("triton") or "triton" in n:
        return "triton (fused elementwise)"
    if any(s in n for s in ("elementwise", "vectorized", "reduce", "layer_norm", "norm", "cat", "copy", "fill",
                            "gelu", "mul", "add")):
        return "aten elementwise/norm/copy"
    if "memcpy" in n or "memset" in n:
        return "memcpy/memset"
    return "other"


def task_model(args, R, name: str):
    bench = Bench(args, R, name)
    steps = steps_for(args, name)
    bench.build()
    bench.encode()
    profile = set(args.profile.split(",")) if args.profile else set()
    for vname in variants_for(args, name):
        per_step = {"2b": 0.7, "5b": 2.0, "1.5-5b": 7.0}.get(name, 1.0)
        need = steps * per_step + (60 if "compiled" in vname else 10)
        if R.left() < need:
            R.skip(f"{name} {vname}", f"time budget ({R.left():.0f}s left, needs ~{need:.0f}s)")
            continue
        try:
            bench.run_variant(vname, steps, profile=vname in profile)
        except Exception as error:  # noqa: BLE001
            R.put(f"models/{name}/variants/{vname}", dict(error=f"{type(error).__name__}: {error}"[:500],
                                                          traceback=traceback.format_exc()[-2000:]))
            log(f"{name} {vname} FAILED: {error}")
            traceback.print_exc()
        free()
    if name in args.scaling.split(","):
        if R.left() > 60:
            try:
                from scaling import run_scaling

                run_scaling(bench, R)
            except Exception as error:  # noqa: BLE001
                R.put(f"models/{name}/scaling_error", traceback.format_exc()[-2000:])
                log(f"{name} scaling FAILED: {error}")
        else:
            R.skip(f"{name} scaling", "time budget")
    if name in args.decode.split(",") or name in args.decode_tiled.split(",") or name in args.extras.split(","):
        if R.left() > 45 and getattr(bench, "latents", None) is not None:
            try:
                bench.decode(tiled=name in args.decode_tiled.split(","))
            except Exception as error:  # noqa: BLE001
                R.put(f"models/{name}/vae_decode", dict(error=f"{type(error).__name__}: {error}"[:500]))
                log(f"{name} decode FAILED: {error}")
        else:
            R.skip(f"{name} decode", "time budget")
    bench.computed_e2e()
    if name in args.e2e_real.split(","):
        try:
            run_e2e_real(bench, args, R)
        except Exception as error:  # noqa: BLE001
            R.put(f"models/{name}/e2e_real_error", traceback.format_exc()[-2000:])
            log(f"{name} e2e-real FAILED: {error}")
    if name in args.extras.split(","):
        try:
            run_extras(bench, args, R)
        except Exception as error:  # noqa: BLE001
            R.put(f"models/{name}/extras_error", traceback.format_exc()[-2000:])
            log(f"{name} extras FAILED: {error}")
    try:
        from torch._dynamo.utils import counters

        R.put(f"models/{name}/dynamo_counters", {k: dict(v) for k, v in counters.items()
                                                 if k in ("stats", "graph_break", "recompiles", "unimplemented")})
    except Exception:  # noqa: BLE001
        pass
    for attr in ("transformer", "engine", "vae", "vae_pipe", "call"):
        if hasattr(bench, attr):
            setattr(bench, attr, None)
    del bench
    free()


def run_extras(bench: Bench, args, R):
    """Exact 50-step run vs step cache (each threshold) vs fp8 linears: speed and PSNR of decoded frames."""
    from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest

    n = args.extras_steps if not args.tiny else 6
    pos, neg = bench.embeds
    per_step = (bench.results.get("ours-default") or bench.results.get("ours-fa4-compiled") or {}).get(
        "s_per_step") or 1.0
    if not hasattr(bench, "vae_pipe"):
        bench.decode(tiled=False)

    def run(optimize):
        engine = CogVideoEngine.from_components(bench.transformer, attention="auto", optimize=optimize)
        request = GenerationRequest(prompt_embeds=pos.cpu(), negative_prompt_embeds=neg.cpu(), frames=bench.frames,
                                    height=bench.height, width=bench.width, steps=n, guidance=6.0, seed=42)
        timer = StepTimer(bench.device)
        timer.begin()
        latents = engine.generate(request, on_step=lambda *a: timer.step())
        times = timer.times()
        return latents, times, engine.optimizer.stats() if engine.optimizer else {}

    out = {}
    if R.left() < n * per_step * 1.2 + 60:
        R.skip(f"{bench.name} extras", "time budget")
        return
    exact, times, _ = run(args.extras_optimize)
    exact_frames = bench.decode_frames(exact)
    out["exact"] = dict(total_s=round(sum(times[1:]), 2), s_per_step=round(median_after(times, 2), 4), steps=n)
    bench.put("extras", out)
    log(f"{bench.name} extras exact: {out['exact']}")
    for flags in (x.strip() for x in args.cache_runs.split(";") if x.strip()):
        if R.left() < n * per_step + 40:
            R.skip(f"{bench.name} step cache {flags}", "time budget")
            break
        latents, times, stats = run(f"{args.extras_optimize},{flags}")
        frames = bench.decode_frames(latents)
        out[f"{flags}"] = dict(total_s=round(sum(times[1:]), 2), stats=stats,
                                         speedup=round(out["exact"]["total_s"] / max(sum(times[1:]), 1e-9), 3),
                                         psnr_db=round(psnr(frames, exact_frames), 2),
                                         latents=compare(latents, exact))
        bench.put("extras", out)
        log(f"{bench.name} extras {flags}: {out[flags]}")
    if args.no_fp8:
        return
    if R.left() < n * per_step + 90:
        R.skip(f"{bench.name} fp8", "time budget")
        return
    try:
        latents, times, _ = run(f"{args.extras_optimize},fp8")
        frames = bench.decode_frames(latents)
        out["fp8"] = dict(total_s=round(sum(times[1:]), 2), s_per_step=round(median_after(times, 2), 4),
                          first_step_s=round(times[0], 2),
                          speedup=round(out["exact"]["total_s"] / max(sum(times[1:]), 1e-9), 3),
                          psnr_db=round(psnr(frames, exact_frames), 2), latents=compare(latents, exact))
    except Exception as error:  # noqa: BLE001
        out["fp8"] = dict(error=f"{type(error).__name__}: {error}"[:500], traceback=traceback.format_exc()[-1500:])
    bench.put("extras", out)
    log(f"{bench.name} extras fp8: {out['fp8']}")


def run_e2e_real(bench: Bench, args, R):
    """A real end-to-end run through the engine: T5 encode + 50 steps + VAE decode, wall clock."""
    from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest

    n = 50 if not args.tiny else 4
    per_step = (bench.results.get("ours-default") or bench.results.get("ours-fa4-compiled") or {}).get(
        "s_per_step") or 1.0
    if R.left() < n * per_step + 60:
        R.skip(f"{bench.name} e2e-real", "time budget")
        return
    tokenizer, encoder = build_text_encoder(bench.device, bench.dtype, tiny=args.tiny)
    if not hasattr(bench, "vae") or bench.vae is None:
        bench.vae = build_vae(bench.name, bench.device, bench.dtype, tiny=args.tiny)
    engine = CogVideoEngine.from_components(bench.transformer, vae=bench.vae, text_encoder=encoder,
                                            tokenizer=tokenizer, attention="auto", optimize="auto")
    request = GenerationRequest(prompt="a panda playing the guitar", frames=bench.frames, height=bench.height,
                                width=bench.width, steps=n, guidance=6.0, seed=42)
    sync(bench.device)
    reset_peak(bench.device)
    t0 = time.time()
    latents = engine.generate(request)
    t1 = time.time()
    frames = engine.decode(latents, frames=bench.frames)
    t2 = time.time()
    row = dict(total_s=round(t2 - t0, 2), generate_s=round(t1 - t0, 2), decode_s=round(t2 - t1, 2), steps=n,
               frames=list(frames.shape), peak_gib=round(peak_gib(bench.device) or 0, 2))
    bench.put("e2e_real", row)
    log(f"{bench.name} e2e real: {row}")
    del encoder, engine
    free()


# ------------------------------------------------------------------------------------------------ xfuser

def task_xfuser(args, R):
    script = Path(__file__).resolve().parent / "xfuser_bench.py"
    out = Path(args.out).with_name(Path(args.out).stem + "_xfuser.json")
    models = [m for m in args.xfuser.split(",") if m]
    if not Path(args.xfuser_path).exists() and not args.tiny:
        R.put("xfuser", dict(error=f"xfuser not installed at {args.xfuser_path}"))
        return
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([args.xfuser_path, env.get("PYTHONPATH", "")])
    budget = max(30, R.left() - 10)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29533", str(script),
           "--out", str(out), "--models", ",".join(models), "--budget", str(budget - 20)]
    if args.tiny:
        cmd += ["--tiny", "--device", args.device]
    log("xfuser: " + " ".join(cmd))
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=budget)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as error:
        rc, tail = "timeout", str(error.stdout or "")[-3000:] + str(error.stderr or "")[-1000:]
    import json

    result = json.loads(out.read_text()) if out.exists() else {}
    result.update(returncode=rc, seconds=round(time.time() - t0, 1), log_tail=tail)
    R.put("xfuser", result)
    log(f"xfuser rc={rc}: " + tail[-1500:])


# ------------------------------------------------------------------------------------------------ main

def main(argv=None):
    args = parse_args(argv)
    if args.tiny:
        os.environ.setdefault("XDIT_COGVIDEO_CACHE", "/tmp/xdit-bench-tiny-cache")
    R = Results(args.out, args.budget)
    R.put("command", " ".join(sys.argv))
    torch.backends.cuda.matmul.allow_tf32 = False
    for task in [t for t in args.tasks.split(",") if t]:
        if R.left() < 15:
            R.skip(task, "time budget")
            continue
        log(f"=== task {task} ({R.left():.0f}s left)")
        try:
            if task == "env":
                task_env(args, R)
            elif task == "kernels":
                task_kernels(args, R)
            elif task in MODELS:
                task_model(args, R, task)
            elif task == "xfuser":
                task_xfuser(args, R)
            else:
                raise ValueError(f"unknown task {task}")
        except Exception as error:  # noqa: BLE001
            R.put(f"errors/{task}", traceback.format_exc()[-3000:])
            log(f"task {task} FAILED: {error}")
            traceback.print_exc()
        free()
    R.put("finished", True)
    log(f"done in {time.time() - R.start:.0f}s")


if __name__ == "__main__":
    main()
