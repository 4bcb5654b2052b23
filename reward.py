"""Step 2 of RLHF: a reward model from human preference pairs.

A causal LM checkpoint (or an existing reward model) becomes an AutoModelForSequenceClassification with one output;
its score for prompt + response is read at the last real token (the EOS id appended to every response), and the
pairwise loss -log sigmoid(r_chosen - r_rejected) teaches it to rank the chosen response above the rejected one.
After training, the mean and std of its scores on held-out SFT-style responses are stored in the checkpoint's config
(`reward_mean`, `reward_std`), so that ppo.py can normalise rewards.

References: Stiennon et al. 2020 and Ziegler et al. 2019 (pairwise loss, head init, normalisation); InstructGPT;
Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"; DeepSpeed-Chat step 2.

    python reward.py                                     # the demo, on ./sft_ckpt, on a CPU
    deepspeed reward.py --model ./sft_ckpt --data pairs.jsonl --zero_stage 3
    deepspeed --num_gpus 8 reward.py --model Qwen/Qwen2-0.5B --data a.jsonl,b.jsonl --zero_stage 3
    deepspeed --hostfile hosts.txt reward.py ...         # several nodes
    torchrun --nproc_per_node 2 reward.py ...
"""

import math
import os
import random
import time
from dataclasses import dataclass
from typing import Literal

import deepspeed
import numpy as np
import torch
import torch.nn.functional as F
import tyro

import common
import common.data
import common.flags
import common.runs
import common.toy
from common.flags import flag


@dataclass
class Args:
    # model & data
    model: str = "./sft_ckpt"
    """a causal LM (a new score head is made) or a reward model: HF hub name or folder"""
    data: str = "toy"
    """pairs: JSONL or JSON file(s), a `datasets` folder, an HF dataset name, or `toy` (docs/data.md)"""
    eval_data: str | None = None
    """held-out pairs in the same format; default: hold out --eval_fraction of --data (`toy`: its eval prompts)"""
    data_split: str = "train"
    """split of a dataset folder or HF hub dataset that --data names"""
    eval_split: str | None = None
    """held-out split of --data (e.g. test_prefs); default: --eval_data, else --eval_fraction of --data"""
    skip_invalid: bool = False
    """drop (and count) records that do not fit a layout, instead of stopping at the first"""
    eval_fraction: float = flag(0.05, "0 <= x < 1")
    """share of --data held out for evaluation when --eval_data is not given (0 <= x < 1; 0: no evaluation)"""
    max_seq_len: int | None = flag(None, ">= 2")
    """longest prompt + answer in tokens (>= 2); default 512, or the model's context if shorter"""
    truncation: Literal["left", "error"] = "left"
    """what to do with a sequence longer than --max_seq_len: cut from the left (and count it), or stop"""
    trust_remote_code: bool = flag(False, run=False)
    """allow custom model code from the hub; off unless you trust the model's authors"""
    output_dir: str = flag("./reward_ckpt", run=False)
    """where the reward model, tokenizer, args.json, metrics.jsonl and checkpoints/ go"""
    # optimisation
    per_device_batch_size: int | None = flag(None, ">= 1", run=False)
    """pairs per rank per micro-batch (>= 1); default 16, or fewer for small data"""
    gradient_accumulation_steps: int = flag(1, ">= 1", run=False)
    """micro-batches per optimizer step (>= 1); global batch = per_device_batch_size x ranks x this"""
    learning_rate: float | None = flag(None, "> 0")
    """peak learning rate (> 0); default 5e-4 for --data toy, 1e-5 otherwise"""
    weight_decay: float = flag(0.0, ">= 0")
    """AdamW weight decay (>= 0)"""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """decay after warmup"""
    warmup_ratio: float = flag(0.05, "0 <= x <= 1")
    """share of the steps spent warming the learning rate up linearly (0 <= x <= 1)"""
    num_epochs: int = flag(1, ">= 1", run=False)
    """passes over the pairs (>= 1; one is usually enough: preference data overfits quickly)"""
    max_steps: int = flag(-1, "-1 or >= 1", run=False)
    """stop after this many optimizer steps (-1 or >= 1); -1: run the epochs"""
    grad_clip: float = flag(1.0, ">= 0")
    """clip the global gradient norm to this (>= 0; 0: no clipping)"""
    seed: int = flag(42, "0 <= x <= 4294967295")
    """same on every rank: weights, data order (0 <= x <= 4294967295)"""
    # systems
    zero_stage: int = flag(0, "0 <= x <= 3")
    """DeepSpeed ZeRO stage (0 <= x <= 3)"""
    offload: bool = flag(False, run=False)
    """ZeRO-Offload: optimizer states (and with stage 3 the parameters) in CPU memory"""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on a GPU that has it, else fp32"""
    gradient_checkpointing: bool = flag(False, run=False)
    """recompute activations in the backward pass to save memory"""
    lora_rank: int = flag(0, ">= 0")
    """LoRA rank on the body (>= 0; 0 = train all weights); the score head is always fully trained"""
    lora_alpha: float = flag(16.0, "> 0")
    """LoRA scaling numerator (> 0)"""
    # logging & checkpoints
    eval_every: int = flag(50, ">= 0", run=False)
    """evaluate every this many steps (>= 0) and at 0 and the end; 0: only at 0 and the end"""
    save_every: int = flag(0, ">= 0", run=False)
    """write a resumable DeepSpeed checkpoint every this many steps (>= 0); 0: never"""
    resume: bool = flag(False, run=False)
    """continue from the newest checkpoint in --output_dir/checkpoints (the flags that define a run must match)"""
    resume_changes: tuple[str, ...] = flag((), run=False)
    """with --resume: names of run-defining flags allowed to differ from the checkpoint's run (the error lists them)"""
    overwrite: bool = flag(False, run=False)
    """replace an --output_dir that holds another run of these scripts (only the files they write are removed)"""
    report_to: Literal["none", "tensorboard", "wandb"] = flag("none", run=False)
    """also send the metrics to TensorBoard or Weights & Biases; metrics.jsonl is always written"""
    # launcher
    local_rank: int = flag(-1, run=False)
    """set by the deepspeed launcher; do not pass by hand"""


def encode_pair(tokenizer, record: dict, max_seq_len: int, truncation: str, where: str):
    """Token ids of prompt + chosen and prompt + rejected, each ending with the token that ends the answer's turn
    (EOS, or the chat template's end of turn), where the score is read; a third flag says whether either was cut
    from the left."""
    out, cut = [], False
    for side in ("chosen", "rejected"):
        answer = record[side]
        if isinstance(answer, str):
            answer = [{"role": "assistant", "content": answer}]
        elif answer[-1]["role"] != "assistant":  # the score is read at the token that ends an assistant turn
            raise common.UserError(f"{where}: field '{side}' must end with an assistant turn")
        ids = common.encode_scored(tokenizer, record["prompt"] + answer)
        if len(ids) > max_seq_len and truncation == "error":
            raise common.UserError(f"{where}: {side} has {len(ids)} tokens > --max_seq_len {max_seq_len} "
                                   "(pass --truncation left to cut it)")
        (ids,), c = ((ids,), False) if len(ids) <= max_seq_len else common.fit_turns(  # oldest whole turns first
            tokenizer, record["prompt"] + answer, max_seq_len, lambda m: (common.encode_scored(tokenizer, m),),
            keep=len(answer))
        out.append(ids)
        cut |= c
    return out[0], out[1], cut


def collate_pairs(pairs: list, pad_id: int, device, side: str = "right") -> dict:
    """One batch holding both sides: rows [0, n) are the chosen sequences, rows [n, 2n) the rejected ones."""
    rows = [p[0] for p in pairs] + [p[1] for p in pairs]
    ids = common.pad(rows, pad_id, side=side).to(device)
    attn = common.pad([[1] * len(r) for r in rows], 0, side=side).to(device)
    margin = torch.tensor([p[2] for p in pairs], dtype=torch.float32, device=device)
    return {"input_ids": ids, "attention_mask": attn, "margin": margin}


def score(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward of each row: the score head at its last real token, found from the mask (right or left padding)."""
    last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)
    return common.scores(model, input_ids, attention_mask)[torch.arange(len(last), device=last.device), last]


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Per-pair -log sigmoid(r_chosen - r_rejected - margin) (Stiennon et al. 2020; margin as in Llama 2)."""
    return -F.logsigmoid(chosen - rejected - margin)


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (ties get their average rank)."""

    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1]) if ra.std() > 0 and rb.std() > 0 else 0.0


@torch.no_grad()
def score_all(engine, seqs: list[list[int]], batch_size: int, pad_id: int, device) -> list[float]:
    """Scores of many sequences, split across ranks, gathered back in order. Every rank runs the same number of
    forwards (ZeRO-3 needs that): rows past the end repeat row 0 and are dropped."""
    world = common.world_size()
    per_rank = math.ceil(len(seqs) / world)
    start = common.rank() * per_rank
    mine = [seqs[i] if i < len(seqs) else seqs[0] for i in range(start, start + per_rank)]
    out = torch.zeros(per_rank * world, device=device)
    for b in range(0, per_rank, batch_size):
        rows = mine[b: b + batch_size]
        attn = common.pad([[1] * len(r) for r in rows], 0).to(device)
        out[start + b: start + b + len(rows)] = score(engine, common.pad(rows, pad_id).to(device), attn)
    if world > 1:
        torch.distributed.all_reduce(out)
    return out[: len(seqs)].tolist()


def evaluate(engine, pairs: list, gold: list | None, batch_size: int, pad_id: int, device) -> dict:
    engine.eval()
    scores = score_all(engine, [p[0] for p in pairs] + [p[1] for p in pairs], batch_size * 2, pad_id, device)
    engine.train()
    chosen, rejected = torch.tensor(scores[: len(pairs)]), torch.tensor(scores[len(pairs):])
    margin = torch.tensor([p[2] for p in pairs])
    out = {"eval/loss": pairwise_loss(chosen, rejected, margin).mean().item(),
           "eval/accuracy": (chosen > rejected).float().mean().item(),
           "eval/chosen_reward": chosen.mean().item(), "eval/rejected_reward": rejected.mean().item()}
    if gold is not None:  # the demo: does the model rank responses as the hidden human does?
        out["eval/gold_spearman"] = spearman(scores, gold)
    return out


def normalisation(engine, seqs: list[list[int]], batch_size: int, pad_id: int, device) -> dict:
    """Mean and std of the scores of SFT-style responses; ppo.py subtracts the mean and divides by the std, so that
    the policy it starts from scores about 0 +- 1 (Stiennon et al. 2020; N+ details)."""
    engine.eval()
    s = torch.tensor(score_all(engine, seqs, batch_size, pad_id, device), dtype=torch.float64)
    engine.train()
    std = s.std().item() if len(s) > 1 else 1.0  # one score has no spread: leave the scale alone
    return {"eval/reward_mean": s.mean().item(), "eval/reward_std": max(std, 1e-6)}


def main(args: Args):
    # --- setup ---
    common.flags.check(args)
    common.check_zero_stage(args.zero_stage)
    common.check_report_to(args.report_to)
    common.check_model_path(args.model, "--model")
    tag = common.runs.prepare_output_dir(args.output_dir, args.overwrite, args.resume, "reward.py",
                                    {"--model": args.model, "--data": args.data, "--eval_data": args.eval_data})
    device = common.init_distributed()
    world, rank = common.world_size(), common.rank()
    dtype = common.resolve_dtype(args.dtype)
    common.seed_everything(args.seed)
    toy = args.data == "toy"
    lr = args.learning_rate if args.learning_rate is not None else (5e-4 if toy else 1e-5)

    # --- data ---
    tokenizer = common.load_tokenizer(args.model, args.trust_remote_code)
    context = common.flags.model_context(args.model, args.trust_remote_code)
    max_seq_len = common.flags.fit_max_seq_len(args.max_seq_len, context)

    def encode(records, source):  # an error names the pair's file:line; --skip_invalid drops it instead
        def one(r, where):
            chosen, rejected, cut = encode_pair(tokenizer, r, max_seq_len, args.truncation, where)
            return (chosen, rejected, r.get("margin", 0.0)), cut

        encoded = common.data.encode_records(records, one, source, args.skip_invalid, tokenizer)
        return [pair for pair, _ in encoded], sum(cut for _, cut in encoded)

    # encoded before the eval split, so that an error names pairs in the order of the file
    train_records, eval_records = common.data.load_splits(args.data, args.eval_data, args.data_split, args.eval_split,
                                                     "pairs", args.skip_invalid)
    train, n_cut = encode(train_records, args.data)
    if eval_records is not None:
        evals, _ = encode(eval_records, args.eval_data or args.data)
    else:
        train, evals = common.data.split_eval(train, args.eval_fraction, args.seed)
    gold = None
    if toy and not args.eval_data:
        gold = [common.toy.gold_score(r["prompt"][-1]["content"], r[side][-1]["content"])
                for side in ("chosen", "rejected") for r in eval_records]
    r = train_records[0]
    for side in ("chosen", "rejected"):  # the score is read at the last token
        ids, mask = common.encode_conversation(tokenizer, r["prompt"] + r[side])
        n = len(common.encode_scored(tokenizer, r["prompt"] + r[side]))
        common.print0(f"example {side} (answer in [[ ]], scored at its last token):\n"
                      + common.show_example(tokenizer, ids[:n], mask[:n]))
    if gap := common.template_gap(tokenizer):
        common.note(gap)
    # normalisation set: SFT-style responses (demo: held-out demonstrations; else both sides of the eval pairs, or
    # of up to 512 training pairs when nothing is held out)
    if toy:
        sft_eval = common.data.load_data("toy", "sft", split="eval")
        norm_seqs = [common.encode_scored(tokenizer, r["messages"])[-max_seq_len:] for r in sft_eval]
    else:
        norm_pairs = evals or random.Random(args.seed).sample(train, min(len(train), 512))
        norm_seqs = [p[0] for p in norm_pairs] + [p[1] for p in norm_pairs]
    micro = common.flags.fit_micro_batch(args.per_device_batch_size, len(train),
                                         world * args.gradient_accumulation_steps, "pairs")
    global_batch = micro * world * args.gradient_accumulation_steps
    steps_per_epoch = len(train) // global_batch
    if steps_per_epoch == 0:
        raise common.UserError(f"--data has {len(train)} training pairs, fewer than one global batch ({global_batch} "
                               "= per_device_batch_size x ranks x gradient_accumulation_steps)")
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_epochs
    common.print0(f"{len(train)} train / {len(evals)} eval pairs, {total_steps} steps of {global_batch}; "
                  f"{n_cut} pairs truncated from the left to {max_seq_len} tokens")
    run = {"script": "reward.py", "world_size": world, "global_batch": global_batch, "train_examples": len(train),
           "total_steps": total_steps, "max_seq_len": max_seq_len, "learning_rate": lr}
    if tag:
        common.runs.check_resume(args.output_dir, args, tag, run, "total_steps",
                            fixed=("zero_stage", "lora_rank") + (("world_size",) if args.zero_stage else ()))

    # --- model ---
    from transformers import AutoModelForSequenceClassification

    if args.model == "toy":  # the demo's untrained model, for trying the script without sft.py
        cfg = common.toy.toy_model(tokenizer).config
        cfg.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = common.from_pretrained(AutoModelForSequenceClassification, args.model, "--model", num_labels=1,
                                       dtype=dtype, trust_remote_code=args.trust_remote_code)
    if not any(a.endswith("ForSequenceClassification") for a in model.config.architectures or []):
        # a new head: N(0, 1/sqrt(d + 1)), bias 0 (Stiennon et al. 2020, lm-human-preferences)
        torch.nn.init.normal_(model.score.weight, std=1.0 / math.sqrt(model.config.hidden_size + 1))
        if getattr(model.score, "bias", None) is not None:
            torch.nn.init.zeros_(model.score.bias)
    common.check_vocab(model, tokenizer, "--model")
    common.disable_dropout(model)
    model = model.to(dtype)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.lora_rank > 0 and args.gradient_checkpointing:
        model.enable_input_require_grads()
    model = common.with_lora(model, args.lora_rank, args.lora_alpha, "SEQ_CLS")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.95), fused=True)
    warmup = int(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, common.lr_lambda(args.lr_scheduler, warmup, total_steps))
    config = common.ds_config(args.zero_stage, micro * 2, args.gradient_accumulation_steps, dtype,
                              args.offload, args.grad_clip, offload_params=args.offload)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)

    # --- resume ---
    common.runs.start_output_dir(args.output_dir, args, args.overwrite, args.resume, run)
    ckpt_dir = os.path.join(args.output_dir, "checkpoints")
    start_step = 0
    if tag:
        changed = set(args.resume_changes)  # a new learning rate or weight decay replaces the checkpoint's
        state = common.runs.load_checkpoint(engine, ckpt_dir, tag, lr if "learning_rate" in changed else None,
                                       args.weight_decay if "weight_decay" in changed else None)
        start_step = state["step"]
        common.runs.set_rng_state(state["rng"])
        common.print0(f"resumed from {ckpt_dir}/{tag} at step {start_step}")
        common.runs.truncate_log(args.output_dir, start_step)  # drop rows logged after the checkpoint

    # --- loop ---
    logger = common.Logger(args.output_dir, total_steps, "reward", initial=start_step, report_to=args.report_to,
                           config=vars(args))
    pad_id = common.pad_id(tokenizer)
    if start_step == 0 and evals:  # no eval set (--eval_fraction 0): no eval rows
        logger.log(0, evaluate(engine, evals, gold, micro, pad_id, device))
    t0 = time.time()
    for step in range(start_step, total_steps):
        epoch, k = divmod(step, steps_per_epoch)
        order = list(range(len(train)))
        random.Random(args.seed + epoch).shuffle(order)  # same order on every rank
        batch_idx = order[k * global_batch: (k + 1) * global_batch]
        chunks = [batch_idx[i * micro: (i + 1) * micro] for i in range(world * args.gradient_accumulation_steps)]
        mine = chunks[rank * args.gradient_accumulation_steps: (rank + 1) * args.gradient_accumulation_steps]
        # a mean over the global batch's pairs: DeepSpeed divides by the accumulation steps and averages over ranks,
        # so the per-micro-batch sum is scaled back by both
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
        for c in mine:
            batch = collate_pairs([train[i] for i in c], pad_id, device)
            scores = score(engine, batch["input_ids"], batch["attention_mask"])
            chosen, rejected = scores[: len(c)], scores[len(c):]
            losses = pairwise_loss(chosen, rejected, batch["margin"])
            engine.backward(losses.sum() / global_batch * world * args.gradient_accumulation_steps)
            engine.step()
            loss_sum += losses.detach().sum()
            correct += (chosen > rejected).float().sum()
        loss_sum, correct = common.all_reduce_sum([loss_sum.item(), correct.item()], device)
        metrics = {"train/loss": loss_sum / global_batch, "train/accuracy": correct / global_batch,
                   "train/lr": scheduler.get_last_lr()[0], "train/epoch": step / steps_per_epoch,
                   "throughput/pairs_per_s": (step + 1 - start_step) * global_batch / (time.time() - t0)}
        common.check_finite(metrics, step + 1)
        if evals and ((args.eval_every and (step + 1) % args.eval_every == 0) or step + 1 == total_steps):
            metrics |= evaluate(engine, evals, gold, micro, pad_id, device)
        if step + 1 == total_steps:
            metrics |= normalisation(engine, norm_seqs, micro * 2, pad_id, device)
            common.check_finite(metrics, step + 1)
        logger.log(step + 1, metrics, advance=1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            common.runs.save_checkpoint(engine, ckpt_dir, f"step{step + 1}",
                                        {"step": step + 1, "rng": common.runs.rng_state()})
            common.runs.commit_args(args.output_dir)  # args.json describes the run from its first save on

    # --- save ---
    logger.close()
    stats = {"reward_mean": metrics["eval/reward_mean"], "reward_std": metrics["eval/reward_std"]}
    common.save_hf(engine.module, tokenizer, args.output_dir, args.zero_stage, extra_config=stats)
    common.runs.commit_args(args.output_dir, finished=True)
    common.print0(f"saved {args.output_dir} (reward mean {stats['reward_mean']:.3f}, std {stats['reward_std']:.3f}, "
                  f"{time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, console_outputs=common.is_rank0()))
