"""Multi-GPU predictions from one GPU: time exactly the work one rank of a layout does, add communication.

For a layout cfg x ulysses x ring on N = cfg * ulysses * ring GPUs, one rank
  - runs every block's token-wise layers (norms, QKV, out projection, feed-forward) on its CFG half of the batch
    (2 / cfg rows) and its chunk of the video tokens (ceil(V / (ulysses * ring)), padded) plus the 226 text tokens;
  - after the Ulysses all-to-all, runs attention for heads / ulysses heads with queries = text + ulysses chunks
    against all keys (Ring: ``ring`` kernel calls on key blocks, each returning its log-sum-exp, merged).
This script runs exactly that on one GPU (the real blocks and kernels at the rank's shapes, with stand-in
tensors where a collective would deliver data), and models the collectives analytically:
  Ulysses, per layer: all-to-all of packed q,k,v (3 D per video token) and of the output (D per token), plus an
      all-gather of the text heads; each rank sends (u-1)/u of those bytes.
  Ring, per layer: (r-1) exchanges of a K,V block (2 D per token of the block).
  CFG: one all-gather of the (tiny) output per step.
  time = bytes / bandwidth + latency per collective; bandwidth 250 GB/s per rank (two H200s over NVLink,
  DESIGN.md), latency 30 us (assumed). Ulysses collectives are modelled without overlap (the code overlaps one
  CFG row's all-to-all with the other row's attention, so this is conservative); Ring's p2p is overlapped with
  the block attention, so both a no-overlap (conservative) and an overlapped estimate are given.
The blocks run eager here (each layout's shapes would need their own compile), and the simulation runs a
little slower than the real pipeline on one GPU (stand-in inputs, no overlap with the scheduler), so only ratios
are used: a rank's step = (measured single-GPU step - U) x blocks(layout) / blocks(1 GPU) + U + communication,
with U = 10 ms of per-step work that does not divide (scheduler, CFG combine, patch embedding of the whole
sequence on every rank, launch gaps; an assumption, about what the profiles show outside the blocks).
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TEXT_LEN, StepTimer, log, sync, tokens_for  # noqa: E402

BANDWIDTH = 250e9
LATENCY = 30e-6
UNDIVIDED = 0.010


def predict(step_single: float, blocks_single: float, blocks_layout: float, comm: dict, ring: int,
            undivided: float = UNDIVIDED) -> dict:
    """Predicted step of one layout from measured single-GPU numbers (see the module docstring)."""
    undivided = min(undivided, 0.2 * step_single)
    compute = (step_single - undivided) * blocks_layout / blocks_single
    step = compute + undivided + comm["total_s"]
    # Ring's p2p overlaps the block attention (about half of a block's time): hide up to that much
    hidden = min(comm["ring_s"], 0.5 * compute * (ring - 1) / ring) if ring > 1 else 0.0
    return dict(compute_s=compute, step_s=step, step_ring_overlap_s=step - hidden)


def comm_seconds(layout, config: dict, video: int, bandwidth: float = BANDWIDTH, latency: float = LATENCY) -> dict:
    """Bytes one rank sends per denoising step and the time they take, per collective kind."""
    cfg, u, r = layout
    d = config["num_attention_heads"] * config["attention_head_dim"]
    layers = config["num_layers"]
    rows = 2 // cfg
    chunk = math.ceil(video / (u * r))
    elt = 2
    out = {"ulysses_bytes": 0.0, "ring_bytes": 0.0, "cfg_bytes": 0.0}
    t_u = t_r = t_c = 0.0
    if u > 1:
        per_layer = (4 * rows * chunk * d + rows * TEXT_LEN * d) * elt * (u - 1) / u
        out["ulysses_bytes"] = per_layer * layers
        t_u = layers * (per_layer / bandwidth + 3 * latency)
    if r > 1:
        block = 2 * rows * chunk * u * (d // u) * elt
        out["ring_bytes"] = block * (r - 1) * layers
        t_r = layers * (r - 1) * (block / bandwidth + latency)
    world = cfg * u * r
    if world > 1:
        p = config["patch_size"] ** 2 * (config.get("patch_size_t") or 1) * config["out_channels"]
        out["cfg_bytes"] = rows * chunk * p * elt * (world - 1)
        t_c = out["cfg_bytes"] / bandwidth + 2 * latency + 2e-4  # + the per-step gloo cancel poll (~0.2 ms)
    out.update(ulysses_s=t_u, ring_s=t_r, gather_s=t_c, total_s=t_u + t_r + t_c)
    return out


class _SimContext:
    """Stands in for ParallelContext: the rank's attention kernel calls on stand-in tensors of the rank's shapes.
    It takes what the block forward hands ParallelContext.attention (``pack_qkv``'s tuple on sequence-parallel
    layouts: the packing runs for real in the block) and returns what ``joint_heads`` reads."""

    def __init__(self, layout, kernel, heads, head_dim, rows, video, device, dtype):
        from comfyui_xdit_cogvideo.parallel.kernels import KERNELS

        cfg, u, r = layout
        self.layout, self.kernel = layout, KERNELS[kernel]
        self.chunk = math.ceil(video / (u * r))
        self.video = video
        hq = heads // u
        g = torch.Generator(device).manual_seed(0)
        self.query = torch.randn(rows, TEXT_LEN + self.chunk * u, hq, head_dim, device=device, dtype=dtype,
                                 generator=g)
        self.keys = torch.randn(rows, TEXT_LEN + video, hq, head_dim, device=device, dtype=dtype, generator=g)
        self.values = torch.randn_like(self.keys)
        # Ulysses' way back lands rank-major: text [B, U, T, h, D], video [B, U, C, h, D] (its values are not used)
        self.back = (torch.zeros(rows, u, TEXT_LEN, hq, head_dim, device=device, dtype=dtype),
                     torch.zeros(rows, u, self.chunk, hq, head_dim, device=device, dtype=dtype))
        self.attention_s = []

    @property
    def packing(self) -> int | None:
        """As ParallelContext.packing: the Ulysses degree with sequence parallelism, else None."""
        _, u, r = self.layout
        return u if u * r > 1 else None

    def attention(self, packed: tuple, text_len: int):
        from yunchang.ring.utils import update_out_and_lse

        cfg, u, r = self.layout
        if self.packing is None:
            q, k, v = packed
            return self.kernel(q, k, v, False)[0]
        if r == 1:
            self.kernel(self.query, self.keys, self.values, False)
        else:
            block = self.chunk * u
            out = lse = None
            for step in range(r):
                start = TEXT_LEN + step * block
                stop = min(TEXT_LEN + self.video, start + block)
                lo = 0 if step == 0 else start
                if stop > lo:
                    o, l = self.kernel(self.query, self.keys[:, lo:stop], self.values[:, lo:stop], True)
                    out, lse = update_out_and_lse(out, lse, o, l)
        return self.back if u > 1 else packed[0]  # Ring: the rank's q [B, T + C, H, D] stands in for its output


class _SimProcessor:
    def __init__(self, context):
        self.context = context


@torch.no_grad()
def _blocks_time(transformer, layout, kernel, size, device, dtype, reps=3) -> float:
    """Seconds for all blocks of one forward as one rank of ``layout`` runs them (eager or compiled, as set)."""
    config = transformer.config
    cfg, u, r = layout
    rows = 2 // cfg
    video = tokens_for(dict(config), size)
    chunk = math.ceil(video / (u * r))
    heads, head_dim = config.num_attention_heads, config.attention_head_dim
    d = heads * head_dim
    g = torch.Generator(device).manual_seed(1)
    hidden = torch.randn(rows, chunk, d, device=device, dtype=dtype, generator=g) * 0.5
    text = torch.randn(rows, TEXT_LEN, d, device=device, dtype=dtype, generator=g) * 0.5
    temb = torch.randn(rows, config.time_embed_dim, device=device, dtype=dtype, generator=g)
    rope = None
    if config.use_rotary_positional_embeddings:
        rope = (torch.randn(chunk, head_dim, device=device, dtype=torch.float32, generator=g),
                torch.randn(chunk, head_dim, device=device, dtype=torch.float32, generator=g))
    context = _SimContext(layout, kernel, heads, head_dim, rows, video, device, dtype)
    saved = [b.attn1.processor for b in transformer.transformer_blocks]
    try:
        for b in transformer.transformer_blocks:
            b.attn1.processor = _SimProcessor(context)

        def run():
            h, e = hidden, text
            for block in transformer.transformer_blocks:
                h, e = block(hidden_states=h, encoder_hidden_states=e, temb=temb, image_rotary_emb=rope)
            return h

        run()
        sync(device)
        timer = StepTimer(device)
        timer.begin()
        for _ in range(reps):
            run()
            timer.step()
        return statistics.median(timer.times())
    finally:
        for b, p in zip(transformer.transformer_blocks, saved):
            b.attn1.processor = p


def layouts_to_simulate(heads: int) -> dict[int, list]:
    from comfyui_xdit_cogvideo.layout import candidate_layouts, choose_layout

    out = {}
    for n in (2, 4, 8):
        chosen = choose_layout(n, heads=heads, use_cfg=True)
        cands = candidate_layouts(n, heads=heads, use_cfg=True)
        out[n] = [(c.cfg, c.ulysses, c.ring, c == chosen) for c in cands]
    return out


def run_scaling(bench, R, bandwidth: float = BANDWIDTH):
    """Per-rank simulation for the chooser's layouts and the alternatives, for 2, 4 and 8 GPUs."""
    name, transformer, device, dtype = bench.name, bench.transformer, bench.device, bench.dtype
    size = (bench.frames, bench.height, bench.width)
    engine = bench.engine
    if engine is None or engine.optimizer is None:
        from comfyui_xdit_cogvideo import CogVideoEngine

        # the block forward that takes a stand-in context is the optimizer's ("auto" turns nothing on on a CPU)
        engine = CogVideoEngine.from_components(transformer, attention="auto",
                                                optimize="auto" if torch.device(device).type == "cuda" else "fuse")
    kernel = engine.attention
    opt = engine.optimizer
    best = (bench.results.get("ours-default") or bench.results.get("ours-fa4-compiled")
            or bench.results.get("ours-cudnn-compiled") or {})
    step_single = best.get("s_per_step")
    if not step_single:
        raise RuntimeError("scaling needs a measured single-GPU s/step of our engine (run an ours-* variant first)")
    config = dict(transformer.config)
    video = tokens_for(config, size)
    was = opt.compiled
    opt.compiled = False
    try:
        eager_single = _blocks_time(transformer, (1, 1, 1), kernel, size, device, dtype)
        base = step_single
        result = dict(method=__doc__.strip().splitlines()[0], bandwidth_GBps=bandwidth / 1e9, latency_us=LATENCY * 1e6,
                      undivided_s=UNDIVIDED, kernel=kernel, single=dict(step_s=base, blocks_eager_s=eager_single),
                      layouts=[])
        for n, layouts in layouts_to_simulate(config["num_attention_heads"]).items():
            for cfg, u, r, chosen in layouts:
                if R.left() < 25:
                    R.skip(f"{name} scaling {cfg}x{u}x{r}", "time budget")
                    continue
                blocks = _blocks_time(transformer, (cfg, u, r), kernel, size, device, dtype)
                comm = comm_seconds((cfg, u, r), config, video, bandwidth)
                p = predict(base, eager_single, blocks, comm, r)
                row = dict(gpus=n, layout=f"cfg{cfg} x ulysses{u} x ring{r}", chosen=chosen,
                           blocks_eager_s=round(blocks, 4), compute_s=round(p["compute_s"], 4),
                           comm_s=round(comm["total_s"], 4), comm_gb=round(
                               (comm["ulysses_bytes"] + comm["ring_bytes"] + comm["cfg_bytes"]) / 1e9, 2),
                           predicted_step_s=round(p["step_s"], 4), predicted_speedup=round(base / p["step_s"], 2),
                           predicted_efficiency=round(base / p["step_s"] / n, 3),
                           predicted_step_s_ring_overlap=round(p["step_ring_overlap_s"], 4),
                           predicted_speedup_ring_overlap=round(base / p["step_ring_overlap_s"], 2))
                result["layouts"].append(row)
                bench.put("scaling", result)
                log(f"{name} scaling {n} GPUs {row['layout']:28s}{' *' if chosen else '  '} "
                    f"compute {p['compute_s']:.3f}s comm {comm['total_s']:.3f}s -> {p['step_s']:.3f}s "
                    f"x{base / p['step_s']:.2f}")
    finally:
        opt.compiled = was
    return result
