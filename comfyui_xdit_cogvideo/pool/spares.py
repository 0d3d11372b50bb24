"""Prestarted local worker processes ("spares"): started and imported before a pool needs them.

A worker spends seconds starting Python and importing torch, diffusers and the engine before it can do any work. A
host that knows a job will come (a ComfyUI server at start-up, the CLI while it imports and checks its inputs)
calls ``prestart``: one spare per local rank slot does those imports, says it is ready and waits on its stdin. When
a pool starts, ``launch.spawn`` asks ``take`` for a spare of that slot and hands it its assignment (the worker's
command line and environment) as one JSON line; only if there is none, or its environment differs from the one
the pool wants in anything but the per-assignment values, is it killed and a fresh worker started as before.

A spare never outlives this process: it exits on stdin EOF (this process closed it or died), watches this
process's pid while it imports, and ``shutdown_spares`` (run by the registry's exit handlers) kills them all.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from .devices import cpu_count, parse_devices
from .launch import SIGKILL, Rank, describe_exit, emit_line, error_lines, signal_ranks, worker_environment

log = logging.getLogger(__name__)

READY_LINE = "[xdit-cogvideo spare] ready"
PRESTART_ENV = "XDIT_COGVIDEO_PRESTART"
# Values a spare cannot know before it is assigned: they may differ between a spare's and the pool's environment.
PER_ASSIGNMENT = frozenset({"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT",
                            "XDIT_COGVIDEO_POOL_KEY", "OMP_NUM_THREADS", "MKL_NUM_THREADS"})


@dataclass(eq=False)
class Spare:
    """One prestarted worker: its process (as the Rank it becomes), the environment it started with, its state."""

    gpu: str | None
    env: dict
    rank: Rank
    ready: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: list = field(default_factory=list)  # output before it was taken (echoed at take if the pool echoes)
    taken: bool = False
    echo: bool = False

    def alive(self) -> bool:
        return self.rank.proc is not None and self.rank.proc.poll() is None


_LOCK = threading.Lock()
_SPARES: list[Spare] = []
_FINAL = False  # set at interpreter exit: nothing may start any more


def _pump(stream, spare: Spare) -> None:
    """A spare's output: the ready line sets ``ready``; the rest is held until it is taken, then kept and echoed
    exactly as ``launch.spawn``'s pump does."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip()
        if line == READY_LINE:
            spare.ready.set()
            continue
        with spare.lock:
            if not spare.taken:
                spare.pending.append(line)
                continue
        emit_line(spare.rank, line, spare.echo)
    stream.close()


def _default_threads(kind: str, world: int) -> int:
    """The pool's own default (controller._start), so a spare imports with the thread count it will most likely get."""
    cpus = cpu_count()
    return max(1, cpus // world if kind == "cpu" else min(8, cpus // world))


def _start(gpu: str | None, threads: int) -> Spare:
    env = worker_environment(os.environ, rank=0, world_size=1, gpu=gpu, master_port=0, threads=threads, key="")
    command = [sys.executable, "-m", "comfyui_xdit_cogvideo.pool.worker", "--spare", "--parent-pid", str(os.getpid())]
    proc = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    spare = Spare(gpu, env, Rank(-1, proc=proc, pid=proc.pid, device=f"cuda:{gpu}" if gpu is not None else "cpu"))
    spare.rank.pump = threading.Thread(target=_pump, args=(proc.stdout, spare), daemon=True,
                                       name=f"xdit-spare-output-{proc.pid}")
    spare.rank.pump.start()
    return spare


def _kill(spares: list[Spare]) -> None:
    """Kill (process group, as the pool kills its workers) and reap."""
    signal_ranks([s.rank for s in spares], SIGKILL)
    for spare in spares:
        try:
            spare.rank.proc.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            spare.rank.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("spare worker pid %d did not exit after SIGKILL", spare.rank.pid)


def _prune_locked() -> None:
    dead = [s for s in _SPARES if not s.alive()]
    for spare in dead:
        _SPARES.remove(spare)
        code = spare.rank.proc.returncode
        if code not in (0, -SIGKILL):  # it failed on its own (an import error?): say why, once
            spare.rank.pump.join(1.0)
            with spare.lock:
                why = error_lines(spare.pending)
            log.warning("a spare worker (pid %d) %s before it was used%s", spare.rank.pid, describe_exit(code),
                        f":\n{why}" if why else "")
    if dead:
        _kill(dead)  # reaps them


def prestart(devices: str = "auto", *, threads: int | None = None) -> int:
    """Start a spare worker for every local rank slot of ``devices`` that has no live one; returns how many are
    alive or starting. Does not wait for them (``wait_spares`` does). Remote pools (listen://) have no local slots."""
    from .registry import install_exit_handlers

    wanted = parse_devices(devices)
    if wanted.kind == "remote":
        return count()
    install_exit_handlers()
    threads = threads or _default_threads(wanted.kind, wanted.world_size)
    slots = list(wanted.gpu_ids) if wanted.kind == "cuda" else [None] * wanted.world_size
    with _LOCK:
        if _FINAL:
            return 0
        _prune_locked()
        have: dict = {}
        for spare in _SPARES:
            have[spare.gpu] = have.get(spare.gpu, 0) + 1
        for gpu in slots:
            if have.get(gpu, 0) > 0:
                have[gpu] -= 1
                continue
            _SPARES.append(_start(gpu, threads))
        return len(_SPARES)


def count() -> int:
    """Live spares (started or ready)."""
    with _LOCK:
        return sum(1 for s in _SPARES if s.alive())


def wait_spares(timeout: float) -> bool:
    """Wait until every live spare has finished its imports; False if one is still importing at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        with _LOCK:
            waiting = [s for s in _SPARES if s.alive() and not s.ready.is_set()]
        if not waiting:
            return True
        if time.monotonic() >= deadline:
            return False
        waiting[0].ready.wait(min(0.1, max(0.0, deadline - time.monotonic())))


def _same(a: dict, b: dict) -> bool:
    keys = (set(a) | set(b)) - PER_ASSIGNMENT
    return all(a.get(k) == b.get(k) for k in keys)


def take(rank: int, *, gpu: str | None, env: dict, argv: list[str], echo: bool) -> Rank | None:
    """A live spare of ``gpu``'s slot (None: a CPU slot) turned into worker ``rank``: it gets ``argv`` (the worker's
    arguments) and ``env`` (its full environment). None when there is no spare for the slot or the spares there
    started with another environment (those are killed: they could never be used)."""
    with _LOCK:
        _prune_locked()
        candidates = [s for s in _SPARES if s.gpu == gpu]
        if not candidates:
            return None
        stale = [s for s in candidates if not _same(s.env, env)]
        for spare in stale:
            _SPARES.remove(spare)
        if stale:
            log.info("discarded %d spare worker(s) started with another environment", len(stale))
            _kill(stale)
        spare = next((s for s in _SPARES if s.gpu == gpu), None)
        if spare is None:
            return None
        _SPARES.remove(spare)
    proc = spare.rank.proc
    try:
        proc.stdin.write((json.dumps({"argv": argv, "env": env}) + "\n").encode())
        proc.stdin.close()
    except (OSError, ValueError):  # it died just now: a fresh worker takes the slot
        _kill([spare])
        return None
    entry = spare.rank
    with spare.lock:
        entry.rank, entry.prestarted = rank, True
        spare.echo, spare.taken = echo, True
        pending, spare.pending = spare.pending, []
        for line in pending:
            emit_line(entry, line, echo)
    return entry


def shutdown_spares(*, final: bool = False) -> None:
    """Kill every spare (the pools' exit handlers call this with ``final``: no spare may start afterwards)."""
    global _FINAL
    with _LOCK:
        if final:
            _FINAL = True
        spares = list(_SPARES)
        _SPARES.clear()
    _kill(spares)


def kill_spares_now() -> None:
    """Signal-handler path: kill without locks or waiting (init reaps them)."""
    signal_ranks([s.rank for s in list(_SPARES)], SIGKILL)


def prestart_in_background(devices: str = "auto") -> threading.Thread | None:
    """For a host that starts long before its first job (a ComfyUI server): prestart on a thread, unless
    ``XDIT_COGVIDEO_PRESTART=0``. Only GPU slots by default; ``XDIT_COGVIDEO_PRESTART=1`` also allows CPU ranks.
    Never raises: a failure is logged once and the pool then starts its workers as usual."""
    setting = os.environ.get(PRESTART_ENV, "").strip()
    if setting == "0":
        return None

    def run() -> None:
        try:
            wanted = parse_devices(devices)
            if wanted.kind == "cuda" or (wanted.kind == "cpu" and setting == "1"):
                prestart(devices)
        except Exception as error:  # never break the host: the pool starts fresh workers instead
            log.warning("xdit-cogvideo: could not prestart workers (%s); the pool will start them on the first job",
                        error)

    thread = threading.Thread(target=run, daemon=True, name="xdit-prestart")
    thread.start()
    return thread
