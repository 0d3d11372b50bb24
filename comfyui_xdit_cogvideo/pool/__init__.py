"""The background worker pool: one long-lived process per GPU (or CPU rank) with a resident model.

    from comfyui_xdit_cogvideo.pool import ModelSpec, get_pool
    pool = get_pool("0,1")                                  # or "auto", "cpu:2", "listen://0.0.0.0:29600?world=8"
    latents = pool.generate(ModelSpec("/models/CogVideoX-2b"), GenerationRequest(prompt="a cat"),
                            on_event=lambda e: print(e.phase, e.step, e.total))
    frames = pool.decode(ModelSpec("/models/CogVideoX-2b"), latents)   # [F, H, W, 3] in 0..1
"""

from .controller import (ModelSpec, PoolDevices, PoolError, ProgressEvent, WorkerError, WorkerPool, get_pool,
                         install_exit_handlers, parse_devices, shutdown_pool, worker_environment)

__all__ = ["ModelSpec", "PoolDevices", "PoolError", "ProgressEvent", "WorkerError", "WorkerPool", "get_pool",
           "install_exit_handlers", "parse_devices", "shutdown_pool", "worker_environment"]
