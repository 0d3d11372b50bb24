"""Bad requests are rejected with a message that names the value and what would work."""

from __future__ import annotations

import pytest
import torch

from comfyui_xdit_cogvideo import GenerationRequest, RequestError
from comfyui_xdit_cogvideo.loading import ModelSource, read_model_info

BASE = dict(prompt="a cat", frames=9, height=32, width=48, steps=2)


@pytest.fixture(scope="module")
def infos(tiny_path):
    return {v: read_model_info(ModelSource(str(tiny_path(v)))) for v in ("2b", "5b-i2v", "1.5")}


@pytest.mark.parametrize("change,match", [
    (dict(frames=10), r"frames must be 4k\+1 .* e.g. 9 or 13; got 10"),
    (dict(frames=0), "frames must be 4k"),
    (dict(height=40), "height must be a positive multiple of 16 .* got 40; e.g. 32 or 48"),
    (dict(width=0), "width must be a positive multiple of 16"),
    (dict(steps=0), "steps must be between 1 and 1000"),
    (dict(guidance=-1.0), "guidance must be between 0 and 50"),
    (dict(seed=-5), "seed must be between"),
    (dict(scheduler="euler"), "scheduler must be 'ddim' or 'dpm'"),
    (dict(prompt=None), "give a prompt"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 32)), r"prompt_embeds must have shape \[1, 226, 32\]"),
    (dict(negative_prompt_embeds=torch.zeros(1, 226, 4096)), r"negative_prompt_embeds must have shape \[1, 226, 32\]"),
    (dict(image=torch.zeros(32, 48, 3)), "^tiny-2b is a text-to-video model and takes no start image"),
    (dict(prompt=None, prompt_embeds=torch.full((1, 226, 32), float("nan"))),
     r"prompt_embeds contains 7232 NaN or infinite value\(s\) of 7232"),
    (dict(negative_prompt_embeds=torch.zeros(1, 226, 32).index_fill_(1, torch.tensor([3]), float("inf"))),
     "negative_prompt_embeds contains 32 NaN or infinite"),
])
def test_bad_requests(infos, change, match):
    with pytest.raises(RequestError, match=match):
        GenerationRequest(**{**BASE, **change}).resolved(infos["2b"])


def test_image_to_video_rules(infos):
    with pytest.raises(RequestError, match="image-to-video model: give a start image"):
        GenerationRequest(**BASE).resolved(infos["5b-i2v"])
    with pytest.raises(RequestError, match=r"image must be one RGB frame \[H, W, 3\]"):
        GenerationRequest(**BASE, image=torch.zeros(1, 32, 48, 3)).resolved(infos["5b-i2v"])
    with pytest.raises(RequestError, match="image contains NaN or infinite values"):
        GenerationRequest(**BASE, image=torch.full((32, 48, 3), float("nan"))).resolved(infos["5b-i2v"])
    with pytest.raises(RequestError,
                       match="tiny-5b-i2v has learned positional embeddings and only runs at 9 frames x 32 x 48"):
        GenerationRequest(**{**BASE, "height": 64}, image=torch.zeros(64, 48, 3)).resolved(infos["5b-i2v"])


def test_defaults_come_from_the_model(infos):
    r = GenerationRequest(prompt="x").resolved(infos["1.5"])
    assert (r.frames, r.height, r.width) == (9, 64, 96)
    r = GenerationRequest(prompt="x").resolved(infos["2b"])
    assert (r.frames, r.height, r.width) == (9, 32, 48)


def test_messages_use_the_name_the_user_gave(tiny_path):
    info = read_model_info(ModelSource("tiny"))
    assert info.display == "tiny" and info == read_model_info(ModelSource(str(tiny_path("2b"))))
    with pytest.raises(RequestError, match="^tiny is a text-to-video model"):
        GenerationRequest(**BASE, image=torch.zeros(32, 48, 3)).resolved(info)
    with pytest.raises(RequestError, match="^tiny-5b-i2v is an image-to-video model: give a start image"):
        GenerationRequest(**BASE).resolved(read_model_info(ModelSource("tiny-5b-i2v")))
