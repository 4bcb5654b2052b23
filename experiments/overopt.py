"""Reward-model over-optimisation (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization"): the gold score
and the proxy (the learned reward model's) score of the policy against sqrt(KL to the initial policy), along PPO runs
with a sweep of KL coefficients. The demo's gold score is the hidden human, so the curve is measured, not modelled.

Each run evaluates every --eval_every iterations; every evaluation is one point (eval/kl is the summed per-token KL
of the held-out responses, a k1 estimate in nats, clamped at 0 before the square root).

    python sft.py && python reward.py                       # ./sft_ckpt and ./reward_ckpt, once
    python experiments/overopt.py                           # -> overopt/overopt.png and overopt/overopt.md
    python experiments/overopt.py --kl_coefs 0 0.05 --total_episodes 1024     # a quicker look
    python reward.py --max_steps 60 --output_dir ./reward_weak && \\
        python experiments/overopt.py --reward ./reward_weak --out overopt_weak   # a weaker proxy

Needs matplotlib for the figure (an optional dependency of experiments/ only); the table is written without it.
"""

import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    actor: str = "./sft_ckpt"
    """the initial policy (sft.py's output)"""
    reward: str = "./reward_ckpt"
    """the proxy reward model PPO optimises (reward.py's output)"""
    out: str = "./overopt"
    """where the runs, overopt.png and overopt.md go"""
    kl_coefs: tuple[float, ...] = (0.0, 0.02, 0.1)
    """one PPO run per KL coefficient"""
    total_episodes: int = 6144
    """episodes per run (long enough to push the policy far from the initial one)"""
    eval_every: int = 8
    """iterations between evaluations (points on the curve)"""
    seed: int = 42
    """seed of every run"""
    ppo_args: str = ""
    """more ppo.py flags for every run, as one string after '=': --ppo_args='--num_eval_prompts 64'"""
    jobs: int = 3
    """runs at a time, each with OMP_NUM_THREADS = 1 when more than one (single-thread runs side by side finish
    sooner than two-thread runs one after the other on a small CPU)"""


def curve(rows: list[dict]) -> list[tuple[float, float, float]]:
    """(sqrt(KL), gold, proxy) at every evaluation of a run."""
    return [(math.sqrt(max(r["eval/kl"], 0.0)), r["eval/gold"], r["eval/reward"]) for r in rows if "eval/gold" in r]


def summary(curves: dict[float, list[tuple[float, float, float]]]) -> str:
    """Markdown: per KL coefficient, gold and proxy at the start, gold's peak (and its sqrt KL) and the end."""
    lines = ["| kl_coef | gold at start | peak gold (at sqrt KL) | final gold | proxy at start | final proxy | "
             "final sqrt KL |", "|---|---|---|---|---|---|---|"]
    for coef, points in curves.items():
        peak = max(points, key=lambda p: p[1])
        lines.append(f"| {coef:g} | {points[0][1]:.3f} | {peak[1]:.3f} ({peak[0]:.2f}) | {points[-1][1]:.3f} | "
                     f"{points[0][2]:.3f} | {points[-1][2]:.3f} | {points[-1][0]:.2f} |")
    return "\n".join(lines) + "\n"


def draw(curves: dict[float, list[tuple[float, float, float]]], out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gold_ax, proxy_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
    for coef, points in curves.items():
        x = [p[0] for p in points]
        gold_ax.plot(x, [p[1] for p in points], marker="o", markersize=3, label=f"kl_coef {coef:g}")
        proxy_ax.plot(x, [p[2] for p in points], marker="o", markersize=3, label=f"kl_coef {coef:g}")
    gold_ax.set(title="gold score (the demo's hidden human)", xlabel="sqrt(KL to the SFT policy)", ylabel="gold")
    proxy_ax.set(title="proxy score (the reward model)", xlabel="sqrt(KL to the SFT policy)", ylabel="reward model")
    for ax in (gold_ax, proxy_ax):
        ax.grid(alpha=0.3)
    gold_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main(args: Args):
    out, t0 = Path(args.out), time.time()
    env = os.environ | ({"OMP_NUM_THREADS": "1"} if args.jobs > 1 else {})

    def launch(coef: float):
        run = out / f"kl{coef:g}"
        if not (run / "config.json").exists():  # a finished run (its model is saved) is not run again
            cmd = [sys.executable, str(ROOT / "ppo.py"), "--actor", args.actor, "--reward", args.reward, "--kl_coef",
                   str(coef), "--total_episodes", str(args.total_episodes), "--eval_every", str(args.eval_every),
                   "--seed", str(args.seed), "--print_samples", "0", "--output_dir", str(run),
                   *shlex.split(args.ppo_args)] + (["--overwrite"] if run.exists() else [])
            t = time.time()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
            print(f"kl_coef {coef:g}: {time.time() - t:.0f} s", flush=True)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        return coef, curve(rows)

    with ThreadPoolExecutor(args.jobs) as pool:
        curves = dict(pool.map(launch, args.kl_coefs))
    text = summary(curves)
    (out / "overopt.md").write_text(text)
    print(text)
    try:
        draw(curves, out / "overopt.png")
        print(f"wrote {out / 'overopt.png'}")
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)")
    print(f"{(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
