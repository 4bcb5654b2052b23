"""ppo.py --reward_fn FILE.py:NAME: a user's Python reward function, loaded and called with one-line errors that name
the function's file and line (docs/ppo.md, "Reward functions")."""

import math
import os
from pathlib import Path

import torch

from common import UserError


SLOW_S = 60.0  # a reward function call this slow is named on stderr while it runs


def load(spec: str):
    """--reward_fn FILE.py:NAME or module:NAME -> the function (errors while importing it name their file:line)."""
    import importlib
    import importlib.util

    source, _, name = spec.rpartition(":")
    if not source or not name:
        raise UserError(f"--reward_fn {spec}: expected FILE.py:NAME or module:NAME")
    if source.endswith(".py") and not os.path.isfile(source):
        raise UserError(f"--reward_fn {spec}: no such file {source}")
    try:
        if source.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(source).stem, source)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(source)
    except (Exception, SystemExit) as e:  # sys.exit() at import must not end the run as if it had succeeded
        raise UserError(f"--reward_fn {spec}: loading {source} raised {type(e).__name__}: {e} "
                               f"({error_place(e, source)})")
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"--reward_fn {spec}: {source} has no function {name}")
    return fn


def error_place(e: BaseException, source: str | None = None) -> str:
    """file:line of an exception: the innermost frame in `source` (the reward function's file), else the innermost."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if source and os.path.abspath(f.filename) == os.path.abspath(source)]
    f = (mine or frames)[-1]
    return f"{f.filename}:{f.lineno}"


def call(fn, spec: str, prompts: list[list[dict]], responses: list[str], device) -> torch.Tensor:
    """fn's scores as a tensor; an exception or a sys.exit() in fn, or scores of the wrong count, type or value, stop
    the run with one line. fn gets copies (an edit cannot reach the stored prompts); a call slower than SLOW_S seconds
    is named on stderr while it runs."""
    import copy
    import sys
    import threading

    slow = threading.Timer(SLOW_S, lambda: print(f"note: --reward_fn {spec} has been running for {SLOW_S:g} s on "
                                                 f"{len(responses)} responses", file=sys.stderr, flush=True))
    slow.daemon = True
    slow.start()
    try:
        scores = fn(copy.deepcopy(prompts), list(responses))
    except (Exception, SystemExit) as e:
        raise UserError(f"--reward_fn {spec} raised {type(e).__name__}: {e} "
                               f"({error_place(e, getattr(fn, '__code__', None) and fn.__code__.co_filename)})")
    finally:
        slow.cancel()
    if isinstance(scores, torch.Tensor):
        scores = scores.tolist()
    try:
        values = [float(x) for x in scores if not isinstance(x, (str, bytes, bool))]
    except (TypeError, ValueError):
        values = []
    if not hasattr(scores, "__len__") or len(values) != len(scores) or len(values) != len(responses):
        raise UserError(f"--reward_fn {spec} returned {type(scores).__name__} "
                               f"{str(scores)[:60]!r}; expected a list of {len(responses)} numbers, one per response")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise UserError(f"--reward_fn {spec} returned {values[bad[0]]} for response {bad[0]} "
                               f"({responses[bad[0]]!r}); scores must be finite")
    return torch.tensor(values, device=device)
