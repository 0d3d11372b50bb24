"""The sampler node: one CogVideoX generation on the worker pool, with progress, previews and Cancel."""

from __future__ import annotations

from dataclasses import replace

from comfy_api.latest import io

from .common import (CATEGORY, DEFAULT_PARALLEL, LATENT_KEY, SCHEDULERS, ModelType, ParallelType, check_choice,
                     check_parallel, engine, get_pool, run_pool_job)
from .text import conditioning_to_embeds

MAX_SIZE = 4096


def check_size(name: str, value: int | None) -> str | None:
    """What is wrong with a width or height (None if fine): the VAE (8) and patch size (2) need multiples of 16."""
    if value is not None and (value < 16 or value > MAX_SIZE or value % 16):
        near = min(MAX_SIZE, max(16, value // 16 * 16))
        return f"{name} must be a multiple of 16 between 16 and {MAX_SIZE} (e.g. {near}), got {value}"
    return None


def check_frames(frames: int | None) -> str | None:
    """What is wrong with a frame count (None if fine): the VAE packs 4 frames per latent frame plus the first."""
    if frames is not None and (frames < 1 or frames > 1025 or (frames - 1) % 4):
        near = max(1, (frames - 1) // 4 * 4 + 1)
        return f"frames must be 4k+1 between 1 and 1025 (e.g. {near} or {near + 4}), got {frames}"
    return None


class Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XDiTCogVideoSampler",
            display_name="xDiT CogVideoX Sampler",
            category=CATEGORY,
            description=("Samples a CogVideoX video latent on the multi-GPU worker pool (sequence and CFG parallel). "
                         "Same result as diffusers' CogVideoXPipeline for the same seed on any number of GPUs."),
            inputs=[
                io.MultiType.Input(ModelType.Input("model", tooltip=(
                    "From 'xDiT CogVideoX Model Loader', or core's CogVideoX MODEL from 'Load Diffusion Model' "
                    "(UNETLoader; the workers load the same file, without patches such as LoRAs).")),
                    types=[ModelType, io.Model]),
                io.Conditioning.Input("positive", tooltip=(
                    "Prompt embedding: from an xDiT CogVideoX Text Encode node (exactly 226 T5 tokens) or core "
                    "CONDITIONING (normalized to 226 tokens).")),
                io.Conditioning.Input("negative", tooltip="Negative prompt embedding (used when guidance > 1)."),
                io.Int.Input("width", default=720, min=16, max=MAX_SIZE, step=16, tooltip=(
                    "Video width in pixels, a multiple of 16. CogVideoX 1.0: 720; 1.5: up to 1360. "
                    "5b-I2V only runs at 720x480.")),
                io.Int.Input("height", default=480, min=16, max=MAX_SIZE, step=16, tooltip=(
                    "Video height in pixels, a multiple of 16. CogVideoX 1.0: 480; 1.5: 768.")),
                io.Int.Input("frames", default=49, min=1, max=1025, step=4, tooltip=(
                    "Number of frames, 4k+1 (the VAE packs 4 frames per latent frame plus the first). "
                    "CogVideoX 1.0: 49 (6 s at 8 fps); 1.5: 81 (5 s at 16 fps).")),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Denoising steps (50 is the reference)."),
                io.Float.Input("guidance", default=6.0, min=0.0, max=50.0, step=0.1, round=0.01, tooltip=(
                    "Classifier-free guidance scale (6 is the reference). At 1 or below the negative branch is "
                    "skipped, which halves the work but disables CFG parallel.")),
                io.Boolean.Input("dynamic_cfg", default=False, tooltip=(
                    "Cosine-scheduled guidance (diffusers' use_dynamic_cfg); recommended with the DPM scheduler "
                    "on 5b models.")),
                io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True, tooltip=(
                    "Seed of the initial noise (drawn on the CPU, so the same seed gives the same video on any "
                    "number of GPUs).")),
                io.Combo.Input("scheduler", options=SCHEDULERS, default="default", tooltip=(
                    "default = the model folder's scheduler (DDIM for 2b, DPM for 5b/1.5); ddim = "
                    "CogVideoXDDIMScheduler; dpm = CogVideoXDPMScheduler.")),
                ParallelType.Input("parallel", optional=True, tooltip=(
                    "Devices and layout from 'xDiT CogVideoX Parallel Config'; without it: all visible GPUs, "
                    "automatic layout.")),
                io.Image.Input("image", optional=True, tooltip=(
                    "Start frame for image-to-video models (-I2V); the first image of the batch is used, "
                    "centre-cropped to the video's aspect ratio. Leave empty for text-to-video models.")),
            ],
            outputs=[io.Latent.Output(display_name="samples", tooltip=(
                "Video latent [1, C, latent frames, H/8, W/8] with the requested frame count, in ComfyUI's "
                "convention (unscaled VAE latents), for 'xDiT CogVideoX Decode' or core's VAE Decode."))],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, frames=None):
        # ComfyUI files a failed validate_inputs under every argument it declares, so it declares only the input
        # ComfyUI cannot check itself; width/height (min/max) and scheduler (combo) are checked per input by
        # ComfyUI, and again in execute (0.3.x does not check V3 combos; neither checks step=16).
        return check_frames(frames) or True

    @classmethod
    def execute(cls, model, positive, negative, width=720, height=480, frames=49, steps=50, guidance=6.0,
                dynamic_cfg=False, seed=42, scheduler="default", parallel=None, image=None) -> io.NodeOutput:
        error = (check_size("width", width) or check_size("height", height) or check_frames(frames)
                 or check_choice("scheduler", scheduler, SCHEDULERS))
        if error:
            raise ValueError(error)
        eng = engine()
        from comfyui_xdit_cogvideo.loading import latent_scaling, read_model_info

        if not hasattr(model, "source"):  # core's MODEL (UNETLoader)
            from .models import spec_from_core_model

            model = spec_from_core_model(model)
            if image is not None:
                raise ValueError("image-to-video needs the VAE to encode the start image, which core's MODEL does not "
                                 "bring: use 'xDiT CogVideoX Model Loader' with the same file and the CogVideoX VAE")
        info = read_model_info(model.source)
        start = None
        if image is not None:
            if image.dim() == 4:
                image = image[0]
            start = image[..., :3].float().cpu().contiguous()  # cropped to the aspect ratio by the engine
        request = eng.GenerationRequest(
            prompt_embeds=conditioning_to_embeds(positive, "positive", info.text_len, info.text_dim),
            negative_prompt_embeds=conditioning_to_embeds(negative, "negative", info.text_len, info.text_dim),
            frames=frames, height=height, width=width, steps=steps, guidance=float(guidance), seed=int(seed),
            scheduler=None if scheduler == "default" else scheduler, dynamic_cfg=bool(dynamic_cfg), image=start,
        )
        resolved = request.resolved(info)  # RequestError (frames, size, I2V image, embeddings) before the pool starts
        parallel = parallel or DEFAULT_PARALLEL
        layout = check_parallel(parallel, model, resolved.use_cfg)  # LayoutError before the pool is touched
        if parallel.memory != "auto":  # the parallel config's memory plan overrides the model's
            model = replace(model, memory=parallel.memory)
        pool = get_pool(parallel.devices)
        latents = run_pool_job(
            lambda on_event, cancel: pool.generate(model, request, layout=layout, on_event=on_event, cancel=cancel),
            node_id=cls.hidden.unique_id, label="sample", show=("sample",))
        # diffusers [B, F, C, h, w], scaled -> ComfyUI's LATENT: [B, C, F, h, w], the VAE's raw latents (core's VAE
        # Decode and latent nodes take it as their own; our decode scales back)
        scale = latent_scaling(model.source)
        latents = latents[:, latents.shape[1] - ((resolved.frames - 1) // 4 + 1):]  # CogVideoX 1.5's padding frames
        samples = (latents.float() / scale).permute(0, 2, 1, 3, 4).contiguous()
        return io.NodeOutput({"samples": samples, LATENT_KEY: {"scaling_factor": scale,
            "frames": resolved.frames, "height": resolved.height, "width": resolved.width,
            "variant": info.variant, "layout": str(layout) if layout else "auto"}})
