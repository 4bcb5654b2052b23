"""Shared plumbing for sft.py, reward.py, ppo.py and chat.py: distributed set-up, the DeepSpeed config, tokenizer
and prompt formatting, token log-probs without the B x T x V logits, data loading, checkpoint I/O, logging, seeding
and the built-in demo task ("toy").

Thin on purpose: no training loop, loss or RL math lives here (those stay in each stage's script)."""

import atexit
import copy
import ctypes
import errno
import functools
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import threading
import time
import weakref
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
    """A full disk is one line, not a traceback (the newest checkpoint stays usable: `latest` is written last,
    save_hf moves config.json in last). torch.save reports it as a RuntimeError, safetensors as its own. So is a
    collective that fails because another rank stopped with its own error (one rank's bad --reward_fn call)."""
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
                  "checkpoint if the run saved one (--save_every), else run it again", file=sys.stderr)
            return
    lost = ("Connection closed by peer", "Connection reset by peer", "remote process exited")  # gloo, NCCL
    if isinstance(value, RuntimeError) and any(m in str(value) for m in lost):  # another rank stopped first
        print("error: another rank stopped (its error is above); this one stops too", file=sys.stderr)
        return
    if kind is KeyboardInterrupt:  # Ctrl-C: the output folder is as a kill leaves it (see README, Reliability)
        print("interrupted (Ctrl-C); --resume continues from the last checkpoint, if the run saved one",
              file=sys.stderr)
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
    keep_freed_memory()
    return torch.device("cpu")


def keep_freed_memory():
    """CPU runs: glibc gives each freed block of a few MiB (activations, logits) back to the kernel and faults it in
    again at the next forward, page by page (10k page faults an iteration, ~10% of a PPO iteration on the peer
    fixture). Blocks under 32 MiB are kept in the heap instead, and up to 64 MiB of free memory at its top, as
    jemalloc or tcmalloc would. Not where the user tunes malloc (MALLOC_*_ / GLIBC_TUNABLES) or brings another."""
    if any(k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD") for k in os.environ):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's C library
    except (OSError, AttributeError):  # not glibc (macOS): nothing to tune
        return
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD


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
    """Dropout off everywhere: PPO's ratio and the reference's log-probs assume a deterministic model. Many models
    copy the config's rate into a float attribute at init (OPT's `self.dropout`, Llama's `self.attention_dropout`,
    OPT's `layerdrop`), so those are zeroed too, not only nn.Dropout modules and the config."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for key, value in list(vars(m).items()):
            if type(value) is float and ("dropout" in key or key.endswith(("pdrop", "layerdrop"))):
                setattr(m, key, 0.0)
    cfg = getattr(model, "config", None)
    for key in ("dropout", "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "activation_dropout", "attention_probs_dropout_prob", "hidden_dropout_prob", "classifier_dropout",
                "layerdrop"):
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)


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


def fit_micro_batch(per_device: int | None, n_examples: int, ranks_x_accum: int, what: str,
                    default: int = 16) -> int:
    """--per_device_batch_size: the user's value, else `default`, shrunk so that the data holds one global batch."""
    if per_device is not None:
        return per_device
    fit = max(1, min(default, n_examples // ranks_x_accum))
    if fit < default:
        note(f"--per_device_batch_size {fit}: {n_examples} training {what} hold no global batch of the default "
             f"{default}")
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
    """The rendered conversation cut into (text, message index) pieces, in the text's order: a message's content
    where the template wrote it (index j), the template's own markup between them (None). Each content is found by
    rendering the conversation again with a marker in its place: the text before the marker is the text before the
    content. So a template may trim a content (Llama 2 and 3 do), strip the text around it (Llama 2's system block)
    or move it (Mistral's system message goes into the last user turn; written nowhere when an answer follows)."""
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
        if piece is None:
            raise UserError(f"the chat template rewrites the text of a {m['role']} message, or writes it twice "
                            f"(cannot place {m['content'][:40]!r} in its rendering)")
        found.append((k, j, piece))
    out, start = [], 0
    for k, j, piece in sorted(found):
        if k < start:
            raise UserError(f"the chat template writes {messages[j]['role']} message {j} inside another message")
        out += [(text[start:k], None), (piece, j)]
        start = k + len(piece)
    return out + [(text[start:], None)]


def special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens (EOS, BOS, pad, a template's turn markers), and of the plain added
    tokens its chat template writes as turn markers (turn_tokens)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return (set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
            | set(turn_tokens(tokenizer)[0].values()))


_TRAITS, _TURNS = weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary()


def turn_tokens(tokenizer) -> tuple[dict, object]:
    """Added tokens not flagged special that the chat template writes where a turn ends and the next begins, as
    `<|im_start|>` and `<|im_end|>` are when a fine-tuning framework added them as plain tokens (axolotl's
    `tokens:`): ({text: id}, a copy of the Rust tokenizer in which they are special). They are turn markers all the
    same: they end an answer's turn, and a content keeps their text as text. A plain added token the template writes
    only inside an answer's turn (Qwen3's `<think>`) stays one token in contents, as the model writes it."""
    if tokenizer not in _TURNS:
        plain = {t.content: i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                 if not getattr(t, "special", False) and t.content and not t.content.isalnum()  # markup, not a word
                 and not any(c.isspace() for c in t.content)}  # nor white space the template writes anyway
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                 {"role": "user", "content": "bye"}]
        markup = ""
        if plain and getattr(tokenizer, "chat_template", None):
            try:  # the markup before each user message: the end of the turn before it and the start of its own
                pieces = _segments(tokenizer, probe, False)
                markup = "".join(pieces[k - 1][0] for k, (_, j) in enumerate(pieces) if j in (0, 2))
            except UserError:
                pass
        found = {text: i for text, i in plain.items() if text in markup}
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


def _encode(tokenizer, text: str, plain: bool) -> list[int]:
    """Ids of a text, no special tokens added (`plain`: special-token strings stay text), through the Rust tokenizer
    where there is one: the Python wrapper costs ~0.1 ms a call, 4 s for the demo's 6,000 conversations."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=plain)["input_ids"]
    turns, split = turn_tokens(tokenizer)
    if plain and split is not None and any(t in text for t in turns):  # plain turn markers stay text too
        backend = split
    before, backend.encode_special_tokens = backend.encode_special_tokens, plain
    try:
        return backend.encode(text, add_special_tokens=False).ids
    finally:
        backend.encode_special_tokens = before


def _piece_ids(tokenizer, text: str, plain: bool, first: bool) -> list[int]:
    """Token ids of one piece of a conversation (`plain`: special-token strings stay text). SentencePiece-style
    tokenizers put a "▁" (a space) before every input: a piece inside the text is tokenised after a newline whose
    ids are then cut, so it gets no space the template did not write."""
    ids = _encode(tokenizer, text, plain)
    if first or not ids or not _traits(tokenizer)[1]:
        return ids
    for sentinel in ("\n", "\ue000"):  # a vocabulary that merges "\n" with what follows: a private-use character
        head = _encode(tokenizer, sentinel, False)
        both = _encode(tokenizer, sentinel + text, plain)
        if both[: len(head)] == head:
            return both[len(head):]
    return ids


def encode_conversation(tokenizer, messages: list[dict], add_generation_prompt: bool = False
                        ) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation, the template's own rendering (see render), and a mask that is True on each
    assistant answer and the token(s) that end its turn: up to the first special token the template writes after
    it (`<|im_end|>`, `<|eot_id|>`, the EOS), or an EOS id put in when the template writes none.

    Contents are tokenised as plain text, so a `<|im_start|>` typed by a user or found in data never becomes a
    special id; only the template's markup is tokenised with special tokens. The tokenizer's BOS comes first (once,
    also when the template writes it). With `add_generation_prompt` the ids end where the next answer begins."""
    specials = special_ids(tokenizer)
    ids, mask, answer_ended = [], [], True
    segments = _segments(tokenizer, messages, add_generation_prompt)
    for i in range(0, len(segments) - 1, 2):  # (markup, content) pairs, then the last markup
        (markup, _), (content, j) = segments[i], segments[i + 1]
        head = markup.rstrip(" ")
        if content:  # spaces the markup writes before a content are tokenised with it, as in the whole text:
            segments[i], segments[i + 1] = (head, None), (markup[len(head):] + content, j)  # `:` `Ġcats`, not `Ġ`
    for text, j in segments:
        new = _piece_ids(tokenizer, text, plain=j is not None, first=not ids)
        if j is not None:
            answer_ended = messages[j]["role"] != "assistant"
            ids, mask = ids + new, mask + [not answer_ended] * len(new)
            continue
        end = next((i + 1 for i, t in enumerate(new) if t in specials), 0) if not answer_ended else 0
        if not answer_ended and not end:  # a template that writes nothing special after an answer
            new, end = [tokenizer.eos_token_id] + new, 1
        ids, mask = ids + new, mask + [i < end for i in range(len(new))]
        answer_ended = True
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
        model = from_pretrained(AutoModelForCausalLM, name, flag, dtype=dtype, trust_remote_code=trust_remote_code)
    resize_for_tokenizer(model, tokenizer)
    return model.to(dtype)


def from_pretrained(cls, name: str, flag: str, **kwargs):
    """cls.from_pretrained(name, **kwargs), with one line for a model whose files are damaged (a weights file cut
    short by a failed copy or a full disk fails deep inside safetensors or torch)."""
    from safetensors import SafetensorError

    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{flag} {name}: cannot load the model ({first}); are its files complete?")


# ----------------------------------------------------------------------------------------------------------------
# token log-probs without the B x T x V logits

# config fields of models that transform the logits after the LM head (Gemma 2, Cohere, Granite): those models take
# the plain path, the whole logits from the model's forward, then the same chunked log-sum-exp
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _chunk_logprobs(head, h: torch.Tensor, tokens: torch.Tensor, temperature: float, with_entropy: bool):
    """log p(token) at a chunk of positions (and the entropy there): the head, then an fp32 log-sum-exp."""
    logits = head(h).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, -1)
    logp = logits.gather(-1, tokens[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logp
    p = torch.softmax(logits, -1)
    p = p * logits if torch.is_grad_enabled() else p.mul_(logits)  # without autograd, no second V-wide copy
    return torch.stack([logp, lse - p.sum(-1)], -1)  # H = log Z - sum_v p_v z_v


class _LinearLogprobs(torch.autograd.Function):
    """log p(token) at a chunk of positions for a plain linear head, in training: the forward keeps the chunk's
    inputs and its log-sum-exp, the backward recomputes the logits and turns them into the gradient in place
    (d logp / d z = onehot - softmax(z)), so a chunk costs about two V-wide fp32 buffers where autograd through
    a recomputed log-softmax would hold five. with_entropy: (log-probs, entropies), each with its gradient
    (dH / dz = -p (log p + H)), for the same two buffers."""

    @staticmethod
    def forward(ctx, h, weight, bias, tokens, temperature, with_entropy=False):
        z = torch.nn.functional.linear(h, weight, bias).float().div_(temperature)  # a new tensor either way
        lse = torch.logsumexp(z, -1)
        logp = z.gather(-1, tokens[:, None]).squeeze(-1) - lse
        entropy = None
        if with_entropy:
            log_p = z.sub_(lse[:, None])
            entropy = -log_p.exp().mul_(log_p).sum(-1)
        ctx.save_for_backward(h, weight, bias, tokens, lse, entropy)
        ctx.temperature = temperature
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad, grad_entropy=None):
        h, weight, bias, tokens, lse, entropy = ctx.saved_tensors
        z = torch.nn.functional.linear(h, weight, bias).float().div_(ctx.temperature)
        if entropy is None:
            g = z.sub_(lse[:, None]).exp_()  # softmax
            g.scatter_add_(1, tokens[:, None], torch.full_like(lse[:, None], -1.0))  # softmax - onehot
            g = g.mul_(grad[:, None] / -ctx.temperature)
        else:  # grad (onehot - p) - grad_entropy p (log p + H)
            log_p = z.sub_(lse[:, None])
            g = log_p.exp().mul_(log_p.add_(entropy[:, None]).mul_(grad_entropy[:, None]).add_(grad[:, None]))
            g = g.neg_().scatter_add_(1, tokens[:, None], grad[:, None]).div_(ctx.temperature)
        g = g.to(h.dtype)  # d loss / d (h W^T + b)
        need = ctx.needs_input_grad
        return (g @ weight if need[0] else None, g.t() @ h if need[1] else None,
                g.sum(0) if bias is not None and need[2] else None, None, None, None)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: int | torch.Tensor,
                   temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = False):
    """log p(token | the tokens before it) under softmax(logits / temperature), from one forward, with the LM head
    applied only at the positions that predict the scored tokens, chunk_size positions at a time: no B x T x V
    tensor is ever made, and in training each chunk's logits are recomputed in the backward pass instead of kept.
    `targets`: an int k scores input_ids[:, k:] (returns B x (T - k)); a bool mask shaped like input_ids scores the
    tokens where it holds (never column 0; returns them flat, row by row). with_entropy: (log-probs, entropies).

    The head's own forward is swapped for the chunked one while the model runs its usual forward, so everything
    around it holds: a DeepSpeed engine (ZeRO-3 gathers the head for its forward and backward, and the engine's
    backward hooks sit on the output), a peft adapter on the head, disable_adapter()."""
    from deepspeed import DeepSpeedEngine
    from torch.utils.checkpoint import checkpoint

    if isinstance(targets, int):
        tokens = input_ids[:, targets:]

        def pick(x):
            return x[:, targets - 1: -1]
    else:
        tokens = input_ids[:, 1:][targets[:, 1:]]

        def pick(x):
            return x[:, :-1][targets[:, 1:]]
    flat = tokens.reshape(-1)

    def chunk(head, h, t):
        args = (head, h, t, temperature, with_entropy)
        if not torch.is_grad_enabled():
            return _chunk_logprobs(*args)
        if linear is not None:  # inside the head's forward: ZeRO-3 has gathered its weights
            out = _LinearLogprobs.apply(h, linear.weight, linear.bias, t, temperature, with_entropy)
            return torch.stack(out, -1) if with_entropy else out
        return checkpoint(_chunk_logprobs, *args, use_reentrant=False)  # any other head: recomputed by autograd

    def scored(head, x):
        assert x.shape[1] == input_ids.shape[1], "the LM head did not get every position"
        if not len(flat):  # no token: score one position and return none of it, so that the graph reaches x
            return chunk(head, x.reshape(-1, x.shape[-1])[:1], flat.new_zeros(1))[:0]
        x = pick(x).reshape(-1, x.shape[-1])
        return torch.cat([chunk(head, x[i: i + chunk_size], flat[i: i + chunk_size])
                          for i in range(0, len(flat), chunk_size)])

    inner = model.module if isinstance(model, DeepSpeedEngine) else model
    inner = inner.get_base_model() if hasattr(inner, "peft_config") else inner
    head = inner.get_output_embeddings()
    linear = head if type(head) is torch.nn.Linear else None  # not a peft layer, nor a subclass with its own forward
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                  use_cache=False)
    if head is None or any(getattr(inner.config, k, None) for k in LOGIT_TRANSFORMS):
        linear = None
        out = scored(lambda z: z, model(**kwargs).logits)
    else:
        own, original = head.__dict__.get("forward"), head.forward
        head.forward = lambda x: scored(original, x)
        try:
            out = model(**kwargs).logits
        finally:
            if own is None:
                del head.forward
            else:
                head.forward = own
    if with_entropy:
        return out[:, 0].reshape(tokens.shape), out[:, 1].reshape(tokens.shape)
    return out.reshape(tokens.shape)


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


def _check_messages(where: str, msgs, field: str = "messages"):
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: field '{field}' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(msgs):
        ok = isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
        if not ok or not isinstance(m.get("content"), str) or not m["content"].strip():
            raise UserError(f"{where}: field '{field}[{j}]' must be {{\"role\": system|user|assistant, "
                            f"\"content\": non-empty string}}")


_HH_TURN = re.compile(r"(?:^\s*|\n\n)(Human|Assistant):")


def turns(where: str, obj: dict, field: str, role: str = "user") -> list[dict]:
    """A field as a message list: a list of {role, content} as it is; a string written as DeepSpeed-Chat / HH-RLHF
    turns ("\\n\\nHuman: ...\\n\\nAssistant: ...") parsed into them (a last empty "Assistant:" is the place where
    the answer goes, and is dropped); any other string is one message of `role`. Strings lose the white space
    around them (the space of Dahoas' " The answer" after "Assistant:" is the format's, not the answer's)."""
    _check_text(where, obj, field)
    v = obj[field]
    if isinstance(v, list):
        return [{"role": m["role"], "content": m["content"]} for m in v]
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


LAYOUTS = {"sft": '{"messages"}, {"prompt", "response" or "completion"}, {"prompt", "chosen"}, {"chosen"} (HH) or '
                  '{"text"}',
           "pairs": '{"prompt", "chosen", "rejected"} or {"chosen", "rejected"} (HH)',
           "prompts": '{"prompt"}, {"messages"} or {"chosen", "rejected"} (HH)'}


def validate(where: str, obj: dict, kind: str) -> dict:
    """Check one record of any layout (README, "Data") and return it in canonical form:
    sft -> {"messages"} (with an assistant turn) or {"text"}; pairs -> {"prompt": messages, "chosen": messages,
    "rejected": messages} (each side the answer turn(s) only) and an optional "margin"; prompts -> {"prompt":
    messages} (ending with a user turn)."""
    keys = {"sft": ("messages", "text", "prompt", "chosen"), "pairs": ("prompt", "chosen"),
            "prompts": ("prompt", "messages", "chosen")}[kind]
    if not any(k in obj for k in keys):  # ShareGPT's "conversations", Alpaca's "instruction", ...
        raise UserError(f"{where}: field '{keys[-1] if kind == 'pairs' else 'prompt'}' is missing: no {kind} layout "
                        f"fits the fields {list(obj)}; expected " + LAYOUTS[kind] + " (README, Data)")
    if kind == "sft":
        if "messages" in obj:
            msgs = turns(where, obj, "messages")
            if not any(m["role"] == "assistant" for m in msgs):
                raise UserError(f"{where}: field 'messages' has no assistant turn to learn from")
            return {"messages": _with_system(where, obj, msgs)}
        if "text" in obj and "prompt" not in obj:
            _check_text(where, obj, "text")
            if not isinstance(obj["text"], str):
                raise UserError(f"{where}: field 'text' must be a string")
            return {"text": obj["text"]}
        if "prompt" not in obj and "chosen" in obj:  # HH-RLHF: the chosen conversation
            msgs = turns(where, obj, "chosen")
            if msgs[-1]["role"] != "assistant":
                raise UserError(f"{where}: field 'chosen' must end with an assistant turn")
            return {"messages": _with_system(where, obj, msgs)}
        prompt = turns(where, obj, "prompt")
        field = next((f for f in ("response", "completion", "chosen") if f in obj), None)
        if field is None:
            raise UserError(f"{where}: field 'response' is missing (nor 'completion' or 'chosen'); expected the "
                            "answer as a non-empty string or message list")
        answer = _answer(where, prompt, turns(where, obj, field, "assistant"), field)
        return {"messages": _with_system(where, obj, prompt + answer)}
    if kind == "pairs":
        if "prompt" in obj:
            prompt = turns(where, obj, "prompt")
            sides = [_answer(where, prompt, turns(where, obj, f, "assistant"), f) for f in ("chosen", "rejected")]
        else:
            prompt, *sides = _split_shared(where, obj)
        out = {"prompt": _with_system(where, obj, prompt), "chosen": sides[0], "rejected": sides[1]}
        if "margin" in obj:
            if not isinstance(obj["margin"], (int, float)) or isinstance(obj["margin"], bool) or not math.isfinite(
                    obj["margin"]):
                raise UserError(f"{where}: field 'margin' must be a finite number")
            out["margin"] = float(obj["margin"])
        return out
    if kind == "prompts":
        if "prompt" in obj:
            msgs, field = turns(where, obj, "prompt"), "prompt"
        elif "messages" in obj:  # a conversation: everything before its last answer
            msgs, field = turns(where, obj, "messages"), "messages"
            while msgs and msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
        else:
            msgs, field = _split_shared(where, obj)[0], "chosen"
        if not msgs or msgs[-1]["role"] != "user":
            raise UserError(f"{where}: field '{field}' has no user turn to answer"
                            if not any(m["role"] == "user" for m in msgs) else
                            f"{where}: field '{field}' must end with a user turn")
        return {"prompt": _with_system(where, obj, msgs)}
    raise ValueError(kind)


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
        print0(f"--skip_invalid: dropped {len(skipped)} records that cannot be encoded (first: {skipped[0]})")
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
        return toy_data(kind, split or "train")
    records, skipped = [], []
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
                records.append(Record(validate(where, obj, kind), where=where))
            except UserError as e:
                if not skip_invalid:
                    raise
                skipped.append(e.code.removeprefix("error: "))
    if skipped:
        print0(f"--skip_invalid: dropped {len(skipped)} invalid records of {spec} (first: {skipped[0]})")
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


# ----------------------------------------------------------------------------------------------------------------
# output folder, checkpoints, logging


# what these scripts write into an output folder: --overwrite removes these and nothing else
RUN_FILES = ("args.json", "args.json.next", "metrics.jsonl", "checkpoints", "critic", "ema", "tensorboard", "wandb",
             "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
             "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model", "adapter_config.json",
             "adapter_model.safetensors")
RUN_PATTERNS = ("model-*-of-*.safetensors", ".staging-*", "metrics.jsonl.tmp-*", "args.json*.tmp-*")
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
        if not (p / "args.json").exists():  # no run of ours: neither flag would take it
            raise UserError(f"--output_dir {p}: holds files and no run of these scripts (no args.json); choose "
                            "another folder")
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
    try:  # the folder can be made and written in, or a one-line reason now, not a traceback after the models load
        if p.is_symlink() and not p.exists():
            raise UserError(f"--output_dir {output_dir}: a link to {os.readlink(p)}, which does not exist")
        out = p.resolve()
        made = next(a for a in (out, *out.parents) if a.exists())
    except OSError as e:
        raise UserError(f"--output_dir {output_dir}: {e.strerror or e}")
    if not made.is_dir() and made != out:  # (the folder itself a file: _check_folder says so)
        raise UserError(f"--output_dir {output_dir}: {made} is a file; expected a folder")
    if not os.access(made, os.W_OK | os.X_OK):
        raise UserError(f"--output_dir {output_dir}: cannot write into {made}")
    for flag, value in (inputs or {}).items():
        for path in input_paths(value):
            if path != "toy" and os.path.exists(path):
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


def _path_or_value(v):
    """A flag's value as --resume compares it: paths (comma-separated too) by the files they name, so `sft1` and
    `./sft1/` are one model; anything else as it is."""
    if isinstance(v, str) and v and all(os.path.exists(x) for x in v.split(",")):
        return ",".join(str(Path(x).resolve()) for x in v.split(","))
    return v


def check_resume(output_dir: str, args, tag: str, defining: tuple, run: dict, length: str, fixed: tuple = ()):
    """A resumed run must be the run of its checkpoint. `defining`: flags that define the run; `run`: derived
    figures saved beside them in args.json (global batch, ranks, run length...); `length` names the entry of `run`
    that may grow (a longer run continues; one that ends before the checkpoint is refused); `fixed`: names without
    which the checkpoint cannot be loaded (never accepted). Other differences are refused in one line unless named in
    --resume_changes."""
    saved = json.loads((Path(output_dir) / "args.json").read_text())
    old = {**saved, **saved["_run"]}
    given, derived = (json.loads(json.dumps(x, default=str)) for x in (vars(args), run))
    # a flag whose default is worked out (--max_seq_len, --learning_rate) is compared as worked out, so that passing
    # the value it took is the same run; against an args.json from before `run` held it, as passed
    new = {**given, **{k: v for k, v in derived.items() if k in saved["_run"] or k not in given}}
    step = checkpoint_step(tag)
    if step >= 0 and new[length] == step == old.get(length):
        raise UserError(f"--resume: the run finished: its checkpoint is at its end ({length} {step}), so nothing is "
                        "left to train; a longer run continues from it")
    if step >= 0 and new[length] <= step:
        raise UserError(f"--resume: the checkpoint is at {step}, this run ends at {new[length]} ({length}); a run "
                        "that ends before its checkpoint would replace the model with an older one")
    # ranks matter through the global batch (same global batch, same run), unless the checkpoint is partitioned
    compared = dict.fromkeys(defining + tuple(k for k in run if k not in (length, "world_size")) + fixed)
    differ = [k for k in compared if k in old and _path_or_value(old[k]) != _path_or_value(new[k])]
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
            for stage in [*p.glob(".staging-*"), *p.glob("*/.staging-*")]:  # a save killed half-way; the lock is ours
                shutil.rmtree(stage, ignore_errors=True)
            if overwrite:
                for f in p.iterdir():
                    if f.name in RUN_FILES or any(f.match(pattern) for pattern in RUN_PATTERNS):
                        if f.is_dir() and not f.is_symlink():
                            shutil.rmtree(f)
                        else:
                            f.unlink()
            saved = json.loads(json.dumps(vars(args), default=str)) | {"_run": run or {}}
            write_whole(p / ("args.json.next" if resume else "args.json"), json.dumps(saved, indent=2) + "\n")
        except UserError as e:
            error = e
        except OSError as e:  # a read-only file system, /proc, a name too long: one line, nothing half made
            error = UserError(f"--output_dir {output_dir}: {e.strerror or e}")
    if dist.is_initialized() and world_size() > 1:
        message = [str(error.code) if error else None]
        dist.broadcast_object_list(message, src=0)
        if message[0] and error is None:
            raise UserError(f"rank 0 stopped: {message[0]}")
    if error:
        raise error


def write_whole(path, text: str):
    """Write a file through a temporary one moved into place: a kill or a full disk never leaves it half written."""
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def commit_args(output_dir: str):
    """A resumed run's args.json, written aside (args.json.next) at start-up, replaces the checkpoint's once the run
    has saved a checkpoint or its model: until then args.json describes what is on disk, and --resume compares with
    it (a resumed run killed before saving anything, or stopped early, leaves the folder as it found it)."""
    pending = Path(output_dir) / "args.json.next"
    if is_rank0() and pending.exists():
        os.replace(pending, pending.with_name("args.json"))


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
    """Save a Hugging Face folder (safetensors + tokenizer) from rank 0, gathering ZeRO-3 shards first; LoRA weights
    are merged in unless `lora_adapter` (then a peft adapter folder is written, naming a local base model by its
    absolute path); `state_dict`: these weights instead of the model's (ppo.py's EMA). Every rank must call this.
    Files go to a staging folder and are moved into place with config.json last, after the old config.json is
    removed: whenever config.json exists, the files beside it are one complete model."""
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
                base.save_pretrained(stage, state_dict=weights, safe_serialization=True)
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
    write_whole(p, "".join(r + "\n" for r in rows))  # a kill here loses no row


def save_checkpoint(engine, folder: str, tag: str, state: dict):
    """engine.save_checkpoint, then `latest` (replaced whole) once every rank's shards are written: DeepSpeed's rank 0
    writes it before the other ranks have finished theirs, so a crash then left `latest` naming a checkpoint that
    cannot be loaded. DeepSpeed's save ends with a barrier of all ranks."""
    engine.save_checkpoint(folder, tag=tag, client_state=state, save_latest=False)
    if is_rank0():
        write_whole(Path(folder) / "latest", tag)


def latest_checkpoint(folder) -> str | None:
    """The tag of the newest complete DeepSpeed checkpoint in `folder` (save_checkpoint writes `latest` only after
    every rank's shards); a `latest` naming a missing tag is an error."""
    latest = Path(folder) / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    if not tag or not (Path(folder) / tag).is_dir():
        raise UserError(f"{latest} names checkpoint {tag!r}, which is not there; write the tag of a checkpoint "
                        f"folder of {folder} into it, or pass --overwrite to start again")
    return tag


def load_checkpoint(engine, folder: str, tag: str, learning_rate: float | None = None,
                    weight_decay: float | None = None) -> dict:
    """engine.load_checkpoint with one-line errors: a missing or corrupt shard (a truncated file, a failed copy)
    fails inside torch.load in many ways; a learning rate or weight decay given replaces the checkpoint's. Returns
    the client state."""
    try:
        path, state = engine.load_checkpoint(folder, tag)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{folder}/{tag}: cannot load this checkpoint ({type(e).__name__}: {first}); it may be "
                        "corrupt: point `latest` at an older tag, or pass --overwrite to start again")
    if path is None:
        raise UserError(f"{folder}/{tag}: checkpoint not found")
    # --resume_changes learning_rate / weight_decay: the optimizer and scheduler states just loaded carry the old
    # values; the schedule goes on from its step, at the new peak
    sched = engine.lr_scheduler
    for i, group in enumerate(engine.optimizer.param_groups):
        if learning_rate is not None:
            sched.base_lrs[i] = group["initial_lr"] = learning_rate
            group["lr"] = sched._last_lr[i] = learning_rate * sched.lr_lambdas[i](sched.last_epoch)
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
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
                records.append({"prompt": to_messages(p), "chosen": [{"role": "assistant", "content": chosen}],
                                "rejected": [{"role": "assistant", "content": rejected}]})
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


TOY_CONTEXT = 512  # RoPE: the context sets no weights; 512 fits the scripts' default --max_seq_len


def toy_model(tokenizer):
    """A ~1M-parameter Llama-shaped causal LM (dropout 0), random weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=TOY_CONTEXT,
                      tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return AutoModelForCausalLM.from_config(cfg)
