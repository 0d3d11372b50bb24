"""Text encoding for CogVideoX: T5-XXL embeddings of exactly 226 tokens, as diffusers' CogVideoXPipeline makes them.

Two ways:
* ``XDiTCogVideoTextEncode`` uses a CLIP from ComfyUI's own ``CLIPLoader`` (a T5-XXL file such as
  ``t5xxl_fp16.safetensors``; type ``sd3``, or ``cogvideox`` on a ComfyUI with native CogVideoX). diffusers tokenizes with ``max_length=226, truncation=True,
  padding="max_length"`` and runs T5 *without* an attention mask; this node does the same with ComfyUI's
  tokenizer and T5: the token list is cut to 225 tokens + EOS or padded to 226, and T5 attention masks are
  switched off for the call (CLIPLoader type ``mochi`` would otherwise mask the padding).
* ``XDiTCogVideoTextEncodeModelT5`` runs the model folder's own T5 (``text_encoder/`` + ``tokenizer/``) in the worker
  pool (``pool.encode_prompt``), bit-for-bit the diffusers code path.

Both output core ``CONDITIONING`` ([[cond [1, 226, 4096], {"pooled_output": ...}]]), so core conditioning nodes
still apply. The sampler also accepts CONDITIONING from core's ``CLIPTextEncode`` and normalizes it to 226 tokens
(truncating, or padding with zeros) — close to, but not exactly, what diffusers computes; use these nodes for
exact results.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from .common import CATEGORY, ModelType, check_parallel, get_pool, log

TEXT_TOKENS = 226
T5_END, T5_PAD = 1, 0


def fit_tokens(batch: list, length: int = TEXT_TOKENS) -> list:
    """One tokenized sequence [(token, weight[, word_id]), ...] cut or padded to ``length`` the way the HF
    tokenizer does with truncation (the last slot keeps the EOS token) and ``padding="max_length"``."""
    batch = list(batch)
    word_ids = (0,) if batch and len(batch[0]) > 2 else ()
    if len(batch) > length:
        batch = batch[: length - 1] + [(T5_END, 1.0) + word_ids]
    elif len(batch) < length:
        batch = batch + [(T5_PAD, 1.0) + word_ids] * (length - len(batch))
    return batch


def _t5_modules(clip) -> list:
    """ComfyUI T5 encoder wrappers inside a CLIP (SDClipModel instances with T5's special tokens)."""
    found = []
    root = getattr(clip, "cond_stage_model", None)
    if root is None or not hasattr(root, "modules"):
        return found
    for module in root.modules():
        special = getattr(module, "special_tokens", None)
        if isinstance(special, dict) and special.get("end") == T5_END and special.get("pad") == T5_PAD and \
                hasattr(module, "enable_attention_masks"):
            found.append(module)
    return found


def encode_with_clip(clip, text: str, length: int = TEXT_TOKENS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cond [1, length, D], pooled) for ``text`` through a ComfyUI T5-XXL CLIP, diffusers-style."""
    tokens = clip.tokenize(text, tokenizer_options={"t5xxl_min_length": length})
    if "t5xxl" not in tokens:
        raise ValueError(
            "this CLIP has no T5-XXL tokenizer (keys: %s). Load t5xxl_fp16.safetensors (or fp8) with CLIPLoader, "
            "type 'sd3' (or 'cogvideox')." % ", ".join(sorted(tokens)))
    tokens = dict(tokens)
    tokens["t5xxl"] = [fit_tokens(batch, length) for batch in tokens["t5xxl"][:1]]
    for key in list(tokens):
        if key != "t5xxl":
            tokens[key] = []  # SD3-style CLIPs: skip CLIP-L/G, CogVideoX reads T5 alone
    masked = [m for m in _t5_modules(clip) if m.enable_attention_masks]
    for module in masked:  # diffusers runs T5 without an attention mask (padding is attended to)
        module.enable_attention_masks = False
    try:
        out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    finally:
        for module in masked:
            module.enable_attention_masks = True
    cond = out["cond"]
    if cond.shape[1] != length:  # e.g. a CLIP that prepends other encoders' tokens
        cond = normalize_embeds(cond, length)
    return cond, out.get("pooled_output")


def normalize_embeds(embeds: torch.Tensor, length: int = TEXT_TOKENS) -> torch.Tensor:
    """[1, N, D] -> [1, length, D]: truncate, or pad with zeros."""
    if embeds.dim() == 2:
        embeds = embeds.unsqueeze(0)
    if embeds.dim() != 3:
        raise ValueError(f"text embeddings must be [1, tokens, dim], got {list(embeds.shape)}")
    embeds = embeds[:1]
    n = embeds.shape[1]
    if n > length:
        return embeds[:, :length]
    if n < length:
        pad = embeds.new_zeros((1, length - n, embeds.shape[2]))
        return torch.cat([embeds, pad], dim=1)
    return embeds


def conditioning_to_embeds(conditioning, name: str, length: int = TEXT_TOKENS,
                           dim: int | None = None) -> torch.Tensor:
    """Core CONDITIONING ([[cond, dict], ...]) -> the [1, length, D] float32 CPU tensor the sampler sends."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError(f"{name}: expected CONDITIONING (from a text encode node), got {type(conditioning).__name__}")
    entry = conditioning[0]
    cond = entry[0] if isinstance(entry, (list, tuple)) else entry
    if not isinstance(cond, torch.Tensor):
        raise ValueError(f"{name}: CONDITIONING holds no tensor")
    if len(conditioning) > 1:
        log.warning("%s: CogVideoX takes one text embedding; using the first of %d conditioning entries",
                    name, len(conditioning))
    if dim is not None and cond.shape[-1] != dim:
        raise ValueError(
            f"{name}: the text embedding has width {cond.shape[-1]} but this model expects {dim} (T5-XXL). "
            "Encode with 'xDiT CogVideoX Text Encode (CLIP)' from a T5-XXL CLIPLoader (type sd3), or with "
            "'xDiT CogVideoX Text Encode (Model T5)'.")
    if cond.shape[-2] != length:
        log.info("%s: %d text tokens normalized to %d (truncated or zero-padded)", name, cond.shape[-2], length)
    return normalize_embeds(cond, length).detach().float().cpu().contiguous()


def _conditioning(embeds: torch.Tensor, pooled=None) -> list:
    return [[embeds, {"pooled_output": pooled}]]


class TextEncodeCLIP(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XDiTCogVideoTextEncode",
            display_name="xDiT CogVideoX Text Encode (CLIP)",
            category=CATEGORY,
            description=("Encodes a prompt with a T5-XXL text encoder loaded by ComfyUI's CLIPLoader (type sd3) into "
                         "the 226-token embedding CogVideoX expects, exactly as diffusers does (truncate to 226 "
                         "tokens, no attention mask)."),
            inputs=[
                io.Clip.Input("clip", tooltip=(
                    "T5-XXL from CLIPLoader: models/text_encoders/t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn), "
                    "type 'sd3', or 'cogvideox' where ComfyUI has native CogVideoX.")),
                io.String.Input("text", multiline=True, dynamic_prompts=True, default="", tooltip=(
                    "The prompt. CogVideoX was trained on long, detailed captions; only the first 225 T5 tokens "
                    "(about 170 words) are used.")),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning", tooltip="[1, 226, 4096] T5 embedding.")],
        )

    @classmethod
    def execute(cls, clip, text="") -> io.NodeOutput:
        if clip is None:
            raise RuntimeError("clip input is invalid: None. Connect a CLIPLoader with a T5-XXL file (type sd3).")
        cond, pooled = encode_with_clip(clip, text)
        return io.NodeOutput(_conditioning(cond, pooled))


class TextEncodeModelT5(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from .common import ParallelType

        return io.Schema(
            node_id="XDiTCogVideoTextEncodeModelT5",
            display_name="xDiT CogVideoX Text Encode (Model T5)",
            category=CATEGORY,
            description=("Encodes prompt and negative prompt with the model folder's own T5 (text_encoder/ + "
                         "tokenizer/) inside the worker pool, exactly like diffusers' CogVideoXPipeline."),
            inputs=[
                ModelType.Input("model", tooltip="From 'xDiT CogVideoX Model Loader'; its folder needs text_encoder/ and tokenizer/."),
                io.String.Input("prompt", multiline=True, dynamic_prompts=True, default="", tooltip=(
                    "The prompt (first 225 T5 tokens are used).")),
                io.String.Input("negative_prompt", multiline=True, dynamic_prompts=True, default="", tooltip=(
                    "What to steer away from (used when guidance > 1). CogVideoX's reference code leaves it empty.")),
                ParallelType.Input("parallel", optional=True, tooltip=(
                    "Connect the same Parallel Config as the sampler so the pool starts once on the right devices.")),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="[1, 226, D] embedding of the prompt."),
                io.Conditioning.Output(display_name="negative", tooltip="[1, 226, D] embedding of the negative prompt."),
            ],
        )

    @classmethod
    def execute(cls, model, prompt="", negative_prompt="", parallel=None) -> io.NodeOutput:
        if parallel is not None:
            check_parallel(parallel, model)  # a layout the sampler would refuse must not restart the pool here
        pool = get_pool(parallel.devices if parallel is not None else None)
        positive, negative = pool.encode_prompt(model, prompt, negative_prompt)
        return io.NodeOutput(_conditioning(positive.float().cpu()), _conditioning(negative.float().cpu()))
