"""ComfyUI nodes for multi-GPU CogVideoX (V3 node API: ``comfy_api.latest``).

Importing this package registers the ``CogVideo`` model folder and two HTTP routes and, on a machine with CUDA GPUs,
asks the engine to prestart the pool's worker processes on a background thread (their imports then happen long
before the first job; ``XDIT_COGVIDEO_PRESTART=0`` turns this off, ``=1`` also allows CPU ranks). The engine itself
is imported and the pool started by the first node that runs.
"""

from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .common import prestart_workers
from .lora import LoraLoader
from .models import ModelLoader, register_folders
from .parallel import ParallelConfigNode
from .routes import register_routes
from .sampler import Sampler
from .text import TextEncodeCLIP, TextEncodeModelT5
from .video import Decode, SaveVideo

NODES: list[type[io.ComfyNode]] = [
    ModelLoader, LoraLoader, ParallelConfigNode, TextEncodeCLIP, TextEncodeModelT5, Sampler, Decode, SaveVideo,
]

register_folders()
register_routes()
prestart_workers()


class XDiTCogVideoExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> XDiTCogVideoExtension:
    return XDiTCogVideoExtension()
