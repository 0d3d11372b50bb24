"""Shared pieces of the ComfyUI nodes: custom socket types, lazy engine/pool access, the progress pump.

Nothing here starts a process or imports the engine at import time: ``comfyui_xdit_cogvideo`` (which pulls in
the parallel engine) and its pool are imported inside the functions that need them, the first time a node runs
(``prestart_workers`` only imports the pool's light package and asks it to prestart workers on a thread).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from comfy_api.latest import io

log = logging.getLogger("xdit_cogvideo")

CATEGORY = "xDiT/CogVideoX"

# Custom socket types. The model handle carries a comfyui_xdit_cogvideo.pool.ModelSpec (paths, dtype, attention),
# never weights: the worker processes load and keep the weights.
ModelType = io.Custom("XDIT_COGVIDEO_MODEL")
ParallelType = io.Custom("XDIT_COGVIDEO_PARALLEL")

# Attention backends the engine knows (comfyui_xdit_cogvideo.parallel.kernels.KERNELS), fastest first on GPUs.
ATTENTION_BACKENDS = ["auto", "fa4", "fa3", "cudnn", "flash", "sdpa", "fa2", "math"]
PRECISIONS = ["bf16", "fp16", "fp32"]
SCHEDULERS = ["default", "ddim", "dpm"]
DEGREE_CHOICES = ["auto", "1", "2", "3", "4", "5", "6", "7", "8"]
CFG_CHOICES = ["auto", "1", "2"]
MEMORY_CHOICES = ["auto", "fast", "low", "offload"]  # comfyui_xdit_cogvideo.memory.MEMORY_MODES

LATENT_KEY = "xdit_cogvideo"  # extra key in LATENT dicts: what the decode needs besides the samples


@dataclass(frozen=True)
class ParallelConfig:
    """What the parallel-config node outputs. ``None`` degrees mean "choose the fastest valid one"; ``memory`` is
    the memory plan (auto = the fastest that fits the GPUs' free memory)."""

    devices: str = "auto"
    cfg: int | None = None
    ulysses: int | None = None
    ring: int | None = None
    memory: str = "auto"

    @property
    def explicit(self) -> bool:
        return any(d is not None for d in (self.cfg, self.ulysses, self.ring))


DEFAULT_PARALLEL = ParallelConfig()

# Devices of the pool our nodes last used, so that nodes without a parallel input (decode, text encode) reuse the
# running pool instead of restarting it on other devices.
_last_devices: str | None = None


def check_choice(name: str, value: Any, options: list) -> str | None:
    """V3 combos are not checked against their options by ComfyUI 0.3.x: do it ourselves."""
    if value not in options:
        return f"{name} must be one of {', '.join(map(str, options))}; got {value!r}"
    return None


def engine():
    """The engine package (imported on first use, never at ComfyUI start)."""
    import comfyui_xdit_cogvideo

    return comfyui_xdit_cogvideo


def pool_module():
    from comfyui_xdit_cogvideo import pool

    return pool


def get_pool(devices: str | None = None):
    """The worker pool for ``devices`` (default: the devices last used, else "auto"); starts it on first use.

    ``devices`` comes from a workflow: it is bounded by this machine (and ``listen://`` refused unless the host
    opted in) before the running pool is touched. Before every job the pool asks ComfyUI to free what it holds on
    the pool's GPUs when memory is short."""
    global _last_devices
    devices = devices or _last_devices or "auto"
    pool = pool_module().get_pool(devices, from_workflow=True, before_job=free_comfy_memory)
    _last_devices = devices
    return pool


def free_comfy_memory(devices, share: float = 0.5) -> None:
    """Unload ComfyUI's own models from the pool's GPUs until ``share`` of each GPU's memory is free."""
    if getattr(devices, "kind", None) != "cuda":
        return
    import comfy.model_management as mm
    import torch

    for index in devices.indices:
        device = torch.device("cuda", index)
        total = mm.get_total_memory(device)
        if mm.get_free_memory(device) < share * total:
            mm.free_memory(share * total, device)
    mm.soft_empty_cache()


def check_parallel(parallel: ParallelConfig, model, use_cfg: bool = True):
    """The explicit layout of ``parallel`` for ``model`` (None for "auto"), or LayoutError -- raised before any pool
    is started, stopped or restarted for a job that could not run."""
    if not parallel.explicit:
        return None
    from comfyui_xdit_cogvideo import choose_layout
    from comfyui_xdit_cogvideo.loading import read_model_info

    world = pool_module().parse_devices(parallel.devices, from_workflow=True).world_size
    info = read_model_info(model.source)
    return choose_layout(world, heads=info.heads, use_cfg=use_cfg, cfg=parallel.cfg, ulysses=parallel.ulysses,
                         ring=parallel.ring)


def prestart_workers() -> None:
    """At extension load: the engine prestarts the pool's workers for "auto" on a thread (pool.spares), unless
    XDIT_COGVIDEO_PRESTART=0. Never fails the import: a problem is logged once and the first job starts them."""
    if os.environ.get("XDIT_COGVIDEO_PRESTART", "").strip() == "0":
        return
    try:
        pool_module().prestart_in_background("auto")
    except Exception as error:
        log.warning("xdit-cogvideo: could not prestart workers: %s", error)


def current_pool():
    """The process-wide pool object if one was created (started or not), else None. Never creates or starts one."""
    import sys

    registry = sys.modules.get("comfyui_xdit_cogvideo.pool.registry")
    return None if registry is None else registry.current_pool()


def pool_status() -> dict:
    """pool.status() when a pool runs, else {"running": False}. Never starts the pool."""
    pool = current_pool()
    if pool is None:
        return {"running": False}
    try:
        status = dict(pool.status())
    except Exception as error:  # the panel must keep working whatever the pool does
        return {"running": False, "error": f"{type(error).__name__}: {error}"}
    status.setdefault("running", status.get("state") not in ("stopped", None))
    return status


def send_event(event: str, data: dict) -> None:
    """A websocket message to the browser (the web panel listens); silently nothing outside a server."""
    try:
        from server import PromptServer

        instance = getattr(PromptServer, "instance", None)
        if instance is not None:
            instance.send_sync(event, data)
    except Exception:  # never let the panel's feed break a generation
        log.debug("could not send %s", event, exc_info=True)


def latent_preview_image(preview) -> Any:
    """A PIL image from a pool preview tensor: an RGB frame ([h, w, 3] or [3, h, w] in 0..1) or a latent
    ([C, h, w], [F, C, h, w] or [B, F, C, h, w]; the middle frame, first three channels stretched to 0..255)."""
    import numpy as np
    import torch
    from PIL import Image

    if preview is None or not isinstance(preview, torch.Tensor) or preview.numel() == 0:
        return None
    x = preview.detach().float().cpu()
    if x.dim() == 3 and x.shape[-1] == 3 and x.shape[0] != 3:
        rgb = x
    else:
        while x.dim() > 3:
            x = x[x.shape[0] // 2] if x.dim() == 4 else x[0]
        if x.dim() != 3:
            return None
        channels = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)
        if x.shape[0] == 3 and channels.min() >= 0 and channels.max() <= 1:
            rgb = channels.permute(1, 2, 0)
        else:
            flat = channels.reshape(3, -1)
            low, high = flat.min(dim=1).values, flat.max(dim=1).values
            rgb = ((channels - low[:, None, None]) / (high - low).clamp_min(1e-6)[:, None, None]).permute(1, 2, 0)
    array = (rgb.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array)
    if max(image.size) < 256:  # latents are 1/8 of the frame: scale small previews up to >= 256 px
        scale = -(-256 // max(image.size))
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return image


_DONE = object()


def run_pool_job(job: Callable[[Callable, Callable], Any], *, node_id: str | None, label: str,
                 show: tuple[str, ...] = ("sample",), previews: bool = True) -> Any:
    """Run ``job(on_event, cancel)`` (a blocking pool call) on a helper thread and pump its ProgressEvents into
    ComfyUI from this, the executing thread: the progress bar (with step previews), websocket messages for the
    panel, and Cancel. ComfyUI's interrupt (the Cancel button or POST /interrupt) is polled by the pool's
    ``cancel`` callable; the pool stops at the next step and the node raises ComfyUI's InterruptProcessingException.
    """
    import comfy.model_management as mm
    import comfy.utils

    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    outcome: dict[str, Any] = {}

    def cancel() -> bool:
        return stop.is_set() or mm.processing_interrupted()

    def target():
        try:
            outcome["value"] = job(events.put, cancel)
        except BaseException as error:  # re-raised in the executing thread
            outcome["error"] = error
        finally:
            events.put(_DONE)

    bar = comfy.utils.ProgressBar(1, node_id=node_id)
    thread = threading.Thread(target=target, name=f"xdit-cogvideo-{label}", daemon=True)
    started = time.monotonic()
    send_event("xdit_cogvideo.job", {"node": node_id, "job": label, "state": "started"})
    thread.start()
    user_cancelled = False
    while True:
        try:
            event = events.get(timeout=0.1)
        except queue.Empty:
            if not stop.is_set() and mm.processing_interrupted():
                stop.set()
                user_cancelled = True
            continue
        if event is _DONE:
            break
        phase = getattr(event, "phase", None)
        step, total = getattr(event, "step", 0), getattr(event, "total", 0)
        send_event("xdit_cogvideo.progress", {
            "node": node_id, "job": label, "phase": phase, "step": step, "total": total,
            "seconds_per_step": getattr(event, "seconds_per_step", None),
            "elapsed": round(time.monotonic() - started, 3),
        })
        if phase in show and total:
            preview = None
            if previews and getattr(event, "preview", None) is not None:
                try:
                    image = latent_preview_image(event.preview)
                    preview = ("JPEG", image, 512) if image is not None else None
                except Exception:
                    log.debug("preview conversion failed", exc_info=True)
            try:
                bar.update_absolute(step, total, preview)
            except mm.InterruptProcessingException:
                stop.set()
                user_cancelled = True
    thread.join()
    elapsed = round(time.monotonic() - started, 3)
    error = outcome.get("error")
    if error is not None:
        cancelled = isinstance(error, engine().GenerationCancelled)
        send_event("xdit_cogvideo.job", {"node": node_id, "job": label, "elapsed": elapsed,
                                          "state": "cancelled" if cancelled else "failed",
                                          "error": None if cancelled else f"{type(error).__name__}: {error}"})
        if cancelled or (user_cancelled and isinstance(error, mm.InterruptProcessingException)):
            raise mm.InterruptProcessingException() from None
        raise error
    send_event("xdit_cogvideo.job", {"node": node_id, "job": label, "state": "done", "elapsed": elapsed})
    if user_cancelled:
        raise mm.InterruptProcessingException()
    return outcome.get("value")
