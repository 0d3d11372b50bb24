"""Cold start, the load (issue 17): load_s split into named parts, QKV fused without a throw-away random init, and
the attention kernel's self-test run on a thread while the weights load (never during a model build)."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from comfyui_xdit_cogvideo import CogVideoEngine, engine as engine_module
from comfyui_xdit_cogvideo import loading
from comfyui_xdit_cogvideo.optimize import _fuse_qkv
from comfyui_xdit_cogvideo.parallel import kernels


def test_fused_qkv_equals_diffusers_fuse_projections_without_random_init(tiny_path, monkeypatch):
    """The same module diffusers' Attention.fuse_projections makes (a test that notices when upstream changes what
    it builds), but no weight is randomly initialised on a real device first (3.3 s for the 2b on a CPU)."""
    transformer = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", optimize="none").transformer
    theirs, ours = (copy.deepcopy(transformer.transformer_blocks[0].attn1) for _ in range(2))
    theirs.fuse_projections()
    initialised = []
    real = torch.nn.init.kaiming_uniform_

    def spy(tensor, *args, **kwargs):
        initialised.append(tensor.device.type)
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", spy)
    _fuse_qkv(ours)
    assert [d for d in initialised if d != "meta"] == []
    assert ours.fused_projections is theirs.fused_projections is True
    assert dict(ours.named_children()).keys() == dict(theirs.named_children()).keys()
    assert (ours.to_qkv.in_features, ours.to_qkv.out_features) == (theirs.to_qkv.in_features,
                                                                   theirs.to_qkv.out_features)
    assert torch.equal(ours.to_qkv.weight, theirs.to_qkv.weight) and torch.equal(ours.to_qkv.bias, theirs.to_qkv.bias)
    x = torch.randn(2, 7, ours.to_qkv.in_features)
    assert torch.equal(ours.to_qkv(x), theirs.to_qkv(x))


def test_load_s_is_split_into_named_parts(tiny_path, tmp_path):
    """A folder: read, copy to the device, optimize, attention, LoRAs; a single file: read, convert."""
    from safetensors.torch import save_file

    started = time.perf_counter()
    engine = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", optimize="fuse")
    total = time.perf_counter() - started
    parts = engine.load_timings
    assert {"read_s", "to_device_s", "optimize_s", "attention_s", "loras_s"} <= set(parts), parts
    assert all(v >= 0 for v in parts.values()) and sum(parts.values()) <= total + 0.01, (parts, total)
    single = tmp_path / "cogvideox_2b.safetensors"
    save_file({k: v.contiguous() for k, v in engine.transformer.state_dict().items()
               if "to_qkv" not in k}, str(single))
    parts = CogVideoEngine(str(single), dtype="bf16", optimize="none").load_timings
    assert {"read_s", "convert_s", "optimize_s", "attention_s"} <= set(parts), parts


@pytest.fixture
def slow_fa4(monkeypatch):
    """A flash-attn-4 stand-in on the CPU whose self-test takes 0.5 s; records the threads that ran it."""
    calls: list[str] = []

    def run(q, k, v, lse):
        calls.append(threading.current_thread().name)
        time.sleep(0.25)
        qt, kt, vt = (x.transpose(1, 2).float() for x in (q, k, v))
        out = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2).to(q.dtype)
        scores = qt @ kt.transpose(-1, -2) / q.shape[-1] ** 0.5
        return out, (torch.logsumexp(scores, dim=-1) if lse else None)

    monkeypatch.setitem(kernels.KERNELS, "fa4", run)
    monkeypatch.setitem(kernels._MODULE_OF, "fa4", "json")  # the module imported before the self-test
    monkeypatch.setattr(kernels, "available_kernels", lambda device: ["fa4", "math", "sdpa"])
    monkeypatch.setattr(kernels, "_fa4_targets", lambda device: True)
    monkeypatch.setattr(kernels, "_needs_self_test", lambda device: True)
    monkeypatch.setattr(kernels, "_fa4_cache_defaults", lambda: None)
    monkeypatch.setattr(kernels, "_WORKS", {})
    monkeypatch.setattr(kernels, "_PROBES", {})
    return calls


def test_kernel_self_test_runs_on_a_thread_during_the_load(tiny_path, slow_fa4, monkeypatch):
    """auto: the self-test starts once the model is built, on its own thread, so it overlaps the weights' copy;
    the engine then takes its answer (one self-test, not two)."""
    real_load = engine_module.load_transformer
    seen = {}

    def load(*args, **kwargs):
        result = real_load(*args, **kwargs)
        probe = kernels._PROBES.get("cpu")
        seen["probe_started_during_load"] = probe is not None and (probe["thread"].ident is not None)
        return result

    monkeypatch.setattr(engine_module, "load_transformer", load)
    engine = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", optimize="none", attention="auto")
    assert seen == {"probe_started_during_load": True}
    assert engine.attention == "fa4"
    assert slow_fa4 == ["xdit-kernel-probe-cpu"] * 2  # with and without log-sum-exp, once, on the probe's thread
    assert engine.load_timings["kernel_probe_s"] >= 0.5
    assert not kernels._PROBES["cpu"]["thread"].is_alive()


def test_kernel_self_test_never_runs_during_a_model_build(slow_fa4):
    """Building a model changes torch's default dtype and init functions for a moment: the self-test waits."""
    released = {}

    def build():
        with loading.CONSTRUCTION_LOCK:
            entered.set()
            time.sleep(0.5)
            released["at"] = time.perf_counter()

    entered = threading.Event()
    builder = threading.Thread(target=build)
    builder.start()
    assert entered.wait(30)
    assert kernels.probe_kernel("cpu")
    kernels._PROBES["cpu"]["thread"].join(60)
    builder.join(60)
    assert slow_fa4 and kernels._WORKS[("fa4", "cpu")] is True
    assert kernels.probe_seconds("cpu") >= 0.5 + 0.5 - 0.05  # waited for the build, then tested


def test_a_failed_background_probe_is_not_final(monkeypatch, slow_fa4):
    """An exception on the probe's thread (an import racing the main thread's) leaves the answer open: the engine's
    own resolve tests again instead of silently falling back to a slower kernel."""
    outcomes = iter([RuntimeError("partially initialized module"), None])

    def flaky(q, k, v, lse):
        error = next(outcomes) if not lse else None
        if error is not None:
            raise error
        return torch.zeros_like(q), None

    monkeypatch.setitem(kernels.KERNELS, "fa4", flaky)
    assert kernels.probe_kernel("cpu")
    kernels._PROBES["cpu"]["thread"].join(60)
    assert ("fa4", "cpu") not in kernels._WORKS
    kernels.kernel_works("fa4", "cpu")  # main thread: decided and cached (here: wrong numbers, so False)
    assert kernels._WORKS[("fa4", "cpu")] is False


def test_t5_preload_overlaps_the_transformer_load_and_encodes_the_same(tiny_path, monkeypatch):
    """preload_text: T5 starts loading on its own thread once the transformer is built (before its weights are
    copied and optimized); the prompt's embeddings are those of a T5 loaded on demand."""
    from comfyui_xdit_cogvideo import GenerationRequest

    real = engine_module.load_text_encoder
    threads = []

    def load(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "load_text_encoder", load)
    real_setup = CogVideoEngine._setup

    def setup(self, *args):
        threads.append(("setup starts; preload started:", self._text_preload is not None))
        return real_setup(self, *args)

    monkeypatch.setattr(CogVideoEngine, "_setup", setup)
    eager = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", optimize="none", preload_text=True)
    assert threads == [("setup starts; preload started:", True), "xdit-text-preload"] or \
        threads == ["xdit-text-preload", ("setup starts; preload started:", True)], threads
    lazy = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", optimize="none")
    assert lazy._text_preload is None
    for a, b in zip(eager.encode_prompt("a cat", "blurry"), lazy.encode_prompt("a cat", "blurry")):
        assert torch.equal(a, b)
    request = GenerationRequest(prompt="a dog", frames=9, height=32, width=48, steps=2, seed=3)
    again = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", optimize="none", preload_text=True)
    assert torch.equal(again.generate(request), lazy.generate(request))
    assert again.timings["text_preload_s"] >= 0 and again.timings["text_load_s"] >= 0
    assert "text_preload_s" not in lazy.timings


def test_the_first_prompt_is_encoded_on_the_preload_thread_with_the_same_embeddings(tiny_path, monkeypatch):
    """preload_text=(prompt, negative): T5's first call runs on the preload thread as soon as T5 is loaded; the
    first job takes those embeddings (equal to an encode on demand), later jobs and other prompts encode as usual."""
    from comfyui_xdit_cogvideo import GenerationRequest

    real = engine_module.encode_text
    calls = []

    def encode(*args, **kwargs):
        calls.append((threading.current_thread().name, args[2], args[3]))
        if threading.current_thread().name == "xdit-text-preload":  # never beside a model build
            assert loading.CONSTRUCTION_LOCK._shared[threading.get_ident()] == 1
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "encode_text", encode)
    lazy = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", optimize="none")
    request = GenerationRequest(prompt="a dog", negative_prompt="blurry", frames=9, height=32, width=48, steps=2,
                                seed=3)
    want = lazy.generate(request)
    assert calls == [("MainThread", "a dog", "blurry")]
    calls.clear()
    early = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", optimize="none", preload_text=("a dog", "blurry"))
    assert torch.equal(early.generate(request), want)
    assert calls == [("xdit-text-preload", "a dog", "blurry")]
    assert early.timings["text_early_encode_s"] >= 0
    assert torch.equal(early.generate(request), want)  # used once: the second job encodes again
    assert calls[1:] == [("MainThread", "a dog", "blurry")]

    calls.clear()
    other = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", optimize="none", preload_text=("a cat", ""))
    assert torch.equal(other.generate(request), want)  # another prompt came: encoded on demand, the early one unused
    assert calls == [("xdit-text-preload", "a cat", ""), ("MainThread", "a dog", "blurry")]


def test_no_early_encode_where_the_encode_would_move_t5(tiny_path, monkeypatch):
    """Text placement 'swap' moves T5 onto the device only for the encode: the preload leaves it on the CPU and
    encodes nothing early. A failing early encode is only logged: the job encodes on its own."""
    from comfyui_xdit_cogvideo.memory import MemoryPlan

    swap = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", optimize="none", preload_text=("a dog", ""),
                          memory=MemoryPlan("fast", 1, "swap"))
    swap.encode_prompt("a dog")
    assert "text_early_encode_s" not in swap.timings and "text_preload_s" in swap.timings

    real = engine_module.encode_text

    def flaky(*args, **kwargs):
        if threading.current_thread().name == "xdit-text-preload":
            raise RuntimeError("CUDA out of memory (early)")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "encode_text", flaky)
    engine = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", optimize="none", preload_text=("a dog", ""))
    positive, _ = engine.encode_prompt("a dog")
    assert "text_early_encode_s" not in engine.timings
    lazy = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", optimize="none")
    assert torch.equal(positive, lazy.encode_prompt("a dog")[0])


def test_a_failed_t5_preload_fails_the_encode_not_the_load(tiny_path, monkeypatch):
    from comfyui_xdit_cogvideo import GenerationRequest
    from comfyui_xdit_cogvideo.errors import ModelError

    def broken(*args, **kwargs):
        raise ModelError("t5xxl.safetensors is truncated")

    monkeypatch.setattr(engine_module, "load_text_encoder", broken)
    engine = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", optimize="none", preload_text=True)
    shape = (1, engine.info.text_len, engine.info.text_dim)
    with_embeds = GenerationRequest(prompt_embeds=torch.randn(shape), negative_prompt_embeds=torch.randn(shape),
                                    frames=9, height=32, width=48, steps=1, seed=1)
    assert not CogVideoEngine.needs_text(with_embeds)
    engine.generate(with_embeds)  # embeddings given: T5 is never needed
    with pytest.raises(ModelError, match="truncated"):
        engine.generate(GenerationRequest(prompt="a cat", frames=9, height=32, width=48, steps=1, seed=1))


def test_load_hands_the_gil_back_promptly_and_restores_the_interval(tiny_path, monkeypatch):
    """While the weights load beside the kernel probe and the T5 preload, the switch interval is short (each of the
    load's many GIL-free calls would otherwise wait up to 5 ms for a busy thread); afterwards it is as it was."""
    import sys

    seen = []
    real_load, real_setup = engine_module.load_transformer, CogVideoEngine._setup

    def load(*args, **kwargs):
        seen.append(("load", sys.getswitchinterval()))
        return real_load(*args, **kwargs)

    def setup(self, *args, **kwargs):
        seen.append(("setup", sys.getswitchinterval()))
        return real_setup(self, *args, **kwargs)

    monkeypatch.setattr(engine_module, "load_transformer", load)
    monkeypatch.setattr(CogVideoEngine, "_setup", setup)
    before = sys.getswitchinterval()
    assert before > engine_module.LOAD_SWITCH_INTERVAL
    CogVideoEngine(str(tiny_path("2b")), dtype="fp32", optimize="none")
    short = pytest.approx(engine_module.LOAD_SWITCH_INTERVAL, rel=0.01)  # kept in whole microseconds
    assert seen == [("load", short), ("setup", short)]
    assert sys.getswitchinterval() == before
    with pytest.raises(RuntimeError), engine_module.prompt_gil_handoff():
        raise RuntimeError("a failed load restores it too")
    assert sys.getswitchinterval() == before
    first, second = engine_module.prompt_gil_handoff(), engine_module.prompt_gil_handoff(2e-4)
    first.__enter__()
    second.__enter__()  # two loads overlapping on two threads, the first to start ends first
    first.__exit__(None, None, None)
    assert sys.getswitchinterval() == short  # the other load is still running
    second.__exit__(None, None, None)
    assert sys.getswitchinterval() == before


def test_a_prestarted_worker_imports_the_fast_kernels_with_their_cache_settings(tmp_path, monkeypatch):
    """What a GPU spare runs before it is assigned: the installed flash-attn modules, imported with FA4's disk cache
    switched on (read at its import); one that fails to import is left to the probe and raises nothing."""
    import sys

    from comfyui_xdit_cogvideo.tiny import tiny_cache_dir

    (tmp_path / "fake_fa4_ok.py").write_text(
        "import os\nCACHE = (os.environ.get('FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED'),"
        " os.environ.get('FLASH_ATTENTION_CUTE_DSL_CACHE_DIR'))\n")
    (tmp_path / "fake_fa3_broken.py").write_text("raise OSError('libcuda.so.1: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", raising=False)
    monkeypatch.delenv("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", raising=False)
    monkeypatch.setitem(kernels._MODULE_OF, "fa4", "fake_fa4_ok")
    monkeypatch.setitem(kernels._MODULE_OF, "fa3", "fake_fa3_broken")
    try:
        assert kernels.import_fast_kernels() == ["fake_fa4_ok"]
        assert sys.modules["fake_fa4_ok"].CACHE == ("1", str(tiny_cache_dir() / "fa4"))
    finally:
        for name in ("fake_fa4_ok", "fake_fa3_broken"):
            sys.modules.pop(name, None)
    monkeypatch.setitem(kernels._MODULE_OF, "fa4", "no_such_module_here")
    assert kernels.import_fast_kernels() == []


def test_a_gpu_spare_imports_the_compiler_and_the_kernels_before_its_job(monkeypatch):
    """``_gpu_imports`` (a spare on a GPU slot, before its assignment): the fast kernels and the compiler's lazy
    imports, each timed; a compiler import that fails is left to the first compiled block."""
    import subprocess
    import sys

    from comfyui_xdit_cogvideo import optimize
    from comfyui_xdit_cogvideo.pool import worker

    code = ("import sys, torch; from comfyui_xdit_cogvideo.optimize import import_compiler; "
            "names = import_compiler(); print(all(n in sys.modules for n in names), torch.cuda.is_initialized())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["True", "False"], done.stderr[-2000:]

    monkeypatch.setattr(kernels, "import_fast_kernels", lambda: ["flash_attn.cute"])
    startup: dict = {}
    worker._gpu_imports(startup)
    assert startup["kernel_imports"] == ["flash_attn.cute"]
    assert startup["kernel_imports_s"] >= 0 and startup["compiler_imports_s"] >= 0

    def broken():
        raise ImportError("triton: libcuda.so.1 not found")

    monkeypatch.setattr(optimize, "import_compiler", broken)
    startup = {}
    worker._gpu_imports(startup)
    assert "compiler_imports_s" in startup
