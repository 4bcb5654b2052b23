"""Chat templates and tokenisation: a conversation rendered by the tokenizer's template and encoded as that text's
tokens, with the trained mask (docs/data.md, "Encoding"). Re-exported by name from common (`common.encode_prompt`)."""

import copy
import functools
import os
import weakref

from common import UserError

def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The text of a conversation: the tokenizer's chat template when it has one, else DeepSpeed-Chat's format
    "\\n\\nHuman: {user}\\n\\nAssistant: {answer}<eos>" (a system message is written as it is, before the turns). A
    prompt for generation ends before a space the template writes where an answer begins (DeepSpeed-Chat's prompts
    end with "Assistant:"): the answer's first token carries it, as in the whole text (`Ġcats`)."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja's own errors (a template that refuses a role or an empty conversation)
            raise UserError(f"the chat template cannot render {[m['role'] for m in messages]}: {e}")
    else:
        text = ""
        for m in messages:
            head = {"user": "\n\nHuman: ", "assistant": "\n\nAssistant: "}.get(m["role"], "")
            text += head + m["content"] + (tokenizer.eos_token if m["role"] == "assistant" else "")
        text += "\n\nAssistant: " if add_generation_prompt else ""
    return text.rstrip(" ") if add_generation_prompt else text


def format_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt text of every script; it ends where the next assistant answer begins."""
    return render(tokenizer, messages, add_generation_prompt=True)


def _segments(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[tuple[str, int | None]]:
    """The rendered conversation as (text, message index) pieces: contents (index j) and markup (None). Each content
    is found by rendering again with a marker in its place, so a template may trim a content (Llama 2 and 3), strip
    the text around it (Llama 2's system block) or move it (Mistral's system message)."""
    text, found = render(tokenizer, messages, add_generation_prompt), []
    mark = "\ufffc"  # the object replacement character, made longer while the text holds it
    while mark in text:
        mark += "\ufffc"
    for j, m in enumerate(messages):
        marked = render(tokenizer, messages[:j] + [{**m, "content": mark}] + messages[j + 1:], add_generation_prompt)
        if marked == text:  # a message the template leaves out (Mistral's system message, but in the last turn)
            continue
        k = marked.find(mark)
        piece = next((p for p in dict.fromkeys((m["content"], m["content"].strip())) if marked.count(mark) == 1
                      and text == marked[:k] + p + marked[k + len(mark):]), None)
        if piece is None and m["role"] == "assistant" and "</think>" in m["content"] and marked.count(mark) == 1:
            k, piece = _think_piece(tokenizer, messages[:j], m["content"], text, marked[:k], marked[k + len(mark):])
        if piece is None:
            raise UserError(f"the chat template rewrites the text of {'an' if m['role'][0] in 'aeiou' else 'a'} "
                            f"{m['role']} message, or writes it twice "
                            f"(cannot place {m['content'][:40]!r} in its rendering)")
        found.append((k, j, piece))
    out, start = [], 0
    for k, j, piece in sorted(found):
        if k < start:
            raise UserError(f"the chat template writes {messages[j]['role']} message {j} inside another message")
        out += [(text[start:k], None), (piece, j)]
        start = k + len(piece)
    return out + [(text[start:], None)]


def _think_piece(tokenizer, before: list[dict], content: str, text: str, head: str, tail: str):
    """(place, text) of an answer whose content has a `<think>...</think>` block a reasoning template (Qwen3,
    DeepSeek-R1) writes its own way: everything from the end of the generation prompt to the turn's end markup, so
    the `<think>` the model writes itself is trained; (0, None) where that is not the content's answer."""
    prompt = render(tokenizer, before, add_generation_prompt=True) if before else ""
    start = len(os.path.commonprefix([text, head]))
    start = len(prompt) if text.startswith(prompt) and len(prompt) <= start else start
    piece = text[start: len(text) - len(tail)] if text.endswith(tail) and len(text) - len(tail) >= start else ""
    answer = content.split("</think>")[-1].strip()
    return (start, piece) if piece and piece.rstrip().endswith(answer) else (0, None)


def _fold_reasoning(tokenizer, messages: list[dict]) -> list[dict]:
    """Assistant messages' `reasoning_content` written into their content as the templates that read it do
    (`<think>\n{reasoning}\n</think>\n\n{content}`); refused for a template that does not read it."""
    if not any("reasoning_content" in m for m in messages):
        return messages
    if "reasoning_content" not in (getattr(tokenizer, "chat_template", None) or ""):
        raise UserError("a message has reasoning_content, which this chat template does not write; expected a "
                        "reasoning template (Qwen3, DeepSeek-R1), or the reasoning left out")
    return [{k: v for k, v in m.items() if k != "reasoning_content"} | {"content": "<think>\n" + m[
        "reasoning_content"].strip("\n") + "\n</think>\n\n" + m["content"].lstrip("\n")}
            if "reasoning_content" in m else m for m in messages]


def special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens (EOS, BOS, pad, a template's turn markers), and of the plain added
    tokens its chat template writes as turn markers (turn_tokens)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return (set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
            | set(turn_tokens(tokenizer)[0].values()))


_TRAITS, _TURNS = weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary()


def turn_tokens(tokenizer) -> tuple[dict, object]:
    """Plain (not special) added tokens the template writes between turns, as axolotl's `tokens:` adds ChatML's and
    DeepSeek-R1's tokenizer has `<｜User｜>`, `<｜Assistant｜>`: ({text: id}, a copy of the Rust tokenizer where they
    are special). They end a turn and stay text in contents; one written only inside answers (Qwen3's `<think>`)
    stays a token."""
    if tokenizer not in _TURNS:
        plain = {t.content: i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                 if not getattr(t, "special", False) and t.content and not t.content.isalnum()  # markup, not a word
                 and not any(c.isspace() for c in t.content)}  # nor white space the template writes anyway
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                 {"role": "user", "content": "bye"}]
        markup, header, prompt_tail = "", "", ""
        if plain and getattr(tokenizer, "chat_template", None):
            try:  # the markup before each user message (the end of the turn before it and the start of its own),
                pieces = _segments(tokenizer, probe, False)  # and before an answer what the generation prompt writes
                before = {j: pieces[k - 1][0] for k, (_, j) in enumerate(pieces) if j is not None}
                markup, header = before[0] + before[2], before[1]
                prompt_tail = _segments(tokenizer, probe[:1], True)[-1][0]
            except (UserError, KeyError):
                prompt_tail = ""
        found = {text: i for text, i in plain.items() if text in markup or text in header and text in prompt_tail}
        split = None
        if found and getattr(tokenizer, "backend_tokenizer", None) is not None:
            from tokenizers import AddedToken

            split = copy.deepcopy(tokenizer.backend_tokenizer)
            split.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in found])
        _TURNS[tokenizer] = found, split
    return _TURNS[tokenizer]


def _traits(tokenizer) -> tuple[bool, bool]:
    """(adds a BOS to every input, puts a SentencePiece "▁" before every input), worked out once per tokenizer."""
    if tokenizer not in _TRAITS:
        ids = tokenizer("a")["input_ids"]
        bare = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])
        _TRAITS[tokenizer] = (tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id],
                              bool(bare) and bare[0].startswith("▁"))
    return _TRAITS[tokenizer]


def _encode(tokenizer, text: str, plain: bool, offsets: bool = False):
    """Ids of a text, no special tokens added (`plain`: special-token strings stay text), through the Rust tokenizer
    where there is one: the Python wrapper costs ~0.1 ms a call, 4 s for the demo's 6,000 conversations. With
    `offsets`, (ids, [(start, end)] of each token in `text`; a tokenizer with no Rust part gives the whole text's)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=plain)["input_ids"]
        return (ids, [(0, len(text))] * len(ids)) if offsets else ids
    turns, split = turn_tokens(tokenizer)
    if plain and split is not None and any(t in text for t in turns):  # plain turn markers stay text too
        backend = split
    before, backend.encode_special_tokens = backend.encode_special_tokens, plain
    try:
        enc = backend.encode(text, add_special_tokens=False)
    finally:
        backend.encode_special_tokens = before
    return (enc.ids, enc.offsets) if offsets else enc.ids


def _piece_tokens(tokenizer, text: str, plain: bool, first: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, offsets) of one piece of a conversation (`plain`: special-token strings stay text). SentencePiece-style
    tokenizers put a "▁" (a space) before every input: a piece inside the text is tokenised after a newline whose
    ids are then cut, so it gets no space the template did not write."""
    ids, offsets = _encode(tokenizer, text, plain, offsets=True)
    if first or not ids or not _traits(tokenizer)[1]:
        return ids, offsets
    for sentinel in ("\n", "\ue000"):  # a vocabulary that merges "\n" with what follows: a private-use character
        head = _encode(tokenizer, sentinel, False)
        both, spans = _encode(tokenizer, sentinel + text, plain, offsets=True)
        if both[: len(head)] == head:
            n = len(sentinel)
            return both[len(head):], [(max(a - n, 0), max(b - n, 0)) for a, b in spans[len(head):]]
    return ids, offsets


def _piece_ids(tokenizer, text: str, plain: bool, first: bool) -> list[int]:
    """The ids of _piece_tokens."""
    return _piece_tokens(tokenizer, text, plain, first)[0]


def _tokens(tokenizer, text: str, contents: list[tuple[int, int]], specials: set[int]) -> list[tuple]:
    """(id, start, end) of the tokens of a whole rendered text, as the tokenizer encodes it (added tokens' lstrip
    and rstrip included: Phi-3's `<|user|>` takes the white space after it), but for a special token that starts
    inside a content (`contents`: its spans): the text between the markup's special tokens around it is tokenised
    again as plain text, so a typed `<|im_start|>` stays text."""
    ids, offsets = _encode(tokenizer, text, plain=False, offsets=True)
    out = [(t, a, b) for t, (a, b) in zip(ids, offsets)]

    def typed(tok):  # a special token whose text (white space it swallowed aside) starts inside a content
        t, a, b = tok
        a += len(text[a:b]) - len(text[a:b].lstrip())
        return t in specials and any(s <= a < e for s, e in contents)

    k = 0
    while k < len(out):
        if not typed(out[k]):
            k += 1
            continue
        i = k
        while i > 0 and (out[i - 1][0] not in specials or typed(out[i - 1])):
            i -= 1
        j = k
        while j < len(out) and (out[j][0] not in specials or typed(out[j])):
            j += 1
        start, end = out[i - 1][2] if i else 0, out[j][1] if j < len(out) else len(text)
        new, spans = _piece_tokens(tokenizer, text[start:end], plain=True, first=start == 0)
        fixed = [(t, start + a, start + b) for t, (a, b) in zip(new, spans)]
        out, k = out[:i] + fixed + out[j:], i + len(fixed)
    return out


def encode_conversation(tokenizer, messages: list[dict], add_generation_prompt: bool = False
                        ) -> tuple[list[int], list[bool]]:
    """Ids of a conversation as its template renders it (the whole text's tokens, apply_chat_template's ids), and a
    mask True on each answer (but one of `weight` 0) and the token(s) ending its turn (up to the template's first
    special token after it, else an EOS put in). Contents are plain text (a typed `<|im_start|>` never becomes the
    special id); the BOS comes first, once; docs/data.md."""
    specials, messages = special_ids(tokenizer), _fold_reasoning(tokenizer, messages)
    segments, spans, pos = _segments(tokenizer, messages, add_generation_prompt), [], 0
    for piece, j in segments:
        if j is not None:
            spans.append((pos, pos + len(piece), j))
        pos += len(piece)
    text = "".join(piece for piece, _ in segments)
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        tokens = _tokens(tokenizer, text, [(s, e) for s, e, _ in spans], specials)
    else:  # no offsets: each piece alone, contents as plain text
        tokens, pos = [], 0
        for piece, j in segments:
            ids = _piece_ids(tokenizer, piece, plain=j is not None, first=not pos)
            tokens, pos = tokens + [(t, pos, pos + len(piece)) for t in ids], pos + len(piece)
    ids, mask = [t for t, _, _ in tokens], [False] * len(tokens)
    for n, (s, e, j) in enumerate(spans):
        if messages[j]["role"] != "assistant" or messages[j].get("weight") == 0:  # (OpenAI's weight 0)
            continue
        s -= len(text[:s]) - len(text[:s].rstrip(" "))  # the spaces the template writes before it (`Ġcats`)
        stop = spans[n + 1][0] if n + 1 < len(spans) else len(text)  # the markup up to the next content
        inside = [i for i, (_, a, b) in enumerate(tokens) if s <= a < e and b <= e]
        after = next((i for i, (_, a, b) in enumerate(tokens) if a >= e), len(tokens))
        end = next((i for i in range(after, len(tokens)) if tokens[i][1] < stop and ids[i] in specials), None)
        for i in inside + list(range(after, end + 1 if end is not None else after)):
            mask[i] = True
        if end is None:  # a template that writes nothing special after an answer: an EOS put in
            tokens.insert(after, (tokenizer.eos_token_id, e, e))
            ids.insert(after, tokenizer.eos_token_id)
            mask.insert(after, True)
    if _traits(tokenizer)[0] and ids[:1] != [tokenizer.bos_token_id]:
        ids, mask = [tokenizer.bos_token_id] + ids, [False] + mask
    return ids, mask


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a prompt, ready for generation (ends with the assistant prefix): a prefix of the ids of the
    conversation that continues it (encode_conversation)."""
    return encode_conversation(tokenizer, messages, add_generation_prompt=True)[0]


def encode_scored(tokenizer, messages: list[dict]) -> list[int]:
    """Ids of a conversation that ends with an answer, cut after the token that ends that answer's turn: where a
    reward model reads its score (reward.py, ppo.py and chat.py agree on it)."""
    ids, mask = encode_conversation(tokenizer, messages)
    return ids[: max((i for i, m in enumerate(mask) if m), default=len(ids) - 1) + 1]


def encode_plain(tokenizer, text: str) -> tuple[list[int], list[bool]]:
    """A `{"text"}` record: plain language-model data, no template; BOS (if the tokenizer adds one) + text + EOS,
    every token trained; special-token strings in it stay text."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    ids = ([tokenizer.bos_token_id] if _traits(tokenizer)[0] else []) + ids
    return ids, [True] * len(ids)


def encode_record(tokenizer, record: dict) -> tuple[list[int], list[bool]]:
    """ids and trained mask of an SFT record: {"messages"} or {"text"}."""
    if "text" in record:
        return encode_plain(tokenizer, record["text"])
    return encode_conversation(tokenizer, record["messages"])


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end an answer in generation: the EOS and the chat template's end of turn (ChatML's `<|im_end|>`,
    Llama 3's `<|eot_id|>`) when it is another token."""
    ids, mask = encode_conversation(tokenizer, [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hi"}])
    return sorted({tokenizer.eos_token_id, ids[max(i for i, m in enumerate(mask) if m)]})


def decode_answers(tokenizer, rows) -> list[str]:
    """Generated answers (rows of ids, padded) as text, stripped, without special tokens (EOS, padding) or the plain
    tokens the template uses as turn markers (turn_tokens: a ChatML answer ends with a plain `<|im_end|>` then)."""
    drop = set(turn_tokens(tokenizer)[0].values())
    if drop:
        rows = [[i for i in row.tolist() if i not in drop] for row in rows]
    return [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def template_gap(tokenizer) -> str | None:
    """What a chat template writes at the start of an answer turn and its generation prompt does not (Qwen3 puts an
    empty `<think></think>` block in past answers only): SFT trains answers after tokens that a prompt never ends
    with, so generation starts where training never did. None when the prompt ends where the answer begins."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids, mask = encode_conversation(tokenizer, msgs)
    prompt, first = encode_prompt(tokenizer, msgs[:1]), mask.index(True)
    if ids[:first] == prompt:
        return None
    same = next((i for i, (a, b) in enumerate(zip(ids, prompt)) if a != b), min(len(prompt), first))
    decode = functools.partial(tokenizer.decode, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return (f"the chat template starts an answer turn with {decode(ids[same:first])!r} where its generation prompt "
            f"ends with {decode(prompt[same:])!r}: answers are trained after text that generation does not give "
            "(pass a template whose generation prompt ends where an answer begins)")


def show_example(tokenizer, ids: list[int], mask: list[bool]) -> str:
    """A decoded example with the trained tokens in [[ ]], to print before training (each run is what it adds to
    the decoded text, so a SentencePiece run keeps its leading space)."""
    out, shown, i = "", "", 0
    while i < len(ids):
        j = i
        while j < len(ids) and mask[j] == mask[i]:
            j += 1
        text = tokenizer.decode(ids[:j], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out += f"[[{text[len(shown):]}]]" if mask[i] else text[len(shown):]
        shown, i = text, j
    return out


def cut_tokens(tokenizer, rows: tuple, max_len: int) -> tuple:
    """Rows of one sequence (ids, and a mask alike) cut to their last `max_len` items, a leading BOS kept."""
    bos = tokenizer.bos_token_id
    head = int(bos is not None and rows[0][:1] == [bos] and max_len > 1)
    return tuple(r[:head] + r[len(r) - max_len + head:] if len(r) > max_len else r for r in rows)


def fit_turns(tokenizer, messages: list[dict], max_len: int, encode, keep: int = 1) -> tuple[tuple, bool]:
    """`encode(messages)` (a tuple: ids, ...) within `max_len` tokens, cut from the left as chat.py fits a history:
    the oldest whole exchanges (a user turn up to the next one) go first, a leading system message and the last
    `keep` messages stay (and with them the BOS and the template's header); what is still too long loses its oldest
    tokens after the BOS (cut_tokens). Returns the rows and whether anything was cut."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns, cut = messages[len(system):], False
    rows = encode(system + turns)
    while len(rows[0]) > max_len and (k := next((i for i in range(1, len(turns) - keep + 1)
                                                 if turns[i]["role"] == "user"), 0)):
        turns, rows, cut = turns[k:], encode(system + turns[k:]), True
    if len(rows[0]) > max_len:
        rows, cut = cut_tokens(tokenizer, rows, max_len), True
    return rows, cut


def fit_record(tokenizer, record: dict, max_len: int) -> tuple[tuple[list[int], list[bool]], bool]:
    """An SFT record's (ids, mask) within `max_len` (fit_turns; a {"text"} record loses its oldest tokens after the
    BOS), and whether it was cut."""
    if "text" in record:
        rows = encode_plain(tokenizer, record["text"])
        return cut_tokens(tokenizer, rows, max_len), len(rows[0]) > max_len
    return fit_turns(tokenizer, record["messages"], max_len, lambda m: encode_conversation(tokenizer, m))


def truncate_left(ids: list, max_len: int) -> tuple[list, bool]:
    """Keep the last `max_len` items; say whether anything was cut."""
    return (ids[-max_len:], True) if len(ids) > max_len else (ids, False)

