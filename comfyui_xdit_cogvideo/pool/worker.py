"""One rank of the worker pool: a long-lived process holding a resident CogVideoX engine.

Started by the pool (``python -m comfyui_xdit_cogvideo.pool.worker``, one process per GPU or CPU rank) or by
``torchrun`` on any host (``python -m comfyui_xdit_cogvideo worker --connect HOST:PORT``). Either way it
connects to the pool's controller, proves it holds the pool key, joins the torch.distributed world (NCCL on
GPUs, gloo on CPUs) and then runs the same jobs as every other rank, in the order the controller sends them.

Threads: the main thread runs jobs; a reader thread takes messages from the controller (jobs go to a queue,
``Cancel`` sets a flag the sampler polls every step, ``Exit`` ends the process at once, even mid-collective); a
heartbeat thread reports state, step and memory every second; a watchdog ends the process when the parent
process or the controller disappears, so a worker never outlives the pool that started it.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import os
import shutil
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta

from ..errors import ChannelClosed, ModelError
from . import protocol as p
from .channel import EXIT_RESTART, PROTOCOL, Channel, check_key

log = logging.getLogger("comfyui_xdit_cogvideo.worker")


def _memory(device) -> dict:
    import torch

    if device.type == "cuda" and torch.cuda.is_initialized():
        free, total = torch.cuda.mem_get_info(device)
        return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device),
                "peak": torch.cuda.max_memory_allocated(device), "free": free, "total": total,
                "allocator": torch.cuda.get_allocator_backend()}
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        rss = None
    return {"rss": rss}


def _process_age() -> float | None:
    """Seconds since this process was created (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rpartition(")")[2].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return round(float(f.read().split()[0]) - started, 3)
    except (OSError, ValueError, IndexError):
        return None


def _quit(code: int) -> None:
    """Leave now: flush what we printed, skip interpreter teardown (a collective may still block a thread)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class Worker:
    def __init__(self, channel: Channel, rank: int, world: int, device: str, backend: str,
                 parent_pid: int | None, remote: bool):
        import torch

        self.channel = channel
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self.backend = backend
        self.parent_pid = parent_pid
        self.store_dir: str | None = None  # the local pool's rendezvous folder (the parent removes it on exit)
        self.remote = remote
        self.commands: queue.Queue = queue.Queue()
        self.state = "starting"
        self.job: int | None = None
        self.phase = ""
        self.step = (0, 0)
        self.tick = 0
        self.engine = None
        self.engine_key = None
        self.attention: str | None = None
        self.groups: dict = {}
        self.vae = None
        self.vae_key = None
        self.loads = 0
        self.vae_loads = 0
        self.startup: dict = {}
        self.last_job: dict = {}
        self.heartbeat = 1.0
        self.controller_timeout = 60.0
        self.last_rx = time.monotonic()
        self._cancelled: set[int] = set()
        self._fault: p.Fault | None = None
        self._fault_count = 0
        self.exit_code: int | None = None
        self._lock = threading.Lock()

    # -- threads -----------------------------------------------------------------------------------------
    def send(self, message: p.Message) -> None:
        try:
            self.channel.send(message.encode())
        except ChannelClosed:
            self._lost("controller connection closed")

    def _lost(self, why: str) -> None:
        if self.exit_code is not None:  # asked to exit; the controller may close first
            _quit(self.exit_code)
        log.warning("rank %d: %s; exiting", self.rank, why)
        self._orphaned_cleanup(wait=1.0)
        _quit(EXIT_RESTART if self.remote else 0)

    def _orphaned_cleanup(self, wait: float) -> None:
        """A parent killed outright (SIGKILL) cannot remove the pool's rendezvous folder: its orphans do. The
        kernel closes the parent's sockets a moment before it re-parents us, hence the short wait."""
        if self.store_dir is None or self.parent_pid is None:
            return
        deadline = time.monotonic() + wait
        while os.getppid() == self.parent_pid:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.02)
        shutil.rmtree(self.store_dir, ignore_errors=True)

    def _reader(self) -> None:
        while True:
            try:
                message = p.decode(self.channel.recv())
            except ChannelClosed:
                self._lost("controller connection closed")
            except Exception as error:  # a frame that failed its check: this connection cannot be trusted
                self._lost(f"bad message from the controller: {error}")
            self.last_rx = time.monotonic()
            if isinstance(message, p.Ping):
                continue
            if isinstance(message, p.Cancel):
                with self._lock:
                    self._cancelled.add(message.id)
            elif isinstance(message, p.Fault):
                if p.testing_enabled():
                    with self._lock:
                        self._fault, self._fault_count = message, 0
                else:
                    log.warning("rank %d: ignored a fault-injection message (testing is off)", self.rank)
            elif isinstance(message, p.Exit):
                self.exit_code = int(message.code)
                _quit(self.exit_code)  # nothing of a worker needs an orderly interpreter exit
            else:
                self.commands.put(message)

    def _heartbeats(self) -> None:
        while True:
            time.sleep(self.heartbeat)
            try:
                self.send(self.snapshot())
            except Exception:  # a snapshot racing a model swap must not end the heartbeats (the pool would
                log.exception("rank %d: heartbeat failed", self.rank)  # then declare this rank frozen)

    def _watchdog(self) -> None:
        while True:
            time.sleep(0.25)
            if self.exit_code is not None:
                continue
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.warning("rank %d: parent process %d is gone; exiting", self.rank, self.parent_pid)
                self._orphaned_cleanup(wait=0)
                _quit(0)
            if time.monotonic() - self.last_rx > self.controller_timeout:
                self._lost(f"no message from the controller for {self.controller_timeout:.0f} s")

    def snapshot(self) -> p.Heartbeat:
        model = layout = None
        engine, key = self.engine, self.engine_key  # read once: a job thread may swap them meanwhile
        if engine is not None and key is not None:
            path, vae, text_encoder, _, storage, dtype = key[:-2]
            model = {"path": path, "vae": vae, "text_encoder": text_encoder, "storage": storage, "dtype": dtype,
                     "attention": self.attention, "variant": engine.info.variant, "loras": engine.loras,
                     "memory": engine.memory.describe()}
            lay = engine.groups.layout
            layout = [lay.cfg, lay.ulysses, lay.ring]
        optimizer = getattr(engine, "optimizer", None)
        return p.Heartbeat(rank=self.rank, state=self.state, job=self.job, phase=self.phase, step=list(self.step),
                           tick=self.tick, memory=_memory(self.device), model=model, layout=layout, loads=self.loads,
                           vae_loads=self.vae_loads, startup=self.startup, last_job=self.last_job,
                           compile=optimizer.compile_report() if optimizer is not None else {})

    # -- resident state ----------------------------------------------------------------------------------
    def _free_cached(self) -> None:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def engine_for(self, spec: p.ModelSpec, report: bool, job: int, plan=None, text: bool | tuple[str, str] = False):
        """The resident engine for ``spec``, loading it only when the weights, dtype or memory placement changed.

        ``plan`` (a memory.MemoryPlan) None: any resident engine of these weights will do (text encoding), else one
        built under the spec's memory plan (auto = low: the transformer waits on the CPU, T5 visits the GPU).
        ``text``: this rank will encode text in this job, so a new engine loads T5 alongside the transformer (a
        (prompt, negative prompt) pair: and encodes it there, ``CogVideoEngine(preload_text=...)``)."""
        from ..engine import CogVideoEngine
        from ..memory import MemoryPlan
        from ..parallel import ParallelGroups

        base = spec.weights_key
        if plan is None:
            if self.engine is not None and self.engine_key[:-2] == base:
                return self.engine
            plan = MemoryPlan.default("low" if spec.memory == "auto" else spec.memory)
        key = base + (plan.name, plan.shard)  # the weights' key, then the memory plan's two fields
        if self.engine is not None and self.engine_key == key:
            self.engine.set_memory_plan(plan)
            return self.engine
        self.engine = self.engine_key = self.attention = None
        self._free_cached()
        if self.vae_key is not None and self.vae_key != base:
            self.vae = self.vae_key = None
        previous, self.state, self.phase = self.state, "loading", "load"
        if report:
            self.send(p.Event(job, "load", 0, 1))
        try:
            engine = CogVideoEngine(spec.source, dtype=spec.dtype, device=self.device,
                                    groups=ParallelGroups.single(), attention=spec.attention, memory=plan,
                                    optimize=os.environ.get("XDIT_COGVIDEO_OPTIMIZE") or "auto", preload_text=text)
        except OSError as error:  # unreadable or truncated weights: the model's fault, not this process's
            raise ModelError(f"cannot load {spec.source.path}: {error}") from error
        except Exception as error:
            if type(error).__name__ == "SafetensorError":
                raise ModelError(f"cannot load {spec.source.path}: {error}") from error
            raise
        if self.vae is not None and engine.loaded_vae is None:
            engine.attach_vae(self.vae)  # share the decode VAE with the sampler (I2V encodes its image with it)
        self.engine, self.engine_key, self.attention = engine, key, spec.attention
        self.loads += 1
        self.state = previous
        if report:
            self.send(p.Event(job, "load", 1, 1))
        return engine

    def vae_for(self, spec: p.ModelSpec):
        from ..loading import load_vae, parse_dtype, read_model_info

        key = spec.weights_key
        if self.vae is not None and self.vae_key == key:
            return self.vae
        same = self.engine is not None and self.engine_key[:-2] == key
        if same and self.engine.loaded_vae is not None:
            self.vae, self.vae_key = self.engine.loaded_vae, key
            return self.vae
        self.vae = self.vae_key = None
        gc.collect()
        vae = load_vae(spec.source.resolve(), parse_dtype(spec.dtype), self.device, read_model_info(spec.source))
        self.vae, self.vae_key = vae, key
        self.vae_loads += 1
        if self.engine is not None and self.engine_key[:-2] == key and self.engine.loaded_vae is None:
            self.engine.attach_vae(vae)
        return vae

    def groups_for(self, layout):
        """Process groups for ``layout`` (built once per layout; every rank takes part in building them)."""
        from ..parallel import ParallelGroups

        if layout not in self.groups:
            self.groups[layout] = ParallelGroups.create(layout)
        return self.groups[layout]

    def configure(self, engine, groups, attention: str) -> None:
        """Point the resident transformer at ``groups`` and ``attention``: no weights move, nothing reloads."""
        if engine.groups is groups and self.attention == attention:
            return
        engine.rebind(groups, attention)
        self.attention = attention

    # -- jobs --------------------------------------------------------------------------------------------
    def _should_cancel(self, job: int):
        """Polled by the engine at every step boundary: counts the boundary, fires a test fault, reads Cancel."""
        def poll() -> bool:
            with self._lock:
                fault = self._fault
                if fault is not None:
                    self._fault_count += 1
                    if self._fault_count >= fault.step:
                        self._fault = None
                    else:
                        fault = None
                cancelled = job in self._cancelled
            if fault is not None:
                self._fire(fault)
            self.tick += 1
            return cancelled
        return poll

    def _fire(self, fault: p.Fault) -> None:
        """Testing only (see protocol.Fault)."""
        log.warning("rank %d: injected fault %r", self.rank, fault.kind)
        if fault.kind == "raise":
            raise RuntimeError(f"injected fault on rank {self.rank}")
        if fault.kind == "exit":
            _quit(17)
        if fault.kind == "freeze":
            os.kill(os.getpid(), signal.SIGSTOP)
        if fault.kind == "hang":
            import torch
            import torch.distributed as dist

            if self.world > 1:  # a receive no peer will ever answer: stuck inside torch.distributed
                dist.recv(torch.zeros(1), src=(self.rank + 1) % self.world)
            threading.Event().wait()
        if fault.kind == "tamper":  # a frame whose bytes changed on the way: the controller must reject it
            from .channel import encode_frame

            channel = self.channel
            with channel._send_lock:
                parts = encode_frame(self.snapshot().encode(), channel._key_out, channel._send_seq)
                channel._send_seq += 1
                parts[0] = parts[0][:-1] + bytes([parts[0][-1] ^ 1])
                for part in parts:
                    channel.sock.sendall(part)
        if fault.kind == "partial":
            from .channel import encode_frame

            head = encode_frame({"op": "hb"}, b"\0" * 32, 0)[0]
            self.channel._send_lock.acquire()  # nobody else may send: the controller sees half a frame, then silence
            self.channel.sock.sendall(head[:len(head) // 2])
            os.kill(os.getpid(), signal.SIGSTOP)

    def run_generate(self, job: p.Job):
        from ..engine import CogVideoEngine
        from ..layout import Layout
        from ..memory import MemoryPlan
        from ..request import GenerationRequest

        args = job.args
        spec = p.ModelSpec.from_wire(job.model)
        groups = self.groups_for(Layout(*args["layout"]))
        if groups is None:  # a layout smaller than the pool: this rank built the groups and sits the job out
            return None
        plan = MemoryPlan.from_wire(args.get("memory")) or MemoryPlan.default(spec.memory, groups.layout.world_size)
        request = GenerationRequest(**args["request"])
        started, loads = time.perf_counter(), self.loads
        text = groups.is_leader and CogVideoEngine.needs_text(request)  # the leader encodes: T5 loads alongside,
        first = CogVideoEngine.prompt_pair(request) if text else False  # and encodes this job's prompt
        engine = self.engine_for(spec, groups.is_leader, job.id, plan, text=first)
        loaded = time.perf_counter()
        self.configure(engine, groups, spec.attention)
        engine.set_loras(spec.loras)  # merged in place: the base is never reloaded
        timings = {"job": job.id, "load_s": round(loaded - started, 3), "loaded": self.loads > loads,
                   "configure_s": round(time.perf_counter() - loaded, 3)}
        if timings["loaded"]:  # load_s in parts: transformer read, copy to the device, optimize, attention, LoRAs
            timings["load"] = dict(engine.load_timings)
        self.state, self.phase = "sampling", "sample"
        clock = {"last": time.perf_counter()}

        def on_step(step, total, latents):
            now = time.perf_counter()
            seconds, clock["last"] = now - clock["last"], now
            self.step = (step, total)
            preview = latents[0, latents.shape[1] // 2].detach().float().cpu()
            self.send(p.Event(job.id, "sample", step, total, seconds, preview))

        try:
            latents = engine.generate(request, on_step=on_step, should_cancel=self._should_cancel(job.id))
        finally:
            self.last_job = {**timings, **engine.timings}
        return latents if groups.is_leader else None

    def run_decode(self, job: p.Job):
        import torch.distributed as dist

        from ..vae_parallel import Tiling, decode_rows

        args = job.args
        spec = p.ModelSpec.from_wire(job.model)
        vae = self.vae_for(spec)
        self.state, self.phase = "decoding", "decode"
        tiling = Tiling(*args["tiling"]) if args.get("tiling") else None
        tiled = bool(args.get("tiled", True))
        group = dist.group.WORLD if self.world > 1 and not args.get("leader_only") else None
        if tiling is None and spec.memory != "fast" and self.device.type == "cuda":
            # plain decode runs on rank 0 alone: if it must be tiled to fit, rank 0 tiles alone
            tiling = self._decode_tiling(vae, args["latents"], group if tiled else None)  # None: plain fits
            tiled = tiled or tiling is not None
        clock = {"last": time.perf_counter()}

        def on_progress(step, total):
            now = time.perf_counter()
            seconds, clock["last"] = now - clock["last"], now
            self.step = (step, total)
            if self.rank == 0:
                self.send(p.Event(job.id, "decode", step, total, seconds))

        # the VAE's output in its own dtype (bf16: half the bytes of float frames); the caller makes the frames
        return decode_rows(vae, args["latents"], args.get("frames"), tiled,
                           tiling, group, on_progress, self._should_cancel(job.id))

    def _decode_tiling(self, vae, latents, group):
        """Tiles that fit what this GPU has free now (memory plans other than fast); the same on every rank of
        ``group``, since they agree on the smallest budget."""
        import torch
        import torch.distributed as dist

        from ..memory import usable
        from ..vae_parallel import fit_tiling

        free = torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_reserved(self.device) \
            - torch.cuda.memory_allocated(self.device)
        budget = torch.tensor([usable(free) + sum(p.numel() * p.element_size() for p in vae.parameters())],
                              device=self.device)
        if group is not None:
            dist.all_reduce(budget, op=dist.ReduceOp.MIN, group=group)
        return fit_tiling(vae, tuple(latents.shape[-2:]), int(budget.item()))

    def run_encode(self, job: p.Job):
        pair = (job.args["prompt"], job.args.get("negative", ""))
        engine = self.engine_for(p.ModelSpec.from_wire(job.model), True, job.id, text=pair)
        self.state, self.phase = "encoding", "encode"
        self.send(p.Event(job.id, "encode", 0, 1))
        positive, negative = engine.encode_prompt(*pair)
        self.send(p.Event(job.id, "encode", 1, 1))
        return [positive.cpu(), negative.cpu()]

    def run(self) -> None:
        from ..errors import GenerationCancelled

        handlers = {"generate": self.run_generate, "decode": self.run_decode, "encode": self.run_encode}
        self.state = "idle"
        while True:
            job = self.commands.get()
            if not isinstance(job, p.Job):
                continue
            self.job, self.step, self.tick, self.phase = job.id, (0, 0), 0, "queued"
            result, done = None, p.Done(job.id, "ok")
            try:
                result = handlers[job.kind](job)
            except GenerationCancelled:
                done.status = "cancelled"
            except Exception as error:  # reported to the caller with this rank's traceback
                log.error("rank %d: job %d failed: %s", self.rank, job.id, error)
                done.status = "error"
                done.error = vars(p.ErrorInfo.of(error, traceback.format_exc()))
            self.state, self.job, self.phase = "idle", None, ""
            with self._lock:
                self._cancelled.discard(job.id)
            if done.status != "ok":
                result = None
                self._free_cached()  # nothing of a failed job may stay cached on the device
            if result is not None:
                self.send(p.Result(job.id, result))
            self.send(self.snapshot())  # the caller's next status() sees this rank idle
            self.send(done)


def _store(welcome: p.Welcome, rank: int, world: int, timeout: timedelta):
    """The rendezvous store, its keys prefixed by this pool session.

    Local pools: a FileStore in the controller's private (0700) folder, so nothing listens on the network.
    torchrun workers: the TCP store at $MASTER_ADDR:$MASTER_PORT. Under torchrun the store outlives a restart of
    the workers (it belongs to the agents), so keys written by the previous workers would still be there; the
    controller hands out a new session on every start, which keeps each generation of workers to its own keys.
    """
    import torch.distributed as dist

    if welcome.store:
        store = dist.FileStore(welcome.store, world)
    else:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(host, port, world, is_master=rank == 0 and not agent_store, timeout=timeout,
                              multi_tenant=not agent_store)
    return dist.PrefixStore(f"xdit-cogvideo/{welcome.session}", store)


def _parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"error: --connect takes HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _connect(host: str, port: int, key: bytes, deadline: float, parent_pid: int | None) -> Channel:
    """Connect to the controller, retrying until ``deadline``; give up at once when our parent is gone."""
    while True:
        if parent_pid is not None and os.getppid() != parent_pid:
            raise SystemExit(0)  # the process that started us died before we connected: nobody to serve
        try:
            return Channel.connect(host, port, key, timeout=10.0)
        except (ConnectionRefusedError, socket.timeout, TimeoutError, ChannelClosed, OSError) as error:
            if isinstance(error, ConnectionError) and "key" in str(error):
                raise SystemExit(f"error: {error}") from None
            if time.monotonic() > deadline:
                raise SystemExit(f"error: cannot reach the pool controller at {host}:{port}: {error}") from None
            time.sleep(0.25)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m comfyui_xdit_cogvideo worker",
        description="A worker rank of the xDiT CogVideoX pool. Normally started by the pool itself; start it "
                    "with torchrun to add ranks on other hosts (see README, 'The worker pool').")
    parser.add_argument("--connect", required=True, metavar="HOST:PORT", help="the pool controller's address")
    parser.add_argument("--rank", type=int, default=None, help="global rank (default: $RANK from torchrun)")
    parser.add_argument("--world-size", type=int, default=None, help="world size (default: $WORLD_SIZE)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda:$LOCAL_RANK if CUDA)")
    parser.add_argument("--backend", choices=["nccl", "gloo"], default=None)
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--connect-timeout", type=float, default=600.0,
                        help="seconds to keep retrying the controller (default 600)")
    return parser


def _environment_defaults() -> None:
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "DIFFUSERS_VERBOSITY_PROGRESS"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a failed NCCL call ends the process


def _imports(startup: dict) -> None:
    """Everything a rank imports that needs neither its rank, its device nor the controller (and initialises no
    CUDA): done before connecting, or by a spare before it is assigned. Records imports_s and engine_imports_s."""
    _environment_defaults()
    mark = time.perf_counter()
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401

    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    except Exception:  # progress bars are cosmetic
        pass
    startup["imports_s"] = round(time.perf_counter() - mark, 3)
    mark = time.perf_counter()
    for module in ("..engine", "..vae_parallel", "..parallel.kernels"):  # not by the first job: its deadline is
        importlib.import_module(module, __package__)  # for work
    from ..loading import import_model_classes

    import_model_classes()  # diffusers' and transformers' model modules: seconds the first load_s would hide
    startup["engine_imports_s"] = round(time.perf_counter() - mark, 3)


def _gpu_imports(startup: dict) -> None:
    """A GPU spare's further imports: flash-attn-4 (its kernel probe's import; torch's CUDA runtime initialises, no
    context is made, see ``import_fast_kernels``) and the compiler's lazy imports (the first compiled block's).
    Records kernel_imports(_s) and compiler_imports_s."""
    from ..optimize import import_compiler
    from ..parallel.kernels import import_fast_kernels

    mark = time.perf_counter()
    startup["kernel_imports"] = import_fast_kernels()
    startup["kernel_imports_s"] = round(time.perf_counter() - mark, 3)
    mark = time.perf_counter()
    try:
        import_compiler()
    except Exception:  # noqa: BLE001 - the first compiled block imports it again and reports
        pass
    startup["compiler_imports_s"] = round(time.perf_counter() - mark, 3)


def _spare(argv: list[str]) -> int:
    """``--spare --parent-pid PID``: import, print the ready line, then wait for one assignment on stdin
    (a JSON line {"argv": [...], "env": {...}} from pool.spares.take) and serve as that worker. EOF: exit quietly."""
    parser = argparse.ArgumentParser(prog="python -m comfyui_xdit_cogvideo.pool.worker --spare")
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    startup = {"spawn_s": _process_age(), "prestarted": True}

    assigned = threading.Event()

    def watch_parent() -> None:  # while importing and waiting (stdin EOF only comes once we read it); once
        while not assigned.wait(0.25):  # assigned, the worker's own watchdog takes over
            if os.getppid() != args.parent_pid:
                _quit(0)

    threading.Thread(target=watch_parent, daemon=True, name="spare-watchdog").start()
    _imports(startup)
    if os.environ.get("CUDA_VISIBLE_DEVICES"):  # a GPU slot: what its first job would import, while nobody waits
        _gpu_imports(startup)
    from .spares import READY_LINE

    print(READY_LINE, flush=True)
    waited = time.perf_counter()
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # EOF: whoever started us closed our stdin or died
    try:
        assignment = json.loads(line)
        worker_argv, env = assignment["argv"], assignment["env"]
        if not (isinstance(worker_argv, list) and isinstance(env, dict)):
            raise ValueError("argv must be a list and env an object")
    except (ValueError, KeyError, TypeError) as error:
        print(f"error: bad spare assignment: {error}", file=sys.stderr)
        return 2
    assigned.set()
    startup["spare_wait_s"] = round(time.perf_counter() - waited, 3)
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in env.items()})
    _environment_defaults()
    args = _parser().parse_args(worker_argv)
    return _serve(args, startup, _target(args))


def _target(args: argparse.Namespace) -> tuple[bytes, str, int]:
    """(pool key, controller host, port); exits with a one-line error when either is unusable."""
    try:
        key = check_key(os.environ.get("XDIT_COGVIDEO_POOL_KEY", "").encode())
    except ConnectionError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    host, port = _parse_address(args.connect)
    return key, host, port


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--spare"]:
        return _spare(argv[1:])
    args = _parser().parse_args(argv)
    startup = {"spawn_s": _process_age()}  # interpreter start and our package's import, before main()
    target = _target(args)  # a missing key or a bad address fails before seconds of imports
    _imports(startup)
    return _serve(args, startup, target)


def _serve(args: argparse.Namespace, startup: dict, target: tuple[bytes, str, int]) -> int:
    """Connect to ``target`` (``_target``'s key, host, port), join the process group and run jobs (imports and
    environment defaults done: see ``_imports``)."""
    import torch
    import torch.distributed as dist

    from ..parallel.kernels import probe_kernel

    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", "0"))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    remote = args.parent_pid is None
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"[xdit-cogvideo worker {rank}] %(levelname)s %(message)s")
    key, host, port = target
    connect_deadline = time.monotonic() + args.connect_timeout
    if args.threads:  # after the imports (a spare imported under a placeholder OMP_NUM_THREADS)
        torch.set_num_threads(args.threads)
    device = args.device
    if device is None:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    backend = args.backend or ("nccl" if device.type == "cuda" else "gloo")

    # Connect only now that the slow imports are done: the pool gives each connection HANDSHAKE_TIMEOUT to say hello.
    channel = _connect(host, port, key, connect_deadline, args.parent_pid)
    channel.send(p.Hello(rank=rank, world=world, pid=os.getpid(), host=socket.gethostname(), device=str(device),
                         backend=backend, protocol=PROTOCOL, visible=os.environ.get("CUDA_VISIBLE_DEVICES")).encode())
    welcome = p.decode(channel.recv(timeout=60))
    if not isinstance(welcome, p.Welcome):
        print(f"error: the pool refused this worker: {getattr(welcome, 'reason', welcome)}", file=sys.stderr)
        return 2
    worker = Worker(channel, rank, world, str(device), backend, args.parent_pid, remote)
    worker.heartbeat = float(welcome.heartbeat)
    worker.controller_timeout = float(welcome.timeout)
    if welcome.store and not remote:
        worker.store_dir = os.path.dirname(welcome.store)
    for target in (worker._reader, worker._heartbeats, worker._watchdog):
        threading.Thread(target=target, daemon=True, name=target.__name__).start()
    worker.startup = startup
    try:
        mark = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        startup["device_init_s"] = round(time.perf_counter() - mark, 3)
        mark = time.perf_counter()
        timeout = timedelta(seconds=welcome.pg_timeout)
        # No device_id: a bound default group makes torch split every NCCL subgroup from it, and non-members of
        # a gloo subgroup then split alone and hang (see ParallelGroups.create).
        dist.init_process_group(backend, store=_store(welcome, rank, world, timeout), rank=rank, world_size=world,
                                timeout=timeout)
    except Exception as error:
        worker.send(p.Ready(False, vars(p.ErrorInfo.of(error, traceback.format_exc()))))
        time.sleep(0.5)
        return 1
    startup["process_group_s"] = round(time.perf_counter() - mark, 3)
    # The attention kernel's self-test (flash-attn's import and JIT, seconds) runs on a thread from here on, while
    # this worker waits for its first job and loads the weights; the job's engine waits for its answer.
    startup["kernel_probe"] = probe_kernel(device)

    worker.state = "idle"
    worker.send(worker.snapshot())  # before Ready, so the pool's first status already has it
    worker.send(p.Ready(True))
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
