"""Whole jobs as users run them: plain diffusers against our pool (README's Python API) on 1 and N GPUs.

    python benchmarks/pool_bench.py --out pool.json --models 2b,5b --pools "0=1;0,1=cfg2,ulysses2,ring2"
    python benchmarks/pool_bench.py --tiny --device cpu --pools "cpu:1=1;cpu:2=1,cfg2,ring2" --out /tmp/p.json

Each model is written once as a diffusers folder of random full-size weights (transformer, VAE, T5-XXL with the
tiny model's tokenizer; `--models-dir`, kept between runs). A job is text -> T5 on rank 0 -> N steps -> VAE
decode, timed on the wall clock from the caller: exactly what `pool.generate` + `pool.decode` cost a user.
``--pools`` lists pools as ``DEVICES=LAYOUT,LAYOUT``. For every pool and each of its layouts: a short cold job (load, compile, kernel JIT; its wall time is the
"first job" figure), then a warm job of `--steps` steps (s/step = median interval between progress events after
`--warmup` steps). Latents of every layout are compared with the first pool's first layout (bf16: expect
rel. L2 at the level of bf16 rounding, ~1e-2) and with plain diffusers. Plain diffusers runs the same folder,
same prompt and seed, on the first GPU: one short warm-up, then the whole job. Its decode is timed twice: ``decode_s``
/ ``whole_s`` up to the bf16 video on the GPU (``pipe.decode_latents``), ``decode_frames_s`` / ``whole_frames_s`` up
to float frames on the CPU (``video_processor.postprocess_video(output_type="np")``, as the pipeline does), which is
what ``pool.decode`` returns and what its ``decode_s`` / ``whole_s`` measure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_folder_args, build_text_encoder, build_transformer, build_vae, compare,  # noqa: E402
                    json_document, log, model_spec, scheduler_for)

PROMPT = "a red fox running through fresh snow, cinematic"
DECODE_TILED = {"auto": None, "tiled": True, "plain": False}


def build_folder(name: str, root: Path, tiny: bool, device: str) -> Path:
    """A diffusers folder of random weights for ``name`` (built on ``device`` once; reused when present)."""
    from diffusers import CogVideoXPipeline

    folder = root / (f"tiny-{name}" if tiny else name)
    if (folder / "model_index.json").exists():
        return folder
    dtype = torch.float32 if tiny else torch.bfloat16
    transformer = build_transformer(name, device, dtype, tiny=tiny)
    tokenizer, encoder = build_text_encoder(device, dtype, tiny=tiny)
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=build_vae(name, device, dtype, tiny=tiny),
                             transformer=transformer, scheduler=scheduler_for(transformer))
    staging = folder.with_suffix(".tmp")
    pipe.save_pretrained(staging, safe_serialization=True)
    staging.rename(folder)
    del pipe, transformer, encoder
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return folder


def step_seconds(stamps: list[float], warmup: int) -> float | None:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    return round(statistics.median(gaps), 4) if gaps else None


def model_folders(args, build=build_folder):
    """For each of ``--models``: (name, size [frames, height, width], its random-weight folder under
    ``--models-dir``, made by ``build`` on the first GPU or the CPU when missing, seconds that took)."""
    root = Path(args.models_dir)
    root.mkdir(parents=True, exist_ok=True)
    for name in [m for m in args.models.split(",") if m]:
        t = time.perf_counter()
        folder = build(name, root, args.tiny, "cuda:0" if args.device == "cuda" else "cpu")
        yield name, model_spec(name, args.tiny)["size"], folder, round(time.perf_counter() - t, 1)


@torch.no_grad()
def diffusers_job(folder: Path, args, size) -> dict:
    """Plain diffusers on the first GPU: warm-up, then one timed whole job (T5 + steps + decode)."""
    from diffusers import CogVideoXPipeline

    device = "cuda:0" if args.device == "cuda" else "cpu"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    t0 = time.perf_counter()
    pipe = CogVideoXPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t0
    frames, height, width = size

    def job(steps: int) -> tuple[dict, torch.Tensor]:
        stamps: list[float] = []

        def on_step(*_):
            if args.device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return {}

        sync()
        t = time.perf_counter()
        latents = pipe(prompt=PROMPT, num_frames=frames, height=height, width=width, num_inference_steps=steps,
                       guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(42), output_type="latent",
                       callback_on_step_end=on_step).frames
        sync()
        sample = time.perf_counter() - t
        t = time.perf_counter()
        video = pipe.decode_latents(latents)
        sync()
        decode = time.perf_counter() - t
        # what a user gets from the pipeline: CogVideoXPipeline(output_type="np") float frames on the CPU
        cpu_frames = pipe.video_processor.postprocess_video(video=video, output_type="np")
        decode_frames = time.perf_counter() - t
        del video, cpu_frames
        return dict(whole_s=round(sample + decode, 2), whole_frames_s=round(sample + decode_frames, 2),
                    sample_s=round(sample, 2), decode_s=round(decode, 2), decode_frames_s=round(decode_frames, 2),
                    s_per_step=step_seconds(stamps, args.warmup)), latents.cpu()

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    first, _ = job(args.cold_steps)
    warm, latents = job(args.steps)
    row = dict(load_s=round(load, 2), first_short_job=first, warm=warm)
    if args.device == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    del pipe
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row, latents


def pool_jobs(folder: Path, devices: str, layouts: list[str], args, size, out_row: dict, refs: dict, save) -> None:
    """Cold short job and warm whole job per layout on one pool; fills ``out_row`` as it goes."""
    from comfyui_xdit_cogvideo import GenerationRequest, Layout
    from comfyui_xdit_cogvideo.pool import ModelSpec, WorkerPool

    frames, height, width = size
    spec = ModelSpec(str(folder), dtype="bf16" if args.device == "cuda" else "fp32", attention=args.attention)
    pool = WorkerPool(devices)
    try:
        t = time.perf_counter()
        pool.start()
        out_row["start_s"] = round(time.perf_counter() - t, 2)
        for text in layouts:
            layout = Layout.parse(text) if text != "1" else Layout()
            row = out_row.setdefault("layouts", {}).setdefault(str(layout), {})

            def job(steps: int) -> tuple[dict, torch.Tensor]:
                stamps: list[float] = []

                def on_event(e):
                    if e.phase == "sample":
                        stamps.append(time.perf_counter())

                request = GenerationRequest(prompt=PROMPT, frames=frames, height=height, width=width, steps=steps,
                                            guidance=6.0, seed=42)
                t = time.perf_counter()
                latents = pool.generate(spec, request, layout=layout, on_event=on_event)
                sample = time.perf_counter() - t
                t = time.perf_counter()
                video = pool.decode(spec, latents, frames=frames, tiled=DECODE_TILED[args.decode])
                decode = time.perf_counter() - t
                del video
                return dict(whole_s=round(sample + decode, 2), sample_s=round(sample, 2), decode_s=round(decode, 2),
                            s_per_step=step_seconds(stamps, args.warmup),
                            decode_choice=pool.status().get("last_decode")), latents

            try:
                row["first_short_job"], _ = job(args.cold_steps)
                row["warm"], latents = job(args.steps)
                key = "pool_reference"
                if key not in refs:
                    refs[key] = latents.float()
                    row["is_reference"] = True
                else:
                    row["vs_reference"] = compare(latents, refs[key])
                if "diffusers" in refs:
                    row["vs_diffusers"] = compare(latents, refs["diffusers"])
                row["status"] = {k: v for k, v in pool.status().items() if k in ("loads", "attention", "devices")}
            except Exception as error:  # noqa: BLE001 - record and go on with the next layout
                row["error"] = f"{type(error).__name__}: {error}"[:1500]
            log(f"{folder.name} {devices} {layout}: {json.dumps(row)[:400]}")
            save()
    finally:
        pool.shutdown()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="2b,5b")
    p.add_argument("--pools", default="0=1;0,1=cfg2,ulysses2,ring2",
                   help="';'-separated DEVICES=LAYOUTS (devices as get_pool takes them; layouts comma-separated)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cold-steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attention", default="auto")
    p.add_argument("--decode", default="auto", choices=tuple(DECODE_TILED),
                   help="auto: the pool's own choice (the default users get); tiled / plain force one")
    add_folder_args(p)
    args = p.parse_args(argv)
    out, save = json_document(args)

    for name, size, folder, build_s in model_folders(args):
        res = out["models"].setdefault(name, {"size": size})
        res["folder_build_s"] = build_s
        refs: dict = {}
        if not args.no_diffusers:
            res["diffusers"], refs["diffusers"] = diffusers_job(folder, args, size)
            log(f"{name} diffusers: {res['diffusers']}")
            save()
        for entry in [d for d in args.pools.split(";") if d]:
            devices, _, layouts = entry.partition("=")
            pool_jobs(folder, devices, (layouts or "1").split(","), args, size,
                      res.setdefault("pools", {}).setdefault(devices, {}), refs, save)
    save()


if __name__ == "__main__":
    main()
