"""Step 1 of RLHF: supervised fine-tuning of a causal LM on demonstrations, loss on the assistant's tokens only.

References: InstructGPT (Ouyang et al. 2022) for response-only SFT; DeepSpeed-Chat step 1 for the launch model.

    python sft.py                                          # the built-in demo, on a CPU, in about a minute
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
from typing import Literal

import deepspeed
import torch
import torch.nn.functional as F
import tyro

import common


@dataclass
class Args:
    # model & data
    model: str = "toy"
    """Hugging Face hub name or local folder of a causal LM; `toy` builds the demo model"""
    data: str = "toy"
    """JSONL file(s), comma-separated ({"prompt", "response"} or {"messages"}), an HF dataset name, or `toy`"""
    eval_data: str | None = None
    """held-out data in the same format; default: hold out --eval_fraction of --data (`toy`: its eval prompts)"""
    eval_fraction: float = 0.02
    """share of --data held out for evaluation when --eval_data is not given"""
    max_seq_len: int | None = None
    """longest sequence in tokens; longer examples lose their oldest tokens (see --truncation);
    default 512, or the model's context (max_position_embeddings) when shorter"""
    truncation: Literal["left", "error"] = "left"
    """what to do with an example longer than --max_seq_len: cut from the left (and count it), or stop"""
    trust_remote_code: bool = False
    """allow custom model code from the hub; off unless you trust the model's authors"""
    output_dir: str = "./sft_ckpt"
    """where the model, tokenizer, args.json, metrics.jsonl and checkpoints/ go"""
    # optimisation
    per_device_batch_size: int | None = None
    """sequences per rank per micro-batch; default 16, or fewer when the data holds no global batch of 16"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step; global batch = per_device_batch_size x ranks x this"""
    learning_rate: float | None = None
    """peak learning rate; default 1e-3 for --model toy, 2e-5 otherwise"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """decay after warmup"""
    warmup_ratio: float = 0.05
    """share of the steps spent warming the learning rate up linearly"""
    num_epochs: int = 2
    """passes over the training data"""
    max_steps: int = -1
    """stop after this many optimizer steps; -1: run the epochs"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this"""
    seed: int = 42
    """same on every rank: weights, data order"""
    # systems
    zero_stage: int = 0
    """DeepSpeed ZeRO stage, 0-3"""
    offload: bool = False
    """ZeRO-Offload: optimizer states (and with stage 3 the parameters) in CPU memory"""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on a GPU that has it, else fp32"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    lora_rank: int = 0
    """LoRA rank (0 = train all weights); needs peft"""
    lora_alpha: float = 16.0
    """LoRA scaling numerator"""
    lora_save_adapter: bool = False
    """save only the LoRA adapter (peft format) instead of weights with the adapter merged in"""
    # logging & checkpoints
    eval_every: int = 100
    """evaluate every this many steps (and at the end); 0: only at the end"""
    save_every: int = 0
    """write a resumable DeepSpeed checkpoint every this many steps; 0: never"""
    resume: bool = False
    """continue from the newest checkpoint in --output_dir/checkpoints"""
    overwrite: bool = False
    """replace an --output_dir that holds another run"""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """also send the metrics to TensorBoard (output_dir/tensorboard) or Weights & Biases (WANDB_MODE=offline: no
    network); metrics.jsonl is always written"""
    # launcher
    local_rank: int = -1
    """set by the deepspeed launcher; do not pass by hand"""


def tokenize(records: list[dict], tokenizer, max_seq_len: int, truncation: str, source: str):
    """Token ids and loss masks (True on assistant tokens, EOS included) for every record; counts left-truncations."""
    examples, n_truncated = [], 0
    for i, r in enumerate(records):
        ids, mask = common.encode_conversation(tokenizer, r["messages"])
        if len(ids) > max_seq_len:
            if truncation == "error":
                raise common.UserError(f"{source} record {i + 1}: {len(ids)} tokens > --max_seq_len {max_seq_len} "
                                       "(pass --truncation left to cut it)")
            ids, _ = common.truncate_left(ids, max_seq_len)
            mask, _ = common.truncate_left(mask, max_seq_len)
            n_truncated += 1
        examples.append((ids, mask))
    return examples, n_truncated


def collate(examples: list, pad_id: int, device) -> dict:
    """Right-padded batch; `loss_mask[t]` says whether token t is predicted with loss."""
    ids = common.pad([e[0] for e in examples], pad_id).to(device)
    loss_mask = common.pad([[int(m) for m in e[1]] for e in examples], 0).to(device).bool()
    attn = common.pad([[1] * len(e[0]) for e in examples], 0).to(device)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def token_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over the masked (response) tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=common.position_ids(batch["attention_mask"]), use_cache=False).logits
    targets = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    return (nll * mask).sum(), mask.sum()


@torch.no_grad()
def evaluate(engine, examples: list, batch_size: int, pad_id: int, device) -> dict:
    """Token-mean NLL over the whole eval set, split across ranks. Every rank runs the same number of forwards
    (ZeRO-3 needs that), so rows past the end repeat row 0 with weight 0."""
    engine.eval()
    per_rank = math.ceil(len(examples) / common.world_size())
    start = common.rank() * per_rank
    total, count = 0.0, 0.0
    for b in range(0, per_rank, batch_size):
        idx = range(start + b, start + min(b + batch_size, per_rank))
        rows = [examples[i] if i < len(examples) else (examples[0][0], [False] * len(examples[0][0])) for i in idx]
        s, n = token_nll(engine, collate(rows, pad_id, device))
        total, count = total + s.item(), count + n.item()
    engine.train()
    total, count = common.all_reduce_sum([total, count], device)
    loss = total / max(count, 1)
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50))}


def main(args: Args):
    # --- setup ---
    common.check_zero_stage(args.zero_stage)
    common.prepare_output_dir(args.output_dir, args.overwrite, args.resume)
    common.check_report_to(args.report_to)
    device = common.init_distributed()
    world, rank = common.world_size(), common.rank()
    dtype = common.resolve_dtype(args.dtype)
    common.seed_everything(args.seed)
    lr = args.learning_rate or (1e-3 if args.model == "toy" else 2e-5)

    # --- data ---
    common.check_model_path(args.model, "--model")
    tokenizer = common.load_tokenizer(args.model, args.trust_remote_code)
    max_seq_len = common.fit_max_seq_len(args.max_seq_len, common.model_context(args.model, args.trust_remote_code))
    # tokenised before the eval split, so that an error names records in the order of the file
    train, n_cut = tokenize(common.load_data(args.data, "sft"), tokenizer, max_seq_len, args.truncation,
                            args.data)
    n_cut_eval = 0
    if args.eval_data or args.data == "toy":
        eval_source = args.eval_data or "toy"
        evals, n_cut_eval = tokenize(common.load_data(eval_source, "sft", split="eval"), tokenizer,
                                     max_seq_len, args.truncation, eval_source)
    else:
        train, evals = common.split_eval(train, args.eval_fraction, args.seed)
    micro = common.fit_micro_batch(args.per_device_batch_size, len(train), world * args.gradient_accumulation_steps,
                                   "examples")
    global_batch = micro * world * args.gradient_accumulation_steps
    steps_per_epoch = len(train) // global_batch
    if steps_per_epoch == 0:
        raise common.UserError(f"--data has {len(train)} training examples, fewer than one global batch "
                               f"({global_batch} = per_device_batch_size x ranks x gradient_accumulation_steps)")
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_epochs
    common.print0(f"{len(train)} train / {len(evals)} eval examples, {total_steps} steps of {global_batch}; "
                  f"{n_cut + n_cut_eval} examples truncated from the left to {max_seq_len} tokens")

    # --- model ---
    model = common.load_causal_lm(args.model, dtype, tokenizer, args.trust_remote_code)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if args.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    warmup = int(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, common.lr_lambda(args.lr_scheduler, warmup, total_steps))
    config = common.ds_config(args.zero_stage, micro, args.gradient_accumulation_steps, dtype,
                              args.offload, args.grad_clip, offload_params=args.offload)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    engine.train()  # from_pretrained returns eval mode: dropout would stay off until the first evaluation

    # --- resume ---
    common.start_output_dir(args.output_dir, args, args.overwrite, args.resume)
    ckpt_dir = os.path.join(args.output_dir, "checkpoints")
    start_step = 0
    tag = common.latest_checkpoint(args.output_dir) if args.resume else None
    if tag:
        _, state = engine.load_checkpoint(ckpt_dir, tag)
        start_step = state["step"]
        common.set_rng_state(state["rng"])
        common.print0(f"resumed from {ckpt_dir}/{tag} at step {start_step}")
    if args.resume:  # drop rows logged after the checkpoint (all of them when there is none yet)
        common.truncate_log(args.output_dir, start_step if tag else -1)

    # --- loop ---
    logger = common.Logger(args.output_dir, total_steps, "sft", initial=start_step, report_to=args.report_to,
                           config=vars(args))
    if start_step == 0:
        logger.log(0, evaluate(engine, evals, micro, tokenizer.pad_token_id, device))
    t0, n_tokens = time.time(), 0
    for step in range(start_step, total_steps):
        epoch, k = divmod(step, steps_per_epoch)
        order = list(range(len(train)))
        random.Random(args.seed + epoch).shuffle(order)  # same order on every rank
        batch_idx = order[k * global_batch: (k + 1) * global_batch]
        chunks = [batch_idx[i * micro: (i + 1) * micro] for i in range(world * args.gradient_accumulation_steps)]
        mine = chunks[rank * args.gradient_accumulation_steps: (rank + 1) * args.gradient_accumulation_steps]
        batches = [collate([train[i] for i in c], tokenizer.pad_token_id, device) for c in mine]
        # normalise by the global token count so ranks and accumulation do not change the update (DeepSpeed divides
        # the loss by the accumulation steps and averages gradients over ranks: undo both)
        local_tokens = sum(b["loss_mask"][:, 1:].sum().item() for b in batches)
        (global_tokens,) = common.all_reduce_sum([local_tokens], device)
        loss_sum = 0.0
        for batch in batches:
            nll, _ = token_nll(engine, batch)
            engine.backward(nll / global_tokens * world * args.gradient_accumulation_steps)
            engine.step()
            loss_sum += nll.item()
        n_tokens += sum(b["attention_mask"].sum().item() for b in batches)
        (loss_sum,) = common.all_reduce_sum([loss_sum], device)
        metrics = {"train/loss": loss_sum / global_tokens, "train/lr": scheduler.get_last_lr()[0],
                   "train/epoch": step / steps_per_epoch,
                   "throughput/tokens_per_s": n_tokens * world / (time.time() - t0)}
        common.check_finite(metrics, step + 1)
        if (args.eval_every and (step + 1) % args.eval_every == 0) or step + 1 == total_steps:
            metrics |= evaluate(engine, evals, micro, tokenizer.pad_token_id, device)
        logger.log(step + 1, metrics, advance=1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            engine.save_checkpoint(ckpt_dir, tag=f"step{step + 1}",
                                   client_state={"step": step + 1, "rng": common.rng_state()})

    # --- save ---
    logger.close()
    common.save_hf(engine.module, tokenizer, args.output_dir, args.zero_stage, lora_adapter=args.lora_save_adapter)
    common.print0(f"saved {args.output_dir} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, console_outputs=common.is_rank0()))
