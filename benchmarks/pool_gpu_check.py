"""Pool check on one CUDA GPU: CLI-free pool job, resident model, equality with the in-process engine, tiled
decode, kill -9 recovery. Run on the GPU machine (log: benchmarks/results/2026-11-29-h200/pool_gpu_check.log)."""
import os, time, json, signal, threading
os.environ.setdefault("XDIT_COGVIDEO_CACHE", "/tmp/xdc")
os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "backend:cudaMallocAsync"   # what ComfyUI sets for itself
import torch, psutil
from comfyui_xdit_cogvideo.pool import WorkerPool, ModelSpec, WorkerError
from comfyui_xdit_cogvideo import GenerationRequest
from comfyui_xdit_cogvideo.engine import CogVideoEngine
from comfyui_xdit_cogvideo.vae_parallel import decode_latents
print("torch", torch.__version__, "gpus", torch.cuda.device_count(), flush=True)
pool = WorkerPool("auto")
print("devices", pool.devices, pool.devices.backend, flush=True)
t = time.time(); pool.start(); print("start s", round(time.time() - t, 2), flush=True)
spec = ModelSpec("tiny-5b", "bf16", "auto")
req = GenerationRequest(prompt="a cat playing piano", steps=4, seed=7)
events = []
t = time.time(); lat = pool.generate(spec, req, on_event=lambda e: events.append((e.phase, e.step, e.total, e.seconds_per_step))); dt = time.time() - t
print("pool generate s", round(dt, 2), "events", events, flush=True)
t = time.time(); lat2 = pool.generate(spec, req); print("second job s", round(time.time() - t, 2), "loads", pool.status()["loads"], flush=True)
eng = CogVideoEngine("tiny-5b", dtype="bf16", device="cuda", attention="auto")
ref = eng.generate(req)
print("attention", eng.attention, "pool vs in-process maxdiff", (lat.float() - ref.float()).abs().max().item(), "ref max", ref.float().abs().max().item(), "repeat maxdiff", (lat.float() - lat2.float()).abs().max().item(), flush=True)
fr = pool.decode(spec, lat, frames=9, tiled=True)
fr_ref = decode_latents(eng.vae, lat, frames=9, tiled=True)
print("decode", tuple(fr.shape), "maxdiff", (fr - fr_ref).abs().max().item(), flush=True)
st = pool.status()
print("status", json.dumps(st)[:1200], flush=True)
pid = st["ranks"][0]["pid"]
def killer():
    while not (pool.status()["job"] and (pool.status()["job"].get("step") or 0) >= 2): time.sleep(0.01)
    os.kill(pid, signal.SIGKILL); print("killed", pid, flush=True)
threading.Thread(target=killer, daemon=True).start()
t = time.time()
try:
    pool.generate(spec, GenerationRequest(prompt="a cat", steps=1000, seed=1))
except WorkerError as e:
    print("after kill:", str(e)[:300], "in", round(time.time() - t, 2), "s", flush=True)
print("old pid alive:", psutil.pid_exists(pid), flush=True)
lat = pool.generate(spec, GenerationRequest(prompt="a cat", steps=2, seed=1))
print("restarted ok", tuple(lat.shape), pool.status()["ranks"][0]["pid"], json.dumps(pool.status()["ranks"][0]["memory"]), flush=True)
pool.shutdown()
print("CHECK DONE", flush=True)
