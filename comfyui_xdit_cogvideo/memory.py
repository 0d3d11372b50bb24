"""Memory plans: how much each rank needs for a job, and which plan makes the job fit the devices it runs on.

Three plans, cheapest in speed first:

- ``fast``: every rank holds the whole transformer; rank 0 also keeps T5 and the VAE resident (the original
  behaviour). Decode is plain on one GPU, tiled and spread over the ranks on several.
- ``low``: the transformer's weights are sharded over the layout's ranks with PyTorch FSDP2 (``fully_shard``,
  each block gathered just in time, the next one prefetched), T5 lives on the CPU and visits the GPU only to
  encode (or encodes on the CPU when even that does not fit), and the VAE decode is tiled with a tile size
  that fits the budget. On one GPU ``low`` is the same minus the sharding.
- ``offload`` (one GPU): the transformer stays in CPU memory and diffusers' group offloading streams one block
  at a time onto the GPU (CUDA streams overlap the copy of the next block with the current one); T5 on the CPU.

``memory="auto"`` picks the first plan whose estimated per-rank peak fits every device's budget; when none fits,
the job is refused before it starts with the needed and free memory of every device.

The estimates are per-rank peaks in bytes: weights from the checkpoint headers (or the published sizes),
activations from tokens x hidden size with constants fitted to measurements on one H200 (bf16, see
``SAMPLE_ACTIVATIONS`` and ``DECODE_BYTES_PER_PIXEL``), plus a fixed margin for the CUDA workspace, NCCL
buffers and fragmentation.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .layout import Layout

GiB = 2 ** 30
PLANS = ("fast", "low", "offload")
MEMORY_MODES = ("auto",) + PLANS
TEXT_PLACEMENTS = ("gpu", "swap", "cpu")

# Peak sampling activations, in units of one hidden-state tensor [batch, tokens, hidden] of the model dtype.
# Fitted to one H200, bf16, 49 x 480 x 720, CFG batch 2 (2b: 5.45 GiB peak - 3.2 GiB weights = 18 units;
# 5b: 15.1 - 10.4 = 23 units; 1.5-5b at 81 x 768 x 1360: 21.6 - 10.4 = 21 units); the largest, rounded up.
SAMPLE_ACTIVATIONS = 24
# VAE decode peak per output pixel of one tile (or the whole frame, untiled) for the real CogVideoX VAE (first
# decoder width 128) in bf16, with the VAE's own temporal batch of 2 latent frames: untiled 480 x 720 decode
# measured 19.1 GiB on an H200 -> (19.1 - 0.4) GiB / 345,600 pixels. Scales with the VAE's width and dtype.
DECODE_BYTES_PER_PIXEL = 58_100
# T5 encode activations (226 tokens, batch 1): small next to the weights.
TEXT_ACTIVATIONS = GiB // 4
# Reserved on every GPU for cuBLAS/cuDNN workspaces, NCCL buffers, compiled-graph pools and fragmentation.
MARGIN = GiB
MARGIN_FRACTION = 0.05
# Blocks whose full weights exist at once under FSDP / group offloading: the running one and the prefetched next.
IN_FLIGHT_BLOCKS = 2

# Published sizes (elements) of the real models, for predictions without the weights on disk: transformer total,
# one block, blocks; T5-XXL encoder; VAE. Counted from diffusers 0.42 / transformers modules on the meta device.
PUBLISHED = {
    "2b": dict(transformer=1_693_783_872 + 34_129_920, block=56_081_536, layers=30),
    "5b": dict(transformer=5_570_283_072, block=132_197_632, layers=42),
    "1.5-5b": dict(transformer=5_570_676_352, block=132_197_632, layers=42),
}
T5_XXL = 4_893_906_944
COGVIDEOX_VAE = 215_583_907


class MemoryPlanError(ValueError):
    """A job that fits no memory plan on these devices (or a bad memory setting), with the numbers."""


def check_mode(mode: str) -> str:
    """``mode`` lower-cased if it is one of MEMORY_MODES, else a one-line error naming the choices."""
    value = str(mode).strip().lower()
    if value not in MEMORY_MODES:
        raise MemoryPlanError(f"unknown memory plan {mode!r}; choose one of {', '.join(MEMORY_MODES)}")
    return value


def gib(n: float | None) -> str:
    return "unknown" if n is None else f"{n / GiB:.1f} GiB"


@dataclass(frozen=True)
class ModelSizes:
    """Element counts of the parts that take memory (parameters and buffers)."""

    transformer: int
    block: int
    layers: int
    text_encoder: int = 0
    vae: int = 0
    vae_width: int = 128  # the VAE decoder's first block width: decode activations scale with it

    @property
    def outside_blocks(self) -> int:
        """Embeddings, norms and projections outside the blocks: FSDP keeps them whole during a forward."""
        return max(0, self.transformer - self.block * self.layers)

    @classmethod
    def published(cls, variant: str, text_encoder: bool = True, vae: bool = True) -> "ModelSizes":
        """The real CogVideoX sizes (``variant`` 2b, 5b, 1.5-5b, with or without -i2v)."""
        base = variant.removesuffix("-i2v")
        if base not in PUBLISHED:
            raise MemoryPlanError(f"no published sizes for {variant!r}; choose one of {', '.join(PUBLISHED)}")
        return cls(**PUBLISHED[base], text_encoder=T5_XXL if text_encoder else 0, vae=COGVIDEOX_VAE if vae else 0)

    @classmethod
    def of_source(cls, resolved, info) -> "ModelSizes":
        """Sizes read from the checkpoints' safetensors headers (no tensor is loaded), plus the buffers the
        transformer builds itself (2b's sin-cos position table)."""
        counts = header_counts(resolved.transformer)
        total = sum(counts.values())
        blocks: dict[str, int] = {}
        for key, n in counts.items():
            match = _BLOCK_KEY.search(key)
            if match:
                blocks[match.group(1)] = blocks.get(match.group(1), 0) + n
        block = max(blocks.values(), default=0)
        if not info.rotary and not info.learned_positions:  # 2b: a non-persistent sin-cos buffer
            frames = (info.sample_frames - 1) // 4 + 1
            total += (info.text_len + frames * (info.sample_height // info.patch_size)
                      * (info.sample_width // info.patch_size)) * info.heads * info.head_dim
        text = sum(header_counts(resolved.text_encoder).values()) if resolved.text_encoder else 0
        vae = sum(header_counts(resolved.vae).values()) if resolved.vae else 0
        return cls(total, block, info.layers, text, vae, vae_width(resolved.vae))


def safetensors_files(path: Path) -> list[Path]:
    """The file itself, or every .safetensors of a folder (a sharded checkpoint), sorted."""
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def header_counts(path: Path | str | None, strict: bool = True) -> dict[str, int]:
    """Element count per tensor name of a .safetensors file, or of every .safetensors file in a folder, from the
    headers only (no tensor is read). The one reader behind every size estimate (``limits`` and the plans).

    A file whose header cannot be parsed, or whose data is shorter than its header says (an interrupted download),
    raises ValueError naming it; with ``strict=False`` such files are left out (the loader names them better)."""
    counts: dict[str, int] = {}
    if path is None:
        return counts
    for file in safetensors_files(Path(path)):
        try:
            counts.update(_file_counts(file))
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as error:
            if strict:
                raise ValueError(f"cannot read the safetensors header of {file}: {error}") from None
    return counts


def _file_counts(file: Path) -> dict[str, int]:
    with open(file, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    counts, end = {}, 0
    for key, entry in header.items():
        if key != "__metadata__":
            counts[key] = math.prod(entry["shape"])
            end = max(end, int(entry["data_offsets"][1]))
    if 8 + size + end > file.stat().st_size:
        raise ValueError(f"the header describes {8 + size + end} bytes but the file has {file.stat().st_size} "
                         "(truncated)")
    return counts


def vae_width(path: Path | None) -> int:
    """Channels of the VAE decoder's full-resolution block, from a VAE folder's config (128 for the published
    VAE, and when there is no readable config)."""
    config = Path(path) / "config.json" if path is not None and Path(path).is_dir() else None
    if config is not None and config.exists():
        try:
            return int(json.loads(config.read_text())["block_out_channels"][0])
        except (KeyError, ValueError, IndexError, TypeError):
            pass
    return 128


_BLOCK_KEY = re.compile(r"(?:^|\.)(?:transformer_)?blocks\.(\d+)\.")  # diffusers and ComfyUI-native names


@dataclass(frozen=True)
class JobShape:
    """What the activation estimates need to know about a job."""

    frames: int
    height: int
    width: int
    cfg_batch: int = 2  # 2 with classifier-free guidance (uncond + cond rows), else 1
    dtype_bytes: int = 2

    @classmethod
    def of(cls, request, info, dtype_bytes: int) -> "JobShape":
        """From a resolved GenerationRequest."""
        return cls(request.frames, request.height, request.width, 2 if request.use_cfg else 1, dtype_bytes)


def video_tokens(info, job: JobShape) -> int:
    latent_frames = (job.frames - 1) // 4 + 1
    if info.patch_size_t:
        latent_frames = -(-latent_frames // info.patch_size_t)
    return latent_frames * (job.height // 8 // info.patch_size) * (job.width // 8 // info.patch_size)


def sample_activations(info, job: JobShape, layout: Layout) -> int:
    """Peak bytes of one rank's activations while sampling: its CFG rows and its share of the video tokens."""
    batch = max(1, job.cfg_batch // layout.cfg)
    tokens = info.text_len + -(-video_tokens(info, job) // layout.seq_degree)
    return SAMPLE_ACTIVATIONS * batch * tokens * info.heads * info.head_dim * job.dtype_bytes


def decode_activations(pixels: int, sizes: ModelSizes, dtype_bytes: int) -> int:
    """Peak bytes of decoding ``pixels`` output pixels at once (one tile, or a whole frame untiled)."""
    return int(DECODE_BYTES_PER_PIXEL * pixels * sizes.vae_width / 128 * dtype_bytes / 2)


def decode_output(job: JobShape) -> int:
    """The decoded video (and its blended copy) on the first rank."""
    return 2 * job.frames * job.height * job.width * 3 * job.dtype_bytes


def tile_candidates(default: tuple[int, int], factor: int = 8) -> tuple[tuple[int, int], ...]:
    """Decode tile sizes (output pixels) to try, largest first: the VAE's own tile, then smaller ones of the same
    aspect, in whole latent pixels and at least 2 latent pixels a side."""
    out = []
    for scale in (1, 0.8, 2 / 3, 0.5, 0.4, 1 / 3, 0.25):
        tile = tuple(max(2 * factor, int(side * scale) // factor * factor) for side in default)
        if tile not in out:
            out.append(tile)
    return tuple(out)


# For the real CogVideoX VAE (240 x 360 pixel tiles by default).
TILE_CANDIDATES = tile_candidates((240, 360))


@dataclass(frozen=True)
class MemoryPlan:
    """A resolved plan for one job. ``shard``: ranks the transformer weights are sharded over (1 = a whole copy
    per rank). ``text``: where T5 lives (gpu = resident, swap = on the CPU, moved to the GPU to encode, cpu =
    encodes on the CPU). ``decode_tile``: tile (height, width) in pixels that fits, ``None`` = untiled fits.
    ``peaks``/``budgets``: per-rank estimated peak and usable bytes (``None`` = unknown / unlimited)."""

    name: str = "fast"
    shard: int = 1
    text: str = "gpu"
    decode_tile: tuple[int, int] | None = None
    peaks: tuple[int, ...] = ()
    budgets: tuple[int | None, ...] = ()
    requested: str = "fast"
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if self.name not in PLANS:
            raise MemoryPlanError(f"unknown memory plan {self.name!r}; choose one of {', '.join(PLANS)}")
        if self.text not in TEXT_PLACEMENTS:
            raise MemoryPlanError(f"unknown T5 placement {self.text!r}; choose one of {', '.join(TEXT_PLACEMENTS)}")

    @classmethod
    def default(cls, name: str, world: int = 1) -> "MemoryPlan":
        """A plan by name, without device figures: low shards over ``world`` ranks and swaps T5; offload keeps T5
        on the CPU."""
        name = check_mode(name)
        if name == "auto":
            name = "fast"
        text = {"fast": "gpu", "low": "swap", "offload": "cpu"}[name]
        return cls(name, world if name == "low" else 1, text, requested=name)

    def describe(self) -> str:
        """One line for status, the web panel and the CLI summary."""
        parts = [self.name + (" (auto)" if self.requested == "auto" else "")]
        if self.shard > 1:
            parts.append(f"transformer sharded over {self.shard} ranks (FSDP2)")
        if self.name == "offload":
            parts.append("transformer blocks streamed from CPU (group offload)")
        parts.append({"gpu": "T5 resident", "swap": "T5 moved to the device only to encode",
                      "cpu": "T5 encodes on the CPU"}[self.text])
        if self.decode_tile:
            parts.append(f"decode tiles {self.decode_tile[0]}x{self.decode_tile[1]}")
        if self.peaks:
            parts.append(f"est. peak {gib(max(self.peaks))}/rank")
        return ", ".join(parts)

    def wire(self) -> dict:
        out = asdict(self)
        out["describe"] = self.describe()
        return out

    @classmethod
    def from_wire(cls, data: dict | None) -> "MemoryPlan | None":
        if not data:
            return None
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("peaks", "budgets", "notes"):
            data[key] = tuple(data.get(key) or ())
        if data.get("decode_tile"):
            data["decode_tile"] = tuple(data["decode_tile"])
        return cls(**data)


def rank_peaks(plan: MemoryPlan, sizes: ModelSizes, info, job: JobShape, layout: Layout,
               ranks: int | None = None) -> list[int]:
    """Estimated peak bytes of each rank for a whole job (encode on rank 0, sample, decode) under ``plan``."""
    ranks = ranks or layout.world_size
    b = job.dtype_bytes
    if plan.name == "offload":
        resident = (sizes.outside_blocks + IN_FLIGHT_BLOCKS * sizes.block) * b
    elif plan.shard > 1:
        resident = (-(-sizes.transformer // plan.shard) + IN_FLIGHT_BLOCKS * sizes.block + sizes.outside_blocks) * b
    else:
        resident = sizes.transformer * b
    text = sizes.text_encoder * b
    vae = sizes.vae * b
    sample = sample_activations(info, job, layout)
    if plan.decode_tile is None:
        decode_pixels = job.height * job.width
    else:
        decode_pixels = min(plan.decode_tile[0] * plan.decode_tile[1], job.height * job.width)
    decode = vae + decode_activations(decode_pixels, sizes, b) if sizes.vae else 0
    peaks = []
    for rank in range(ranks):
        leader = rank == 0
        t5_resident = text if (leader and plan.text == "gpu") else 0
        encode = text + TEXT_ACTIVATIONS if (leader and plan.text in ("gpu", "swap") and text) else 0
        decoding = decode + (decode_output(job) if leader else 0) if (plan.decode_tile or leader) else 0
        vae_resident = vae if (plan.decode_tile or leader) else 0
        phases = (resident + encode,
                  resident + t5_resident + vae_resident + sample,
                  resident + t5_resident + decoding)
        peaks.append(int(max(phases)))
    return peaks


def usable(budget: int | None) -> int | None:
    """What a job may plan to use of ``budget`` bytes after the fixed margin."""
    if budget is None:
        return None
    return int(budget * (1 - MARGIN_FRACTION)) - MARGIN


def _fits(peaks: list[int], budgets: list[int | None]) -> bool:
    return all(b is None or p <= usable(b) for p, b in zip(peaks, budgets))


def _candidates(name: str, world: int, sizes: ModelSizes, job: JobShape, has_text: bool) -> list[MemoryPlan]:
    """The variants of plan ``name`` worth trying, most memory (fastest) first."""
    tiled = [t for t in TILE_CANDIDATES if t[0] < job.height or t[1] < job.width] or [TILE_CANDIDATES[0]]
    tiles: list[tuple[int, int] | None] = ([None] if world == 1 else []) + tiled
    if name == "fast":  # plain decode on one GPU when it fits, else (and always on several) the VAE's own tiles
        return [MemoryPlan("fast", 1, "gpu", tile) for tile in ([None] if world == 1 else []) + tiled[:1]]
    texts = ("swap", "cpu") if has_text else ("cpu",)
    shard = world if name == "low" else 1
    return [MemoryPlan(name, shard, text, tile) for text in texts for tile in tiles]


def plan_memory(mode: str, sizes: ModelSizes, info, job: JobShape, layout: Layout,
                budgets: list[int | None]) -> MemoryPlan:
    """The plan for ``mode`` (auto, fast, low, offload) on devices with ``budgets`` bytes each (``None`` =
    unknown: a CPU rank, no limit). ``auto`` takes the first plan that fits every rank; an explicit plan takes
    its best-fitting variant, or its leanest one when nothing fits (the user asked for it). Raises
    MemoryPlanError with needed vs free per device when ``auto`` finds no plan."""
    mode = check_mode(mode)
    world = layout.world_size
    budgets = list(budgets)[:world] + [None] * max(0, world - len(budgets))
    if mode == "offload" and world > 1:
        raise MemoryPlanError(f"memory plan 'offload' runs on one GPU; this layout ({layout}) has {world} ranks: "
                              "use 'low' (weights sharded over the ranks) or one device")
    names = [mode] if mode != "auto" else ["fast", "low"] + (["offload"] if world == 1 else [])
    tried = []
    for name in names:
        options = _candidates(name, world, sizes, job, sizes.text_encoder > 0)
        for option in options:
            peaks = rank_peaks(option, sizes, info, job, layout)
            if _fits(peaks, budgets):
                return replace(option, peaks=tuple(peaks), budgets=tuple(budgets), requested=mode)
        leanest = options[-1]
        tried.append((leanest, rank_peaks(leanest, sizes, info, job, layout)))
    if mode != "auto":
        plan, peaks = tried[-1]
        return replace(plan, peaks=tuple(peaks), budgets=tuple(budgets), requested=mode,
                       notes=(f"estimated peak {gib(max(peaks))} exceeds a device's budget",))
    lines = []
    for plan, peaks in tried:
        per = "; ".join(f"rank {r}: needs {gib(p + MARGIN)} ({gib(p)} + margin), has {gib(b)}"
                        for r, (p, b) in enumerate(zip(peaks, budgets)) if b is not None and p > usable(b))
        lines.append(f"{plan.name}: {per}")
    raise MemoryPlanError(
        f"{info.variant} at {job.frames}x{job.height}x{job.width} fits no memory plan on these devices (" +
        " | ".join(lines) + "); use more GPUs, fewer frames or a smaller size")


def device_budget(memory: dict | None) -> int | None:
    """Usable bytes of one rank from its heartbeat memory figures: free now plus what this process holds
    (a resident model it would replace). ``None`` for CPU ranks (no device limit)."""
    if not memory or memory.get("free") is None:
        return None
    return int(memory["free"]) + int(memory.get("reserved") or 0)


def plan_job(spec, info, request, layout: Layout, rank_memory: list[dict | None]) -> MemoryPlan:
    """The plan for a pool job: ``spec`` a pool ModelSpec (its ``memory`` mode), ``request`` resolved,
    ``rank_memory`` each rank's heartbeat memory figures (CUDA: free/reserved; CPU ranks: no limit)."""
    try:
        sizes = ModelSizes.of_source(spec.source.resolve(), info)
    except (OSError, ValueError) as error:  # unreadable weights fail where they load, in the workers
        mode = check_mode(spec.memory)
        return replace(MemoryPlan.default(mode, layout.world_size), requested=mode,
                       notes=(f"no size estimate: {error}",))
    needs_text = request.prompt_embeds is None or (request.use_cfg and request.negative_prompt_embeds is None)
    if not needs_text:
        sizes = replace(sizes, text_encoder=0)
    dtype_bytes = {"fp32": 4, "bf16": 2, "fp16": 2}.get(spec.dtype, 2)
    job = JobShape.of(request, info, dtype_bytes)
    budgets = [device_budget(m) for m in list(rank_memory)[:layout.world_size]]
    return plan_memory(spec.memory, sizes, info, job, layout, budgets)


def untiled_decode_peak(vae_path: Path | None, frames: int, height: int, width: int, dtype_bytes: int = 2) -> int:
    """Estimated peak bytes of one untiled VAE decode of a ``frames`` x ``height`` x ``width`` video on one device:
    the VAE's weights (from its safetensors headers; the published VAE's size without a path), the whole-frame
    activations (``DECODE_BYTES_PER_PIXEL``, fitted to the 19.1 GiB measured for 49 x 480 x 720 in bf16) and the
    decoded video. What the automatic decode choice compares with the first rank's free memory."""
    weights = sum(header_counts(vae_path).values()) if vae_path is not None else COGVIDEOX_VAE
    sizes = ModelSizes(0, 0, 0, vae=weights, vae_width=vae_width(vae_path))
    job = JobShape(frames, height, width, 1, dtype_bytes)
    return weights * dtype_bytes + decode_activations(height * width, sizes, dtype_bytes) + decode_output(job)


def decode_budget(memory: dict | None) -> int | None:
    """Bytes one rank may plan to use for a decode from its heartbeat memory figures: free now plus what its
    allocator caches but does not use (the resident model stays), after the margin. ``None`` for CPU ranks."""
    if not memory or memory.get("free") is None:
        return None
    return usable(int(memory["free"]) + int(memory.get("reserved") or 0) - int(memory.get("allocated") or 0))
