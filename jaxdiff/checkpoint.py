"""Workdirs: the resolved config, orbax checkpoints, and loading a trained model back.

A workdir holds `config.json` (the resolved experiment config) and `checkpoints/<step>/` with
two orbax items: `state` (params, optimizer state, step: what resuming needs) and `ema_params`
(the weights samples are drawn from). `export` writes only `ema_params`, so a converted set of
published weights and a training run load the same way, through `load`.

Orbax writes each step into `<step>.orbax-checkpoint-tmp...` and renames it to `<step>` when
complete; `latest_step`/`restore` only ever see renamed (finalised) steps, so a process killed
mid-write leaves the previous checkpoint as the latest. A run holds `workdir/train.lock` (its
pid) for its lifetime, so two runs never write one workdir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from jaxdiff.bundle import DiffusionModel
from jaxdiff.config import config_from_json, config_to_json, validate
from jaxdiff.models import create_model
from jaxdiff.schedules import make_schedule

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = "train.lock"
ITEMS = ("state", "ema_params")
# Config sections that fix the shapes (and meaning) of what a checkpoint holds; resuming with a
# different value in any of them is refused. data.data_dir only says where the data lives.
MODEL_SECTIONS = ("data", "model", "diffusion")
_FREE_TO_DIFFER = ("data.data_dir",)


class WorkdirError(RuntimeError):
    """The workdir cannot be trained in: unwritable, too little space, in use, or incompatible."""


def write_config(workdir: str, config: ml_collections.ConfigDict) -> str:
    """Writes the resolved config to `workdir/config.json` (atomically) and returns the path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    _write_atomically(path, config_to_json(config))
    return path


def _write_atomically(path: str, text: str) -> None:
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


def checkpoint_manager(
    workdir: str, keep: int | None = None, *, create: bool = True
) -> ocp.CheckpointManager:
    """An orbax manager over `workdir/checkpoints` keeping the last `keep` steps."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def save(
    manager: ocp.CheckpointManager, step: int, state: dict[str, Any], ema_params: Any
) -> None:
    """Saves `state` (a pytree of what resuming needs) and `ema_params` as step `step`.

    Arrays should be on the host or a single device (unreplicated).
    """
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            ema_params=ocp.args.StandardSave(ema_params),
        ),
        force=True,
    )


def restore(
    manager: ocp.CheckpointManager, abstract_state: dict[str, Any], abstract_ema: Any,
    step: int | None = None,
) -> tuple[int, dict[str, Any], Any] | None:
    """(step, state, ema_params) from the latest (or given) checkpoint; None if there is none.

    The abstract arguments (pytrees of arrays or `jax.ShapeDtypeStruct`) give the structure.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    if "state" not in _saved_items(manager, step):
        raise ValueError(
            f"checkpoint {step} in {manager.directory} holds only EMA weights (an export), "
            "not a training state to resume from; train in a fresh workdir"
        )
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            ema_params=ocp.args.StandardRestore(abstract_ema),
        ),
    )
    return step, restored.state, restored.ema_params


def latest_step(workdir: str) -> int | None:
    """The latest finalised checkpoint step in `workdir` (None if there is none)."""
    if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
        return None
    manager = checkpoint_manager(workdir, create=False)
    step = manager.latest_step()
    manager.close()
    return step


def _saved_items(manager: ocp.CheckpointManager, step: int) -> set[str]:
    path = os.path.join(str(manager.directory), str(step))
    return {name for name in os.listdir(path) if name in ITEMS}


def export(
    workdir: str, config: ml_collections.ConfigDict, ema_params: Any, *, step: int = 0
) -> str:
    """Writes a workdir that `load` restores: `config.json` and the EMA weights as step `step`.

    Used by the converter for published weights; a training workdir has the same layout.
    Returns the workdir.
    """
    validate(config, num_devices=1)
    write_config(workdir, config)
    manager = checkpoint_manager(workdir)
    manager.save(
        step,
        args=ocp.args.Composite(ema_params=ocp.args.StandardSave(jax.device_get(ema_params))),
        force=True,
    )
    manager.wait_until_finished()
    manager.close()
    return workdir


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The shape of one example: (H, W, C), or (D,) for points."""
    if config.model.name == "mlp":
        return (config.data.channels,)
    size = config.data.image_size
    return (size, size, config.data.channels)


def load(workdir: str, step: int | None = None) -> DiffusionModel:
    """The model in `workdir` with its EMA weights (latest checkpoint unless `step` is given).

    Restores only the EMA weights and `config.json`; the network comes from
    `models.create_model(config)` and the schedule from the config's diffusion settings.
    """
    config = read_config(workdir)
    manager = checkpoint_manager(workdir, create=False)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    restored = manager.restore(
        step, args=ocp.args.Composite(ema_params=ocp.args.StandardRestore())
    )
    manager.close()
    conditional = config.model.class_cond or config.model.name == "classifier"
    return DiffusionModel(
        params=jax.tree.map(jnp.asarray, restored.ema_params),
        schedule=make_schedule(config.diffusion.beta_schedule, config.diffusion.num_timesteps),
        model=create_model(config),
        image_shape=image_shape(config),
        model_output_type=config.diffusion.model_output,
        model_var_type=config.diffusion.model_var_type,
        num_classes=config.data.num_classes if conditional else 0,
    )


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


def check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
    """WorkdirError if `workdir` holds a checkpoint of a different model than `config` describes.

    Compares the saved `config.json`'s data, model and diffusion settings with `config`'s.
    """
    step = latest_step(workdir)
    if step is None or not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
        return
    saved = read_config(workdir)
    changed = []
    for section in MODEL_SECTIONS:
        old, new = saved.get(section, {}), config[section]
        for field in sorted(set(old) | set(new)):
            name = f"{section}.{field}"
            a, b = old.get(field, "<missing>"), new.get(field, "<missing>")
            if name not in _FREE_TO_DIFFER and a != b:
                changed.append(f"config.{name}: saved {a!r}, now {b!r}")
    if changed:
        lines = "\n".join(f"  - {c}" for c in changed)
        raise WorkdirError(
            f"workdir {workdir!r} holds a checkpoint (step {step}) of a different model; "
            f"resuming would not fit it:\n{lines}\n"
            "use another --workdir, or the saved values to resume this run"
        )


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[str]:
    """Holds `workdir/train.lock` ("pid host start") for the duration of the block.

    The file is created with O_CREAT | O_EXCL, so of two runs starting together exactly one
    gets it. `start` (boot id and start time of the process, from /proc) tells the owner from
    a later process that reuses its pid (pid 1 after a container restart, or this very process):
    a lock whose process has died or been replaced is taken over; a live owner's is a
    WorkdirError naming its pid and how to clear the lock.
    """
    path = os.path.join(workdir, LOCK_FILE)
    me = f"{os.getpid()} {socket.gethostname()} {_process_start(os.getpid())}"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(path)
            if owner is not None:
                raise WorkdirError(
                    f"workdir {workdir!r} is in use by another training run (pid {owner}; lock "
                    f"file {path}); wait for it or stop it, or use another --workdir; if no run "
                    f"uses it (the pid is another program's), delete {path}"
                ) from None
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
        mine = False
        with contextlib.suppress(OSError), open(path) as f:
            mine = f.read().strip() == me
        if mine:
            os.remove(path)


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
