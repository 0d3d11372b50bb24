"""One rank's CogVideoX engine: resident weights, the stock diffusers pipeline, a parallel transformer.

Every rank of a layout builds an engine and calls ``generate`` with the same request; each runs the same
diffusers loop with the same CPU generator, so all ranks hold identical latents and only the transformer's
forward is shared out. The leader (rank 0) encodes text once and broadcasts the embeddings.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from .errors import GenerationCancelled  # noqa: F401  (engine.GenerationCancelled stays importable)
from .layout import check_layout
from .loading import (ModelSource, load_scheduler, load_text_encoder, load_transformer, load_vae,
                      parse_dtype)
from .parallel.groups import ParallelGroups
from .parallel.kernels import resolve_kernel
from .request import GenerationRequest

StepCallback = Callable[[int, int, torch.Tensor], None]


class CogVideoEngine:
    def __init__(
        self,
        source: ModelSource | str,
        *,
        dtype: str = "bf16",
        device: str | torch.device = "cpu",
        groups: ParallelGroups | None = None,
        attention: str = "auto",
        optimize="auto",
        loras=(),
    ):
        self.source = ModelSource(source) if isinstance(source, str) else source
        self.resolved = self.source.resolve()
        self.dtype, self.device = parse_dtype(dtype), torch.device(device)
        self.groups = groups or ParallelGroups.single()
        self.transformer, self.info = load_transformer(self.resolved, self.dtype, self.device)
        self._vae = None
        self._text = None
        self._setup(attention, optimize)
        self.set_loras(loras)

    @classmethod
    def from_components(
        cls,
        transformer,
        *,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        groups: ParallelGroups | None = None,
        attention: str = "auto",
        optimize="auto",
        loras=(),
    ) -> "CogVideoEngine":
        """An engine over models already in memory (benchmarks, random full-size weights); no files read.

        ``transformer`` is a diffusers CogVideoXTransformer3DModel on its device and dtype; it is parallelized
        in place. Without ``vae``/``text_encoder`` the engine samples from prompt embeddings only.
        """
        from pathlib import Path

        from .loading import ResolvedSource
        from .variants import ModelInfo

        self = cls.__new__(cls)
        param = next(transformer.parameters())
        self.source = ModelSource("<memory>")
        self.resolved = ResolvedSource(Path("<memory>"), None, None, None, None)
        self.dtype, self.device = param.dtype, param.device
        self.groups = groups or ParallelGroups.single()
        self.transformer = transformer.eval().requires_grad_(False)
        self.info = ModelInfo.from_config(transformer.config)
        self._vae = vae
        self._text = (tokenizer, text_encoder) if text_encoder is not None else None
        self._setup(attention, optimize)
        self.set_loras(loras)
        return self

    def _setup(self, attention: str, optimize) -> None:
        from .lora import LoraManager

        self.rebind(self.groups, attention)
        self.optimizer = None
        self.lora = LoraManager(self.transformer)
        self.optimize(optimize)

    def set_loras(self, loras) -> None:
        """Merge exactly these LoRAs (``LoraSpec``, ``(path, strength)`` or ``"FILE[:STRENGTH]"``) into the resident
        weights, replacing the previous set; the base model is never reloaded (``comfyui_xdit_cogvideo.lora``)."""
        self.lora.set(loras)

    @property
    def loras(self) -> list[dict]:
        """The active LoRAs: name, path, strength, format, matched layers."""
        return self.lora.summary()

    def rebind(self, groups: ParallelGroups, attention: str) -> None:
        """Point the resident transformer at other process groups or another attention kernel; no weights move."""
        check_layout(groups.layout, heads=self.info.heads, use_cfg=True)
        from .parallel.transformer import parallelize_transformer  # diffusers and yunchang: only when a model runs

        self.groups, self.attention = groups, resolve_kernel(attention, self.device)
        parallelize_transformer(self.transformer, self.groups, self.attention)

    def optimize(self, options="auto"):
        """Turn on single-GPU speed-ups (``comfyui_xdit_cogvideo.optimize``): ``"auto"`` = the exact ones measured
        fastest on an H200 (fused QKV, compiled blocks, contiguous V, GELU epilogue) on CUDA, nothing on CPU;
        ``None`` = none; flag strings such as ``"auto,fp8"`` add inexact ones. They survive ``rebind``: the
        compiled block code looks up the current attention processor on every call. Returns the Optimizer."""
        from .optimize import OptimizeOptions, optimize_transformer, remove_optimizations

        parsed = OptimizeOptions.parse(options, self.device)
        active = self.lora.specs
        self.lora.clear()  # fusing or fp8 rebuilds weights: merge again on the new storage from the originals
        if parsed is not None and parsed.fuse_qkv and getattr(self.transformer, "_xdit_fp8_resident", False):
            from dataclasses import replace

            parsed = replace(parsed, fuse_qkv=False)  # a fused bf16 copy would undo fp8-resident's memory saving
        if parsed is None:
            remove_optimizations(self.transformer)
            self.optimizer = None
        else:
            self.optimizer = optimize_transformer(self.transformer, parsed)
        self.lora.set(active)
        return self.optimizer

    @property
    def vae(self):
        if self._vae is None:
            self._vae = load_vae(self.resolved, self.dtype, self.device, self.info)
        return self._vae

    @property
    def loaded_vae(self):
        """The VAE if it is already in memory, else None (never loads)."""
        return self._vae

    def attach_vae(self, vae) -> None:
        """Use an already loaded VAE (a pool shares one between decode and I2V image encoding)."""
        self._vae = vae

    @property
    def has_vae(self) -> bool:
        return self._vae is not None or self.resolved.vae is not None

    def _pipeline(self, scheduler: str | None, text: bool = False):
        from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

        cls = CogVideoXImageToVideoPipeline if self.info.image_to_video else CogVideoXPipeline
        tokenizer, encoder = self._text_encoder() if text else (None, None)
        vae = self.vae if (self.info.image_to_video or self.has_vae) else None
        pipe = cls(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=self.transformer,
                   scheduler=load_scheduler(self.resolved, self.info, scheduler))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _text_encoder(self):
        if self._text is None:
            self._text = load_text_encoder(self.resolved, self.dtype, self.device)
        return self._text

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """T5 embeddings [1, 226, D] for prompt and negative prompt, exactly as diffusers' pipeline makes them."""
        pipe = self._pipeline(None, text=True)
        return pipe.encode_prompt(prompt, negative_prompt, do_classifier_free_guidance=True,
                                  num_videos_per_prompt=1, max_sequence_length=self.info.text_len,
                                  device=self.device, dtype=self.dtype)

    def _embeddings(self, r: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Leader encodes whatever text is missing; all ranks receive the same tensors."""
        need_negative = r.use_cfg and r.negative_prompt_embeds is None
        if r.prompt_embeds is not None and not need_negative:
            return r.prompt_embeds, r.negative_prompt_embeds
        shape = (1, self.info.text_len, self.info.text_dim)
        pair, failure = torch.empty((2, *shape)), None
        if self.groups.is_leader:
            try:
                positive, negative = self.encode_prompt(r.prompt or "", r.negative_prompt)
                pair = torch.stack([positive, negative]).float().cpu()
            except Exception as error:  # every rank must leave the broadcast below, then all raise
                failure = error
        if self.groups.layout.world_size > 1:
            leader = dist.get_global_rank(self.groups.control, 0)
            ok = torch.tensor([failure is None], dtype=torch.int32)
            dist.broadcast(ok, src=leader, group=self.groups.control)
            if not ok.item():
                raise failure or RuntimeError("the leader rank failed to encode the prompt")
            dist.broadcast(pair, src=leader, group=self.groups.control)
        elif failure is not None:
            raise failure
        positive = r.prompt_embeds if r.prompt_embeds is not None else pair[0]
        negative = r.negative_prompt_embeds if r.negative_prompt_embeds is not None else pair[1]
        return positive, negative

    @torch.no_grad()
    def generate(
        self,
        request: GenerationRequest,
        on_step: StepCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Latents shaped like ``CogVideoXPipeline(output_type="latent").frames`` (on CPU, model dtype)."""
        r = request.resolved(self.info)
        check_layout(self.groups.layout, heads=self.info.heads, use_cfg=r.use_cfg)
        positive, negative = self._embeddings(r)
        pipe = self._pipeline(r.scheduler)
        if self.optimizer is not None:
            self.optimizer.new_job()
        cancelled = False

        def step_end(pipe_, i, t, kwargs):
            nonlocal cancelled
            stop = bool(should_cancel and should_cancel())
            if self.groups.layout.world_size > 1:
                flag = torch.tensor([int(stop)])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.groups.control)
                stop = bool(flag.item())
            if stop:
                cancelled = True
                pipe_._interrupt = True
            elif on_step is not None and self.groups.is_leader:
                on_step(i + 1, r.steps, kwargs["latents"])
            return {}

        kwargs = dict(
            prompt_embeds=positive.to(self.device, self.dtype),
            negative_prompt_embeds=None if negative is None else negative.to(self.device, self.dtype),
            num_frames=r.frames, height=r.height, width=r.width, num_inference_steps=r.steps,
            guidance_scale=r.guidance, use_dynamic_cfg=r.dynamic_cfg,
            generator=torch.Generator("cpu").manual_seed(r.seed), output_type="latent",
            callback_on_step_end=step_end, callback_on_step_end_tensor_inputs=["latents"],
        )
        if self.info.image_to_video:
            kwargs["image"] = start_image(r.image, r.height, r.width)
        latents = pipe(**kwargs).frames
        if cancelled:
            raise GenerationCancelled("generation cancelled")
        if not torch.isfinite(latents).all():  # decoded, these give a black video that looks like success
            dtype = str(self.dtype).removeprefix("torch.")
            raise FloatingPointError(f"sampling produced NaN or infinite latents ({self.info.variant}, {dtype}); "
                                     "fp16 overflows in CogVideoX: use bf16 or fp32, or check the weights")
        return latents.cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, frames: int | None = None, tiled: bool = False) -> torch.Tensor:
        """Video frames [F, H, W, 3] in 0..1 (first video of the batch), through the model's VAE, in this process.

        ``frames`` (the requested count) drops the temporal padding CogVideoX 1.5 adds, as the pipeline does.
        """
        from .vae_parallel import decode_latents

        return decode_latents(self.vae, latents, frames, tiled=tiled)


def start_image(image: torch.Tensor, height: int, width: int):
    """The I2V start frame as the pipeline gets it: centre-cropped to the video's aspect ratio, as an 8-bit PIL
    image, so diffusers resizes it with Lanczos (a tensor would be resized nearest-neighbour)."""
    from PIL import Image

    h, w = image.shape[0], image.shape[1]
    target = width / height
    if abs(w / h - target) >= 0.01:
        if w / h > target:
            new_w = max(1, round(h * target))
            image = image[:, (w - new_w) // 2:(w - new_w) // 2 + new_w]
        else:
            new_h = max(1, round(w / target))
            image = image[(h - new_h) // 2:(h - new_h) // 2 + new_h]
    pixels = (image.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(pixels, "RGB")
