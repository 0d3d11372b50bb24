"""Tiled VAE decode spread over 2 and 3 gloo ranks equals single-process tiled decode (diffusers' own)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from comfyui_xdit_cogvideo.engine import GenerationCancelled
from comfyui_xdit_cogvideo.vae_parallel import (Tiling, decode_latents, decode_rows, default_tiling, frames_of,
                                                tiled_decode, tiled_size, to_frames, video_rows)
from distributed import run_world

pytestmark = pytest.mark.timeout(300)

TILINGS = [
    (16, 24, 1 / 2, 1 / 3),  # 4 x 3 = 12 tiles: 6 rounds on 2 ranks, 4 on 3
    (24, 32, 1 / 3, 1 / 4),  # 2 x 2 = 4 tiles: the last round leaves ranks idle
]


@pytest.fixture(scope="module")
def vae(tiny_path):
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX.from_pretrained(tiny_path("2b") / "vae").eval()


@pytest.fixture(scope="module")
def latents():
    return torch.randn(1, 3, 4, 4, 6, generator=torch.Generator().manual_seed(0))


def _diffusers(vae, latents, tiling: Tiling | None) -> torch.Tensor:
    model = copy.deepcopy(vae)
    if tiling is None:
        model.enable_tiling()
    else:
        tiling.apply(model)
    z = latents.permute(0, 2, 1, 3, 4) / model.config.scaling_factor
    with torch.no_grad():
        return to_frames(model.decode(z).sample)


@pytest.fixture(scope="module")
def references(vae, latents):
    return {t: _diffusers(vae, latents, Tiling(*t)) for t in TILINGS}


def test_single_process_equals_diffusers_tiled_decode(vae, latents):
    # diffusers' defaults for this tiny VAE (16 x 24 pixel tiles, overlaps 1/6 and 1/5) stitch to 50 x 56 pixels,
    # not 32 x 48; the result is still diffusers' result exactly
    ours = decode_latents(vae, latents, tiled=True, tiling=Tiling.of(vae))
    theirs = _diffusers(vae, latents, None)
    assert ours.shape == theirs.shape == (9, 50, 56, 3)
    assert torch.equal(ours, theirs)
    # default_tiling snaps the overlaps to whole latent rows so the frame comes out whole
    fixed = default_tiling(vae, (4, 6))
    assert tiled_size(vae, fixed, (4, 6)) == (32, 48)
    assert decode_latents(vae, latents, tiled=True).shape == (9, 32, 48, 3)
    assert torch.equal(decode_latents(vae, latents, tiled=True), _diffusers(vae, latents, fixed))


def test_latents_inside_one_tile_decode_plainly_like_diffusers(vae, latents):
    big = Tiling(64, 64, 1 / 4, 1 / 4)
    assert torch.equal(decode_latents(vae, latents, tiled=True, tiling=big),
                       decode_latents(vae, latents, tiled=False))


def test_cancel_between_rounds(vae, latents):
    z = latents.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor
    rounds = []
    with pytest.raises(GenerationCancelled):
        tiled_decode(vae, z, Tiling(*TILINGS[0]), on_progress=lambda s, t: rounds.append(s),
                     should_cancel=lambda: len(rounds) >= 2)
    assert rounds == [1, 2]


def _decode_on_rank(rank, vae_folder, latents, tilings):
    """On 3 ranks: each tiling decoded by ranks {0, 1} (a 2-rank group) and by all 3 ranks."""
    from diffusers import AutoencoderKLCogVideoX

    torch.set_num_threads(1)
    vae = AutoencoderKLCogVideoX.from_pretrained(vae_folder).eval()
    latents = torch.from_numpy(latents)
    pair = dist.new_group([0, 1])
    out = {}
    for world, group in ((2, pair), (3, dist.group.WORLD)):
        if rank >= world:
            continue
        for t in tilings:
            frames = decode_latents(vae, latents, tiled=True, tiling=Tiling(*t), group=group)
            assert (frames is None) == (rank != 0)
            out[world, t] = None if frames is None else frames.numpy()
    # one rank asks to cancel in the second round: every rank stops there
    calls = []
    try:
        decode_latents(vae, latents, tiled=True, tiling=Tiling(*tilings[0]), group=dist.group.WORLD,
                       should_cancel=lambda: calls.append(1) or (rank == 1 and len(calls) >= 2))
        out["cancel"] = "finished"
    except GenerationCancelled:
        out["cancel"] = f"cancelled after {len(calls)} rounds"
    return out


def test_parallel_tiled_decode_on_2_and_3_ranks_equals_single_process(tiny_path, latents, references):
    results = run_world(3, _decode_on_rank, str(tiny_path("2b") / "vae"), latents.numpy(), TILINGS)
    for world in (2, 3):
        for t in TILINGS:
            got = torch.from_numpy(results[0][world, t])
            assert got.shape == references[t].shape == (9, 32, 48, 3)
            assert (got - references[t]).abs().max().item() < 1e-6, (world, t)
    assert all(r["cancel"] == "cancelled after 2 rounds" for r in results)


# ---- the automatic decode choice (issue 17) ------------------------------------------------------------------------
GIB = 2 ** 30


@pytest.mark.parametrize("tiled,world,needed,free,expected", [
    (None, 1, 19 * GIB, 120 * GIB, (False, 1, "untiled on rank 0: needs 19.0 GiB, 120.0 GiB free")),
    (None, 2, 19 * GIB, 120 * GIB, (False, 1, "untiled on rank 0: needs 19.0 GiB, 120.0 GiB free")),
    (None, 1, 19 * GIB, 10 * GIB, (True, 1, "tiled over 1 rank: untiled would need 19.0 GiB, rank 0 has 10.0 GiB free")),
    (None, 2, 19 * GIB, 10 * GIB, (True, 2, "tiled over 2 ranks: untiled would need 19.0 GiB, rank 0 has 10.0 GiB "
                                            "free")),
    (None, 3, 19 * GIB, 120 * GIB, (True, 3, "tiled over 3 ranks: 3 ranks decode tiles faster than one untiled "
                                             "decode (from 3 ranks on)")),
    (None, 8, 19 * GIB, None, (True, 8, "tiled over 8 ranks: 8 ranks decode tiles faster than one untiled decode "
                                        "(from 3 ranks on)")),
    (None, 2, 19 * GIB, None, (False, 1, "untiled on rank 0: needs 19.0 GiB, no device memory limit")),
    (True, 1, 19 * GIB, 120 * GIB, (True, 1, "tiled over 1 rank: asked for")),
    (True, 2, 19 * GIB, 120 * GIB, (True, 2, "tiled over 2 ranks: asked for")),
    (False, 4, 19 * GIB, 1 * GIB, (False, 1, "untiled on rank 0: asked for")),
])
def test_decode_choice(tiled, world, needed, free, expected):
    from comfyui_xdit_cogvideo.vae_parallel import TILED_DECODE_MIN_RANKS, choose_decode

    assert TILED_DECODE_MIN_RANKS == 3
    choice = choose_decode(tiled, world, needed, free)
    assert (choice.tiled, choice.ranks, choice.describe()) == expected
    assert choice.mode == ("tiled" if expected[0] else "plain")


def test_decode_choice_refuses_an_empty_pool():
    from comfyui_xdit_cogvideo.vae_parallel import choose_decode

    with pytest.raises(ValueError, match="at least one rank, got 0"):
        choose_decode(None, 0, GIB, None)


def test_untiled_decode_estimate_matches_the_measured_peak(tiny_path):
    """49 x 480 x 720 in bf16 with the published VAE: 19.1 GiB measured on an H200 (BENCHMARKS.md) -> 19.3 GiB with
    the decoded video; the tiny VAE (narrower, fewer weights, read from its headers) needs far less."""
    from comfyui_xdit_cogvideo.memory import decode_budget, untiled_decode_peak

    real = untiled_decode_peak(None, 49, 480, 720, 2)
    assert 19.1 * GIB <= real <= 19.5 * GIB
    assert untiled_decode_peak(None, 49, 480, 720, 4) > 1.9 * real  # fp32 doubles it
    tiny = untiled_decode_peak(tiny_path("2b") / "vae", 9, 32, 48, 4)
    assert 0 < tiny < real / 1000
    # rank 0's budget: free plus its allocator's unused cache (the resident model stays), after the margin
    assert decode_budget({"allocated": 40 * GIB, "reserved": 50 * GIB, "free": 80 * GIB, "total": 141 * GIB}) == \
        int(90 * GIB * 0.95) - GIB
    assert decode_budget({"rss": GIB}) is None and decode_budget(None) is None


def _frames_before(video: torch.Tensor) -> torch.Tensor:
    """The frames as the pool made them before issue 17's decode work: all arithmetic on the VAE's device."""
    return (video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).cpu()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frames_from_the_vae_dtype_are_bit_identical_for_every_value(dtype):
    """Issue 17: workers send the VAE's output in its own dtype and the caller makes the float frames. Every one of
    the 65,536 bf16 / fp16 bit patterns (NaN and infinities included) gives the frame value of the former path."""
    every = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)
    video = torch.stack([every, every.roll(1), every.roll(2)]).reshape(1, 3, 4, 128, 128)  # [1, 3, F, H, W]
    rows = video_rows(video)
    assert rows.dtype == dtype and rows.shape == (4, 128, 128, 3) and rows.is_contiguous()
    frames = frames_of(rows)
    assert frames.dtype == torch.float32 and frames.is_contiguous()
    assert torch.equal(frames.nan_to_num(-7), _frames_before(video).nan_to_num(-7))


def test_frames_from_float32_are_bit_identical():
    values = torch.randn(1, 3, 5, 16, 24, generator=torch.Generator().manual_seed(1)) * 1.5
    values[0, 0, 0, 0, :8] = torch.tensor([-1.0, 1.0, 0.0, -0.0, 1e-40, -1e-40, 3e38, float("inf")])
    assert torch.equal(to_frames(values), _frames_before(values))


def test_decode_rows_are_the_vae_output_in_its_dtype(vae, latents):
    """What a pool worker sends: [F, H, W, 3] in the VAE's dtype, whose frames are the decode's frames exactly."""
    tiling = Tiling(*TILINGS[0])
    rows = decode_rows(vae, latents, tiled=True, tiling=tiling)
    assert rows.dtype == vae.dtype and rows.shape == (9, 32, 48, 3) and rows.is_contiguous()
    assert torch.equal(frames_of(rows), decode_latents(vae, latents, tiled=True, tiling=tiling))
    z = latents.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor
    with torch.no_grad():
        assert torch.equal(frames_of(decode_rows(vae, latents, tiled=False)), _frames_before(vae.decode(z).sample))
