"""Load time, resident memory and s/step for each on-disk format of one model (issue 14), one GPU.

Writes a random full-size model (seeded) in each format, then loads each in a fresh process and samples a few
steps from random prompt embeddings:

    diffusers-folder   transformer/ sharded like the hub repos (5 GB shards + index), bf16
    native-bf16        one ComfyUI-native-name file, bf16
    fp8-upcast         one diffusers-name file with fp8 (e4m3fn) matrices, upcast to bf16 at load
    fp8-resident       the same file, matrices kept in fp8, each layer upcast when it runs
    fp8-scaled-upcast  ComfyUI's scaled fp8 (per-tensor scale_weight), upcast at load

    python benchmarks/formats_bench.py --model 5b --out formats.json --dir /tmp/formats --steps 5 --budget 420
    python benchmarks/formats_bench.py ... --formats fp8-resident,fp8-scaled-upcast   # files are reused
    python benchmarks/formats_bench.py --tiny --device cpu --out /tmp/f.json --dir /tmp/f   # CPU smoke test

Load time includes reading the file (the page cache is dropped first when possible, else the number is a warm
read); memory is torch's allocated bytes after load (resident weights) and the peak while sampling.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Results, StepTimer, build_transformer, log, median_after, model_spec  # noqa: E402

FORMATS = ("diffusers-folder", "native-bf16", "fp8-upcast", "fp8-resident", "fp8-scaled-upcast")


def write_formats(name: str, folder: Path, tiny: bool, device: str = "cpu", reuse: Path | None = None
                  ) -> dict[str, Path]:
    """The model in every format under ``folder`` (kept between runs: files are only written when missing).

    The random weights are made on ``device`` (fast on a GPU), then saved from the CPU. ``reuse``: an existing
    diffusers folder of this model (e.g. /tmp/models/5b from pool_bench) taken as the diffusers-folder format and
    as the weights of the others (saves its size on disk and the time to write it). Refuses, before writing, when
    the disk lacks the room."""
    import shutil

    from safetensors.torch import save_file

    from comfyui_xdit_cogvideo.formats import diffusers_to_native, to_fp8_storage

    folder.mkdir(parents=True, exist_ok=True)
    source = reuse if reuse is not None and (reuse / "transformer" / "config.json").exists() else folder / "folder"
    paths = {"diffusers-folder": source, "native-bf16": folder / "native_bf16.safetensors",
             "fp8-upcast": folder / "fp8_e4m3fn.safetensors", "fp8-resident": folder / "fp8_e4m3fn.safetensors",
             "fp8-scaled-upcast": folder / "fp8_e4m3fn_scaled.safetensors"}
    if all(p.exists() for p in paths.values()):
        return paths
    from comfyui_xdit_cogvideo.memory import ModelSizes

    elements = sum(p.numel() for p in build_transformer(name, "meta", tiny=tiny).parameters()) if tiny else \
        ModelSizes.published(name).transformer
    need = elements * (2 + 1 + 1 + (0 if source == reuse else 2)) + 2 ** 30
    free = shutil.disk_usage(folder).free
    if need > free:
        raise SystemExit(f"formats_bench: writing the {name} formats needs about {need / 2 ** 30:.1f} GiB in {folder}, "
                         f"{free / 2 ** 30:.1f} GiB free; free some space or pass --reuse FOLDER")
    if source == reuse:
        from diffusers import CogVideoXTransformer3DModel

        model = CogVideoXTransformer3DModel.from_pretrained(source / "transformer", torch_dtype=torch.bfloat16)
    else:
        model = build_transformer(name, device, torch.bfloat16, tiny=tiny).to("cpu")
        model.save_pretrained(source / "transformer", max_shard_size="5GB")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    del model
    config = (source / "transformer" / "config.json").read_text()
    save_file({"model.diffusion_model." + k: v for k, v in diffusers_to_native(state).items()},
              str(paths["native-bf16"]))
    save_file(to_fp8_storage(state), str(paths["fp8-upcast"]))
    save_file(to_fp8_storage(state, scaled=True), str(paths["fp8-scaled-upcast"]))
    for path in (paths["native-bf16"], paths["fp8-upcast"], paths["fp8-scaled-upcast"]):
        path.with_suffix(".json").write_text(config)  # tiny sample sizes; full-size configs come from the shapes
    return paths


def drop_page_cache(path: Path) -> bool:
    """Evict the files from the page cache (posix_fadvise), so load time includes the disk read."""
    files = [path] if path.is_file() else list(path.rglob("*.safetensors"))
    try:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages (a file just written) are not dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return True
    except (AttributeError, OSError):
        return False


def measure(fmt: str, path: str, name: str, device: str, steps: int, tiny: bool, optimize: str) -> dict:
    """One format in this process: load, resident memory, s/step."""
    from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest, ModelSource

    cuda = device.startswith("cuda")
    cold = drop_page_cache(Path(path))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    source = ModelSource(path, storage="fp8" if fmt == "fp8-resident" else "upcast")
    engine = CogVideoEngine(source, dtype="bf16" if cuda else "fp32", device=device, optimize=optimize)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    resident = torch.cuda.memory_allocated() / 2 ** 20 if cuda else \
        sum(p.numel() * p.element_size() for p in engine.transformer.parameters()) / 2 ** 20
    frames, height, width = model_spec(name, tiny)["size"]
    g = torch.Generator().manual_seed(3)
    embeds = [torch.randn(1, 226, engine.info.text_dim, generator=g) for _ in range(2)]
    timer = StepTimer(device)
    timer.begin()
    latents = engine.generate(GenerationRequest(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1],
                                                frames=frames, height=height, width=width, steps=steps, seed=1),
                              on_step=lambda *a: timer.step())
    times = timer.times()
    return {"format": fmt, "path": path, "cold_read": cold, "load_s": round(load_s, 2),
            "resident_mib": round(resident, 2), "peak_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
            if cuda else None, "s_per_step": median_after(times, 2), "step_times": [round(t, 4) for t in times],
            "latents_finite": bool(torch.isfinite(latents.float()).all()),
            "latents_head": latents.float().flatten()[:4].tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="5b", choices=["2b", "5b", "1.5-5b"])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with the tiny twin")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dir", required=True, help="where the model files are written (about 35 GB for 5b)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6, help="sampling steps per format (the first 2 are warm-up)")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--optimize", default="auto", help="engine optimizations (auto = the exact default set)")
    p.add_argument("--reuse", help="an existing diffusers folder of the model (used as diffusers-folder and as the "
                                   "weights of the other formats)")
    p.add_argument("--budget", type=float, default=1e9, help="seconds from the start: a format starts only if "
                                                            "--per-format fits what is left, and is killed at it")
    p.add_argument("--per-format", type=float, default=75, help="expected seconds per format (load, compile, steps)")
    p.add_argument("--one", nargs=2, metavar=("FORMAT", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(*args.one, args.model, args.device, args.steps, args.tiny,
                                             args.optimize)), flush=True)
        return
    results = Results(args.out, budget_s=args.budget)
    t0 = time.perf_counter()
    paths = write_formats(args.model, Path(args.dir) / (("tiny-" if args.tiny else "") + args.model), args.tiny,
                          args.device, Path(args.reuse) if args.reuse else None)
    results.put("write_s", round(time.perf_counter() - t0, 1))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for fmt in args.formats.split(","):
        if results.left() < args.per_format:
            results.skip(fmt, f"time budget: {results.left():.0f} s left, a format takes about {args.per_format:.0f} s")
            continue
        log(f"{fmt}: {paths[fmt]}")
        cmd = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--dir", args.dir,
               "--out", args.out, "--steps", str(args.steps), "--optimize", args.optimize,
               "--one", fmt, str(paths[fmt])] + (["--tiny"] if args.tiny else [])
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(10.0, results.left()))
        except subprocess.TimeoutExpired:
            results.put(f"formats/{fmt}", {"error": "timed out (time budget)"})
            continue
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode or not lines:
            results.put(f"formats/{fmt}", {"error": run.stderr[-3000:]})
            log(f"{fmt} failed: {run.stderr[-500:]}")
            continue
        result = json.loads(lines[-1][7:])
        results.put(f"formats/{fmt}", result)
        log(f"{fmt}: load {result['load_s']} s, resident {result['resident_mib']} MiB, peak {result['peak_mib']} "
            f"MiB, {result['s_per_step']} s/step")


if __name__ == "__main__":
    main()
