"""benchmarks/comfy_headless.{sh,py}: the headless ComfyUI job's own logic (the workflow it queues, its failures).

The whole run needs the carried ComfyUI tarball and wheels (.comfy/, never committed); its CPU proof is described
in BENCHMARKS.md. Here: the rewrite of the shipped workflow and the clear, quick failures.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "comfy_headless.sh"
DRIVER = ROOT / "benchmarks" / "comfy_headless.py"


def _driver():
    spec = importlib.util.spec_from_file_location("comfy_headless", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(**kw) -> Namespace:
    base = dict(devices="0,1", cfg="auto", ulysses="2", ring="auto", precision="bf16", attention="auto", steps=50,
                frames=49, height=480, width=720)
    return Namespace(**{**base, **kw})


def test_workflow_is_the_shipped_t2v_with_this_runs_settings():
    driver = _driver()
    shipped = json.loads(driver.WORKFLOW.read_text())
    prompt = driver.build_workflow(_args(devices="cpu:2", precision="fp32", steps=3, frames=9, height=48, width=64),
                                   "tiny-2b", 43)
    inputs = {node["class_type"]: node["inputs"] for node in prompt.values()}
    assert inputs["XDiTCogVideoModelLoader"]["model"] == "tiny-2b"
    assert inputs["XDiTCogVideoModelLoader"]["precision"] == "fp32"
    assert inputs["XDiTCogVideoParallelConfig"]["devices"] == "cpu:2"
    assert inputs["XDiTCogVideoParallelConfig"]["ulysses"] == "2"
    sampler = inputs["XDiTCogVideoSampler"]
    assert (sampler["steps"], sampler["frames"], sampler["height"], sampler["width"], sampler["seed"]) == \
        (3, 9, 48, 64, 43)
    # everything else (graph links, prompt text, T5 from the model folder) is the shipped workflow's
    assert set(prompt) == set(shipped)
    for key, node in shipped.items():
        assert prompt[key]["class_type"] == node["class_type"]
        for name, value in node["inputs"].items():
            if isinstance(value, list) or name in ("prompt", "text_encoder", "vae"):
                assert prompt[key]["inputs"][name] == value


def test_workflow_without_the_expected_nodes_is_a_clear_error(tmp_path, monkeypatch):
    driver = _driver()
    broken = json.loads(driver.WORKFLOW.read_text())
    del broken[next(k for k, v in broken.items() if v["class_type"] == "SaveVideo")]
    (tmp_path / "w.json").write_text(json.dumps(broken))
    monkeypatch.setattr(driver, "WORKFLOW", tmp_path / "w.json")
    with pytest.raises(driver.Failure, match="no SaveVideo node"):
        driver.build_workflow(_args(), "m", 42)


def test_script_rejects_unknown_arguments_and_a_missing_carry(tmp_path):
    bad = subprocess.run(["bash", str(SCRIPT), "--gpus", "0,1"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown argument '--gpus'" in bad.stdout
    missing = subprocess.run(["bash", str(SCRIPT), "--carry", str(tmp_path / "nothing"), "--root", str(tmp_path),
                              "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1
    assert "COMFY HEADLESS FAILED: no " in missing.stdout and "comfyui-0.33.0.tar.xz" in missing.stdout


def _run_driver(tmp_path, comfy: Path, port: int, timeout: float = 120):
    return subprocess.run(
        [sys.executable, str(DRIVER), "--comfy", str(comfy), "--model-name", "m", "--front-end-root", str(tmp_path),
         "--devices", "cpu:2", "--port", str(port), "--timeout", str(timeout), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=timeout + 30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_driver_refuses_a_busy_port(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        result = _run_driver(tmp_path, tmp_path, s.getsockname()[1])
    assert result.returncode == 1 and "is already in use" in result.stdout


def test_driver_reports_a_comfyui_that_dies_at_start(tmp_path):
    comfy = tmp_path / "comfy"
    comfy.mkdir()
    (comfy / "main.py").write_text("import sys\nprint('no torch here')\nsys.exit(3)\n")
    started = time.monotonic()
    result = _run_driver(tmp_path, comfy, _free_port())
    assert result.returncode == 1
    assert "ComfyUI exited with 3 while starting" in result.stdout and "no torch here" in result.stdout
    assert time.monotonic() - started < 60
    summary = json.loads((tmp_path / "out" / "comfy_headless.json").read_text())
    assert "exited with 3" in summary["error"] and summary["jobs"] == [] and summary["leftover_killed"] == []
