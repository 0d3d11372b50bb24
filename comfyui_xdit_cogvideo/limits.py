"""Hard limits of a request, checked in the caller's process before any worker starts.

Two kinds, each refused with the limit and why:

- **Positional range.** CogVideoX 1.5 computes its 3D RoPE on a grid of at most ``sample_height / patch`` x
  ``sample_width / patch`` latent patches (diffusers' ``grid_type="slice"``), so it cannot run taller or wider
  than ``sample_height * 8`` x ``sample_width * 8`` pixels (2400 x 2400 for the published 1.5 models); diffusers'
  own pipeline fails there with a tensor size mismatch. CogVideoX 1.0 recomputes its sin-cos or RoPE positions for
  any size, and the 5b-I2V's learned positions are checked in request.py.
- **Memory.** A deliberately coarse lower-bound estimate per rank, compared with what the device has (a GPU's total
  memory; on CPU, the machine's RAM shared by every rank). Every term counts less than the real peak (allocator
  slack, temporaries and kernel workspaces are left out), so it refuses only what certainly cannot fit and never
  promises that what passes fits. Terms, in bytes:

  * weights: the element count read from the safetensors headers (transformer on every rank; T5 on rank 0 when a
    prompt is encoded; the VAE on the ranks that decode) times the loaded dtype's size;
  * transformer activations: ``ACTIVATION_WIDTH x hidden`` values per token of this rank's share of the sequence
    (text + video tokens over the sequence degree) and batch row (2 with CFG unless CFG-parallel). Attention
    kernels here never materialise the token x token matrix, so there is no quadratic term;
  * VAE decode: ``DECODE_FACTOR`` activations of the first decoder block's width over one batch of
    ``DECODE_FRAMES`` frames of a tile (tiled) or the whole frame (plain), plus the decoded video in float32 held
    ``OUTPUT_COPIES`` times on rank 0.

The detailed per-phase memory plans live elsewhere; keep this one small and conservative.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from .memory import header_counts, vae_width

ACTIVATION_WIDTH = 16
DECODE_FRAMES = 8
DECODE_FACTOR = 4
OUTPUT_COPIES = 3
GIB = 2 ** 30

_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


class LimitError(ValueError):
    """A request beyond what the model or the devices can do, naming the limit and why."""


def max_pixels(info) -> tuple[int, int] | None:
    """(height, width) in pixels the model's positions reach, or None when any size has positions."""
    if info.patch_size_t is None or not info.rotary:
        return None
    p = info.patch_size
    return (info.sample_height // p) * p * 8, (info.sample_width // p) * p * 8


def check_positions(info, height: int, width: int, label: str | None = None) -> None:
    """LimitError when ``height`` x ``width`` lies beyond the model's positional-embedding range."""
    limit = max_pixels(info)
    if limit is None:
        return
    max_h, max_w = limit
    if height > max_h or width > max_w:
        patch = 8 * info.patch_size
        raise LimitError(
            f"{label or info.display} runs at most {max_h} x {max_w} pixels (height x width), got {height} x {width}: "
            f"CogVideoX 1.5's 3D RoPE covers {max_h // patch} x {max_w // patch} patches of {patch} px (its config's "
            "sample_height x sample_width latents), as in diffusers' pipeline")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs, by part; ``total`` is what is compared with the device."""

    weights: int
    activations: int
    decode: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.decode


def safetensors_elements(path: Path | None) -> int:
    """Number of tensor elements in a .safetensors file or in every .safetensors of a folder (headers only;
    unreadable or truncated files count nothing: the loader reports them with a better message)."""
    return sum(header_counts(path, strict=False).values())


def estimate_memory(info, request, layout, dtype: str, resolved, *, leader: bool, decode: str | None,
                    tile: tuple[int, int] = (480, 720)) -> MemoryEstimate:
    """A coarse per-rank estimate (see the module docstring); ``decode`` is None, 'plain' or 'tiled'."""
    size = _DTYPE_BYTES.get(dtype, 4)
    text = leader and (request.prompt_embeds is None or
                       (request.use_cfg and request.negative_prompt_embeds is None))
    vae = decode is not None and (leader or decode == "tiled") or info.image_to_video
    weights = safetensors_elements(resolved.transformer)
    weights += safetensors_elements(resolved.text_encoder) if text else 0
    weights += safetensors_elements(resolved.vae) if vae else 0
    latent_frames = (request.frames - 1) // 4 + 1
    patches_t = math.ceil(latent_frames / (info.patch_size_t or 1))
    video_tokens = patches_t * (request.height // (8 * info.patch_size)) * (request.width // (8 * info.patch_size))
    sequence = layout.ulysses * layout.ring
    rows = (2 // layout.cfg) if request.use_cfg else 1
    tokens = info.text_len + math.ceil(video_tokens / sequence)
    activations = ACTIVATION_WIDTH * info.heads * info.head_dim * tokens * rows * size
    decoded = 0
    if decode is not None:
        h, w = (min(tile[0], request.height), min(tile[1], request.width)) if decode == "tiled" else \
            (request.height, request.width)
        decoded = DECODE_FACTOR * vae_width(resolved.vae) * DECODE_FRAMES * h * w * size
        if leader:
            decoded += OUTPUT_COPIES * request.frames * request.height * request.width * 3 * 4
    return MemoryEstimate(weights * size, activations, decoded)


def device_memory(devices) -> list[int] | None:
    """Bytes each rank can use: every GPU's total memory, or the machine's RAM (shared) for CPU ranks."""
    if devices.kind == "cuda":
        import torch

        return [torch.cuda.get_device_properties(int(i)).total_memory for i in range(devices.world_size)]
    if devices.kind == "cpu":
        try:
            return [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
        except (ValueError, OSError, AttributeError):
            return None
    return None  # ranks on other hosts: unknown here


def check_memory(info, request, layout, dtype: str, resolved, devices, *, decode: str | None,
                 tile: tuple[int, int] = (480, 720), label: str | None = None) -> MemoryEstimate:
    """LimitError when the estimate does not fit the devices; returns the leader's estimate."""
    leader = estimate_memory(info, request, layout, dtype, resolved, leader=True, decode=decode, tile=tile)
    other = estimate_memory(info, request, layout, dtype, resolved, leader=False, decode=decode, tile=tile)
    available = device_memory(devices)
    if not available:
        return leader
    what = (f"{label or info.display} at {request.frames} x {request.height} x {request.width} in {dtype} "
            f"(layout {layout})")
    if devices.kind == "cpu":
        need = leader.total + other.total * (layout.world_size - 1)
        if need > available[0]:
            raise LimitError(
                f"{what} needs about {need / GIB:.1f} GiB of RAM for {layout.world_size} CPU rank(s) but this machine "
                f"has {available[0] / GIB:.1f} GiB ({_parts(leader)} on rank 0); use a smaller size or fewer frames")
        return leader
    for rank, total in enumerate(available[:layout.world_size]):
        need = leader if rank == 0 else other
        if need.total > total:
            raise LimitError(
                f"{what} needs about {need.total / GIB:.1f} GiB on GPU rank {rank} but it has {total / GIB:.1f} GiB "
                f"({_parts(need)}); use more GPUs (the sequence is split), bf16, tiled decode, or a smaller size")
    return leader


def _parts(estimate: MemoryEstimate) -> str:
    return (f"weights {estimate.weights / GIB:.1f}, activations {estimate.activations / GIB:.1f}, decode "
            f"{estimate.decode / GIB:.1f} GiB")
