"""Model load, ours against diffusers', each in a fresh process on the same diffusers folder (issue 17).

    python benchmarks/load_bench.py --folder /tmp/models/2b --device cuda --out load_2b.json
    python benchmarks/load_bench.py --folder /tmp/m/2b-cpu --build-cpu-2b --device cpu --optimize fuse,compile \\
        --out load_cpu.json      # CPU proxy: the real 2b transformer and VAE, a 2-layer T5-XXL (about 4.6 GB)

Rows (seconds, wall clock, after imports; the page cache is whatever the previous row left, so run it twice):

- ``diffusers_transformer``: ``CogVideoXTransformer3DModel.from_pretrained(..).to(device)``
- ``diffusers_pipeline``: ``CogVideoXPipeline.from_pretrained(folder).to(device)`` (what cold_start.py compares)
- ``ours_transformer``: ``CogVideoEngine(folder)`` (the pool's load_s) with its ``load_timings`` parts
- ``ours_text``: then the T5 load the first prompt triggers
- ``ours_transformer_5ms``: ``ours_transformer`` with Python's default 5 ms switch interval during the load
  (before ``engine.prompt_gil_handoff``: the load's thousand short GIL-free calls each wait for the kernel probe)

Each row ends by touching every weight (a sum per tensor, synchronised): on a CPU diffusers' weights stay
memory-mapped and are only read when first used, so without it the CPU rows would compare unread with read bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _touch(modules, device) -> float:
    import torch

    started = time.perf_counter()
    if torch.device(device).type == "cuda":  # on the device: every byte was copied there already
        torch.cuda.synchronize(device)
        return round(time.perf_counter() - started, 3)
    for module in modules:  # one byte of every 4 KiB page: what reading costs, without arithmetic on 2 cores
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.device.type == "cpu" and tensor.numel():
                int(tensor.detach().contiguous().reshape(-1).view(torch.uint8)[::4096].sum())
    return round(time.perf_counter() - started, 3)


def child(kind: str, folder: str, device: str, dtype_name: str, optimize: str) -> dict:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    if kind.startswith("diffusers"):
        from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

        started = time.perf_counter()
        if kind == "diffusers_transformer":
            modules = [CogVideoXTransformer3DModel.from_pretrained(Path(folder) / "transformer", torch_dtype=dtype)
                       .to(device)]
        else:
            pipe = CogVideoXPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
            modules = [pipe.transformer, pipe.text_encoder, pipe.vae]
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        row = {"load_s": round(time.perf_counter() - started, 3)}
    else:
        from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel  # noqa: F401 - as the diffusers rows:
        from transformers import T5EncoderModel  # noqa: F401 - imports before the clock (a worker's start-up)

        from comfyui_xdit_cogvideo import engine as engine_module
        from comfyui_xdit_cogvideo.engine import CogVideoEngine

        if kind == "ours_transformer_5ms":
            engine_module.LOAD_SWITCH_INTERVAL = 0.005
        started = time.perf_counter()
        engine = CogVideoEngine(folder, dtype=dtype_name, device=device, optimize=optimize)
        row = {"load_s": round(time.perf_counter() - started, 3), "parts": getattr(engine, "load_timings", None),
               "attention": engine.attention}
        modules = [engine.transformer]
        if kind == "ours_text":
            started = time.perf_counter()
            modules.append(engine._text_encoder()[1])
            row["text_load_s"] = round(time.perf_counter() - started, 3)
    row["touch_s"] = _touch(modules, device)
    row["load_and_touch_s"] = round(row["load_s"] + row.get("text_load_s", 0.0) + row["touch_s"], 3)
    return row


def build_cpu_2b(folder: Path) -> None:
    """The 2b transformer and VAE at full size, a T5-XXL with 2 of its 24 layers, random (seeded), bf16."""
    import torch
    from diffusers import CogVideoXPipeline
    from transformers import T5Config, T5EncoderModel

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import T5_XXL, build_transformer, build_vae, scheduler_for

    from comfyui_xdit_cogvideo.tiny import _tokenizer

    transformer = build_transformer("2b", "cpu", torch.bfloat16)
    torch.manual_seed(1)
    encoder = T5EncoderModel(T5Config(**dict(T5_XXL, num_layers=2))).to(torch.bfloat16).eval()
    pipe = CogVideoXPipeline(tokenizer=_tokenizer(), text_encoder=encoder, vae=build_vae("2b", "cpu", torch.bfloat16),
                             transformer=transformer, scheduler=scheduler_for(transformer))
    staging = folder.with_suffix(".tmp")
    pipe.save_pretrained(staging, safe_serialization=True)
    staging.rename(folder)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", required=True)
    p.add_argument("--build-cpu-2b", action="store_true", help="build the CPU proxy folder when it is missing")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--optimize", default="auto", help="the engine's optimize flags (auto = the pool's default)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--rows", default="diffusers_transformer,diffusers_pipeline,ours_transformer,ours_text")
    p.add_argument("--out", required=True)
    p.add_argument("--code", default=None, help="import comfyui_xdit_cogvideo from this folder (e.g. an older "
                   "commit's export, for before/after on one folder)")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if not (folder / "model_index.json").exists():
        if not args.build_cpu_2b:
            raise SystemExit(f"{folder} is not a diffusers folder; pass --build-cpu-2b to build the CPU proxy")
        build_cpu_2b(folder)
    out = {"command": " ".join(sys.argv), "folder": str(folder), "device": args.device, "optimize": args.optimize,
           "bytes": {p.name: sum(f.stat().st_size for f in p.rglob("*.safetensors")) for p in folder.iterdir()
                     if p.is_dir()}, "rows": {}}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [args.code or str(ROOT),
                                                                    os.environ.get("PYTHONPATH")])))
    for repeat in range(args.repeat):
        for kind in args.rows.split(","):
            result = subprocess.run([sys.executable, __file__, "--child", kind, str(folder), args.device, args.dtype,
                                     args.optimize], capture_output=True, text=True, timeout=1800,
                                    env=env, cwd=args.code or ROOT)
            if result.returncode:
                raise SystemExit(f"{kind} failed:\n{result.stderr[-3000:]}")
            row = json.loads(result.stdout.strip().splitlines()[-1])
            out["rows"].setdefault(kind, []).append(row)
            print(f"[{repeat}] {kind}: {json.dumps(row)}", flush=True)
            out["best_load_and_touch_s"] = {k: min(r["load_and_touch_s"] for r in rows)
                                            for k, rows in out["rows"].items()}
            Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["best_load_and_touch_s"]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(*sys.argv[2:7])))
    else:
        main()
