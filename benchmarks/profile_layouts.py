"""Where a 2-GPU step's time goes, per layout: CUDA kernel time by kind (attention, GEMM, NCCL, the rest) and
the GPU's idle time, from torch.profiler on every rank, next to the one-GPU step (rank 0 alone).

    torchrun --nproc_per_node=2 benchmarks/profile_layouts.py --out prof.json --model 2b --layouts "1;ulysses2;ring2"

Each layout: one warm-up job of ``--warm`` steps (compile, kernel JIT), then ``--steps`` profiled steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_transformer, model_spec, random_embeds  # noqa: E402

KINDS = (("nccl", ("nccl",)), ("attention", ("fmha", "flash", "attention", "cudnn", "sdpa", "cute")),
         ("gemm", ("gemm", "sm90_xmma", "cutlass", "nvjet", "gemv")))


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of kernel intervals (microseconds in, seconds out)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e6


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="2b")
    p.add_argument("--layouts", default="1;ulysses2;ring2")
    p.add_argument("--warm", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--attention", default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU over gloo (smoke test)")
    args = p.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest, Layout
    from comfyui_xdit_cogvideo.parallel import ParallelGroups

    cuda = not args.tiny
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=300))
    rank = dist.get_rank()
    frames, height, width = model_spec(args.model, args.tiny)["size"]
    dtype = torch.bfloat16 if cuda else torch.float32
    transformer = build_transformer(args.model, device, dtype, tiny=args.tiny)
    pos, neg = random_embeds(transformer.config.text_embed_dim, "cpu", dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out: dict = {"model": args.model, "layouts": {}}
    for text in args.layouts.split(";"):
        layout = Layout() if text == "1" else Layout.parse(text)
        groups = ParallelGroups.create(layout)
        if groups is not None:
            engine = CogVideoEngine.from_components(transformer, groups=groups, attention=args.attention)

            def job(steps: int) -> float:
                request = GenerationRequest(prompt_embeds=pos, negative_prompt_embeds=neg, frames=frames,
                                            height=height, width=width, steps=steps, guidance=6.0, seed=42)
                sync()
                t = time.perf_counter()
                engine.generate(request)
                sync()
                return time.perf_counter() - t

            job(args.warm)
            with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
                wall = job(args.steps)
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA or not cuda]
            by_kind: dict[str, float] = {}
            for e in kernels:
                by_kind[kind_of(e.name)] = by_kind.get(kind_of(e.name), 0.0) + e.device_time / 1e6
            busy = busy_seconds([(e.time_range.start, e.time_range.end) for e in kernels])
            row = dict(wall_s_per_step=round(wall / args.steps, 4), attention=engine.attention,
                       busy_s_per_step=round(busy / args.steps, 4),
                       idle_s_per_step=round((wall - busy) / args.steps, 4),
                       kernel_s_per_step={k: round(v / args.steps, 4) for k, v in sorted(by_kind.items())},
                       top=[(e.key[:90], round(e.device_time_total / 1e6 / args.steps, 4), e.count // args.steps)
                            for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]])
            out["layouts"].setdefault(str(layout), {})[f"rank{rank}"] = row
            print(f"rank {rank} {layout}: {json.dumps(row)[:700]}", flush=True)
        dist.barrier()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    if rank == 0:
        merged = gathered[0]
        for other in gathered[1:]:
            for key, rows in other["layouts"].items():
                merged["layouts"].setdefault(key, {}).update(rows)
        Path(args.out).write_text(json.dumps(merged, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
