"""Where model files live inside ComfyUI, and the model-loader node.

Models are looked up in ``models/CogVideo`` (registered here; the folder kijai's CogVideoX wrapper also uses),
``models/diffusers`` (core's folder for diffusers-format models) and core's ``models/diffusion_models`` (single
files, where core's UNETLoader reads them too), plus any extra paths from ``extra_model_paths.yaml`` for those
names. Entries are diffusers-format folders (with ``transformer/``) and single transformer ``.safetensors`` files
with diffusers or ComfyUI-native names (only files whose header holds a CogVideoX transformer are listed). VAEs
come from ``models/vae``, T5 from ``models/text_encoders`` (folders, or files such as ``t5xxl_fp16.safetensors``).
"""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from .common import ATTENTION_BACKENDS, CATEGORY, PRECISIONS, ModelType, check_choice, engine

MODEL_FOLDERS = ("CogVideo", "diffusers", "diffusion_models")
FROM_MODEL = "(from model folder)"
SAFETENSORS = (".safetensors", ".sft")
WEIGHT_STORAGE = ["upcast", "fp8"]
_MAX_DEPTH = 3
_HEADER_CACHE: dict[tuple[str, float, int], frozenset[str]] = {}


def register_folders() -> None:
    """Make ``CogVideo`` a known model folder (``diffusers`` is core's); keep paths from extra_model_paths.yaml."""
    default = os.path.join(folder_paths.models_dir, "CogVideo")
    if "CogVideo" in folder_paths.folder_names_and_paths:
        paths, _ = folder_paths.folder_names_and_paths["CogVideo"]
        if default not in paths:
            paths.append(default)
    else:
        folder_paths.folder_names_and_paths["CogVideo"] = ([default], set(SAFETENSORS) | {"folder"})


def _roots(folder: str) -> list[str]:
    try:
        return [p for p in folder_paths.get_folder_paths(folder) if os.path.isdir(p)]
    except KeyError:
        return []


def _scan(root: str, depth: int = 0, prefix: str = ""):
    """Yield (relative name, kind) for diffusers folders and safetensors files below ``root``."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name.lower())
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        name = f"{prefix}{entry.name}"
        if entry.is_dir():
            if os.path.isdir(os.path.join(entry.path, "transformer")):
                yield name, "folder"
            elif depth + 1 < _MAX_DEPTH:
                yield from _scan(entry.path, depth + 1, name + "/")
        elif entry.name.lower().endswith(SAFETENSORS):
            yield name, "file"


def header_keys(path: str) -> frozenset[str]:
    """Tensor names in a safetensors file's header (cached by size and mtime); empty if it cannot be read."""
    import json
    import struct

    try:
        stat = os.stat(path)
        key = (path, stat.st_mtime, stat.st_size)
        if key not in _HEADER_CACHE:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                names = json.loads(f.read(length)) if length <= min(stat.st_size, 100 << 20) else {}
            _HEADER_CACHE[key] = frozenset(k for k in names if k != "__metadata__")
        return _HEADER_CACHE[key]
    except (OSError, ValueError, struct.error):
        return frozenset()


def file_kind(path: str) -> str:
    """'cogvideox', 't5', 'vae' or 'other' from a safetensors header alone."""
    keys = header_keys(path)
    if any(k.endswith("patch_embed.proj.weight") for k in keys) and \
            any(k.endswith("blocks.0.norm1.linear.weight") for k in keys):
        return "cogvideox"
    if any(k.endswith("encoder.block.0.layer.0.SelfAttention.q.weight") for k in keys):
        return "t5"
    if any(k.endswith("decoder.mid_block.resnets.0.norm1.norm_layer.weight") for k in keys):
        return "vae"
    return "other"


def list_models() -> list[str]:
    """Model choices: diffusers folders and CogVideoX transformer files in models/CogVideo, models/diffusers and
    models/diffusion_models (other models' files there are left out)."""
    names: list[str] = []
    for folder in MODEL_FOLDERS:
        for root in _roots(folder):
            for name, kind in _scan(root):
                if kind == "file" and file_kind(os.path.join(root, name)) != "cogvideox":
                    continue  # VAEs, T5 and other models' files (Flux, Wan, ...) are not offered here
                if name not in names:
                    names.append(name)
    return names


def list_vaes() -> list[str]:
    names = [FROM_MODEL]
    for folder in ("vae",) + MODEL_FOLDERS:
        for root in _roots(folder):
            for name, kind in _scan(root):
                if kind == "file" and file_kind(os.path.join(root, name)) == "vae":
                    names.append(name)
            if folder != "vae":
                for name, kind in _scan(root):
                    if kind == "folder" and os.path.isdir(os.path.join(root, name, "vae")):
                        names.append(f"{name}/vae")
    return list(dict.fromkeys(names))


def list_text_encoders() -> list[str]:
    """T5 encoders: HF-format folders (config.json) and single T5 files (t5xxl_fp16, t5xxl_fp8_e4m3fn[_scaled])
    in text_encoders, or a model folder's own text_encoder/."""
    names = [FROM_MODEL]
    for root in _roots("text_encoders"):
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name.lower())
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir() and os.path.exists(os.path.join(entry.path, "config.json")):
                names.append(entry.name)
            elif entry.name.lower().endswith(SAFETENSORS) and file_kind(entry.path) == "t5":
                names.append(entry.name)
    for folder in MODEL_FOLDERS:
        for root in _roots(folder):
            for name, kind in _scan(root):
                if kind == "folder" and os.path.isdir(os.path.join(root, name, "text_encoder")):
                    names.append(f"{name}/text_encoder")
    return list(dict.fromkeys(names))


def resolve(name: str, folders: tuple[str, ...]) -> str | None:
    """Absolute path of a listed entry (file or folder), searching ``folders`` in order."""
    import ntpath

    if (not name or os.path.isabs(name) or ntpath.splitdrive(name)[0] or name.startswith(("/", "\\"))
            or ".." in name.replace("\\", "/").split("/")):
        return None  # absolute, drive-relative (C:x on Windows) or climbing out: never a listed entry
    for folder in folders:
        for root in _roots(folder):
            base = os.path.abspath(root)
            path = os.path.abspath(os.path.join(base, name))
            if os.path.commonpath([base, path]) != base:
                continue
            if os.path.exists(path):
                return path
    return None


class ModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XDiTCogVideoModelLoader",
            display_name="xDiT CogVideoX Model Loader",
            category=CATEGORY,
            description=("Chooses a CogVideoX model for the multi-GPU worker pool. Nothing is loaded here: the pool's "
                         "worker processes load the weights themselves (memory-mapped) when the sampler first runs, "
                         "and keep them resident between jobs."),
            inputs=[
                io.Combo.Input("model", options=list_models(), tooltip=(
                    "A diffusers-format CogVideoX folder (transformer/, scheduler/, vae/, text_encoder/, tokenizer/) "
                    "or a single transformer .safetensors file (diffusers or ComfyUI-native names, bf16 or fp8), from "
                    "models/CogVideo, models/diffusers or models/diffusion_models. "
                    "Supported: CogVideoX-2b, -5b, -5b-I2V, CogVideoX1.5-5b, -5b-I2V.")),
                io.Combo.Input("vae", options=list_vaes(), default=FROM_MODEL, tooltip=(
                    "The CogVideoX VAE (needed to decode, and to encode the start image for I2V). "
                    f"'{FROM_MODEL}' uses the model folder's vae/; pick a file from models/vae or models/CogVideo "
                    "for single-file transformers.")),
                io.Combo.Input("text_encoder", options=list_text_encoders(), default=FROM_MODEL, tooltip=(
                    "The T5 text encoder used by 'xDiT CogVideoX Text Encode (Model T5)': a T5 folder or a file from "
                    "models/text_encoders (t5xxl_fp16, t5xxl_fp8_e4m3fn, ..._scaled; the same files core's "
                    f"CLIPLoader reads). '{FROM_MODEL}' uses the model folder's text_encoder/ and tokenizer/. Not "
                    "needed when you encode text with ComfyUI's CLIPLoader + a text encode node.")),
                io.Combo.Input("precision", options=PRECISIONS, default="bf16", tooltip=(
                    "Weight and compute dtype on the workers. bf16 is what CogVideoX was trained in (2b also runs "
                    "in fp16); fp32 is for CPU tests and exact comparisons.")),
                io.Combo.Input("attention", options=ATTENTION_BACKENDS, default="auto", tooltip=(
                    "Attention kernel on the workers. auto = the fastest installed for the device: flash-attn-4 "
                    "(fa4) on Hopper/Blackwell when installed, else cuDNN SDPA; on CPU an exact kernel with "
                    "log-sum-exp (math).")),
                io.Combo.Input("fp8_weights", options=WEIGHT_STORAGE, default="upcast", optional=True, tooltip=(
                    "Only for files whose weights are stored in fp8 (*_fp8_e4m3fn): 'upcast' converts them to the "
                    "precision above at load (same memory as bf16); 'fp8' keeps the transformer blocks' linear "
                    "weights in fp8 and upcasts one layer at a time when it computes (about half the weight "
                    "memory, slightly slower).")),
            ],
            outputs=[ModelType.Output(display_name="model", tooltip=(
                "A handle on the model (paths and settings, no weights) for the sampler, decode and text encode."))],
        )

    @classmethod
    def validate_inputs(cls, model=None):
        # ComfyUI files a failed validate_inputs under every argument it declares: declare only ``model``, whose
        # message says where the files go. vae/text_encoder/precision/attention/fp8_weights are combos that ComfyUI
        # 0.33 checks itself, per input; execute checks them again (0.3.x does not check V3 combos).
        return check_model(model) or True

    @classmethod
    def execute(cls, model, vae=FROM_MODEL, text_encoder=FROM_MODEL, precision="bf16", attention="auto",
                fp8_weights="upcast") -> io.NodeOutput:
        for name, value, options in (("precision", precision, PRECISIONS), ("attention", attention, ATTENTION_BACKENDS),
                                     ("fp8_weights", fp8_weights, WEIGHT_STORAGE)):
            if error := check_choice(name, value, options):
                raise ValueError(error)
        return io.NodeOutput(build_spec(model, vae, text_encoder, precision, attention, fp8_weights))


def comfy_t5_tokenizer() -> str | None:
    """ComfyUI's own T5 tokenizer folder (comfy/text_encoders/t5_tokenizer), which its T5-XXL files are used with."""
    try:
        import comfy.text_encoders
    except ImportError:
        return None
    for root in getattr(comfy.text_encoders, "__path__", []):
        folder = os.path.join(root, "t5_tokenizer")
        if os.path.exists(os.path.join(folder, "tokenizer_config.json")):
            return folder
    return None


def check_model(model: str | None) -> str | None:
    """What is wrong with the loader's model choice (None if it resolves to a file or folder)."""
    if model is not None and resolve(model, MODEL_FOLDERS) is None:
        return (f"model {model!r} was not found in models/CogVideo, models/diffusers or models/diffusion_models; "
                "put a diffusers-format CogVideoX folder or a transformer .safetensors there and refresh")
    return None


def build_spec(model: str, vae: str = FROM_MODEL, text_encoder: str = FROM_MODEL, precision: str = "bf16",
               attention: str = "auto", fp8_weights: str = "upcast"):
    """The pool's ModelSpec for the loader's choices; reads the model's config to fail early on a bad model."""
    eng = engine()
    path = resolve(model, MODEL_FOLDERS)
    if path is None:
        raise eng.ModelError(f"model {model!r} not found in models/CogVideo, models/diffusers or "
                             "models/diffusion_models")
    vae_path = None if vae == FROM_MODEL else resolve(vae, ("vae",) + MODEL_FOLDERS)
    if vae != FROM_MODEL and vae_path is None:
        raise eng.ModelError(f"vae {vae!r} not found in models/vae, models/CogVideo or models/diffusers")
    te_path = None
    if text_encoder != FROM_MODEL:
        te_path = resolve(text_encoder, ("text_encoders",) + MODEL_FOLDERS)
        if te_path is None:
            raise eng.ModelError(f"text_encoder {text_encoder!r} not found")
    return spec_for_files(path, vae_path, te_path, precision, attention, fp8_weights)


def spec_for_files(path: str, vae_path: str | None = None, te_path: str | None = None, precision: str = "bf16",
                   attention: str = "auto", fp8_weights: str = "upcast"):
    """ModelSpec for absolute paths. A T5 file without a tokenizer beside it uses the model folder's tokenizer,
    else ComfyUI's own T5 tokenizer."""
    eng = engine()
    from comfyui_xdit_cogvideo.loading import read_model_info
    from comfyui_xdit_cogvideo.pool import ModelSpec

    tokenizer = None
    if te_path is not None and os.path.isfile(te_path):
        beside = os.path.join(os.path.dirname(te_path), "tokenizer")
        own = os.path.join(path, "tokenizer") if os.path.isdir(path) else None
        tokenizer = next((t for t in (beside, own) if t and os.path.isdir(t)), None) or comfy_t5_tokenizer()
    source = eng.ModelSource(path, vae=vae_path, text_encoder=te_path, tokenizer=tokenizer, storage=fp8_weights)
    read_model_info(source)  # raises ModelError naming what is wrong with the files
    spec = ModelSpec(source=source, dtype=precision, attention=attention)
    spec.validate()
    return spec


FP8_NAMES = ("float8_e4m3fn", "float8_e5m2")


def spec_from_core_model(model, precision: str | None = None, attention: str = "auto"):
    """Our ModelSpec for core ComfyUI's CogVideoX MODEL (UNETLoader): the workers load the same file themselves.

    ComfyUI 0.33 records the file a MODEL came from (``cached_patcher_init``); patches applied to the MODEL
    (LoRAs, model-patch nodes) cannot follow it to the workers, so they are refused rather than dropped.
    """
    inner = getattr(model, "model", None)
    config = getattr(getattr(inner, "model_config", None), "unet_config", None) or {}
    kind = config.get("image_model")
    if kind != "cogvideox":
        raise ValueError(f"the model input is core's {kind or type(model).__name__} MODEL, not CogVideoX; load a "
                         "CogVideoX file with UNETLoader or use 'xDiT CogVideoX Model Loader'")
    init = getattr(model, "cached_patcher_init", None)
    args = init[1] if isinstance(init, tuple) and len(init) > 1 else ()
    path = args[0] if args and isinstance(args[0], str) else None
    if path is None or not os.path.isfile(path):
        raise ValueError("this core MODEL does not say which file it was loaded from (it did not come from "
                         "UNETLoader, or this ComfyUI is older than 0.33); use 'xDiT CogVideoX Model Loader'")
    if getattr(model, "patches", None) or getattr(model, "object_patches", None):
        raise ValueError("the core MODEL carries patches (LoRA or model-patch nodes) that the parallel workers "
                         "cannot apply; connect UNETLoader directly, or use the xDiT loader and LoRA nodes")
    options = args[1] if len(args) > 1 and isinstance(args[1], dict) else {}
    storage = "fp8" if str(options.get("dtype", "")).replace("torch.", "") in FP8_NAMES else "upcast"
    if precision is None:  # compute in the dtype core chose for this model (fp32 on CPU, bf16 on most GPUs)
        dtype = getattr(inner, "manual_cast_dtype", None) or getattr(inner, "get_dtype", lambda: None)()
        precision = {"float32": "fp32", "float16": "fp16"}.get(str(dtype).replace("torch.", ""), "bf16")
    return spec_for_files(path, precision=precision, attention=attention, fp8_weights=storage)
