"""Single-GPU speed-ups for the parallel CogVideoX transformer: fused QKV, torch.compile, and two opt-in,
inexact extras (a first-block step cache and fp8 linear layers).

How it plugs in: ``parallelize_transformer`` installs our attention processor; ``optimize_transformer`` then
replaces each block's ``forward`` with one that runs

    pre  (norm1, fused QKV projection, q/k LayerNorm, RoPE)      -> compiled graph (one for all blocks)
    attention (processor's ParallelContext: kernel + collectives) -> eager, never traced
    post (out projection, gates, norm2, feed-forward, gates)      -> compiled graph (one for all blocks)

The arithmetic is exactly diffusers' CogVideoXBlock + our processor (the same modules are called in the same
order); only elementwise work is fused by Inductor. The attention, with every collective of the sequence-
parallel layouts, stays outside the graphs, so compiling is safe on any layout and the block forward looks up
the *current* processor on every call (a pool that re-parallelizes for another layout needs no recompile of
anything but new shapes). Graphs are compiled with ``dynamic=False`` per shape (one per layout and size) and
cached on disk (Inductor's FX-graph and kernel caches under ``cache_dir``), so a restarted pool pays the
compile once per machine, not once per process. Whether a job compiles at all is the compile policy's call
(``compile_cache``: compiled when cached or when it pays off, else eager while a background process compiles).

Nothing here syncs the host inside a step, except the opt-in step cache, which reads one scalar per step to
decide whether to skip (documented in BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import time
import types
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn

from .parallel.attention import joint_heads, pack_qkv, project_qkv

__all__ = ["OptimizeOptions", "Optimizer", "optimize_transformer", "Fp8Linear", "StepCache"]

COMPILE_POLICIES = ("auto", "always")


def default_compile_policy() -> str:
    """``auto``, unless $XDIT_COGVIDEO_COMPILE says ``always`` (benchmarks of steady-state speed set it, so their
    first run of a shape is compiled, not eager while a warm-up runs)."""
    value = os.environ.get("XDIT_COGVIDEO_COMPILE") or "auto"
    if value not in COMPILE_POLICIES:
        raise ValueError(f"XDIT_COGVIDEO_COMPILE must be one of {', '.join(COMPILE_POLICIES)}, got {value!r}")
    return value


@dataclass(frozen=True)
class OptimizeOptions:
    """What to turn on. ``OptimizeOptions.parse`` reads ``"auto"``, ``"none"``, a dict, or ``"fuse,compile,..."``.

    The defaults (= ``"auto"`` on CUDA) are the exact options, measured fastest on one H200 (BENCHMARKS.md):
    fused QKV + compile + contiguous V + GELU epilogue. A flag string starts from everything off.

    - ``fuse_qkv``: one [3D x D] projection instead of three (diffusers' ``Attention.fuse_projections``); exact.
    - ``compile``: torch.compile the blocks' elementwise work (pre/post attention graphs); exact up to bf16
      rounding of fused elementwise ops. ``compile_policy`` ``auto`` (flag ``compile=auto``) compiles a job only
      when the graphs are cached or compiling pays off within it, else runs it eager and warms the cache in the
      background (``compile_cache``); ``always`` (``compile=always``) compiles every job.
    - ``step_cache``: first-block cache threshold (0 = off). When the first block's output residual changed by
      less than this (relative L1) since the last fully computed step, the other blocks are skipped and their
      cached residual is reused. Inexact; at most ``step_cache_max_skips`` skips in a row, and the first
      ``step_cache_warmup`` steps always compute.
    - ``fp8``: attention and feed-forward linears in float8 e4m3 (per-row activation and per-channel weight
      scales, ``torch._scaled_mm``). Inexact; needs an fp8 GPU (Hopper, Ada, Blackwell).
    - ``contiguous_v``: hand the attention kernel a contiguous V (with fused QKV it is a strided view of the
      projection output); exact.
    - ``gelu_epilogue``: bias + tanh-GELU of the first feed-forward projection inside the GEMM (cuBLASLt
      epilogue, ``torch._addmm_activation``) instead of a separate pass; exact up to bf16 rounding.
    """

    fuse_qkv: bool = True
    compile: bool = True
    compile_policy: str = "auto"
    compile_mode: str | None = None
    cache_dir: str | None = None
    step_cache: float = 0.0
    step_cache_max_skips: int = 2
    step_cache_warmup: int = 2
    fp8: bool = False
    contiguous_v: bool = True
    gelu_epilogue: bool = True

    def __post_init__(self):
        if self.compile_policy not in COMPILE_POLICIES:
            raise ValueError(f"compile policy must be one of {', '.join(COMPILE_POLICIES)}, "
                             f"got {self.compile_policy!r}")

    @property
    def active(self) -> bool:
        return (self.fuse_qkv or self.compile or self.step_cache > 0 or self.fp8 or self.contiguous_v
                or self.gelu_epilogue)

    @classmethod
    def parse(cls, value, device: torch.device | str = "cuda") -> "OptimizeOptions | None":
        """``None``/``"none"``/``False``: nothing. ``"auto"``/``True``: the exact defaults on CUDA, nothing on CPU.

        Strings list flags from all-off, e.g. ``"fuse,compile"``, ``"auto,nocompile"``, ``"auto,fp8"``,
        ``"auto,cache=0.08"``, ``"fuse,compile,gelu_epilogue"``.
        """
        if isinstance(value, OptimizeOptions):
            return value if value.active else None
        if value is None or value is False or value == "none" or value == "":
            return None
        if isinstance(value, dict):
            return cls(**value)
        cuda = torch.device(device).type == "cuda"
        if value is True or value == "auto":
            return cls(compile_policy=default_compile_policy()) if cuda else None
        if not isinstance(value, str):
            raise ValueError(f"optimize must be 'auto', 'none', a dict or OptimizeOptions, got {value!r}")
        exact = dict(fuse_qkv=True, compile=True, contiguous_v=True, gelu_epilogue=True)
        options = cls(compile_policy=default_compile_policy(), **{k: False for k in exact})
        names = {f.name for f in fields(cls)}
        for part in (p.strip() for p in value.split(",") if p.strip()):
            key, _, arg = part.partition("=")
            key = {"fuse": "fuse_qkv", "cache": "step_cache", "mode": "compile_mode"}.get(key, key)
            if key == "auto":
                options = replace(options, **{k: cuda for k in exact})
            elif key.startswith("no") and key[2:] in {"fuse", "compile", "fp8", "contiguous_v", "gelu_epilogue"}:
                options = replace(options, **{{"fuse": "fuse_qkv"}.get(key[2:], key[2:]): False})
            elif key == "compile" and arg in COMPILE_POLICIES:
                options = replace(options, compile=True, compile_policy=arg)
            elif key in names:
                field_type = {f.name: f.type for f in fields(cls)}[key]
                if not arg:
                    parsed = True if "bool" in str(field_type) else 0.1 if key == "step_cache" else None
                elif "bool" in str(field_type):
                    parsed = arg.lower() in ("1", "true", "yes", "on")
                elif "float" in str(field_type):
                    parsed = float(arg)
                elif "int" in str(field_type):
                    parsed = int(arg)
                else:
                    parsed = arg
                options = replace(options, **{key: parsed})
            else:
                raise ValueError(f"unknown optimize flag {part!r}; flags: auto, none, fuse, compile, compile=always, "
                                 "contiguous_v, gelu_epilogue, fp8, cache=THRESHOLD, mode=MODE, nofuse, nocompile, ...")
        return options if options.active else None


def default_cache_dir() -> str:
    from .tiny import tiny_cache_dir

    return str(tiny_cache_dir() / "inductor")


def _setup_compile_cache(cache_dir: str | None) -> None:
    """Inductor's on-disk caches (FX graphs, AOT autograd, Triton kernels) in one persistent folder."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:  # torch writes its default (a temp folder) into the environment the first time it needs one
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default
        torch_default_dir = torch_default()
    except Exception:  # noqa: BLE001
        torch_default_dir = None
    if cache_dir or current is None or current == torch_default_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir or default_cache_dir()
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    import torch._dynamo

    # 30 to 42 blocks share one graph; layouts and sizes add a few more shapes. Never fall back to eager.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = max(512, torch._dynamo.config.accumulated_recompile_limit)


# ---------------------------------------------------------------------------------------------------------
# The block, split around attention. Same modules, same order as CogVideoXBlock.forward + our processor.

def _block_pre(block, hidden_states, encoder_hidden_states, temb, rotary_cos, rotary_sin, contiguous_v=False,
               packing=None):
    """norm1 + QKV; returns ((q, k, v) or, with sequence parallelism (``packing`` = Ulysses degree), the attention
    inputs already in the layout the collectives send (``pack_qkv``), gate_msa, enc_gate_msa)."""
    norm_h, norm_e, gate_msa, enc_gate_msa = block.norm1(hidden_states, encoder_hidden_states, temb)
    rotary = None if rotary_cos is None else (rotary_cos, rotary_sin)
    text_len = encoder_hidden_states.size(1)
    q, k, v = project_qkv(block.attn1, torch.cat([norm_e, norm_h], dim=1), text_len, rotary)
    if packing is not None:
        return pack_qkv(q, k, v, text_len, packing), gate_msa, enc_gate_msa
    if contiguous_v:
        v = v.contiguous()
    return (q, k, v), gate_msa, enc_gate_msa


def _feed_forward(ff, x, gelu_epilogue: bool):
    """diffusers' FeedForward; with ``gelu_epilogue`` the first projection's bias + tanh-GELU run in the GEMM."""
    first = ff.net[0]
    proj = getattr(first, "proj", None)
    # torch._addmm_activation's GELU is the tanh approximation on CUDA (cuBLASLt epilogue) but the exact erf
    # form on CPU, so the fusion is only taken on CUDA, where it equals CogVideoX's gelu-approximate
    if not (gelu_epilogue and x.is_cuda and type(proj) is nn.Linear and proj.bias is not None
            and getattr(first, "approximate", None) == "tanh" and type(first).__name__ == "GELU"):
        return ff(x)
    shape = x.shape
    h = torch._addmm_activation(proj.bias, x.reshape(-1, shape[-1]), proj.weight.t(), use_gelu=True)
    h = h.reshape(*shape[:-1], h.shape[-1])
    for layer in ff.net[1:]:
        h = layer(h)
    return h


def _block_post(block, out, hidden_states, encoder_hidden_states, temb, gate_msa, enc_gate_msa, gelu_epilogue=False):
    attn = block.attn1
    text_len = encoder_hidden_states.size(1)
    out = joint_heads(out)  # the attention output (a tensor, or Ulysses' rank-major pair) as [B, seq, H * D]
    seq = out.shape[1]
    out = attn.to_out[1](attn.to_out[0](out))
    attn_e, attn_h = out.split([text_len, seq - text_len], dim=1)
    hidden_states = hidden_states + gate_msa * attn_h
    encoder_hidden_states = encoder_hidden_states + enc_gate_msa * attn_e
    norm_h, norm_e, gate_ff, enc_gate_ff = block.norm2(hidden_states, encoder_hidden_states, temb)
    ff = _feed_forward(block.ff, torch.cat([norm_e, norm_h], dim=1), gelu_epilogue)
    hidden_states = hidden_states + gate_ff * ff[:, text_len:]
    encoder_hidden_states = encoder_hidden_states + enc_gate_ff * ff[:, :text_len]
    return hidden_states, encoder_hidden_states


_COMPILED: dict = {}


def import_compiler() -> list[str]:
    """Import what the first compiled block imports lazily: torch.compile's backend wrapper (with AOT autograd) and
    Inductor's ``compile_fx`` with its code generators. 0.9 s on a fast idle CPU; on an H200 host inside the first
    job, most of ``optimize_s`` (0.8-1.4 s) and part of the first block's ``inductor_s``. For a prestarted worker,
    which has the time before its job. Returns the modules imported."""
    modules = ["torch._dynamo.repro.after_dynamo", "torch._inductor.compile_fx"]
    for module in modules:
        importlib.import_module(module)
    return modules


def _compiled(mode: str | None):
    """One pair of compiled functions per mode for the whole process: every transformer, block, engine and
    layout shares them (Dynamo keeps one graph per input shape/stride under its guards)."""
    if mode not in _COMPILED:
        kwargs = dict(dynamic=False, fullgraph=True)
        if mode:
            kwargs["mode"] = mode
        _COMPILED[mode] = (torch.compile(_block_pre, **kwargs), torch.compile(_block_post, **kwargs))
    return _COMPILED[mode]


class StepCache:
    """First-block cache: skip blocks 1..N-1 when block 0's output residual barely moved.

    One decision per transformer call (= one denoising step, CFG rows together); on sequence/CFG-parallel
    layouts the two sums behind the decision are all-reduced over the layout's ranks first, so every rank
    decides the same. Reading the decision is the one host sync per step this feature costs.
    """

    def __init__(self, threshold: float, max_skips: int = 2, warmup: int = 2):
        self.threshold, self.max_skips, self.warmup = threshold, max_skips, warmup
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.skipping = False
        self.run_of_skips = 0
        self.prev_first = None
        self.block1_in = None
        self.residual = None
        self.skipped_steps = 0
        self.computed_steps = 0
        self.last_distance = None
        self.distances = []

    def decide(self, first_residual: torch.Tensor, context) -> bool:
        """After block 0 of a step: skip the rest? (updates the reference when computing)."""
        skip = False
        shard, groups = getattr(context, "shard", None), getattr(context, "groups", None)
        if shard is not None and groups is not None:  # padded tokens must not sway the decision
            first_residual = first_residual[:, :shard.local_tokens(groups.seq_idx)]
        if self.prev_first is not None and self.residual is not None and self.step >= self.warmup \
                and self.run_of_skips < self.max_skips and self.prev_first.shape == first_residual.shape:
            sums = torch.stack([(first_residual - self.prev_first).abs().float().sum(),
                                self.prev_first.abs().float().sum()])
            if groups is not None and groups.layout.world_size > 1:
                import torch.distributed as dist

                dist.all_reduce(sums, group=groups.world)
            distance = float(sums[0] / sums[1].clamp_min(1e-12))  # the one host sync of this feature
            self.last_distance = distance
            self.distances.append(distance)
            skip = distance < self.threshold
        self.step += 1
        self.skipping = skip
        if skip:
            self.run_of_skips += 1
            self.skipped_steps += 1
        else:
            self.run_of_skips = 0
            self.computed_steps += 1
            self.prev_first = first_residual
        return skip


class Optimizer:
    """The state ``optimize_transformer`` attaches to a transformer (``transformer._xdit_optimizer``).

    With ``compile`` on, every job is compiled or eager as ``compile_policy`` decides (``compile_cache``); the
    first block of a job is timed (synchronised: compile or cache load, attention with its kernel JIT) and
    ``compile_report`` says what happened, for the pool's status and the CLI summary.
    """

    def __init__(self, transformer, options: OptimizeOptions):
        self.options = options
        self.transformer = transformer
        self.blocks = list(transformer.transformer_blocks)
        self.cache = StepCache(options.step_cache, options.step_cache_max_skips, options.step_cache_warmup) \
            if options.step_cache > 0 and len(self.blocks) > 1 else None
        self.compiled = options.compile  # this job runs the compiled graphs (the policy decides per job)
        self.compile_failed = False
        self.warmups: dict = {}
        self.report: dict = {}
        self.new_job()
        if options.compile:
            _setup_compile_cache(options.cache_dir)
            self._pre_c, self._post_c = _compiled(options.compile_mode)

    def pre(self, *args):
        if args[0]._xdit_index == 0 and self._step_begins(args):
            return self._timed_first("pre", self._pre_c if self.compiled else None, _block_pre, args)
        return self._call(self._pre_c, _block_pre, args) if self.compiled else _block_pre(*args)

    def post(self, *args):
        if self._timing is not None:
            return self._timed_first("post", self._post_c if self.compiled else None, _block_post, args)
        return self._call(self._post_c, _block_post, args) if self.compiled else _block_post(*args)

    def _call(self, compiled, eager, args):
        try:
            return compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - a compiler failure must not fail the job: run eager
            import warnings

            warnings.warn(f"torch.compile failed ({type(error).__name__}: {error}); continuing without it")
            self.compiled, self.compile_failed = False, True
            self.report["why"] = f"eager: compile failed ({type(error).__name__})"
            return eager(*args)

    # -- the compile policy ------------------------------------------------------------------------------
    def new_job(self, steps: int | None = None) -> None:
        """Forget per-job state (step cache, policy decision); the engine calls this before each job."""
        if self.cache is not None:
            self.cache.reset()
        self._steps, self._step, self._stamps = steps, -1, {}
        self._key = self._timing = self._pre_args_spec = None
        self.report = {"policy": self.options.compile_policy if self.options.compile else "off"}

    def _now(self, like: torch.Tensor) -> float:
        if like.is_cuda:
            torch.cuda.synchronize(like.device)
        return time.perf_counter()

    def _step_begins(self, args) -> bool:
        """At block 0 of each transformer call; True when this call's first block is to be timed."""
        from . import compile_cache as cc

        self._step += 1
        if self._step == 0:
            self._decide(args)
            return True
        if self.compiled or not self.options.compile or self.compile_failed \
                or self.options.compile_policy != "auto" or self._steps is None:
            return False
        if self._step in (cc.DECIDE_AT_STEP - 1, cc.DECIDE_AT_STEP):
            self._stamps[self._step] = self._now(args[1])
        if self._step == cc.DECIDE_AT_STEP and cc.DECIDE_AT_STEP - 1 in self._stamps:
            eager_step = self._stamps[cc.DECIDE_AT_STEP] - self._stamps[cc.DECIDE_AT_STEP - 1]
            self.report["eager_step_s"] = round(eager_step, 4)
            if cc.pays_off(self._steps - self._step, eager_step):
                self.compiled = True
                self.report["why"] = f"compiled from step {self._step}: pays off within this job"
                warmup = self.warmups.get(self._key)
                if warmup is not None:
                    warmup.cancel("this job compiles the same graphs itself")
                return True
        return False

    def _decide(self, args) -> None:
        from . import compile_cache as cc

        if not self.options.compile or self.compile_failed:
            self.compiled = False
            self.report["why"] = "eager: compile failed earlier" if self.compile_failed else "eager: compile off"
            return
        spec = self._pre_args_spec = cc.args_spec(args)
        key = compile_key_of(self.transformer, self.options, spec, args[1].device)
        self._key, self.report["key"] = key, key
        prefetch = self.transformer.__dict__.pop("_xdit_prefetch", None)  # started for this transformer at its load
        prefetched = prefetch is not None and prefetch.key == key
        if prefetch is not None:
            if prefetched:
                prefetch.wait()  # its graphs are this job's: let it finish, then use them
            self.report["prefetch"] = dict(prefetch.describe(), used=prefetched and prefetch.state == "done")
        if key in _IN_MEMORY:
            self.compiled = True
            why = PREFETCHED if prefetched and prefetch.state == "done" else "compiled: already compiled in this process"
        elif cc.is_compiled(key):
            self.compiled, why = True, "compiled: cache hit"
            loaded = cc.load_artifacts(key)
            if loaded is not None:
                self.report["artifacts_load_s"] = loaded
        elif self.options.compile_policy == "always":
            self.compiled, why = True, "compiled: policy always, first run of this shape"
        else:
            self.compiled, why = False, "eager: first run of this shape, compiling for next time"
        self.report["why"] = why

    def _timed_first(self, part: str, compiled, eager, args):
        """Run the first block's pre or post with synchronised clocks around it (and the attention between)."""
        from . import compile_cache as cc

        like = args[1] if part == "pre" else args[2]  # post's args[1] may be the Ulysses output pair
        started = self._now(like)
        if part == "pre":
            self._timing = {"counters": cc.cache_counters(), "seconds": cc.compile_seconds()}
        else:
            self._timing["attention_s"] = round(started - self._timing.pop("pre_end"), 4)
        out = self._call(compiled, eager, args) if compiled is not None else eager(*args)
        ended = self._now(like)
        self._timing[f"{part}_s"] = round(ended - started, 4)
        if part == "pre":
            self._timing["pre_end"] = ended
            return out
        timing, self._timing = self._timing, None
        before, seconds = timing.pop("counters"), timing.pop("seconds")
        first = {"step": self._step, **timing}
        if self.compiled:
            after = cc.cache_counters()
            first["cache"] = {k: after[k] - before.get(k, 0) for k in after}
            now = cc.compile_seconds()
            first.update({k: round(now[k] - seconds.get(k, 0.0), 3) for k in now})
            why = self.report.get("why", "")
            if why.startswith("compiled: cache hit") and first["cache"].get("fx_miss"):
                self.report["why"] = "compiled: marked as cached, but Inductor missed its cache and compiled anew"
            elif why == PREFETCHED and (any(first["cache"].values()) or first.get("dynamo_s")):
                self.report["why"] = "compiled: cache hit (the graphs loaded during the load did not fit: traced again)"
            if self._key is not None and self.compiled:
                _IN_MEMORY.add(self._key)
                if not cc.is_compiled(self._key):
                    job = self._job(args)
                    cc.mark_compiled(self._key, {"by": f"process {os.getpid()}", "first_block": first,
                                                 "job": {k: job[k] for k in cc.JOB_FIELDS}})
        self.report["first_block"] = first
        if not self.compiled and self._key is not None and self.options.compile_policy == "auto":
            self._warm(args, timing)
        return out

    def _warm(self, post_args, timing) -> None:
        """Start the background compile for this job's shapes (compile_cache, candidate (b)) when it can run."""
        from . import compile_cache as cc

        key, block, x = self._key, post_args[0], post_args[2]  # hidden_states; [1] may be Ulysses' output pair
        running = self.warmups.get(key)
        if running is not None and running.poll() == "running":
            self.report["warmup"] = running
            return
        # inside the forward, FSDP's gathered weights are plain Parameters too: ask the transformer if it is sharded
        sharded = getattr(self.transformer, "_xdit_shard_group", None) is not None
        plain = all(type(p) is nn.Parameter and p.device == x.device for p in block.parameters())
        if sharded or not plain or getattr(block, "_diffusers_hook", None) is not None:
            self.report["why"] += " -- not possible here: the weights are sharded or offloaded"
            return
        if x.is_cuda and torch.cuda.mem_get_info(x.device)[0] < cc.WARM_MIN_FREE_BYTES:
            self.report["why"] += " -- not now: too little free device memory for the warm-up"
            return
        try:
            self.warmups[key] = cc.Warmup(key, self._job(post_args)).start()
        except OSError as error:  # the cache folder is read-only or full: this job is not affected
            self.report["why"] += f" -- the warm-up could not start: {error}"
            return
        self.report["warmup"] = self.warmups[key]

    def _job(self, post_args) -> dict:
        """This job's block call as ``compile_cache`` rebuilds it (background warm-up, markers for a prefetch)."""
        from dataclasses import asdict

        from . import compile_cache as cc

        x = post_args[2]  # hidden_states; [1] may be Ulysses' output pair
        return {"key": self._key, "device": str(x.device), "dtype": str(x.dtype).split(".")[-1],
                "options": asdict(self.options), "config": cc.model_config(self.transformer),
                "pre": self._pre_args_spec, "post": cc.args_spec(post_args), "inductor_cache": str(cc.cache_root())}

    def compile_report(self) -> dict:
        """The last job's policy decision, first-block timings and any background warm-up, JSON-ready."""
        report = dict(self.report)
        if hasattr(report.get("warmup"), "describe"):
            report["warmup"] = report["warmup"].describe()
        return report

    def stats(self) -> dict:
        if self.cache is None:
            return {}
        return {"skipped_steps": self.cache.skipped_steps, "computed_steps": self.cache.computed_steps,
                "distances": [round(d, 4) for d in self.cache.distances]}


_IN_MEMORY: set[str] = set()  # keys whose graphs this process has compiled (Dynamo holds them)


class CompilePrefetch:
    """The compiled graphs a new engine's first job most likely needs (``compile_cache``, "Prefetch"), loaded on a
    thread while its weights load. ``start`` returns None when there is nothing to prefetch here."""

    def __init__(self, job: dict, device: torch.device, construction):
        self.key, self.job, self.device = job["key"], job, device
        self.state, self.seconds, self.error = "running", None, None
        self._thread = threading.Thread(target=self._run, args=(construction,), daemon=True,
                                        name=f"xdit-compile-prefetch-{device}")

    @classmethod
    def start(cls, transformer, options: "OptimizeOptions | None", device: torch.device, construction=None,
              arriving: int = 0) -> "CompilePrefetch | None":
        """For ``transformer`` (built, its weights still on their way) under ``options`` on ``device``; only while
        the device has ``arriving`` bytes (what the load is still copying there) plus the warm-up's margin free, and
        only for the default compile mode (others may capture CUDA graphs, which belong to the capturing thread).
        The transformer's Optimizer takes it at its first job (``_xdit_prefetch``)."""
        from dataclasses import asdict

        from . import compile_cache as cc

        if options is None or not options.compile or options.compile_policy not in ("auto", "always") \
                or options.compile_mode is not None:
            return None
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        _setup_compile_cache(options.cache_dir)
        job = cc.prefetch_candidate(lambda pre_spec: compile_key_of(transformer, options, pre_spec, device))
        if job is None or job["key"] in _IN_MEMORY:
            return None
        if device.type == "cuda" and torch.cuda.mem_get_info(device)[0] < arriving + cc.WARM_MIN_FREE_BYTES:
            return None
        # this engine's options (the key says their graph options equal the marker's; the rest, e.g. the cache
        # folder, must be ours)
        prefetch = cls(dict(job, options=asdict(options)), device, construction)
        prefetch._thread.start()
        transformer._xdit_prefetch = prefetch
        return prefetch

    def _run(self, construction) -> None:
        from . import compile_cache as cc

        started = time.perf_counter()
        try:
            with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext(), \
                    construction.shared() if construction is not None else contextlib.nullcontext():
                cc.load_artifacts(self.key)
                cc.run_block_graphs(self.job, self.device)
            _IN_MEMORY.add(self.key)
            self.state = "done"
        except Exception as error:  # noqa: BLE001 - a failed guess costs nothing: the job decides for itself
            self.state, self.error = "failed", f"{type(error).__name__}: {error}"[:300]
        self.seconds = round(time.perf_counter() - started, 3)

    def wait(self) -> dict:
        """Until the thread is done (the job that needs these graphs would otherwise trace them again)."""
        self._thread.join()
        return self.describe()

    def describe(self) -> dict:
        return {"key": self.key, "state": self.state, "seconds": self.seconds,
                **({"error": self.error} if self.error else {})}


PREFETCHED = "compiled: cache hit, loaded while the weights loaded"


def compile_key_of(transformer, options: OptimizeOptions, pre_spec: list, device: torch.device) -> str:
    """The compile-cache key of a block call: model config, the options that change the graphs, input specs."""
    from . import compile_cache as cc

    graph_options = {k: getattr(options, k) for k in ("fuse_qkv", "compile_mode", "contiguous_v", "gelu_epilogue",
                                                      "fp8")}
    if getattr(transformer, "_xdit_shard_group", None) is not None:  # FSDP's gathered weights: other graphs
        graph_options["fsdp_shards"] = transformer._xdit_shard_size
    return cc.compile_key(cc.model_config(transformer), graph_options, pre_spec, device)


def _fast_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                        attention_kwargs=None):
    opt: Optimizer = self._xdit_optimizer
    context = getattr(self.attn1.processor, "context", None)
    if context is None:  # not parallelized (stock processor): plain diffusers
        return self._xdit_plain_forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                        attention_kwargs)
    cache, index, last = opt.cache, self._xdit_index, len(opt.blocks) - 1
    if cache is not None and index > 0 and cache.skipping:
        if index < last:
            return hidden_states, encoder_hidden_states
        res_h, res_e = cache.residual
        return hidden_states + res_h, encoder_hidden_states + res_e
    if index == 0:  # the first block gets slices of the embedded [text; video] tokens: one graph for all
        hidden_states, encoder_hidden_states = hidden_states.contiguous(), encoder_hidden_states.contiguous()
    if cache is not None and index == 1:
        cache.block1_in = (hidden_states, encoder_hidden_states)
    cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
    text_len = encoder_hidden_states.size(1)
    packed, gate_msa, enc_gate_msa = opt.pre(self, hidden_states, encoder_hidden_states, temb, cos, sin,
                                             opt.options.contiguous_v, context.packing)
    out = context.attention(packed, text_len)
    h, e = opt.post(self, out, hidden_states, encoder_hidden_states, temb, gate_msa, enc_gate_msa,
                    opt.options.gelu_epilogue)
    if cache is not None:
        if index == 0:
            cache.decide(h - hidden_states, context)
        elif index == last:
            h1, e1 = cache.block1_in
            cache.residual = (h - h1, e - e1)
            cache.block1_in = None
    return h, e


class Fp8Linear(nn.Module):
    """y = x W^T + b with x and W in float8 e4m3: W per output channel, x per row (dynamic), bf16 out."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1, keepdim=True) / 448.0).clamp_min(1e-12)
        self.register_buffer("weight_fp8", (w / scale).to(torch.float8_e4m3fn))          # [N, K]
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())          # [1, N] fp32
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        scale = (x2.abs().amax(dim=1, keepdim=True).float() / 448.0).clamp_min(1e-12)   # [M, 1]
        xq = (x2.float() / scale).to(torch.float8_e4m3fn)
        if x.is_cuda:
            y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale,
                                 out_dtype=x.dtype)
        else:  # reference arithmetic for CPU tests
            y = ((xq.float() * scale) @ (self.weight_fp8.float() * self.weight_scale.t()).t()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def _fp8_linears(block) -> None:
    attn = block.attn1
    names = ["to_qkv"] if getattr(attn, "fused_projections", False) else ["to_q", "to_k", "to_v"]
    for name in names:
        setattr(attn, name, Fp8Linear(getattr(attn, name)))
    attn.to_out[0] = Fp8Linear(attn.to_out[0])
    ff = block.ff.net
    ff[0].proj = Fp8Linear(ff[0].proj)
    ff[2] = Fp8Linear(ff[2])


def _fuse_qkv(attn) -> None:
    """diffusers' ``Attention.fuse_projections`` (0.42.1, self-attention without added projections, which is every
    CogVideoX block), minus its throw-away work: it builds ``to_qkv`` as an ``nn.Linear`` whose weights are first
    randomly initialised (kaiming-uniform of [3D x D], 3.3 s on the 2b's 30 blocks on a CPU) and then overwritten
    by a copy of the concatenation; here the concatenation itself becomes the weight. Other attention layouts
    take diffusers' own method."""
    if attn.is_cross_attention or getattr(attn, "add_q_proj", None) is not None:
        attn.fuse_projections()
        return
    parts = (attn.to_q, attn.to_k, attn.to_v)
    weight = torch.cat([p.weight.data for p in parts])
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=attn.use_bias, device="meta", dtype=weight.dtype)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if attn.use_bias:
        layer.bias = nn.Parameter(torch.cat([p.bias.data for p in parts]), requires_grad=False)
    attn.to_qkv = layer
    attn.fused_projections = True


def _share_qkv_storage(attn) -> None:
    """Make to_q/to_k/to_v views into the fused to_qkv weights: no second copy in memory, and diffusers' stock
    processor (which reads to_q/to_k/to_v) still computes the same thing."""
    parts = (attn.to_q, attn.to_k, attn.to_v)
    sizes = [p.weight.shape[0] for p in parts]
    for layer, weight in zip(parts, attn.to_qkv.weight.split(sizes, dim=0)):
        layer.weight = nn.Parameter(weight, requires_grad=False)
    if attn.to_qkv.bias is not None:
        for layer, bias in zip(parts, attn.to_qkv.bias.split(sizes, dim=0)):
            layer.bias = nn.Parameter(bias, requires_grad=False)


@torch.no_grad()
def optimize_transformer(transformer, options: OptimizeOptions) -> Optimizer:
    """Apply ``options`` to a (parallelized) CogVideoX transformer in place; idempotent per option set.

    Fusing QKV turns the separate q/k/v weights into views of the fused one (no extra memory; diffusers' stock
    processor still works on the module).
    fp8 replaces the linears for good (their bf16 weights are freed).
    """
    previous = getattr(transformer, "_xdit_optimizer", None)
    if previous is not None and previous.options == options:
        return previous
    for block in transformer.transformer_blocks:
        attn = block.attn1
        if options.fuse_qkv and not getattr(attn, "fused_projections", False) and not isinstance(
                getattr(attn, "to_q", None), Fp8Linear):
            _fuse_qkv(attn)
            _share_qkv_storage(attn)
        if options.fp8 and not isinstance(block.ff.net[2], Fp8Linear):
            _fp8_linears(block)
    opt = Optimizer(transformer, options)
    for index, block in enumerate(transformer.transformer_blocks):
        if not hasattr(block, "_xdit_plain_forward"):
            block._xdit_plain_forward = block.forward
        block._xdit_optimizer, block._xdit_index = opt, index
        block.forward = types.MethodType(_fast_block_forward, block)
    transformer._xdit_optimizer = opt
    return opt


def remove_optimizations(transformer) -> None:
    """Back to plain block forwards (fused projections and fp8 layers stay)."""
    for block in transformer.transformer_blocks:
        if hasattr(block, "_xdit_plain_forward"):
            block.forward = block._xdit_plain_forward
            del block._xdit_plain_forward
    transformer.__dict__.pop("_xdit_optimizer", None)
