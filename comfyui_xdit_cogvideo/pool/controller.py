"""The worker pool as seen from the caller's process (ComfyUI or the CLI), which never joins torch.distributed.

``WorkerPool`` owns the pool's lifecycle: start (local workers through ``launch``; remote ones connect to a
listener), the monitor thread, teardown, status. Jobs run through ``job.JobRun``; messages are ``protocol``'s.

The monitor reads every worker's connection through ``selectors`` (epoll/kqueue: no descriptor limit) and parses
frames incrementally, so a half-sent frame never blocks it. It tracks heartbeats and process liveness and fails
the running job the moment a worker dies, freezes or sends a bad frame; the pool is then torn down (every
process reaped) and started again by the next job. If the monitor itself fails, the pool says so and stops.
Models stay resident in the workers between jobs.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import queue
import secrets
import selectors
import shutil
import sys
import tempfile
import threading
import time
from typing import Callable

import torch

from ..errors import AuthError, ChannelClosed, LayoutError, ModelError, PoolError, RequestError
from ..layout import Layout, check_layout, choose_layout
from ..request import GenerationRequest
from . import protocol as p
from .channel import EXIT_RESTART, PROTOCOL, Channel, check_key, listen
from .devices import DeviceLock, PoolDevices, cpu_count, parse_devices
from .job import Deadlines, JobRun, Lost
from .launch import SIGKILL, Rank, describe_exit, signal_ranks, spawn, wait_ranks

log = logging.getLogger("comfyui_xdit_cogvideo.pool")

HANDSHAKE_TIMEOUT = 10.0  # seconds one connection may take to prove the key and say hello
MAX_HANDSHAKES = 16  # unauthenticated connections handled at once; more are closed on arrival


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


class WorkerPool:
    """Long-lived worker processes with resident models; one job at a time. See module docstring.

    Deadlines (seconds): ``start_timeout`` for every rank to join; ``heartbeat_timeout`` without a heartbeat
    (frozen process or host); per job ``startup_timeout`` until its first step, then no step for
    max(``stall_floor``, ``stall_factor`` x median step); ``cancel_timeout`` for every rank to stop after Cancel.
    ``before_job(devices)``: called before every job (the ComfyUI nodes free ComfyUI's models on these GPUs).
    """

    def __init__(self, devices: str = "auto", *, threads: int | None = None, start_timeout: float = 600.0,
                 heartbeat: float = 1.0, heartbeat_timeout: float = 30.0, startup_timeout: float = 900.0,
                 stall_floor: float = 60.0, stall_factor: float = 10.0, cancel_timeout: float = 10.0,
                 error_grace: float = 3.0, pg_timeout: float = 300.0, echo_output: bool = True,
                 before_job: Callable[[PoolDevices], None] | None = None):
        self.devices = devices if isinstance(devices, PoolDevices) else parse_devices(devices)
        self.threads = threads
        self.start_timeout = start_timeout
        self.heartbeat = heartbeat
        self.heartbeat_timeout = heartbeat_timeout
        self.deadlines = Deadlines(startup_timeout, stall_floor, stall_factor, cancel_timeout, error_grace)
        self.pg_timeout = pg_timeout
        self.echo_output = echo_output
        self.before_job = before_job
        self._lock = threading.RLock()
        self._start_lock = threading.Lock()
        self._teardown_lock = threading.RLock()
        self._abort = threading.Event()
        self._slot = _FifoSlot()
        self._ranks: list[Rank] = []
        self.last_plan = None  # the memory.MemoryPlan of the last generate job
        self.last_decode = None  # the vae_parallel.DecodeChoice of the last decode job
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
        self._key: bytes = b""
        self._session = ""
        self._store_dir: str | None = None
        self._device_lock: DeviceLock | None = None
        self._closed = False
        self._exiting = False
        from .registry import track

        track(self)

    @property
    def world_size(self) -> int:
        return self.devices.world_size

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> "WorkerPool":
        """Start the workers now (jobs start them lazily otherwise). Blocks until every rank is ready;
        ``shutdown()`` from another thread aborts a pending start at once."""
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
                    self._last_error = f"start failed: {str(error).splitlines()[0] if str(error) else error!r}"
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
        procs: dict[int, Rank] = {}
        respawn: Callable[[int], Rank] | None = None  # local pools: a fresh worker for a rank whose spare died
        if self.devices.kind == "remote":
            self._key = _remote_key(self.devices)
            if self._listener is None:
                host, port = self.devices.address
                try:
                    self._listener = listen(host, port)
                except OSError as error:
                    raise PoolError(f"cannot listen on {host}:{port}: {error}") from None
        else:
            if self.devices.kind == "cuda":
                self._device_lock = DeviceLock.acquire([f"cuda-{g}" for g in self.devices.gpu_ids])
            self._key = secrets.token_hex(32).encode()
            self._store_dir = tempfile.mkdtemp(prefix="xdit-cogvideo-pool-")  # 0700: only this user
            self._listener = listen("127.0.0.1", 0)
            port = self._listener.getsockname()[1]
            cpus = cpu_count()
            threads = self.threads or max(1, cpus // world if self.devices.kind == "cpu" else min(8, cpus // world))

            def start_rank(rank: int, use_spare: bool = True) -> Rank:
                gpu = self.devices.gpu_ids[rank] if self.devices.kind == "cuda" else None
                return spawn(rank, world, gpu=gpu, backend=self.devices.backend, port=port, threads=threads,
                             key=self._key.decode(), connect_timeout=self.start_timeout, echo=self.echo_output,
                             use_spare=use_spare)

            respawn = functools.partial(start_rank, use_spare=False)
            for rank in range(world):
                procs[rank] = start_rank(rank)
                with self._lock:
                    self._ranks = [procs[r] for r in sorted(procs)]
        self._accept_all(procs, generation, respawn)
        with self._lock:
            if self.devices.kind != "remote":
                self._listener.close()  # every local worker is in; nobody else may connect
                self._listener = None
            self._state = "ready"
            self._started_at = time.time()
        threading.Thread(target=self._monitor, args=(generation,), daemon=True,
                         name=f"xdit-pool-monitor-{generation}").start()

    def _accept_all(self, procs: dict[int, Rank], generation: int,
                    respawn: Callable[[int], Rank] | None = None) -> None:
        """Accept, authenticate (on helper threads) and greet every worker, then wait until each has joined
        torch.distributed. Nothing here blocks for longer than 0.1 s, so ``shutdown`` can abort it. A prestarted
        spare that dies before it connects is replaced once by a fresh worker (``respawn``): a spare may never
        cost a job."""
        world = self.devices.world_size
        deadline = time.monotonic() + self.start_timeout
        connected: dict[int, Rank] = {}
        greeted: queue.Queue = queue.Queue()
        handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ, None)
        last_ping = time.monotonic()
        try:
            while not (len(connected) == world and all(r.ready for r in connected.values())):
                if self._abort.is_set():
                    raise PoolError("start aborted: the pool was shut down")
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world)) - set(connected))
                    hint = ""
                    if self.devices.kind == "remote":
                        hint = (f"; start them with torchrun ... -m comfyui_xdit_cogvideo worker --connect "
                                f"{self.devices.address[0]}:{self.devices.address[1]} (see README)")
                    raise PoolError(f"workers did not start within {self.start_timeout:.0f} s "
                                    f"(not connected: ranks {missing or 'none'}; not ready: "
                                    f"{[r.rank for r in connected.values() if not r.ready]}){hint}")
                for rank, entry in list(procs.items()):
                    code = entry.proc.poll() if entry.proc else None
                    if code is None:
                        continue
                    if entry.prestarted and rank not in connected and respawn is not None:
                        log.warning("%s; starting a fresh worker for it", _start_failure(entry, describe_exit(code)))
                        procs[rank] = respawn(rank)
                        with self._lock:
                            self._ranks = [procs[r] for r in sorted(procs)]
                        continue
                    raise PoolError(_start_failure(entry, describe_exit(code)))
                for key, _ in selector.select(0.1):
                    if key.data is None:
                        self._accept_one(greeted, handshakes)
                        continue
                    entry = key.data
                    try:
                        messages = entry.channel.read_available()
                    except (ChannelClosed, AuthError, PoolError) as error:
                        code = _exit_code(entry, 5)
                        how = describe_exit(code) if entry.proc and code is not None else f"disconnected ({error})"
                        raise PoolError(_start_failure(entry, how)) from None
                    for wire in messages:
                        self._starting_message(entry, p.decode(wire))
                while not greeted.empty():
                    channel, hello = greeted.get()
                    entry = self._greet(channel, hello, procs, connected)
                    if entry is None:
                        continue
                    connected[entry.rank] = entry
                    selector.register(channel.sock, selectors.EVENT_READ, entry)
                    if self.devices.kind == "remote":
                        with self._lock:
                            self._ranks = [connected[r] for r in sorted(connected)]
                if time.monotonic() - last_ping > self.heartbeat:
                    last_ping = time.monotonic()
                    for entry in connected.values():
                        try:
                            entry.channel.send(p.Ping().encode(), blocking=False)
                        except ChannelClosed:
                            pass
        finally:
            selector.close()
        with self._lock:
            self._ranks = [connected[r] for r in range(world)]

    def _accept_one(self, greeted: queue.Queue, handshakes: threading.BoundedSemaphore) -> None:
        try:
            sock, peer = self._listener.accept()
        except OSError:
            return
        if not handshakes.acquire(blocking=False):
            log.warning("refused a connection from %s: %d handshakes already in progress", peer, MAX_HANDSHAKES)
            sock.close()
            return

        def handshake():
            try:
                channel = Channel.accept(sock, self._key, timeout=HANDSHAKE_TIMEOUT, send_timeout=30.0)
                try:
                    hello = p.decode(channel.recv(timeout=HANDSHAKE_TIMEOUT))
                except BaseException:
                    channel.close()
                    raise
                greeted.put((channel, hello))
            except (AuthError, ChannelClosed, TimeoutError, OSError, PoolError) as error:
                log.warning("refused a worker connection from %s: %s", peer, error)
            finally:
                handshakes.release()

        threading.Thread(target=handshake, daemon=True, name="xdit-pool-handshake").start()

    def _starting_message(self, entry: Rank, message: p.Message) -> None:
        entry.last_seen = time.monotonic()
        if isinstance(message, p.Ready):
            if not message.ok:
                error = p.ErrorInfo(**message.error)
                raise PoolError(f"worker rank {entry.rank} ({entry.where()}) could not join torch.distributed: "
                                f"{error.type}: {error.message}")
            entry.ready, entry.state = True, "idle"
        elif isinstance(message, p.Heartbeat):
            entry.heartbeat = message.encode()

    def _greet(self, channel: Channel, hello: p.Message, procs: dict[int, Rank], connected: dict) -> Rank | None:
        world = self.devices.world_size

        def refuse(reason: str) -> None:
            log.warning("refused a worker: %s", reason)
            try:
                channel.send(p.Refused(reason).encode())
            except ChannelClosed:
                pass
            channel.close()

        if not isinstance(hello, p.Hello):
            return refuse("expected a hello message")
        if hello.protocol != PROTOCOL:
            return refuse(f"protocol {hello.protocol} != {PROTOCOL}: install the same comfyui-xdit-cogvideo "
                          "version on every host")
        if hello.world != world:
            return refuse(f"worker belongs to a world of {hello.world} ranks, this pool expects {world}")
        if not 0 <= hello.rank < world or hello.rank in connected:
            return refuse(f"rank {hello.rank} is out of range or already connected")
        entry = procs.get(hello.rank) or Rank(hello.rank)
        if entry.proc is not None and hello.pid != entry.pid:
            return refuse(f"rank {hello.rank} answered from pid {hello.pid}, expected {entry.pid}")
        entry.channel, entry.pid, entry.host, entry.backend = channel, hello.pid, hello.host, hello.backend
        if entry.proc is None:
            entry.device = hello.device
        entry.last_seen = time.monotonic()
        store = os.path.join(self._store_dir, f"store-{self._session}") if self._store_dir else None
        channel.send(p.Welcome(session=self._session, heartbeat=self.heartbeat,
                               timeout=max(4 * self.heartbeat_timeout, 60.0), store=store,
                               pg_timeout=self.pg_timeout).encode())
        return entry

    # -- the monitor -----------------------------------------------------------------------------------------
    def _monitor(self, generation: int) -> None:
        try:
            self._watch(generation)
        except BaseException as error:  # the pool cannot run without its monitor: say so and stop
            log.exception("xdit-cogvideo pool monitor failed")
            with self._lock:
                ranks = list(self._ranks)
            self._lost(generation, ranks[0] if ranks else Rank(0),
                       f"could not be watched: the pool's monitor failed ({type(error).__name__}: {error})")

    def _watch(self, generation: int) -> None:
        with self._lock:
            ranks = list(self._ranks)
        selector = selectors.DefaultSelector()
        for entry in ranks:
            selector.register(entry.channel.sock, selectors.EVENT_READ, entry)
        last_ping = time.monotonic()
        try:
            while True:
                with self._lock:
                    if generation != self._generation:
                        return
                events = selector.select(0.2)
                now = time.monotonic()
                for key, _ in events:
                    entry = key.data
                    try:
                        messages = entry.channel.read_available()
                    except ChannelClosed:
                        code = _exit_code(entry, 2)
                        reason = describe_exit(code) if code is not None else "lost its connection to the pool"
                        return self._lost(generation, entry, reason)
                    except AuthError as error:
                        return self._lost(generation, entry, f"sent a frame that failed its check ({error})")
                    entry.last_seen = now
                    for wire in messages:
                        try:
                            message = p.decode(wire)
                        except PoolError as error:
                            return self._lost(generation, entry, f"sent a message the pool does not know ({error})")
                        if isinstance(message, p.Heartbeat):
                            entry.heartbeat, entry.state = message.encode(), message.state
                        else:
                            self._inbox.put((generation, entry.rank, message))
                for entry in ranks:
                    code = entry.proc.poll() if entry.proc is not None else None
                    if code is not None:
                        return self._lost(generation, entry, describe_exit(code))
                    if now - entry.last_seen > self.heartbeat_timeout:
                        half = " in the middle of a message" if entry.channel.partial else ""
                        return self._lost(generation, entry, f"sent nothing{half} for {now - entry.last_seen:.0f} s "
                                                             "(frozen, or its host is unreachable)")
                if now - last_ping > self.heartbeat:
                    last_ping = now
                    for entry in ranks:
                        try:
                            entry.channel.send(p.Ping().encode(), blocking=False)  # busy sending: it is alive
                        except ChannelClosed:
                            return self._lost(generation, entry, "lost its connection to the pool")
        finally:
            selector.close()

    def _lost(self, generation: int, entry: Rank, reason: str) -> None:
        with self._lock:
            if generation != self._generation:
                return
            self._last_error = f"worker rank {entry.rank} ({entry.where()}) {reason}"
            self._state = "broken"
            if self._exiting:  # we killed them ourselves (a signal to this process)
                reason = self._last_error = "stopped: this process is exiting"
        if not self._exiting:
            log.error("xdit-cogvideo pool: %s; stopping all workers", self._last_error)
        crashed = entry.proc is not None and entry.proc.returncode is not None and entry.proc.returncode > 0
        output = entry.crash_output() if crashed else ""  # a signal explains itself; earlier output is noise
        with self._teardown_lock:  # the job sees the failure only once every worker is gone and reaped
            self._inbox.put((generation, entry.rank, Lost(entry.rank, reason, entry.where(), output)))
            self._teardown(reason, graceful=False, expect=generation)

    # -- teardown --------------------------------------------------------------------------------------------
    def _teardown(self, reason: str, graceful: bool, expect: int | None = None, final: bool = False) -> None:
        """Stop every worker of the current generation and reap them (no process is left behind)."""
        with self._teardown_lock:
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
                store_dir, self._store_dir = self._store_dir, None
                device_lock, self._device_lock = self._device_lock, None
            code = 0 if final else EXIT_RESTART
            if graceful or self.devices.kind == "remote":
                for entry in ranks:
                    if entry.channel is not None:
                        try:
                            entry.channel.send(p.Exit(code).encode(), blocking=False)
                        except ChannelClosed:
                            pass
            if graceful:
                wait_ranks(ranks, 1.0)
            signal_ranks(ranks, SIGKILL)  # workers keep nothing worth an orderly exit; SIGKILL also ends SIGSTOP
            for entry in ranks:
                if entry.proc is not None:
                    entry.proc.wait()
                if entry.channel is not None:
                    entry.channel.close()
            if listener is not None:
                listener.close()
            if store_dir is not None:
                shutil.rmtree(store_dir, ignore_errors=True)
            if device_lock is not None:
                device_lock.release()
            with self._lock:
                if self._generation == generation:
                    self._state = "stopped"
            if ranks:
                log.info("xdit-cogvideo pool stopped (%s)%s", reason, " after a failure" if broken else "")

    def shutdown(self) -> None:
        """Stop all workers (gracefully if idle, else by signal) and reap them; a pending start is aborted.
        The pool cannot start again."""
        from .registry import untrack

        with self._lock:
            self._closed = True
        self._abort.set()
        with self._start_lock:
            self._teardown("shutdown", graceful=self._job is None, final=True)
        untrack(self)

    def _kill_now(self) -> None:
        """Signal-handler path: kill every worker without taking locks (they are reaped later or by init)."""
        self._exiting = True
        signal_ranks(list(self._ranks), SIGKILL)
        if self._store_dir is not None:
            shutil.rmtree(self._store_dir, ignore_errors=True)

    # -- jobs ------------------------------------------------------------------------------------------------
    def check_generate(self, model: p.ModelSpec, request: GenerationRequest, layout: Layout | None = None):
        """(model, resolved request, layout) for a generate job, or ModelError / RequestError / LayoutError.
        Touches no process: callers use it to refuse a job before a running pool is shut down or restarted."""
        model = _spec(model)
        model.validate()
        from ..loading import read_model_info

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
        return model, resolved, layout

    def generate(self, model: p.ModelSpec, request: GenerationRequest, layout: Layout | None = None,
                 on_event: Callable[[p.ProgressEvent], None] | None = None,
                 cancel: Callable[[], bool] | None = None) -> torch.Tensor:
        """Latents shaped like ``CogVideoXPipeline(output_type="latent").frames``, sampled by the pool.

        Bad models, requests and layouts raise ModelError / RequestError / LayoutError here, before any worker
        is started. ``layout`` None picks the fastest valid layout for the pool's ranks; a layout over fewer
        ranks than the pool uses the first ones.
        """
        from ..loading import read_model_info
        from ..memory import plan_job

        model, resolved, layout = self.check_generate(model, request, layout)
        args = {"layout": [layout.cfg, layout.ulysses, layout.ring], "request": _request_wire(resolved)}
        info = read_model_info(model.source)

        def plan(args: dict) -> None:  # in the job's slot, after before_job: every rank's free memory as it is now
            self.last_plan = plan_job(model, info, resolved, layout, [r["memory"] for r in self.status()["ranks"]])
            args["memory"] = self.last_plan.wire()  # MemoryPlanError here: refused before any rank runs it

        return self._run("generate", model, args, on_event, cancel, leader_only=False, prepare=plan)

    def decode(self, model: p.ModelSpec, latents: torch.Tensor, frames: int | None = None, tiled: bool | None = None,
               on_event: Callable[[p.ProgressEvent], None] | None = None, cancel: Callable[[], bool] | None = None,
               tiling=None) -> torch.Tensor:
        """Video frames [F, H, W, 3] float in 0..1 through the model's VAE.

        ``tiled=None`` (auto): untiled on rank 0 when its estimated peak fits rank 0's free memory and the pool has
        fewer than ``vae_parallel.TILED_DECODE_MIN_RANKS`` ranks (fastest there), else tiled over all ranks.
        ``tiled=True``: diffusers' tiled decode with the tiles spread over all ranks (equal to single-process tiled
        decode). ``tiled=False``: plain decode on rank 0. The choice and its reason are in ``last_decode`` (a
        ``vae_parallel.DecodeChoice``) and in ``status()``. ``tiling``: a ``vae_parallel.Tiling`` to override the
        VAE's tile size and overlap. ``frames`` drops CogVideoX 1.5's temporal padding.
        """
        from ..loading import read_model_info
        from ..vae_parallel import frames_of

        model = _spec(model)
        model.validate()
        info = read_model_info(model.source)
        vae_path = model.source.resolve().vae
        if vae_path is None:
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
        if tiled is not None and not isinstance(tiled, bool):
            raise RequestError(f"tiled must be True, False or None (automatic), got {tiled!r}")
        wire_tiling = None
        if tiling is not None:
            wire_tiling = [tiling.sample_height, tiling.sample_width, tiling.overlap_height, tiling.overlap_width]
        args = {"latents": latents[:1].detach().cpu(), "frames": frames, "tiling": wire_tiling}
        video_frames = frames or (latents.shape[1] - 1) * 4 + 1
        dtype_bytes = {"fp32": 4, "bf16": 2, "fp16": 2}.get(model.dtype, 2)

        def choose(args: dict) -> None:  # in the job's slot: rank 0's free memory as it is now
            from ..memory import decode_budget, untiled_decode_peak
            from ..vae_parallel import choose_decode

            needed = untiled_decode_peak(vae_path, video_frames, latents.shape[3] * 8, latents.shape[4] * 8,
                                         dtype_bytes)
            ranks = self.status()["ranks"]
            choice = choose_decode(tiled, self.world_size, needed, decode_budget(ranks[0]["memory"] if ranks else None))
            with self._lock:
                self.last_decode = choice
            args.update(tiled=choice.tiled, leader_only=not choice.tiled)

        rows = self._run("decode", model, args, on_event, cancel, leader_only=tiled is False, prepare=choose)
        if not (torch.is_tensor(rows) and rows.dim() == 4 and rows.shape[-1] == 3):
            raise PoolError(f"rank 0 sent no decoded video (got {type(rows).__name__})")
        return frames_of(rows)  # rank 0 sends the VAE's output in its own dtype; the frames are made here

    def encode_prompt(self, model: p.ModelSpec, prompt: str, negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """T5 embeddings [1, 226, D] of prompt and negative prompt, made on rank 0 as diffusers makes them."""
        from ..loading import read_model_info

        model = _spec(model)
        model.validate()
        read_model_info(model.source)
        source = model.source.resolve()
        if source.text_encoder is None or source.tokenizer is None:
            raise ModelError("this model has no text encoder/tokenizer to encode prompts with")
        args = {"prompt": str(prompt), "negative": str(negative_prompt or "")}
        positive, negative = self._run("encode", model, args, None, None, leader_only=True)
        return positive, negative

    def inject_fault(self, rank: int, kind: str = "raise", step: int = 1) -> None:
        """Testing only (XDIT_COGVIDEO_TESTING=1 here and in the workers): make ``rank`` misbehave at the
        ``step``-th step boundary of its next job; ``kind`` is one of ``protocol.FAULTS``."""
        if not p.testing_enabled():
            raise PoolError(f"fault injection is a testing aid; set {p.TESTING_ENV}=1 to use it")
        if kind not in p.FAULTS:
            raise ValueError(f"unknown fault {kind!r}; choose one of {', '.join(p.FAULTS)}")
        self.start()
        with self._lock:
            entry = self._ranks[rank]
        entry.channel.send(p.Fault(kind, int(step)).encode())

    def _run(self, kind: str, model: p.ModelSpec, args: dict, on_event, cancel, leader_only: bool, prepare=None):
        with self._slot:
            self.start()
            if self.before_job is not None:
                try:
                    self.before_job(self.devices)
                except Exception:  # freeing the host's memory is a courtesy; the job may still fit
                    log.warning("before_job hook failed", exc_info=True)
            if prepare is not None:
                prepare(args)
                leader_only = bool(args.get("leader_only", leader_only))  # a decode's choice of ranks
            with self._lock:
                generation = self._generation
                targets = list(self._ranks)[:1] if leader_only else list(self._ranks)
                job = p.Job(next(self._ids), kind, model.wire(), args)
                self._job = {"id": job.id, "kind": kind, "phase": "queued", "step": 0, "total": 0,
                             "seconds_per_step": None, "started": time.time()}
            try:
                result = JobRun(self, job, generation, targets, on_event, cancel).run()
            finally:
                with self._lock:
                    self._job = None
                    self._jobs_done += 1
        return tuple(result) if kind == "encode" else result

    def _job_progress(self, event: p.ProgressEvent) -> None:
        with self._lock:
            if self._job is not None:
                self._job.update(phase=event.phase, step=event.step, total=event.total,
                                 seconds_per_step=event.seconds_per_step)

    def _heartbeat_of(self, rank: int) -> dict:
        with self._lock:
            for entry in self._ranks:
                if entry.rank == rank:
                    return dict(entry.heartbeat)
        return {}

    def _note_error(self, text: str) -> None:
        with self._lock:
            self._last_error = text

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
                    "last_seen_s": round(now - entry.last_seen, 2), "prestarted": entry.prestarted,
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
                "startup": leader.get("startup") or {}, "last_job": leader.get("last_job") or {},
                "compile": leader.get("compile") or {},
                "job": dict(self._job) if self._job else None, "jobs_done": self._jobs_done,
                "starts": self._starts, "started_at": self._started_at, "last_error": self._last_error,
                "last_decode": self.last_decode.describe() if self.last_decode is not None else None,
            }


def _remote_key(devices: PoolDevices) -> bytes:
    """The key torchrun workers must hold: XDIT_COGVIDEO_POOL_KEY (>= 32 bytes); when unset, a new one, printed
    with the exact command that starts workers carrying it."""
    key = os.environ.get("XDIT_COGVIDEO_POOL_KEY", "")
    if not key:
        key = secrets.token_hex(32)
        os.environ["XDIT_COGVIDEO_POOL_KEY"] = key
        host, port = devices.address
        print(f"xdit-cogvideo: no XDIT_COGVIDEO_POOL_KEY was set; this pool's key is {key}\n"
              f"start the workers on each host with:\n  XDIT_COGVIDEO_POOL_KEY={key} torchrun --nnodes=N "
              f"--nproc-per-node=GPUS --rdzv-backend=c10d --rdzv-endpoint=HOST0:29500 --rdzv-id=xdit-cogvideo "
              f"--max-restarts=3 -m comfyui_xdit_cogvideo worker --connect {host}:{port}", file=sys.stderr, flush=True)
    try:
        return check_key(key.encode())
    except AuthError as error:
        raise PoolError(str(error)) from None


def _exit_code(entry: Rank, wait: float) -> int | None:
    if entry.proc is None:
        return None
    try:
        return entry.proc.wait(timeout=wait)
    except Exception:
        return None


def _start_failure(entry: Rank, how: str) -> str:
    output = entry.crash_output()
    return (f"worker rank {entry.rank} ({entry.where()}) {how} while starting"
            + (f":\n{output}" if output else " (it printed nothing that explains why)"))


def _spec(model) -> p.ModelSpec:
    from ..loading import ModelSource

    if isinstance(model, p.ModelSpec):
        return model
    if isinstance(model, (str, os.PathLike, ModelSource)):
        return p.ModelSpec(model if isinstance(model, ModelSource) else ModelSource(str(model)))
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

