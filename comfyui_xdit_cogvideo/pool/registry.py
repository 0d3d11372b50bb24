"""The process-wide pool and what stops every pool when this process ends (atexit and signal handlers)."""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import weakref
from typing import TYPE_CHECKING

from .devices import parse_devices

if TYPE_CHECKING:
    from .controller import WorkerPool

_live_pools: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()
_POOL: "WorkerPool | None" = None
_POOL_LOCK = threading.Lock()
_HANDLERS_INSTALLED = False
_ATEXIT_INSTALLED = False
_HANDLER_LOCK = threading.Lock()


def track(pool: "WorkerPool") -> None:
    _live_pools.add(pool)
    install_exit_handlers()


def untrack(pool: "WorkerPool") -> None:
    _live_pools.discard(pool)


def get_pool(devices: str = "auto", *, from_workflow: bool = False, **options) -> "WorkerPool":
    """The process-wide pool for ``devices``; asking for other devices shuts the old pool down first.

    ``devices`` is parsed (and refused if it cannot run here) before the running pool is touched."""
    from .controller import WorkerPool

    global _POOL
    wanted = parse_devices(devices, from_workflow=from_workflow)
    with _POOL_LOCK:
        if _POOL is not None and (_POOL.devices != wanted or _POOL._closed):
            _POOL.shutdown()
            _POOL = None
        if _POOL is None:
            _POOL = WorkerPool(wanted, **options)
        return _POOL


def current_pool() -> "WorkerPool | None":
    """The process-wide pool if one was created (started or not); never creates or starts one."""
    return _POOL


def shutdown_pool() -> None:
    """Stop the process-wide pool, if any (a start in progress is aborted)."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.shutdown()


def _spares():
    """pool.spares if this process ever used it (never imported just to find nothing)."""
    return sys.modules.get(__name__.rpartition(".")[0] + ".spares")


def _shutdown_all() -> None:
    for pool in list(_live_pools):
        try:
            pool.shutdown()
        except Exception:  # never fail interpreter exit
            pass
    spares = _spares()
    if spares is not None:
        try:
            spares.shutdown_spares(final=True)
        except Exception:
            pass


def install_exit_handlers() -> None:
    """Stop every pool (and kill every prestarted spare worker) when this process ends: atexit, and
    SIGTERM/SIGINT/SIGHUP handlers that kill the workers and then run whatever handler was installed before
    (SIG_DFL: the default action).

    Called by every new pool; signal handlers can only be installed from the main thread, so a host that
    creates pools from other threads (ComfyUI runs nodes in a worker thread) should call this once at import.
    Workers also exit on their own when this process disappears, handlers or not.
    """
    global _ATEXIT_INSTALLED, _HANDLERS_INSTALLED
    with _HANDLER_LOCK:
        if not _ATEXIT_INSTALLED:
            _ATEXIT_INSTALLED = True
            atexit.register(_shutdown_all)
        if _HANDLERS_INSTALLED or threading.current_thread() is not threading.main_thread():
            return
        _HANDLERS_INSTALLED = True
    for signum in (getattr(signal, "SIGTERM", None), signal.SIGINT, getattr(signal, "SIGHUP", None)):
        if signum is None:
            continue
        try:
            previous = signal.getsignal(signum)
            if previous == signal.SIG_IGN or previous is None:
                continue
            signal.signal(signum, _make_handler(signum, previous))
        except (ValueError, OSError):
            pass


def _make_handler(signum, previous):
    def handler(sig, frame):
        for pool in list(_live_pools):
            pool._kill_now()
        spares = _spares()
        if spares is not None:
            spares.kill_spares_now()
        if callable(previous):
            return previous(sig, frame)
        # SIG_DFL: let the default action happen (terminate with this signal)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return handler
