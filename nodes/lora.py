"""The LoRA node: chains like core's LoraLoaderModelOnly on our model handle (files from ``models/loras``).

It only records the file and strength on the handle; every worker rank merges the LoRAs into its resident weights
when the sampler runs, and a later job with other LoRAs or strengths switches them without reloading the model.
"""

from __future__ import annotations

import dataclasses

import folder_paths
from comfy_api.latest import io

from .common import CATEGORY, ModelType, engine


def list_loras() -> list[str]:
    return [name for name in folder_paths.get_filename_list("loras")
            if name.lower().endswith((".safetensors", ".sft"))]


class LoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XDiTCogVideoLoraLoader",
            display_name="xDiT CogVideoX LoRA",
            category=CATEGORY,
            description=("Adds a CogVideoX LoRA to the model, like LoraLoaderModelOnly; chain several. Every GPU "
                         "worker merges it into its weights (no slowdown per step); changing LoRAs or strengths "
                         "later does not reload the model. Reads diffusers/PEFT, kohya and ComfyUI-format LoRAs."),
            inputs=[
                ModelType.Input("model", tooltip=(
                    "The model handle from the xDiT CogVideoX Model Loader (or from another LoRA node).")),
                io.Combo.Input("lora_name", options=list_loras(), tooltip=(
                    "A CogVideoX LoRA .safetensors from models/loras. It must be made for this model size "
                    "(a 2b LoRA does not fit 5b); a LoRA for another model is refused with a clear error.")),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01, tooltip=(
                    "1.0 = as trained (alpha/rank where the file gives an alpha); 0 = off. Not the official "
                    "demo's 1/rank, which made LoRAs look ineffective.")),
            ],
            outputs=[ModelType.Output(display_name="model", tooltip=(
                "The same model with this LoRA added; connect it to the sampler (and the decode / text encode)."))],
        )

    @classmethod
    def validate_inputs(cls, lora_name=None, strength_model=None):
        if lora_name is not None and folder_paths.get_full_path("loras", lora_name) is None:
            return f"LoRA {lora_name!r} was not found in models/loras; put the .safetensors there and refresh"
        return True

    @classmethod
    def execute(cls, model, lora_name, strength_model=1.0) -> io.NodeOutput:
        if strength_model == 0:
            return io.NodeOutput(model)
        from comfyui_xdit_cogvideo.lora import LoraSpec, read_lora

        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            raise engine().ModelError(f"LoRA {lora_name!r} not found in models/loras")
        spec = LoraSpec(path, float(strength_model))
        spec.validate()
        read_lora(path)  # a corrupt or unsupported file fails here, naming it, before any worker runs
        return io.NodeOutput(dataclasses.replace(model, loras=tuple(model.loras) + (spec,)))
