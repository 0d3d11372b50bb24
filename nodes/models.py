"""Where model files live inside ComfyUI, and the model-loader node.

Models are looked up in ``models/CogVideo`` (registered here; the folder kijai's CogVideoX wrapper also uses) and
``models/diffusers`` (core's folder for diffusers-format models), plus any extra paths from
``extra_model_paths.yaml`` for those names. Entries are diffusers-format folders (with ``transformer/``) and single
transformer ``.safetensors`` files.
"""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from .common import ATTENTION_BACKENDS, CATEGORY, PRECISIONS, ModelType, check_choice, engine

MODEL_FOLDERS = ("CogVideo", "diffusers")
FROM_MODEL = "(from model folder)"
SAFETENSORS = (".safetensors", ".sft")
_MAX_DEPTH = 3


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


def list_models() -> list[str]:
    """Model choices: diffusers folders and transformer files in models/CogVideo, then models/diffusers."""
    names: list[str] = []
    for folder in MODEL_FOLDERS:
        for root in _roots(folder):
            for name, kind in _scan(root):
                if kind == "file" and "vae" in os.path.basename(name).lower():
                    continue  # a VAE kept beside the transformers is offered in the vae list instead
                if name not in names:
                    names.append(name)
    return names


def list_vaes() -> list[str]:
    names = [FROM_MODEL]
    for folder in ("vae",) + MODEL_FOLDERS:
        for root in _roots(folder):
            for name, kind in _scan(root):
                if kind == "file" and (folder == "vae" or "vae" in os.path.basename(name).lower()):
                    names.append(name)
            if folder != "vae":
                for name, kind in _scan(root):
                    if kind == "folder" and os.path.isdir(os.path.join(root, name, "vae")):
                        names.append(f"{name}/vae")
    return list(dict.fromkeys(names))


def list_text_encoders() -> list[str]:
    """HF-format T5 folders (config.json + a tokenizer beside or inside): in text_encoders, or a model's own."""
    names = [FROM_MODEL]
    for root in _roots("text_encoders"):
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name.lower())
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir() and os.path.exists(os.path.join(entry.path, "config.json")):
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
                    "or a single transformer .safetensors file, from models/CogVideo or models/diffusers. "
                    "Supported: CogVideoX-2b, -5b, -5b-I2V, CogVideoX1.5-5b, -5b-I2V.")),
                io.Combo.Input("vae", options=list_vaes(), default=FROM_MODEL, tooltip=(
                    "The CogVideoX VAE (needed to decode, and to encode the start image for I2V). "
                    f"'{FROM_MODEL}' uses the model folder's vae/; pick a file from models/vae or models/CogVideo "
                    "for single-file transformers.")),
                io.Combo.Input("text_encoder", options=list_text_encoders(), default=FROM_MODEL, tooltip=(
                    "The T5 text encoder used by 'xDiT CogVideoX Text Encode (Model T5)'. "
                    f"'{FROM_MODEL}' uses the model folder's text_encoder/ and tokenizer/. Not needed when you "
                    "encode text with ComfyUI's CLIPLoader + 'xDiT CogVideoX Text Encode (CLIP)'.")),
                io.Combo.Input("precision", options=PRECISIONS, default="bf16", tooltip=(
                    "Weight and compute dtype on the workers. bf16 is what CogVideoX was trained in (2b also runs "
                    "in fp16); fp32 is for CPU tests and exact comparisons.")),
                io.Combo.Input("attention", options=ATTENTION_BACKENDS, default="auto", tooltip=(
                    "Attention kernel on the workers. auto = the fastest installed for the device: flash-attn-4 "
                    "(fa4) on Hopper/Blackwell when installed, else cuDNN SDPA; on CPU an exact kernel with "
                    "log-sum-exp (math).")),
            ],
            outputs=[ModelType.Output(display_name="model", tooltip=(
                "A handle on the model (paths and settings, no weights) for the sampler, decode and text encode."))],
        )

    @classmethod
    def validate_inputs(cls, model=None, vae=None, text_encoder=None, precision=None, attention=None):
        # Only constant (widget) values arrive here; linked ones are None and checked in execute.
        for name, value, options in (("precision", precision, PRECISIONS), ("attention", attention, ATTENTION_BACKENDS)):
            if value is not None and (err := check_choice(name, value, options)):
                return err
        if model is not None and resolve(model, MODEL_FOLDERS) is None:
            return (f"model {model!r} was not found in models/CogVideo or models/diffusers; put a diffusers-format "
                    "CogVideoX folder or a transformer .safetensors there and refresh")
        if vae not in (None, FROM_MODEL) and resolve(vae, ("vae",) + MODEL_FOLDERS) is None:
            return f"vae {vae!r} was not found in models/vae, models/CogVideo or models/diffusers"
        if text_encoder not in (None, FROM_MODEL) and resolve(text_encoder, ("text_encoders",) + MODEL_FOLDERS) is None:
            return f"text_encoder {text_encoder!r} was not found in models/text_encoders or the model folders"
        return True

    @classmethod
    def execute(cls, model, vae=FROM_MODEL, text_encoder=FROM_MODEL, precision="bf16", attention="auto") -> io.NodeOutput:
        return io.NodeOutput(build_spec(model, vae, text_encoder, precision, attention))


def build_spec(model: str, vae: str = FROM_MODEL, text_encoder: str = FROM_MODEL, precision: str = "bf16",
               attention: str = "auto"):
    """The pool's ModelSpec for the loader's choices; reads the model's config to fail early on a bad model."""
    eng = engine()
    from comfyui_xdit_cogvideo.loading import read_model_info
    from comfyui_xdit_cogvideo.pool import ModelSpec

    path = resolve(model, MODEL_FOLDERS)
    if path is None:
        raise eng.ModelError(f"model {model!r} not found in models/CogVideo or models/diffusers")
    vae_path = None if vae == FROM_MODEL else resolve(vae, ("vae",) + MODEL_FOLDERS)
    if vae != FROM_MODEL and vae_path is None:
        raise eng.ModelError(f"vae {vae!r} not found in models/vae, models/CogVideo or models/diffusers")
    te_path = None
    if text_encoder != FROM_MODEL:
        te_path = resolve(text_encoder, ("text_encoders",) + MODEL_FOLDERS)
        if te_path is None:
            raise eng.ModelError(f"text_encoder {text_encoder!r} not found")
    source = eng.ModelSource(path, vae=vae_path, text_encoder=te_path)
    read_model_info(source)  # raises ModelError naming what is wrong with the files
    spec = ModelSpec(source=source, dtype=precision, attention=attention)
    spec.validate()
    return spec
