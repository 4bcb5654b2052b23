"""Benchmark (not a test): TRL's GRPOTrainer on a real model, beside `ppo.py --advantage_estimator grpo`.

Both score with the same Python reward in ppo.py's signature (`fn(prompts, responses) -> list[float]`; default
experiments/arithmetic.py's, on its prompts); this script adapts it to TRL's. Run it in a venv with TRL (measured with
trl 1.16.0: `pip install trl==1.16.0 datasets` beside torch):

    python experiments/arithmetic.py ./arith
    python bench/trl_grpo.py --policy ~/.cache/rlhf-scripts/SmolLM2-135M-Instruct --prompts ./arith/train.jsonl \
        --episodes 128 --batch 8 --num_generations 4 --max_new_tokens 32

The same work in ppo.py, and the figures: docs/performance.md, "Against TRL's GRPOTrainer on a real model".

Settings: B prompts x G answers per batch (generation_batch_size = per_device_train_batch_size = B*G), one optimizer
step per batch (num_iterations 1, steps_per_generation 1, grad-accum 1: old log-probs = current), up to T new tokens
(stops at EOS, as ppo.py), temperature 1, top_k 0, top_p 1, beta 0.04 (reference = a copy of the policy), GRPO's loss
aggregation (loss_type "grpo", ppo.py's seq_mean_token_mean) and group std scaling, AdamW lr constant, grad clip 1,
fp32, no gradient checkpointing, no eval, no saving, no vLLM, chat template applied (conversational prompts).
Prints one JSON line: `seconds` is trainer.train() only; `other_cores` > 0.1 means other processes competed for the
CPU during it.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def busy_seconds():
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", help="HF causal-LM folder with a chat template")
    ap.add_argument("--prompts", help='JSONL, {"prompt": "..."} per line (a user turn)')
    ap.add_argument("--reward_fn", default=f"{ROOT}/experiments/arithmetic.py:reward",
                    help="FILE.py:NAME in ppo.py's signature (default: experiments/arithmetic.py:reward)")
    ap.add_argument("--episodes", type=int, default=128, help="answers in all (a multiple of batch x G)")
    ap.add_argument("--batch", type=int, default=8, help="prompts per batch B (one optimizer step)")
    ap.add_argument("--num_generations", type=int, default=4, help="answers per prompt G")
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--beta", type=float, default=0.04, help="KL coefficient (0: no reference model)")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    a = ap.parse_args()

    per_step = a.batch * a.num_generations
    if not (a.policy and a.prompts) or a.episodes % per_step:
        ap.error("--policy and --prompts are needed, and --episodes must be a multiple of batch x num_generations")

    import importlib.util

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    if a.threads:
        torch.set_num_threads(a.threads)
    source, _, name = a.reward_fn.rpartition(":")
    spec = importlib.util.spec_from_file_location("reward_module", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, name)

    def reward(prompts, completions, **kwargs):  # TRL's signature -> ppo.py's (answers as strings)
        return fn(prompts, [c[-1]["content"] if isinstance(c, list) else c for c in completions])

    reward.__name__ = name
    with open(a.prompts) as f:
        prompts = [[{"role": "user", "content": json.loads(line)["prompt"]}] for line in f if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(a.policy, padding_side="left")
    config = GRPOConfig(
        output_dir=os.path.join("/tmp", f"trl_grpo_bench_{os.getpid()}"), max_steps=a.episodes // per_step,
        per_device_train_batch_size=per_step, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=a.num_generations, num_iterations=1, max_completion_length=a.max_new_tokens,
        temperature=1.0, top_k=0, top_p=1.0, beta=a.beta, loss_type="grpo", scale_rewards="group",
        learning_rate=a.lr, lr_scheduler_type="constant", max_grad_norm=1.0,
        model_init_kwargs={"dtype": torch.float32},
        bf16=False, fp16=False, gradient_checkpointing=False, use_vllm=False, use_cpu=True, seed=a.seed,
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=a.policy, reward_funcs=reward, args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)

    m0, c0, t0 = busy_seconds(), time.process_time(), time.perf_counter()
    trainer.train()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    other = max(0.0, (busy_seconds() - m0 - cpu) / seconds)

    rows = [r for r in trainer.state.log_history if "completions/mean_length" in r]
    mean = lambda key: round(sum(r[key] for r in rows) / len(rows), 3) if rows else None  # noqa: E731
    episodes = trainer.state.global_step * per_step
    print(json.dumps({
        "peer": "trl-grpo", "version": trl.__version__, "episodes": episodes, "seconds": round(seconds, 3),
        "episodes_per_s": round(episodes / seconds, 3), "cpu_seconds": round(cpu, 3), "other_cores": round(other, 3),
        "optimizer_steps": trainer.state.global_step, "batch": a.batch, "num_generations": a.num_generations,
        "max_new_tokens": a.max_new_tokens, "beta": a.beta, "response_len": mean("completions/mean_length"),
        "reward": mean("reward"), "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
