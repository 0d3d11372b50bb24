"""The background worker pool: one long-lived process per GPU (or CPU rank) with a resident model.

    from comfyui_xdit_cogvideo.pool import ModelSpec, get_pool
    pool = get_pool("0,1")                                  # or "auto", "cpu:2", "listen://0.0.0.0:29600?world=8"
    latents = pool.generate(ModelSpec("/models/CogVideoX-2b"), GenerationRequest(prompt="a cat"),
                            on_event=lambda e: print(e.phase, e.step, e.total))
    frames = pool.decode(ModelSpec("/models/CogVideoX-2b"), latents)   # [F, H, W, 3] in 0..1

Where each concern lives: ``devices`` (what a pool runs on, bounds, device locks), ``launch`` (local worker
processes), ``channel`` (authenticated frames), ``protocol`` (every message), ``job`` (one job, its deadlines),
``controller`` (lifecycle, monitor, status), ``registry`` (the process-wide pool, exit handlers), ``spares``
(workers started and imported before a pool needs them), ``worker`` (one rank). Names are imported lazily:
importing this package loads neither torch.distributed nor diffusers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "WorkerPool": "controller", "ModelSpec": "protocol", "ProgressEvent": "protocol",
    "PoolDevices": "devices", "parse_devices": "devices", "worker_environment": "launch",
    "get_pool": "registry", "shutdown_pool": "registry", "current_pool": "registry",
    "install_exit_handlers": "registry", "prestart": "spares", "wait_spares": "spares",
    "shutdown_spares": "spares", "prestart_in_background": "spares",
}
_ERRORS = ("PoolError", "PoolStalled", "WorkerError")

__all__ = sorted([*_EXPORTS, *_ERRORS])


def __getattr__(name: str):
    if name in _ERRORS:
        from .. import errors

        return getattr(errors, name)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
