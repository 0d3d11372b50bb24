"""Joint text-video attention, split over Ulysses (heads) and Ring (key blocks) ranks.

The 226 text tokens are replicated on every rank; only video tokens are sharded. Ulysses moves the video
part with one all-to-all (q, k and v packed together) and takes the text heads it owns locally; Ring then
circulates video key/value blocks and merges partial outputs by their log-sum-exp. The text keys join each
rank's first (local) ring block, so every query sees them exactly once. Padded keys are cut off, never masked.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers.models.embeddings import apply_rotary_emb
from yunchang.comm.all_to_all import all_to_all_4D
from yunchang.ring.utils import RingComm, update_out_and_lse

from .groups import ParallelGroups
from .kernels import KERNELS, Kernel
from .sharding import SequenceShard


class ParallelContext:
    """Per-transformer state: the groups, the kernel and the shard of the forward in progress."""

    def __init__(self, groups: ParallelGroups, kernel: str):
        self.groups = groups
        self.kernel_name = kernel
        self.kernel: Kernel = KERNELS[kernel]
        self.shard: SequenceShard | None = None
        self._ring = RingComm(groups.ring) if groups.layout.ring > 1 else None

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: int) -> torch.Tensor:
        """Attention of local queries [text; video chunk] over all keys; BSHD in, BSHD out."""
        layout, groups, shard = self.groups.layout, self.groups, self.shard
        if layout.seq_degree == 1 and shard.padded == shard.tokens:
            return self.kernel(q, k, v, False)[0]
        heads = q.shape[2]
        if layout.ulysses > 1:
            video = torch.cat([q[:, text_len:], k[:, text_len:], v[:, text_len:]], dim=-1)
            video = all_to_all_4D(video, scatter_idx=2, gather_idx=1, group=groups.ulysses)
            qv, kv, vv = video.chunk(3, dim=-1)
            h = heads // layout.ulysses
            heads_of_rank = slice(groups.ulysses_idx * h, (groups.ulysses_idx + 1) * h)
            qt, kt, vt = (x[:, :text_len, heads_of_rank] for x in (q, k, v))
        else:
            qt, kt, vt = q[:, :text_len], k[:, :text_len], v[:, :text_len]
            qv, kv, vv = q[:, text_len:], k[:, text_len:], v[:, text_len:]
        query = torch.cat([qt, qv], dim=1)
        if layout.ring == 1:
            valid = shard.ring_valid(0)
            out = self.kernel(query, torch.cat([kt, kv[:, :valid]], 1), torch.cat([vt, vv[:, :valid]], 1), False)[0]
        else:
            out = self._ring_attention(query, kt, vt, kv, vv)
        out_text, out_video = out[:, :text_len], out[:, text_len:]
        if layout.ulysses > 1:
            out_video = all_to_all_4D(out_video.contiguous(), scatter_idx=1, gather_idx=2, group=groups.ulysses)
            parts = [torch.empty_like(out_text) for _ in range(layout.ulysses)]
            dist.all_gather(parts, out_text.contiguous(), group=groups.ulysses)
            out_text = torch.cat(parts, dim=2)
        return torch.cat([out_text, out_video], dim=1)

    def _ring_attention(self, query, kt, vt, kv, vv) -> torch.Tensor:
        ring, shard, ring_idx = self._ring, self.shard, self.groups.ring_idx
        block = torch.stack([kv, vv])
        out = lse = None
        for step in range(ring.world_size):
            last = step == ring.world_size - 1
            if not last:
                incoming = ring.send_recv(block)
                ring.commit()
            valid = shard.ring_valid((ring_idx - step) % ring.world_size)
            k_blk, v_blk = block[0, :, :valid], block[1, :, :valid]
            if step == 0:
                k_blk, v_blk = torch.cat([kt, k_blk], 1), torch.cat([vt, v_blk], 1)
            if k_blk.shape[1]:
                block_out, block_lse = self.kernel(query, k_blk, v_blk, True)
                out, lse = update_out_and_lse(out, lse, block_out, block_lse)
            if not last:
                ring.wait()
                block = incoming
        return out.to(query.dtype)


def project_qkv(attn, x: torch.Tensor, text_len: int, rotary=None):
    """q, k, v [batch, seq, heads, dim] of the joint sequence ``x`` = [text; video], as diffusers computes them:
    (fused) projections, q/k norms, RoPE on the video part only."""
    batch, seq, _ = x.shape
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    head_dim = k.shape[-1] // attn.heads
    q, k, v = (t.reshape(batch, seq, attn.heads, head_dim) for t in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if rotary is not None:
        q = torch.cat([q[:, :text_len], apply_rotary_emb(q[:, text_len:], rotary, sequence_dim=1)], 1)
        k = torch.cat([k[:, :text_len], apply_rotary_emb(k[:, text_len:], rotary, sequence_dim=1)], 1)
    return q, k, v


class ParallelCogVideoXAttnProcessor:
    """Drop-in for diffusers' CogVideoXAttnProcessor2_0 whose attention runs through a ParallelContext."""

    def __init__(self, context: ParallelContext):
        self.context = context

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise NotImplementedError("CogVideoX attention takes no mask; padded tokens are cut off instead")
        text_len = encoder_hidden_states.size(1)
        q, k, v = project_qkv(attn, torch.cat([encoder_hidden_states, hidden_states], dim=1), text_len,
                              image_rotary_emb)
        batch, seq = q.shape[:2]
        out = self.context.attention(q, k, v, text_len).reshape(batch, seq, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, out = out.split([text_len, seq - text_len], dim=1)
        return out, encoder_out
