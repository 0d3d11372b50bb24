"""Tiny random-weight CogVideoX models built in code, saved in diffusers' on-disk format.

They exist so that the whole product (loader, tokenizer, T5, sampler, parallel layouts, VAE, mp4) runs on a
CPU in seconds with no download. Same code paths as the real models; only the sizes differ. Every variant of
the real family has a tiny twin: 2b (sin-cos positions), 5b (3D RoPE), 5b-i2v (learned positions, image
latents as extra channels), 1.5 (temporal patches) and 1.5-i2v (adds the ofs embedding).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

TINY_VARIANTS = ("2b", "5b", "5b-i2v", "1.5", "1.5-i2v")

_WORDS = (
    "a the of and in on at with to from by for over under near above cat dog fox bird fish horse panda robot "
    "man woman child people car boat train city street forest beach sea ocean river lake mountain sky sun moon "
    "night day morning sunset rain snow fire light water tree flower garden house room window piano guitar "
    "playing running walking flying swimming dancing sitting looking smiling jumping eating reading camera slow "
    "motion close up wide shot cinematic beautiful quick brown lazy red blue green yellow white black golden "
    "small big old young happy sunny dark bright soft gentle wind waves clouds stars video scene frame"
).split()

_SCHEDULER = dict(
    beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False, num_train_timesteps=1000,
    prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, steps_offset=0,
    timestep_spacing="trailing",
)


def tiny_cache_dir() -> Path:
    root = os.environ.get("XDIT_COGVIDEO_CACHE") or Path.home() / ".cache" / "comfyui_xdit_cogvideo"
    return Path(root)


def _transformer_config(variant: str) -> dict:
    """1.0 twins are trained at 32 x 48 pixels (sample 4 x 6 latents) and run at any size. 1.5's RoPE only reaches
    sample_height x sample_width latents (diffusers' grid_type="slice"), as the real 1.5 reaches 300 x 300 (2400
    px): the 1.5 twins get 8 x 12 (64 x 96 px) so that they, too, run at several sizes."""
    i2v = variant.endswith("i2v")
    v15 = variant.startswith("1.5")
    return dict(
        num_attention_heads=6, attention_head_dim=16, in_channels=8 if i2v else 4, out_channels=4,
        time_embed_dim=16, text_embed_dim=32, num_layers=2, sample_width=12 if v15 else 6,
        sample_height=8 if v15 else 4, sample_frames=9,
        patch_size=2, patch_size_t=2 if v15 else None, temporal_compression_ratio=4, max_text_seq_length=226,
        use_rotary_positional_embeddings=variant != "2b", use_learned_positional_embeddings=variant == "5b-i2v",
        patch_bias=not v15, ofs_embed_dim=16 if variant == "1.5-i2v" else None,
    )


def _tokenizer():
    """T5's own Unigram tokenizer class over a small English vocabulary (whole words, then letters)."""
    from transformers import T5Tokenizer

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    words = [("\u2581" + w, -5.0 - i * 1e-3) for i, w in enumerate(dict.fromkeys(_WORDS))]
    chars = [(c, -20.0) for c in "\u2581abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
    return T5Tokenizer(vocab=specials + words + chars, extra_ids=0, model_max_length=226)


def build_tiny(variant: str, folder: str | Path) -> Path:
    """Build and save tiny ``variant`` (one of TINY_VARIANTS) as a diffusers folder; deterministic."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline,
                           CogVideoXPipeline, CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    if variant not in TINY_VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose one of {', '.join(TINY_VARIANTS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tokenizer = _tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
    ))
    transformer = CogVideoXTransformer3DModel(**_transformer_config(variant))
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.05)
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4,
        sample_height=32, sample_width=48, invert_scale_latents=variant == "1.5-i2v",
    )
    scheduler = CogVideoXDDIMScheduler(snr_shift_scale=3.0 if variant == "2b" else 1.0, **_SCHEDULER)
    pipeline_class = CogVideoXImageToVideoPipeline if variant.endswith("i2v") else CogVideoXPipeline
    pipeline = pipeline_class(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                              scheduler=scheduler)
    with _no_progress_bars():
        pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


@contextlib.contextmanager
def _no_progress_bars():
    """Keep transformers' and diffusers' save progress bars (\"Writing model shards\") off the user's stderr."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [(lib, lib.is_progress_bar_enabled()) for lib in (transformers_logging, diffusers_logging)]
    for lib, _ in states:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in states:
            if enabled:
                lib.enable_progress_bar()


def ensure_tiny(variant: str = "2b") -> Path:
    """The cached tiny model folder for ``variant``, built on first use (atomic against concurrent builders)."""
    import shutil

    folder = tiny_cache_dir() / f"tiny-{variant}"
    if _is_current(folder, variant):
        return folder
    staging = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    build_tiny(variant, staging)
    if folder.exists() and not _is_current(folder, variant):  # built by an older version: set it aside
        stale = folder.with_name(f"{folder.name}.stale{os.getpid()}")
        try:
            folder.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass
    try:
        staging.rename(folder)
    except OSError:
        if not _is_current(folder, variant):
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _is_current(folder: Path, variant: str) -> bool:
    """A cached tiny model is reused only if it was built with today's transformer config."""
    import json

    try:
        config = json.loads((folder / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (folder / "model_index.json").exists() and all(
        config.get(k) == v for k, v in _transformer_config(variant).items())
