"""Run a function on N gloo ranks in fresh processes and collect what each returns (as numpy).

The ranks start from a fork server that imported torch, diffusers and the engine once per test session: a
spawned rank imported them again (about 4 s of CPU each), which on CI's two cores made the rank worlds' start-up a
large share of the suite. Each rank then takes the caller's current environment (a fork server's is the one it
started with), so a test's ``monkeypatch.setenv`` still reaches its ranks."""

from __future__ import annotations

import os
import queue as queue_module
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What every rank imports, once in the fork server (the engine brings torch's compiler; diffusers' CogVideoX
# pipeline brings transformers' T5). The fork server starts in the first run_world call, under that test's
# environment: settings read at import time come from it (OMP_NUM_THREADS: every rank sets its thread count
# itself). Those the tests change (TORCHINDUCTOR_CACHE_DIR, XDIT_COGVIDEO_*) are read when used, from the
# environment each rank restores from its caller.
PRELOAD = ["torch.distributed", "comfyui_xdit_cogvideo.engine", "diffusers.pipelines.cogvideo.pipeline_cogvideox",
           "transformers.models.t5.modeling_t5"]


def _entry(rank, world, port, fn, args, queue, environ):
    os.environ.clear()
    os.environ.update(environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, fn(rank, *args), None))
    except BaseException:
        queue.put((rank, None, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def run_world(world: int, fn, *args, timeout: float = 600):
    """``fn(rank, *args)`` on ``world`` gloo ranks; returns the list of results by rank.

    Results must be picklable by value (convert tensors with ``.numpy()``). A rank that fails, dies or
    outlives ``timeout`` fails the run and every process is killed, so a test never hangs.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue, dict(os.environ)), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors, received = [None] * world, [], 0
    deadline = time.monotonic() + timeout
    try:
        while received < world and time.monotonic() < deadline:
            try:
                rank, value, error = queue.get(timeout=1.0)
            except queue_module.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
                continue
            received += 1
            results[rank] = value
            if error:
                errors.append(f"rank {rank}:\n{error}")
                break
        for p in procs:
            p.join(max(0.1, min(30, deadline - time.monotonic())))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors or received < world or any(p.exitcode for p in procs):
        raise RuntimeError("distributed run failed: " + ("\n".join(errors) or
                           f"{received}/{world} results, exit codes {[p.exitcode for p in procs]}"))
    return results
