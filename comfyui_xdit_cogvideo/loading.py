"""Load CogVideoX parts from a diffusers folder, single .safetensors files, or a tiny built-in model.

Every format a ComfyUI user keeps loads here (README, "Which files"): diffusers folders (sharded or not),
single transformer files with diffusers or ComfyUI-native names (``formats``), fp8-stored weights (upcast at
load, or kept in fp8 with per-layer upcast at compute), single VAE files, and T5-XXL single files from
``models/text_encoders``. Weights are read with safetensors (memory-mapped) straight into the target dtype and
device; the text encoder and VAE load only when first needed, since T5-XXL alone is 9 GB.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .construction import CONSTRUCTION_LOCK  # builds hold it exclusively (construction.py says why)
from .formats import (FP8_DTYPES, check_derivative, dequantize, native_to_diffusers, native_to_diffusers_key,
                      quant_formats, transformer_layout, upcast)
from .tiny import TINY_VARIANTS, ensure_tiny
from .variants import ModelError, ModelInfo, config_from_shapes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STORAGES = ("upcast", "fp8")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class ModelSource:
    """Where a model's parts live. ``path`` is 'tiny[-variant]', a diffusers folder or a transformer file.

    ``text_encoder`` is a T5 folder or a single T5 file (then ``tokenizer`` names a tokenizer folder when none
    lies beside it). ``storage`` says how fp8-stored transformer weights are kept: ``upcast`` to the compute
    dtype at load, or ``fp8`` in memory with each layer upcast when it computes (about half the weight memory).
    """

    path: str
    vae: str | None = None
    text_encoder: str | None = None
    tokenizer: str | None = None
    storage: str = "upcast"

    def resolve(self) -> "ResolvedSource":
        return ResolvedSource.of(self)

    def wire(self) -> dict:
        """The fields as a plain dict (what the pool sends to its workers)."""
        return {"path": self.path, "vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                "storage": self.storage}

    @classmethod
    def from_wire(cls, spec: dict) -> "ModelSource":
        return cls(spec["path"], vae=spec.get("vae"), text_encoder=spec.get("text_encoder"),
                   tokenizer=spec.get("tokenizer"), storage=spec.get("storage") or "upcast")


@dataclass(frozen=True)
class ResolvedSource:
    transformer: Path
    folder: Path | None
    vae: Path | None
    text_encoder: Path | None
    tokenizer: Path | None
    storage: str = "upcast"

    @classmethod
    def of(cls, source: ModelSource) -> "ResolvedSource":
        if source.storage not in STORAGES:
            raise ModelError(f"unknown weight storage {source.storage!r}; choose one of {', '.join(STORAGES)}")
        tokenizer = _opt(source.tokenizer)
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
            own_tokenizer = sub("tokenizer") if not source.text_encoder else _tokenizer_beside(source.text_encoder)
            return cls(p / "transformer", p, _opt(source.vae) or sub("vae"),
                       _opt(source.text_encoder) or sub("text_encoder"), tokenizer or own_tokenizer, source.storage)
        if p.suffix not in (".safetensors", ".sft"):
            raise ModelError(f"{str(p)!r} is not a .safetensors file; other formats (.pt, .bin, .gguf) are not "
                             "supported")
        return cls(p, None, _opt(source.vae), _opt(source.text_encoder),
                   tokenizer or _tokenizer_beside(source.text_encoder), source.storage)


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


def _lap(timings: dict | None, name: str, since: float, device=None) -> float:
    """Record seconds since ``since`` under ``name`` (synchronised on CUDA); returns now."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    now = time.perf_counter()
    if timings is not None:
        timings[name] = round(timings.get(name, 0.0) + now - since, 3)
    return now


def import_model_classes() -> None:
    """Import the diffusers and transformers classes the loaders build (1.7 s of a 2-core CPU's first load_s,
    torch._dynamo and torch._inductor included), for a process that loads a model next."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel  # noqa: F401
    from transformers import AutoTokenizer, T5EncoderModel  # noqa: F401


def load_transformer(resolved: ResolvedSource, dtype: torch.dtype, device: torch.device | str,
                     timings: dict | None = None, on_built: Callable[[object], object] | None = None):
    """(transformer, ModelInfo); weights go straight to ``device`` in ``dtype``.

    ``timings`` (a dict) receives where the seconds went, for the pool's status and the CLI summary: ``read_s``
    (headers, model built, weights read; a single file is read straight onto ``device``), then ``to_device_s``
    (a folder's copy onto ``device``) or ``convert_s`` (a single file's conversion to ``dtype``). ``on_built(model)``
    is called once the model is built (``CONSTRUCTION_LOCK`` released), before the bulk of the bytes move: work
    started there overlaps the copy."""
    from diffusers import CogVideoXTransformer3DModel

    mark = time.perf_counter()
    path = resolved.transformer
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{str(path)!r} has no config.json")
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            raise ModelError(f"{str(path)!r} holds no .safetensors weights (only safetensors are loaded)")
        for shard in weights:
            check_complete(shard)
        config = _read_config(path)
        check_derivative(config, str(path))
        with CONSTRUCTION_LOCK:
            model = CogVideoXTransformer3DModel.from_pretrained(path, torch_dtype=dtype, use_safetensors=True)
        mark = _lap(timings, "read_s", mark)
        if on_built is not None:
            on_built(model)
            mark = _lap(timings, "on_built_s", mark)
        model = model.to(device)
        _lap(timings, "to_device_s", mark, device)
        return model.eval().requires_grad_(False), ModelInfo.from_config(model.config)
    from accelerate import init_empty_weights

    header = read_transformer_header(path)
    with CONSTRUCTION_LOCK, init_empty_weights(include_buffers=False):
        model = CogVideoXTransformer3DModel(**header.config)
    if on_built is not None:
        on_built(model)
        mark = _lap(timings, "on_built_s", mark)
    weights, scales = read_transformer_weights(path, header, device)
    mark = _lap(timings, "read_s", mark, device)
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(weights), set(weights) - set(expected)
    if missing or unexpected:
        raise ModelError(f"{path.name}: weights do not fit the detected config {header.config} "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); a truncated or "
                         "modified file, or another model")
    for key, value in expected.items():
        if tuple(weights[key].shape) != tuple(value.shape):
            raise ModelError(f"{path.name}: {key} has shape {tuple(weights[key].shape)}, expected {tuple(value.shape)}")
    resident = resident_fp8_keys(weights, model) if resolved.storage == "fp8" else set()
    state = {k: v if k in resident else upcast(v, scales.get(k), dtype) for k, v in weights.items()}
    model.load_state_dict(state, assign=True, strict=False)
    model = model.to(device)
    if resident:
        keep_fp8(model, resident, scales, dtype)
    _lap(timings, "convert_s", mark, device)  # the weights were read onto the device: this is the dtype conversion
    return model.eval().requires_grad_(False), ModelInfo.from_config(header.config)


@dataclass(frozen=True)
class TransformerHeader:
    """What a single transformer file's header says: key prefix, name layout, rebuilt config, fp8 layers."""

    prefix: str
    layout: str
    config: dict
    quant: dict
    fp8: bool


_QUANT_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant")


def check_complete(path: Path) -> None:
    """Raise if a safetensors file is shorter than its header says (an interrupted download or copy)."""
    import struct

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(size, 100 << 20):
                raise ValueError
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, struct.error, KeyError, TypeError, IndexError):
        raise ModelError(f"cannot read {str(path)!r} as safetensors: the header is damaged or this is another "
                         "file format") from None
    if 8 + length + end > size:
        raise ModelError(f"{str(path)!r} is truncated: {size} bytes of {8 + length + end} (an interrupted download "
                         "or copy); download it again")


def read_transformer_header(path: Path) -> TransformerHeader:
    """Prefix, layout and config of a single transformer file from its header alone (no tensors are read)."""
    from safetensors import SafetensorError, safe_open

    check_complete(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            metadata = f.metadata()
            prefix, layout = transformer_layout(keys, path.name)
            own = [k for k in keys if k.startswith(prefix)]
            shapes = {k[len(prefix):]: tuple(f.get_slice(k).get_shape()) for k in own}
            dtypes = {f.get_slice(k).get_dtype() for k in own}
            quant = quant_formats([k[len(prefix):] for k in own], metadata, lambda k: f.get_tensor(prefix + k))
    except (OSError, SafetensorError) as error:
        raise ModelError(f"cannot read {str(path)!r} as safetensors: {error}") from None
    shapes = {k: v for k, v in shapes.items() if not k.endswith(_QUANT_SUFFIXES) and k != "scaled_fp8"}
    if layout == "native":
        renamed = {}
        for key, shape in shapes.items():
            new = native_to_diffusers_key(key)
            if new is None:
                raise ModelError(f"{path.name}: {key!r} is not a CogVideoX weight (ComfyUI-native names); a CogVideoX "
                                 "derivative (Fun, control, Tora) or another model, which is not supported")
            renamed[new] = shape
        shapes = renamed
    config_file = path.with_suffix(".json")
    config = json.loads(config_file.read_text()) if config_file.exists() else config_from_shapes(shapes)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    check_derivative(config, path.name)
    return TransformerHeader(prefix, layout, config, quant, bool(dtypes & {"F8_E4M3", "F8_E5M2"}))


def read_transformer_weights(path: Path, header: TransformerHeader, device) -> tuple[dict, dict]:
    """(weights with diffusers names in their stored dtype, fp8 scales by weight name)."""
    from safetensors.torch import load_file

    prefix = header.prefix
    state = {k[len(prefix):]: v for k, v in load_file(str(path), device=str(device)).items() if k.startswith(prefix)}
    weights, scales = dequantize(state, header.quant, path.name)
    if header.layout == "native":
        weights = native_to_diffusers(weights)
        scales = {native_to_diffusers_key(k): v for k, v in scales.items()}
    return weights, scales


def resident_fp8_keys(weights: dict, model) -> set[str]:
    """fp8-stored weights of the transformer blocks' linear layers (the bulk of the model) to keep in fp8."""
    linears = {f"{name}.weight" for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks.")}
    return {k for k in linears if k in weights and weights[k].dtype in FP8_DTYPES}


class _Fp8Weight(torch.nn.Module):
    """Parametrization: the stored fp8 weight, times its scale, in the compute dtype, made when a layer runs."""

    def __init__(self, scale: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("scale", scale, persistent=False)
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return upcast(stored, self.scale, self.dtype)


def keep_fp8(model, keys: set[str], scales: dict, dtype: torch.dtype) -> None:
    """Keep ``keys`` (linear weights) in fp8; ``module.weight`` upcasts on each use, so no code path changes."""
    from torch.nn.utils import parametrize

    for key in keys:
        module = model.get_submodule(key.rsplit(".", 1)[0])
        scale = scales.get(key)
        parametrize.register_parametrization(module, "weight", _Fp8Weight(
            None if scale is None else scale.to(module.weight.device), dtype), unsafe=True)
    model._xdit_fp8_resident = True


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


_VAE_PREFIXES = ("vae.", "first_stage_model.", "")
# (scaling_factor, invert_scale_latents) of the published VAE configs, by transformer width and variant.
_VAE_SCALE = {1920: 1.15258426, 3072: 0.7}


def vae_settings(info: ModelInfo) -> tuple[float, bool]:
    """The published (scaling_factor, invert_scale_latents) for ``info``'s model; tiny models use diffusers'
    defaults, as tiny.py builds them."""
    scale = _VAE_SCALE.get(info.heads * info.head_dim, 1.15258426)
    return scale, info.version == "1.5" and info.image_to_video


def latent_scaling(source: ModelSource) -> float:
    """The VAE scaling factor between diffusers' latents (scaled, what the transformer sees) and ComfyUI's LATENT
    (the VAE's raw latents, which core's VAE Decode takes): from the VAE's config, else the published value."""
    resolved = source.resolve()
    vae = resolved.vae
    if vae is not None:
        config = vae / "config.json" if vae.is_dir() else vae.with_suffix(".json")
        if config.exists() and json.loads(config.read_text()).get("scaling_factor"):
            return float(json.loads(config.read_text())["scaling_factor"])
    return vae_settings(read_model_info(source))[0]


def check_vae(vae, info: ModelInfo, name: str, from_config: bool) -> None:
    """Raise when the VAE cannot serve this transformer (latent channels, or a published config of another model)."""
    channels = vae.config.latent_channels
    if channels != info.latent_channels:
        raise ModelError(f"{name} has {channels} latent channels but this {info.variant} transformer uses "
                         f"{info.latent_channels}; choose the CogVideoX VAE (cogvideox_vae / the model's vae/)")
    width = info.heads * info.head_dim
    if not from_config or width not in _VAE_SCALE:
        return
    scale, invert = vae_settings(info)
    got_scale = float(vae.config.scaling_factor)
    got_invert = bool(getattr(vae.config, "invert_scale_latents", False))
    if abs(got_scale - scale) > 1e-6 or (info.image_to_video and got_invert != invert):
        family = {1.15258426: "CogVideoX-2b"}.get(round(got_scale, 8), "CogVideoX-5b / 1.5")
        raise ModelError(
            f"{name} is configured for another CogVideoX model (scaling_factor {got_scale}, invert_scale_latents "
            f"{got_invert}: {family}{' 1.0' if not got_invert else ' 1.5 I2V'}) but this transformer is "
            f"{info.variant}, which needs scaling_factor {scale}, invert_scale_latents {invert}; use the VAE folder "
            "of this model, or the single VAE file (the weights are shared; the settings come from the transformer)")


def _vae_layout(keys: list[str], name: str) -> str:
    for prefix in _VAE_PREFIXES:
        if prefix + "decoder.conv_in.conv.weight" in keys and \
                prefix + "decoder.mid_block.resnets.0.norm1.norm_layer.weight" in keys:
            if prefix + "encoder.conv_in.conv.weight" not in keys:
                raise ModelError(f"{name} has a CogVideoX decoder but no encoder; the full VAE is needed "
                                 "(cogvideox_vae_bf16 or the model's vae/)")
            return prefix
    if any(k.endswith("decoder.conv_in.weight") for k in keys):
        what = "an image VAE (SD, SDXL, SD3 or Flux)"
    elif any(k.endswith("decoder.conv1.weight") or k.endswith("encoder.conv1.weight") for k in keys):
        what = "a Wan VAE"
    elif any(k.endswith("decoder.conv_in.conv.weight") for k in keys):
        what = "another video VAE (HunyuanVideo, Mochi or LTX)"
    else:
        try:
            transformer_layout(keys, name)
            what = "a CogVideoX transformer"
        except ModelError:
            what = "not a VAE"
    raise ModelError(f"{name} is {what}, not the CogVideoX VAE; choose cogvideox_vae (bf16/fp32) or the model's vae/")


def vae_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict:
    """An AutoencoderKLCogVideoX config from the weights' shapes (norm groups: the real VAE's 32)."""
    blocks = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down_blocks."))
    channels = tuple(shapes[f"encoder.down_blocks.{i}.resnets.0.conv2.conv.weight"][0] for i in range(blocks))
    layers = 1 + max(int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down_blocks.0.resnets."))
    return dict(
        in_channels=shapes["encoder.conv_in.conv.weight"][1], out_channels=shapes["decoder.conv_out.conv.weight"][0],
        block_out_channels=channels, layers_per_block=layers,
        latent_channels=shapes["encoder.conv_out.conv.weight"][0] // 2,
        down_block_types=("CogVideoXDownBlock3D",) * blocks, up_block_types=("CogVideoXUpBlock3D",) * blocks,
    )


def load_vae(resolved: ResolvedSource, dtype: torch.dtype, device: torch.device | str, info: ModelInfo):
    """The CogVideoX VAE from a diffusers vae/ folder or a single file (diffusers names, which core also uses)."""
    from diffusers import AutoencoderKLCogVideoX

    path = resolved.vae
    if path is None:
        raise ModelError("this model has no VAE; give a vae path (a diffusers vae/ folder or a .safetensors file)")
    if path.is_dir():
        with CONSTRUCTION_LOCK:
            vae = AutoencoderKLCogVideoX.from_pretrained(path, torch_dtype=dtype, use_safetensors=True)
        check_vae(vae, info, str(path), from_config=True)
        return vae.to(device).eval().requires_grad_(False)
    if path.suffix not in (".safetensors", ".sft"):  # never a pickle (.pt, .bin, .ckpt): torch.load could run code
        raise ModelError(f"vae {str(path)!r} is not a .safetensors file; other formats are not loaded")
    from accelerate import init_empty_weights
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    check_complete(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            prefix = _vae_layout(keys, path.name)
            shapes = {k[len(prefix):]: tuple(f.get_slice(k).get_shape()) for k in keys if k.startswith(prefix)}
    except (OSError, SafetensorError) as error:
        raise ModelError(f"cannot read {str(path)!r} as safetensors: {error}") from None
    sidecar = path.with_suffix(".json")
    scale, invert = vae_settings(info)
    config = dict(vae_config_from_shapes(shapes), scaling_factor=scale, invert_scale_latents=invert)
    if sidecar.exists():
        config.update({k: v for k, v in json.loads(sidecar.read_text()).items() if not k.startswith("_")})
    with CONSTRUCTION_LOCK, init_empty_weights(include_buffers=False):
        vae = AutoencoderKLCogVideoX(**config)
    state = {k[len(prefix):]: v for k, v in load_file(str(path), device=str(device)).items() if k.startswith(prefix)}
    expected = vae.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise ModelError(f"{path.name}: not a complete CogVideoX VAE (missing {sorted(missing)[:5]}, unexpected "
                         f"{sorted(unexpected)[:5]})")
    vae.load_state_dict({k: upcast(v, None, dtype) for k, v in state.items()}, assign=True)
    check_vae(vae, info, path.name, from_config=sidecar.exists())
    return vae.to(device).eval().requires_grad_(False)


def load_text_encoder(resolved: ResolvedSource, dtype: torch.dtype, device: torch.device | str):
    """(tokenizer, T5 encoder) for prompts; only the leader rank loads them."""
    from transformers import AutoTokenizer, T5EncoderModel

    if resolved.text_encoder is None or resolved.tokenizer is None:
        raise ModelError("this model has no text encoder/tokenizer; pass prompt embeddings instead "
                         "(--embeds, or the ComfyUI text encode node) or give a text_encoder folder or T5 file "
                         "with a tokenizer folder")
    tokenizer = AutoTokenizer.from_pretrained(resolved.tokenizer)
    if resolved.text_encoder.is_dir():
        with CONSTRUCTION_LOCK:
            encoder = T5EncoderModel.from_pretrained(resolved.text_encoder, torch_dtype=dtype, use_safetensors=True)
        encoder = encoder.to(device)
    else:
        from .t5 import load_t5_file

        with CONSTRUCTION_LOCK:
            encoder = load_t5_file(resolved.text_encoder, dtype, device)
    return tokenizer, encoder.eval().requires_grad_(False)


def read_model_info(source: ModelSource) -> ModelInfo:
    """The model's ModelInfo from its config or the weights' header alone (no tensors are read)."""
    resolved = source.resolve()
    path = resolved.transformer
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{str(path)!r} has no config.json")
        config = _read_config(path)
        check_derivative(config, str(path))
        info = ModelInfo.from_config(config)
    else:
        info = ModelInfo.from_config(read_transformer_header(path).config)
    tiny = source.path == "tiny" or source.path.startswith("tiny-")
    return replace(info, label=source.path if tiny else Path(source.path).expanduser().name)
