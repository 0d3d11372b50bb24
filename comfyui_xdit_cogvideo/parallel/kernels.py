"""Attention kernels behind one signature: ``(q, k, v) -> (out, lse)`` in [batch, seq, heads, dim] layout.

Ring attention merges partial results with their log-sum-exp, so every kernel used on a ring must return it;
the plain path (no ring) asks for ``lse=False`` and may use any kernel.
"""

from __future__ import annotations

import importlib.util
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
        if backend is None:
            out = F.scaled_dot_product_attention(qt, kt, vt)
        else:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(qt, kt, vt)
        return out.transpose(1, 2), None

    return run


def _with_lse(q, k, v):
    """Exact attention that also returns the log-sum-exp, through torch's own kernels."""
    qt, kt, vt = _bhsd(q, k, v)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, False)[:2]
    elif torch.backends.cudnn.is_available() and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            qt, kt, vt, None, True, 0.0, False, False
        )[:2]
        lse = lse.squeeze(-1) if lse.dim() == 4 else lse
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False)[:2]
    return out.transpose(1, 2), lse


def _cpu_exact(q, k, v, lse):
    return _with_lse(q, k, v) if lse else _sdpa(None)(q, k, v, False)


def _fa4(q, k, v, lse):
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q, k, v, return_lse=True) if lse else flash_attn_func(q, k, v)
    if isinstance(out, tuple):
        return out[0], (out[1] if lse else None)
    return out, None


def _fa3(q, k, v, lse):
    from flash_attn_interface import flash_attn_func

    out = flash_attn_func(q, k, v)
    if isinstance(out, tuple):
        return out[0], (out[1] if lse else None)
    return out, None


def _fa2(q, k, v, lse):
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
    if _installed("flash_attn"):
        names.append("fa2")
    return names


def resolve_kernel(name: str, device: torch.device | str) -> str:
    """Map ``auto`` to the fastest kernel here; reject kernels that cannot run on this device."""
    names = available_kernels(device)
    if name == "auto":
        return names[0]
    if name not in KERNELS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of auto, {', '.join(KERNELS)}")
    if name not in names:
        raise ValueError(
            f"attention backend {name!r} is not available on {torch.device(device).type} here; "
            f"available: {', '.join(names)}"
        )
    return name
