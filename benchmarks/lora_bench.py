"""LoRA cost on one GPU: s/step with a merged LoRA vs without, switch time, memory overhead, unmerge exactness.

    python benchmarks/lora_bench.py --model 5b --rank 64 --out /tmp/out/lora.json      # one H200, ~5 min
    python benchmarks/lora_bench.py --tiny --device cpu --steps 3 --out /tmp/lora.json  # CPU smoke test
    python benchmarks/lora_bench.py --model 5b --memory offload --steps 4 --out /tmp/out/lora_offload.json

Random full-size weights (benchmarks/common.py) and two random rank-``--rank`` LoRAs over every attention and
feed-forward linear of every block, written as real safetensors files (one PEFT, one kohya with alpha) and
loaded through the engine's LoRA path. Also measures what the rejected alternative (unmerge by subtracting the
delta in bf16) would have cost in exactness, next to the bitwise restore the engine does, and checks that the
weight a layer really computes with (captured in its forward) is the merged one, also under ``--memory offload``
(diffusers group offloading with CUDA streams keeps pinned CPU copies: the merge must land in them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (StepTimer, build_transformer, median_after, model_spec, random_embeds,  # noqa: E402
                    sync)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="5b", choices=["2b", "5b", "1.5-5b"])
    parser.add_argument("--tiny", action="store_true", help="small twin of the model (CPU smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=8, help="sampling steps per timed run (first 2 are warm-up)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--optimize", default="auto", help="engine optimize flags (auto = fused QKV + compile on CUDA)")
    parser.add_argument("--memory", default="fast", choices=["fast", "offload"],
                        help="memory plan: offload = blocks streamed from the CPU (diffusers group offloading)")
    parser.add_argument("--out", default="lora_bench.json")
    args = parser.parse_args(argv)

    from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest
    from comfyui_xdit_cogvideo.lora import random_factors, write_random_lora

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    spec = model_spec(args.model, args.tiny)
    config = spec["transformer"]
    frames, height, width = spec["size"]
    result: dict = {"model": args.model, "tiny": args.tiny, "device": str(device), "rank": args.rank,
                    "steps": args.steps, "size": [frames, height, width], "optimize": args.optimize,
                    "memory": args.memory}

    def save():
        Path(args.out).write_text(json.dumps(result, indent=2))

    folder = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    t0 = time.perf_counter()
    a = write_random_lora(folder / "a_peft.safetensors", random_factors(config, args.rank, seed=1, std=0.01), "peft")
    b = write_random_lora(folder / "b_kohya.safetensors", random_factors(config, args.rank, seed=2, std=0.01),
                          "kohya", alpha=args.rank / 2)
    result["lora_file_mb"] = round(os.path.getsize(a) / 2 ** 20, 1)
    result["write_files_s"] = round(time.perf_counter() - t0, 2)

    transformer = build_transformer(args.model, device, dtype, tiny=args.tiny)
    if args.memory != "fast":
        transformer.to("cpu")  # the plan streams the blocks from there
    engine = CogVideoEngine.from_components(transformer, optimize=args.optimize, memory=args.memory, device=device)
    pos, neg = random_embeds(config["text_embed_dim"], "cpu", torch.float32)
    request = GenerationRequest(prompt_embeds=pos, negative_prompt_embeds=neg, frames=frames, height=height,
                                width=width, steps=args.steps, guidance=6.0, seed=42)
    probe = engine.transformer.transformer_blocks[0]
    originals = {n: p.detach().clone() for n, p in probe.named_parameters()}

    def sample(label: str) -> None:
        timer = StepTimer(device)
        timer.begin()
        engine.generate(request, on_step=lambda *_: timer.step())
        times = timer.times()
        result[label] = {"s_per_step": round(median_after(times, 2), 4), "times": [round(t, 4) for t in times]}
        print(label, result[label]["s_per_step"], "s/step", flush=True)
        save()

    def timed_set(label: str, loras) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        sync(device)
        start = time.perf_counter()
        engine.set_loras(loras)
        sync(device)
        entry = {"seconds": round(time.perf_counter() - start, 3),
                 "cpu_saved_gib": round(engine.lora.saved_bytes / 2 ** 30, 3)}
        if device.type == "cuda":
            entry.update(gpu_resident_delta_gib=round((torch.cuda.memory_allocated(device) - before) / 2 ** 30, 3),
                         gpu_peak_over_resident_gib=round((torch.cuda.max_memory_allocated(device) - before) / 2 ** 30,
                                                          3))
        result[label] = entry
        print(label, entry, flush=True)
        save()

    def seen_in_forward(label: str, expected: torch.Tensor) -> None:
        """The weight block 0's ff.net.2 really computes with (captured inside its forward, wherever the plan keeps
        it between steps) against the expected merged weight."""
        layer = engine.transformer.transformer_blocks[0].ff.net[2]
        seen = []
        handle = layer.register_forward_pre_hook(lambda m, _: seen.append(m.weight.detach().float().cpu()))
        try:
            engine.generate(GenerationRequest(prompt_embeds=pos, negative_prompt_embeds=neg, frames=frames,
                                              height=height, width=width, steps=1, guidance=6.0, seed=42))
        finally:
            handle.remove()
        diff = (seen[0] - expected.float().cpu()).abs()
        result[label] = {"max_abs": float(diff.max()), "max_abs_weight": float(expected.abs().max()),
                         "differs_from_base": bool((seen[0] != originals["ff.net.2.weight"].float().cpu()).any())}
        print(label, result[label], flush=True)
        save()

    sample("without_lora")  # also compiles (warm-up steps excluded from the median)
    sample("without_lora_again")
    timed_set("merge_first", [(str(a), 1.0)])
    from comfyui_xdit_cogvideo.lora import read_lora

    factors = read_lora(str(a)).layers["transformer_blocks.0.ff.net.2"]
    w = originals["ff.net.2.weight"]
    merged = (w.float() + factors.up.to(w.device).float() @ factors.down.to(w.device).float()).to(w.dtype)
    seen_in_forward("lora_applied_in_forward", merged)
    sample("with_lora")
    timed_set("switch_strength", [(str(a), 0.5)])
    timed_set("switch_lora", [(str(b), 1.0)])
    timed_set("two_loras", [(str(a), 0.7), (str(b), 0.7)])
    sample("with_two_loras")
    timed_set("clear", [])
    result["restore_bitwise"] = all(torch.equal(p, originals[n]) for n, p in probe.named_parameters())
    sample("after_clear")

    # The rejected alternative: unmerge by subtracting the delta in the storage dtype.
    w = originals["ff.net.0.proj.weight"].float()
    delta = random_factors(config, args.rank, seed=1, std=0.01, targets=("ff.net.0.proj",), blocks=1)
    down, up = delta["transformer_blocks.0.ff.net.0.proj"]
    d = (up.to(device) @ down.to(device))
    merged = (w + d).to(dtype)
    back = (merged.float() - d).to(dtype)
    diff = (back.float() - w).abs()
    result["subtract_unmerge"] = {"changed_fraction": round(float((diff > 0).float().mean()), 4),
                                  "max_abs": float(diff.max()), "max_rel_to_weight": float(diff.max() / w.abs().max())}
    print("subtract_unmerge", result["subtract_unmerge"], "restore_bitwise", result["restore_bitwise"])
    base, lora = result["without_lora_again"]["s_per_step"], result["with_lora"]["s_per_step"]
    result["with_vs_without"] = round(lora / base, 4)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
