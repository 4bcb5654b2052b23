"""Shared plumbing for sft.py, reward.py, ppo.py and chat.py: distributed set-up, the DeepSpeed config, tokenizer
and prompt formatting, data loading, checkpoint I/O, logging, seeding and the built-in demo task ("toy").

Thin on purpose: no training loop, loss or RL math lives here (those stay in each stage's script)."""

import atexit
import json
import math
import os
import random
import shutil
import socket
import sys
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


# ----------------------------------------------------------------------------------------------------------------
# distributed set-up


def init_distributed() -> torch.device:
    """One code path for `python x.py`, `deepspeed x.py` and `torchrun`: without a launcher we set up a one-process
    world ourselves, because deepspeed.init_distributed would otherwise look for MPI."""
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        # tear the process group down at exit while the interpreter is whole: left to the interpreter's own teardown,
        # gloo's threads can abort a finished rank ("terminate called without an active exception", pytorch#190489)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    # CPU ranks on one machine: share the cores instead of each taking all of them (oversubscribed OpenMP threads
    # spin against each other and the gloo/shm collectives: 30x slower PPO iterations with 2 ranks on 2 cores)
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ["WORLD_SIZE"])
    if local > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return torch.device("cpu")


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


def note(message: str):
    """A default adapted to the model, the data or another flag: said once, on stderr, by rank 0."""
    if is_rank0():
        print(f"note: {message}", file=sys.stderr, flush=True)


def model_context(name: str, trust_remote_code: bool = False) -> int | None:
    """The longest sequence a model's positions allow (its config's max_position_embeddings or alike), or None."""
    if name == "toy":
        return TOY_CONTEXT
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None  # the model's own loader reports it
    cfg = getattr(cfg, "text_config", None) or cfg
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(getattr(cfg, key, None), int) and getattr(cfg, key) > 0:
            return getattr(cfg, key)
    return None


def fit_max_seq_len(max_seq_len: int | None, context: int | None, default: int = 512) -> int:
    """--max_seq_len: the user's value (refused when the model's positions stop earlier), else `default` cut to the
    model's context."""
    if max_seq_len is not None:
        if context is not None and max_seq_len > context:
            raise UserError(f"--max_seq_len {max_seq_len} is longer than the model's context of {context} tokens "
                            "(max_position_embeddings)")
        return max_seq_len
    if context is not None and context < default:
        note(f"--max_seq_len {context}: the model's context (max_position_embeddings) is shorter than {default}")
        return context
    return default


def fit_micro_batch(per_device: int | None, n_examples: int, ranks_x_accum: int, what: str, default: int = 16) -> int:
    """--per_device_batch_size: the user's value, else `default`, shrunk so that the data holds one global batch."""
    if per_device is not None:
        return per_device
    fit = max(1, min(default, n_examples // ranks_x_accum))
    if fit < default:
        note(f"--per_device_batch_size {fit}: {n_examples} training {what} hold no global batch of the default {default}")
    return fit


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


def prepare_output_dir(output_dir: str, overwrite: bool, resume: bool):
    """Refuse to mix two runs in one folder unless asked; call before anything is written."""
    p = Path(output_dir)
    if p.exists() and not p.is_dir():
        raise UserError(f"--output_dir {output_dir}: exists and is not a folder")
    if p.is_dir() and any(p.iterdir()) and not (overwrite or resume):
        raise UserError(f"--output_dir {output_dir}: holds another run; pass --overwrite to replace it or --resume "
                        "to continue it")
    if overwrite and not resume and p.is_dir() and any(p.iterdir()) and not (p / "args.json").exists():
        # --overwrite deletes the folder: never a folder these scripts did not write (say `.` or a home folder)
        raise UserError(f"--output_dir {output_dir}: --overwrite only replaces a run of these scripts (this folder "
                        "has no args.json); remove it yourself or choose another folder")


def start_output_dir(output_dir: str, args, overwrite: bool, resume: bool):
    """Rank 0 creates the folder (emptied with --overwrite) and writes args.json."""
    if is_rank0():
        p = Path(output_dir)
        if overwrite and not resume and p.is_dir():
            shutil.rmtree(p)
        p.mkdir(parents=True, exist_ok=True)
        (p / "args.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n")
    if dist.is_initialized():
        dist.barrier()


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


REPORT_TO = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb"}  # --report_to: the package it needs


def check_report_to(report_to: str):
    """--report_to names a tracker whose package is installed (checked before anything is loaded)."""
    import importlib.util

    if report_to not in REPORT_TO:
        raise UserError(f"--report_to {report_to}: expected one of {', '.join(REPORT_TO)}")
    package = REPORT_TO[report_to]
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"--report_to {report_to}: the `{package}` package is not installed (pip install {package}); "
                        "metrics.jsonl is written without it")


class Logger:
    """Rank 0 writes metrics.jsonl (the source of truth), a tqdm bar, and with `report_to` the same rows to
    TensorBoard (output_dir/tensorboard) or Weights & Biases (run named after output_dir, `config` as its config;
    WANDB_MODE=offline works without a network); other ranks get a logger that does nothing."""

    def __init__(self, output_dir: str, total: int, desc: str, initial: int = 0, report_to: str = "none",
                 config: dict | None = None):
        self.on = is_rank0()
        self.path = Path(output_dir) / "metrics.jsonl"
        self.t0 = time.time()
        self.bar = self.tb = self.wandb = None
        if self.on:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, file=sys.stdout,
                            disable=os.environ.get("TQDM_DISABLE") == "1")
            check_report_to(report_to)
            config = json.loads(json.dumps(config or {}, default=str))
            name = Path(output_dir).resolve().name
            if report_to == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
                self.tb.add_text("args", "    " + json.dumps(config, indent=2).replace("\n", "\n    "), initial)
            elif report_to == "wandb":
                import wandb

                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "hackable-rlhf"), name=name,
                                        job_type=desc, config=config, dir=str(output_dir))

    def log(self, step: int, metrics: dict, advance: int = 0):
        if not self.on:
            return
        row = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
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
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def truncate_log(output_dir: str, step: int):
    """On resume, drop metric rows written after the checkpoint we continue from."""
    p = Path(output_dir) / "metrics.jsonl"
    if is_rank0() and p.exists():
        rows = [line for line in p.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        p.write_text("".join(r + "\n" for r in rows))


def latest_checkpoint(output_dir: str) -> str | None:
    """The tag of the newest complete DeepSpeed checkpoint: DeepSpeed writes `latest` only after the shards."""
    p = Path(output_dir) / "checkpoints" / "latest"
    return p.read_text().strip() if p.exists() else None


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


def gold_reward_fn(prompts: list[list[dict]], responses: list[str]) -> list[float]:
    """The demo's gold score as a reward function for `ppo.py --reward_fn common:gold_reward_fn` (the upper bound
    a learned reward model is compared with)."""
    return [gold_score(messages[-1]["content"], response) for messages, response in zip(prompts, responses)]


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


TOY_CONTEXT = 256


def toy_model(tokenizer):
    """A ~1M-parameter Llama-shaped causal LM (dropout 0), random weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=TOY_CONTEXT,
                      tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return AutoModelForCausalLM.from_config(cfg)
