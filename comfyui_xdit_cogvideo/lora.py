"""LoRA for CogVideoX: read the formats in the wild, merge them into the resident weights, switch without reloading.

Every rank reads the same LoRA files and merges them into its own resident transformer, so a step costs exactly
what it costs without a LoRA (no extra matmuls). Strength semantics: 1.0 = as trained, i.e. the delta
``strength * alpha / rank * up @ down`` where the file gives an alpha, ``strength * up @ down`` where it does not
(diffusers/PEFT convention). This is *not* the official demo's ``lora_scale = 1 / rank``.

Switching LoRAs or strengths never reloads the base model: before a layer is first changed, its original weight
(in its storage dtype: bf16, fp16, fp32 or fp8 with its scales) is copied to CPU memory, and every merge is
computed from that copy, ``W = round(W_orig + sum_i delta_i)`` in fp32, so unmerging is a bitwise restore and a
switch gives bitwise the weights a fresh load with the new set would give. The cost is CPU memory equal to the
touched weights (5b, every attention and feed-forward linear: ~10 GB per rank in bf16; attention only: ~3.2 GB).
Under FSDP (memory plan ``low``) a rank saves and rewrites only the rows of each weight it holds; under group
offloading the weights rest on the CPU between steps and are merged there. Weights computed on every use from a
stored tensor (fp8-resident storage, a parametrization) are never rewritten: the LoRAs stay beside them as
low-rank factors (``_LoraTerms``), because rounding ``W + delta`` to fp8 would lose most of the delta.

Formats (safetensors only), detected from the key names:
- diffusers / PEFT: ``transformer.transformer_blocks.N.attn1.to_q.lora_A.weight`` / ``lora_B.weight``; alpha from
  ``.alpha`` keys or diffusers' ``lora_adapter_metadata`` (``lora_alpha``, ``r``, patterns, rsLoRA); none = scale 1.
- ``lora_down.weight`` / ``lora_up.weight`` (+ ``.alpha``) under any of the names below.
- kohya: ``lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight`` + ``.alpha`` (scale alpha / rank).
- ComfyUI-native names: ``diffusion_model.blocks.N.q...`` and ``lora_unet_blocks_N_q...`` (renamed through
  ``formats``' name table, the one the model loader uses).
- DoRA: PEFT ``lora_magnitude_vector`` and LyCORIS/kohya ``dora_scale``, applied exactly:
  ``W + strength * (m * V / ||V|| - W)`` with ``V = W + scale * up @ down``, the norm per output row (per input
  column when the scale has one value per input), as PEFT and LyCORIS compute it; strength interpolates as in
  ComfyUI (0 = off, 1 = as trained; diffusers' ``lora_scale`` differs for DoRA except at 1.0).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .formats import diffusers_to_native_key
from .variants import ModelError

__all__ = ["LoraError", "LoraSpec", "LoraManager", "read_lora", "register_weight_adapter", "write_random_lora"]


class LoraError(ModelError):
    """A LoRA file that cannot be applied to this model, naming the file and what is wrong."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: a .safetensors file and its strength (1.0 = as trained)."""

    path: str
    strength: float = 1.0

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """``FILE`` or ``FILE:STRENGTH`` (the CLI's ``--lora``); a colon not followed by a number is part of FILE."""
        path, sep, tail = text.rpartition(":")
        if sep and path:
            try:
                return cls(path, float(tail))
            except ValueError:
                pass
        return cls(text, 1.0)

    def validate(self) -> None:
        """File exists, is safetensors, strength is a finite number (the file's content is checked on load)."""
        if not isinstance(self.strength, (int, float)) or not math.isfinite(self.strength):
            raise LoraError(f"LoRA strength must be a finite number, got {self.strength!r} for {self.name}")
        if not os.path.isfile(self.path):
            raise LoraError(f"LoRA file {self.path!r} does not exist")
        if not self.path.lower().endswith((".safetensors", ".sft")):
            raise LoraError(f"LoRA file {self.path!r} is not a .safetensors file; other formats (.pt, .ckpt, .bin) "
                            "are not loaded (they can run code); convert it to safetensors")

    def wire(self) -> list:
        return [self.path, float(self.strength)]


def as_specs(loras) -> tuple[LoraSpec, ...]:
    """LoraSpecs from LoraSpecs, ``[path, strength]`` pairs or ``"FILE[:STRENGTH]"`` strings."""
    out = []
    for item in loras or ():
        if isinstance(item, LoraSpec):
            out.append(item)
        elif isinstance(item, str):
            out.append(LoraSpec.parse(item))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            out.append(LoraSpec(str(item[0]), float(item[1])))
        else:
            raise LoraError(f"a LoRA is a path, 'FILE:STRENGTH' or (path, strength); got {item!r}")
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------
# Reading files.

_SUFFIXES = {  # key suffix -> role
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up", ".alpha": "alpha", ".dora_scale": "dora",
    ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",
}
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_",
             "lora_transformer_")
_OTHER_MODELS = (  # a name fragment -> the model family it suggests, for the "matches nothing" error
    ("single_transformer_blocks", "Flux"), ("double_blocks", "Flux/HunyuanVideo"), ("cross_attn", "Wan"),
    ("self_attn", "Wan"), ("joint_blocks", "SD3"), ("input_blocks", "SD/SDXL"), ("down_blocks", "SD/SDXL"),
    ("transformer_blocks", "another DiT"),
)


@dataclass
class LoraLayer:
    """One module's low-rank update as stored in the file (factors kept in their file dtype, on CPU)."""

    key: str
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    magnitude: torch.Tensor | None = None
    magnitude_kind: str = ""

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraFile:
    """A parsed LoRA file: its layers by module name as written (prefix removed), and what format it is."""

    path: str
    format: str
    layers: dict[str, LoraLayer]
    scale_of: dict[str, float] = field(default_factory=dict)  # module name -> alpha / rank (or 1)


def _read_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise LoraError(f"LoRA file {path!r} does not exist")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError, ValueError, RuntimeError) as error:
        raise LoraError(f"cannot read LoRA {path!r} as safetensors (corrupt or not a safetensors file): "
                        f"{error}") from None
    if not tensors:
        raise LoraError(f"LoRA {path!r} holds no tensors")
    return tensors, metadata


def _adapter_metadata(metadata: dict, path: str) -> dict:
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise LoraError(f"LoRA {path!r}: its lora_adapter_metadata is not valid JSON ({error})") from None
    return {k.removeprefix("transformer."): v for k, v in raw.items()}


def _pattern_value(patterns: dict, module: str):
    """PEFT's rank/alpha patterns: a key matches a module name exactly or as a dotted suffix (``^`` anchors)."""
    for pattern, value in (patterns or {}).items():
        anchored = pattern.startswith("^")
        p = pattern.lstrip("^")
        if module == p or (not anchored and module.endswith("." + p)) or re.fullmatch(p, module):
            return value
    return None


def read_lora(path: str) -> LoraFile:
    """Parse a LoRA file into per-module layers; raises LoraError for corrupt files and unknown keys."""
    tensors, metadata = _read_tensors(path)
    name = os.path.basename(path)
    layers: dict[str, LoraLayer] = {}
    unknown, prefixes, roles = [], set(), set()
    for key, tensor in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        module = key[:-len(suffix)]
        for prefix in _PREFIXES:
            if module.startswith(prefix):
                prefixes.add(prefix)
                module = module[len(prefix):]
                break
        layer = layers.setdefault(module, LoraLayer(key=key))
        role = _SUFFIXES[suffix]
        roles.add(suffix)
        if role == "alpha":
            layer.alpha = float(tensor.float().reshape(-1)[0])
        elif role in ("dora", "magnitude"):
            layer.magnitude, layer.magnitude_kind = tensor, role
        else:
            setattr(layer, role, tensor)
    if unknown:
        raise LoraError(f"LoRA {name}: {len(unknown)} key(s) of a kind this loader does not apply (e.g. "
                        f"{', '.join(unknown[:3])}); supported: lora_A/lora_B, lora_down/lora_up, .alpha, DoRA "
                        "scales. Refusing to apply part of a LoRA")
    meta = _adapter_metadata(metadata, path)
    use_rslora = bool(meta.get("use_rslora", False))
    scale_of = {}
    for module, layer in layers.items():
        if layer.down is None or layer.up is None:
            raise LoraError(f"LoRA {name}: layer {module!r} has no "
                            f"{'down/lora_A' if layer.down is None else 'up/lora_B'} matrix (corrupt or incomplete)")
        if layer.down.dim() < 2 or layer.up.dim() < 2 or layer.up.shape[1] != layer.down.shape[0]:
            raise LoraError(f"LoRA {name}: layer {module!r} has mismatched factors down {list(layer.down.shape)} "
                            f"and up {list(layer.up.shape)} (corrupt file)")
        rank = layer.rank
        alpha = layer.alpha
        if alpha is None and meta:
            alpha = _pattern_value(meta.get("alpha_pattern"), module)
            if alpha is None:
                alpha = meta.get("lora_alpha")
            meta_rank = _pattern_value(meta.get("rank_pattern"), module) or meta.get("r")
            if meta_rank is not None and alpha is not None and int(meta_rank) != rank:
                raise LoraError(f"LoRA {name}: layer {module!r} has rank {rank} but the metadata says r={meta_rank}")
        if alpha is None:
            scale_of[module] = 1.0
        else:
            scale_of[module] = float(alpha) / (math.sqrt(rank) if use_rslora else rank)
    fmt = "kohya" if "lora_unet_" in prefixes or "lora_transformer_" in prefixes else \
        "comfyui" if prefixes & {"diffusion_model.", "model.diffusion_model."} else \
        "peft" if ".lora_A.weight" in roles else "lora_down/up"
    if any(layer.alpha is not None for layer in layers.values()) or meta.get("lora_alpha") is not None:
        fmt += "+alpha"
    if any(layer.magnitude is not None for layer in layers.values()):
        fmt += "+dora"
    return LoraFile(path=path, format=fmt, layers=layers, scale_of=scale_of)


# ---------------------------------------------------------------------------------------------------------
# Where a module's weight physically lives, and how to read / write it. ``rows``: the target's rows of the whole
# weight (its slice of a fused QKV weight), ``None`` = all of it. Under FSDP (memory plan ``low``) a rank holds
# only some rows of each weight: it saves and rewrites those rows, with the matching rows of the delta.

def _local_rows(weight: torch.Tensor, rows: slice | None) -> tuple[torch.Tensor, slice | None]:
    """(this rank's storage of the target's rows, which of the target's rows they are; ``None`` = all of them).

    A plain tensor holds every row. An FSDP2-sharded parameter (a DTensor sharded on dim 0 the way ``torch.chunk``
    splits it: ceil(N / ranks) rows per rank, the last ranks' chunks shorter or empty) holds one run of rows."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor):
        return (weight if rows is None else weight[rows]), None
    total = weight.shape[0]
    rows = rows or slice(0, total)
    if tuple(weight.placements) != (Shard(0),):
        raise RuntimeError(f"LoRA merge: a weight sharded as {weight.placements}, expected FSDP's Shard(0)")
    local = weight.to_local()
    ranks, rank = weight.device_mesh.size(), weight.device_mesh.get_local_rank()
    chunk = -(-total // ranks)
    offset = min(total, rank * chunk)
    if local.shape[0] != max(0, min(chunk, total - offset)):
        raise RuntimeError(f"LoRA merge: rank {rank} holds {local.shape[0]} of {total} rows, not the "
                           f"torch.chunk split over {ranks} ranks this merge assumes")
    lo, hi = max(rows.start, offset), min(rows.stop, offset + local.shape[0])
    hi = max(lo, hi)
    return local[lo - offset:hi - offset], slice(lo - rows.start, hi - rows.start)


class _WrittenWeights:
    """Weights the merge rewrites in place: ``merge`` = saved original (fp32) + every delta, written back."""

    @classmethod
    def part(cls, module, rows) -> slice | None:
        return None

    @classmethod
    def merge(cls, module, rows, saved, terms) -> None:
        part = cls.part(module, rows)
        if part is not None and part.start == part.stop:
            return  # this rank holds none of the target's rows
        base = cls.base(module, rows, saved)
        merged = base
        for layer, scale, strength in terms:
            merged = merged + _delta(layer, scale, strength, base, part)
        cls.write(module, rows, merged)


class _PlainWeights(_WrittenWeights):
    """nn.Linear / nn.Conv2d (or anything with a ``weight`` tensor): rows of ``weight`` are the output channels;
    an FSDP-sharded weight is merged in this rank's rows only."""

    @staticmethod
    def shape(module, rows) -> tuple:
        shape = tuple(module.weight.shape)
        return shape if rows is None else (rows.stop - rows.start, *shape[1:])

    @classmethod
    def part(cls, module, rows) -> slice | None:
        return _local_rows(module.weight, rows)[1]

    @staticmethod
    def save(module, rows):
        w = _local_rows(module.weight, rows)[0]
        saved = torch.empty(w.shape, dtype=w.dtype, device="cpu", pin_memory=w.is_cuda)
        saved.copy_(w)
        return saved

    @staticmethod
    def base(module, rows, saved) -> torch.Tensor:
        return saved.to(_local_rows(module.weight, rows)[0].device, non_blocking=True).float()

    @staticmethod
    def write(module, rows, value: torch.Tensor) -> None:
        _local_rows(module.weight, rows)[0].copy_(value)

    @staticmethod
    def restore(module, rows, saved) -> None:
        w = _local_rows(module.weight, rows)[0]
        w.copy_(saved.to(w.device, non_blocking=True))


class _Fp8RowScaledWeights(_WrittenWeights):
    """``optimize.Fp8Linear``: e4m3 weight [N, K] with one fp32 scale per output row; a merge dequantizes the
    saved original rows, adds the delta in fp32 and requantizes with fresh per-row scales (in place)."""

    @staticmethod
    def shape(module, rows) -> tuple:
        n, k = module.weight_fp8.shape
        return (n if rows is None else rows.stop - rows.start, k)

    @staticmethod
    def _views(module, rows):
        rows = rows or slice(0, module.weight_fp8.shape[0])
        return module.weight_fp8[rows], module.weight_scale[:, rows]

    @classmethod
    def save(cls, module, rows):
        w, s = cls._views(module, rows)
        return w.detach().cpu().clone(), s.detach().cpu().clone()

    @classmethod
    def base(cls, module, rows, saved) -> torch.Tensor:
        w, s = saved
        device = module.weight_fp8.device
        return w.to(device).float() * s.to(device).reshape(-1, 1)

    @classmethod
    def write(cls, module, rows, value: torch.Tensor) -> None:
        w, s = cls._views(module, rows)
        scale = (value.abs().amax(dim=1, keepdim=True) / 448.0).clamp_min(1e-12)
        w.copy_((value / scale).to(w.dtype))
        s.copy_(scale.reshape(1, -1))

    @classmethod
    def restore(cls, module, rows, saved) -> None:
        w, s = cls._views(module, rows)
        w.copy_(saved[0].to(w.device))
        s.copy_(saved[1].to(s.device))


class _LoraTerms(nn.Module):
    """The last parametrization of a weight that is computed when its layer runs (fp8-resident storage, loaded
    with ``--weights fp8``): ``W' = W * (1 + row + col) + up @ down`` in fp32, cast to W's dtype.

    The stored fp8 weight is never rewritten: rounding ``W + delta`` to e4m3 (3 mantissa bits, ~6% steps) would
    lose most of a typical LoRA's change. The LoRAs stay as their low-rank factors beside it (strength and alpha
    folded into ``up``, several LoRAs stacked along the rank; DoRA as the row or column gains), so the result is
    exactly the fp8 base plus the LoRA at the compute precision, for the memory of the factors only and one small
    matmul per layer call (rank x (in + out) x out). Plain attributes, not buffers: group offloading's pinned
    copies are made once for the buffers it finds."""

    def __init__(self):
        super().__init__()
        self.up = self.down = self.row = self.col = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.up is None:
            return weight
        device = weight.device
        out = weight.float()
        if self.row is not None:
            out = out * (1 + self.row.to(device) + (0 if self.col is None else self.col.to(device)))
        elif self.col is not None:
            out = out * (1 + self.col.to(device))
        out = out + (self.up.to(device) @ self.down.to(device)).float()
        return out.to(weight.dtype)


class _FactoredWeights:
    """A parametrized weight (``module.weight`` computed from a stored tensor on every use, e.g. fp8-resident):
    the LoRAs are kept as factors in a ``_LoraTerms`` parametrization appended to the chain; nothing is saved."""

    @staticmethod
    def _chain(module):
        return module.parametrizations.weight

    @classmethod
    def shape(cls, module, rows) -> tuple:
        return tuple(cls._chain(module).original.shape)

    @classmethod
    def _terms(cls, module) -> "_LoraTerms":
        from torch.nn.utils import parametrize

        found = [p for p in cls._chain(module) if isinstance(p, _LoraTerms)]
        if found:
            return found[0]
        parametrize.register_parametrization(module, "weight", _LoraTerms(), unsafe=True)
        return cls._chain(module)[-1]

    @classmethod
    def save(cls, module, rows):
        cls._terms(module)
        return ()

    @classmethod
    def restore(cls, module, rows, saved) -> None:
        terms = cls._terms(module)
        terms.up = terms.down = terms.row = terms.col = None

    @classmethod
    def unmodified(cls, module) -> torch.Tensor:
        """The weight without the LoRA terms, whole (gathered when FSDP shards the stored tensor), fp32."""
        from torch.distributed.tensor import DTensor

        chain = cls._chain(module)
        weight = chain.original
        if isinstance(weight, DTensor):  # gathered as bytes: gloo (and older NCCL) move no float8
            local = weight.to_local()
            raw = DTensor.from_local(local.view(torch.uint8), weight.device_mesh, weight.placements,
                                     shape=weight.shape, stride=weight.stride())
            weight = raw.full_tensor().view(local.dtype)
        for step in chain:
            if not isinstance(step, _LoraTerms):
                weight = step(weight)
        return weight.float()

    @classmethod
    def merge(cls, module, rows, saved, terms) -> None:
        from torch.distributed.tensor import DTensor

        stored = cls._chain(module).original
        device = stored.to_local().device if isinstance(stored, DTensor) else stored.device
        dtype = next((s.dtype for s in cls._chain(module) if isinstance(getattr(s, "dtype", None), torch.dtype)),
                     torch.float32)
        ups, downs, row, col, base = [], [], None, None, None
        for layer, scale, strength in terms:
            up = layer.up.to(device).float().reshape(layer.up.shape[0], -1)
            down = layer.down.to(device).float().reshape(layer.down.shape[0], -1)
            if layer.magnitude is None:
                ups.append(up * (scale * strength))
                downs.append(down)
                continue
            base = cls.unmodified(module).to(device) if base is None else base  # DoRA: W's norms
            v = base + scale * (up @ down)
            m = layer.magnitude.to(device).float().reshape(-1)
            if m.numel() == up.shape[0]:  # per output row: W(1 + s(c-1)) + s c scale up @ down
                gain = (m / v.norm(dim=1)).reshape(-1, 1)
                row = (0 if row is None else row) + strength * (gain - 1)
                ups.append(up * (gain * (strength * scale)))
                downs.append(down)
            else:  # per input column
                gain = (m / v.norm(dim=0)).reshape(1, -1)
                col = (0 if col is None else col) + strength * (gain - 1)
                ups.append(up * (strength * scale))
                downs.append(down * gain)
        target = cls._terms(module)
        target.up, target.down = torch.cat(ups, dim=1).to(dtype), torch.cat(downs, dim=0).to(dtype)
        target.row, target.col = row, col


_ADAPTERS: dict[type, object] = {nn.Linear: _PlainWeights, nn.Conv2d: _PlainWeights}


def register_weight_adapter(cls: type, adapter) -> None:
    """Teach the merge a new weight storage (e.g. another fp8 layout): ``adapter`` has ``shape(module, rows)``,
    ``save(module, rows)``, ``restore(module, rows, saved)`` and ``merge(module, rows, saved, terms)`` (a
    ``_WrittenWeights`` subclass provides ``merge`` from ``base(module, rows, saved) -> fp32`` and
    ``write(module, rows, fp32)``); every write must be in place so compiled graphs stay valid."""
    _ADAPTERS[cls] = adapter


def _adapter(module):
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, "weight"):
        return _FactoredWeights
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    from .optimize import Fp8Linear

    if isinstance(module, Fp8Linear):
        return _Fp8RowScaledWeights
    return None


def _has_weight(module) -> bool:
    """Whether a module the adapters know holds a weight (without computing a parametrized one)."""
    from torch.nn.utils import parametrize

    if isinstance(module, (nn.Linear, nn.Conv2d)) and not parametrize.is_parametrized(module, "weight"):
        return module._parameters.get("weight") is not None
    return True


_QKV = ("to_q", "to_k", "to_v")


def _physical(transformer, target: str):
    """(module holding the weight, row slice or None) for a diffusers module name; with fused QKV the q/k/v
    weights are rows of ``to_qkv`` (whatever the q/k/v modules still hold; FSDP drops them)."""
    parent_name, _, leaf = target.rpartition(".")
    if leaf in _QKV:
        parent = transformer.get_submodule(parent_name)
        if getattr(parent, "fused_projections", False) and getattr(parent, "to_qkv", None) is not None:
            size = _adapter(parent.to_qkv).shape(parent.to_qkv, None)[0] // 3  # CogVideoX: q, k, v equal widths
            start = _QKV.index(leaf) * size
            return parent.to_qkv, slice(start, start + size)
    return transformer.get_submodule(target), None


def _targets(transformer) -> dict[str, str]:
    """Every spelling a LoRA may use for a weight-holding module -> its diffusers name (fused to_qkv is internal
    and never a target: its q/k/v rows are, under their own names)."""
    names: dict[str, str] = {}

    def add(name: str) -> None:
        for alias in (name, diffusers_to_native_key(name)):
            if alias:
                names.setdefault(alias, name)
                names.setdefault(alias.replace(".", "_"), name)

    for name, module in transformer.named_modules():
        if not name or ".to_qkv." in name or ".to_kv." in name or name.endswith(".to_kv"):
            continue
        if name.endswith(".to_qkv"):
            for leaf in _QKV:
                add(name.rpartition(".")[0] + "." + leaf)
            continue
        if _adapter(module) is None or not _has_weight(module):
            continue
        add(name)
    return names


def _guess_family(modules) -> str:
    text = " ".join(modules)
    for fragment, family in _OTHER_MODELS:
        if fragment in text:
            return f" (its layer names look like {family})"
    return ""


@dataclass
class _Prepared:
    spec: LoraSpec
    file: LoraFile
    targets: dict[str, str]  # module name in file -> diffusers name


def _effective(loras) -> tuple:
    """The specs of ``loras`` that change weights (strength 0 ones do nothing)."""
    return tuple(s for s in as_specs(loras) if s.strength != 0)


class LoraManager:
    """The LoRAs merged into one resident transformer, and the saved originals that make switching exact."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.active: list[_Prepared] = []
        self._saved: dict[str, object] = {}
        self._files: dict[tuple, LoraFile] = {}

    @property
    def specs(self) -> tuple[LoraSpec, ...]:
        return tuple(p.spec for p in self.active)

    def summary(self) -> list[dict]:
        """What the pool status and web panel show: name, strength, format, matched layers."""
        return [{"name": p.spec.name, "path": p.spec.path, "strength": p.spec.strength, "format": p.file.format,
                 "layers": len(p.targets)} for p in self.active]

    @property
    def saved_bytes(self) -> int:
        """CPU memory held by the saved original weights."""
        total = 0
        for saved in self._saved.values():
            for t in saved if isinstance(saved, tuple) else (saved,):
                total += t.numel() * t.element_size()
        return total

    def _file(self, spec: LoraSpec) -> LoraFile:
        spec.validate()
        stat = os.stat(spec.path)
        key = (os.path.realpath(spec.path), stat.st_mtime_ns, stat.st_size)
        if key not in self._files:
            self._files[key] = read_lora(spec.path)
        return self._files[key]

    def _prepare(self, spec: LoraSpec) -> _Prepared:
        """Match every layer of the file to this model (names and shapes) or raise; touches no weight."""
        lora = self._file(spec)
        names = _targets(self.transformer)
        matched = {m: names[m] for m in lora.layers if m in names}
        total = len(lora.layers)
        if not matched:
            example = next(iter(lora.layers))
            raise LoraError(f"LoRA {spec.name} matches no layer of this CogVideoX model: 0 of {total} layers "
                            f"(e.g. {example!r}){_guess_family(lora.layers)}; it was made for another model")
        if len(matched) < total:
            missing = [m for m in lora.layers if m not in matched]
            raise LoraError(f"LoRA {spec.name}: only {len(matched)} of {total} layers match this CogVideoX model "
                            f"(unmatched e.g. {', '.join(repr(m) for m in missing[:3])}); refusing to apply part of "
                            "a LoRA (made for another model or size?)")
        for module, target in matched.items():
            layer = lora.layers[module]
            physical, rows = _physical(self.transformer, target)
            shape = _adapter(physical).shape(physical, rows)
            out_features, in_features = shape[0], math.prod(shape[1:])
            lora_out, lora_in = layer.up.shape[0], math.prod(layer.down.shape[1:])
            if (lora_out, lora_in) != (out_features, in_features):
                raise LoraError(f"LoRA {spec.name}: layer {module!r} is {lora_out} x {lora_in} in the LoRA but "
                                f"{out_features} x {in_features} in this model: the LoRA is for another model "
                                "(another CogVideoX size?)")
            if layer.magnitude is not None and layer.magnitude.numel() not in (out_features, in_features):
                raise LoraError(f"LoRA {spec.name}: DoRA scale of {module!r} has {layer.magnitude.numel()} values; "
                                f"expected {out_features} (per output channel) or {in_features}")
            part = getattr(_adapter(physical), "part", lambda *_: None)(physical, rows)
            if layer.magnitude is not None and layer.magnitude.numel() != out_features and part is not None:
                raise LoraError(f"LoRA {spec.name}: layer {module!r} has a DoRA scale per input channel, which "
                                "needs the whole weight; under memory plan 'low' each rank holds only some rows "
                                "of it: use memory plan 'fast' or 'offload' for this LoRA")
        return _Prepared(spec, lora, matched)

    @torch.no_grad()
    def is_current(self, loras) -> bool:
        """Whether ``loras`` is exactly the active set (strength 0 entries skipped): ``set`` would change nothing."""
        return _effective(loras) == self.specs

    def set(self, loras) -> None:
        """Make exactly ``loras`` active (strength 0 entries are skipped). Everything is checked before any
        weight changes, so a bad LoRA leaves the previous set in place."""
        specs = _effective(loras)
        if specs == self.specs:
            return
        prepared = [self._prepare(s) for s in specs]
        by_target: dict[str, list[tuple[_Prepared, str]]] = {}
        for p in prepared:
            for module, target in p.targets.items():
                by_target.setdefault(target, []).append((p, module))
        for target in [t for t in self._saved if t not in by_target]:
            module, rows = _physical(self.transformer, target)
            _adapter(module).restore(module, rows, self._saved.pop(target))
        for target, uses in by_target.items():
            module, rows = _physical(self.transformer, target)
            adapter = _adapter(module)
            if target not in self._saved:
                self._saved[target] = adapter.save(module, rows)
            adapter.merge(module, rows, self._saved[target],
                          [(p.file.layers[name], p.file.scale_of[name], p.spec.strength) for p, name in uses])
        self.active = prepared
        keep = {(os.path.realpath(p.spec.path)) for p in prepared}
        self._files = {k: v for k, v in self._files.items() if k[0] in keep}

    def clear(self) -> None:
        """Back to the base weights, bitwise."""
        self.set(())


def _delta(layer: LoraLayer, scale: float, strength: float, base: torch.Tensor,
           part: slice | None = None) -> torch.Tensor:
    """fp32 change of one weight: ``strength * scale * up @ down``, or for DoRA ``strength * (m V/||V|| - W)``;
    ``part``: only these output rows (``base`` holds just them: a rank's FSDP shard)."""
    device = base.device
    up = layer.up.to(device).float().reshape(layer.up.shape[0], -1)
    rows = up.shape[0]
    if part is not None:
        up = up[part]
    down = layer.down.to(device).float().reshape(layer.down.shape[0], -1)
    product = up @ down
    if layer.magnitude is None:
        return (product * (scale * strength)).reshape(base.shape)
    w = base.reshape(base.shape[0], down.shape[1])
    v = w + product * scale
    m = layer.magnitude.to(device).float().reshape(-1)
    if m.numel() == rows:
        m = m if part is None else m[part]
        dora = v * (m / v.norm(dim=1)).reshape(-1, 1)
    else:
        dora = v * (m / v.norm(dim=0)).reshape(1, -1)
    return ((dora - w) * strength).reshape(base.shape)


# ---------------------------------------------------------------------------------------------------------
# Random LoRA files in every supported format (tests, the GPU benchmark, the real-ComfyUI check).

_DEFAULT_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")


def random_factors(config: dict, rank: int = 4, seed: int = 0, targets=_DEFAULT_TARGETS, std: float = 0.05,
                   blocks: int | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{diffusers module name: (down [rank, in], up [out, rank])} for ``targets`` in every block of a transformer
    with this diffusers ``config`` (fp32, seeded)."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    shapes = {"attn1.to_q": (dim, dim), "attn1.to_k": (dim, dim), "attn1.to_v": (dim, dim),
              "attn1.to_out.0": (dim, dim), "ff.net.0.proj": (4 * dim, dim), "ff.net.2": (dim, 4 * dim),
              "norm1.linear": (6 * dim, config["time_embed_dim"]), "norm2.linear": (6 * dim, config["time_embed_dim"])}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for block in range(config["num_layers"] if blocks is None else blocks):
        for t in targets:
            o, i = shapes[t]
            out[f"transformer_blocks.{block}.{t}"] = (torch.randn(rank, i, generator=g) * std,
                                                      torch.randn(o, rank, generator=g) * std)
    return out


def write_random_lora(path: str | Path, factors: dict, fmt: str = "peft", alpha: float | None = None,
                      dora: dict | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``factors`` ({diffusers name: (down, up)}) as a safetensors LoRA in ``fmt``: ``peft`` (``transformer.``
    + lora_A/B; alpha as diffusers' metadata), ``peft_alpha_keys`` (lora_A/B + ``.alpha`` keys), ``down_up``
    (``transformer.`` + lora_down/up), ``kohya`` (``lora_unet_`` + underscores, ``.alpha``), ``comfyui``
    (``diffusion_model.`` + native names), ``comfyui_kohya`` (``lora_unet_`` + native names with underscores).
    ``dora``: {name: magnitude [out]} adds DoRA scales (``lora_magnitude_vector`` or ``dora_scale``)."""
    from safetensors.torch import save_file

    tensors, metadata = {}, {"format": "pt"}
    for name, (down, up) in factors.items():
        if fmt in ("peft", "peft_alpha_keys"):
            base, a, b = f"transformer.{name}", ".lora_A.weight", ".lora_B.weight"
        elif fmt == "down_up":
            base, a, b = f"transformer.{name}", ".lora_down.weight", ".lora_up.weight"
        elif fmt == "kohya":
            base, a, b = "lora_unet_" + name.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"
        elif fmt == "comfyui":
            base, a, b = f"diffusion_model.{diffusers_to_native_key(name)}", ".lora_A.weight", ".lora_B.weight"
        elif fmt == "comfyui_kohya":
            base = "lora_unet_" + diffusers_to_native_key(name).replace(".", "_")
            a, b = ".lora_down.weight", ".lora_up.weight"
        else:
            raise ValueError(f"unknown LoRA format {fmt!r}")
        tensors[base + a], tensors[base + b] = down.to(dtype).contiguous(), up.to(dtype).contiguous()
        if alpha is not None and fmt != "peft":
            tensors[base + ".alpha"] = torch.tensor(float(alpha))
        if dora and name in dora:
            suffix = ".lora_magnitude_vector" if fmt.startswith("peft") else ".dora_scale"
            tensors[base + suffix] = dora[name].to(dtype).contiguous()
    if alpha is not None and fmt == "peft":
        rank = next(iter(factors.values()))[0].shape[0]
        targets = sorted(factors)
        metadata["lora_adapter_metadata"] = json.dumps({"transformer.lora_alpha": alpha, "transformer.r": rank,
                                                        "transformer.target_modules": targets})
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    return path
