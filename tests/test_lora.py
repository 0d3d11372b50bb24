"""LoRAs: every format equals diffusers' load_lora_weights + fuse_lora (or an explicit W + s * B @ A where
diffusers cannot read the format), on one process and on a 4-rank layout; switching is exact and never reloads
the base; fused QKV, compiled blocks and fp8 weights; clear errors for LoRAs that do not fit."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest, Layout
from comfyui_xdit_cogvideo.lora import LoraError, LoraSpec, random_factors, read_lora, write_random_lora
from comfyui_xdit_cogvideo.parallel import ParallelGroups
from distributed import run_world

REQUEST = dict(prompt="a cat playing piano", frames=9, height=32, width=48, steps=2, seed=7)
SIZES = {"2b": dict(frames=9, height=32, width=48), "5b": dict(frames=9, height=32, width=48),
         "1.5": dict(frames=17, height=32, width=48)}


def _request(variant: str) -> GenerationRequest:
    return GenerationRequest(**dict(REQUEST, **SIZES[variant]))


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _config(path) -> dict:
    return json.loads((path / "transformer" / "config.json").read_text())


def _lora(tmp_path, tiny_path, variant, fmt, alpha=None, seed=1, dora=False, rank=4, **kw):
    factors = random_factors(_config(tiny_path(variant)), rank=rank, seed=seed, std=0.5, **kw)
    magnitudes = None
    if dora:
        g = torch.Generator().manual_seed(seed + 100)
        magnitudes = {k: torch.rand(up.shape[0], generator=g) + 0.5 for k, (_, up) in factors.items()}
    path = write_random_lora(tmp_path / f"{variant}-{fmt}-{seed}.safetensors", factors, fmt, alpha=alpha,
                             dora=magnitudes)
    return path, factors, magnitudes


def _pipeline(path):
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, variant) -> torch.Tensor:
    size = SIZES[variant]
    return pipe(prompt=REQUEST["prompt"], num_frames=size["frames"], height=size["height"], width=size["width"],
                num_inference_steps=REQUEST["steps"], generator=torch.Generator().manual_seed(REQUEST["seed"]),
                output_type="latent").frames


def explicit_reference(path, variant, loras) -> torch.Tensor:
    """Stock diffusers with W += strength * (alpha / rank) * up @ down written by hand (DoRA: the PEFT formula
    interpolated by strength), for every LoRA in ``loras`` = [(factors, scale, strength, magnitudes or None)]."""
    pipe = _pipeline(path)
    with torch.no_grad():
        originals = {n: m.weight.detach().clone() for n, m in pipe.transformer.named_modules()
                     if isinstance(m, torch.nn.Linear)}
        for factors, scale, strength, magnitudes in loras:
            for name, (down, up) in factors.items():
                w = originals[name]
                if magnitudes is None:
                    change = strength * scale * (up @ down)
                else:
                    v = w + scale * (up @ down)
                    change = strength * (magnitudes[name].reshape(-1, 1) * v / v.norm(dim=1, keepdim=True) - w)
                pipe.transformer.get_submodule(name).weight += change
    return _run(pipe, variant)


@pytest.fixture(scope="module")
def base_latents(tiny_path):
    return {v: CogVideoEngine(str(tiny_path(v)), dtype="fp32").generate(_request(v)) for v in ("2b", "5b", "1.5")}


DIFFUSERS_CASES = [  # (variant, format, alpha, strength, dora): formats diffusers' CogVideoX loader reads
    ("2b", "peft", None, 1.0, False), ("5b", "peft", 8.0, 0.7, False), ("1.5", "peft", None, 1.3, False),
    ("5b", "peft", None, 1.0, True),
]


@pytest.mark.parametrize("variant,fmt,alpha,strength,dora", DIFFUSERS_CASES)
def test_equals_diffusers_fuse_lora(tmp_path, tiny_path, base_latents, variant, fmt, alpha, strength, dora):
    lora, _, _ = _lora(tmp_path, tiny_path, variant, fmt, alpha, dora=dora)
    engine = CogVideoEngine(str(tiny_path(variant)), dtype="fp32", loras=[LoraSpec(str(lora), strength)])
    ours = engine.generate(_request(variant))
    pipe = _pipeline(tiny_path(variant))
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(components=["transformer"], lora_scale=strength)
    reference = _run(pipe, variant)
    assert _rel(ours, reference) < 1e-5
    assert _rel(base_latents[variant], reference) > 5e-4  # the LoRA really changes the result (50x the tolerance)
    assert engine.loras[0]["layers"] == 6 * 2 and engine.loras[0]["strength"] == strength


EXPLICIT_CASES = [  # formats diffusers drops or cannot read: W + s * B @ A by hand
    ("5b", "kohya", 8.0, 1.0, False), ("2b", "down_up", None, 0.5, False), ("1.5", "comfyui", None, 1.0, False),
    ("5b", "comfyui_kohya", 2.0, 1.0, False), ("2b", "peft_alpha_keys", 16.0, 1.0, False),
    ("5b", "kohya", 4.0, 0.6, True),
]


@pytest.mark.parametrize("variant,fmt,alpha,strength,dora", EXPLICIT_CASES)
def test_equals_explicit_merge(tmp_path, tiny_path, base_latents, variant, fmt, alpha, strength, dora):
    lora, factors, magnitudes = _lora(tmp_path, tiny_path, variant, fmt, alpha, dora=dora)
    engine = CogVideoEngine(str(tiny_path(variant)), dtype="fp32", loras=[(str(lora), strength)])
    scale = 1.0 if alpha is None else alpha / 4
    reference = explicit_reference(tiny_path(variant), variant, [(factors, scale, strength, magnitudes)])
    ours = engine.generate(_request(variant))
    assert _rel(ours, reference) < 1e-5
    assert _rel(base_latents[variant], reference) > 5e-4
    assert read_lora(str(lora)).format.split("+")[0] == {"peft_alpha_keys": "peft", "down_up": "lora_down/up",
                                                          "comfyui_kohya": "kohya"}.get(fmt, fmt)


def test_switching_equals_a_fresh_load_and_never_reloads(tmp_path, tiny_path, base_latents, monkeypatch):
    import comfyui_xdit_cogvideo.engine as engine_module

    a, _, _ = _lora(tmp_path, tiny_path, "5b", "kohya", 8.0, seed=1)
    b, _, _ = _lora(tmp_path, tiny_path, "5b", "peft", None, seed=2)
    loads = []
    real = engine_module.load_transformer
    monkeypatch.setattr(engine_module, "load_transformer", lambda *a_, **k: loads.append(1) or real(*a_, **k))
    engine = CogVideoEngine(str(tiny_path("5b")), dtype="fp32", loras=[(str(a), 1.0)])
    with_a = engine.generate(_request("5b"))
    engine.set_loras([(str(b), 0.5), (str(a), 0.3)])
    switched = engine.generate(_request("5b"))
    engine.set_loras([])
    cleared = engine.generate(_request("5b"))
    engine.set_loras([(str(a), 1.0)])
    again = engine.generate(_request("5b"))
    assert len(loads) == 1
    fresh = CogVideoEngine(str(tiny_path("5b")), dtype="fp32", loras=[(str(b), 0.5), (str(a), 0.3)])
    assert torch.equal(switched, fresh.generate(_request("5b")))
    assert torch.equal(cleared, base_latents["5b"]) and torch.equal(again, with_a)
    assert engine.lora.saved_bytes > 0
    engine.set_loras([])
    assert engine.lora.saved_bytes == 0 and engine.loras == []


def _four_ranks(rank, path, a, b):
    groups = ParallelGroups.create(Layout(2, 1, 2))
    engine = CogVideoEngine(str(path), dtype="fp32", groups=groups, loras=[(str(a), 0.8), (str(b), 1.0)])
    both = engine.generate(_request("5b")).numpy()
    engine.set_loras([(str(b), 1.0)])
    return both, engine.generate(_request("5b")).numpy(), engine.loras


@pytest.mark.timeout(300)
def test_four_rank_layout_applies_the_loras_on_every_rank(tmp_path, tiny_path):
    a, fa, _ = _lora(tmp_path, tiny_path, "5b", "kohya", 8.0, seed=3)
    b, fb, _ = _lora(tmp_path, tiny_path, "5b", "comfyui", None, seed=4)
    results = run_world(4, _four_ranks, tiny_path("5b"), a, b)
    both_ref = explicit_reference(tiny_path("5b"), "5b", [(fa, 2.0, 0.8, None), (fb, 1.0, 1.0, None)])
    b_ref = explicit_reference(tiny_path("5b"), "5b", [(fb, 1.0, 1.0, None)])
    for both, only_b, active in results:
        assert _rel(torch.from_numpy(both), both_ref) < 1e-4
        assert _rel(torch.from_numpy(only_b), b_ref) < 1e-4
        assert [x["name"] for x in active] == [b.name]


@pytest.mark.timeout(600)
def test_fused_qkv_and_compiled_blocks_switch_without_recompiling(tmp_path, tiny_path, base_latents):
    from torch._dynamo.utils import counters

    a, _, _ = _lora(tmp_path, tiny_path, "5b", "peft", None, seed=5)
    b, _, _ = _lora(tmp_path, tiny_path, "5b", "kohya", 4.0, seed=6)
    engine = CogVideoEngine(str(tiny_path("5b")), dtype="fp32", optimize="fuse,compile")
    attn = engine.transformer.transformer_blocks[0].attn1
    assert attn.fused_projections and attn.to_q.weight.data_ptr() == attn.to_qkv.weight.data_ptr()
    assert _rel(engine.generate(_request("5b")), base_latents["5b"]) < 1e-5
    graphs = counters["stats"]["unique_graphs"]
    for loras in ([(str(a), 1.0)], [(str(b), 0.5)], [(str(a), 0.7), (str(b), 1.0)]):
        engine.set_loras(loras)
        latents = engine.generate(_request("5b"))
        plain = CogVideoEngine(str(tiny_path("5b")), dtype="fp32", optimize="none", loras=loras)
        assert _rel(latents, plain.generate(_request("5b"))) < 1e-5
    assert counters["stats"]["unique_graphs"] == graphs, "changing LoRAs recompiled the blocks"
    engine.set_loras([])
    assert _rel(engine.generate(_request("5b")), base_latents["5b"]) < 1e-5


@pytest.mark.parametrize("options", ["fp8", "fuse,fp8"])
def test_fp8_weights_requantize_on_merge_and_restore_bitwise(tmp_path, tiny_path, options):
    from comfyui_xdit_cogvideo.optimize import Fp8Linear

    lora, factors, _ = _lora(tmp_path, tiny_path, "5b", "peft", None, seed=8)
    engine = CogVideoEngine(str(tiny_path("5b")), dtype="fp32", optimize=options)
    attn = engine.transformer.transformer_blocks[1].attn1
    layer = attn.to_qkv if "fuse" in options else attn.to_k
    assert isinstance(layer, Fp8Linear)
    rows = slice(96, 192) if "fuse" in options else slice(0, 96)
    before = layer.weight_fp8.clone(), layer.weight_scale.clone()
    dequant = lambda: layer.weight_fp8[rows].float() * layer.weight_scale[0, rows].reshape(-1, 1)  # noqa: E731
    expected = dequant() + factors["transformer_blocks.1.attn1.to_k"][1] @ factors["transformer_blocks.1.attn1.to_k"][0]
    engine.set_loras([(str(lora), 1.0)])
    assert (dequant() - expected).abs().max() <= expected.abs().amax(dim=1).max() / 16  # e4m3: 3 mantissa bits
    assert not torch.equal(layer.weight_fp8, before[0])
    engine.generate(_request("5b"))
    engine.set_loras([])
    assert torch.equal(layer.weight_fp8.view(torch.uint8), before[0].view(torch.uint8))
    assert torch.equal(layer.weight_scale, before[1])


def test_parse_lora_argument():
    assert LoraSpec.parse("a/b.safetensors") == LoraSpec("a/b.safetensors", 1.0)
    assert LoraSpec.parse("a/b.safetensors:0.5") == LoraSpec("a/b.safetensors", 0.5)
    assert LoraSpec.parse("C:/x/b.safetensors:-1") == LoraSpec("C:/x/b.safetensors", -1.0)
    assert LoraSpec.parse("C:/x/b.safetensors") == LoraSpec("C:/x/b.safetensors", 1.0)


def _flux_like(path):
    from safetensors.torch import save_file

    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)}, str(path))
    return path


def test_wrong_loras_fail_clearly_and_leave_the_active_set(tmp_path, tiny_path):
    from safetensors.torch import save_file

    good, _, _ = _lora(tmp_path, tiny_path, "2b", "peft", None, seed=9)
    engine = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", loras=[(str(good), 1.0)])
    weight = engine.transformer.transformer_blocks[0].attn1.to_q.weight.clone()

    def fails(path, *fragments):
        with pytest.raises(LoraError) as info:
            engine.set_loras([(str(path), 1.0)])
        for fragment in fragments:
            assert fragment in str(info.value), str(info.value)
        assert [x["path"] for x in engine.loras] == [str(good)]
        assert torch.equal(engine.transformer.transformer_blocks[0].attn1.to_q.weight, weight)

    fails(_flux_like(tmp_path / "flux.safetensors"), "matches no layer", "0 of 1 layers", "Flux")
    wan = tmp_path / "wan.safetensors"
    save_file({"diffusion_model.blocks.0.cross_attn.q.lora_A.weight": torch.zeros(4, 96),
               "diffusion_model.blocks.0.cross_attn.q.lora_B.weight": torch.zeros(96, 4)}, str(wan))
    fails(wan, "matches no layer", "Wan")
    other_size, _, _ = _lora(tmp_path, tiny_path, "2b", "peft", None, seed=10)
    factors = random_factors(dict(_config(tiny_path("2b")), num_attention_heads=8), rank=4, blocks=1)
    other_size = write_random_lora(tmp_path / "bigger.safetensors", factors, "kohya", alpha=4.0)
    fails(other_size, "128 x 128 in the LoRA but 96 x 96 in this model", "another CogVideoX size")
    partial = write_random_lora(tmp_path / "partial.safetensors",
                                random_factors(_config(tiny_path("2b")), rank=4, blocks=3), "peft")
    fails(partial, "only 12 of 18 layers match", "transformer_blocks.2.")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:200])
    fails(corrupt, "cannot read LoRA", "corrupt")
    pickle = tmp_path / "lora.pt"
    pickle.write_bytes(b"\x80\x04")
    fails(pickle, "not a .safetensors file")
    fails(tmp_path / "missing.safetensors", "does not exist")
    diff = tmp_path / "diff.safetensors"
    save_file({"diffusion_model.blocks.0.norm_q.diff": torch.zeros(16)}, str(diff))
    fails(diff, "1 key(s) of a kind this loader does not apply", "norm_q.diff")
    half = tmp_path / "half.safetensors"
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 96)}, str(half))
    fails(half, "has no up/lora_B matrix")
    with pytest.raises(LoraError, match="finite"):
        engine.set_loras([(str(good), float("nan"))])


@pytest.mark.timeout(300)
def test_pool_carries_loras_to_every_rank_without_reloading(tmp_path, tiny_path, tiny_cache):
    from comfyui_xdit_cogvideo.pool import ModelSpec, WorkerError, WorkerPool

    a, _, _ = _lora(tmp_path, tiny_path, "5b", "kohya", 8.0, seed=11)
    b, _, _ = _lora(tmp_path, tiny_path, "5b", "peft", None, seed=12)
    model = str(tiny_path("5b"))
    request = _request("5b")
    pool = WorkerPool("cpu:2", echo_output=False, heartbeat_timeout=20)
    try:
        with_a = pool.generate(ModelSpec(model, "fp32", loras=[LoraSpec(str(a), 0.9)]), request, layout=Layout(2))
        status = pool.status()
        assert status["model"]["loras"][0]["name"] == a.name and status["model"]["loras"][0]["strength"] == 0.9
        both = pool.generate(ModelSpec(model, "fp32", loras=[(str(a), 0.9), (str(b), 0.4)]), request,
                             layout=Layout(1, 1, 2))
        with pytest.raises(WorkerError, match="matches no layer"):
            pool.generate(ModelSpec(model, "fp32", loras=[(str(_flux_like(tmp_path / "f.safetensors")), 1.0)]),
                          request, layout=Layout(2))
        plain = pool.generate(ModelSpec(model, "fp32"), request, layout=Layout(2))
        status = pool.status()
        assert [r["loads"] for r in status["ranks"]] == [1, 1], "a LoRA change reloaded the base model"
        assert status["model"]["loras"] == []
    finally:
        pool.shutdown()
    engine = CogVideoEngine(model, dtype="fp32", loras=[(str(a), 0.9)])
    assert _rel(with_a, engine.generate(request)) < 1e-4
    engine.set_loras([(str(a), 0.9), (str(b), 0.4)])
    assert _rel(both, engine.generate(request)) < 1e-4
    engine.set_loras([])
    assert _rel(plain, engine.generate(request)) < 1e-4


@pytest.mark.timeout(300)
def test_cli_lora_flag(tmp_path, tiny_path, capsys):
    from safetensors.torch import load_file

    from comfyui_xdit_cogvideo import cli

    a, _, _ = _lora(tmp_path, tiny_path, "2b", "comfyui_kohya", 4.0, seed=13)
    b, _, _ = _lora(tmp_path, tiny_path, "2b", "down_up", None, seed=14)
    out = tmp_path / "latents.safetensors"
    code = cli.main(["generate", "--model", str(tiny_path("2b")), "--prompt", REQUEST["prompt"], "--frames", "9",
                     "--height", "32", "--width", "48", "--steps", "2", "--seed", "7", "--device", "cpu",
                     "--lora", f"{a}:0.5", "--lora", str(b), "--latents-out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f'"loras": [["{a.name}", 0.5], ["{b.name}", 1.0]]' in captured.out
    engine = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", loras=[(str(a), 0.5), (str(b), 1.0)])
    assert _rel(load_file(str(out))["latents"], engine.generate(_request("2b"))) < 1e-5
    code = cli.main(["generate", "--model", "tiny", "--prompt", "x", "--device", "cpu", "--lora", "nope.safetensors",
                     "--latents-out", str(out)])
    assert code == 1 and "LoRA file 'nope.safetensors' does not exist" in capsys.readouterr().err


def test_node_chains_like_lora_loader_model_only(tmp_path, tiny_path):
    import sys

    from comfy_stub import comfy_stubs, run_node

    loras = tmp_path / "models" / "loras" / "cog"
    loras.mkdir(parents=True)
    (tmp_path / "models" / "CogVideo").mkdir(parents=True)
    (tmp_path / "models" / "CogVideo" / "tiny-2b").symlink_to(tiny_path("2b"), target_is_directory=True)
    a, _, _ = _lora(loras, tiny_path, "2b", "kohya", 4.0, seed=15)
    b, _, _ = _lora(loras, tiny_path, "2b", "peft", None, seed=16)
    (loras / "corrupt.safetensors").write_bytes(b"not a safetensors file at all")
    with comfy_stubs(tmp_path) as c:
        nodes = sys.modules[c.load_package("xdit_cogvideo_lora_check").__name__ + ".nodes"]
        by_id = {n.GET_SCHEMA().node_id: n for n in nodes.NODES}
        node = by_id["XDiTCogVideoLoraLoader"]
        schema = node.GET_SCHEMA()
        assert [i.id for i in schema.inputs] == ["model", "lora_name", "strength_model"]
        assert schema.inputs[1].options == sorted(["cog/corrupt.safetensors", f"cog/{a.name}", f"cog/{b.name}"])
        (spec,) = run_node(by_id["XDiTCogVideoModelLoader"], model="tiny-2b", vae="(from model folder)",
                           text_encoder="(from model folder)", precision="fp32", attention="auto").args
        (one,) = run_node(node, model=spec, lora_name=f"cog/{a.name}", strength_model=0.8).args
        (two,) = run_node(node, model=one, lora_name=f"cog/{b.name}", strength_model=1.0).args
        (same,) = run_node(node, model=two, lora_name=f"cog/{b.name}", strength_model=0.0).args
        assert spec.loras == () and same is two and two.source == spec.source
        assert two.loras == (LoraSpec(str(a), 0.8), LoraSpec(str(b), 1.0))
        assert two.wire()["loras"] == [[str(a), 0.8], [str(b), 1.0]]
        with pytest.raises(ValueError, match="not found in models/loras"):
            run_node(node, model=spec, lora_name="cog/missing.safetensors", strength_model=1.0)
        with pytest.raises(LoraError, match="cannot read LoRA"):
            run_node(node, model=spec, lora_name="cog/corrupt.safetensors", strength_model=1.0)


def test_fp8_stored_plain_linear_merges_with_rounding_and_restores_bitwise(tmp_path, tiny_path):
    """Weights kept as float8 in a plain nn.Linear (upcast at compute, as fp8 checkpoints are stored): the merge
    adds in fp32 from the saved original and rounds back to float8; clearing restores the bytes."""
    lora, factors, _ = _lora(tmp_path, tiny_path, "2b", "peft", None, seed=17)
    engine = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", optimize="none")
    layer = engine.transformer.transformer_blocks[0].ff.net[2]
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    original = layer.weight.detach().clone()
    down, up = factors["transformer_blocks.0.ff.net.2"]
    engine.set_loras([(str(lora), 0.5)])
    expected = (original.float() + up @ down * 0.5).to(torch.float8_e4m3fn)
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.weight.view(torch.uint8), expected.view(torch.uint8))
    engine.set_loras([])
    assert torch.equal(layer.weight.view(torch.uint8), original.view(torch.uint8))


# ---------------------------------------------------------------------------------------------- with the memory plans


def _fp8_file(tmp_path, folder):
    """The tiny 5b stored as an fp8 single file (per-tensor scales), as ComfyUI users keep it."""
    from safetensors.torch import load_file, save_file

    from comfyui_xdit_cogvideo.formats import to_fp8_storage

    stored = to_fp8_storage(load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors")), scaled=True)
    path = tmp_path / "cogvideox_5b_fp8_scaled.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in stored.items()}, str(path))
    path.with_suffix(".json").write_text((folder / "transformer" / "config.json").read_text())
    return functools.partial(_fp8_source, str(path), folder)


def _fp8_source(path, folder, storage: str):
    from comfyui_xdit_cogvideo import ModelSource

    return ModelSource(path, storage=storage, vae=str(folder / "vae"), text_encoder=str(folder / "text_encoder"))


def _sharded_ranks(rank, path, fp8, loras):
    """On 2 gloo ranks, memory plan low (FSDP over both; fused QKV, whose q/k/v rows straddle the shards): each
    LoRA set in turn on one resident engine, then the fp8-resident file under FSDP with the first set."""
    import comfyui_xdit_cogvideo.engine as engine_module
    from comfyui_xdit_cogvideo.parallel.fsdp import shard_size

    loads = []
    real = engine_module.load_transformer
    engine_module.load_transformer = lambda *a, **k: loads.append(1) or real(*a, **k)
    groups = ParallelGroups.create(Layout(2, 1, 1))
    engine = CogVideoEngine(str(path), dtype="fp32", groups=groups, memory="low", optimize="fuse", loras=loras[0])
    assert shard_size(engine.transformer) == 2
    out, saved = [], []
    for lora_set in loras:
        engine.set_loras(lora_set)
        out.append(engine.generate(_request("5b")).numpy())
        saved.append(engine.lora.saved_bytes)
    reloads = len(loads) - 1
    resident = CogVideoEngine(fp8("fp8"), dtype="fp32", groups=groups, memory="low", loras=loras[0])
    return out, resident.generate(_request("5b")).numpy(), saved, reloads


@pytest.mark.timeout(600)
def test_fsdp_sharded_weights_merge_their_own_rows_and_switch(tmp_path, tiny_path):
    """LoRAs merged into FSDP-sharded weights (plan low) give the fast plan's latents with the same LoRAs, per set
    and after switching on the resident engine (no reload); each rank saves only its rows."""
    a, _, _ = _lora(tmp_path, tiny_path, "5b", "peft", None, seed=21, dora=True)
    b, _, _ = _lora(tmp_path, tiny_path, "5b", "kohya", 8.0, seed=22)
    fp8 = _fp8_file(tmp_path, tiny_path("5b"))
    sets = [[(str(a), 0.8)], [(str(b), 1.0), (str(a), 0.5)], []]
    results = run_world(2, _sharded_ranks, tiny_path("5b"), fp8, sets)
    fast = CogVideoEngine(str(tiny_path("5b")), dtype="fp32", optimize="fuse")
    expected, saved_whole = [], []
    for lora_set in sets:
        fast.set_loras(lora_set)
        expected.append(fast.generate(_request("5b")))
        saved_whole.append(fast.lora.saved_bytes)
    resident_expected = CogVideoEngine(fp8("upcast"), dtype="fp32", loras=sets[0]).generate(_request("5b"))
    for latents, resident, _, reloads in results:
        for ours, reference in zip(latents, expected):
            assert _rel(torch.from_numpy(ours), reference) < 1e-5
        assert _rel(torch.from_numpy(resident), resident_expected) < 1e-5
        assert reloads == 0
    assert [sum(r[2][i] for r in results) for i in range(len(sets))] == saved_whole  # each rank: its rows only
    assert saved_whole[0] > 0 and results[0][2][0] < saved_whole[0]
    assert _rel(expected[0], expected[2]) > 5e-4 and _rel(expected[1], expected[2]) > 5e-4


def test_per_input_dora_refused_on_sharded_rows(tmp_path, tiny_path):
    """A DoRA scale per input channel needs whole columns; on a rank holding some rows it is refused by name."""
    config = _config(tiny_path("5b"))
    factors = random_factors(config, rank=4, seed=3, targets=("ff.net.0.proj",))
    magnitudes = {k: torch.rand(down.shape[1]) + 0.5 for k, (down, _) in factors.items()}
    path = write_random_lora(tmp_path / "dora_in.safetensors", factors, "kohya", alpha=4.0, dora=magnitudes)
    good, _, _ = _lora(tmp_path, tiny_path, "5b", "peft", None, seed=28)
    results = run_world(2, _per_input_dora_rank, tiny_path("5b"), str(path), str(good))
    for refused, restored, merged in results:
        assert "DoRA scale per input channel" in refused
        assert restored and merged
    engine = CogVideoEngine(str(tiny_path("5b")), dtype="fp32", loras=[(str(path), 1.0)])  # unsharded: applied
    assert engine.loras[0]["layers"] == config["num_layers"]


def _per_input_dora_rank(rank, path, lora, good):
    """The refusal; and a LoRA merged before the weights were sharded (an engine built for one rank, then bound to
    two) is merged again into the shards, so clearing it restores each rank's rows."""
    groups = ParallelGroups.create(Layout(2, 1, 1))
    engine = CogVideoEngine(str(path), dtype="fp32", groups=groups, memory="low")
    try:
        engine.set_loras([(lora, 1.0)])
        refused = "applied"
    except LoraError as error:
        refused = str(error)
    late = CogVideoEngine(str(path), dtype="fp32", memory="low", loras=[(good, 1.0)])
    late.rebind(groups, "auto")  # shards now
    local = lambda e: e.transformer.transformer_blocks[0].attn1.to_k.weight.to_local().clone()  # noqa: E731
    merged = local(late)
    late.set_loras([])
    return refused, torch.equal(local(late), local(engine)), not torch.equal(merged, local(engine))


def test_offload_plan_merges_and_switches_like_the_fast_plan(tmp_path, tiny_path, base_latents):
    """Group-offloaded blocks (plan offload) take the LoRAs where the weights rest; switching equals the fast plan."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    a, _, _ = _lora(tmp_path, tiny_path, "5b", "peft", None, seed=23)
    b, _, _ = _lora(tmp_path, tiny_path, "5b", "comfyui_kohya", 2.0, seed=24)
    engine = CogVideoEngine(str(tiny_path("5b")), dtype="fp32", memory="offload", loras=[(str(a), 1.0)])
    first = engine.generate(_request("5b"))
    assert _is_group_offload_enabled(engine.transformer)
    engine.set_loras([(str(b), 0.7)])
    second = engine.generate(_request("5b"))
    engine.set_loras([])
    cleared = engine.generate(_request("5b"))
    for latents, loras in ((first, [(str(a), 1.0)]), (second, [(str(b), 0.7)])):
        fast = CogVideoEngine(str(tiny_path("5b")), dtype="fp32", loras=loras).generate(_request("5b"))
        assert torch.equal(latents, fast)
    assert torch.equal(cleared, base_latents["5b"])


def test_fp8_resident_weights_keep_the_lora_as_factors(tmp_path, tiny_path):
    """fp8-resident storage (--weights fp8): the stored fp8 tensors are never rewritten; the LoRA (and DoRA) is
    applied exactly on top of the fp8 base, i.e. equals the same file upcast at load with the LoRA merged in fp32;
    clearing gives the base latents bitwise."""
    fp8 = _fp8_file(tmp_path, tiny_path("5b"))
    a, _, _ = _lora(tmp_path, tiny_path, "5b", "peft", None, seed=25, dora=True)
    b, _, _ = _lora(tmp_path, tiny_path, "5b", "kohya", 8.0, seed=26)
    engine = CogVideoEngine(fp8("fp8"), dtype="fp32")
    base = engine.generate(_request("5b"))
    layer = engine.transformer.transformer_blocks[0].attn1.to_q
    stored = layer.parametrizations.weight.original.detach().clone()
    for loras in ([(str(a), 0.8)], [(str(b), 1.0), (str(a), 0.5)]):
        engine.set_loras(loras)
        reference = CogVideoEngine(fp8("upcast"), dtype="fp32", loras=loras).generate(_request("5b"))
        ours = engine.generate(_request("5b"))
        assert _rel(ours, reference) < 1e-5 and _rel(ours, base) > 5e-4
        assert torch.equal(layer.parametrizations.weight.original.view(torch.uint8), stored.view(torch.uint8))
    assert engine.lora.saved_bytes == 0  # nothing to save: the stored weights never change
    engine.set_loras([])
    assert torch.equal(engine.generate(_request("5b")), base)


def test_native_lora_names_map_through_the_model_name_table(tmp_path, tiny_path):
    """Every block module of the name table (formats.BLOCK) that holds a weight a LoRA can target, and every such
    top-level module, is addressed by ComfyUI-native LoRA keys in both spellings through that one table."""
    from comfyui_xdit_cogvideo.formats import BLOCK, TOP_LEVEL, diffusers_to_native_key
    from comfyui_xdit_cogvideo.lora import _targets

    engine = CogVideoEngine(str(tiny_path("1.5")), dtype="fp32")
    targets = _targets(engine.transformer)
    modules = dict(engine.transformer.named_modules())
    weighted = [d for _, d in BLOCK if isinstance(modules.get(f"transformer_blocks.0.{d}"), torch.nn.Linear)]
    assert {"attn1.to_q", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear"} <= set(weighted)
    for native, diffusers in BLOCK:
        if diffusers in weighted:
            name = f"transformer_blocks.1.{diffusers}"
            assert targets[f"blocks.1.{native}"] == name
            assert targets["blocks_1_" + native.replace(".", "_")] == name
    for native, diffusers in TOP_LEVEL:
        if isinstance(modules.get(diffusers), (torch.nn.Linear, torch.nn.Conv2d)):
            assert targets[native] == targets[native.replace(".", "_")] == diffusers
    factors = random_factors(_config(tiny_path("1.5")), rank=2, seed=27, targets=(
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear",
        "norm2.linear"))
    for fmt, spell in (("comfyui", lambda n: n), ("comfyui_kohya", lambda n: n.replace(".", "_"))):
        path = write_random_lora(tmp_path / f"all-{fmt}.safetensors", factors, fmt)
        assert set(read_lora(str(path)).layers) == {spell(diffusers_to_native_key(n)) for n in factors}
        engine.set_loras([(str(path), 1.0)])
        assert engine.loras[0]["layers"] == len(factors)
