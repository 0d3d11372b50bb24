"""Cold start: the compile policy's decisions, the compile-cache key, and the warm-up -> cache-hit round trip
across processes (real Inductor compiles on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest
from comfyui_xdit_cogvideo import compile_cache as cc
from comfyui_xdit_cogvideo import optimize
from comfyui_xdit_cogvideo.optimize import OptimizeOptions, _block_post, _block_pre, compile_key_of

REQUEST = dict(prompt="a cat playing piano", frames=9, height=32, width=48, steps=5, seed=5)
ROOT = Path(__file__).resolve().parent.parent


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_policy_flags():
    assert OptimizeOptions.parse("auto", "cuda").compile_policy == "auto"
    always = OptimizeOptions.parse("fuse,compile=always", "cpu")
    assert always.compile and always.compile_policy == "always"
    assert OptimizeOptions.parse("auto,compile=auto", "cuda") == OptimizeOptions()
    assert not OptimizeOptions.parse("auto,nocompile", "cuda").compile
    with pytest.raises(ValueError, match="'sometimes'"):
        OptimizeOptions.parse("compile_policy=sometimes", "cuda")


def test_benchmarks_compile_always_and_cold_start_measures_auto(monkeypatch):
    monkeypatch.setenv("XDIT_COGVIDEO_COMPILE", "always")
    assert OptimizeOptions.parse("auto", "cuda").compile_policy == "always"
    assert OptimizeOptions.parse("fuse,compile", "cpu").compile_policy == "always"
    monkeypatch.setenv("XDIT_COGVIDEO_COMPILE", "never")
    with pytest.raises(ValueError, match="XDIT_COGVIDEO_COMPILE.*'never'"):
        OptimizeOptions.parse("auto", "cuda")
    monkeypatch.delenv("XDIT_COGVIDEO_COMPILE")
    code = ("import os, sys; sys.path.insert(0, 'benchmarks'); import common; a = os.environ['XDIT_COGVIDEO_COMPILE']; "
            "import cold_start; print(a, os.environ['XDIT_COGVIDEO_COMPILE'])")
    env = {k: v for k, v in os.environ.items() if k != "XDIT_COGVIDEO_COMPILE"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.stdout.split() == ["always", "auto"], result.stderr[-2000:]


def test_pays_off_weighs_the_named_costs(monkeypatch):
    monkeypatch.setattr(cc, "COLD_COMPILE_S", 45.0)
    monkeypatch.setattr(cc, "COMPILED_STEP_GAIN", 0.1)
    assert not cc.pays_off(48, 0.5)      # 2.4 s saved < 45 s compile: a 2b job runs eager
    assert cc.pays_off(1000, 1.0)        # 100 s saved > 45 s
    assert not cc.pays_off(0, 100.0)


def _block_args(block, height_tokens: int, dtype=torch.float32, transpose=False):
    h = torch.randn(2, height_tokens, 96, dtype=dtype)
    if transpose:  # same shape, other strides
        h = torch.randn(2, 96, height_tokens, dtype=dtype).transpose(1, 2)
    e = torch.randn(2, 226, 96, dtype=dtype)
    cos = torch.randn(height_tokens, 16, dtype=dtype)
    return (block, h, e, torch.randn(2, 16, dtype=dtype), cos, cos.clone(), True)


def test_compile_key_separates_shapes_layouts_options_and_models(tiny_path):
    t5b = CogVideoEngine(str(tiny_path("5b")), dtype="fp32", optimize="none").transformer
    t2b = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", optimize="none").transformer
    block = t5b.transformer_blocks[0]
    options = OptimizeOptions()

    def key(args, transformer=t5b, opts=options):
        return compile_key_of(transformer, opts, cc.args_spec(args), torch.device("cpu"))

    base = key(_block_args(block, 18))
    assert base == key(_block_args(block, 18))                     # same shapes: the same key (other values)
    assert base != key(_block_args(block, 36))                     # another size or a sequence shard
    assert base != key(_block_args(block, 18, transpose=True))     # same shape, other strides
    assert base != key(_block_args(block, 18, dtype=torch.bfloat16))
    assert base != key(_block_args(block, 18), opts=OptimizeOptions(fp8=True))
    assert base != key(_block_args(block, 18), opts=OptimizeOptions(gelu_epilogue=False))
    assert base == key(_block_args(block, 18), opts=OptimizeOptions(compile_policy="always", step_cache=0.1))
    assert base != key(_block_args(block, 18), transformer=t2b)    # another model config


class _FakeWarmup:
    started: list = []

    def __init__(self, key, job):
        self.key, self.job = key, job

    def start(self):
        _FakeWarmup.started.append(self)
        return self

    def cancel(self, why):
        self.cancelled = why

    def poll(self):
        return "running"

    def describe(self):
        return {"key": self.key, "state": "running"}


def test_policy_auto_in_jobs(tiny_path, tmp_path, monkeypatch):
    """Eager + warm-up on a first run; compiled from DECIDE_AT_STEP when that pays off; compiled from step 0 on
    a cache hit -- every time with diffusers' latents. The compiled graphs are stood in for by counting eager
    calls (the real compile is covered by test_warm_up_then_cache_hit_in_a_new_process)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(optimize, "_IN_MEMORY", set())
    monkeypatch.setattr(cc, "Warmup", _FakeWarmup)
    marked = []
    monkeypatch.setattr(cc, "mark_compiled", lambda key, info: marked.append(key))
    plain = CogVideoEngine(str(tiny_path("5b")), dtype="fp32", optimize="none")
    reference = plain.generate(GenerationRequest(**REQUEST))
    engine = CogVideoEngine(str(tiny_path("5b")), dtype="fp32", optimize="fuse,compile,contiguous_v")
    opt, calls = engine.optimizer, {"pre": 0, "post": 0}

    def counting(name, fn):
        def run(*args):
            calls[name] += 1
            return fn(*args)
        return run

    opt._pre_c, opt._post_c = counting("pre", _block_pre), counting("post", _block_post)
    blocks = len(opt.blocks)

    _FakeWarmup.started.clear()
    assert _rel(engine.generate(GenerationRequest(**REQUEST)), reference) < 1e-5
    report = engine.optimizer.compile_report()
    assert report["why"] == "eager: first run of this shape, compiling for next time", report
    assert calls == {"pre": 0, "post": 0} and not marked
    (warm,) = _FakeWarmup.started
    assert warm.key == report["key"] and warm.job["pre"][0]["shape"][0] == 2 and warm.job["post"]
    assert report["warmup"] == {"key": report["key"], "state": "running"}
    assert {"pre_s", "attention_s", "post_s"} <= set(report["first_block"])

    monkeypatch.setattr(cc, "COLD_COMPILE_S", 0.0)  # now any compile pays off: switch at DECIDE_AT_STEP
    assert _rel(engine.generate(GenerationRequest(**REQUEST)), reference) < 1e-5
    report = engine.optimizer.compile_report()
    assert report["why"] == f"compiled from step {cc.DECIDE_AT_STEP}: pays off within this job", report
    assert warm.cancelled == "this job compiles the same graphs itself"  # the first job's warm-up: now redundant
    assert calls["pre"] == calls["post"] == blocks * (REQUEST["steps"] - cc.DECIDE_AT_STEP)
    assert marked == [report["key"]] and report["key"] in optimize._IN_MEMORY

    monkeypatch.setattr(cc, "COLD_COMPILE_S", 1e9)
    monkeypatch.setattr(optimize, "_IN_MEMORY", set())
    monkeypatch.setattr(cc, "is_compiled", lambda key: True)  # another process compiled this key
    calls.update(pre=0, post=0)
    assert _rel(engine.generate(GenerationRequest(**REQUEST)), reference) < 1e-5
    report = engine.optimizer.compile_report()
    assert report["why"] == "compiled: cache hit", report
    assert calls["pre"] == blocks * REQUEST["steps"]

    engine.optimize("fuse,contiguous_v")  # compile off: eager, and said so
    engine.generate(GenerationRequest(**REQUEST))
    assert engine.optimizer.compile_report()["why"] == "eager: compile off"


def _child(model: Path, prefix: Path, env: dict, *flags: str) -> dict:
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "cold_start_child.py"), str(model), str(prefix),
                             *flags], env=env, capture_output=True, text=True, timeout=850)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(Path(f"{prefix}.json").read_text())


def test_a_cancelled_warm_up_process_ends_and_frees_its_key(tmp_path, monkeypatch):
    """Warmup.cancel stops the child (a job that compiles the same graphs itself), removes the key's lock so a
    later warm-up may start, and says why; a warm-up that already ended is left as it is."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    warm = cc.Warmup("k" * 24, {"key": "k" * 24}).start()  # the child imports torch for seconds: still running
    assert warm.poll() == "running" and warm.lock.exists()
    warm.cancel("this job compiles the same graphs itself")
    assert warm.proc.poll() is not None and not warm.lock.exists()
    assert warm.describe()["state"] == "cancelled: this job compiles the same graphs itself"
    again = cc.Warmup("k" * 24, {"key": "k" * 24}).start()
    assert again.poll() == "running"  # the key is free again
    again.cancel("test over")
    again.cancel("twice")  # no longer running: nothing to do
    assert again.state == "cancelled: test over"


@pytest.mark.timeout(900)
def test_warm_up_then_cache_hit_in_a_new_process(tiny_path, tmp_path):
    """A first process runs eager and its background warm-up compiles; a second process on the same caches loads
    the graphs from them while its weights load (the prefetch: Inductor's FX-graph and AOT-autograd caches hit,
    nothing missed, nothing left for the first block) with the same latents. A third at another size prefetches
    the marked graphs in vain and decides for itself."""
    model = tiny_path("5b")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    first = _child(model, tmp_path / "first", env, "--wait-warmup")
    key = first["report"]["key"]
    assert first["report"]["why"] == "eager: first run of this shape, compiling for next time", first
    assert first["warmups"] == {key: "done"}
    assert (tmp_path / "inductor" / cc.MARKERS / f"{key}.json").is_file()

    second = _child(model, tmp_path / "second", env)
    report = second["report"]
    assert report["key"] == key and report["why"] == "compiled: cache hit, loaded while the weights loaded", report
    assert report["prefetch"]["used"] and report["prefetch"]["state"] == "done", report
    assert set(report["first_block"]["cache"].values()) == {0}, report  # Dynamo reused the prefetched graphs
    counters = second["counters"]
    assert counters["fx_hit"] >= 1 and counters["fx_miss"] == 0 and counters["aot_miss"] == 0, counters
    eager, compiled = torch.load(tmp_path / "first.pt"), torch.load(tmp_path / "second.pt")
    assert _rel(compiled, eager) < 1e-5

    third = _child(model, tmp_path / "third", env, "--other-size")["report"]
    assert third["key"] != key and third["why"] == "eager: first run of this shape, compiling for next time", third
    prefetch = third["prefetch"]  # a wrong guess is not waited for: it may still be loading when the job decides
    assert prefetch["key"] == key and prefetch["state"] in ("running", "done") and prefetch["used"] is False, third


@pytest.mark.timeout(300)
def test_pool_status_names_where_the_time_went(tiny_path, monkeypatch):
    """Worker start-up phases, the job's phases and the compile policy's decision reach pool.status(); the
    workers take their optimize options from XDIT_COGVIDEO_OPTIMIZE."""
    from comfyui_xdit_cogvideo.pool import ModelSpec, WorkerPool

    tiny_path("2b")
    monkeypatch.setenv("XDIT_COGVIDEO_OPTIMIZE", "fuse")
    pool = WorkerPool("cpu:1", echo_output=False)
    try:
        request = GenerationRequest(prompt="a cat", frames=9, height=32, width=48, steps=2, seed=1)
        pool.generate(ModelSpec("tiny", dtype="fp32"), request)
        status = pool.status()
        assert {"spawn_s", "imports_s", "process_group_s", "engine_imports_s"} <= set(status["startup"]), status
        job = status["last_job"]
        assert job["loaded"] and {"load_s", "configure_s", "text_s", "place_s", "first_step_s",
                                  "other_steps_s"} <= set(job), job
        # load_s in named parts; the prompt's T5 load inside text_s; no kernel self-test to run on a CPU
        assert {"read_s", "to_device_s", "optimize_s", "attention_s", "loras_s"} <= set(job["load"]), job
        assert 0 <= job["text_load_s"] <= job["text_s"] and status["startup"]["kernel_probe"] is False
        assert job["text_preload_s"] >= 0  # the prompt needs T5: it loaded alongside the transformer
        assert job["text_early_encode_s"] >= 0  # and encoded this job's prompt there
        assert status["compile"]["why"] == "eager: compile off" and status["compile"]["policy"] == "off"
        assert {"pre_s", "attention_s", "post_s"} <= set(status["compile"]["first_block"])
        pool.generate(ModelSpec("tiny", dtype="fp32"), request)
        job = pool.status()["last_job"]
        assert job["loaded"] is False and "load" not in job and "text_load_s" not in job, job
    finally:
        pool.shutdown()


def _ulysses_warm_up_then_cache_hit(rank, model):
    from comfyui_xdit_cogvideo import Layout
    from comfyui_xdit_cogvideo.parallel import ParallelGroups

    import torch.distributed as dist

    engine = CogVideoEngine(str(model), dtype="fp32", groups=ParallelGroups.create(Layout(1, 2)),
                            optimize="fuse,compile,contiguous_v")
    request = GenerationRequest(**dict(REQUEST, steps=2))
    eager = engine.generate(request)
    first = engine.optimizer.compile_report()
    states = {key: w.wait(600) for key, w in engine.optimizer.warmups.items()}  # one rank warms, the other waits
    dist.barrier()
    compiled = engine.generate(request)
    return {"first": first, "states": states, "second": engine.optimizer.compile_report(),
            "rel": _rel(compiled, eager)}


@pytest.mark.timeout(900)
def test_ulysses_warm_up_then_cache_hit(tiny_path, tmp_path, monkeypatch):
    """Policy auto on ulysses2: the first job runs eager and its warm-up compiles the post graph for Ulysses'
    output pair (text and video heads, rank-major) from the recorded specs; the next job on both ranks compiles
    from that cache, with nothing missed. Both ranks have one key (their RoPE slices are laid out alike), so one
    warm-up serves both."""
    from distributed import run_world

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    # the ranks run one thread (tests/distributed.py) and Inductor's CPU code depends on it: the warm-up child
    # inherits the count through OMP_NUM_THREADS, as pool workers' children do (pool.launch sets it)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    results = run_world(2, _ulysses_warm_up_then_cache_hit, tiny_path("5b"))
    key = results[0]["first"]["key"]
    assert {r["first"]["key"] for r in results} == {key}, results
    assert sorted(state for r in results for state in r["states"].values()) == ["done", "elsewhere"], results
    for r in results:
        assert r["first"]["why"] == "eager: first run of this shape, compiling for next time", r
        assert r["second"]["why"] == "compiled: cache hit", r
        cache = r["second"]["first_block"]["cache"]
        assert cache["fx_hit"] >= 2 and cache["fx_miss"] == 0 and cache["aot_miss"] == 0, cache
        assert r["rel"] < 1e-5, r


def _sharded_policy(rank, model):
    from comfyui_xdit_cogvideo import Layout
    from comfyui_xdit_cogvideo.parallel import ParallelGroups

    cc.Warmup = _FakeWarmup  # this rank's own module state (a process of its own)
    groups = ParallelGroups.create(Layout(1, 2))
    request = GenerationRequest(**dict(REQUEST, steps=1))
    plain = CogVideoEngine(str(model), dtype="fp32", groups=groups, optimize="fuse,compile,contiguous_v")
    plain.generate(request)
    plain_report = plain.optimizer.compile_report()
    cc.mark_compiled(plain_report["key"], {"by": "this test"})  # as if the warm-up had finished
    sharded = CogVideoEngine(str(model), dtype="fp32", groups=groups, memory="low",
                             optimize="fuse,compile,contiguous_v")
    sharded.generate(request)
    return {"plain": plain_report, "sharded": sharded.optimizer.compile_report(),
            "warmups": [w.key for w in _FakeWarmup.started]}


@pytest.mark.timeout(300)
def test_sharded_weights_get_their_own_key_and_no_warm_up(tiny_path, tmp_path, monkeypatch):
    """FSDP-sharded blocks (memory plan low) compile other graphs than whole ones: a warm-up (whole weights) cannot
    fill their cache, so none is started, and a marker left by whole weights is no cache hit for them (it would
    make the job compile cold inline while saying 'cache hit')."""
    from distributed import run_world

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    for r in run_world(2, _sharded_policy, tiny_path("5b")):
        assert r["warmups"] == [r["plain"]["key"]], r
        assert r["sharded"]["key"] != r["plain"]["key"], r
        assert r["sharded"]["why"] == ("eager: first run of this shape, compiling for next time -- not possible here: "
                                       "the weights are sharded or offloaded"), r


def test_a_prefetch_starts_only_with_room_for_the_weights_still_arriving(tiny_path, tmp_path, monkeypatch):
    """On a GPU the prefetch's block and activations must not take the memory the load is about to fill: it starts
    only while free memory covers the arriving weights plus the warm-up's margin; on a miss it does not start."""
    from comfyui_xdit_cogvideo.optimize import CompilePrefetch, OptimizeOptions

    transformer = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", optimize="none").transformer
    options = OptimizeOptions(compile=True, compile_policy="auto")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    cuda = torch.device("cuda", 0)
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 << 30))
    monkeypatch.setattr(CompilePrefetch, "_run", lambda self, construction: None)
    monkeypatch.setattr(cc, "prefetch_candidate", lambda key_of: None)
    assert CompilePrefetch.start(transformer, options, cuda, None, arriving=1 << 30) is None  # nothing marked
    monkeypatch.setattr(cc, "prefetch_candidate", lambda key_of: {"key": "k1"})
    free["bytes"] = (1 << 30) + cc.WARM_MIN_FREE_BYTES - 1
    assert CompilePrefetch.start(transformer, options, cuda, None, arriving=1 << 30) is None
    free["bytes"] += 1
    prefetch = CompilePrefetch.start(transformer, options, cuda, None, arriving=1 << 30)
    assert prefetch is not None and prefetch.key == "k1" and transformer.__dict__.pop("_xdit_prefetch") is prefetch
    prefetch._thread.join()
    assert CompilePrefetch.start(transformer, OptimizeOptions(compile=False), cuda, None) is None
    assert CompilePrefetch.start(transformer, OptimizeOptions(compile=True, compile_mode="reduce-overhead"), cuda,
                                 None) is None  # CUDA graphs belong to the thread that captures them
