"""Talk to a checkpoint, answer a file of prompts, or compare two checkpoints under a reward model.

The prompt format is the one training used (common.encode_prompt), so a checkpoint hears what it was trained on.
Evaluation does the job of DeepSpeed-Chat's prompt_eval (two models answer the same prompts, side by side) and
rw_eval (a reward model scores every answer). No DeepSpeed here: plain transformers, on a GPU when there is one.

    python chat.py --model ./ppo_ckpt                                   # interactive; /reset, /quit or Ctrl-D
    python chat.py --model ./ppo_ckpt --prompt "tell me about cats"     # one answer on stdout, nothing else
    python chat.py --model ./ppo_ckpt --prompts prompts.jsonl --output answers.jsonl
    python chat.py --model ./ppo_ckpt --compare ./sft_ckpt --reward ./reward_ckpt --prompts toy
    python chat.py --model ./sft_ckpt --prompts test.jsonl     # records with answers: BLEU and ROUGE against them
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

import common
import common.data
import common.flags
import common.refmetrics
import common.toy
from common.flags import flag


@dataclass
class Args:
    # models
    model: str = "./ppo_ckpt"
    """the causal LM to talk to: local folder or HF hub name"""
    compare: str | None = None
    """a second causal LM that answers the same prompts, shown side by side (e.g. ./sft_ckpt)"""
    reward: str | None = None
    """a reward model (reward.py's output) that scores every answer"""
    trust_remote_code: bool = False
    """allow custom model code from the hub; off unless you trust the model's authors"""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on a GPU that has it, else fp32"""
    # what to answer
    prompt: str | None = None
    """answer this one prompt and print only the answer"""
    prompts: str | None = None
    """a JSONL/JSON file of any layout (docs/data.md; its answers are BLEU/ROUGE references), or `toy` (demo eval
    prompts)"""
    data_split: str = "train"
    """split of a dataset folder or HF hub dataset that --prompts names"""
    skip_invalid: bool = False
    """drop (and count) --prompts records that do not fit a layout, instead of stopping at the first"""
    output: str | None = None
    """write one JSON line per prompt here instead of printing (never the --prompts file)"""
    system: str | None = None
    """a system message put before every conversation"""
    # sampling
    temperature: float = flag(0.7, "0 or >= 0.01")
    """sampling temperature (0 or >= 0.01; 0: greedy)"""
    top_p: float = flag(0.9, "0 < x <= 1")
    """nucleus sampling: sample from the smallest set of tokens whose probability reaches this (0 < x <= 1)"""
    max_new_tokens: int | None = flag(None, ">= 1")
    """longest answer in tokens (>= 1); default 128, or half the model's context when that is shorter than 256"""
    greedy: bool = False
    """always pick the most likely token instead of sampling"""
    seed: int = flag(0, "0 <= x <= 4294967295")
    """sampling seed (each model of a comparison starts from it) (0 <= x <= 4294967295)"""
    # context and batching
    max_context: int = flag(0, ">= 0")
    """context in tokens (>= 0; 0: the model's); older whole turns are dropped to fit"""
    batch_size: int = flag(16, ">= 1")
    """prompts per generate call (left padding) and per reward-model forward (>= 1)"""
    # launcher
    local_rank: int = -1
    """set by the deepspeed launcher; do not pass by hand"""


def check_output(args: Args):
    """--output is checked before anything is generated: its folder exists and takes files, it is not --prompts
    and not in a model's folder (an answers file named config.json would replace the model's)."""
    out = Path(os.path.expanduser(args.output))
    if str(out).startswith(("/dev/", "/proc/")) or out.exists() and not out.is_file() and not out.is_dir():
        # /dev/stdout, a FIFO: written into (write_whole)
        return
    out = out.resolve()  # a link: its target is what gets written
    if out.is_dir():
        raise common.UserError(f"--output {args.output}: is a folder; expected a file name")
    for path in common.data.input_paths(args.prompts):  # each file of --prompts a.jsonl,b.jsonl; ~ expanded
        if os.path.exists(path) and Path(path).resolve() == out.resolve():
            raise common.UserError(f"--output {args.output}: would overwrite --prompts {path}")
    for name, folder in (("--model", args.model), ("--compare", args.compare), ("--reward", args.reward)):
        if folder and os.path.isdir(folder) and Path(folder).resolve() in out.resolve().parents:
            raise common.UserError(f"--output {args.output}: is inside {name} {folder}; expected a file elsewhere")
    folder = out.parent
    if not folder.is_dir():
        raise common.UserError(f"--output {args.output}: no such folder {folder}")
    if not os.access(folder, os.W_OK):
        raise common.UserError(f"--output {args.output}: cannot write into {folder}")


def read_line(prompt: str) -> str:
    """One line typed by the user. stdin is read as UTF-8 whatever the locale; bad bytes raise a ValueError that
    says so (the line is skipped, the chat goes on)."""
    line = input(prompt)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:  # the surrogates that stand for undecodable bytes
        raise ValueError(f"(that line is not valid UTF-8 at character {e.start + 1}; it was ignored)")
    return line


def load(path: str, flag: str, args: Args, device: torch.device, reward: bool = False):
    """Tokenizer and model of a folder (a causal LM, or with `reward` a one-logit sequence classifier)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    common.check_model_path(path, flag)
    dtype = common.resolve_dtype(args.dtype)
    if dtype == torch.float16 and device.type == "cpu":
        raise common.UserError("--dtype fp16 needs a GPU (fp16 does not run on CPU); use fp32 or bf16")
    tokenizer = common.load_tokenizer(path, args.trust_remote_code)
    archs = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code).architectures or []
    if not reward and archs and all(a.endswith("ForSequenceClassification") for a in archs):
        raise common.UserError(f"{flag} {path} is a sequence classifier ({archs[0]}: a reward model or critic), not a "
                               "model that writes answers; pass it as --reward")
    cls, extra = (AutoModelForSequenceClassification, {"num_labels": 1}) if reward else (AutoModelForCausalLM, {})
    model = common.from_pretrained(cls, path, flag, dtype=dtype, trust_remote_code=args.trust_remote_code, **extra)
    if reward and not any(a.endswith("ForSequenceClassification") for a in archs):
        print(f"warning: {flag} {path} was not saved as a sequence classifier; its score head is random",
              file=sys.stderr)
    stops = getattr(model.generation_config, "eos_token_id", None) if not reward else None
    common.check_vocab(model, tokenizer, flag)
    if not reward:  # stop at the EOS, the chat template's end of turn, and a hub chat model's own stop ids
        stops = [] if stops is None else stops if isinstance(stops, list) else [stops]
        model.generation_config.eos_token_id = sorted({*common.stop_token_ids(tokenizer), *stops})
    if not reward and answer_length(model, args) != (args.max_new_tokens or 128):
        print(f"note: {flag} {path}: answers of up to {answer_length(model, args)} tokens, half its context (the "
              "default 128 would leave too little room for a prompt)", file=sys.stderr, flush=True)
    return tokenizer, model.to(device).eval()


def answer_length(model, args: Args) -> int:
    """--max_new_tokens, or the default 128 when the context leaves room for it and a prompt as long, else half the
    context (`load` says so on stderr)."""
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    context = args.max_context or getattr(model.config, "max_position_embeddings", None) or 2048
    return 128 if context >= 256 else max(1, context // 2)


def context_budget(model, args: Args) -> int:
    """Prompt tokens we can keep: the context length minus room for the answer."""
    context = args.max_context or getattr(model.config, "max_position_embeddings", None) or 2048
    new_tokens = answer_length(model, args)
    if context - new_tokens < 1:
        raise common.UserError(f"--max_new_tokens {new_tokens} leaves no room for a prompt in a context of {context} "
                               "tokens")
    return context - new_tokens


def fit_history(tokenizer, messages: list[dict], budget: int) -> list[dict]:
    """Drop the oldest exchanges (a user turn and the answer to it), whole, until the prompt fits in `budget`
    tokens; a leading system message stays, and so does the last user turn (even if it alone is too long)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while len(turns) > 1 and len(common.encode_prompt(tokenizer, system + turns)) > budget:
        turns = turns[next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), len(turns) - 1):]
    return system + turns


def generation_kwargs(args: Args, tokenizer, max_new_tokens: int) -> dict:
    """Sampling settings for generate (top_k=0: no top-k cut besides top_p); stops at EOS and the model's
    generation_config stop ids (see load)."""
    if args.greedy or args.temperature <= 0:
        kw = {"do_sample": False}
    else:
        kw = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": 0}
    return {**kw, "max_new_tokens": max_new_tokens, "pad_token_id": common.pad_id(tokenizer)}


@torch.no_grad()
def answer_batch(model, tokenizer, conversations: list[list[dict]], args: Args, device) -> list[str]:
    """Answers to many conversations: left-padded batches, KV cache, each answer decoded up to its EOS."""
    budget, answers = context_budget(model, args), []
    for i in range(0, len(conversations), args.batch_size):
        ids = [common.fit_turns(tokenizer, c, budget, lambda m: (common.encode_prompt(tokenizer, m),))[0][0]
               for c in conversations[i: i + args.batch_size]]
        input_ids = common.pad(ids, common.pad_id(tokenizer), side="left").to(device)
        attention_mask = common.pad([[1] * len(x) for x in ids], 0, side="left").to(device)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             **generation_kwargs(args, tokenizer, answer_length(model, args)))
        answers += common.decode_answers(tokenizer, out[:, input_ids.shape[1]:])
    return answers


@torch.no_grad()
def reward_scores(rm, tokenizer, conversations: list[list[dict]], answers: list[str], batch_size: int,
                  device) -> list[float]:
    """rw_eval: the reward model's raw logit at the token that ends the answer's turn, the sequence reward.py trains
    on (right padding; the last real token found from the mask)."""
    limit = getattr(rm.config, "max_position_embeddings", None) or 10**9
    rows = [common.encode_scored(tokenizer, c + [{"role": "assistant", "content": a}])[-limit:]
            for c, a in zip(conversations, answers)]
    scores = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        attention_mask = common.pad([[1] * len(r) for r in chunk], 0).to(device)
        values = common.scores(rm, common.pad(chunk, common.pad_id(tokenizer)).to(device), attention_mask)
        scores += values[torch.arange(len(chunk), device=device), attention_mask.sum(1) - 1].tolist()
    return scores


def win_rate(a_scores: list[float], b_scores: list[float]) -> float:
    """Share of prompts on which a's answer scores higher than b's; a tie counts half."""
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(a_scores, b_scores)) / len(a_scores)


def chat_loop(model, tokenizer, args: Args, device):
    """The terminal chat: answers stream as they are generated (Ctrl-C stops one); /reset clears the history;
    /quit or Ctrl-D leaves. The history is a message list, formatted by common.encode_prompt like training data."""
    from transformers import TextStreamer

    system = [{"role": "system", "content": args.system}] if args.system else []
    history, budget = [], context_budget(model, args)
    print(f"chat with {args.model}: /reset clears the history, /quit or Ctrl-D leaves", flush=True)
    while True:
        try:
            line = read_line("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        except ValueError as e:
            print(e, file=sys.stderr, flush=True)
            continue
        if line == "/quit":
            return
        if line == "/reset":
            history = []
            print("(history cleared)", flush=True)
            continue
        if not line:
            continue
        messages = fit_history(tokenizer, system + history + [{"role": "user", "content": line}], budget)
        if len(messages) < len(system) + len(history) + 1:
            print(f"(dropped the oldest turns to fit {budget} tokens)", file=sys.stderr, flush=True)
        history = messages[len(system):]
        ids = common.encode_prompt(tokenizer, messages)
        if len(ids) > budget:
            print(f"(message too long: keeping its last {budget} tokens)", file=sys.stderr, flush=True)
            ids = common.cut_tokens(tokenizer, (ids,), budget)[0]  # (its BOS kept)
        print("bot> ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            with torch.no_grad():
                out = model.generate(input_ids=torch.tensor([ids], device=device), streamer=streamer,
                                     attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                     **generation_kwargs(args, tokenizer, answer_length(model, args)))
        except KeyboardInterrupt:  # Ctrl-C stops this answer; the question leaves the history with it
            print("\n(interrupted)", flush=True)
            history.pop()
            continue
        answer = common.decode_answers(tokenizer, out[:, len(ids):])[0]
        history.append({"role": "assistant", "content": answer})


def main(args: Args):
    # --- setup: silence loaders, so that stdout holds only what was asked for ---
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.prompt is not None and args.prompts is not None:
        raise common.UserError("pass --prompt or --prompts, not both")
    if args.output and args.prompt is None and args.prompts is None:
        raise common.UserError("--output needs --prompt or --prompts (the interactive chat writes no file)")
    common.flags.check(args)
    if args.output:
        check_output(args)
    for name, text in (("--prompt", args.prompt), ("--system", args.system)):
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError:
            raise common.UserError(f"{name} is not valid UTF-8")
    # stdin as UTF-8 whatever the locale; undecodable bytes become surrogates that read_line reports
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(encoding="utf-8", errors="surrogateescape")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    common.seed_everything(args.seed)
    system = [{"role": "system", "content": args.system}] if args.system else []

    # --- interactive chat, or one answer and nothing else ---
    if args.prompt is None and args.prompts is None:
        tokenizer, model = load(args.model, "--model", args, device)
        chat_loop(model, tokenizer, args, device)
        return
    if args.prompt is not None and not (args.compare or args.reward or args.output):
        tokenizer, model = load(args.model, "--model", args, device)
        print(answer_batch(model, tokenizer, [system + common.to_messages(args.prompt)], args, device)[0])
        return

    # --- prompts ---
    if args.prompts is None:
        records = [{"prompt": common.to_messages(args.prompt)}]
    elif args.prompts == "toy":
        records = common.data.load_data("toy", "prompts", split="eval")  # the demo's held-out prompts, each once
    else:
        records = common.data.load_data(args.prompts, "prompts", args.data_split, args.skip_invalid)
        records = common.data.encode_records(  # text already in the model's markup read as turns, or refused
            records, lambda r, where: r, args.prompts, args.skip_invalid, common.load_tokenizer(args.model,
                                                                                                args.trust_remote_code))
    conversations = [system + r["prompt"] for r in records]
    refs = [getattr(r, "reference", None) for r in records]  # a record's answer (common.data.Record)
    if any(r is not None for r in refs) and (why := common.refmetrics.missing()):
        print(f"note: answers not scored against the references of --prompts: {why}", file=sys.stderr, flush=True)
        refs = [None] * len(records)
    rows = [{"prompt": r["prompt"][0]["content"] if len(r["prompt"]) == 1 else r["prompt"]} for r in records]
    models = {"": args.model, "_compare": args.compare} if args.compare else {"": args.model}

    # --- answers: one model in memory at a time, each from the same seed (prompt_eval) ---
    for suffix, path in models.items():
        common.seed_everything(args.seed)
        tokenizer, model = load(path, "--compare" if suffix else "--model", args, device)
        for row, answer in zip(rows, answer_batch(model, tokenizer, conversations, args, device)):
            row["response" + suffix] = answer
        del model

    # --- scores: the reward model's (rw_eval), and on the demo the hidden human's gold_score ---
    norm = None
    if args.reward:
        tokenizer, rm = load(args.reward, "--reward", args, device, reward=True)
        norm = [getattr(rm.config, k, None) for k in ("reward_mean", "reward_std")]
        for suffix in models:
            answers = [row["response" + suffix] for row in rows]
            for row, s in zip(rows, reward_scores(rm, tokenizer, conversations, answers, args.batch_size, device)):
                row["reward" + suffix] = s
        del rm
    if args.prompts == "toy":
        for row, c in zip(rows, conversations):
            for suffix in models:
                row["gold" + suffix] = common.toy.gold_score(c[-1]["content"], row["response" + suffix])

    # --- reference metrics: each answer against its record's reference (BLEU, ROUGE-1/2/L F1; common.refmetrics) ---
    with_ref, table = [(row, ref) for row, ref in zip(rows, refs) if ref is not None], {}
    for suffix in models if with_ref else ():
        answers, references = [row["response" + suffix] for row, _ in with_ref], [ref for _, ref in with_ref]
        for (row, ref), s in zip(with_ref, common.refmetrics.answer_scores(answers, references)):
            row.update({"reference": ref} | {k + suffix: v for k, v in s.items()})
        table[suffix] = common.refmetrics.corpus_scores(answers, references)

    # --- output: a JSONL file, or the answers side by side ---
    width = max(len(p) for p in models.values())
    if args.output:  # written whole, then renamed into place
        common.write_whole(os.path.expanduser(args.output), "".join(json.dumps(row) + "\n" for row in rows))
    else:
        for n, (row, c) in enumerate(zip(rows, conversations), 1):
            print(f"[{n}] {c[-1]['content']}")
            if "reference" in row:
                print(f"  {'(reference)':<{width}}  {row['reference']}")
            for suffix, path in models.items():
                scores = ", ".join(f"{k} {row[k + suffix]:.3f}" for k in ("reward", "gold", "rougeL")
                                   if k + suffix in row)
                print(f"  {path:<{width}}  {row['response' + suffix]}" + (f"   ({scores})" if scores else ""))

    # --- summary: mean scores, and the win rate of --model over --compare (ties count half) ---
    scored = [k for k in ("reward", "gold") if k in rows[0]]
    for k in scored:
        means = ", ".join(f"{p} {sum(r[k + s] for r in rows) / len(rows):.3f}" for s, p in models.items())
        if k == "reward" and None not in norm:  # the win rate does not depend on this affine map
            means += f" (raw; the reward model's config normalises with mean {norm[0]:.3f}, std {norm[1]:.3f})"
        print(f"mean {k}: {means}")
    if args.compare and scored:
        rates = [f"{k} {win_rate([r[k] for r in rows], [r[k + '_compare'] for r in rows]):.2f}" for k in scored]
        rates[0] += f" (n={len(rows)})"
        print(f"win rate of {args.model} over {args.compare}: " + ", ".join(rates))
    if table:
        print(f"against the references of {len(with_ref)} prompts (corpus BLEU 0-100, mean ROUGE F1 0-1, stemmed):")
        print(f"  {'':<{width}}  " + "  ".join(f"{k:>7}" for k in common.refmetrics.NAMES))
        for suffix, path in models.items():
            print(f"  {path:<{width}}  " + "  ".join(f"{table[suffix][k]:7.3f}" for k in common.refmetrics.NAMES))


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
