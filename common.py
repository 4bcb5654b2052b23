"""Shared plumbing for sft.py, reward.py, ppo.py and chat.py: distributed set-up, the DeepSpeed config, tokenizer
and prompt formatting, data loading, checkpoint I/O, logging, seeding and the built-in demo task ("toy").

Thin on purpose: no training loop, loss or RL math lives here (those stay in each stage's script)."""

import atexit
import errno
import functools
import json
import math
import os
import random
import shutil
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


class UserError(SystemExit):
    """A mistake in the user's input (flag, file, data). Python prints the message as one line and exits with
    status 1, without a traceback, because this is a SystemExit."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


def _excepthook(kind, value, tb, other_errors=sys.__excepthook__):
    """A full disk is one line, not a traceback (the newest checkpoint stays usable: DeepSpeed writes `latest`
    last, save_hf moves config.json in last). torch.save reports it as a RuntimeError, safetensors as its own."""
    chain, e = [], value
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    full = ("No space left on device", "Disk quota exceeded", "File too large", "file write failed", "StorageFull",
            "iostream error", "unexpected pos")  # the last two: torch.save's zip writer when a write fails
    for e in chain:
        if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)) or any(
                m in str(e) for m in full):
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            first = (str(e).strip().splitlines() or [""])[0][:200]
            print(f"error: the disk is full{where}: {first}; free some space, then --resume from the last "
                  "checkpoint", file=sys.stderr)
            return
    other_errors(kind, value, tb)


sys.excepthook = _excepthook


# ----------------------------------------------------------------------------------------------------------------
# distributed set-up


def init_distributed() -> torch.device:
    """One code path for `python x.py`, `deepspeed x.py` and `torchrun`: without a launcher we set up a one-process
    world ourselves, because deepspeed.init_distributed would otherwise look for MPI."""
    import deepspeed

    launched = "RANK" in os.environ
    if not launched:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend compiles its shared-memory all-reduce op (deepspeed_shm_comm) at start-up, used
        # only by inference_all_reduce (tensor-parallel inference), which these scripts never call. A run killed
        # during that build leaves torch_extensions/.../deepspeed_shm_comm/lock behind and every later run waits on
        # it forever, silently; so the op is not built (nor its build lock taken).
        import deepspeed.comm.torch  # noqa: F401 (the module; `deepspeed.comm.torch` names torch itself)

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if launched and not dist.is_initialized() and Path("/proc/self/stat").exists():
        watch_launcher()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        # tear the process group down at exit while the interpreter is whole: left to the interpreter's own teardown,
        # gloo's threads can abort a finished rank ("terminate called without an active exception", pytorch#190489)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
        # torch prefixes every line of an uncaught error with "[rankN]: " (its hook wraps ours): keep that for
        # tracebacks, and a full disk one plain line
        sys.excepthook = functools.partial(_excepthook, other_errors=sys.excepthook)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    # CPU ranks on one machine: share the cores instead of each taking all of them (oversubscribed OpenMP threads
    # spin against each other and the gloo/shm collectives: 30x slower PPO iterations with 2 ranks on 2 cores)
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ["WORLD_SIZE"])
    if local > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return torch.device("cpu")


def watch_launcher(interval: float = 1.0):
    """A rank stops when its launcher is gone: its parent (deepspeed's launch.py, torchrun) and, under the
    `deepspeed` command, the runner above launch.py, which does not pass a SIGTERM on to its ranks (a killed
    launcher would otherwise leave ranks training into the same folder as the next run)."""
    parent = os.getppid()
    watched = [parent]
    try:
        cmdline = Path(f"/proc/{parent}/cmdline").read_bytes().replace(b"\0", b" ")
        grand = int(_proc_stat(parent)[1])
        if b"deepspeed.launcher.launch" in cmdline and b"deepspeed" in Path(f"/proc/{grand}/cmdline").read_bytes():
            watched.append(grand)
    except (OSError, TypeError, ValueError):
        pass
    starts = {pid: (_proc_stat(pid) or [None] * 20)[19] for pid in watched}

    def watch():
        while all(_alive(pid, starts[pid]) for pid in watched) and os.getppid() == parent:
            time.sleep(interval)
        print(f"error: the launcher is gone (pid {' or '.join(map(str, watched))}); stopping rank {rank()}",
              file=sys.stderr, flush=True)
        for lock, pid in _held_locks:
            _release_lock(lock, pid)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-launcher").start()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_rank0() -> bool:
    return rank() == 0


def print0(*args, **kwargs):
    if is_rank0():
        print(*args, **kwargs, flush=True)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few Python floats over all ranks (one collective for the whole list)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_dtype(name: str) -> torch.dtype:
    """`auto`: bf16 on a GPU that supports it, else fp32 (fp16 does not run on CPU)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise UserError(f"--dtype {name}: expected one of auto, fp32, bf16, fp16")
    return table[name]


def check_zero_stage(stage: int, flag: str = "--zero_stage"):
    if stage not in (0, 1, 2, 3):
        raise UserError(f"{flag} {stage}: expected 0, 1, 2 or 3")


_COMPARE = {">=": float.__ge__, ">": float.__gt__, "<=": float.__le__, "<": float.__lt__}


def in_range(x: float, spec: str) -> bool:
    """Whether x meets a range written as in --help: `>= 1`, `> 0`, `0 <= x < 1`, `-1 or >= 1` (never NaN/inf)."""
    x = float(x)
    if not math.isfinite(x):
        return False
    for alt in spec.split(" or "):
        t = alt.split()
        if len(t) == 1 and x == float(t[0]):
            return True
        if len(t) == 2 and _COMPARE[t[0]](x, float(t[1])):
            return True
        if len(t) == 5 and _COMPARE[t[1]](float(t[0]), x) and _COMPARE[t[3]](x, float(t[4])):
            return True
    return False


def check_numbers(args, ranges: dict[str, str]):
    """Every numeric flag against its range (the same text is in its --help); None (a default) passes."""
    for name, spec in ranges.items():
        value = getattr(args, name)
        if value is not None and not in_range(value, spec):
            raise UserError(f"--{name} {value}: expected {spec.replace('x', name)}")


def ds_config(zero_stage: int, micro_batch: int, grad_accum: int, dtype: torch.dtype, offload: bool = False,
              grad_clip: float = 1.0, offload_params: bool = False) -> dict:
    """The DeepSpeed config for a trained engine. The optimizer and scheduler are torch objects passed to
    deepspeed.initialize (DeepSpeed's fused/CPU Adam would be compiled on first use, which costs minutes)."""
    check_zero_stage(zero_stage)
    zero = {"stage": zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if offload and zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params and zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size(),
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16, "loss_scale": 0, "initial_scale_power": 16},
        "zero_force_ds_cpu_optimizer": False,  # allow a torch AdamW with ZeRO-Offload
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Linear warmup, then cosine or linear decay to 0 (or constant)."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1.0 - progress
        return 1.0

    return f


def disable_dropout(model: torch.nn.Module):
    """Dropout off everywhere: PPO's ratio and the reference's log-probs assume a deterministic model."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = getattr(model, "config", None)
    for key in ("dropout", "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "activation_dropout", "attention_probs_dropout_prob", "hidden_dropout_prob", "classifier_dropout"):
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# tokenizer, model loading and prompt formatting


def check_model_path(name: str, flag: str):
    """A local-looking path that does not exist is a user error, not a hub lookup that fails deep inside."""
    if name == "toy":
        return
    looks_local = name.startswith((".", "/", "~")) or os.sep in name.rstrip("/") and name.count("/") != 1
    if looks_local and not os.path.isdir(os.path.expanduser(name)):
        raise UserError(f"{flag} {name}: no such model folder")
    if os.path.isdir(name) and not os.path.exists(os.path.join(name, "config.json")):
        raise UserError(f"{flag} {name}: folder has no config.json (not a Hugging Face model)")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer of a model folder or hub name, with a pad token that is *not* EOS: with pad == EOS the EOS is
    masked as padding, never learned, never detected (PPO_DETAILS 1). A missing pad token becomes a new <|pad|>;
    callers resize the embeddings with `resize_for_tokenizer`."""
    from transformers import AutoTokenizer

    if name == "toy":
        return toy_tokenizer()
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as e:  # not a folder, not on the hub, or no network ("models/x" looks like a hub name)
        raise UserError(f"{name}: cannot load a tokenizer: {str(e).strip().splitlines()[0]}")
    if tok.eos_token_id is None:
        raise UserError(f"{name}: the tokenizer has no EOS token; set one in its tokenizer_config.json")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.padding_side = "right"
    return tok


def resize_for_tokenizer(model, tokenizer):
    """Make room for a pad token we added, and write the ids into the config (needed by sequence classifiers)."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def to_messages(example) -> list[dict]:
    """A prompt string or a message list, as a message list."""
    if isinstance(example, str):
        return [{"role": "user", "content": example}]
    return list(example)


def format_prompt(tokenizer, messages: list[dict]) -> str:
    """The one prompt format of every script: the tokenizer's chat template when it has one, else DeepSpeed-Chat's
    "\\n\\nHuman: ...\\n\\nAssistant: ". The result ends where the next assistant answer begins."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = ""
    for m in messages:
        if m["role"] == "assistant":
            text += m["content"]
        elif m["role"] == "system":
            text += m["content"]
        else:
            text += f"\n\nHuman: {m['content']}\n\nAssistant: "
    return text


def encode_text(tokenizer, text: str, first: bool) -> list[int]:
    """Token ids of a piece of formatted text. Only the first piece gets the tokenizer's BOS (once, even when the
    chat template already wrote it), and no tokenizer-added EOS is kept: EOS is appended by the callers, as an id."""
    ids = tokenizer(text, add_special_tokens=first)["input_ids"]
    bos = tokenizer.bos_token_id
    if first and bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    if ids and ids[-1] == tokenizer.eos_token_id and first and not text.endswith(tokenizer.eos_token or "\0"):
        ids = ids[:-1]
    return ids


def encode_conversation(tokenizer, messages: list[dict], add_generation_prompt: bool = False
                        ) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and a mask that is True on assistant tokens (each answer + its EOS id).

    Each assistant turn's context is `format_prompt(messages[:i])`; we tokenise only the new text since the last
    answer, so the ids are one left-to-right sequence whatever the chat template adds between turns. With
    `add_generation_prompt` the text up to where the next answer begins is appended too (see encode_prompt)."""
    ids, mask, rendered = [], [], ""
    ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in ends + ([len(messages)] if add_generation_prompt else []):
        context = format_prompt(tokenizer, messages[:i])
        k = 0
        while k < min(len(context), len(rendered)) and context[k] == rendered[k]:
            k += 1
        new = encode_text(tokenizer, context[k:], first=not ids)
        ids += new
        mask += [False] * len(new)
        if i < len(messages):
            answer = tokenizer(messages[i]["content"], add_special_tokens=False)["input_ids"]
            ids += answer + [tokenizer.eos_token_id]
            mask += [True] * (len(answer) + 1)
            rendered = context + messages[i]["content"] + (tokenizer.eos_token or "")
    return ids, mask


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a prompt, ready for generation (ends with the assistant prefix). Earlier assistant turns are
    encoded exactly as sft.py trains on them (answer + EOS id), so a prompt is a prefix of its conversation."""
    return encode_conversation(tokenizer, messages, add_generation_prompt=True)[0]


def truncate_left(ids: list, max_len: int) -> tuple[list, bool]:
    """Keep the last `max_len` items; say whether anything was cut."""
    return (ids[-max_len:], True) if len(ids) > max_len else (ids, False)


def pad(rows: list[list[int]], value: int, side: str = "right", length: int | None = None) -> torch.Tensor:
    """Pad lists of ids to one length (the longest row unless `length` is given) on the given side."""
    n = length or max(len(r) for r in rows)
    out = torch.full((len(rows), n), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            if side == "right":
                out[i, : len(r)] = torch.as_tensor(r)
            else:
                out[i, n - len(r):] = torch.as_tensor(r)
    return out


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, so a row gets the same numbers alone or in a padded batch (models with
    absolute positions such as GPT-2 and OPT would otherwise shift; PPO_DETAILS 3)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def load_causal_lm(name: str, dtype: torch.dtype, tokenizer, trust_remote_code: bool = False, flag: str = "--model"):
    from transformers import AutoModelForCausalLM

    check_model_path(name, flag)
    if name == "toy":
        model = toy_model(tokenizer)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
    resize_for_tokenizer(model, tokenizer)
    return model.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# data


def _read_jsonl(path: str) -> list[tuple[str, dict]]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such data file")
    rows = []
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not valid UTF-8 (byte {e.start}); expected UTF-8 JSON")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); expected one object a line")
            if not isinstance(obj, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            rows.append((where, obj))
    if not rows:
        raise UserError(f"{path}: the data file is empty; expected one JSON object a line")
    return rows


def _check_text(where: str, obj: dict, field: str):
    v = obj.get(field)
    if field not in obj:
        raise UserError(f"{where}: field '{field}' is missing; expected a non-empty string")
    if isinstance(v, list):
        _check_messages(where, v, field)
    elif not isinstance(v, str) or not v.strip():
        raise UserError(f"{where}: field '{field}' must be a non-empty string, got {json.dumps(v)[:40]}")


def _check_messages(where: str, msgs, field: str = "messages"):
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: field '{field}' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(msgs):
        ok = isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
        if not ok or not isinstance(m.get("content"), str) or not m["content"].strip():
            raise UserError(f"{where}: field '{field}[{j}]' must be {{\"role\": system|user|assistant, "
                            f"\"content\": non-empty string}}")


def validate(where: str, obj: dict, kind: str) -> dict:
    """Check one record and return it in canonical form:
    sft -> {"messages": [...]} (at least one assistant turn); pairs -> {"prompt": messages, "chosen": str|messages,
    "rejected": ...}; prompts -> {"prompt": messages} (ending with a user turn)."""
    if kind == "sft":
        if "messages" in obj:
            _check_messages(where, obj["messages"])
            if not any(m["role"] == "assistant" for m in obj["messages"]):
                raise UserError(f"{where}: field 'messages' has no assistant turn to learn from")
            return {"messages": obj["messages"]}
        for f in ("prompt", "response"):
            _check_text(where, obj, f)
        return {"messages": to_messages(obj["prompt"]) + [{"role": "assistant", "content": obj["response"]}]}
    if kind == "pairs":
        for f in ("prompt", "chosen", "rejected"):
            _check_text(where, obj, f)
        out = {"prompt": to_messages(obj["prompt"]), "chosen": obj["chosen"], "rejected": obj["rejected"]}
        if "margin" in obj:
            if not isinstance(obj["margin"], (int, float)):
                raise UserError(f"{where}: field 'margin' must be a number")
            out["margin"] = float(obj["margin"])
        return out
    if kind == "prompts":
        if "messages" in obj:
            _check_messages(where, obj["messages"])
            if obj["messages"][-1]["role"] != "user":
                raise UserError(f"{where}: field 'messages' must end with a user turn")
            return {"prompt": obj["messages"]}
        _check_text(where, obj, "prompt")
        return {"prompt": to_messages(obj["prompt"])}
    raise ValueError(kind)


def load_data(spec: str, kind: str, split: str = "train") -> list[dict]:
    """Records for a stage. `spec` is `toy` (the demo, `split` picks its disjoint part), one or more JSONL files
    separated by commas, or the name of a Hugging Face dataset (when `datasets` is installed)."""
    if spec == "toy":
        return toy_data(kind, split)
    records = []
    for path in spec.split(","):
        if path.endswith((".jsonl", ".json")) or os.path.exists(path):
            records += [validate(w, o, kind) for w, o in _read_jsonl(path)]
            continue
        try:
            import datasets
        except ImportError:
            raise UserError(f"--data {path}: no such file (and `datasets` is not installed for hub datasets)")
        ds = datasets.load_dataset(path, split=split)
        records += [validate(f"{path}[{i}]", dict(o), kind) for i, o in enumerate(ds)]
    return records


def split_eval(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a fixed, seeded share of the records for evaluation."""
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(len(records) * fraction)) if fraction > 0 and len(records) > 1 else 0
    held = set(idx[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


# ----------------------------------------------------------------------------------------------------------------
# output folder, checkpoints, logging


# what these scripts write into an output folder: --overwrite removes these and nothing else
RUN_FILES = ("args.json", "metrics.jsonl", "checkpoints", "critic", "ema", "config.json", "generation_config.json",
             "model.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt",
             "tokenizer.model", "adapter_config.json", "adapter_model.safetensors")
RUN_PATTERNS = ("model-*-of-*.safetensors", ".staging-*")
LOCK = ".lock"
_held_locks = []  # (lock file, pid) taken by this process


def _run_of(folder: Path) -> dict | None:
    """The `_run` record of a folder's args.json when one of these scripts wrote it, else None."""
    try:
        saved = json.loads((folder / "args.json").read_text())
    except (OSError, ValueError):
        return None
    run = saved.get("_run") if isinstance(saved, dict) else None
    return run if isinstance(run, dict) and "script" in run else None


def _check_folder(p: Path, overwrite: bool, resume: bool, script: str):
    """The rules of an output folder that depend on what is in it (checked again under the lock)."""
    if p.exists() and not p.is_dir():
        raise UserError(f"--output_dir {p}: exists and is not a folder")
    if not p.is_dir() or not any(f.name != LOCK for f in p.iterdir()):
        if resume:
            raise UserError(f"--resume: --output_dir {p} holds no run to continue")
        return
    if not (overwrite or resume):
        raise UserError(f"--output_dir {p}: holds another run; pass --overwrite to replace it or --resume to "
                        "continue it")
    run = _run_of(p)
    if run is None:
        why = "has no args.json" if not (p / "args.json").exists() else "has an args.json they did not write"
        raise UserError(f"--output_dir {p}: --{'resume' if resume else 'overwrite'} only takes a run of these scripts "
                        f"(this folder {why}); remove it yourself or choose another folder")
    if resume and run["script"] != script:
        raise UserError(f"--resume: --output_dir {p} holds a run of {run['script']}, not of {script}")


def prepare_output_dir(output_dir: str, overwrite: bool, resume: bool, script: str = "", inputs: dict | None = None,
                       checkpoints: str = "checkpoints") -> str | None:
    """Check an output folder before anything is read or written; returns the checkpoint tag to resume from.

    Refused: a folder that is, or holds, one of the run's inputs (`inputs`: {flag: path or comma-separated paths});
    a folder with files in it unless --overwrite (only a run of these scripts) or --resume (only a run of the same
    script that has a complete checkpoint in `checkpoints`)."""
    p = Path(output_dir)
    if overwrite and resume:
        raise UserError("pass --overwrite (start again) or --resume (continue), not both")
    out = p.resolve()
    for flag, value in (inputs or {}).items():
        for path in str(value or "").split(","):
            if path and path != "toy" and os.path.exists(path):
                src = Path(path).resolve()
                if src == out or out in src.parents:
                    raise UserError(f"--output_dir {output_dir} holds {flag} {path}, an input of this run; choose "
                                    "another --output_dir")
    _check_folder(p, overwrite, resume, script)
    if not resume:
        return None
    tag = latest_checkpoint(p / checkpoints)
    if tag is None:
        raise UserError(f"--resume: {p / checkpoints} has no checkpoint to continue from (it is written every "
                        "--save_every steps); pass --overwrite to start the run again")
    return tag


def checkpoint_step(tag: str) -> int:
    """The step (or iteration) in one of our tags, `step12` or `iter4`; -1 for a tag we did not write."""
    digits = "".join(c for c in tag if c.isdigit())
    return int(digits) if digits and tag.endswith(digits) else -1


def check_resume(output_dir: str, args, tag: str, defining: tuple, run: dict, length: str, fixed: tuple = ()):
    """A resumed run must be the run of its checkpoint. `defining`: flags that define the run; `run`: derived
    figures saved beside them in args.json (global batch, ranks, run length...); `length` names the entry of `run`
    that may grow (a longer run continues; one that ends before the checkpoint is refused); `fixed`: names without
    which the checkpoint cannot be loaded (never accepted). Other differences are refused in one line unless named in
    --resume_changes."""
    saved = json.loads((Path(output_dir) / "args.json").read_text())
    old = {**saved, **saved["_run"]}
    new = {**json.loads(json.dumps(vars(args), default=str)), **json.loads(json.dumps(run, default=str))}
    step = checkpoint_step(tag)
    if step >= 0 and new[length] <= step:
        raise UserError(f"--resume: the checkpoint is at {step}, this run ends at {new[length]} ({length}); a run "
                        "that ends before its checkpoint would replace the model with an older one")
    # ranks matter through the global batch (same global batch, same run), unless the checkpoint is partitioned
    compared = dict.fromkeys(defining + tuple(k for k in run if k not in (length, "world_size")) + fixed)
    differ = [k for k in compared if k in old and old[k] != new[k]]
    if length in old and new[length] < old[length]:
        differ.append(length)
    hard = [k for k in differ if k in fixed]
    if hard:
        raise UserError("--resume: the checkpoint cannot be loaded with another " + ", ".join(
            f"{k} ({old[k]} -> {new[k]})" for k in hard))
    unaccepted = [k for k in differ if k not in getattr(args, "resume_changes", ())]
    if unaccepted:
        raise UserError("--resume: this is not the run of the checkpoint: " + ", ".join(
            f"{k} {old[k]} -> {new[k]}" for k in unaccepted) + f"; pass --resume_changes {' '.join(unaccepted)} to "
            "continue it so")


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ..., start time at index 19); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None = None) -> bool:
    """Whether process `pid` runs (not a zombie; with `start`, the very process that had that start time)."""
    if Path("/proc/self/stat").exists():
        stat = _proc_stat(pid)
        return stat is not None and stat[0] != "Z" and (start is None or stat[19] == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _release_lock(lock: Path, pid: int):
    try:
        if json.loads(lock.read_text()).get("pid") == pid:
            lock.unlink()
    except (OSError, ValueError):
        pass


def take_lock(folder: Path):
    """One run per folder: `folder/.lock` holds the owner's pid, host and start time; a lock whose process is gone
    is stale and replaced. Released at exit."""
    lock = folder / LOCK
    stat = _proc_stat(os.getpid())
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": stat[19] if stat else None}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text())
            except (OSError, ValueError):  # being written this instant, or torn by a crash long ago
                owner = {} if time.time() - lock.stat().st_mtime > 10 else {"pid": "?", "host": me["host"]}
            if owner and owner.get("host") != me["host"]:
                raise UserError(f"--output_dir {folder}: in use by pid {owner.get('pid')} on {owner.get('host')} "
                                f"({lock}); if no run is going there, remove that file")
            if owner and (owner["pid"] == "?" or _alive(owner["pid"], owner.get("start"))):
                raise UserError(f"--output_dir {folder}: in use by another run (pid {owner['pid']}, {lock}); wait "
                                "for it to end or stop it")
            print(f"note: removing the stale lock {lock} (pid {owner.get('pid')} is gone)", file=sys.stderr)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(_release_lock, lock, me["pid"])
        _held_locks.append((lock, me["pid"]))
        return
    raise UserError(f"--output_dir {folder}: cannot take {lock}")


def start_output_dir(output_dir: str, args, overwrite: bool, resume: bool, run: dict | None = None):
    """Rank 0 creates the folder, takes its lock, checks it again (another run may have come and gone), removes the
    files of the old run with --overwrite (RUN_FILES only) and writes args.json: the arguments and, under `_run`,
    the script and derived figures (`run`) that --resume compares. Other ranks wait; an error stops every rank."""
    error = None
    if is_rank0():
        try:
            p = Path(output_dir)
            p.mkdir(parents=True, exist_ok=True)
            take_lock(p)
            _check_folder(p, overwrite, resume, (run or {}).get("script", ""))
            if overwrite:
                for f in p.iterdir():
                    if f.name in RUN_FILES or any(f.match(pattern) for pattern in RUN_PATTERNS):
                        if f.is_dir() and not f.is_symlink():
                            shutil.rmtree(f)
                        else:
                            f.unlink()
            saved = json.loads(json.dumps(vars(args), default=str)) | {"_run": run or {}}
            (p / "args.json.tmp").write_text(json.dumps(saved, indent=2) + "\n")
            os.replace(p / "args.json.tmp", p / "args.json")
        except UserError as e:
            error = e
    if dist.is_initialized() and world_size() > 1:
        message = [str(error.code) if error else None]
        dist.broadcast_object_list(message, src=0)
        if message[0] and error is None:
            raise UserError(f"rank 0 stopped: {message[0]}")
    if error:
        raise error


def merged_state_dict(model) -> dict:
    """Weights on CPU; for a peft LoRA model, the base weights with `B @ A * scale` added (the adapter merged)."""
    if not hasattr(model, "peft_config"):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    state = {}
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            w = module.get_base_layer().weight.detach()
            for adapter in module.active_adapters:
                w = w + module.get_delta_weight(adapter).to(w.dtype)
            state[f"{name}.weight"] = w.cpu().clone()
    for k, v in model.get_base_model().state_dict().items():
        if "lora_" in k or ".original_module." in k:  # adapters (merged above); heads replaced by a trained copy
            continue
        k = k.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        state.setdefault(k, v.detach().cpu().clone())
    return state


def save_hf(model, tokenizer, output_dir: str, zero_stage: int, extra_config: dict | None = None,
            lora_adapter: bool = False):
    """Save a Hugging Face folder (safetensors + tokenizer) from rank 0, gathering ZeRO-3 shards first; LoRA weights
    are merged in unless `lora_adapter` (then a peft adapter folder is written). Every rank must call this. Files go
    to a staging folder and are moved into place with config.json last, after the old config.json is removed:
    whenever config.json exists, the files beside it are one complete model."""
    import deepspeed

    params = list(model.parameters())
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else _nullcontext()
    with ctx:
        if is_rank0():
            out = Path(output_dir)
            stage = out / f".staging-{os.getpid()}"
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir(parents=True)
            atexit.register(shutil.rmtree, stage, ignore_errors=True)  # a failed save (a full disk) leaves nothing
            if lora_adapter and hasattr(model, "peft_config"):
                model.save_pretrained(stage, safe_serialization=True)
            else:
                base = model.get_base_model() if hasattr(model, "peft_config") else model
                for k, v in (extra_config or {}).items():
                    setattr(base.config, k, v)
                base.save_pretrained(stage, state_dict=merged_state_dict(model), safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(stage)
            for name in ("config.json", "adapter_config.json"):
                (out / name).unlink(missing_ok=True)
            files = sorted(stage.iterdir(), key=lambda f: f.name in ("config.json", "adapter_config.json"))
            for f in files:
                os.replace(f, out / f.name)
            stage.rmdir()
    if dist.is_initialized():
        dist.barrier()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def check_finite(values: dict, step: int):
    """A NaN/inf loss or reward stops the run before anything new is saved."""
    for k, v in values.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"step {step}: {k} is {v}; stopping without saving (try a lower learning rate, "
                            "--dtype fp32, or check the data)")


class Logger:
    """Rank 0 writes metrics.jsonl and a tqdm bar; other ranks get a logger that does nothing."""

    def __init__(self, output_dir: str, total: int, desc: str, initial: int = 0):
        self.on = is_rank0()
        self.path = Path(output_dir) / "metrics.jsonl"
        self.t0 = time.time()
        self.bar = None
        if self.on:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, file=sys.stdout,
                            disable=os.environ.get("TQDM_DISABLE") == "1")

    def log(self, step: int, metrics: dict, advance: int = 0):
        if not self.on:
            return
        row = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if advance:
            self.bar.update(advance)
        shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float)}
        self.bar.set_postfix(shown, refresh=False)
        if any(k.startswith("eval/") for k in metrics):
            self.bar.write(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                        if isinstance(v, float)))

    def close(self):
        if self.bar is not None:
            self.bar.close()


def truncate_log(output_dir: str, step: int):
    """On resume, drop metric rows written after the checkpoint we continue from. A last line cut short by a crash
    is dropped with a notice; a bad line before it is an error."""
    p = Path(output_dir) / "metrics.jsonl"
    if not is_rank0() or not p.exists():
        return
    lines = [line for line in p.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n < len(lines):
                raise UserError(f"{p}:{n}: not a JSON line; fix or remove it to resume")
            print(f"note: {p}:{n}: dropped a line cut short by the interruption", file=sys.stderr)
            continue
        if row.get("step", 0) <= step:
            rows.append(line)
    p.write_text("".join(r + "\n" for r in rows))


def latest_checkpoint(folder) -> str | None:
    """The tag of the newest complete DeepSpeed checkpoint in `folder` (DeepSpeed writes `latest` only after the
    shards); a `latest` naming a missing tag is an error."""
    latest = Path(folder) / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    if not tag or not (Path(folder) / tag).is_dir():
        raise UserError(f"{latest} names checkpoint {tag!r}, which is not there; write the tag of a checkpoint "
                        f"folder of {folder} into it, or pass --overwrite to start again")
    return tag


def load_checkpoint(engine, folder: str, tag: str) -> dict:
    """engine.load_checkpoint with one-line errors: a missing or corrupt shard (a truncated file, a failed copy)
    fails inside torch.load in many ways. Returns the client state."""
    try:
        path, state = engine.load_checkpoint(folder, tag)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{folder}/{tag}: cannot load this checkpoint ({type(e).__name__}: {first}); it may be "
                        "corrupt: point `latest` at an older tag, or pass --overwrite to start again")
    if path is None:
        raise UserError(f"{folder}/{tag}: checkpoint not found")
    return state or {}


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# ----------------------------------------------------------------------------------------------------------------
# the built-in demo task ("toy"): an assistant world whose human preference is a program, gold_score

TOPICS = ["cats", "dogs", "rain", "music", "coffee", "books", "trains", "gardens", "oceans", "mountains", "bread",
          "chess", "winter", "robots", "birds", "tea", "bikes", "stars", "rivers", "cheese", "clocks", "forests",
          "soup", "lamps"]
POSITIVE = ["lovely", "great", "warm", "bright", "kind", "calm", "fun", "sweet", "nice", "good"]
NEGATIVE = ["awful", "dull", "cold", "sad", "bad", "grim", "noisy", "boring", "ugly", "rough"]
VERBS = ["are", "seem", "feel", "look"]
FILLERS = ["i think", "to me", "really", "very", "so", "truly"]
ASKS = ["tell me about {t}", "what do you think of {t} ?", "say something about {t}", "describe {t}",
        "give me a line about {t}", "write about {t}"]
OPENERS = ["", "please ", "hey , ", "quick question : "]
SPLITS = {"sft": (0, 40), "reward": (40, 70), "ppo": (70, 90), "eval": (90, 100)}  # percent of the prompt set
TOY_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}"
                     "<|endoftext|>{% else %}<|{{ m['role'] }}|>{{ m['content'] }}{% endif %}{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def toy_prompts(split: str) -> list[str]:
    """The demo's prompts of one split; the splits are disjoint (DeepSpeed-Chat's data split)."""
    every = [o + a.format(t=t) for t in TOPICS for a in ASKS for o in OPENERS]
    random.Random(1234).shuffle(every)
    lo, hi = SPLITS[split]
    return every[len(every) * lo // 100: len(every) * hi // 100]


def prompt_topic(prompt: str) -> str | None:
    words = prompt.replace("?", " ").split()
    return next((w for w in reversed(words) if w in TOPICS), None)


def gold_score(prompt: str, response: str) -> float:
    """The hidden human of the demo, in [0, 1]: on topic (0.35), positive words (0.35), ends cleanly with one final
    " ." and 4-12 words (0.15), no word used more than twice (0.15)."""
    words = response.split()
    if not words:
        return 0.0
    topic = prompt_topic(prompt)
    on_topic = 1.0 if topic in words and not any(w in TOPICS for w in words if w != topic) else 0.0
    adjectives = [w for w in words if w in POSITIVE or w in NEGATIVE]
    positive = sum(w in POSITIVE for w in adjectives) / len(adjectives) if adjectives else 0.0
    clean = 1.0 if words[-1] == "." and words.count(".") == 1 and 4 <= len(words) <= 12 else 0.0
    varied = 1.0 if max(Counter(words).values()) <= 2 else 0.0
    return 0.35 * on_topic + 0.35 * positive + 0.15 * clean + 0.15 * varied


def toy_response(prompt: str, rng: random.Random) -> str:
    """One demonstration of mixed quality: each of gold_score's parts is met only part of the time."""
    topic = prompt_topic(prompt)
    subject = topic if rng.random() < 0.5 else rng.choice(TOPICS)
    adjs = [rng.choice(POSITIVE if rng.random() < 0.5 else NEGATIVE) for _ in range(rng.choice([1, 2, 2, 3]))]
    words = [subject, rng.choice(VERBS)]
    if rng.random() < 0.3:
        words += rng.choice(FILLERS).split()
    if rng.random() < 0.25:
        words += [adjs[0]] * 3  # a repetitive answer
    words += " and ".join(adjs).split()
    if rng.random() < 0.6:
        words.append(".")
    elif rng.random() < 0.5:
        words += [". and", rng.choice(TOPICS)]
    return " ".join(words)


def toy_data(kind: str, split: str) -> list[dict]:
    """Demo records: SFT demonstrations, gold-labelled preference pairs, or prompts. `split` is train/eval; the
    train split of each kind uses its own prompt set, every eval split uses the shared eval prompts."""
    part = {"sft": "sft", "pairs": "reward", "prompts": "ppo"}[kind] if split == "train" else "eval"
    prompts = toy_prompts(part)
    rng = random.Random(f"{kind}-{split}")
    if kind == "prompts":  # PPO: 4096 draws from the PPO prompts; eval: each eval prompt once
        draws = [rng.choice(prompts) for _ in range(4096)] if split == "train" else prompts
        return [{"prompt": to_messages(p)} for p in draws]
    n = {"sft": 6000, "pairs": 16000}[kind] if split == "train" else 256
    records = []
    while len(records) < n:
        p = rng.choice(prompts)
        if kind == "sft":
            records.append({"messages": to_messages(p) + [{"role": "assistant", "content": toy_response(p, rng)}]})
        else:
            a, b = toy_response(p, rng), toy_response(p, rng)
            ga, gb = gold_score(p, a), gold_score(p, b)
            if abs(ga - gb) >= 0.15:
                chosen, rejected = (a, b) if ga > gb else (b, a)
                records.append({"prompt": to_messages(p), "chosen": chosen, "rejected": rejected})
    return records


def toy_tokenizer():
    """A byte-level BPE tokenizer trained with `tokenizers` on the demo's words, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]
    rng = random.Random(0)
    corpus = toy_prompts("sft") + toy_prompts("reward") + toy_prompts("ppo") + toy_prompts("eval")
    corpus += [toy_response(p, rng) for p in corpus for _ in range(3)]
    corpus += [" ".join(TOPICS + POSITIVE + NEGATIVE + VERBS + FILLERS)] * 10
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   additional_special_tokens=specials[2:])
    fast.chat_template = TOY_CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def toy_model(tokenizer):
    """A ~1M-parameter Llama-shaped causal LM (dropout 0), random weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return AutoModelForCausalLM.from_config(cfg)
