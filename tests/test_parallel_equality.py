"""The core promise: every parallel layout returns the single-process diffusers latents (fp32, CPU, gloo)."""

from __future__ import annotations

import pytest
import torch

from comfyui_xdit_cogvideo import Layout

from distributed import run_world
from parallel_cases import CASES, EIGHT_RANK_CASES, MEMORY_CASES, reference, run_cases, run_memory_cases

REL_TOL = 1e-4


def _sweep(cases, world, tiny_path):
    paths = {variant: tiny_path(variant) for variant, _, _ in cases.values()}
    merged = {}
    for part in run_world(world, run_cases, cases, paths):
        merged.update(part)
    return merged, paths


@pytest.fixture(scope="module")
def four_rank_results(tiny_path):
    return _sweep(CASES, 4, tiny_path)


@pytest.fixture(scope="module")
def eight_rank_results(tiny_path):
    return _sweep(EIGHT_RANK_CASES, 8, tiny_path)


@pytest.fixture(scope="module")
def references(tiny_path):
    cache = {}

    def get(name, cases):
        if name not in cache:
            variant, kwargs, _ = cases[name]
            cache[name] = reference(tiny_path(variant), kwargs)
        return cache[name]

    return get


def _check(results, name, layout, ref):
    got = torch.from_numpy(results[(name, layout)])
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert err < REL_TOL, f"{name} {layout}: relative error {err:.2e}"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name,layout", [(n, str(l)) for n, (_, _, ls) in CASES.items() for l in ls])
def test_layout_matches_diffusers(four_rank_results, references, name, layout):
    results, _ = four_rank_results
    _check(results, name, layout, references(name, CASES))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name,layout", [(n, str(l)) for n, (_, _, ls) in EIGHT_RANK_CASES.items() for l in ls])
def test_eight_rank_layout_matches_diffusers(eight_rank_results, references, name, layout):
    results, _ = eight_rank_results
    _check(results, name, layout, references(name, EIGHT_RANK_CASES))


@pytest.fixture(scope="module")
def memory_results(tiny_path):
    paths = {variant: tiny_path(variant) for variant, _, _ in MEMORY_CASES.values()}
    merged = {}
    for part in run_world(4, run_memory_cases, MEMORY_CASES, paths):
        merged.update(part)
    return merged


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name,layout,memory,optimize",
                         [(n, str(l), m, o) for n, (_, _, plans) in MEMORY_CASES.items() for l, m, o in plans])
def test_memory_plan_matches_diffusers(memory_results, references, name, layout, memory, optimize):
    """FSDP-sharded weights (low, over 2 and 4 ranks, with cfg2/ulysses/ring, fused QKV and compiled blocks) return
    diffusers' latents; FSDP never holds more than the running and the prefetched block."""
    latents, most_gathered, shards, offloaded = memory_results[(name, layout, memory, optimize)]
    ref = references(name, MEMORY_CASES)
    got = torch.from_numpy(latents)
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert err < REL_TOL, f"{name} {layout} {memory} {optimize}: relative error {err:.2e}"
    assert memory == "low" and not offloaded
    assert shards == Layout.parse(layout.replace(" ", "")).world_size
    assert 1 <= most_gathered <= 2, f"{most_gathered} blocks were gathered at once"


def test_single_process_matches_diffusers(tiny_path, references):
    from comfyui_xdit_cogvideo import CogVideoEngine
    from parallel_cases import request_for

    for name in ("2b", "1.5-i2v"):
        variant, kwargs, _ = CASES[name]
        latents = CogVideoEngine(str(tiny_path(variant)), dtype="fp32").generate(request_for(kwargs))
        assert torch.equal(latents, references(name, CASES)), name
