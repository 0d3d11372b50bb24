"""Cold start of the compiled blocks: when to compile, what is already compiled, and warming the cache.

The compile policy ``auto`` (``OptimizeOptions.compile_policy``) decides per job:

- **compiled: cache hit** -- the two block graphs for this key (torch, device, model config, options and the
  exact shapes/strides of the block inputs, i.e. size and layout) were compiled on this machine before: Dynamo
  traces again (seconds) and Inductor loads the graphs from its on-disk FX-graph / AOT-autograd / Triton caches.
- **compiled: pays off** -- no cache, but the eager step measured at step ``DECIDE_AT_STEP`` says the
  remaining steps save more than a cold compile costs (``COMPILED_STEP_GAIN``, ``COLD_COMPILE_S``). The job
  compiles from that step, and a warm-up of the same key this process started (at step 0) is stopped: it would only
  compete with the job for the GPU and the CPU.
- **eager** otherwise, and the cache is warmed for the next job without delaying this one.

How the cache is warmed, of three candidates:
(a) compiling in the worker after the job would make the next job wait for it (tens of seconds, and a
    compile cannot be interrupted);
(c) compiling on a thread of the worker and switching between steps would fight the sampling thread for the
    GIL on every kernel launch (each ATen call releases and retakes it) and slow the very job it should not slow;
(b) is what we do: a separate, low-priority (``nice``) process builds one block of this model with the same
    options, calls the two compiled graphs once on tensors of the recorded shapes and strides, and so fills the
    same on-disk caches. It needs one block's weights and activations on the device (checked against free
    memory), dies with its parent (``PR_SET_PDEATHSIG``) and ends itself after ``WARM_TIMEOUT_S``. A job that
    starts while it runs stays eager; the first job after it finishes finds the marker and compiles from cache.
    The switch to compiled is never made inside a job, so one job's latents come from one path (both are exact
    up to bf16 rounding, tests/test_optimize.py).

A marker ``<inductor cache>/xdit-compiled/<key>.json`` records a finished compile, next to
``torch.compiler.save_cache_artifacts()``'s bundle ``<key>.bin`` (loaded before compiling in a new process,
so the graphs come back even where Inductor's own cache folder differs).

**Prefetch.** Loading two cached graphs still costs the first block of a new process 3-4 s on an H200 (Dynamo's
trace and Inductor's load of its code and kernels; session 6). A marker also records the job that compiled it
(block input specs, dtype, options), so a new engine guesses the graphs its first job needs (the newest marker
whose recorded inputs give its own key under this model and these options) and loads them on a thread while its
weights load: one block with the same structure on the device, called once (``optimize.CompilePrefetch``,
``run_block_graphs``). Dynamo's guards do not tie the graphs to that block, so every real block reuses them. The
thread builds the block on the meta device (a mode of its own thread) and holds the construction lock shared while
it builds and calls it (a trace beside a model build failed; beside the load's optimize step or T5's encode it
runs). A wrong guess costs that wait and the thread's time: the
job's own key decides as above.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

# Costs the policy weighs, in one place (one H200, torch 2.11, 49x480x720; BENCHMARKS.md). COMPILED_STEP_GAIN is
# measured: eager fused+FA4 -> compiled saves 19 % of a step on 2b (0.546 -> 0.443 s) and 28 % on 5b (1.650 -> 1.190);
# the smaller is used. COLD_COMPILE_S is an ESTIMATE (first job of a new pool 67.2 s minus a warm job 25.6 s, which
# also holds the load) until `benchmarks/cold_start.py` measures the compile alone.
COLD_COMPILE_S = 45.0       # Dynamo + Inductor for the two block graphs of one shape, nothing cached
COMPILED_STEP_GAIN = 0.19   # fraction of an eager step the compiled graphs save
DECIDE_AT_STEP = 2          # the step whose eager duration is measured (steps 0 and 1 include kernel JITs)
WARM_TIMEOUT_S = 900.0      # a warm-up process that has not finished by then ends itself
WARM_MIN_FREE_BYTES = 8 << 30  # a GPU warm-up starts only with this much device memory free

MARKERS = "xdit-compiled"


def tensor_spec(value) -> object:
    """What Dynamo and Inductor specialise on for one argument: shape, stride, dtype, device type (or the value)."""
    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "stride": list(value.stride()), "dtype": str(value.dtype).split(".")[-1],
                "device": value.device.type, "offset": value.storage_offset()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
        return {"tuple": [tensor_spec(v) for v in value]}  # Ulysses' attention output (text, video) into post
    return f"<{type(value).__name__}>"


def args_spec(args) -> list:
    """Specs of a block call's arguments after the block itself."""
    return [tensor_spec(a) for a in args[1:]]


def model_config(transformer) -> dict:
    """The transformer's config without what does not change one block's graph (the block count, private keys)."""
    config = dict(transformer.config)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(config.items())
            if not k.startswith("_") and k != "num_layers"}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} sm{props.major}{props.minor}"
    return device.type


def _versions() -> dict:
    versions = {"torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return versions


def compile_key(config: dict, options: dict, pre_spec: list, device: torch.device) -> str:
    """A name for one compiled pair of graphs: equal keys mean Inductor's caches hold what the compile needs."""
    blob = json.dumps({"versions": _versions(), "device": _device_name(device), "config": config,
                       "options": options, "pre": pre_spec}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cache_root() -> Path:
    """The Inductor cache folder in use (``optimize._setup_compile_cache`` points it at our persistent one)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def marker(key: str) -> Path:
    return cache_root() / MARKERS / f"{key}.json"


def is_compiled(key: str) -> bool:
    return marker(key).is_file()


def mark_compiled(key: str, info: dict) -> None:
    """Record a finished compile (atomically), with the cache-artifact bundle when torch can make one."""
    path = marker(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    save = getattr(torch.compiler, "save_cache_artifacts", None)
    if save is not None:
        try:
            saved = save()
            if saved is not None:
                _write(path.with_suffix(".bin"), saved[0])
                info = dict(info, artifacts_bytes=len(saved[0]))
        except Exception as error:  # noqa: BLE001 - the on-disk caches are filled either way
            info = dict(info, artifacts_error=f"{type(error).__name__}: {error}"[:200])
    _write(path, json.dumps(info, default=str).encode())


def _write(path: Path, data: bytes) -> None:
    staging = path.with_name(f"{path.name}.tmp{os.getpid()}")
    staging.write_bytes(data)
    os.replace(staging, path)


_LOADED: set[str] = set()


def load_artifacts(key: str) -> float | None:
    """Hot-load ``key``'s bundle into this process's caches (once); seconds taken, None without a bundle."""
    path = marker(key).with_suffix(".bin")
    load = getattr(torch.compiler, "load_cache_artifacts", None)
    if key in _LOADED or load is None or not path.is_file():
        return None
    _LOADED.add(key)
    started = time.perf_counter()
    try:
        load(path.read_bytes())
    except Exception:  # noqa: BLE001 - a stale or foreign bundle: Inductor's own caches still apply
        return None
    return round(time.perf_counter() - started, 3)


def cache_counters() -> dict:
    """Inductor's and AOT autograd's cache hit/miss counters in this process (torch-internal, best effort)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {"fx_hit": counters["inductor"]["fxgraph_cache_hit"], "fx_miss": counters["inductor"]["fxgraph_cache_miss"],
            "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
            "aot_miss": counters["aot_autograd"]["autograd_cache_miss"]}


def compile_seconds() -> dict:
    """Cumulative Dynamo and Inductor time in this process (torch-internal metrics, best effort)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics as metrics
    except ImportError:
        return {}
    total = sum(metrics.get("_compile.compile_inner", []))
    backend = sum(metrics.get("OutputGraph.call_user_compiler", []))
    return {"dynamo_s": round(total - backend, 3), "inductor_s": round(backend, 3)}


def pays_off(steps_left: int, eager_step_s: float) -> bool:
    """Would compiling now save more over the remaining steps than a cold compile costs?"""
    return steps_left * eager_step_s * COMPILED_STEP_GAIN > COLD_COMPILE_S


class Warmup:
    """One background compile (candidate (b) above) for ``key``; at most one per key on this machine."""

    def __init__(self, key: str, job: dict):
        self.key, self.job = key, job
        self.proc: subprocess.Popen | None = None
        self.started = time.monotonic()
        self.state = "starting"
        self.lock = marker(key).with_suffix(".warming")

    def start(self) -> "Warmup":
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        if not self._take_lock():
            self.state = "elsewhere"  # another process (another rank, another pool) warms the same key
            return self
        spec = self.lock.with_suffix(".job")
        spec.write_text(json.dumps(self.job))
        log = open(self.lock.with_suffix(".log"), "wb")
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "comfyui_xdit_cogvideo.compile_cache", str(spec)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=_child_setup, env=_child_env())
        except OSError:
            self.lock.unlink(missing_ok=True)
            raise
        finally:
            log.close()
        self.lock.write_text(str(self.proc.pid))
        self.state = "running"
        return self

    def _take_lock(self) -> bool:
        """Create the lock file exclusively; a lock left by a process that is gone is taken over."""
        for _ in range(2):
            try:
                os.close(os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                return True
            except FileExistsError:
                try:
                    holder = self.lock.read_text().strip()
                except OSError:
                    holder = ""
                if not holder or _alive(holder):  # empty: its creator is writing its pid right now
                    return False
                self.lock.unlink(missing_ok=True)
        return False

    def poll(self) -> str:
        """running, done, failed (exit code in the state), timeout, or elsewhere."""
        if self.proc is None or self.state not in ("running",):
            return self.state
        code = self.proc.poll()
        if code is None:
            return self.state
        if code == -signal.SIGALRM:
            self.state = "timeout"
        elif code == 0 and is_compiled(self.key):
            self.state = "done"
        else:
            self.state = f"failed (exit {code}, see {self.lock.with_suffix('.log')})"
        self._release_lock()
        return self.state

    def cancel(self, why: str) -> None:
        """Stop a running warm-up whose graphs this process now compiles itself: it would only compete with the job
        for the GPU and the CPU (session 7: a 1.5-5b warm-up ran beside its whole 5-minute job after the job had
        compiled the same graphs at step 2)."""
        if self.poll() != "running":
            return
        self.proc.terminate()
        try:
            self.proc.wait(1)
        except subprocess.TimeoutExpired:  # never hold the job up: SIGKILL, reaped by the OS when we exit
            self.proc.kill()
        self.state = f"cancelled: {why}"
        self._release_lock()

    def _release_lock(self) -> None:
        """Remove the key's lock if it is still ours (a dead holder's lock may have been taken over meanwhile)."""
        try:
            if self.lock.read_text().strip() == str(self.proc.pid):
                self.lock.unlink(missing_ok=True)
        except OSError:
            pass

    def wait(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while self.poll() == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.state

    def describe(self) -> dict:
        return {"key": self.key, "state": self.poll(), "pid": None if self.proc is None else self.proc.pid,
                "seconds": round(time.monotonic() - self.started, 1)}


def _child_env() -> dict:
    """Our environment (so the same caches are used), the package importable, without the pool's key."""
    env = {k: v for k, v in os.environ.items() if k != "XDIT_COGVIDEO_POOL_KEY"}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                  if p and p != root])
    return env


def _alive(pid_text: str) -> bool:
    try:
        os.kill(int(pid_text), 0)
        return True
    except (ValueError, ProcessLookupError, PermissionError):
        return False


def _child_setup() -> None:
    """In the warm-up child: lowest CPU priority, and die with the parent (Linux) so it never outlives a pool."""
    os.nice(19)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


JOB_FIELDS = ("dtype", "options", "config", "pre", "post")  # what rebuilds a block call (markers keep them)
PREFETCH_SCAN = 16  # newest markers looked at by ``prefetch_candidate``


def prefetch_candidate(key_of: Callable[[list], str]) -> dict | None:
    """The recorded job of the newest marker whose block inputs give that marker's own key under ``key_of`` (the
    key of a block call with these input specs for this model, options and device); with its ``key``. None:
    nothing fits."""
    folder = cache_root() / MARKERS
    try:
        paths = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)[:PREFETCH_SCAN]
    except OSError:
        return None
    for path in paths:
        try:
            job = json.loads(path.read_text()).get("job")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(job, dict) and all(k in job for k in JOB_FIELDS) \
                and key_of(job["pre"]) == path.stem:
            return dict(job, key=path.stem)
    return None


@torch.no_grad()
def run_block_graphs(job: dict, device: torch.device) -> None:
    """Build one block of ``job``'s model with its options on ``device`` and call the two compiled graphs once on
    tensors of its recorded specs: compiles them, or loads them from the caches. Weights and buffers are zeros (a
    graph does not depend on values; a random init of a 5b block costs seconds of CPU). The block is built under
    ``torch.device("meta")``, a mode of this thread only (accelerate's ``init_empty_weights`` would patch
    ``torch.nn`` and ``torch.empty`` for every thread), so beside other threads it only needs the construction lock
    held shared (a build elsewhere changes the default dtype under the build and the trace)."""
    from diffusers import CogVideoXTransformer3DModel

    from .optimize import OptimizeOptions, _compiled, optimize_transformer

    options = OptimizeOptions(**job["options"])
    with torch.device("meta"):
        transformer = CogVideoXTransformer3DModel.from_config(dict(job["config"], num_layers=1))
    transformer = transformer.to_empty(device=device).to(getattr(torch, job["dtype"]))
    for tensor in [*transformer.parameters(), *transformer.buffers()]:
        tensor.data.zero_()
    transformer.eval().requires_grad_(False)
    optimize_transformer(transformer, options)
    block = transformer.transformer_blocks[0]
    pre, post = _compiled(options.compile_mode)
    pre(block, *_args(job["pre"], device))
    post(block, *_args(job["post"], device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensor(spec: dict, device: torch.device) -> torch.Tensor:
    dtype = getattr(torch, spec["dtype"])
    size = sum((n - 1) * s for n, s in zip(spec["shape"], spec["stride"])) + 1 + spec["offset"]
    storage = torch.empty(size, dtype=dtype, device=device)
    if dtype.is_floating_point:
        storage.normal_(0, 0.5)
    return storage.as_strided(spec["shape"], spec["stride"], spec["offset"])


def _arg(spec, device: torch.device):
    if isinstance(spec, dict) and "tuple" in spec:
        return tuple(_tensor(s, device) for s in spec["tuple"])
    return _tensor(spec, device) if isinstance(spec, dict) else spec


def _args(specs: list, device: torch.device) -> list:
    return [_arg(s, device) for s in specs]


def warm(job: dict) -> None:
    """Compile the two block graphs for ``job`` (what ``Optimizer`` recorded) and mark the key compiled."""
    device = torch.device(job["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = time.perf_counter()
    run_block_graphs(job, device)
    mark_compiled(job["key"], {"by": "warm-up", "compile_s": round(time.perf_counter() - started, 2),
                               "cache": cache_counters(), **compile_seconds(),
                               "job": {k: job[k] for k in JOB_FIELDS}})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m comfyui_xdit_cogvideo.compile_cache JOB.json (written by the compile policy)",
              file=sys.stderr)
        return 2
    signal.alarm(int(WARM_TIMEOUT_S))  # a compile that hangs ends here (SIGALRM), whoever watches or not
    job = json.loads(Path(argv[0]).read_text())
    if job.get("inductor_cache"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = job["inductor_cache"]
    from .optimize import _setup_compile_cache

    _setup_compile_cache(job.get("inductor_cache"))
    warm(job)
    Path(argv[0]).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
