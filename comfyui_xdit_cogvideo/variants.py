"""The CogVideoX family: what tells the variants apart, read from a config or from tensor shapes.

Single-file transformers (as ComfyUI users keep them) carry no config, so it is rebuilt from the shapes of
the weights; the few fields shapes cannot tell (sample sizes, RoPE for the 2b) come from the real models'
published configs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import ModelError  # noqa: F401  (importable from here as before)


@dataclass(frozen=True)
class ModelInfo:
    """What the sampler and the validators need to know about a loaded transformer."""

    variant: str
    heads: int
    head_dim: int
    layers: int
    in_channels: int
    latent_channels: int
    patch_size: int
    patch_size_t: int | None
    sample_height: int
    sample_width: int
    sample_frames: int
    learned_positions: bool
    rotary: bool
    ofs: bool
    text_dim: int = 4096
    text_len: int = 226
    label: str = field(default="", compare=False)  # the name the user gave (tiny, a folder or file name)

    @property
    def display(self) -> str:
        """The model's name for messages: what the user called it, else the variant."""
        return self.label or self.variant

    @property
    def default_frames(self) -> int:
        return 81 if self.sample_frames == 81 and self.patch_size_t else self.sample_frames

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels the model was trained at."""
        if self.patch_size_t and self.sample_height == 300:
            return 768, 1360
        return self.sample_height * 8, self.sample_width * 8

    @property
    def image_to_video(self) -> bool:
        return self.in_channels == 2 * self.latent_channels

    @property
    def version(self) -> str:
        return "1.0" if self.patch_size_t is None else "1.5"

    @classmethod
    def from_config(cls, config, name: str | None = None) -> "ModelInfo":
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        heads, head_dim = get("num_attention_heads", 30), get("attention_head_dim", 64)
        in_channels, out_channels = get("in_channels", 16), get("out_channels", 16) or 16
        info = dict(
            heads=heads, head_dim=head_dim, layers=get("num_layers", 30), in_channels=in_channels,
            latent_channels=out_channels, patch_size=get("patch_size", 2), patch_size_t=get("patch_size_t", None),
            sample_height=get("sample_height", 60), sample_width=get("sample_width", 90),
            sample_frames=get("sample_frames", 49),
            learned_positions=bool(get("use_learned_positional_embeddings", False)),
            rotary=bool(get("use_rotary_positional_embeddings", False)), ofs=bool(get("ofs_embed_dim", None)),
            text_dim=get("text_embed_dim", 4096), text_len=get("max_text_seq_length", 226),
        )
        return cls(variant=name or variant_name(**info), **info)


def variant_name(*, heads: int, head_dim: int, in_channels: int, latent_channels: int, patch_size_t, **_: object) -> str:
    size = {1920: "2b", 3072: "5b"}.get(heads * head_dim, f"{heads}x{head_dim}")
    name = f"1.5-{size}" if patch_size_t else size
    return name + ("-i2v" if in_channels == 2 * latent_channels else "")


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict:
    """A diffusers CogVideoXTransformer3DModel config rebuilt from the weights' shapes (keys without prefix)."""
    try:
        inner, text_dim = shapes["patch_embed.text_proj.weight"]
        head_dim = shapes["transformer_blocks.0.attn1.norm_q.weight"][0]
        proj = shapes["patch_embed.proj.weight"]
        out_features = shapes["proj_out.weight"][0]
        time_dim = shapes["time_embedding.linear_1.weight"][0]
    except KeyError as missing:
        raise ModelError(f"transformer weights lack {missing}; is this a CogVideoX transformer file?") from None
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    if len(proj) == 4:
        patch, patch_t, in_channels = proj[2], None, proj[1]
    else:
        patch, patch_t = 2, 2
        in_channels = proj[1] // (patch * patch * patch_t)
    out_channels = out_features // (patch * patch * (patch_t or 1))
    learned = "patch_embed.pos_embedding" in shapes
    v15 = patch_t is not None  # 1.5's linear patch embed always has a bias; patch_bias only affects 1.0's conv
    config = dict(
        num_attention_heads=inner // head_dim, attention_head_dim=head_dim, in_channels=in_channels,
        out_channels=out_channels, time_embed_dim=time_dim, text_embed_dim=text_dim, num_layers=layers,
        patch_size=patch, patch_size_t=patch_t, patch_bias=not v15 and "patch_embed.proj.bias" in shapes,
        use_rotary_positional_embeddings=inner != 1920, use_learned_positional_embeddings=learned,
        sample_height=300 if v15 else 60, sample_width=300 if v15 else 90, sample_frames=81 if v15 else 49,
        ofs_embed_dim=shapes["ofs_embedding.linear_1.weight"][0] if "ofs_embedding.linear_1.weight" in shapes else None,
    )
    if learned:
        expected = 226 + 13 * 30 * 45
        if shapes["patch_embed.pos_embedding"][1] != expected:
            raise ModelError(
                f"learned positional embedding has {shapes['patch_embed.pos_embedding'][1]} positions, "
                f"expected {expected} (CogVideoX-5b-I2V at 49 x 480 x 720); ship a config.json beside the file"
            )
    return config
