"""Token sharding and the CPU attention kernels that Ring relies on."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_xdit_cogvideo.parallel.kernels import KERNELS, available_kernels, resolve_kernel
from comfyui_xdit_cogvideo.parallel.sharding import SequenceShard


@pytest.mark.parametrize("tokens,degree,ulysses", [(18, 4, 1), (18, 4, 2), (16, 3, 1), (17550, 8, 2), (3, 8, 1)])
def test_chunks_cover_every_token_once(tokens, degree, ulysses):
    shard = SequenceShard(tokens, degree, ulysses)
    x = torch.arange(tokens).view(1, tokens, 1).float() + 1
    chunks = [shard.local(x, i) for i in range(degree)]
    assert all(c.shape[1] == shard.chunk for c in chunks)
    joined = torch.cat(chunks, 1)[0, :, 0]
    assert torch.equal(joined[:tokens], x[0, :, 0]) and not joined[tokens:].any()
    ring = degree // ulysses
    assert sum(shard.ring_valid(r) for r in range(ring)) == tokens
    assert shard.padded == math.ceil(tokens / degree) * degree


def test_local_rejects_wrong_token_count():
    with pytest.raises(ValueError, match="expected 10 tokens"):
        SequenceShard(10, 2).local(torch.zeros(1, 9, 4), 0)


def test_cpu_kernels_agree_and_return_exact_lse():
    q, k, v = (torch.randn(2, n, 3, 16) for n in (11, 7, 7))
    reference = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    out, lse = KERNELS["math"](q, k, v, True)
    assert torch.allclose(out.transpose(1, 2), reference, atol=1e-6)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(16)
    assert torch.allclose(lse, scores.logsumexp(-1), atol=1e-5)
    out, lse = KERNELS["sdpa"](q, k, v, False)
    assert lse is None and torch.allclose(out.transpose(1, 2), reference, atol=1e-6)


def test_kernel_resolution():
    assert resolve_kernel("auto", "cpu") == available_kernels("cpu")[0] == "math"
    with pytest.raises(ValueError, match="not available on cpu"):
        resolve_kernel("fa4", "cpu")
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        resolve_kernel("xformers", "cpu")
