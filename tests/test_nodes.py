"""ComfyUI nodes without ComfyUI: schemas, validation and execution on a real worker pool ("cpu:1", tiny models).

ComfyUI's own modules are replaced at the boundary only (tests/comfy_stub.py); the engine, the pool, the worker
processes, the VAE and the mp4 writer are the real ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from comfy_stub import ROOT, comfy_stubs, comfy_validate, run_node

DEVICES = "cpu:1"


def _core_folders(base, tiny_path):
    """Files as core ComfyUI keeps them: a native-name transformer and a Flux file in diffusion_models, a T5 file
    (with a tokenizer beside it) in text_encoders."""
    from safetensors.torch import load_file, save_file

    from comfyui_xdit_cogvideo.formats import diffusers_to_native

    models = base / "models"
    (models / "diffusion_models").mkdir(parents=True)
    folder = tiny_path("5b")
    state = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    save_file({"model.diffusion_model." + k: v for k, v in diffusers_to_native(state).items()},
              str(models / "diffusion_models" / "cogvideox_native.safetensors"))
    shutil.copyfile(folder / "transformer" / "config.json", models / "diffusion_models" / "cogvideox_native.json")
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2)},
              str(models / "diffusion_models" / "flux.safetensors"))
    shutil.copyfile(folder / "text_encoder" / "model.safetensors", models / "text_encoders" / "t5xxl_tiny.safetensors")
    (models / "text_encoders" / "tokenizer").symlink_to(folder / "tokenizer", target_is_directory=True)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, tiny_path):
    base = tmp_path_factory.mktemp("comfy")
    cog = base / "models" / "CogVideo"
    (cog / "nested").mkdir(parents=True)
    for sub in ("diffusers", "vae", "text_encoders"):
        (base / "models" / sub).mkdir(parents=True)
    (cog / "tiny-2b").symlink_to(tiny_path("2b"), target_is_directory=True)
    (cog / "nested" / "tiny-5b-i2v").symlink_to(tiny_path("5b-i2v"), target_is_directory=True)
    (base / "models" / "diffusers" / "tiny-5b").symlink_to(tiny_path("5b"), target_is_directory=True)
    weights = tiny_path("2b") / "transformer" / "diffusion_pytorch_model.safetensors"
    shutil.copyfile(weights, cog / "single-2b.safetensors")
    shutil.copyfile(weights.with_name("config.json"), cog / "single-2b.json")
    shutil.copyfile(tiny_path("2b") / "vae" / "diffusion_pytorch_model.safetensors", cog / "my_vae.safetensors")
    (cog / "my_vae.json").write_text('{"norm_num_groups": 4}')  # listed as a VAE, not as a model
    _core_folders(base, tiny_path)
    (cog / "broken").mkdir()
    (cog / "broken" / "transformer").mkdir()  # a diffusers folder without config/weights
    with comfy_stubs(base) as c:
        c.pkg = c.load_package()
        c.nodes = sys.modules[c.pkg.__name__ + ".nodes"]
        c.by_id = {n.GET_SCHEMA().node_id: n for n in c.nodes.NODES}
        yield c
    from comfyui_xdit_cogvideo.pool import shutdown_pool

    shutdown_pool()


@pytest.fixture(scope="module")
def spec(comfy):
    (spec,) = run_node(comfy.by_id["XDiTCogVideoModelLoader"], model="tiny-2b", vae="(from model folder)",
                       text_encoder="(from model folder)", precision="fp32", attention="auto").args
    return spec


@pytest.fixture(scope="module")
def parallel(comfy):
    (cfg,) = run_node(comfy.by_id["XDiTCogVideoParallelConfig"], devices=DEVICES, cfg="auto", ulysses="auto",
                      ring="auto").args
    return cfg


@pytest.fixture(scope="module")
def embeds(comfy, spec, parallel):
    positive, negative = run_node(comfy.by_id["XDiTCogVideoTextEncodeModelT5"], model=spec,
                                  prompt="a cat playing piano", negative_prompt="", parallel=parallel).args
    return positive, negative


def sample(comfy, spec, embeds, parallel, uid="7", **overrides):
    inputs = dict(model=spec, positive=embeds[0], negative=embeds[1], width=48, height=32, frames=9, steps=3,
                  guidance=6.0, dynamic_cfg=False, seed=1, scheduler="default", parallel=parallel)
    inputs.update(overrides)
    return run_node(comfy.by_id["XDiTCogVideoSampler"], uid, **inputs)


# ---- package and schemas ------------------------------------------------------------------------------------------
def test_import_registers_v3_entrypoint_and_starts_nothing(tmp_path):
    """Importing the package as ComfyUI does pulls in neither the engine nor the pool and starts no process
    (with prestarting off)."""
    code = f"""
import sys, threading, json, os
sys.path.insert(0, {str(ROOT / 'tests')!r})
from pathlib import Path
from comfy_stub import comfy_stubs
import multiprocessing
with comfy_stubs(Path({str(tmp_path)!r})) as c:
    before = threading.active_count()
    pkg = c.load_package()
    print(json.dumps({{
        "engine": "comfyui_xdit_cogvideo.engine" in sys.modules,
        "pool": "comfyui_xdit_cogvideo.pool" in sys.modules,
        "threads": threading.active_count() - before,
        "children": len(multiprocessing.active_children()),
        "v1": hasattr(pkg, "NODE_CLASS_MAPPINGS"),
        "entry": callable(getattr(pkg, "comfy_entrypoint", None)),
        "web": pkg.WEB_DIRECTORY,
        "routes": sorted(p for _, p in c.server.routes.table),
    }}))
"""
    env = dict(os.environ, XDIT_COGVIDEO_PRESTART="0")  # prestarting spares: tests/test_spares.py
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info == {"engine": False, "pool": False, "threads": 0, "children": 0, "v1": False, "entry": True,
                    "web": "./web", "routes": ["/xdit_cogvideo/shutdown", "/xdit_cogvideo/status"]}
    assert (ROOT / "web" / "xdit_cogvideo.js").exists()
    for path in list((ROOT / "nodes").glob("*.py")) + [ROOT / "__init__.py"]:
        text = path.read_text()
        for banned in ("torch.distributed", "import multiprocessing", "from multiprocessing", "NODE_CLASS_MAPPINGS ="):
            assert banned not in text, f"{path.name} mentions {banned}"


def test_entrypoint_lists_every_node(comfy):
    extension = asyncio.run(comfy.pkg.comfy_entrypoint())
    nodes = asyncio.run(extension.get_node_list())
    assert [n.GET_SCHEMA().node_id for n in nodes] == [
        "XDiTCogVideoModelLoader", "XDiTCogVideoLoraLoader", "XDiTCogVideoParallelConfig", "XDiTCogVideoTextEncode",
        "XDiTCogVideoTextEncodeModelT5", "XDiTCogVideoSampler", "XDiTCogVideoDecode", "XDiTCogVideoSaveVideo"]


def test_schemas_follow_conventions(comfy):
    for node in comfy.nodes.NODES:
        schema = node.GET_SCHEMA()
        assert schema.category == "xDiT/CogVideoX"
        assert schema.display_name.startswith("xDiT CogVideoX ")
        assert len(schema.description) > 40, schema.node_id
        for spec in schema.inputs:
            assert spec.tooltip and len(spec.tooltip) > 10, f"{schema.node_id}.{spec.id} has no tooltip"
        for out in schema.outputs:
            assert out.tooltip, f"{schema.node_id} output {out.display_name} has no tooltip"
    sampler = comfy.by_id["XDiTCogVideoSampler"].GET_SCHEMA()
    seed = next(i for i in sampler.inputs if i.id == "seed")
    assert seed.extra["control_after_generate"] is True and seed.extra["max"] == 2 ** 64 - 1
    assert {i.id for i in sampler.inputs if i.optional} == {"parallel", "image"}
    assert comfy.by_id["XDiTCogVideoSaveVideo"].GET_SCHEMA().is_output_node
    assert [o.io_type for o in sampler.outputs] == ["LATENT"]
    assert [o.io_type for o in comfy.by_id["XDiTCogVideoModelLoader"].GET_SCHEMA().outputs] == ["XDIT_COGVIDEO_MODEL"]


def test_attention_choices_match_engine(comfy):
    from comfyui_xdit_cogvideo.parallel.kernels import KERNELS

    assert set(comfy.nodes.common.ATTENTION_BACKENDS) == {"auto"} | set(KERNELS)


# ---- model loader -------------------------------------------------------------------------------------------------
def test_model_lists(comfy):
    models = sys.modules[comfy.pkg.__name__ + ".nodes.models"]
    assert models.list_models() == ["broken", "nested/tiny-5b-i2v", "single-2b.safetensors", "tiny-2b", "tiny-5b",
                                    "cogvideox_native.safetensors"]  # not flux.safetensors
    assert "t5xxl_tiny.safetensors" in models.list_text_encoders()
    extra = comfy.base / "elsewhere" / "unet"  # an extra_model_paths.yaml entry for diffusion_models
    extra.mkdir(parents=True)
    shutil.copyfile(comfy.base / "models" / "diffusion_models" / "cogvideox_native.safetensors",
                    extra / "other.safetensors")
    comfy.folder_paths.add_model_folder_path("diffusion_models", str(extra))
    try:
        assert models.list_models()[-1] == "other.safetensors"
        assert models.resolve("other.safetensors", models.MODEL_FOLDERS) == str(extra / "other.safetensors")
    finally:
        comfy.folder_paths.folder_names_and_paths["diffusion_models"][0].remove(str(extra))
    vaes = models.list_vaes()
    assert vaes[0] == "(from model folder)" and "my_vae.safetensors" in vaes and "tiny-2b/vae" in vaes
    assert "tiny-2b/text_encoder" in models.list_text_encoders()
    assert "CogVideo" in comfy.folder_paths.folder_names_and_paths
    schema = comfy.by_id["XDiTCogVideoModelLoader"].GET_SCHEMA()
    assert next(i for i in schema.inputs if i.id == "model").options == models.list_models()


def test_loader_validation_and_errors(comfy):
    loader = comfy.by_id["XDiTCogVideoModelLoader"]
    assert "was not found" in loader.validate_inputs(model="nope")
    assert loader.validate_inputs(model="tiny-2b") is True
    assert loader.validate_inputs(model="../../etc") != True  # noqa: E712  (no escaping the model folders)
    with pytest.raises(ValueError, match="precision must be one of"):
        run_node(loader, model="tiny-2b", precision="fp8")
    with pytest.raises(ValueError, match="attention must be one of"):
        run_node(loader, model="tiny-2b", attention="xformers")
    from comfyui_xdit_cogvideo import ModelError

    with pytest.raises(ModelError, match="vae 'missing.safetensors' not found"):
        run_node(loader, model="tiny-2b", vae="missing.safetensors")

    with pytest.raises(ModelError, match="config.json"):
        run_node(loader, model="broken")
    (single,) = run_node(loader, model="single-2b.safetensors", vae="tiny-2b/vae", text_encoder="tiny-2b/text_encoder",
                         precision="bf16", attention="auto").args
    assert single.source.path.endswith("single-2b.safetensors") and single.source.vae.endswith("vae")
    assert single.dtype == "bf16"


def test_core_folder_files_load_through_the_pool(comfy, parallel, tiny_path):
    """A native-name file from diffusion_models with a T5 file from text_encoders: same embeddings as the folder's
    T5, and the MODEL of core's UNETLoader (its file) gives the same spec."""
    from comfyui_xdit_cogvideo import CogVideoEngine

    loader = comfy.by_id["XDiTCogVideoModelLoader"]
    (spec,) = run_node(loader, model="cogvideox_native.safetensors", vae="(from model folder)",
                       text_encoder="t5xxl_tiny.safetensors", precision="fp32", attention="auto",
                       fp8_weights="upcast").args
    assert spec.source.tokenizer == str(comfy.base / "models" / "text_encoders" / "tokenizer")
    positive, negative = run_node(comfy.by_id["XDiTCogVideoTextEncodeModelT5"], model=spec, prompt="a cat",
                                  negative_prompt="", parallel=parallel).args
    want, _ = CogVideoEngine(str(tiny_path("5b")), dtype="fp32").encode_prompt("a cat", "")
    assert torch.equal(positive[0][0], want.float())
    models = sys.modules[comfy.pkg.__name__ + ".nodes.models"]
    path = str(comfy.base / "models" / "diffusion_models" / "cogvideox_native.safetensors")
    core = types.SimpleNamespace(model=types.SimpleNamespace(model_config=types.SimpleNamespace(
        unet_config={"image_model": "cogvideox"})), patches={}, object_patches={},
        cached_patcher_init=(None, (path, {"dtype": torch.float8_e4m3fn})))
    converted = models.spec_from_core_model(core, precision="fp32")
    assert (converted.source.path, converted.source.storage, converted.dtype) == (path, "fp8", "fp32")
    with pytest.raises(ValueError, match="carries patches"):
        models.spec_from_core_model(types.SimpleNamespace(**{**vars(core), "patches": {"x": 1}}))
    with pytest.raises(ValueError, match="core's flux MODEL, not CogVideoX"):
        models.spec_from_core_model(types.SimpleNamespace(**{**vars(core), "model": types.SimpleNamespace(
            model_config=types.SimpleNamespace(unet_config={"image_model": "flux"}))}))
    with pytest.raises(ValueError, match="which file"):
        models.spec_from_core_model(types.SimpleNamespace(**{**vars(core), "cached_patcher_init": None}))


def test_sampler_takes_core_model_and_decode_takes_core_latents(comfy, embeds, parallel, tiny_path):
    """Core's UNETLoader MODEL (its file, fp32 as core picks on CPU) samples what the folder samples; a bare core
    LATENT (no extra keys) decodes like ours."""
    from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest

    path = str(comfy.base / "models" / "diffusion_models" / "cogvideox_native.safetensors")
    core = types.SimpleNamespace(model=types.SimpleNamespace(
        model_config=types.SimpleNamespace(unet_config={"image_model": "cogvideox"}),
        manual_cast_dtype=None, get_dtype=lambda: torch.float32), patches={}, object_patches={},
        cached_patcher_init=(None, (path, {})))
    (latent,) = run_node(comfy.by_id["XDiTCogVideoSampler"], "11", model=core, positive=embeds[0], negative=embeds[1],
                         width=48, height=32, frames=9, steps=2, guidance=6.0, dynamic_cfg=False, seed=4,
                         scheduler="default", parallel=parallel).args
    request = GenerationRequest(prompt_embeds=embeds[0][0][0], negative_prompt_embeds=embeds[1][0][0], frames=9,
                                height=32, width=48, steps=2, guidance=6.0, seed=4)
    want = CogVideoEngine(str(tiny_path("5b")), dtype="fp32").generate(request)
    scale = latent["xdit_cogvideo"]["scaling_factor"]
    torch.testing.assert_close(latent["samples"], want.float().permute(0, 2, 1, 3, 4) / scale, rtol=1e-4, atol=1e-5)
    (spec,) = run_node(comfy.by_id["XDiTCogVideoModelLoader"], model="tiny-5b", vae="(from model folder)",
                       text_encoder="(from model folder)", precision="fp32", attention="auto").args
    decode = comfy.by_id["XDiTCogVideoDecode"]
    (ours,) = run_node(decode, "12", model=spec, samples=latent, tiled=False, parallel=parallel).args
    (bare,) = run_node(decode, "13", model=spec, samples={"samples": latent["samples"].clone()}, tiled=False,
                       parallel=parallel).args
    assert ours.shape == (9, 32, 48, 3) and torch.equal(ours, bare)
    with pytest.raises(ValueError, match="image-to-video needs the VAE"):
        run_node(comfy.by_id["XDiTCogVideoSampler"], "14", model=core, positive=embeds[0], negative=embeds[1],
                 width=48, height=32, frames=9, steps=2, guidance=6.0, dynamic_cfg=False, seed=4,
                 scheduler="default", parallel=parallel, image=torch.rand(1, 32, 48, 3))


def test_loader_output_is_a_pool_model_spec(comfy, spec):
    from comfyui_xdit_cogvideo.pool import ModelSpec

    assert isinstance(spec, ModelSpec)
    assert Path(spec.source.path) == comfy.base / "models" / "CogVideo" / "tiny-2b"
    assert (spec.dtype, spec.attention, spec.source.vae, spec.source.text_encoder) == ("fp32", "auto", None, None)


# ---- parallel config ----------------------------------------------------------------------------------------------
def test_parallel_config_validation(comfy, parallel, monkeypatch):
    from comfyui_xdit_cogvideo.pool import devices

    monkeypatch.setattr(devices, "cpu_count", lambda: 4)
    node = comfy.by_id["XDiTCogVideoParallelConfig"]
    assert "cannot parse" in node.validate_inputs(devices="gpu please")
    assert "no CUDA GPU" in node.validate_inputs(devices="0,1")
    assert "asks for 5 CPU ranks" in node.validate_inputs(devices="cpu:5")
    # a workflow opens the pool to other hosts only where the host allows it
    monkeypatch.delenv("XDIT_COGVIDEO_ALLOW_LISTEN", raising=False)
    assert "XDIT_COGVIDEO_ALLOW_LISTEN=1" in node.validate_inputs(devices="listen://127.0.0.1:29600?world=2")
    monkeypatch.setenv("XDIT_COGVIDEO_ALLOW_LISTEN", "1")
    assert node.validate_inputs(devices="listen://127.0.0.1:29600?world=2") is True
    # the degrees (combos, and their product against the devices) are refused when the node runs: it runs before
    # any node that uses its output touches the pool
    check = comfy.nodes.parallel.check_config
    assert "= 8 ranks" in check(devices="cpu:2", cfg="2", ulysses="2", ring="2")
    assert "ulysses must be one of" in check(devices="cpu:2", cfg="auto", ulysses="16", ring="auto")
    assert "needs a multiple of 4 ranks" in check(devices="cpu:2", cfg="auto", ulysses="4", ring="auto")
    assert check(devices="cpu:4", cfg="2", ulysses="auto", ring="2") is None
    with pytest.raises(ValueError, match="= 8 ranks"):
        run_node(node, devices="cpu:2", cfg="2", ulysses="2", ring="2")
    assert (parallel.devices, parallel.cfg, parallel.ulysses, parallel.ring) == (DEVICES, None, None, None)
    (explicit,) = run_node(node, devices="cpu:4", cfg="2", ulysses="auto", ring="2").args
    assert (explicit.cfg, explicit.ulysses, explicit.ring, explicit.explicit) == (2, None, 2, True)
    assert parallel.memory == "auto" and run_node(node, devices="cpu:2", memory="low").args[0].memory == "low"
    with pytest.raises(ValueError, match="memory must be one of auto, fast, low, offload"):
        run_node(node, devices="cpu:2", memory="tiny")


def _widgets(comfy, node_id: str, **changes) -> dict:
    """Every widget input of a node at its default, as a workflow sends them, with ``changes``."""
    schema = comfy.by_id[node_id].GET_SCHEMA()
    values = {i.id: i.default if i.default is not None else (i.options or [None])[0] for i in schema.inputs
              if i.is_widget}
    return {**values, **changes}


@pytest.mark.parametrize("check_combos", [False, True], ids=["0.3.x", "0.33"])
def test_each_mistake_is_reported_once_on_its_input(comfy, check_combos):
    def errors(node_id, **changes):
        return comfy_validate(comfy.by_id[node_id], _widgets(comfy, node_id, **changes), check_combos)

    assert errors("XDiTCogVideoSampler") == []
    ((name, details),) = errors("XDiTCogVideoSampler", frames=8)
    assert name == "frames" and "frames must be 4k+1" in details and "got 8" in details
    assert [e[0] for e in errors("XDiTCogVideoSampler", width=8)] == ["width"]
    assert errors("XDiTCogVideoModelLoader", model="tiny-2b") == []
    ((name, details),) = errors("XDiTCogVideoModelLoader", model="CogVideoX-2b")
    assert name == "model" and "'CogVideoX-2b' was not found in models/CogVideo" in details
    assert [e[0] for e in errors("XDiTCogVideoModelLoader", model="tiny-2b", precision="fp8")] == \
        (["precision"] if check_combos else [])  # 0.3.x: refused by execute instead (above)
    ((name, details),) = errors("XDiTCogVideoParallelConfig", devices="gpu please")
    assert name == "devices" and "cannot parse" in details


def test_save_node_refuses_at_queue_time_what_would_fail_after_sampling(comfy, tmp_path, monkeypatch):
    """Issue 17: the encoder and the output folder are checked when the prompt is queued (validate_inputs), once, on
    filename_prefix; a job that would fail only at the very end never starts."""
    from comfyui_xdit_cogvideo import video

    def errors(**changes):
        return comfy_validate(comfy.by_id["XDiTCogVideoSaveVideo"], _widgets(comfy, "XDiTCogVideoSaveVideo", **changes))

    video._ENCODERS_OK.clear()
    assert errors() == [] and errors(filename_prefix="new/sub/clip") == []
    assert not (comfy.base / "output" / "new").exists()  # checked, not made (ComfyUI makes it when saving)
    ((name, details),) = errors(filename_prefix="../outside")
    assert name == "filename_prefix" and "points outside ComfyUI's output folder" in details
    (comfy.base / "output").mkdir(exist_ok=True)
    (comfy.base / "output" / "taken").write_text("")
    ((name, details),) = errors(filename_prefix="taken/clip")
    assert name == "filename_prefix" and "cannot save videos: folder" in details and "is a file" in details
    fake = tmp_path / "ffmpeg-lgpl"  # an ffmpeg build without libx264
    fake.write_text("#!/bin/sh\ncat > /dev/null\necho \"Unknown encoder 'libx264'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(fake))
    ((name, details),) = errors()
    assert name == "filename_prefix" and "cannot save videos: ffmpeg could not write a 16x16 libx264 test clip: " \
        "Unknown encoder 'libx264'" in details
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    ((name, details),) = errors()
    assert details.endswith("cannot save videos: writing videos needs imageio-ffmpeg: pip install imageio-ffmpeg")
    with pytest.raises(ValueError, match="needs imageio-ffmpeg"):  # the stub's run_node validates first, as ComfyUI
        run_node(comfy.by_id["XDiTCogVideoSaveVideo"], "9", images=torch.rand(3, 32, 48, 3), fps=8.0,
                 filename_prefix="video/never", crf=19)
    assert not (comfy.base / "output" / "video" / "never_00001_.mp4").exists()


# ---- text ---------------------------------------------------------------------------------------------------------
def test_fit_tokens_matches_hf_truncation_and_padding(comfy):
    text = sys.modules[comfy.pkg.__name__ + ".nodes.text"]
    long = [(i + 2, 1.0) for i in range(300)] + [(1, 1.0)]
    cut = text.fit_tokens(long)
    assert len(cut) == 226 and cut[-1] == (1, 1.0) and cut[:225] == long[:225]
    short = text.fit_tokens([(5, 1.0, 1), (1, 1.0, 0)])
    assert len(short) == 226 and short[2] == (0, 1.0, 0)
    exact = [(7, 1.0)] * 225 + [(1, 1.0)]
    assert text.fit_tokens(exact) == exact


def test_encode_with_comfy_clip_uses_226_t5_tokens_without_mask(comfy):
    text = sys.modules[comfy.pkg.__name__ + ".nodes.text"]

    class T5Wrapper(torch.nn.Module):  # what ComfyUI's SDClipModel for T5 looks like from outside
        special_tokens = {"end": 1, "pad": 0}
        enable_attention_masks = True  # CLIPLoader type "mochi" turns masks on

    class FakeClip:
        def __init__(self):
            self.cond_stage_model = torch.nn.Sequential(T5Wrapper())
            self.seen = {}

        def tokenize(self, text, **kwargs):
            self.seen["options"] = kwargs.get("tokenizer_options")
            return {"t5xxl": [[(i + 2, 1.0) for i in range(400)] + [(1, 1.0)]], "l": [[(49406, 1.0)]]}

        def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
            self.seen["tokens"] = tokens
            self.seen["masks"] = [m.enable_attention_masks for m in self.cond_stage_model]
            n = len(tokens["t5xxl"][0])
            return {"cond": torch.arange(n, dtype=torch.float32).view(1, n, 1).expand(1, n, 4096).clone(),
                    "pooled_output": None}

    clip = FakeClip()
    (conditioning,) = run_node(comfy.by_id["XDiTCogVideoTextEncode"], clip=clip, text="a long prompt").args
    cond, extra = conditioning[0]
    assert cond.shape == (1, 226, 4096) and extra == {"pooled_output": None}
    assert clip.seen["options"] == {"t5xxl_min_length": 226}
    assert len(clip.seen["tokens"]["t5xxl"][0]) == 226 and clip.seen["tokens"]["t5xxl"][0][-1] == (1, 1.0)
    assert clip.seen["tokens"]["l"] == []
    assert clip.seen["masks"] == [False] and clip.cond_stage_model[0].enable_attention_masks is True
    with pytest.raises(ValueError, match="T5-XXL"):
        text.encode_with_clip(types.SimpleNamespace(tokenize=lambda t, **k: {"l": [[(1, 1.0)]]}), "x")


def test_core_conditioning_is_normalized_to_226_tokens(comfy):
    text = sys.modules[comfy.pkg.__name__ + ".nodes.text"]
    long = [[torch.randn(1, 256, 32), {"pooled_output": None, "attention_mask": torch.ones(1, 256)}]]
    assert torch.equal(text.conditioning_to_embeds(long, "positive", 226, 32), long[0][0][:, :226])
    short = text.conditioning_to_embeds([[torch.ones(1, 77, 32), {}]], "negative", 226, 32)
    assert short.shape == (1, 226, 32) and short[0, 76].sum() == 32 and short[0, 77:].abs().sum() == 0
    with pytest.raises(ValueError, match="width 768 but this model expects 32"):
        text.conditioning_to_embeds([[torch.ones(1, 77, 768), {}]], "positive", 226, 32)
    with pytest.raises(ValueError, match="expected CONDITIONING"):
        text.conditioning_to_embeds(None, "positive")


def test_model_t5_encode_equals_diffusers(comfy, spec, embeds, tiny_path):
    from comfyui_xdit_cogvideo import CogVideoEngine

    positive, negative = embeds
    assert positive[0][0].shape == (1, 226, 32) and negative[0][0].shape == (1, 226, 32)
    engine = CogVideoEngine(spec.source, dtype="fp32")
    want_pos, want_neg = engine.encode_prompt("a cat playing piano", "")
    torch.testing.assert_close(positive[0][0], want_pos.float())
    torch.testing.assert_close(negative[0][0], want_neg.float())


# ---- sampling, decode, save ---------------------------------------------------------------------------------------
def test_sampler_decode_save_end_to_end(comfy, spec, embeds, parallel):
    from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest

    comfy.utils.ProgressBar.updates.clear()
    comfy.server.messages.clear()
    (latent,) = sample(comfy, spec, embeds, parallel, uid="7").args
    samples = latent["samples"]
    assert samples.shape == (1, 4, 3, 4, 6) and samples.dtype == torch.float32  # [B, C, F, H/8, W/8]
    assert latent["xdit_cogvideo"]["frames"] == 9
    bars = [u for u in comfy.utils.ProgressBar.updates if u[0] == "7"]
    assert [(v, t) for _, v, t, _ in bars] == [(1, 3), (2, 3), (3, 3)] and all(p for *_, p in bars)
    events = [d for e, d in comfy.server.messages if e == "xdit_cogvideo.progress" and d["phase"] == "sample"]
    assert [e["step"] for e in events] == [1, 2, 3] and all(e["node"] == "7" for e in events)
    assert ("xdit_cogvideo.job", "done") in [(e, d.get("state")) for e, d in comfy.server.messages]

    # the pool's latents are the in-process engine's (same embeddings, seed, scheduler)
    request = GenerationRequest(prompt_embeds=embeds[0][0][0], negative_prompt_embeds=embeds[1][0][0], frames=9,
                                height=32, width=48, steps=3, guidance=6.0, seed=1)
    want = CogVideoEngine(spec.source, dtype="fp32").generate(request)
    scale = latent["xdit_cogvideo"]["scaling_factor"]
    assert scale == json.loads((spec.source.resolve().vae / "config.json").read_text())["scaling_factor"]
    # ComfyUI's convention (core VAE Decode takes it): the VAE's raw latents, diffusers' divided by the scaling
    torch.testing.assert_close(samples, want.float().permute(0, 2, 1, 3, 4) / scale, rtol=1e-4, atol=1e-5)

    comfy.server.messages.clear()
    (images,) = run_node(comfy.by_id["XDiTCogVideoDecode"], "8", model=spec, samples=latent, tiled="auto",
                         parallel=parallel).args
    assert images.shape == (9, 32, 48, 3) and 0 <= images.min() and images.max() <= 1
    # the automatic choice (2 CPU ranks: untiled on rank 0) is reported and equals the mode it picked
    (choice,) = [d for e, d in comfy.server.messages if e == "xdit_cogvideo.decode"]
    assert choice["node"] == "8" and (choice["tiled"], choice["ranks"]) == (False, 1)
    assert choice["text"].startswith("decode: untiled on rank 0: needs ")
    (untiled,) = run_node(comfy.by_id["XDiTCogVideoDecode"], "8", model=spec, samples=latent, tiled="off",
                          parallel=parallel).args
    assert torch.equal(images, untiled)
    assert comfy_validate(comfy.by_id["XDiTCogVideoDecode"], {"tiled": True}) == []  # saved before "auto" existed
    ((name, details),) = comfy_validate(comfy.by_id["XDiTCogVideoDecode"], {"tiled": "sometimes"})
    assert name == "tiled" and "tiled must be one of auto, on, off; got 'sometimes'" in details
    out = run_node(comfy.by_id["XDiTCogVideoSaveVideo"], "9", images=images, fps=8.0,
                   filename_prefix="video/test", crf=19)
    saved = out.ui.as_dict()["images"][0]
    assert saved["type"] == "output" and saved["subfolder"] == "video"
    path = comfy.base / "output" / "video" / saved["filename"]
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    frames = list(reader)
    assert meta["size"] == (48, 32) and len(frames) == 9


def test_status_route_never_starts_the_pool_and_reports_it(comfy, spec, embeds, parallel, monkeypatch):
    routes = sys.modules[comfy.pkg.__name__ + ".nodes.routes"]
    handler = comfy.server.routes.table[("GET", "/xdit_cogvideo/status")]
    if "aiohttp" not in sys.modules:
        try:
            import aiohttp  # noqa: F401
        except ImportError:  # CI has no aiohttp: answer with a stand-in carrying the payload
            web = types.SimpleNamespace(json_response=lambda data: types.SimpleNamespace(payload=data))
            monkeypatch.setitem(sys.modules, "aiohttp", types.SimpleNamespace(web=web))
            monkeypatch.setitem(sys.modules, "aiohttp.web", web)
    response = asyncio.run(handler(None))
    payload = getattr(response, "payload", None) or json.loads(response.text)
    assert payload["running"] is True and payload["world_size"] == 1 and payload["devices"] == DEVICES
    assert payload["ranks"][0]["pid"] > 0
    json.dumps(payload)
    # with no pool object at all the route answers "not running" and creates nothing
    import comfyui_xdit_cogvideo.pool.registry as controller

    monkeypatch.setattr(controller, "_POOL", None)
    assert routes.pool_status() == {"running": False}
    assert controller._POOL is None


def test_cancel_interrupts_like_comfyui_and_pool_stays_healthy(comfy, spec, embeds, parallel):
    mm = comfy.mm

    def hook(value, total, preview, node_id=None):  # ComfyUI's progress hook: interrupt point
        if value >= 1:
            mm.interrupt_current_processing(True)  # the user presses Cancel during step 1
        mm.throw_exception_if_processing_interrupted()

    comfy.utils.ProgressBar.hook = hook
    comfy.server.messages.clear()
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(comfy, spec, embeds, parallel, uid="11", steps=30)
    finally:
        comfy.utils.ProgressBar.hook = None
        mm.interrupt_current_processing(False)
    steps = [d["step"] for e, d in comfy.server.messages if e == "xdit_cogvideo.progress" and d["phase"] == "sample"]
    assert max(steps) < 30
    assert ("xdit_cogvideo.job", "cancelled") in [(e, d.get("state")) for e, d in comfy.server.messages]
    # Cancel seen by polling alone (no progress update in between): flag set before the job starts
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(comfy, spec, embeds, parallel, uid="12", steps=30)
    finally:
        mm.interrupt_current_processing(False)
    (latent,) = sample(comfy, spec, embeds, parallel, uid="13").args  # the next job runs normally
    assert latent["samples"].shape == (1, 4, 3, 4, 6)


def test_cancel_during_decode(comfy, spec, embeds, parallel):
    (latent,) = sample(comfy, spec, embeds, parallel, uid="14", steps=2).args
    mm = comfy.mm
    mm.interrupt_current_processing(True)  # Cancel pressed while the decode runs
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_node(comfy.by_id["XDiTCogVideoDecode"], "15", model=spec, samples=latent, tiled=True, parallel=parallel)
    finally:
        mm.interrupt_current_processing(False)
    (images,) = run_node(comfy.by_id["XDiTCogVideoDecode"], "16", model=spec, samples=latent, tiled=True,
                         parallel=parallel).args
    assert images.shape == (9, 32, 48, 3)


def test_memory_plan_from_the_parallel_config_reaches_the_pool(comfy, spec, embeds, parallel):
    from dataclasses import replace

    (fast,) = sample(comfy, spec, embeds, parallel, uid="7", steps=2).args
    pool = comfy.nodes.common.get_pool(DEVICES)
    assert pool.status()["model"]["memory"].startswith("fast (auto)")
    (low,) = sample(comfy, spec, embeds, replace(parallel, memory="offload"), uid="7", steps=2).args
    assert pool.last_plan.name == "offload" and pool.status()["model"]["memory"].startswith("offload,")
    assert torch.equal(low["samples"], fast["samples"])


def test_sampler_rejects_bad_inputs_before_running(comfy, spec, embeds, parallel):
    sampler = comfy.by_id["XDiTCogVideoSampler"]
    assert "4k+1" in sampler.validate_inputs(frames=8)
    with pytest.raises(ValueError, match="width must be a multiple of 16 .* got 50"):
        sample(comfy, spec, embeds, parallel, width=50)
    with pytest.raises(ValueError, match="scheduler must be one of"):
        sample(comfy, spec, embeds, parallel, scheduler="euler")
    from comfyui_xdit_cogvideo import LayoutError, RequestError

    with pytest.raises(RequestError, match="text-to-video model and takes no start image"):
        sample(comfy, spec, embeds, parallel, image=torch.rand(1, 32, 48, 3))
    with pytest.raises(LayoutError, match="cfg"):
        explicit = comfy.nodes.common.ParallelConfig(DEVICES, cfg=2)
        sample(comfy, spec, embeds, explicit)
    bad = [[torch.ones(1, 226, 4096), {}]]
    with pytest.raises(ValueError, match="expects 32"):
        sample(comfy, spec, (bad, bad), parallel)


def test_image_to_video(comfy, parallel, tiny_path):
    (i2v,) = run_node(comfy.by_id["XDiTCogVideoModelLoader"], model="nested/tiny-5b-i2v", precision="fp32").args
    positive, negative = run_node(comfy.by_id["XDiTCogVideoTextEncodeModelT5"], model=i2v, prompt="a red car",
                                  parallel=parallel).args
    from comfyui_xdit_cogvideo import RequestError

    with pytest.raises(RequestError, match="start image"):
        sample(comfy, i2v, (positive, negative), parallel)
    image = torch.rand(2, 40, 90, 3)  # wider than 48x32: centre-cropped to 3:2 first
    (latent,) = sample(comfy, i2v, (positive, negative), parallel, image=image, steps=2).args
    assert latent["samples"].shape == (1, 4, 3, 4, 6)


def test_center_crop_and_preview(comfy):
    common = comfy.nodes.common
    from comfyui_xdit_cogvideo.engine import start_image

    assert start_image(torch.rand(40, 90, 3), 32, 48).size == (60, 40)
    assert start_image(torch.rand(100, 48, 3), 32, 48).size == (48, 32)
    assert common.latent_preview_image(torch.randn(16, 60, 90)).size == (270, 180)
    assert common.latent_preview_image(torch.rand(4, 16, 8, 8)).mode == "RGB"
    assert common.latent_preview_image(torch.rand(32, 48, 3)).size == (288, 192)
    assert common.latent_preview_image(None) is None


def test_save_node_pads_odd_sizes(comfy, tmp_path):
    video = sys.modules[comfy.pkg.__name__ + ".nodes.video"]
    path = tmp_path / "odd.mp4"
    video.write_mp4(torch.rand(5, 31, 47, 3), str(path), fps=8)
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    assert next(reader)["size"] == (48, 32) and len(list(reader)) == 5
    assert os.path.getsize(path) > 0


def test_routes_answer_within_100_ms_while_a_start_is_pending(comfy, monkeypatch):
    """aiohttp's event loop is ComfyUI's whole web server: a pending pool start must not hold it, and the
    shutdown route aborts that start."""
    import threading
    import time

    from comfyui_xdit_cogvideo.pool import PoolError, registry
    from comfyui_xdit_cogvideo.pool.channel import free_port

    routes = sys.modules[comfy.pkg.__name__ + ".nodes.routes"]
    web = types.SimpleNamespace(json_response=lambda data: types.SimpleNamespace(payload=data))
    monkeypatch.setitem(sys.modules, "aiohttp", types.SimpleNamespace(web=web))
    monkeypatch.setitem(sys.modules, "aiohttp.web", web)
    monkeypatch.setenv("XDIT_COGVIDEO_POOL_KEY", os.urandom(32).hex())
    registry.shutdown_pool()
    pool = registry.get_pool(f"listen://127.0.0.1:{free_port()}?world=2", start_timeout=300)  # no worker comes
    failure = {}

    def start():
        try:
            pool.start()
        except PoolError as error:
            failure["error"] = error

    starter = threading.Thread(target=start, daemon=True)
    starter.start()
    deadline = time.monotonic() + 10
    while pool.status()["state"] != "starting" and time.monotonic() < deadline:
        time.sleep(0.01)

    async def timed(path):
        handler = comfy.server.routes.table[path]
        began = time.monotonic()
        response = await handler(None)
        return time.monotonic() - began, response.payload

    took, status = asyncio.run(timed(("GET", "/xdit_cogvideo/status")))
    assert took < 0.1 and status["state"] == "starting", (took, status)
    took, stopped = asyncio.run(timed(("POST", "/xdit_cogvideo/shutdown")))
    assert took < 0.1 and stopped["running"] is False, (took, stopped)
    starter.join(5)
    assert not starter.is_alive() and "start aborted" in str(failure.get("error"))
    assert registry.current_pool() is None and routes.pool_status() == {"running": False}


def test_comfy_memory_is_freed_on_the_pools_gpus_when_short(comfy, monkeypatch):
    import comfy.model_management as mm

    common = sys.modules[comfy.pkg.__name__ + ".nodes.common"]
    from comfyui_xdit_cogvideo.pool import PoolDevices

    free = {0: 10, 1: 90, 2: 5}
    calls = []
    monkeypatch.setattr(mm, "get_total_memory", lambda device: 100, raising=False)
    monkeypatch.setattr(mm, "get_free_memory", lambda device: free[device.index], raising=False)
    monkeypatch.setattr(mm, "free_memory", lambda need, device: calls.append((need, device.index)), raising=False)
    monkeypatch.setattr(mm, "soft_empty_cache", lambda *a, **k: calls.append("empty"), raising=False)
    common.free_comfy_memory(PoolDevices("cuda", 2, ("0", "1"), indices=(0, 1)))
    assert calls == [(50.0, 0), "empty"]  # GPU 0 was short; GPU 1 had enough; GPU 2 is not the pool's
    calls.clear()
    common.free_comfy_memory(PoolDevices("cpu", 2))
    assert calls == []


def test_a_layout_the_model_cannot_run_leaves_the_warm_pool_alone(comfy, spec, embeds, parallel):
    """ulysses 4 on cpu:2 for a 6-head model: the text-encode node (the first to see devices and model) refuses it
    before asking for a pool on other devices, so the warm pool keeps running."""
    from comfyui_xdit_cogvideo import LayoutError

    common = sys.modules[comfy.pkg.__name__ + ".nodes.common"]
    warm = common.get_pool(parallel.devices).start()  # an earlier test may have stopped it
    assert warm.status()["state"] == "idle"
    pids = [r["pid"] for r in warm.status()["ranks"]]
    bad = common.ParallelConfig("cpu:2", None, 4, None)
    with pytest.raises(LayoutError, match="ulysses"):
        run_node(comfy.by_id["XDiTCogVideoTextEncodeModelT5"], model=spec, prompt="a cat", parallel=bad)
    with pytest.raises(LayoutError, match="ulysses"):
        run_node(comfy.by_id["XDiTCogVideoSampler"], model=spec, positive=embeds[0], negative=embeds[1],
                 width=48, height=32, frames=9, steps=1, parallel=bad)
    assert common.current_pool() is warm and [r["pid"] for r in warm.status()["ranks"]] == pids
    assert warm.status()["state"] == "idle"


def _container_tags(path: Path) -> dict:
    """The container's global tags, read back by ffmpeg (FFMETADATA1, backslash escapes undone)."""
    import imageio_ffmpeg

    run = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
                         capture_output=True, text=True, check=True)
    tags, key, value, escaped, in_value = {}, "", "", False, False
    for c in run.stdout.split("\n", 1)[1]:
        if escaped:
            value, key = (value + c, key) if in_value else (value, key + c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == "=" and not in_value:
            in_value = True
        elif c == "\n":
            if key:
                tags[key] = value
            key, value, in_value = "", "", False
        else:
            value, key = (value + c, key) if in_value else (value, key + c)
    return tags


def test_save_node_embeds_prompt_and_workflow_like_core(comfy, tmp_path):
    save = comfy.by_id["XDiTCogVideoSaveVideo"]
    assert {h.value for h in save.GET_SCHEMA().hidden} == {"PROMPT", "EXTRA_PNGINFO"}  # what core's SaveVideo asks
    workflow = {"nodes": [{"id": 1, "widgets_values": ["a = b; c # d \\ e\nf", "ünï"]}], "links": []}
    prompt = {"5": {"class_type": "XDiTCogVideoSampler", "inputs": {"seed": 7}}}
    hidden = {"prompt": prompt, "extra_pnginfo": {"workflow": workflow}}
    out = run_node(save, "9", hidden=hidden, images=torch.rand(5, 32, 48, 3), fps=8.0, filename_prefix="meta/t",
                   crf=19)
    path = comfy.base / "output" / "meta" / out.ui.as_dict()["images"][0]["filename"]
    tags = _container_tags(path)
    assert json.loads(tags["workflow"]) == workflow and json.loads(tags["prompt"]) == prompt
    data = path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # tags readable from the file's start (a browser reads the head)
    assert os.listdir(path.parent) == [path.name]  # no temporary file left
    comfy.args.disable_metadata = True  # ComfyUI --disable-metadata
    try:
        out = run_node(save, "9", hidden=hidden, images=torch.rand(5, 32, 48, 3), fps=8.0, filename_prefix="meta/t",
                       crf=19)
    finally:
        comfy.args.disable_metadata = False
    tags = _container_tags(path.parent / out.ui.as_dict()["images"][0]["filename"])
    assert "workflow" not in tags and "prompt" not in tags


def test_save_node_writer_fails_loudly_when_ffmpeg_cannot_write(comfy, tmp_path):
    """The node shares the engine's checked writer: a failed ffmpeg raises instead of leaving no file silently."""
    from comfyui_xdit_cogvideo.video import VideoWriteError

    video = sys.modules[comfy.pkg.__name__ + ".nodes.video"]
    target = tmp_path / "taken.mp4"
    target.mkdir()  # a folder where the file should go, and a frame rate ffmpeg refuses
    with pytest.raises((VideoWriteError, ValueError, OSError), match="taken.mp4|fps"):
        video.write_mp4(torch.rand(3, 32, 48, 3), str(target), fps=-5)
    assert target.is_dir() and not list(tmp_path.glob("*.partial*"))
