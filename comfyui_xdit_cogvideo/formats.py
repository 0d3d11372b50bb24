"""On-disk formats of CogVideoX weights: ComfyUI-native vs diffusers names, fp8 storage, and what a file is.

ComfyUI's own CogVideoX (``comfy/ldm/cogvideo``, ComfyUI 0.33) stores the same tensors as diffusers'
``CogVideoXTransformer3DModel`` under other names (``blocks.N.q`` for ``transformer_blocks.N.attn1.to_q``, ...);
the shapes and the order of elements are identical, so converting is renaming. The table below is the one
place that knows the names; LoRA loading uses the same functions for LoRA keys.

fp8-stored files (``*_fp8_e4m3fn``) keep weights in ``float8_e4m3fn``; the ``_scaled`` ones add a per-layer
scale, either ComfyUI's older form (a ``scaled_fp8`` marker and ``<layer>.scale_weight``) or its newer one
(``<layer>.comfy_quant`` JSON, or ``_quantization_metadata`` in the header, and ``<layer>.weight_scale``).
The real weight is ``fp8.float() * scale``.
"""

from __future__ import annotations

import json
import re

import torch

from .variants import ModelError

# (ComfyUI-native, diffusers) module names; parameters (.weight/.bias) keep their names.
TOP_LEVEL = (
    ("patch_embed.proj", "patch_embed.proj"),
    ("patch_embed.text_proj", "patch_embed.text_proj"),
    ("time_embedding_linear_1", "time_embedding.linear_1"),
    ("time_embedding_linear_2", "time_embedding.linear_2"),
    ("ofs_embedding_linear_1", "ofs_embedding.linear_1"),
    ("ofs_embedding_linear_2", "ofs_embedding.linear_2"),
    ("norm_final", "norm_final"),
    ("norm_out.linear", "norm_out.linear"),
    ("norm_out.norm", "norm_out.norm"),
    ("proj_out", "proj_out"),
)
# Inside block N: ``blocks.N.<native>`` <-> ``transformer_blocks.N.<diffusers>``.
BLOCK = (
    ("norm1.linear", "norm1.linear"),
    ("norm1.norm", "norm1.norm"),
    ("q", "attn1.to_q"),
    ("k", "attn1.to_k"),
    ("v", "attn1.to_v"),
    ("norm_q", "attn1.norm_q"),
    ("norm_k", "attn1.norm_k"),
    ("attn_out", "attn1.to_out.0"),
    ("norm2.linear", "norm2.linear"),
    ("norm2.norm", "norm2.norm"),
    ("ff_proj", "ff.net.0.proj"),
    ("ff_out", "ff.net.2"),
)
PARAMETERS = ("weight", "bias")
POS_EMBEDDING = "patch_embed.pos_embedding"  # a bare parameter, same name on both sides

_N2D_TOP = dict(TOP_LEVEL)
_D2N_TOP = {d: n for n, d in TOP_LEVEL}
_N2D_BLOCK = dict(BLOCK)
_D2N_BLOCK = {d: n for n, d in BLOCK}
_NATIVE_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)$")
_DIFFUSERS_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)$")


def _split_param(name: str) -> tuple[str, str] | None:
    module, _, param = name.rpartition(".")
    return (module, param) if module and param in PARAMETERS else None


def native_to_diffusers_key(name: str) -> str | None:
    """The diffusers name of one ComfyUI-native CogVideoX transformer tensor (no prefix), or None if it is not one.

    Also maps module names without a parameter (``blocks.3.q`` -> ``transformer_blocks.3.attn1.to_q``), which
    is what LoRA keys address.
    """
    return _rename_key(name, _N2D_TOP, _NATIVE_BLOCK, _N2D_BLOCK, "transformer_blocks")


def diffusers_to_native_key(name: str) -> str | None:
    """The ComfyUI-native name of one diffusers CogVideoX transformer tensor (or module), or None."""
    return _rename_key(name, _D2N_TOP, _DIFFUSERS_BLOCK, _D2N_BLOCK, "blocks")


def _rename_key(name: str, top: dict, block_pattern, block_table: dict, block_prefix: str) -> str | None:
    """One tensor or module name through one direction's tables (top-level modules, then per-block modules)."""
    if name == POS_EMBEDDING:
        return name
    split = _split_param(name)
    module, param = split if split else (name, None)
    suffix = f".{param}" if param else ""
    if module in top:
        return top[module] + suffix
    match = block_pattern.fullmatch(module)
    if match and match.group(2) in block_table:
        return f"{block_prefix}.{match.group(1)}.{block_table[match.group(2)]}{suffix}"
    return None


def _rename(state: dict, convert, what: str) -> dict:
    out = {}
    for key, value in state.items():
        new = convert(key)
        if new is None:
            raise ModelError(f"{key!r} is not a {what} CogVideoX transformer weight name")
        out[new] = value
    return out


def native_to_diffusers(state: dict) -> dict:
    """A ComfyUI-native state dict (no prefix) with diffusers names; unknown keys are an error."""
    return _rename(state, native_to_diffusers_key, "ComfyUI-native")


def diffusers_to_native(state: dict) -> dict:
    """A diffusers state dict with ComfyUI-native names (what core ComfyUI's UNETLoader reads)."""
    return _rename(state, diffusers_to_native_key, "diffusers")


# ----------------------------------------------------------------------------------------------------------
# What a file is


TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.", "")

# (test on the key set, what the file is, what to do instead). Derivatives are checked among a CogVideoX
# transformer's own keys; the other models only when no CogVideoX transformer is in the file (a checkpoint that
# also holds a VAE and T5 is a CogVideoX transformer file too).
_DERIVATIVES = (
    (lambda ks: any("traj_extractor" in k or ".fuser" in k for k in ks),
     "a CogVideoX Tora model (trajectory-guided)", "Tora is not supported; use a CogVideoX or CogVideoX 1.5 model"),
    (lambda ks: any(k.startswith("controlnet") or ".controlnet" in k for k in ks),
     "a CogVideoX ControlNet", "control models are not supported; use a CogVideoX or CogVideoX 1.5 model"),
    (lambda ks: any(".lora_" in k or k.endswith(("lora_A.weight", "lora_down.weight")) for k in ks),
     "a CogVideoX model with LoRA weights inside", "load the base model and the LoRA separately"),
)
_FOREIGN = (
    (lambda ks: any(k.endswith("double_blocks.0.img_attn.qkv.weight") for k in ks) and
     any("txt_in." in k for k in ks), "a HunyuanVideo transformer", None),
    (lambda ks: any("double_blocks." in k or "single_blocks." in k for k in ks), "a Flux transformer", None),
    (lambda ks: any(k.endswith("blocks.0.self_attn.q.weight") for k in ks) or
     any(k.endswith("head.modulation") for k in ks), "a Wan transformer", None),
    (lambda ks: any(".lora_" in k or k.endswith(("lora_A.weight", "lora_down.weight")) for k in ks),
     "a LoRA", "load it as a LoRA on top of a CogVideoX model, not as the model"),
    (lambda ks: any(k.endswith("decoder.conv_in.conv.weight") or k.endswith("decoder.conv_in.weight") for k in ks),
     "a VAE", "choose it in the vae input, and a CogVideoX transformer as the model"),
    (lambda ks: any("encoder.block.0.layer.0.SelfAttention" in k for k in ks),
     "a T5 text encoder", "choose it in the text encoder input, and a CogVideoX transformer as the model"),
    (lambda ks: any("mixins.patch_embed" in k for k in ks),
     "an original SAT-format CogVideoX checkpoint",
     "convert it to diffusers format (diffusers' scripts/convert_cogvideox_to_diffusers.py)"),
) + _DERIVATIVES


def _named(name: str, what: str, instead: str | None) -> ModelError:
    return ModelError(f"{name} is {what}, not a CogVideoX transformer" + (
        f"; {instead}" if instead else "; pick a CogVideoX (2b, 5b, 5b-I2V, 1.5-5b, 1.5-5b-I2V) file"))


def transformer_layout(keys: list[str], name: str = "this file") -> tuple[str, str]:
    """(prefix, 'diffusers' | 'native') of a CogVideoX transformer's keys, or a ModelError naming what it is."""
    for prefix in TRANSFORMER_PREFIXES:
        if prefix + "patch_embed.proj.weight" not in keys:
            continue
        for layout, probe in (("diffusers", "transformer_blocks.0.norm1.linear.weight"),
                              ("native", "blocks.0.norm1.linear.weight")):
            if prefix + probe in keys:
                own = [k[len(prefix):] for k in keys if k.startswith(prefix)]
                for test, what, instead in _DERIVATIVES:
                    if test(own):
                        raise _named(name, what, instead)
                return prefix, layout
    for test, what, instead in _FOREIGN:
        if test(keys):
            raise _named(name, what, instead)
    for prefix in TRANSFORMER_PREFIXES:
        if any(k.startswith(prefix + "patch_embed.") for k in keys):
            raise ModelError(f"{name} has CogVideoX patch-embedding weights but no transformer blocks; the file "
                             "is incomplete (an interrupted download or copy?); download it again")
    raise ModelError(
        f"{name} holds no CogVideoX transformer weights (expected 'patch_embed.proj.weight' with "
        f"'transformer_blocks.0.*' or ComfyUI's 'blocks.0.*'); first keys: {sorted(keys)[:5]}")


def check_derivative(config: dict, name: str = "this file") -> None:
    """Raise for CogVideoX derivatives that share the architecture but need inputs we do not build.

    THUDM's image-to-video models double the input channels and carry a marker the derivatives lack: learned
    positions (5b-I2V) or the ofs embedding (1.5-5b-I2V). CogVideoX-Fun inpaint models have 33 or 48 input
    channels; Fun control/pose models have 32 channels without those markers.
    """
    in_ch, out_ch = config["in_channels"], config["out_channels"]
    if in_ch == out_ch:
        return
    if in_ch != 2 * out_ch:
        raise ModelError(f"{name} has {in_ch} input channels: a CogVideoX-Fun inpaint (InP) or other derivative "
                         f"model, which is not supported; CogVideoX takes {out_ch} (text-to-video) or "
                         f"{2 * out_ch} (image-to-video)")
    if config.get("patch_size_t"):
        marker = bool(config.get("ofs_embed_dim"))
    else:
        marker = bool(config.get("use_learned_positional_embeddings"))
    if not marker:
        raise ModelError(f"{name} has {in_ch} input channels but not the image-to-video model's "
                         f"{'ofs embedding' if config.get('patch_size_t') else 'learned positions'}: a "
                         "CogVideoX-Fun control/pose or other derivative model, which is not supported")


# ----------------------------------------------------------------------------------------------------------
# fp8 storage

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
SUPPORTED_QUANT = ("float8_e4m3fn", "float8_e5m2")


def quant_formats(keys: list[str], metadata: dict | None, read) -> dict[str, str]:
    """{layer: format} of ComfyUI's per-layer quantization metadata (``read(key)`` gives a tensor)."""
    formats: dict[str, str] = {}
    if metadata and "_quantization_metadata" in metadata:
        for layer, conf in json.loads(metadata["_quantization_metadata"]).get("layers", {}).items():
            formats[layer] = conf.get("format", "?")
    for key in keys:
        if key.endswith(".comfy_quant"):
            conf = json.loads(bytes(read(key).tolist()).decode("utf-8"))
            formats[key[: -len(".comfy_quant")]] = conf.get("format", "?")
    return formats


def dequantize(state: dict, formats: dict[str, str], name: str = "this file") -> tuple[dict, dict]:
    """(weights, scales): ComfyUI's fp8 scale tensors taken out of ``state``; weights keep their stored dtype.

    ``scales`` maps a weight key to its float32 scale (``real = stored.float() * scale``). Quantization formats
    other than fp8 (nvfp4, mxfp8, int8) are refused by name.
    """
    for layer, fmt in formats.items():
        if fmt not in SUPPORTED_QUANT:
            raise ModelError(f"{name}: layer {layer!r} is quantized as {fmt!r}; only fp8 (float8_e4m3fn, "
                             "float8_e5m2, optionally scaled) weights are supported; use the bf16 or fp8 file")
    weights, scales = {}, {}
    for key, value in state.items():
        if key == "scaled_fp8" or key.endswith(".scaled_fp8"):
            continue  # the marker of ComfyUI's older scaled-fp8 files
        if key.endswith(_DROPPED_SUFFIXES):
            continue  # input scales only matter to fp8 matmuls; the metadata was read above
        for suffix in _SCALE_SUFFIXES:
            if key.endswith(suffix):
                scales[key[: -len(suffix)] + ".weight"] = value.float().reshape(-1)[0] if value.numel() == 1 \
                    else value.float()
                break
        else:
            weights[key] = value
    for key in scales:
        if key not in weights:
            raise ModelError(f"{name}: scale for {key!r} without its weight; the file is incomplete")
    return weights, scales


def upcast(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """An fp8-stored weight (times its scale) in ``dtype``; other tensors are just converted."""
    if weight.dtype in FP8_DTYPES:
        out = weight.float()
        if scale is not None:
            scale = scale.to(out.device)
            out = out * (scale if scale.dim() == 0 else scale.reshape(-1, *[1] * (out.dim() - 1)))
        return out.to(dtype)
    return weight.to(dtype)


def to_fp8_storage(state: dict, scaled: bool = False) -> dict:
    """``state`` stored the way fp8 files store it (for tests and benchmarks that write such files).

    Matrices become float8_e4m3fn; with ``scaled``, divided first by a per-tensor scale (max |w| / 448) saved
    as ``<layer>.scale_weight``, plus the ``scaled_fp8`` marker (ComfyUI's older scaled-fp8 form). Biases and
    norms stay as they are, as in ComfyUI's fp8 files.
    """
    out = {}
    for key, value in state.items():
        if value.dim() >= 2 and key.endswith("weight"):
            if not scaled:
                out[key] = value.to(torch.float8_e4m3fn)
            else:
                s = (value.abs().max().float() / 448.0).clamp_min(1e-12)
                out[key] = (value.float() / s).to(torch.float8_e4m3fn)
                out[key[: -len("weight")] + "scale_weight"] = s.reshape(())
        else:
            out[key] = value
    if scaled:
        out["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    return out
