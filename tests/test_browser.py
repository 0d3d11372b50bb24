"""The shipped UI workflow in a real headless browser against a real ComfyUI, with the pool panel open.

Runs only when COMFYUI_DIR is set and Chromium (CHROMIUM, default /usr/bin/chromium), Node.js and the npm package
playwright-core (found through NODE_PATH) are available. Screenshots go to XDIT_SCREENSHOT_DIR (e.g. ``docs``) when
set, else to a temp folder:

    COMFYUI_DIR=... COMFYUI_PYTHON=... NODE_PATH=/path/to/node_modules XDIT_SCREENSHOT_DIR=docs \
        pytest tests/test_browser.py
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfy_stub import comfy_stubs
from test_comfyui_server import COMFYUI_DIR, PACKAGE, ROOT, Server, _free_port, _mp4_info

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def _playwright_ok() -> bool:
    if not COMFYUI_DIR or not shutil.which("node") or not os.path.exists(CHROMIUM):
        return False
    probe = subprocess.run(["node", "-e", "require.resolve('playwright-core')"], capture_output=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _playwright_ok(),
                                reason="needs COMFYUI_DIR, Chromium, Node.js and playwright-core on NODE_PATH")

FLOW = r"""
const { chromium } = require('playwright-core');
const cfg = JSON.parse(require('fs').readFileSync(process.argv[2], 'utf8'));
const out = { ourErrors: [], pageErrors: [] };
(async () => {
  const browser = await chromium.launch({ executablePath: cfg.chromium, headless: true, args: ['--no-sandbox',
    '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'] });
  try {
    const page = await browser.newPage({ viewport: { width: 1600, height: 900 } });
    page.on('pageerror', (e) => { out.pageErrors.push(e.message); if (String(e.stack).includes('xdit')) out.ourErrors.push(String(e.stack)); });
    page.on('console', (m) => { if (m.type() === 'error' && /xdit/i.test(m.text())) out.ourErrors.push(m.text()); });
    await page.goto(cfg.url, { waitUntil: 'networkidle' });
    await page.waitForFunction(() => window.app && window.app.graph && window.app.extensionManager, null, { timeout: 90000 });
    await page.keyboard.press('Escape');  // the first-run template dialog
    await page.waitForTimeout(300);
    out.extensionLoaded = await page.evaluate(() => window.app.extensions.some((e) => e.name === 'xdit.cogvideo.pool'));
    // files dropped on ComfyUI: the README's picture (PNG text chunks) and an mp4 from our Save MP4 (container tags)
    const drop = (b64, name, type, probe) => page.evaluate(async ({ b64, name, type, probe }) => {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      await window.app.handleFile(new File([bytes], name, { type }));
      await new Promise((r) => setTimeout(r, 800));
      const node = window.app.graph.nodes.find((n) => n.type === probe);
      return { types: window.app.graph.nodes.map((n) => n.type).sort(), text: node?.widgets?.[0]?.value ?? null };
    }, { b64, name, type, probe });
    out.droppedPng = await drop(cfg.png, 'cogvideox_t2v_workflow.png', 'image/png', 'XDiTCogVideoTextEncodeModelT5');
    out.droppedMp4 = await drop(cfg.mp4, 'CogVideoX_00001_.mp4', 'video/mp4', 'XDiTCogVideoTextEncodeModelT5');
    await page.evaluate(() => document.querySelectorAll('.p-toast-close-button').forEach((b) => b.click()));
    await page.waitForTimeout(500);
    // the shipped workflow as a user drops it: its model (CogVideoX-2b) is not installed here
    await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, cfg.shipped);
    await page.waitForTimeout(1500);
    out.missingFlags = await page.evaluate(() => window.app.graph.nodes.filter((n) => n.xditMissingModel).map((n) => n.xditMissingModel));
    out.missingToast = await page.evaluate(() => [...document.querySelectorAll('.p-toast-message')].map((e) => e.textContent).join(' | '));
    out.savedFlag = await page.evaluate(() => JSON.stringify(window.app.graph.serialize()).includes('xditMissingModel'));
    await page.screenshot({ path: cfg.shots + '/missing.png' });
    await page.evaluate(() => document.querySelectorAll('.p-toast-close-button').forEach((b) => b.click()));
    await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, cfg.workflow);
    await page.waitForTimeout(500);
    out.flagsAfter = await page.evaluate(() => window.app.graph.nodes.filter((n) => n.xditMissingModel).length);
    out.nodeTypes = await page.evaluate(() => window.app.graph.nodes.map((n) => n.type).sort());
    await page.click('.xdit-cogvideo-pool-tab-button');
    await page.waitForSelector('.xdit-cogvideo-panel .xdit-state', { timeout: 20000 });
    out.panelBefore = await page.textContent('.xdit-cogvideo-panel');
    const buttons = () => page.evaluate(() => Object.fromEntries(['refresh', 'stop'].map((k) => {
      const b = document.querySelector('.xdit-cogvideo-panel .xdit-' + k), st = getComputedStyle(b);
      return [k, { disabled: b.disabled, opacity: +st.opacity, cursor: st.cursor, border: st.borderStyle }];
    })));
    out.buttonsBefore = await buttons();
    await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView'));
    await page.waitForTimeout(500);
    await page.evaluate(() => {
      const ds = window.app.canvas.ds;  // keep the graph clear of the open sidebar panel
      const left = document.querySelector('.xdit-cogvideo-panel')?.getBoundingClientRect().right ?? 0;
      ds.scale *= 0.95;
      ds.offset[0] += left / 2 / ds.scale;
      ds.offset[1] += 40 / ds.scale;
      window.app.canvas.setDirty(true, true);
    });
    await page.waitForTimeout(500);
    // run it as a user does (Run button = app.queuePrompt); the graph is converted to API format by the frontend
    await page.evaluate(() => {
      const api = window.comfyAPI.api.api;
      window.__xdit = { done: null };
      for (const type of ['execution_success', 'execution_error', 'execution_interrupted'])
        api.addEventListener(type, (e) => { window.__xdit.done = { type, detail: e.detail }; });
      window.app.queuePrompt(0, 1);
    });
    await page.waitForFunction(() => {
      const live = document.querySelector('.xdit-cogvideo-panel .xdit-live');
      const m = live && live.textContent.match(/sample\s+(\d+)\/(\d+)/);
      return (m && +m[1] >= 5 && document.querySelector('.xdit-cogvideo-panel .xdit-ranks')) || window.__xdit.done;
    }, null, { timeout: 180000, polling: 100 });
    out.panelRunning = await page.textContent('.xdit-cogvideo-panel');
    out.buttonsRunning = await buttons();
    await page.screenshot({ path: cfg.shots + '/running.png' });
    await page.waitForFunction(() => window.__xdit.done, null, { timeout: 300000 });
    out.result = await page.evaluate(() => window.__xdit.done);
    await page.waitForFunction(() => /idle/.test(document.querySelector('.xdit-cogvideo-panel .xdit-state')?.textContent || ''),
                               null, { timeout: 30000 });
    await page.waitForTimeout(1500);  // the video preview on Save Video
    out.panelDone = await page.textContent('.xdit-cogvideo-panel');
    await page.screenshot({ path: cfg.shots + '/done.png' });
  } finally {
    console.log('RESULT ' + JSON.stringify(out));
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_path):
    base = tmp_path_factory.mktemp("comfy-browser")
    for sub in ("custom_nodes", "models/CogVideo", "input", "output"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACKAGE
    link.symlink_to(ROOT, target_is_directory=True)
    (base / "models" / "CogVideo" / "tiny-2b").symlink_to(tiny_path("2b"), target_is_directory=True)
    srv = Server(base, _free_port())
    try:
        srv.wait_ready()
        srv.request("/settings/Comfy.TutorialCompleted", True, method="POST")  # no first-run template dialog
        srv.request("/settings/Comfy.Minimap.Visible", False, method="POST")
        yield srv
    finally:
        srv.stop()
        link.unlink()


def _shrink(path: Path) -> None:
    """Screenshots as 256-colour PNGs: a fraction of the size, still crisp for UI."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


MARK = "a lighthouse keeper's cat watching the storm (restored from the mp4)"


def shipped_prompt(workflow: dict) -> str:
    return next(n for n in workflow["nodes"] if n["type"] == "XDiTCogVideoTextEncodeModelT5")["widgets_values"][0]


def test_ui_workflow_runs_in_browser_with_panel(server, tmp_path):
    workflow = json.loads((ROOT / "workflows" / "ui" / "cogvideox_t2v.json").read_text())
    for node in workflow["nodes"]:  # tiny model, small video, enough steps to watch progress
        if node["type"] == "XDiTCogVideoModelLoader":
            node["widgets_values"][0], node["widgets_values"][3] = "tiny-2b", "fp32"
        elif node["type"] == "XDiTCogVideoSampler":
            node["widgets_values"][:4] = [48, 32, 9, 60]
        elif node["type"] == "XDiTCogVideoTextEncodeModelT5":
            node["widgets_values"][0] = "A golden retriever runs along a sunny beach at sunset."
    shots = Path(os.environ.get("XDIT_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "config.json"
    shipped = json.loads((ROOT / "workflows" / "ui" / "cogvideox_t2v.json").read_text())
    marked = json.loads(json.dumps(workflow))
    next(n for n in marked["nodes"] if n["type"] == "XDiTCogVideoTextEncodeModelT5")["widgets_values"][0] = MARK
    mp4 = tmp_path / "ours.mp4"
    with comfy_stubs(tmp_path / "comfy") as c:  # the Save MP4 node's writer, as it runs inside ComfyUI
        video = sys.modules[c.load_package("xdit_browser_check").__name__ + ".nodes.video"]
        video.write_mp4(torch.rand(5, 32, 48, 3), str(mp4), fps=8, metadata={"prompt": {}, "workflow": marked})
    config.write_text(json.dumps({
        "chromium": CHROMIUM, "url": server.url + "/", "workflow": workflow, "shipped": shipped, "shots": str(tmp_path),
        "png": base64.b64encode((ROOT / "docs" / "cogvideox_t2v_workflow.png").read_bytes()).decode(),
        "mp4": base64.b64encode(mp4.read_bytes()).decode()}))
    script = tmp_path / "flow.js"
    script.write_text(FLOW)
    run = subprocess.run(["node", str(script), str(config)], capture_output=True, text=True, timeout=600)
    lines = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, run.stdout[-3000:] + run.stderr[-3000:]
    out = json.loads(lines[-1][7:])
    assert run.returncode == 0, (out, run.stderr[-3000:])
    assert out["extensionLoaded"] and out["ourErrors"] == []
    assert "Not started" in out["panelBefore"]
    # ComfyUI's own file loader finds the workflow in the README's picture and in our mp4
    assert "XDiTCogVideoSampler" in out["droppedPng"]["types"] and out["droppedPng"]["text"] == shipped_prompt(shipped)
    assert "XDiTCogVideoSampler" in out["droppedMp4"]["types"] and out["droppedMp4"]["text"] == MARK
    # a missing model is marked on load, with what to download and where, and nothing of it is saved
    assert out["missingFlags"] == ["CogVideoX-2b"] and out["flagsAfter"] == 0 and not out["savedFlag"]
    assert "CogVideoX-2b" in out["missingToast"] and "models/CogVideo/CogVideoX-2b" in out["missingToast"]
    assert "Installed now: tiny-2b" in out["missingToast"]
    # the disabled Stop does not look like the enabled Refresh
    refresh, stop = out["buttonsBefore"]["refresh"], out["buttonsBefore"]["stop"]
    assert stop["disabled"] and not refresh["disabled"] and not out["buttonsRunning"]["stop"]["disabled"]
    assert stop["opacity"] <= 0.5 < refresh["opacity"] and stop["cursor"] == "not-allowed" != refresh["cursor"]
    assert "XDiTCogVideoSampler" in out["nodeTypes"] and "MarkdownNote" in out["nodeTypes"]
    assert out["result"]["type"] == "execution_success", out["result"]
    assert "rank 0" in out["panelRunning"]
    # one story while a job runs: the job named once with its step, no rank called idle
    running = " ".join(out["panelRunning"].split())
    assert re.search(r"current job sample \d+/60", running) and not re.search(r"sample\s*·\s*sample", running), running
    assert "busy" in running and " idle" not in running, running
    assert "idle" in out["panelDone"] and "tiny-2b" in out["panelDone"]
    videos = sorted((server.base / "output" / "video").glob("CogVideoX_*.mp4"))
    assert videos and _mp4_info(videos[-1]) == ((48, 32), 9)
    for name, target in (("running.png", "comfyui_t2v_running.png"), ("done.png", "comfyui_t2v_done.png"),
                         ("missing.png", "comfyui_missing_model.png")):
        _shrink(tmp_path / name)
        if shots != tmp_path:
            shutil.copyfile(tmp_path / name, shots / target)
