"""Memory plans on one GPU under caps that mimic smaller cards, plus predictions for the FSDP plans on several.

    python benchmarks/memory_plans.py --out mem.json                         # one H200: 2b, 5b x 24/16/12 GiB caps
    python benchmarks/memory_plans.py --tiny --device cpu --out /tmp/m.json  # CPU smoke test of every code path
    torchrun --nproc_per_node=4 benchmarks/memory_plans.py --fsdp --models 5b --caps 16 --out fsdp4.json

Single GPU: every (model, plan, card) run is its own subprocess (an out-of-memory failure cannot disturb the next
run). The subprocess builds the random full-size transformer, T5-XXL and VAE on the GPU, moves what the plan keeps
off the GPU to the CPU, then caps PyTorch's allocator with ``torch.cuda.set_per_process_memory_fraction`` at the
card's size minus ``--context-gib`` (what the CUDA context, cuBLAS and the driver take outside the allocator on a
real card), resets the peak counters and runs a whole job through ``CogVideoEngine``: T5 encode of a prompt,
``--steps`` denoising steps, the VAE decode with the tiles ``vae_parallel.fit_tiling`` picks for what is left.
A run succeeds only if every phase finished under the cap. Reported per run: encode/sample/decode seconds, s/step
(median of CUDA-event step intervals after the first), total, a 50-step end-to-end figure (encode + 50 x s/step
+ decode; measured directly when --steps 50), the allocator's peak (allocated and reserved), the planner's plan and
estimate for that card, and the latents' difference from the uncapped fast run (T5 on the CPU rounds differently
in bf16, so plans that encode there differ a little).

Runs are chosen by ``--plans``: ``fitting`` (default) = each plan the planner says fits the card, plus the plan
``auto`` picks; ``all`` = every plan on every card (the ones predicted not to fit are expected to fail: that
checks the planner's refusals).

Predictions (no measurement, labelled so): per-rank peaks of the ``low`` plan (FSDP2 over 2, 4 and 8 ranks) from
the shard sizes and, where a 1-GPU measurement exists, its measured activation peak scaled by the layout's
tokens per rank.

``--fsdp`` (under torchrun, one process per GPU): the low plan for real on the world's GPUs, each capped at
``--caps`` (the first value), with per-rank peaks and s/step; the engine shards over the world.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, Results, StepTimer, build_text_encoder, build_transformer, build_vae,  # noqa: E402
                    compare, environment, log, median_after, model_spec, sync)

GiB = 2 ** 30
PROMPT = "a panda playing the guitar in a bamboo forest, cinematic"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results JSON path")
    p.add_argument("--models", default="2b,5b")
    p.add_argument("--caps", default="24,16,12", help="card sizes in GiB (as nvidia-smi reports them)")
    p.add_argument("--plans", default="fitting", help="fitting (the planner's fitting plans), all, or a list")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per run (50 = the full job)")
    p.add_argument("--context-gib", type=float, default=0.75,
                   help="GiB a real card loses outside PyTorch's allocator (CUDA context, cuBLAS, driver)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke test of every code path)")
    p.add_argument("--budget", type=float, default=540, help="seconds; runs that would not fit are skipped")
    p.add_argument("--run-timeout", type=float, default=300, help="seconds per subprocess run")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: the low plan on the world's GPUs")
    p.add_argument("--run", help=argparse.SUPPRESS)  # MODEL:PLAN:CAP, internal (the subprocess)
    return p.parse_args(argv)


def model_info(name: str, tiny: bool):
    from comfyui_xdit_cogvideo.variants import ModelInfo

    return ModelInfo.from_config(model_spec(name, tiny)["transformer"], name=name)


def sizes_for(name: str, tiny: bool, transformer=None, encoder=None, vae=None):
    """Element counts: published for the real models, counted from the (tiny) modules for --tiny."""
    from comfyui_xdit_cogvideo.memory import ModelSizes

    if not tiny:
        return ModelSizes.published(name)
    transformer = transformer if transformer is not None else build_transformer(name, "cpu", tiny=True)
    encoder = encoder if encoder is not None else build_text_encoder("cpu", tiny=True)[1]
    vae = vae if vae is not None else build_vae(name, "cpu", tiny=True)
    count = lambda m: sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())  # noqa: E731
    return ModelSizes(count(transformer), count(transformer.transformer_blocks[0]), len(transformer.transformer_blocks),
                      count(encoder), count(vae), vae.config.block_out_channels[0])


def job_for(name: str, tiny: bool):
    from comfyui_xdit_cogvideo.memory import JobShape

    frames, height, width = model_spec(name, tiny)["size"]
    return JobShape(frames, height, width, 2, 2)


def planner(name: str, tiny: bool, cap_bytes: int | None, mode: str, world: int = 1, sizes=None):
    """The planner's plan for ``mode`` on a card whose allocator may use ``cap_bytes`` (None = no limit)."""
    from comfyui_xdit_cogvideo.layout import choose_layout
    from comfyui_xdit_cogvideo.memory import plan_memory

    info = model_info(name, tiny)
    layout = choose_layout(world, heads=info.heads, use_cfg=True)
    return plan_memory(mode, sizes or sizes_for(name, tiny), info, job_for(name, tiny), layout,
                       [cap_bytes] * world), layout


# ------------------------------------------------------------------------------------------------ one run

def one_run(args) -> dict:
    """The subprocess: one (model, plan, card) job under the cap; prints one JSON line."""
    from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest
    from comfyui_xdit_cogvideo.memory import MemoryPlanError
    from comfyui_xdit_cogvideo.vae_parallel import decode_latents, fit_tiling

    name, plan_name, cap = args.run.split(":")
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # the allocator cap needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    card = float(cap) if cap != "none" else None
    cap_bytes = int((card - args.context_gib) * GiB) if card else None
    row = {"model": name, "plan": plan_name, "card_gib": card, "allocator_cap_gib": cap_bytes and cap_bytes / GiB}
    dtype = torch.bfloat16 if cuda else torch.float32
    build_on = device
    transformer = build_transformer(name, build_on, dtype, tiny=args.tiny)
    tokenizer, encoder = build_text_encoder(build_on, dtype, tiny=args.tiny)
    vae = build_vae(name, build_on, dtype, tiny=args.tiny)
    sizes = sizes_for(name, args.tiny, transformer, encoder, vae)
    try:
        plan, _ = planner(name, args.tiny, cap_bytes, plan_name, sizes=sizes)
    except MemoryPlanError as error:
        row.update(ok=False, error=f"planner: {error}")
        return row
    row.update(planner=plan.describe(), planner_estimate_gib=round(max(plan.peaks) / GiB, 2), notes=list(plan.notes))
    if plan.name != "fast":
        transformer.to("cpu")
    if plan.text != "gpu":
        encoder.to("cpu")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        if cap_bytes:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), device)
    frames, height, width = model_spec(name, args.tiny)["size"]
    try:
        engine = CogVideoEngine.from_components(transformer, vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                                                attention="auto", optimize="auto", memory=plan, device=device)
        peaks = {}

        def phase_peak(phase):
            if cuda:
                peaks[phase] = torch.cuda.max_memory_allocated(device)
                peaks[phase + "_reserved"] = torch.cuda.max_memory_reserved(device)
                torch.cuda.reset_peak_memory_stats(device)

        t0 = time.perf_counter()
        positive, negative = engine.encode_prompt(PROMPT)
        sync(device)
        t1 = time.perf_counter()
        phase_peak("encode")
        resident = torch.cuda.memory_allocated(device) if cuda else 0
        timer = StepTimer(device)
        timer.begin()
        request = GenerationRequest(prompt_embeds=positive.cpu(), negative_prompt_embeds=negative.cpu(),
                                    frames=frames, height=height, width=width, steps=args.steps, guidance=6.0,
                                    seed=42)
        latents = engine.generate(request, on_step=lambda *a: timer.step())
        sync(device)
        t2 = time.perf_counter()
        phase_peak("sample")
        budget = None
        if cuda and cap_bytes:
            budget = cap_bytes - torch.cuda.memory_allocated(device) + sum(
                p.numel() * p.element_size() for p in vae.parameters())
            budget = int(budget * 0.95) - GiB // 2
        tiling = fit_tiling(vae, tuple(latents.shape[-2:]), budget)
        video = decode_latents(vae, latents, frames, tiled=tiling is not None, tiling=tiling)
        sync(device)
        t3 = time.perf_counter()
        phase_peak("decode")
    except torch.OutOfMemoryError as error:
        row.update(ok=False, error=f"out of memory: {str(error).splitlines()[0][:300]}")
        return row
    per_step = median_after(timer.times(), 1)
    row.update(ok=True, encode_s=round(t1 - t0, 3), sample_s=round(t2 - t1, 3), decode_s=round(t3 - t2, 3),
               total_s=round(t3 - t0, 3), steps=args.steps, s_per_step=per_step and round(per_step, 4),
               decode_tile=tiling and [tiling.sample_height, tiling.sample_width], frames=list(video.shape))
    row["e2e_50_steps_s"] = round(t3 - t0 if args.steps == 50 else
                                  (t1 - t0) + 50 * (per_step or 0) + (t3 - t2), 2)
    row["e2e_50_steps_kind"] = "measured" if args.steps == 50 else "encode + 50 x s/step + decode (extrapolated)"
    if cuda:
        row.update(peak_allocated_gib=round(max(peaks[p] for p in ("encode", "sample", "decode")) / GiB, 2),
                   peak_reserved_gib=round(max(peaks[p + "_reserved"] for p in ("encode", "sample", "decode")) / GiB,
                                           2),
                   phase_peaks_gib={k: round(v / GiB, 2) for k, v in peaks.items()},
                   sample_activations_gib=round((peaks["sample"] - resident) / GiB, 2))
    torch.save({"latents": latents, "positive": positive.cpu()}, args.out + ".pt")
    return row


# ------------------------------------------------------------------------------------------------ driver

def runs_for(args) -> list[tuple[str, str, str]]:
    from comfyui_xdit_cogvideo.memory import PLANS, MemoryPlanError

    cuda = torch.device(args.device).type == "cuda"
    caps = [c.strip() for c in args.caps.split(",") if c.strip()] if cuda else ["none"]
    out = []
    for name in args.models.split(","):
        out.append((name, "fast", "none"))  # the reference: uncapped
        for cap in caps:
            cap_bytes = int((float(cap) - args.context_gib) * GiB) if cap != "none" else None
            if args.plans == "all":
                wanted = list(PLANS)
            elif args.plans == "fitting":
                wanted = []
                for plan in PLANS:
                    try:
                        chosen, _ = planner(name, args.tiny, cap_bytes, plan)
                    except MemoryPlanError:
                        continue
                    if not chosen.notes:
                        wanted.append(plan)
                try:  # auto as its own run only where it picks a plan variant not already run
                    auto, _ = planner(name, args.tiny, cap_bytes, "auto")
                    same = planner(name, args.tiny, cap_bytes, auto.name)[0]
                    what = lambda p: (p.name, p.text, p.shard, p.decode_tile)  # noqa: E731
                    if auto.name not in wanted or what(auto) != what(same):
                        wanted.append("auto")
                except MemoryPlanError:
                    wanted.append("auto")  # expected to be refused: recorded as such
            else:
                wanted = args.plans.split(",")
            for plan in dict.fromkeys(wanted):
                if (name, plan, cap) not in out:
                    out.append((name, plan, cap))
    return out


def predictions(args, measured: dict) -> dict:
    """FSDP (low) per-rank peaks on 2/4/8 GPUs of the same card sizes: the planner's estimate and, from the 1-GPU
    low run, measured activations scaled to each layout's tokens per rank plus the shard sizes. Predictions."""
    from comfyui_xdit_cogvideo.memory import GiB as G
    from comfyui_xdit_cogvideo.memory import MemoryPlanError, sample_activations

    out = {}
    for name in args.models.split(","):
        sizes, info, job = sizes_for(name, args.tiny), model_info(name, args.tiny), job_for(name, args.tiny)
        for world in (2, 4, 8):
            for cap in (args.caps.split(",") if torch.device(args.device).type == "cuda" else ["none"]):
                cap_bytes = int((float(cap) - args.context_gib) * G) if cap != "none" else None
                key = f"{name}/{world}x{cap}GiB"
                try:
                    plan, layout = planner(name, args.tiny, cap_bytes, "auto" if cap_bytes else "low", world=world,
                                           sizes=sizes)
                except MemoryPlanError as error:
                    out[key] = {"kind": "prediction", "fits": False, "why": str(error)[:400]}
                    continue
                row = {"kind": "prediction", "plan": plan.describe(), "layout": str(layout),
                       "planner_peak_gib": round(max(plan.peaks) / G, 2),
                       "shard_gib": round(sizes.transformer / max(1, plan.shard) * 2 / G, 2)}
                base = measured.get(f"{name}:fast:none")
                if base and base.get("ok") and base.get("sample_activations_gib") is not None:
                    from comfyui_xdit_cogvideo.layout import Layout

                    one = Layout()
                    weights = sizes.transformer * 2 / G
                    activations = base["sample_activations_gib"]
                    scale = sample_activations(info, job, layout) / sample_activations(info, job, one)
                    resident = (sizes.transformer / plan.shard + 2 * sizes.block + sizes.outside_blocks) * 2 / G \
                        if plan.shard > 1 else weights
                    row["sampling_from_1gpu_measurement_gib"] = round(resident + activations * scale
                                                                      + sizes.vae * 2 / G, 2)
                out[key] = row
    return out


def driver(args) -> int:
    R = Results(args.out, args.budget)
    R.put("env", environment(args.device))
    R.put("note", "1-GPU runs under allocator caps; 'predictions' are computed, not measured")
    measured: dict = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    reference = None
    for name, plan, cap in runs_for(args):
        key = f"{name}:{plan}:{cap}"
        if R.left() < 30:
            R.skip(key, "time budget")
            continue
        part = Path(args.out).with_suffix(f".{name}.{plan}.{cap}.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run", f"{name}:{plan}:{cap}", "--out", str(part),
               "--steps", str(args.steps), "--device", args.device, "--context-gib", str(args.context_gib)]
        if args.tiny:
            cmd.append("--tiny")
        log(f"run {key}")
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=min(args.run_timeout, max(10.0, R.left())))
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"ok": False, "error": done.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            row = {"ok": False, "error": "timed out"}
        saved = Path(str(part) + ".pt")
        if row.get("ok") and saved.exists():
            data = torch.load(saved)
            if plan == "fast" and cap == "none":
                reference = data
            elif reference is not None:
                row["latents_vs_fast"] = compare(data["latents"], reference["latents"])
                row["t5_vs_fast"] = compare(data["positive"], reference["positive"])
            saved.unlink()
        measured[key] = row
        R.put(f"runs/{key}", row)
        log(f"{key}: {json.dumps(row)[:400]}")
    R.put("predictions", predictions(args, measured))
    failed_fitting = [k for k, r in measured.items() if not r.get("ok") and args.plans == "fitting"]
    R.put("failed_runs_the_planner_said_fit", failed_fitting)
    log(f"done: {len(measured)} runs, {len(failed_fitting)} failures among runs the planner said fit")
    return 1 if failed_fitting else 0


# ------------------------------------------------------------------------------------------------ FSDP (torchrun)

def fsdp_main(args) -> int:
    """Every rank: random weights built on its GPU, moved to the CPU, then the low plan shards them over the world."""
    import torch.distributed as dist

    from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest
    from comfyui_xdit_cogvideo.layout import choose_layout
    from comfyui_xdit_cogvideo.parallel import ParallelGroups

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.device(args.device).type == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": device} if cuda else {}))
    R = Results(args.out, args.budget) if rank == 0 else None
    card = float(args.caps.split(",")[0]) if cuda else None
    cap_bytes = int((card - args.context_gib) * GiB) if card else None
    for name in args.models.split(","):
        dtype = torch.bfloat16 if cuda else torch.float32
        transformer = build_transformer(name, device, dtype, tiny=args.tiny)
        sizes = sizes_for(name, args.tiny, transformer)
        plan, layout = planner(name, args.tiny, cap_bytes, "low", world=world, sizes=sizes)
        transformer.to("cpu")
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            if cap_bytes:
                total = torch.cuda.get_device_properties(device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), device)
        layout = choose_layout(world, heads=model_info(name, args.tiny).heads, use_cfg=True)
        groups = ParallelGroups.create(layout)
        frames, height, width = model_spec(name, args.tiny)["size"]
        row = {"model": name, "world": world, "layout": str(layout), "card_gib": card, "planner": plan.describe(),
               "planner_estimate_gib": round(max(plan.peaks) / GiB, 2)}
        try:
            engine = CogVideoEngine.from_components(transformer, groups=groups, attention="auto", optimize="auto",
                                                    memory=plan, device=device)
            g = torch.Generator().manual_seed(3)
            info = model_info(name, args.tiny)
            embeds = [torch.randn(1, info.text_len, info.text_dim, generator=g) for _ in range(2)]
            timer = StepTimer(device)
            timer.begin()
            t0 = time.perf_counter()
            engine.generate(GenerationRequest(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], frames=frames,
                                              height=height, width=width, steps=args.steps, seed=42),
                            on_step=lambda *a: timer.step())
            sync(device)
            row.update(ok=True, sample_s=round(time.perf_counter() - t0, 3),
                       s_per_step=median_after(timer.times(), 1))
        except torch.OutOfMemoryError as error:
            row.update(ok=False, error=str(error).splitlines()[0][:300])
        peak = torch.tensor([torch.cuda.max_memory_allocated(device) if cuda else 0], device=device)
        peaks = [torch.zeros_like(peak) for _ in range(world)]
        dist.all_gather(peaks, peak)
        row["per_rank_peak_gib"] = [round(int(p.item()) / GiB, 2) for p in peaks]
        if R is not None:
            R.put(f"fsdp/{name}/{world}x{card}GiB", row)
            log(f"fsdp {name}: {row}")
        del transformer
        engine = None
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run:
        try:
            row = one_run(args)
        except Exception as error:  # noqa: BLE001 - one JSON line back to the driver, whatever happened
            row = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
        print(json.dumps(row, default=str), flush=True)
        return 0
    if args.fsdp:
        return fsdp_main(args)
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
