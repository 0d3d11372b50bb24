"""Multi-GPU runs of the engine: correctness against one GPU and s/step per layout, one process per GPU.

    torchrun --nproc_per_node=2 benchmarks/multi_gpu.py --out mg.json --models 2b,5b --layouts auto
    torchrun --nproc_per_node=4 benchmarks/multi_gpu.py --out mg.json --models 5b --layouts "cfg2xulysses2;ulysses4"
    torchrun --nproc_per_node=2 benchmarks/multi_gpu.py --tiny --device cpu --out /tmp/mg.json   # gloo smoke test

Every rank builds the same random full-size weights on its own GPU (seeded; a checksum over all ranks proves
they are identical), rank 0 runs the single-GPU reference (layout 1), then every layout runs on the first
``cfg x ulysses x ring`` ranks: latents are compared with the reference on rank 0 (bf16 tolerance), s/step is
the median of CUDA-event intervals at step boundaries on rank 0. ``--layouts auto`` takes every valid layout of
the world size (layout.candidate_layouts), the chooser's first. ``--bandwidth`` also measures all-to-all and
all-gather bandwidth (256 MiB per rank) for comparison with the predictions in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (StepTimer, build_transformer, compare, environment, log, median_after,  # noqa: E402
                    model_spec, peak_gib, random_embeds, reset_peak, step_flops, sync)


def parse_layouts(text: str, world: int, heads: int):
    from comfyui_xdit_cogvideo.layout import Layout, candidate_layouts, choose_layout

    if text == "auto":
        return candidate_layouts(world, heads=heads, use_cfg=True)
    if text == "chosen":
        return [choose_layout(world, heads=heads, use_cfg=True)]
    out = []
    for part in (p for p in text.split(";") if p.strip()):
        layout = Layout.parse(part)
        if layout.world_size <= world and heads % layout.ulysses == 0:
            out.append(layout)
    return out


def bandwidth(device, world: int) -> dict:
    n = 128 * 2 ** 20  # bf16 elements = 256 MiB
    x = torch.randn(n, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    res = {}
    for name, fn in (("all_to_all", lambda: dist.all_to_all_single(y, x)),
                     ("all_gather", lambda: dist.all_gather_into_tensor(
                         torch.empty(n * world, device=device, dtype=x.dtype), x))):
        for _ in range(2):
            fn()
        sync(device)
        t0 = time.time()
        reps = 5
        for _ in range(reps):
            fn()
        sync(device)
        t = (time.time() - t0) / reps
        sent = 2 * n * (world - 1) / world if name == "all_to_all" else 2 * n * (world - 1)
        res[name] = dict(seconds=round(t, 5), per_rank_GBps=round(sent / t / 1e9, 1))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="2b,5b")
    p.add_argument("--layouts", default="auto", help="auto | chosen | 'cfg2;ulysses2;ring2;cfg2xulysses2'")
    p.add_argument("--steps", default="2b=8,5b=6,1.5-5b=4")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attention", default="auto")
    p.add_argument("--optimize", default="auto")
    p.add_argument("--bandwidth", action="store_true")
    p.add_argument("--budget", type=float, default=540)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--pg-timeout", type=float, default=300, help="process-group timeout, seconds")
    p.add_argument("--stack-dump", type=float, default=0,
                   help="every N seconds, dump every thread's stack to STACKS_DIR/stacks_rank<R>.txt (hang hunting)")
    args = p.parse_args(argv)
    start = time.time()

    from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest, Layout
    from comfyui_xdit_cogvideo.parallel import ParallelGroups

    cuda = args.device == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # no device_id: see ParallelGroups.create (a bound default group hangs layouts over fewer ranks)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.pg_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.stack_dump:
        stacks = Path(os.environ.get("STACKS_DIR", ".")) / f"stacks_rank{rank}.txt"
        faulthandler.dump_traceback_later(args.stack_dump, repeat=True, file=open(stacks, "w"))

    def trace(message: str) -> None:
        print(f"[rank {rank} {time.time() - start:7.1f}s] {message}", file=sys.stderr, flush=True)
    dtype = torch.bfloat16 if cuda else torch.float32
    out = {"world": world, "command": " ".join(sys.argv), "models": {}}

    def save():
        if rank == 0:
            Path(args.out).write_text(json.dumps(out, indent=1, default=str))

    if rank == 0:
        out["env"] = environment(device)
    if args.bandwidth and world > 1:
        out["bandwidth"] = bandwidth(device, world)
        log(f"bandwidth: {out['bandwidth']}")
    save()
    steps_table = dict(kv.split("=") for kv in args.steps.split(","))
    for name in [m for m in args.models.split(",") if m]:
        frames, height, width = model_spec(name, args.tiny)["size"]
        steps = int(steps_table.get(name, 6)) if not args.tiny else 3
        res = out["models"].setdefault(name, {"layouts": {}})
        transformer = build_transformer(name, device, dtype, tiny=args.tiny)
        checksum = torch.tensor([float(sum(p.float().sum() for p in list(transformer.parameters())[:50]))],
                                device=device, dtype=torch.float64)
        sums = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(sums, checksum)
        res["weights_identical_on_all_ranks"] = len({float(s) for s in sums}) == 1
        flops = step_flops(dict(transformer.config), (frames, height, width))["total"]
        pos, neg = random_embeds(transformer.config.text_embed_dim, "cpu", dtype)
        request = GenerationRequest(prompt_embeds=pos, negative_prompt_embeds=neg, frames=frames, height=height,
                                    width=width, steps=steps, guidance=6.0, seed=42)
        layouts = [Layout()] + [lay for lay in parse_layouts(args.layouts, world, transformer.config.num_attention_heads)
                                if lay.world_size > 1]
        ref = None
        for layout in layouts:
            key = str(layout)
            if time.time() - start > args.budget:
                res["layouts"][key] = {"skipped": "time budget"}
                continue
            trace(f"{name} {key}: creating groups")
            groups = ParallelGroups.create(layout)  # every rank takes part; non-members get None
            trace(f"{name} {key}: groups created (member: {groups is not None})")
            row = {}
            try:
                if groups is not None:
                    engine = CogVideoEngine.from_components(transformer, groups=groups, attention=args.attention,
                                                            optimize=args.optimize)
                    timer = StepTimer(device)
                    reset_peak(device)
                    timer.begin()
                    trace(f"{name} {key}: engine ready ({engine.attention}), generating")
                    latents = engine.generate(request, on_step=lambda *a: timer.step())
                    trace(f"{name} {key}: generated")
                    times = timer.times() if rank == 0 else []
                    if rank == 0:
                        med = median_after(times, args.warmup)
                        row = dict(step_times=[round(t, 4) for t in times], s_per_step=round(med, 4),
                                   first_step_s=round(times[0], 2), peak_gib=round(peak_gib(device) or 0, 2),
                                   tflops_total=round(flops / med / 1e12, 1), attention=engine.attention)
                        if ref is None:
                            ref = latents.float()
                        else:
                            row["vs_single_gpu"] = compare(latents, ref)
                            single = res["layouts"][str(Layout())].get("s_per_step")
                            if single:
                                row["speedup"] = round(single / med, 3)
                                row["efficiency"] = round(single / med / layout.world_size, 3)
            except Exception as error:  # noqa: BLE001
                row = dict(error=f"{type(error).__name__}: {error}"[:500], traceback=traceback.format_exc()[-2000:])
                traceback.print_exc()
            if rank == 0:
                res["layouts"][key] = row
                log(f"{name} {key}: {row.get('s_per_step')} s/step x{row.get('speedup')} "
                    f"{row.get('vs_single_gpu', {}).get('rel_l2')} {row.get('error', '')}")
                save()
            trace(f"{name} {key}: barrier")
            dist.barrier()
        del transformer
        if cuda:
            torch.cuda.empty_cache()
    out["seconds"] = round(time.time() - start, 1)
    save()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
