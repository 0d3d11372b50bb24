"""HTTP routes for the web panel. They read the pool's state and never start it.

Nothing here blocks aiohttp's event loop (ComfyUI's whole web server runs on it): the status snapshot and the
shutdown run on a thread; shutdown answers within ``SHUTDOWN_WAIT`` seconds and finishes in the background
(a pending start is aborted at once).
"""

from __future__ import annotations

import asyncio

from .common import current_pool, log, pool_status

STATUS_PATH = "/xdit_cogvideo/status"
SHUTDOWN_PATH = "/xdit_cogvideo/shutdown"
SHUTDOWN_WAIT = 0.05


async def status_handler(request):
    from aiohttp import web

    return web.json_response(await asyncio.get_running_loop().run_in_executor(None, pool_status))


async def shutdown_handler(request):
    """Stop the worker pool (frees the GPUs); the next job starts it again. No-op when it is not running."""
    from aiohttp import web

    pool = current_pool()
    if pool is None:
        return web.json_response({"running": False, "stopped": False})
    from comfyui_xdit_cogvideo.pool import shutdown_pool

    stopping = asyncio.get_running_loop().run_in_executor(None, shutdown_pool)
    try:
        await asyncio.wait_for(asyncio.shield(stopping), SHUTDOWN_WAIT)
    except asyncio.TimeoutError:  # still reaping workers: the panel's next status poll shows the end
        return web.json_response({"running": False, "stopped": False, "stopping": True})
    return web.json_response({"running": False, "stopped": True})


_registered = False


def register_routes() -> bool:
    """Add the routes to ComfyUI's server (once). False when there is no server (e.g. imported by tests/scripts)."""
    global _registered
    if _registered:
        return True
    try:
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False
    instance.routes.get(STATUS_PATH)(status_handler)
    instance.routes.post(SHUTDOWN_PATH)(shutdown_handler)
    _registered = True
    log.debug("xdit_cogvideo routes registered")
    return True
