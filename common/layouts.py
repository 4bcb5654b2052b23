"""Data layouts: a record's fields read as the one layout (LAYOUTS, docs/data.md) they fit, in canonical form;
a record that fits none, or carries a field that would change its meaning unread, is one line naming its place,
fields and the nearest layout. Re-exported by common.data."""

import json
import re
import weakref

from common import UserError
from common.template import _segments, render, turn_tokens

def _check_text(where: str, obj: dict, field: str):
    v = obj.get(field)
    if field not in obj:
        raise UserError(f"{where}: field '{field}' is missing; expected a non-empty string")
    if isinstance(v, list):
        _check_messages(where, v, field)
    elif not isinstance(v, str) or not v.strip():
        raise UserError(f"{where}: field '{field}' must be a non-empty string, got {json.dumps(v)[:40]}")


MESSAGE_KEYS = ("role", "content", "weight", "reasoning_content")  # weight: OpenAI's fine-tuning format (0 or 1);
# reasoning_content: a reasoning model's thinking before its answer (Qwen3's, DeepSeek-R1's templates write it)


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
        if m.get("reasoning_content") is not None and (m["role"] != "assistant" or not isinstance(
                m["reasoning_content"], str)):
            raise UserError(f"{where}: field '{field}[{j}]' has reasoning_content; expected a string, on an "
                            "assistant message")
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
        return [{"role": m["role"], "content": m["content"], **({"weight": 0} if m.get("weight") == 0 else {}),
                 **({"reasoning_content": m["reasoning_content"]} if m.get("reasoning_content") else {})} for m in v]
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


MAX_MARGIN = 1e6  # a reward margin's largest magnitude (a gap in reward units; published ones are single digits)
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
    missing = [f for f in fields if f not in seen]
    what = f"field '{missing[0]}' is missing" if missing else (
        f"fields {sorted(seen - set(fields) - set(SYSTEM_FIELDS) - {'margin'})} would change its meaning unread")
    raise UserError(f"{where}: no layout fits the fields {list(obj)}: {what} for the nearest, {near} "
                    f"{{{', '.join(fields)}}}; " + (hint or "keep one layout's fields a record (docs/data.md)"))


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
        if not isinstance(obj["margin"], (int, float)) or isinstance(obj["margin"], bool) or not abs(
                obj["margin"]) <= MAX_MARGIN:  # (larger ones overflow the loss: inf, however the model scores)
            raise UserError(f"{where}: field 'margin' must be a number from -{MAX_MARGIN:g} to {MAX_MARGIN:g}, got "
                            f"{json.dumps(obj['margin'])[:40]}")
        out["margin"] = float(obj["margin"])
    return out


def _prompt(where: str, obj: dict, msgs: list[dict], field: str) -> dict:
    if not msgs or msgs[-1]["role"] != "user":
        raise UserError(f"{where}: field '{field}' has no user turn to answer"
                        if not any(m["role"] == "user" for m in msgs) else
                        f"{where}: field '{field}' must end with a user turn")
    return {"prompt": _with_system(where, obj, msgs)}


# ----------------------------------------------------------------------------------------------------------------
# text already rendered (docs/data.md, "Text already rendered")

_MARKERS = weakref.WeakKeyDictionary()


def _markers(tokenizer) -> tuple[list[str], str]:
    """(the tokenizer's markup strings: its BOS and EOS and the special or turn-marker tokens its template writes,
    longest first; the markup that ends an answer's turn, stripped: `<|im_end|>`, `</s>`)."""
    if tokenizer not in _MARKERS:
        probe = [{"role": "system", "content": "a"}, {"role": "user", "content": "b"},
                 {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}]
        try:
            written = render(tokenizer, probe, True) + render(tokenizer, probe[1:3])
            end = _segments(tokenizer, probe[1:3], False)[-1][0].strip()
        except UserError:
            written, end = "", ""
        added = getattr(tokenizer, "added_tokens_decoder", {})
        strings = {t.content for t in added.values() if getattr(t, "special", False) and t.content in written}
        strings |= set(turn_tokens(tokenizer)[0]) | {tokenizer.bos_token, tokenizer.eos_token}
        _MARKERS[tokenizer] = sorted((s for s in strings if s), key=len, reverse=True), end
    return _MARKERS[tokenizer]


def _edge_marker(tokenizer, text: str) -> str | None:
    """The markup string a text starts or ends with (white space aside), if any."""
    text = text.strip()
    markers = _markers(tokenizer)[0]
    return next((m for m in markers if text.startswith(m)), None) or next((m for m in markers if text.endswith(m)),
                                                                           None)


def _parse(tokenizer, text: str) -> list[dict] | None:
    """The messages whose rendering by this template (with or without a generation prompt) is `text`, white space
    around it aside: an optional system message, then alternating turns; the most turns that fit (one user message
    holding `hi<|im_end|>...assistant\nyo` renders back too), None if there are none."""
    text, n, best = text.strip(), 0, None
    while True:
        n, shortest = n + 1, len(text) + 1
        for roles in (r[:n] for r in (["user", "assistant"] * n, ["assistant", "user"] * n)):
            for roles in (roles, ["system"] + roles[: n - 1]):
                marks = [f"\ue000{i}\ue001" for i in range(n)]
                for prompt in (False, True) if roles[-1] == "user" else (False,):
                    try:
                        rendered = render(tokenizer, [{"role": r, "content": k} for r, k in zip(roles, marks)],
                                          prompt).strip()
                    except UserError:
                        continue
                    parts = re.split("\ue000(\\d+)\ue001", rendered)
                    shortest = min(shortest, sum(map(len, parts[::2])))
                    if sorted(parts[1::2]) != [str(i) for i in range(n)]:
                        continue  # a template that leaves a message out or writes it twice
                    found = re.fullmatch("(.*?)".join(map(re.escape, parts[::2])), text, re.S)
                    if found:
                        contents = dict(zip(map(int, parts[1::2]), found.groups()))
                        msgs = [{"role": r, "content": contents[i]} for i, r in enumerate(roles)]
                        if all(m["content"].strip() and not _edge_marker(tokenizer, m["content"]) for m in msgs) \
                                and render(tokenizer, msgs, prompt).strip() == text:
                            best = msgs
        if shortest > len(text) or n > sum(text.count(m) for m in _markers(tokenizer)[0]):  # (each turn writes one)
            return best


def unrender(tokenizer, record: dict, where: str) -> dict:
    """A canonical record whose text is already written in this tokenizer's markup (a field that starts or ends
    with one of its special-token strings or its template's turn markers) as plain turns: a field that is this
    template's rendering of a conversation becomes its messages (they render back to it), an answer ending with the
    template's end of turn loses it; anything else is refused in one line. Markup inside a text stays text."""
    end = _markers(tokenizer)[1]

    def refuse(field, found, what=""):
        field = getattr(record, "prompt_field", "prompt") if field == "prompt" else field  # (Orca's `question`)
        return UserError(f"{where}: field '{field}' {what}carries the tokenizer's markup {found!r} at its edge: text "
                         "already rendered, but not as this chat template renders turns; expected plain text: pass "
                         "the turns as a message list, or strip the markup")

    def plain(field, msgs):
        out = []
        for j, m in enumerate(msgs):
            found, text = _edge_marker(tokenizer, m["content"]), m["content"].strip()
            if not found:
                out.append(m)
            elif m["role"] == "assistant" and end and text.endswith(end) and text[: -len(end)].strip() and not (
                    _edge_marker(tokenizer, text[: -len(end)])):
                out.append({**m, "content": text[: -len(end)].strip()})  # an answer written with its turn's end
            elif (parsed := _parse(tokenizer, text)) is not None:
                out += parsed
            else:
                raise refuse(field, found, f"({m['role']} message {j}) " if field == "messages" else "")
        return out

    if "text" in record:
        if not (found := _edge_marker(tokenizer, record["text"])):
            return record
        msgs = _parse(tokenizer, record["text"])
        if msgs is None or msgs[-1]["role"] != "assistant":
            raise refuse("text", found)
        return {"messages": msgs}
    out = {k: plain(k, v) if k in ("messages", "prompt", "chosen", "rejected") else v for k, v in record.items()}
    if out == record:
        return record
    for field, ok, expected in (("messages", lambda s: any(m["role"] == "assistant" for m in s), "an answer"),
                                ("prompt", lambda s: s[-1]["role"] == "user", "to end with a user turn"),
                                ("chosen", lambda s: {m["role"] for m in s[:1] + s[-1:]} == {"assistant"},
                                 "the answer turn(s) only"),
                                ("rejected", lambda s: {m["role"] for m in s[:1] + s[-1:]} == {"assistant"},
                                 "the answer turn(s) only")):
        if field in out and not ok(out[field]):
            raise UserError(f"{where}: field '{field}', read from its markup, is the turns "
                            f"{[m['role'] for m in out[field]]}; expected {expected}")
    return out
