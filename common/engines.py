"""ppo.py's four models as DeepSpeed engines: the value model around a sequence classifier (critic and reward model),
its loading, the trained and the frozen engines, the actor's EMA, and their checkpoints: resume and the final save."""

from contextlib import nullcontext
from pathlib import Path

import deepspeed
import torch
import torch.nn.functional as F

import common
import common.runs


class Float32Linear(torch.nn.Linear):
    """A linear layer that computes in fp32 whatever the dtype of its weights and input."""

    def forward(self, x):
        return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())


class ValueModel(torch.nn.Module):
    """A sequence classifier's head at every position: the critic's values; the reward model's score at the end."""

    def __init__(self, model):
        super().__init__()
        self.model = model  # kept whole (peft wrapper included) so that it saves as it loaded
        for name, m in model.named_modules():  # the head computes in fp32 on a bf16/fp16 body (weights stay as
            if type(m) is torch.nn.Linear and "score" in name.split("."):  # they are: ZeRO-3 wants one dtype)
                m.__class__ = Float32Linear

    def forward(self, input_ids, attention_mask):
        return common.scores(self.model, input_ids, attention_mask)


def load_value_model(name: str, dtype, tokenizer, trust_remote_code: bool, flag: str, new_head: bool = False):
    """A one-logit sequence classifier; a causal LM (whose score head would be random) only with `new_head`."""
    from transformers import AutoModelForSequenceClassification

    common.check_model_path(name, flag)
    model = common.from_pretrained(AutoModelForSequenceClassification, name, flag, num_labels=1, dtype=dtype,
                                   trust_remote_code=trust_remote_code)
    if not new_head and not any(a.endswith("ForSequenceClassification") for a in model.config.architectures or []):
        raise common.UserError(f"{flag} {name}: not a sequence classifier (its score head would be random); train "
                               "one with reward.py, or pass --new_value_head to start from a new head")
    common.check_vocab(model, tokenizer, flag)
    common.disable_dropout(model)
    return model.to(dtype)


def frozen_engine(model, zero_stage: int, offload: bool, dtype):
    """A forward-only DeepSpeed engine (sharded under ZeRO-3, as DSC's reference and reward models are)."""
    model.eval().requires_grad_(False)
    config = common.ds_config(3 if zero_stage == 3 else 0, 1, 1, dtype, offload_params=offload)
    return deepspeed.initialize(model=model, config=config)[0]


def trained_engine(model, lr: float, args, zero_stage: int, micro: int, gas: int, total_steps: int, dtype):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=args.weight_decay,
                                  fused=True)  # one kernel for all tensors (CPU and GPU), not a loop over them
    schedule = common.lr_lambda(args.lr_scheduler, int(args.warmup_ratio * total_steps), total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    config = common.ds_config(zero_stage, micro, gas, dtype, args.offload, args.grad_clip)
    return deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)[0]


def ema_copy(model) -> dict:
    """The EMA's start: the actor's weights on CPU in fp32 (in bf16 most EMA steps would round away)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in common.merged_state_dict(model).items()}


@torch.no_grad()
def update_ema(ema: dict | None, model, decay: float, zero_stage: int):
    """ema <- decay * ema + (1 - decay) * weights, on rank 0's CPU copy, gathered under ZeRO-3 (DSC's --enable_ema)."""
    ctx = deepspeed.zero.GatheredParameters(list(model.parameters())) if zero_stage == 3 else nullcontext()
    with ctx:
        if ema is not None:
            for k, v in common.merged_state_dict(model).items():
                ema[k].mul_(decay).add_(v.to(ema[k].dtype), alpha=1.0 - decay)



def load_models(args, tokenizer, reward_tok, *, dtype, actor_stage: int, critic_stage: int, micro: int, gas: int,
                total_steps: int, actor_lr: float, critic_lr: float):
    """The engines (actor, critic, ref, reward; None where absent), the reward normalisation, the EMA's start, the
    parameter counts (printed)."""
    no_rm, same_tok = args.reward == "none", reward_tok.get_vocab() == tokenizer.get_vocab()
    actor = common.load_causal_lm(args.actor, dtype, tokenizer, args.trust_remote_code, "--actor")
    common.disable_dropout(actor)
    actor = common.with_lora(actor, args.lora_rank, args.lora_alpha, "CAUSAL_LM")
    ref = None
    if args.lora_rank == 0 or args.ref not in (None, args.actor):
        ref = common.load_causal_lm(args.ref or args.actor, dtype, tokenizer, args.trust_remote_code, "--ref")
        common.disable_dropout(ref)
    reward = None if no_rm else load_value_model(args.reward, dtype, reward_tok, args.trust_remote_code, "--reward",
                                                 args.new_value_head)
    config = reward.config if reward is not None and args.normalize_reward else None
    norm = (getattr(config, "reward_mean", 0.0), getattr(config, "reward_std", 1.0))
    critic_path = args.critic or (args.reward if same_tok and not no_rm else args.actor)
    critic = None if args.advantage_estimator != "gae" else common.with_lora(load_value_model(
        critic_path, dtype, tokenizer, args.trust_remote_code, "--critic", args.new_value_head or
        critic_path == args.actor), args.critic_lora_rank, args.lora_alpha, "SEQ_CLS")
    for m in (actor, critic) if args.gradient_checkpointing else ():
        if m is not None:
            m.gradient_checkpointing_enable()
            if hasattr(m, "enable_input_require_grads"):
                m.enable_input_require_grads()
    ema = ema_copy(actor) if args.ema and common.is_rank0() else None
    actor = trained_engine(actor, actor_lr, args, actor_stage, micro, gas, total_steps, dtype)
    if critic is not None:
        critic = trained_engine(ValueModel(critic), critic_lr, args, critic_stage, micro, gas, total_steps, dtype)
    ref = None if ref is None else frozen_engine(ref, actor_stage, args.offload_reference, dtype)
    reward = None if reward is None else frozen_engine(ValueModel(reward), critic_stage, args.offload_reference, dtype)
    n_params = {name: sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters()) if m is not None else 0
                for name, m in (("actor", actor), ("critic", critic), ("reward", reward), ("ref", ref or actor))}
    free = " (critic-free)" * (args.advantage_estimator != "gae")
    common.print0(f"parameters (ZeRO-3 partitions counted whole): {n_params}{free}")
    return actor, critic, ref, reward, norm, ema, n_params


def gpu_metrics(n_params: dict, seq_tokens, ppo_epochs: int, forward_once: bool, elapsed: float) -> dict:
    """On a GPU, as DSC prints them: peak memory, and TFLOP/s per GPU from 2 x params FLOPs per token for a forward,
    6 x params for forward + backward; generation about one forward of the actor."""
    if not torch.cuda.is_available():
        return {}
    scored = n_params["ref"] + n_params["reward"] + (n_params["actor"] + n_params["critic"]) * (not forward_once)
    flops = 2 * float(seq_tokens) * (n_params["actor"] + scored)
    flops += 6 * float(seq_tokens) * ppo_epochs * (n_params["actor"] + n_params["critic"])
    return {"throughput/tflops": flops / elapsed / 1e12, "memory/peak_gb": torch.cuda.max_memory_allocated() / 2**30}


def resume(args, tag: str, *, actor, critic, actor_lr: float, critic_lr: float) -> tuple[int, float, dict]:
    """Load checkpoint `tag` of actor and critic: (the iteration to start at, the KL coefficient, the EMA)."""
    ckpt, changed = Path(args.output_dir) / "checkpoints", set(args.resume_changes)
    decay = args.weight_decay if "weight_decay" in changed else None
    if critic is not None:
        common.runs.load_checkpoint(critic, str(ckpt / "critic"), tag,
                                    critic_lr if "critic_learning_rate" in changed else None, decay)
    state = common.runs.load_checkpoint(actor, str(ckpt / "actor"), tag,
                                        actor_lr if "learning_rate" in changed else None, decay)
    kl_coef = state["kl_coef"] if args.adaptive_kl and "kl_coef" not in changed else args.kl_coef
    ema = None
    if args.ema and common.is_rank0():  # fp32 (a checkpoint from before the fp32 copy has the model's dtype)
        ema = {k: v.float() if v.is_floating_point() else v for k, v in state["ema"].items()}
    common.print0(f"resumed from {ckpt}/*/{tag} at iteration {state['iteration']}")
    common.runs.truncate_log(args.output_dir, state["iteration"])  # drop rows logged after the checkpoint
    return state["iteration"], kl_coef, ema


def save_checkpoint(args, iteration: int, *, actor, critic, kl_coef: float, ema: dict | None):
    """Resumable checkpoints of critic and actor after `iteration` (the actor's `latest` is written last)."""
    ckpt, tag = Path(args.output_dir) / "checkpoints", f"iter{iteration}"
    if critic is not None:
        common.runs.save_checkpoint(critic, str(ckpt / "critic"), tag, {})
    common.runs.save_checkpoint(actor, str(ckpt / "actor"), tag,
                                {"iteration": iteration, "kl_coef": kl_coef, "ema": ema})
    common.runs.commit_args(args.output_dir)  # args.json describes the run from its first save on


def save(args, *, actor, critic, ema: dict | None, tokenizer, dtype, actor_stage: int, critic_stage: int):
    """The actor (--save_critic: the critic, --ema: the average) as HF folders; then args.json is the run's."""
    common.save_hf(actor.module, tokenizer, args.output_dir, actor_stage)
    if args.save_critic:
        common.save_hf(critic.module.model, tokenizer, str(Path(args.output_dir) / "critic"), critic_stage)
    if args.ema:  # rank 0's copy (no gather), staged and moved into place as the model is
        common.save_hf(actor.module, tokenizer, str(Path(args.output_dir) / "ema"), 0,
                       state_dict={k: v.to(dtype) if v.is_floating_point() else v for k, v in ema.items()})
    common.runs.commit_args(args.output_dir, finished=True)
    common.print0(f"saved {args.output_dir}")
