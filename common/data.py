"""Data: JSONL/JSON files, `datasets` folders and hub names read into canonical records, one layout per record
(docs/data.md); a record that fits none is a one-line error naming its file, line and fields."""

import json
import math
import os
import random
import re
import socket
from pathlib import Path

import common
from common import UserError, toy

# ----------------------------------------------------------------------------------------------------------------
# data


def _read_rows(path: str):
    """(where, object or error message) for each record of a JSONL file or a JSON array file, `where` being
    `file:line`. A record that is not a JSON object comes back as its error message (see load_data)."""
    raw, rows = Path(path).read_bytes(), 0
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # the UTF-8 byte-order mark some Windows editors write first
    if raw.lstrip().startswith(b"["):  # a JSON array; line numbers from the decoder's offsets
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{raw.count(10, 0, e.start) + 1}: not valid UTF-8; expected UTF-8 JSON")
        dec, skip, i, last, line = json.JSONDecoder(), re.compile(r"[\s,]*"), text.index("[") + 1, 0, 1
        while (i := skip.match(text, i).end()) < len(text) and text[i] != "]":
            line, last = line + text.count("\n", last, i), i
            try:
                obj, i = dec.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})")
            rows += 1
            not_object = f"expected a JSON object, got {type(obj).__name__}"
            yield f"{path}:{line}", obj if isinstance(obj, dict) else not_object
        if i >= len(text) or text[i + 1:].strip():  # cut short, or something after the array
            why = "no closing ]" if i >= len(text) else "text after its closing ]"
            raise UserError(f"{path}:{text.count(chr(10), 0, i) + 1}: malformed JSON array ({why})")
    else:
        for n, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            rows += 1
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield f"{path}:{n}", f"not valid UTF-8 (byte {e.start}); expected UTF-8 JSON"
                continue
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", f"malformed JSON ({e.msg} at column {e.colno}); expected one object a line"
                continue
            yield f"{path}:{n}", obj if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"
    if not rows:
        raise UserError(f"{path}: the data file is empty; expected one JSON object a line, or a JSON array")


def _check_text(where: str, obj: dict, field: str):
    v = obj.get(field)
    if field not in obj:
        raise UserError(f"{where}: field '{field}' is missing; expected a non-empty string")
    if isinstance(v, list):
        _check_messages(where, v, field)
    elif not isinstance(v, str) or not v.strip():
        raise UserError(f"{where}: field '{field}' must be a non-empty string, got {json.dumps(v)[:40]}")


MESSAGE_KEYS = ("role", "content", "weight")  # weight: OpenAI's fine-tuning format, 0 or 1 on an assistant message


def _check_messages(where: str, msgs, field: str = "messages"):
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: field '{field}' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(msgs):
        ok = isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
        if not ok or not isinstance(m.get("content"), str) or not m["content"].strip():
            raise UserError(f"{where}: field '{field}[{j}]' must be {{\"role\": system|user|assistant, "
                            f"\"content\": non-empty string}}")
        other = [k for k, v in m.items() if k not in MESSAGE_KEYS and v is not None]
        if other:
            raise UserError(f"{where}: field '{field}[{j}]' has {other}, which would change the message unread; "
                            f"expected only {list(MESSAGE_KEYS)} (remove or convert them)")
        if m.get("weight") is not None and (field != "messages" or m["role"] != "assistant"
                                            or m["weight"] not in (0, 1) or type(m["weight"]) is not int):
            raise UserError(f"{where}: field '{field}[{j}]' has weight {json.dumps(m['weight'])}; expected 0 or 1, "
                            "on an assistant message of 'messages' (OpenAI's fine-tuning format)")


_HH_TURN = re.compile(r"(?:^\s*|\n\n)(Human|Assistant):")


def turns(where: str, obj: dict, field: str, role: str = "user") -> list[dict]:
    """A field as a message list: a list of {role, content} as it is (an assistant message's `weight: 0` kept); a
    string written as DeepSpeed-Chat / HH-RLHF turns ("\\n\\nHuman: ...\\n\\nAssistant: ...") parsed into them (a
    last empty "Assistant:" is the place where the answer goes, and is dropped); any other string is one message of
    `role`. Strings lose the white space around them (the space of Dahoas' " The answer" after "Assistant:" is the
    format's, not the answer's)."""
    _check_text(where, obj, field)
    v = obj[field]
    if isinstance(v, list):
        return [{"role": m["role"], "content": m["content"], **({"weight": 0} if m.get("weight") == 0 else {})}
                for m in v]
    hh = v.replace("\r\n", "\n")  # (a file written on Windows)
    if not re.match(r"\s*Human:", hh):  # HH's form starts with a Human turn; a prompt may end before "Assistant:"
        return [{"role": role, "content": v.strip()}]
    parts = _HH_TURN.split(hh)
    out = [{"role": "user" if r == "Human" else "assistant", "content": c.strip()}
           for r, c in zip(parts[1::2], parts[2::2])]
    if out[-1]["role"] == "assistant" and not out[-1]["content"]:
        out.pop()
    _check_messages(where, out, field)
    return out


def _answer(where: str, prompt: list[dict], side: list[dict], field: str) -> list[dict]:
    """The answer turns of one side: a side that repeats the prompt's turns first (UltraFeedback) is cut to what
    follows them (white space around a content aside: a prompt string loses it, a message list keeps it); it must
    then start and end with an assistant turn."""
    def bare(turns):
        return [(m["role"], m["content"].strip()) for m in turns]

    if bare(side[: len(prompt)]) == bare(prompt):
        side = side[len(prompt):]
    if not side or side[-1]["role"] != "assistant":
        raise UserError(f"{where}: field '{field}' must end with an assistant turn")
    if side[0]["role"] != "assistant":
        raise UserError(f"{where}: field '{field}' starts with turns that are not the prompt's; expected the answer, "
                        "or the prompt's turns followed by the answer")
    return side


def _split_shared(where: str, obj: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """HH-RLHF pairs without a prompt: the turns both sides share, up to the last user turn, are the prompt."""
    chosen, rejected = turns(where, obj, "chosen"), turns(where, obj, "rejected")
    n = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    while n and chosen[n - 1]["role"] != "user":
        n -= 1
    if not n:
        raise UserError(f"{where}: no 'prompt' field and 'chosen' and 'rejected' share no leading user turn; expected "
                        "a prompt, or both sides written as the same conversation with different answers")
    return chosen[:n], _answer(where, chosen[:n], chosen[n:], "chosen"), _answer(where, [], rejected[n:], "rejected")


SYSTEM_FIELDS = ("system", "system_prompt")  # a record's system message beside its layout (Orca's, OpenOrca's)


def _with_system(where: str, obj: dict, msgs: list[dict]) -> list[dict]:
    """A conversation with the record's `system` (or `system_prompt`) field, a string, as its first message; an empty
    one adds none, and one the conversation already starts with is not written twice."""
    field = next((f for f in SYSTEM_FIELDS if f in obj), None)
    if field is None:
        return msgs
    if not isinstance(obj[field], str):
        raise UserError(f"{where}: field '{field}' must be a string (the conversation's system message)")
    system = obj[field].strip()
    if not system:
        return msgs
    if msgs and msgs[0]["role"] == "system":
        if msgs[0]["content"].strip() == system:
            return msgs
        raise UserError(f"{where}: field '{field}' and the conversation's own system message differ; expected one "
                        "system message")
    return [{"role": "system", "content": system}] + msgs


# The layouts (docs/data.md): name -> (its fields, the prompt's field, the answer SFT trains, the pair's sides).
# A record is read as the one layout whose fields it has, every other field it carries that any layout (or a
# popular set we do not read, FOREIGN) gives a meaning being a `system`/`system_prompt` or, on a pair, `margin`.
LAYOUTS = {
    "text (TRL language modeling)": (("text",), None, None, None),
    "messages (TRL conversational language modeling, OpenAI fine-tuning)": (("messages",), "messages", "messages",
                                                                             None),
    "prompt-only (TRL)": (("prompt",), "prompt", None, None),
    "prompt-completion (TRL)": (("prompt", "completion"), "prompt", "completion", None),
    "prompt-response (TL;DR, DeepSpeed-Chat)": (("prompt", "response"), "prompt", "response", None),
    "preference (TRL, explicit prompt)": (("prompt", "chosen", "rejected"), "prompt", "chosen", "pair"),
    "preference (TRL implicit prompt, Anthropic HH-RLHF)": (("chosen", "rejected"), "chosen", "chosen", "pair"),
    "unpaired preference (TRL, KTO)": (("prompt", "completion", "label"), "prompt", "completion", None),
    "rm-static (DeepSpeed-Chat, Dahoas)": (("prompt", "response", "chosen", "rejected"), "prompt", "response",
                                           "pair"),
    "UltraFeedback binarized": (("prompt", "messages", "chosen", "rejected"), "prompt", "messages", "pair"),
    "Intel/orca_dpo_pairs": (("question", "chosen", "rejected"), "question", "chosen", "pair"),
    "orca_dpo_pairs with input (argilla)": (("input", "chosen", "rejected"), "input", "chosen", "pair"),
    "OpenOrca": (("question", "response"), "question", "response", None),
}
FOREIGN = {"instruction": "Alpaca's instruction/input/output: convert each to {\"prompt\", \"response\"}",
           "output": "Alpaca's instruction/input/output: convert each to {\"prompt\", \"response\"}",
           "conversations": "ShareGPT's conversations: convert them to \"messages\" of {role, content}",
           "role": "a message row of a tree (oasst1): convert each thread to {\"messages\"}",
           "parent_id": "a message row of a tree (oasst1): convert each thread to {\"messages\"}",
           "label": "a label field is read only as TRL's unpaired preference {\"prompt\", \"completion\", \"label\"}"}
KNOWN = {f for fields, *_ in LAYOUTS.values() for f in fields} | set(SYSTEM_FIELDS) | {"margin"} | set(FOREIGN)
PAIRS = [name for name, (*_, pair) in LAYOUTS.items() if pair]


def layout(where: str, obj: dict, kind: str = "sft") -> str:
    """The name of the one layout a record matches; else one line: its fields, the nearest layout that `kind`
    reads, what to do."""
    seen = {k for k in obj if k in KNOWN}
    for name, (fields, *_, pair) in LAYOUTS.items():
        extra = seen - set(fields) - ({"margin"} if pair else set()) - (set(SYSTEM_FIELDS) if fields != ("text",)
                                                                         else set())
        if set(fields) <= seen and not extra:
            return name
    usable = {"sft": [n for n in LAYOUTS if LAYOUTS[n][2] or not LAYOUTS[n][1]], "pairs": PAIRS,
              "prompts": list(LAYOUTS)[1:]}[kind]
    near = max(usable, key=lambda n: (set(LAYOUTS[n][0]) <= seen, len(seen & set(LAYOUTS[n][0])),
                                      -len(set(LAYOUTS[n][0]) - seen)))
    fields = LAYOUTS[near][0]
    hint = next((FOREIGN[k] for k in obj if k in FOREIGN), None)
    what = f"missing {sorted(set(fields) - seen)}" if not set(fields) <= seen else (
        f"{sorted(seen - set(fields) - set(SYSTEM_FIELDS) - {'margin'})} would change its meaning unread")
    raise UserError(f"{where}: no layout fits the fields {list(obj)}; nearest: {near} {{{', '.join(fields)}}}, "
                    f"{what}; " + (hint or "keep one layout's fields a record (docs/data.md lists them)"))


def validate(where: str, obj: dict, kind: str) -> dict | None:
    """Check one record of any layout (LAYOUTS, docs/data.md) and return it in canonical form:
    sft -> {"messages"} (with an assistant turn to train) or {"text"}, None for a record not to learn
    (`label: false`); pairs -> {"prompt": messages, "chosen": messages, "rejected": messages} (each side the answer
    turn(s) only) and an optional "margin"; prompts -> {"prompt": messages} (ending with a user turn)."""
    name = layout(where, obj, kind)
    fields, prompt_field, answer_field, pair = LAYOUTS[name]
    if prompt_field is None:  # text: plain language-model data
        if kind != "sft":
            raise UserError(f"{where}: a {{\"text\"}} record is plain text, no {kind[:-1]}; expected "
                            + ("a pair {\"prompt\", \"chosen\", \"rejected\"}" if kind == "pairs" else
                               "a prompt {\"prompt\"} or {\"messages\"}"))
        _check_text(where, obj, "text")
        if not isinstance(obj["text"], str):
            raise UserError(f"{where}: field 'text' must be a string")
        return {"text": obj["text"]}
    if prompt_field == "messages" or (prompt_field == "prompt" and kind == "sft" and answer_field == "messages"):
        msgs = turns(where, obj, "messages")  # (UltraFeedback's messages: its prompt and chosen answer)
        if kind == "sft":
            if not any(m["role"] == "assistant" and m.get("weight", 1) for m in msgs):
                raise UserError(f"{where}: field 'messages' has no assistant turn to learn from" + (
                    " (each has weight 0)" if any(m["role"] == "assistant" for m in msgs) else ""))
            return {"messages": _with_system(where, obj, msgs)}
        if kind == "prompts":
            msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
            while msgs and msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            return _prompt(where, obj, msgs, "messages")
    if "label" in fields:
        if not isinstance(obj["label"], bool):
            raise UserError(f"{where}: field 'label' must be true or false (TRL's unpaired preference)")
        if kind == "pairs":
            raise UserError(f"{where}: an unpaired preference row (TRL's KTO layout: prompt, completion, label) has "
                            "no rejected answer; expected a pair {\"prompt\", \"chosen\", \"rejected\"}")
        if kind == "sft" and not obj["label"]:
            turns(where, obj, "prompt"), turns(where, obj, "completion", "assistant")  # still a well-formed record
            return None  # an answer labelled bad: not to learn
    if pair and prompt_field == "chosen":  # no prompt: the turns both sides share
        prompt, chosen, rejected = _split_shared(where, obj)
    else:
        prompt = turns(where, obj, prompt_field)
        if kind == "prompts":
            return _prompt(where, obj, prompt, prompt_field)
        if kind == "pairs" and not pair:
            raise UserError(f"{where}: a {name} record has no rejected answer; reward.py needs a pair: expected "
                            "{\"prompt\", \"chosen\", \"rejected\"}")
        if answer_field is None:
            raise UserError(f"{where}: field 'response' is missing (or 'completion'): a {name} record has no answer "
                            "to learn; expected {\"prompt\", \"completion\"}, {\"messages\"} or another layout "
                            "with an answer (docs/data.md)")
        chosen = _answer(where, prompt, turns(where, obj, answer_field if kind == "sft" else "chosen", "assistant"),
                         answer_field if kind == "sft" else "chosen")
        if kind == "pairs":
            rejected = _answer(where, prompt, turns(where, obj, "rejected", "assistant"), "rejected")
    if kind == "prompts":
        return _prompt(where, obj, prompt, prompt_field)
    if kind == "sft":
        return {"messages": _with_system(where, obj, prompt + chosen)}
    out = {"prompt": _with_system(where, obj, prompt), "chosen": chosen, "rejected": rejected}
    if "margin" in obj:
        if not isinstance(obj["margin"], (int, float)) or isinstance(obj["margin"], bool) or not math.isfinite(
                obj["margin"]):
            raise UserError(f"{where}: field 'margin' must be a finite number")
        out["margin"] = float(obj["margin"])
    return out


def _prompt(where: str, obj: dict, msgs: list[dict], field: str) -> dict:
    if not msgs or msgs[-1]["role"] != "user":
        raise UserError(f"{where}: field '{field}' has no user turn to answer"
                        if not any(m["role"] == "user" for m in msgs) else
                        f"{where}: field '{field}' must end with a user turn")
    return {"prompt": _with_system(where, obj, msgs)}


def _hub_reachable() -> bool:
    """Whether the Hugging Face hub answers within 3 s (datasets would otherwise retry for a minute)."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
        return True
    except OSError:
        return False


def _dataset_rows(path: str, split: str | None):
    """(where, row) of a `datasets` save_to_disk folder or an HF hub dataset."""
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        raise UserError(f"--data {path}: not a data file, and `datasets` (to read a dataset folder or an HF hub "
                        "name) is not installed: pip install datasets")
    told = "1" in (os.environ.get("HF_DATASETS_OFFLINE"), os.environ.get("HF_HUB_OFFLINE"))
    offline = not os.path.isdir(path) and not told and not _hub_reachable()
    if offline:  # read the local cache only (set before datasets reads these at import)
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    try:
        if os.path.isdir(path):
            ds = datasets.load_from_disk(path)
        else:
            if offline:  # datasets was imported already: its flags too
                import huggingface_hub.constants

                datasets.config.HF_DATASETS_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
                huggingface_hub.constants.HF_HUB_OFFLINE = True
            ds = datasets.load_dataset(path, split=split or "train")
    except Exception as e:  # no network, no such dataset or split, a folder that is not a dataset
        why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        where = " (offline: the hub did not answer)" if offline else ""
        raise UserError(f"--data {path}: cannot load it with `datasets`{where}: {why}")
    if isinstance(ds, datasets.DatasetDict):
        if (split or "train") not in ds:
            raise UserError(f"--data {path}: no split '{split or 'train'}' (it has {', '.join(ds)}); pass "
                            "--data_split / --eval_split")
        ds = ds[split or "train"]
    elif split not in (None, "train"):  # a plain Dataset folder is one split: any name would read all of it
        raise UserError(f"--data {path}: a dataset saved without splits has no split '{split}'; pass held-out data "
                        "as --eval_data")
    for i, row in enumerate(ds):  # a column some rows leave empty (None) is a field those rows do not have
        yield f"{path}[{split or 'train'}][{i}]", {k: v for k, v in row.items() if v is not None}


class Record(dict):
    """A canonical record (see validate) that remembers its place, `where` (file:line), for the errors found when it
    is encoded: a chat template that refuses its turns, --truncation error."""

    def __init__(self, fields: dict, where: str = ""):
        super().__init__(fields)
        self.where = where


def encode_records(records: list[dict], encode, source: str, skip_invalid: bool) -> list:
    """[encode(record, where) for each record]; an error names the record's place (file:line when load_data read
    it, else `source record N`), and with --skip_invalid drops the record instead (counted, as load_data does)."""
    out, skipped = [], []
    for i, record in enumerate(records):
        where = getattr(record, "where", "") or f"{source} record {i + 1}"
        try:
            out.append(encode(record, where))
        except UserError as e:
            message = e.code.removeprefix("error: ")
            message = message if message.startswith(where) else f"{where}: {message}"
            if not skip_invalid:
                raise UserError(message)
            skipped.append(message)
    if skipped:
        common.print0(f"--skip_invalid: dropped {len(skipped)} records that cannot be encoded (first: {skipped[0]})")
        if not out:
            raise UserError(f"{source}: no record can be encoded")
    return out


def input_paths(spec) -> list[str]:
    """The paths of a comma-separated flag (--data a.jsonl,b.jsonl), `~` expanded: `--data=~/x.jsonl` reaches us
    unexpanded (no shell expands a ~ after `=`)."""
    return [os.path.expanduser(p) for p in str(spec or "").split(",") if p]


def load_data(spec: str, kind: str, split: str | None = None, skip_invalid: bool = False) -> list[dict]:
    """Canonical records (see validate) for a stage. `spec` is `toy` (the demo; `split` train or eval picks its
    disjoint part), or comma-separated sources: JSONL files, JSON array files, `datasets` save_to_disk folders or
    HF hub names (those two read `split`, default train). A bad record stops with its one-line error, or with
    `skip_invalid` is dropped and counted."""
    if spec == "toy":
        return toy.toy_data(kind, split or "train")
    records, skipped, unlearned = [], [], 0
    for path in input_paths(spec):
        if os.path.isfile(path):
            if split not in (None, "train"):
                raise UserError(f"--data {path}: a file has no split '{split}'; pass held-out data as --eval_data")
            rows = _read_rows(path)
        elif path.endswith((".jsonl", ".json")) or path.startswith((".", "/", "~")) and not os.path.isdir(path):
            raise UserError(f"--data {path}: no such data file")
        else:
            rows = _dataset_rows(path, split)
        for where, obj in rows:
            try:
                if isinstance(obj, str):
                    raise UserError(f"{where}: {obj}")
                record = validate(where, {k: v for k, v in obj.items() if v is not None}, kind)  # null: no field
                if record is None:
                    unlearned += 1
                    continue
                records.append(Record(record, where=where))
            except UserError as e:
                if not skip_invalid:
                    raise
                skipped.append(e.code.removeprefix("error: "))
    if skipped:
        common.print0(f"--skip_invalid: dropped {len(skipped)} invalid records of {spec} (first: {skipped[0]})")
    if unlearned:
        common.print0(f"{spec}: {unlearned} records with label false (an answer not to learn) are not trained")
    if not records:
        raise UserError(f"--data {spec}: no valid records")
    return records


def load_splits(data: str, eval_data: str | None, data_split: str, eval_split: str | None, kind: str,
                skip_invalid: bool) -> tuple[list[dict], list[dict] | None]:
    """Training records and held-out records: --eval_data, else --data's --eval_split, else (None) a share of the
    training records that the caller holds out (split_eval); the demo has its own eval prompts."""
    train = load_data(data, kind, data_split, skip_invalid)
    source = eval_data or (data if eval_split or data == "toy" else None)
    if source is None:
        return train, None
    split = eval_split or ("eval" if source == "toy" else None)
    return train, load_data(source, kind, split, skip_invalid)


def split_eval(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a fixed, seeded share of the records for evaluation."""
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(len(records) * fraction)) if fraction > 0 and len(records) > 1 else 0
    held = set(idx[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


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
            raise UserError(f"{where}: {len(known[key])} tokens > --max_seq_len - --max_new_tokens = "
                                   f"{max_len} (pass --truncation left to cut it)")
        return record, common.truncate_left(list(known[key]), max_len)

    encoded = encode_records(records, encode, source, skip_invalid)
    return [ids for _, (ids, _) in encoded], sum(cut for _, (_, cut) in encoded), [r for r, _ in encoded]


def retokenizer(actor_tok, reward_tok, prompts: list, device):
    """Prompt + answer in the reward model's tokenizer: an ended answer as a turn, else text after the prompt."""

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
        seq = common.pad(rows, common.pad_id(reward_tok)).to(device)
        return seq, common.pad([[1] * len(r) for r in rows], 0).to(device)

    return retok
