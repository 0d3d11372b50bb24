"""Multi-host simulation: two ``torchrun`` launches (one per "host", here both on 127.0.0.1) join through a c10d
rendezvous and connect to a pool that listens for them. Same jobs as local workers; a worker that dies is
restarted by torchrun (--max-restarts) and the group rejoins the pool; shutdown ends both launches with 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from comfyui_xdit_cogvideo import GenerationRequest, Layout
from comfyui_xdit_cogvideo.engine import CogVideoEngine
from comfyui_xdit_cogvideo.pool import ModelSpec, WorkerError, WorkerPool
from comfyui_xdit_cogvideo.pool.channel import free_port

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(rdzv_port: int, pool_port: int, env: dict, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{rdzv_port}", "--rdzv-id=xdit-cogvideo-test",
               "--max-restarts=1", "--monitor-interval=0.5",
               "-m", "comfyui_xdit_cogvideo", "worker", "--connect", f"127.0.0.1:{pool_port}"]
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_two_torchrun_launches_form_one_pool(tiny_cache, tiny_path, tmp_path, monkeypatch):
    tiny_path("2b")
    monkeypatch.setenv("XDIT_COGVIDEO_POOL_KEY", "a shared secret of at least 32 bytes, the same everywhere")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    pool_port, rdzv_port = free_port(), free_port()
    pool = WorkerPool(f"listen://127.0.0.1:{pool_port}?world=2", start_timeout=150, echo_output=False)
    hosts = [_torchrun(rdzv_port, pool_port, env, tmp_path / f"host{i}.log") for i in range(2)]
    try:
        spec = ModelSpec("tiny", dtype="fp32")
        request = GenerationRequest(prompt="a cat playing piano", steps=3, seed=7)
        latents = pool.generate(spec, request, layout=Layout(1, 2, 1))
        expected = CogVideoEngine("tiny", dtype="fp32").generate(request)
        assert (latents - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
        status = pool.status()
        assert status["kind"] == "remote" and [r["rank"] for r in status["ranks"]] == [0, 1]
        first_pids = [r["pid"] for r in status["ranks"]]

        # a worker on one "host" dies mid-job: the job fails, torchrun restarts both, they rejoin the pool
        pool.inject_fault(1, "exit", step=2)
        with pytest.raises(WorkerError) as caught:
            pool.generate(spec, GenerationRequest(prompt="a cat", steps=20, seed=1))
        assert caught.value.rank == 1
        again = pool.generate(spec, request)  # the fastest layout now: cfg 2
        assert (again - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
        assert not set(first_pids) & {r["pid"] for r in pool.status()["ranks"]}

        pool.shutdown()
        codes = [host.wait(timeout=60) for host in hosts]
        assert codes == [0, 0], [(tmp_path / f"host{i}.log").read_text()[-2000:] for i in range(2)]
    finally:
        pool.shutdown()
        for host in hosts:
            if host.poll() is None:
                os.killpg(host.pid, signal.SIGKILL)
                host.wait()
