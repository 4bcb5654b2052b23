"""Step 3 of RLHF: PPO on a language model against a learned reward model.

Four models: the actor (trained), the critic (trained; initialised from the reward model), the reference (a frozen
copy of the initial actor) and the reward model (frozen). Every iteration samples answers to a batch of prompts,
scores them, turns scores and the KL to the reference into per-token rewards, estimates advantages with GAE, then
runs a few epochs of clipped PPO updates on actor and critic. --advantage_estimator grpo|dr_grpo|rloo|reinforce_pp
leaves the critic out and takes the baseline from several answers per prompt (--samples_per_prompt) or the batch.

References (docs/ppo.md gives the source of every detail): Ziegler et al. 2019 and lm-human-preferences; Stiennon
et al. 2020; InstructGPT (PPO-ptx); "N+" (Huang et al. 2024); DeepSpeed-Chat step 3 ("DSC"); GRPO, Dr. GRPO, RLOO,
REINFORCE++.

    python ppo.py                                           # the demo: ./sft_ckpt + ./reward_ckpt, on a CPU
    deepspeed ppo.py --actor ./sft_ckpt --reward ./reward_ckpt --data prompts.jsonl
    deepspeed --num_gpus 8 ppo.py --actor ./sft_ckpt --reward ./reward_ckpt --zero_stage 3 --data prompts.jsonl
    deepspeed --hostfile hosts.txt ppo.py ...                # several nodes
    torchrun --nproc_per_node 2 ppo.py ...
"""

import math
import random
import time
from collections import Counter
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import tyro

import common
import common.data
import common.engines
import common.flags
import common.generation
import common.logprobs
import common.prompts
import common.reward_fn
import common.runs
import common.toy
from common.flags import flag


@dataclass
class Args:
    # models & data
    actor: str = "./sft_ckpt"
    """the policy to train: an HF causal LM folder or hub name (sft.py's output)"""
    reward: str = "./reward_ckpt"
    """the reward model: a sequence classifier (reward.py's output); `none`: --reward_fn alone scores"""
    reward_fn: str | None = None
    """a Python reward FILE.py:NAME or module:NAME, added to the reward model's score (docs/ppo.md)"""
    reward_fn_weight: float = flag(1.0, ">= 0")
    """weight of --reward_fn's scores (>= 0)"""
    critic: str | None = None
    """the critic's initial weights; default: --reward (DSC, N+)"""
    ref: str | None = None
    """the reference policy of the KL penalty; default: --actor"""
    new_value_head: bool = False
    """accept a causal LM as --critic or --reward, with a new random score head (tests)"""
    reward_tokenizer: bool = False
    """allow a reward model with another tokenizer: answers are re-tokenised for it"""
    data: str = "toy"
    """prompts: JSONL/JSON file(s), a `datasets` folder, an HF dataset name, or `toy` (docs/data.md)"""
    eval_data: str | None = None
    """held-out prompts; default: --eval_fraction of --data"""
    data_split: str = "train"
    """split of the dataset folder or hub dataset that --data names"""
    eval_split: str | None = None
    """held-out split of --data (e.g. test_prefs)"""
    skip_invalid: bool = False
    """drop and count records that fit no layout, instead of stopping"""
    eval_fraction: float = flag(0.02, "0 <= x < 1")
    """share of --data held out when --eval_data is not given (0 <= x < 1)"""
    max_seq_len: int | None = flag(None, ">= 2")
    """prompt + answer tokens (>= 2); default 512, or the actor's context if shorter"""
    truncation: Literal["left", "error"] = "left"
    """a prompt that is too long is cut from the left, or stops the run"""
    trust_remote_code: bool = flag(False, run=False)
    """allow custom model code from the hub"""
    output_dir: str = flag("./ppo_ckpt", run=False)
    """where the actor, args.json, metrics.jsonl and checkpoints/ go"""
    # rollout
    total_episodes: int | None = flag(None, ">= 1", run=False)
    """answers to sample in all ranks together (>= 1); default: --num_epochs passes over --data"""
    num_epochs: int = flag(1, ">= 1", run=False)
    """passes over the prompts when --total_episodes is not given (>= 1)"""
    rollout_batch_size: int = flag(64, ">= 1", run=False)
    """prompts per rank per iteration (>= 1)"""
    max_new_tokens: int = flag(24, ">= 1")
    """longest answer (>= 1); see --missing_eos_penalty"""
    generation_batch_size: int = flag(0, ">= 0")
    """prompts per generate call (>= 0; 0: the whole rollout batch)"""
    temperature: float = flag(1.0, ">= 0.01")
    """sampling temperature (>= 0.01), also in every log-prob (N+); top_k 0, top_p 1"""
    # advantages
    advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"] = "gae"
    """gae: PPO with a critic; the others are critic-free (docs/ppo.md, "Critic-free estimators")"""
    samples_per_prompt: int = flag(1, ">= 1")
    """answers sampled per prompt (>= 1; grpo, dr_grpo and rloo need >= 2)"""
    loss_agg: Literal["auto", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "auto"
    """policy loss aggregation; auto: GRPO's for grpo, Dr. GRPO's for dr_grpo, else token_mean"""
    # ppo
    ppo_epochs: int = flag(4, ">= 1")
    """passes over each rollout batch (>= 1)"""
    mini_batch_size: int = flag(0, ">= 0", run=False)
    """answers per rank per optimizer step (>= 0); 0: per_device_batch_size x gradient_accumulation_steps"""
    per_device_batch_size: int | None = flag(None, ">= 1", run=False)
    """answers per rank per forward (>= 1); default: the largest divisor of the mini-batch up to 16"""
    gradient_accumulation_steps: int = flag(1, ">= 1", run=False)
    """micro-batches per optimizer step (>= 1; ignored when --mini_batch_size is set)"""
    learning_rate: float | None = flag(None, ">= 0")
    """actor learning rate (>= 0); default 2e-4 for the demo, 1e-6 otherwise"""
    critic_learning_rate: float | None = flag(None, ">= 0")
    """critic learning rate (>= 0); default 5e-4 for the demo, 5e-6 otherwise"""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "constant"
    """decay of both learning rates after warmup"""
    warmup_ratio: float = flag(0.0, "0 <= x <= 1")
    """share of the optimizer steps spent warming up (0 <= x <= 1)"""
    weight_decay: float = flag(0.0, ">= 0")
    """AdamW weight decay (>= 0)"""
    grad_clip: float = flag(1.0, ">= 0")
    """clip each model's global gradient norm (>= 0; 0: no clipping)"""
    kl_coef: float = flag(0.05, ">= 0")
    """beta of the KL penalty (>= 0; N+ 0.05, DSC 0.1)"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """per-token KL estimate (joschu.net/blog/kl-approx.html): k1 (N+, TRL PPO), k2, k3 (GRPO)"""
    kl_in_loss: bool = False
    """KL penalty in the actor's loss (GRPO) instead of the reward (PPO); use k3 or k2"""
    adaptive_kl: bool = False
    """adapt kl_coef towards --target_kl (Ziegler et al. 2019)"""
    target_kl: float = flag(6.0, "> 0")
    """target KL per answer in nats for --adaptive_kl (> 0)"""
    kl_horizon: int = flag(10000, ">= 1")
    """horizon in episodes of the adaptive KL controller (>= 1)"""
    cliprange: float = flag(0.2, "> 0")
    """PPO's policy ratio clip (> 0)"""
    cliprange_value: float = flag(0.2, "> 0")
    """clip of the value update around the rollout's values (> 0)"""
    gamma: float = flag(1.0, "0 <= x <= 1")
    """discount (0 <= x <= 1)"""
    lam: float = flag(0.95, "0 <= x <= 1")
    """GAE lambda (0 <= x <= 1)"""
    whiten_advantages: bool = True
    """gae: advantages to mean 0, std 1 over the batch's tokens (N+, TRL; not DSC)"""
    whiten_rewards: bool = False
    """whiten per-token rewards before GAE (an N+ option)"""
    normalize_reward: bool = True
    """apply the reward model's reward_mean and reward_std (stored by reward.py)"""
    clip_reward_value: float = flag(5.0, "> 0")
    """clip the normalised score to +- this (> 0; DSC)"""
    missing_eos_penalty: float = flag(1.0, ">= 0")
    """subtracted from the score of an answer without EOS (>= 0; TRL); 0: off"""
    # DeepSpeed-Chat options
    ema: bool = False
    """keep an exponential moving average of the actor, saved in output_dir/ema (DSC)"""
    ema_decay: float = flag(0.992, "0 <= x <= 1")
    """EMA decay per optimizer step (0 <= x <= 1)"""
    ptx_data: str | None = None
    """PPO-ptx (InstructGPT): SFT or {"text"} data whose LM loss is added to the actor's"""
    ptx_coef: float = flag(0.05, ">= 0")
    """weight of the ptx loss (>= 0)"""
    # systems
    zero_stage: int = flag(0, "0 <= x <= 3", run=False)
    """ZeRO stage of every model unless the two flags below say otherwise (0 <= x <= 3)"""
    actor_zero_stage: int | None = flag(None, "0 <= x <= 3", run=False)
    """ZeRO stage of the actor and the reference (0 <= x <= 3)"""
    critic_zero_stage: int | None = flag(None, "0 <= x <= 3", run=False)
    """ZeRO stage of the critic and the reward model (0 <= x <= 3)"""
    offload: bool = flag(False, run=False)
    """ZeRO-Offload the optimizer states of actor and critic to CPU"""
    offload_reference: bool = flag(False, run=False)
    """keep the reference and reward models' parameters in CPU memory (ZeRO-3)"""
    generate_sharded: bool = flag(False, run=False)
    """ZeRO-3: generate through the partition hooks instead of gathering the actor (slow; huge models)"""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on a GPU that has it, else fp32"""
    gradient_checkpointing: bool = flag(False, run=False)
    """recompute activations in the backward pass of actor and critic"""
    logprob_chunk_size: int = flag(1024, ">= 1", run=False)
    """positions per chunk of the LM head's log-softmax (>= 1; docs/performance.md)"""
    lora_rank: int = flag(0, ">= 0")
    """LoRA rank of the actor (>= 0; 0: off); the reference is then the adapter switched off"""
    critic_lora_rank: int = flag(0, ">= 0")
    """LoRA rank of the critic's body (>= 0; 0: off)"""
    lora_alpha: float = flag(16.0, "> 0")
    """LoRA scaling numerator (> 0)"""
    seed: int = flag(42, "0 <= x <= 4294967295")
    """weights and data order; sampling uses (seed, rank, iteration) (0 <= x <= 4294967295)"""
    # logging & checkpoints
    eval_every: int = flag(10, ">= 0", run=False)
    """evaluate every this many iterations (>= 0), and at 0 and the end"""
    eval_greedy: bool = flag(False, run=False)
    """evaluate greedy answers instead of samples (eval/kl is then their log-ratio)"""
    num_eval_prompts: int = flag(128, ">= 1", run=False)
    """held-out prompts per evaluation, all ranks together (>= 1)"""
    print_samples: int = flag(3, ">= 0", run=False)
    """prompt/answer pairs printed at every evaluation (>= 0)"""
    save_every: int = flag(0, ">= 0", run=False)
    """write resumable checkpoints every this many iterations (>= 0); 0: never"""
    save_critic: bool = flag(False, run=False)
    """also save the critic in output_dir/critic"""
    resume: bool = flag(False, run=False)
    """continue from the newest checkpoint in output_dir/checkpoints"""
    resume_changes: tuple[str, ...] = flag((), run=False)
    """with --resume: run-defining flags allowed to differ from the checkpoint's run"""
    overwrite: bool = flag(False, run=False)
    """replace an --output_dir holding another run (only the files these scripts write)"""
    report_to: Literal["none", "tensorboard", "wandb"] = flag("none", run=False)
    """also send the metrics to TensorBoard or Weights & Biases; metrics.jsonl is always written"""
    # launcher
    local_rank: int = flag(-1, run=False)
    """set by the deepspeed launcher; do not pass by hand"""


# ---- rollout math (each function is tested against a slow reference in tests/test_ppo.py) ----
def truncate_after_eos(responses: torch.Tensor, eos_id: int | list[int], pad_id: int):
    """Answers cut after their first EOS (any of `eos_id`), padded: (answers, mask, lengths, has_eos)."""
    is_eos = torch.isin(responses, torch.tensor(eos_id, device=responses.device).reshape(-1))
    has_eos = is_eos.any(1)
    none = torch.full_like(has_eos, responses.shape[1], dtype=torch.long)
    first = torch.where(has_eos, is_eos.int().argmax(1), none)
    lengths = torch.where(has_eos, first + 1, first)
    mask = torch.arange(responses.shape[1], device=responses.device)[None] < lengths[:, None]
    return responses.masked_fill(~mask, pad_id), mask, lengths, has_eos


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the real tokens; `where`, not a product, so an overflow on a padding token cannot turn it into NaN."""
    return torch.where(mask, x, 0.0).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens (`where`: a NaN or inf at a padding position stays out)."""
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the real tokens on all ranks, in two float64 passes; a constant batch gives 0."""
    x64 = torch.where(mask, x, 0.0).double()
    s, n = common.all_reduce_sum([float(x64.sum()), float(mask.sum())], x.device)
    mean = s / max(n, 1.0)
    (ss,) = common.all_reduce_sum([float(torch.where(mask, x64 - mean, 0.0).square().sum())], x.device)
    var = ss / max(n - 1.0, 1.0)
    out = (x64 - mean) / math.sqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0.0).to(torch.promote_types(x.dtype, torch.float32))


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1",
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL(pi || ref) from samples of pi: k1 log-ratio, k2 k1^2 / 2, k3 exp(-k1) - 1 + k1 (0 at padding)."""
    log_ratio = logp - ref_logp if mask is None else torch.where(mask, logp - ref_logp, 0.0)
    if estimator == "k1":
        return log_ratio
    return 0.5 * log_ratio**2 if estimator == "k2" else torch.expm1(-log_ratio) + log_ratio


def group_baseline(score: torch.Tensor, estimator: str, group: int) -> torch.Tensor:
    """Each answer's score less its estimator's baseline over its group of `group` rows (docs/ppo.md)."""
    if estimator in ("gae", "reinforce_pp"):
        return score
    scores = score.view(-1, group)
    centred = scores - scores.mean(1, keepdim=True)
    if estimator == "grpo":
        centred = centred / (scores.std(1, keepdim=True) + 1e-4)
    return (centred * group / (group - 1) if estimator == "rloo" else centred).reshape(-1)


def loss_weights(lengths: torch.Tensor, loss_agg: str, max_new_tokens: int) -> torch.Tensor:
    """Each answer token's policy-loss weight: 1 (token_mean), 1 / length (GRPO), 1 / max_new_tokens (Dr. GRPO)."""
    if loss_agg == "token_mean":
        return torch.ones_like(lengths, dtype=torch.float)[:, None]
    return 1.0 / (lengths.clamp(min=1).float() if loss_agg == "seq_mean_token_mean"
                  else torch.full_like(lengths, max_new_tokens, dtype=torch.float))[:, None]


def compute_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                    lengths: torch.Tensor, kl_coef: float, kl_estimator: str = "k1"):
    """Per-token reward: -kl_coef * KL on every token, + the score on the last real token (the EOS); padding 0."""
    kl = torch.where(mask, kl_estimate(logp.float(), ref_logp.float(), kl_estimator), 0.0)
    rewards = -kl_coef * kl
    rows = torch.arange(score.shape[0], device=score.device)
    rewards[rows, lengths - 1] += score.float()
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
        block: int = 256):
    """GAE over the answer tokens (0 after the end), as block-wise matrix products: no loop over tokens."""
    values = torch.where(mask, values.float(), 0.0)
    rewards = torch.where(mask, rewards.float(), 0.0)
    next_values = F.pad(values[:, 1:], (0, 1))
    deltas = (rewards + gamma * next_values - values).double()
    c, T = gamma * lam, deltas.shape[1]
    k = torch.arange(min(T, block), device=deltas.device)
    power = (k[:, None] - k[None, :]).double()  # [k, t] = k - t
    discount = torch.where(power >= 0, c ** power.clamp(min=0), 0.0)  # c^(k - t) where k >= t
    advantages, after = torch.zeros_like(deltas), deltas.new_zeros(deltas.shape[0], 1)  # A just after the block
    for end in range(T, 0, -block):
        n = min(block, end)
        a = deltas[:, end - n: end] @ discount[:n, :n] + after * c ** (n - k[:n]).double()
        advantages[:, end - n: end], after = a, a[:, :1]
    advantages = torch.where(mask, advantages.float(), 0.0)
    return advantages, torch.where(mask, advantages + values, 0.0)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, cliprange: float,
                mask: torch.Tensor | None = None):
    """Per-token clipped surrogate (Schulman et al. 2017), whether it clipped, and the ratio (1 at padding)."""
    ratio = torch.exp(logp - old_logp if mask is None else torch.where(mask, logp - old_logp, 0.0))
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.max(loss1, loss2), (loss2 > loss1).float(), ratio


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, cliprange_value: float):
    """Per-token clipped value loss 0.5 * max((v - R)^2, (clip(v) - R)^2) (N+, DSC)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return loss, ((clipped - returns) ** 2 > (values - returns) ** 2).float()


def adaptive_kl_coef(kl_coef: float, current_kl: float, target: float, horizon: int, n_episodes: int) -> float:
    """Ziegler et al. 2019 / lm-human-preferences: a proportional controller on the log-space KL coefficient."""
    error = max(-0.2, min(0.2, current_kl / target - 1.0))
    return kl_coef * (1.0 + error * n_episodes / horizon)


def kl_per_response(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """train/kl and eval/kl, whatever the penalty estimates: sum of log pi - log ref over the answer (k1)."""
    return torch.where(mask, logp - ref_logp, 0.0).sum(1)


def seq_logprobs(model, seq: torch.Tensor, attn: torch.Tensor, n_prompt: int, temperature: float,
                 with_entropy: bool = False, chunk_size: int = 1024):
    """Log-probs (and entropies) of the answer tokens seq[:, n_prompt:]; every log-prob of ppo.py comes from here."""
    return common.logprobs.token_logprobs(model, seq, attn, n_prompt, temperature, chunk_size, with_entropy)


def ref_logprobs(ref, actor, seq: torch.Tensor, attn: torch.Tensor, n_prompt: int, temperature: float,
                 chunk_size: int = 1024):
    """The reference's log-probs; with --lora_rank and no --ref, the actor with its adapter switched off."""
    if ref is not None:
        return seq_logprobs(ref, seq, attn, n_prompt, temperature, chunk_size=chunk_size)
    with actor.module.disable_adapter():
        return seq_logprobs(actor, seq, attn, n_prompt, temperature, chunk_size=chunk_size)


# ---- batches, generation, scoring, evaluation ----
def micro_slices(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def trim(seq: torch.Tensor, attn: torch.Tensor, n_prompt: int, prompt_lens: list[int], resp_lens: list[int]):
    """A micro-batch without the columns that are padding in every row: (seq, attn, prompt width, answer width)."""
    np_, width = max(prompt_lens), max(resp_lens)
    left = n_prompt - np_
    return seq[:, left: n_prompt + width], attn[:, left: n_prompt + width], np_, width


def rollout_prompts(n_prompts: int, iteration: int, rank: int, per_rank: int, world: int, seed: int,
                    samples_per_prompt: int) -> list[int]:
    """This rank's prompt indices at `iteration`, each samples_per_prompt times; epoch e shuffles by seed + e."""
    per_iter = per_rank * world
    epoch, position = divmod(iteration, max(1, n_prompts // per_iter))
    order = list(range(n_prompts))
    random.Random(seed + epoch).shuffle(order)
    first = position * per_iter + rank * per_rank
    return [order[(first + j) % n_prompts] for j in range(per_rank) for _ in range(samples_per_prompt)]


def minibatches(n_rows: int, n_batches: int, first_row: int, key: tuple, per_block: int = 1) -> list[list[int]]:
    """One epoch's mini-batches (this rank's rows), the same global ones however the rollout is split over ranks."""
    batches, block = [[] for _ in range(n_batches)], n_batches * per_block
    for start in range(0, n_rows, block):
        order = list(range(start, min(start + block, n_rows)))
        random.Random(str((*key, (first_row + start) // block))).shuffle(order)
        for j, batch in enumerate(batches):
            batch += order[j * per_block: (j + 1) * per_block]
    return batches


def ptx_batch(ptx: list, key: tuple, n_global: int, rank: int, n_local: int):
    """PPO-ptx rows for one mini-batch: one global draw seeded by `key`, this rank's share, its trained token count."""
    rng = random.Random(str(key))
    idx = rng.sample(range(len(ptx)), n_global) if len(ptx) >= n_global else rng.choices(range(len(ptx)), k=n_global)
    n_tokens = sum(sum(ptx[i][1][1:]) for i in idx)  # the first token is never predicted
    return [ptx[i] for i in idx[rank * n_local: (rank + 1) * n_local]], max(n_tokens, 1)


def ptx_nll(actor, rows: list, pad_id: int, device, chunk_size: int = 1024) -> torch.Tensor:
    """Summed next-token NLL of the trained tokens of SFT-format rows (ids, mask)."""
    ids = common.pad([r[0] for r in rows], pad_id).to(device)
    mask = common.pad([[int(x) for x in r[1]] for r in rows], 0).to(device).bool()
    attn = common.pad([[1] * len(r[0]) for r in rows], 0).to(device)
    return -common.logprobs.token_logprobs(actor, ids, attn, mask, chunk_size=chunk_size).sum()


def reduce_sums(sums: dict, device) -> dict:
    """The sums by name, added over ranks: one host sync and one collective for all of them."""
    names = sorted(sums)
    values = torch.stack([torch.as_tensor(sums[k], device=device).double() for k in names]).tolist()
    return dict(zip(names, common.all_reduce_sum(values, device)))


@torch.no_grad()
def generate(actor, prompt_ids: list[list[int]], tokenizer, gen_config, zero_stage: int, sharded: bool, device,
             chunk: int = 0, seeds: list[int] | None = None):
    """Sampled answers, `chunk` prompts per call seeded by seeds[i] (any split over ranks), cut after EOS."""
    pad_id = common.pad_id(tokenizer)
    responses = []
    with common.generation.generation_mode(actor, zero_stage, sharded) as sample:  # one gather for all the calls
        for i, s in enumerate(micro_slices(len(prompt_ids), chunk or len(prompt_ids))):
            if seeds is not None:
                torch.manual_seed(seeds[i])
            prompts = common.pad(prompt_ids[s], pad_id, side="left").to(device)
            attn = common.pad([[1] * len(p) for p in prompt_ids[s]], 0, side="left").to(device)
            seq = sample(input_ids=prompts, attention_mask=attn, generation_config=gen_config,
                         synced_gpus=zero_stage == 3 and sharded and common.world_size() > 1)
            responses += list(seq[:, prompts.shape[1]:])
    responses = torch.nn.utils.rnn.pad_sequence(responses, batch_first=True, padding_value=pad_id)
    responses, mask, lengths, has_eos = truncate_after_eos(responses, gen_config.eos_token_id, pad_id)
    width = int(lengths.max())
    responses, mask = responses[:, :width], mask[:, :width]
    prompts = common.pad(prompt_ids, pad_id, side="left").to(device)
    prompt_attn = common.pad([[1] * len(p) for p in prompt_ids], 0, side="left").to(device)
    return {"seq": torch.cat([prompts, responses], 1), "attn": torch.cat([prompt_attn, mask.long()], 1),
            "mask": mask, "lengths": lengths, "has_eos": has_eos}, prompts.shape[1]


@torch.no_grad()
def reward_scores(reward, rollout: dict, n_prompt: int, micro: int, retok=None):
    """The reward model's score at the last real token (through `retok` for another tokenizer)."""
    if retok is not None:
        seq, attn = retok(rollout)
        last = attn.sum(1) - 1
    else:
        seq, attn = rollout["seq"], rollout["attn"]
        last = n_prompt + rollout["lengths"] - 1
    out = []
    for s in micro_slices(seq.shape[0], micro):
        values = reward(seq[s], attn[s])
        out.append(values[torch.arange(values.shape[0], device=values.device), last[s]])
    return torch.cat(out)


def score_answers(rollout: dict, n_prompt: int, messages: list, retok, *, args: Args, reward, reward_fn, norm: tuple,
                  tokenizer, micro: int, device):
    """(raw score logged as reward, score PPO uses: normalised RM + weight x --reward_fn, --reward_fn's or None)"""
    raw = reward_scores(reward, rollout, n_prompt, micro, retok) if reward is not None else None
    fn = None if reward_fn is None else common.reward_fn.call(
        reward_fn, args.reward_fn, messages, common.decode_answers(tokenizer, rollout["seq"][:, n_prompt:]), device)
    score = (raw - norm[0]) / norm[1] if raw is not None else torch.zeros_like(fn)
    if fn is not None:
        score = score + args.reward_fn_weight * fn
    return (raw if raw is not None else fn), score, fn


@torch.no_grad()
def evaluate(args: Args, iteration: int, *, actor, ref, scorer, tokenizer, reward_tok, records: list[dict],
             prompt_ids: list[list[int]], gen_config, actor_stage: int, call_size: int, micro: int, device) -> dict:
    """eval/reward, eval/kl (demo: eval/gold) on held-out prompts, the same samples on any number of ranks."""
    world, rank, toy, chunk = common.world_size(), common.rank(), args.data == "toy", args.logprob_chunk_size
    n, size, temp = len(prompt_ids), min(call_size, len(prompt_ids)), args.temperature
    calls_per_rank = math.ceil(math.ceil(n / size) / world)
    sums = Counter(reward=0.0, kl=0.0, gold=0.0)
    for call in range(rank * calls_per_rank, (rank + 1) * calls_per_rank):
        rows = [call * size + i for i in range(size)]
        weight = torch.tensor([float(i < n) for i in rows], device=device)
        messages = [records[i % n]["prompt"] for i in rows]
        rollout, n_prompt = generate(actor, [prompt_ids[i % n] for i in rows], tokenizer, gen_config,
                                     zero_stage=actor_stage, sharded=args.generate_sharded, device=device,
                                     seeds=[args.seed + 7919 * call + 1])
        retok = None if reward_tok is None else common.data.retokenizer(tokenizer, reward_tok, messages, device)
        score, _, fn_score = scorer(rollout, n_prompt, messages, retok)  # the RM's raw score (or --reward_fn's)
        seq, attn, slices = rollout["seq"], rollout["attn"], micro_slices(size, micro)
        logp = torch.cat([seq_logprobs(actor, seq[s], attn[s], n_prompt, temp, chunk_size=chunk) for s in slices])
        ref_logp = torch.cat([ref_logprobs(ref, actor, seq[s], attn[s], n_prompt, temp, chunk) for s in slices])
        texts = common.decode_answers(tokenizer, seq[:, n_prompt:])
        gold = torch.tensor([common.toy.gold_score(m[-1]["content"], t) if toy else 0.0
                             for m, t in zip(messages, texts)], device=device)
        sums.update(reward=(score * weight).sum(), gold=(gold * weight).sum(),
                    kl=(kl_per_response(logp, ref_logp, rollout["mask"]) * weight).sum())
        sums.update({} if fn_score is None else {"reward_fn": (fn_score * weight).sum()})
        for j in range(min(args.print_samples, size) if call == 0 else 0):  # on rank 0
            print(f"  [{iteration}] {messages[j][-1]['content']!r} -> {texts[j]!r} (score {float(score[j]):.2f})",
                  flush=True)
    total = {k: v / n for k, v in reduce_sums(sums, device).items()}
    return ({"eval/reward": total["reward"], "eval/kl": total["kl"]} | ({"eval/gold": total["gold"]} if toy else {})
            | ({"eval/reward_fn": total["reward_fn"]} if "reward_fn" in total else {}))


# ---- the steps of main ----
def check_args(args: Args) -> str | None:
    """Flags that must agree, and the output folder, checked before anything loads; returns the tag to resume from."""
    common.flags.check(args)
    least = 2 if args.advantage_estimator in ("grpo", "dr_grpo", "rloo") else 1  # a group needs two answers
    if args.samples_per_prompt < least:
        raise common.UserError(f"--samples_per_prompt {args.samples_per_prompt}: --advantage_estimator "
                               f"{args.advantage_estimator} needs at least {least}")
    if args.kl_in_loss and args.kl_estimator == "k1" and args.kl_coef > 0:
        common.print0("warning: --kl_in_loss with --kl_estimator k1: on fresh samples its gradient is 0 in "
                      "expectation (E[grad log pi] = 0), so the term only adds noise; GRPO uses k3, and k2's gradient "
                      "is KL's")
    if args.advantage_estimator != "gae" and (args.critic is not None or args.save_critic):
        raise common.UserError(f"--advantage_estimator {args.advantage_estimator} has no critic: drop --critic and "
                               "--save_critic")
    common.check_report_to(args.report_to)
    if args.reward == "none" and not args.reward_fn:
        raise common.UserError("--reward none needs --reward_fn (something must score the responses)")
    for path, name in ((args.actor, "--actor"), (None if args.reward == "none" else args.reward, "--reward"),
                       (args.critic, "--critic"), (args.ref, "--ref")):
        if path is not None:
            common.check_model_path(path, name)
    inputs = {"--actor": args.actor, "--reward": args.reward, "--critic": args.critic, "--ref": args.ref,
              "--data": args.data, "--eval_data": args.eval_data, "--ptx_data": args.ptx_data}
    tag = common.runs.prepare_output_dir(args.output_dir, args.overwrite, args.resume, "ppo.py", inputs,
                                         checkpoints="checkpoints/actor")
    if tag:  # the critic's checkpoint is written first, so it is there whenever the actor's `latest` names it
        common.runs.latest_checkpoint(Path(args.output_dir) / "checkpoints" / "critic")
    return tag


@torch.no_grad()
def score_rollout(args: Args, rollout: dict, n_prompt: int, *, actor, ref, critic, micro: int, forward_once: bool,
                  device) -> dict:
    """Step 3 without autograd (forward_once: the actor's and critic's forwards with it, returned as `fwd`)."""
    seq, attn, mask, temp = rollout["seq"], rollout["attn"], rollout["mask"], args.temperature
    lp_chunk, slices, fwd = args.logprob_chunk_size, micro_slices(len(seq), micro), {}
    if forward_once:
        with torch.enable_grad():
            fwd["logp"], fwd["entropy"] = seq_logprobs(actor, seq, attn, n_prompt, temp, True, lp_chunk)
            fwd["values"] = critic(seq, attn)[:, n_prompt - 1: -1] if critic is not None else None
    actor.module.eval()
    if forward_once:
        old_logp, entropy = fwd["logp"].detach(), fwd["entropy"].detach()
    else:
        old_logp, entropy = map(torch.cat, zip(*[seq_logprobs(actor, seq[s], attn[s], n_prompt, temp, True, lp_chunk)
                                                 for s in slices]))
    ref_logp = torch.cat([ref_logprobs(ref, actor, seq[s], attn[s], n_prompt, temp, lp_chunk) for s in slices])
    actor.module.train()
    old_values = torch.zeros(mask.shape, device=device)
    if critic is not None:
        critic.module.eval()
        old_values = fwd["values"].detach() if forward_once else torch.cat(
            [critic(seq[s], attn[s])[:, n_prompt - 1: -1] for s in slices])
        old_values = torch.where(mask, old_values, 0.0)
        critic.module.train()
    return {"old_logp": old_logp, "entropy": entropy, "ref_logp": ref_logp, "old_values": old_values}, fwd


def update(args: Args, rollout: dict, fwd: dict, sums: Counter, *, actor, critic, n_prompt: int, prompt_lens: list,
           mini: int, micro: int, loss_agg: str, kl_coef: float, ptx: list | None, iteration: int, pad_id: int,
           ema: dict | None, actor_stage: int, device):
    """Step 6: PPO epochs over shuffled mini-batches; every loss a token-mean over the global mini-batch."""
    world, rank, gas, rows = common.world_size(), common.rank(), mini // micro, len(rollout["seq"])
    lengths, forward_once = rollout["lengths"], bool(fwd)
    response_lens = lengths.tolist()
    per_block = args.samples_per_prompt if mini % args.samples_per_prompt == 0 else 1  # a prompt's answers together
    steps = [(epoch, step, batch) for epoch in range(args.ppo_epochs) for step, batch in enumerate(
        minibatches(rows, rows // mini, rank * rows, (args.seed, iteration, epoch), per_block))]
    step_tokens = common.all_reduce_sum([sum(response_lens[i] for i in batch) for *_, batch in steps], device)
    token_weight = loss_weights(lengths, loss_agg, args.max_new_tokens)
    for (epoch, step, batch), n_tokens in zip(steps, step_tokens):
        scale = world * gas / n_tokens  # undo DeepSpeed's 1/gas and rank averaging: a global token-mean
        policy_scale = scale if loss_agg == "token_mean" else gas / mini  # / the global mini-batch's answers
        if ptx is not None:
            ptx_rows, ptx_tokens = ptx_batch(ptx, (args.seed, iteration, epoch, step), mini * world, rank, mini)
            sums.update(ptx_tokens=ptx_tokens * (rank == 0))  # a global count: one rank adds it
        for s in micro_slices(len(batch), micro):
            index = torch.tensor(batch[s], device=device)
            seq, attn, n_prompt_, width = trim(rollout["seq"][index], rollout["attn"][index], n_prompt, [
                prompt_lens[i] for i in batch[s]], [response_lens[i] for i in batch[s]])
            mask, old_logp = rollout["mask"][index, :width], rollout["old_logp"][index, :width]
            # the update's forward: step 3's with forward_once (its rows, in this step's order), else this one; its
            # entropies come from the same kernel, with their gradient, for an entropy bonus (docs/forking.md)
            logp, entropy = (fwd["logp"][index], fwd["entropy"][index]) if forward_once else seq_logprobs(
                actor, seq, attn, n_prompt_, args.temperature, True, args.logprob_chunk_size)
            advantages = rollout["advantages"][index, :width]
            pg, clipped, ratio = policy_loss(logp, old_logp, advantages, args.cliprange, mask)
            loss = pg
            if args.kl_in_loss:  # GRPO: + beta * KL(pi || ref) per token, through the current log-probs
                loss = loss + kl_coef * kl_estimate(logp, rollout["ref_logp"][index, :width], args.kl_estimator, mask)
            actor_loss = masked_sum(loss * token_weight[index], mask) * policy_scale
            ptx_loss = torch.zeros((), device=device)
            if ptx is not None:  # PPO-ptx (InstructGPT): a token-mean LM loss over the global ptx batch
                ptx_loss = ptx_nll(actor, ptx_rows[s], pad_id, device, args.logprob_chunk_size)
                actor_loss = actor_loss + args.ptx_coef * ptx_loss * world * gas / ptx_tokens
            actor.backward(actor_loss)
            actor.step()
            with torch.no_grad():  # every per_token/ sum is logged as train/NAME, a mean over the trained tokens
                token_sums = {"policy_loss": pg, "clipfrac": clipped, "ratio": ratio,
                              "approx_kl": 0.5 * (logp - old_logp) ** 2}  # k2, joschu.net/blog/kl-approx.html
                sums.update({f"per_token/{k}": masked_sum(x, mask) for k, x in token_sums.items()},
                            trained_tokens=mask.sum(), ptx_loss=ptx_loss.detach())
            if critic is not None:
                values = fwd["values"][index] if forward_once else critic(seq, attn)[:, n_prompt_ - 1: -1]
                vl, value_clipped = value_loss(values, rollout["old_values"][index, :width],
                                               rollout["returns"][index, :width], args.cliprange_value)
                critic.backward(masked_sum(vl, mask) * scale)
                critic.step()
                sums.update({"per_token/value_loss": masked_sum(vl.detach(), mask),
                             "per_token/value_clipfrac": masked_sum(value_clipped, mask)})
        if ema is not None or (args.ema and actor_stage == 3):
            common.engines.update_ema(ema, actor.module, args.ema_decay, actor_stage)


def iteration_metrics(total: dict, t: dict, *, kl_coef: float, critic_free: bool, n_params: dict, seq_tokens,
                      ppo_epochs: int, forward_once: bool) -> dict:
    """The metrics.jsonl row of one iteration, from the sums over all ranks and the step times `t`."""
    n, tokens, trained = total["responses"], total["response_tokens"], total["trained_tokens"]
    var_returns, var_residual = (total[f"{x}_sq"] / tokens - (total[x] / tokens) ** 2 for x in ("returns", "residual"))
    elapsed = t["train"] - t["start"]
    metrics = {
        **{f"train/{k}": total[k] / n for k in ("reward", "score", "kl", "reward_fn") if k in total},
        "train/entropy": total["entropy"] / tokens,
        **{"train/" + k.split("/", 1)[1]: v / trained for k, v in total.items() if k.startswith("per_token/")},
        **({} if critic_free else {"train/explained_variance": 1.0 - var_residual / max(var_returns, 1e-8)}),
        "train/response_len": tokens / n, "train/eos_frac": total["eos"] / n, "train/kl_coef": kl_coef,
        **({"train/ptx_loss": total["ptx_loss"] / total["ptx_tokens"]} if "ptx_tokens" in total else {}),
        "time/generate_s": t["generate"] - t["start"], "time/score_s": t["score"] - t["generate"],
        "time/rollout_s": t["rollout"] - t["start"], "time/train_s": t["train"] - t["rollout"],
        "throughput/episodes_per_s": n / elapsed, "throughput/tokens_per_s": tokens / elapsed,
    }
    return metrics | common.engines.gpu_metrics(n_params, seq_tokens, ppo_epochs, forward_once, elapsed)


def main(args: Args):
    # --- setup ---
    tag = check_args(args)  # and the output folder: the checkpoint to resume from, or None
    critic_free, k = args.advantage_estimator != "gae", args.samples_per_prompt
    actor_stage = args.zero_stage if args.actor_zero_stage is None else args.actor_zero_stage
    critic_stage = args.zero_stage if args.critic_zero_stage is None else args.critic_zero_stage
    reward_fn = common.reward_fn.load(args.reward_fn) if args.reward_fn else None
    device = common.init_distributed()
    world, rank = common.world_size(), common.rank()
    dtype = common.resolve_dtype(args.dtype)
    common.seed_everything(args.seed)
    toy = args.data == "toy"
    actor_lr = args.learning_rate if args.learning_rate is not None else (2e-4 if toy else 1e-6)
    critic_lr = args.critic_learning_rate if args.critic_learning_rate is not None else (5e-4 if toy else 5e-6)
    context = common.flags.model_context(args.actor, args.trust_remote_code)
    max_seq_len = common.flags.fit_max_seq_len(args.max_seq_len, context)
    if args.max_new_tokens >= max_seq_len:
        raise common.UserError(f"--max_new_tokens {args.max_new_tokens} must be below --max_seq_len {max_seq_len}")
    own_agg = {"grpo": "seq_mean_token_mean", "dr_grpo": "seq_mean_token_sum_norm"}  # each paper's aggregation
    loss_agg = own_agg.get(args.advantage_estimator, "token_mean") if args.loss_agg == "auto" else args.loss_agg
    micro, mini = common.flags.fit_batch_sizes(args)
    gas, gen_chunk = mini // micro, args.generation_batch_size or args.rollout_batch_size

    # --- data ---
    tokenizer = common.load_tokenizer(args.actor, args.trust_remote_code)
    reward_tok = tokenizer if args.reward == "none" else common.load_tokenizer(args.reward, args.trust_remote_code)
    if gap := common.template_gap(tokenizer):
        common.note(gap)
    same_tok = reward_tok.get_vocab() == tokenizer.get_vocab()
    if not same_tok and not args.reward_tokenizer:
        raise common.UserError(f"--reward {args.reward}: its tokenizer differs from the actor's ({args.actor}); pass "
                               "--reward_tokenizer to re-tokenise responses for it")
    max_prompt = max_seq_len - args.max_new_tokens
    records, prompt_ids, eval_records, eval_prompt_ids = common.prompts.load_prompts(args, tokenizer, max_prompt)
    ptx = common.prompts.load_ptx(args, tokenizer, max_seq_len) if args.ptx_data else None
    per_iter = args.rollout_batch_size * world * k  # episodes (answers) per iteration
    total_episodes = args.total_episodes or args.num_epochs * len(prompt_ids) * k
    n_iters = total_episodes // per_iter
    if n_iters == 0:
        raise common.UserError(f"--total_episodes {total_episodes} is less than one iteration ({per_iter} = "
                               "rollout_batch_size x ranks x samples_per_prompt)")
    steps_per_iter = args.ppo_epochs * (args.rollout_batch_size * k // mini)
    # Where the old log-probs come from, one rule: step 3's forward of the actor, under the weights that sampled; with
    # one optimizer step an iteration on one micro-batch a rank (forward_once), also the update's (ratio exactly 1)
    forward_once = steps_per_iter == 1 and gas == 1
    run = {"script": "ppo.py", "world_size": world, "rollout_batch": per_iter, "mini_batch": mini * world,
           "prompts": len(prompt_ids), "actor_stage": actor_stage, "critic_stage": critic_stage, "iterations": n_iters,
           "max_seq_len": max_seq_len, "learning_rate": actor_lr, "critic_learning_rate": critic_lr}
    if tag:
        common.runs.check_resume(args.output_dir, args, tag, run, "iterations",
                                 fixed=("actor_stage", "critic_stage", "lora_rank", "critic_lora_rank")
                                 + (("world_size",) if actor_stage or critic_stage else ()))
    common.print0(f"{n_iters} iterations of {per_iter} episodes, {steps_per_iter} optimizer steps each")

    # --- models ---
    actor, critic, ref, reward, norm, ema, n_params = common.engines.load_models(
        args, tokenizer, reward_tok, dtype=dtype, actor_stage=actor_stage, critic_stage=critic_stage, micro=micro,
        gas=gas, total_steps=n_iters * steps_per_iter, actor_lr=actor_lr, critic_lr=critic_lr)
    gen_config = common.generation.generation_config(args, tokenizer)
    scorer = partial(score_answers, args=args, reward=reward, reward_fn=reward_fn, norm=norm, tokenizer=tokenizer,
                     micro=micro, device=device)
    run_eval = partial(evaluate, args, actor=actor, ref=ref, scorer=scorer, tokenizer=tokenizer,
                       reward_tok=None if same_tok else reward_tok, records=eval_records, prompt_ids=eval_prompt_ids,
                       gen_config=common.generation.generation_config(args, tokenizer, greedy=args.eval_greedy),
                       actor_stage=actor_stage, call_size=gen_chunk, micro=micro, device=device)

    # --- resume ---
    common.runs.start_output_dir(args.output_dir, args, args.overwrite, args.resume, run)
    start_iter, kl_coef = 0, args.kl_coef
    if tag:
        start_iter, kl_coef, ema = common.engines.resume(args, tag, actor=actor, critic=critic, actor_lr=actor_lr,
                                                         critic_lr=critic_lr)

    # --- loop ---
    logger = common.Logger(args.output_dir, n_iters, "ppo", initial=start_iter, report_to=args.report_to,
                           config=vars(args))
    if start_iter == 0 and eval_prompt_ids:  # no held-out prompts (--eval_fraction 0): no eval rows
        logger.log(0, run_eval(0))
    for iteration in range(start_iter, n_iters):
        t = {"start": time.time()}
        sums = Counter()  # every logged figure as a sum over this rank's answers or tokens, by name

        # 1. prompts: this rank's share of the iteration's prompts, each samples_per_prompt times (the rollout's rows)
        rows = rollout_prompts(len(prompt_ids), iteration, rank, args.rollout_batch_size, world, args.seed, k)

        # 2. generate, cut after EOS; each generate call seeded from (seed, iteration, its place in the global batch):
        #    ranks draw different samples; a resumed run or another split over ranks draws the same ones
        calls = math.ceil(args.rollout_batch_size / gen_chunk)  # generate calls per rank
        seeds = [args.seed + 104729 * (iteration + 1) + 7919 * (rank * calls + i) for i in range(calls)]
        rollout, n_prompt = generate(actor, [prompt_ids[i] for i in rows], tokenizer, gen_config,
                                     zero_stage=actor_stage, sharded=args.generate_sharded, device=device,
                                     chunk=gen_chunk * k, seeds=seeds)
        mask, lengths = rollout["mask"], rollout["lengths"]
        t["generate"] = time.time()

        # 3. score: old log-probs and entropy (actor), reference log-probs, values (critic), the reward model's score
        #    and --reward_fn's (through `retok` when the reward model's tokenizer differs)
        fwd_rollout, fwd = score_rollout(args, rollout, n_prompt, actor=actor, ref=ref, critic=critic, micro=micro,
                                         forward_once=forward_once, device=device)
        rollout.update(fwd_rollout)
        messages = [records[i]["prompt"] for i in rows]
        retok = None if same_tok else common.data.retokenizer(tokenizer, reward_tok, messages, device)
        raw_score, score, fn_score = scorer(rollout, n_prompt, messages, retok)
        t["score"] = time.time()
        # before any update, so nothing new is saved; summed over ranks, so that every rank stops (none hangs)
        finite = common.all_reduce_sum([float(raw_score.sum()), float(masked_sum(rollout["ref_logp"], mask))], device)
        common.check_finite({"reward": finite[0], "ref_logp": finite[1]}, iteration + 1)
        sums.update(responses=len(rows), reward=raw_score.sum(), response_tokens=mask.sum(),
                    eos=rollout["has_eos"].sum(), **({} if fn_score is None else {"reward_fn": fn_score.sum()}))

        # 4. rewards: score penalised without EOS, clipped, less its baseline, on the last token; KL penalty per token
        score = score - args.missing_eos_penalty * (~rollout["has_eos"]).float()
        score = score.clamp(-args.clip_reward_value, args.clip_reward_value)
        sums.update(score=score.sum())  # train/score: what a baseline subtracted below leaves unchanged
        score = group_baseline(score, args.advantage_estimator, k)
        rewards, _ = compute_rewards(score, rollout["old_logp"], rollout["ref_logp"], mask, lengths,
                                     0.0 if args.kl_in_loss else kl_coef, args.kl_estimator)
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)

        # 5. advantages and returns: GAE with the critic's values, whitened over the global batch; critic-free, the
        #    reward-to-go (GAE with no values and lam 1), whitened over the global batch for reinforce_pp
        old_values = rollout["old_values"]
        advantages, returns = gae(rewards, old_values, mask, args.gamma, 1.0 if critic_free else args.lam)
        if args.advantage_estimator == "reinforce_pp" or (args.whiten_advantages and not critic_free):
            advantages = masked_whiten(advantages, mask)
        rollout.update(advantages=advantages, returns=returns)
        residual = returns - old_values  # for train/explained_variance
        sums.update(returns=masked_sum(returns, mask), returns_sq=masked_sum(returns**2, mask),
                    residual=masked_sum(residual, mask), residual_sq=masked_sum(residual**2, mask))
        t["rollout"] = time.time()

        # 6. update: PPO epochs over shuffled mini-batches of the rollout (see `update`)
        update(args, rollout, fwd, sums, actor=actor, critic=critic, n_prompt=n_prompt,
               prompt_lens=[len(prompt_ids[i]) for i in rows], mini=mini, micro=micro, loss_agg=loss_agg,
               kl_coef=kl_coef, ptx=ptx, iteration=iteration, pad_id=common.pad_id(tokenizer), ema=ema,
               actor_stage=actor_stage, device=device)
        t["train"] = time.time()
        sums.update(kl=kl_per_response(rollout["old_logp"], rollout["ref_logp"], mask).sum(),
                    entropy=masked_sum(rollout["entropy"], mask))

        # 7. log (sums over all ranks, one collective), adapt the KL coefficient, evaluate, checkpoint
        metrics = iteration_metrics(reduce_sums(sums, device), t, kl_coef=kl_coef, critic_free=critic_free,
                                    n_params=n_params, seq_tokens=rollout["attn"].sum(), ppo_epochs=args.ppo_epochs,
                                    forward_once=forward_once)
        metrics["time/iteration_s"] = time.time() - t["start"]
        common.check_finite(metrics, iteration + 1)
        if args.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, metrics["train/kl"], args.target_kl, args.kl_horizon, per_iter)
        last = iteration + 1 == n_iters
        if eval_prompt_ids and (last or args.eval_every and (iteration + 1) % args.eval_every == 0):
            metrics |= run_eval(iteration + 1)
        logger.log(iteration + 1, metrics, advance=1)
        if args.save_every and (iteration + 1) % args.save_every == 0 and not last:
            common.engines.save_checkpoint(args, iteration + 1, actor=actor, critic=critic, kl_coef=kl_coef, ema=ema)

    # --- save ---
    logger.close()
    common.engines.save(args, actor=actor, critic=critic, ema=ema, tokenizer=tokenizer, dtype=dtype,
                        actor_stage=actor_stage, critic_stage=critic_stage)


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, console_outputs=common.is_rank0()))
