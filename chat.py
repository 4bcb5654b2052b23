"""Talk to a checkpoint, answer a file of prompts, or compare two checkpoints under a reward model.

The prompt format is the one training used (common.encode_prompt), so a checkpoint hears what it was trained on.
Evaluation does the job of DeepSpeed-Chat's prompt_eval (two models side by side) and rw_eval (reward scores).

    python chat.py --model ./ppo_ckpt                                   # interactive; /reset, /quit or Ctrl-D
    python chat.py --model ./ppo_ckpt --prompt "tell me about cats"     # one answer on stdout, nothing else
    python chat.py --model ./ppo_ckpt --prompts prompts.jsonl --output answers.jsonl
    python chat.py --model ./ppo_ckpt --compare ./sft_ckpt --reward ./reward_ckpt --prompts toy
"""

import json
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

import common


@dataclass
class Args:
    # models
    model: str = "./ppo_ckpt"
    """the causal LM to talk to: HF hub name or local folder"""
    compare: str | None = None
    """a second causal LM that answers the same prompts, side by side (e.g. ./sft_ckpt)"""
    reward: str | None = None
    """a reward model (reward.py's output) that scores every answer"""
    trust_remote_code: bool = False
    """allow custom model code from the hub"""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on a GPU that has it, else fp32"""
    # what to answer
    prompt: str | None = None
    """answer this one prompt and print only the answer"""
    prompts: str | None = None
    """JSONL prompts ({"prompt"} or {"messages"}), or `toy` for the demo's held-out prompts"""
    output: str | None = None
    """with --prompts: write one JSON line per prompt here ({"prompt", "response", ...})"""
    system: str | None = None
    """an optional system message put before the conversation"""
    # sampling
    temperature: float = 0.7
    """sampling temperature"""
    top_p: float = 0.9
    """nucleus sampling"""
    max_new_tokens: int = 128
    """longest answer"""
    greedy: bool = False
    """pick the most likely token instead of sampling"""
    batch_size: int = 16
    """prompts per generate call with --prompts"""
    max_context: int = 0
    """tokens of history kept (oldest whole turns are dropped first); 0: the model's context length"""
    seed: int = 0
    """sampling seed"""
    # launcher
    local_rank: int = -1
    """set by the deepspeed launcher; do not pass by hand"""


def load(path: str, args: Args, device, flag: str):
    from transformers import AutoModelForCausalLM

    common.check_model_path(path, flag)
    tokenizer = common.load_tokenizer(path, args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=common.resolve_dtype(args.dtype),
                                                 trust_remote_code=args.trust_remote_code)
    common.resize_for_tokenizer(model, tokenizer)
    return tokenizer, model.to(device).eval()


def context_budget(model, args: Args) -> int:
    n = args.max_context or getattr(model.config, "max_position_embeddings", 2048)
    return max(8, n - args.max_new_tokens)


def fit_history(tokenizer, messages: list[dict], budget: int) -> list[dict]:
    """Drop the oldest whole exchanges (a user turn and the answer to it) until the prompt fits in `budget` tokens,
    never cutting a turn in half; a system message stays. The last user turn is always kept."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while len(turns) > 1 and len(common.encode_prompt(tokenizer, system + turns)) > budget:
        cut = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), len(turns) - 1)
        turns = turns[cut:]
    return system + turns


def sampling(args: Args, tokenizer) -> dict:
    kw = dict(do_sample=False) if args.greedy else dict(do_sample=True, temperature=args.temperature, top_p=args.top_p,
                                                        top_k=0)
    return dict(**kw, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


@torch.no_grad()
def answer_batch(model, tokenizer, conversations: list[list[dict]], args: Args, device) -> list[str]:
    """Answers for many conversations: left-padded batches, KV cache, each row cut at its EOS."""
    out = []
    budget = context_budget(model, args)
    for i in range(0, len(conversations), args.batch_size):
        ids = [common.truncate_left(common.encode_prompt(tokenizer, fit_history(tokenizer, c, budget)), budget)[0]
               for c in conversations[i: i + args.batch_size]]
        batch = common.pad(ids, tokenizer.pad_token_id, side="left").to(device)
        attn = common.pad([[1] * len(x) for x in ids], 0, side="left").to(device)
        gen = model.generate(input_ids=batch, attention_mask=attn, **sampling(args, tokenizer))
        out += tokenizer.batch_decode(gen[:, batch.shape[1]:], skip_special_tokens=True)
    return [o.strip() for o in out]


@torch.no_grad()
def reward_scores(path: str, args: Args, conversations: list[list[dict]], answers: list[str], device) -> list[float]:
    """Raw reward-model scores of prompt + answer + EOS, read at the last real token (right padding)."""
    from transformers import AutoModelForSequenceClassification

    common.check_model_path(path, "--reward")
    tok = common.load_tokenizer(path, args.trust_remote_code)
    rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=common.resolve_dtype(args.dtype),
                                                            trust_remote_code=args.trust_remote_code)
    common.resize_for_tokenizer(rm, tok)
    rm = rm.to(device).eval()
    rows = [common.encode_prompt(tok, c) + tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for c, a in zip(conversations, answers)]
    scores = []
    for i in range(0, len(rows), args.batch_size):
        chunk = rows[i: i + args.batch_size]
        attn = common.pad([[1] * len(r) for r in chunk], 0).to(device)
        logits = rm(input_ids=common.pad(chunk, tok.pad_token_id).to(device), attention_mask=attn,
                    position_ids=common.position_ids(attn)).logits
        scores += logits[:, 0].float().tolist()
    return scores


def win_rate(a: list[float], b: list[float]) -> float:
    """Share of prompts where a beats b; a tie counts half."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


def interactive(model, tokenizer, args: Args, device):
    """A terminal chat: the answer streams as it is generated; /reset clears the history, /quit or Ctrl-D leaves."""
    from transformers import TextStreamer

    history = [{"role": "system", "content": args.system}] if args.system else []
    budget = context_budget(model, args)
    print("chat with", args.model, "- /reset clears the history, /quit leaves", flush=True)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            break
        if line == "/quit":
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            print("(history cleared)", flush=True)
            continue
        if not line:
            continue
        history = fit_history(tokenizer, history + [{"role": "user", "content": line}], budget)
        ids = common.truncate_left(common.encode_prompt(tokenizer, history), budget)[0]
        print("bot> ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.no_grad():
            gen = model.generate(input_ids=torch.tensor([ids], device=device), streamer=streamer,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                 **sampling(args, tokenizer))
        answer = tokenizer.decode(gen[0, len(ids):], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": answer})


def main(args: Args):
    # --- setup: quiet loaders, so that stdout holds only what the user asked for ---
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, model = load(args.model, args, device, "--model")
    system = [{"role": "system", "content": args.system}] if args.system else []

    # --- one prompt: the answer and nothing else ---
    if args.prompt is not None and args.compare is None and args.reward is None:
        print(answer_batch(model, tokenizer, [system + common.to_messages(args.prompt)], args, device)[0])
        return
    if args.prompt is None and args.prompts is None:
        interactive(model, tokenizer, args, device)
        return

    # --- a batch of prompts: answers, side by side with --compare, scored with --reward ---
    if args.prompts == "toy":
        records = common.load_data("toy", "prompts", split="eval")
    elif args.prompts is not None:
        records = common.load_data(args.prompts, "prompts")
    else:
        records = [{"prompt": common.to_messages(args.prompt)}]
    conversations = [system + r["prompt"] for r in records]
    rows = [{"prompt": r["prompt"][0]["content"] if len(r["prompt"]) == 1 else r["prompt"]} for r in records]
    for row, a in zip(rows, answer_batch(model, tokenizer, conversations, args, device)):
        row["response"] = a
    if args.compare:
        torch.manual_seed(args.seed)
        tok2, model2 = load(args.compare, args, device, "--compare")
        for row, a in zip(rows, answer_batch(model2, tok2, conversations, args, device)):
            row["response_compare"] = a
        del model2
    if args.reward:
        for key in ["response"] + (["response_compare"] if args.compare else []):
            scores = reward_scores(args.reward, args, conversations, [r[key] for r in rows], device)
            for row, s in zip(rows, scores):
                row["reward" + key[len("response"):]] = s
    if args.prompts == "toy":  # the demo's hidden human
        for row, r in zip(rows, records):
            for key in ["response"] + (["response_compare"] if args.compare else []):
                row["gold" + key[len("response"):]] = common.gold_score(r["prompt"][-1]["content"], row[key])
    if args.output:
        with open(args.output, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    else:
        for row in rows:
            extra = " ".join(f"{k}={v:.3f}" for k, v in row.items() if k.startswith(("reward", "gold")))
            print(f"> {row['prompt']}\n  {args.model}: {row['response']}")
            if args.compare:
                print(f"  {args.compare}: {row['response_compare']}")
            if extra:
                print(f"  {extra}")
    summary = []
    for key in ("reward", "gold"):
        if key in rows[0]:
            mine = [r[key] for r in rows]
            line = f"mean {key} of {args.model}: {sum(mine) / len(mine):.3f}"
            if args.compare:
                theirs = [r[key + "_compare"] for r in rows]
                line += f"; of {args.compare}: {sum(theirs) / len(theirs):.3f}; win rate {win_rate(mine, theirs):.3f}"
            summary.append(line + f" (n={len(rows)})")
    for line in summary:
        print(line)


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
