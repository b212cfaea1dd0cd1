"""A workdir as a place on disk: its layout and config file, the lock that keeps it to one run,
and the checks made before anything is written into it.

A workdir holds `config.json` (the resolved experiment config), `checkpoints/` (orbax's,
`jaxdiff.checkpoint`) and, while a run trains in it, `train.lock` (its pid, host and process
start), so two runs never write one workdir and no other command writes into a live run's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Iterator

import ml_collections

from jaxdiff.config import config_from_json, config_to_json

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = "train.lock"


class WorkdirError(RuntimeError):
    """The workdir cannot be trained in: unwritable, too little space, in use, or incompatible."""


def write_config(workdir: str, config: ml_collections.ConfigDict) -> str:
    """Writes the resolved config to `workdir/config.json` (atomically) and returns the path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    write_atomically(path, config_to_json(config))
    return path


def write_atomically(path: str, text: str) -> None:
    """A reader (or a process killed mid-write) sees the old file or the new one, never half."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a jaxdiff workdir")
    with open(path) as f:
        return config_from_json(f.read())


# ---------------------------------------------------------------------------------------------
# Checks made before training starts, so that a run fails in seconds rather than hours later.


def check_writable(workdir: str) -> None:
    """Creates `workdir` and writes, syncs and deletes a probe file in it; WorkdirError if not."""
    probe = os.path.join(workdir, f".write-probe-{os.getpid()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(f"workdir {workdir!r} is not writable: {e}") from e


def check_free_space(workdir: str, checkpoint_bytes: int, keep: int) -> None:
    """WorkdirError unless the disk holding `workdir` has room for the checkpoints to come.

    A run keeps `keep` checkpoints and writes the next one before deleting the oldest, so it
    needs keep + 1 of them, less those already saved.
    """
    saved = 0
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if os.path.isdir(directory):
        saved = sum(name.isdigit() for name in os.listdir(directory))
    needed = max(1, keep + 1 - saved) * checkpoint_bytes
    free = shutil.disk_usage(workdir).free
    if free < needed:
        raise WorkdirError(
            f"not enough disk space in {workdir!r}: {free / 2**20:.1f} MiB free, but "
            f"{needed / 2**20:.1f} MiB needed ({max(1, keep + 1 - saved)} checkpoint(s) of "
            f"{checkpoint_bytes / 2**20:.1f} MiB); free some space or use another --workdir"
        )


# ---------------------------------------------------------------------------------------------
# The lock: one live run per workdir.


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[str]:
    """Holds `workdir/train.lock` ("pid host start") for the duration of the block.

    The file is created with O_CREAT | O_EXCL, so of two runs starting together exactly one
    gets it. `start` (boot id and start time of the process, from /proc) tells the owner from
    a later process that reuses its pid (pid 1 after a container restart, or this very process):
    a lock whose process has died or been replaced is taken over; a live owner's is a
    WorkdirError naming its pid and how to clear the lock.
    """
    check_not_held(workdir)  # nor inside another run's workdir
    path = os.path.join(workdir, LOCK_FILE)
    me = f"{os.getpid()} {socket.gethostname()} {_process_start(os.getpid())}"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(path)
            if owner is not None:
                raise WorkdirError(_in_use(workdir, owner, path)) from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # stale: its owner died without releasing it
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        break
    else:
        raise WorkdirError(f"could not take the lock {path}: other runs keep taking it")
    try:
        yield path
    finally:
        release_own_lock(workdir)


def release_own_lock(workdir: str) -> None:
    """Removes `workdir/train.lock` if this process holds it."""
    path = os.path.join(workdir, LOCK_FILE)
    me = f"{os.getpid()} {socket.gethostname()} {_process_start(os.getpid())}"
    with contextlib.suppress(OSError):
        with open(path) as f:
            mine = f.read().strip() == me
        if mine:
            os.remove(path)


def holder(path: str) -> tuple[str, str, str] | None:
    """(workdir, its live owner, its lock file) if `path` is, or lies inside, a workdir whose
    lock another live process holds; None if none does."""
    path = os.path.abspath(path)
    while True:
        lock = os.path.join(path, LOCK_FILE)
        owner = _lock_owner(lock) if os.path.exists(lock) else None
        if owner is not None and owner != str(os.getpid()):
            return path, owner, lock
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def check_not_held(path: str) -> None:
    """WorkdirError naming the owner if a live run holds the workdir `path` is or lies in.

    The one rule of every command that writes into, replaces or removes a workdir (train,
    convert, export, evaluate's output): a live run's workdir is never touched.
    """
    found = holder(path)
    if found is not None:
        raise WorkdirError(_in_use(*found))


def _in_use(workdir: str, owner: str, lock: str) -> str:
    return (f"workdir {workdir!r} is in use by another training run (pid {owner}; lock file "
            f"{lock}); nothing was changed; wait for it or stop it, or use another directory; "
            f"if no run uses it (the pid is another program's), delete {lock}")


def _lock_owner(path: str) -> str | None:
    """The live owner ("pid" or "pid@host") of the lock at `path`; None if it is stale.

    Reads the previous release's "pid host" too: its process must have started before the
    lock was written.
    """
    try:
        with open(path) as f:
            text = f.read().split()
        written = os.path.getmtime(path)
    except FileNotFoundError:
        return None
    if len(text) not in (2, 3) or not text[0].isdigit():
        # Being written by a process that has just created it, or garbage left by a crash.
        return "unknown" if time.time() - written < 10 else None
    pid, host = int(text[0]), text[1]
    if host != socket.gethostname():
        return f"{pid}@{host}"  # another machine's process: cannot tell, so assume it lives
    if not _alive(pid):
        return None
    start = _process_start(pid)
    if len(text) == 3:
        return str(pid) if start in (text[2], "unknown") else None
    started = _process_start_time(pid)
    return str(pid) if started is None or started <= written + 2.0 else None  # btime: whole s


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) holds nothing
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _start_ticks(pid: int) -> int:
    """When `pid` started, in clock ticks since boot (proc(5): /proc/pid/stat field 22)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def _process_start(pid: int) -> str:
    """"<boot id>/<start ticks>" of `pid`: unique to one process across pid reuse and reboots
    ("unknown" without /proc)."""
    try:
        return f"{_boot_id()}/{_start_ticks(pid)}"
    except (OSError, IndexError, ValueError):
        return "unknown"


def _process_start_time(pid: int) -> float | None:
    """When `pid` started, as a Unix time (None without /proc)."""
    try:
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + _start_ticks(pid) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None
