"""The process around a rank: how it ends (a rank stops when its launcher is gone, releasing the folder locks it
holds; a full disk, a lost rank or Ctrl-C is one line, not a traceback), and CPU runs keep freed memory."""

import ctypes
import errno
import json
import os
import sys
import threading
import time
from pathlib import Path


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
        pids = " or ".join(map(str, watched))
        print(f"error: the launcher is gone (pid {pids}); stopping rank {os.environ.get('RANK', 0)}",
              file=sys.stderr, flush=True)
        for lock, pid in _held_locks:
            _release_lock(lock, pid)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-launcher").start()
_held_locks = []  # (lock file, pid) taken by this process


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


def excepthook(kind, value, tb, other_errors=sys.__excepthook__):
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
    if kind is KeyboardInterrupt:  # Ctrl-C: the output folder is as a kill leaves it (docs/reliability.md)
        print("interrupted (Ctrl-C); --resume continues from the last checkpoint, if the run saved one",
              file=sys.stderr)
        return
    other_errors(kind, value, tb)
