"""Decode (the pool's parallel tiled VAE decode) and a plain mp4 writer for ComfyUI builds without VIDEO nodes."""

from __future__ import annotations

import os

import torch
from comfy_api.latest import io, ui

from .common import CATEGORY, LATENT_KEY, ModelType, ParallelType, get_pool, log, run_pool_job, send_event

# The decode node's "tiled" choices -> pool.decode's ``tiled`` (None = automatic).
TILED_OPTIONS = {"auto": None, "on": True, "off": False}


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
            description=("Decodes a CogVideoX latent to frames with the model's VAE on the worker pool: untiled on the "
                         "first GPU or in tiles spread over all ranks, whichever is faster and fits (shown on the "
                         "node)."),
            inputs=[
                ModelType.Input("model", tooltip="The same model handle the sampler used (its VAE decodes)."),
                io.Latent.Input("samples", tooltip=(
                    "Latent from 'xDiT CogVideoX Sampler', or a CogVideoX latent from core nodes (same layout and "
                    "scaling).")),
                io.Combo.Input("tiled", options=list(TILED_OPTIONS), default="auto", tooltip=(
                    "auto = one untiled decode on the first GPU when it fits its free memory and the pool has fewer "
                    "than 3 GPUs (fastest there), else tiles split over all GPUs; the choice is shown on the node. "
                    "on = tiled decode (overlapping spatial tiles, blended as diffusers does) split over the pool's "
                    "GPUs: much less memory; off = one untiled decode on the first GPU.")),
                ParallelType.Input("parallel", optional=True, tooltip=(
                    "Connect the sampler's Parallel Config so the decode runs on the same pool.")),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="Frames [F, H, W, 3] in 0..1.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, tiled=None):
        # Workflows saved before "auto" existed hold a boolean here: accepted (ComfyUI skips its own check of an
        # input that validate_inputs declares), anything else is named with the choices.
        return tiled is None or tiled in TILED_OPTIONS or isinstance(tiled, bool) or \
            f"tiled must be one of {', '.join(TILED_OPTIONS)}; got {tiled!r}"

    @classmethod
    def execute(cls, model, samples, tiled="auto", parallel=None) -> io.NodeOutput:
        from comfyui_xdit_cogvideo.loading import latent_scaling

        if not isinstance(tiled, bool) and tiled not in TILED_OPTIONS:
            raise ValueError(f"tiled must be one of {', '.join(TILED_OPTIONS)}; got {tiled!r}")
        latents, frames = latents_for_pool(samples, latent_scaling(model.source))
        pool = get_pool(parallel.devices if parallel is not None else None)
        forced = tiled if isinstance(tiled, bool) else TILED_OPTIONS[tiled]
        images = run_pool_job(
            lambda on_event, cancel: pool.decode(model, latents, frames=frames, tiled=forced,
                                                 on_event=on_event, cancel=cancel),
            node_id=cls.hidden.unique_id, label="decode", show=("decode",), previews=False)
        report_decode(cls.hidden.unique_id, pool.last_decode)
        return io.NodeOutput(images.float().cpu().clamp(0, 1).contiguous())


def report_decode(node_id: str | None, choice) -> None:
    """The pool's decode choice (``vae_parallel.DecodeChoice``) as text on the node, in ComfyUI's log and to the
    panel, e.g. "decode: untiled on rank 0: needs 19.3 GiB, 120.0 GiB free"."""
    if choice is None:
        return
    text = f"decode: {choice.describe()}"
    log.info("xDiT CogVideoX %s", text)
    send_event("xdit_cogvideo.decode", {"node": node_id, "tiled": choice.tiled, "ranks": choice.ranks,
                                         "text": text})
    try:
        from server import PromptServer

        instance = getattr(PromptServer, "instance", None)
        if instance is not None and node_id is not None and hasattr(instance, "send_progress_text"):
            instance.send_progress_text(text, node_id)
    except Exception:  # the text on the node is a courtesy; the decoded frames are the result
        log.debug("could not show the decode choice", exc_info=True)


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
