"""Tables (markdown, to stdout) and plots (png) from the suite's JSON results.

    python benchmarks/report.py benchmarks/results/2026-11-29-h200 --plots docs/plots

Every number printed comes from a results file; predictions are recomputed from the stored per-rank
simulation with ``scaling.predict`` (the method in scaling.py's docstring), on the base s/step named in the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import UNDIVIDED, comm_seconds, predict  # noqa: E402
from common import MODELS, tokens_for  # noqa: E402


def load(folder: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("call*.json"))}


def variants_table(runs: dict, model: str, calls: list[str]) -> list[str]:
    lines = ["| configuration | s/step | TFLOP/s | of 790 peak | peak GiB | vs diffusers rel. L2 / max abs | run |",
             "|---|---|---|---|---|---|---|"]
    for call in calls:
        data = runs.get(call, {}).get("models", {}).get(model, {})
        for name, row in data.get("variants", {}).items():
            if "error" in row:
                lines.append(f"| {name} | error: {row['error'][:60]} | | | | | {call} |")
                continue
            eq = row.get("vs_diffusers")
            eq_s = f"{eq['rel_l2']:.4f} / {eq['max_abs']:.3f}" if eq else "reference"
            lines.append(f"| {name} | {row['s_per_step']:.4f} | {row.get('tflops', '')} | "
                         f"{100 * row.get('fraction_of_peak', 0):.1f}% | {row.get('peak_gib')} | {eq_s} | {call} |")
    return lines


def predictions(runs: dict, model: str, base_step: float, base_name: str) -> list[str]:
    scaling = runs["call2"]["models"][model]["scaling"]
    config = runs["call2"]["models"][model]["build"]["config"]
    size = runs["call2"]["models"][model]["build"]["size"]
    video = tokens_for(config, size)
    single = scaling["single"]["blocks_eager_s"]
    lines = ["| GPUs | layout | chooser | rank blocks (sim) | comm GB/step/rank | comm s | predicted s/step | "
             "predicted speed-up | efficiency | with ring overlap |", "|---|---|---|---|---|---|---|---|---|---|"]
    out = []
    for row in scaling["layouts"]:
        cfg, u, r = (int(x[len(n):]) for x, n in zip(row["layout"].split(" x "), ("cfg", "ulysses", "ring")))
        comm = comm_seconds((cfg, u, r), config, video)
        p = predict(base_step, single, row["blocks_eager_s"], comm, r)
        speed, speed_o = base_step / p["step_s"], base_step / p["step_ring_overlap_s"]
        out.append(dict(gpus=row["gpus"], layout=row["layout"], chosen=row["chosen"], speedup=speed))
        lines.append(f"| {row['gpus']} | {row['layout']} | {'chosen' if row['chosen'] else ''} | "
                     f"{row['blocks_eager_s']:.3f} s | {row['comm_gb']:.2f} | {comm['total_s'] * 1e3:.1f} ms | "
                     f"{p['step_s']:.3f} | {speed:.2f}x | {speed / row['gpus']:.2f} | "
                     f"{speed_o:.2f}x |")
    lines.append(f"\nBase: {base_name} = {base_step:.4f} s/step measured on one H200; single-GPU simulated blocks "
                 f"{single:.3f} s (eager); undivided work U = {UNDIVIDED * 1e3:.0f} ms; 250 GB/s per rank, 30 us "
                 f"per collective.")
    return lines, out


def plots(runs: dict, folder: Path, preds: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    made = []
    picks = {"2b": ("call2", "call5"), "5b": ("call2", "call5"), "1.5-5b": ("call3",)}
    for model, calls in picks.items():
        names, values, colors = [], [], []
        seen = set()
        for call in reversed(calls):  # latest run of each configuration
            for name, row in runs.get(call, {}).get("models", {}).get(model, {}).get("variants", {}).items():
                if name in seen or "s_per_step" not in row:
                    continue
                seen.add(name)
                names.append(name)
                values.append(row["s_per_step"])
                colors.append("#888888" if name.startswith("diffusers") else "#2a7ab8")
        xf = runs.get("call3_xfuser", {}).get("models", {}).get(model, {})
        if xf.get("s_per_step"):
            names.append("xfuser 0.7.0 (1 GPU)")
            values.append(xf["s_per_step"])
            colors.append("#e08a2c")
        if not names:
            continue
        order = sorted(range(len(names)), key=lambda i: -values[i])
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
        ax.barh([names[i] for i in order], [values[i] for i in order], color=[colors[i] for i in order])
        for y, i in enumerate(order):
            ax.text(values[i], y, f" {values[i]:.3f}", va="center", fontsize=8)
        target = {"2b": 0.45, "5b": 1.30}.get(model)
        if target:
            ax.axvline(target, color="#c0392b", ls="--", lw=1)
            ax.text(target, len(names) - 0.4, f" target {target}", color="#c0392b", fontsize=8)
        frames, h, w = MODELS[model]["size"]
        ax.set_xlabel("seconds per denoising step (CFG batch 2, bf16), lower is better")
        ax.set_title(f"CogVideoX-{model}, {frames}x{h}x{w}, one H200 (2026-11-29)", fontsize=10)
        ax.set_xlim(0, max(values) * 1.18)
        fig.tight_layout()
        path = folder / f"s_per_step_{model.replace('.', '')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    fig, axes = plt.subplots(1, len(preds), figsize=(5.5 * len(preds), 3.6), sharey=True)
    for ax, (model, rows) in zip(axes, preds.items()):
        for n in (2, 4, 8):
            pts = [r for r in rows if r["gpus"] == n]
            ax.scatter([n] * len(pts), [r["speedup"] for r in pts], color="#9bb7cf", s=18)
            best = [r for r in pts if r["chosen"]]
            ax.scatter([n] * len(best), [r["speedup"] for r in best], color="#2a7ab8", s=40, zorder=3)
        ax.plot([1, 8], [1, 8], color="#bbbbbb", ls=":", lw=1)
        ax.set_title(f"{model}: PREDICTED speed-up (chooser's layout dark)", fontsize=9)
        ax.set_xlabel("GPUs")
        ax.set_xticks([1, 2, 4, 8])
    axes[0].set_ylabel("speed-up over our 1-GPU step")
    fig.tight_layout()
    path = folder / "predicted_speedup.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)
    return made


def main():
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--plots", default=None)
    args = p.parse_args()
    runs = load(Path(args.folder))
    for model, calls in (("2b", ["call2", "call5"]), ("5b", ["call2", "call5"]), ("1.5-5b", ["call3"])):
        print(f"\n### {model}\n")
        print("\n".join(variants_table(runs, model, calls)))
    preds = {}
    for model in ("2b", "5b"):
        base = runs["call5"]["models"][model]["variants"]["ours-fa4-compiled-v2"]["s_per_step"]
        lines, preds[model] = predictions(runs, model, base, "ours-fa4-compiled-v2 (= default), call5")
        print(f"\n### predictions {model}\n")
        print("\n".join(lines))
    if args.plots:
        for path in plots(runs, Path(args.plots), preds):
            print("wrote", path)


if __name__ == "__main__":
    main()
