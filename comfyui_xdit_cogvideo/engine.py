"""One rank's CogVideoX engine: resident weights, the stock diffusers pipeline, a parallel transformer.

Every rank of a layout builds an engine and calls ``generate`` with the same request; each runs the same
diffusers loop with the same CPU generator, so all ranks hold identical latents and only the transformer's
forward is shared out. The leader (rank 0) encodes text once and broadcasts the embeddings.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Callable

import torch
import torch.distributed as dist

from .errors import GenerationCancelled  # noqa: F401  (engine.GenerationCancelled stays importable)
from .layout import check_layout
from .loading import (CONSTRUCTION_LOCK, ModelSource, load_scheduler, load_text_encoder, load_transformer,
                      load_vae, parse_dtype)
from .memory import MemoryPlan
from .parallel.groups import ParallelGroups
from .parallel.kernels import probe_kernel, probe_seconds, resolve_kernel
from .request import GenerationRequest
from .variants import ModelInfo

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
        memory: "str | MemoryPlan" = "fast",
        preload_text: bool | tuple[str, str] = False,
    ):
        """``preload_text``: load T5 on a thread while the transformer loads (the first job encodes a prompt),
        instead of when the first prompt is encoded; a (prompt, negative prompt) pair is also encoded on that
        thread once T5 is loaded, so the first job finds its embeddings ready (its first T5 call, 0.8 s on an
        H200, overlaps the load too)."""
        self.source = ModelSource(source) if isinstance(source, str) else source
        self.resolved = self.source.resolve()
        self.dtype, self.device = parse_dtype(dtype), torch.device(device)
        self.groups = groups or ParallelGroups.single()
        self.memory = _plan(memory, self.groups)
        # where the construction's seconds went (pool status "last_job" -> "load", CLI summary)
        self.load_timings: dict = {}
        # low/offload: weights wait on the CPU until they are sharded or streamed onto the device
        home = self.device if self.memory.name == "fast" else torch.device("cpu")
        self._vae = None
        self._text = None
        self._text_preload = None
        self._early_text: _EarlyText | None = None

        def built(model) -> None:  # the transformer is built, its bytes are about to move: start what can overlap
            if attention == "auto":  # the kernel's self-test (flash-attn's import and JIT)
                probe_kernel(self.device)
            if preload_text and self.resolved.text_encoder is not None and self.resolved.tokenizer is not None:
                first = tuple(preload_text) if isinstance(preload_text, (tuple, list)) else None
                self._text_preload = _TextPreload(self, first, ModelInfo.from_config(model.config).text_len)
            if self.memory.name == "fast" and self.resolved.storage != "fp8":  # fp8-resident fuses no QKV: other
                self._prefetch_compiled(model, optimize)  # graphs than the options say; none guessed for it

        with prompt_gil_handoff():
            self.transformer, self.info = load_transformer(self.resolved, self.dtype, home, self.load_timings, built)
            self._placed = self.memory.name == "fast"
            self._setup(attention, optimize)
            mark = time.perf_counter()
            self.set_loras(loras)
            self.load_timings["loras_s"] = round(time.perf_counter() - mark, 3)

    def _prefetch_compiled(self, model, optimize) -> None:
        """Start ``CompilePrefetch`` for the model just built, if the device keeps room for what is still on its way
        (the transformer's weights, and T5's when it is preloaded onto the device) beside the prefetch."""
        from .limits import safetensors_elements
        from .optimize import CompilePrefetch, OptimizeOptions

        try:
            options = OptimizeOptions.parse(optimize, self.device)
        except ValueError:
            return  # the engine's own optimize() reports the bad flags
        arriving = sum(p.numel() for p in model.parameters()) * self.dtype.itemsize
        if self._text_preload is not None and self._text_home().type == "cuda":
            arriving += safetensors_elements(self.resolved.text_encoder) * self.dtype.itemsize
        try:
            CompilePrefetch.start(model, options, self.device, CONSTRUCTION_LOCK, arriving)  # its first job reports it
        except Exception as error:  # noqa: BLE001 - a speed-up that cannot start must not fail the load
            logging.getLogger(__name__).warning("the compiled graphs were not prefetched: %s: %s",
                                                type(error).__name__, error)

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
        memory: "str | MemoryPlan" = "fast",
        device: str | torch.device | None = None,
    ) -> "CogVideoEngine":
        """An engine over models already in memory (benchmarks, random full-size weights); no files read.

        ``transformer`` is a diffusers CogVideoXTransformer3DModel on its device and dtype; it is parallelized
        in place. Without ``vae``/``text_encoder`` the engine samples from prompt embeddings only. ``device``: where
        it computes, when the memory plan hands over a transformer resting on the CPU (default: its device).
        """
        from pathlib import Path

        from .loading import ResolvedSource

        self = cls.__new__(cls)
        param = next(transformer.parameters())
        self.source = ModelSource("<memory>")
        self.resolved = ResolvedSource(Path("<memory>"), None, None, None, None)
        self.dtype, self.device = param.dtype, torch.device(device) if device is not None else param.device
        self.groups = groups or ParallelGroups.single()
        self.memory = _plan(memory, self.groups)
        self.load_timings = {}
        self._placed = self.memory.name == "fast"
        self.transformer = transformer.eval().requires_grad_(False)
        self.info = ModelInfo.from_config(transformer.config)
        self._vae = vae
        self._text = (tokenizer, text_encoder.to(self._text_home())) if text_encoder is not None else None
        self._text_preload = None
        self._early_text = None
        self._setup(attention, optimize)
        self.set_loras(loras)
        return self

    def _setup(self, attention: str, optimize) -> None:
        from .lora import LoraManager

        self.optimizer = None
        self.timings: dict = {}  # the last generate's phases, in seconds (pool status, CLI summary)
        self.lora = LoraManager(self.transformer)
        mark = time.perf_counter()
        with CONSTRUCTION_LOCK.shared():  # never during a T5 preload's build; beside the prefetch's trace
            self.optimize(optimize)  # before sharding: fusing QKV rewrites the weights
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.load_timings["optimize_s"] = round(now - mark, 3)
        self.rebind(self.groups, attention)  # waits for the kernel probe started before the load, if any
        self.load_timings["attention_s"] = round(time.perf_counter() - now, 3)
        # resolving "auto" took the probe's answer, so the probe is at most recording its time: let it
        probe = probe_seconds(self.device, wait=5.0 if attention == "auto" else 0.0)
        if probe is not None:
            self.load_timings["kernel_probe_s"] = probe  # its own duration, mostly hidden behind the load

    def set_loras(self, loras) -> None:
        """Merge exactly these LoRAs (``LoraSpec``, ``(path, strength)`` or ``"FILE[:STRENGTH]"``) into the resident
        weights, replacing the previous set; the base model is never reloaded (``comfyui_xdit_cogvideo.lora``)."""
        if self.lora.is_current(loras):
            return  # nothing changes: no need to wait for a T5 preload's build
        with CONSTRUCTION_LOCK.shared():  # LoRA conversion makes tensors in the default dtype: not during a build
            self.lora.set(loras)

    @property
    def loras(self) -> list[dict]:
        """The active LoRAs: name, path, strength, format, matched layers."""
        return self.lora.summary()

    def rebind(self, groups: ParallelGroups, attention: str) -> None:
        """Point the resident transformer at other process groups or another attention kernel; no weights move.

        Under the ``low`` plan the first layout of more than one rank shards the weights over its ranks; a later
        layout must have the same world size (the shards stay where they are) or the engine must be reloaded."""
        from .parallel.fsdp import shard_size

        check_layout(groups.layout, heads=self.info.heads, use_cfg=True)
        from .parallel.transformer import parallelize_transformer  # diffusers and yunchang: only when a model runs

        sharded = shard_size(self.transformer)
        if sharded > 1 and groups.layout.world_size != sharded:
            raise RuntimeError(f"the transformer is sharded over {sharded} ranks; a layout of "
                               f"{groups.layout.world_size} rank(s) needs the model loaded again")
        self.groups, self.attention = groups, resolve_kernel(attention, self.device)
        parallelize_transformer(self.transformer, self.groups, self.attention)
        if not self._placed and self.memory.name == "low" and groups.layout.world_size > 1:
            self._place()

    def _place(self) -> None:
        """Put the transformer where the memory plan wants it (once): sharded over the layout's ranks (low, more
        than one rank), whole on the device (low, one rank), or streamed block by block (offload)."""
        if self._placed:
            return
        world = self.groups.layout.world_size
        active = self.lora.specs
        self.lora.clear()  # the saved originals describe the unsharded weights: merge again once placed
        if self.memory.name == "low" and world > 1:
            from .parallel.fsdp import shard_transformer

            shard_transformer(self.transformer, self.groups.world, self.device)
        elif self.memory.name == "offload":
            if world > 1:
                raise RuntimeError("memory plan 'offload' runs on one rank; use 'low' to shard over several")
            _group_offload(self.transformer, self.device)
        else:
            self.transformer.to(self.device)
        self._placed = True
        self.lora.set(active)

    def optimize(self, options="auto"):
        """Turn on single-GPU speed-ups (``comfyui_xdit_cogvideo.optimize``): ``"auto"`` = the exact ones measured
        fastest on an H200 (fused QKV, compiled blocks, contiguous V, GELU epilogue) on CUDA, nothing on CPU;
        ``None`` = none; flag strings such as ``"auto,fp8"`` add inexact ones. They survive ``rebind``: the
        compiled block code looks up the current attention processor on every call. Returns the Optimizer."""
        from .optimize import OptimizeOptions, optimize_transformer, remove_optimizations
        from .parallel.fsdp import shard_size

        parsed = OptimizeOptions.parse(options, self.device)
        if (self._placed and self.memory.name != "fast") or shard_size(self.transformer) > 1:
            current = self.optimizer.options if self.optimizer is not None else None
            if _weight_layout(parsed) != _weight_layout(current):
                raise RuntimeError("fused QKV and fp8 change the weights; under the memory plan "
                                   f"{self.memory.name!r} choose them when the engine is built")
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

    def _pipeline(self, scheduler: str | None):
        """The stock pipeline that samples (prompt embeddings given: no text encoder)."""
        from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

        cls = CogVideoXImageToVideoPipeline if self.info.image_to_video else CogVideoXPipeline
        vae = self.vae if (self.info.image_to_video or self.has_vae) else None
        pipe = cls(tokenizer=None, text_encoder=None, vae=vae, transformer=self.transformer,
                   scheduler=load_scheduler(self.resolved, self.info, scheduler))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _text_home(self) -> torch.device:
        """Where T5 rests between encodes: on the device only under text placement 'gpu'."""
        return self.device if self.memory.text == "gpu" else torch.device("cpu")

    def _text_encoder(self):
        if self._text is None:
            mark = time.perf_counter()
            if self._text_preload is not None:
                preload, self._text_preload = self._text_preload, None
                self._text = preload.result()  # its error, if any, is raised here, as a load here would
                self._text[1].to(self._text_home())  # the memory plan may have changed since it started
                self._early_text = preload.early
                self.timings["text_preload_s"] = preload.seconds  # its own duration (load, early encode), overlapped
                if preload.early is not None:
                    self.timings["text_early_encode_s"] = preload.early.seconds
            else:
                self._text = load_text_encoder(self.resolved, self.dtype, self._text_home())
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings["text_load_s"] = round(time.perf_counter() - mark, 3)  # part of this job's text_s
        return self._text

    def set_memory_plan(self, plan: MemoryPlan) -> None:
        """Adopt a job's plan where that moves nothing heavy: T5's placement and the decode tile. The weights'
        placement (plan name, shard count) is fixed when the engine is built."""
        if (plan.name, plan.shard > 1) != (self.memory.name, self.memory.shard > 1):
            raise RuntimeError(f"the engine was built for memory plan {self.memory.name!r}, not {plan.name!r}")
        self.memory = plan
        if self._text is not None:
            self._text[1].to(self._text_home())
            if self.device.type == "cuda" and plan.text != "gpu":
                torch.cuda.empty_cache()

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """T5 embeddings [1, 226, D] for prompt and negative prompt, exactly as diffusers' pipeline makes them.

        Text placement 'swap' moves T5 onto the device for the encode and back to the CPU after; 'cpu' encodes on
        the CPU (the embeddings then move to the device). The first job's pair may already be encoded by the T5
        preload (``preload_text``), on the same device with the same code."""
        tokenizer, encoder = self._text_encoder()
        where = torch.device("cpu") if self.memory.text == "cpu" else self.device
        early, self._early_text = self._early_text, None  # used once: later jobs encode as usual
        if early is not None and early.key == _text_key(prompt, negative_prompt, where, self.info.text_len, self.dtype):
            return early.positive.to(self.device), early.negative.to(self.device)
        if self.memory.text == "swap":
            encoder.to(self.device)
        try:
            positive, negative = encode_text(tokenizer, encoder, prompt, negative_prompt, self.info.text_len, where,
                                             self.dtype)
        finally:
            if self.memory.text == "swap":
                encoder.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return positive.to(self.device), negative.to(self.device)

    @staticmethod
    def needs_text(request: GenerationRequest) -> bool:
        """Whether ``request`` makes the engine encode text (what ``preload_text`` is for)."""
        return request.prompt_embeds is None or (request.use_cfg and request.negative_prompt_embeds is None)

    @staticmethod
    def prompt_pair(request: GenerationRequest) -> tuple[str, str]:
        """The (prompt, negative prompt) this engine encodes for ``request``: what ``preload_text`` may encode
        early, which serves the job only if both derive the pair alike."""
        return request.prompt or "", request.negative_prompt

    def _embeddings(self, r: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Leader encodes whatever text is missing; all ranks receive the same tensors."""
        if not self.needs_text(r):
            return r.prompt_embeds, r.negative_prompt_embeds
        shape = (1, self.info.text_len, self.info.text_dim)
        pair, failure = torch.empty((2, *shape)), None
        if self.groups.is_leader:
            try:
                positive, negative = self.encode_prompt(*self.prompt_pair(r))
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
        clock = [time.perf_counter()]
        self.timings = timings = {}

        def lap(name: str) -> None:  # seconds since the previous lap, synchronised (a few per job)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            clock.append(time.perf_counter())
            timings[name] = round(clock[-1] - clock[-2], 3)

        positive, negative = self._embeddings(r)
        lap("text_s")
        self._place()
        lap("place_s")
        pipe = self._pipeline(r.scheduler)
        if self.optimizer is not None:
            self.optimizer.new_job(r.steps)
        cancelled = False

        def step_end(pipe_, i, t, kwargs):
            nonlocal cancelled
            if i == 0:
                lap("first_step_s")  # from the pipeline's start: compile or cache load, kernel JIT, one step
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
        lap("other_steps_s")
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


def encode_text(tokenizer, encoder, prompt: str, negative_prompt: str, text_len: int, where: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' ``CogVideoXPipeline.encode_prompt`` with classifier-free guidance (the image-to-video pipeline's is
    a copy of it), on a pipeline that holds only the tokenizer and T5."""
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=None, scheduler=None)
    return pipe.encode_prompt(prompt, negative_prompt, do_classifier_free_guidance=True, num_videos_per_prompt=1,
                              max_sequence_length=text_len, device=where, dtype=dtype)


def _text_key(prompt: str, negative_prompt: str, where: torch.device, text_len: int, dtype: torch.dtype) -> tuple:
    """What makes two encodes give the same embeddings: the prompt pair, where T5 runs, the length, the dtype."""
    return prompt, negative_prompt, str(where), text_len, dtype


class _EarlyText:
    """The first job's embeddings, encoded by the T5 preload; ``key`` (``_text_key``) says for which encode they
    hold."""

    def __init__(self, key: tuple, positive: torch.Tensor, negative: torch.Tensor, seconds: float):
        self.key, self.positive, self.negative, self.seconds = key, positive, negative, seconds


class _TextPreload:
    """T5 loading on a daemon thread (started while the transformer's weights are copied): its build holds
    ``CONSTRUCTION_LOCK``, its copy onto the device overlaps the engine's own work. With ``prompt`` (the first job's
    prompt and negative prompt) it then encodes them where the engine's encode would (T5's home: the device under
    text placement 'gpu', the CPU under 'cpu'; not under 'swap', whose encode moves T5), holding the lock shared; a
    failed early encode is only logged, since the job encodes again and reports its own error."""

    def __init__(self, engine: "CogVideoEngine", prompt: tuple[str, str] | None, text_len: int):
        self.seconds: float | None = None
        self.early: _EarlyText | None = None
        self._value = self._error = None
        resolved, dtype, home, device = engine.resolved, engine.dtype, engine._text_home(), engine.device
        encode = (prompt, text_len) if prompt is not None and engine.memory.text in ("gpu", "cpu") else None
        self._thread = threading.Thread(target=self._run, args=(resolved, dtype, home, device, encode),
                                        name="xdit-text-preload", daemon=True)
        self._thread.start()

    def _run(self, resolved, dtype, home, device, encode) -> None:
        started = time.perf_counter()
        try:
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                self._value = load_text_encoder(resolved, dtype, home)
                if home.type == "cuda":
                    torch.cuda.synchronize(home)
                if encode is not None:
                    self._encode_early(*encode, home, dtype)
        except BaseException as error:  # noqa: BLE001 - raised on the engine's thread by result()
            self._error = error
        self.seconds = round(time.perf_counter() - started, 3)

    def _encode_early(self, prompt: tuple[str, str], text_len: int, where: torch.device, dtype: torch.dtype) -> None:
        mark = time.perf_counter()
        try:
            with CONSTRUCTION_LOCK.shared(), torch.no_grad():
                positive, negative = encode_text(*self._value, *prompt, text_len, where, dtype)
            if where.type == "cuda":
                torch.cuda.synchronize(where)
        except Exception as error:  # noqa: BLE001 - the job's own encode runs instead
            logging.getLogger(__name__).warning("the first prompt was not encoded early: %s: %s",
                                                type(error).__name__, error)
            return
        key = _text_key(*prompt, where, text_len, dtype)
        self.early = _EarlyText(key, positive, negative, round(time.perf_counter() - mark, 3))

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


# Python's switch interval while the load overlaps its background threads (kernel probe, T5 preload). The load is
# a thousand short calls that each release the GIL (one per tensor read, copied, fused); after each, the main
# thread waits for a busy background thread to give the GIL back, up to the default 5 ms: 3-4 s of a 2b load on an
# H200 (to_device_s 2.3-4.6 s against 0.9 s for diffusers' whole load, BENCHMARKS.md session 5; on a CPU, 700 small
# copies beside one busy thread: 3.9 s at 5 ms, 0.2 s at 0.1 ms, alone 0.08 s). Measured at 0.1 ms (session 6,
# load_bench): the 2b copy beside the kernel probe 2.75-2.83 s against 3.92-4.70 s at 5 ms.
LOAD_SWITCH_INTERVAL = 1e-4


_HANDOFF_LOCK = threading.Lock()
# blocks inside prompt_gil_handoff (any thread), the interval before them, the one they set (as given: the
# interpreter keeps whole microseconds, so reading it back and setting it again would creep down)
_HANDOFF = {"depth": 0, "previous": 0.0, "set": 0.0}


@contextlib.contextmanager
def prompt_gil_handoff(interval: float | None = None):
    """Lower the interpreter's switch interval to ``interval`` (default ``LOAD_SWITCH_INTERVAL``, read now; never
    raised) for the block. The setting is process-wide: the interval from before the first of overlapping blocks
    (engines loading on several threads) comes back when the last one ends, whatever their order."""
    with _HANDOFF_LOCK:
        if _HANDOFF["depth"] == 0:
            _HANDOFF["previous"] = _HANDOFF["set"] = sys.getswitchinterval()
        _HANDOFF["depth"] += 1
        wanted = LOAD_SWITCH_INTERVAL if interval is None else interval
        if wanted < _HANDOFF["set"]:
            _HANDOFF["set"] = wanted
            sys.setswitchinterval(wanted)
    try:
        yield
    finally:
        with _HANDOFF_LOCK:
            _HANDOFF["depth"] -= 1
            if _HANDOFF["depth"] == 0:
                sys.setswitchinterval(_HANDOFF["previous"])


def _plan(memory: "str | MemoryPlan", groups: ParallelGroups) -> MemoryPlan:
    """A plan from a name (fast, low, offload; auto = fast without a planner) or a resolved MemoryPlan."""
    if isinstance(memory, MemoryPlan):
        return memory
    return MemoryPlan.default(memory, groups.layout.world_size)


def _weight_layout(options) -> tuple[bool, bool]:
    """The optimize options that rewrite weights (fused QKV, fp8); the others only change the block code."""
    return (bool(options and options.fuse_qkv), bool(options and options.fp8))


def _group_offload(transformer, device: torch.device) -> None:
    """diffusers' group offloading, one block per group: weights rest in CPU memory (pinned when streaming) and
    each block is copied onto ``device`` before it runs; with CUDA the next block's copy overlaps the current one's
    compute on a separate stream."""
    from diffusers.hooks import apply_group_offloading

    stream = device.type == "cuda"
    apply_group_offloading(transformer, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, use_stream=stream,
                           non_blocking=stream)


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
