"""Multi-GPU CogVideoX: sequence- and CFG-parallel sampling equal to diffusers, importable without ComfyUI."""

from .engine import CogVideoEngine, GenerationCancelled
from .layout import Layout, LayoutError, choose_layout
from .loading import ModelSource
from .request import GenerationRequest, RequestError
from .variants import ModelError, ModelInfo

__all__ = [
    "CogVideoEngine", "GenerationCancelled", "GenerationRequest", "Layout", "LayoutError", "ModelError",
    "ModelInfo", "ModelSource", "RequestError", "choose_layout",
]
