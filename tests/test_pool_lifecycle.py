"""Pool plumbing that needs no model: the channel, the worker environment, the singleton, and workers that
stop when the process that started them dies (SIGKILL) or is told to stop (SIGTERM through our handler)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch

from comfyui_xdit_cogvideo.pool import get_pool, shutdown_pool, worker_environment
from comfyui_xdit_cogvideo.pool.channel import AuthError, Channel, ChannelClosed
from channels import channel_pair

pytestmark = pytest.mark.timeout(180)


def test_channel_round_trips_plain_values_and_tensors():
    a, b = channel_pair(b"k", b"k")
    message = {
        "op": "job", "id": 3, "nested": [1, 2.5, None, True, ("t", b"raw")],
        "f32": torch.randn(2, 3), "bf16": torch.randn(4, 5).bfloat16(), "i64": torch.arange(7),
        "bool": torch.tensor([True, False]), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3),
        "strided": torch.randn(4, 6)[:, ::2],
    }
    a.send(message)
    got = b.recv(timeout=5)
    for key in ("f32", "bf16", "i64", "bool", "scalar", "empty", "strided"):
        assert got[key].dtype == message[key].dtype and torch.equal(got[key], message[key]), key
    assert got["nested"] == [1, 2.5, None, True, ("t", b"raw")] and got["id"] == 3
    big = torch.randn(9, 32, 48, 3)
    b.send({"value": big})
    assert torch.equal(a.recv(timeout=5)["value"], big)
    with pytest.raises(TypeError, match="plain values and tensors only"):
        a.send({"obj": object()})
    with pytest.raises(TimeoutError):
        b.recv(timeout=0.05)
    a.close()
    with pytest.raises(ChannelClosed):
        b.recv(timeout=5)
    b.close()


def test_channel_refuses_a_wrong_key():
    server_side, client_side = channel_pair(b"right", b"wrong")
    assert isinstance(server_side, AuthError) or isinstance(client_side, AuthError)
    for end in (server_side, client_side):
        if isinstance(end, Channel):
            end.close()


def test_channel_never_unpickles_classes():
    import pickle

    from comfyui_xdit_cogvideo.pool.channel import _restricted_loads

    with pytest.raises(pickle.UnpicklingError, match="no classes"):
        _restricted_loads(pickle.dumps(os.system), [])


def test_worker_environment_is_chosen_not_inherited():
    base = {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync,expandable_segments:True", "NCCL_NVLS_ENABLE": "0",
            "NCCL_DEBUG": "WARN", "RANK": "5", "LOCAL_RANK": "5", "TORCHELASTIC_RUN_ID": "x", "PATH": "/bin",
            "PYTHONPATH": "/elsewhere", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    env = worker_environment(base, rank=1, world_size=2, gpu="3", master_port=12345, threads=4, key="abc")
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["NCCL_DEBUG"] == "WARN" and env["PATH"] == "/bin"
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["RANK"] == "1" and env["LOCAL_RANK"] == "1"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "12345" and env["WORLD_SIZE"] == "2"
    assert "TORCHELASTIC_RUN_ID" not in env and env["OMP_NUM_THREADS"] == "4"
    assert env["PYTHONPATH"].split(os.pathsep)[1] == "/elsewhere"
    only_async = worker_environment({"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}, rank=0, world_size=1,
                                    gpu=None, master_port=1, threads=1, key="k")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in only_async and only_async["CUDA_VISIBLE_DEVICES"] == ""


def test_get_pool_is_a_singleton_per_device_set():
    try:
        first = get_pool("cpu:1")
        assert get_pool("cpu:1") is first and get_pool(" CPU:1 ") is first
        second = get_pool("cpu:2")
        assert second is not first and first.status()["state"] == "stopped"
        with pytest.raises(Exception, match="shut down"):
            first.start()
    finally:
        shutdown_pool()


_PARENT = textwrap.dedent("""
    import json, sys, time
    from comfyui_xdit_cogvideo.pool import get_pool
    pool = get_pool("cpu:2", echo_output=False).start()
    print(json.dumps([r["pid"] for r in pool.status()["ranks"]]), flush=True)
    time.sleep(600)
""")


def _wait_gone(pids, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.2)
    return alive


def test_workers_stop_when_their_parent_is_killed_or_terminated(tiny_cache, tmp_path):
    """SIGKILL: nothing runs in the parent, the workers notice it is gone. SIGTERM: our handler stops them and
    the process still dies of SIGTERM (the default action it had before). Either way the pool's rendezvous
    folder goes too."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_root()), os.environ.get("PYTHONPATH", "")]))
    temps = {sig: tmp_path / sig.name for sig in (signal.SIGKILL, signal.SIGTERM)}
    for folder in temps.values():
        folder.mkdir()
    parents = {sig: subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True,
                                     env=dict(env, TMPDIR=str(temps[sig])))
               for sig in (signal.SIGKILL, signal.SIGTERM)}
    try:
        workers = {sig: json.loads(proc.stdout.readline()) for sig, proc in parents.items()}
        for sig, proc in parents.items():
            assert len(workers[sig]) == 2 and all(psutil.pid_exists(p) for p in workers[sig])
            os.kill(proc.pid, sig)
        for sig, proc in parents.items():
            assert proc.wait(timeout=30) == -sig
            assert _wait_gone(workers[sig], 15) == [], f"workers outlived a parent killed by {sig!r}"
            assert not list(temps[sig].glob("xdit-cogvideo-pool-*")), f"rendezvous folder left after {sig!r}"
    finally:
        for proc in parents.values():
            if proc.poll() is None:
                proc.kill()
        for pids in locals().get("workers", {}).values():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


_EARLY = textwrap.dedent("""
    import json, sys, threading, time
    from comfyui_xdit_cogvideo.pool import WorkerPool
    pool = WorkerPool("cpu:2", echo_output=False)
    threading.Thread(target=pool.start, daemon=True).start()
    while len(pool._ranks) < 2:
        time.sleep(0.001)
    print(json.dumps([r.pid for r in pool._ranks]), flush=True)  # spawned, still importing: not connected yet
    time.sleep(600)
""")


def test_workers_killed_before_they_connect_do_not_linger(tiny_cache):
    """The parent dies (kill -9) in the second between spawning the workers and their connecting: they must not
    wait out their connect timeout (600 s) as orphans."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_root()), os.environ.get("PYTHONPATH", "")]))
    parent = subprocess.Popen([sys.executable, "-c", _EARLY], stdout=subprocess.PIPE, env=env, text=True)
    workers = []
    try:
        workers = json.loads(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        assert _wait_gone(workers, 60) == [], "workers outlived a parent killed before they connected"
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_connected_workers_exit_within_a_second(tiny_cache):
    from comfyui_xdit_cogvideo.pool import WorkerPool

    pool = WorkerPool("cpu:2", echo_output=False).start()
    pids = [r["pid"] for r in pool.status()["ranks"]]
    began = time.monotonic()
    pool.shutdown()
    took = time.monotonic() - began
    assert _wait_gone(pids, 0.1) == [] and took < 1.0, f"shutdown took {took:.2f} s"


def test_a_worker_that_dies_while_starting_says_why(tiny_cache, monkeypatch):
    """The error names the rank, how it ended and the lines that explain it -- never a cut-off 'while starting:'."""
    from comfyui_xdit_cogvideo.pool import PoolError, WorkerPool, controller

    real = controller.spawn
    monkeypatch.setattr(controller, "spawn", lambda *a, **k: real(*a, **dict(k, threads="many")))
    pool = WorkerPool("cpu:1", echo_output=False)
    with pytest.raises(PoolError) as caught:
        pool.start()
    message = str(caught.value)
    assert "worker rank 0 (cpu" in message and "exited with code 2 while starting:" in message
    assert "argument --threads: invalid int value: 'many'" in message
    pool.shutdown()


def test_crash_output_leaves_warnings_out():
    from comfyui_xdit_cogvideo.pool.launch import error_lines

    lines = ["/x/torch/jit/_script.py:1491: FutureWarning: `torch.jit.script` is deprecated.",
             "  warnings.warn(",
             "[xdit-cogvideo worker 1] INFO joined",
             "Traceback (most recent call last):",
             '  File "w.py", line 3, in <module>',
             "RuntimeError: CUDA error: an illegal memory access was encountered"]
    assert error_lines(lines) == "\n".join(lines[3:])


def test_a_failed_monitor_stops_the_pool_and_the_next_job_restarts_it(tiny_cache, monkeypatch):
    from comfyui_xdit_cogvideo import GenerationRequest
    from comfyui_xdit_cogvideo.pool import ModelSpec, WorkerPool, controller

    real = controller.WorkerPool._watch

    def broken(self, generation):
        raise RuntimeError("monitor bug")

    monkeypatch.setattr(controller.WorkerPool, "_watch", broken)
    pool = WorkerPool("cpu:1", echo_output=False).start()
    first = [r["pid"] for r in pool.status()["ranks"]]
    deadline = time.monotonic() + 30
    while pool.status()["state"] != "stopped" and time.monotonic() < deadline:
        time.sleep(0.05)
    status = pool.status()
    assert status["state"] == "stopped" and "monitor failed (RuntimeError: monitor bug)" in status["last_error"]
    assert _wait_gone(first, 10) == []
    monkeypatch.setattr(controller.WorkerPool, "_watch", real)
    embeds = torch.zeros(1, 226, 32)
    pool.generate(ModelSpec("tiny", "fp32"), GenerationRequest(prompt_embeds=embeds, negative_prompt_embeds=embeds,
                                                               steps=1))
    assert pool.status()["starts"] == 2 and pool.status()["state"] == "idle"
    pool.shutdown()
