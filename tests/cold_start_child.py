"""Child process of tests/test_cold_start.py: one tiny job under compile policy auto in a fresh process.

    python tests/cold_start_child.py MODEL_DIR OUT_PREFIX [--wait-warmup] [--other-size]

Writes OUT_PREFIX.json (the policy's report, the warm-up's final state, the process's Inductor cache counters) and
OUT_PREFIX.pt (the latents). ``--other-size``: the request with more frames.
"""

from __future__ import annotations

import json
import sys

import torch

from comfyui_xdit_cogvideo import CogVideoEngine, GenerationRequest
from comfyui_xdit_cogvideo.compile_cache import cache_counters

REQUEST = dict(prompt="a cat playing piano", frames=9, height=32, width=48, steps=3, seed=5)


def main() -> None:
    model, prefix = sys.argv[1], sys.argv[2]
    engine = CogVideoEngine(model, dtype="fp32", optimize="fuse,compile,contiguous_v")
    request = dict(REQUEST, frames=13) if "--other-size" in sys.argv else REQUEST
    latents = engine.generate(GenerationRequest(**request))
    out = {"report": engine.optimizer.compile_report(), "counters": cache_counters()}
    if "--wait-warmup" in sys.argv:
        out["warmups"] = {key: w.wait(800) for key, w in engine.optimizer.warmups.items()}
    torch.save(latents, prefix + ".pt")
    with open(prefix + ".json", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
