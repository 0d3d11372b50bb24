"""VAE decode as the pool runs it: untiled on rank 0, tiled over every rank, and the automatic choice, beside diffusers.

    python benchmarks/decode_bench.py --out decode.json --models 2b,5b --pools "0;0,1"
    python benchmarks/decode_bench.py --tiny --device cpu --pools "cpu:1;cpu:2" --out /tmp/d.json

Each model is a decode-only diffusers folder (``transformer/config.json`` and a random VAE of the published size;
``--models-dir``, reused between runs), decoding random latents of the model's default size (49 x 480 x 720: 13
latent frames of 60 x 90). Plain diffusers first, on the first device: ``vae.decode`` untiled and tiled (one warm-up
each, then ``--repeats`` timed decodes, median; peak memory; ``untiled_frames``: untiled up to float frames on the CPU,
as ``CogVideoXPipeline(output_type="np")`` returns them, which is what ``pool.decode`` returns). ``host``: what the pool
adds after the VAE, measured in this process: the decoded video in the VAE's dtype through a loopback pool channel,
and the float frames made from it. Then per pool (``;``-separated devices as get_pool
takes them): ``pool.decode`` with ``tiled=False`` (untiled on rank 0), ``tiled=True`` (tiles over every rank) and
``tiled=None`` (automatic, with the choice it reports), the same way, wall clock in the caller. The automatic decode is
compared with the explicit mode it picked (expect max_abs 0) and the pool's untiled decode with diffusers' (expect
max_abs 0 where the worker picks the same kernels: the pool makes the float frames from the bf16 video with the
same exact operations; bf16 rounding at most otherwise). What it answers: from how many ranks tiling beats one untiled decode
(``vae_parallel.TILED_DECODE_MIN_RANKS``, 3 predicted from the 1- and 2-rank measurements).
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
from common import add_folder_args, build_vae, compare, json_document, log, model_spec  # noqa: E402
from pool_bench import model_folders  # noqa: E402


def build_folder(name: str, root: Path, tiny: bool, device: str) -> Path:
    """A folder with the transformer's config (no weights: decode never loads them) and a random VAE."""
    folder = root / (f"decode-tiny-{name}" if tiny else f"decode-{name}")
    if (folder / "vae" / "config.json").exists():
        return folder
    staging = folder.with_suffix(".tmp")
    (staging / "transformer").mkdir(parents=True, exist_ok=True)
    config = dict(model_spec(name, tiny)["transformer"], _class_name="CogVideoXTransformer3DModel")
    (staging / "transformer" / "config.json").write_text(json.dumps(config, indent=1))
    dtype = torch.float32 if tiny else torch.bfloat16
    build_vae(name, device, dtype, tiny=tiny).save_pretrained(staging / "vae", safe_serialization=True)
    staging.rename(folder)
    return folder


def timed(run, repeats: int, device: str) -> tuple[dict, object]:
    """One warm-up, then ``repeats`` timed runs: (timings, the last result)."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    result = run()
    seconds = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        result = run()
        sync()
        seconds.append(time.perf_counter() - t)
    return {"median_s": round(statistics.median(seconds), 3), "all_s": [round(s, 3) for s in seconds]}, result


@torch.no_grad()
def diffusers_decodes(folder: Path, latents: torch.Tensor, args) -> tuple[dict, torch.Tensor]:
    """Plain diffusers on the first device, untiled and tiled: (rows, untiled frames [F, H, W, 3])."""
    from diffusers import AutoencoderKLCogVideoX

    device = "cuda:0" if args.device == "cuda" else "cpu"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    vae = AutoencoderKLCogVideoX.from_pretrained(folder / "vae", torch_dtype=dtype).to(device).eval()
    z = latents.to(device, dtype).permute(0, 2, 1, 3, 4) / vae.config.scaling_factor
    from diffusers.video_processor import VideoProcessor

    processor = VideoProcessor(vae_scale_factor=8)  # as CogVideoXPipeline makes it

    def frames():  # what CogVideoXPipeline(output_type="np") returns: float frames on the CPU
        return processor.postprocess_video(video=vae.decode(z).sample, output_type="np")

    rows, untiled = {}, None
    for mode in ("untiled", "untiled_frames", "tiled"):
        vae.enable_tiling() if mode == "tiled" else vae.disable_tiling()
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if mode == "untiled_frames":
            rows[mode], _ = timed(frames, args.repeats, args.device)
            continue
        rows[mode], video = timed(lambda: vae.decode(z).sample, args.repeats, args.device)
        if args.device == "cuda":
            rows[mode]["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        if mode == "untiled":
            untiled = (video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).cpu()
        del video
    del vae, z
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rows, untiled


def host_costs(shape: tuple, dtype: torch.dtype, repeats: int) -> dict:
    """What ``pool.decode`` adds on the host after the VAE: rank 0's output ([F, H, W, 3] in the VAE's dtype) over a
    loopback pool channel (HMAC-SHA256 both ends) and the float frames made from it in the caller (median s)."""
    import threading

    from comfyui_xdit_cogvideo.pool.channel import Channel, free_port, listen
    from comfyui_xdit_cogvideo.vae_parallel import frames_of

    key = b"k" * 32
    server = listen("127.0.0.1", free_port())
    ends = {}
    thread = threading.Thread(target=lambda: ends.update(a=Channel.accept(server.accept()[0], key)))
    thread.start()
    ends["b"] = Channel.connect(*server.getsockname(), key)
    thread.join()
    server.close()
    rows = torch.rand(shape, generator=torch.Generator().manual_seed(0)).mul(2).sub(1).to(dtype)
    transfer, convert = [], []
    try:
        for _ in range(repeats + 1):
            sender = threading.Thread(target=ends["b"].send, args=({"op": "result", "value": rows},))
            t = time.perf_counter()
            sender.start()
            got = ends["a"].recv(timeout=120)["value"]
            sender.join()
            transfer.append(time.perf_counter() - t)
            t = time.perf_counter()
            frames_of(got)
            convert.append(time.perf_counter() - t)
    finally:
        ends["a"].close()
        ends["b"].close()
    return {"bytes": rows.numel() * rows.element_size(), "dtype": str(dtype).removeprefix("torch."),
            "channel_s": round(statistics.median(transfer[1:]), 3),
            "frames_of_s": round(statistics.median(convert[1:]), 3), "threads": torch.get_num_threads()}


def pool_decodes(folder: Path, devices: str, latents: torch.Tensor, frames: int, args, reference) -> dict:
    from comfyui_xdit_cogvideo.pool import ModelSpec, WorkerPool

    spec = ModelSpec(str(folder), dtype="bf16" if args.device == "cuda" else "fp32")
    pool = WorkerPool(devices)
    row: dict = {}
    outputs: dict = {}
    try:
        t = time.perf_counter()
        pool.start()
        row["start_s"] = round(time.perf_counter() - t, 2)
        row["world_size"] = pool.world_size
        for label, tiled in (("plain", False), ("tiled", True), ("auto", None)):
            try:
                row[label], outputs[label] = timed(lambda: pool.decode(spec, latents, frames=frames, tiled=tiled),
                                                   args.repeats, "cpu")  # the call returns frames on the CPU
                row[label]["choice"] = pool.last_decode.describe()
                ranks = pool.status()["ranks"]
                row[label]["peak_gib_per_rank"] = [round((r["memory"].get("peak") or 0) / 2 ** 30, 2) for r in ranks]
            except Exception as error:  # noqa: BLE001 - record and go on with the next mode
                row[label] = {"error": f"{type(error).__name__}: {error}"[:1500]}
        if "auto" in outputs:
            picked = pool.last_decode.mode
            if picked in outputs:
                row["auto_vs_picked"] = {"picked": picked, **compare(outputs["auto"], outputs[picked])}
        if "plain" in outputs and reference is not None:
            row["plain_vs_diffusers"] = compare(outputs["plain"], reference)
        if "plain" in row and "tiled" in row and "median_s" in row["plain"] and "median_s" in row["tiled"]:
            row["tiled_faster"] = row["tiled"]["median_s"] < row["plain"]["median_s"]
    finally:
        pool.shutdown()
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="2b,5b")
    p.add_argument("--pools", default="0;0,1", help="';'-separated pool devices, e.g. '0;0,1;0,1,2,3' or 'cpu:2'")
    p.add_argument("--repeats", type=int, default=3)
    add_folder_args(p)
    args = p.parse_args(argv)

    out, save = json_document(args)

    for name, size, folder, _ in model_folders(args, build_folder):
        frames, height, width = size
        res = out["models"].setdefault(name, {"size": [frames, height, width]})
        channels = model_spec(name, args.tiny)["transformer"]["out_channels"]
        latents = torch.randn(1, (frames - 1) // 4 + 1, channels, height // 8, width // 8,
                              generator=torch.Generator().manual_seed(0))
        reference = None
        if not args.no_diffusers:
            res["diffusers"], reference = diffusers_decodes(folder, latents, args)
            log(f"{name} diffusers: {json.dumps(res['diffusers'])}")
            save()
        res["host"] = host_costs((frames, height, width, 3), torch.bfloat16 if args.device == "cuda" else torch.float32,
                                 args.repeats)
        log(f"{name} host: {json.dumps(res['host'])}")
        for devices in [d for d in args.pools.split(";") if d]:
            res.setdefault("pools", {})[devices] = pool_decodes(folder, devices, latents, frames, args, reference)
            log(f"{name} pool {devices}: {json.dumps(res['pools'][devices])[:600]}")
            save()
    save()


if __name__ == "__main__":
    main()
