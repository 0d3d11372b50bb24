"""The layout-equality matrix: which tiny model, request and layouts each case runs (shared by ranks)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest, Layout
from comfyui_xdit_cogvideo.parallel import ParallelGroups

L = Layout
CASES = {
    # 18 video tokens: even on 2 and 3, padded on 4.
    "2b": ("2b", dict(frames=9, height=32, width=48),
           [L(2), L(1, 2), L(1, 1, 2), L(2, 2), L(2, 1, 2), L(1, 2, 2), L(1, 1, 3), L(1, 3), L(1, 1, 4)]),
    # 16 video tokens: padded on 3.
    "2b-uneven": ("2b", dict(frames=13, height=32, width=32), [L(1, 1, 3), L(1, 3)]),
    "5b-dpm-dynamic": ("5b", dict(frames=9, height=32, width=48, scheduler="dpm", dynamic_cfg=True),
                       [L(2), L(1, 2), L(1, 1, 2), L(2, 1, 2), L(1, 2, 2), L(1, 1, 3), L(1, 3), L(1, 1, 4)]),
    # 1.5 at 17 frames: 5 latent frames padded to 6, 3 temporal patches x 6 = 18 tokens.
    "1.5": ("1.5", dict(frames=17, height=32, width=48), [L(2), L(1, 2), L(1, 1, 2), L(1, 1, 3), L(1, 3), L(1, 1, 4),
                                                          L(2, 2)]),
    "5b-i2v": ("5b-i2v", dict(frames=9, height=32, width=48, image=True), [L(2), L(1, 2), L(1, 1, 2), L(1, 1, 3),
                                                                            L(2, 2), L(1, 2, 2)]),
    "1.5-i2v": ("1.5-i2v", dict(frames=9, height=32, width=48, image=True), [L(2), L(1, 3), L(1, 1, 4), L(1, 2, 2)]),
    # 1.5 beyond 32 x 48, up to its RoPE range (64 x 96 on the tiny twins): 2 x 4 x 6 = 48 and 2 x 2 x 6 = 24 tokens.
    # (The I2V start image keeps the test image's 2:3 aspect: other aspects are centre-cropped here, stretched there.)
    "1.5-64x96": ("1.5", dict(frames=9, height=64, width=96), [L(2), L(1, 2), L(1, 1, 3), L(2, 1, 2)]),
    "1.5-32x96": ("1.5", dict(frames=9, height=32, width=96), [L(1, 1, 4), L(1, 3)]),
    "1.5-i2v-64x96": ("1.5-i2v", dict(frames=9, height=64, width=96, image=True), [L(1, 2, 2), L(1, 1, 3)]),
}
EIGHT_RANK_CASES = {
    "5b-8": ("5b", dict(frames=9, height=32, width=48), [L(2, 2, 2), L(2, 1, 4)]),
    "2b-uneven-6": ("2b", dict(frames=13, height=32, width=32), [L(2, 1, 3), L(2, 3, 1)]),
    # World sizes 5, 6 and 7: 18 tokens padded to 20 and 21; ulysses 6 takes all 6 heads of the tiny model.
    "1.5-odd": ("1.5", dict(frames=17, height=32, width=48), [L(1, 1, 5), L(1, 1, 7), L(1, 6, 1)]),
}
# FSDP-sharded weights (memory plan "low") on the same requests: (layout, memory plan, optimize options). FSDP
# shards over each layout's world: 2 ranks (cfg2; ring2 with fused QKV) and 4 (cfg2 x ring2, cfg2 x ulysses2,
# ulysses2 x ring2 with fused QKV + compiled blocks). One-rank plans (offload, T5 placement): test_memory.py.
MEMORY_CASES = {
    "2b": ("2b", dict(frames=9, height=32, width=48),
           [(L(2), "low", None), (L(2, 1, 2), "low", None), (L(1, 2, 2), "low", "fuse,compile")]),
    "5b-dpm-dynamic": ("5b", dict(frames=9, height=32, width=48, scheduler="dpm", dynamic_cfg=True),
                       [(L(2, 2), "low", None), (L(1, 1, 2), "low", "fuse")]),
}
PROMPT, STEPS, SEED = "a cat playing piano at sunset", 3, 1234


def test_image() -> Image.Image:
    y, x = np.mgrid[0:32, 0:48]
    rgb = np.stack([x * 5, y * 7, (x + y) * 3], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def request_for(kwargs: dict) -> GenerationRequest:
    kwargs = dict(kwargs)
    image = None
    if kwargs.pop("image", False):
        image = torch.from_numpy(np.asarray(test_image(), dtype=np.float32) / 255.0)
    return GenerationRequest(prompt=PROMPT, steps=STEPS, seed=SEED, image=image, **kwargs)


def run_cases(rank: int, cases: dict, paths: dict) -> dict:
    """Every layout of every case; the leader of each layout returns its latents as numpy."""
    torch.manual_seed(rank)
    results = {}
    for name, (variant, kwargs, layouts) in cases.items():
        for layout in layouts:
            groups = ParallelGroups.create(layout)
            if groups is None:
                continue
            engine = CogVideoEngine(str(paths[variant]), dtype="fp32", groups=groups)
            latents = engine.generate(request_for(kwargs))
            if groups.is_leader:
                results[(name, str(layout))] = latents.numpy()
    return results


def run_memory_cases(rank: int, cases: dict, paths: dict) -> dict:
    """Like ``run_cases`` with a memory plan per layout; the leader also reports how many blocks were ever
    gathered at once (FSDP must gather just in time: the running block and the prefetched next one), the shard
    count and whether group offloading is on."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    from comfyui_xdit_cogvideo.parallel.fsdp import gathered_blocks, shard_size

    torch.manual_seed(rank)
    results = {}
    for name, (variant, kwargs, plans) in cases.items():
        for layout, memory, optimize in plans:
            groups = ParallelGroups.create(layout)
            if groups is None:
                continue
            engine = CogVideoEngine(str(paths[variant]), dtype="fp32", groups=groups, memory=memory,
                                    optimize=optimize)
            most = []
            hooks = [block.register_forward_pre_hook(lambda *_: most.append(len(gathered_blocks(engine.transformer))))
                     for block in engine.transformer.transformer_blocks]
            latents = engine.generate(request_for(kwargs))
            for hook in hooks:
                hook.remove()
            if groups.is_leader:
                results[(name, str(layout), memory, optimize)] = (
                    latents.numpy(), max(most, default=0), shard_size(engine.transformer),
                    _is_group_offload_enabled(engine.transformer))
    return results


def reference(path, kwargs: dict) -> torch.Tensor:
    """Single-process stock diffusers output for the same request."""
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline, CogVideoXDPMScheduler

    kwargs = dict(kwargs)
    image = kwargs.pop("image", False)
    scheduler = kwargs.pop("scheduler", None)
    dynamic = kwargs.pop("dynamic_cfg", False)
    cls = CogVideoXImageToVideoPipeline if image else CogVideoXPipeline
    pipe = cls.from_pretrained(path)
    if scheduler == "dpm":
        pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    extra = {"image": test_image()} if image else {}
    return pipe(prompt=PROMPT, num_frames=kwargs["frames"], height=kwargs["height"], width=kwargs["width"],
                num_inference_steps=STEPS, guidance_scale=6.0, use_dynamic_cfg=dynamic,
                generator=torch.Generator().manual_seed(SEED), output_type="latent", **extra).frames
