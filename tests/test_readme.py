"""The README's Python API snippets run as written (tiny on one CPU rank in place of the 5b on four GPUs) and its
set-up commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_api_snippets() -> list[str]:
    section = README.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.timeout(400)
def test_python_api_snippets_run_as_written(tiny_path, tmp_path, monkeypatch):
    from comfyui_xdit_cogvideo.pool import registry, shutdown_pool
    from comfyui_xdit_cogvideo.video import read_video

    snippets = _python_api_snippets()
    assert len(snippets) == 2
    pool_snippet, engine_snippet = snippets
    substitutions = {'get_pool("0,1,2,3")': 'get_pool("cpu:1")', '"/models/CogVideoX-5b"': '"tiny"',
                     "steps=50": "steps=2", 'dtype="bf16"': 'dtype="fp32"'}
    for old, new in substitutions.items():
        assert old in pool_snippet, old  # the README still shows what this test replaces
        pool_snippet = pool_snippet.replace(old, new)
    tiny_path("2b")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    try:
        exec(compile(pool_snippet, "README.md (pool)", "exec"), namespace)
        exec(compile(engine_snippet, "README.md (engine)", "exec"), namespace)
    finally:
        shutdown_pool()
    frames, meta = read_video(tmp_path / "fox.mp4")
    assert frames.shape == (49, 32, 48, 3) and round(meta["fps"]) == 8
    assert tuple(namespace["frames"].shape) == (9, 32, 48, 3)  # the engine snippet's own decode
    assert registry._POOL is None


def test_ci_runs_the_readme_commands():
    block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).splitlines()
    install_and_generate, install_and_test = block[0], block[1]
    assert "-c constraints.txt" in install_and_generate and "-c constraints.txt" in install_and_test
    assert install_and_test.endswith("python -m pytest -q tests")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "sed -n" in ci and "README.md" in ci  # CI reads the two commands from the README, it does not copy them
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert {"torch", "diffusers", "transformers", "yunchang", "pytest"} <= set(pins)


def test_requirements_txt_keeps_in_step_with_pyproject():
    """ComfyUI-Manager installs requirements.txt: the same ranges as pyproject.toml, torch left to ComfyUI."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared, extras = project["dependencies"], project["optional-dependencies"]
    required = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
                if line and not line.startswith("#")]
    # ComfyUI-Manager's route brings the fast attention kernel too (issue 17), behind the same platform marker
    assert required == [d for d in declared if not d.startswith("torch")] + extras["fast"]
    assert "torch>=2.6,<2.15" in declared
    assert all("<" in d for d in declared + [r for e in extras.values() for r in e]), "every dependency has an upper bound"


def test_the_fast_extra_installs_only_where_it_runs_and_never_in_ci():
    """flash-attn-4 and its CuTe DSL (hundreds of MB) on Linux x86-64 only; the CPU CI's `.[test]` never pulls it."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (fast,), (cu13,) = (Requirement(r) for r in extras["fast"]), (Requirement(r) for r in extras["fast-cu13"])
    assert fast.name == cu13.name == "flash-attn-4" and cu13.extras == {"cu13"} and fast.specifier.prereleases
    platforms = {("linux", "x86_64"): True, ("linux", "aarch64"): False, ("darwin", "arm64"): False,
                 ("win32", "AMD64"): False}
    for (system, machine), wanted in platforms.items():
        env = {"sys_platform": system, "platform_machine": machine}
        assert fast.marker.evaluate(env) is wanted and cu13.marker.evaluate(env) is wanted, (system, machine)
    assert not any("flash" in r or "cutlass" in r for r in extras["test"])
    assert "-e \".[test]\"" in README.split("```bash\n", 1)[1].splitlines()[0]  # what CI installs
