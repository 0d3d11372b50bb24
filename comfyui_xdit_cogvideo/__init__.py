"""Multi-GPU CogVideoX: sequence- and CFG-parallel sampling equal to diffusers, importable without ComfyUI.

Names are imported on first use (PEP 562), so ``import comfyui_xdit_cogvideo`` and ``--help`` stay fast and
pull in neither diffusers nor yunchang until something needs them.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CogVideoEngine": "engine", "GenerationCancelled": "engine", "Layout": "layout", "LayoutError": "layout",
    "choose_layout": "layout", "ModelSource": "loading", "GenerationRequest": "request", "RequestError": "request",
    "ModelError": "variants", "ModelInfo": "variants",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
