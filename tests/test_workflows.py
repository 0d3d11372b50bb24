"""Every shipped workflow parses and uses only existing nodes with valid inputs (UI and API format agree).

Our nodes are checked against their real schemas (loaded with ComfyUI stubbed at the boundary); the few core
nodes the workflows use are described below as ComfyUI 0.3.64's /object_info gives them (the COMFYUI_DIR test
checks the same files against a live server).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from comfy_stub import ROOT, comfy_stubs

UI_DIR, API_DIR, EXAMPLES = ROOT / "workflows" / "ui", ROOT / "workflows" / "api", ROOT / "example_workflows"
VIRTUAL = {"MarkdownNote", "Note"}
FILE_CHOICES = {"model", "vae", "text_encoder", "clip_name", "image", "lora_name", "unet_name", "vae_name"}
# Values only a ComfyUI with native CogVideoX (0.33+) offers; the workflow using them says so in its note.
NATIVE_COGVIDEOX = {("CLIPLoader", "type", "cogvideox")}

# (name, type, optional, options or (min, max) or None)
CORE = {
    "CreateVideo": ([("images", "IMAGE", False, None), ("fps", "FLOAT", False, (1.0, 120.0)),
                     ("audio", "AUDIO", True, None)], ["VIDEO"], 0),
    "SaveVideo": ([("video", "VIDEO", False, None), ("filename_prefix", "STRING", False, None),
                   ("format", "COMBO", False, ["auto", "mp4"]), ("codec", "COMBO", False, ["auto", "h264"])], [], 0),
    "CLIPLoader": ([("clip_name", "COMBO", False, None),
                    ("type", "COMBO", False, ["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi",
                                              "ltxv", "pixart", "cosmos", "lumina2", "wan", "hidream", "chroma",
                                              "ace", "omnigen2", "qwen_image", "hunyuan_image"]),
                    ("device", "COMBO", True, ["default", "cpu"])], ["CLIP"], 0),
    "LoadImage": ([("image", "COMBO", False, None)], ["IMAGE", "MASK"], 1),  # + the upload widget's value
    "CLIPTextEncode": ([("text", "STRING", False, None), ("clip", "CLIP", False, None)], ["CONDITIONING"], 0),
    "UNETLoader": ([("unet_name", "COMBO", False, None),
                    ("weight_dtype", "COMBO", False, ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"])],
                   ["MODEL"], 0),
    "VAELoader": ([("vae_name", "COMBO", False, None)], ["VAE"], 0),
    "VAEDecode": ([("samples", "LATENT", False, None), ("vae", "VAE", False, None)], ["IMAGE"], 0),
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    """node type -> (inputs [(name, type, optional, constraint)], output types, extra widget values, node class)"""
    with comfy_stubs(tmp_path_factory.mktemp("comfy")) as c:
        pkg = c.load_package("xdit_cogvideo_workflow_check")
        nodes = sys.modules[pkg.__name__ + ".nodes"]
        table = {name: (*spec, None) for name, spec in CORE.items()}
        for node in nodes.NODES:
            schema = node.GET_SCHEMA()
            inputs = []
            for spec in schema.inputs:
                constraint = spec.options if spec.io_type == "COMBO" else (
                    (spec.extra.get("min"), spec.extra.get("max")) if spec.io_type in ("INT", "FLOAT") else None)
                inputs.append((spec.id, spec.io_type, spec.optional, constraint))
                if spec.extra.get("control_after_generate"):
                    inputs.append((spec.id + ":control", "COMBO", False,
                                   ["fixed", "increment", "decrement", "randomize"]))
            table[schema.node_id] = (inputs, [o.io_type for o in schema.outputs], 0, node)
        yield table


def _check_value(node_type, name, type_, constraint, value):
    where = f"{node_type}.{name}={value!r}"
    if type_ == "COMBO":
        if name in FILE_CHOICES:
            assert isinstance(value, str) and value, where
        elif constraint is not None:
            assert value in constraint or (node_type, name, value) in NATIVE_COGVIDEOX, where
    elif type_ in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        if type_ == "INT":
            assert isinstance(value, int), where
        low, high = constraint or (None, None)
        assert (low is None or value >= low) and (high is None or value <= high), where
    elif type_ == "BOOLEAN":
        assert isinstance(value, bool), where
    elif type_ == "STRING":
        assert isinstance(value, str), where


def _validate_custom(specs, node_type, values):
    node = specs[node_type][3]
    if node is None or "validate_inputs" not in vars(node):
        return
    import inspect

    params = inspect.signature(node.validate_inputs).parameters
    args = {k: v for k, v in values.items() if k in params and k not in FILE_CHOICES}
    result = node.validate_inputs(**args)
    assert result is True, f"{node_type}: {result}"


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json"))


def test_workflow_files_exist():
    assert [p.name for p in _files(UI_DIR)] == ["cogvideox_i2v.json", "cogvideox_t2v.json", "cogvideox_t2v_comfy_t5.json",
                                                "cogvideox_t2v_core_loaders.json", "cogvideox_t2v_lora.json"]
    assert [p.name for p in _files(API_DIR)] == [p.stem + "_api.json" for p in _files(UI_DIR)]
    build = _builder()
    # the template browser's copies are the same files, named by their titles (all it shows), each with a thumbnail
    assert sorted(p.stem for p in _files(EXAMPLES)) == sorted(build.TITLES.values())
    assert sorted(p.stem for p in EXAMPLES.glob("*.jpg")) == sorted(build.TITLES.values())
    for path in _files(UI_DIR):
        assert (EXAMPLES / f"{build.TITLES[path.stem]}.json").read_bytes() == path.read_bytes()
    assert not list((ROOT / "workflows").glob("*.json")), "JSON directly in workflows/ would be listed as templates"


@pytest.mark.parametrize("name", ["cogvideox_t2v", "cogvideox_i2v", "cogvideox_t2v_comfy_t5", "cogvideox_t2v_lora",
                                  "cogvideox_t2v_core_loaders"])
def test_template_thumbnails_are_small_title_cards_drawn_by_the_builder(name):
    from PIL import Image, ImageChops, ImageStat

    build = _builder()
    graph = next(g for g in build.graphs() if g.name == name)
    path = EXAMPLES / f"{build.TITLES[name]}.jpg"
    shipped = Image.open(path)
    assert shipped.format == "JPEG" and shipped.size == build.THUMBNAIL_SIZE and path.stat().st_size < 30_000
    drawn = build.thumbnail(graph)  # the same picture up to JPEG loss (and font rendering across Pillow versions)
    assert max(ImageStat.Stat(ImageChops.difference(drawn, shipped.convert("RGB"))).mean) < 6


@pytest.mark.parametrize("path", _files(UI_DIR), ids=lambda p: p.name)
def test_ui_workflow(path, specs):
    graph = json.loads(path.read_text())
    assert graph["version"] == 0.4 and graph["nodes"] and "links" in graph
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert graph["last_node_id"] >= max(nodes) and graph["last_link_id"] >= max((l[0] for l in graph["links"]), default=0)
    notes = [n for n in graph["nodes"] if n["type"] in VIRTUAL]
    assert notes and any("models/CogVideo" in n["widgets_values"][0] for n in notes), "a note says where models go"
    needs_native = False
    links = {l[0]: l for l in graph["links"]}
    for node in graph["nodes"]:
        if node["type"] in VIRTUAL:
            continue
        assert node["type"] in specs, f"unknown node type {node['type']}"
        inputs, outputs, extra, _ = specs[node["type"]]
        sockets = [i for i in inputs if i[1] not in WIDGET_TYPES]
        widgets = [i for i in inputs if i[1] in WIDGET_TYPES]
        by_name = {i[0]: i for i in sockets}
        for slot in node["inputs"]:
            assert slot["name"] in by_name, f"{node['type']} has no socket {slot['name']}"
            assert slot["type"] == by_name[slot["name"]][1]
        linked = {s["name"] for s in node["inputs"] if s["link"] is not None}
        missing = [s[0] for s in sockets if not s[2] and s[0] not in linked]
        assert not missing, f"{node['type']} #{node['id']}: required inputs not connected: {missing}"
        assert [o["type"] for o in node["outputs"]] == outputs
        assert len(node["widgets_values"]) == len(widgets) + extra, f"{node['type']} widgets_values"
        values = dict(zip([w[0] for w in widgets], node["widgets_values"]))
        needs_native |= any((node["type"], k, v) in NATIVE_COGVIDEOX for k, v in values.items())
        for name, type_, _, constraint in widgets:
            _check_value(node["type"], name, type_, constraint, values[name])
        _validate_custom(specs, node["type"], values)
        for slot_index, slot in enumerate(node["inputs"]):
            if slot["link"] is not None:
                link = links[slot["link"]]
                assert (link[3], link[4]) == (node["id"], slot_index), f"link {link} target"
                source = nodes[link[1]]
                assert link[0] in source["outputs"][link[2]]["links"]
                assert link[5] == source["outputs"][link[2]]["type"], f"link {link} type"
                assert link[5] in slot["type"].split(","), f"link {link} type"  # multi-type sockets: "A,B"
    if needs_native:
        assert any("native CogVideoX (0.33" in n["widgets_values"][0] for n in notes), "say which ComfyUI it needs"


@pytest.mark.parametrize("path", _files(API_DIR), ids=lambda p: p.name)
def test_api_workflow(path, specs):
    prompt = json.loads(path.read_text())
    assert prompt and all(isinstance(k, str) for k in prompt)
    outputs = 0
    for node_id, node in prompt.items():
        assert node["class_type"] in specs and node["class_type"] not in VIRTUAL
        inputs, _, _, _ = specs[node["class_type"]]
        outputs += node["class_type"] in ("SaveVideo", "XDiTCogVideoSaveVideo")
        given = node["inputs"]
        declared = {i[0]: i for i in inputs if not i[0].endswith(":control")}
        assert set(given) <= set(declared), f"{node['class_type']}: unknown inputs {set(given) - set(declared)}"
        for name, type_, optional, constraint in declared.values():
            if name not in given:
                assert optional, f"{node['class_type']} #{node_id}: missing required input {name}"
                continue
            value = given[name]
            if type_ in WIDGET_TYPES and not isinstance(value, list):
                _check_value(node["class_type"], name, type_, constraint, value)
            else:
                assert isinstance(value, list) and len(value) == 2, f"{name} must be a link [node_id, slot]"
                source = prompt[value[0]]
                assert specs[source["class_type"]][1][value[1]] in type_.split(","), f"{node_id}.{name} type"
        _validate_custom(specs, node["class_type"], {k: v for k, v in given.items() if not isinstance(v, list)})
    assert outputs == 1


@pytest.mark.parametrize("path", _files(UI_DIR), ids=lambda p: p.name)
def test_ui_and_api_formats_describe_the_same_graph(path, specs):
    graph = json.loads(path.read_text())
    prompt = json.loads((API_DIR / f"{path.stem}_api.json").read_text())
    real = [n for n in graph["nodes"] if n["type"] not in VIRTUAL]
    assert {str(n["id"]) for n in real} == set(prompt)
    for node in real:
        api = prompt[str(node["id"])]
        assert api["class_type"] == node["type"]
        widgets = [i[0] for i in specs[node["type"]][0] if i[1] in WIDGET_TYPES]
        values = dict(zip(widgets, node["widgets_values"]))
        for name, value in values.items():
            if not name.endswith(":control"):
                assert api["inputs"][name] == value, f"{node['type']}.{name}"
    ui_edges = {(str(l[1]), l[2], str(l[3]), next(s["name"] for s in graph["nodes"][[n["id"] for n in graph["nodes"]].index(l[3])]["inputs"] if s["link"] == l[0])) for l in graph["links"]}
    api_edges = {(v[0], v[1], k, name) for k, n in prompt.items() for name, v in n["inputs"].items() if isinstance(v, list)}
    assert ui_edges == api_edges


def _builder():
    spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "workflows" / "build_workflows.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


def test_builder_reproduces_the_shipped_files():
    build = _builder()
    for graph in build.graphs():
        assert json.loads((UI_DIR / f"{graph.name}.json").read_text()) == graph.ui()
        assert json.loads((API_DIR / f"{graph.name}_api.json").read_text()) == graph.api


def test_readme_picture_carries_the_workflow_as_comfyui_saves_it():
    from PIL import Image

    picture = Image.open(ROOT / "docs" / "cogvideox_t2v_workflow.png")
    assert picture.format == "PNG" and (ROOT / "docs" / "cogvideox_t2v_workflow.png").stat().st_size < 60_000
    assert json.loads(picture.text["workflow"]) == json.loads((UI_DIR / "cogvideox_t2v.json").read_text())
    assert json.loads(picture.text["prompt"]) == json.loads((API_DIR / "cogvideox_t2v_api.json").read_text())
    assert "cogvideox_t2v_workflow.png" in (ROOT / "README.md").read_text()
