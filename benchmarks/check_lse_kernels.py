"""Every attention kernel's (out, log-sum-exp) as Ring attention merges them, checked on this device.

For each kernel available here: full attention over [text; video] keys against the same keys cut into blocks
(text joined to the first block, as our ring does) and merged as the ring merges them (``merge_blocks``, the
compiled merge on CUDA); both compared with an fp32 reference. Run on the GPU machine (log in
benchmarks/results/) or on CPU.

    python benchmarks/check_lse_kernels.py [--device cuda] [--tokens 4096] [--blocks 3]
"""

from __future__ import annotations

import argparse
import json

import torch

from comfyui_xdit_cogvideo.parallel.attention import merge_blocks
from comfyui_xdit_cogvideo.parallel.kernels import KERNELS, available_kernels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--blocks", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    text, heads, dim = 226, 8, 64
    q, k, v = (torch.randn(2, text + args.tokens, heads, dim, generator=gen).to(device, dtype) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)))
    ref = ref.transpose(1, 2)
    scale = ref.abs().max().item()
    edges = [text + round(i * args.tokens / args.blocks) for i in range(args.blocks + 1)]
    edges[0] = 0  # the text keys ride with the first block
    results = {}
    for name in available_kernels(device):
        try:
            full, _ = KERNELS[name](q, k, v, False)
            out = lse = None
            for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
                block_out, block_lse = KERNELS[name](q, k[:, lo:hi], v[:, lo:hi], True)
                if out is None:
                    out, lse = block_out, block_lse
                else:
                    out, lse = merge_blocks(out, lse, block_out, block_lse,
                                            dtype=q.dtype if i == args.blocks - 1 else None)
            results[name] = {"full_max_err": (full.float() - ref).abs().max().item() / scale,
                             "ring_max_err": (out.float() - ref).abs().max().item() / scale,
                             "lse_shape": list(block_lse.shape)}
        except Exception as error:  # noqa: BLE001
            results[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
        print(name, results[name], flush=True)
    print(json.dumps({"device": str(device), "dtype": str(dtype), "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
