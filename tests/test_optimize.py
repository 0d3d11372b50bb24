"""The speed options on CPU: exact ones keep diffusers' latents (single process and on a layout); the inexact
step cache really skips steps and stays close."""

from __future__ import annotations

import pytest
import torch

from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest, Layout
from comfyui_xdit_cogvideo.optimize import OptimizeOptions
from comfyui_xdit_cogvideo.parallel import ParallelGroups
from distributed import run_world

REQUEST = dict(prompt="a cat playing piano", frames=9, height=32, width=48, steps=4, seed=5)


@pytest.fixture(scope="module")
def reference(tiny_path):
    return CogVideoEngine(str(tiny_path("5b")), dtype="fp32", optimize="none").generate(GenerationRequest(**REQUEST))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_parse():
    assert OptimizeOptions.parse("auto", "cpu") is None
    assert OptimizeOptions.parse("auto", "cuda") == OptimizeOptions()
    assert OptimizeOptions.parse("fuse,compile", "cpu") == OptimizeOptions(contiguous_v=False, gelu_epilogue=False)
    assert OptimizeOptions.parse("fuse,compile=always", "cpu").compile_policy == "always"
    assert OptimizeOptions.parse("auto,cache=0.08", "cuda").step_cache == 0.08
    assert OptimizeOptions.parse("none") is None


@pytest.mark.timeout(300)
def test_fused_compiled_blocks_equal_diffusers(tiny_path, reference):
    engine = CogVideoEngine(str(tiny_path("5b")), dtype="fp32", optimize="fuse,compile=always,contiguous_v")
    assert all(getattr(b.attn1, "fused_projections", False) for b in engine.transformer.transformer_blocks)
    assert _rel(engine.generate(GenerationRequest(**REQUEST)), reference) < 1e-5
    assert engine.optimizer.compile_report()["why"].startswith("compiled: ")
    engine.optimize("none")
    assert _rel(engine.generate(GenerationRequest(**REQUEST)), reference) < 1e-5


def _fused_on_layout(rank, path):
    groups = ParallelGroups.create(Layout(2, 1, 2))
    engine = CogVideoEngine(str(path), dtype="fp32", groups=groups, optimize="fuse,contiguous_v")
    return engine.generate(GenerationRequest(**REQUEST)).numpy()


@pytest.mark.timeout(300)
def test_fused_projections_on_a_layout_equal_diffusers(tiny_path, reference):
    results = run_world(4, _fused_on_layout, tiny_path("5b"))
    for latents in results:
        assert _rel(torch.from_numpy(latents), reference) < 1e-4


def test_step_cache_skips_steps_and_stays_close(tiny_path, reference):
    engine = CogVideoEngine(str(tiny_path("5b")), dtype="fp32", optimize="cache=1e9")
    latents = engine.generate(GenerationRequest(**REQUEST))
    stats = engine.optimizer.stats()
    assert stats["skipped_steps"] >= 1 and stats["computed_steps"] >= 2
    assert 0 < _rel(latents, reference) < 0.05
