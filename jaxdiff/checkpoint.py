"""Orbax checkpoints and their checksums, and loading a trained model back.

A workdir (`jaxdiff.workdir`) keeps `checkpoints/<step>/` with two orbax items: `state`
(params, optimizer state, step: what resuming needs) and `ema_params` (the weights samples are
drawn from). `export` writes only `ema_params`, so a converted set of published weights and a
training run load the same way, through `load`.

Orbax writes each step into `<step>.orbax-checkpoint-tmp...` and renames it to `<step>` when
complete; `latest_step`/`restore` only ever see renamed (finalised) steps, so a process killed
mid-write leaves the previous checkpoint as the latest. Once a step is finalised, `save` writes
`<step>/SHA256SUMS` (the sha256 of each of its files), and only then is the step committed: one
without it is partial (`checkpoints/CHECKSUMS_FROM` tells a previous release's steps, saved
before checksums, from these). `restore` and `load` check it and use the newest intact step,
renaming a damaged or partial newer one to `corrupt-<step>-<why>`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from jaxdiff.bundle import DiffusionModel, make_bundle
from jaxdiff.config import validate
from jaxdiff.objectives import network_params
from jaxdiff.workdir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    WorkdirError,
    check_not_held,
    holder,
    read_config,
    write_atomically,
    write_config,
)

# In each step directory, once orbax has finalised it: the sha256 of every file in the step, in
# sha256sum's format (`cd checkpoints/<step> && sha256sum -c SHA256SUMS` checks it by hand).
CHECKSUM_FILE = "SHA256SUMS"
# In `checkpoints/`: the first step saved with checksums, written before that step's save by
# every release that writes them. A step from it on is committed only once its SHA256SUMS is
# written; one without them is partial (a save interrupted after orbax finalised it). Older
# steps without SHA256SUMS are a previous release's (checked by restoring them).
CHECKSUMS_FROM_FILE = "CHECKSUMS_FROM"
# A step found bad is renamed to this (out of orbax's view: it lists numeric names) and kept.
CORRUPT_PREFIX = "corrupt-"
ITEMS = ("state", "ema_params")
# Config sections that fix the shapes (and meaning) of what a checkpoint holds; resuming with a
# different value in any of them is refused. data.data_dir only says where the data lives.
MODEL_SECTIONS = ("data", "model", "diffusion", "consistency", "distill")
# Fields outside them that change what is trained (the optimizer state's structure).
TRAINED_FIELDS = ("optim.optimizer",)
_FREE_TO_DIFFER = ("data.data_dir", "consistency.lpips_heads", "consistency.lpips_vgg")


class CorruptCheckpointError(WorkdirError):
    """A checkpoint's files are not those saved (or cannot be read), and no intact one remains.
    `what` says which and why, the message adds what to do."""

    def __init__(self, what: str, advice: str = ""):
        super().__init__(f"{what}\n{advice}" if advice else what)
        self.what = what


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

    Arrays: on the host, or global arrays as they are sharded (each process writes its
    shards; `restore` places them into whatever shardings it is given). Returns once the step is
    finalised and its checksums written; a failure to write it (a full disk) is a WorkdirError.
    """
    _save_verified(manager, step, ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        ema_params=ocp.args.StandardSave(ema_params),
    ))


def _save_verified(manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite) -> None:
    """`manager.save`, waiting for orbax to finalise the step, then its checksum file.

    Waiting (rather than hashing later) means the files hashed are the finalised ones, and a
    write error surfaces here, as one WorkdirError, instead of in orbax's background thread.
    """
    previous = manager.latest_step()  # asked first: a failed save leaves orbax's list unsure
    if jax.process_index() == 0:
        _mark_checksums_from(str(manager.directory), step)
    try:
        manager.save(step, args=args, force=True)
        manager.wait_until_finished()
    except (OSError, ValueError) as e:  # tensorstore reports I/O errors as ValueError
        kept = "no earlier checkpoint" if previous is None else f"step {previous} is intact"
        raise WorkdirError(
            f"could not save the checkpoint at step {step} in {manager.directory} "
            f"({_first_line(e)}); {kept}. Free some disk space (or fix the error) and rerun "
            "the command to resume from the last saved step"
        ) from e
    if jax.process_index() == 0:
        write_checksums(_step_dir(manager, step))


def restore(
    manager: ocp.CheckpointManager, abstract_state: dict[str, Any], abstract_ema: Any,
    step: int | None = None,
) -> tuple[int, dict[str, Any], Any] | None:
    """(step, state, ema_params) from the latest intact (or given) checkpoint; None if there is
    none. A damaged step is reported and kept aside (`restore_intact`).

    The abstract arguments (pytrees of arrays or `jax.ShapeDtypeStruct`) give the structure.
    """
    def restore_step(step: int) -> Any:
        if "state" not in _saved_items(manager, step):
            raise ValueError(
                f"checkpoint {step} in {manager.directory} holds only EMA weights (an export), "
                "not a training state to resume from; train in a fresh workdir"
            )
        return manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                ema_params=ocp.args.StandardRestore(abstract_ema),
            ),
        )

    found = restore_intact(manager, restore_step, step)
    if found is None:
        return None
    step, restored = found
    return step, restored.state, restored.ema_params


def latest_step(workdir: str) -> int | None:
    """The latest finalised checkpoint step in `workdir` (None if there is none)."""
    if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
        return None
    manager = checkpoint_manager(workdir, create=False)
    step = manager.latest_step()
    manager.close()
    return step


def latest_committed_step(workdir: str) -> int | None:
    """The newest step of `workdir` that is committed (finalised, with its checksums, or a
    previous release's), from the directory listing alone (no orbax, no reading)."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        return None
    first = _checksums_from(directory)
    steps = [int(n) for n in os.listdir(directory) if n.isdigit() and (
        first is None or int(n) < first
        or os.path.exists(os.path.join(directory, n, CHECKSUM_FILE)))]
    return max(steps, default=None)


def _saved_items(manager: ocp.CheckpointManager, step: int) -> set[str]:
    return {name for name in os.listdir(_step_dir(manager, step)) if name in ITEMS}


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


# ---------------------------------------------------------------------------------------------
# Checksums: what a step held when it was saved, checked before it is restored.


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: str) -> list[str]:
    """Paths (relative to `directory`) of every file under it except the checksum file."""
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            found.append(os.path.relpath(os.path.join(root, name), directory))
    return sorted(f for f in found if f != CHECKSUM_FILE)


def write_checksums(step_dir: str) -> None:
    """Writes `step_dir/SHA256SUMS`: the sha256 of every file of a finalised step."""
    lines = [f"{_sha256(os.path.join(step_dir, f))}  {f}\n" for f in _files(step_dir)]
    write_atomically(os.path.join(step_dir, CHECKSUM_FILE), "".join(lines))


def _checksums_from(directory: str) -> int | None:
    """The first step of the checkpoints `directory` saved by a release that writes checksums:
    the recorded one, or (a workdir of the first such release, which recorded none) the oldest
    step with a SHA256SUMS; None if no step has checksums."""
    found = [int(n) for n in os.listdir(directory)
             if n.isdigit() and os.path.exists(os.path.join(directory, n, CHECKSUM_FILE))]
    with contextlib.suppress(OSError, ValueError), \
            open(os.path.join(directory, CHECKSUMS_FROM_FILE)) as f:
        found.append(int(f.read().strip()))
    return min(found, default=None)


def _mark_checksums_from(directory: str, step: int) -> None:
    """Records that steps from `step` on carry checksums (before step `step` is saved)."""
    os.makedirs(directory, exist_ok=True)
    first = _checksums_from(directory)
    if first is None or step < first:
        write_atomically(os.path.join(directory, CHECKSUMS_FROM_FILE), f"{step}\n")


def _checksum_problem(manager: ocp.CheckpointManager, step: int) -> tuple[str, str] | None:
    """(why, in a word; in a sentence) step `step` is not committed, or its files are not those
    its SHA256SUMS records; None if they are.

    A step without SHA256SUMS is partial if a release that writes checksums saved it
    (`_checksums_from`); one saved by a release before checksums is None (`restore_intact` then
    checks that it restores and is finite).
    """
    step_dir = _step_dir(manager, step)
    path = os.path.join(step_dir, CHECKSUM_FILE)
    if not os.path.exists(path):
        first = _checksums_from(str(manager.directory))
        if first is not None and step >= first:
            return "uncommitted", (
                f"it has no {CHECKSUM_FILE} (its save did not finish: a step is complete only "
                "once its checksums are written)")
        return None
    with open(path) as f:
        recorded = [line.rstrip("\n").split("  ", 1) for line in f]
    if not recorded or any(len(entry) != 2 for entry in recorded):
        return "checksums-damaged", f"its {CHECKSUM_FILE} is damaged"
    for digest, name in recorded:
        file = os.path.join(step_dir, name)
        if not os.path.exists(file):
            return "missing-file", f"file {name} is missing"
        if _sha256(file) != digest:
            return "checksum-mismatch", (
                f"file {name} differs from the one saved (sha256 mismatch; "
                f"{os.path.getsize(file)} bytes now)"
            )
    return None


def restore_intact(
    manager: ocp.CheckpointManager, restore_step: Callable[[int], ocp.args.Composite],
    step: int | None = None,
) -> tuple[int, ocp.args.Composite] | None:
    """(step, restore_step(step)) of the latest intact step (`restore_step` calls
    `manager.restore`); None if there is no step.

    Intact: its files match their checksums, it restores, and its arrays are finite. A bad step
    newer than the intact one is reported on stderr and renamed `corrupt-<step>-<why>` (kept,
    out of orbax's view); if none is intact, or the `step` asked for is bad, a
    CorruptCheckpointError says which and why.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if step is not None and step not in steps:
        there = ", ".join(map(str, sorted(steps))) or "none"
        raise FileNotFoundError(f"there is no checkpoint at step {step} in {manager.directory} "
                                f"(its steps: {there})")
    steps = steps if step is None else [step]
    bad = []
    for s in steps:
        problem = _checksum_problem(manager, s)
        if problem is None:
            try:
                with _without_event_loop_noise():
                    restored = restore_step(s)
            except Exception as e:  # orbax wraps a failed read into sharded arrays in Exception
                read_error = _read_error(e)
                if read_error is None:
                    raise
                problem = "unreadable", f"it cannot be read ({_first_line(read_error)})"
            else:
                problem = _nonfinite(dict(restored))
        if problem is None:
            if bad:
                manager.reload()
                print(f"jaxdiff: using the checkpoint at step {s} instead", file=sys.stderr)
            return s, restored
        why, text = problem
        where = f"the checkpoint at step {s} in {manager.directory} is corrupt or partial"
        if step is not None:
            raise CorruptCheckpointError(f"{where}: {text}")
        kept = _keep_aside(manager, s, why)
        print(f"jaxdiff: {where}: {text}; {kept}", file=sys.stderr)
        bad.append(f"step {s}: {text}; {kept}")
    if not bad:
        return None
    manager.reload()
    lines = "\n".join(f"  - {b}" for b in bad)
    raise CorruptCheckpointError(
        f"no intact checkpoint in {manager.directory}:\n{lines}",
        "train again from the start (in this workdir or another), or restore the checkpoints "
        "from a backup"
    )


def export(
    workdir: str, config: ml_collections.ConfigDict, ema_params: Any, *, step: int = 0
) -> str:
    """Writes a workdir that `load` restores: `config.json` and the EMA weights as step `step`.

    Used by the converter for published weights; a training workdir has the same layout.
    Returns the workdir.
    """
    validate(config, num_devices=1)
    check_not_held(workdir)
    saved = latest_step(workdir)
    if saved is not None:
        raise WorkdirError(f"{workdir!r} already holds a checkpoint (step {saved}); export to "
                           "another directory (nothing was changed)")
    write_config(workdir, config)
    manager = checkpoint_manager(workdir)
    _save_verified(manager, step, ocp.args.Composite(
        ema_params=ocp.args.StandardSave(jax.device_get(ema_params))
    ))
    manager.close()
    return workdir


def _restore_ema(manager: ocp.CheckpointManager, step: int | None) -> tuple[int, Any]:
    """(step, the restored composite (`.ema_params`)) of the latest intact (or given) step;
    closes `manager`."""
    try:
        found = restore_intact(
            manager,
            lambda s: manager.restore(
                s, args=ocp.args.Composite(
                    ema_params=ocp.args.StandardRestore(_on_first_device(manager, s)))
            ),
            step,
        )
    finally:
        manager.close()
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    return found


def _on_first_device(manager: ocp.CheckpointManager, step: int) -> Any:
    """The saved EMA's shapes and dtypes on this process's first device: weights saved sharded
    over another mesh (`sharding.state_shardings`) restore whole here."""
    saved = ocp.StandardCheckpointHandler().metadata(
        epath.Path(_step_dir(manager, step)) / "ema_params")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)


def load(workdir: str, step: int | None = None) -> DiffusionModel:
    """The model in `workdir` with its EMA weights (latest intact checkpoint unless `step` is
    given; a damaged newer one is reported and kept aside, see `restore_intact`).

    Restores only the EMA weights and `config.json`; the network comes from
    `models.create_model(config)` and the schedule from the config's diffusion settings.
    """
    return load_step(workdir, step)[1]


def load_step(workdir: str, step: int | None = None) -> tuple[int, DiffusionModel]:
    """(the step loaded, `load(workdir, step)`)."""
    config = read_config(workdir)
    manager = checkpoint_manager(workdir, create=False)
    step, restored = _restore_ema(manager, step)
    # An objective's own weights (sCM's w_phi) are trained beside the network's, not sampled.
    return step, make_bundle(config, network_params(jax.tree.map(jnp.asarray,
                                                                 restored.ema_params)))


# The lines tensorstore prints (to sys.stderr, from several threads, interleaved) for each of its
# reads still in flight when orbax's event loop closes on the first failed one: dozens to
# thousands of them around the real error.
_EVENT_LOOP_NOISE = re.compile(
    r"Traceback \(most recent call last\):"
    r"|  File \".*/asyncio/base_events\.py\", line \d+, in (call_soon_threadsafe|_check_closed)"
    r"|    self\._check_closed\(\)"
    r"|    raise RuntimeError\('Event loop is closed'\)"
    r"|RuntimeError: Event loop is closed"
)


@contextlib.contextmanager
def _without_event_loop_noise(drain_s: float = 0.2) -> Iterator[None]:
    """Holds back what is written to sys.stderr in the block and passes it on without the
    'Event loop is closed' tracebacks; after an exception, waits `drain_s` for the reads still
    in flight to finish (and print) first."""
    real, held = sys.stderr, io.StringIO()
    sys.stderr = held
    try:
        yield
    except Exception:
        time.sleep(drain_s)
        raise
    finally:
        sys.stderr = real
        lines = held.getvalue().splitlines(keepends=True)
        if any(line.startswith("RuntimeError: Event loop is closed") for line in lines):
            lines = [line for line in lines if not _EVENT_LOOP_NOISE.fullmatch(line.rstrip("\n"))]
        real.write("".join(lines))


def _read_error(error: BaseException | None) -> BaseException | None:
    """The error in `error`'s chain (itself, or what it was raised from) that comes from the
    files rather than from the code: an OSError, or a ValueError with a tensorstore status such
    as OUT_OF_RANGE or DATA_LOSS; None if there is none."""
    while error is not None:
        if isinstance(error, OSError) or (isinstance(error, ValueError)
                                          and _TENSORSTORE_READ_ERROR.search(str(error))):
            return error
        error = error.__cause__ or error.__context__
    return None


_TENSORSTORE_READ_ERROR = re.compile(r"\b(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|FAILED_PRECONDITION): ")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _nonfinite(restored: Any) -> tuple[str, str] | None:
    """("nonfinite", which arrays) if a floating array of `restored` holds a NaN or infinity:
    training never saves one, so it is damage (of a step with no checksums)."""
    paths = [
        jax.tree_util.keystr(path)
        for path, x in jax.tree_util.tree_leaves_with_path(restored)
        if jnp.issubdtype(x.dtype, jnp.floating)
        and not bool(jnp.all(jnp.isfinite(x)))  # on the devices: x may span processes
    ]
    if not paths:
        return None
    return "nonfinite", f"it holds non-finite values (in {', '.join(paths[:3])})"


def _keep_aside(manager: ocp.CheckpointManager, step: int, why: str) -> str:
    """Renames step `step` to `corrupt-<step>-<why>[-n]`, out of orbax's view; says where."""
    source = _step_dir(manager, step)
    if jax.process_index() != 0:
        return "process 0 keeps it aside"
    found = holder(source)
    if found is not None:  # the live run that holds the workdir may be writing it
        return f"left in place: the workdir is in use by a training run (pid {found[1]})"
    target = os.path.join(str(manager.directory), f"{CORRUPT_PREFIX}{step}-{why}")
    n = 1
    while os.path.exists(target if n == 1 else f"{target}-{n}"):
        n += 1
    target = target if n == 1 else f"{target}-{n}"
    try:
        os.rename(source, target)
    except OSError as e:
        return f"could not keep it aside ({e}); delete or move {source} yourself"
    return f"kept aside as {target}"


def check_resumable(
    workdir: str, config: ml_collections.ConfigDict,
    resolve: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict] = lambda c: c,
) -> None:
    """WorkdirError if `workdir` holds a checkpoint of a different model or objective than
    `config` describes.

    Compares every setting that changes what is trained (the saved `config.json`'s `data`,
    `model`, `diffusion`, `consistency` and `distill` sections, `TRAINED_FIELDS`) with
    `config`'s, naming each saved and new value, both as `resolve` makes them (a default the
    step resolves, e.g. a curriculum's length). Writes nothing.
    """
    step = latest_step(workdir)
    if step is None or not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
        return
    saved, config = resolve(read_config(workdir)), resolve(config)
    changed = []
    names = [f"{section}.{field}" for section in MODEL_SECTIONS
             for field in sorted(set(saved.get(section, {})) | set(config[section]))]
    for name in [*names, *TRAINED_FIELDS]:
        section, field = name.split(".", 1)
        a = saved.get(section, {}).get(field, "<missing>")
        b = config[section].get(field, "<missing>")
        if name not in _FREE_TO_DIFFER and a != b:
            changed.append(f"config.{name}: saved {a!r}, now {b!r}")
    if changed:
        lines = "\n".join(f"  - {c}" for c in changed)
        raise WorkdirError(
            f"workdir {workdir!r} holds a checkpoint (step {step}) of a different model or "
            "objective; "
            f"resuming would not fit it:\n{lines}\n"
            "use another --workdir, or the saved values to resume this run"
        )
