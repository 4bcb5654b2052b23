"""Sampling for ppo.py: HF generate() for the one case PPO needs (docs/ppo.md, "Sampling"), and the actor made ready
for it under ZeRO-3 (its parameters gathered once for all the generate calls, not once per token)."""

import inspect
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F

import common

TORCH_LINEAR = F.linear  # before any ZeRO-3 engine replaces it (see generation_mode)


@contextmanager
def generation_mode(engine, zero_stage: int, sharded: bool):
    """The actor in eval mode; yields its sample function. Under ZeRO-3 the parameters are gathered once for every
    call inside, with the partition hooks off (TRL's unwrap-for-generation); --generate_sharded keeps the hooks."""
    engine.module.eval()
    zero3_linear = F.linear
    try:
        if zero_stage == 3 and not sharded:
            from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

            # ZeRO-3 replaces F.linear process-wide by a memory-saving autograd Function; generation has no backward
            F.linear = TORCH_LINEAR
            with unwrap_model_for_generation(engine):
                yield partial(sample, engine.module)
        else:  # with --generate_sharded, ZeRO-3's hooks gather each layer inside the forward
            yield partial(sample, engine.module, inference_mode=zero_stage < 3)
    finally:
        F.linear = zero3_linear
        engine.module.train()


def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation_config, synced_gpus: bool = False,
           inference_mode: bool = True):
    """Sample (or decode greedily) from left-padded prompts with the KV cache, positions from the attention mask, until
    every row (with `synced_gpus`, every rank's) has ended; nothing is read from the model's own generation_config.
    A token is argmax(p / E), E ~ Exp(1): torch.multinomial's draw. Returns prompt + response ids, pad after EOS."""
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


def generation_config(args, tokenizer, greedy: bool = False):
    """Every field that changes sampling is set here, so nothing from the model's own generation_config (a
    repetition penalty, a top_p) slips in: samples must come from the policy whose ratio PPO computes."""
    from transformers import GenerationConfig

    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=args.temperature)
    return GenerationConfig(**sampling, top_k=0, top_p=1.0, min_p=None, typical_p=1.0, repetition_penalty=1.0,
                            no_repeat_ngram_size=0, num_beams=1, min_new_tokens=0,
                            max_new_tokens=args.max_new_tokens, eos_token_id=common.stop_token_ids(tokenizer),
                            pad_token_id=common.pad_id(tokenizer), use_cache=True)
