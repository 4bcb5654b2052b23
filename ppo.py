"""Step 3 of RLHF: PPO on a language model against a learned reward model.

Four models: the actor (trained), the critic (trained; initialised from the reward model), the reference (a frozen
copy of the initial actor) and the reward model (frozen). Every iteration samples responses to a batch of prompts,
scores them, turns scores and the KL to the reference into per-token rewards, estimates advantages with GAE, then
runs a few epochs of clipped PPO updates on actor and critic. --advantage_estimator grpo|dr_grpo|rloo|reinforce_pp
leaves the critic out and takes the baseline from several answers per prompt (--samples_per_prompt) or the batch.

References: Ziegler et al. 2019 and OpenAI's lm-human-preferences (KL-penalised reward, adaptive KL); Stiennon et al.
2020; InstructGPT (Ouyang et al. 2022; PPO-ptx); Huang et al., "The N+ Implementation Details of RLHF with PPO" (2024,
"N+" below); DeepSpeed-Chat step 3 ("DSC"); GRPO (Shao et al. 2024), Dr. GRPO (Liu et al. 2025), RLOO (Ahmadian et
al. 2024), REINFORCE++ (Hu 2025). README.md cites the source of every detail.

    python ppo.py                                           # the demo: ./sft_ckpt + ./reward_ckpt, on a CPU
    deepspeed ppo.py --actor ./sft_ckpt --reward ./reward_ckpt --data prompts.jsonl
    deepspeed --num_gpus 8 ppo.py --actor ./sft_ckpt --reward ./reward_ckpt --zero_stage 3 --data prompts.jsonl
    deepspeed --hostfile hosts.txt ppo.py ...                # several nodes
    torchrun --nproc_per_node 2 ppo.py ...
"""

import inspect
import math
import os
import random
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import deepspeed
import torch
import torch.nn.functional as F
import transformers
import tyro

import common
import common.data
import common.flags
import common.logprobs
import common.runs
import common.toy
from common.flags import flag

TORCH_LINEAR = F.linear  # before any ZeRO-3 engine replaces it (see generation_mode)


@dataclass
class Args:
    # models & data
    actor: str = "./sft_ckpt"
    """the policy to train: an HF causal LM folder or hub name (usually sft.py's output)"""
    reward: str = "./reward_ckpt"
    """the reward model: an AutoModelForSequenceClassification folder (reward.py's output; a causal LM is refused
    unless --new_value_head); `none`: no reward model, --reward_fn alone scores (the critic then starts from the
    actor with a new value head)"""
    reward_fn: str | None = None
    """a Python reward `FILE.py:NAME` or `module:NAME`, NAME(prompts: list[list[dict]], responses: list[str]) ->
    list[float], called on each rank's rows; its scores x --reward_fn_weight are added to the reward model's
    normalised score (the whole score with --reward none). The demo's gold: common.toy:gold_reward_fn"""
    reward_fn_weight: float = flag(1.0, ">= 0")
    """weight of --reward_fn's scores (>= 0)"""
    critic: str | None = None
    """the critic's initial weights (a reward model, or a causal LM with --new_value_head); default: --reward, as
    DSC and N+ do"""
    ref: str | None = None
    """the reference policy of the KL penalty; default: --actor"""
    new_value_head: bool = False
    """accept a causal LM as --critic or --reward: it gets a new, randomly initialised score head (a reward model
    that scores at random: for tests only)"""
    reward_tokenizer: bool = False
    """allow a reward model whose tokenizer differs from the actor's: responses are decoded and re-tokenised for
    it (the critic then starts from the actor with a new value head)"""
    data: str = "toy"
    """prompts: JSONL or JSON file(s), comma-separated, a `datasets` folder or an HF dataset name (any layout of
    README's "Data": the prompt field first, else the turns before the last answer), or `toy`"""
    eval_data: str | None = None
    """held-out prompts; default: --eval_fraction of --data (`toy`: the demo's eval prompts)"""
    data_split: str = "train"
    """split of a dataset folder or HF hub dataset that --data names"""
    eval_split: str | None = None
    """held-out split of --data (e.g. test_prefs); default: --eval_data, else --eval_fraction of --data"""
    skip_invalid: bool = False
    """drop (and count) records that do not fit a layout, instead of stopping at the first"""
    eval_fraction: float = flag(0.02, "0 <= x < 1")
    """share of --data held out for evaluation when --eval_data is not given (0 <= x < 1; 0: no evaluation)"""
    max_seq_len: int | None = flag(None, ">= 2")
    """prompt + response length in tokens (>= 2); prompts keep their last max_seq_len - max_new_tokens tokens;
    default 512, or the actor's context (max_position_embeddings) when shorter"""
    truncation: Literal["left", "error"] = "left"
    """a prompt that is too long is cut from the left (and counted), or stops the run"""
    trust_remote_code: bool = flag(False, run=False)
    """allow custom model code from the hub"""
    output_dir: str = flag("./ppo_ckpt", run=False)
    """where the actor (HF format), args.json, metrics.jsonl and checkpoints/ go"""
    # rollout
    total_episodes: int | None = flag(None, ">= 1", run=False)
    """answers to sample in all, over all ranks (>= 1; the run's length); default: --num_epochs passes over --data"""
    num_epochs: int = flag(1, ">= 1", run=False)
    """passes over the prompts when --total_episodes is not given (>= 1)"""
    rollout_batch_size: int = flag(64, ">= 1", run=False)
    """prompts per rank per iteration (>= 1)"""
    max_new_tokens: int = flag(24, ">= 1")
    """longest response (>= 1); a response that reaches it without EOS is truncated (see --missing_eos_penalty)"""
    generation_batch_size: int = flag(0, ">= 0")
    """prompts per generate call (>= 0; 0: the whole --rollout_batch_size); smaller saves memory"""
    temperature: float = flag(1.0, ">= 0.01")
    """sampling temperature (>= 0.01); logits are divided by it in every log-prob too (N+); top_k=0, top_p=1"""
    # advantages
    advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"] = "gae"
    """gae: PPO with a critic; critic-free (no critic is loaded, trained or saved), on each answer's score: grpo
    (score - group mean) / group std, dr_grpo score - group mean, rloo score - mean of the group's other answers,
    reinforce_pp returns whitened over the global batch (README: "Critic-free estimators")"""
    samples_per_prompt: int = flag(1, ">= 1")
    """answers sampled per prompt (>= 1), in the same generate call: the group of grpo, dr_grpo and rloo (which
    need >= 2)"""
    loss_agg: Literal["auto", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "auto"
    """policy loss over a mini-batch: a mean over its tokens; the mean over answers of each answer's token-mean
    (GRPO's); or of its token-sum / --max_new_tokens (Dr. GRPO's); auto: seq_mean_token_mean for grpo,
    seq_mean_token_sum_norm for dr_grpo, token_mean otherwise"""
    # ppo
    ppo_epochs: int = flag(4, ">= 1")
    """passes over each rollout batch (>= 1)"""
    mini_batch_size: int = flag(0, ">= 0", run=False)
    """answers per rank per optimizer step (>= 0); 0: per_device_batch_size x gradient_accumulation_steps"""
    per_device_batch_size: int | None = flag(None, ">= 1", run=False)
    """answers per rank per forward (micro-batch) in the update and in scoring (>= 1); default 16, or the largest
    divisor of the mini-batch (or of the rollout's answers per rank) up to 16"""
    gradient_accumulation_steps: int = flag(1, ">= 1", run=False)
    """micro-batches per optimizer step (>= 1; ignored when --mini_batch_size is set)"""
    learning_rate: float | None = flag(None, ">= 0")
    """actor learning rate (>= 0; 0 freezes the weights: the first ratio must then be 1); default 2e-4 for the demo's
    tiny models, 1e-6 otherwise"""
    critic_learning_rate: float | None = flag(None, ">= 0")
    """critic learning rate (>= 0); default 5e-4 for the demo, 5e-6 otherwise"""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "constant"
    """decay of both learning rates after warmup"""
    warmup_ratio: float = flag(0.0, "0 <= x <= 1")
    """share of the optimizer steps spent warming up (0 <= x <= 1)"""
    weight_decay: float = flag(0.0, ">= 0")
    """AdamW weight decay (>= 0)"""
    grad_clip: float = flag(1.0, ">= 0")
    """clip each model's global gradient norm to this (>= 0; 0: no clipping)"""
    kl_coef: float = flag(0.05, ">= 0")
    """beta of the per-token KL penalty -beta * KL in the reward (>= 0; N+ 0.05, DSC 0.1), or of +beta * KL in the
    loss"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """per-token estimate of KL(pi || ref) (joschu.net/blog/kl-approx.html): k1 log pi - log ref (N+, TRL PPO), k2
    k1^2 / 2, k3 exp(-k1) - 1 + k1 (GRPO)"""
    kl_in_loss: bool = False
    """add kl_coef x KL to the actor's per-token loss (GRPO) instead of -kl_coef x KL to the per-token reward (PPO);
    use k3 (GRPO) or k2 with it: k1's gradient is 0 in expectation"""
    adaptive_kl: bool = False
    """adapt kl_coef towards --target_kl (Ziegler et al. 2019)"""
    target_kl: float = flag(6.0, "> 0")
    """target KL per response in nats for --adaptive_kl (> 0)"""
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
    """gae: normalise advantages to mean 0, std 1 over the batch's real tokens (N+, TRL; DSC does not)"""
    whiten_rewards: bool = False
    """whiten per-token rewards before GAE (an N+ option)"""
    normalize_reward: bool = True
    """subtract the reward model's reward_mean and divide by reward_std (stored by reward.py) before use"""
    clip_reward_value: float = flag(5.0, "> 0")
    """clip the (normalised) score to +- this (> 0; DSC)"""
    missing_eos_penalty: float = flag(1.0, ">= 0")
    """subtracted from the score of a response that never emitted EOS (>= 0; TRL); 0: off"""
    # DeepSpeed-Chat options
    ema: bool = False
    """keep an exponential moving average of the actor's weights, saved in output_dir/ema (DSC)"""
    ema_decay: float = flag(0.992, "0 <= x <= 1")
    """EMA decay per optimizer step (0 <= x <= 1)"""
    ptx_data: str | None = None
    """PPO-ptx (InstructGPT): SFT-format or {"text"} data whose language-modelling loss is added to the actor's"""
    ptx_coef: float = flag(0.05, ">= 0")
    """weight of the ptx loss (>= 0)"""
    # systems
    zero_stage: int = flag(0, "0 <= x <= 3", run=False)
    """ZeRO stage for every model unless the two flags below say otherwise (0 <= x <= 3)"""
    actor_zero_stage: int | None = flag(None, "0 <= x <= 3", run=False)
    """ZeRO stage of the actor (and the reference) (0 <= x <= 3)"""
    critic_zero_stage: int | None = flag(None, "0 <= x <= 3", run=False)
    """ZeRO stage of the critic (and the reward model) (0 <= x <= 3)"""
    offload: bool = flag(False, run=False)
    """ZeRO-Offload optimizer states of actor and critic to CPU"""
    offload_reference: bool = flag(False, run=False)
    """keep the reference and reward models' parameters in CPU memory (ZeRO-3 param offload)"""
    generate_sharded: bool = flag(False, run=False)
    """ZeRO-3 only: generate through the partition hooks instead of gathering the actor once per generate call
    (slow: every layer is gathered for every token; for models that do not fit gathered)"""
    hybrid_engine: bool = flag(False, run=False)
    """GPUs: generate with DeepSpeed's hybrid engine (its inference kernels; DSC's --enable_hybrid_engine). Refused
    under transformers 5: DeepSpeed 0.19.8's kernels do not run with it (tried on an H100, see README)"""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on a GPU that has it, else fp32"""
    gradient_checkpointing: bool = flag(False, run=False)
    """recompute activations in the backward pass of actor and critic"""
    logprob_chunk_size: int = flag(1024, ">= 1", run=False)
    """positions per chunk of the LM head and its fp32 log-softmax (>= 1; the head runs on response positions
    only); the chunk costs about 2 x this x vocabulary x 4 bytes (1.2 GB at 1024 x 152k)"""
    lora_rank: int = flag(0, ">= 0")
    """LoRA rank for the actor (>= 0; 0 = off); the reference then is the actor with the adapter switched off"""
    critic_lora_rank: int = flag(0, ">= 0")
    """LoRA rank for the critic's body (>= 0; 0 = off); the value head stays fully trained"""
    lora_alpha: float = flag(16.0, "> 0")
    """LoRA scaling numerator (> 0)"""
    seed: int = flag(42, "0 <= x <= 4294967295")
    """weights and data order use it on every rank; sampling uses (seed, rank, iteration) (0 <= x <= 4294967295)"""
    # logging & checkpoints
    eval_every: int = flag(10, ">= 0", run=False)
    """evaluate on held-out prompts every this many iterations (>= 0) and at 0 and the end; 0: only at 0 and the end"""
    eval_greedy: bool = flag(False, run=False)
    """evaluate greedy responses instead of samples at --temperature (eval/kl is then the log-ratio of those
    responses to the reference, not a KL estimate)"""
    num_eval_prompts: int = flag(128, ">= 1", run=False)
    """held-out prompts used per evaluation (over all ranks) (>= 1)"""
    print_samples: int = flag(3, ">= 0", run=False)
    """prompt/response pairs printed at every evaluation (>= 0)"""
    save_every: int = flag(0, ">= 0", run=False)
    """write resumable DeepSpeed checkpoints of actor and critic every this many iterations (>= 0); 0: never"""
    save_critic: bool = flag(False, run=False)
    """also save the critic (HF sequence classifier) in output_dir/critic"""
    resume: bool = flag(False, run=False)
    """continue from the newest checkpoint in output_dir/checkpoints (the flags that define a run must match)"""
    resume_changes: tuple[str, ...] = flag((), run=False)
    """with --resume: names of run-defining flags allowed to differ from the checkpoint's run (the error lists them)"""
    overwrite: bool = flag(False, run=False)
    """replace an --output_dir that holds another run of these scripts (only the files they write are removed)"""
    report_to: Literal["none", "tensorboard", "wandb"] = flag("none", run=False)
    """also send the metrics to TensorBoard (output_dir/tensorboard) or Weights & Biases (WANDB_MODE=offline: no
    network); metrics.jsonl is always written"""
    # launcher
    local_rank: int = flag(-1, run=False)
    """set by the deepspeed launcher; do not pass by hand"""


# ----------------------------------------------------------------------------------------------------------------
# models


class Float32Linear(torch.nn.Linear):
    """A linear layer that computes in fp32 whatever the dtype of its weights and input."""

    def forward(self, x):
        return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())


class ValueModel(torch.nn.Module):
    """The scalar head of a sequence classifier applied at every position. For the critic these are the values
    V(s_t); for the reward model, the entry at the last real token is its score (the number
    AutoModelForSequenceClassification returns for that sequence)."""

    def __init__(self, model):
        super().__init__()
        self.model = model  # kept whole (peft wrapper included) so that it saves as it loaded
        for name, m in model.named_modules():  # the head computes in fp32 on a bf16/fp16 body (weights stay as
            if type(m) is torch.nn.Linear and "score" in name.split("."):  # they are: ZeRO-3 wants one dtype)
                m.__class__ = Float32Linear

    def forward(self, input_ids, attention_mask):
        inner = self.model.get_base_model() if hasattr(self.model, "peft_config") else self.model
        hidden = inner.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=common.position_ids(attention_mask), use_cache=False)
        return inner.score(hidden.last_hidden_state).squeeze(-1).float()


def load_value_model(name: str, dtype, tokenizer, trust_remote_code: bool, flag: str, new_head: bool = False):
    """A one-logit sequence classifier; a causal LM (whose score head would be random) only with `new_head`."""
    from transformers import AutoModelForSequenceClassification

    common.check_model_path(name, flag)
    model = common.from_pretrained(AutoModelForSequenceClassification, name, flag, num_labels=1, dtype=dtype,
                                   trust_remote_code=trust_remote_code)
    if not new_head and not any(a.endswith("ForSequenceClassification") for a in model.config.architectures or []):
        raise common.UserError(f"{flag} {name}: not a sequence classifier (its score head would be random); train "
                               "one with reward.py, or pass --new_value_head to start from a new head")
    common.resize_for_tokenizer(model, tokenizer)
    common.disable_dropout(model)
    return model.to(dtype)


def frozen_engine(model, zero_stage: int, offload: bool, dtype):
    """A forward-only DeepSpeed engine (sharded under ZeRO-3, as DSC's reference and reward models are)."""
    model.eval().requires_grad_(False)
    stage = 3 if zero_stage == 3 else 0
    config = common.ds_config(stage, 1, 1, dtype, offload_params=offload)
    return deepspeed.initialize(model=model, config=config)[0]


def trained_engine(model, lr: float, args: Args, zero_stage: int, micro: int, gas: int, total_steps: int, dtype,
                   hybrid: bool = False, max_seq_len: int = 512):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=args.weight_decay,
                                  fused=True)  # one kernel for all tensors (CPU and GPU), not a loop over them
    schedule = common.lr_lambda(args.lr_scheduler, int(args.warmup_ratio * total_steps), total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    config = common.ds_config(zero_stage, micro, gas, dtype, args.offload, args.grad_clip)
    if hybrid:
        config["hybrid_engine"] = {"enabled": True, "max_out_tokens": max_seq_len, "inference_tp_size": 1,
                                   "release_inference_cache": False, "pin_parameters": True,
                                   "tp_gather_partition_size": 8}
    return deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)[0]


@contextmanager
def generation_mode(engine, zero_stage: int, sharded: bool):
    """The actor ready to generate; yields its generate function (`sample` below, or the hybrid engine's HF
    generate). Under ZeRO-3 the parameters are gathered once for all the generate calls inside, with the partition
    hooks off (TRL's unwrap-for-generation): otherwise every layer is gathered again for every new token. DeepSpeed's
    hybrid engine (--hybrid_engine) gathers by itself and swaps in its inference kernels on eval(); train() swaps the
    training layers back before anything is scored."""
    hybrid = isinstance(engine, deepspeed.runtime.hybrid_engine.DeepSpeedHybridEngine)
    (engine if hybrid else engine.module).eval()
    zero3_linear = F.linear
    try:
        if hybrid:
            yield engine.generate
        elif zero_stage == 3 and not sharded:
            from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

            # ZeRO-3 also replaces F.linear, process-wide, by an autograd Function that saves memory in backward
            # passes; generation has none, and the plain op spares a Python call per layer per token (~7% here)
            F.linear = TORCH_LINEAR
            with unwrap_model_for_generation(engine):
                yield partial(sample, engine.module)
        else:  # (with --generate_sharded, ZeRO-3's hooks gather each layer inside the forward)
            yield partial(sample, engine.module, inference_mode=zero_stage < 3)
    finally:
        F.linear = zero3_linear
        (engine if hybrid else engine.module).train()


def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation_config, synced_gpus: bool = False,
           inference_mode: bool = True):
    """HF generate() for the one case PPO needs, reading nothing from the model's own generation_config (whose
    min_p, suppress_tokens... generate() would apply) and without its per-token overhead (10-15% of generation on a
    small model): sampling at a temperature (or greedy), with the KV cache, from left-padded prompts whose positions
    are common.position_ids' (those the scoring forward uses), until every row has ended (with `synced_gpus`, every
    rank's: ZeRO-3's sharded forward needs all ranks). A token is drawn by the exponential race argmax(p / E),
    E ~ Exp(1), which picks token i with probability p_i: the draw torch.multinomial makes for one sample (so the
    tokens are generate()'s for the same seed), without its input checks. Returns prompt + response ids, in the
    layout generate() returns: pad after a row's first EOS. Runs in torch.inference_mode (less bookkeeping per op:
    5-10% of generation on the peer fixture), except where DeepSpeed's ZeRO-3 hooks gather parameters during the
    forward (--generate_sharded): what they keep gathered must not be made an inference tensor."""
    with torch.inference_mode() if inference_mode else torch.no_grad():
        g = generation_config
        eos = torch.tensor(g.eos_token_id if isinstance(g.eos_token_id, list) else [g.eos_token_id],
                           device=input_ids.device)
        attn, pos = attention_mask, common.position_ids(attention_mask)
        base = model.get_base_model() if hasattr(model, "peft_config") else model  # (peft passes the argument on)
        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
        out = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True, **keep)
        cache_key = "cache" if "cache" in out else "past_key_values"  # transformers 5 renamed it
        ended = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        tokens = []
        for t in range(g.max_new_tokens):
            logits = out.logits[:, -1].float()
            if g.do_sample:
                p = torch.softmax(logits / g.temperature, -1)
                token = torch.argmax(p / torch.empty_like(p).exponential_().clamp_(min=torch.finfo(p.dtype).tiny), -1)
            else:
                token = torch.argmax(logits, -1)
            tokens.append(token.masked_fill(ended, g.pad_token_id))
            ended |= torch.isin(tokens[-1], eos)
            if t + 1 == g.max_new_tokens or all_ranks_true(ended.all(), synced_gpus):
                break
            attn, pos = torch.cat([attn, attn.new_ones(len(attn), 1)], 1), pos[:, -1:] + 1
            out = model(input_ids=tokens[-1][:, None], attention_mask=attn, position_ids=pos, use_cache=True,
                        **{cache_key: out[cache_key]})
        seq = torch.cat([input_ids, torch.stack(tokens, 1)], 1)
    return seq.clone() if inference_mode else seq  # an ordinary tensor again


def all_ranks_true(flag: torch.Tensor, synced: bool) -> bool:
    if synced:
        flag = flag.to(torch.int)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag)


# ----------------------------------------------------------------------------------------------------------------
# rollout math (each function is tested against a slow reference in tests/test_ppo.py)


def truncate_after_eos(responses: torch.Tensor, eos_id: int | list[int], pad_id: int):
    """Keep each response up to and including its first EOS (any of the ids `eos_id`: the EOS and the chat
    template's end of turn, common.stop_token_ids); pad the rest. Returns the cleaned responses, the mask of real
    tokens, the lengths and whether each row emitted EOS (looked for in the response only)."""
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
    """(x - mean) / std over the real tokens of the whole batch, on all ranks together (unbiased variance). Two
    passes in float64 (the mean first, then the squared deviations from it): one pass (E[x^2] - E[x]^2) in the
    input's dtype loses everything on nearly constant inputs. A constant batch whitens to 0, not NaN; padding
    positions are 0 whatever they held."""
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
    """Per-token estimate of KL(pi || ref) from samples of pi (joschu.net/blog/kl-approx.html): k1 = log pi - log ref
    (unbiased), k2 = k1^2 / 2, k3 = exp(-k1) - 1 + k1 (unbiased and never negative; GRPO's). With `mask`, 0 at
    padding before any exp: an overflow there would send NaN back through a `where` (0 * inf) in the backward."""
    log_ratio = logp - ref_logp if mask is None else torch.where(mask, logp - ref_logp, 0.0)
    if estimator == "k1":
        return log_ratio
    return 0.5 * log_ratio**2 if estimator == "k2" else torch.expm1(-log_ratio) + log_ratio


def group_baseline(score: torch.Tensor, estimator: str, group: int) -> torch.Tensor:
    """Each answer's score less its estimator's baseline, a prompt's answers being `group` consecutive rows: grpo
    (s - mean) / (std + 1e-4) (Shao et al. 2024; unbiased std and 1e-4 as TRL), dr_grpo s - mean (Liu et al. 2025),
    rloo s - mean of the others = (s - mean) k / (k - 1) (Ahmadian et al. 2024); gae and reinforce_pp: s (their
    baselines are the critic and the batch)."""
    if estimator in ("gae", "reinforce_pp"):
        return score
    scores = score.view(-1, group)
    centred = scores - scores.mean(1, keepdim=True)
    if estimator == "grpo":
        centred = centred / (scores.std(1, keepdim=True) + 1e-4)
    return (centred * group / (group - 1) if estimator == "rloo" else centred).reshape(-1)


def loss_weights(lengths: torch.Tensor, loss_agg: str, max_new_tokens: int) -> torch.Tensor:
    """Each response token's weight in the policy loss (one per row, [B, 1]); the weighted sum is then divided by the
    global mini-batch's token count (token_mean) or answer count (the others): token_mean 1 (N+, DAPO),
    seq_mean_token_mean 1 / length (GRPO), seq_mean_token_sum_norm 1 / max_new_tokens (Dr. GRPO)."""
    if loss_agg == "token_mean":
        return torch.ones_like(lengths, dtype=torch.float)[:, None]
    return 1.0 / (lengths.clamp(min=1).float() if loss_agg == "seq_mean_token_mean"
                  else torch.full_like(lengths, max_new_tokens, dtype=torch.float))[:, None]


def compute_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                    lengths: torch.Tensor, kl_coef: float, kl_estimator: str = "k1"):
    """Per-token reward: -kl_coef * KL on every response token (kl_estimate; k1 = logp - ref_logp by default), plus
    the sequence's score on its last real token, the EOS when there is one (index length - 1; N+ and TRL put it one
    slot after EOS, DSC PR 672 and TRL issue 3750 were off-by-one bugs here). Padding positions are 0 whatever the
    log-probs hold there (`where`, not a product: 0 * inf is NaN)."""
    kl = torch.where(mask, kl_estimate(logp.float(), ref_logp.float(), kl_estimator), 0.0)
    rewards = -kl_coef * kl
    rows = torch.arange(score.shape[0], device=score.device)
    rewards[rows, lengths - 1] += score.float()
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
        block: int = 256):
    """Generalised advantage estimation over the response tokens; values and rewards after the end count as 0
    (set with `where`, so whatever padding holds cannot reach a real token).
    A_t = sum_k (gamma lam)^k delta_{t+k}, as matrix products over blocks of `block` tokens, last block first, each
    block's sums continued by c^(distance) times the advantage just after it: no loop over tokens, and memory
    block x block, not T x T (16k tokens would need a 2 GB matrix)."""
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
    """Per-token clipped surrogate (Schulman et al. 2017) and whether the clip was active. With `mask`, the ratio
    is 1 at padding (as kl_estimate: no exp overflow there to turn the backward into NaN)."""
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


def seq_logprobs(model, seq: torch.Tensor, attn: torch.Tensor, n_prompt: int, temperature: float,
                 with_entropy: bool = False, chunk_size: int = 1024):
    """Log-probs of the response tokens seq[:, n_prompt:] (and their entropies) from one forward over prompt +
    response; the LM head runs on the response positions alone, chunk_size at a time (common.logprobs.token_logprobs)."""
    return common.logprobs.token_logprobs(model, seq, attn, n_prompt, temperature, chunk_size, with_entropy)


def micro_slices(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def trim(seq: torch.Tensor, attn: torch.Tensor, n_prompt: int, prompt_lens: list[int], resp_lens: list[int]):
    """Cut the columns that are padding in every row of a micro-batch: left of its longest prompt, right of its
    longest response. The widths come from lengths kept on the host, so nothing waits for the device. Returns the
    trimmed sequences and mask, the new prompt width and the response width."""
    np_, width = max(prompt_lens), max(resp_lens)
    left = n_prompt - np_
    return seq[:, left: n_prompt + width], attn[:, left: n_prompt + width], np_, width


def minibatches(n_rows: int, n_batches: int, first_row: int, key: tuple, per_block: int = 1) -> list[list[int]]:
    """One PPO epoch's mini-batches as this rank's row indices, the same global mini-batches however the rollout is
    split over ranks: each block of n_batches x per_block consecutive rows of the global batch (rows first_row...
    here) is shuffled, seeded by (key, the block's global index), and gives per_block rows to every mini-batch. A
    shuffle per rank would make each global mini-batch depend on the split. main passes per_block = the group size
    when a mini-batch holds whole groups, so that the answers to one prompt are not always split apart."""
    batches, block = [[] for _ in range(n_batches)], n_batches * per_block
    for start in range(0, n_rows, block):
        order = list(range(start, min(start + block, n_rows)))
        random.Random(str((*key, (first_row + start) // block))).shuffle(order)
        for j, batch in enumerate(batches):
            batch += order[j * per_block: (j + 1) * per_block]
    return batches


def ptx_batch(ptx: list, key: tuple, n_global: int, rank: int, n_local: int):
    """PPO-ptx rows for one mini-batch: one draw of the global batch (the same on every rank, seeded by `key`), this
    rank's share of it, and the global batch's count of trained tokens (the ptx loss is a token-mean over it)."""
    rng = random.Random(str(key))
    idx = rng.sample(range(len(ptx)), n_global) if len(ptx) >= n_global else rng.choices(range(len(ptx)), k=n_global)
    n_tokens = sum(sum(ptx[i][1][1:]) for i in idx)  # the first token is never predicted
    return [ptx[i] for i in idx[rank * n_local: (rank + 1) * n_local]], max(n_tokens, 1)


def ptx_nll(actor, rows: list, pad_id: int, device, chunk_size: int = 1024) -> torch.Tensor:
    """Summed next-token NLL of the trained (assistant) tokens of SFT-format rows (ids, mask); the LM head runs on
    those tokens' positions alone."""
    ids = common.pad([r[0] for r in rows], pad_id).to(device)
    mask = common.pad([[int(x) for x in r[1]] for r in rows], 0).to(device).bool()
    attn = common.pad([[1] * len(r[0]) for r in rows], 0).to(device)
    return -common.logprobs.token_logprobs(actor, ids, attn, mask, chunk_size=chunk_size).sum()


# ----------------------------------------------------------------------------------------------------------------
# rollout


def encode_prompts(records: list[dict], tokenizer, max_len: int, truncation: str, source: str,
                   skip_invalid: bool = False):
    """Token ids of each record's prompt, cut from the left to max_len (or an error with --truncation error), the
    number cut, and the records kept (--skip_invalid drops those that cannot be encoded)."""
    known = {}

    def encode(record, where):
        key = repr(record["prompt"])
        if key not in known:  # a repeated prompt (the demo draws 4096 from 115) is encoded once
            known[key] = common.encode_prompt(tokenizer, record["prompt"])
        if len(known[key]) > max_len and truncation == "error":
            raise common.UserError(f"{where}: {len(known[key])} tokens > --max_seq_len - --max_new_tokens = "
                                   f"{max_len} (pass --truncation left to cut it)")
        return record, common.truncate_left(list(known[key]), max_len)

    encoded = common.data.encode_records(records, encode, source, skip_invalid)
    return [ids for _, (ids, _) in encoded], sum(cut for _, (_, cut) in encoded), [r for r, _ in encoded]


def generation_config(args: Args, tokenizer, greedy: bool = False):
    """Every field that changes sampling is set here, so nothing from the model's own generation_config (a
    repetition penalty, a top_p) slips in: samples must come from the policy whose ratio PPO computes."""
    from transformers import GenerationConfig

    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=args.temperature)
    return GenerationConfig(**sampling, top_k=0, top_p=1.0, min_p=None, typical_p=1.0, repetition_penalty=1.0,
                            no_repeat_ngram_size=0, num_beams=1, min_new_tokens=0,
                            max_new_tokens=args.max_new_tokens, eos_token_id=common.stop_token_ids(tokenizer),
                            pad_token_id=tokenizer.pad_token_id, use_cache=True)


@torch.no_grad()
def generate(actor, prompt_ids: list[list[int]], tokenizer, gen_config, zero_stage: int, sharded: bool, device,
             chunk: int = 0, seeds: list[int] | None = None):
    """Sample responses with the KV cache for left-padded prompts, `chunk` prompts per generate call (all at once
    when 0), each call stopping when all its rows have ended. Seeding every call from `seeds` makes the samples
    independent of how the prompts are split over ranks. Rows are cut after their first EOS."""
    pad_id = tokenizer.pad_token_id
    responses = []
    with generation_mode(actor, zero_stage, sharded) as generate_fn:  # one gather for all the calls
        for i, s in enumerate(micro_slices(len(prompt_ids), chunk or len(prompt_ids))):
            if seeds is not None:
                torch.manual_seed(seeds[i])
            prompts = common.pad(prompt_ids[s], pad_id, side="left").to(device)
            attn = common.pad([[1] * len(p) for p in prompt_ids[s]], 0, side="left").to(device)
            seq = generate_fn(input_ids=prompts, attention_mask=attn, generation_config=gen_config,
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
    """The reward model's score of each prompt + response, read at the last real token. With `retok`, the texts
    are re-tokenised for a reward model whose tokenizer differs from the actor's."""
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


def load_reward_fn(spec: str):
    """--reward_fn FILE.py:NAME or module:NAME -> the function (errors while importing it name their file:line)."""
    import importlib
    import importlib.util

    source, _, name = spec.rpartition(":")
    if not source or not name:
        raise common.UserError(f"--reward_fn {spec}: expected FILE.py:NAME or module:NAME")
    if source.endswith(".py") and not os.path.isfile(source):
        raise common.UserError(f"--reward_fn {spec}: no such file {source}")
    try:
        if source.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(source).stem, source)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(source)
    except Exception as e:
        raise common.UserError(f"--reward_fn {spec}: loading {source} raised {type(e).__name__}: {e} "
                               f"({error_place(e, source)})")
    fn = getattr(module, name, None)
    if not callable(fn):
        raise common.UserError(f"--reward_fn {spec}: {source} has no function {name}")
    return fn


def error_place(e: BaseException, source: str | None = None) -> str:
    """file:line of an exception: the innermost frame in `source` (the reward function's file), else the innermost."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if source and os.path.abspath(f.filename) == os.path.abspath(source)]
    f = (mine or frames)[-1]
    return f"{f.filename}:{f.lineno}"


def call_reward_fn(fn, spec: str, prompts: list[list[dict]], responses: list[str], device) -> torch.Tensor:
    """fn's scores as a tensor; an exception in fn, or scores of the wrong count, type or value, stop the run with
    one line."""
    try:
        scores = fn(prompts, responses)
    except Exception as e:
        raise common.UserError(f"--reward_fn {spec} raised {type(e).__name__}: {e} "
                               f"({error_place(e, getattr(fn, '__code__', None) and fn.__code__.co_filename)})")
    if isinstance(scores, torch.Tensor):
        scores = scores.tolist()
    try:
        values = [float(x) for x in scores if not isinstance(x, (str, bytes, bool))]
    except (TypeError, ValueError):
        values = []
    if not hasattr(scores, "__len__") or len(values) != len(scores) or len(values) != len(responses):
        raise common.UserError(f"--reward_fn {spec} returned {type(scores).__name__} "
                               f"{str(scores)[:60]!r}; expected a list of {len(responses)} numbers, one per response")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise common.UserError(f"--reward_fn {spec} returned {values[bad[0]]} for response {bad[0]} "
                               f"({responses[bad[0]]!r}); scores must be finite")
    return torch.tensor(values, device=device)


def make_retokenizer(actor_tok, reward_tok, prompts: list, device):
    """Rebuild prompt + response in the reward model's tokenizer (its own template): an ended response as a whole
    answer turn, scored at its end-of-turn token; an unfinished one as text after the prompt."""

    def retok(rollout: dict):
        rows = []
        for i, msgs in enumerate(prompts):
            n = int(rollout["lengths"][i]) - int(rollout["has_eos"][i])
            text = actor_tok.decode(rollout["seq"][i, -rollout["mask"].shape[1]:][:n], skip_special_tokens=True)
            if rollout["has_eos"][i]:  # the answer's own text: its template writes what goes before it
                rows.append(common.encode_scored(reward_tok, msgs + [{"role": "assistant", "content": text.strip()}]))
            else:
                rows.append(common.encode_prompt(reward_tok, msgs)
                            + reward_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
        seq = common.pad(rows, reward_tok.pad_token_id).to(device)
        return seq, common.pad([[1] * len(r) for r in rows], 0).to(device)

    return retok


def fit_batch_sizes(args: Args) -> tuple[int, int]:
    """The micro-batch and the mini-batch (samples per rank). A size the user left unset adapts to the sizes that
    were set (said once on stderr): --rollout_batch_size 8 alone gives micro = mini = 8. Sizes the user set that
    conflict stay an error (in main)."""
    rollout, gas = args.rollout_batch_size * args.samples_per_prompt, args.gradient_accumulation_steps
    micro = args.per_device_batch_size
    if micro is None:
        whole = args.mini_batch_size or (rollout // gas if rollout % gas == 0 else rollout)
        micro = max(d for d in range(1, min(16, whole) + 1) if whole % d == 0)
        if micro != 16:
            common.note(f"--per_device_batch_size {micro} (the default 16 does not divide "
                        f"{'--mini_batch_size' if args.mini_batch_size else '--rollout_batch_size'} {whole})")
    return micro, args.mini_batch_size or micro * gas


# ----------------------------------------------------------------------------------------------------------------
# main


def rollout_prompts(n_prompts: int, iteration: int, rank: int, per_rank: int, world: int, seed: int,
                    samples_per_prompt: int) -> list[int]:
    """This rank's prompts at `iteration` (indices), each `samples_per_prompt` times in a row: epoch e walks the
    prompts shuffled by seed + e, an iteration takes the next per_rank x world of them, rank r the r-th share."""
    per_iter = per_rank * world
    epoch, position = divmod(iteration, max(1, n_prompts // per_iter))
    order = list(range(n_prompts))
    random.Random(seed + epoch).shuffle(order)
    first = position * per_iter + rank * per_rank
    return [order[(first + j) % n_prompts] for j in range(per_rank) for _ in range(samples_per_prompt)]


def kl_per_response(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """train/kl and eval/kl, whatever the penalty estimates: sum of log pi - log ref over the response (k1)."""
    return torch.where(mask, logp - ref_logp, 0.0).sum(1)


def ref_logprobs(ref, actor, seq: torch.Tensor, attn: torch.Tensor, n_prompt: int, temperature: float,
                 chunk_size: int = 1024):
    """The reference's log-probs; with --lora_rank and no --ref, the actor with its adapter switched off."""
    if ref is not None:
        return seq_logprobs(ref, seq, attn, n_prompt, temperature, chunk_size=chunk_size)
    with actor.module.disable_adapter():
        return seq_logprobs(actor, seq, attn, n_prompt, temperature, chunk_size=chunk_size)


def reduce_sums(sums: dict, device) -> dict:
    """The sums by name, added over ranks: one host sync and one collective for all of them."""
    names = sorted(sums)
    values = torch.stack([torch.as_tensor(sums[k], device=device).double() for k in names]).tolist()
    return dict(zip(names, common.all_reduce_sum(values, device)))


@torch.no_grad()
def evaluate(args: Args, iteration: int, actor, ref, score_rows, tokenizer, reward_tok, records: list[dict],
             prompt_ids: list[list[int]], gen_config, actor_stage: int, call_size: int, micro: int, device) -> dict:
    """eval/reward, eval/kl (demo: eval/gold) on held-out prompts, in generate calls numbered over the eval set and
    seeded by that number: the same samples on any number of ranks and at every evaluation. Every rank runs as many
    full calls (ZeRO-3 needs every rank in every forward); rows past the end have weight 0."""
    world, rank, toy, chunk = common.world_size(), common.rank(), args.data == "toy", args.logprob_chunk_size
    n, size = len(prompt_ids), min(call_size, len(prompt_ids))
    calls_per_rank = math.ceil(math.ceil(n / size) / world)
    sums = Counter(reward=0.0, kl=0.0, gold=0.0)
    for call in range(rank * calls_per_rank, (rank + 1) * calls_per_rank):
        rows = [call * size + i for i in range(size)]
        weight = torch.tensor([float(i < n) for i in rows], device=device)
        messages = [records[i % n]["prompt"] for i in rows]
        rollout, n_prompt = generate(actor, [prompt_ids[i % n] for i in rows], tokenizer, gen_config, actor_stage,
                                     args.generate_sharded, device, seeds=[args.seed + 7919 * call + 1])
        retok = None if reward_tok is None else make_retokenizer(tokenizer, reward_tok, messages, device)
        score, _, fn_score = score_rows(rollout, n_prompt, messages, retok)  # the RM's raw score (or --reward_fn's)
        seq, attn, slices = rollout["seq"], rollout["attn"], micro_slices(size, micro)
        logp = torch.cat([seq_logprobs(actor, seq[s], attn[s], n_prompt, args.temperature, chunk_size=chunk)
                          for s in slices])
        ref_logp = torch.cat([ref_logprobs(ref, actor, seq[s], attn[s], n_prompt, args.temperature, chunk)
                              for s in slices])
        texts = common.decode_answers(tokenizer, seq[:, n_prompt:])
        gold = torch.tensor([common.toy.gold_score(m[-1]["content"], t) if toy else 0.0 for m, t in zip(messages, texts)],
                            device=device)
        sums.update(reward=(score * weight).sum(), gold=(gold * weight).sum(),
                    kl=(kl_per_response(logp, ref_logp, rollout["mask"]) * weight).sum())
        if fn_score is not None:
            sums.update(reward_fn=(fn_score * weight).sum())
        if call == 0:  # on rank 0
            for j in range(min(args.print_samples, size)):
                print(f"  [{iteration}] {messages[j][-1]['content']!r} -> {texts[j]!r} (score {float(score[j]):.2f})",
                      flush=True)
    total = {k: v / n for k, v in reduce_sums(sums, device).items()}
    return ({"eval/reward": total["reward"], "eval/kl": total["kl"]} | ({"eval/gold": total["gold"]} if toy else {})
            | ({"eval/reward_fn": total["reward_fn"]} if "reward_fn" in total else {}))


def main(args: Args):
    # --- setup ---
    actor_stage = args.zero_stage if args.actor_zero_stage is None else args.actor_zero_stage
    critic_stage = args.zero_stage if args.critic_zero_stage is None else args.critic_zero_stage
    common.flags.check(args)
    samples_per_prompt, critic_free = args.samples_per_prompt, args.advantage_estimator != "gae"
    least = 2 if args.advantage_estimator in ("grpo", "dr_grpo", "rloo") else 1  # a group needs two answers
    if samples_per_prompt < least:
        raise common.UserError(f"--samples_per_prompt {samples_per_prompt}: --advantage_estimator "
                               f"{args.advantage_estimator} needs at least {least}")
    if args.kl_in_loss and args.kl_estimator == "k1" and args.kl_coef > 0:
        common.print0("warning: --kl_in_loss with --kl_estimator k1: on fresh samples its gradient is 0 in "
                      "expectation (E[grad log pi] = 0), so the term only adds noise; GRPO uses k3, and k2's gradient "
                      "is KL's")
    if critic_free and (args.critic is not None or args.save_critic):
        raise common.UserError(f"--advantage_estimator {args.advantage_estimator} has no critic: drop --critic and "
                               "--save_critic")
    inputs = {"--actor": args.actor, "--reward": args.reward, "--critic": args.critic, "--ref": args.ref,
              "--data": args.data, "--eval_data": args.eval_data, "--ptx_data": args.ptx_data}
    tag = common.runs.prepare_output_dir(args.output_dir, args.overwrite, args.resume, "ppo.py", inputs,
                                    checkpoints="checkpoints/actor")
    if tag:  # the critic's checkpoint is written first, so it is there whenever the actor's `latest` names it
        common.runs.latest_checkpoint(Path(args.output_dir) / "checkpoints" / "critic")
    common.check_report_to(args.report_to)
    no_rm = args.reward == "none"
    if no_rm and not args.reward_fn:
        raise common.UserError("--reward none needs --reward_fn (something must score the responses)")
    for path, name in ((args.actor, "--actor"), (None if no_rm else args.reward, "--reward"),
                       (args.critic, "--critic"), (args.ref, "--ref")):
        if path is not None:
            common.check_model_path(path, name)
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
    device = common.init_distributed()
    world, rank = common.world_size(), common.rank()
    dtype = common.resolve_dtype(args.dtype)
    common.seed_everything(args.seed)
    toy = args.data == "toy"
    actor_lr = args.learning_rate if args.learning_rate is not None else (2e-4 if toy else 1e-6)
    critic_lr = args.critic_learning_rate if args.critic_learning_rate is not None else (5e-4 if toy else 5e-6)
    max_seq_len = common.flags.fit_max_seq_len(args.max_seq_len, common.flags.model_context(args.actor, args.trust_remote_code))
    if args.max_new_tokens >= max_seq_len:
        raise common.UserError(f"--max_new_tokens {args.max_new_tokens} must be below --max_seq_len {max_seq_len}")
    if args.hybrid_engine and int(transformers.__version__.split(".")[0]) >= 5:
        raise common.UserError("--hybrid_engine: DeepSpeed's hybrid engine does not run with transformers 5 (Llama: "
                               "its kernels get a tuple; OPT: no layer is replaced); generate without it")
    if args.hybrid_engine and (device.type != "cuda" or args.lora_rank > 0):
        raise common.UserError("--hybrid_engine needs GPUs (DeepSpeed's inference kernels) and no --lora_rank (its "
                               "kernels would read peft's wrapped layers wrongly)")
    own_agg = {"grpo": "seq_mean_token_mean", "dr_grpo": "seq_mean_token_sum_norm"}  # each paper's aggregation
    loss_agg = own_agg.get(args.advantage_estimator, "token_mean") if args.loss_agg == "auto" else args.loss_agg
    micro, mini = fit_batch_sizes(args)
    if mini % micro or args.rollout_batch_size * samples_per_prompt % mini:
        raise common.UserError(f"--rollout_batch_size {args.rollout_batch_size} x --samples_per_prompt "
                               f"{samples_per_prompt} must be a multiple of the mini-batch ({mini}), itself a "
                               f"multiple of --per_device_batch_size {micro}")
    gas = mini // micro
    gen_chunk = args.generation_batch_size or args.rollout_batch_size
    lp_chunk = args.logprob_chunk_size

    # --- data ---
    tokenizer = common.load_tokenizer(args.actor, args.trust_remote_code)
    reward_tok = tokenizer if no_rm else common.load_tokenizer(args.reward, args.trust_remote_code)
    if gap := common.template_gap(tokenizer):
        common.note(gap)
    same_tok = reward_tok.get_vocab() == tokenizer.get_vocab()
    if not same_tok and not args.reward_tokenizer:
        raise common.UserError(f"--reward {args.reward}: its tokenizer differs from the actor's ({args.actor}); pass "
                               "--reward_tokenizer to re-tokenise responses for it")
    records, eval_records = common.data.load_splits(args.data, args.eval_data, args.data_split, args.eval_split,
                                               "prompts", args.skip_invalid)
    if eval_records is None:
        records, eval_records = common.data.split_eval(records, args.eval_fraction, args.seed)
    eval_records = eval_records[: args.num_eval_prompts]
    max_prompt = max_seq_len - args.max_new_tokens
    prompt_ids, n_cut, records = encode_prompts(records, tokenizer, max_prompt, args.truncation, args.data,
                                                args.skip_invalid)
    eval_prompt_ids, _, eval_records = encode_prompts(eval_records, tokenizer, max_prompt, args.truncation,
                                                      "eval data", args.skip_invalid)
    ptx = None
    common.print0("example prompt:\n" + tokenizer.decode(prompt_ids[0]))
    if args.ptx_data:
        ptx = [common.encode_record(tokenizer, r) for r in common.data.load_data(args.ptx_data, "sft", None,
                                                                            args.skip_invalid)]
        common.print0("example ptx (trained tokens in [[ ]]):\n" + common.show_example(tokenizer, *ptx[0]))
        ptx = [(common.truncate_left(i, max_seq_len)[0], common.truncate_left(m, max_seq_len)[0])
               for i, m in ptx]
    per_iter = args.rollout_batch_size * world * samples_per_prompt  # episodes (answers) per iteration
    total_episodes = args.total_episodes or args.num_epochs * len(prompt_ids) * samples_per_prompt
    n_iters = total_episodes // per_iter
    if n_iters == 0:
        raise common.UserError(f"--total_episodes {total_episodes} is less than one iteration "
                               f"({per_iter} = rollout_batch_size x ranks x samples_per_prompt)")
    steps_per_iter = args.ppo_epochs * (args.rollout_batch_size * samples_per_prompt // mini)
    # one optimizer step on fresh samples: the old log-probs are the training forward's own (ratio 1), so the actor's
    # scoring forward is skipped (as TRL's GRPO does). With one micro-batch a rank, the update's forwards (actor and
    # critic) run in step 3, with autograd, and step 6 trains through them; with several, step 6 fills in the old
    # log-probs, so only where the reward needs none for its KL penalty
    forward_once = steps_per_iter == 1 and gas == 1
    reuse_logprobs = forward_once or (steps_per_iter == 1 and (args.kl_in_loss or args.kl_coef == 0))
    run = {"script": "ppo.py", "world_size": world, "rollout_batch": per_iter, "mini_batch": mini * world,
           "prompts": len(prompt_ids), "actor_stage": actor_stage, "critic_stage": critic_stage, "iterations": n_iters,
           "max_seq_len": max_seq_len, "learning_rate": actor_lr, "critic_learning_rate": critic_lr}
    if tag:
        common.runs.check_resume(args.output_dir, args, tag, run, "iterations",
                            fixed=("actor_stage", "critic_stage", "lora_rank", "critic_lora_rank")
                            + (("world_size",) if actor_stage or critic_stage else ()))
    common.print0(f"{len(prompt_ids)} prompts ({n_cut} cut from the left), {n_iters} iterations of {per_iter} "
                  f"episodes, {steps_per_iter} optimizer steps each")

    # --- models ---
    actor = common.load_causal_lm(args.actor, dtype, tokenizer, args.trust_remote_code, "--actor")
    common.disable_dropout(actor)
    ref = None
    if args.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        actor = get_peft_model(actor, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    if args.lora_rank == 0 or args.ref not in (None, args.actor):
        ref = common.load_causal_lm(args.ref or args.actor, dtype, tokenizer, args.trust_remote_code, "--ref")
        common.disable_dropout(ref)
    reward_model = None if no_rm else load_value_model(args.reward, dtype, reward_tok, args.trust_remote_code,
                                                       "--reward", args.new_value_head)
    normalize = args.normalize_reward and reward_model is not None
    reward_mean = getattr(reward_model.config, "reward_mean", 0.0) if normalize else 0.0
    reward_std = getattr(reward_model.config, "reward_std", 1.0) if normalize else 1.0
    critic_path = args.critic or (args.reward if same_tok and not no_rm else args.actor)
    critic = None if critic_free else load_value_model(critic_path, dtype, tokenizer, args.trust_remote_code,
                                                       "--critic", args.new_value_head or critic_path == args.actor)
    if args.critic_lora_rank > 0 and not critic_free:
        from peft import LoraConfig, get_peft_model

        critic = get_peft_model(critic, LoraConfig(r=args.critic_lora_rank, lora_alpha=args.lora_alpha,
                                                   lora_dropout=0.0, target_modules="all-linear", task_type="SEQ_CLS"))
    if args.gradient_checkpointing:
        for m in (actor, critic) if critic is not None else (actor,):
            m.gradient_checkpointing_enable()
            if hasattr(m, "enable_input_require_grads"):
                m.enable_input_require_grads()
    ema = ema_copy(actor) if args.ema and common.is_rank0() else None
    total_steps = n_iters * steps_per_iter
    actor = trained_engine(actor, actor_lr, args, actor_stage, micro, gas, total_steps, dtype, args.hybrid_engine,
                           max_seq_len)
    if critic is not None:
        critic = trained_engine(ValueModel(critic), critic_lr, args, critic_stage, micro, gas, total_steps, dtype)
    ref = frozen_engine(ref, actor_stage, args.offload_reference, dtype) if ref is not None else None
    reward = None if no_rm else frozen_engine(ValueModel(reward_model), critic_stage, args.offload_reference, dtype)
    n_params = {name: sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters()) if m is not None else 0
                for name, m in (("actor", actor), ("critic", critic), ("reward", reward), ("ref", ref or actor))}
    common.print0(f"parameters (ZeRO-3 partitions counted whole): {n_params}" + (" (critic-free)" * critic_free))
    gen_config = generation_config(args, tokenizer)
    eval_config = generation_config(args, tokenizer, greedy=args.eval_greedy)

    def score_rows(rollout: dict, n_prompt: int, msgs: list, retok):
        """(the reward model's raw score, or --reward_fn's without one; the score PPO uses: the reward model's
        normalised score + --reward_fn_weight x the function's; the function's score or None)"""
        raw = reward_scores(reward, rollout, n_prompt, micro, retok) if reward is not None else None
        fn = None
        if reward_fn is not None:
            texts = common.decode_answers(tokenizer, rollout["seq"][:, n_prompt:])
            fn = call_reward_fn(reward_fn, args.reward_fn, msgs, texts, device)
        score = (raw - reward_mean) / reward_std if raw is not None else torch.zeros_like(fn)
        if fn is not None:
            score = score + args.reward_fn_weight * fn
        return (raw if raw is not None else fn), score, fn

    eval_inputs = (actor, ref, score_rows, tokenizer, None if same_tok else reward_tok, eval_records,
                   eval_prompt_ids, eval_config, actor_stage, gen_chunk, micro, device)  # evaluate(args, it, *these)

    # --- resume ---
    common.runs.start_output_dir(args.output_dir, args, args.overwrite, args.resume, run)
    ckpt = Path(args.output_dir) / "checkpoints"
    start_iter, kl_coef = 0, args.kl_coef
    if tag:
        changed = set(args.resume_changes)  # a new learning rate or weight decay replaces the checkpoint's
        decay = args.weight_decay if "weight_decay" in changed else None
        if critic is not None:
            common.runs.load_checkpoint(critic, str(ckpt / "critic"), tag,
                                   critic_lr if "critic_learning_rate" in changed else None, decay)
        state = common.runs.load_checkpoint(actor, str(ckpt / "actor"), tag,
                                       actor_lr if "learning_rate" in changed else None, decay)
        start_iter = state["iteration"]
        if args.adaptive_kl and "kl_coef" not in args.resume_changes:  # the controller goes on from where it was
            kl_coef = state["kl_coef"]
        if args.ema and common.is_rank0():  # fp32 (a checkpoint from before the fp32 copy has the model's dtype)
            ema = {k: v.float() if v.is_floating_point() else v for k, v in state["ema"].items()}
        common.print0(f"resumed from {ckpt}/*/{tag} at iteration {start_iter}")
        common.runs.truncate_log(args.output_dir, start_iter)  # drop rows logged after the checkpoint

    # --- loop ---
    logger = common.Logger(args.output_dir, n_iters, "ppo", initial=start_iter, report_to=args.report_to,
                           config=vars(args))
    if start_iter == 0 and eval_prompt_ids:  # no held-out prompts (--eval_fraction 0): no eval rows
        logger.log(0, evaluate(args, 0, *eval_inputs))
    for iteration in range(start_iter, n_iters):
        t_start = time.time()
        sums = Counter()  # every logged figure as a sum over this rank's responses or tokens, by name

        # 1. prompts: this rank's share of the iteration's prompts, each samples_per_prompt times (the rollout's rows)
        rows = rollout_prompts(len(prompt_ids), iteration, rank, args.rollout_batch_size, world, args.seed,
                               samples_per_prompt)

        # 2. generate, cut after EOS; each generate call seeded from (seed, iteration, its place in the global batch):
        #    ranks draw different samples; a resumed run or another split over ranks draws the same ones
        calls = math.ceil(args.rollout_batch_size / gen_chunk)  # generate calls per rank
        seeds = [args.seed + 104729 * (iteration + 1) + 7919 * (rank * calls + i) for i in range(calls)]
        rollout, n_prompt = generate(actor, [prompt_ids[i] for i in rows], tokenizer, gen_config, actor_stage,
                                     args.generate_sharded, device, gen_chunk * samples_per_prompt, seeds)
        seq, attn, mask, lengths = rollout["seq"], rollout["attn"], rollout["mask"], rollout["lengths"]
        t_gen = time.time()

        # 3. score without autograd, in micro-batches: old log-probs and entropy (actor), reference log-probs, values
        #    (critic), reward (RM; through `retok` when its tokenizer differs). With forward_once, the actor's and
        #    critic's forwards are the update's, run here with autograd: step 6 trains through them
        messages = [records[i]["prompt"] for i in rows]
        retok = None if same_tok else make_retokenizer(tokenizer, reward_tok, messages, device)
        fwd = {}
        if forward_once:
            fwd["logp"], fwd["entropy"] = seq_logprobs(actor, seq, attn, n_prompt, args.temperature, True, lp_chunk)
            if critic is not None:
                fwd["values"] = critic(seq, attn)[:, n_prompt - 1: -1]
        with torch.no_grad():
            actor.module.eval()
            slices = micro_slices(len(rows), micro)
            old_logp, entropy = torch.zeros(mask.shape, device=device), torch.zeros(mask.shape, device=device)
            if forward_once:
                old_logp, entropy = fwd["logp"].detach(), fwd["entropy"].detach()
            elif not reuse_logprobs:  # else filled in by the update's forward
                old_logp, entropy = map(torch.cat, zip(*[seq_logprobs(actor, seq[s], attn[s], n_prompt,
                                                                      args.temperature, True, lp_chunk)
                                                           for s in slices]))
            ref_logp = torch.cat([ref_logprobs(ref, actor, seq[s], attn[s], n_prompt, args.temperature, lp_chunk)
                                  for s in slices])
            old_values = torch.zeros(mask.shape, device=device)
            if critic is not None:
                critic.module.eval()
                old_values = fwd["values"].detach() if forward_once else torch.cat(
                    [critic(seq[s], attn[s])[:, n_prompt - 1: -1] for s in slices])
                old_values = torch.where(mask, old_values, 0.0)
                critic.module.train()
            raw_score, score, fn_score = score_rows(rollout, n_prompt, messages, retok)
            actor.module.train()
        t_score = time.time()
        # before any update, so nothing new is saved; summed over ranks, so that every rank stops (none hangs)
        finite = common.all_reduce_sum([float(raw_score.sum()), float(torch.where(mask, ref_logp, 0).sum())], device)
        common.check_finite({"reward": finite[0], "ref_logp": finite[1]}, iteration + 1)
        sums.update(responses=len(rows), reward=raw_score.sum(), response_tokens=mask.sum(),
                    eos=rollout["has_eos"].sum(), **({} if fn_score is None else {"reward_fn": fn_score.sum()}))

        # 4. rewards: score normalised, penalised without EOS, clipped, on the last token; KL penalty on every token
        score = score - args.missing_eos_penalty * (~rollout["has_eos"]).float()
        score = score.clamp(-args.clip_reward_value, args.clip_reward_value)
        sums.update(score=score.sum())  # train/score: what a baseline subtracted below leaves unchanged
        score = group_baseline(score, args.advantage_estimator, samples_per_prompt)
        rewards, _ = compute_rewards(score, old_logp, ref_logp, mask, lengths, 0.0 if args.kl_in_loss else kl_coef,
                                     args.kl_estimator)
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)

        # 5. advantages and returns: GAE with the critic's values, whitened over the global batch; critic-free, the
        #    reward-to-go (GAE with no values and lam 1), whitened over the global batch for reinforce_pp
        advantages, returns = gae(rewards, old_values, mask, args.gamma, 1.0 if critic_free else args.lam)
        if args.advantage_estimator == "reinforce_pp" or (args.whiten_advantages and not critic_free):
            advantages = masked_whiten(advantages, mask)
        residual = returns - old_values  # for train/explained_variance
        sums.update(returns=masked_sum(returns, mask), returns_sq=masked_sum(returns**2, mask),
                    residual=masked_sum(residual, mask), residual_sq=masked_sum(residual**2, mask))
        t_rollout = time.time()

        # 6. update: PPO epochs over shuffled mini-batches, each loss a token-mean over the global mini-batch;
        #    shuffles, widths and token counts are set on the host first (one collective): no step waits for the device
        prompt_lens, response_lens = [len(prompt_ids[i]) for i in rows], lengths.tolist()
        per_block = samples_per_prompt if mini % samples_per_prompt == 0 else 1
        steps = [(epoch, step, batch) for epoch in range(args.ppo_epochs) for step, batch in enumerate(
            minibatches(len(rows), len(rows) // mini, rank * len(rows), (args.seed, iteration, epoch), per_block))]
        step_tokens = common.all_reduce_sum([sum(response_lens[i] for i in batch) for *_, batch in steps], device)
        token_weight = loss_weights(lengths, loss_agg, args.max_new_tokens)
        ptx_tokens_total = 0.0
        for (epoch, step, batch), n_tokens in zip(steps, step_tokens):
            scale = world * gas / n_tokens  # undo DeepSpeed's 1/gas and rank averaging: a global token-mean
            policy_scale = scale if loss_agg == "token_mean" else gas / mini  # / the global mini-batch's answers
            if ptx is not None:
                ptx_rows, ptx_tokens = ptx_batch(ptx, (args.seed, iteration, epoch, step), mini * world, rank, mini)
            for s in micro_slices(len(batch), micro):
                index = torch.tensor(batch[s], device=device)
                micro_seq, micro_attn, micro_n_prompt, width = trim(seq[index], attn[index], n_prompt, [
                    prompt_lens[i] for i in batch[s]], [response_lens[i] for i in batch[s]])
                micro_mask, micro_old_logp = mask[index, :width], old_logp[index, :width]
                if forward_once:  # step 3 ran this forward over the whole rollout: its rows, in this step's order
                    logp = fwd["logp"][index]
                elif reuse_logprobs:  # the one step's forward is the rollout's: old log-probs and entropy from it
                    logp, micro_entropy = seq_logprobs(actor, micro_seq, micro_attn, micro_n_prompt,
                                                       args.temperature, True, lp_chunk)
                    micro_old_logp = old_logp[index, :width] = logp.detach()
                    entropy[index, :width] = micro_entropy.detach()
                else:
                    logp = seq_logprobs(actor, micro_seq, micro_attn, micro_n_prompt, args.temperature,
                                        chunk_size=lp_chunk)
                pg, clipped, ratio = policy_loss(logp, micro_old_logp, advantages[index, :width], args.cliprange,
                                                 micro_mask)
                loss = pg
                if args.kl_in_loss:  # GRPO: + beta * KL(pi || ref) per token, through the current log-probs
                    loss = pg + kl_coef * kl_estimate(logp, ref_logp[index, :width], args.kl_estimator, micro_mask)
                actor_loss = masked_sum(loss * token_weight[index], micro_mask) * policy_scale
                ptx_loss = torch.zeros((), device=device)
                if ptx is not None:  # PPO-ptx (InstructGPT): a token-mean LM loss over the global ptx batch
                    ptx_loss = ptx_nll(actor, ptx_rows[s], tokenizer.pad_token_id, device, lp_chunk)
                    actor_loss = actor_loss + args.ptx_coef * ptx_loss * world * gas / ptx_tokens
                actor.backward(actor_loss)
                actor.step()
                with torch.no_grad():
                    approx_kl = 0.5 * (logp - micro_old_logp) ** 2  # k2, joschu.net/blog/kl-approx.html
                    sums.update({name: masked_sum(x, micro_mask) for name, x in (
                        ("policy_loss", pg), ("clipfrac", clipped), ("approx_kl", approx_kl), ("ratio", ratio))},
                        trained_tokens=micro_mask.sum(), ptx_loss=ptx_loss.detach())
                if critic is not None:
                    values = fwd["values"][index] if forward_once else critic(micro_seq, micro_attn)[
                        :, micro_n_prompt - 1: -1]
                    vl, value_clipped = value_loss(values, old_values[index, :width], returns[index, :width],
                                                   args.cliprange_value)
                    critic.backward(masked_sum(vl, micro_mask) * scale)
                    critic.step()
                    sums.update(value_loss=masked_sum(vl.detach(), micro_mask),
                                value_clipfrac=masked_sum(value_clipped, micro_mask))
            if ptx is not None:
                ptx_tokens_total += ptx_tokens
            if ema is not None or (args.ema and actor_stage == 3):
                update_ema(ema, actor.module, args.ema_decay, actor_stage)
        t_train = time.time()
        sums.update(kl=kl_per_response(old_logp, ref_logp, mask).sum(), entropy=masked_sum(entropy, mask))

        # 7. log (sums over all ranks, one collective), adapt the KL coefficient, evaluate, checkpoint
        total = reduce_sums(sums, device)
        n, tokens, trained = total["responses"], total["response_tokens"], total["trained_tokens"]
        var_returns, var_residual = (total[f"{x}_sq"] / tokens - (total[x] / tokens) ** 2
                                     for x in ("returns", "residual"))
        elapsed = t_train - t_start
        metrics = {
            **{f"train/{name}": total[name] / n for name in ("reward", "score", "kl")},
            "train/entropy": total["entropy"] / tokens,
            **{f"train/{name}": total[name] / trained for name in ("policy_loss", "value_loss", "clipfrac",
                                                                  "value_clipfrac", "approx_kl", "ratio")
               if name in total},  # no value_* without a critic
            **({} if critic_free else {"train/explained_variance": 1.0 - var_residual / max(var_returns, 1e-8)}),
            "train/response_len": tokens / n, "train/eos_frac": total["eos"] / n, "train/kl_coef": kl_coef,
            **({"train/ptx_loss": total["ptx_loss"] / ptx_tokens_total} if ptx is not None else {}),
            "time/generate_s": t_gen - t_start, "time/score_s": t_score - t_gen, "time/rollout_s": t_rollout - t_start,
            "time/train_s": t_train - t_rollout, "throughput/episodes_per_s": n / elapsed,
            "throughput/tokens_per_s": tokens / elapsed,
        }
        if torch.cuda.is_available():  # as DSC prints them: peak memory, and achieved TFLOP/s per GPU estimated
            # with 2 x params FLOPs per token for a forward and 6 x params for forward + backward
            scored = (n_params["ref"] + n_params["reward"] + n_params["actor"] * (not reuse_logprobs)
                      + n_params["critic"] * (not forward_once))  # the scoring forwards that ran
            flops = 2 * float(attn.sum()) * (n_params["actor"] + scored)  # generation: about one forward of the actor
            flops += 6 * float(attn.sum()) * args.ppo_epochs * (n_params["actor"] + n_params["critic"])
            metrics["throughput/tflops"] = flops / elapsed / 1e12
            metrics["memory/peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if "reward_fn" in total:
            metrics["train/reward_fn"] = total["reward_fn"] / n
        metrics["time/iteration_s"] = time.time() - t_start
        common.check_finite(metrics, iteration + 1)
        if args.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, metrics["train/kl"], args.target_kl, args.kl_horizon, int(n))
        if eval_prompt_ids and ((args.eval_every and (iteration + 1) % args.eval_every == 0)
                                or iteration + 1 == n_iters):
            metrics |= evaluate(args, iteration + 1, *eval_inputs)
        logger.log(iteration + 1, metrics, advance=1)
        if args.save_every and (iteration + 1) % args.save_every == 0 and iteration + 1 < n_iters:
            tag = f"iter{iteration + 1}"
            if critic is not None:
                common.runs.save_checkpoint(critic, str(ckpt / "critic"), tag, {})  # the actor's `latest` is written last
            common.runs.save_checkpoint(actor, str(ckpt / "actor"), tag, {"iteration": iteration + 1, "kl_coef": kl_coef,
                                                                     "ema": ema})
            common.runs.commit_args(args.output_dir)  # args.json describes the run from its first save on

    # --- save ---
    logger.close()
    common.save_hf(actor.module, tokenizer, args.output_dir, actor_stage)
    if args.save_critic:
        os.makedirs(os.path.join(args.output_dir, "critic"), exist_ok=True)
        common.save_hf(critic.module.model, tokenizer, os.path.join(args.output_dir, "critic"), critic_stage)
    if args.ema:  # rank 0's copy (no gather), staged and moved into place as the model is
        common.save_hf(actor.module, tokenizer, str(Path(args.output_dir) / "ema"), 0,
                       state_dict={k: v.to(dtype) if v.is_floating_point() else v for k, v in ema.items()})
    common.runs.commit_args(args.output_dir)
    common.print0(f"saved {args.output_dir}")

def ema_copy(model) -> dict:
    """The EMA's start: the actor's weights on CPU in fp32, whatever the model's dtype. In bf16 (8 bits of mantissa)
    most (1 - decay) * (w - ema) steps would round away and the average would lag or freeze."""
    return {k: v.float() if v.is_floating_point() else v for k, v in common.merged_state_dict(model).items()}


@torch.no_grad()
def update_ema(ema: dict | None, model, decay: float, zero_stage: int):
    """ema <- decay * ema + (1 - decay) * weights, on rank 0's CPU copy, gathered under ZeRO-3 (DSC's --enable_ema)."""
    ctx = deepspeed.zero.GatheredParameters(list(model.parameters())) if zero_stage == 3 else nullcontext()
    with ctx:
        if ema is not None:
            for k, v in common.merged_state_dict(model).items():
                ema[k].mul_(decay).add_(v.to(ema[k].dtype), alpha=1.0 - decay)


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, console_outputs=common.is_rank0()))
