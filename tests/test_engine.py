"""Engine behaviour the layout matrix does not cover: I2V start images, VAE state, leader failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest, Layout
from comfyui_xdit_cogvideo.parallel import ParallelGroups
from distributed import run_world

I2V = dict(prompt="a red panda", frames=9, height=32, width=48, steps=2, seed=11)


def _photo(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], -1).astype(np.uint8))


def _as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def test_larger_start_image_is_resized_as_diffusers_resizes_a_picture(tiny_path):
    from diffusers import CogVideoXImageToVideoPipeline

    photo = _photo(96, 64)  # same 3:2 aspect as 48x32, twice the size
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(tiny_path("5b-i2v"))
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(image=photo, prompt=I2V["prompt"], num_frames=9, height=32, width=48, num_inference_steps=2,
                     generator=torch.Generator().manual_seed(11), output_type="latent").frames
    engine = CogVideoEngine(str(tiny_path("5b-i2v")), dtype="fp32")
    assert torch.equal(engine.generate(GenerationRequest(**I2V, image=_as_tensor(photo))), reference)


def test_start_image_is_centre_cropped_to_the_video_aspect(tiny_path):
    engine = CogVideoEngine(str(tiny_path("5b-i2v")), dtype="fp32")
    wide = _photo(72, 32)  # 9:4; the middle 48x32 is what a 3:2 video should start from
    cropped = wide.crop((12, 0, 60, 32))
    assert torch.equal(engine.generate(GenerationRequest(**I2V, image=_as_tensor(wide))),
                       engine.generate(GenerationRequest(**I2V, image=_as_tensor(cropped))))


def test_tiled_decode_leaves_the_vae_as_it_was(tiny_path):
    engine = CogVideoEngine(str(tiny_path("5b-i2v")), dtype="fp32")
    request = GenerationRequest(**I2V, image=_as_tensor(_photo(48, 32)))
    first = engine.generate(request)
    assert engine.decode(first, frames=9, tiled=True).shape == (9, 32, 48, 3)
    assert not engine.vae.use_tiling
    assert torch.equal(engine.generate(request), first)


def _leader_cannot_encode(rank, folder):
    groups = ParallelGroups.create(Layout(1, 1, 2))
    engine = CogVideoEngine(str(folder), dtype="fp32", groups=groups)
    try:
        engine.generate(GenerationRequest(prompt="a cat", frames=9, height=32, width=48, steps=1))
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}"
    return "no error"


@pytest.mark.timeout(120)
def test_a_failed_text_encode_on_the_leader_fails_every_rank_without_hanging(tmp_path, tiny_path):
    folder = tmp_path / "no-t5"
    folder.mkdir()
    (folder / "transformer").symlink_to(tiny_path("2b") / "transformer")
    leader, other = run_world(2, _leader_cannot_encode, folder, timeout=90)
    assert "ModelError" in leader and "no text encoder" in leader
    assert "leader rank failed to encode the prompt" in other


def test_non_finite_latents_fail_instead_of_decoding_to_a_black_video(tiny_path):
    """What fp16 overflow looks like: the transformer returns inf/NaN; the job fails, it does not 'succeed'."""
    engine = CogVideoEngine(str(tiny_path("2b")), dtype="fp32")
    with torch.no_grad():
        engine.transformer.proj_out.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="sampling produced NaN or infinite latents .* use bf16 or fp32"):
        engine.generate(GenerationRequest(prompt="a cat", frames=9, height=32, width=48, steps=1))
