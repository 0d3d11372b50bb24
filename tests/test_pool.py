"""The worker pool on two gloo CPU ranks: resident models, progress, cancel, failures, parallel decode.

One pool serves the whole module (starting one costs a few seconds on a 2-core CI machine); the tests that
break it (a raising worker, kill -9) run last and each checks that the next job gets a fresh, working pool.
"""

from __future__ import annotations

import json
import os
import threading
import time

import psutil
import pytest
import torch

from comfyui_xdit_cogvideo import GenerationRequest, Layout, LayoutError, ModelError, RequestError
from comfyui_xdit_cogvideo.engine import CogVideoEngine, GenerationCancelled
from comfyui_xdit_cogvideo.pool import ModelSpec, PoolError, ProgressEvent, WorkerError, WorkerPool, parse_devices
from comfyui_xdit_cogvideo.vae_parallel import Tiling, decode_latents

pytestmark = pytest.mark.timeout(240)

SPEC = ModelSpec("tiny", dtype="fp32")
REL_TOL = 1e-4


def _request(**kwargs) -> GenerationRequest:
    base = dict(prompt="a cat playing piano", steps=3, seed=7)
    base.update(kwargs)
    return GenerationRequest(**base)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = REL_TOL) -> bool:
    return (a.float() - b.float()).abs().max().item() <= rel * max(b.float().abs().max().item(), 1e-6)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def engine(tiny_cache):
    return CogVideoEngine("tiny", dtype="fp32")


class ListenWatch:
    """Samples every socket the pool's worker processes listen on, from before their start to the end of the
    module (start, jobs, layout changes, restarts): a local pool must be reachable from this machine only."""

    LOOPBACK = ("127.", "::1", "::ffff:127.")

    def __init__(self, pool):
        self.pool, self.seen, self.samples, self.outside = pool, set(), 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            with self.pool._lock:
                pids = [r.pid for r in self.pool._ranks if r.pid]
            for pid in pids:
                try:
                    process = psutil.Process(pid)
                    for proc in [process, *process.children(recursive=True)]:
                        for conn in proc.net_connections(kind="inet"):
                            if conn.status == psutil.CONN_LISTEN:
                                self.seen.add(conn.laddr.ip)
                                if not conn.laddr.ip.startswith(self.LOOPBACK):
                                    self.outside.append((pid, conn.laddr))
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                self.samples += 1
            time.sleep(0.05)

    def stop(self):
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def pool(tiny_cache, tiny_path):
    tiny_path("2b")  # build the model once here, not in two workers at the same time
    pool = WorkerPool("cpu:2", echo_output=False, heartbeat_timeout=20)
    pool.listen_watch = ListenWatch(pool)
    yield pool
    pids = [r["pid"] for r in pool.status()["ranks"]]
    pool.shutdown()
    pool.listen_watch.stop()
    assert all(_gone(pid) for pid in pids)


def test_bad_input_is_rejected_before_any_worker_starts(tiny_cache):
    pool = WorkerPool("cpu:2", echo_output=False)
    with pytest.raises(RequestError, match="4k\\+1"):
        pool.generate(SPEC, _request(frames=10))
    with pytest.raises(RequestError, match="multiple of 16"):
        pool.generate(SPEC, _request(height=40))
    with pytest.raises(LayoutError, match="does not divide the model's 6 attention heads"):
        pool.generate(SPEC, _request(), layout=Layout(1, 4, 1))
    with pytest.raises(LayoutError, match="needs 3 ranks, but the pool has 2"):
        pool.generate(SPEC, _request(), layout=Layout(1, 3, 1))
    with pytest.raises(LayoutError, match="cfg degree 2 needs classifier-free guidance"):
        pool.generate(SPEC, _request(guidance=1.0), layout=Layout(2, 1, 1))
    with pytest.raises(ModelError, match="does not exist"):
        pool.generate(ModelSpec("/nonexistent/model"), _request())
    with pytest.raises(ModelError, match="unknown dtype"):
        pool.generate(ModelSpec("tiny", dtype="fp8"), _request())
    with pytest.raises(ModelError, match="unknown attention"):
        pool.generate(ModelSpec("tiny", attention="nope"), _request())
    with pytest.raises(RequestError, match="latents must be"):
        pool.decode(SPEC, torch.zeros(1, 3, 16, 4, 6))
    with pytest.raises(RequestError, match="embeds must have shape"):
        pool.generate(SPEC, GenerationRequest(prompt_embeds=torch.zeros(1, 77, 32), steps=2))
    status = pool.status()
    assert status["state"] == "stopped" and status["ranks"] == [] and status["starts"] == 0
    pool.shutdown()


def test_device_strings(monkeypatch):
    from comfyui_xdit_cogvideo.pool import devices

    monkeypatch.setattr(devices, "cpu_count", lambda: 3)
    assert parse_devices("cpu:3").world_size == 3 and parse_devices("cpu").backend == "gloo"
    remote = parse_devices("listen://0.0.0.0:29600?world=8")
    assert remote.kind == "remote" and remote.world_size == 8 and remote.address == ("0.0.0.0", 29600)
    for bad, message in (("cpu:0", "cpu:N"), ("listen://host", "listen://HOST:PORT"), ("a,b", "cannot parse"),
                         ("cpu:4", "asks for 4 CPU ranks, but this process may use 3 CPU core"),
                         ("cpu:100000", "use cpu:1 to cpu:3"),
                         ("listen://0.0.0.0:29600?world=100000", "world must be 1..1024")):
        with pytest.raises(PoolError, match=message):
            parse_devices(bad)
    # a workflow may not open the pool to other hosts unless this host opted in
    monkeypatch.delenv("XDIT_COGVIDEO_ALLOW_LISTEN", raising=False)
    with pytest.raises(PoolError, match="XDIT_COGVIDEO_ALLOW_LISTEN=1"):
        parse_devices("listen://127.0.0.1:29600?world=2", from_workflow=True)
    assert parse_devices("cpu:2", from_workflow=True).world_size == 2
    monkeypatch.setenv("XDIT_COGVIDEO_ALLOW_LISTEN", "1")
    assert parse_devices("listen://127.0.0.1:29600?world=2", from_workflow=True).kind == "remote"
    if not torch.cuda.is_available():
        assert parse_devices("auto") == parse_devices("cpu:1")
        with pytest.raises(PoolError, match="no CUDA GPU"):
            parse_devices("0,1")


def test_generate_equals_in_process_engine_and_keeps_the_model_resident(pool, engine):
    events: list[ProgressEvent] = []
    first = pool.generate(SPEC, _request(), on_event=events.append)
    expected = engine.generate(_request())
    assert first.shape == expected.shape == (1, 3, 4, 4, 6)
    assert _close(first, expected)
    phases = [(e.phase, e.step, e.total) for e in events]
    assert phases == [("load", 0, 1), ("load", 1, 1), ("sample", 1, 3), ("sample", 2, 3), ("sample", 3, 3)]
    samples = [e for e in events if e.phase == "sample"]
    assert all(e.seconds_per_step is not None and e.seconds_per_step > 0 for e in samples)
    assert all(e.preview is not None and tuple(e.preview.shape) == (4, 4, 6) for e in samples)
    assert pool.status()["loads"] == 1

    # a second job with another layout, seed and step count: no reload, only new process groups
    events.clear()
    second = pool.generate(SPEC, _request(seed=11, steps=4), layout=Layout(1, 1, 2), on_event=events.append)
    assert [(e.phase, e.step) for e in events] == [("sample", i) for i in range(1, 5)]
    assert _close(second, engine.generate(_request(seed=11, steps=4)))
    status = pool.status()
    assert status["loads"] == 1 and all(r["loads"] == 1 for r in status["ranks"])
    assert status["layout"] == [1, 1, 2]


def test_a_layout_smaller_than_the_pool_runs_on_its_ranks_alone(pool, engine):
    """One rank of two (seen failing on two H200s: the idle rank dereferenced groups it is not part of)."""
    alone = pool.generate(SPEC, _request(seed=5, steps=2), layout=Layout(1, 1, 1))
    assert _close(alone, engine.generate(_request(seed=5, steps=2)))
    assert pool.status()["layout"] == [1, 1, 1]
    both = pool.generate(SPEC, _request(seed=5, steps=2), layout=Layout(2, 1, 1))  # every rank again, same pool
    assert _close(both, alone)


def test_attention_change_rebinds_and_a_model_change_reloads(pool, engine, tiny_path):
    pool.generate(SPEC, _request(steps=1))
    loads = pool.status()["loads"]
    math = pool.generate(ModelSpec("tiny", "fp32", attention="math"), _request(steps=2))
    assert pool.status()["loads"] == loads and pool.status()["model"]["attention"] == "math"
    assert _close(math, engine.generate(_request(steps=2)))
    # another model (image-to-video, with a start image): reloaded once, equal to the in-process engine
    tiny_path("5b-i2v")
    image = torch.rand(32, 48, 3, generator=torch.Generator().manual_seed(1))
    request = _request(image=image, steps=2)
    i2v = pool.generate(ModelSpec("tiny-5b-i2v", "fp32"), request)
    assert pool.status()["loads"] == loads + 1 and pool.status()["model"]["path"] == "tiny-5b-i2v"
    reference = CogVideoEngine("tiny-5b-i2v", dtype="fp32").generate(request)
    assert _close(i2v, reference)
    pool.generate(SPEC, _request(steps=1))
    assert pool.status()["loads"] == loads + 2


def test_before_job_hook_runs_before_every_job(pool):
    calls = []
    pool.before_job = calls.append
    try:
        pool.generate(SPEC, _request(steps=1))
        pool.encode_prompt(SPEC, "a cat")
    finally:
        pool.before_job = None
    assert calls == [pool.devices, pool.devices]


def test_status_is_a_json_snapshot(pool):
    pool.start()
    status = json.loads(json.dumps(pool.status()))
    assert status["world_size"] == 2 and status["backend"] == "gloo" and status["devices"] == "cpu:2"
    assert status["state"] == "idle" and status["job"] is None and status["last_error"] is None
    assert [r["rank"] for r in status["ranks"]] == [0, 1]
    for rank in status["ranks"]:
        assert psutil.pid_exists(rank["pid"]) and rank["pid"] != os.getpid()
        assert rank["device"] == "cpu" and rank["state"] == "idle"
        assert rank["memory"]["rss"] > 0
    assert status["model"]["path"] == "tiny" and status["model"]["dtype"] == "fp32"


def test_status_reports_the_running_job(pool):
    seen = []

    def on_event(event):
        if event.phase == "sample" and event.step == 2:
            seen.append(pool.status())  # status() must answer while a job runs

    pool.generate(SPEC, _request(steps=4), on_event=on_event)
    assert seen and seen[0]["state"] == "busy"
    assert seen[0]["job"]["kind"] == "generate" and seen[0]["job"]["step"] == 2 and seen[0]["job"]["total"] == 4


def test_cancel_stops_within_a_step_and_the_next_job_runs(pool, engine):
    pool.generate(SPEC, _request(steps=1))
    pids, loads = [r["pid"] for r in pool.status()["ranks"]], pool.status()["loads"]
    events = []
    started = time.monotonic()
    with pytest.raises(GenerationCancelled):
        pool.generate(SPEC, _request(steps=400), on_event=events.append,
                      cancel=lambda: len(events) >= 2)
    assert time.monotonic() - started < 30
    assert 2 <= len(events) <= 4, [e.step for e in events]  # stopped at the next step boundary or so
    after = pool.generate(SPEC, _request())
    assert _close(after, engine.generate(_request()))
    assert [r["pid"] for r in pool.status()["ranks"]] == pids and pool.status()["loads"] == loads


def test_an_exception_in_the_progress_hook_cancels_and_propagates(pool):
    class Interrupted(Exception):
        pass

    def on_event(event):
        if event.phase == "sample" and event.step == 2:
            raise Interrupted("user pressed cancel")

    pids = [r["pid"] for r in pool.status()["ranks"]]
    with pytest.raises(Interrupted):
        pool.generate(SPEC, _request(steps=400), on_event=on_event)
    pool.generate(SPEC, _request(steps=2))
    assert [r["pid"] for r in pool.status()["ranks"]] == pids


def test_encode_prompt_equals_engine(pool, engine):
    positive, negative = pool.encode_prompt(SPEC, "a cat playing piano", "blurry")
    ref_positive, ref_negative = engine.encode_prompt("a cat playing piano", "blurry")
    assert positive.shape == (1, 226, 32)
    assert torch.allclose(positive, ref_positive, atol=1e-6) and torch.allclose(negative, ref_negative, atol=1e-6)
    # embeddings in, same latents as text in
    with_embeds = pool.generate(SPEC, GenerationRequest(prompt_embeds=positive, negative_prompt_embeds=negative,
                                                        steps=2, seed=3))
    with_text = pool.generate(SPEC, _request(negative_prompt="blurry", steps=2, seed=3))
    assert _close(with_embeds, with_text)


def test_parallel_tiled_decode_equals_single_process(pool, engine):
    latents = engine.generate(_request(steps=2))
    pool.generate(SPEC, _request(steps=1))
    loads = pool.status()["loads"]
    tiling = Tiling(16, 24, 1 / 2, 1 / 3)  # 4 x 3 = 12 tiles over 2 ranks
    events = []
    frames = pool.decode(SPEC, latents, frames=9, tiled=True, tiling=tiling, on_event=events.append)
    single = decode_latents(engine.vae, latents, frames=9, tiled=True, tiling=tiling)
    assert frames.shape == single.shape == (9, 32, 48, 3)
    assert (frames - single).abs().max().item() < 1e-5
    assert [(e.phase, e.step, e.total) for e in events] == [("decode", i, 6) for i in range(1, 7)]
    # the same thing through diffusers' own tiled decode
    vae = engine.vae
    tiling.apply(vae)
    z = latents.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor
    with torch.no_grad():
        reference = ((vae.decode(z).sample[0] / 2 + 0.5).clamp(0, 1)).permute(1, 2, 3, 0)
    vae.disable_tiling()
    assert (frames - reference).abs().max().item() < 1e-5
    plain = pool.decode(SPEC, latents, frames=9, tiled=False)
    assert (plain - engine.decode(latents, frames=9)).abs().max().item() < 1e-5
    assert pool.status()["loads"] == loads  # decoding reused the resident VAE, nothing reloaded


def test_automatic_decode_equals_the_mode_it_picked_and_says_why(pool, engine, monkeypatch):
    """Issue 17: ``tiled=None`` (the default) decodes untiled on rank 0 where that fits and the pool has fewer than 3
    ranks, else tiles over the ranks; the result equals the explicit mode and the choice is reported."""
    from comfyui_xdit_cogvideo import memory

    latents = engine.generate(_request(steps=2))
    tiling = Tiling(16, 24, 1 / 2, 1 / 3)
    auto = pool.decode(SPEC, latents, frames=9, tiling=tiling)  # cpu:2: no device limit, 2 ranks -> untiled
    choice = pool.last_decode
    assert (choice.tiled, choice.ranks, choice.mode) == (False, 1, "plain")
    assert choice.describe().startswith("untiled on rank 0: needs ") and "no device memory limit" in choice.reason
    assert pool.status()["last_decode"] == choice.describe()
    assert torch.equal(auto, pool.decode(SPEC, latents, frames=9, tiled=False))
    assert pool.last_decode.describe() == "untiled on rank 0: asked for"
    monkeypatch.setattr(memory, "decode_budget", lambda figures: 0)  # as if rank 0 had no memory to spare
    events = []
    auto = pool.decode(SPEC, latents, frames=9, tiling=tiling, on_event=events.append)
    choice = pool.last_decode
    assert (choice.tiled, choice.ranks) == (True, 2) and "rank 0 has 0.0 GiB free" in choice.describe()
    assert [(e.phase, e.step, e.total) for e in events] == [("decode", i, 6) for i in range(1, 7)]  # 12 tiles, 2 ranks
    assert torch.equal(auto, pool.decode(SPEC, latents, frames=9, tiled=True, tiling=tiling))
    with pytest.raises(RequestError, match="tiled must be True, False or None"):
        pool.decode(SPEC, latents, frames=9, tiled="yes")


def test_decode_makes_the_frames_from_what_rank_0_sends(tiny_cache, monkeypatch):
    """Issue 17: rank 0 sends the VAE's output [F, H, W, 3] in the VAE's dtype (bf16 on GPUs: half the bytes of float
    frames) and ``pool.decode`` makes the float frames in the caller, exactly as the former path made them on rank 0;
    anything else from rank 0 is an error, never a wrong video."""
    pool = WorkerPool("cpu:1", echo_output=False)
    video = (torch.randn(1, 3, 5, 16, 24, generator=torch.Generator().manual_seed(4)) * 1.2).to(torch.bfloat16)
    sent = video[0].permute(1, 2, 3, 0).contiguous()
    monkeypatch.setattr(pool, "_run", lambda *args, **kwargs: sent)
    latents = torch.zeros(1, 2, 4, 2, 3)
    frames = pool.decode(SPEC, latents, frames=5)
    assert frames.dtype == torch.float32 and frames.shape == (5, 16, 24, 3)
    assert torch.equal(frames, (video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0))
    monkeypatch.setattr(pool, "_run", lambda *args, **kwargs: None)
    with pytest.raises(PoolError, match="rank 0 sent no decoded video"):
        pool.decode(SPEC, latents, frames=5)


def test_an_error_on_every_rank_keeps_the_pool(pool, tiny_path, tmp_path):
    """Weights that only fail when loaded: every rank reports the error, no rank is stuck, nothing restarts."""
    import shutil

    pool.generate(SPEC, _request(steps=1))
    pids, starts = [r["pid"] for r in pool.status()["ranks"]], pool.status()["starts"]
    broken = tmp_path / "broken"
    shutil.copytree(tiny_path("2b"), broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(WorkerError) as caught:
        pool.generate(ModelSpec(str(broken), "fp32"), _request())
    assert caught.value.exc_type in ("OSError", "ModelError", "SafetensorError", "RuntimeError")
    assert [r["pid"] for r in pool.status()["ranks"]] == pids and pool.status()["starts"] == starts
    pool.generate(SPEC, _request(steps=1))
    assert [r["pid"] for r in pool.status()["ranks"]] == pids


def test_a_worker_that_raises_reports_rank_and_traceback(pool, engine):
    old = [r["pid"] for r in pool.status()["ranks"]]
    pool.inject_fault(1, "raise", step=2)
    started = time.monotonic()
    with pytest.raises(WorkerError) as caught:
        pool.generate(SPEC, _request(steps=5))
    assert time.monotonic() - started < 30
    error = caught.value
    assert error.rank == 1 and error.exc_type == "RuntimeError" and "injected fault on rank 1" in error.message
    assert "Traceback" in error.traceback and "worker rank 1" in str(error)
    # rank 0 was left inside a collective: the pool is stopped and every process reaped
    assert all(_gone(pid) for pid in old)
    assert pool.status()["state"] == "stopped" and "injected fault" in pool.status()["last_error"]
    result = pool.generate(SPEC, _request())
    assert _close(result, engine.generate(_request()))
    assert not set(old) & {r["pid"] for r in pool.status()["ranks"]}


def test_no_pool_process_listened_beyond_loopback(pool):
    """Runs after every other test of this module: start, jobs, layout changes and a restart were watched."""
    pool.generate(SPEC, _request(steps=1), layout=Layout(2, 1, 1))
    watch = pool.listen_watch
    assert watch.samples > 20 and watch.outside == [], (watch.outside, watch.seen)
