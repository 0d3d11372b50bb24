"""Joint text-video attention, split over Ulysses (heads) and Ring (key blocks) ranks.

The 226 text tokens are replicated on every rank; only video tokens are sharded. The attention inputs are
packed once, in the layout the collectives send (``pack_qkv``; inside the compiled pre-attention graph this
is part of the norm/RoPE kernels), so nothing is copied between the projection and the kernel:

- Ulysses: the video q and k/v of every destination rank lie contiguous ([B, U, C, h, D], rank dim first);
  one ``all_to_all_single`` per CFG row writes the full sequence of my heads straight into the video part of
  a joint [text; video] buffer whose text part holds my heads of the replicated text. Rows are exchanged
  asynchronously: row 1's all-to-all runs under row 0's attention kernel, row 0's way back under row 1's.
  The way back lands rank-major ([B, U, C, h, D] and [B, U, T, h, D]); ``joint_heads`` reorders it into the
  [B, T + C, H * D] the output projection reads (one copy, fused into the compiled post-attention graph).
- Ring: keys and values live in one [B, T + C, 2, H, D] buffer, so a row's video block is a contiguous
  slice to send and the first (local) block with the text keys in front is a slice too. Partial outputs
  merge by their log-sum-exp (``merge_blocks``: one compiled kernel on CUDA).

The text keys join each rank's first (local) ring block, so every query sees them exactly once. Padded keys
are cut off, never masked.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from .groups import ParallelGroups
from .kernels import KERNELS, Kernel
from .sharding import SequenceShard


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: int, ulysses: int) -> tuple:
    """q, k, v [B, T + C, H, D] of [text; local video] in the layout the sequence-parallel attention sends.

    ``ulysses == 1``: ``(q, kv)`` with kv [B, T + C, 2, H, D]. ``ulysses > 1``: ``(q_text [B, T, H, D],
    kv_text [B, T, 2, H, D], q_send [B, U, C, h, D], kv_send [B, U, C, 2, h, D])`` where ``[:, u]`` holds
    the heads of Ulysses rank u. Pure tensor code, so torch.compile fuses it into the producers.
    """
    kv = torch.stack([k, v], dim=2)
    if ulysses == 1:
        return q, kv
    batch, seq, heads, dim = q.shape
    video, h = seq - text_len, heads // ulysses
    q_send = q[:, text_len:].reshape(batch, video, ulysses, h, dim).transpose(1, 2).contiguous()
    kv_send = kv[:, text_len:].reshape(batch, video, 2, ulysses, h, dim).permute(0, 3, 1, 2, 4, 5).contiguous()
    return q[:, :text_len].contiguous(), kv[:, :text_len].contiguous(), q_send, kv_send


def joint_heads(out) -> torch.Tensor:
    """The attention output as [B, T + C, H * D] (what the output projection reads), from a BSHD tensor or
    from the Ulysses way back's rank-major pair (text [B, U, T, h, D], video [B, U, C, h, D])."""
    if isinstance(out, torch.Tensor):
        return out.flatten(2)
    text, video = out
    return torch.cat([text.transpose(1, 2), video.transpose(1, 2)], dim=1).flatten(2)


def merge_attention(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor,
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results by their log-sum-exp: out [B, S, H, D] (any float dtype), lse
    [B, H, S] float32. Returns float32 (out, lse), or with ``dtype`` the final output in that dtype (lse None).

    The arithmetic of yunchang 0.6.4's ``ring.utils.update_out_and_lse`` (out = block 0's output in float32;
    then out - sigmoid(block_lse - lse) * (out - block_out), lse - logsigmoid(lse - block_lse)) without its
    float32 copy of the first block and with the final cast fused in.
    """
    out = out.float()
    weight = torch.sigmoid(block_lse - lse).transpose(1, 2).unsqueeze(-1)
    out = out - weight * (out - block_out.float())
    if dtype is not None:
        return out.to(dtype), None
    return out, lse - F.logsigmoid(lse - block_lse)


_MERGE_COMPILED = []


def merge_blocks(*args, **kwargs):
    """``merge_attention``: on CUDA one compiled kernel per call (elementwise only, exact up to the fused ops'
    float32 rounding), eager elsewhere or when compiling fails (with a warning, once)."""
    if not args[0].is_cuda or _MERGE_COMPILED == [None]:
        return merge_attention(*args, **kwargs)
    if not _MERGE_COMPILED:
        _MERGE_COMPILED.append(torch.compile(merge_attention, dynamic=False, fullgraph=True))
    try:
        return _MERGE_COMPILED[0](*args, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a compiler failure must not fail the job
        import warnings

        warnings.warn(f"torch.compile of the ring merge failed ({type(error).__name__}: {error}); running it eager")
        _MERGE_COMPILED[0] = None
        return merge_attention(*args, **kwargs)


def scatter_heads(q_text, kv_text, q_send, kv_send, group, ulysses_idx: int):
    """Ulysses' way in: joint buffers q [B, T + S, h, D] and kv [B, T + S, 2, h, D] ([text; all video tokens]
    of my heads) and the per-row async works that fill their video part, one (q, kv) pair per row."""
    batch, ulysses, chunk, h, dim = q_send.shape
    text_len = q_text.shape[1]
    q = q_send.new_empty(batch, text_len + ulysses * chunk, h, dim)
    kv = kv_send.new_empty(batch, text_len + ulysses * chunk, 2, h, dim)
    heads = slice(ulysses_idx * h, (ulysses_idx + 1) * h)
    q[:, :text_len] = q_text[:, :, heads]
    kv[:, :text_len] = kv_text[:, :, :, heads]
    works = [[dist.all_to_all_single(dst[b, text_len:], src[b].contiguous(), group=group, async_op=True)
              for dst, src in ((q, q_send), (kv, kv_send))] for b in range(batch)]
    return q, kv, works


class _GatherHeads:
    """Ulysses' way back, row by row: my heads of [text; all video] -> all heads of [text; my video chunk],
    rank-major (text [B, U, T, h, D], video [B, U, C, h, D]); ``joint_heads`` reorders it."""

    def __init__(self, like: torch.Tensor, batch: int, text_len: int, group, ulysses: int):
        _, seq, h, dim = like.shape
        self.text_len, self.group = text_len, group
        self.text = like.new_empty(batch, ulysses, text_len, h, dim)
        self.video = like.new_empty(batch, ulysses, (seq - text_len) // ulysses, h, dim)
        self.works = []

    def send(self, row: int, out: torch.Tensor) -> None:
        """Start sending row ``row``'s output [T + S, h, D] back."""
        out = out.contiguous()
        self.works.append(dist.all_to_all_single(self.video[row], out[self.text_len:], group=self.group,
                                                 async_op=True))
        self.works.append(dist.all_gather_into_tensor(self.text[row].view(-1), out[:self.text_len].reshape(-1),
                                                      group=self.group, async_op=True))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        for work in self.works:
            work.wait()
        return self.text, self.video


class ParallelContext:
    """Per-transformer state: the groups, the kernel and the shard of the forward in progress."""

    def __init__(self, groups: ParallelGroups, kernel: str):
        self.groups = groups
        self.kernel_name = kernel
        self.kernel: Kernel = KERNELS[kernel]
        self.shard: SequenceShard | None = None

    @property
    def packing(self) -> int | None:
        """The ``ulysses`` argument of ``pack_qkv`` for this layout; None: no sequence parallelism, the
        attention takes plain (q, k, v)."""
        layout = self.groups.layout
        return layout.ulysses if layout.seq_degree > 1 else None

    def attention(self, packed: tuple, text_len: int):
        """Attention of local queries [text; video chunk] over all keys. ``packed``: (q, k, v) BSHD without
        sequence parallelism, else ``pack_qkv``'s output. Returns what ``joint_heads`` takes."""
        if self.packing is None:
            q, k, v = packed
            return self.kernel(q, k, v, False)[0]
        layout, groups = self.groups.layout, self.groups
        if layout.ulysses == 1:
            return self._ring_attention(*packed, text_len)
        q, kv, works = scatter_heads(*packed, groups.ulysses, groups.ulysses_idx)
        back = _GatherHeads(q, q.shape[0], text_len, groups.ulysses, layout.ulysses)
        if layout.ring == 1:
            valid = text_len + self.shard.ring_valid(0)
            for row, row_works in enumerate(works):  # row r + 1 travels while row r attends
                for work in row_works:
                    work.wait()
                rows = slice(row, row + 1)
                out = self.kernel(q[rows], kv[rows, :valid, 0], kv[rows, :valid, 1], False)[0]
                back.send(row, out[0])
        else:
            for work in (w for row_works in works for w in row_works):
                work.wait()
            out = self._ring_attention(q, kv, text_len)
            for row in range(out.shape[0]):
                back.send(row, out[row])
        return back.result()

    def _ring_attention(self, q: torch.Tensor, kv: torch.Tensor, text_len: int) -> torch.Tensor:
        """Ring over key/value blocks: q [B, T + S, h, D], kv [B, T + S, 2, h, D] ([text; my ring block])."""
        groups, shard = self.groups, self.shard
        size, idx = groups.layout.ring, groups.ring_idx
        send_to = dist.get_global_rank(groups.ring, (idx + 1) % size)
        recv_from = dist.get_global_rank(groups.ring, (idx - 1) % size)
        block = kv[:, text_len:]
        out = lse = None
        for step in range(size):
            last = step == size - 1
            if not last:  # every row's block is contiguous: send them as they lie, into one buffer
                incoming = torch.empty_like(block, memory_format=torch.contiguous_format)
                ops = [op for row in range(block.shape[0]) for op in (
                    dist.P2POp(dist.isend, block[row], send_to, group=groups.ring),
                    dist.P2POp(dist.irecv, incoming[row], recv_from, group=groups.ring))]
                requests = dist.batch_isend_irecv(ops)
            valid = shard.ring_valid((idx - step) % size)
            keys = kv[:, :text_len + valid] if step == 0 else block[:, :valid]
            if keys.shape[1]:
                block_out, block_lse = self.kernel(q, keys[:, :, 0], keys[:, :, 1], True)
                if out is None:
                    out, lse = block_out, block_lse
                else:
                    out, lse = merge_blocks(out, lse, block_out, block_lse, dtype=q.dtype if last else None)
            if not last:
                for request in requests:
                    request.wait()
                block = incoming
        return out.to(q.dtype)


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
        packing = self.context.packing
        packed = (q, k, v) if packing is None else pack_qkv(q, k, v, text_len, packing)
        out = joint_heads(self.context.attention(packed, text_len))
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, out = out.split([text_len, out.shape[1] - text_len], dim=1)
        return out, encoder_out
