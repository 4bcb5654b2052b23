"""Run folders: the output folder's checks and lock, args.json, --resume's comparison with the checkpoint's run,
metrics.jsonl on resume, and the DeepSpeed checkpoints of resumable state."""

import atexit
import hashlib
import json
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

import common
from common import UserError, data, flags, launcher

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
        for path in data.input_paths(value):
            if path != "toy" and os.path.exists(path):
                src = Path(path).resolve()
                if src == out or out in src.parents:
                    raise UserError(f"--output_dir {output_dir} holds {flag} {path}, an input of this run; choose "
                                    "another --output_dir")
    _check_folder(p, overwrite, resume, script)
    if common.is_rank0():  # one run per folder from here on, before any model loads (start_output_dir checks again)
        made = not p.exists()
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--output_dir {output_dir}: {e.strerror or e}")
        take_lock(p, made)
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


def fingerprints(args) -> dict:
    """{flag: hash} of the run-defining flags that name local files (models, data, a --reward_fn file): each file's
    name, size and bytes sampled at its start, middle and end, so that an input replaced in place (a model retrained
    into its folder) is told apart; a run folder's checkpoints/ and hidden files are left out. Hub names are not."""
    out = {}
    for name in flags.run_flags(args):
        value = getattr(args, name, None)
        paths = [x if os.path.exists(x) else x.rsplit(":", 1)[0] for x in str(value).split(",")]
        if not isinstance(value, str) or value == "toy" or not all(os.path.exists(x) for x in paths):
            continue
        h = hashlib.sha256()
        for root in map(Path, paths):
            files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file() and not any(
                part.startswith(".") or part == "checkpoints" for part in f.relative_to(root).parts))
            for f in files:
                size = f.stat().st_size
                h.update(f"{f.relative_to(root) if f != root else f.name}:{size}\n".encode())
                with open(f, "rb") as fh:
                    for at in (0, size // 2, max(size - 65536, 0)):
                        fh.seek(at)
                        h.update(fh.read(65536))
        out[name] = h.hexdigest()[:16]
    return out


def check_resume(output_dir: str, args, tag: str, run: dict, length: str, fixed: tuple = ()):
    """A resumed run must be the run of its checkpoint: the flags that define a run (flags.run_flags), and `run`,
    figures derived from them and saved beside them in args.json (global batch, ranks, length...); `length` names the
    entry of `run` that may grow (a longer run continues; one that ends before the checkpoint is refused); `fixed`:
    names without which the checkpoint cannot be loaded (never accepted). Other differences are refused in one line
    unless named in --resume_changes."""
    top = json.loads((Path(output_dir) / "args.json").read_text())
    carried = next(Path(output_dir, "checkpoints").glob(f"**/{tag}/args.json"), None)  # the checkpoint's own
    saved = json.loads(carried.read_text()) if carried else top
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
    compared = dict.fromkeys(flags.run_flags(args) + tuple(k for k in run if k not in (length, "world_size")) + fixed)
    differ = [k for k in compared if k in old and _path_or_value(old[k]) != _path_or_value(new[k])]
    if length in old and new[length] < old[length]:
        differ.append(length)
    hard = [k for k in differ if k in fixed]
    if hard:
        raise UserError("--resume: the checkpoint cannot be loaded with another " + ", ".join(
            f"{k} ({old[k]} -> {new[k]})" for k in hard))
    changed = [k for k, v in fingerprints(args).items() if k not in differ and saved["_run"].get("inputs", {}).get(
        k, v) != v]  # a path that names other files than the checkpoint's run read
    if changed := [k for k in changed if k not in getattr(args, "resume_changes", ())]:
        raise UserError("--resume: " + ", ".join(f"--{k} {getattr(args, k)}" for k in changed) + " changed since the "
                        "checkpoint's run read it (its files differ); restore it, or pass --resume_changes "
                        f"{' '.join(changed)} to continue with it")
    unaccepted = [k for k in differ if k not in getattr(args, "resume_changes", ())]
    if unaccepted:
        raise UserError("--resume: this is not the run of the checkpoint: " + ", ".join(
            f"{k} {old[k]} -> {new[k]}" for k in unaccepted) + f"; pass --resume_changes {' '.join(unaccepted)} to "
            "continue it so")
    if top["_run"].get("finished") and run[length] == top["_run"].get(length):
        raise UserError(f"--resume: the run finished ({length} {run[length]}; its model is in {output_dir}), so "
                        f"nothing is left to train; a longer run continues from its checkpoint {tag}")


def take_lock(folder: Path, made: bool = False):
    """One run per folder: `folder/.lock` holds the owner's pid, host and start time; a lock whose process is gone
    is stale and replaced; this process may take it again. Released at exit, with the folder if this run `made` it
    and wrote nothing into it (a run refused after the lock)."""
    lock = folder / LOCK
    try:
        if (lock, os.getpid()) in launcher._held_locks and json.loads(lock.read_text())["pid"] == os.getpid():
            return
    except (OSError, ValueError, KeyError):
        pass
    stat = launcher._proc_stat(os.getpid())
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
            if owner and (owner["pid"] == "?" or launcher._alive(owner["pid"], owner.get("start"))):
                raise UserError(f"--output_dir {folder}: in use by another run (pid {owner['pid']}, {lock}); wait "
                                "for it to end or stop it")
            print(f"note: removing the stale lock {lock} (pid {owner.get('pid')} is gone)", file=sys.stderr)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(_release, lock, me["pid"], made)
        launcher._held_locks.append((lock, me["pid"]))
        return
    raise UserError(f"--output_dir {folder}: cannot take {lock}")


def _release(lock: Path, pid: int, made: bool):
    launcher._release_lock(lock, pid)
    if made:
        try:
            lock.parent.rmdir()  # only when empty
        except OSError:
            pass


def start_output_dir(output_dir: str, args, overwrite: bool, resume: bool, run: dict | None = None):
    """Rank 0 creates the folder, takes its lock, checks it again (another run may have come and gone), removes the
    files of the old run with --overwrite (RUN_FILES only) and writes args.json: the arguments and, under `_run`,
    the script and derived figures (`run`) that --resume compares. Other ranks wait; an error stops every rank."""
    error = None
    if common.is_rank0():
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
            saved = json.loads(json.dumps(vars(args), default=str)) | {"_run": (run or {}) | {
                "inputs": fingerprints(args)}}
            common.write_whole(p / ("args.json.next" if resume else "args.json"), json.dumps(saved, indent=2) + "\n")
        except UserError as e:
            error = e
        except OSError as e:  # a read-only file system, /proc, a name too long: one line, nothing half made
            error = UserError(f"--output_dir {output_dir}: {e.strerror or e}")
    if dist.is_initialized() and common.world_size() > 1:
        message = [str(error.code) if error else None]
        dist.broadcast_object_list(message, src=0)
        if message[0] and error is None:
            raise UserError(f"rank 0 stopped: {message[0]}")
    if error:
        raise error


def commit_args(output_dir: str, finished: bool = False):
    """A resumed run's args.json, written aside (args.json.next) at start-up, replaces the checkpoint's once the run
    has saved a checkpoint or its model: until then args.json describes what is on disk, and --resume compares with
    it (a resumed run killed before saving anything, or stopped early, leaves the folder as it found it)."""
    pending = Path(output_dir) / "args.json.next"
    if common.is_rank0() and pending.exists():
        os.replace(pending, pending.with_name("args.json"))
    if common.is_rank0() and finished:  # --resume says so, instead of training the steps after the last checkpoint
        saved = json.loads(pending.with_name("args.json").read_text())
        saved["_run"]["finished"] = True
        common.write_whole(pending.with_name("args.json"), json.dumps(saved, indent=2) + "\n")


def truncate_log(output_dir: str, step: int):
    """On resume, drop metric rows written after the checkpoint we continue from. A last line cut short by a crash
    is dropped with a notice; a bad line before it is an error."""
    p = Path(output_dir) / "metrics.jsonl"
    if not common.is_rank0() or not p.exists():
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
    common.write_whole(p, "".join(r + "\n" for r in rows))  # a kill here loses no row


def save_checkpoint(engine, folder: str, tag: str, state: dict):
    """engine.save_checkpoint, then `latest` (replaced whole) once every rank's shards are written: DeepSpeed's rank 0
    writes it before the other ranks have finished theirs, so a crash then left `latest` naming a checkpoint that
    cannot be loaded. DeepSpeed's save ends with a barrier of all ranks."""
    engine.save_checkpoint(folder, tag=tag, client_state=state, save_latest=False)
    if common.is_rank0():
        out = next((a for a in Path(folder).resolve().parents if (a / "args.json").exists()), None)  # the run's
        if out:  # the args it was made with go in it: a kill before commit_args mixes no two runs
            pending = out / "args.json.next"
            shutil.copyfile(pending if pending.exists() else out / "args.json", Path(folder) / tag / "args.json")
        common.write_whole(Path(folder) / "latest", tag)


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
