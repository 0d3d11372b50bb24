"""Minimal stand-ins for the ComfyUI modules our nodes import, for CI machines without ComfyUI.

Only the boundary is faked: ``comfy_api.latest`` (io/ui/ComfyExtension with the real constructors' keyword names,
so a misspelt option fails here as it would in ComfyUI), ``comfy.utils.ProgressBar``, the interrupt flag of
``comfy.model_management``, ``folder_paths`` (models/output folders under a temp dir) and ``server.PromptServer``
(records routes and websocket messages). tests/test_comfyui_server.py checks the same nodes against the real
ComfyUI when COMFYUI_DIR is set.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import os
import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STUBBED = ("comfy_api", "comfy_api.latest", "comfy", "comfy.utils", "comfy.model_management", "comfy.cli_args",
           "folder_paths", "server")


# ---- comfy_api.latest.io ---------------------------------------------------------------------------------------
_COMMON = {"display_name", "optional", "tooltip", "lazy", "extra_dict"}
_WIDGET = _COMMON | {"default", "socketless", "force_input"}
_ALLOWED = {
    "BOOLEAN": _WIDGET | {"label_on", "label_off"},
    "INT": _WIDGET | {"min", "max", "step", "control_after_generate", "display_mode"},
    "FLOAT": _WIDGET | {"min", "max", "step", "round", "display_mode"},
    "STRING": _WIDGET | {"multiline", "placeholder", "dynamic_prompts"},
    "COMBO": (_WIDGET - {"force_input", "extra_dict"}) | {"options", "control_after_generate", "upload",
                                                        "image_folder", "remote"},
}
WIDGET_TYPES = set(_ALLOWED)


class _Spec:
    def __init__(self, io_type: str, id: str, kwargs: dict):
        allowed = _ALLOWED.get(io_type, _COMMON)
        unknown = set(kwargs) - allowed
        if unknown:
            raise TypeError(f"{io_type}.Input got unexpected keyword(s) {sorted(unknown)}")
        self.io_type, self.id = io_type, id
        self.optional = bool(kwargs.pop("optional", False))
        self.tooltip = kwargs.pop("tooltip", None)
        self.display_name = kwargs.pop("display_name", None)
        self.options = kwargs.pop("options", None)
        self.default = kwargs.pop("default", None)
        self.extra = kwargs

    @property
    def is_widget(self) -> bool:
        return self.io_type in WIDGET_TYPES and not self.extra.get("force_input")


class _OutSpec:
    def __init__(self, io_type: str, id=None, display_name=None, tooltip=None, is_output_list=False):
        self.io_type, self.id, self.display_name, self.tooltip = io_type, id, display_name, tooltip
        self.is_output_list = is_output_list


def _make_type(io_type: str):
    class _Type:
        pass

    _Type.io_type = io_type

    def make_input(id: str, *args, **kwargs):
        if args:  # Combo.Input(id, options, ...) positional form
            kwargs["options"] = args[0]
        return _Spec(io_type, id, kwargs)

    _Type.Input = staticmethod(make_input)
    _Type.Output = staticmethod(lambda *a, **k: _OutSpec(io_type, *a, **k))
    return _Type


class Hidden(str, enum.Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"


class FolderType(str, enum.Enum):
    input = "input"
    output = "output"
    temp = "temp"


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False

    def validate(self):
        ids = [i.id for i in self.inputs or []]
        out_ids = [o.id for o in self.outputs or [] if o.id]
        if len(set(ids)) != len(ids) or len(set(out_ids)) != len(out_ids) or set(ids) & set(out_ids):
            raise ValueError(f"{self.node_id}: duplicate input/output ids")


class NodeOutput:
    def __init__(self, *args, ui=None, expand=None, block_execution=None):
        self.args, self.ui = args, ui

    @property
    def result(self):
        return self.args or None


class _HiddenHolder(types.SimpleNamespace):
    def __getattr__(self, key):
        return None


class ComfyNode:
    hidden = _HiddenHolder()

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs):
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        schema = cls.define_schema()
        schema.validate()
        return schema


def Custom(io_type: str):
    return _make_type(io_type)


class MultiType:
    """Like ComfyUI's: an input accepting several types; its io_type is the comma-joined list (the first input's
    own type first), and a typed input given as ``id`` keeps its name, tooltip and optional flag."""

    @staticmethod
    def Input(id, types, display_name=None, optional=False, tooltip=None, lazy=None, extra_dict=None):
        names = [t.io_type for t in types]
        if isinstance(id, _Spec):
            names.insert(0, id.io_type)
            optional, tooltip = id.optional or optional, id.tooltip or tooltip
            display_name, id = id.display_name or display_name, id.id
        kwargs = {"optional": optional, "tooltip": tooltip, "display_name": display_name}
        return _Spec(",".join(dict.fromkeys(names)), id, kwargs)


def _io_module():
    io = types.ModuleType("comfy_api.latest.io")
    for name, io_type in (("Boolean", "BOOLEAN"), ("Int", "INT"), ("Float", "FLOAT"), ("String", "STRING"),
                          ("Combo", "COMBO"), ("Image", "IMAGE"), ("Mask", "MASK"), ("Latent", "LATENT"),
                          ("Conditioning", "CONDITIONING"), ("Clip", "CLIP"), ("Vae", "VAE"), ("Model", "MODEL"),
                          ("Video", "VIDEO"), ("Audio", "AUDIO"), ("AnyType", "*")):
        setattr(io, name, _make_type(io_type))
    io.Custom, io.Schema, io.NodeOutput, io.ComfyNode = Custom, Schema, NodeOutput, ComfyNode
    io.MultiType = MultiType
    io.Hidden, io.FolderType = Hidden, FolderType
    return io


def _ui_module():
    ui = types.ModuleType("comfy_api.latest.ui")

    class SavedResult(dict):
        def __init__(self, filename, subfolder, type):
            super().__init__(filename=filename, subfolder=subfolder, type=type.value)

    class PreviewVideo:
        def __init__(self, values, **kwargs):
            self.values = values

        def as_dict(self):
            return {"images": self.values, "animated": (True,)}

    class PreviewText:
        def __init__(self, value, **kwargs):
            self.value = value

        def as_dict(self):
            return {"text": (self.value,)}

    ui.SavedResult, ui.PreviewVideo, ui.PreviewText = SavedResult, PreviewVideo, PreviewText
    return ui


class ComfyExtension:
    async def on_load(self):
        pass

    async def get_node_list(self):
        raise NotImplementedError


# ---- comfy.utils / comfy.model_management ------------------------------------------------------------------------
class ProgressBar:
    updates: list = []  # (node_id, value, total, has_preview) across all bars, for assertions
    hook = None          # like PROGRESS_BAR_HOOK: called on every update (ComfyUI's checks interrupts here)

    def __init__(self, total, node_id=None):
        self.total, self.current, self.node_id = total, 0, node_id

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        ProgressBar.updates.append((self.node_id, self.current, self.total, preview is not None))
        if ProgressBar.hook is not None:
            ProgressBar.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)


def _model_management():
    mm = types.ModuleType("comfy.model_management")

    class InterruptProcessingException(Exception):
        pass

    lock = threading.RLock()
    state = {"flag": False}

    def interrupt_current_processing(value=True):
        with lock:
            state["flag"] = value

    def processing_interrupted():
        with lock:
            return state["flag"]

    def throw_exception_if_processing_interrupted():
        with lock:
            if state["flag"]:
                state["flag"] = False
                raise InterruptProcessingException()

    mm.InterruptProcessingException = InterruptProcessingException
    mm.interrupt_current_processing = interrupt_current_processing
    mm.processing_interrupted = processing_interrupted
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    return mm


# ---- folder_paths / server ---------------------------------------------------------------------------------------
def _folder_paths(base: Path):
    fp = types.ModuleType("folder_paths")
    fp.base_path = str(base)
    fp.models_dir = str(base / "models")
    exts = {".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin"}
    fp.supported_pt_extensions = exts
    fp.folder_names_and_paths = {
        "vae": ([str(base / "models" / "vae")], exts),
        "text_encoders": ([str(base / "models" / "text_encoders"), str(base / "models" / "clip")], exts),
        "diffusers": ([str(base / "models" / "diffusers")], ["folder"]),
        "loras": ([str(base / "models" / "loras")], exts),
        "diffusion_models": ([str(base / "models" / "unet"), str(base / "models" / "diffusion_models")], exts),
    }
    output = base / "output"

    def get_folder_paths(name):
        return list(fp.folder_names_and_paths[name][0])

    def add_model_folder_path(name, path, is_default=False):
        if name in fp.folder_names_and_paths:
            fp.folder_names_and_paths[name][0].append(path)
        else:
            fp.folder_names_and_paths[name] = ([path], set())

    def get_save_image_path(filename_prefix, output_dir, image_width=0, image_height=0):
        subfolder, filename = os.path.split(os.path.normpath(filename_prefix))
        folder = os.path.join(output_dir, subfolder)
        os.makedirs(folder, exist_ok=True)
        counter = 1 + sum(1 for f in os.listdir(folder) if f.startswith(filename + "_"))
        return folder, filename, counter, subfolder, filename_prefix

    def get_filename_list(name):
        names = []
        for root in get_folder_paths(name):
            for folder, _, files in os.walk(root, followlinks=True):
                for f in files:
                    if os.path.splitext(f)[1].lower() in fp.folder_names_and_paths[name][1]:
                        names.append(os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/"))
        return sorted(names)

    def get_full_path(name, filename):
        for root in get_folder_paths(name):
            path = os.path.join(root, filename)
            if os.path.isfile(path):
                return path
        return None

    fp.get_folder_paths = get_folder_paths
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    fp.add_model_folder_path = add_model_folder_path
    fp.get_output_directory = lambda: str(output)
    fp.get_save_image_path = get_save_image_path
    return fp


class _Routes:
    def __init__(self):
        self.table: dict[tuple[str, str], Any] = {}

    def _add(self, method, path):
        def decorator(handler):
            self.table[(method, path)] = handler
            return handler
        return decorator

    def get(self, path):
        return self._add("GET", path)

    def post(self, path):
        return self._add("POST", path)


class _PromptServer:
    instance = None

    def __init__(self):
        self.routes = _Routes()
        self.messages: list[tuple[str, Any]] = []
        self.client_id = None

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


@contextlib.contextmanager
def comfy_stubs(base: Path):
    """Install the stand-ins into sys.modules (restoring whatever was there afterwards) and yield a namespace
    with the modules, the fake server and ``load_package()`` which imports the repo like ComfyUI does."""
    saved = {name: sys.modules.get(name) for name in STUBBED}
    comfy_api = types.ModuleType("comfy_api")
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ui, latest.ComfyExtension = _io_module(), _ui_module(), ComfyExtension
    comfy_api.latest = latest
    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = _model_management()
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(disable_metadata=False)  # ComfyUI's --disable-metadata
    comfy.utils, comfy.model_management, comfy.cli_args = utils, mm, cli_args
    fp = _folder_paths(base)
    server = types.ModuleType("server")
    server.PromptServer = _PromptServer
    _PromptServer.instance = _PromptServer()
    sys.modules.update({"comfy_api": comfy_api, "comfy_api.latest": latest, "comfy": comfy, "comfy.utils": utils,
                        "comfy.model_management": mm, "comfy.cli_args": cli_args, "folder_paths": fp, "server": server})
    ProgressBar.updates = []
    package_names = []

    def load_package(name: str = "xdit_cogvideo_custom_node"):
        """Import the repository root as ComfyUI imports a custom-node folder (spec from its __init__.py)."""
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        package_names.append(name)
        spec.loader.exec_module(module)
        return module

    try:
        yield types.SimpleNamespace(io=latest.io, ui=latest.ui, mm=mm, utils=utils, args=cli_args.args, folder_paths=fp,
                                    server=_PromptServer.instance, load_package=load_package, base=base)
    finally:
        for name in list(sys.modules):
            if any(name == p or name.startswith(p + ".") for p in package_names):
                del sys.modules[name]
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        _PromptServer.instance = None
        ProgressBar.hook = None


def run_node(node_cls, unique_id: str = "7", hidden: dict | None = None, **inputs):
    """Validate (constant inputs) then execute a V3 node as ComfyUI does: on a clone with ``hidden`` set
    (``unique_id`` and, from ``hidden``, e.g. ``prompt`` and ``extra_pnginfo``)."""
    import inspect

    validate = getattr(node_cls, "validate_inputs", None)
    if validate is not None and "validate_inputs" in vars(node_cls):
        params = inspect.signature(validate).parameters
        result = validate(**{k: v for k, v in inputs.items() if k in params})
        if result is not True:
            raise ValueError(f"validation failed: {result}")
    clone = type(node_cls.__name__, (node_cls,), {})
    clone.hidden = _HiddenHolder(unique_id=unique_id, **(hidden or {}))
    return clone.execute(**inputs)


def comfy_validate(node_cls, inputs: dict, check_combos: bool = True) -> list[tuple[str, str]]:
    """The errors ComfyUI's queue-time validation files for constant ``inputs``, as (input name, details).

    Adapted from ``execution.validate_inputs`` of ComfyUI 0.3.64 and 0.33.0 (the same there): inputs not named by
    the node's ``validate_inputs`` get ComfyUI's own min/max checks (and, from 0.33 on, the combo check, which 0.3.x
    skips for V3 combos: ``check_combos=False``); when ``validate_inputs`` fails, ComfyUI files its message once
    under every argument it declares. tests/test_comfyui_server.py checks the same against a real server.
    """
    import inspect

    schema = node_cls.GET_SCHEMA()
    validate = getattr(node_cls, "validate_inputs", None) if "validate_inputs" in vars(node_cls) else None
    declared = list(inspect.signature(validate).parameters) if validate is not None else []
    errors = []
    for spec in schema.inputs:
        if spec.id not in inputs or spec.id in declared:
            continue
        value = inputs[spec.id]
        if "min" in spec.extra and value < spec.extra["min"]:
            errors.append((spec.id, f"Value {value} smaller than min of {spec.extra['min']}"))
        elif "max" in spec.extra and value > spec.extra["max"]:
            errors.append((spec.id, f"Value {value} bigger than max of {spec.extra['max']}"))
        elif check_combos and spec.io_type == "COMBO" and value not in spec.options:
            errors.append((spec.id, f"Value not in list: {spec.id}: '{value}' not in {spec.options}"))
    if declared:
        given = {k: v for k, v in inputs.items() if k in declared}
        result = validate(**given)
        if result is not True:
            errors += [(name, f"{name} - {result}") for name in given]
    return errors
