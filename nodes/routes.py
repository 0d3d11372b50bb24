"""HTTP routes for the web panel. They read the pool's state and never start it."""

from __future__ import annotations

from .common import current_pool, log, pool_status

STATUS_PATH = "/xdit_cogvideo/status"
SHUTDOWN_PATH = "/xdit_cogvideo/shutdown"


async def status_handler(request):
    from aiohttp import web

    return web.json_response(pool_status())


async def shutdown_handler(request):
    """Stop the worker pool (frees the GPUs); the next job starts it again. No-op when it is not running."""
    from aiohttp import web

    pool = current_pool()
    if pool is None:
        return web.json_response({"running": False, "stopped": False})
    from comfyui_xdit_cogvideo.pool import shutdown_pool

    shutdown_pool()
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
