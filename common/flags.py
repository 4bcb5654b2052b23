"""Flags: each Args field declares its range and whether it defines a run beside it (`flag`); the checks of
numbers against ranges, and the defaults worked out from the model (--max_seq_len, --per_device_batch_size)."""

import dataclasses
import math
import os

import common
from common import UserError, toy

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


def flag(default, range: str | None = None, run: bool = True):
    """An Args field: its default, the range its value must meet (as written in its --help: `>= 1`, `0 <= x < 1`,
    `-1 or >= 1`), and whether it defines the run (--resume refuses another value unless --resume_changes names it)."""
    return dataclasses.field(default=default, metadata={"range": range, "run": run})


def check(args):
    """Every flag against its declared range; None (a default worked out later) passes. A path written `~/x` (or
    `--flag=~/x`, which no shell expands) is expanded, in each comma-separated part."""
    for f in dataclasses.fields(args):
        value, spec = getattr(args, f.name), f.metadata.get("range")
        if isinstance(value, str) and "~" in value:
            value = ",".join(os.path.expanduser(part) for part in value.split(","))
            setattr(args, f.name, value)
        if spec and value is not None and not in_range(value, spec):
            raise UserError(f"--{f.name} {value}: expected {spec.replace('x', f.name)}")


def run_flags(args) -> tuple[str, ...]:
    """The flags that define a run: every field not declared with run=False."""
    return tuple(f.name for f in dataclasses.fields(args) if f.metadata.get("run", True))


def model_context(name: str, trust_remote_code: bool = False) -> int | None:
    """The longest sequence a model's positions allow (its config's max_position_embeddings or alike), or None."""
    if name == "toy":
        return toy.TOY_CONTEXT
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
        common.note(f"--max_seq_len {context}: the model's context (max_position_embeddings) is below {default}")
        return context
    return default


def fit_micro_batch(per_device: int | None, n_examples: int, ranks_x_accum: int, what: str,
                    default: int = 16) -> int:
    """--per_device_batch_size: the user's value, else `default`, shrunk so that the data holds one global batch."""
    if per_device is not None:
        return per_device
    fit = max(1, min(default, n_examples // ranks_x_accum))
    if fit < default:
        common.note(f"--per_device_batch_size {fit}: {n_examples} training {what} hold no global batch of the default "
             f"{default}")
    return fit


def fit_batch_sizes(args) -> tuple[int, int]:
    """The micro-batch and the mini-batch (answers per rank). An unset size adapts to those set (said on stderr):
    ppo.py's --rollout_batch_size 8 alone gives micro = mini = 8; sizes set that conflict are an error."""
    rollout, gas = args.rollout_batch_size * args.samples_per_prompt, args.gradient_accumulation_steps
    micro = args.per_device_batch_size
    if micro is None:
        whole = args.mini_batch_size or (rollout // gas if rollout % gas == 0 else rollout)
        micro = max(d for d in range(1, min(16, whole) + 1) if whole % d == 0)
        if micro != 16:
            common.note(f"--per_device_batch_size {micro} (the default 16 does not divide "
                        f"{'--mini_batch_size' if args.mini_batch_size else '--rollout_batch_size'} {whole})")
    mini = args.mini_batch_size or micro * gas
    if mini % micro or rollout % mini:
        raise UserError(f"--rollout_batch_size {args.rollout_batch_size} x --samples_per_prompt "
                               f"{args.samples_per_prompt} must be a multiple of the mini-batch ({mini}), itself a "
                               f"multiple of --per_device_batch_size {micro}")
    return micro, mini
