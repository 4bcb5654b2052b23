"""Benchmark (not a test): ppo.py on a peer fixture (a tiny policy, reward model and prompt file),
timed as TRL's PPOTrainer and RLOOTrainer are timed on it.

Takes the peers' flags (--policy --reward --prompts --episodes N --batch B --max_new_tokens T --lr --seed --threads)
and prints their JSON result line, so that a peer harness can run it beside TRL's PPOTrainer and RLOOTrainer:

    python bench/peers.py --policy /tmp/peers_fixture/policy --reward /tmp/peers_fixture/reward \
        --prompts /tmp/peers_fixture/prompts.jsonl                            # PPO (GAE, critic) vs TRL PPOTrainer
    python bench/peers.py ... --estimator rloo --samples_per_prompt 2     # vs TRL RLOOTrainer, k = 2

The same work as the peers: B episodes (answers) per iteration and one optimizer step on them (1 epoch, 1
mini-batch), T new tokens, temperature 1, fp32, no evaluation, lr decayed linearly, and the same [B, 16] queries.
ppo.py would wrap each fixture prompt in its chat format (the fixture's tokenizer has no template, so DeepSpeed-Chat's
"\n\nHuman: ...\n\nAssistant: ": 35 tokens instead of 16), so this script encodes the prompts raw, as the peers do.
`seconds` is the training loop only, from the logger's creation (just before the first iteration) to its close (just
after the last): model loading, tokenising and the final save are outside, as `trainer.train()` leaves them outside
for the peers. Unlike the peers, ppo.py stops an answer at EOS (a random model samples it about once in 559 tokens);
`response_len` says how long the answers were.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import common.data  # noqa: E402
import ppo  # noqa: E402


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def peer_args():
    """The peer harness's flags, with --estimator and --samples_per_prompt."""
    ap = argparse.ArgumentParser()
    for flag, default in (("--policy", None), ("--reward", None), ("--prompts", None), ("--episodes", 256),
                          ("--batch", 16), ("--max_new_tokens", 24), ("--lr", 1e-5), ("--seed", 0),
                          ("--threads", 0), ("--estimator", "gae"), ("--samples_per_prompt", 1)):
        ap.add_argument(flag, type=type(default) if default is not None else str, default=default,
                        required=default is None)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--local_rank", type=int, default=-1)
    return ap.parse_args()


def main():
    a = peer_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    out = tempfile.mkdtemp(prefix="bench_peers_")
    args = ppo.Args(actor=a.policy, reward=a.reward, data=a.prompts, output_dir=out + "/run", dtype="fp32",
                    total_episodes=a.episodes, rollout_batch_size=a.batch // a.samples_per_prompt,
                    samples_per_prompt=a.samples_per_prompt, advantage_estimator=a.estimator,
                    mini_batch_size=a.batch, ppo_epochs=1, max_new_tokens=a.max_new_tokens, temperature=1.0,
                    learning_rate=a.lr, critic_learning_rate=a.lr, lr_scheduler="linear", seed=a.seed,
                    eval_fraction=0.0, print_samples=0)

    clock = {}

    class TimedLogger(common.Logger):  # created just before the first iteration, closed just after the last
        def __init__(self, *args, **kwargs):
            clock.update(t0=time.perf_counter(), c0=time.process_time(), m0=busy_seconds(), l0=os.getloadavg()[0])
            super().__init__(*args, **kwargs)

        def close(self):
            super().close()
            clock.update(seconds=time.perf_counter() - clock["t0"], cpu=time.process_time() - clock["c0"],
                         m1=busy_seconds(), l1=os.getloadavg()[0])

    common.Logger = TimedLogger

    def raw_prompts(records, tokenizer, max_len, truncation, source, skip_invalid):  # the peers' [B, 16] queries:
        ids = [tokenizer(r["prompt"][-1]["content"], add_special_tokens=False)["input_ids"] for r in records]
        return ids, 0, records  # (no template)

    common.data.encode_prompts = raw_prompts
    if not a.verbose:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        ppo.main(args)
        rows = [json.loads(line) for line in Path(args.output_dir, "metrics.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(out, ignore_errors=True)  # the run's folder (this script made it)
    seconds = clock["seconds"]
    other = max(0.0, (clock["m1"] - clock["m0"] - clock["cpu"]) / seconds)
    name = "ppo.py" if a.estimator == "gae" else f"ppo.py-{a.estimator}"
    print(json.dumps({
        "peer": name, "version": "main", "episodes": a.episodes, "seconds": round(seconds, 3),
        "episodes_per_s": round(a.episodes / seconds, 3), "cpu_seconds": round(clock["cpu"], 3),
        "other_cores": round(other, 3), "loadavg_before": round(clock["l0"], 2),
        "loadavg_after": round(clock["l1"], 2),
        "batch": a.batch, "max_new_tokens": a.max_new_tokens, "optimizer_steps": len(rows),
        "response_len": round(sum(r["train/response_len"] for r in rows) / len(rows), 2),
        "samples_per_prompt": a.samples_per_prompt, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "python": platform.python_version()}), flush=True)


if __name__ == "__main__":
    main()
