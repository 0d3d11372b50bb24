"""One headless ComfyUI job through our nodes, as a user runs it: start ComfyUI, queue the shipped T2V API
workflow over POST /prompt, follow it on the websocket and /history, check the mp4, stop everything.

Run by benchmarks/comfy_headless.sh (which unpacks ComfyUI and sets PYTHONPATH); stdlib + aiohttp (ComfyUI's
own dependency) + av (core SaveVideo's) + psutil. Exit status 0 only when every job succeeded, the video has the
asked frames and size, and no ComfyUI or pool process is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "api" / "cogvideox_t2v_api.json"
MAX_COPY = 15 << 20  # what comes back from the device machine: 16 MiB a file


class Failure(Exception):
    """A step that did not work; the message is printed as the script's one-line reason."""


def log(message: str) -> None:
    print(f"[comfy-headless {time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_workflow(args, model_name: str, seed: int) -> dict:
    """The shipped T2V workflow with this run's model, devices, precision, size, frames and steps."""
    prompt = json.loads(WORKFLOW.read_text())
    by_class = {node["class_type"]: node["inputs"] for node in prompt.values()}
    for needed in ("XDiTCogVideoModelLoader", "XDiTCogVideoParallelConfig", "XDiTCogVideoSampler", "SaveVideo"):
        if needed not in by_class:
            raise Failure(f"{WORKFLOW} has no {needed} node; this script expects the shipped T2V workflow")
    by_class["XDiTCogVideoModelLoader"].update(model=model_name, precision=args.precision, attention=args.attention)
    by_class["XDiTCogVideoParallelConfig"].update(devices=args.devices, cfg=args.cfg, ulysses=args.ulysses,
                                                  ring=args.ring)
    by_class["XDiTCogVideoSampler"].update(width=args.width, height=args.height, frames=args.frames,
                                           steps=args.steps, seed=seed)
    by_class["SaveVideo"]["filename_prefix"] = "video/headless"
    return prompt


class Server:
    """ComfyUI in its own process group, with the HTTP calls this script needs."""

    def __init__(self, args):
        self.args, self.url = args, f"http://127.0.0.1:{args.port}"
        self.log_path = Path(args.out) / "comfyui.log"
        command = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(args.port),
                   "--disable-auto-launch", "--front-end-root", args.front_end_root]
        if args.devices.startswith("cpu"):
            command.append("--cpu")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        log("starting: " + " ".join(command))
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(command, cwd=args.comfy, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self.workers: set[int] = set()

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def request(self, path: str, body=None, timeout: float = 30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw[:1] in (b"{", b"[") else raw)
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, (json.loads(raw) if raw[:1] in (b"{", b"[") else raw)

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Failure(f"ComfyUI exited with {self.proc.returncode} while starting; log tail:\n{self.tail()}")
            try:
                if self.request("/object_info/XDiTCogVideoSampler", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise Failure(f"ComfyUI did not answer /object_info/XDiTCogVideoSampler in time; log tail:\n{self.tail()}")

    def pool_status(self) -> dict:
        try:
            status, body = self.request("/xdit_cogvideo/status", timeout=10)
        except OSError as error:
            return {"error": str(error)}
        if status == 200 and isinstance(body, dict):
            self.workers.update(r["pid"] for r in body.get("ranks") or [] if r.get("pid"))
            return body
        return {"error": f"HTTP {status}"}

    def _children(self) -> set[int]:
        try:
            import psutil

            return {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except Exception:  # psutil absent or ComfyUI gone: the pool's own pid list still holds the workers
            return set()

    def stop(self) -> list[int]:
        """Stop the pool (frees the GPUs), then ComfyUI; returns the pids that had to be killed."""
        if self.proc.poll() is None:
            self.pool_status()
            self.workers |= self._children()
            try:
                self.request("/xdit_cogvideo/shutdown", {}, timeout=10)
                # the route answers at once and the pool stops in the background: let it reap its workers and
                # remove its temporary folder before ComfyUI itself is ended
                end = time.monotonic() + 30
                while time.monotonic() < end and any(_alive(p) for p in self.workers):
                    time.sleep(0.3)
                time.sleep(1.0)
            except OSError:
                pass
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log_file.close()
        end = time.monotonic() + 30
        while time.monotonic() < end and any(_alive(p) for p in self.workers):
            time.sleep(0.3)
        killed = [p for p in self.workers if _alive(p)]
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        return killed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Events:
    """The websocket feed: our nodes' progress/job messages and ComfyUI's execution messages, time-stamped."""

    def __init__(self, url: str, client_id: str):
        self.url, self.client_id = url.replace("http", "ws", 1) + f"/ws?clientId={client_id}", client_id
        self.items: list[tuple[float, str, dict]] = []
        self.connected = threading.Event()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)
        self.thread.start()

    async def _listen(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.url, heartbeat=20) as ws:
                self.connected.set()
                while not self._stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.5)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        self.items.append((time.monotonic(), data.get("type", ""), data.get("data") or {}))
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        return

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)

    def since(self, t0: float, kind: str) -> list[tuple[float, dict]]:
        return [(t, d) for t, k, d in list(self.items) if t >= t0 and k == kind]


def step_timing(events: Events, t0: float, sampler_node: str) -> dict:
    """s/step of the sampler from the progress feed: the median gap between steps after the first two, and the
    engine's own figure from the last event."""
    stamps, own = [], None
    for t, d in events.since(t0, "xdit_cogvideo.progress"):
        if str(d.get("node")) == sampler_node and d.get("phase") == "sample" and d.get("total"):
            if not stamps or d["step"] != stamps[-1][1]:
                stamps.append((t, d["step"]))
            own = d.get("seconds_per_step") or own
    gaps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:]) if b[1] == a[1] + 1][2:]
    return {"s_per_step_feed": round(statistics.median(gaps), 4) if gaps else None,
            "s_per_step_engine": round(own, 4) if isinstance(own, (int, float)) else None,
            "steps_seen": len(stamps)}


def node_times(events: Events, t0: float, prompt: dict) -> dict:
    """Seconds each executed node took (ComfyUI's 'executing' messages: one node starts when the last ends; cached
    nodes send none), by class name."""
    starts = [(t, d.get("node")) for t, d in events.since(t0, "executing")]
    out = {}
    for (t, node), (t_next, _) in zip(starts, starts[1:]):
        if node is not None:
            name = prompt.get(str(node), {}).get("class_type", str(node))
            out[name] = round(out.get(name, 0) + t_next - t, 2)
    return out


def run_job(server: Server, events: Events, args, model_name: str, seed: int, deadline: float, index: int) -> dict:
    prompt = build_workflow(args, model_name, seed)
    (Path(args.out) / "workflow.json").write_text(json.dumps(prompt, indent=1))
    sampler_node = next(k for k, v in prompt.items() if v["class_type"] == "XDiTCogVideoSampler")
    t0 = time.monotonic()
    status, body = server.request("/prompt", {"prompt": prompt, "client_id": events.client_id})
    if status != 200:
        raise Failure(f"POST /prompt refused the workflow (HTTP {status}): {json.dumps(body)[:2000]}")
    prompt_id = body["prompt_id"]
    log(f"job {index}: queued {prompt_id} (seed {seed})")
    last_step = None
    while True:
        if time.monotonic() > deadline:
            raise Failure(f"job {index} did not finish before the time limit; pool: {server.pool_status()}; "
                          f"log tail:\n{server.tail()}")
        if server.proc.poll() is not None:
            raise Failure(f"ComfyUI exited with {server.proc.returncode} during job {index}; log tail:\n{server.tail()}")
        status, history = server.request(f"/history/{prompt_id}")
        entry = history.get(prompt_id) if status == 200 and isinstance(history, dict) else None
        if entry and entry["status"].get("completed") is not None and entry["status"].get("status_str") in (
                "success", "error"):
            break
        progress = [d for _, d in events.since(t0, "xdit_cogvideo.progress") if d.get("phase") == "sample"]
        if progress and progress[-1].get("step") != last_step and progress[-1].get("step") in (1, 10, 25, 40):
            last_step = progress[-1]["step"]
            log(f"job {index}: sampling step {last_step}/{progress[-1].get('total')}")
        time.sleep(0.25)
    wall = time.monotonic() - t0
    messages = entry["status"].get("messages") or []
    if entry["status"]["status_str"] != "success":
        errors = [m[1] for m in messages if m[0] == "execution_error"]
        detail = errors[0] if errors else messages
        raise Failure(f"job {index} failed in ComfyUI: {json.dumps(detail)[:3000]}")
    stamps = {m[0]: m[1].get("timestamp") for m in messages if isinstance(m[1], dict)}
    execution = None
    if stamps.get("execution_start") and stamps.get("execution_success"):
        execution = round((stamps["execution_success"] - stamps["execution_start"]) / 1000, 2)
    time.sleep(0.3)  # the last websocket messages of the job
    videos = [item for node in entry.get("outputs", {}).values() for items in node.values() if isinstance(items, list)
              for item in items if isinstance(item, dict) and str(item.get("filename", "")).endswith(".mp4")]
    if not videos:
        raise Failure(f"job {index} succeeded but produced no mp4: outputs {json.dumps(entry.get('outputs'))[:1500]}")
    video = Path(args.comfy) / "output" / videos[0].get("subfolder", "") / videos[0]["filename"]
    return {"job": index, "prompt_id": prompt_id, "seed": seed, "wall_s": round(wall, 2), "execution_s": execution,
            "nodes_s": node_times(events, t0, prompt), **step_timing(events, t0, sampler_node),
            "video": check_video(video, args), "pool": server.pool_status()}


def check_video(path: Path, args) -> dict:
    """Frames, size and codec of the saved mp4 (read with av, core SaveVideo's own library)."""
    import av

    if not path.is_file():
        raise Failure(f"the mp4 ComfyUI reported is not on disk: {path}")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        info = {"path": str(path), "bytes": path.stat().st_size, "frames": frames, "width": stream.width,
                "height": stream.height, "codec": stream.codec_context.name}
    if (frames, info["width"], info["height"]) != (args.frames, args.width, args.height):
        raise Failure(f"the mp4 has {frames} frames of {info['width']}x{info['height']}, asked for "
                      f"{args.frames} of {args.width}x{args.height}: {path}")
    if info["bytes"] <= MAX_COPY:
        shutil.copy(path, Path(args.out) / "headless.mp4")
    return info


def _terminated(*_) -> None:
    raise Failure("terminated (the outer time limit sent SIGTERM)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--comfy", required=True, help="the unpacked ComfyUI folder")
    p.add_argument("--model-name", required=True, help="the model's name under models/CogVideo")
    p.add_argument("--front-end-root", required=True)
    p.add_argument("--devices", default="0,1")
    p.add_argument("--cfg", default="auto")
    p.add_argument("--ulysses", default="auto")
    p.add_argument("--ring", default="auto")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--attention", default="auto")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--jobs", type=int, default=1, help="jobs in a row (seed 42, 43, ...): the first is cold")
    p.add_argument("--port", type=int, default=8188)
    p.add_argument("--timeout", type=float, default=540, help="seconds for everything, stop included")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    start = time.monotonic()
    deadline = start + args.timeout - 75  # leave time to stop the pool and ComfyUI
    signal.signal(signal.SIGTERM, _terminated)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", args.port)) == 0:
            log(f"FAILED: port {args.port} is already in use; pass another with --port")
            return 1
    result: dict = {"devices": args.devices, "model": args.model_name, "precision": args.precision,
                    "size": [args.frames, args.height, args.width], "steps": args.steps, "jobs": []}
    server = events = None
    code = 0
    try:
        server = Server(args)
        server.wait_ready(min(deadline, time.monotonic() + 300))
        result["comfyui_start_s"] = round(time.monotonic() - start, 2)
        log(f"ComfyUI answers after {result['comfyui_start_s']} s")
        events = Events(server.url, uuid.uuid4().hex)
        if not events.connected.wait(15):
            raise Failure("could not open ComfyUI's websocket")
        for i in range(args.jobs):
            job = run_job(server, events, args, args.model_name, 42 + i, deadline, i + 1)
            result["jobs"].append(job)
            pool = job["pool"]
            log(f"job {i + 1}: OK wall {job['wall_s']} s (execution {job['execution_s']} s), "
                f"s/step {job['s_per_step_feed']} (engine {job['s_per_step_engine']}), nodes {job['nodes_s']}")
            layout = pool.get("layout") or [None] * 3
            log(f"job {i + 1}: pool devices {pool.get('devices')} backend {pool.get('backend')} world "
                f"{pool.get('world_size')} layout cfg{layout[0]} x ulysses{layout[1]} x ring{layout[2]}; "
                f"model {pool.get('model')}")
            v = job["video"]
            log(f"job {i + 1}: video {v['frames']} frames {v['width']}x{v['height']} {v['codec']} {v['bytes']} bytes")
    except Failure as error:
        log(f"FAILED: {error}")
        result["error"] = str(error)
        code = 1
    except Exception as error:  # anything unexpected still stops ComfyUI and reports
        log(f"FAILED: {type(error).__name__}: {error}")
        result["error"] = f"{type(error).__name__}: {error}"
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if events is not None:
            events.close()
        if server is not None:
            killed = server.stop()
            result["leftover_killed"] = killed
            if killed:
                log(f"FAILED: pool processes {killed} outlived ComfyUI by 30 s and were killed")
                code = 1
            else:
                log(f"ComfyUI and {len(server.workers)} pool processes stopped")
        result["total_s"] = round(time.monotonic() - start, 2)
        (Path(args.out) / "comfy_headless.json").write_text(json.dumps(result, indent=1))
    log(("OK" if code == 0 else "FAILED") + f" in {result['total_s']} s; result in {args.out}/comfy_headless.json")
    return code


if __name__ == "__main__":
    sys.exit(main())
