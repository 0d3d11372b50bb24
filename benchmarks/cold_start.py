"""Cold start, measured: a machine that never compiled, a new pool on a machine that did, and a warm job.

    python benchmarks/cold_start.py --models 2b --out cold_2b.json          # one H200, about 5 minutes
    python benchmarks/cold_start.py --models 5b --no-second-job --out cold_5b.json   # about 9 minutes
    XDIT_COGVIDEO_OPTIMIZE=fuse,compile python benchmarks/cold_start.py --tiny --device cpu --steps 4 --out /tmp/c.json

Per model (random full-size weights saved as a diffusers folder by ``pool_bench.build_folder``, a prompt, so
T5 runs; 50 steps; decode), all on the wall clock from the caller:

1. ``diffusers``: plain diffusers in a fresh process: load, then the whole job (its "first job"); ``job_s`` and
   ``first_job_s`` end with the bf16 video on the GPU, ``job_frames_s`` and ``first_job_frames_s`` with float frames
   on the CPU (``postprocess_video(output_type="np")``, ``frames_s`` of it), as ``pool.decode`` ends. Then the same
   job again in that process, ``warm_job_s`` / ``warm_job_frames_s`` (``--no-diffusers-warm`` skips it): a first job
   in a process pays first-call costs (2b: 34.7-36.6 s against 33.2-33.7 s warm, sessions 4-6), so warm is
   compared with warm.
2. ``never_compiled``: every cache empty (a new folder for Inductor, Triton, FA4's JIT, CUDA's JIT and our
   markers): a new pool's first job, from submit (the pool starts inside it) to decoded frames. Then we wait
   for the compile policy's background warm-up and run a ``second_job`` in the same pool.
3. ``compiled_machine``: a new pool on the same caches: submit to first step, and the whole first job.
4. ``warm``: one more job in that pool.
5. ``prestarted``: a new pool on the same caches whose worker processes were prestarted (``pool.prestart``, as a
   ComfyUI server or the CLI does before the first job) and had finished their imports (``wait_spares``), timed
   from submit like the others; ``spare_wait`` says how long the spares took to get ready.
6. ``prestarted_never_compiled`` (``--prestarted-never-compiled``): prestarted workers on new empty caches: a
   ComfyUI server's first job on a machine that never compiled.

``--stages`` picks some of them (a 1.5-5b job is minutes: ``--stages prestarted_never_compiled`` is one new
machine's first job alone, ``--stages diffusers`` diffusers' alone); ratios need both sides in one run.

Each pool entry carries the pool's own account (``status()``: worker start-up phases, load, compile policy
decision with cache counters and first-block timings, first step) so the time goes somewhere named.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_folder_args, json_document, log  # noqa: E402
from pool_bench import PROMPT, model_folders  # noqa: E402

os.environ["XDIT_COGVIDEO_COMPILE"] = "auto"  # the default policy is what this measures (common.py sets always)

CACHE_ENV = ("XDIT_COGVIDEO_CACHE", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
             "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", "CUDA_CACHE_PATH")


def fresh_caches(root: Path) -> dict:
    """Point every compile/JIT cache at new empty folders under ``root`` (workers inherit the environment)."""
    names = {"XDIT_COGVIDEO_CACHE": "xdit", "TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton",
             "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": "fa4", "CUDA_CACHE_PATH": "cuda"}
    for name, sub in names.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(root / sub)
    os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] = "1"
    return {name: os.environ[name] for name in names}


def diffusers_child(folder: str, size: list, steps: int, device: str, out: str, warm: bool) -> None:
    """In a fresh process: plain diffusers' load and one whole job (T5, steps, decode); with ``warm`` the same job
    again."""
    from diffusers import CogVideoXPipeline

    t0 = time.perf_counter()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = CogVideoXPipeline.from_pretrained(folder, torch_dtype=dtype).to("cuda:0" if device == "cuda" else "cpu")
    pipe.set_progress_bar_config(disable=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t1 = time.perf_counter()
    frames, height, width = size

    def job() -> tuple[float, float]:
        """Seconds to the bf16 video on the device, and to float frames on the CPU."""
        started = time.perf_counter()
        with torch.inference_mode():  # decode_latents is not under no_grad: with autograd its VAE needs >130 GiB
            latents = pipe(prompt=PROMPT, num_frames=frames, height=height, width=width, num_inference_steps=steps,
                           guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(42),
                           output_type="latent").frames
            video = pipe.decode_latents(latents)
            sync()
            decoded = time.perf_counter()
            # float frames on the CPU, as CogVideoXPipeline(output_type="np") returns them (what pool.decode returns)
            pipe.video_processor.postprocess_video(video=video, output_type="np")
        return decoded - started, time.perf_counter() - started

    load = t1 - t0
    first, first_frames = job()
    row = {"load_s": round(load, 2), "job_s": round(first, 2), "first_job_s": round(load + first, 2),
           "frames_s": round(first_frames - first, 2), "job_frames_s": round(first_frames, 2),
           "first_job_frames_s": round(load + first_frames, 2)}
    Path(out).write_text(json.dumps(row))  # kept if a time limit ends the warm job
    if warm:
        again, again_frames = job()
        row.update(warm_job_s=round(again, 2), warm_job_frames_s=round(again_frames, 2))
        Path(out).write_text(json.dumps(row))


def diffusers_first_job(folder: Path, size, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    t = time.perf_counter()
    try:
        subprocess.run([sys.executable, __file__, "--diffusers-child", str(folder), json.dumps(list(size)),
                        str(args.steps), args.device, out, "warm" if args.diffusers_warm else "once"], check=True,
                       timeout=1200)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        if not Path(out).stat().st_size:  # not even the first job: nothing to keep
            os.unlink(out)
            raise
        log(f"diffusers' child ended early ({type(error).__name__}); keeping its first job")
    row = json.loads(Path(out).read_text())
    row["process_s"] = round(time.perf_counter() - t, 2)  # interpreter and imports included
    os.unlink(out)
    return row


class Pool:
    """One pool and its jobs, timed from the caller."""

    def __init__(self, folder: Path, args, size):
        from comfyui_xdit_cogvideo.pool import ModelSpec, WorkerPool

        self.args, self.size = args, size
        self.spec = ModelSpec(str(folder), dtype="bf16" if args.device == "cuda" else "fp32", attention=args.attention)
        self.pool = WorkerPool(self.devices(args))

    @staticmethod
    def devices(args) -> str:
        return "0" if args.device == "cuda" else "cpu:1"

    def job(self) -> dict:
        from comfyui_xdit_cogvideo import GenerationRequest

        frames, height, width = self.size
        first: list[float] = []

        def on_event(event):
            if event.phase == "sample" and event.step >= 1 and not first:
                first.append(time.perf_counter())

        request = GenerationRequest(prompt=PROMPT, frames=frames, height=height, width=width, steps=self.args.steps,
                                    guidance=6.0, seed=42)
        t = time.perf_counter()
        latents = self.pool.generate(self.spec, request, on_event=on_event)
        sampled = time.perf_counter()
        self.pool.decode(self.spec, latents, frames=frames)
        done = time.perf_counter()
        status = self.pool.status()
        return {"whole_s": round(done - t, 2), "submit_to_first_step_s": round(first[0] - t, 2) if first else None,
                "sample_s": round(sampled - t, 2), "decode_s": round(done - sampled, 2),
                "startup": status.get("startup"), "job": status.get("last_job"), "compile": status.get("compile")}

    def wait_for_warmup(self, timeout: float) -> dict:
        """Until the compile policy's background compile (if any) has finished."""
        t = time.perf_counter()
        state = None
        while time.perf_counter() - t < timeout:
            warmup = (self.pool.status().get("compile") or {}).get("warmup") or {}
            state = warmup.get("state")
            if state != "running":
                break
            time.sleep(1.0)
        return {"state": state, "waited_s": round(time.perf_counter() - t, 1)}

    def close(self) -> None:
        self.pool.shutdown()


def prestarted_job(folder: Path, args, size) -> tuple[dict, dict]:
    """(spare wait, job): prestart the workers under the current environment, wait until they have imported, then a
    new pool's first job on them."""
    from comfyui_xdit_cogvideo.pool import prestart, shutdown_spares, wait_spares

    t = time.perf_counter()
    prestart(Pool.devices(args))
    ready = wait_spares(300)
    waited = {"ready": ready, "waited_s": round(time.perf_counter() - t, 2)}
    pool = Pool(folder, args, size)
    try:
        return waited, pool.job()
    finally:
        pool.close()
        shutdown_spares()


STAGES = ("diffusers", "never_compiled", "compiled_machine", "prestarted", "prestarted_never_compiled")


def chosen_stages(args) -> set[str]:
    """The stages to run: ``--stages``, else the default set (see the module's docstring)."""
    if args.stages is None:
        stages = set(STAGES[:4]) | ({"prestarted_never_compiled"} if args.prestarted_never_compiled else set())
    else:
        stages = {s.strip() for s in args.stages.split(",") if s.strip()}
        unknown = stages - set(STAGES)
        if unknown:
            raise SystemExit(f"unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    return stages - ({"diffusers"} if args.no_diffusers else set())


def ratio(diffusers_s: float | None, ours_s: float | None) -> float | None:
    return round(diffusers_s / ours_s, 3) if diffusers_s and ours_s else None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="2b")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cache-root", default=None, help="where the fresh caches go (default: a new temp folder)")
    p.add_argument("--warm-timeout", type=float, default=400.0)
    p.add_argument("--no-second-job", action="store_true", help="skip the job after the warm-up (saves time on 5b)")
    p.add_argument("--prestarted-never-compiled", action="store_true",
                   help="also time prestarted workers on new empty caches (stage 6)")
    p.add_argument("--stages", default=None, help=f"comma-separated, of: {','.join(STAGES)} (default: 1-5, and 6 "
                                                   "with --prestarted-never-compiled; --no-diffusers drops 1)")
    p.add_argument("--attention", default="auto", help="the pool's kernel: cudnn = ours without flash-attn-4 "
                                                         "(its import still happens in a prestarted worker)")
    p.add_argument("--no-diffusers-warm", dest="diffusers_warm", action="store_false",
                   help="diffusers' first job only (no second, warm job in its process)")
    add_folder_args(p)
    args = p.parse_args(argv)
    stages = chosen_stages(args)
    out, save = json_document(args)

    for name, size, folder, build_s in model_folders(args):
        res = out["models"].setdefault(name, {"size": size, "steps": args.steps})
        res["folder_build_s"] = build_s
        cache_root = Path(args.cache_root or tempfile.mkdtemp(prefix="xdit-cold-")) / name
        res["caches"] = fresh_caches(cache_root)
        if "diffusers" in stages:
            res["diffusers"] = diffusers_first_job(folder, size, args)
            log(f"{name} diffusers: {res['diffusers']}")
            save()
        if "never_compiled" in stages:
            pool = Pool(folder, args, size)
            try:
                res["never_compiled"] = pool.job()
                log(f"{name} never compiled: {json.dumps(res['never_compiled'])[:600]}")
                res["warmup_wait"] = pool.wait_for_warmup(args.warm_timeout)
                if not args.no_second_job:
                    res["second_job"] = pool.job()
                    log(f"{name} second job: {json.dumps(res['second_job'])[:600]}")
                save()
            finally:
                pool.close()
        if "compiled_machine" in stages:
            pool = Pool(folder, args, size)
            try:
                res["compiled_machine"] = pool.job()
                log(f"{name} compiled machine: {json.dumps(res['compiled_machine'])[:600]}")
                res["warm"] = pool.job()
                log(f"{name} warm: {json.dumps(res['warm'])[:300]}")
            finally:
                pool.close()
        if "prestarted" in stages:
            res["spare_wait"], res["prestarted"] = prestarted_job(folder, args, size)
            log(f"{name} prestarted: {json.dumps(res['prestarted'])[:600]}")
            save()
        if "prestarted_never_compiled" in stages:
            res["caches_never_compiled_prestarted"] = fresh_caches(cache_root.parent / f"{name}-prestarted-fresh")
            res["spare_wait_never_compiled"], res["prestarted_never_compiled"] = prestarted_job(folder, args, size)
            log(f"{name} prestarted, never compiled: {json.dumps(res['prestarted_never_compiled'])[:600]}")
        d = res.get("diffusers", {})

        def whole(stage: str) -> float | None:
            return res.get(stage, {}).get("whole_s")

        res["ratios_vs_diffusers"] = {
            "never_compiled_first_job": ratio(d.get("first_job_s"), whole("never_compiled")),
            "compiled_machine_first_job": ratio(d.get("first_job_s"), whole("compiled_machine")),
            "compiled_machine_prestarted_first_job": ratio(d.get("first_job_s"), whole("prestarted")),
            "never_compiled_prestarted_first_job": ratio(d.get("first_job_s"), whole("prestarted_never_compiled")),
            "warm_job_vs_diffusers_warm_job": ratio(d.get("warm_job_frames_s"), whole("warm")),
            "never_compiled_first_job_frames": ratio(d.get("first_job_frames_s"), whole("never_compiled")),
            "compiled_machine_first_job_frames": ratio(d.get("first_job_frames_s"), whole("compiled_machine")),
            "warm_job_vs_diffusers_first_job_after_load": ratio(d.get("job_frames_s"), whole("warm"))}
        log(f"{name}: {res['ratios_vs_diffusers']}")
        save()
    save()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--diffusers-child":
        diffusers_child(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6],
                        sys.argv[7] == "warm")
    else:
        main()
