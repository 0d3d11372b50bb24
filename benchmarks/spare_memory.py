"""Does a prestarted GPU worker (a spare, ``pool.prestart``) hold GPU memory before a pool takes it?

    CUDA_VISIBLE_DEVICES=0 python benchmarks/spare_memory.py --out spare_memory.json

A spare on a GPU slot imports flash-attn-4 and the compiler ahead of its job; flash-attn-4's import queries the
device, which initialises torch's CUDA runtime. This reads the GPU's ``memory.used`` (nvidia-smi, which sees the
memory even where it lists no processes) with nothing running, with one ready spare, and, for scale, with a process
that made a CUDA context (one tensor on the GPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def used_mib() -> int:
    """memory.used of the first visible GPU, MiB."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[0])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from comfyui_xdit_cogvideo.pool import prestart, shutdown_spares, wait_spares

    row = {"idle_mib": used_mib()}
    started = time.perf_counter()
    prestart("0")
    row["spare_ready"] = wait_spares(300)
    row["spare_ready_s"] = round(time.perf_counter() - started, 1)
    time.sleep(2.0)
    row["with_spare_mib"] = used_mib()
    shutdown_spares()
    time.sleep(2.0)
    row["after_spare_mib"] = used_mib()
    context = subprocess.Popen([sys.executable, "-c", "import sys, time, torch; torch.zeros(1, device='cuda'); "
                                "print('ready', flush=True); sys.stdin.read()"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    context.stdout.readline()
    row["with_context_mib"] = used_mib()
    context.stdin.close()
    context.wait(60)
    row["spare_holds_mib"] = row["with_spare_mib"] - row["after_spare_mib"]  # this process's own use cancels out
    row["context_mib"] = row["with_context_mib"] - row["after_spare_mib"]
    Path(args.out).write_text(json.dumps(row, indent=1))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
