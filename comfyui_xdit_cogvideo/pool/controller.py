"""The worker pool as seen from the caller's process (ComfyUI or the CLI), which never joins torch.distributed.

``WorkerPool`` starts one worker process per rank (``subprocess`` with a fresh interpreter and an environment
chosen here, never a fork), talks to each over an authenticated socket (see ``channel``), and runs one job at a
time on all of them. A monitor thread reads every worker's messages, tracks heartbeats and process liveness,
and fails the running job the moment a worker dies; the pool is then torn down (every process reaped) and
started again by the next job. Models stay resident in the workers between jobs.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import os
import queue
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..engine import GenerationCancelled
from ..layout import Layout, LayoutError, check_layout, choose_layout
from ..loading import DTYPES, ModelSource, read_model_info
from ..request import GenerationRequest, RequestError
from ..variants import ModelError
from .channel import EXIT_RESTART, PROTOCOL, AuthError, Channel, ChannelClosed, free_port, listen

log = logging.getLogger("comfyui_xdit_cogvideo.pool")

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class PoolError(RuntimeError):
    """The pool could not start, lost a worker, or was asked for something it cannot do."""


class WorkerError(PoolError):
    """A worker raised or died while running a job. ``rank``, ``exc_type``, ``message``, ``traceback``."""

    def __init__(self, rank: int, message: str, traceback: str = "", exc_type: str | None = None,
                 where: str = ""):
        self.rank, self.message, self.traceback, self.exc_type, self.where = rank, message, traceback, exc_type, where
        kind = f"{exc_type}: " if exc_type else ""
        super().__init__(f"worker rank {rank}{f' ({where})' if where else ''} failed: {kind}{message}")

    def __str__(self) -> str:
        text = super().__str__()
        if self.traceback:
            text += "\n--- worker traceback ---\n" + self.traceback.rstrip()
        return text


@dataclass(frozen=True)
class ModelSpec:
    """Which model the workers hold: weights (``source``), precision and attention backend."""

    source: ModelSource
    dtype: str = "bf16"
    attention: str = "auto"

    def __post_init__(self):
        if isinstance(self.source, (str, os.PathLike)):
            object.__setattr__(self, "source", ModelSource(str(self.source)))

    def validate(self) -> None:
        from ..parallel.kernels import KERNELS

        if self.dtype not in DTYPES:
            raise ModelError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.attention != "auto" and self.attention not in KERNELS:
            raise ModelError(f"unknown attention backend {self.attention!r}; choose one of auto, {', '.join(KERNELS)}")

    def wire(self) -> dict:
        return {"path": self.source.path, "vae": self.source.vae, "text_encoder": self.source.text_encoder,
                "dtype": self.dtype, "attention": self.attention}


@dataclass
class ProgressEvent:
    """One step of a job. ``phase``: load, encode, sample or decode. ``preview``: on sample steps, the current
    latents of the middle latent frame [C, h, w] (CPU float) for a live preview."""

    phase: str
    step: int
    total: int
    seconds_per_step: float | None = None
    preview: torch.Tensor | None = None


# -- devices ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolDevices:
    """What a pool runs on: ``cuda`` (physical GPU ids), ``cpu`` (gloo ranks) or ``remote`` (torchrun workers)."""

    kind: str
    world_size: int
    gpu_ids: tuple[str, ...] = ()
    address: tuple[str, int] | None = None

    @property
    def backend(self) -> str:
        return "gloo" if self.kind == "cpu" else "nccl" if self.kind == "cuda" else "auto"

    def __str__(self) -> str:
        if self.kind == "cuda":
            return "cuda:" + ",".join(self.gpu_ids)
        if self.kind == "cpu":
            return f"cpu:{self.world_size}"
        return f"listen://{self.address[0]}:{self.address[1]}?world={self.world_size}"


def parse_devices(text: str | None = "auto") -> PoolDevices:
    """``auto`` (all visible GPUs, else one CPU rank), ``0,1,3`` / ``cuda:0,1`` (CUDA indices as this process
    sees them), ``cuda`` (all GPUs), ``cpu`` / ``cpu:N`` (N gloo ranks), ``listen://HOST:PORT?world=N``
    (wait for N workers started with torchrun, possibly on other hosts)."""
    spec = (text or "auto").strip().lower().replace(" ", "")
    if spec.startswith("listen://"):
        rest, _, query = spec[len("listen://"):].partition("?")
        host, _, port = rest.rpartition(":")
        params = dict(p.partition("=")[::2] for p in query.split("&") if p)
        if not host or not port.isdigit() or not params.get("world", "").isdigit() or int(params["world"]) < 1:
            raise PoolError(f"cannot parse {text!r}; write listen://HOST:PORT?world=N (e.g. listen://0.0.0.0:29600?world=8)")
        return PoolDevices("remote", int(params["world"]), address=(host.strip("[]"), int(port)))
    if spec == "cpu" or spec.startswith("cpu:"):
        count = spec[4:] or "1"
        if not count.isdigit() or int(count) < 1:
            raise PoolError(f"cannot parse {text!r}; write cpu or cpu:N with N >= 1")
        return PoolDevices("cpu", int(count))
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "auto":
        return PoolDevices("cuda", available, _physical_ids(list(range(available)))) if available else PoolDevices("cpu", 1)
    if spec == "cuda":
        spec = ",".join(str(i) for i in range(available))
        if not available:
            raise PoolError("devices 'cuda' asked for, but no CUDA GPU is visible to this process")
    spec = spec.removeprefix("cuda:")
    try:
        ids = [int(x) for x in spec.split(",") if x != ""]
    except ValueError:
        raise PoolError(f"cannot parse devices {text!r}; write auto, a GPU list like 0,1,3, cpu:N or "
                        "listen://HOST:PORT?world=N") from None
    if not ids:
        raise PoolError(f"no devices in {text!r}")
    if len(set(ids)) != len(ids):
        raise PoolError(f"GPU list {text!r} names a GPU twice; NCCL runs one rank per GPU")
    bad = [i for i in ids if not 0 <= i < available]
    if bad:
        raise PoolError(f"GPU {bad[0]} does not exist here: {available} CUDA GPU(s) visible "
                        f"(ids 0..{available - 1})" if available else f"GPU list {text!r} given, but no CUDA GPU is visible")
    return PoolDevices("cuda", len(ids), _physical_ids(ids))


def _physical_ids(ids: list[int]) -> tuple[str, ...]:
    """CUDA indices as this process sees them -> entries for the workers' CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or visible.strip() == "":
        return tuple(str(i) for i in ids)
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    return tuple(entries[i] for i in ids)


def _strip_async_allocator(value: str) -> str:
    """Drop ``backend:cudaMallocAsync`` from an allocator config (NCCL all-to-all runs out of memory with it)."""
    options = [o for o in value.split(",") if o.strip() and o.replace(" ", "").lower() != "backend:cudamallocasync"]
    return ",".join(options)


_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                  "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
                  "TORCH_NCCL_ASYNC_ERROR_HANDLING_AGENT")


def worker_environment(base: dict, *, rank: int, world_size: int, gpu: str | None, master_port: int,
                       threads: int, key: str) -> dict:
    """The environment a local worker starts with, chosen on purpose rather than inherited blindly.

    Kept: everything else, NCCL_* included (e.g. NCCL_NVLS_ENABLE=0). Changed: the GPU it may see
    (CUDA_VISIBLE_DEVICES; empty for CPU ranks), the allocator config without ``backend:cudaMallocAsync``
    (ComfyUI sets it for itself), the rendezvous on a free loopback port, thread counts, and PYTHONPATH so the
    package imports the same way it does here.
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
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE=str(world_size),
               LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", XDIT_COGVIDEO_POOL_KEY=key)
    path = env.get("PYTHONPATH", "")
    parts = [str(_PACKAGE_ROOT)] + [p for p in path.split(os.pathsep) if p and p != str(_PACKAGE_ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped responding"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of host memory, or killed by hand?)" if -code == _SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


# -- ranks -----------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Rank:
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
    output: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40))

    def where(self) -> str:
        parts = [p for p in (self.device, f"pid {self.pid}" if self.pid else "",
                             self.host if self.proc is None and self.host else "") if p]
        return ", ".join(parts)

    def tail(self, lines: int = 15) -> str:
        return "\n".join(list(self.output)[-lines:])


def _pump_output(stream, rank: _Rank, echo: bool) -> None:
    """Keep the last lines of a worker's output (for errors) and echo them to our stderr."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip()
        rank.output.append(line)
        if not echo:
            continue
        try:
            sys.stderr.write(line + "\n" if line.startswith("[xdit-cogvideo") else f"[xdit-cogvideo worker {rank.rank}] {line}\n")
        except (ValueError, OSError):
            pass
    stream.close()


class _FifoSlot:
    """One job at a time, first come first served."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next = itertools.count()
        self._serving = 0

    def __enter__(self):
        with self._cond:
            ticket = next(self._next)
            while ticket != self._serving:
                self._cond.wait()
        return self

    def __exit__(self, *exc):
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


# -- the pool --------------------------------------------------------------------------------------------------
class WorkerPool:
    """Long-lived worker processes with resident models; one job at a time. See module docstring."""

    def __init__(self, devices: str = "auto", *, threads: int | None = None, start_timeout: float = 600.0,
                 heartbeat: float = 1.0, heartbeat_timeout: float = 30.0, stall_timeout: float | None = 1800.0,
                 error_grace: float = 3.0, echo_output: bool = True):
        self.devices = parse_devices(devices)
        self.threads = threads
        self.start_timeout = start_timeout
        self.heartbeat = heartbeat
        self.heartbeat_timeout = heartbeat_timeout
        self.stall_timeout = stall_timeout
        self.error_grace = error_grace
        self.echo_output = echo_output
        self._lock = threading.RLock()
        self._start_lock = threading.Lock()
        self._teardown_lock = threading.RLock()
        self._slot = _FifoSlot()
        self._ranks: list[_Rank] = []
        self._state = "stopped"
        self._generation = 0
        self._inbox: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        self._job: dict | None = None
        self._last_error: str | None = None
        self._jobs_done = 0
        self._starts = 0
        self._started_at: float | None = None
        self._listener = None
        self._key = None
        self._closed = False
        self._exiting = False
        _live_pools.add(self)
        install_exit_handlers()

    @property
    def world_size(self) -> int:
        return self.devices.world_size

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> "WorkerPool":
        """Start the workers now (jobs start them lazily otherwise). Blocks until every rank is ready."""
        with self._start_lock:
            if self._closed:
                raise PoolError("this pool was shut down; use get_pool() for a new one")
            with self._lock:
                if self._state == "ready":
                    return self
                stale = bool(self._ranks)
            if stale:
                self._teardown("restart after failure", graceful=False)
            try:
                self._start()
            except BaseException as error:
                self._teardown(f"start failed: {error}", graceful=False)
                with self._lock:
                    self._last_error = f"start failed: {error}"
                raise
        return self

    def _start(self) -> None:
        world = self.devices.world_size
        with self._lock:
            self._generation += 1
            generation = self._generation
            self._state = "starting"
            self._ranks = []
            self._starts += 1
            self._session = f"{os.getpid()}-{generation}-{secrets.token_hex(4)}"
        if self.devices.kind == "remote":
            host, port = self.devices.address
            key = os.environ.get("XDIT_COGVIDEO_POOL_KEY", "")
            if not key and host not in ("127.0.0.1", "localhost", "::1"):
                raise PoolError("a pool listening beyond loopback needs a shared secret: set XDIT_COGVIDEO_POOL_KEY "
                                "to the same value here and on every worker host")
            if self._listener is None:
                try:
                    self._listener = listen(host, port)
                except OSError as error:
                    raise PoolError(f"cannot listen on {host}:{port}: {error}") from None
            self._key = key.encode()
            procs: dict[int, _Rank] = {}
        else:
            self._key = secrets.token_hex(32).encode()
            self._listener = listen("127.0.0.1", 0)
            port = self._listener.getsockname()[1]
            master_port = free_port()
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            threads = self.threads or max(1, cpus // world if self.devices.kind == "cpu" else min(8, cpus // world))
            procs = {}
            for rank in range(world):
                gpu = self.devices.gpu_ids[rank] if self.devices.kind == "cuda" else None
                env = worker_environment(os.environ, rank=rank, world_size=world, gpu=gpu, master_port=master_port,
                                         threads=threads, key=self._key.decode())
                command = [sys.executable, "-m", "comfyui_xdit_cogvideo.pool.worker", "--connect",
                           f"127.0.0.1:{port}", "--rank", str(rank), "--world-size", str(world),
                           "--device", "cuda:0" if gpu is not None else "cpu", "--backend", self.devices.backend,
                           "--parent-pid", str(os.getpid()), "--threads", str(threads),
                           "--connect-timeout", str(self.start_timeout)]
                proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                entry = _Rank(rank, proc=proc, pid=proc.pid, device=f"cuda:{gpu}" if gpu is not None else "cpu")
                procs[rank] = entry
                threading.Thread(target=_pump_output, args=(proc.stdout, entry, self.echo_output),
                                 daemon=True).start()
            with self._lock:
                self._ranks = [procs[r] for r in range(world)]
        self._accept_all(procs, generation)
        with self._lock:
            if self.devices.kind != "remote":
                self._listener.close()  # every local worker is in; nobody else may connect
                self._listener = None
            self._state = "ready"
            self._started_at = time.time()
        threading.Thread(target=self._monitor, args=(generation,), daemon=True,
                         name=f"xdit-pool-monitor-{generation}").start()

    def _accept_all(self, procs: dict[int, _Rank], generation: int) -> None:
        """Accept, authenticate and greet every worker, then wait until each has joined torch.distributed."""
        world = self.devices.world_size
        deadline = time.monotonic() + self.start_timeout
        connected: dict[int, _Rank] = {}
        last_ping = time.monotonic()
        while not (len(connected) == world and all(r.ready for r in connected.values())):
            now = time.monotonic()
            if now > deadline:
                missing = sorted(set(range(world)) - set(connected))
                hint = ""
                if self.devices.kind == "remote":
                    hint = (f"; start them with torchrun ... -m comfyui_xdit_cogvideo worker --connect "
                            f"{self.devices.address[0]}:{self.devices.address[1]} (see README)")
                raise PoolError(f"workers did not start within {self.start_timeout:.0f} s "
                                f"(not connected: ranks {missing or 'none'}; not ready: "
                                f"{[r.rank for r in connected.values() if not r.ready]}){hint}")
            for entry in procs.values():
                code = entry.proc.poll() if entry.proc else None
                if code is not None:
                    time.sleep(0.2)
                    raise PoolError(f"worker rank {entry.rank} ({entry.device}) {_describe_exit(code)} while "
                                    f"starting:\n{entry.tail()}")
            channels = [r.channel for r in connected.values()]
            readable, _, _ = select.select([self._listener] + channels, [], [], 0.2)
            for item in readable:
                if item is self._listener:
                    sock, peer = self._listener.accept()
                    try:
                        channel = Channel.accept(sock, self._key, timeout=15)
                        hello = channel.recv(timeout=30)
                    except (AuthError, ChannelClosed, TimeoutError, OSError) as error:
                        log.warning("refused a worker connection from %s: %s", peer, error)
                        continue
                    entry = self._greet(channel, hello, procs, connected)
                    if entry is not None:
                        connected[entry.rank] = entry
                        if self.devices.kind == "remote":
                            with self._lock:
                                self._ranks = [connected[r] for r in sorted(connected)]
                    continue
                entry = next(r for r in connected.values() if r.channel is item)
                try:
                    message = entry.channel.recv()
                except ChannelClosed:
                    code = entry.proc.wait(timeout=5) if entry.proc else None
                    raise PoolError(f"worker rank {entry.rank} ({entry.where()}) "
                                    f"{_describe_exit(code) if entry.proc else 'disconnected'} while starting:\n"
                                    f"{entry.tail()}") from None
                entry.last_seen = time.monotonic()
                if message.get("op") == "ready":
                    if not message.get("ok"):
                        raise PoolError(f"worker rank {entry.rank} ({entry.where()}) could not join "
                                        f"torch.distributed: {message.get('type')}: {message.get('message')}")
                    entry.ready = True
                    entry.state = "idle"
                elif message.get("op") == "hb":
                    entry.heartbeat = message
            if time.monotonic() - last_ping > self.heartbeat:
                last_ping = time.monotonic()
                for entry in connected.values():
                    try:
                        entry.channel.send({"op": "ping"})
                    except ChannelClosed:
                        pass
        with self._lock:
            self._ranks = [connected[r] for r in range(world)]

    def _greet(self, channel: Channel, hello: dict, procs: dict[int, _Rank], connected: dict) -> _Rank | None:
        world = self.devices.world_size

        def refuse(reason: str) -> None:
            log.warning("refused a worker: %s", reason)
            try:
                channel.send({"op": "refused", "reason": reason})
            except ChannelClosed:
                pass
            channel.close()

        if hello.get("op") != "hello":
            return refuse("expected a hello message")
        if hello.get("protocol") != PROTOCOL:
            return refuse(f"protocol {hello.get('protocol')} != {PROTOCOL}: install the same comfyui-xdit-cogvideo "
                          "version on every host")
        rank, their_world = int(hello.get("rank", -1)), int(hello.get("world", -1))
        if their_world != world:
            return refuse(f"worker belongs to a world of {their_world} ranks, this pool expects {world}")
        if not 0 <= rank < world or rank in connected:
            return refuse(f"rank {rank} is out of range or already connected")
        entry = procs.get(rank) or _Rank(rank)
        if entry.proc is not None and hello.get("pid") != entry.pid:
            return refuse(f"rank {rank} answered from pid {hello.get('pid')}, expected {entry.pid}")
        entry.channel, entry.pid, entry.host = channel, hello.get("pid"), hello.get("host", "")
        entry.backend = hello.get("backend", "")
        if entry.proc is None:
            entry.device = hello.get("device", "")
        entry.last_seen = time.monotonic()
        channel.send({"op": "welcome", "heartbeat": self.heartbeat, "timeout": max(4 * self.heartbeat_timeout, 60.0),
                      "session": self._session})
        return entry

    def _monitor(self, generation: int) -> None:
        last_ping = time.monotonic()
        while True:
            with self._lock:
                if generation != self._generation:
                    return
                ranks = list(self._ranks)
            by_fd = {r.channel.fileno(): r for r in ranks if r.channel is not None and not r.channel.closed}
            try:
                readable, _, _ = select.select(list(by_fd), [], [], 0.2)
            except (OSError, ValueError):
                continue
            now = time.monotonic()
            for fd in readable:
                entry = by_fd[fd]
                try:
                    message = entry.channel.recv()
                except ChannelClosed:
                    code = None
                    if entry.proc is not None:
                        try:
                            code = entry.proc.wait(timeout=2)
                        except subprocess.TimeoutExpired:
                            pass
                    reason = _describe_exit(code) if code is not None else "lost its connection to the pool"
                    return self._lost(generation, entry, reason)
                entry.last_seen = now
                if message.get("op") == "hb":
                    entry.heartbeat, entry.state = message, message.get("state", entry.state)
                else:
                    self._inbox.put((generation, entry.rank, message))
            for entry in ranks:
                code = entry.proc.poll() if entry.proc is not None else None
                if code is not None:
                    return self._lost(generation, entry, _describe_exit(code))
                if now - entry.last_seen > self.heartbeat_timeout:
                    return self._lost(generation, entry, f"sent no heartbeat for {now - entry.last_seen:.0f} s "
                                                         "(frozen, or its host is unreachable)")
            if now - last_ping > self.heartbeat:
                last_ping = now
                for entry in ranks:
                    try:
                        entry.channel.send({"op": "ping"})
                    except ChannelClosed:
                        return self._lost(generation, entry, "lost its connection to the pool")

    def _lost(self, generation: int, entry: _Rank, reason: str) -> None:
        with self._lock:
            if generation != self._generation:
                return
            self._last_error = f"worker rank {entry.rank} ({entry.where()}) {reason}"
            self._state = "broken"
            if self._exiting:  # we killed them ourselves (a signal to this process)
                reason = self._last_error = "stopped: this process is exiting"
        if not self._exiting:
            log.error("xdit-cogvideo pool: %s; stopping all workers", self._last_error)
        with self._teardown_lock:  # the job sees the failure only once every worker is gone and reaped
            self._inbox.put((generation, entry.rank, {"op": "lost", "reason": reason, "where": entry.where(),
                                                      "tail": entry.tail() if entry.proc is not None else ""}))
            self._teardown(reason, graceful=False, expect=generation)

    def _teardown(self, reason: str, graceful: bool, expect: int | None = None, final: bool = False) -> None:
        """Stop every worker of the current generation and reap them (no process is left behind)."""
        with self._teardown_lock:
            self._teardown_locked(reason, graceful, expect, final)

    def _teardown_locked(self, reason: str, graceful: bool, expect: int | None, final: bool) -> None:
        with self._lock:
            if expect is not None and expect != self._generation:
                return
            ranks, self._ranks = self._ranks, []
            self._generation += 1
            generation = self._generation
            broken = self._state == "broken"
            self._state = "stopping"
            listener = None
            if self._listener is not None and (self.devices.kind != "remote" or final):
                listener, self._listener = self._listener, None
        code = 0 if final else EXIT_RESTART
        if graceful or self.devices.kind == "remote":
            for entry in ranks:
                if entry.channel is not None:
                    try:
                        entry.channel.send({"op": "exit", "code": code})
                    except ChannelClosed:
                        pass
        if graceful:
            _wait_ranks(ranks, 5.0)
        _kill_ranks(ranks, signal.SIGTERM)
        _kill_ranks(ranks, getattr(signal, "SIGCONT", None))  # a stopped (SIGSTOP) worker must run to act on it
        _wait_ranks(ranks, 3.0)
        _kill_ranks(ranks, _SIGKILL)
        for entry in ranks:
            if entry.proc is not None:
                entry.proc.wait()
            if entry.channel is not None:
                entry.channel.close()
        if listener is not None:
            listener.close()
        with self._lock:
            if self._generation == generation:
                self._state = "stopped"
        if ranks:
            log.info("xdit-cogvideo pool stopped (%s)%s", reason, " after a failure" if broken else "")

    def shutdown(self) -> None:
        """Stop all workers (gracefully if idle, else by signal) and reap them. The pool cannot start again."""
        with self._lock:
            self._closed = True
        with self._start_lock:
            self._teardown("shutdown", graceful=self._job is None, final=True)
        _live_pools.discard(self)

    def _kill_now(self) -> None:
        """Signal-handler path: kill every worker without taking locks (they are reaped later or by init)."""
        self._exiting = True
        _kill_ranks(list(self._ranks), _SIGKILL)

    # -- jobs ------------------------------------------------------------------------------------------------
    def generate(self, model: ModelSpec, request: GenerationRequest, layout: Layout | None = None,
                 on_event: Callable[[ProgressEvent], None] | None = None,
                 cancel: Callable[[], bool] | None = None) -> torch.Tensor:
        """Latents shaped like ``CogVideoXPipeline(output_type="latent").frames``, sampled by the pool.

        Bad models, requests and layouts raise ModelError / RequestError / LayoutError here, before any worker
        is started. ``layout`` None picks the fastest valid layout for the pool's ranks; a layout over fewer
        ranks than the pool uses the first ones.
        """
        model = _spec(model)
        model.validate()
        info = read_model_info(model.source)
        resolved = request.resolved(info)
        source = model.source.resolve()
        needs_text = resolved.prompt_embeds is None or (resolved.use_cfg and resolved.negative_prompt_embeds is None)
        if needs_text and (source.text_encoder is None or source.tokenizer is None):
            raise ModelError("this model has no text encoder/tokenizer; pass prompt embeddings (and negative "
                             "embeddings when guidance > 1) instead of text")
        if info.image_to_video and source.vae is None:
            raise ModelError("image-to-video needs the model's VAE to encode the start image; give a vae path")
        world = self.world_size
        if layout is None:
            layout = choose_layout(world, heads=info.heads, use_cfg=resolved.use_cfg)
        else:
            check_layout(layout, heads=info.heads, use_cfg=resolved.use_cfg)
            if layout.world_size > world:
                raise LayoutError(f"layout {layout} needs {layout.world_size} ranks, but the pool has {world} "
                                  f"({self.devices}); cfg x ulysses x ring must not exceed the number of devices")
        payload = {"model": model.wire(), "layout": [layout.cfg, layout.ulysses, layout.ring],
                   "request": _request_wire(resolved)}
        return self._run("generate", payload, on_event, cancel, leader_only=False)

    def decode(self, model: ModelSpec, latents: torch.Tensor, frames: int | None = None, tiled: bool = True,
               on_event: Callable[[ProgressEvent], None] | None = None, cancel: Callable[[], bool] | None = None,
               tiling=None) -> torch.Tensor:
        """Video frames [F, H, W, 3] float in 0..1 through the model's VAE.

        ``tiled=True``: diffusers' tiled decode with the tiles spread over all ranks (equal to single-process
        tiled decode). ``tiled=False``: plain decode on rank 0. ``tiling``: a ``vae_parallel.Tiling`` to override
        the VAE's tile size and overlap. ``frames`` drops CogVideoX 1.5's temporal padding.
        """
        model = _spec(model)
        model.validate()
        info = read_model_info(model.source)
        if model.source.resolve().vae is None:
            raise ModelError("this model has no VAE; give a vae path (a diffusers vae/ folder or a .safetensors file)")
        if not torch.is_tensor(latents) or latents.dim() != 5 or latents.shape[2] != info.latent_channels:
            shape = list(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise RequestError(f"latents must be [batch, frames, {info.latent_channels}, height/8, width/8] for "
                               f"{info.variant}, got {shape}")
        if frames is not None:
            if frames < 1 or (frames - 1) % 4:
                raise RequestError(f"frames must be 4k+1, got {frames}")
            if (frames - 1) // 4 + 1 > latents.shape[1]:
                raise RequestError(f"latents hold {latents.shape[1]} latent frames, fewer than {frames} video frames need")
        wire_tiling = None
        if tiling is not None:
            wire_tiling = [tiling.sample_height, tiling.sample_width, tiling.overlap_height, tiling.overlap_width]
        payload = {"model": model.wire(), "latents": latents[:1].detach().cpu(), "frames": frames,
                   "tiled": bool(tiled), "tiling": wire_tiling}
        return self._run("decode", payload, on_event, cancel, leader_only=not tiled)

    def encode_prompt(self, model: ModelSpec, prompt: str, negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """T5 embeddings [1, 226, D] of prompt and negative prompt, made on rank 0 as diffusers makes them."""
        model = _spec(model)
        model.validate()
        read_model_info(model.source)
        source = model.source.resolve()
        if source.text_encoder is None or source.tokenizer is None:
            raise ModelError("this model has no text encoder/tokenizer to encode prompts with")
        payload = {"model": model.wire(), "prompt": str(prompt), "negative": str(negative_prompt or "")}
        positive, negative = self._run("encode", payload, None, None, leader_only=True)
        return positive, negative

    def inject_fault(self, rank: int, kind: str = "raise", step: int = 1) -> None:
        """Testing aid: make ``rank`` fail at the ``step``-th step of its next job.

        ``raise`` (an exception), ``exit`` (the process exits), ``freeze`` (the process stops: SIGSTOP)."""
        self.start()
        with self._lock:
            entry = self._ranks[rank]
        entry.channel.send({"op": "fault", "kind": kind, "step": int(step)})

    def _run(self, kind: str, payload: dict, on_event, cancel, leader_only: bool):
        with self._slot:
            self.start()
            with self._lock:
                generation = self._generation
                ranks = list(self._ranks)
                job_id = next(self._ids)
                self._job = {"id": job_id, "kind": kind, "phase": "queued", "step": 0, "total": 0,
                             "seconds_per_step": None, "started": time.time()}
            targets = ranks[:1] if leader_only else ranks
            try:
                return self._wait(job_id, generation, kind, payload, targets, on_event, cancel)
            finally:
                with self._lock:
                    self._job = None
                    self._jobs_done += 1

    def _wait(self, job_id, generation, kind, payload, targets, on_event, cancel):
        message = {"op": "job", "id": job_id, "kind": kind, **payload}
        for entry in targets:
            try:
                entry.channel.send(message)
            except ChannelClosed:
                self._teardown("send failed", graceful=False, expect=generation)
                raise WorkerError(entry.rank, "lost its connection to the pool before the job started",
                                  where=entry.where()) from None
        pending = {entry.rank for entry in targets}
        by_rank = {entry.rank: entry for entry in targets}
        result, error, cancelled, caller_error = None, None, False, None
        failures = set()  # distinct (type, message) of the ranks that raised
        cancel_sent, error_deadline = False, None
        last_activity = time.monotonic()

        def send_cancel():
            nonlocal cancel_sent
            if cancel_sent:
                return
            cancel_sent = True
            for entry in targets:
                try:
                    entry.channel.send({"op": "cancel", "id": job_id})
                except ChannelClosed:
                    pass

        try:
            while pending:
                if cancel is not None and not cancel_sent:
                    try:
                        if cancel():
                            send_cancel()
                    except BaseException as exc:  # e.g. ComfyUI's interrupt exception
                        caller_error = exc
                        send_cancel()
                try:
                    gen, rank, msg = self._inbox.get(timeout=0.05)
                except queue.Empty:
                    now = time.monotonic()
                    if error is not None and now > error_deadline:
                        break
                    if self._generation != generation:
                        with self._teardown_lock:
                            pass
                        error = error or PoolError(f"the pool stopped during the {kind} job "
                                                   f"({self._last_error or 'shut down'})")
                        break
                    if self.stall_timeout and now - last_activity > self.stall_timeout:
                        error = PoolError(f"job {kind} made no progress for {self.stall_timeout:.0f} s; "
                                          "stopping the pool")
                        break
                    continue
                if gen != generation:
                    continue
                op = msg.get("op")
                if op == "lost":
                    with self._teardown_lock:  # wait until the monitor has reaped every worker
                        pass
                    tail = f"\n{msg['tail']}" if msg.get("tail") else ""
                    # a dead worker is the root cause; peers' errors (broken collectives) only follow from it
                    error = WorkerError(rank, msg["reason"] + tail, where=msg.get("where", ""))
                    break
                if msg.get("id") != job_id:
                    continue
                last_activity = time.monotonic()
                if op == "event":
                    event = ProgressEvent(msg["phase"], int(msg["step"]), int(msg["total"]),
                                          msg.get("seconds_per_step"), msg.get("preview"))
                    with self._lock:
                        if self._job is not None:
                            self._job.update(phase=event.phase, step=event.step, total=event.total,
                                             seconds_per_step=event.seconds_per_step)
                    if on_event is not None and caller_error is None:
                        try:
                            on_event(event)
                        except BaseException as exc:  # the caller's progress hook asked to stop
                            caller_error = exc
                            send_cancel()
                elif op == "result":
                    result = msg["value"]
                elif op == "done":
                    pending.discard(rank)
                    status = msg.get("status")
                    if status == "cancelled":
                        cancelled = True
                    elif status == "error":
                        failures.add((msg.get("type"), msg.get("message", "")))
                    if status == "error" and error is None:
                        error = WorkerError(rank, msg.get("message", ""), msg.get("traceback", ""), msg.get("type"),
                                            where=by_rank[rank].where())
                        error_deadline = time.monotonic() + self.error_grace
                        send_cancel()
        except BaseException:
            # The caller was interrupted while waiting: stop the job; if the ranks do not stop, stop the pool.
            send_cancel()
            self._drain(job_id, generation, pending, 10.0)
            raise
        if error is not None:
            if pending:
                self._teardown(f"rank {getattr(error, 'rank', '?')} failed while others were still running",
                               graceful=False, expect=generation)
            elif len(failures) > 1:
                # Ranks that failed differently may have stopped at different collectives: unmatched NCCL calls
                # would pair up with the next job's. Only the same error on every rank keeps the pool.
                self._teardown("ranks failed with different errors", graceful=False, expect=generation)
            with self._lock:
                self._last_error = str(error).split("\n--- worker traceback")[0]
        if caller_error is not None:  # the caller stopped the job (e.g. Ctrl-C): that is what it must see
            raise caller_error
        if error is not None:
            raise error
        if cancelled:
            raise GenerationCancelled(f"{kind} cancelled")
        if kind == "encode":
            return tuple(result)
        return result

    def _drain(self, job_id: int, generation: int, pending: set, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            try:
                gen, rank, msg = self._inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if gen == generation and msg.get("op") == "lost":
                return
            if gen == generation and msg.get("id") == job_id and msg.get("op") == "done":
                pending.discard(rank)
        if pending:
            self._teardown("job did not stop after cancel", graceful=False, expect=generation)

    # -- status ----------------------------------------------------------------------------------------------
    def status(self) -> dict:
        """A JSON-serializable snapshot for the web panel and ``pool-status``."""
        now = time.monotonic()
        with self._lock:
            ranks = []
            for entry in self._ranks:
                hb = entry.heartbeat
                ranks.append({
                    "rank": entry.rank, "pid": entry.pid, "host": entry.host, "device": entry.device,
                    "state": hb.get("state", entry.state) if entry.ready else "starting",
                    "memory": dict(hb.get("memory") or {}), "loads": hb.get("loads", 0),
                    "vae_loads": hb.get("vae_loads", 0), "step": list(hb.get("step") or [0, 0]),
                    "last_seen_s": round(now - entry.last_seen, 2),
                })
            leader = self._ranks[0].heartbeat if self._ranks else {}
            state = self._state
            if state == "ready":
                state = "busy" if self._job is not None else "idle"
            return {
                "state": state, "devices": str(self.devices), "kind": self.devices.kind,
                "backend": self.devices.backend if self.devices.kind != "remote" else
                ",".join(sorted({r.backend for r in self._ranks if r.backend})) or "unknown",
                "world_size": self.world_size, "ranks": ranks,
                "model": leader.get("model"), "layout": leader.get("layout"), "loads": leader.get("loads", 0),
                "job": dict(self._job) if self._job else None, "jobs_done": self._jobs_done,
                "starts": self._starts, "started_at": self._started_at, "last_error": self._last_error,
            }


def _spec(model) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, (str, os.PathLike, ModelSource)):
        return ModelSpec(model if isinstance(model, ModelSource) else ModelSource(str(model)))
    raise TypeError(f"expected a ModelSpec, got {type(model).__name__}")


def _request_wire(request: GenerationRequest) -> dict:
    fields = ("prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds", "frames", "height", "width",
              "steps", "guidance", "seed", "scheduler", "dynamic_cfg", "image")
    out = {}
    for name in fields:
        value = getattr(request, name)
        if torch.is_tensor(value):
            value = value.detach().cpu()
        elif isinstance(value, bool):
            value = bool(value)
        elif isinstance(value, int):
            value = int(value)
        elif isinstance(value, float):
            value = float(value)
        out[name] = value
    return out


_SIGKILL = getattr(signal, "SIGKILL", signal.SIGTERM)


def _wait_ranks(ranks, seconds: float) -> None:
    """Give local worker processes up to ``seconds`` (together) to exit on their own."""
    deadline = time.monotonic() + seconds
    for entry in ranks:
        if entry.proc is not None:
            try:
                entry.proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


def _kill_ranks(ranks: list[_Rank], sig: int | None) -> None:
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


# -- process-wide pool and exit handling -----------------------------------------------------------------------
_live_pools: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()
_POOL: WorkerPool | None = None
_POOL_LOCK = threading.Lock()
_HANDLERS_INSTALLED = False
_ATEXIT_INSTALLED = False
_HANDLER_LOCK = threading.Lock()


def get_pool(devices: str = "auto", **options) -> WorkerPool:
    """The process-wide pool for ``devices``; asking for other devices shuts the old pool down first."""
    global _POOL
    wanted = parse_devices(devices)
    with _POOL_LOCK:
        if _POOL is not None and (_POOL.devices != wanted or _POOL._closed):
            _POOL.shutdown()
            _POOL = None
        if _POOL is None:
            _POOL = WorkerPool(devices, **options)
        return _POOL


def shutdown_pool() -> None:
    """Stop the process-wide pool, if any."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.shutdown()


def _shutdown_all() -> None:
    for pool in list(_live_pools):
        try:
            pool.shutdown()
        except Exception:  # never fail interpreter exit
            pass


def install_exit_handlers() -> None:
    """Stop every pool when this process ends: atexit, and SIGTERM/SIGINT/SIGHUP handlers that kill the
    workers and then run whatever handler was installed before (SIG_DFL: the default action).

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
        if callable(previous):
            return previous(sig, frame)
        # SIG_DFL: let the default action happen (terminate with this signal)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return handler

