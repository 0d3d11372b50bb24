"""T5-XXL from a single .safetensors file (``t5xxl_fp16``, ``t5xxl_fp8_e4m3fn``, ``..._scaled``), as ComfyUI keeps it.

These files hold Hugging Face T5 encoder names (the same ones ``T5EncoderModel`` uses), sometimes under a
prefix, with no config: the config is rebuilt from the shapes. fp8 weights (and their scales) are upcast at
load, so the encoder computes exactly what diffusers' T5 computes on the same (rounded) weights.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .formats import dequantize, quant_formats, upcast
from .variants import ModelError

T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "t5xxl.transformer.", "text_encoders.t5xxl.", "t5xxl.",
               "transformer.", "text_encoder.", "")
_PROBE = "encoder.block.0.layer.0.SelfAttention.q.weight"


def t5_prefix(keys: list[str], name: str) -> str:
    """The prefix of a T5 encoder's keys, or a ModelError naming what the file is instead."""
    for prefix in T5_PREFIXES:
        if prefix + _PROBE in keys:
            return prefix
    if any("text_model.encoder.layers." in k for k in keys):
        what = "a CLIP text encoder"
    elif any(k.endswith("patch_embed.proj.weight") for k in keys):
        what = "a CogVideoX transformer"
    else:
        what = "not a T5 encoder"
    raise ModelError(f"{name} is {what}; CogVideoX needs T5-XXL (t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn or the "
                     "model folder's text_encoder/)")


def t5_config_from_shapes(shapes: dict[str, tuple[int, ...]]):
    """A T5Config (encoder only) from the weights' shapes."""
    from transformers import T5Config

    vocab, d_model = shapes["shared.weight"]
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k)))
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    inner = shapes[_PROBE][0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    d_ff = shapes["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"][0]
    return T5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers,
                    num_heads=heads, relative_attention_num_buckets=buckets,
                    feed_forward_proj="gated-gelu" if gated else "relu")


def load_t5_file(path: Path, dtype: torch.dtype, device: torch.device | str):
    """A transformers T5EncoderModel with the weights of a single T5 file, in ``dtype`` on ``device``."""
    from accelerate import init_empty_weights
    from safetensors import SafetensorError, safe_open
    from transformers import T5EncoderModel

    from .loading import check_complete

    check_complete(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            metadata = f.metadata()
            prefix = t5_prefix(keys, path.name)
            own = [k for k in keys if k.startswith(prefix)]
            state = {k[len(prefix):]: f.get_tensor(k).to(device) for k in own}
    except (OSError, SafetensorError) as error:
        raise ModelError(f"cannot read {str(path)!r} as safetensors: {error}") from None
    formats = quant_formats(list(state), metadata, state.__getitem__)
    weights, scales = dequantize(state, formats, path.name)
    if "shared.weight" not in weights and "encoder.embed_tokens.weight" in weights:
        weights["shared.weight"] = weights["encoder.embed_tokens.weight"]
    if "shared.weight" not in weights:
        raise ModelError(f"{path.name} has no token embedding (shared.weight); the file is incomplete")
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    if shapes["shared.weight"][0] > 200_000:
        raise ModelError(f"{path.name} is UMT5-XXL (Wan's text encoder, {shapes['shared.weight'][0]} tokens); "
                         "CogVideoX needs T5-XXL (t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn)")
    config = t5_config_from_shapes(shapes)
    with init_empty_weights(include_buffers=False):
        model = T5EncoderModel(config)
    expected = set(model.state_dict())
    weights.pop("encoder.embed_tokens.weight", None)
    missing = expected - set(weights) - {"encoder.embed_tokens.weight"}
    unexpected = set(weights) - expected
    if missing or unexpected:
        raise ModelError(f"{path.name}: not a complete T5 encoder (missing {sorted(missing)[:5]}, unexpected "
                         f"{sorted(unexpected)[:5]})")
    model.load_state_dict({k: upcast(v, scales.get(k), dtype) for k, v in weights.items()}, assign=True,
                          strict=False)
    model.encoder.embed_tokens = model.shared
    return model.to(device)
