"""Load CogVideoX parts from a diffusers folder, a single transformer .safetensors, or a tiny built-in model.

Weights are read with safetensors (memory-mapped) straight into the target dtype and device; the text encoder
and VAE load only when first needed, since T5-XXL alone is 9 GB.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .tiny import TINY_VARIANTS, ensure_tiny
from .variants import ModelError, ModelInfo, config_from_shapes, strip_prefix

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class ModelSource:
    """Where a model's parts live. ``path`` is 'tiny[-variant]', a diffusers folder or a transformer file."""

    path: str
    vae: str | None = None
    text_encoder: str | None = None

    def resolve(self) -> "ResolvedSource":
        return ResolvedSource.of(self)


@dataclass(frozen=True)
class ResolvedSource:
    transformer: Path
    folder: Path | None
    vae: Path | None
    text_encoder: Path | None
    tokenizer: Path | None

    @classmethod
    def of(cls, source: ModelSource) -> "ResolvedSource":
        path = source.path
        if path == "tiny" or path.startswith("tiny-"):
            variant = path[5:] or "2b"
            if variant not in TINY_VARIANTS:
                raise ModelError(f"unknown tiny model {path!r}; choose tiny or tiny-{{{','.join(TINY_VARIANTS)}}}")
            path = str(ensure_tiny(variant))
        p = Path(path).expanduser()
        if not p.exists():
            raise ModelError(f"model path {str(p)!r} does not exist; give a diffusers folder (with transformer/), "
                             "a transformer .safetensors file, or 'tiny'")
        if p.is_dir():
            if not (p / "transformer").is_dir():
                raise ModelError(f"{str(p)!r} has no transformer/ folder; a diffusers CogVideoX folder holds "
                                 "transformer/, scheduler/ and usually vae/, text_encoder/, tokenizer/")
            sub = lambda name: p / name if (p / name).exists() else None  # noqa: E731
            return cls(p / "transformer", p, _opt(source.vae) or sub("vae"),
                       _opt(source.text_encoder) or sub("text_encoder"),
                       sub("tokenizer") if not source.text_encoder else _tokenizer_beside(source.text_encoder))
        if p.suffix != ".safetensors":
            raise ModelError(f"{str(p)!r} is not a .safetensors file; other formats (.pt, .bin, .gguf) are not supported")
        return cls(p, None, _opt(source.vae), _opt(source.text_encoder), _tokenizer_beside(source.text_encoder))


def _opt(path: str | None) -> Path | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"path {str(p)!r} does not exist")
    return p


def _tokenizer_beside(text_encoder: str | None) -> Path | None:
    if text_encoder is None:
        return None
    p = Path(text_encoder).expanduser()
    for candidate in (p / "tokenizer", p.parent / "tokenizer", p):
        if (candidate / "tokenizer_config.json").exists():
            return candidate
    return None


def _read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def load_transformer(resolved: ResolvedSource, dtype: torch.dtype, device: torch.device | str):
    """(transformer, ModelInfo); weights go straight to ``device`` in ``dtype``."""
    from diffusers import CogVideoXTransformer3DModel

    path = resolved.transformer
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{str(path)!r} has no config.json")
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            raise ModelError(f"{str(path)!r} holds no .safetensors weights (only safetensors are loaded)")
        model = CogVideoXTransformer3DModel.from_pretrained(path, torch_dtype=dtype, use_safetensors=True).to(device)
        return model.eval().requires_grad_(False), ModelInfo.from_config(model.config)
    from safetensors.torch import load_file

    from accelerate import init_empty_weights

    prefix, config = _file_config(path)
    with init_empty_weights(include_buffers=False):
        model = CogVideoXTransformer3DModel(**config)
    state = {k[len(prefix):]: v for k, v in load_file(str(path), device=str(device)).items() if k.startswith(prefix)}
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ModelError(f"{path.name}: weights do not fit the detected config {config} "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    for key, value in model.state_dict().items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ModelError(f"{path.name}: {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=False)
    model = model.to(device)
    return model.eval().requires_grad_(False), ModelInfo.from_config(config)


def load_scheduler(resolved: ResolvedSource, info: ModelInfo, kind: str | None):
    """The model's scheduler (DDIM or DPM, from its config or the published defaults)."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    classes = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}
    if kind is not None and kind not in classes:
        raise ModelError(f"unknown scheduler {kind!r}; choose ddim or dpm")
    folder = resolved.folder / "scheduler" if resolved.folder else None
    if folder is not None and (folder / "scheduler_config.json").exists():
        config = json.loads((folder / "scheduler_config.json").read_text())
        default = "dpm" if "DPM" in config.get("_class_name", "") else "ddim"
    else:
        from .tiny import _SCHEDULER

        # Published configs: the 2b (the only model with sin-cos positions) shifts SNR by 3, the rest by 1.
        config = dict(_SCHEDULER, snr_shift_scale=1.0 if info.rotary else 3.0)
        default = "ddim"
    return classes[kind or default].from_config(config)


def load_vae(resolved: ResolvedSource, dtype: torch.dtype, device: torch.device | str, info: ModelInfo):
    from diffusers import AutoencoderKLCogVideoX

    path = resolved.vae
    if path is None:
        raise ModelError("this model has no VAE; give a vae path (a diffusers vae/ folder or a .safetensors file)")
    if path.is_dir():
        vae = AutoencoderKLCogVideoX.from_pretrained(path, torch_dtype=dtype, use_safetensors=True)
    else:
        if path.suffix != ".safetensors":  # never a pickle (.pt, .bin, .ckpt): torch.load could run code
            raise ModelError(f"vae {str(path)!r} is not a .safetensors file; other formats are not loaded")
        config = {"scaling_factor": 1.15258426 if info.variant.startswith("2b") else 0.7,
                  "invert_scale_latents": info.variant == "1.5-5b-i2v"}
        vae = AutoencoderKLCogVideoX.from_single_file(str(path), torch_dtype=dtype, **config)
    return vae.to(device).eval().requires_grad_(False)


def load_text_encoder(resolved: ResolvedSource, dtype: torch.dtype, device: torch.device | str):
    """(tokenizer, T5 encoder) for prompts; only the leader rank loads them."""
    from transformers import AutoTokenizer, T5EncoderModel

    if resolved.text_encoder is None or resolved.tokenizer is None:
        raise ModelError("this model has no text encoder/tokenizer; pass prompt embeddings instead "
                         "(--embeds, or the ComfyUI text encode node) or give a text_encoder folder")
    tokenizer = AutoTokenizer.from_pretrained(resolved.tokenizer)
    encoder = T5EncoderModel.from_pretrained(resolved.text_encoder, torch_dtype=dtype, use_safetensors=True).to(device)
    return tokenizer, encoder.eval().requires_grad_(False)


def read_model_info(source: ModelSource) -> ModelInfo:
    """The model's ModelInfo from its config or the weights' header alone (no tensors are read)."""
    resolved = source.resolve()
    path = resolved.transformer
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{str(path)!r} has no config.json")
        info = ModelInfo.from_config(_read_config(path))
    else:
        info = ModelInfo.from_config(_file_config(path)[1])
    tiny = source.path == "tiny" or source.path.startswith("tiny-")
    return replace(info, label=source.path if tiny else Path(source.path).expanduser().name)


def _file_config(path: Path) -> tuple[str, dict]:
    """(key prefix, transformer config) of a single .safetensors file: from ``<file>.json`` or the shapes."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            prefix = strip_prefix(keys)
            shapes = {k[len(prefix):]: tuple(f.get_slice(k).get_shape()) for k in keys if k.startswith(prefix)}
    except (OSError, SafetensorError) as error:
        raise ModelError(f"cannot read {str(path)!r} as safetensors: {error}") from None
    config_file = path.with_suffix(".json")
    config = json.loads(config_file.read_text()) if config_file.exists() else config_from_shapes(shapes)
    return prefix, {k: v for k, v in config.items() if not k.startswith("_")}
