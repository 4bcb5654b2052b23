"""The thin shared part of sft.py, reward.py, ppo.py and chat.py: errors, ranks and start-up, the DeepSpeed
config, tokenization, model loading and HF checkpoints, logging. The other shared concerns are modules beside this
one (template, data, runs, flags, logprobs, toy, launcher, dropout); this file imports only the leaves (toy, launcher,
dropout) and template (re-exported by name), and no module of common imports a stage script. No
training loop, loss or RL math lives here."""

import atexit
import contextlib
import functools
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common import launcher, toy
from common.dropout import disable_dropout, loaded_dropout  # noqa: F401 (common.disable_dropout)


class UserError(SystemExit):
    """A mistake in the user's input (flag, file, data). Python prints the message as one line and exits with
    status 1, without a traceback, because this is a SystemExit."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


sys.excepthook = launcher.excepthook  # a full disk, a lost rank, Ctrl-C: one line, no traceback


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
        launcher.watch_launcher()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        # tear the process group down at exit while the interpreter is whole: left to the interpreter's own teardown,
        # gloo's threads can abort a finished rank ("terminate called without an active exception", pytorch#190489)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
        # torch prefixes an uncaught error's lines with "[rankN]: " (its hook wraps ours); a full disk stays one line
        sys.excepthook = functools.partial(launcher.excepthook, other_errors=sys.excepthook)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    # CPU ranks on one machine share the cores (oversubscribed OpenMP threads: 30x slower with 2 ranks on 2 cores)
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ["WORLD_SIZE"])
    if local > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    launcher.keep_freed_memory()
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


# ----------------------------------------------------------------------------------------------------------------
# tokenizer, model loading and prompt formatting


def check_model_path(name: str, flag: str):
    """A local-looking path that does not exist is a user error, not a hub lookup that fails deep inside."""
    if name == "toy":
        return
    looks_local = (name.startswith((".", "/", "~")) or os.sep in name.rstrip("/") and name.count("/") != 1
                   or os.path.isdir(name.split("/")[0]))  # `run/typo` beside a folder `run`: not a hub org
    if looks_local and not os.path.isdir(os.path.expanduser(name)):
        raise UserError(f"{flag} {name}: no such model folder")
    if os.path.isdir(name) and not os.path.exists(os.path.join(name, "config.json")):
        raise UserError(f"{flag} {name}: folder has no config.json (not a Hugging Face model)")


def note(message: str):
    """A default adapted to the model, the data or another flag: said once, on stderr, by rank 0."""
    if is_rank0():
        print(f"note: {message}", file=sys.stderr, flush=True)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer of a model folder or hub name, as it is: no token is ever added (padding is masked, any id)."""
    from transformers import AutoTokenizer

    if name == "toy":
        return toy.toy_tokenizer()
    if os.path.isdir(name) and not any(os.path.exists(os.path.join(name, f)) for f in TOKENIZER_FILES):
        raise UserError(f"{name}: the folder has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); "
                        "copy them from the model it was trained from")
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:  # not a folder, not on the hub, no network, an unknown class
        raise UserError(f"{name}: cannot load a tokenizer: {(str(e).strip().splitlines() or [repr(e)])[0][:300]}")
    if not tok("Hello world", add_special_tokens=False)["input_ids"]:  # (transformers makes an empty one from none)
        raise UserError(f"{name}: its tokenizer encodes text to no tokens; expected the model's own tokenizer files")
    if tok.eos_token_id is None:
        raise UserError(f"{name}: the tokenizer has no EOS token; set one in its tokenizer_config.json")
    return tok


def pad_id(tokenizer) -> int:
    """The id written in padded positions: the pad token, else EOS (masked either way, so never learned as one)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def check_vocab(model, tokenizer, flag: str):
    """One line where the tokenizer has ids the model's embedding cannot look up (a mismatched folder)."""
    rows = model.get_input_embeddings().weight.shape[0]  # (models are checked before DeepSpeed shards them)
    if rows < len(tokenizer):
        raise UserError(f"{flag}: the tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows} "
                        "rows; pass the tokenizer the model was trained with")


def to_messages(example) -> list[dict]:
    """A prompt string or a message list, as a message list."""
    if isinstance(example, str):
        return [{"role": "user", "content": example}]
    return list(example)


from common.template import (  # noqa: E402,F401 (the chat-template section, common.encode_prompt etc.)
    render, format_prompt, _segments, special_ids, turn_tokens, _traits, _encode, _piece_ids, encode_conversation,
    encode_prompt, encode_scored, encode_plain, encode_record, stop_token_ids, decode_answers, template_gap,
    show_example, cut_tokens, fit_turns, fit_record, truncate_left, _TRAITS, _TURNS,
)


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
        model = toy.toy_model(tokenizer)
    else:
        model = from_pretrained(AutoModelForCausalLM, name, flag, dtype=dtype, trust_remote_code=trust_remote_code)
        if all(a.endswith("ForSequenceClassification") for a in model.config.architectures or ["-"]):
            raise UserError(f"{flag} {name} is a sequence classifier ({model.config.architectures[0]}: a reward model "
                            "or critic), not a causal LM; its LM head would be random")
    check_vocab(model, tokenizer, flag)
    return model.to(dtype)


def scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A classifier's score head at every position, [B, T] fp32 (not HF's pooling: it looks for the pad id)."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine's model
    inner = inner.get_base_model() if hasattr(inner, "peft_config") else inner
    hidden = inner.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
    return inner.score(hidden).squeeze(-1).float()


def load_data(spec: str, kind: str, split: str | None = None, skip_invalid: bool = False) -> list[dict]:
    """Canonical records of a data spec (common.data.load_data, here too: DESIGN's contract names common.load_data)."""
    from common import data  # at call time: data imports this module

    return data.load_data(spec, kind, split, skip_invalid)


def with_lora(model, rank: int, alpha: float, task_type: str):
    """A peft LoRA adapter on every linear layer (no dropout); rank 0: the model as it is."""
    if rank == 0:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type=task_type)
    return get_peft_model(model, config)


def from_pretrained(cls, name: str, flag: str, **kwargs):
    """cls.from_pretrained(name, **kwargs), with one line for a model whose files are damaged (a weights file cut
    short by a failed copy or a full disk fails deep inside safetensors or torch)."""
    from safetensors import SafetensorError

    try:
        model, info = cls.from_pretrained(name, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except (OSError, SafetensorError, ValueError, KeyError) as e:  # (ValueError: a model_type transformers lacks)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{flag} {name}: cannot load the model ({first})" + "; are its files complete?" * (
            not isinstance(e, (ValueError, KeyError))))
    head = ("score", "classifier")  # a new head: the one expected miss
    for key, saved, built in info["mismatched_keys"]:
        if key.split(".")[0] not in head:
            raise UserError(f"{flag} {name}: weight {key} is {list(saved)} in its files but {list(built)} in the "
                            "model its config.json describes (vocab_size, hidden_size, ...); the config and the "
                            "weights disagree")
    missing = [k for k in info["missing_keys"] if k.split(".")[0] not in head]
    total = len(model.state_dict())
    if len(missing) > total / 2 or len(info["unexpected_keys"]) > total / 2:
        raise UserError(f"{flag} {name}: {len(missing)} of the model's {total} weights are not in its files and "
                        f"{len(info['unexpected_keys'])} of its files' weights are not in the model (another "
                        "architecture, or weights saved under a prefix such as `module.`); refusing random weights")
    return model


def write_whole(path, text: str):
    """Write a file through a temporary one moved into place: a kill or a full disk never leaves it half written. A
    link's target is written (the link stays); what is not a regular file (a FIFO), and /dev/, /proc/ paths
    (/dev/stdout, even redirected to a file), are written into."""
    if str(path).startswith(("/dev/", "/proc/")) or os.path.exists(path) and not os.path.isfile(path):
        with open(path, "w", encoding="utf-8") as f:
            return f.write(text)
    path = Path(path).resolve()
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@torch.no_grad()
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
            lora_adapter: bool = False, state_dict: dict | None = None):
    """An HF folder (safetensors + tokenizer) from rank 0, ZeRO-3 shards gathered, LoRA merged unless `lora_adapter`;
    `state_dict` replaces the weights. Every rank calls it. Staged, then moved in with config.json last: whenever
    config.json exists, the files beside it are one complete model."""
    import deepspeed

    params = list(model.parameters())
    gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else None
    with gathered or contextlib.nullcontext():
        if is_rank0():
            out = Path(output_dir)
            stage = out / f".staging-{os.getpid()}"
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir(parents=True)
            atexit.register(shutil.rmtree, stage, ignore_errors=True)  # a failed save (a full disk) leaves nothing
            if lora_adapter and hasattr(model, "peft_config"):
                for config in model.peft_config.values():  # so that the adapter loads from any working folder
                    if config.base_model_name_or_path and os.path.isdir(config.base_model_name_or_path):
                        config.base_model_name_or_path = os.path.abspath(config.base_model_name_or_path)
                model.save_pretrained(stage, safe_serialization=True)
                (stage / "README.md").unlink(missing_ok=True)  # peft's model card: it would replace a user's README
            else:
                base = model.get_base_model() if hasattr(model, "peft_config") else model
                for k, v in (extra_config or {}).items():
                    setattr(base.config, k, v)
                weights = merged_state_dict(model) if state_dict is None else state_dict
                rates = loaded_dropout(base.config)  # the config as it came in: dropout rates included
                zeroed = {k: getattr(base.config, k) for k in rates}
                base.config.update(rates)
                base.save_pretrained(stage, state_dict=weights, safe_serialization=True)
                base.config.update(zeroed)
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


def check_finite(values: dict, step: int):
    """A NaN/inf loss or reward stops the run before anything new is saved."""
    for k, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
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
        check_finite(metrics, step)  # every value as it is made (on every rank: they stop together)
        if not self.on:
            return
        row = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
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
        for closing in (self.bar and self.bar.close, self.tb and self.tb.close, self.wandb and self.wandb.finish):
            if closing:
                closing()
