"""Prestarted workers (pool.spares): a pool takes them when their environment matches, results stay exact, and no
spare outlives the process that started it (normal exit, SIGKILL, a failed CLI check)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from comfyui_xdit_cogvideo import GenerationRequest
from comfyui_xdit_cogvideo.pool import ModelSpec, WorkerPool, prestart, shutdown_spares, spares, wait_spares

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]
SPEC = ModelSpec("tiny", dtype="fp32")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _request() -> GenerationRequest:
    return GenerationRequest(prompt="a cat playing piano", steps=3, seed=7)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _all_gone(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(_gone(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return all(_gone(pid) for pid in pids)


def _spare_pids() -> list[int]:
    with spares._LOCK:
        return [s.rank.pid for s in spares._SPARES]


def _spares_of(parent: int) -> list[int]:
    """Live spare processes started by ``parent`` (found by their command line: they are not its children for
    long once it is gone)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if "--spare" in cmd and str(parent) in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc.info["pid"])
    return found


def _job() -> tuple[torch.Tensor, dict]:
    """One job on a new cpu:2 pool: its latents and its status (read before the pool shuts down)."""
    pool = WorkerPool("cpu:2", echo_output=False)
    try:
        latents = pool.generate(SPEC, _request())
        return latents, pool.status()
    finally:
        pool.shutdown()


@pytest.fixture(autouse=True)
def _no_spares_left():
    yield
    shutdown_spares()


@pytest.fixture(scope="module")
def reference(tiny_path):
    """Latents of a cpu:2 pool that started its own workers."""
    tiny_path("2b")
    latents, status = _job()
    assert not any(r["prestarted"] for r in status["ranks"])
    assert "prestarted" not in status["startup"]
    return latents


def test_a_pool_takes_its_prestarted_spares_and_gets_the_same_latents(reference):
    assert prestart("cpu:2") == 2
    assert prestart("cpu:2") == 2  # one per slot: nothing more starts
    pids = _spare_pids()
    assert wait_spares(120)
    latents, status = _job()
    assert torch.equal(latents, reference)
    assert sorted(r["pid"] for r in status["ranks"]) == sorted(pids)
    assert all(r["prestarted"] for r in status["ranks"]), status["ranks"]
    startup = status["startup"]
    assert startup["prestarted"] is True and startup["spare_wait_s"] >= 0
    assert {"spawn_s", "imports_s", "engine_imports_s", "process_group_s"} <= set(startup), startup
    assert _spare_pids() == [] and _all_gone(pids, 10)


def test_spares_started_with_another_environment_are_killed_and_fresh_workers_run(reference, monkeypatch):
    prestart("cpu:2")
    old = _spare_pids()
    monkeypatch.setenv("XDIT_COGVIDEO_SPARE_TEST", "changed")  # not a per-assignment value: spares cannot be used
    latents, status = _job()
    assert _all_gone(old, 10)
    assert not set(old) & {r["pid"] for r in status["ranks"]}
    assert not any(r["prestarted"] for r in status["ranks"])
    assert torch.equal(latents, reference)


def test_a_dead_spare_is_replaced_by_a_fresh_worker(reference):
    prestart("cpu:2")
    assert wait_spares(120)
    dead, alive = _spare_pids()
    os.kill(dead, signal.SIGKILL)
    # dead as waitpid sees it (what the pool checks): /proc can say zombie while its other threads still exit
    proc = next(s.rank.proc for s in spares._SPARES if s.rank.pid == dead)
    proc.wait(timeout=10)
    latents, status = _job()
    ranks = status["ranks"]
    assert torch.equal(latents, reference)
    assert sorted(r["prestarted"] for r in ranks) == [False, True]
    assert alive in {r["pid"] for r in ranks} and dead not in {r["pid"] for r in ranks}



def test_a_spare_that_dies_when_taken_is_replaced_and_the_job_runs(reference, monkeypatch, caplog):
    """A spare dying between take and its hello (killed, out of memory, a crash after the handover) costs no job:
    the pool starts a fresh worker for that rank, once, and says so."""
    prestart("cpu:2")
    assert wait_spares(120)
    original, killed = spares.take, []

    def take_and_kill_rank_0(rank, **kwargs):
        entry = original(rank, **kwargs)
        if entry is not None and rank == 0:
            os.kill(entry.pid, signal.SIGKILL)
            killed.append(entry.pid)
        return entry

    monkeypatch.setattr(spares, "take", take_and_kill_rank_0)
    with caplog.at_level("WARNING", logger="comfyui_xdit_cogvideo.pool"):
        latents, status = _job()
    assert killed and killed[0] not in {r["pid"] for r in status["ranks"]}
    assert [r["prestarted"] for r in sorted(status["ranks"], key=lambda r: r["rank"])] == [False, True]
    assert torch.equal(latents, reference)
    assert any("starting a fresh worker" in r.getMessage() and f"pid {killed[0]}" in r.getMessage()
               for r in caplog.records), caplog.text

CHILD = """
import os, sys, time
from comfyui_xdit_cogvideo.pool import prestart, spares
prestart("cpu:2")
print(" ".join(str(s.rank.pid) for s in spares._SPARES), flush=True)
if sys.argv[1] == "wait":
    time.sleep(600)
"""


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_spares_never_outlive_the_process_that_started_them(how):
    child = subprocess.Popen([sys.executable, "-c", CHILD, "wait" if how == "sigkill" else "exit"], env=ENV,
                             stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in child.stdout.readline().split()]
        assert len(pids) == 2
        if how == "sigkill":
            assert not any(_gone(pid) for pid in pids)
            child.kill()
        child.wait(timeout=60)
        assert _all_gone(pids, 15), [pid for pid in pids if not _gone(pid)]
    finally:
        if child.poll() is None:
            child.kill()


def test_a_spare_exits_on_a_bad_assignment_and_its_imports_leave_cuda_alone():
    proc = subprocess.Popen([sys.executable, "-m", "comfyui_xdit_cogvideo.pool.worker", "--spare", "--parent-pid",
                             str(os.getpid())], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == spares.READY_LINE
        out, _ = proc.communicate("not json\n", timeout=60)
        assert proc.returncode == 2 and "error: bad spare assignment" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
    probe = ("import json, torch; from comfyui_xdit_cogvideo.pool.worker import _imports; s = {}; _imports(s); "
             "import sys; print(json.dumps([torch.cuda.is_initialized(), 'comfyui_xdit_cogvideo.engine' in "
             "sys.modules, sorted(s)]))")
    done = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [False, True, ["engine_imports_s", "imports_s"]]


def test_the_comfyui_hook_prestarts_only_when_asked_on_cpu(tmp_path):
    """At extension load: XDIT_COGVIDEO_PRESTART=0 starts nothing; unset, a CPU-only machine gets no spares; =1
    starts spares on CPU too (and they go with the process)."""
    code = f"""
import sys, json, threading
sys.path.insert(0, {str(ROOT / 'tests')!r})
from pathlib import Path
from comfy_stub import comfy_stubs
with comfy_stubs(Path({str(tmp_path)!r})) as c:
    c.load_package()
    threads = [t for t in threading.enumerate() if t.name == "xdit-prestart"]
    for t in threads:
        t.join(60)
    spares = sys.modules.get("comfyui_xdit_cogvideo.pool.spares")
    if spares is not None:
        spares.wait_spares(120)
    print(json.dumps({{"asked": spares is not None, "spares": 0 if spares is None else spares.count()}}))
"""
    results = {}
    for setting in ("0", None, "1"):
        env = {k: v for k, v in ENV.items() if k != "XDIT_COGVIDEO_PRESTART"}
        if setting is not None:
            env["XDIT_COGVIDEO_PRESTART"] = setting
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                              cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr
        results[setting] = json.loads(done.stdout.strip().splitlines()[-1])
    assert results == {"0": {"asked": False, "spares": 0}, None: {"asked": True, "spares": 0},
                       "1": {"asked": True, "spares": 1}}


def test_the_cli_runs_on_its_prestarted_workers_and_leaves_no_process(tiny_path, tmp_path):
    tiny_path("2b")
    out = tmp_path / "l.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "comfyui_xdit_cogvideo", "generate", "--model", "tiny",
                             "--prompt", "a cat", "--steps", "2", "--device", "cpu", "--world-size", "2",
                             "--latents-out", str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    seen: set[int] = set()
    while proc.poll() is None:  # the spares it started, while it runs
        seen.update(_spares_of(proc.pid))
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.splitlines()[-1])
    assert summary["timings"]["startup"]["prestarted"] is True, summary["timings"]
    assert len(seen) == 2 and _all_gone(list(seen), 10)

    # a command that fails its checks after prestarting: one error line, and its spares go with it
    proc = subprocess.Popen([sys.executable, "-m", "comfyui_xdit_cogvideo", "generate", "--model", "tiny",
                             "--prompt", "a cat", "--device", "cpu", "--world-size", "2", "--frames", "10",
                             "--latents-out", str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    seen.clear()
    while proc.poll() is None:
        seen.update(_spares_of(proc.pid))
        time.sleep(0.05)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and stderr.strip().startswith("error: "), stderr
    assert _all_gone(list(seen) + _spares_of(proc.pid), 10)


def test_a_spare_that_fails_on_its_own_is_dropped_with_its_reason(tmp_path, monkeypatch, caplog):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ImportError: no module named torch'\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(spares.sys, "executable", str(fake))
    prestart("cpu:1")
    pid = _spare_pids()[0]
    assert _all_gone([pid], 10)
    assert wait_spares(10)  # a dead spare is not waited for
    with caplog.at_level("WARNING", logger=spares.__name__):
        assert spares.count() == 0
        assert prestart("cpu:1") == 1  # the slot is free again (the new one fails the same way)
    assert f"spare worker (pid {pid}) exited with code 3 before it was used" in caplog.text
    assert "ImportError: no module named torch" in caplog.text


@pytest.mark.parametrize("visible,gpu_imports", [("0", True), ("", False)])
def test_only_a_spare_on_a_gpu_slot_imports_the_kernels_and_the_compiler(visible, gpu_imports, monkeypatch, capsys):
    """``_spare`` runs ``_gpu_imports`` (flash-attn-4, the compiler) when its slot has a GPU (CUDA_VISIBLE_DEVICES set
    by ``prestart``), never on a CPU slot; then it says it is ready and, on EOF, exits quietly."""
    import io

    from comfyui_xdit_cogvideo.pool import worker

    calls = []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(worker, "_imports", lambda startup: calls.append("imports"))
    monkeypatch.setattr(worker, "_gpu_imports", lambda startup: calls.append("gpu_imports"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert worker._spare(["--parent-pid", str(os.getppid())]) == 0
    assert calls == ["imports", "gpu_imports"] if gpu_imports else ["imports"]
    assert spares.READY_LINE in capsys.readouterr().out
