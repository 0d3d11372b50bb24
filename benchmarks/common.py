"""Shared pieces of the benchmark scripts: full-size random models built on the device, timers, FLOP counts,
results files that are rewritten after every measurement (a run cut short keeps what it measured).

Nothing here downloads anything: weights are random (seeded) and built directly on the GPU; the tokenizer is
the tiny model's (it only produces token ids for the random T5-XXL).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# These benchmarks measure steady-state speed: compile the first run of a shape (the default policy would run it
# eager while a background process compiles). cold_start.py measures the default policy itself.
os.environ.setdefault("XDIT_COGVIDEO_COMPILE", "always")

TEXT_LEN = 226

# Published diffusers configs (THUDM/CogVideoX-2b, -5b, CogVideoX1.5-5b transformer/config.json).
_BASE = dict(
    num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, flip_sin_to_cos=True,
    freq_shift=0, time_embed_dim=512, text_embed_dim=4096, num_layers=30, dropout=0.0, attention_bias=True,
    sample_width=90, sample_height=60, sample_frames=49, patch_size=2, temporal_compression_ratio=4,
    max_text_seq_length=226, activation_fn="gelu-approximate", timestep_activation_fn="silu",
    norm_elementwise_affine=True, norm_eps=1e-5, spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0, use_rotary_positional_embeddings=False,
    use_learned_positional_embeddings=False,
)
MODELS = {
    "2b": dict(transformer=dict(_BASE), size=(49, 480, 720), vae_scaling=1.15258426),
    "5b": dict(transformer=dict(_BASE, num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True),
               size=(49, 480, 720), vae_scaling=0.7),
    "1.5-5b": dict(transformer=dict(_BASE, num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True,
                                    patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300,
                                    sample_frames=81),
                   size=(81, 768, 1360), vae_scaling=0.7),
}
# CPU smoke-test twins (--tiny): same code paths, small sizes; heads divisible by 2 and 4.
_TINY = dict(num_attention_heads=4, attention_head_dim=16, time_embed_dim=16, text_embed_dim=32, num_layers=2,
             in_channels=4, out_channels=4)
TINY_MODELS = {
    "2b": dict(transformer=dict(MODELS["2b"]["transformer"], **_TINY, sample_height=4, sample_width=6, sample_frames=9),
               size=(9, 32, 48), vae_scaling=1.15258426),
    "5b": dict(transformer=dict(MODELS["5b"]["transformer"], **_TINY, sample_height=4, sample_width=6, sample_frames=9),
               size=(9, 32, 48), vae_scaling=0.7),
    "1.5-5b": dict(transformer=dict(MODELS["1.5-5b"]["transformer"], **_TINY, sample_height=4, sample_width=6,
                                    sample_frames=9),
                   size=(9, 32, 48), vae_scaling=0.7),
}
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              layer_norm_epsilon=1e-6, dropout_rate=0.0)
T5_TINY = dict(T5_XXL, vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)


def model_spec(name: str, tiny: bool) -> dict:
    return (TINY_MODELS if tiny else MODELS)[name]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ building

def build_transformer(name: str, device, dtype=torch.bfloat16, tiny: bool = False, seed: int = 0):
    """A random-weight CogVideoX transformer of the published size, made on ``device`` (no file, no CPU copy)."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = CogVideoXTransformer3DModel(**model_spec(name, tiny)["transformer"])
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_text_encoder(device, dtype=torch.bfloat16, tiny: bool = False, seed: int = 1):
    """(tokenizer, random T5 encoder): T5-XXL sized unless ``tiny``; the tokenizer is the tiny model's."""
    from transformers import T5Config, T5EncoderModel

    try:
        from comfyui_xdit_cogvideo.tiny import _tokenizer

        tokenizer = _tokenizer()
    except Exception as error:  # noqa: BLE001 - another transformers version: ids are all the T5 needs
        log(f"tiny tokenizer unavailable ({type(error).__name__}: {error}); using a word-hash tokenizer")
        tokenizer = HashTokenizer()
    torch.manual_seed(seed)
    with torch.device(device):
        encoder = T5EncoderModel(T5Config(**(T5_TINY if tiny else T5_XXL)))
    return tokenizer, encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)


class HashTokenizer:
    """Stand-in tokenizer: one id per word (hashed), EOS 1, pad 0; enough to drive a random T5."""

    def __call__(self, text, padding="max_length", max_length=None, truncation=False, add_special_tokens=True,
                 return_tensors="pt", **_):
        import zlib
        from types import SimpleNamespace

        texts = [text] if isinstance(text, str) else list(text)
        rows = [[3 + zlib.crc32(w.encode()) % 500 for w in t.split()] + [1] for t in texts]
        if truncation and max_length:
            rows = [r[:max_length] for r in rows]
        width = max_length if padding == "max_length" and max_length else max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return SimpleNamespace(input_ids=ids, attention_mask=(ids != 0).long())

    def batch_decode(self, ids, **_):
        return ["" for _ in ids]


def build_vae(name: str, device, dtype=torch.bfloat16, tiny: bool = False, seed: int = 2):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    kwargs = dict(scaling_factor=model_spec(name, tiny)["vae_scaling"])
    if tiny:
        kwargs.update(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4,
                      sample_height=32, sample_width=48)
    with torch.device(device):
        vae = AutoencoderKLCogVideoX(**kwargs)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def scheduler_for(transformer):
    """The scheduler our engine uses for this model (diffusers' published DDIM defaults)."""
    from comfyui_xdit_cogvideo.loading import ResolvedSource, load_scheduler
    from comfyui_xdit_cogvideo.variants import ModelInfo

    return load_scheduler(ResolvedSource(Path("<memory>"), None, None, None, None),
                          ModelInfo.from_config(transformer.config), None)


def random_embeds(text_dim: int, device, dtype=torch.bfloat16, seed: int = 3):
    g = torch.Generator("cpu").manual_seed(seed)
    pos, neg = (torch.randn(1, TEXT_LEN, text_dim, generator=g) for _ in range(2))
    return pos.to(device, dtype), neg.to(device, dtype)


# ------------------------------------------------------------------------------------------------ timing

class StepTimer:
    """Records a CUDA event at every step boundary (no host sync); read the intervals once at the end."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin(self):
        self.marks = [self._mark()]

    def step(self, *_, **__):
        self.marks.append(self._mark())
        return {}

    def times(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def median_after(times: list[float], warmup: int) -> float | None:
    rest = times[warmup:] if len(times) > warmup else times[-1:]
    return statistics.median(rest) if rest else None


def time_fn(fn, device, warmup: int = 1, reps: int = 3) -> float:
    """Median seconds of ``fn()`` (events around each call)."""
    for _ in range(warmup):
        fn()
    timer = StepTimer(device)
    timer.begin()
    for _ in range(reps):
        fn()
        timer.step()
    return statistics.median(timer.times())


def peak_gib(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """a vs reference b: relative L2 error, max abs difference, max |b|."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return {"rel_l2": float((a - b).norm() / b.norm().clamp_min(1e-30)), "max_abs": float((a - b).abs().max()),
            "ref_max_abs": float(b.abs().max()), "finite": bool(torch.isfinite(a).all())}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of frames in [0, 1]."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


# ------------------------------------------------------------------------------------------------ FLOPs

def tokens_for(config: dict, size: tuple[int, int, int]) -> int:
    frames, height, width = size
    latent = (frames - 1) // 4 + 1
    pt = config.get("patch_size_t") or 1
    latent += (-latent) % pt
    p = config["patch_size"]
    return latent // pt * (height // 8 // p) * (width // 8 // p)


def step_flops(config: dict, size: tuple[int, int, int], batch: int = 2, q_tokens: int | None = None,
               heads_fraction: float = 1.0) -> dict:
    """FLOPs of one transformer call (batch 2 = CFG): linear layers and attention, counted as 2 per MAC.

    ``q_tokens``/``heads_fraction`` describe one rank's share (its query tokens, its share of heads).
    """
    video = tokens_for(config, size)
    seq = TEXT_LEN + video
    d = config["num_attention_heads"] * config["attention_head_dim"]
    ff = 4 * d
    layers = config["num_layers"]
    pt = config.get("patch_size_t") or 1
    patch_in = config["in_channels"] * config["patch_size"] ** 2 * pt
    patch_out = config["out_channels"] * config["patch_size"] ** 2 * pt
    q = seq if q_tokens is None else q_tokens
    linear_per_token = 2 * (4 * d * d + 2 * d * ff)
    linear = batch * layers * q * linear_per_token
    linear += batch * 2 * (video * patch_in * d + TEXT_LEN * config["text_embed_dim"] * d + video * d * patch_out)
    attention = batch * layers * 4 * q * seq * d * heads_fraction
    return {"tokens": seq, "linear": linear, "attention": attention, "total": linear + attention}


# ------------------------------------------------------------------------------------------------ results

class Results:
    """A JSON document rewritten after each ``put``; plus a deadline the suite checks before each task."""

    def __init__(self, path: str | Path, budget_s: float):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self.deadline = self.start + budget_s
        self.data: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": budget_s, "skipped": []}
        self.save()

    def left(self) -> float:
        return self.deadline - time.time()

    def put(self, key: str, value) -> None:
        node = self.data
        parts = key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        self.save()

    def skip(self, what: str, why: str) -> None:
        self.data["skipped"].append({"what": what, "why": why})
        log(f"SKIP {what}: {why}")
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.time() - self.start, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


_T0 = time.time()


def add_folder_args(p) -> None:
    """The options every whole-job benchmark over random model folders shares (pool_bench, decode_bench, cold_start)."""
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--models-dir", default="/tmp/models")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda")


def json_document(args) -> tuple[dict, "callable"]:
    """The result document (command, environment, per-model rows) and a ``save`` that rewrites ``args.out``."""
    out: dict = {"command": " ".join(sys.argv), "env": environment(args.device), "models": {}}

    def save() -> None:
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))

    return out, save


def log(message: str) -> None:
    print(f"[{time.time() - _T0:7.1f}s] {message}", flush=True)


def environment(device) -> dict:
    import diffusers
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"),
           "host": platform.node()}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2 ** 30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        try:
            import subprocess

            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=20).stdout.strip()
        except Exception as error:  # noqa: BLE001
            env["driver"] = f"unknown ({error})"
    for module in ("flash_attn.cute", "yunchang", "xfuser"):
        try:
            from importlib.metadata import version

            dist = {"flash_attn.cute": "flash-attn-4"}.get(module, module)
            env[dist] = version(dist)
        except Exception:  # noqa: BLE001
            env[module] = None
    env["env"] = {k: v for k, v in os.environ.items() if k.startswith(("TORCHINDUCTOR", "FLASH_ATTENTION", "NCCL",
                                                                       "PYTORCH_CUDA"))}
    return env
