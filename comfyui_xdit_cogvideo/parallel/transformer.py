"""A parallel forward for diffusers' CogVideoXTransformer3DModel.

The stock pipeline keeps driving the model: scheduler, guidance and random numbers stay exactly diffusers'.
Only the transformer's forward is replaced on the instance. It takes this rank's CFG row, embeds patches,
keeps its chunk of the video tokens (with its slice of the rotary table), runs the blocks with parallel
attention, projects its chunk to patch pixels and gathers all chunks and CFG rows in one all-gather.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .attention import ParallelCogVideoXAttnProcessor, ParallelContext
from .groups import ParallelGroups
from .sharding import SequenceShard


def parallelize_transformer(transformer, groups: ParallelGroups, kernel: str) -> ParallelContext:
    """Install the parallel forward and attention on ``transformer`` (idempotent; re-call to change layout)."""
    heads = transformer.config.num_attention_heads
    if heads % groups.layout.ulysses:
        raise ValueError(f"ulysses degree {groups.layout.ulysses} does not divide {heads} heads")
    context = ParallelContext(groups, kernel)
    first = not hasattr(transformer, "_xdit_context")
    transformer._xdit_context = context
    transformer.set_attn_processor(ParallelCogVideoXAttnProcessor(context))
    if first:  # the forward reads the context on every call; reinstalling it would drop offloading hooks
        transformer.forward = types.MethodType(_parallel_forward, transformer)
    return context


def _rows(x, cfg: int, idx: int, batch: int):
    """This CFG rank's rows of a batch-leading tensor (scalars and batch-1 tensors are shared)."""
    if cfg == 1 or not torch.is_tensor(x) or x.dim() == 0 or x.shape[0] != batch:
        return x
    size = batch // cfg
    return x[idx * size:(idx + 1) * size]


def _parallel_forward(
    self,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    timestep,
    timestep_cond=None,
    ofs=None,
    image_rotary_emb=None,
    attention_kwargs=None,
    return_dict: bool = True,
):
    context: ParallelContext = self._xdit_context
    groups, layout = context.groups, context.groups.layout
    full_batch = hidden_states.shape[0]
    if full_batch % layout.cfg:
        raise ValueError(f"cfg degree {layout.cfg} needs an even batch (uncond + cond), got batch {full_batch}")
    hidden_states, encoder_hidden_states, timestep, timestep_cond = (
        _rows(x, layout.cfg, groups.cfg_idx, full_batch)
        for x in (hidden_states, encoder_hidden_states, timestep, timestep_cond)
    )
    batch, frames, _, height, width = hidden_states.shape

    t_emb = self.time_proj(timestep).to(dtype=hidden_states.dtype)
    emb = self.time_embedding(t_emb, timestep_cond)
    if self.ofs_embedding is not None:
        emb = emb + self.ofs_embedding(self.ofs_proj(ofs).to(dtype=hidden_states.dtype))

    tokens = self.embedding_dropout(self.patch_embed(encoder_hidden_states, hidden_states))
    text_len = encoder_hidden_states.shape[1]
    encoder_hidden_states, hidden_states = tokens[:, :text_len], tokens[:, text_len:]

    shard = SequenceShard(hidden_states.shape[1], layout.seq_degree, layout.ulysses)
    context.shard = shard
    hidden_states = shard.local(hidden_states, groups.seq_idx)
    if image_rotary_emb is not None:
        # copied: every rank's slice then has the same strides and storage offset (0), so all ranks share one
        # compile key and one compiled graph (a [chunk, head_dim] copy per transformer call)
        image_rotary_emb = tuple(shard.local(t, groups.seq_idx, dim=0).clone() for t in image_rotary_emb)

    for block in self.transformer_blocks:
        hidden_states, encoder_hidden_states = block(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            temb=emb,
            image_rotary_emb=image_rotary_emb,
            attention_kwargs=attention_kwargs,
        )

    hidden_states = self.norm_final(hidden_states)
    hidden_states = self.norm_out(hidden_states, temb=emb)
    hidden_states = _gather(self.proj_out(hidden_states), groups, shard)

    p, p_t = self.config.patch_size, self.config.patch_size_t
    batch = hidden_states.shape[0]
    if p_t is None:
        output = hidden_states.reshape(batch, frames, height // p, width // p, -1, p, p)
        output = output.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
    else:
        output = hidden_states.reshape(batch, (frames + p_t - 1) // p_t, height // p, width // p, -1, p_t, p, p)
        output = output.permute(0, 1, 5, 4, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(1, 2)
    if not return_dict:
        return (output,)
    return Transformer2DModelOutput(sample=output)


def _gather(local: torch.Tensor, groups: ParallelGroups, shard: SequenceShard) -> torch.Tensor:
    """All chunks of all CFG rows, in one all-gather over the layout's ranks; padding dropped."""
    layout = groups.layout
    if layout.world_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(layout.world_size)]
    dist.all_gather(parts, local.contiguous(), group=groups.world)
    rows = []
    for c in range(layout.cfg):
        seq = parts[c * layout.seq_degree:(c + 1) * layout.seq_degree]
        rows.append(torch.cat(seq, dim=1)[:, :shard.tokens])
    return torch.cat(rows, dim=0)
