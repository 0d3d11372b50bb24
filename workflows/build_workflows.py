"""Writes the shipped workflows (UI format for drag-and-drop, API format for POST /prompt) from one description.

    python workflows/build_workflows.py

UI files go to workflows/ui/ and are copied to example_workflows/ (ComfyUI's template browser lists those under
Workflow > Browse Templates) under their template title, beside a small thumbnail drawn here from the graph;
API files go to workflows/api/. tests/test_workflows.py checks every file against
the node schemas, so edit the graphs here and re-run rather than editing the JSON by hand.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Socket (non-widget) inputs and outputs per node type, in schema order: (name, type, optional).
SOCKETS = {
    "XDiTCogVideoModelLoader": ([], [("model", "XDIT_COGVIDEO_MODEL")]),
    "XDiTCogVideoParallelConfig": ([], [("parallel", "XDIT_COGVIDEO_PARALLEL")]),
    "XDiTCogVideoLoraLoader": ([("model", "XDIT_COGVIDEO_MODEL", False)], [("model", "XDIT_COGVIDEO_MODEL")]),
    "XDiTCogVideoTextEncode": ([("clip", "CLIP", False)], [("conditioning", "CONDITIONING")]),
    "XDiTCogVideoTextEncodeModelT5": ([("model", "XDIT_COGVIDEO_MODEL", False),
                                       ("parallel", "XDIT_COGVIDEO_PARALLEL", True)],
                                      [("positive", "CONDITIONING"), ("negative", "CONDITIONING")]),
    "XDiTCogVideoSampler": ([("model", "XDIT_COGVIDEO_MODEL,MODEL", False), ("positive", "CONDITIONING", False),
                             ("negative", "CONDITIONING", False), ("parallel", "XDIT_COGVIDEO_PARALLEL", True),
                             ("image", "IMAGE", True)], [("samples", "LATENT")]),
    "XDiTCogVideoDecode": ([("model", "XDIT_COGVIDEO_MODEL", False), ("samples", "LATENT", False),
                            ("parallel", "XDIT_COGVIDEO_PARALLEL", True)], [("images", "IMAGE")]),
    "CLIPLoader": ([], [("CLIP", "CLIP")]),
    "CLIPTextEncode": ([("clip", "CLIP", False)], [("CONDITIONING", "CONDITIONING")]),
    "UNETLoader": ([], [("MODEL", "MODEL")]),
    "VAELoader": ([], [("VAE", "VAE")]),
    "VAEDecode": ([("samples", "LATENT", False), ("vae", "VAE", False)], [("IMAGE", "IMAGE")]),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "CreateVideo": ([("images", "IMAGE", False), ("audio", "AUDIO", True)], [("VIDEO", "VIDEO")]),
    "SaveVideo": ([("video", "VIDEO", False)], []),
    "MarkdownNote": ([], []),
}

# Widget values in schema order (UI widgets_values); "seed" is followed by its control_after_generate value.
WIDGETS = {
    "XDiTCogVideoModelLoader": ["model", "vae", "text_encoder", "precision", "attention", "fp8_weights"],
    "XDiTCogVideoParallelConfig": ["devices", "cfg", "ulysses", "ring", "memory"],
    "XDiTCogVideoLoraLoader": ["lora_name", "strength_model"],
    "XDiTCogVideoTextEncode": ["text"],
    "XDiTCogVideoTextEncodeModelT5": ["prompt", "negative_prompt"],
    "XDiTCogVideoSampler": ["width", "height", "frames", "steps", "guidance", "dynamic_cfg", "seed", "scheduler"],
    "XDiTCogVideoDecode": ["tiled"],
    "CLIPLoader": ["clip_name", "type", "device"],
    "CLIPTextEncode": ["text"],
    "UNETLoader": ["unet_name", "weight_dtype"],
    "VAELoader": ["vae_name"],
    "VAEDecode": [],
    "LoadImage": ["image"],
    "CreateVideo": ["fps"],
    "SaveVideo": ["filename_prefix", "format", "codec"],
    "MarkdownNote": ["text"],
}

DISPLAY = {
    "XDiTCogVideoModelLoader": "xDiT CogVideoX Model Loader", "XDiTCogVideoParallelConfig": "xDiT CogVideoX Parallel Config",
    "XDiTCogVideoTextEncode": "xDiT CogVideoX Text Encode (CLIP)", "XDiTCogVideoLoraLoader": "xDiT CogVideoX LoRA",
    "XDiTCogVideoTextEncodeModelT5": "xDiT CogVideoX Text Encode (Model T5)", "XDiTCogVideoSampler": "xDiT CogVideoX Sampler",
    "XDiTCogVideoDecode": "xDiT CogVideoX Decode", "CLIPLoader": "Load CLIP", "LoadImage": "Load Image",
    "CreateVideo": "Create Video", "SaveVideo": "Save Video", "CLIPTextEncode": "CLIP Text Encode (Prompt)",
    "UNETLoader": "Load Diffusion Model", "VAELoader": "Load VAE", "VAEDecode": "VAE Decode",
}

PROMPT = ("A golden retriever runs along a sunny beach at sunset, waves rolling in behind it, its fur blowing in "
          "the wind. The camera tracks alongside at dog height; warm light, shallow depth of field, cinematic.")
I2V_PROMPT = ("The scene comes to life: gentle camera push-in, soft natural motion, clouds drifting, light "
              "shimmering; consistent colours and details, cinematic.")

NOTE_COMMON = """
**GPUs** — *Parallel Config*: `devices` = `auto` (every visible GPU), `0,1` or `0,1,2,3` (those GPUs). Degrees on
`auto` choose the fastest split (CFG 2 first, then Ulysses, then Ring). The pool starts with the first job, keeps the
weights in GPU memory between jobs, and restarts if you change the devices. `memory` = `auto` picks the fastest
memory plan that fits your GPUs (`low` shards the weights over them and keeps T5 off the GPU; `offload` streams the
model from CPU memory on one small GPU).

**Watch it** — the sampler's progress bar shows steps and previews; *Cancel* stops the job within a step. The
**xDiT** sidebar tab shows the pool: GPUs, memory, current step.
"""

T2V_NOTE = """## xDiT CogVideoX — text to video on several GPUs

**Model files** (diffusers format, one folder per model) go in `ComfyUI/models/CogVideo/` (or `models/diffusers/`):
```
models/CogVideo/CogVideoX-2b/   transformer/ vae/ text_encoder/ tokenizer/ scheduler/
```
```
huggingface-cli download THUDM/CogVideoX-2b --local-dir models/CogVideo/CogVideoX-2b
```
Refresh (press `r`) and pick it in the loader. For **CogVideoX-5b** set the loader to `CogVideoX-5b` and turn on
`dynamic_cfg` (its default scheduler is DPM). **CogVideoX1.5-5b**: 1360x768, 81 frames, fps 16.

The text encoder is the model folder's own T5 (`text_encoder/`). To use ComfyUI's CLIPLoader with
`t5xxl_fp16.safetensors` instead, open the *cogvideox_t2v_comfy_t5* template.
""" + NOTE_COMMON

T2V_T5_NOTE = """## xDiT CogVideoX — text to video, ComfyUI's T5 loader

**Text encoder**: `t5xxl_fp16.safetensors` (or `t5xxl_fp8_e4m3fn.safetensors`) in `ComfyUI/models/text_encoders/`,
loaded by *Load CLIP* with **type `sd3`**. *xDiT CogVideoX Text Encode (CLIP)* turns it into the 226-token T5
embedding CogVideoX expects (same as diffusers).

**Transformer + VAE**: a diffusers folder in `models/CogVideo/` (e.g. `CogVideoX-2b`; `text_encoder/` may be left
out), or a single transformer `.safetensors` in `models/CogVideo/` plus the VAE file (`models/vae/` or a file with
`vae` in its name in `models/CogVideo/`) chosen in the loader's `vae` box.
""" + NOTE_COMMON

I2V_NOTE = """## xDiT CogVideoX — image to video on several GPUs

**Model files**: `models/CogVideo/CogVideoX-5b-I2V/` (diffusers format: transformer/ vae/ text_encoder/ tokenizer/
scheduler/):
```
huggingface-cli download THUDM/CogVideoX-5b-I2V --local-dir models/CogVideo/CogVideoX-5b-I2V
```
CogVideoX-5b-I2V only runs at **720x480, 49 frames**. CogVideoX1.5-5b-I2V takes other sizes (1360x768, 81 frames,
fps 16). The start image is centre-cropped to the video's aspect ratio and resized.
""" + NOTE_COMMON


LORA_NOTE = """## xDiT CogVideoX — text to video with a LoRA

**Model**: a diffusers folder in `ComfyUI/models/CogVideo/` (e.g. `CogVideoX-5b`, see the *cogvideox_t2v* template).

**LoRA**: a `.safetensors` LoRA **for the same model size** in `ComfyUI/models/loras/`. Chain several
*xDiT CogVideoX LoRA* nodes for several LoRAs. Strength **1.0 = as trained** (not the official demo's 1/rank).
Read: diffusers/PEFT (`lora_A`/`lora_B`, official finetune, finetrainers), kohya (`lora_unet_...` + alpha,
CogVideoX-Fun) and ComfyUI-format LoRAs, DoRA included. Every GPU merges the LoRA into its weights (no slowdown);
changing LoRAs or strengths later does not reload the model.
""" + NOTE_COMMON

CORE_NOTE = """## xDiT CogVideoX — core ComfyUI loaders, parallel sampler

A native ComfyUI CogVideoX workflow with one node replaced: *xDiT CogVideoX Sampler* instead of KSampler. It
needs a ComfyUI with native CogVideoX (0.33 or newer: `CLIPLoader` type `cogvideox`, CogVideoX in *Load
Diffusion Model* and *Load VAE*).

**Files** (the ones core reads; nothing is duplicated):
- `models/diffusion_models/`: a CogVideoX transformer file, ComfyUI-native or diffusers names, bf16 or fp8
  (e.g. Comfy-Org's native files, Kijai's `CogVideoX_1_5_5b_T2V_bf16.safetensors`).
- `models/text_encoders/`: `t5xxl_fp16.safetensors` (or `t5xxl_fp8_e4m3fn[_scaled]`), loaded with type `cogvideox`.
- `models/vae/`: `cogvideox_vae_bf16.safetensors`.

The pool's workers load the transformer file themselves (the MODEL tells them which file); LoRAs or other patches
on the MODEL cannot follow (use the xDiT loader and LoRA nodes). The sampler's LATENT is ComfyUI's own, so core's
*VAE Decode* (or xDiT CogVideoX Decode, parallel and tiled) decodes it. Diffusers folders go in
`models/CogVideo/` for the *xDiT CogVideoX Model Loader* instead. Prompts over 225 T5 tokens are cut to 226 tokens
(diffusers cuts the tokens; core does not), so long prompts differ slightly from diffusers.
""" + NOTE_COMMON


# Template titles. ComfyUI's template browser (frontend 1.27 and 1.49, ComfyUI 0.3.64 and 0.33.0) reads nothing
# but the file names of a custom node's example_workflows/: ``<name>.json`` is the workflow, ``<name>.jpg`` its
# thumbnail, and the name is shown as the title and (with - and _ as spaces) as the description.
TITLES = {
    "cogvideox_t2v": "CogVideoX text to video (multi-GPU)",
    "cogvideox_i2v": "CogVideoX image to video (multi-GPU)",
    "cogvideox_t2v_comfy_t5": "CogVideoX text to video with Load CLIP T5 (multi-GPU)",
    "cogvideox_t2v_lora": "CogVideoX text to video with a LoRA (multi-GPU)",
    "cogvideox_t2v_core_loaders": "CogVideoX text to video from core loaders (multi-GPU sampler)",
}
CARDS = {  # what the thumbnail says: headline, subtitle
    "cogvideox_t2v": ("CogVideoX text to video", "model's own T5 · multi-GPU (Ulysses / Ring / CFG)"),
    "cogvideox_i2v": ("CogVideoX image to video", "5b-I2V, start frame · multi-GPU (Ulysses / Ring / CFG)"),
    "cogvideox_t2v_comfy_t5": ("CogVideoX text to video", "ComfyUI's Load CLIP T5 · multi-GPU (Ulysses / Ring / CFG)"),
    "cogvideox_t2v_lora": ("CogVideoX text to video", "with a LoRA · multi-GPU (Ulysses / Ring / CFG)"),
    "cogvideox_t2v_core_loaders": ("CogVideoX text to video", "core ComfyUI loaders · xDiT multi-GPU sampler"),
}
THUMBNAIL_SIZE = (384, 256)
_COLOURS = {"MarkdownNote": ((101, 85, 51), (67, 51, 34))}  # (fill, title bar); ours blue, core grey
_OURS, _CORE = ((52, 72, 110), (70, 100, 160)), ((70, 70, 70), (100, 100, 100))


def thumbnail(graph: "Graph", size: tuple[int, int] = THUMBNAIL_SIZE):
    """A title card for the template browser: the workflow's nodes and links in miniature under its title."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    k = width / THUMBNAIL_SIZE[0]
    image = Image.new("RGB", size, (24, 26, 32))
    draw = ImageDraw.Draw(image)
    left = min(n["pos"][0] for n in graph.nodes)
    top = min(n["pos"][1] for n in graph.nodes)
    right = max(n["pos"][0] + n["size"][0] for n in graph.nodes)
    bottom = max(n["pos"][1] + n["size"][1] for n in graph.nodes)
    band = 70 * k
    scale = min((width - 24 * k) / (right - left), (height - band - 20 * k) / (bottom - top))
    ox, oy = (width - (right - left) * scale) / 2, 12 * k

    def box(node):
        x, y = ox + (node["pos"][0] - left) * scale, oy + (node["pos"][1] - top) * scale
        return x, y, x + node["size"][0] * scale, y + node["size"][1] * scale

    boxes = {n["id"]: box(n) for n in graph.nodes}
    for _, src, _, dst, _, _ in graph.links:
        x0, y0, x1, y1 = boxes[src]
        a0, b0, _, _ = boxes[dst]
        draw.line([(x1, y0 + 8 * k), (a0, b0 + 8 * k)], fill=(150, 160, 190), width=round(2 * k))
    for node in graph.nodes:
        fill, bar = _COLOURS.get(node["type"], _OURS if node["type"].startswith("XDiT") else _CORE)
        x0, y0, x1, y1 = boxes[node["id"]]
        draw.rounded_rectangle((x0, y0, x1, y1), radius=3 * k, fill=fill, outline=(16, 16, 20))
        draw.rectangle((x0 + 1, y0 + 1, x1 - 1, min(y1 - 1, y0 + 6 * k)), fill=bar)
        if k >= 2:  # large enough to name the nodes
            label = (node.get("title") or DISPLAY.get(node["type"], node["type"])).replace("xDiT CogVideoX ", "")
            draw.text((x0 + 4 * k, y0 + 9 * k), label, fill=(220, 225, 235), font=ImageFont.load_default(size=6 * k))
    draw.rectangle((0, height - band, width, height), fill=(14, 16, 22))
    headline, subtitle = CARDS[graph.name]
    draw.text((14 * k, height - band + 10 * k), headline, fill=(235, 238, 245), font=ImageFont.load_default(size=22 * k))
    draw.text((14 * k, height - band + 42 * k), subtitle, fill=(150, 180, 235), font=ImageFont.load_default(size=13 * k))
    return image


def workflow_picture(graph: "Graph"):
    """(PNG image, its text chunks) as ComfyUI's SaveImage writes them: "prompt" (API format) and "workflow" (UI
    format), each as JSON, so that dropping the picture on ComfyUI loads the workflow."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", json.dumps(graph.api))
    info.add_text("workflow", json.dumps(graph.ui()))
    return thumbnail(graph, (THUMBNAIL_SIZE[0] * 2, THUMBNAIL_SIZE[1] * 2)), info


class Graph:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.api: dict[str, dict] = {}

    def add(self, type_: str, pos, size, title: str | None = None, **values) -> dict:
        node_id = len(self.nodes) + 1
        inputs_spec, outputs_spec = SOCKETS[type_]
        widgets = []
        for name in WIDGETS[type_]:
            widgets.append(values[name])
            if name == "seed":
                widgets.append("fixed")
        node = {
            "id": node_id, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": 0, "mode": 0,
            "inputs": [dict({"name": n, "type": t, "link": None}, **({"shape": 7} if opt else {}))
                       for n, t, opt in inputs_spec],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs_spec)],
            "properties": {} if type_ == "MarkdownNote" else {"Node name for S&R": type_},
            "widgets_values": widgets,
        }
        if title:
            node["title"] = title
        if type_ == "MarkdownNote":
            node.update(color="#432", bgcolor="#653")
        self.nodes.append(node)
        if type_ != "MarkdownNote":
            self.api[str(node_id)] = {"class_type": type_, "inputs": {k: values[k] for k in WIDGETS[type_]},
                                      "_meta": {"title": title or DISPLAY[type_]}}
        return node

    def link(self, src: dict, out_name: str, dst: dict, in_name: str) -> None:
        out_slot = next(i for i, o in enumerate(src["outputs"]) if o["name"] == out_name)
        in_slot = next(i for i, o in enumerate(dst["inputs"]) if o["name"] == in_name)
        link_id = len(self.links) + 1
        type_ = src["outputs"][out_slot]["type"]
        self.links.append([link_id, src["id"], out_slot, dst["id"], in_slot, type_])
        src["outputs"][out_slot]["links"].append(link_id)
        dst["inputs"][in_slot]["link"] = link_id
        self.api[str(dst["id"])]["inputs"][in_name] = [str(src["id"]), out_slot]

    def ui(self) -> dict:
        order = 0
        for node in self.nodes:  # execution order: sources first (ids are added in dependency order)
            node["order"] = order
            order += 1
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-xdit-cogvideo/{self.name}")), "revision": 0,
            "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
            "links": self.links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [20, 40]}, "frontendVersion": "1.27.10"}, "version": 0.4,
        }


def t2v(model_t5: bool = True, lora: bool = False) -> Graph:
    g = Graph("cogvideox_t2v_lora" if lora else "cogvideox_t2v" if model_t5 else "cogvideox_t2v_comfy_t5")
    note = LORA_NOTE if lora else T2V_NOTE if model_t5 else T2V_T5_NOTE
    g.add("MarkdownNote", (0, 0), (430, 640), title="Read me: model files", text=note)
    loader = g.add("XDiTCogVideoModelLoader", (460, 0), (360, 200), model="CogVideoX-5b" if lora else "CogVideoX-2b",
                   vae="(from model folder)", text_encoder="(from model folder)", precision="bf16", attention="auto",
                   fp8_weights="upcast")
    parallel = g.add("XDiTCogVideoParallelConfig", (460, 240), (360, 160), devices="auto", cfg="auto",
                     ulysses="auto", ring="auto", memory="auto")
    if lora:
        with_lora = g.add("XDiTCogVideoLoraLoader", (460, -140), (360, 100), lora_name="CogVideoX-5b-lora.safetensors",
                          strength_model=1.0)
        g.link(loader, "model", with_lora, "model")
        loader = with_lora
    if model_t5:
        text = g.add("XDiTCogVideoTextEncodeModelT5", (850, 0), (400, 400), prompt=PROMPT, negative_prompt="")
        g.link(loader, "model", text, "model")
        g.link(parallel, "parallel", text, "parallel")
        positive, pos_out, negative, neg_out = text, "positive", text, "negative"
        decode_pos, video_pos, save_pos = (460, 450), (460, 600), (850, 450)
    else:
        clip = g.add("CLIPLoader", (460, 440), (360, 110), clip_name="t5xxl_fp16.safetensors", type="sd3",
                     device="default")
        positive = g.add("XDiTCogVideoTextEncode", (850, 0), (400, 220), title="Positive prompt", text=PROMPT)
        negative = g.add("XDiTCogVideoTextEncode", (850, 250), (400, 140), title="Negative prompt", text="")
        g.link(clip, "CLIP", positive, "clip")
        g.link(clip, "CLIP", negative, "clip")
        pos_out = neg_out = "conditioning"
        decode_pos, video_pos, save_pos = (850, 430), (850, 580), (1280, 500)
    sampler = g.add("XDiTCogVideoSampler", (1280, 0), (330, 450), width=720, height=480, frames=49, steps=50,
                    guidance=6.0, dynamic_cfg=lora, seed=42, scheduler="default")
    g.link(loader, "model", sampler, "model")
    g.link(positive, pos_out, sampler, "positive")
    g.link(negative, neg_out, sampler, "negative")
    g.link(parallel, "parallel", sampler, "parallel")
    decode = g.add("XDiTCogVideoDecode", decode_pos, (360 if model_t5 else 400, 110), tiled="auto")
    g.link(loader, "model", decode, "model")
    g.link(sampler, "samples", decode, "samples")
    g.link(parallel, "parallel", decode, "parallel")
    video = g.add("CreateVideo", video_pos, (360 if model_t5 else 400, 80), fps=8.0)
    g.link(decode, "images", video, "images")
    save = g.add("SaveVideo", save_pos, (400 if model_t5 else 330, 380), filename_prefix="video/CogVideoX",
                 format="auto", codec="auto")
    g.link(video, "VIDEO", save, "video")
    return g


def i2v() -> Graph:
    g = Graph("cogvideox_i2v")
    g.add("MarkdownNote", (0, 0), (430, 640), title="Read me: model files", text=I2V_NOTE)
    loader = g.add("XDiTCogVideoModelLoader", (460, 0), (360, 200), model="CogVideoX-5b-I2V",
                   vae="(from model folder)", text_encoder="(from model folder)", precision="bf16", attention="auto", fp8_weights="upcast")
    parallel = g.add("XDiTCogVideoParallelConfig", (460, 240), (360, 160), devices="auto", cfg="auto",
                     ulysses="auto", ring="auto", memory="auto")
    image = g.add("LoadImage", (460, 440), (360, 360), title="Start frame", image="example.png")
    image["widgets_values"].append("image")  # the upload widget's value
    text = g.add("XDiTCogVideoTextEncodeModelT5", (850, 0), (400, 380), prompt=I2V_PROMPT, negative_prompt="")
    g.link(loader, "model", text, "model")
    g.link(parallel, "parallel", text, "parallel")
    sampler = g.add("XDiTCogVideoSampler", (1280, 0), (330, 460), width=720, height=480, frames=49, steps=50,
                    guidance=6.0, dynamic_cfg=True, seed=42, scheduler="default")
    g.link(loader, "model", sampler, "model")
    g.link(text, "positive", sampler, "positive")
    g.link(text, "negative", sampler, "negative")
    g.link(parallel, "parallel", sampler, "parallel")
    g.link(image, "IMAGE", sampler, "image")
    decode = g.add("XDiTCogVideoDecode", (850, 420), (400, 110), tiled="auto")
    g.link(loader, "model", decode, "model")
    g.link(sampler, "samples", decode, "samples")
    g.link(parallel, "parallel", decode, "parallel")
    video = g.add("CreateVideo", (850, 570), (400, 80), fps=8.0)
    g.link(decode, "images", video, "images")
    save = g.add("SaveVideo", (1280, 500), (330, 330), filename_prefix="video/CogVideoX-I2V", format="auto",
                 codec="auto")
    g.link(video, "VIDEO", save, "video")
    return g


def core_loaders() -> Graph:
    """Core loaders and text encode, our parallel sampler, core VAE Decode (ComfyUI with native CogVideoX)."""
    g = Graph("cogvideox_t2v_core_loaders")
    g.add("MarkdownNote", (0, 0), (430, 700), title="Read me: core loaders", text=CORE_NOTE)
    unet = g.add("UNETLoader", (460, 0), (360, 90), unet_name="CogVideoX_5b_bf16.safetensors",
                 weight_dtype="default")
    clip = g.add("CLIPLoader", (460, 130), (360, 110), clip_name="t5xxl_fp16.safetensors", type="cogvideox",
                 device="default")
    vae = g.add("VAELoader", (460, 280), (360, 60), vae_name="cogvideox_vae_bf16.safetensors")
    parallel = g.add("XDiTCogVideoParallelConfig", (460, 380), (360, 160), devices="auto", cfg="auto",
                     ulysses="auto", ring="auto", memory="auto")
    positive = g.add("CLIPTextEncode", (850, 0), (400, 220), title="Positive prompt", text=PROMPT)
    negative = g.add("CLIPTextEncode", (850, 250), (400, 140), title="Negative prompt", text="")
    g.link(clip, "CLIP", positive, "clip")
    g.link(clip, "CLIP", negative, "clip")
    sampler = g.add("XDiTCogVideoSampler", (1280, 0), (330, 450), width=720, height=480, frames=49, steps=50,
                    guidance=6.0, dynamic_cfg=True, seed=42, scheduler="default")
    g.link(unet, "MODEL", sampler, "model")
    g.link(positive, "CONDITIONING", sampler, "positive")
    g.link(negative, "CONDITIONING", sampler, "negative")
    g.link(parallel, "parallel", sampler, "parallel")
    decode = g.add("VAEDecode", (850, 430), (400, 50))
    g.link(sampler, "samples", decode, "samples")
    g.link(vae, "VAE", decode, "vae")
    video = g.add("CreateVideo", (850, 520), (400, 80), fps=8.0)
    g.link(decode, "IMAGE", video, "images")
    save = g.add("SaveVideo", (1280, 500), (330, 380), filename_prefix="video/CogVideoX-core", format="auto",
                 codec="auto")
    g.link(video, "VIDEO", save, "video")
    return g


def graphs() -> list[Graph]:
    return [t2v(True), i2v(), t2v(False), t2v(True, lora=True), core_loaders()]


def main() -> None:
    (HERE / "ui").mkdir(exist_ok=True)
    (HERE / "api").mkdir(exist_ok=True)
    examples = ROOT / "example_workflows"
    examples.mkdir(exist_ok=True)
    for old in list(examples.glob("*.json")) + list(examples.glob("*.jpg")):
        old.unlink()
    for graph in graphs():
        ui_path = HERE / "ui" / f"{graph.name}.json"
        ui_path.write_text(json.dumps(graph.ui(), indent=2) + "\n")
        (HERE / "api" / f"{graph.name}_api.json").write_text(json.dumps(graph.api, indent=2) + "\n")
        shutil.copyfile(ui_path, examples / f"{TITLES[graph.name]}.json")
        thumbnail(graph).save(examples / f"{TITLES[graph.name]}.jpg", quality=85, optimize=True)
        print("wrote", graph.name)
    picture, info = workflow_picture(t2v(True))
    picture.quantize(colors=64).save(ROOT / "docs" / "cogvideox_t2v_workflow.png", pnginfo=info, optimize=True)


if __name__ == "__main__":
    main()
