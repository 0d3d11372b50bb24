"""Limits refused before any worker starts: CogVideoX 1.5's RoPE range (as diffusers' own pipeline has it) and a
coarse memory estimate against the devices."""

from __future__ import annotations

import pytest
import torch

from comfyui_xdit_cogvideo import GenerationRequest, Layout, RequestError
from comfyui_xdit_cogvideo import limits
from comfyui_xdit_cogvideo.limits import LimitError, check_memory, estimate_memory, max_pixels
from comfyui_xdit_cogvideo.loading import ModelSource, read_model_info
from comfyui_xdit_cogvideo.pool import PoolDevices


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", ["1.5", "1.5-i2v"])
def test_diffusers_runs_1_5_exactly_within_the_rope_range_we_allow(tiny_path, variant):
    """Whatever diffusers' pipeline runs, the request check lets through; what it cannot, the check refuses."""
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline
    from PIL import Image

    folder = tiny_path(variant)
    info = read_model_info(ModelSource(str(folder)))
    assert max_pixels(info) == (64, 96)
    i2v = variant.endswith("i2v")
    pipe = (CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    for height, width in ((32, 48), (64, 64), (32, 96), (64, 96), (80, 96), (64, 112), (96, 96)):
        extra = {"image": Image.new("RGB", (width, height))} if i2v else {}
        try:
            pipe(prompt="a cat", num_frames=9, height=height, width=width, num_inference_steps=1,
                 generator=torch.Generator().manual_seed(0), output_type="latent", **extra)
            diffusers_runs = True
        except RuntimeError as error:
            assert "Sizes of tensors must match" in str(error)
            diffusers_runs = False
        request = GenerationRequest(prompt="a cat", frames=9, height=height, width=width,
                                    image=torch.zeros(height, width, 3) if i2v else None)
        if diffusers_runs:
            request.resolved(info)
        else:
            with pytest.raises(RequestError, match=f"runs at most 64 x 96 pixels .* got {height} x {width}: "
                                                   "CogVideoX 1.5's 3D RoPE covers 4 x 6 patches"):
                request.resolved(info)
        assert diffusers_runs == (height <= 64 and width <= 96), (height, width)


def test_published_1_5_reaches_2400_pixels_and_1_0_has_no_range():
    from comfyui_xdit_cogvideo.variants import ModelInfo

    v15 = ModelInfo.from_config(dict(num_attention_heads=48, patch_size_t=2, sample_height=300, sample_width=300,
                                     sample_frames=81, use_rotary_positional_embeddings=True))
    assert max_pixels(v15) == (2400, 2400) and v15.default_size == (768, 1360)
    GenerationRequest(prompt="x").resolved(v15)
    with pytest.raises(RequestError, match="runs at most 2400 x 2400"):
        GenerationRequest(prompt="x", height=2416).resolved(v15)
    assert max_pixels(ModelInfo.from_config(dict(use_rotary_positional_embeddings=True))) is None


def test_weights_are_counted_from_the_safetensors_headers(tiny_path):
    from diffusers import CogVideoXTransformer3DModel

    folder = tiny_path("2b")
    model = CogVideoXTransformer3DModel.from_pretrained(folder / "transformer")
    assert limits.safetensors_elements(folder / "transformer") == sum(p.numel() for p in model.parameters())


def _setup(tiny_path, **request):
    source = ModelSource(str(tiny_path("2b")))
    info = read_model_info(source)
    return info, GenerationRequest(prompt="a cat", **request).resolved(info), source.resolve()


def test_sequence_parallel_shares_the_activations(tiny_path):
    info, request, resolved = _setup(tiny_path, frames=49, height=960, width=1440)
    one = estimate_memory(info, request, Layout(1, 1, 1), "fp32", resolved, leader=True, decode=None)
    four = estimate_memory(info, request, Layout(2, 2, 1), "fp32", resolved, leader=False, decode=None)
    video = 13 * 60 * 90
    assert one.activations == limits.ACTIVATION_WIDTH * 96 * (226 + video) * 2 * 4
    assert four.activations == limits.ACTIVATION_WIDTH * 96 * (226 + -(-video // 2)) * 1 * 4
    assert four.weights < one.weights  # no T5 away from the leader
    decoded = estimate_memory(info, request, Layout(1, 1, 1), "fp32", resolved, leader=True, decode="plain")
    assert decoded.decode > estimate_memory(info, request, Layout(1, 1, 1), "fp32", resolved, leader=True,
                                            decode="tiled").decode > 0


def test_what_cannot_fit_is_refused_with_the_numbers(tiny_path, monkeypatch):
    info, huge, resolved = _setup(tiny_path, frames=9, height=100000, width=100000)
    with pytest.raises(LimitError, match=r"tiny-2b at 9 x 100000 x 100000 in fp32 .* needs about \d+\.\d GiB of RAM "
                                         r"for 1 CPU rank\(s\) but this machine has"):
        check_memory(info, huge, Layout(1, 1, 1), "fp32", resolved, PoolDevices("cpu", 1), decode="plain")
    _, normal, _ = _setup(tiny_path)
    assert check_memory(info, normal, Layout(1, 1, 1), "fp32", resolved, PoolDevices("cpu", 1),
                        decode="plain").total > 0
    # two GPUs of 1 GiB: a mid-size video fits only once the sequence is split
    monkeypatch.setattr(limits, "device_memory", lambda devices: [2 ** 30] * devices.world_size)
    _, mid, _ = _setup(tiny_path, frames=49, height=2048, width=2048)
    gpus = PoolDevices("cuda", 2, ("0", "1"))
    with pytest.raises(LimitError, match=r"needs about \d+\.\d GiB on GPU rank 0 but it has 1\.0 GiB"):
        check_memory(info, mid, Layout(1, 1, 1), "bf16", resolved, gpus, decode=None)
    check_memory(info, mid, Layout(2, 1, 1), "bf16", resolved, gpus, decode=None)
