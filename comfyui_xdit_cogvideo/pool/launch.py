"""Starting local worker processes: their environment, their command line, their output, how they ended.

Local workers reach nothing but this machine's loopback: the controller listens on 127.0.0.1, the rendezvous
is a FileStore in a private (0700) folder, and gloo/NCCL are pinned to the loopback interface unless the user
chose an interface (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME).
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .channel import Channel

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
SIGKILL = getattr(signal, "SIGKILL", signal.SIGTERM)

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                  "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
                  "TORCH_NCCL_ASYNC_ERROR_HANDLING_AGENT")


def loopback_interface() -> str | None:
    """The name of the loopback network interface (lo on Linux, lo0 on macOS), None if there is no such name."""
    try:
        names = {name for _, name in socket.if_nameindex()}
    except (OSError, AttributeError):
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def _strip_async_allocator(value: str) -> str:
    """Drop ``backend:cudaMallocAsync`` from an allocator config (NCCL all-to-all runs out of memory with it)."""
    options = [o for o in value.split(",") if o.strip() and o.replace(" ", "").lower() != "backend:cudamallocasync"]
    return ",".join(options)


def worker_environment(base: dict, *, rank: int, world_size: int, gpu: str | None, master_port: int,
                       threads: int, key: str) -> dict:
    """The environment a local worker starts with, chosen on purpose rather than inherited blindly.

    Kept: everything else, NCCL_* included (e.g. NCCL_NVLS_ENABLE=0). Changed: the GPU it may see
    (CUDA_VISIBLE_DEVICES; empty for CPU ranks), the allocator config without ``backend:cudaMallocAsync``
    (ComfyUI sets it for itself), the loopback interface for gloo and NCCL (unless set), NCCL's async error
    handling, thread counts, and PYTHONPATH so the package imports the same way it does here.
    """
    env = {k: v for k, v in base.items() if k not in _TORCHRUN_VARS}
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        if name in env:
            cleaned = _strip_async_allocator(env[name])
            if cleaned:
                env[name] = cleaned
            else:
                del env[name]
    env["CUDA_VISIBLE_DEVICES"] = gpu if gpu is not None else ""
    loopback = loopback_interface()
    if loopback:
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            env.setdefault(name, loopback)
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE=str(world_size),
               LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", XDIT_COGVIDEO_POOL_KEY=key)
    path = env.get("PYTHONPATH", "")
    parts = [str(PACKAGE_ROOT)] + [p for p in path.split(os.pathsep) if p and p != str(PACKAGE_ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped responding"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of host memory, or killed by hand?)" if -code == SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


# A warning is two lines (the "file:line: XWarning: text" line and the source line under it); progress bars
# and our own worker log lines are not errors either.
_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")
_NOISE = re.compile(r"^\s*$|^\[xdit-cogvideo worker \d+\] (INFO|WARNING) |^\s*\d+%\|")


def error_lines(lines: list[str], limit: int = 15) -> str:
    """The lines of a worker's output that can explain a crash: warnings and routine log lines left out."""
    kept, skip_next = [], False
    for line in lines:
        if skip_next:
            skip_next = False
            if line.startswith((" ", "\t")):
                continue
        if _WARNING.match(line):
            skip_next = True
            continue
        if _NOISE.match(line):
            continue
        kept.append(line)
    return "\n".join(kept[-limit:])


@dataclass(eq=False)
class Rank:
    """One rank as the controller sees it: its process (local pools), connection and last heartbeat."""

    rank: int
    channel: Channel | None = None
    proc: subprocess.Popen | None = None
    pid: int | None = None
    host: str = ""
    device: str = ""
    backend: str = ""
    state: str = "starting"
    ready: bool = False
    last_seen: float = field(default_factory=time.monotonic)
    heartbeat: dict = field(default_factory=dict)
    output: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200))
    pump: threading.Thread | None = None
    prestarted: bool = False  # a spare (pool.spares) took this rank: its imports were done before the pool started

    def where(self) -> str:
        parts = [p for p in (self.device, f"pid {self.pid}" if self.pid else "",
                             self.host if self.proc is None and self.host else "") if p]
        return ", ".join(parts)

    def crash_output(self, wait: float = 2.0) -> str:
        """What the worker printed that explains how it ended (waits for its output to be read to the end)."""
        if self.pump is not None:
            self.pump.join(wait)
        return error_lines(list(self.output))


def emit_line(rank: Rank, line: str, echo: bool) -> None:
    """Keep one line of a worker's output (for errors) and echo it to our stderr."""
    rank.output.append(line)
    if not echo:
        return
    try:
        sys.stderr.write(line + "\n" if line.startswith("[xdit-cogvideo") else f"[xdit-cogvideo worker {rank.rank}] {line}\n")
    except (ValueError, OSError):
        pass


def _pump_output(stream, rank: Rank, echo: bool) -> None:
    """Keep the last lines of a worker's output (for errors) and echo them to our stderr."""
    for raw in iter(stream.readline, b""):
        emit_line(rank, raw.decode(errors="replace").rstrip(), echo)
    stream.close()


def spawn(rank: int, world: int, *, gpu: str | None, backend: str, port: int, threads: int | str, key: str,
          connect_timeout: float, echo: bool, use_spare: bool = True) -> Rank:
    """Start one local worker process (its own session, so a signal to its group takes any helpers with it), or
    hand the job to a prestarted spare of the same slot (pool.spares) when one with this environment is waiting."""
    from .spares import take

    env = worker_environment(os.environ, rank=rank, world_size=world, gpu=gpu, master_port=0, threads=threads,
                             key=key)
    command = [sys.executable, "-m", "comfyui_xdit_cogvideo.pool.worker", "--connect", f"127.0.0.1:{port}",
               "--rank", str(rank), "--world-size", str(world), "--device", "cuda:0" if gpu is not None else "cpu",
               "--backend", backend, "--parent-pid", str(os.getpid()), "--threads", str(threads),
               "--connect-timeout", str(connect_timeout)]
    entry = take(rank, gpu=gpu, env=env, argv=command[3:], echo=echo) if use_spare else None
    if entry is not None:
        return entry
    proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    entry = Rank(rank, proc=proc, pid=proc.pid, device=f"cuda:{gpu}" if gpu is not None else "cpu")
    entry.pump = threading.Thread(target=_pump_output, args=(proc.stdout, entry, echo), daemon=True,
                                  name=f"xdit-pool-output-{rank}")
    entry.pump.start()
    return entry


def wait_ranks(ranks: list[Rank], seconds: float) -> None:
    """Give local worker processes up to ``seconds`` (together) to exit on their own."""
    deadline = time.monotonic() + seconds
    for entry in ranks:
        if entry.proc is not None:
            try:
                entry.proc.wait(timeout=max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


def signal_ranks(ranks: list[Rank], sig: int | None) -> None:
    if sig is None:
        return
    for entry in ranks:
        if entry.proc is None or entry.proc.returncode is not None:
            continue
        try:
            if not hasattr(os, "killpg"):
                raise PermissionError
            os.killpg(entry.proc.pid, sig)  # the worker's own session: takes any helper processes with it
        except (ProcessLookupError, PermissionError):
            try:
                entry.proc.send_signal(sig)
            except (ProcessLookupError, OSError):
                pass
