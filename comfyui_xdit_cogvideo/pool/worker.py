"""One rank of the worker pool: a long-lived process holding a resident CogVideoX engine.

Started by the pool (``python -m comfyui_xdit_cogvideo.pool.worker``, one process per GPU or CPU rank) or by
``torchrun`` on any host (``python -m comfyui_xdit_cogvideo worker --connect HOST:PORT``). Either way it
connects to the pool's controller, proves it holds the pool key, joins the torch.distributed world (NCCL on
GPUs, gloo on CPUs) and then runs the same jobs as every other rank, in the order the controller sends them.

Threads: the main thread runs jobs; a reader thread takes messages from the controller (jobs go to a queue,
``cancel`` sets a flag the sampler polls every step, ``exit`` ends the process even mid-collective); a heartbeat
thread reports state and memory every second; a watchdog ends the process when the parent process or the
controller disappears, so a worker never outlives the pool that started it.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import queue
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta

from .channel import EXIT_RESTART, PROTOCOL, Channel, ChannelClosed

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


class Worker:
    def __init__(self, channel: Channel, rank: int, world: int, device: str, backend: str,
                 parent_pid: int | None, remote: bool):
        import torch

        self.channel = channel
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self.backend = backend
        self.parent_pid = parent_pid
        self.remote = remote
        self.commands: queue.Queue = queue.Queue()
        self.state = "starting"
        self.job: int | None = None
        self.step = (0, 0)
        self.engine = None
        self.engine_key = None
        self.attention: str | None = None
        self.groups: dict = {}
        self.vae = None
        self.vae_key = None
        self.loads = 0
        self.vae_loads = 0
        self.heartbeat = 1.0
        self.controller_timeout = 60.0
        self.last_rx = time.monotonic()
        self._cancelled: set[int] = set()
        self._fault: dict | None = None
        self.exit_code: int | None = None
        self._lock = threading.Lock()

    # -- threads -----------------------------------------------------------------------------------------
    def _send(self, message) -> None:
        try:
            self.channel.send(message)
        except ChannelClosed:
            self._lost("controller connection closed")

    def _lost(self, why: str) -> None:
        if self.exit_code is not None:  # asked to exit; the controller may close first
            os._exit(self.exit_code)
        log.warning("rank %d: %s; exiting", self.rank, why)
        os._exit(EXIT_RESTART if self.remote else 0)

    def _reader(self) -> None:
        while True:
            try:
                message = self.channel.recv()
            except ChannelClosed:
                self._lost("controller connection closed")
            self.last_rx = time.monotonic()
            op = message.get("op")
            if op == "ping":
                continue
            if op == "cancel":
                with self._lock:
                    self._cancelled.add(message["id"])
            elif op == "fault":
                with self._lock:
                    self._fault = dict(message, count=0)
            elif op == "exit":
                code = self.exit_code = int(message.get("code", 0))
                self.commands.put(message)
                if self.state != "idle":
                    # The main thread is inside a job (perhaps blocked in a collective whose peer is gone).
                    threading.Timer(3.0, os._exit, (code,)).start()
                return
            else:
                self.commands.put(message)

    def _heartbeats(self) -> None:
        while True:
            time.sleep(self.heartbeat)
            try:
                self._send(self.snapshot())
            except Exception:  # a snapshot racing a model swap must not end the heartbeats (the pool would
                log.exception("rank %d: heartbeat failed", self.rank)  # then declare this rank frozen)

    def _watchdog(self) -> None:
        while True:
            time.sleep(0.5)
            if self.exit_code is not None:
                continue
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.warning("rank %d: parent process %d is gone; exiting", self.rank, self.parent_pid)
                os._exit(0)
            if time.monotonic() - self.last_rx > self.controller_timeout:
                self._lost(f"no message from the controller for {self.controller_timeout:.0f} s")

    def snapshot(self) -> dict:
        model = layout = None
        engine, key = self.engine, self.engine_key  # read once: a job thread may swap them meanwhile
        if engine is not None and key is not None:
            path, vae, text_encoder, dtype = key
            model = {"path": path, "vae": vae, "text_encoder": text_encoder, "dtype": dtype,
                     "attention": self.attention, "variant": engine.info.variant}
            lay = engine.groups.layout
            layout = [lay.cfg, lay.ulysses, lay.ring]
        return {"op": "hb", "rank": self.rank, "state": self.state, "job": self.job, "step": list(self.step),
                "memory": _memory(self.device), "model": model, "layout": layout, "loads": self.loads,
                "vae_loads": self.vae_loads}

    # -- resident state ----------------------------------------------------------------------------------
    def _free_engine(self) -> None:
        import torch

        self.engine = self.engine_key = self.attention = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def engine_for(self, spec: dict, report: bool, job: int):
        """The resident engine for ``spec``, loading it only when the weights or dtype changed."""
        from ..engine import CogVideoEngine
        from ..loading import ModelSource
        from ..parallel import ParallelGroups

        key = (spec["path"], spec.get("vae"), spec.get("text_encoder"), spec["dtype"])
        if self.engine is not None and self.engine_key == key:
            return self.engine
        self._free_engine()
        if self.vae_key is not None and self.vae_key != key:
            self.vae = self.vae_key = None
        previous, self.state = self.state, "loading"
        if report:
            self._send({"op": "event", "id": job, "phase": "load", "step": 0, "total": 1})
        source = ModelSource(spec["path"], vae=spec.get("vae"), text_encoder=spec.get("text_encoder"))
        engine = CogVideoEngine(source, dtype=spec["dtype"], device=self.device, groups=ParallelGroups.single(),
                                attention=spec["attention"])
        if self.vae is not None and engine.loaded_vae is None:
            engine.attach_vae(self.vae)  # share the decode VAE with the sampler (I2V encodes its image with it)
        self.engine, self.engine_key, self.attention = engine, key, spec["attention"]
        self.loads += 1
        self.state = previous
        if report:
            self._send({"op": "event", "id": job, "phase": "load", "step": 1, "total": 1})
        return engine

    def vae_for(self, spec: dict):
        from ..loading import ModelSource, load_vae, parse_dtype, read_model_info

        key = (spec["path"], spec.get("vae"), spec.get("text_encoder"), spec["dtype"])
        if self.vae is not None and self.vae_key == key:
            return self.vae
        if self.engine is not None and self.engine_key == key and self.engine.loaded_vae is not None:
            self.vae, self.vae_key = self.engine.loaded_vae, key
            return self.vae
        self.vae = self.vae_key = None
        gc.collect()
        source = ModelSource(spec["path"], vae=spec.get("vae"), text_encoder=spec.get("text_encoder"))
        vae = load_vae(source.resolve(), parse_dtype(spec["dtype"]), self.device, read_model_info(source))
        self.vae, self.vae_key = vae, key
        self.vae_loads += 1
        if self.engine is not None and self.engine_key == key and self.engine.loaded_vae is None:
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
        def poll() -> bool:
            with self._lock:
                fault = self._fault
                if fault is not None:
                    fault["count"] += 1
                    if fault["count"] >= fault.get("step", 1):
                        self._fault = None
                        self._fire(fault)
                return job in self._cancelled
        return poll

    def _fire(self, fault: dict) -> None:
        kind = fault.get("kind")
        log.warning("rank %d: injected fault %r", self.rank, kind)
        if kind == "raise":
            raise RuntimeError(f"injected fault on rank {self.rank}")
        if kind == "exit":
            os._exit(17)
        if kind == "freeze":
            import signal

            os.kill(os.getpid(), signal.SIGSTOP)

    def run_generate(self, message: dict):
        from ..layout import Layout
        from ..request import GenerationRequest

        job = message["id"]
        groups = self.groups_for(Layout(*message["layout"]))
        if groups is None:
            return None
        engine = self.engine_for(message["model"], groups.is_leader, job)
        self.configure(engine, groups, message["model"]["attention"])
        request = GenerationRequest(**message["request"])
        self.state = "sampling"
        clock = {"last": time.perf_counter()}

        def on_step(step, total, latents):
            now = time.perf_counter()
            seconds, clock["last"] = now - clock["last"], now
            self.step = (step, total)
            preview = latents[0, latents.shape[1] // 2].detach().float().cpu()
            self._send({"op": "event", "id": job, "phase": "sample", "step": step, "total": total,
                        "seconds_per_step": seconds, "preview": preview})

        latents = engine.generate(request, on_step=on_step, should_cancel=self._should_cancel(job))
        return latents if groups.is_leader else None

    def run_decode(self, message: dict):
        import torch.distributed as dist

        from ..vae_parallel import Tiling, decode_latents

        job = message["id"]
        vae = self.vae_for(message["model"])
        self.state = "decoding"
        tiling = Tiling(*message["tiling"]) if message.get("tiling") else None
        clock = {"last": time.perf_counter()}

        def on_progress(step, total):
            now = time.perf_counter()
            seconds, clock["last"] = now - clock["last"], now
            self.step = (step, total)
            if self.rank == 0:
                self._send({"op": "event", "id": job, "phase": "decode", "step": step, "total": total,
                            "seconds_per_step": seconds})

        group = dist.group.WORLD if self.world > 1 else None
        return decode_latents(vae, message["latents"], message.get("frames"), bool(message.get("tiled", True)),
                              tiling, group, on_progress, self._should_cancel(job))

    def run_encode(self, message: dict):
        job = message["id"]
        engine = self.engine_for(message["model"], True, job)
        self.state = "encoding"
        self._send({"op": "event", "id": job, "phase": "encode", "step": 0, "total": 1})
        positive, negative = engine.encode_prompt(message["prompt"], message.get("negative", ""))
        self._send({"op": "event", "id": job, "phase": "encode", "step": 1, "total": 1})
        return [positive.cpu(), negative.cpu()]

    def run(self) -> int:
        from ..engine import GenerationCancelled

        handlers = {"generate": self.run_generate, "decode": self.run_decode, "encode": self.run_encode}
        self.state = "idle"
        while True:
            message = self.commands.get()
            if message["op"] == "exit":
                return int(message.get("code", 0))
            if message["op"] != "job":
                continue
            job = message["id"]
            self.job, self.step = job, (0, 0)
            result, done = None, {"op": "done", "id": job, "status": "ok"}
            try:
                result = handlers[message["kind"]](message)
            except GenerationCancelled:
                done["status"] = "cancelled"
            except Exception as error:  # reported to the caller with this rank's traceback
                log.error("rank %d: job %d failed: %s", self.rank, job, error)
                done.update(status="error", type=type(error).__name__, message=str(error),
                            traceback=traceback.format_exc())
            self.state, self.job = "idle", None
            with self._lock:
                self._cancelled.discard(job)
            if result is not None:
                self._send({"op": "result", "id": job, "value": result})
            self._send(self.snapshot())  # the caller's next status() sees this rank idle
            self._send(done)


def _store(rank: int, world: int, timeout: timedelta, session: str):
    """The rendezvous store at $MASTER_ADDR:$MASTER_PORT, its keys prefixed by this pool session.

    Under torchrun the store outlives a restart of the workers (it belongs to the agents), so keys written by
    the previous workers (their addresses) would still be there; the controller hands out a new session on
    every start, which keeps each generation of workers to its own keys.
    """
    import torch.distributed as dist

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(host, port, world, is_master=rank == 0 and not agent_store, timeout=timeout,
                          multi_tenant=not agent_store)
    return dist.PrefixStore(f"xdit-cogvideo/{session}", store)


def _parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"error: --connect takes HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _connect(host: str, port: int, key: bytes, deadline: float) -> Channel:
    while True:
        try:
            return Channel.connect(host, port, key)
        except (ConnectionRefusedError, socket.timeout, OSError) as error:
            if isinstance(error, ConnectionError) and "key" in str(error):
                raise
            if time.monotonic() > deadline:
                raise SystemExit(f"error: cannot reach the pool controller at {host}:{port}: {error}") from None
            time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--pg-timeout", type=float, default=1800.0, help="torch.distributed timeout in seconds")
    args = parser.parse_args(argv)

    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", "0"))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    remote = args.parent_pid is None
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"[xdit-cogvideo worker {rank}] %(levelname)s %(message)s")
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "DIFFUSERS_VERBOSITY_PROGRESS"):
        os.environ.setdefault(name, "1")
    key = os.environ.get("XDIT_COGVIDEO_POOL_KEY", "").encode()
    host, port = _parse_address(args.connect)
    channel = _connect(host, port, key, time.monotonic() + args.connect_timeout)

    import torch
    import torch.distributed as dist

    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    except Exception:  # progress bars are cosmetic
        pass
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device is None:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    backend = args.backend or ("nccl" if device.type == "cuda" else "gloo")

    channel.send({"op": "hello", "rank": rank, "world": world, "pid": os.getpid(), "host": socket.gethostname(),
                  "device": str(device), "backend": backend, "protocol": PROTOCOL,
                  "visible": os.environ.get("CUDA_VISIBLE_DEVICES")})
    welcome = channel.recv(timeout=60)
    if welcome.get("op") != "welcome":
        print(f"error: the pool refused this worker: {welcome.get('reason', welcome)}", file=sys.stderr)
        return 2
    worker = Worker(channel, rank, world, str(device), backend, args.parent_pid, remote)
    worker.heartbeat = float(welcome.get("heartbeat", 1.0))
    worker.controller_timeout = float(welcome.get("timeout", 60.0))
    for target in (worker._reader, worker._heartbeats, worker._watchdog):
        threading.Thread(target=target, daemon=True, name=target.__name__).start()
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=args.pg_timeout)
        # No device_id: a bound default group makes torch split every NCCL subgroup from it, and non-members of
        # a gloo subgroup then split alone and hang (see ParallelGroups.create).
        dist.init_process_group(backend, store=_store(rank, world, timeout, str(welcome.get("session", ""))),
                                rank=rank, world_size=world, timeout=timeout)
    except Exception as error:
        channel.send({"op": "ready", "ok": False, "type": type(error).__name__, "message": str(error),
                      "traceback": traceback.format_exc()})
        time.sleep(0.5)
        return 1
    worker.state = "idle"
    channel.send(worker.snapshot())  # before "ready", so the pool's first status already has it
    channel.send({"op": "ready", "ok": True})
    code = worker.run()
    worker.state = "exiting"
    finisher = threading.Thread(target=dist.destroy_process_group, daemon=True)
    finisher.start()
    finisher.join(5.0)
    channel.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
