"""Decode (the pool's parallel tiled VAE decode) and a plain mp4 writer for ComfyUI builds without VIDEO nodes."""

from __future__ import annotations

import os

import torch
from comfy_api.latest import io, ui

from .common import CATEGORY, LATENT_KEY, ModelType, ParallelType, get_pool, run_pool_job


def latents_for_pool(samples: dict, scale: float = 1.0) -> tuple[torch.Tensor, int | None]:
    """LATENT dict (ours or core's: [B, C, F, h, w], unscaled) -> (diffusers' scaled latents [B, F, C, h, w],
    requested frame count)."""
    if not isinstance(samples, dict) or "samples" not in samples:
        raise ValueError("samples must be a LATENT from 'xDiT CogVideoX Sampler' or a core CogVideoX sampler")
    latents = samples["samples"]
    if latents.dim() != 5:
        raise ValueError(f"CogVideoX latents are 5-D [batch, channels, frames, height/8, width/8]; got "
                         f"{list(latents.shape)} (is this an image latent?)")
    frames = (samples.get(LATENT_KEY) or {}).get("frames")
    return (latents.float() * scale).permute(0, 2, 1, 3, 4).contiguous(), frames


class Decode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XDiTCogVideoDecode",
            display_name="xDiT CogVideoX Decode",
            category=CATEGORY,
            description=("Decodes a CogVideoX latent to frames with the model's VAE on the worker pool; tiled decode "
                         "spreads the tiles over all ranks."),
            inputs=[
                ModelType.Input("model", tooltip="The same model handle the sampler used (its VAE decodes)."),
                io.Latent.Input("samples", tooltip=(
                    "Latent from 'xDiT CogVideoX Sampler', or a CogVideoX latent from core nodes (same layout and "
                    "scaling).")),
                io.Boolean.Input("tiled", default=True, tooltip=(
                    "Tiled decode (overlapping spatial tiles, blended as diffusers does), split over the pool's GPUs: "
                    "much less memory and faster on several GPUs. Off = one untiled decode on the first GPU.")),
                ParallelType.Input("parallel", optional=True, tooltip=(
                    "Connect the sampler's Parallel Config so the decode runs on the same pool.")),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="Frames [F, H, W, 3] in 0..1.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, samples, tiled=True, parallel=None) -> io.NodeOutput:
        from comfyui_xdit_cogvideo.loading import latent_scaling

        latents, frames = latents_for_pool(samples, latent_scaling(model.source))
        pool = get_pool(parallel.devices if parallel is not None else None)
        images = run_pool_job(
            lambda on_event, cancel: pool.decode(model, latents, frames=frames, tiled=bool(tiled),
                                                 on_event=on_event, cancel=cancel),
            node_id=cls.hidden.unique_id, label="decode", show=("decode",), previews=False)
        return io.NodeOutput(images.float().cpu().clamp(0, 1).contiguous())


def write_mp4(images: torch.Tensor, path: str, fps: float, crf: int = 19, metadata: dict | None = None) -> None:
    """[F, H, W, 3] floats in 0..1 -> H.264 mp4 through the engine's checked writer (a failed ffmpeg raises).

    ``metadata`` (e.g. ``{"prompt": ..., "workflow": ...}``) goes into the container's tags, one JSON value per key,
    as core's SaveVideo writes them: dropping the file on ComfyUI restores the graph.
    """
    from comfyui_xdit_cogvideo.video import write_video

    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [frames, height, width, 3], got {list(images.shape)}")
    write_video(path, images, fps=fps, crf=crf, metadata=metadata or None)


def check_save_target(filename_prefix) -> str | None:
    """Why videos with ``filename_prefix`` cannot be saved (encoder, output folder), or None when they can.

    A prefix from another node's output (not a string at queue time) gets the encoder and output folder checks."""
    import folder_paths

    from comfyui_xdit_cogvideo.video import VideoWriteError, check_encoder, check_video_path

    output_dir = os.path.abspath(folder_paths.get_output_directory())
    prefix = filename_prefix if isinstance(filename_prefix, str) and filename_prefix.strip() else "CogVideoX"
    target = os.path.abspath(os.path.join(output_dir, os.path.normpath(prefix) + "_00001_.mp4"))
    if os.path.commonpath((output_dir, target)) != output_dir:
        return (f"filename_prefix {prefix!r} points outside ComfyUI's output folder {output_dir!r}; give a name or "
                "a subfolder inside it, e.g. 'video/CogVideoX'")
    try:
        check_encoder()
        check_video_path(target, create=True)
    except VideoWriteError as error:
        return f"cannot save videos: {error}"
    return None


class SaveVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XDiTCogVideoSaveVideo",
            display_name="xDiT CogVideoX Save MP4",
            category=CATEGORY,
            description=("Writes frames to an H.264 mp4 in ComfyUI's output folder with imageio-ffmpeg. Prefer core "
                         "'Create Video' + 'Save Video' where your ComfyUI has them; this node works everywhere."),
            inputs=[
                io.Image.Input("images", tooltip="Frames to save, e.g. from 'xDiT CogVideoX Decode'."),
                io.Float.Input("fps", default=8.0, min=1.0, max=120.0, step=1.0, tooltip=(
                    "Frames per second: 8 for CogVideoX 1.0, 16 for CogVideoX 1.5.")),
                io.String.Input("filename_prefix", default="video/CogVideoX", tooltip=(
                    "File name prefix inside the output folder; may contain a subfolder and %date:...% patterns.")),
                io.Int.Input("crf", default=19, min=0, max=51, tooltip=(
                    "H.264 quality (constant rate factor): lower is better and larger; 17-23 is typical.")),
            ],
            outputs=[],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None):
        # Runs when the prompt is queued, before any node executes: a missing imageio-ffmpeg, an ffmpeg without
        # H.264 or an unwritable output folder fails here, not after sampling and decoding. ComfyUI files a failed
        # validate_inputs under every argument it declares: declare only filename_prefix (a free string).
        return check_save_target(filename_prefix) or True

    @classmethod
    def execute(cls, images, fps=8.0, filename_prefix="video/CogVideoX", crf=19) -> io.NodeOutput:
        import folder_paths

        output_dir = folder_paths.get_output_directory()
        height, width = int(images.shape[1]), int(images.shape[2])
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output_dir,
                                                                                   width, height)
        name = f"{filename}_{counter:05}_.mp4"
        write_mp4(images, os.path.join(folder, name), fps, crf, metadata=cls.workflow_metadata())
        return io.NodeOutput(ui=ui.PreviewVideo([ui.SavedResult(name, subfolder, io.FolderType.output)]))

    @classmethod
    def workflow_metadata(cls) -> dict | None:
        """What core's SaveVideo stores (ComfyUI 0.3.64 and 0.33.0): extra_pnginfo's keys (the UI graph under
        "workflow") and the API prompt under "prompt"; nothing when ComfyUI runs with --disable-metadata."""
        from comfy.cli_args import args

        if args.disable_metadata:
            return None
        metadata = dict(cls.hidden.extra_pnginfo or {})
        if cls.hidden.prompt is not None:
            metadata["prompt"] = cls.hidden.prompt
        return metadata or None
