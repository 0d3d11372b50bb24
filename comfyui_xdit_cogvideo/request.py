"""What one generation asks for, and its validation against the loaded model before any rank starts."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .errors import RequestError  # noqa: F401  (importable from here as before)
from .limits import LimitError, check_positions
from .variants import ModelInfo


@dataclass
class GenerationRequest:
    """Text (or precomputed T5 embeddings) plus sampling settings. ``None`` sizes mean the model's defaults.

    ``image`` (image-to-video models only) is one RGB frame, [H, W, 3] float in [0, 1] as ComfyUI's IMAGE rows.
    """

    prompt: str | None = None
    negative_prompt: str = ""
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int = 50
    guidance: float = 6.0
    seed: int = 42
    scheduler: str | None = None
    dynamic_cfg: bool = False
    image: torch.Tensor | None = None

    @property
    def use_cfg(self) -> bool:
        return self.guidance > 1.0

    def resolved(self, info: ModelInfo) -> "GenerationRequest":
        """A copy with model defaults filled in, validated; raises RequestError."""
        height, width = info.default_size
        pick = lambda value, default: default if value is None else value  # noqa: E731
        request = replace(self, frames=pick(self.frames, info.default_frames), height=pick(self.height, height),
                          width=pick(self.width, width))
        validate_request(request, info)
        return request


def validate_request(r: GenerationRequest, info: ModelInfo) -> None:
    if r.prompt is None and r.prompt_embeds is None:
        raise RequestError("give a prompt (text) or prompt_embeds")
    if r.steps < 1 or r.steps > 1000:
        raise RequestError(f"steps must be between 1 and 1000, got {r.steps}")
    if not 0 <= r.guidance <= 50:
        raise RequestError(f"guidance must be between 0 and 50, got {r.guidance} (CogVideoX uses about 6)")
    if not 0 <= r.seed < 2 ** 64:
        raise RequestError(f"seed must be between 0 and 2**64-1, got {r.seed}")
    if r.scheduler not in (None, "ddim", "dpm"):
        raise RequestError(f"scheduler must be 'ddim' or 'dpm', got {r.scheduler!r}")
    if r.frames < 1 or (r.frames - 1) % 4:
        near = max(1, (r.frames - 1) // 4 * 4 + 1)
        raise RequestError(f"frames must be 4k+1 (the VAE compresses 4 frames into one latent frame, plus the "
                           f"first), e.g. {near} or {near + 4}; got {r.frames}")
    step = 8 * info.patch_size
    for name in ("height", "width"):
        value = getattr(r, name)
        if value < step or value % step:
            low = max(step, value // step * step)
            raise RequestError(f"{name} must be a positive multiple of {step} (VAE factor 8 x patch "
                               f"{info.patch_size}), got {value}; e.g. {low} or {low + step}")
    if info.learned_positions and (r.height, r.width, r.frames) != (*info.default_size, info.sample_frames):
        h, w = info.default_size
        raise RequestError(f"{info.display} has learned positional embeddings and only runs at "
                           f"{info.sample_frames} frames x {h} x {w}; got {r.frames} x {r.height} x {r.width}")
    shape = (1, info.text_len, info.text_dim)
    for name in ("prompt_embeds", "negative_prompt_embeds"):
        embeds = getattr(r, name)
        if embeds is not None and tuple(embeds.shape) != shape:
            raise RequestError(f"{name} must have shape {list(shape)} (T5 output padded to {info.text_len} "
                               f"tokens), got {list(embeds.shape)}")
        if embeds is not None and not torch.isfinite(embeds).all():
            bad = int((~torch.isfinite(embeds)).sum())
            raise RequestError(f"{name} contains {bad} NaN or infinite value(s) of {embeds.numel()}; the video would "
                               "be black. Encode the prompt again (T5 in fp16 overflows: use bf16 or fp32)")
    if info.image_to_video and r.image is None:
        raise RequestError(f"{info.display} is an image-to-video model: give a start image")
    if not info.image_to_video and r.image is not None:
        raise RequestError(f"{info.display} is a text-to-video model and takes no start image; "
                           "use an -I2V model for image-to-video")
    if r.image is not None and (r.image.dim() != 3 or r.image.shape[-1] != 3):
        raise RequestError(f"image must be one RGB frame [H, W, 3] with values in 0..1, got {list(r.image.shape)}")
    if r.image is not None and not torch.isfinite(r.image).all():
        raise RequestError("image contains NaN or infinite values; give RGB values in 0..1")
    try:
        check_positions(info, r.height, r.width, info.display)
    except LimitError as error:
        raise RequestError(str(error)) from None
