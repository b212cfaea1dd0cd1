"""What survives what: kill -9 (even mid-checkpoint), SIGTERM, non-finite updates, an unwritable
or full disk, two runs on one workdir, a workdir of another model, weights of another network.

The process tests run `python -m jaxdiff.train` on toy2d.py with a tiny MLP and a checkpoint
every call of 5 steps, so that a checkpoint is being written most of the time.
"""

import json
import os
import random
import re
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
import jaxdiff.workdir
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
    directory = os.path.join(workdir, jaxdiff.workdir.CHECKPOINT_DIR)
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
    with open(os.path.join(workdir, jaxdiff.workdir.LOCK_FILE)) as f:
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
    resumed = int(re.search(r"resuming from the checkpoint at step (\d+)", log).group(1))
    if resumed != resumed_from:  # killed after orbax's commit, before the checksums: set aside
        assert resumed < resumed_from and f"corrupt-{resumed_from}-uncommitted" in log, log
    assert not os.path.exists(os.path.join(workdir, jaxdiff.workdir.LOCK_FILE))

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
    assert not os.path.exists(os.path.join(workdir, jaxdiff.workdir.LOCK_FILE))


def test_unfinalised_checkpoint_is_never_restored(tmp_path):
    """A half-written step (orbax's tmp dir, even with a complete-looking copy inside) is
    invisible: the latest step, `load` and resuming all use the finalised one."""
    workdir = str(tmp_path / "w")
    train.train_and_evaluate(toy(10), workdir)
    directory = os.path.join(workdir, jaxdiff.workdir.CHECKPOINT_DIR)
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
        train._check_finite(metrics, 7, 5)


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
    with pytest.raises(jaxdiff.workdir.WorkdirError,
                       match=r"not enough disk space .* MiB needed \(3 checkpoint"):
        train.train_and_evaluate(toy(10), str(workdir))
    assert not workdir.exists()  # a failed start removes the workdir it created


def test_a_second_run_on_a_held_workdir_is_refused(tmp_path):
    workdir = str(tmp_path / "w")
    os.makedirs(workdir)
    with jaxdiff.workdir.workdir_lock(workdir):
        result = subprocess.run(_command(workdir), cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 1
        assert (f"workdir '{workdir}' is in use by another training run (pid {os.getpid()};"
                in result.stderr)
        assert _lock_pid(workdir) == os.getpid()
        assert not os.path.exists(os.path.join(workdir, jaxdiff.workdir.CONFIG_FILE))
    assert not os.path.exists(os.path.join(workdir, jaxdiff.workdir.LOCK_FILE))


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    workdir = str(tmp_path / "w")
    os.makedirs(workdir)
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = os.path.join(workdir, jaxdiff.workdir.LOCK_FILE)
    with open(path, "w") as f:
        f.write(f"{dead.pid} {socket.gethostname()}\n")
    with jaxdiff.workdir.workdir_lock(workdir):
        assert _lock_pid(workdir) == os.getpid()
    assert not os.path.exists(path)


def test_checkpoint_of_another_model_is_refused_naming_the_field(tmp_path):
    config = toy(10)
    state = train.train_functions(config).init_state(jax.random.PRNGKey(0))
    workdir = checkpoint.export(str(tmp_path / "w"), config, state.ema_params)
    other = toy(10, **{"model.depth": 3, "diffusion.beta_schedule": "cosine"})
    with pytest.raises(jaxdiff.workdir.WorkdirError) as error:
        train.train_and_evaluate(other, workdir)
    message = str(error.value)
    assert "holds a checkpoint (step 0) of a different model" in message
    assert "config.model.depth: saved 2, now 3" in message
    assert "config.diffusion.beta_schedule: saved 'linear', now 'cosine'" in message
    assert jaxdiff.workdir.read_config(workdir).model.depth == 2  # config.json left as it was


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
    assert not os.path.exists(os.path.join(workdir, jaxdiff.workdir.LOCK_FILE))


@pytest.mark.slow  # two training processes: about 15 s
def test_sigint_during_start_up_leaves_a_workdir_that_resumes(tmp_path):
    """Ctrl-C as soon as the run holds the workdir (start-up: compiling, restoring): it ends
    with one line (130) or, if the loop had begun, saves (0); either way the lock is released
    and the same command then finishes the run."""
    workdir = str(tmp_path / "w")
    process = _start_interruptible(workdir, tmp_path / "run1.log")
    _wait_for(lambda: os.path.exists(os.path.join(workdir, jaxdiff.workdir.LOCK_FILE)), process)
    process.send_signal(signal.SIGINT)
    rc = process.wait(timeout=60)
    log = open(tmp_path / "run1.log").read()
    assert "Traceback" not in log
    if rc == 130:
        assert log.splitlines()[-1].startswith("jaxdiff.train: interrupted: ")
    else:
        assert rc == 0 and "checkpoint saved" in log
    assert not os.path.exists(os.path.join(workdir, jaxdiff.workdir.LOCK_FILE))
    rc, log = _run(workdir, tmp_path / "run2.log")
    assert rc == 0, log
    assert [r["step"] for r in _records(workdir)] == list(range(5, NUM_STEPS + 1, 5))


SLOW_SAVES_FROM_10 = '''
import asyncio, re
from orbax.checkpoint._src.path import async_path
real_write = async_path.write_text
async def slow_write(path, text):
    found = re.search(r"/(\\d+)\\.orbax-checkpoint-tmp", str(path))
    if found and int(found.group(1)) >= 10:
        await asyncio.sleep(3)
    return await real_write(path, text)
async_path.write_text = slow_write
'''


@pytest.mark.slow  # two training processes, a save of 3 s: about 20 s
def test_second_sigint_during_a_save_exits_at_once_in_one_line(tmp_path):
    """Ctrl-C while step 10 is being saved (orbax slowed to 3 s a save from a sitecustomize),
    again 0.3 s later: exit 130 within a second, one line, no traceback, nothing of step 10
    trusted; the same command then finishes the run."""
    workdir = str(tmp_path / "w")
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SLOW_SAVES_FROM_10)
    env = {**os.environ, "PYTHONPATH": f"{inject}{os.pathsep}{ROOT}"}
    out = open(tmp_path / "run1.log", "w")
    process = subprocess.Popen(_command(workdir), cwd=ROOT, env=env, stdout=out,
                               stderr=subprocess.STDOUT,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for(lambda: any(n.startswith(f"10{TMP_SUFFIX}") for n in _checkpoint_dirs(workdir)),
              process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    rc = process.wait(timeout=60)
    waited = time.monotonic() - sent
    log = open(tmp_path / "run1.log").read()
    assert rc == 130, log
    assert waited < 1.5, waited
    assert "Traceback" not in log and "Exception ignored" not in log
    assert log.splitlines()[-1] == ("jaxdiff.train: interrupted: the latest checkpoint is at "
                                    "step 5; rerun the command to resume from it")
    assert not os.path.exists(os.path.join(workdir, jaxdiff.workdir.LOCK_FILE))
    _leaves_close(jaxdiff.load(workdir).params, jaxdiff.load(workdir, step=5).params, atol=0)
    rc, log = _run(workdir, tmp_path / "run2.log")
    assert rc == 0, log
    assert [r["step"] for r in _records(workdir)] == list(range(5, NUM_STEPS + 1, 5))


@pytest.mark.slow  # a digits training process interrupted during start-up: 10 to 60 s
@pytest.mark.parametrize("early", [True, False])
def test_sigint_during_digits_start_up_never_crashes(tmp_path, early):
    """Ctrl-C 1 s after launch (the libraries still loading) or 4-10 s after it (compiling,
    restoring, preparing data): it ends with one line (130) or, if the loop had begun, saves
    (0); never a segfault or a traceback."""
    workdir = str(tmp_path / "w")
    out = open(tmp_path / "run.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxdiff.train", "--config", "experiments/digits.py",
         "--workdir", workdir], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(1.0 if early else random.Random(os.getpid()).uniform(4.0, 10.0))
    process.send_signal(signal.SIGINT)
    rc = process.wait(timeout=300)
    log = open(tmp_path / "run.log").read()
    assert "Fatal Python error" not in log and "Traceback" not in log, log
    if rc == 130:
        assert log.splitlines()[-1].startswith("jaxdiff.train: interrupted: "), log
    else:
        assert rc == 0 and "checkpoint saved" in log, log
    assert not os.path.exists(os.path.join(workdir, jaxdiff.workdir.LOCK_FILE))


def test_first_sigint_saves_and_stops(tmp_path, monkeypatch, capsys):
    # Read one call ahead (prefetch to the devices): during the call of steps 5..9.
    _hook_data(monkeypatch, at=12, hook=lambda b: os.kill(os.getpid(), signal.SIGINT) or b)
    workdir = str(tmp_path / "w")
    state = train.train_and_evaluate(toy(20), workdir)
    assert int(state.step) == 10 and checkpoint.latest_step(workdir) == 10
    assert "stopped at step 10; checkpoint saved" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Stale locks of a live pid.


def _write_lock(workdir, text, mtime=None):
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, jaxdiff.workdir.LOCK_FILE)
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
    _write_lock(new_format, f"{pid} {host} {jaxdiff.workdir._boot_id()}/0\n")
    with jaxdiff.workdir.workdir_lock(new_format):
        assert _lock_pid(new_format) == os.getpid()
    old_format = str(tmp_path / "old")
    before_it_started = jaxdiff.workdir._process_start_time(pid) - 3600
    _write_lock(old_format, f"{pid} {host}\n", mtime=before_it_started)
    with jaxdiff.workdir.workdir_lock(old_format):
        assert _lock_pid(old_format) == os.getpid()
    assert not os.path.exists(os.path.join(old_format, jaxdiff.workdir.LOCK_FILE))


def test_lock_of_a_live_run_is_kept_in_either_format(tmp_path):
    """The live owner's lock, as this release writes it and as the previous one did."""
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname()
        start = jaxdiff.workdir._process_start(owner.pid)
        for name, text in [("new", f"{owner.pid} {host} {start}"), ("old", f"{owner.pid} {host}")]:
            workdir = str(tmp_path / name)
            path = _write_lock(workdir, text + "\n")
            with pytest.raises(jaxdiff.workdir.WorkdirError,
                               match=rf"in use by another training run \(pid {owner.pid}; .*if "
                               rf"no run uses it .*, delete {path}$"):
                with jaxdiff.workdir.workdir_lock(workdir):
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
    directory = os.path.join(workdir, jaxdiff.workdir.CHECKPOINT_DIR, str(step), "ema_params",
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
    name = os.path.relpath(chunk, os.path.join(workdir, jaxdiff.workdir.CHECKPOINT_DIR, "10"))
    what = "is missing" if how == "delete" else "differs from the one saved (sha256 mismatch"
    why = "missing-file" if how == "delete" else "checksum-mismatch"
    aside = os.path.join(workdir, jaxdiff.workdir.CHECKPOINT_DIR, f"corrupt-10-{why}")
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
    assert lines[0] == f"no intact checkpoint in {workdir}/{jaxdiff.workdir.CHECKPOINT_DIR}:"
    assert lines[1].startswith("  - step 10: file ema_params/") and "is missing" in lines[1]
    assert lines[2].startswith("  - step 5: file ema_params/") and "sha256 mismatch" in lines[2]
    assert sorted(_set_aside(workdir)) == ["corrupt-10-missing-file", "corrupt-5-checksum-mismatch"]


def test_step_of_the_previous_release_without_checksums(two_steps, tmp_path, capsys):
    """Saved before checksums (no SHA256SUMS): it loads; if it cannot be read, the fallback
    says so in one line, without tensorstore's 'Event loop is closed' tracebacks."""
    workdir = _copy(two_steps[0], tmp_path)
    for step in (5, 10):
        os.remove(os.path.join(workdir, jaxdiff.workdir.CHECKPOINT_DIR, str(step),
                               checkpoint.CHECKSUM_FILE))
    os.remove(os.path.join(workdir, jaxdiff.workdir.CHECKPOINT_DIR, checkpoint.CHECKSUMS_FROM_FILE))
    assert jaxdiff.load(workdir) is not None and capsys.readouterr().err == ""
    _damage(_ema_chunk(workdir, 10), "truncate")
    model = jaxdiff.load(workdir)
    err = capsys.readouterr().err
    assert err.startswith("jaxdiff: the checkpoint at step 10 in ")
    assert ": it cannot be read (" in err and "kept aside as " in err
    assert "Event loop is closed" not in err and "Traceback" not in err
    assert len(err.splitlines()) == 2
    _leaves_close(model.params, two_steps[1], atol=0)


def _remove_checksums(workdir, step):
    os.remove(os.path.join(workdir, jaxdiff.workdir.CHECKPOINT_DIR, str(step),
                           checkpoint.CHECKSUM_FILE))


def test_a_step_without_its_checksums_is_partial(two_steps, tmp_path, capsys):
    """SHA256SUMS deleted and 8 bytes of the EMA weights flipped (finite, but up to 1e37): the
    step was never committed, so load falls back to step 5; a previous release's step without
    checksums (tests/data/workdir_v0_1) still loads (tests/test_checkpoint.py)."""
    workdir = _copy(two_steps[0], tmp_path)
    _remove_checksums(workdir, 10)
    _damage(_ema_chunk(workdir, 10), "flip")
    model = jaxdiff.load(workdir)
    err = capsys.readouterr().err
    assert "the checkpoint at step 10 in " in err
    assert "it has no SHA256SUMS (its save did not finish" in err
    assert err.splitlines()[-1] == "jaxdiff: using the checkpoint at step 5 instead"
    _leaves_close(model.params, two_steps[1], atol=0)
    assert _set_aside(workdir) == ["corrupt-10-uncommitted"]


def test_the_only_step_without_its_checksums_is_partial(two_steps, tmp_path):
    """keep_checkpoints=1: no older step shows that checksums were written; CHECKSUMS_FROM does."""
    workdir = _copy(two_steps[0], tmp_path)
    import shutil

    shutil.rmtree(os.path.join(workdir, jaxdiff.workdir.CHECKPOINT_DIR, "5"))
    _remove_checksums(workdir, 10)
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"step 10: it has no SHA256SUMS"):
        jaxdiff.load(workdir)


@pytest.mark.slow  # a training process: about 10 s
def test_resume_falls_back_from_a_step_without_its_checksums(two_steps, tmp_path):
    workdir = _copy(two_steps[0], tmp_path)
    _remove_checksums(workdir, 10)
    rc, log = _run_command(workdir, tmp_path / "run.log", num_steps=15)
    assert rc == 0, log
    assert "it has no SHA256SUMS" in log and "resuming from the checkpoint at step 5" in log
    assert [r["step"] for r in _records(workdir)] == [5, 10, 15]
    jaxdiff.load(workdir)


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
    with pytest.raises(jaxdiff.workdir.WorkdirError,
                       match=r"could not save the checkpoint at step 15 in .*No space left on "
                             r"device.*; step 10 is intact. Free some disk space"):
        train.train_and_evaluate(toy(20), workdir)
    monkeypatch.undo()
    assert checkpoint.latest_step(workdir) == 10
    jaxdiff.load(workdir)
    assert not os.path.exists(os.path.join(workdir, jaxdiff.workdir.LOCK_FILE))
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
def test_the_exit_message_survives_a_thread_whose_join_raises(capfd):
    """Orbax's thread class re-raises its failed save from `join`; `_exit` joins such a thread
    still running (a race the command test below meets now and then) and exits with its message.
    (`capfd` also gives file descriptor 2 back after `_exit` points it at /dev/null.)"""
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
    assert exit_info.value.code == 1
    assert capfd.readouterr().err.splitlines()[-1] == "jaxdiff.train: error: could not save"
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


# ---------------------------------------------------------------------------------------------
# A live run's workdir: no command writes into it, replaces it or removes it.


@pytest.fixture
def live_run(tmp_path):
    """A toy training run (far from done) holding its workdir, with a checkpoint saved; stopped
    (SIGTERM) after the test, which must find it still running."""
    workdir = str(tmp_path / "live")
    out = open(tmp_path / "live.log", "w")
    process = subprocess.Popen(_command(workdir, num_steps=10**6), cwd=ROOT, stdout=out,
                               stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: checkpoint.latest_step(workdir) is not None, process, timeout=120)
        yield workdir, process
        assert process.poll() is None, open(tmp_path / "live.log").read()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


@pytest.mark.slow  # a live training run and a convert process: about 18 s
def test_convert_overwrite_of_a_live_runs_workdir_is_refused(live_run, tmp_path):
    from tests.test_convert import TINY, write_diffusers_model

    workdir, process = live_run
    write_diffusers_model(tmp_path / "model", TINY)
    config_before = open(os.path.join(workdir, jaxdiff.workdir.CONFIG_FILE)).read()
    result = subprocess.run(
        [sys.executable, "-m", "jaxdiff.convert", "--from", "diffusers", "--input",
         str(tmp_path / "model"), "--output", workdir, "--overwrite"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (f"jaxdiff.convert: workdir '{workdir}' is in use by another training run "
            f"(pid {process.pid}; ") in result.stderr
    assert "nothing was changed" in result.stderr and "Traceback" not in result.stderr
    assert open(os.path.join(workdir, jaxdiff.workdir.CONFIG_FILE)).read() == config_before
    assert _lock_pid(workdir) == process.pid
    assert sorted(os.listdir(tmp_path)) == ["live", "live.log", "model"]  # no staging left
    assert "metrics.jsonl" in os.listdir(workdir)


@pytest.mark.slow  # a live training run: about 12 s
def test_export_and_evaluate_output_in_a_live_runs_workdir_are_refused(live_run):
    from jaxdiff import evaluate

    workdir, process = live_run
    in_use = rf"workdir '{workdir}' is in use by another training run \(pid {process.pid}; "
    with pytest.raises(jaxdiff.workdir.WorkdirError, match=in_use):
        checkpoint.export(os.path.join(workdir, "exported"), toy(10), _init_params(toy(10)))
    with pytest.raises(jaxdiff.workdir.WorkdirError, match=in_use):
        evaluate.evaluate(workdir, ["swd"], num_samples=4)
    assert not os.path.exists(os.path.join(workdir, "eval"))
    assert not os.path.exists(os.path.join(workdir, "exported"))


# ---------------------------------------------------------------------------------------------
# Checks, then writes: a resume that does not fit, nothing to train, a broken teacher.


def _tree(workdir):
    """Every file under `workdir` with its size and modification time."""
    found = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, workdir)] = (os.path.getsize(path),
                                                     os.stat(path).st_mtime_ns)
    return found


def _cd_flags(teacher):
    """toy2d distilled by CD (the tiny MLP on EDM's process) from the workdir `teacher`."""
    return [f"--config.{k}={v}" for k, v in {
        "diffusion.process": "edm", "diffusion.model_output": "consistency",
        "diffusion.sigma_data": 0.5, "consistency.method": "cd", "distill.teacher": teacher,
        "distill.init_from_teacher": False, "sampling.method": "consistency",
        "sampling.num_steps": 1}.items()]


def _run_with(args, log):
    with open(log, "w") as out:
        rc = subprocess.run(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            timeout=300).returncode
    return rc, open(log).read()


@pytest.fixture(scope="module")
def cd_workdir(tmp_path_factory):
    """A toy teacher (steps 5, 10) and a CD workdir distilled from it (step 5)."""
    base = tmp_path_factory.mktemp("cd")
    teacher, student = str(base / "teacher"), str(base / "student")
    train.train_and_evaluate(toy(10), teacher)
    rc, log = _run_with([*_command(student, 5), *_cd_flags(teacher)], base / "cd.log")
    assert rc == 0, log
    return teacher, student


@pytest.mark.slow  # a CD run, then two refused resumes: about 30 s
def test_resume_with_another_teacher_or_objective_is_refused_before_writing(cd_workdir,
                                                                           tmp_path):
    teacher, student = cd_workdir
    other = _copy(teacher, tmp_path)  # another teacher (a copy, at another path)
    before = _tree(student)
    rc, log = _run_with([*_command(student, 10), *_cd_flags(other)], tmp_path / "a.log")
    assert rc == 1, log
    assert "holds a checkpoint (step 5) of a different model or objective" in log
    assert f"config.distill.teacher: saved '{teacher}', now '{other}'" in log
    assert "Traceback" not in log
    ict = [f for f in _cd_flags(teacher) if "distill.teacher" not in f and ".method=" not in f]
    rc, log = _run_with([*_command(student, 10), *ict, "--config.consistency.method=ict"],
                        tmp_path / "b.log")
    assert rc == 1, log
    assert "config.consistency.method: saved 'cd', now 'ict'" in log
    assert "Traceback" not in log and "MISSING" not in log
    assert _tree(student) == before  # config.json included


@pytest.mark.slow  # a training process: about 8 s
def test_nothing_to_train_writes_nothing(two_steps, tmp_path):
    workdir = _copy(two_steps[0], tmp_path)
    before = _tree(workdir)
    rc, log = _run_with([*_command(workdir, 5), "--config.training.sample_every=5",
                         "--config.training.log_every=10"], tmp_path / "run.log")
    assert rc == 0, log
    assert "training is already past training.num_steps=5: the checkpoint is at step 10" in log
    assert _tree(workdir) == before  # no config.json, TensorBoard events or sample grid


@pytest.mark.slow  # a training process: about 8 s
def test_cd_with_a_broken_teacher_names_it_and_leaves_no_workdir(tmp_path):
    teacher = _copy(_two_step_teacher(tmp_path), tmp_path / "t")
    for step in (5, 10):
        _damage(_ema_chunk(teacher, step), "truncate")
    student = str(tmp_path / "student")
    rc, log = _run_with([*_command(student, 5), *_cd_flags(teacher)], tmp_path / "run.log")
    assert rc == 1, log
    assert (f"jaxdiff.train: error: the teacher is broken: distill.teacher='{teacher}' has no "
            "intact checkpoint in ") in log
    assert "retrain the teacher" in log and "Traceback" not in log
    assert not os.path.exists(student)


def _two_step_teacher(tmp_path):
    workdir = str(tmp_path / "teacher_src")
    train.train_and_evaluate(toy(10), workdir)
    return workdir


# ---------------------------------------------------------------------------------------------
# What the commands say at the edges: a step that does not exist, a non-finite run with no
# checkpoint, a run whose every update is skipped.


def test_a_step_that_does_not_exist_is_named_with_the_steps_there(two_steps, tmp_path):
    workdir = two_steps[0]
    with pytest.raises(FileNotFoundError, match=r"there is no checkpoint at step 999 in .*"
                                                r"checkpoints \(its steps: 5, 10\)"):
        jaxdiff.load(workdir, step=999)
    result = subprocess.run(
        [sys.executable, "-m", "jaxdiff.evaluate", "--workdir", workdir, "--step", "999",
         "--metrics", "swd", "--num_samples", "8", "--output_dir", str(tmp_path / "eval")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"jaxdiff.evaluate: there is no checkpoint at step 999 in {workdir}/checkpoints "
        "(its steps: 5, 10)")
    assert "corrupt" not in result.stderr and _set_aside(workdir) == []


@pytest.mark.slow  # a training process: about 8 s
def test_a_nonfinite_loss_before_any_checkpoint_says_none_is_saved(tmp_path):
    workdir = str(tmp_path / "w")
    rc, log = _run_with([*_command(workdir, 20), "--config.optim.lr=1e30",
                         "--config.optim.warmup_steps=0"], tmp_path / "run.log")
    assert rc == 1, log
    last = log.splitlines()[-1]
    assert last.startswith("jaxdiff.train: error: non-finite training loss ")
    assert "no checkpoint has been saved (nothing to resume from)" in last
    assert "the last checkpoint" not in last
    assert checkpoint.latest_step(workdir) is None


NAN_DATA = '''
import numpy as np
import jaxdiff.data
real_batch = jaxdiff.data.Dataset.batch
def nan_batch(self, step):
    batch = real_batch(self, step)
    return {**batch, "x": np.full_like(batch["x"], np.nan)}
jaxdiff.data.Dataset.batch = nan_batch
'''


@pytest.mark.slow  # a training process: about 8 s
def test_skip_nonfinite_with_every_update_skipped_fails_clearly(tmp_path):
    """Every batch NaN (from a sitecustomize): the first record finds every update skipped and
    the run stops with one line instead of exiting 0 with weights that never changed."""
    workdir = str(tmp_path / "w")
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(NAN_DATA)
    env = {**os.environ, "PYTHONPATH": f"{inject}{os.pathsep}{ROOT}"}
    with open(tmp_path / "run.log", "w") as out:
        rc = subprocess.run([*_command(workdir, 20), "--config.training.skip_nonfinite=True"],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            timeout=120).returncode
    log = open(tmp_path / "run.log").read()
    assert rc == 1, log
    assert log.splitlines()[-1] == (
        "jaxdiff.train: error: every update from step 0 to step 5 (5 of 5) had a non-finite "
        "loss or gradient and was skipped (training.skip_nonfinite): the weights have not "
        "changed; stopping, no checkpoint has been saved (nothing to resume from). Lower "
        "optim.lr, raise optim.warmup_steps, set optim.grad_clip, or check the data for NaNs.")


def _train_command(*args):
    return subprocess.run([sys.executable, "-m", "jaxdiff.train", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # two train processes to their config checks: about 10 s
def test_config_errors_are_the_error_alone(tmp_path):
    """No module docstring or flag usage before a config error (it was about 36 lines)."""
    workdir = str(tmp_path / "w")
    result = _train_command("--config", "experiments/toy2d.py", "--workdir", workdir,
                            "--config.training.num_steps=-1")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "jaxdiff.train: error: invalid config (2 problem(s)):", result.stderr
    assert lines[1] == "  - config.training.num_steps = -1: must be an integer >= 1"
    assert len(lines) == 3
    result = _train_command("--config", "experiments/missing.py", "--workdir", workdir)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "jaxdiff.train: error: --config 'experiments/missing.py' does not load: OSError: no such "
        "file 'experiments/missing.py'"]
    assert not os.path.exists(workdir)


def test_help_with_a_config_shows_that_experiments_values():
    result = _train_command("--config", "experiments/toy2d.py", "--help=model")
    assert result.returncode == 0
    assert "config fields (the values of experiments/toy2d.py):" in result.stdout
    assert "  name = 'mlp'" in result.stdout and "  hidden = 128" in result.stdout
    result = _train_command("--help=model")
    assert "  name = 'unet'" in result.stdout  # the defaults


@pytest.mark.slow  # an evaluate process sampling: about 12 s
def test_evaluate_takes_the_sigmas_of_a_consistency_model(tmp_path):
    """`--sigmas`: multistep consistency sampling at the levels given (the config's one step
    otherwise)."""
    config = toy(10, **{"diffusion.process": "edm", "diffusion.model_output": "consistency",
                        "diffusion.sigma_data": 0.5, "consistency.method": "ict",
                        "sampling.method": "consistency", "sampling.num_steps": 1})
    workdir = checkpoint.export(str(tmp_path / "w"), config, _init_params(config))
    result = subprocess.run(
        [sys.executable, "-m", "jaxdiff.evaluate", "--workdir", workdir, "--metrics", "swd",
         "--num_samples", "8", "--sigmas", "80,0.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with open(os.path.join(workdir, "eval", "metrics_0.json")) as f:
        settings = json.load(f)["settings"]
    assert settings["sigmas"] == [80.0, 0.5] and settings["num_steps"] is None


@pytest.mark.slow  # a CIFAR-10 training process up to its data: about 15 s
def test_a_data_set_to_download_says_so_before_tfds_retries_in_silence(tmp_path):
    """Offline, tfds retries CIFAR-10's download for minutes before its error: the run says
    first that it downloads, and what to do without a network (stopped once it has said so)."""
    data_dir, workdir = str(tmp_path / "data"), str(tmp_path / "w")
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "jaxdiff.train", "--config", "experiments/cifar.py",
             "--workdir", workdir, f"--config.data.data_dir={data_dir}"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        notice = f"jaxdiff: cifar10 is not prepared in {data_dir}/cifar10/"
        _wait_for(lambda: notice in open(log).read(), process, timeout=120)
    finally:
        process.kill()
        process.wait()
    line = next(x for x in open(log).read().splitlines() if x.startswith(notice))
    assert "tfds retries the download for several minutes" in line
    assert "--config.data.data_dir" in line
