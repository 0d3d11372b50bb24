"""What an install brings and how attention falls back (issue 17): flash-attn-4 where it is the fastest kernel, a
clean fallback wherever it is absent, cannot run, or is not the measured target."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from comfyui_xdit_cogvideo.parallel import kernels


def _fake_fa4(monkeypatch, run) -> None:
    """A flash-attn-4 that imports (as an installed wheel does) and runs ``run(q, k, v, return_lse)``."""
    package = types.ModuleType("flash_attn")
    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None, is_package=True)
    package.__path__ = []
    cute = types.ModuleType("flash_attn.cute")
    cute.__spec__ = importlib.machinery.ModuleSpec("flash_attn.cute", None)
    cute.flash_attn_func = lambda q, k, v, return_lse=False: run(q, k, v, return_lse)
    package.cute = cute
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setattr(kernels, "_WORKS", {})


def _refuses(q, k, v, return_lse):  # what FA4 4.0.0b36 does on a GPU generation it has no kernel for
    raise AssertionError("Unsupported compute capability. Supported: 8.x, 9.x, 10.x, 11.x, 12.x")


def _right(q, k, v, return_lse):  # a working kernel: SDPA's answer and its log-sum-exp, in FA4's layouts
    qt, kt, vt = (x.transpose(1, 2).float() for x in (q, k, v))
    scores = qt @ kt.transpose(-1, -2) / q.shape[-1] ** 0.5
    out = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2).to(q.dtype)
    return out, (torch.logsumexp(scores, dim=-1) if return_lse else None)


def _wrong(q, k, v, return_lse):  # runs, but returns garbage (a broken JIT or runtime library)
    return torch.zeros_like(q), torch.zeros(q.shape[0], q.shape[2], q.shape[1]) if return_lse else None


@pytest.mark.parametrize("run,works", [(_refuses, False), (_wrong, False), (_right, True)],
                         ids=["refuses the GPU", "wrong numbers", "works"])
def test_fa4_self_test_decides_whether_auto_may_pick_it(monkeypatch, run, works):
    """The self-test is real (run here on the CPU in bf16 against SDPA); a kernel that imports but fails or
    computes garbage is never picked by ``auto``: cuDNN SDPA is, as without flash-attn-4."""
    _fake_fa4(monkeypatch, run)
    assert kernels._installed("flash_attn.cute")
    assert kernels.kernel_works("fa4", "cpu") is works
    # a Hopper GPU with this flash-attn-4 installed: the same self-test decides (evaluated on the CPU here)
    real = kernels.kernel_works
    monkeypatch.setattr(kernels, "available_kernels", lambda device: ["fa4", "cudnn", "flash", "sdpa"])
    monkeypatch.setattr(kernels, "kernel_works", lambda name, device: real(name, "cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert kernels.resolve_kernel("auto", "cuda") == ("fa4" if works else "cudnn")


@pytest.mark.parametrize("capability,expected", [((9, 0), "fa4"), ((10, 0), "fa4"), ((8, 0), "cudnn"),
                                                 ((8, 9), "cudnn"), ((12, 0), "cudnn")])
def test_auto_picks_fa4_only_on_hopper_and_blackwell(monkeypatch, capability, expected):
    """FA4 4.0.0b36 also runs on Ampere/Ada and consumer Blackwell, unmeasured there: ``auto`` keeps cuDNN; asked
    for by name it still runs."""
    _fake_fa4(monkeypatch, _right)
    monkeypatch.setattr(kernels, "available_kernels", lambda device: ["fa4", "cudnn", "flash", "sdpa"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(kernels, "kernel_works", lambda name, device: True)
    assert kernels.resolve_kernel("auto", "cuda") == expected
    assert kernels.resolve_kernel("fa4", "cuda") == "fa4"
