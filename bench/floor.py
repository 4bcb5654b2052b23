"""Benchmark (not a test): the floor under ppo.py on the peer fixture (see bench/peers.py): a bare loop that makes only
the model calls one iteration of ppo.py needs, with ppo.py's own functions, and nothing else: no DeepSpeed, no
logging, no checks, no seeding per generate call, no checkpoints.

Per iteration: sample() (B answers), the actor's forward with autograd (log-probs and entropy), the critic's (PPO),
the reference's and the reward model's forwards without autograd, GAE (PPO) or the leave-one-out baseline (RLOO),
the clipped losses, the backward passes, gradient clipping and one fused AdamW step per trained model. Takes
bench/peers.py's flags and prints the same JSON line (peer "floor" or "floor-rloo"), so that a peer harness can run it
beside ppo.py and TRL: ppo.py's episodes/s over the floor's is what its framework costs.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import common.engines  # noqa: E402
import common.generation  # noqa: E402
import common.launcher  # noqa: E402
import ppo  # noqa: E402
from bench.peers import busy_seconds, peer_args  # noqa: E402  (bench/peers.py)


def main():
    a = peer_args()
    assert a.estimator in ("gae", "rloo"), "the floor has PPO (gae) and RLOO"
    if a.threads:
        torch.set_num_threads(a.threads)
    common.launcher.keep_freed_memory()  # as ppo.py's CPU runs
    torch.manual_seed(a.seed)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.policy)
    actor = AutoModelForCausalLM.from_pretrained(a.policy).train()
    ref = AutoModelForCausalLM.from_pretrained(a.policy).eval().requires_grad_(False)
    rm = common.engines.ValueModel(AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1))
    rm.eval().requires_grad_(False)
    trained = [actor]
    critic = None
    if a.estimator == "gae":
        critic = common.engines.ValueModel(AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1))
        critic.train()
        trained.append(critic)
    steps = a.episodes // a.batch
    optimizers = [torch.optim.AdamW(m.parameters(), lr=a.lr, betas=(0.9, 0.95), eps=1e-5, fused=True) for m in trained]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, common.lr_lambda("linear", 0, steps)) for o in optimizers]
    prompts = [json.loads(line)["prompt"] for line in Path(a.prompts).read_text().splitlines()]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    k, n_prompt = a.samples_per_prompt, len(ids[0])
    assert all(len(x) == n_prompt for x in ids), "the fixture's prompts all have the same length"
    gen = ppo.Args.__new__(ppo.Args)  # only the fields generation_config reads
    gen.temperature, gen.max_new_tokens = 1.0, a.max_new_tokens
    gen_config = common.generation.generation_config(gen, tok)

    t0, c0, m0 = time.perf_counter(), time.process_time(), busy_seconds()
    lengths_seen = []
    for it in range(steps):
        rows = [ids[(it * (a.batch // k) + i) % len(ids)] for i in range(a.batch // k) for _ in range(k)]
        prompt = torch.tensor(rows)
        actor.eval()
        seq = common.generation.sample(actor, prompt, torch.ones_like(prompt), gen_config)
        actor.train()
        responses, mask, lengths, has_eos = ppo.truncate_after_eos(seq[:, n_prompt:], gen_config.eos_token_id,
                                                                   tok.pad_token_id)
        seq = torch.cat([prompt, responses], 1)
        attn = torch.cat([torch.ones_like(prompt), mask.long()], 1)
        lengths_seen.append(float(lengths.float().mean()))
        logp, entropy = ppo.seq_logprobs(actor, seq, attn, n_prompt, 1.0, True)
        values = critic(seq, attn)[:, n_prompt - 1: -1] if critic is not None else None
        with torch.no_grad():
            ref_logp = ppo.seq_logprobs(ref, seq, attn, n_prompt, 1.0)
            score = rm(seq, attn)[torch.arange(len(seq)), n_prompt + lengths - 1]
            score = (score - (~has_eos).float()).clamp(-10, 10)
            score = ppo.group_baseline(score, a.estimator, k)
            rewards, _ = ppo.compute_rewards(score, logp.detach(), ref_logp, mask, lengths, 0.05)
            old_values = torch.where(mask, values.detach(), 0.0) if critic is not None else torch.zeros_like(rewards)
            advantages, returns = ppo.gae(rewards, old_values, mask, 1.0, 0.95 if critic is not None else 1.0)
            if critic is not None:
                advantages = ppo.masked_whiten(advantages, mask)
        n_tokens = mask.sum()
        pg, _, _ = ppo.policy_loss(logp, logp.detach(), advantages, 0.2, mask)
        losses = [ppo.masked_sum(pg, mask) / n_tokens]
        if critic is not None:
            vl, _ = ppo.value_loss(values, old_values, returns, 0.2)
            losses.append(ppo.masked_sum(vl, mask) / n_tokens)
        for model, loss, opt, sched in zip(trained, losses, optimizers, schedulers):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    other = max(0.0, (busy_seconds() - m0 - cpu) / seconds)
    print(json.dumps({
        "peer": "floor" if a.estimator == "gae" else f"floor-{a.estimator}", "version": "main",
        "episodes": steps * a.batch, "seconds": round(seconds, 3),
        "episodes_per_s": round(steps * a.batch / seconds, 3),
        "cpu_seconds": round(cpu, 3), "other_cores": round(other, 3), "batch": a.batch,
        "max_new_tokens": a.max_new_tokens, "optimizer_steps": steps,
        "response_len": round(sum(lengths_seen) / len(lengths_seen), 2), "samples_per_prompt": k,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}), flush=True)


if __name__ == "__main__":
    main()
