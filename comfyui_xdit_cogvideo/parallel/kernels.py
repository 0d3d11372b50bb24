"""Attention kernels behind one signature: ``(q, k, v) -> (out, lse)`` in [batch, seq, heads, dim] layout.

Ring attention merges partial results with their log-sum-exp, so every kernel used on a ring must return it;
the plain path (no ring) asks for ``lse=False`` and may use any kernel.

``auto`` on CUDA picks flash-attn-4 (CuTe DSL, ``pip install flash-attn-4``) on Hopper and Blackwell GPUs when
it imports and passes a one-off self-test on this GPU, else cuDNN SDPA. Measured on one H200 at CogVideoX shapes
(BENCHMARKS.md): FA4 is the fastest, then cuDNN, then flash SDPA. Kernels that only take fp16/bf16 fall back to PyTorch's
SDPA for other dtypes, so every name works with every dtype.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], "tuple[torch.Tensor, torch.Tensor | None]"]


def _bhsd(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.transpose(1, 2) for x in xs]


def _sdpa(backend: SDPBackend | None) -> Kernel:
    def run(q, k, v, lse):
        if lse:
            return _with_lse(q, k, v)
        qt, kt, vt = _bhsd(q, k, v)
        if backend is None or q.dtype not in _HALF:
            out = F.scaled_dot_product_attention(qt, kt, vt)
        else:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(qt, kt, vt)
        return out.transpose(1, 2), None

    return run


_HALF = (torch.float16, torch.bfloat16)


def _with_lse(q, k, v):
    """Exact attention that also returns the log-sum-exp [B, H, Sq] (float32), through torch's own kernels."""
    qt, kt, vt = _bhsd(q, k, v)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, False)[:2]
    elif q.dtype not in _HALF:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True)[:2]
        lse = lse[..., :q.shape[1]]  # padded to a multiple of 32 queries
    else:
        out, lse = _half_with_lse(qt, kt, vt)
    return out.transpose(1, 2), lse


def _half_with_lse(qt, kt, vt):
    """cuDNN, else flash, else memory-efficient attention: the first that runs on this GPU and shape."""
    if torch.backends.cudnn.is_available():
        try:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, False, False)[:2]
            return out, (lse.squeeze(-1) if lse.dim() == 4 else lse)
        except RuntimeError:
            pass
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False)[:2]
    except RuntimeError:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True)[:2]
        return out, lse[..., :qt.shape[2]]  # padded to a multiple of 32 queries


def _cpu_exact(q, k, v, lse):
    return _with_lse(q, k, v) if lse else _sdpa(None)(q, k, v, False)


def _fa4_cache_defaults() -> None:
    """FA4 JIT-compiles its kernels on first use; keep them on disk so a restarted pool skips that."""
    from ..tiny import tiny_cache_dir

    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(tiny_cache_dir() / "fa4"))


def _fa4(q, k, v, lse):
    if q.dtype not in _HALF:
        return _sdpa(None)(q, k, v, lse)
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q, k, v, return_lse=lse)  # always (out, lse); lse (B, H, Sq) float32 or None
    if isinstance(out, tuple):
        return out[0], (out[1] if lse else None)
    return out, None


def _fa3(q, k, v, lse):
    if q.dtype not in _HALF:
        return _sdpa(None)(q, k, v, lse)
    from flash_attn_interface import flash_attn_func

    out = flash_attn_func(q, k, v, return_attn_probs=True) if lse else flash_attn_func(q, k, v)
    if isinstance(out, tuple):
        return out[0], (out[1] if lse else None)
    return out, None


def _fa2(q, k, v, lse):
    if q.dtype not in _HALF:
        return _sdpa(None)(q, k, v, lse)
    from flash_attn import flash_attn_func

    if lse:
        out, softmax_lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
        return out, softmax_lse
    return flash_attn_func(q, k, v), None


KERNELS: dict[str, Kernel] = {
    "sdpa": _sdpa(None),
    "cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
    "flash": _sdpa(SDPBackend.FLASH_ATTENTION),
    "math": _cpu_exact,
    "fa4": _fa4,
    "fa3": _fa3,
    "fa2": _fa2,
}

_MODULE_OF = {"fa4": "flash_attn.cute", "fa3": "flash_attn_interface", "fa2": "flash_attn"}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_kernels(device: torch.device | str) -> list[str]:
    """Kernels usable on this device, fastest first (order measured on H200, see BENCHMARKS.md)."""
    if torch.device(device).type != "cuda":
        return ["math", "sdpa"]
    names = [n for n in ("fa4", "fa3") if _installed(_MODULE_OF[n])]
    names += ["cudnn", "flash", "sdpa"]
    if _installed("flash_attn.flash_attn_interface"):  # FA2 proper (FA4 alone leaves a bare namespace package)
        names.append("fa2")
    return names


_WORKS: dict[tuple[str, str], bool] = {}
_WORKS_LOCK = threading.Lock()  # one self-test at a time: a background probe and the engine never test twice


def kernel_works(name: str, device: torch.device | str) -> bool:
    """One small call (with and without log-sum-exp) against SDPA on ``device``; the answer is cached.

    Guards ``auto`` against a kernel that imports but cannot run here (an unsupported GPU generation, a
    driver too old for its JIT, a missing runtime library). Thread-safe: it may run on ``probe_kernel``'s thread
    while the weights load. The kernel's module is imported first; the calls then hold the construction lock
    shared, so they never run while torch's default dtype or init functions are changed by a model being built.
    """
    from ..construction import CONSTRUCTION_LOCK

    device = torch.device(device)
    key = (name, str(device))
    with _WORKS_LOCK:
        if key in _WORKS:
            return _WORKS[key]
        try:
            if name in _MODULE_OF:
                _import_kernel(name)
            with CONSTRUCTION_LOCK.shared():
                _WORKS[key] = _self_test(name, device)
        except Exception:  # noqa: BLE001 - any failure means "do not pick it automatically"
            if threading.current_thread() is not threading.main_thread():
                return False  # a background probe's failure (e.g. an import racing the main thread's) is not final:
            _WORKS[key] = False  # the engine tests again on its own thread
        return _WORKS[key]


def _self_test(name: str, device: torch.device) -> bool:
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, 64, device=device, dtype=torch.bfloat16, generator=g) for n in (80, 96, 96))
    want = F.scaled_dot_product_attention(*_bhsd(q, k, v)).transpose(1, 2).float()
    out, _ = KERNELS[name](q, k, v, False)
    out_lse, lse = KERNELS[name](q, k, v, True)
    ok = lse is not None and tuple(lse.shape) == (1, 2, 80)
    return bool(ok and all(float((o.float() - want).abs().max()) < 2e-2 for o in (out, out_lse)))


_PROBES: dict[str, dict] = {}  # device -> {"thread", "seconds"}: background resolutions of ``auto``
_PROBES_LOCK = threading.Lock()


def import_fast_kernels() -> list[str]:
    """Import the installed flash-attn modules ``auto`` may test (flash-attn-4: CUTLASS' DSL and its MLIR libraries,
    seconds) in a process that will run on a GPU but has no job yet (a prestarted worker), so that its kernel probe
    later only loads and tests. FA4's import queries the device, so torch's CUDA runtime initialises, but no CUDA
    context is made: a ready GPU spare holds 0 MiB of the GPU (``benchmarks/spare_memory.py``, BENCHMARKS.md
    "Session 6"). A failure is left to the probe, which imports again and decides.
    Returns the modules imported."""
    done = []
    for name in ("fa4", "fa3"):
        if not _installed(_MODULE_OF[name]):
            continue
        try:
            _import_kernel(name)
            done.append(_MODULE_OF[name])
        except Exception:  # noqa: BLE001 - the probe reports what does not import
            pass
    return done


def _import_kernel(name: str) -> None:
    """Import a flash-attn kernel's module; FA4 with its disk cache switched on (read at its import)."""
    if name == "fa4":
        _fa4_cache_defaults()
    importlib.import_module(_MODULE_OF[name])


def _needs_self_test(device: torch.device) -> bool:
    return device.type == "cuda" and any(n == "fa3" or (n == "fa4" and _fa4_targets(device))
                                         for n in available_kernels(device))


def probe_kernel(device: torch.device | str) -> bool:
    """Resolve ``auto`` on ``device`` in a background thread (its self-test imports and JIT-compiles flash-attn,
    seconds), so that it overlaps start-up and the weights' copy onto the device instead of following them.
    ``resolve_kernel`` waits for it. Returns whether a probe runs or ran (only CUDA devices with a kernel to test)."""
    device = torch.device(device)
    key = str(device)
    with _PROBES_LOCK:
        if key in _PROBES:
            return True
        if not _needs_self_test(device):
            return False
        # flash-attn-4 imports torch._dynamo and torch._inductor (with sympy: half its import time), which the
        # engine imports too (compile): imported here, on the caller's thread, the two threads never import the
        # same module at once (a concurrent circular import can leave a module half-initialised)
        for module in ("torch._dynamo", "torch._inductor"):
            importlib.import_module(module)

        probe: dict = {}

        def run() -> None:
            started = time.perf_counter()
            try:
                with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                    resolve_kernel("auto", device)
            except Exception:  # noqa: BLE001 - the engine resolves again in its own thread and reports errors
                pass
            probe["seconds"] = round(time.perf_counter() - started, 3)

        probe["thread"] = threading.Thread(target=run, name=f"xdit-kernel-probe-{key}", daemon=True)
        _PROBES[key] = probe
    probe["thread"].start()
    return True


def probe_seconds(device: torch.device | str, wait: float = 0.0) -> float | None:
    """How long the background probe of ``device`` took (None: none ran, or it is still running after ``wait``
    seconds). Once ``resolve_kernel`` has its answer the probe is only recording its time: a short ``wait`` lets it."""
    probe = _PROBES.get(str(torch.device(device)), {})
    if "thread" in probe and wait > 0:
        probe["thread"].join(wait)
    return probe.get("seconds")


# GPU generations (compute capability majors) on which ``auto`` may pick flash-attn-4: Hopper (9) and datacenter
# Blackwell (10, 11), the targets FA4 is written and tuned for (measured fastest on an H200, BENCHMARKS.md). FA4
# 4.0.0b36 also accepts Ampere/Ada (8.x, a path its code marks "should tune") and consumer Blackwell (12.x);
# there ``auto`` keeps cuDNN SDPA, unmeasured against FA4, and ``fa4`` asked for by name still runs.
FA4_AUTO_MAJORS = (9, 10, 11)


def _fa4_targets(device: torch.device | str) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in FA4_AUTO_MAJORS


def resolve_kernel(name: str, device: torch.device | str) -> str:
    """Map ``auto`` to the fastest kernel here; reject kernels that cannot run on this device."""
    names = available_kernels(device)
    if name == "auto":
        for candidate in names:
            if candidate == "fa4" and not _fa4_targets(device):
                continue
            if candidate not in ("fa4", "fa3") or kernel_works(candidate, device):
                return candidate
        return names[-1]
    if name not in KERNELS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of auto, {', '.join(KERNELS)}")
    if name not in names:
        raise ValueError(
            f"attention backend {name!r} is not available on {torch.device(device).type} here; "
            f"available: {', '.join(names)}"
        )
    if name == "fa4":
        _fa4_cache_defaults()
    return name
