"""Transformer weights sharded over the layout's ranks with PyTorch FSDP2 (``fully_shard``, torch >= 2.6).

Every block is its own FSDP unit: its weights live as 1/N shards on each rank, are all-gathered right before the
block runs and freed right after (``reshard_after_forward``); block i+1's all-gather is issued when block i
starts (``set_modules_to_forward_prefetch``), so the gather overlaps block i's compute. The root unit holds the
small parts outside the blocks (patch embedding, time embedding, final norm and projection).

Which ranks shard: the layout's whole world (``groups.world``), not a sub-group. Every rank of every layout runs
every block once per step (CFG ranks on their own batch rows, sequence ranks on their own tokens), so each rank
can be the owner of 1/N of every block. Over the world the resident weights per rank fall N-fold; over a
sub-group (say, the two CFG halves each sharding over its sequence ranks) they fall only by the sub-group size
while each rank moves the same (g-1)/g of a block's bytes per gather, so the world is never worse on one host.
Sub-groups would matter across hosts (keep the gathers on NVLink): ``shard_transformer`` takes any group.

With the compiled blocks (``optimize.py``): the compiled pre/post graphs take the block module and read its
(unsharded) parameters while FSDP's pre-forward hook has them gathered; the attention, with its collectives,
stays outside the graphs. Fused QKV must be applied before sharding: the separate to_q/to_k/to_v views into
the fused weight are dropped here, or FSDP would shard them as a second copy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def shard_transformer(transformer, group: "dist.ProcessGroup", device: torch.device | str) -> None:
    """Shard ``transformer`` (parallelized, optimized, on CPU or ``device``) over ``group`` in place.

    Parameters move to ``device`` one unit at a time, so the full model never sits on the GPU at once.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    if getattr(transformer, "_xdit_shard_group", None) is not None:
        raise RuntimeError("the transformer is already sharded; load it again to shard over other ranks")
    device = torch.device(device)
    mesh = DeviceMesh.from_group(group, device.type)
    blocks = list(transformer.transformer_blocks)
    for block in blocks:
        _drop_fused_views(block.attn1)
        block.to(device)
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    for name, module in transformer.named_children():
        if name != "transformer_blocks":
            module.to(device)
    for name, buffer in list(transformer.named_buffers(recurse=False)):
        setattr(transformer, name, buffer.to(device))
    fully_shard(transformer, mesh=mesh, reshard_after_forward=True)
    for current, following in zip(blocks, blocks[1:]):
        current.set_modules_to_forward_prefetch([following])
    transformer._xdit_shard_group = group
    transformer._xdit_shard_size = dist.get_world_size(group)


def shard_size(transformer) -> int:
    """Ranks the transformer is sharded over (1 = not sharded)."""
    return getattr(transformer, "_xdit_shard_size", 1)


def gathered_blocks(transformer) -> list[int]:
    """Indices of blocks whose full weights are in memory now (for tests and memory checks)."""
    out = []
    for index, block in enumerate(transformer.transformer_blocks):
        state = block._get_fsdp_state() if hasattr(block, "_get_fsdp_state") else None
        group = getattr(state, "_fsdp_param_group", None)
        if group is not None and group.is_unsharded:
            out.append(index)
    return out


def _drop_fused_views(attn) -> None:
    """With fused QKV, to_q/to_k/to_v are views into to_qkv (optimize._share_qkv_storage); FSDP would shard them
    as separate parameters (a second copy). The parallel processor reads only to_qkv once fused."""
    if getattr(attn, "fused_projections", False):
        for name in ("to_q", "to_k", "to_v"):
            if hasattr(attn, name):
                delattr(attn, name)
