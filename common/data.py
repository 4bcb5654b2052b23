"""Data: JSONL/JSON files, `datasets` folders and hub names read into canonical records, one layout per record
(common.layouts, docs/data.md); a record that fits none is a one-line error naming its file, line and fields."""

import importlib.util
import json
import os
import random
import re
import socket
from pathlib import Path

import common
from common import UserError, toy
from common.layouts import (  # noqa: F401 (common.data.validate, the layouts)
    FOREIGN, KNOWN, LAYOUTS, MESSAGE_KEYS, PAIRS, SYSTEM_FIELDS, layout, turns, unrender, validate,
)

# ----------------------------------------------------------------------------------------------------------------
# data


MAX_RECORD_CHARS = 4 << 20  # a record's text: ~1M tokens, 8 times a 128k-token context (docs/data.md)
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape of half a UTF-16 pair (json.loads accepts one alone)
BINARY = {b"PAR1": "Parquet", b"\x1f\x8b": "gzip-compressed", b"PK\x03\x04": "a zip archive"}  # (first bytes)


def _checked(obj, size: int, text: str):
    """A decoded record, or the message saying why it is not one (too large, a lone surrogate, not an object)."""
    if size > MAX_RECORD_CHARS:
        return (f"a record of {size:,} characters, more than the {MAX_RECORD_CHARS:,} a record may have (nothing "
                "trains on more); expected records that fit a context: cut it, or drop it with --skip_invalid")
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if _SURROGATE.search(text):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            return (f"a lone surrogate escape ({e.object[e.start]!r}) in a string is no character; expected valid "
                    "Unicode text")
    return obj


DEEP = "JSON nested deeper than Python's reader can go; expected records of strings, numbers and message lists"


def _read_rows(path: str):
    """(where, object or error message) for each record of a JSONL file, a JSON array file or a file of one JSON
    object, `where` being `file:line`. A record that is not one comes back as its error message (see load_data)."""
    raw, rows = Path(path).read_bytes(), 0
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # the UTF-8 byte-order mark some Windows editors write first
    if kind := next((name for magic, name in BINARY.items() if raw.startswith(magic)), None):
        raise UserError(f"--data {path}: a {kind} file; expected JSONL or a JSON array" + (
            " (Parquet is read with `pip install datasets`)" if kind == "Parquet" else " (decompress it first)"))
    if raw.lstrip().startswith(b"{") and (one := _one_object(path, raw)) is not None:
        yield f"{path}:{raw.count(10, 0, raw.index(b'{')) + 1}", _checked(one, len(raw), raw.decode("utf-8"))
        return
    if raw.lstrip().startswith(b"["):  # a JSON array; line numbers from the decoder's offsets
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{raw.count(10, 0, e.start) + 1}: not valid UTF-8; expected UTF-8 JSON")
        dec, skip, i, last, line = json.JSONDecoder(), re.compile(r"[\s,]*"), text.index("[") + 1, 0, 1
        while (i := skip.match(text, i).end()) < len(text) and text[i] != "]":
            line, last, start = line + text.count("\n", last, i), i, i
            try:
                obj, i = dec.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})")
            except RecursionError:  # (an array cannot go on past a record it cannot read)
                raise UserError(f"{path}:{line}: {DEEP}")
            rows += 1
            yield f"{path}:{line}", _checked(obj, i - start, text[start:i])
        if i >= len(text) or text[i + 1:].strip():  # cut short, or something after the array
            why = "no closing ]" if i >= len(text) else "text after its closing ]"
            raise UserError(f"{path}:{text.count(chr(10), 0, i) + 1}: malformed JSON array ({why})")
    else:
        for n, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            rows += 1
            if len(line) > MAX_RECORD_CHARS:  # (not decoded: a 200 MB line is refused before it costs anything)
                yield f"{path}:{n}", _checked(None, len(line), "")
                continue
            try:
                text = line.decode("utf-8")
                obj = json.loads(text)
            except RecursionError:
                yield f"{path}:{n}", DEEP
                continue
            except UnicodeDecodeError as e:
                yield f"{path}:{n}", f"not valid UTF-8 (byte {e.start}); expected UTF-8 JSON"
                continue
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", f"malformed JSON ({e.msg} at column {e.colno}); expected one object a line"
                continue
            yield f"{path}:{n}", _checked(obj, len(text), text)
    if not rows:
        raise UserError(f"{path}: the data file is empty; expected one JSON object a line, or a JSON array")


def _one_object(path: str, raw: bytes) -> dict | None:
    """The record of a file that is one JSON object written over several lines (None for JSONL); a file whose object
    holds the records in a list is refused, naming the field."""
    first = raw.lstrip().split(b"\n", 1)[0]
    try:
        json.loads(first)
        return None  # its first line is a whole object: JSONL
    except (ValueError, RecursionError):
        pass
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None  # (JSONL with a bad first line: said line by line)
    held = next((k for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)
                 and k not in KNOWN), None) if isinstance(obj, dict) else None
    if held is not None:
        raise UserError(f"{path}: one JSON object holding its records in field '{held}'; expected JSONL or a JSON "
                        f"array of records (write out the list under '{held}')")
    return obj if isinstance(obj, dict) else None


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
    if importlib.util.find_spec("datasets") is None:
        raise UserError(f"--data {path}: not a data file, and `datasets` (to read a dataset folder or an HF hub "
                        "name) is not installed: pip install datasets")
    told = "1" in (os.environ.get("HF_DATASETS_OFFLINE"), os.environ.get("HF_HUB_OFFLINE"))
    offline = not os.path.exists(path) and not told and not _hub_reachable()
    if offline:  # read the local cache only (set before datasets reads these at import)
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    try:
        if os.path.isfile(path):  # Parquet
            ds = datasets.load_dataset("parquet", data_files=path, split="train")
        elif os.path.isdir(path):
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
        yield f"{path}[{split or 'train'}][{i}]", _checked({k: v for k, v in row.items() if v is not None},
                                                            _chars(row), "")


def _chars(value) -> int:
    """The characters of the strings in a record."""
    if isinstance(value, str):
        return len(value)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return sum(_chars(v) for v in items)


class Record(dict):
    """A canonical record (see validate) that remembers its place, `where` (file:line), and the data's own name of
    its `prompt` (`question` for Orca), for the errors found when it is encoded: a chat template that refuses its
    turns, text already rendered, --truncation error."""

    def __init__(self, fields: dict, where: str = "", prompt_field: str = "prompt", reference: str | None = None):
        super().__init__(fields)
        self.where, self.prompt_field, self.reference = where, prompt_field, reference


def encode_records(records: list[dict], encode, source: str, skip_invalid: bool, tokenizer=None) -> list:
    """[encode(record, where) for each record]; an error names the record's place (file:line when load_data read
    it, else `source record N`), and with --skip_invalid drops the record instead (counted, as load_data does).
    With the tokenizer, text already written in its markup is first read as turns, in place (unrender)."""
    out, skipped = [], []
    for i, record in enumerate(records):
        where = getattr(record, "where", "") or f"{source} record {i + 1}"
        try:
            if tokenizer is not None and (plain := unrender(tokenizer, record, where)) is not record:
                record.clear()
                record.update(plain)
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
            with open(path, "rb") as f:
                parquet = f.read(4) == b"PAR1" and importlib.util.find_spec("datasets") is not None
            rows = _dataset_rows(path, None) if parquet else _read_rows(path)
        elif path.endswith((".jsonl", ".json")) or path.startswith((".", "/", "~")) and not os.path.isdir(path):
            raise UserError(f"--data {path}: no such data file")
        else:
            rows = _dataset_rows(path, split)
        for where, obj in rows:
            try:
                if isinstance(obj, str):
                    raise UserError(f"{where}: {obj}")
                obj = {k: v for k, v in obj.items() if v is not None}  # null: no field
                record = validate(where, obj, kind)
                if record is None:
                    unlearned += 1
                    continue
                fields, prompt_field, answer_field, pair = LAYOUTS[layout(where, obj, kind)]
                answer = validate(where, obj, "sft") if kind == "prompts" and answer_field and not pair else None
                reference = answer["messages"][-1]["content"] if answer and answer["messages"][-1][
                    "role"] == "assistant" else None  # (chat.py's BLEU/ROUGE; a pair's chosen side is none)
                records.append(Record(record, where, prompt_field or "prompt", reference))
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
    """Token ids of each record's prompt, cut from the left to max_len by whole turns (common.fit_turns; or an error
    with --truncation error), the number cut, and the records kept (--skip_invalid drops those that cannot be
    encoded)."""
    known = {}

    def prompt(messages):
        return (common.encode_prompt(tokenizer, messages),)

    def encode(record, where):
        key = repr(record["prompt"])
        if key not in known:  # a repeated prompt (the demo draws 4096 from 115) is encoded once
            known[key] = len(prompt(record["prompt"])[0]), common.fit_turns(tokenizer, record["prompt"], max_len,
                                                                            prompt)
        if known[key][0] > max_len and truncation == "error":
            raise UserError(f"{where}: {known[key][0]} tokens > --max_seq_len - --max_new_tokens = "
                                   f"{max_len} (pass --truncation left to cut it)")
        (ids,), cut = known[key][1]
        return record, (list(ids), cut)

    encoded = encode_records(records, encode, source, skip_invalid, tokenizer)
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
