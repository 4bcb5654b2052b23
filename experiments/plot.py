"""Curves of one or more runs as one PNG: each metric in its own panel, one line per run, runs labelled by the
arguments in which their args.json differ (all runs of a sweep differ only where the sweep varied them).

    python experiments/plot.py ./ppo_ckpt                              # one run -> curves.png
    python experiments/plot.py runs/kl0 runs/kl0.05 --out kl.png       # several runs on one figure
    python experiments/plot.py ./sft_ckpt --metrics train/loss eval/loss

Needs matplotlib (an optional dependency of experiments/ only: pip install matplotlib).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import tyro

# arguments that differ between runs without changing what they compute
IGNORED = {"output_dir", "overwrite", "resume", "local_rank", "report_to", "print_samples", "save_every"}


@dataclass
class Args:
    runs: tyro.conf.Positional[list[str]]
    """run folders (holding metrics.jsonl and args.json) or metrics.jsonl files"""
    metrics: tuple[str, ...] = ("train/reward", "eval/reward", "eval/gold", "train/kl", "train/entropy",
                                "train/response_len")
    """metrics to draw, one panel each (those no run logged are left out)"""
    out: str = "curves.png"
    """the PNG to write"""
    title: str = ""
    """figure title"""


def load_run(path: str) -> tuple[dict, list[dict]]:
    """(args.json as a dict, or {} when absent; the rows of metrics.jsonl)."""
    p = Path(path)
    folder, metrics = (p.parent, p) if p.suffix == ".jsonl" else (p, p / "metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    args = json.loads((folder / "args.json").read_text()) if (folder / "args.json").exists() else {}
    return args, rows


def run_labels(paths: list[str], args: list[dict]) -> list[str]:
    """`key=value, ...` over the arguments whose values differ between the runs; the folder names when none do."""
    keys = sorted({k for a in args for k in a} - IGNORED)
    differ = [k for k in keys if len({json.dumps(a.get(k), sort_keys=True) for a in args}) > 1]
    if not differ:
        return [Path(p).name if Path(p).suffix != ".jsonl" else Path(p).parent.name for p in paths]
    return [", ".join(f"{k}={a.get(k)}" for k in differ) for a in args]


def series(rows: list[dict], metric: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[metric]) for r in rows if isinstance(r.get(metric), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def plot(paths: list[str], metrics: tuple[str, ...], out: str, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(p) for p in paths]
    labels = run_labels(paths, [a for a, _ in runs])
    shown = [m for m in metrics if any(series(rows, m)[0] for _, rows in runs)]
    if not shown:
        raise SystemExit(f"error: none of {', '.join(metrics)} is in {', '.join(paths)}")
    cols = min(3, len(shown))
    nrows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, shown):
        for (_, rows), label in zip(runs, labels):
            x, y = series(rows, metric)
            ax.plot(x, y, marker="o" if len(x) < 20 else None, markersize=3, label=label)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    plot(args.runs, args.metrics, args.out, args.title)
