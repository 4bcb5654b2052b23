"""Step 1 of RLHF: supervised fine-tuning of a causal LM on demonstrations, loss on the assistant's tokens only.

References: InstructGPT (Ouyang et al. 2022) for response-only SFT; DeepSpeed-Chat step 1 for the launch model.

    python sft.py                                          # the built-in demo, on a CPU, in about a minute
    python sft.py --eval_generate 64                       # also BLEU and ROUGE of answers to held-out prompts
    deepspeed sft.py --model Qwen/Qwen2-0.5B --data my.jsonl --zero_stage 2
    deepspeed --num_gpus 8 sft.py --model meta-llama/Llama-3.2-1B --data a.jsonl,b.jsonl --zero_stage 3
    deepspeed --hostfile hosts.txt sft.py ...              # several nodes
    torchrun --nproc_per_node 2 sft.py ...
"""

import math
import os
import random
import time
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Literal

import deepspeed
import torch
import tyro

import common
import common.data
import common.flags
import common.generation
import common.logprobs
import common.refmetrics
import common.runs
from common.flags import flag


@dataclass
class Args:
    # model & data
    model: str = "toy"
    """Hugging Face hub name or local folder of a causal LM; `toy` builds the demo model"""
    data: str = "toy"
    """JSONL or JSON file(s), a `datasets` folder, an HF dataset name, or `toy` (docs/data.md)"""
    eval_data: str | None = None
    """held-out data in the same format; default: hold out --eval_fraction of --data (`toy`: its eval prompts)"""
    data_split: str = "train"
    """split of a dataset folder or HF hub dataset that --data names"""
    eval_split: str | None = None
    """held-out split of --data (e.g. test_prefs); default: --eval_data, else --eval_fraction of --data"""
    skip_invalid: bool = False
    """drop (and count) records that do not fit a layout, instead of stopping at the first"""
    eval_fraction: float = flag(0.02, "0 <= x < 1")
    """share of --data held out for evaluation when --eval_data is not given (0 <= x < 1; 0: no evaluation)"""
    max_seq_len: int | None = flag(None, ">= 2")
    """longest sequence in tokens (>= 2); default 512, or the model's context if shorter"""
    truncation: Literal["left", "error"] = "left"
    """what to do with an example longer than --max_seq_len: cut from the left (and count it), or stop"""
    trust_remote_code: bool = flag(False, run=False)
    """allow custom model code from the hub; off unless you trust the model's authors"""
    output_dir: str = flag("./sft_ckpt", run=False)
    """where the model, tokenizer, args.json, metrics.jsonl and checkpoints/ go"""
    # optimisation
    per_device_batch_size: int | None = flag(None, ">= 1", run=False)
    """sequences per rank per micro-batch (>= 1); default 16, or fewer when the data holds no global batch of 16"""
    gradient_accumulation_steps: int = flag(1, ">= 1", run=False)
    """micro-batches per optimizer step (>= 1); global batch = per_device_batch_size x ranks x this"""
    learning_rate: float | None = flag(None, "> 0")
    """peak learning rate (> 0); default 1e-3 for --model toy, 2e-5 otherwise"""
    weight_decay: float = flag(0.0, ">= 0")
    """AdamW weight decay (>= 0)"""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """decay after warmup"""
    warmup_ratio: float = flag(0.05, "0 <= x <= 1")
    """share of the steps spent warming the learning rate up linearly (0 <= x <= 1)"""
    num_epochs: int = flag(2, ">= 1", run=False)
    """passes over the training data (>= 1)"""
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
    logprob_chunk_size: int = flag(1024, ">= 1", run=False)
    """positions per chunk of the LM head's log-softmax (>= 1; docs/performance.md)"""
    lora_rank: int = flag(0, ">= 0")
    """LoRA rank (>= 0; 0 = train all weights); needs peft"""
    lora_alpha: float = flag(16.0, "> 0")
    """LoRA scaling numerator (> 0)"""
    lora_save_adapter: bool = flag(False, run=False)
    """save only the LoRA adapter (peft format) instead of weights with the adapter merged in"""
    # logging & checkpoints
    eval_every: int = flag(100, ">= 0", run=False)
    """evaluate every this many steps (>= 0) and at 0 and the end; 0: only at 0 and the end"""
    eval_generate: int = flag(0, ">= 0", run=False)
    """each evaluation also answers this many held-out prompts greedily: eval/bleu, eval/rouge* (>= 0; 0: off)"""
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


def tokenize(records: list[dict], tokenizer, max_seq_len: int, truncation: str, source: str,
             skip_invalid: bool = False):
    """Token ids and loss masks (True on each answer and the token ending its turn; on every token of a {"text"}
    record) for every record; counts left-truncations. A record whose trained tokens were all cut away is dropped
    (said on stderr): it would train nothing. A record that cannot be encoded is an error naming it (dropped with
    --skip_invalid)."""
    def encode(record, where):
        ids, mask = common.encode_record(tokenizer, record)
        if len(ids) > max_seq_len and truncation == "error":
            raise common.UserError(f"{where}: {len(ids)} tokens > --max_seq_len {max_seq_len} (pass --truncation "
                                   "left to cut it)")
        return ((ids, mask), False) if len(ids) <= max_seq_len else common.fit_record(tokenizer, record, max_seq_len)

    examples, n_truncated, n_empty = [], 0, 0
    for (ids, mask), cut in common.data.encode_records(records, encode, source, skip_invalid, tokenizer):
        if cut:  # whole oldest turns first, the BOS and the template's header kept (common.fit_turns)
            n_truncated += 1
            if not any(mask[1:]):  # the first token is never predicted
                n_empty += 1
                continue
        examples.append((ids, mask))
    if n_empty:
        common.note(f"{source}: {n_empty} records dropped: cutting them to --max_seq_len {max_seq_len} from the left "
                    "left none of their answer tokens")
        if not examples:
            raise common.UserError(f"{source}: no record keeps an answer token within --max_seq_len {max_seq_len}")
    return examples, n_truncated


def collate(examples: list, pad_id: int, device) -> dict:
    """Right-padded batch; `loss_mask[t]` says whether token t is predicted with loss."""
    ids = common.pad([e[0] for e in examples], pad_id).to(device)
    loss_mask = common.pad([[int(m) for m in e[1]] for e in examples], 0).to(device).bool()
    attn = common.pad([[1] * len(e[0]) for e in examples], 0).to(device)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def token_nll(model, batch: dict, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over the masked (response) tokens, and their count. The LM head runs on those tokens'
    positions alone, chunk_size at a time, with an fp32 log-sum-exp (common.logprobs.token_logprobs)."""
    mask = batch["loss_mask"]  # its first column is never predicted, so never counted
    logp = common.logprobs.token_logprobs(model, batch["input_ids"], batch["attention_mask"], mask,
                                          chunk_size=chunk_size)
    return -logp.sum(), mask[:, 1:].sum()


def generation_set(examples: list, n: int, max_seq_len: int, tokenizer) -> dict:
    """The first n held-out conversations cut before their last answer (the last run of trained tokens; a {"text"}
    record, trained whole, has none): prompt ids, that answer as text (the reference), and the answer length
    generation allows (twice the longest reference, at most half of max_seq_len; prompts are cut to the rest)."""
    prompts, answers = [], []
    for ids, mask in examples:
        start = end = max(i for i, m in enumerate(mask) if m) + 1
        while start > 0 and mask[start - 1]:
            start -= 1
        if start > 0 and len(prompts) < n:
            prompts.append(ids[:start])
            answers.append(ids[start:end])
    if not prompts:
        raise common.UserError("--eval_generate: no held-out record has a prompt before its answer (only {\"text\"} "
                               "records?); expected conversations")
    new = min(2 * max(len(a) for a in answers), max_seq_len // 2)
    return {"prompts": [p[-(max_seq_len - new):] for p in prompts], "max_new_tokens": new,
            "references": common.decode_answers(tokenizer, common.pad(answers, common.pad_id(tokenizer)))}


@torch.no_grad()
def generate_scores(engine, prompts: list, references: list[str], max_new_tokens: int, tokenizer, zero_stage: int,
                    batch_size: int, device) -> dict:
    """BLEU and ROUGE of greedy answers to the held-out prompts (common.refmetrics). Each rank answers its share
    (left padding, KV cache; under ZeRO-3 the parameters gathered once, as ppo.py does); every rank scores them all."""
    world, pad_id = common.world_size(), common.pad_id(tokenizer)
    config = common.generation.generation_config(SimpleNamespace(max_new_tokens=max_new_tokens), tokenizer,
                                                 greedy=True)
    mine, answers = prompts[common.rank()::world], []
    with common.generation.generation_mode(engine, zero_stage, sharded=False) as sample:
        for i in range(0, len(mine), batch_size):
            ids = common.pad(mine[i: i + batch_size], pad_id, side="left").to(device)
            attn = common.pad([[1] * len(p) for p in mine[i: i + batch_size]], 0, side="left").to(device)
            seq = sample(input_ids=ids, attention_mask=attn, generation_config=config)
            answers += common.decode_answers(tokenizer, seq[:, ids.shape[1]:])
    if world > 1:  # rank r answered prompts r, r + world, ...
        shares = [None] * world
        torch.distributed.all_gather_object(shares, answers)
        answers = [shares[i % world][i // world] for i in range(len(prompts))]
    return {f"eval/{k}": v for k, v in common.refmetrics.corpus_scores(answers, references).items()}


@torch.no_grad()
def evaluate(engine, examples: list, batch_size: int, pad_id: int, device, chunk_size: int = 1024,
             generate: dict | None = None) -> dict:
    """Token-mean NLL over the whole eval set, split across ranks. Every rank runs the same number of forwards
    (ZeRO-3 needs that), so rows past the end repeat row 0 with weight 0. With `generate` (generate_scores'
    arguments) also BLEU and ROUGE."""
    engine.eval()
    per_rank = math.ceil(len(examples) / common.world_size())
    start = common.rank() * per_rank
    total, count = 0.0, 0.0
    for b in range(0, per_rank, batch_size):
        idx = range(start + b, start + min(b + batch_size, per_rank))
        rows = [examples[i] if i < len(examples) else (examples[0][0], [False] * len(examples[0][0])) for i in idx]
        s, n = token_nll(engine, collate(rows, pad_id, device), chunk_size)
        total, count = total + s.item(), count + n.item()
    engine.train()
    total, count = common.all_reduce_sum([total, count], device)
    loss = total / max(count, 1)
    out = {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50))}
    return out | (generate_scores(engine, **generate) if generate else {})


def main(args: Args):
    # --- setup ---
    common.flags.check(args)
    if args.lora_save_adapter and (not args.lora_rank or args.model == "toy"):
        raise common.UserError("--lora_save_adapter saves a LoRA adapter for a base model that loads from a path: "
                               "it needs --lora_rank > 0 and a --model other than the demo's toy")
    common.check_zero_stage(args.zero_stage)
    if args.eval_generate and (why := common.refmetrics.missing()):
        raise common.UserError(f"--eval_generate: {why}")
    common.check_report_to(args.report_to)
    common.check_model_path(args.model, "--model")
    tag = common.runs.prepare_output_dir(args.output_dir, args.overwrite, args.resume, "sft.py",
                                    {"--model": args.model, "--data": args.data, "--eval_data": args.eval_data})
    device = common.init_distributed()
    world, rank = common.world_size(), common.rank()
    dtype = common.resolve_dtype(args.dtype)
    common.seed_everything(args.seed)
    lr = args.learning_rate if args.learning_rate is not None else (1e-3 if args.model == "toy" else 2e-5)

    # --- data ---
    tokenizer = common.load_tokenizer(args.model, args.trust_remote_code)
    context = common.flags.model_context(args.model, args.trust_remote_code)
    max_seq_len = common.flags.fit_max_seq_len(args.max_seq_len, context)
    # tokenised before the eval split, so that an error names records in the order of the file
    train_records, eval_records = common.data.load_splits(args.data, args.eval_data, args.data_split, args.eval_split,
                                                     "sft", args.skip_invalid)
    train, n_cut = tokenize(train_records, tokenizer, max_seq_len, args.truncation, args.data, args.skip_invalid)
    n_cut_eval = 0
    if eval_records is not None:
        evals, n_cut_eval = tokenize(eval_records, tokenizer, max_seq_len, args.truncation,
                                     args.eval_data or args.data, args.skip_invalid)
    else:
        train, evals = common.data.split_eval(train, args.eval_fraction, args.seed)
    common.print0("example (trained tokens in [[ ]]):\n" + common.show_example(tokenizer, *train[0]))
    if gap := common.template_gap(tokenizer):
        common.note(gap)
    if args.eval_generate and not evals:
        raise common.UserError("--eval_generate needs held-out data; --eval_fraction 0 leaves none")
    micro = common.flags.fit_micro_batch(args.per_device_batch_size, len(train),
                                         world * args.gradient_accumulation_steps, "examples")
    global_batch = micro * world * args.gradient_accumulation_steps
    steps_per_epoch = len(train) // global_batch
    if steps_per_epoch == 0:
        raise common.UserError(f"--data has {len(train)} training examples, fewer than one global batch "
                               f"({global_batch} = per_device_batch_size x ranks x gradient_accumulation_steps)")
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_epochs
    common.print0(f"{len(train)} train / {len(evals)} eval examples, {total_steps} steps of {global_batch}; "
                  f"{n_cut + n_cut_eval} examples truncated from the left to {max_seq_len} tokens")
    run = {"script": "sft.py", "world_size": world, "global_batch": global_batch, "train_examples": len(train),
           "total_steps": total_steps, "max_seq_len": max_seq_len, "learning_rate": lr}
    if tag:
        common.runs.check_resume(args.output_dir, args, tag, run, "total_steps",
                            fixed=("zero_stage", "lora_rank") + (("world_size",) if args.zero_stage else ()))

    # --- model ---
    model = common.load_causal_lm(args.model, dtype, tokenizer, args.trust_remote_code)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if args.lora_rank > 0 and args.gradient_checkpointing:
        model.enable_input_require_grads()
    model = common.with_lora(model, args.lora_rank, args.lora_alpha, "CAUSAL_LM")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.95), fused=True)
    warmup = int(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, common.lr_lambda(args.lr_scheduler, warmup, total_steps))
    config = common.ds_config(args.zero_stage, micro, args.gradient_accumulation_steps, dtype,
                              args.offload, args.grad_clip, offload_params=args.offload)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    engine.train()  # from_pretrained returns eval mode: dropout would stay off until the first evaluation

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
    logger = common.Logger(args.output_dir, total_steps, "sft", initial=start_step, report_to=args.report_to,
                           config=vars(args))
    generate = None if not args.eval_generate else dict(  # generate_scores' arguments
        generation_set(evals, args.eval_generate, max_seq_len, tokenizer), tokenizer=tokenizer,
        zero_stage=args.zero_stage, batch_size=micro, device=device)
    run_eval = partial(evaluate, engine, evals, micro, common.pad_id(tokenizer), device, args.logprob_chunk_size,
                       generate)
    if start_step == 0 and evals:  # no eval set (--eval_fraction 0): no eval rows
        logger.log(0, run_eval())
    t0, n_tokens = time.time(), 0
    for step in range(start_step, total_steps):
        epoch, k = divmod(step, steps_per_epoch)
        order = list(range(len(train)))
        random.Random(args.seed + epoch).shuffle(order)  # same order on every rank
        batch_idx = order[k * global_batch: (k + 1) * global_batch]
        chunks = [batch_idx[i * micro: (i + 1) * micro] for i in range(world * args.gradient_accumulation_steps)]
        mine = chunks[rank * args.gradient_accumulation_steps: (rank + 1) * args.gradient_accumulation_steps]
        batches = [collate([train[i] for i in c], common.pad_id(tokenizer), device) for c in mine]
        # normalise by the global token count so ranks and accumulation do not change the update (DeepSpeed divides
        # the loss by the accumulation steps and averages gradients over ranks: undo both)
        local_tokens = sum(b["loss_mask"][:, 1:].sum().item() for b in batches)
        (global_tokens,) = common.all_reduce_sum([local_tokens], device)
        loss_sum = 0.0
        for batch in batches:
            nll, _ = token_nll(engine, batch, args.logprob_chunk_size)
            engine.backward(nll / max(global_tokens, 1) * world * args.gradient_accumulation_steps)
            engine.step()
            loss_sum += nll.item()
        n_tokens += sum(b["attention_mask"].sum().item() for b in batches)
        (loss_sum,) = common.all_reduce_sum([loss_sum], device)
        metrics = {"train/loss": loss_sum / max(global_tokens, 1), "train/lr": scheduler.get_last_lr()[0],
                   "train/epoch": step / steps_per_epoch,
                   "throughput/tokens_per_s": n_tokens * world / (time.time() - t0)}
        common.check_finite(metrics, step + 1)
        if evals and ((args.eval_every and (step + 1) % args.eval_every == 0) or step + 1 == total_steps):
            metrics |= run_eval()
        logger.log(step + 1, metrics, advance=1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            common.runs.save_checkpoint(engine, ckpt_dir, f"step{step + 1}",
                                        {"step": step + 1, "rng": common.runs.rng_state()})
            common.runs.commit_args(args.output_dir)  # args.json describes the run from its first save on

    # --- save ---
    logger.close()
    common.save_hf(engine.module, tokenizer, args.output_dir, args.zero_stage, lora_adapter=args.lora_save_adapter)
    common.runs.commit_args(args.output_dir, finished=True)
    common.print0(f"saved {args.output_dir} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, console_outputs=common.is_rank0()))
