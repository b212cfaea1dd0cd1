"""What survives what: kill -9 (even mid-checkpoint), SIGTERM, non-finite updates, an unwritable
or full disk, two runs on one workdir, a workdir of another model, weights of another network.

The process tests run `python -m jaxdiff.train` on toy2d.py with a tiny MLP and a checkpoint
every call of 5 steps, so that a checkpoint is being written most of the time.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from absl import logging

import jaxdiff
from jaxdiff import checkpoint, train
from tests.test_train import ROOT, _hook_data, _leaves_close, tiny_toy

NUM_STEPS = 100
FLAGS = {"training.batch_size": 16,
         "training.steps_per_call": 5, "training.log_every": 5, "training.checkpoint_every": 5,
         "training.sample_every": 0, "training.keep_checkpoints": 2}
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes <step><suffix>... and renames it to <step>


def toy(num_steps=NUM_STEPS, **overrides):
    """The in-process twin of `_command(workdir, num_steps)` (tiny_toy: hidden 32, depth 2)."""
    return tiny_toy(**{**FLAGS, "training.num_steps": num_steps, **overrides})


def _command(workdir, num_steps=NUM_STEPS):
    settings = {**FLAGS, "model.hidden": 32, "model.depth": 2}
    flags = [f"--config.{k}={v}" for k, v in settings.items()]
    return [sys.executable, "-m", "jaxdiff.train", "--config", "experiments/toy2d.py",
            "--workdir", str(workdir), f"--config.training.num_steps={num_steps}", *flags]


def _start(workdir, log):
    """The training command in the background, its output to the file `log`."""
    out = open(log, "w")
    return subprocess.Popen(_command(workdir), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def _run(workdir, log):
    process = _start(workdir, log)
    process.wait(timeout=120)
    return process.returncode, open(log).read()


def _wait_for(condition, process, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the moment to interrupt it"
        assert time.monotonic() < deadline, "timed out waiting for the moment to interrupt"
        time.sleep(0.002)


def _checkpoint_dirs(workdir):
    directory = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    return os.listdir(directory) if os.path.isdir(directory) else []


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _saved_state(workdir, like):
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                            train._checkpoint_items(like))
    manager = checkpoint.checkpoint_manager(workdir, create=False)
    step, state, ema = checkpoint.restore(manager, *abstract)
    manager.close()
    return step, state, ema


def _lock_pid(workdir):
    with open(os.path.join(workdir, checkpoint.LOCK_FILE)) as f:
        return int(f.read().split()[0])


# ---------------------------------------------------------------------------------------------
# Processes killed and stopped.


@pytest.mark.slow  # training processes killed and resumed: about 30 s
def test_kill9_anywhere_then_resume_matches_an_uninterrupted_run(tmp_path):
    """kill -9 while a checkpoint is half-written, then at a random moment of the resumed run;
    the third run of the same command finishes, and its losses and final state equal an
    uninterrupted run's (1e-6)."""
    workdir = str(tmp_path / "killed")

    # 1. Killed while orbax writes a checkpoint (its tmp dir exists), after a first one is done.
    process = _start(workdir, tmp_path / "run1.log")
    seen = []

    def mid_write():
        names = _checkpoint_dirs(workdir)
        seen[:] = names
        return any(n.isdigit() for n in names) and any(TMP_SUFFIX in n for n in names)

    _wait_for(mid_write, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    unfinished = [n for n in seen if TMP_SUFFIX in n]
    assert unfinished, seen
    latest = checkpoint.latest_step(workdir)
    assert latest is not None and latest < int(unfinished[0].split(".")[0])
    jaxdiff.load(workdir)  # the latest complete checkpoint restores
    assert _lock_pid(workdir) == process.pid  # left behind; the next run takes it over

    # 2. The same command resumes from it; killed at a random moment after its first record.
    random_moment = random.Random(os.getpid()).uniform(0.0, 1.0)
    process = _start(workdir, tmp_path / "run2.log")
    records = len(_records(workdir))
    _wait_for(lambda: len(_records(workdir)) > records, process)
    time.sleep(random_moment)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert f"resuming from the checkpoint at step {latest}" in open(tmp_path / "run2.log").read()
    resumed_from = checkpoint.latest_step(workdir)
    assert resumed_from is not None and resumed_from >= latest

    # 3. The same command again finishes the run.
    rc, log = _run(workdir, tmp_path / "run3.log")
    assert rc == 0, log
    assert f"resuming from the checkpoint at step {resumed_from}" in log
    assert not os.path.exists(os.path.join(workdir, checkpoint.LOCK_FILE))

    reference = str(tmp_path / "straight")
    straight = train.train_and_evaluate(toy(**{"training.checkpoint_every": NUM_STEPS}),
                                        reference)
    expected, got = _records(reference), _records(workdir)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(
        range(5, NUM_STEPS + 1, 5))
    for key in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in expected], atol=1e-6,
                                   rtol=0)
    step, state, ema = _saved_state(workdir, straight)
    assert step == NUM_STEPS
    _leaves_close(state["params"], straight.params, atol=1e-6)
    _leaves_close(state["opt_state"], straight.opt_state, atol=1e-6)
    _leaves_close(ema, straight.ema_params, atol=1e-6)


@pytest.mark.slow  # a training process stopped by SIGTERM, then resumed twice: about 7 s
def test_sigterm_saves_the_current_step_and_exits_0(tmp_path):
    workdir = str(tmp_path / "w")
    process = _start(workdir, tmp_path / "run.log")
    _wait_for(lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")), process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    last = _records(workdir)[-1]["step"]
    assert last < NUM_STEPS
    assert f"stopped at step {last}; checkpoint saved" in open(tmp_path / "run.log").read()
    assert checkpoint.latest_step(workdir) == last
    assert not any(TMP_SUFFIX in n for n in _checkpoint_dirs(workdir))
    assert not os.path.exists(os.path.join(workdir, checkpoint.LOCK_FILE))


def test_unfinalised_checkpoint_is_never_restored(tmp_path):
    """A half-written step (orbax's tmp dir, even with a complete-looking copy inside) is
    invisible: the latest step, `load` and resuming all use the finalised one."""
    workdir = str(tmp_path / "w")
    train.train_and_evaluate(toy(10), workdir)
    directory = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    os.rename(os.path.join(directory, "10"), os.path.join(directory, f"15{TMP_SUFFIX}-123"))
    assert checkpoint.latest_step(workdir) == 5
    assert jaxdiff.load(workdir) is not None
    state = train.train_and_evaluate(toy(10), workdir)
    assert int(state.step) == 10 and checkpoint.latest_step(workdir) == 10


# ---------------------------------------------------------------------------------------------
# Non-finite updates.


@pytest.mark.slow  # two training runs, the second to divergence: about 10 s
def test_diverging_lr_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "w")
    good = train.train_and_evaluate(toy(10), workdir)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss .* at step 1[0-4] "):
        train.train_and_evaluate(toy(20, **{"optim.lr": 1e30, "optim.warmup_steps": 0}), workdir)
    assert checkpoint.checkpoint_manager(workdir).all_steps() == [5, 10]
    step, state, _ = _saved_state(workdir, good)
    assert step == 10
    _leaves_close(state["params"], good.params, atol=0)


def test_nonfinite_gradient_alone_is_caught():
    metrics = {"loss": np.array([0.5, 0.4, 0.3]), "grad_norm": np.array([1.0, np.inf, 1.0])}
    with pytest.raises(FloatingPointError, match=r"loss 0.4 at step 8 \(gradient norm inf"):
        train._check_finite(metrics, 7)


@pytest.mark.slow  # a 20-step training run with a NaN batch: about 10 s
def test_skip_nonfinite_skips_the_bad_update_and_counts_it(tmp_path, monkeypatch):
    _hook_data(monkeypatch, at=12, hook=lambda b: {**b, "x": np.full_like(b["x"], np.nan)})
    workdir = str(tmp_path / "w")
    state = train.train_and_evaluate(toy(20, **{"training.skip_nonfinite": True}), workdir)
    assert int(state.step) == 20
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
    records = _records(workdir)
    assert [r["skipped"] for r in records] == [0, 0, 1, 0]
    assert all(np.isfinite(r["loss"]) for r in records)


# ---------------------------------------------------------------------------------------------
# The workdir: writable, room, one run at a time, the same model.


def test_unwritable_workdir_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    start = time.monotonic()
    result = subprocess.run(_command(blocker / "sub"), cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert f"jaxdiff.train: error: workdir '{blocker / 'sub'}' is not writable" in result.stderr
    assert "Traceback" not in result.stderr
    print(f"failed after {time.monotonic() - start:.1f} s")


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    workdir = tmp_path / "w"
    with pytest.raises(checkpoint.WorkdirError,
                       match=r"not enough disk space .* MiB needed \(3 checkpoint"):
        train.train_and_evaluate(toy(10), str(workdir))
    assert not workdir.exists()  # a failed start removes the workdir it created


def test_a_second_run_on_a_held_workdir_is_refused(tmp_path):
    workdir = str(tmp_path / "w")
    os.makedirs(workdir)
    with checkpoint.workdir_lock(workdir):
        result = subprocess.run(_command(workdir), cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 1
        assert (f"workdir '{workdir}' is in use by another training run (pid {os.getpid()};"
                in result.stderr)
        assert _lock_pid(workdir) == os.getpid()
        assert not os.path.exists(os.path.join(workdir, checkpoint.CONFIG_FILE))
    assert not os.path.exists(os.path.join(workdir, checkpoint.LOCK_FILE))


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    workdir = str(tmp_path / "w")
    os.makedirs(workdir)
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = os.path.join(workdir, checkpoint.LOCK_FILE)
    with open(path, "w") as f:
        f.write(f"{dead.pid} {socket.gethostname()}\n")
    with checkpoint.workdir_lock(workdir):
        assert _lock_pid(workdir) == os.getpid()
    assert not os.path.exists(path)


def test_checkpoint_of_another_model_is_refused_naming_the_field(tmp_path):
    config = toy(10)
    state = train.train_functions(config).init_state(jax.random.PRNGKey(0))
    workdir = checkpoint.export(str(tmp_path / "w"), config, state.ema_params)
    other = toy(10, **{"model.depth": 3, "diffusion.beta_schedule": "cosine"})
    with pytest.raises(checkpoint.WorkdirError) as error:
        train.train_and_evaluate(other, workdir)
    message = str(error.value)
    assert "holds a checkpoint (step 0) of a different model" in message
    assert "config.model.depth: saved 2, now 3" in message
    assert "config.diffusion.beta_schedule: saved 'linear', now 'cosine'" in message
    assert checkpoint.read_config(workdir).model.depth == 2  # config.json left as it was


# ---------------------------------------------------------------------------------------------
# Sampling with weights of another network.


def _init_params(config):
    """Zero weights of the shapes `config`'s network has (nothing compiled)."""
    abstract = jax.eval_shape(train.train_functions(config).init_state, jax.random.PRNGKey(0))
    return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract.ema_params)


def test_sampling_with_weights_of_another_architecture_is_refused(tmp_path):
    config = toy(10)
    model = jaxdiff.load(checkpoint.export(str(tmp_path / "w"), config, _init_params(config)))
    wider = _init_params(toy(10, **{"model.hidden": 48}))
    with pytest.raises(ValueError, match=r"params do not fit the model .*wrong shapes \["):
        jaxdiff.sample(model.replace(params=wider), jax.random.PRNGKey(0), num_samples=2)
    deeper = _init_params(toy(10, **{"model.depth": 3}))
    with pytest.raises(ValueError, match=r"params do not fit the model .*unexpected \[.*block2"):
        jaxdiff.sample(model.replace(params=deeper), jax.random.PRNGKey(0), num_samples=2)
    assert jaxdiff.sample(model, jax.random.PRNGKey(0), num_samples=2).shape == (2, 2)


# ---------------------------------------------------------------------------------------------
# What a run says and writes at the edges.


def test_resuming_past_num_steps_says_so(tmp_path, capsys):
    workdir = str(tmp_path / "w")
    train.train_and_evaluate(toy(10), workdir)
    capsys.readouterr()
    state = train.train_and_evaluate(toy(5), workdir)
    out = capsys.readouterr().out
    assert int(state.step) == 10
    assert ("training is already past training.num_steps=5: the checkpoint is at step 10; "
            "nothing to train (set --config.training.num_steps above 10 to continue)") in out
    assert checkpoint.latest_step(workdir) == 10
    train.train_and_evaluate(toy(10), workdir)
    assert "training already finished: the checkpoint is at step 10" in capsys.readouterr().out


def _strict_json(line):
    """json.loads that refuses NaN and Infinity, as most JSON readers outside Python do."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(line, parse_constant=refuse)


@pytest.mark.slow  # a training run with NaN batches: about 9 s
def test_a_record_of_only_skipped_updates_is_null_not_nan(tmp_path, monkeypatch):
    _hook_data(monkeypatch, at=12, hook=lambda b: {**b, "x": np.full_like(b["x"], np.nan)})
    workdir = str(tmp_path / "w")
    config = toy(15, **{"training.skip_nonfinite": True, "training.steps_per_call": 1,
                        "training.log_every": 1, "training.checkpoint_every": 15})
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [_strict_json(line) for line in f]
    bad = records[12]  # the record of step 13: its one update (step 12 -> 13) was skipped
    assert bad["step"] == 13 and bad["skipped"] == 1
    assert bad["loss"] is None and bad["grad_norm"] is None
    assert all(r["loss"] is not None for r in records if r["step"] != 13)


# ---------------------------------------------------------------------------------------------
# Ctrl-C.


def _start_interruptible(workdir, log):
    """`_start` with SIGINT at its default (Python's KeyboardInterrupt), even where pytest runs
    in the background with SIGINT ignored (a child would inherit that)."""
    out = open(log, "w")
    return subprocess.Popen(_command(workdir), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow  # a training process, started and stopped: about 10 s
def test_sigint_saves_the_current_step_and_exits_0(tmp_path):
    workdir = str(tmp_path / "w")
    process = _start_interruptible(workdir, tmp_path / "run.log")
    _wait_for(lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")), process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0, open(tmp_path / "run.log").read()
    log = open(tmp_path / "run.log").read()
    last = _records(workdir)[-1]["step"]
    assert last < NUM_STEPS
    assert f"stopped at step {last}; checkpoint saved; rerun the command to resume" in log
    assert "Traceback" not in log
    assert checkpoint.latest_step(workdir) == last
    assert not any(TMP_SUFFIX in n for n in _checkpoint_dirs(workdir))
    assert not os.path.exists(os.path.join(workdir, checkpoint.LOCK_FILE))


@pytest.mark.slow  # two training processes: about 15 s
def test_sigint_during_start_up_leaves_a_workdir_that_resumes(tmp_path):
    """Ctrl-C as soon as the run holds the workdir (start-up: compiling, restoring): it ends
    with one line (130) or, if the loop had begun, saves (0); either way the lock is released
    and the same command then finishes the run."""
    workdir = str(tmp_path / "w")
    process = _start_interruptible(workdir, tmp_path / "run1.log")
    _wait_for(lambda: os.path.exists(os.path.join(workdir, checkpoint.LOCK_FILE)), process)
    process.send_signal(signal.SIGINT)
    rc = process.wait(timeout=60)
    log = open(tmp_path / "run1.log").read()
    assert "Traceback" not in log
    if rc == 130:
        assert log.splitlines()[-1].startswith("jaxdiff.train: interrupted: ")
    else:
        assert rc == 0 and "checkpoint saved" in log
    assert not os.path.exists(os.path.join(workdir, checkpoint.LOCK_FILE))
    rc, log = _run(workdir, tmp_path / "run2.log")
    assert rc == 0, log
    assert [r["step"] for r in _records(workdir)] == list(range(5, NUM_STEPS + 1, 5))


def test_second_sigint_aborts_without_saving(tmp_path, monkeypatch):
    def ctrl_c_twice(batch):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs before os.kill returns
        os.kill(os.getpid(), signal.SIGINT)
        return batch

    _hook_data(monkeypatch, at=7, hook=ctrl_c_twice)
    handler = signal.getsignal(signal.SIGINT)
    workdir = str(tmp_path / "w")
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(toy(20), workdir)
    assert checkpoint.latest_step(workdir) == 5  # nothing saved after the interrupt
    assert signal.getsignal(signal.SIGINT) is handler
    assert not os.path.exists(os.path.join(workdir, checkpoint.LOCK_FILE))


def test_first_sigint_saves_and_stops(tmp_path, monkeypatch, capsys):
    _hook_data(monkeypatch, at=7, hook=lambda b: os.kill(os.getpid(), signal.SIGINT) or b)
    workdir = str(tmp_path / "w")
    state = train.train_and_evaluate(toy(20), workdir)
    assert int(state.step) == 10 and checkpoint.latest_step(workdir) == 10
    assert "stopped at step 10; checkpoint saved" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Stale locks of a live pid.


def _write_lock(workdir, text, mtime=None):
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, checkpoint.LOCK_FILE)
    with open(path, "w") as f:
        f.write(text)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.mark.parametrize("pid", [1, os.getpid()], ids=["pid1", "own_pid"])
def test_stale_lock_of_a_reused_pid_is_taken_over(tmp_path, pid):
    """A lock naming a live pid that is not its writer (pid 1 after a container restart, or a
    restarted job's own pid): a recorded start that differs, or (a lock of the previous
    release, "pid host") a process started after the lock was written."""
    host = socket.gethostname()
    new_format = str(tmp_path / "new")
    _write_lock(new_format, f"{pid} {host} {checkpoint._boot_id()}/0\n")
    with checkpoint.workdir_lock(new_format):
        assert _lock_pid(new_format) == os.getpid()
    old_format = str(tmp_path / "old")
    before_it_started = checkpoint._process_start_time(pid) - 3600
    _write_lock(old_format, f"{pid} {host}\n", mtime=before_it_started)
    with checkpoint.workdir_lock(old_format):
        assert _lock_pid(old_format) == os.getpid()
    assert not os.path.exists(os.path.join(old_format, checkpoint.LOCK_FILE))


def test_lock_of_a_live_run_is_kept_in_either_format(tmp_path):
    """The live owner's lock, as this release writes it and as the previous one did."""
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname()
        for name, text in [("new", f"{owner.pid} {host} {checkpoint._process_start(owner.pid)}"),
                           ("old", f"{owner.pid} {host}")]:
            workdir = str(tmp_path / name)
            path = _write_lock(workdir, text + "\n")
            with pytest.raises(checkpoint.WorkdirError,
                               match=rf"in use by another training run \(pid {owner.pid}; .*if "
                               rf"no run uses it .*, delete {path}$"):
                with checkpoint.workdir_lock(workdir):
                    pass
            assert open(path).read() == text + "\n"
    finally:
        owner.kill()
        owner.wait()


# ---------------------------------------------------------------------------------------------
# Corrupt and partial checkpoints: 8 bytes overwritten, a file truncated, a file deleted.

DAMAGE = ("flip", "truncate", "delete")


def _ema_chunk(workdir, step):
    """The largest data file of step `step`'s EMA weights (orbax's OCDBT chunks)."""
    directory = os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(step), "ema_params",
                             "ocdbt.process_0", "d")
    return max((os.path.join(directory, n) for n in os.listdir(directory)), key=os.path.getsize)


def _damage(path, how):
    size = os.path.getsize(path)
    if how == "flip":  # 8 bytes in the middle, each changed
        with open(path, "r+b") as f:
            f.seek(size // 2)
            old = f.read(8)
            f.seek(size // 2)
            f.write(bytes(b ^ 0xFF for b in old))
    elif how == "truncate":
        os.truncate(path, size // 3)
    else:
        os.remove(path)


def _set_aside(workdir):
    return [n for n in _checkpoint_dirs(workdir) if n.startswith(checkpoint.CORRUPT_PREFIX)]


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A workdir with checkpoints at steps 5 and 10, and step 5's EMA weights."""
    workdir = str(tmp_path_factory.mktemp("two_steps") / "w")
    train.train_and_evaluate(toy(10), workdir)
    return workdir, jaxdiff.load(workdir, step=5).params


def _copy(workdir, tmp_path):
    import shutil

    return shutil.copytree(workdir, str(tmp_path / "w"))


@pytest.mark.parametrize("how", DAMAGE)
def test_load_falls_back_from_a_damaged_latest_step(two_steps, tmp_path, capsys, how):
    workdir = _copy(two_steps[0], tmp_path)
    chunk = _ema_chunk(workdir, 10)
    _damage(chunk, how)
    model = jaxdiff.load(workdir)
    err = capsys.readouterr().err
    name = os.path.relpath(chunk, os.path.join(workdir, checkpoint.CHECKPOINT_DIR, "10"))
    what = "is missing" if how == "delete" else "differs from the one saved (sha256 mismatch"
    why = "missing-file" if how == "delete" else "checksum-mismatch"
    aside = os.path.join(workdir, checkpoint.CHECKPOINT_DIR, f"corrupt-10-{why}")
    assert (f"the checkpoint at step 10 in {os.path.dirname(aside)} is corrupt or partial: "
            f"file {name} {what}") in err
    assert f"kept aside as {aside}" in err
    assert err.splitlines()[-1] == "jaxdiff: using the checkpoint at step 5 instead"
    _leaves_close(model.params, two_steps[1], atol=0)
    assert _set_aside(workdir) == [f"corrupt-10-{why}"]
    assert os.path.exists(os.path.join(aside, checkpoint.CHECKSUM_FILE))  # kept whole
    assert checkpoint.latest_step(workdir) == 5


def test_load_of_a_damaged_step_asked_for_names_it(two_steps, tmp_path):
    workdir = _copy(two_steps[0], tmp_path)
    _damage(_ema_chunk(workdir, 10), "truncate")
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=r"checkpoint at step 10 in .* is corrupt or partial: file "
                             r"ema_params/ocdbt.process_0/d/\w+ differs"):
        jaxdiff.load(workdir, step=10)
    assert _set_aside(workdir) == []  # asked for by name: reported, left where it is


def test_no_intact_checkpoint_is_a_clear_error(two_steps, tmp_path):
    workdir = _copy(two_steps[0], tmp_path)
    _damage(_ema_chunk(workdir, 10), "delete")
    _damage(_ema_chunk(workdir, 5), "flip")
    with pytest.raises(checkpoint.CorruptCheckpointError) as error:
        jaxdiff.load(workdir)
    lines = str(error.value).splitlines()
    assert lines[0] == f"no intact checkpoint in {workdir}/{checkpoint.CHECKPOINT_DIR}:"
    assert lines[1].startswith("  - step 10: file ema_params/") and "is missing" in lines[1]
    assert lines[2].startswith("  - step 5: file ema_params/") and "sha256 mismatch" in lines[2]
    assert sorted(_set_aside(workdir)) == ["corrupt-10-missing-file", "corrupt-5-checksum-mismatch"]


def test_step_of_the_previous_release_without_checksums(two_steps, tmp_path, capsys):
    """Saved before checksums (no SHA256SUMS): it loads; if it cannot be read, the fallback
    says so in one line, without tensorstore's 'Event loop is closed' tracebacks."""
    workdir = _copy(two_steps[0], tmp_path)
    for step in (5, 10):
        os.remove(os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(step),
                               checkpoint.CHECKSUM_FILE))
    assert jaxdiff.load(workdir) is not None and capsys.readouterr().err == ""
    _damage(_ema_chunk(workdir, 10), "truncate")
    model = jaxdiff.load(workdir)
    err = capsys.readouterr().err
    assert err.startswith("jaxdiff: the checkpoint at step 10 in ")
    assert ": it cannot be read (" in err and "kept aside as " in err
    assert "Event loop is closed" not in err and "Traceback" not in err
    assert len(err.splitlines()) == 2
    _leaves_close(model.params, two_steps[1], atol=0)


@pytest.mark.slow  # a training process per kind of damage: about 10 s each
@pytest.mark.parametrize("how", DAMAGE)
def test_resume_falls_back_from_a_damaged_latest_step(two_steps, tmp_path, how):
    workdir = _copy(two_steps[0], tmp_path)
    _damage(_ema_chunk(workdir, 10), how)
    rc, log = _run_command(workdir, tmp_path / "run.log", num_steps=15)
    assert rc == 0, log
    assert "the checkpoint at step 10 in " in log and "is corrupt or partial: file " in log
    assert "resuming from the checkpoint at step 5" in log
    assert "Traceback" not in log and "Event loop is closed" not in log
    assert [r["step"] for r in _records(workdir)] == [5, 10, 15]
    assert len(_set_aside(workdir)) == 1
    assert checkpoint.latest_step(workdir) == 15
    jaxdiff.load(workdir)  # the new steps carry checksums that match


@pytest.mark.slow  # a training process (start-up only): about 8 s
def test_resume_with_no_intact_checkpoint_fails_in_one_message(two_steps, tmp_path):
    workdir = _copy(two_steps[0], tmp_path)
    _damage(_ema_chunk(workdir, 10), "truncate")
    os.truncate(_ema_chunk(workdir, 5), 0)
    rc, log = _run_command(workdir, tmp_path / "run.log", num_steps=15)
    assert rc == 1, log
    assert "Traceback" not in log and "OUT_OF_RANGE" not in log
    assert f"jaxdiff.train: error: no intact checkpoint in {workdir}/checkpoints:" in log
    assert log.rstrip().splitlines()[-1].startswith("train again from the start")


def _run_command(workdir, log, num_steps):
    with open(log, "w") as out:
        rc = subprocess.run(_command(workdir, num_steps), cwd=ROOT, stdout=out,
                            stderr=subprocess.STDOUT, timeout=120).returncode
    return rc, open(log).read()


def test_a_failed_save_keeps_the_previous_step_and_says_so(two_steps, tmp_path, monkeypatch):
    """The disk fills while step 15 is written (orbax's metadata write fails with ENOSPC, in its
    background thread): one WorkdirError naming the step and the intact one; step 10 still
    loads and the same run then resumes from it."""
    import errno

    from orbax.checkpoint._src.path import async_path

    workdir = _copy(two_steps[0], tmp_path)
    real_write = async_path.write_text

    async def full_disk(path, text):
        if "/15." in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return await real_write(path, text)

    monkeypatch.setattr(async_path, "write_text", full_disk)
    with pytest.raises(checkpoint.WorkdirError,
                       match=r"could not save the checkpoint at step 15 in .*No space left on "
                             r"device.*; step 10 is intact. Free some disk space"):
        train.train_and_evaluate(toy(20), workdir)
    monkeypatch.undo()
    assert checkpoint.latest_step(workdir) == 10
    jaxdiff.load(workdir)
    assert not os.path.exists(os.path.join(workdir, checkpoint.LOCK_FILE))
    state = train.train_and_evaluate(toy(20), workdir)
    assert int(state.step) == 20 and checkpoint.latest_step(workdir) == 20
    assert [r["step"] for r in _records(workdir)] == [5, 10, 15, 20]


@pytest.mark.slow  # a training process (start-up only): about 8 s
def test_an_os_error_while_training_is_one_line_naming_the_checkpoint(tmp_path):
    """A write that fails (here metrics.jsonl is a directory; on a full disk, ENOSPC)."""
    workdir = str(tmp_path / "w")
    os.makedirs(os.path.join(workdir, "metrics.jsonl"))
    rc, log = _run_command(workdir, tmp_path / "run.log", num_steps=10)
    assert rc == 1 and "Traceback" not in log
    assert log.splitlines()[-1] == (
        f"jaxdiff.train: error: [Errno 21] Is a directory: '{workdir}/metrics.jsonl'; "
        "no checkpoint saved; rerun the command to start again")


FULL_DISK_AT_15 = '''
import errno
from orbax.checkpoint._src.path import async_path
real_write = async_path.write_text
async def full_disk(path, text):
    if "/15." in str(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return await real_write(path, text)
async_path.write_text = full_disk
'''


@pytest.mark.slow  # waits out `_exit`'s 5 s join timeout on a thread: about 8 s
def test_the_exit_message_survives_a_thread_whose_join_raises():
    """Orbax's thread class re-raises its failed save from `join`; `_exit` joins such a thread
    still running (a race the command test below meets now and then) and exits with its message."""
    release = threading.Event()

    class Failing(threading.Thread):  # as orbax's futures.future thread does
        def join(self, timeout=None):
            release.set()
            super().join(timeout)
            raise OSError(28, "No space left on device")

    thread = Failing(target=release.wait)
    thread.start()
    verbosity = logging.get_verbosity()
    try:
        with pytest.raises(SystemExit) as exit_info:
            train._exit("jaxdiff.train: error: could not save", timeout_s=5.0)
    finally:
        logging.set_verbosity(verbosity)  # `_exit` silences absl for the shutdown
    assert exit_info.value.code == "jaxdiff.train: error: could not save"
    assert not thread.is_alive()


@pytest.mark.slow  # two training processes: about 20 s
def test_a_failed_save_is_the_last_thing_the_command_prints(two_steps, tmp_path):
    """The command of the test above, with orbax's write failing from a sitecustomize: its
    error is the last line (orbax's threads end first), and the same command then resumes."""
    workdir = _copy(two_steps[0], tmp_path)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FULL_DISK_AT_15)
    env = {**os.environ, "PYTHONPATH": f"{inject}{os.pathsep}{ROOT}"}
    with open(tmp_path / "run1.log", "w") as out:
        rc = subprocess.run(_command(workdir, 20), cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, timeout=120).returncode
    log = open(tmp_path / "run1.log").read()
    assert rc == 1, log
    assert log.splitlines()[-1].startswith(
        f"jaxdiff.train: error: could not save the checkpoint at step 15 in {workdir}/checkpoints"
        " ([Errno 28] No space left on device: ")
    assert "; step 10 is intact. Free some disk space" in log.splitlines()[-1]
    rc, log = _run_command(workdir, tmp_path / "run2.log", num_steps=20)
    assert rc == 0, log
    assert "resuming from the checkpoint at step 10" in log
    assert checkpoint.latest_step(workdir) == 20
