"""``python -m comfyui_xdit_cogvideo``: generate videos through the worker pool, show a pool, run a worker.

    comfyui-xdit-cogvideo generate --model tiny --prompt "a cat" --output cat.mp4   # = python -m comfyui_xdit_cogvideo
    python -m comfyui_xdit_cogvideo generate --model /models/CogVideoX-5b --prompt "..." --gpus 0,1,2,3 \\
        --ulysses 2 --output out.mp4 --latents-out out.safetensors
    python -m comfyui_xdit_cogvideo pool-status --devices auto
    torchrun ... -m comfyui_xdit_cogvideo worker --connect HOST:PORT      # a rank on another host

Every failure ends with one ``error: ...`` line on stderr and a non-zero exit code (1; 2 for bad usage; 130
when interrupted). Bad inputs, models, requests, layouts, limits and output paths are rejected before any model
is built and any worker starts. ``generate`` prints one JSON line to stdout; everything for people goes to stderr.
Third-party warnings and progress bars (here and in the workers) are hidden unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

PROG = "comfyui-xdit-cogvideo"  # the console script; ``python -m comfyui_xdit_cogvideo`` passes its own name


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog,
                     description="Multi-GPU CogVideoX (Ulysses/Ring sequence parallel + CFG parallel).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="sample a video (and decode it to mp4)",
                       description="Sample a CogVideoX video on a pool of GPU (or CPU) workers.")
    model = g.add_argument_group("model")
    model.add_argument("--model", required=True,
                       help="tiny, tiny-5b, tiny-5b-i2v, tiny-1.5, tiny-1.5-i2v, a diffusers folder, or a transformer "
                            ".safetensors file")
    model.add_argument("--vae", help="VAE folder or .safetensors (for a single-file transformer)")
    model.add_argument("--text-encoder", help="T5 folder with its tokenizer, or a T5 .safetensors file "
                                              "(t5xxl_fp16, t5xxl_fp8_e4m3fn[_scaled]) with --tokenizer")
    model.add_argument("--tokenizer", help="T5 tokenizer folder (when none lies beside --text-encoder)")
    model.add_argument("--weights", choices=["upcast", "fp8"], default="upcast",
                       help="fp8-stored transformer files: upcast at load (default) or keep fp8 in memory")
    model.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on cuda, fp32 on cpu")
    model.add_argument("--attention", default="auto", help="attention kernel: auto, cudnn, flash, sdpa, fa4, ...")
    model.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                       help="a LoRA .safetensors merged into the weights, strength 1.0 = as trained (default); "
                            "repeat for several")
    model.add_argument("--memory", choices=["auto", "fast", "low", "offload"], default="auto",
                       help="memory plan: fast (whole model on every GPU), low (weights sharded over the GPUs, T5 "
                            "off the GPU, tiles that fit), offload (one GPU: blocks streamed from CPU memory); "
                            "auto = the fastest that fits each GPU's free memory (default)")
    text = g.add_argument_group("prompt").add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="text prompt (encoded by the model's T5)")
    text.add_argument("--embeds", help="safetensors with prompt_embeds [1, 226, D] (and optional "
                                       "negative_prompt_embeds)")
    g.add_argument("--negative-prompt", default="", help="negative prompt (default: empty)")
    sampling = g.add_argument_group("sampling")
    sampling.add_argument("--frames", type=int, help="4k+1 frames (default: the model's, 49 or 81)")
    sampling.add_argument("--height", type=int, help="pixels (default: the model's)")
    sampling.add_argument("--width", type=int, help="pixels (default: the model's)")
    sampling.add_argument("--steps", type=int, default=50)
    sampling.add_argument("--guidance", type=float, default=6.0)
    sampling.add_argument("--seed", type=int, default=42)
    sampling.add_argument("--scheduler", choices=["ddim", "dpm"], help="default: the model's own")
    sampling.add_argument("--dynamic-cfg", action="store_true", help="CogVideoX's dynamic guidance schedule")
    sampling.add_argument("--image", help="start image for image-to-video models")
    par = g.add_argument_group("devices and layout")
    par.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    count = par.add_mutually_exclusive_group()
    count.add_argument("--world-size", type=int, help="number of ranks (default: all GPUs, or 1 on cpu)")
    count.add_argument("--gpus", help="GPU list, e.g. 0,1,3")
    par.add_argument("--ulysses", type=int, help="Ulysses degree (must divide the head count)")
    par.add_argument("--ring", type=int, help="Ring degree")
    par.add_argument("--cfg", type=int, choices=[1, 2], help="CFG-parallel degree")
    out = g.add_argument_group("output")
    out.add_argument("--output", help="H.264 video file: .mp4, .mov or .mkv")
    out.add_argument("--latents-out", help="safetensors file with key 'latents'")
    out.add_argument("--fps", type=float, help="default: 8 for CogVideoX 1.0, 16 for 1.5")
    out.add_argument("--decode", choices=["auto", "tiled", "plain"], default="auto",
                     help="VAE decode: tiles spread over all ranks, or plain (untiled) on rank 0; auto: plain when "
                          "it fits rank 0's free memory and there are fewer than 3 ranks, else tiled (reported)")
    out.add_argument("--tile", help="decode tile size in pixels, HxW (default: the VAE's, 240x360); implies tiled "
                                    "under --decode auto")
    out.add_argument("--quiet", action="store_true", help="no progress or other lines on stderr (errors only)")
    out.add_argument("--verbose", action="store_true",
                     help="show worker output, third-party warnings and progress bars, and tracebacks on failure")

    s = sub.add_parser("pool-status", help="start a pool on some devices and show it",
                       description="Start the worker pool, print its status (ranks, pids, devices, memory), stop it.")
    s.add_argument("--devices", default="auto", help="auto, 0,1,3, cpu:N, or listen://HOST:PORT?world=N")
    s.add_argument("--model", help="also load this model (dtype per --dtype) and show memory with it resident")
    s.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None)
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    s.add_argument("--verbose", action="store_true", help="show worker output and third-party warnings")

    sub.add_parser("worker", help="run one pool worker (under torchrun, to add ranks on other hosts)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run the command line; returns the exit code. ``prog`` is how usage lines name the command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        from .pool.worker import main as worker_main

        return worker_main(argv[1:])
    try:
        args = _build_parser(prog).parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2), already printed
        return stop.code if isinstance(stop.code, int) else 2
    with contextlib.ExitStack() as stack:
        if not getattr(args, "verbose", False):
            stack.enter_context(_third_party_quiet())
        if args.command == "generate":
            _prestart(args)  # in the quiet environment the pool's workers will get
        return _run(args)


def _prestart(args) -> None:
    """Start the workers' processes now (pool.spares), so they import torch and the engine while this process
    imports and checks the inputs; a failing check leaves none behind (the pool's exit handlers kill them). On a
    thread: finding the GPUs imports torch. Devices it cannot tell without torch are left to the pool."""
    import threading

    if args.device == "cpu":
        devices = f"cpu:{args.world_size or 1}"
    elif args.gpus:
        devices = args.gpus
    elif args.world_size:
        devices = ",".join(str(i) for i in range(args.world_size)) if args.device == "cuda" else None
    else:
        devices = "auto" if args.device is None else "cuda"

    def run() -> None:
        from .pool import prestart

        try:
            prestart(devices)
        except Exception:  # a bad device string is reported by the checks below; the pool then spawns as usual
            pass

    if devices is not None:
        threading.Thread(target=run, daemon=True, name="xdit-prestart").start()


# Read by huggingface_hub, transformers, diffusers, tqdm and Python itself, here and in the workers (which inherit
# the environment): no progress bars, no warnings, no info logs from libraries.
_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error",
              "DIFFUSERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}


@contextlib.contextmanager
def _third_party_quiet():
    """Third-party warnings and progress bars stay off our stderr for the duration of one command."""
    saved = {k: os.environ.get(k) for k in _QUIET_ENV}
    os.environ.update(_QUIET_ENV)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run(args) -> int:
    import logging

    if getattr(args, "verbose", False):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    else:  # failures reach the user as the one error line below
        logging.getLogger("comfyui_xdit_cogvideo").addHandler(logging.NullHandler())
    try:
        if args.command == "generate":
            return _generate(args)
        return _pool_status(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure is one clear line
        from .pool import WorkerError

        if getattr(args, "verbose", False) and isinstance(error, WorkerError) and error.traceback:
            print(error.traceback, file=sys.stderr)
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 1
    finally:
        from .pool import shutdown_pool, shutdown_spares

        shutdown_pool()
        shutdown_spares()  # spares the pool did not take (a failed check, fewer ranks than prestarted)


def _one_line(error: BaseException) -> str:
    from .engine import GenerationCancelled
    from .pool import WorkerError

    if isinstance(error, WorkerError):
        text = f"worker rank {error.rank} failed: " + (f"{error.exc_type}: " if error.exc_type else "") + error.message
    elif isinstance(error, GenerationCancelled):
        text = "cancelled"
    elif isinstance(error, (FileNotFoundError, IsADirectoryError, PermissionError)) and error.filename:
        text = f"{error.strerror}: {error.filename}"
    else:
        text = str(error) or type(error).__name__
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first


def _devices(args) -> tuple[str, str]:
    """(pool devices string, device kind) from --device/--world-size/--gpus."""
    import torch

    cuda = torch.cuda.is_available()
    device = args.device or ("cuda" if cuda else "cpu")
    if args.world_size is not None and args.world_size < 1:
        raise CliError(f"--world-size must be >= 1, got {args.world_size}")
    if device == "cpu":
        if args.gpus:
            raise CliError("--gpus needs --device cuda (on cpu, use --world-size N for N gloo ranks)")
        return f"cpu:{args.world_size or 1}", "cpu"
    if not cuda:
        raise CliError("--device cuda asked for, but CUDA is not available here; use --device cpu")
    available = torch.cuda.device_count()
    if args.gpus:
        return args.gpus, "cuda"
    if args.world_size:
        if args.world_size > available:
            raise CliError(f"--world-size {args.world_size} exceeds the {available} visible GPU(s)")
        return ",".join(str(i) for i in range(args.world_size)), "cuda"
    return "cuda", "cuda"


def _parse_tile(text: str | None):
    if not text:
        return None
    from .vae_parallel import Tiling

    try:
        height, width = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise CliError(f"--tile takes HxW in pixels, e.g. 240x360; got {text!r}") from None
    if height % 8 or width % 8 or height < 16 or width < 16:
        raise CliError(f"--tile sizes must be multiples of 8 pixels and at least 16, got {text!r}")
    # overlaps of about 1/6 and 1/5 of a tile, snapped to whole latent rows so the tiles stitch exactly
    lh, lw = height // 8, width // 8
    return Tiling(height, width, max(1, round(lh / 6)) / lh, max(1, round(lw / 5)) / lw)


def _input_file(path: str, flag: str, expected: str) -> Path:
    """``path`` as an existing file, or a CliError saying what is wrong with it and what ``flag`` expects."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise CliError(f"{flag} {path!r} is a directory; give {expected}")
    if not file.is_file():
        raise CliError(f"{flag} {path!r} does not exist; give {expected}")
    return file


def _load_image(path: str):
    import numpy as np
    import torch
    from PIL import Image

    file = _input_file(path, "--image", "an image file (PNG, JPEG, WebP, ...)")
    try:
        with Image.open(file) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except Exception as error:
        raise CliError(f"cannot read --image {path!r}: {error}") from None
    return torch.from_numpy(array.copy())


def _load_embeds(path: str):
    from safetensors.torch import load_file

    file = _input_file(path, "--embeds", "a .safetensors file with prompt_embeds [1, 226, D]")
    try:
        tensors = load_file(str(file))
    except Exception as error:
        raise CliError(f"cannot read --embeds {path!r} as safetensors: {error}") from None
    if "prompt_embeds" not in tensors:
        raise CliError(f"--embeds {path!r} has no 'prompt_embeds' tensor (found: {', '.join(sorted(tensors)) or 'none'})")
    return tensors["prompt_embeds"], tensors.get("negative_prompt_embeds")


def _check_model_paths(args) -> None:
    """--vae, --text-encoder and --tokenizer name themselves when they point nowhere (before any model is built)."""
    for flag, value, expected in (("--vae", args.vae, "a diffusers vae/ folder or a VAE .safetensors file"),
                                  ("--text-encoder", args.text_encoder,
                                   "a T5 folder (config.json, weights and its tokenizer) or a T5 .safetensors file"),
                                  ("--tokenizer", args.tokenizer, "a T5 tokenizer folder")):
        if value is not None and not Path(value).expanduser().exists():
            raise CliError(f"{flag} {value!r} does not exist; give {expected}")


def _check_output(path: str | None, suffixes: tuple[str, ...], flag: str) -> Path | None:
    """``path`` checked as the writers check it (video.check_output_path), the error prefixed with ``flag``."""
    if path is None:
        return None
    from .video import OutputPathError, check_output_path

    try:
        return check_output_path(path, suffixes)
    except OutputPathError as error:
        raise CliError(f"{flag}: {error}") from None


def _expected_decode(tiled: bool | None, world: int) -> str:
    """What the decode will most likely be, for the up-front memory check: ``tiled`` as forced, else what
    pool.decode's automatic choice picks when memory is no constraint."""
    from .vae_parallel import TILED_DECODE_MIN_RANKS

    if tiled is None:
        tiled = world >= TILED_DECODE_MIN_RANKS
    return "tiled" if tiled else "plain"


def _check_fps(value: float | None) -> None:
    if value is not None and (not math.isfinite(value) or not 0 < value <= 1000):
        raise CliError(f"--fps must be a number above 0 and at most 1000 (e.g. 8 or 16), got {value:g}")


class _Progress:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.phase = None

    def __call__(self, event) -> None:
        if self.quiet:
            return
        if event.phase in ("load", "encode"):
            if event.step == 0:
                self._line(f"{'loading model' if event.phase == 'load' else 'encoding prompt'} ...", end=True)
            return
        speed = f"  {event.seconds_per_step:.2f} s/{'step' if event.phase == 'sample' else 'round'}" \
            if event.seconds_per_step is not None else ""
        name = "sampling" if event.phase == "sample" else "decoding"
        last = event.step == event.total
        if not self.tty and not (event.step == 1 or last or event.step % max(1, event.total // 10) == 0):
            return  # logs get about ten lines per phase
        self._line(f"{name} {event.step}/{event.total}{speed}", end=last)

    def _line(self, text: str, end: bool) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K" + text + ("\n" if end else ""))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()


def _generate(args) -> int:
    # Everything the user typed is checked first, in this order, before any model is built (tiny models are built
    # on first use) and before any worker starts: output paths and fps, then input files, devices, model paths.
    from .video import VIDEO_SUFFIXES, VideoWriteError, check_encoder

    output = _check_output(args.output, VIDEO_SUFFIXES, "--output")
    latents_out = _check_output(args.latents_out, (".safetensors",), "--latents-out")
    if output is None and latents_out is None:
        raise CliError("nothing to write: give --output FILE.mp4 and/or --latents-out FILE.safetensors")
    _check_fps(args.fps)
    if output is not None:  # imageio-ffmpeg importable, its binary runs and encodes H.264 (a 2-frame clip)
        try:
            check_encoder()
        except VideoWriteError as error:
            raise CliError(f"--output: {error}") from None
    tiling = _parse_tile(args.tile)
    prompt_embeds = negative_embeds = None
    if args.embeds:
        prompt_embeds, negative_embeds = _load_embeds(args.embeds)
    image = _load_image(args.image) if args.image else None
    _check_model_paths(args)
    devices, kind = _devices(args)

    from .layout import choose_layout
    from .limits import check_memory
    from .loading import ModelSource, read_model_info
    from .lora import LoraSpec
    from .parallel.kernels import resolve_kernel
    from .pool import ModelSpec, get_pool, parse_devices
    from .request import GenerationRequest

    dtype = args.dtype or ("bf16" if kind == "cuda" else "fp32")
    loras = tuple(LoraSpec.parse(text) for text in args.lora)
    spec = ModelSpec(ModelSource(args.model, vae=args.vae, text_encoder=args.text_encoder,
                                 tokenizer=args.tokenizer, storage=args.weights), dtype, args.attention, loras,
                     args.memory)
    spec.validate()
    try:
        resolve_kernel(args.attention, "cuda" if kind == "cuda" else "cpu")
    except ValueError as error:
        raise CliError(str(error)) from None
    info = read_model_info(spec.source)
    resolved_source = spec.source.resolve()
    if output is not None and resolved_source.vae is None:
        raise CliError("--output needs the model's VAE, which this model lacks; pass --vae or use --latents-out")
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds, frames=args.frames, height=args.height, width=args.width,
        steps=args.steps, guidance=args.guidance, seed=args.seed, scheduler=args.scheduler,
        dynamic_cfg=args.dynamic_cfg, image=image,
    )
    resolved = request.resolved(info)
    pool_devices = parse_devices(devices)
    world = pool_devices.world_size
    layout = choose_layout(world, heads=info.heads, use_cfg=resolved.use_cfg, cfg=args.cfg, ulysses=args.ulysses,
                           ring=args.ring)
    # None = automatic (pool.decode chooses from rank 0's free memory and the rank count, and says why)
    tiled = {"tiled": True, "plain": False}.get(args.decode, True if tiling else None)
    tile = (tiling.sample_height, tiling.sample_width) if tiling else (480, 720)
    if args.memory == "fast" or pool_devices.kind == "cpu":  # GPUs under the other plans: the detailed planner
        check_memory(info, resolved, layout, dtype, resolved_source, pool_devices,  # (memory.py) in pool.generate
                     decode=None if output is None else _expected_decode(tiled, world), tile=tile,
                     label=info.display)
    fps = args.fps or (16 if info.version == "1.5" else 8)
    if output is not None:  # the real writer on one frame of the real size: folder, container, size and fps
        from .video import VideoWriteError, check_writable

        try:
            check_writable(output, resolved.height, resolved.width, fps)
        except VideoWriteError as error:
            raise CliError(f"--output: {error}") from None

    pool = get_pool(devices, echo_output=args.verbose)  # workers start only now, once the inputs are valid
    progress = _Progress(args.quiet)
    say = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    say(f"{info.display} {resolved.frames}x{resolved.height}x{resolved.width}, {resolved.steps} "
        f"steps, {dtype}, layout {layout} on {pool.devices}")
    started = time.perf_counter()
    latents = pool.generate(spec, request, layout=layout, on_event=progress)
    sampled = time.perf_counter()
    summary = {"latents_shape": list(latents.shape), "layout": str(layout), "devices": str(pool.devices),
               "memory": pool.last_plan.describe(), "sample_seconds": round(sampled - started, 3)}
    status = pool.status()  # where the time went (worker start-up, load, compile policy, first step)
    summary["timings"] = {"startup": status.get("startup"), "job": status.get("last_job"),
                          "compile": status.get("compile")}
    if loras:
        summary["loras"] = [[lora.name, lora.strength] for lora in loras]
    if latents_out is not None:
        from safetensors.torch import save_file

        save_file({"latents": latents.contiguous()}, str(latents_out))
        summary["latents_out"] = str(latents_out)
    if output is not None:
        from .video import write_video

        frames = pool.decode(spec, latents, frames=resolved.frames, tiled=tiled, on_event=progress, tiling=tiling)
        say(f"decode {pool.last_decode.describe()}")
        write_video(output, frames, fps=fps)
        summary.update(output=str(output), frames=int(frames.shape[0]), width=int(frames.shape[2]),
                       height=int(frames.shape[1]), fps=fps, decode_seconds=round(time.perf_counter() - sampled, 3),
                       decode=pool.last_decode.mode, decode_choice=pool.last_decode.describe())
    say("wrote " + ", ".join(str(p) for p in (output, latents_out) if p is not None))
    print(json.dumps(summary), flush=True)
    return 0


def _pool_status(args) -> int:
    from .layout import Layout
    from .pool import ModelSpec, get_pool, parse_devices

    spec = info = None
    if args.model:  # a bad model is refused before any worker starts
        from .loading import read_model_info

        kind = parse_devices(args.devices).kind
        spec = ModelSpec(args.model, args.dtype or ("fp32" if kind == "cpu" else "bf16"))
        spec.validate()
        info = read_model_info(spec.source)
    pool = get_pool(args.devices, echo_output=args.verbose)
    pool.start()
    if spec is not None:
        from .request import GenerationRequest

        embeds = GenerationRequest(prompt_embeds=_zeros(info), negative_prompt_embeds=_zeros(info), steps=1)
        pool.generate(spec, embeds)
    status = pool.status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"pool {status['devices']} ({status['backend']}), {status['world_size']} rank(s), state {status['state']}")
    if status.get("model"):
        m = status["model"]
        layout = status.get("layout")
        shown = str(Layout(*layout)) if isinstance(layout, (list, tuple)) and len(layout) == 3 else layout
        print(f"model {m['path']} ({m.get('variant')}, {m['dtype']}, attention {m['attention']}), layout {shown}, "
              f"memory {m.get('memory')}")
        for lora in m.get("loras") or []:
            print(f"  LoRA {lora['name']} strength {lora['strength']:g} ({lora['format']}, {lora['layers']} layers)")
    for r in status["ranks"]:
        mem = r["memory"]
        if "allocated" in mem:
            memory = f"{mem['allocated'] / 2**30:.2f} GiB allocated, {mem['free'] / 2**30:.1f}/" \
                     f"{mem['total'] / 2**30:.1f} GiB free"
        else:
            memory = f"{(mem.get('rss') or 0) / 2**30:.2f} GiB resident"
        print(f"  rank {r['rank']}: pid {r['pid']} on {r['host']} {r['device']}, {r['state']}, {memory}")
    return 0


def _zeros(info):
    import torch

    return torch.zeros(1, info.text_len, info.text_dim)


if __name__ == "__main__":
    sys.exit(main(prog="python -m comfyui_xdit_cogvideo.cli"))
