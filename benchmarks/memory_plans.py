"""Memory plans on one GPU under caps that mimic smaller cards, plus predictions for the FSDP plans on several.

    python benchmarks/memory_plans.py --out mem.json                         # one H200: 2b, 5b x 24/16/12 GiB caps
    python benchmarks/memory_plans.py --tiny --device cpu --out /tmp/m.json  # CPU smoke test of every code path
    torchrun --nproc_per_node=2 benchmarks/memory_plans.py --fsdp --models 5b --caps 24,16 --layouts cfg2,ulysses2 \
        --steps 50 --out fsdp2.json
    (benchmarks/gpu_session_1gpu.sh and gpu_session_fsdp.sh split these into device calls)

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

Runs are chosen by ``--plans`` and come in priority order: the uncapped fast reference (``--no-reference`` leaves
it out), the plan ``auto`` picks on each card (tightest card first), then the others. ``fitting`` (default) = each
plan the planner says fits some card; ``auto`` = only auto's picks; ``all`` = every plan on every card (the ones
predicted not to fit are expected to fail: that checks the planner's refusals); or a list of plan names. Except
with ``all``, each distinct plan variant (plan, T5 placement, shard count, decode tile) runs once, under the
smallest card it was picked for: a job that finishes under that cap finishes under a larger one the same way.

``--budget`` (seconds, from the driver's start): a run starts only if its estimate (``estimated_seconds``: measured
s/step x steps plus per-run overheads) fits what is left; a started run is killed at what is left. The shell's
own ``timeout`` should add ~40 s for the interpreter start. Each run's latents and T5 output stay beside the
results (``*.pt``, a few MB) to compare runs made in other calls.

Predictions (no measurement, labelled so): per-rank peaks of the ``low`` plan (FSDP2 over 2, 4 and 8 ranks) from
the shard sizes and, where a 1-GPU measurement exists, its measured activation peak scaled by the layout's
tokens per rank.

``--fsdp`` (under torchrun, one process per GPU): whole jobs (T5 encode on rank 0, steps, decode spread over the
ranks) with the low plan for real on the world's GPUs, for every card in ``--caps`` x layout in ``--layouts``
(e.g. ``cfg2,ulysses2``), each rank capped like the card; per-rank peaks per phase, s/step, phase times.
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
# Run-time estimates for the --budget check, one H200 with compiled blocks and flash-attn-4, from session 3's runs
# (BENCHMARKS.md; 2026-11-29): s/step of the fast plan; offload's step factor (1.04 on 5b, 1.13 on 2b); per run
# the process start, building the random models on the GPU, moving what the plan keeps on the CPU (and pinning it
# for offload), T5 moving to the GPU and back, the decode; T5 encoding on the CPU instead; the first run's compile
# and FA4 JIT on a machine whose caches are cold (a guess).
S_PER_STEP = {"2b": 0.44, "5b": 1.19, "1.5-5b": 4.0}
OFFLOAD_FACTOR = 1.15
RUN_OVERHEAD_S = {"fast": 30.0, "low": 60.0, "offload": 80.0}
FIRST_RUN_EXTRA_S = 45.0
TEXT_ON_CPU_S = 10.0


def cap_bytes_for(card: str | float | None, context_gib: float) -> int | None:
    """What PyTorch's allocator may use on a card of ``card`` GiB (``None``/"none" = uncapped): the card minus
    what the CUDA context, cuBLAS and the driver take outside the allocator."""
    if card in (None, "none"):
        return None
    return int((float(card) - context_gib) * GiB)


def apply_cap(device: torch.device, cap_bytes: int | None) -> None:
    """Free cached blocks, reset the peak counters and cap the allocator at ``cap_bytes`` (``None`` = the whole
    device); a run that needs more fails with an out-of-memory error, as on the smaller card."""
    if device.type != "cuda":
        return
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total) if cap_bytes else 1.0, device)


def estimated_seconds(name: str, plan, steps: int, tiny: bool, first: bool = False) -> float:
    """A run's expected wall time on one H200 for a resolved MemoryPlan (CPU smoke runs: a minute each)."""
    if tiny:
        return 60.0
    per_step = S_PER_STEP.get(name, 4.0) * (OFFLOAD_FACTOR if plan.name == "offload" else 1.0)
    return (RUN_OVERHEAD_S[plan.name] + (FIRST_RUN_EXTRA_S if first else 0.0) + steps * per_step
            + (TEXT_ON_CPU_S if plan.text == "cpu" else 0.0))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results JSON path")
    p.add_argument("--models", default="2b,5b")
    p.add_argument("--caps", default="24,16,12", help="card sizes in GiB (as nvidia-smi reports them)")
    p.add_argument("--plans", default="fitting", help="fitting (plans the planner says fit), auto, all, or a list")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per run (50 = the full job)")
    p.add_argument("--context-gib", type=float, default=0.75,
                   help="GiB a real card loses outside PyTorch's allocator (CUDA context, cuBLAS, driver)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke test of every code path)")
    p.add_argument("--budget", type=float, default=540, help="seconds; runs that would not fit are skipped")
    p.add_argument("--run-timeout", type=float, default=420, help="seconds per subprocess run")
    p.add_argument("--no-reference", action="store_true", help="skip the uncapped fast run (another call has it)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: the low plan on the world's GPUs")
    p.add_argument("--layouts", default="auto", help="--fsdp: layouts to run, e.g. 'cfg2,ulysses2' (auto = chosen)")
    p.add_argument("--pg-timeout", type=float, default=120, help="--fsdp: process-group timeout, seconds")
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
    cap_bytes = cap_bytes_for(card, args.context_gib)
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
    apply_cap(device, cap_bytes)
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

def _variant(plan) -> tuple:
    """What decides a run's memory: the plan, T5's placement, the shard count and the decode tile."""
    return plan.name, plan.text, plan.shard, plan.decode_tile


def runs_for(args) -> list[tuple[str, str, str]]:
    """(model, plan, card) runs, in priority order: the uncapped fast reference, what ``auto`` picks on each card,
    then the other plans that fit. ``fitting`` and explicit lists run each distinct plan variant (``_variant``)
    once, under the smallest card it was picked for: a job that finishes under that cap finishes under the larger
    ones with the same variant. ``all`` runs every plan on every card (checks the planner's refusals too)."""
    from comfyui_xdit_cogvideo.memory import PLANS, MemoryPlanError

    cuda = torch.device(args.device).type == "cuda"
    caps = [c.strip() for c in args.caps.split(",") if c.strip()] if cuda else ["none"]
    caps = sorted(caps, key=lambda c: float("inf") if c == "none" else float(c))  # tightest first
    out: list[tuple[str, str, str]] = []
    for name in args.models.split(","):
        runs = [] if args.no_reference else [(name, "fast", "none")]  # the reference: uncapped
        seen = {("fast", "gpu", 1, None)} if runs else set()
        for first_auto in (True, False):
            for cap in caps:
                cap_bytes = cap_bytes_for(cap, args.context_gib)
                if first_auto:
                    wanted = ["auto"] if args.plans in ("fitting", "all") else []
                elif args.plans in ("fitting", "all"):
                    wanted = list(PLANS)
                else:
                    wanted = args.plans.split(",")
                for plan in wanted:
                    try:
                        chosen, _ = planner(name, args.tiny, cap_bytes, plan)
                    except MemoryPlanError:
                        if plan == "auto" or args.plans == "all":
                            runs.append((name, plan, cap))  # expected to be refused: recorded as such
                        continue
                    if args.plans == "fitting" and chosen.notes:
                        continue  # the planner says this plan does not fit this card
                    if args.plans != "all":
                        if _variant(chosen) in seen:
                            continue
                        seen.add(_variant(chosen))
                    runs.append((name, plan, cap))
        out += list(dict.fromkeys(runs))
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
                cap_bytes = cap_bytes_for(cap, args.context_gib)
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


def planner_choices(args) -> dict:
    """What ``auto`` picks for each model on each card (1 GPU), with its estimated peak: no measurement."""
    from comfyui_xdit_cogvideo.memory import MemoryPlanError

    out = {}
    for name in args.models.split(","):
        for cap in args.caps.split(","):
            try:
                plan, _ = planner(name, args.tiny, cap_bytes_for(cap, args.context_gib), "auto")
                out[f"{name}/{cap}GiB"] = plan.describe()
            except MemoryPlanError as error:
                out[f"{name}/{cap}GiB"] = f"refused: {str(error)[:300]}"
    return out


def driver(args) -> int:
    R = Results(args.out, args.budget)
    R.put("env", environment(args.device))
    R.put("note", "1-GPU runs under allocator caps; 'predictions' are computed, not measured")
    measured: dict = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    reference = None
    R.put("planner_choices", planner_choices(args))
    runs = runs_for(args)
    R.put("runs_planned", [":".join(r) for r in runs])
    from comfyui_xdit_cogvideo.memory import MemoryPlan, MemoryPlanError

    for index, (name, plan, cap) in enumerate(runs):
        key = f"{name}:{plan}:{cap}"
        try:
            resolved = planner(name, args.tiny, cap_bytes_for(cap, args.context_gib), plan)[0]
        except MemoryPlanError:
            resolved = MemoryPlan.default("fast")  # refused: the run ends at once
        need = estimated_seconds(name, resolved, args.steps, args.tiny, first=index == 0)
        if need > R.left():
            R.skip(key, f"time budget: a run takes about {need:.0f} s, {R.left():.0f} s left")
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
        saved = Path(str(part) + ".pt")  # latents and T5 output (a few MB), kept to compare across calls
        if row.get("ok") and saved.exists():
            data = torch.load(saved)
            if plan == "fast" and cap == "none":
                reference = data
            elif reference is not None:
                row["latents_vs_fast"] = compare(data["latents"], reference["latents"])
                row["t5_vs_fast"] = compare(data["positive"], reference["positive"])
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
    """Under torchrun, one process per GPU: whole jobs with the low plan (FSDP2 over the world) for each card in
    ``--caps`` and each layout in ``--layouts``, every rank capped like that card: T5 encode on rank 0 (where the
    plan puts it), ``--steps`` steps, the VAE decode spread over the ranks. Per-rank peaks, s/step, phase times.
    The process group is made without ``device_id``, as the pool's workers do (a bound NCCL default group and
    sub-groups hang: issue 18). Rank 0 decides whether a run still fits ``--budget``; all ranks follow."""
    import gc
    from datetime import timedelta

    import torch.distributed as dist

    from comfyui_xdit_cogvideo.memory import MemoryPlan

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.device(args.device).type == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.pg_timeout))
    R = Results(args.out, args.budget) if rank == 0 else None
    if R is not None:
        R.put("env", environment(args.device))
        R.put("note", f"low plan (FSDP2) on {world} ranks under allocator caps; whole jobs (T5, steps, decode)")
    caps = [c.strip() for c in args.caps.split(",")] if cuda else ["none"]
    failed = False
    first = True
    for name in args.models.split(","):
        for cap in caps:
            for layout_text in args.layouts.split(","):
                key = f"fsdp/{name}/{world}x{cap}GiB/{layout_text}"
                need = estimated_seconds(name, MemoryPlan.default("low", world), args.steps // world, args.tiny,
                                         first=first)
                go = [R.left() > need if R is not None else True]
                dist.broadcast_object_list(go, src=0)
                if not go[0]:
                    if R is not None:
                        R.skip(key, f"time budget: about {need:.0f} s needed, {R.left():.0f} s left")
                    continue
                first = False
                try:
                    row = fsdp_run(args, name, cap, layout_text, rank, world, device)
                except Exception as error:  # noqa: BLE001 - recorded; the group may be broken, so stop after it
                    row = {"ok": False, "error": f"{type(error).__name__}: {str(error)[:400]}",
                           "traceback": traceback.format_exc()[-2000:]}
                    failed = True
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                rows = [None] * world
                if not failed:
                    try:
                        dist.all_gather_object(rows, row)
                    except Exception as error:  # noqa: BLE001 - another rank failed and left
                        row = dict(row, ok=False, error=f"another rank failed: {str(error)[:300]}")
                        rows, failed = [row], True
                if R is not None:
                    entry = dict(rows[0] or row, per_rank=[
                        {k: r.get(k) for k in ("ok", "peak_allocated_gib", "phase_peaks_gib", "error")}
                        for r in rows if r is not None])
                    if not failed:
                        entry["per_rank_peak_gib"] = [r.get("peak_allocated_gib") for r in rows]
                    R.put(key, entry)
                    log(f"{key}: {json.dumps(entry, default=str)[:600]}")
                if failed:
                    log(f"rank {rank}: {row.get('error')}")
                    os._exit(1)  # a failed collective leaves the others waiting: end this rank now
    dist.destroy_process_group()
    return 0


def fsdp_run(args, name: str, cap: str, layout_text: str, rank: int, world: int, device: torch.device) -> dict:
    """One whole job on this rank (all ranks call it together)."""
    from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest
    from comfyui_xdit_cogvideo.layout import Layout, choose_layout
    from comfyui_xdit_cogvideo.memory import plan_memory
    from comfyui_xdit_cogvideo.parallel import ParallelGroups
    from comfyui_xdit_cogvideo.vae_parallel import decode_latents, fit_tiling

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    info = model_info(name, args.tiny)
    layout = choose_layout(world, heads=info.heads, use_cfg=True) if layout_text == "auto" else \
        Layout.parse(layout_text)
    cap_bytes = cap_bytes_for(cap, args.context_gib)
    apply_cap(device, None)  # building needs the whole model on the GPU for a moment
    transformer = build_transformer(name, device, dtype, tiny=args.tiny)
    tokenizer, encoder = build_text_encoder(device, dtype, tiny=args.tiny) if rank == 0 else (None, None)
    vae = build_vae(name, device, dtype, tiny=args.tiny)
    sizes = sizes_for(name, args.tiny, transformer, encoder, vae) if args.tiny else sizes_for(name, False)
    plan = plan_memory("low", sizes, info, job_for(name, args.tiny), layout, [cap_bytes] * world)
    transformer.to("cpu")
    if encoder is not None and plan.text != "gpu":
        encoder.to("cpu")
    apply_cap(device, cap_bytes)
    groups = ParallelGroups.create(layout)
    frames, height, width = model_spec(name, args.tiny)["size"]
    row = {"model": name, "world": world, "layout": str(layout), "card_gib": cap, "rank": rank,
           "planner": plan.describe(), "planner_estimate_gib": [round(p / GiB, 2) for p in plan.peaks]}
    peaks = {}

    def phase_peak(phase):
        if cuda:
            peaks[phase] = round(torch.cuda.max_memory_allocated(device) / GiB, 2)
            torch.cuda.reset_peak_memory_stats(device)

    engine = CogVideoEngine.from_components(transformer, vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                                            groups=groups, attention="auto", optimize="auto", memory=plan,
                                            device=device)
    timer = StepTimer(device)
    t0 = time.perf_counter()
    timer.begin()
    latents = engine.generate(GenerationRequest(prompt=PROMPT, frames=frames, height=height, width=width,
                                                steps=args.steps, guidance=6.0, seed=42),
                              on_step=lambda *a: timer.step())
    sync(device)
    t1 = time.perf_counter()
    phase_peak("encode_and_sample")
    budget = None
    if cuda and cap_bytes:
        budget = int((cap_bytes - torch.cuda.memory_allocated(device)) * 0.95) - GiB // 2
    tiling = fit_tiling(vae, tuple(latents.shape[-2:]), budget)
    video = decode_latents(vae, latents.to(device), frames, tiled=True, tiling=tiling, group=groups.world)
    sync(device)
    t2 = time.perf_counter()
    phase_peak("decode")
    per_step = median_after(timer.times(), 1)
    row.update(ok=True, steps=args.steps, encode_and_sample_s=round(t1 - t0, 3), decode_s=round(t2 - t1, 3),
               total_s=round(t2 - t0, 3), s_per_step=per_step and round(per_step, 4),
               decode_tile=tiling and [tiling.sample_height, tiling.sample_width],
               frames=None if video is None else list(video.shape))
    if cuda:
        row.update(peak_allocated_gib=max(peaks.values()), phase_peaks_gib=peaks)
    return row


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
