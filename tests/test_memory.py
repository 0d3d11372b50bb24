"""Memory plans: the planner's choices for given device memory, the size estimates, and each plan's output.

The FSDP-sharded and group-offloaded layouts' equality with diffusers lives with the other layouts in
test_parallel_equality.py (MEMORY_CASES).
"""

from __future__ import annotations

import pytest
import torch

from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest, Layout
from comfyui_xdit_cogvideo.layout import choose_layout
from comfyui_xdit_cogvideo.memory import (GiB, PUBLISHED, T5_XXL, JobShape, MemoryPlan, MemoryPlanError, ModelSizes,
                                          check_mode, plan_job, plan_memory)
from comfyui_xdit_cogvideo.variants import ModelInfo

CARD = GiB  # cards as nvidia-smi reports them (a "24 GB" RTX 4090: 24,564 MiB)
CONTEXT = GiB // 2  # what the CUDA context and driver take before PyTorch allocates

INFOS = {
    "2b": ModelInfo("2b", 30, 64, 30, 16, 16, 2, None, 60, 90, 49, False, False, False),
    "5b": ModelInfo("5b", 48, 64, 42, 16, 16, 2, None, 60, 90, 49, False, True, False),
    "1.5-5b": ModelInfo("1.5-5b", 48, 64, 42, 16, 16, 2, 2, 300, 300, 81, False, True, False),
}
JOBS = {"2b": JobShape(49, 480, 720), "5b": JobShape(49, 480, 720), "1.5-5b": JobShape(81, 768, 1360)}


def _plan(variant, gpus, card_gb, mode="auto"):
    info = INFOS[variant]
    layout = choose_layout(len(card_gb) if isinstance(card_gb, list) else gpus, heads=info.heads, use_cfg=True)
    budgets = [g * CARD - CONTEXT for g in card_gb] if isinstance(card_gb, list) else [card_gb * CARD - CONTEXT] * gpus
    return plan_memory(mode, ModelSizes.published(variant), info, JOBS[variant], layout, budgets)


# The README's "what fits where" table, row by row: (model, GPUs, card GiB) -> plan, T5 placement, shard count.
DOCUMENTED = [
    ("2b", 1, 12, "low", "cpu", 1), ("5b", 1, 12, "offload", "swap", 1),
    ("2b", 1, 16, "low", "swap", 1), ("5b", 1, 16, "offload", "swap", 1), ("1.5-5b", 1, 16, "offload", "swap", 1),
    ("2b", 1, 24, "fast", "gpu", 1), ("5b", 1, 24, "low", "swap", 1), ("1.5-5b", 1, 24, "offload", "swap", 1),
    ("2b", 1, 48, "fast", "gpu", 1), ("5b", 1, 48, "fast", "gpu", 1), ("1.5-5b", 1, 48, "fast", "gpu", 1),
    ("2b", 2, 16, "low", "swap", 2), ("5b", 2, 16, "low", "cpu", 2), ("1.5-5b", 2, 16, "low", "cpu", 2),
    ("2b", 2, 24, "fast", "gpu", 1), ("5b", 2, 24, "low", "swap", 2), ("1.5-5b", 2, 24, "low", "swap", 2),
    ("2b", 4, 16, "low", "swap", 4), ("5b", 4, 16, "low", "swap", 4), ("1.5-5b", 4, 16, "low", "swap", 4),
    ("2b", 4, 32, "fast", "gpu", 1), ("5b", 4, 32, "fast", "gpu", 1), ("1.5-5b", 4, 32, "fast", "gpu", 1),
]


@pytest.mark.parametrize("variant,gpus,card,name,text,shard", DOCUMENTED)
def test_auto_picks_the_documented_plan(variant, gpus, card, name, text, shard):
    plan = _plan(variant, gpus, card)
    assert (plan.name, plan.text, plan.shard) == (name, text, shard), plan.describe()
    assert plan.requested == "auto" and len(plan.peaks) == gpus
    assert max(plan.peaks) <= card * CARD - CONTEXT  # the plan's own estimate fits the card


def test_issue_targets_are_met_by_the_estimates():
    """Issue 16's targets per rank: 5b <= 22 GiB and 1.5-5b <= 22 GiB on 2 x 24 GB, 5b <= 15 GiB on 4 x 16 GB,
    2b <= 11 GiB on one 12 GB card."""
    assert max(_plan("5b", 2, 24).peaks) <= 22 * GiB
    assert max(_plan("1.5-5b", 2, 24).peaks) <= 22 * GiB
    assert max(_plan("5b", 4, 16).peaks) <= 15 * GiB
    assert max(_plan("2b", 1, 12).peaks) <= 11 * GiB


def test_the_tightest_device_decides():
    assert _plan("5b", 4, [80, 80, 80, 80]).name == "fast"
    plan = _plan("5b", 4, [80, 80, 80, 16])
    assert plan.name == "low" and plan.shard == 4


def test_cpu_ranks_have_no_limit():
    info = INFOS["5b"]
    plan = plan_memory("auto", ModelSizes.published("5b"), info, JOBS["5b"], Layout(2), [None, None])
    assert plan.name == "fast" and plan.budgets == (None, None)


def test_a_job_that_fits_no_plan_is_refused_with_needed_and_free_per_device():
    with pytest.raises(MemoryPlanError) as error:
        _plan("1.5-5b", 1, 12)
    text = str(error.value)
    assert "fits no memory plan" in text and "81x768x1360" in text
    assert "rank 0: needs" in text and "has 11.5 GiB" in text  # a 12 GiB card less its CUDA context
    for name in ("fast", "low", "offload"):
        assert f"{name}: rank 0" in text
    with pytest.raises(MemoryPlanError, match=r"rank 1: needs .* has 3\.5 GiB"):
        _plan("5b", 2, [80, 4])


def test_explicit_plans():
    assert _plan("2b", 2, 80, "low").shard == 2  # asked for: taken even when fast would fit
    forced = _plan("5b", 1, 12, "fast")  # does not fit, but the user asked: no refusal, a note
    assert forced.name == "fast" and forced.notes and "exceeds" in forced.notes[0]
    with pytest.raises(MemoryPlanError, match="'offload' runs on one GPU"):
        _plan("5b", 2, 24, "offload")
    with pytest.raises(MemoryPlanError, match=r"unknown memory plan 'big'; choose one of auto, fast, low, offload"):
        check_mode("big")
    assert check_mode(" LOW ") == "low"


def test_sharding_divides_the_resident_weights():
    info, sizes, job = INFOS["5b"], ModelSizes.published("5b"), JOBS["5b"]
    from comfyui_xdit_cogvideo.memory import rank_peaks

    fast = rank_peaks(MemoryPlan("fast", 1, "cpu", (240, 360)), sizes, info, job, Layout(2, 2))
    low = rank_peaks(MemoryPlan("low", 4, "cpu", (240, 360)), sizes, info, job, Layout(2, 2))
    saved = (sizes.transformer - sizes.transformer / 4 - 2 * sizes.block - sizes.outside_blocks) * 2
    assert fast[1] - low[1] == pytest.approx(saved, rel=1e-6)


def test_plan_wire_round_trip_and_description():
    plan = _plan("5b", 4, 16)
    again = MemoryPlan.from_wire(plan.wire())
    assert again == plan
    text = plan.describe()
    assert text.startswith("low (auto)") and "sharded over 4 ranks" in text and "GiB/rank" in text
    assert MemoryPlan.from_wire(None) is None


def test_published_sizes_match_diffusers_modules():
    """The predictions use published sizes: they must still be diffusers' and transformers' module sizes."""
    from accelerate import init_empty_weights
    from diffusers import CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    with init_empty_weights():
        model = CogVideoXTransformer3DModel(num_attention_heads=48, num_layers=42,
                                            use_rotary_positional_embeddings=True)
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu"))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED["5b"]["transformer"]
    assert sum(p.numel() for p in model.transformer_blocks[0].parameters()) == PUBLISHED["5b"]["block"]
    assert sum(p.numel() for p in t5.parameters()) == T5_XXL


def test_sizes_from_checkpoint_headers_match_the_loaded_modules(tiny_path):
    from comfyui_xdit_cogvideo.loading import ModelSource, read_model_info

    source = ModelSource(str(tiny_path("2b")))
    sizes = ModelSizes.of_source(source.resolve(), read_model_info(source))
    engine = CogVideoEngine(str(tiny_path("2b")), dtype="fp32")
    t = engine.transformer
    assert sizes.transformer == sum(p.numel() for p in t.parameters()) + sum(b.numel() for b in t.buffers())
    assert sizes.block == sum(p.numel() for p in t.transformer_blocks[0].parameters())
    assert sizes.layers == len(t.transformer_blocks)
    assert sizes.vae == sum(p.numel() for p in engine.vae.parameters())
    assert sizes.text_encoder == sum(p.numel() for p in engine._text_encoder()[1].parameters())
    assert sizes.vae_width == engine.vae.config.block_out_channels[0]


def test_plan_job_reads_heartbeat_figures(tiny_path):
    from comfyui_xdit_cogvideo.pool import ModelSpec
    from comfyui_xdit_cogvideo.loading import read_model_info

    spec = ModelSpec(str(tiny_path("2b")), "fp32", memory="auto")
    info = read_model_info(spec.source)
    request = GenerationRequest(prompt="a cat", frames=9, height=32, width=48).resolved(info)
    assert plan_job(spec, info, request, Layout(2), [{"rss": 1}, {"rss": 1}]).name == "fast"  # CPU ranks
    roomy = [{"free": 3 * GiB, "reserved": 0, "total": 4 * GiB}] * 2
    assert plan_job(spec, info, request, Layout(2), roomy).budgets == (3 * GiB, 3 * GiB)
    # free plus what this process holds (a resident model it would replace) is the budget
    held = [{"free": GiB // 2, "reserved": 2 * GiB, "total": 4 * GiB}] * 2
    assert plan_job(spec, info, request, Layout(2), held).budgets == (GiB // 2 + 2 * GiB,) * 2
    tight = [{"free": GiB, "reserved": 0, "total": 4 * GiB}, {"free": 3 * GiB, "reserved": 0, "total": 4 * GiB}]
    with pytest.raises(MemoryPlanError, match=r"rank 0: needs .* has 1\.0 GiB"):
        plan_job(spec, info, request, Layout(2), tight)  # the 1 GiB margin alone leaves too little


def test_low_and_offload_on_one_rank_equal_fast_and_t5_rests_off_the_device(tiny_path):
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    request = GenerationRequest(prompt="a cat playing piano", frames=9, height=32, width=48, steps=2, seed=3)
    fast = CogVideoEngine(str(tiny_path("2b")), dtype="fp32")
    expected = fast.generate(request)
    positive, negative = fast.encode_prompt("a cat playing piano")
    for memory, text in (("low", "swap"), ("offload", "cpu")):
        engine = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", memory=memory)
        assert engine.memory.text == text
        assert torch.equal(engine.generate(request), expected), memory
        assert _is_group_offload_enabled(engine.transformer) == (memory == "offload")
        got = engine.encode_prompt("a cat playing piano")
        assert torch.equal(got[0], positive) and torch.equal(got[1], negative)
        assert next(engine._text[1].parameters()).device.type == "cpu"
    engine.set_memory_plan(MemoryPlan("offload", 1, "swap"))
    with pytest.raises(RuntimeError, match="built for memory plan 'offload', not 'low'"):
        engine.set_memory_plan(MemoryPlan("low", 1, "swap"))


def test_decode_tiles_fit_the_budget_and_equal_diffusers_tiled_decode(tiny_path):
    from comfyui_xdit_cogvideo.memory import decode_activations
    from comfyui_xdit_cogvideo.vae_parallel import fit_tiling, tiled_decode

    engine = CogVideoEngine(str(tiny_path("2b")), dtype="fp32")
    vae = engine.vae
    weights = sum(p.numel() for p in vae.parameters()) * 4
    z = torch.randn(1, 4, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    assert fit_tiling(vae, (8, 12), None) is None  # unknown budget (CPU): as before
    assert fit_tiling(vae, (8, 12), weights + 10 ** 9) is None  # the whole frame fits: plain decode
    sizes = ModelSizes(0, 0, 0, vae=0, vae_width=vae.config.block_out_channels[0])
    budget = weights + decode_activations(16 * 24, sizes, 4)
    tiling = fit_tiling(vae, (8, 12), budget)
    assert tiling is not None and tiling.sample_height * tiling.sample_width <= 16 * 24
    ours = tiled_decode(vae, z, tiling)
    tiling.apply(vae)
    try:
        expected = vae.decode(z).sample  # diffusers' own tiled decode with the same tiles
    finally:
        vae.use_tiling = False
    assert torch.equal(ours, expected)


@pytest.mark.timeout(300)
def test_cli_memory_flag_shards_over_the_pool_and_reports_the_plan(tiny_path, tmp_path, capsys):
    from safetensors.torch import load_file

    from comfyui_xdit_cogvideo import cli

    latents_file, video = tmp_path / "cat.safetensors", tmp_path / "cat.mp4"
    code = cli.main(["generate", "--model", "tiny", "--prompt", "a cat", "--steps", "2", "--seed", "5",
                     "--device", "cpu", "--world-size", "2", "--memory", "low", "--latents-out", str(latents_file),
                     "--output", str(video)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert '"memory": "low, transformer sharded over 2 ranks (FSDP2), T5 moved to the device only to encode' \
        in captured.out
    request = GenerationRequest(prompt="a cat", steps=2, seed=5)
    expected = CogVideoEngine(str(tiny_path("2b")), dtype="fp32").generate(request)
    got = load_file(str(latents_file))["latents"]
    assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    assert cli.main(["generate", "--model", "tiny", "--prompt", "a cat", "--memory", "huge",
                     "--latents-out", str(latents_file)]) == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_the_pool_refuses_a_job_that_fits_no_plan_before_it_runs(tiny_path, monkeypatch):
    """With (faked) GPU memory figures in the ranks' heartbeats, an unfitting job never reaches the workers."""
    from comfyui_xdit_cogvideo.pool import ModelSpec, WorkerPool

    pool = WorkerPool("cpu:1")
    try:
        pool.start()
        real = pool.status

        def status():
            out = real()
            for rank in out["ranks"]:
                rank["memory"] = {"free": GiB // 4, "reserved": 0, "total": 12 * GiB}
            return out

        monkeypatch.setattr(pool, "status", status)
        request = GenerationRequest(prompt="a cat", frames=9, height=32, width=48, steps=2)
        with pytest.raises(MemoryPlanError, match=r"rank 0: needs .* has 0\.2 GiB"):
            pool.generate(ModelSpec(str(tiny_path("2b")), "fp32"), request)
        assert real()["jobs_done"] == 0 and real()["ranks"][0]["loads"] == 0
    finally:
        pool.shutdown()


def test_unreadable_weights_leave_the_failure_to_the_loader(tiny_path, tmp_path):
    """A truncated checkpoint: no estimate (the workers report the load error, as before), the mode's plan."""
    import shutil

    from comfyui_xdit_cogvideo.loading import read_model_info
    from comfyui_xdit_cogvideo.pool import ModelSpec

    broken = tmp_path / "broken"
    shutil.copytree(tiny_path("2b"), broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    spec = ModelSpec(str(broken), "fp32", memory="low")
    info = read_model_info(spec.source)
    request = GenerationRequest(prompt="a cat", frames=9, height=32, width=48).resolved(info)
    plan = plan_job(spec, info, request, Layout(2), [{"free": GiB, "reserved": 0}] * 2)
    assert (plan.name, plan.shard, plan.requested) == ("low", 2, "low") and "no size estimate" in plan.notes[0]


def test_one_header_reader_for_every_estimate(tiny_path, tmp_path):
    """limits and the plans count through memory.header_counts: a ComfyUI-native single file gives the folder's
    sizes (its blocks are 'blocks.N', not 'transformer_blocks.N'); a truncated file is an error for the plans and
    counts nothing in the coarse check."""
    from safetensors.torch import load_file, save_file

    from comfyui_xdit_cogvideo import limits
    from comfyui_xdit_cogvideo.formats import diffusers_to_native
    from comfyui_xdit_cogvideo.loading import ModelSource, read_model_info
    from comfyui_xdit_cogvideo.memory import header_counts

    folder = tiny_path("5b")
    state = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    native = tmp_path / "cogvideox_native.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in diffusers_to_native(state).items()}, str(native))
    native.with_suffix(".json").write_text((folder / "transformer" / "config.json").read_text())
    parts = dict(vae=str(folder / "vae"), text_encoder=str(folder / "text_encoder"))
    sizes = {}
    for name, source in (("folder", ModelSource(str(folder))), ("native", ModelSource(str(native), **parts))):
        sizes[name] = ModelSizes.of_source(source.resolve(), read_model_info(source))
    assert sizes["native"] == sizes["folder"] and sizes["folder"].block > 0
    assert limits.safetensors_elements(native) == sum(header_counts(native).values()) == sum(
        v.numel() for v in state.values())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(native.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"truncated\.safetensors: the header describes \d+ bytes but the file has"):
        header_counts(truncated)
    assert header_counts(truncated, strict=False) == {} and limits.safetensors_elements(truncated) == 0
