"""ComfyUI custom-node package: multi-GPU CogVideoX through xDiT-style sequence and CFG parallelism.

ComfyUI imports this file from ``custom_nodes/<folder>/``. It exports ``comfy_entrypoint`` (V3 node API) and
``WEB_DIRECTORY`` only -- no ``NODE_CLASS_MAPPINGS``, which would make ComfyUI ignore the V3 entry point. Nothing
is started here; the worker pool starts with the first job. Outside ComfyUI (e.g. pytest collecting this folder)
there is no ``comfy_api`` and the file defines nothing.
"""

import os
import sys

WEB_DIRECTORY = "./web"

try:
    import comfy_api.latest  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    _IN_COMFYUI = False
else:
    _IN_COMFYUI = True

if _IN_COMFYUI:
    _ROOT = os.path.dirname(os.path.abspath(__file__))
    if _ROOT not in sys.path:
        # the engine package (and the worker processes the pool spawns) import ``comfyui_xdit_cogvideo`` by name
        sys.path.append(_ROOT)

    from .nodes import comfy_entrypoint  # noqa: E402,F401

    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
