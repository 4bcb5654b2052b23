"""Benchmark (not a test): is a PPO iteration made of nothing but the model calls it cannot avoid?

Times (a) full ppo.py iterations after warm-up and (b) each model call of an iteration alone, with the same shapes:
generate, the four scoring forwards (actor, reference, critic, reward) and the optimizer steps of actor and critic.
Prints one JSON line with (a), the sum of (b), their ratio and episodes/s.

    python bench/ppo_step.py                                   # tiny random Llama, CPU, ~1 minute
    python bench/ppo_step.py --hidden 512 --layers 8 --batch 32 --new_tokens 128 --zero_stage 3 --ranks 2
    deepspeed --num_gpus 8 bench/ppo_step.py --hidden 2048 --layers 24 --dtype bf16
"""

import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import common.data  # noqa: E402
import common.engines  # noqa: E402
import common.generation  # noqa: E402
import common.data  # noqa: E402
import common.toy  # noqa: E402
import ppo  # noqa: E402


@dataclass
class Bench:
    hidden: int = 256
    """hidden size of the random Llama-shaped actor, critic, reference and reward models"""
    layers: int = 3
    """number of layers"""
    batch: int = 64
    """prompts per rank per iteration (--rollout_batch_size)"""
    new_tokens: int = 48
    """response length (--max_new_tokens); random models rarely stop early"""
    iterations: int = 6
    """timed PPO iterations (after --warmup)"""
    warmup: int = 2
    """untimed iterations first"""
    ppo_epochs: int = 2
    """PPO epochs per iteration"""
    mini_batch_size: int = 16
    """samples per rank per optimizer step"""
    zero_stage: int = 0
    """ZeRO stage of every model"""
    generate_sharded: bool = False
    """ZeRO-3: generate through the partition hooks instead of gathering once"""
    dtype: str = "auto"
    """model dtype"""
    family: str = "llama"
    """shape of the random models: llama or opt (DeepSpeed-Chat's family)"""
    ranks: int = 1
    """processes to launch (the deepspeed launcher on this machine's CPUs or GPUs)"""
    repeats: int = 5
    """timings of each single call; the median is reported"""
    local_rank: int = -1
    """set by the deepspeed launcher"""


def build_models(b: Bench, folder: Path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, OPTConfig

    tok = common.toy.toy_tokenizer()
    shape = dict(vocab_size=len(tok), hidden_size=b.hidden, num_hidden_layers=b.layers,
                 num_attention_heads=max(1, b.hidden // 64), max_position_embeddings=512,
                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    if b.family == "opt":
        cfg = OPTConfig(**shape, ffn_dim=4 * b.hidden, word_embed_proj_dim=b.hidden, bos_token_id=tok.eos_token_id)
    else:
        cfg = LlamaConfig(**shape, intermediate_size=3 * b.hidden)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder / "actor")
    cfg.num_labels = 1
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(folder / "reward")
    for name in ("actor", "reward"):
        tok.save_pretrained(folder / name)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        common.init_distributed()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])  # the first call warms up


def main(b: Bench):
    if b.ranks > 1 and "RANK" not in os.environ:
        port = str(29500 + os.getpid() % 1000)
        argv, skip = [], False
        for a in sys.argv[1:]:  # drop --ranks N / --ranks=N
            if not skip and not a.startswith("--ranks"):
                argv.append(a)
            skip = a == "--ranks"
        os.execv(sys.executable, [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(b.ranks),
                                  "--master_port", port, __file__, *argv])
    device = common.init_distributed()
    world = common.world_size()
    folder = Path(os.environ.get("BENCH_DIR", tempfile.gettempdir())) / f"bench_ppo_{b.family}_{b.hidden}_{b.layers}"
    if common.is_rank0() and not (folder / "reward" / "config.json").exists():
        build_models(b, folder)
    torch.distributed.barrier()

    # (a) full iterations of ppo.py
    out = Path(tempfile.mkdtemp(prefix="bench_ppo_run_")) if common.is_rank0() else None
    out_list = [str(out)]
    torch.distributed.broadcast_object_list(out_list, src=0)
    args = ppo.Args(actor=str(folder / "actor"), reward=str(folder / "reward"), data="toy",
                    output_dir=out_list[0] + "/run", overwrite=True, rollout_batch_size=b.batch,
                    total_episodes=(b.warmup + b.iterations) * b.batch * world, max_new_tokens=b.new_tokens,
                    ppo_epochs=b.ppo_epochs, mini_batch_size=b.mini_batch_size,
                    per_device_batch_size=b.mini_batch_size,
                    zero_stage=b.zero_stage, generate_sharded=b.generate_sharded, dtype=b.dtype, eval_every=0,
                    num_eval_prompts=world, print_samples=0)
    os.environ["TQDM_DISABLE"] = "1"
    ppo.main(args)
    rows = [json.loads(line) for line in Path(args.output_dir, "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/iteration_s" in r][b.warmup:]
    iteration_s = statistics.median(r["time/iteration_s"] for r in rows)
    response_len = statistics.mean(r["train/response_len"] for r in rows)
    peak_gb = max((r.get("memory/peak_gb", 0.0) for r in rows), default=0.0)
    if common.is_rank0():  # (a) alone, in case (b) does not fit beside what (a) leaves behind
        print(json.dumps({"iteration_s": round(iteration_s, 4),
                          "episodes_per_s": round(b.batch * world / iteration_s, 2),
                          "response_len": round(response_len, 1), "peak_gb": round(peak_gb, 2)}), flush=True)
    gc.collect()  # DeepSpeed engines hold reference cycles: free (a)'s four models before (b) loads its own
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # (b) each model call alone, same shapes
    def no_dropout(model):  # as ppo.py does (OPT's config has dropout 0.1)
        common.disable_dropout(model)
        return model

    dtype = common.resolve_dtype(b.dtype)
    tok = common.load_tokenizer(args.actor)
    records = common.data.load_data("toy", "prompts")[: b.batch]
    prompts, *_ = common.data.encode_prompts(records, tok, 256, "left", "toy")
    steps = b.ppo_epochs * (b.batch // b.mini_batch_size)
    mb = b.mini_batch_size
    eng = common.engines
    actor = eng.trained_engine(no_dropout(common.load_causal_lm(args.actor, dtype, tok)), 1e-6, args, b.zero_stage,
                               mb, 1, 100, dtype)
    critic = eng.trained_engine(eng.ValueModel(eng.load_value_model(args.reward, dtype, tok, False, "--reward")),
                                1e-6, args, b.zero_stage, mb, 1, 100, dtype)
    ref = eng.frozen_engine(no_dropout(common.load_causal_lm(args.actor, dtype, tok)), b.zero_stage, False, dtype)
    reward = eng.frozen_engine(eng.ValueModel(eng.load_value_model(args.reward, dtype, tok, False, "--reward")),
                               b.zero_stage, False, dtype)
    gen_config = common.generation.generation_config(args, tok)
    rollout = {}

    def gen():
        torch.manual_seed(0)
        rollout["r"], rollout["n"] = ppo.generate(actor, prompts, tok, gen_config, b.zero_stage, b.generate_sharded,
                                                  device)

    t = {"generate_s": timed(gen, b.repeats)}
    r, n_prompt = rollout["r"], rollout["n"]
    seq, attn = r["seq"], r["attn"]
    chunks = ppo.micro_slices(seq.shape[0], mb)
    with torch.no_grad():
        t["actor_forward_s"] = timed(lambda: [ppo.seq_logprobs(actor, seq[s], attn[s], n_prompt, 1.0, True)
                                              for s in chunks], b.repeats)
        t["ref_forward_s"] = timed(lambda: [ppo.seq_logprobs(ref, seq[s], attn[s], n_prompt, 1.0) for s in chunks],
                                   b.repeats)
        t["critic_forward_s"] = timed(lambda: [critic(seq[s], attn[s]) for s in chunks], b.repeats)
        t["reward_forward_s"] = timed(lambda: ppo.reward_scores(reward, r, n_prompt, mb), b.repeats)
    s0 = slice(0, mb)

    def actor_step():
        loss = ppo.seq_logprobs(actor, seq[s0], attn[s0], n_prompt, 1.0).mean() * 0.0
        actor.backward(loss)
        actor.step()

    def critic_step():
        critic.backward(critic(seq[s0], attn[s0]).mean() * 0.0)
        critic.step()

    t["actor_update_s"] = timed(actor_step, b.repeats) * steps
    t["critic_update_s"] = timed(critic_step, b.repeats) * steps
    # old log-probs from generation's scores instead of a forward: cheaper, but are they exact?
    with torch.no_grad():
        padded = seq[:, :n_prompt]
        out = actor.module.generate(input_ids=padded, attention_mask=attn[:, :n_prompt], generation_config=gen_config,
                                    output_scores=True, return_dict_in_generate=True) if b.zero_stage < 3 else None
    if out is not None:
        gen_tokens = out.sequences[:, n_prompt:]
        scores = torch.stack(out.scores, 1).float().log_softmax(-1)
        from_scores = torch.gather(scores, -1, gen_tokens.unsqueeze(-1)).squeeze(-1)
        _, mask, _, _ = ppo.truncate_after_eos(gen_tokens, tok.eos_token_id, tok.pad_token_id)
        full_attn = torch.cat([attn[:, :n_prompt], mask.long()], 1)
        with torch.no_grad():
            fwd = ppo.seq_logprobs(actor, out.sequences, full_attn, n_prompt, 1.0)
        t["scores_vs_forward_max_abs_diff"] = float((fwd - from_scores)[mask].abs().max())
    calls = sum(v for k, v in t.items() if k.endswith("_s"))
    result = {"iteration_s": round(iteration_s, 4), "sum_of_calls_s": round(calls, 4),
              "ratio": round(iteration_s / calls, 3), "episodes_per_s": round(b.batch * world / iteration_s, 2),
              "response_len": round(response_len, 1), "peak_gb": round(peak_gb, 2),
              **{k: round(v, 5) for k, v in t.items()},
              "setup": {**vars(b), "ranks": world, "world": world, "device": str(device),
                        "threads": torch.get_num_threads(), "torch": torch.__version__}}
    if common.is_rank0():
        print(json.dumps(result))


if __name__ == "__main__":
    main(tyro.cli(Bench, use_underscores=True, console_outputs=common.is_rank0()))
