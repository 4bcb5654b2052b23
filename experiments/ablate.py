"""PPO on the demo with one implementation detail changed at a time, over several seeds, as a Markdown table of
mean ± std (sample std over seeds) of the final eval/gold, eval/reward, eval/kl and response length.

Each variant is ppo.py with some flags, or, for a detail that has no flag, ppo.py with one function replaced in the
child process (PATCHES below: each is the fork a researcher would make by hand). Runs go to --out/<variant>/seed<N>;
a run that finished before (its model is saved) is not run again, so an interrupted sweep continues where it stopped.

    python sft.py && python reward.py                    # ./sft_ckpt and ./reward_ckpt, once
    python experiments/ablate.py                         # every variant, 3 seeds -> ablation/ablation.md
    python experiments/ablate.py --seeds 1 --total_episodes 512 --variants baseline "KL coefficient 0"
    python experiments/ablate.py --reward none --ppo_args="--reward_fn common.toy:gold_reward_fn"   # against the gold
"""

import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclass
class Args:
    actor: str = "./sft_ckpt"
    """the SFT policy (sft.py's output)"""
    reward: str = "./reward_ckpt"
    """the reward model (reward.py's output)"""
    out: str = "./ablation"
    """where the runs and ablation.md go"""
    seeds: int = 3
    """seeds per variant (42, 43, ...)"""
    total_episodes: int = 1024
    """episodes per run: 16 iterations of 64 (ppo.py's default on the demo is 4096; 1024 keeps 14 variants x 3
    seeds within 30 minutes on 2 cores)"""
    variants: list[str] = field(default_factory=list)
    """names of the variants to run (default: all; see VARIANTS)"""
    ppo_args: str = ""
    """more ppo.py flags for every run, as one string after '=': --ppo_args='--num_eval_prompts 64'"""
    jobs: int = 2
    """runs at a time, each with OMP_NUM_THREADS = 1 when more than one (two single-thread runs of the demo's tiny
    model on two cores finish sooner than two-thread runs one after the other)"""


def variants(actor: str) -> dict[str, tuple[list[str], str | None]]:
    """name -> (ppo.py flags, patch applied in the child process or None)."""
    table = {
        "baseline": ([], None),
        "no advantage whitening": (["--no_whiten_advantages"], None),
        "no reward normalisation": (["--no_normalize_reward"], None),
        "no missing-EOS penalty": (["--missing_eos_penalty", "0"], None),
        "KL coefficient 0": (["--kl_coef", "0"], None),
        "critic from the actor": (["--critic", actor], None),
        "temperature 0.7": (["--temperature", "0.7"], None),
        "temperature 0.7, left out of log-probs": (["--temperature", "0.7"], "logprobs_without_temperature"),
        "dropout 0.1 on": ([], "dropout_on"),
        "greedy rollouts": ([], "greedy_rollouts"),
    }
    import ppo

    estimator = {f.name: f for f in fields(ppo.Args)}.get("advantage_estimator")
    for name in typing.get_args(estimator.type) if estimator else ():  # critic-free estimators, when ppo.py has them
        if name != "gae":  # the same answers per iteration: 16 prompts x 4 samples
            table[f"estimator {name}"] = (["--advantage_estimator", name, "--samples_per_prompt", "4",
                                           "--rollout_batch_size", "16"], None)
    return table


# ---------------------------------------------------------------------------------------------------------------
# the details that have no flag: each replaces one function of ppo.py/common in the child process


def logprobs_without_temperature():
    """N+ detail undone: responses are sampled at --temperature but every log-prob (ratio, KL, entropy) uses T = 1:
    seq_logprobs, which all of ppo.py's log-probs go through, is given T = 1."""
    import ppo

    seq_logprobs = ppo.seq_logprobs

    def at_one(model, seq, attn, n_prompt, temperature, *rest, **kwargs):
        return seq_logprobs(model, seq, attn, n_prompt, 1.0, *rest, **kwargs)

    ppo.seq_logprobs = at_one


def dropout_on(p: float = 0.1):
    """Dropout left on while training actor and critic (ppo.py turns it off): the demo model has no dropout layers,
    so its attention dropout is set to p. Scoring runs in eval mode, so the first ratio is no longer 1."""
    import torch

    import common
    import common.generation

    def enable(model):
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = p
            if isinstance(getattr(m, "attention_dropout", None), float):
                m.attention_dropout = p

    common.disable_dropout = enable


def greedy_rollouts():
    """Rollouts decoded greedily instead of sampled (evaluation stays as configured): ppo.py builds the rollout's
    generation config first and the evaluation's second."""
    import common.generation

    original, calls = common.generation.generation_config, []

    def config(args, tokenizer, greedy=False):
        calls.append(greedy)
        return original(args, tokenizer, greedy=greedy or len(calls) == 1)

    common.generation.generation_config = config


PATCHES = {f.__name__: f for f in (logprobs_without_temperature, dropout_on, greedy_rollouts)}


def child(patch: str, argv: list[str]):
    import ppo

    if patch != "none":
        PATCHES[patch]()
    ppo.main(tyro.cli(ppo.Args, args=argv, use_underscores=True))


# ---------------------------------------------------------------------------------------------------------------
# the sweep and the table


def final_metrics(folder: Path) -> dict:
    """The last eval row's eval/gold, eval/reward, eval/kl and the last iteration's response length."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    last_eval = [r for r in rows if "eval/gold" in r][-1]
    last_train = [r for r in rows if "train/response_len" in r][-1]
    return {k: last_eval[k] for k in ("eval/gold", "eval/reward", "eval/kl")} | {
        "length": last_train["train/response_len"]}


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} ± {std:.3f}" if not math.isnan(std) else f"{values[0]:.3f}"


def table(results: dict[str, list[dict]], before: dict | None = None, before_name: str = "") -> str:
    """Markdown: one row per variant (mean ± std over its seeds), plus the SFT policy before PPO (the step-0
    evaluation of the first variant's first seed) when given."""
    cols = ["eval/gold", "eval/reward", "eval/kl", "length"]
    lines = ["| variant | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    if before:
        lines.append(f"| SFT policy (before PPO{before_name}) | | " + " | ".join(
            f"{before[c]:.3f}" if c in before else "" for c in cols) + " |")
    for name, runs in results.items():
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(mean_std([r[c] for r in runs]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main(args: Args):
    table_spec = variants(args.actor)
    unknown = [v for v in args.variants if v not in table_spec]
    if unknown:
        raise SystemExit(f"error: --variants {unknown[0]!r}: expected one of {', '.join(map(repr, table_spec))}")
    out, t0 = Path(args.out), time.time()
    runs = {(name, seed): out / name.replace(" ", "_").replace(",", "").replace("-", "_") / f"seed{seed}"
            for name in args.variants or list(table_spec) for seed in range(42, 42 + args.seeds)}
    env = os.environ | ({"OMP_NUM_THREADS": "1"} if args.jobs > 1 else {})

    def launch(name: str, seed: int, run: Path):
        flags, patch = table_spec[name]
        cmd = [sys.executable, __file__, "--child", patch or "none", "--actor", args.actor, "--reward", args.reward,
               "--total_episodes", str(args.total_episodes), "--seed", str(seed), "--eval_every", "0",
               "--print_samples", "0", "--output_dir", str(run), *flags, *shlex.split(args.ppo_args)]
        if run.exists():
            cmd.append("--overwrite")  # an unfinished run of this sweep
        t = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        print(f"{name}, seed {seed}: {time.time() - t:.0f} s", flush=True)

    todo = [(name, seed, run) for (name, seed), run in runs.items() if not (run / "config.json").exists()]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: launch(*job), todo))  # list(): an exception in a run is raised here
    results, before = {}, None
    for (name, seed), run in runs.items():
        results.setdefault(name, []).append(final_metrics(run))
        if before is None:
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
            before = {k: v for k, v in rows[0].items() if k.startswith("eval/")}
    first = next(iter(results))
    text = table(results, before, "" if first == "baseline" else f", evaluated as {first}")
    (out / "ablation.md").write_text(text)
    print(text + f"\nwrote {out / 'ablation.md'} ({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3:])
    else:
        main(tyro.cli(Args, use_underscores=True))
