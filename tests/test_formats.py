"""Every on-disk format a ComfyUI user keeps, written by these helpers from the tiny models' weights, loads to the
same latents (or embeddings, or frames) as the diffusers folder; every wrong model gives its named error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest, ModelError, ModelSource
from comfyui_xdit_cogvideo.formats import (diffusers_to_native, diffusers_to_native_key, native_to_diffusers,
                                           native_to_diffusers_key, to_fp8_storage, upcast)
from comfyui_xdit_cogvideo.loading import read_model_info
from comfyui_xdit_cogvideo.tiny import TINY_VARIANTS
from published import PUBLISHED_CONFIGS

REQUEST = dict(prompt="a dog running on the beach", frames=9, height=32, width=48, steps=2, seed=3)
PREFIX = "model.diffusion_model."
REAL = {variant: dict(config, num_layers=2) for variant, config in PUBLISHED_CONFIGS.items()}


# ---------------------------------------------------------------------------------------------- test helpers


def diffusers_state(folder) -> dict:
    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


def write_transformer(path, state: dict, folder=None, native: bool = False, prefix: str = PREFIX) -> str:
    """A single transformer file: ``state`` (diffusers names) under ``prefix``, in native names if asked, with
    the folder's config beside it (tiny sample sizes are not the published ones shapes imply)."""
    if native:
        state = diffusers_to_native(state)
    save_file({prefix + k: v for k, v in state.items()}, str(path))
    if folder is not None:
        path.with_suffix(".json").write_text((folder / "transformer" / "config.json").read_text())
    return str(path)


def parts(folder) -> dict:
    return dict(vae=str(folder / "vae"), text_encoder=str(folder / "text_encoder"))


def request_for(variant):
    return GenerationRequest(**REQUEST, image=torch.rand(32, 48, 3, generator=torch.Generator().manual_seed(1))
                             if variant.endswith("i2v") else None)


@pytest.fixture(scope="module")
def reference(tiny_path):
    """Latents of the diffusers folder per variant (computed once)."""
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = CogVideoEngine(str(tiny_path(variant)), dtype="fp32").generate(request_for(variant))
        return cache[variant]
    return get


# ---------------------------------------------------------------------------------------------- the name table


def _full_size_keys(variant) -> list[str]:
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        return list(CogVideoXTransformer3DModel(**REAL[variant]).state_dict())


@pytest.mark.parametrize("variant", list(REAL) + [f"tiny-{v}" for v in TINY_VARIANTS])
def test_name_table_round_trips_every_variant(tiny_path, variant):
    keys = diffusers_state(tiny_path(variant[5:])).keys() if variant.startswith("tiny-") else _full_size_keys(variant)
    native = {k: diffusers_to_native_key(k) for k in keys}
    assert None not in native.values(), [k for k, v in native.items() if v is None]
    assert len(set(native.values())) == len(native)
    assert all(native_to_diffusers_key(n) == k for k, n in native.items())
    # ComfyUI 0.33.0's names (comfy/ldm/cogvideo/model.py): blocks.N.{q,k,v,attn_out,ff_proj,ff_out,...}
    assert native["transformer_blocks.1.attn1.to_out.0.weight"] == "blocks.1.attn_out.weight"
    assert native["transformer_blocks.0.ff.net.0.proj.bias"] == "blocks.0.ff_proj.bias"
    assert native["transformer_blocks.0.attn1.norm_k.weight"] == "blocks.0.norm_k.weight"
    assert native["time_embedding.linear_1.weight"] == "time_embedding_linear_1.weight"
    assert native["patch_embed.proj.weight"] == "patch_embed.proj.weight"
    if "ofs" in str(REAL.get(variant, {})) or variant == "tiny-1.5-i2v":
        assert native["ofs_embedding.linear_2.bias"] == "ofs_embedding_linear_2.bias"


def test_module_names_map_for_lora_keys():
    assert native_to_diffusers_key("blocks.7.q") == "transformer_blocks.7.attn1.to_q"
    assert native_to_diffusers_key("blocks.7.ff_out") == "transformer_blocks.7.ff.net.2"
    assert diffusers_to_native_key("transformer_blocks.2.attn1.to_v") == "blocks.2.v"
    for bad in ("blocks.0.self_attn.q.weight", "double_blocks.0.img_attn.qkv.weight", "blocks.x.q.weight", ""):
        assert native_to_diffusers_key(bad) is None
    with pytest.raises(ModelError, match="not a ComfyUI-native"):
        native_to_diffusers({"blocks.0.cross_attn.q.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------- transformer files


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_native_single_file_equals_folder(tmp_path, tiny_path, reference, variant):
    folder = tiny_path(variant)
    state = diffusers_state(folder)
    assert native_to_diffusers(diffusers_to_native(state)).keys() == state.keys()
    path = write_transformer(tmp_path / "cogvideox_native.safetensors", state, folder, native=True)
    source = ModelSource(path, **parts(folder))
    engine = CogVideoEngine(source, dtype="fp32")
    assert engine.info == read_model_info(ModelSource(str(folder)))
    assert torch.equal(engine.generate(request_for(variant)), reference(variant))


@pytest.mark.parametrize("variant", ["5b-i2v", "1.5"])
def test_diffusers_single_file_without_prefix_equals_folder(tmp_path, tiny_path, reference, variant):
    folder = tiny_path(variant)
    path = write_transformer(tmp_path / "t.safetensors", diffusers_state(folder), folder, prefix="")
    assert torch.equal(CogVideoEngine(ModelSource(path, **parts(folder)), dtype="fp32").generate(request_for(variant)),
                       reference(variant))


def test_sharded_diffusers_folder_equals_folder(tmp_path, tiny_path, reference):
    from diffusers import CogVideoXTransformer3DModel

    folder = tiny_path("5b")
    sharded = tmp_path / "CogVideoX-5b"
    sharded.mkdir()
    for name in ("scheduler", "vae", "text_encoder", "tokenizer", "model_index.json"):
        (sharded / name).symlink_to(folder / name)
    CogVideoXTransformer3DModel.from_pretrained(folder / "transformer").save_pretrained(
        sharded / "transformer", max_shard_size="100KB")
    shards = sorted((sharded / "transformer").glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 1 and (sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert torch.equal(CogVideoEngine(str(sharded), dtype="fp32").generate(request_for("5b")), reference("5b"))
    shards[-1].write_bytes(shards[-1].read_bytes()[:-100])
    with pytest.raises(ModelError, match="is truncated"):
        CogVideoEngine(str(sharded), dtype="fp32")


# ---------------------------------------------------------------------------------------------- fp8 storage


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "fp8_scaled"])
def test_fp8_file_equals_fp8_rounded_reference(tmp_path, tiny_path, scaled):
    """Upcast at load and fp8-resident (upcast per layer at compute) both equal the rounded weights in fp32."""
    folder = tiny_path("5b")
    stored = to_fp8_storage(diffusers_state(folder), scaled=scaled)
    scales = {k[: -len("scale_weight")] + "weight": v for k, v in stored.items() if k.endswith("scale_weight")}
    rounded = {k: upcast(v, scales.get(k), torch.float32) for k, v in stored.items()
               if not k.endswith("scale_weight") and k != "scaled_fp8"}
    assert any(v.dtype == torch.float8_e4m3fn for v in stored.values())
    reference_path = write_transformer(tmp_path / "rounded.safetensors", rounded, folder)
    expected = CogVideoEngine(ModelSource(reference_path, **parts(folder)), dtype="fp32").generate(request_for("5b"))
    path = write_transformer(tmp_path / "cogvideox_fp8.safetensors",
                             {k: v for k, v in stored.items() if k != "scaled_fp8"}, folder, native=False)
    if scaled:  # ComfyUI's marker lives under the model prefix; add it beside the weights
        tensors = load_file(path)
        tensors[PREFIX + "scaled_fp8"] = stored["scaled_fp8"]
        save_file(tensors, path)
    upcast_engine = CogVideoEngine(ModelSource(path, **parts(folder)), dtype="fp32")
    assert torch.equal(upcast_engine.generate(request_for("5b")), expected)
    resident = CogVideoEngine(ModelSource(path, storage="fp8", **parts(folder)), dtype="fp32")
    linear = resident.transformer.transformer_blocks[0].attn1.to_q
    assert linear.parametrizations.weight.original.dtype == torch.float8_e4m3fn
    assert linear.weight.dtype == torch.float32
    assert torch.equal(resident.generate(request_for("5b")), expected)
    resident.optimize("fuse")  # a fused bf16 QKV copy would undo the saving: fusing stays off
    assert not getattr(resident.transformer.transformer_blocks[0].attn1, "fused_projections", False)
    assert torch.equal(resident.generate(request_for("5b")), expected)
    stored_bytes = sum(p.numel() * p.element_size() for p in resident.transformer.parameters())
    upcast_bytes = sum(p.numel() * p.element_size() for p in upcast_engine.transformer.parameters())
    assert stored_bytes < 0.45 * upcast_bytes  # fp8 vs fp32 here; vs bf16 it is about half


def test_native_fp8_scaled_new_style_metadata(tmp_path, tiny_path, reference):
    """ComfyUI's newer form: ``<layer>.comfy_quant`` JSON and ``<layer>.weight_scale``, native names."""
    folder = tiny_path("1.5-i2v")
    state = diffusers_to_native(diffusers_state(folder))
    layer = "blocks.0.q"
    weight = state[layer + ".weight"]
    scale = weight.abs().max() / 448
    state[layer + ".weight"] = (weight / scale).to(torch.float8_e4m3fn)
    state[layer + ".weight_scale"] = scale.reshape(())
    state[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                 dtype=torch.uint8)
    path = write_transformer(tmp_path / "new.safetensors", state, folder, prefix="")
    engine = CogVideoEngine(ModelSource(path, **parts(folder)), dtype="fp32")
    q = engine.transformer.transformer_blocks[0].attn1.to_q.weight
    assert torch.equal(q, state[layer + ".weight"].float() * scale)
    assert not torch.equal(engine.generate(request_for("1.5-i2v")), reference("1.5-i2v"))  # rounding shows
    state[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    save_file(state, path)
    with pytest.raises(ModelError, match="quantized as 'nvfp4'"):
        CogVideoEngine(ModelSource(path, **parts(folder)), dtype="fp32")


# ---------------------------------------------------------------------------------------------- VAE files


@pytest.mark.parametrize("dtype,prefix", [(torch.float32, ""), (torch.bfloat16, "vae.")], ids=["fp32", "bf16"])
def test_vae_single_file_decodes_like_folder(tmp_path, tiny_path, dtype, prefix):
    folder = tiny_path("1.5-i2v")
    state = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    stored = {k: v.to(dtype) for k, v in state.items()}
    path = tmp_path / "cogvideox_vae.safetensors"
    save_file({prefix + k: v for k, v in stored.items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"norm_num_groups": 4}))  # the rest comes from the shapes
    rounded = tmp_path / "rounded_vae"
    shutil.copytree(folder / "vae", rounded)
    save_file({k: v.float() for k, v in stored.items()}, str(rounded / "diffusion_pytorch_model.safetensors"))
    transformer = str(folder)
    latents = torch.randn(1, 3, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    by_file = CogVideoEngine(ModelSource(transformer, vae=str(path)), dtype="fp32")
    by_folder = CogVideoEngine(ModelSource(transformer, vae=str(rounded)), dtype="fp32")
    assert by_file.vae.config.scaling_factor == by_folder.vae.config.scaling_factor
    assert by_file.vae.config.invert_scale_latents and by_folder.vae.config.invert_scale_latents
    assert torch.equal(by_file.decode(latents, frames=9), by_folder.decode(latents, frames=9))


def test_full_size_vae_config_is_detected_from_shapes():
    from diffusers import AutoencoderKLCogVideoX

    from comfyui_xdit_cogvideo.loading import vae_config_from_shapes

    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX()
    detected = vae_config_from_shapes({k: tuple(v.shape) for k, v in vae.state_dict().items()})
    for key, value in detected.items():
        assert tuple(vae.config[key]) == tuple(value) if isinstance(value, tuple) else vae.config[key] == value, key


# ---------------------------------------------------------------------------------------------- T5 files


@pytest.mark.parametrize("storage", ["fp16", "fp8_e4m3fn", "fp8_e4m3fn_scaled"])
def test_t5_single_file_gives_diffusers_embeddings(tmp_path, tiny_path, storage):
    """A ComfyUI-style t5xxl file gives the embeddings diffusers' T5 gives from the same (rounded) weights."""
    folder = tiny_path("2b")
    state = load_file(str(folder / "text_encoder" / "model.safetensors"))
    if storage == "fp16":
        stored = {k: v.half() for k, v in state.items()}
    else:
        stored = to_fp8_storage(state, scaled=storage.endswith("scaled"))
    path = tmp_path / f"t5xxl_{storage}.safetensors"
    save_file({k: v for k, v in stored.items() if k != "encoder.embed_tokens.weight"}, str(path))
    scales = {k[: -len("scale_weight")] + "weight": v for k, v in stored.items() if k.endswith("scale_weight")}
    reference_te = tmp_path / "text_encoder"
    shutil.copytree(folder / "text_encoder", reference_te)
    save_file({k: upcast(v, scales.get(k), torch.float32).contiguous() for k, v in stored.items()
               if not k.endswith("scale_weight") and k != "scaled_fp8"}, str(reference_te / "model.safetensors"))
    expected = CogVideoEngine(ModelSource(str(folder), text_encoder=str(reference_te),
                                          tokenizer=str(folder / "tokenizer")), dtype="fp32").encode_prompt(
        REQUEST["prompt"], "blurry")
    by_file = CogVideoEngine(ModelSource(str(folder), text_encoder=str(path), tokenizer=str(folder / "tokenizer")),
                             dtype="fp32").encode_prompt(REQUEST["prompt"], "blurry")
    assert torch.equal(by_file[0], expected[0]) and torch.equal(by_file[1], expected[1])


# ---------------------------------------------------------------------------------------------- wrong models


def _save(path, tensors):
    save_file({k: torch.zeros(v) if isinstance(v, tuple) else v for k, v in tensors.items()}, str(path))
    return str(path)


def test_wrong_transformer_files_are_named(tmp_path, tiny_path):
    folder = tiny_path("5b")
    state = diffusers_state(folder)
    cases = {
        "a Flux transformer": {"double_blocks.0.img_attn.qkv.weight": (2,), "single_blocks.0.linear1.weight": (2,)},
        "a Wan transformer": {"model.diffusion_model.blocks.0.self_attn.q.weight": (2,),
                              "model.diffusion_model.head.modulation": (2,)},
        "a HunyuanVideo transformer": {"double_blocks.0.img_attn.qkv.weight": (2,), "txt_in.x.weight": (2,)},
        "a VAE": {"decoder.conv_in.conv.weight": (2,)},
        "a T5 text encoder": {"encoder.block.0.layer.0.SelfAttention.q.weight": (2,)},
        "a LoRA": {"transformer_blocks.0.attn1.to_q.lora_A.weight": (2,)},
        "Tora": {**state, "transformer_blocks.0.fuser.weight": (2,), "traj_extractor.conv.weight": (2,)},
        "ControlNet": {**state, "controlnet_blocks.0.weight": (2,)},
    }
    for what, tensors in cases.items():
        with pytest.raises(ModelError, match=what):
            CogVideoEngine(_save(tmp_path / "x.safetensors", tensors))
    combined = {"model.diffusion_model." + k: v for k, v in state.items()}
    combined.update({"vae.decoder.conv_in.conv.weight": torch.zeros(2),
                     "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2)})
    path = _save(tmp_path / "checkpoint.safetensors", combined)  # a whole checkpoint: its transformer part loads
    (tmp_path / "checkpoint.json").write_text((folder / "transformer" / "config.json").read_text())
    assert read_model_info(ModelSource(path)) == read_model_info(ModelSource(str(folder)))
    with pytest.raises(ModelError, match="no transformer blocks.*incomplete"):
        CogVideoEngine(_save(tmp_path / "x.safetensors", {"patch_embed.proj.weight": (2,)}))


def test_derivatives_and_truncated_files_are_named(tmp_path, tiny_path):
    folder = tiny_path("5b")
    state = diffusers_state(folder)

    def with_channels(channels, base=state):
        out = dict(base)
        w = out["patch_embed.proj.weight"]
        out["patch_embed.proj.weight"] = torch.zeros(w.shape[0], channels, *w.shape[2:])
        return _save(tmp_path / f"c{channels}.safetensors", out)
    with pytest.raises(ModelError, match="CogVideoX-Fun inpaint"):
        read_model_info(ModelSource(with_channels(9)))  # tiny: 4 latent channels, 2*4+1 like Fun's 33
    with pytest.raises(ModelError, match="CogVideoX-Fun control"):
        read_model_info(ModelSource(with_channels(8)))  # I2V channels without learned positions
    v15 = diffusers_state(tiny_path("1.5-i2v"))
    no_ofs = {k: v for k, v in v15.items() if not k.startswith("ofs_embedding")}
    with pytest.raises(ModelError, match="ofs embedding.*CogVideoX-Fun control"):
        read_model_info(ModelSource(_save(tmp_path / "fun15.safetensors", no_ofs)))
    path = write_transformer(tmp_path / "whole.safetensors", state, folder)
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "whole.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="is truncated.*download it again"):
        read_model_info(ModelSource(path))


def test_image_to_video_file_without_start_image_is_named(tiny_path, tmp_path):
    folder = tiny_path("5b-i2v")
    path = write_transformer(tmp_path / "CogVideoX_1_0_5b_I2V.safetensors", diffusers_state(folder), folder,
                             native=True)
    engine = CogVideoEngine(ModelSource(path, **parts(folder)), dtype="fp32")
    with pytest.raises(Exception, match="image-to-video model: give a start image"):
        engine.generate(GenerationRequest(**REQUEST))


def test_wrong_vae_and_text_encoder_files_are_named(tmp_path, tiny_path):
    from types import SimpleNamespace

    from comfyui_xdit_cogvideo.loading import check_vae
    from comfyui_xdit_cogvideo.variants import ModelInfo

    folder = tiny_path("5b")
    for what, tensors in {
        "an image VAE": {"decoder.conv_in.weight": (2,)},
        "a Wan VAE": {"decoder.conv1.weight": (2,), "encoder.conv1.weight": (2,)},
        "a CogVideoX transformer": diffusers_state(folder),
    }.items():
        engine = CogVideoEngine(ModelSource(str(folder), vae=_save(tmp_path / "v.safetensors", tensors)), dtype="fp32")
        with pytest.raises(ModelError, match=what):
            engine.decode(torch.zeros(1, 3, 4, 4, 6))
    info15 = ModelInfo.from_config(REAL["1.5-5b-i2v"])
    v10 = SimpleNamespace(config=SimpleNamespace(latent_channels=16, scaling_factor=0.7, invert_scale_latents=False))
    with pytest.raises(ModelError, match="another CogVideoX model.*1.5-5b-i2v.*invert_scale_latents True"):
        check_vae(v10, info15, "vae/", from_config=True)
    v2b = SimpleNamespace(config=SimpleNamespace(latent_channels=16, scaling_factor=1.15258426,
                                                 invert_scale_latents=False))
    with pytest.raises(ModelError, match="CogVideoX-2b"):
        check_vae(v2b, ModelInfo.from_config(REAL["5b"]), "vae/", from_config=True)
    check_vae(v10, ModelInfo.from_config(REAL["5b"]), "vae/", from_config=True)
    wan = SimpleNamespace(config=SimpleNamespace(latent_channels=48, scaling_factor=1.0))
    with pytest.raises(ModelError, match="48 latent channels"):
        check_vae(wan, ModelInfo.from_config(REAL["5b"]), "wan_vae", from_config=False)
    te = {"shared.weight": torch.zeros(256384, 4), "encoder.block.0.layer.0.SelfAttention.q.weight": (4, 4)}
    for what, tensors in {"UMT5-XXL": te, "a CLIP text encoder": {"text_model.encoder.layers.0.x.weight": (2,)},
                          "a CogVideoX transformer": diffusers_state(folder)}.items():
        engine = CogVideoEngine(ModelSource(str(folder), text_encoder=_save(tmp_path / "te.safetensors", tensors),
                                            tokenizer=str(folder / "tokenizer")), dtype="fp32")
        with pytest.raises(ModelError, match=what):
            engine.encode_prompt("x")
