"""Multi-host training through `jax.distributed`: two local processes equal one with two devices."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import jaxdiff
from jaxdiff import checkpoint, train
from tests.test_train import ROOT, _leaves_close, tiny_toy

OVERRIDES = {
    "training.num_steps": 4,
    "training.steps_per_call": 1,
    "training.log_every": 1,
    "training.checkpoint_every": 2,
    "training.sample_every": 4,
    "sampling.num_samples": 16,
    "sampling.num_steps": 5,
}


TINY = {"model.hidden": 32, "model.depth": 2, "training.batch_size": 16}  # as tiny_toy's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, overrides):
    """Two `python -m jaxdiff.train --config.distributed=True` processes, 1 CPU device each."""
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    command = [sys.executable, "-m", "jaxdiff.train", "--config", "experiments/toy2d.py",
               "--workdir", workdir, "--config.distributed=True", *flags]
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}",
           "JAX_NUM_PROCESSES": "2", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return [
        subprocess.Popen(command, cwd=ROOT, env={**env, "JAX_PROCESS_ID": str(i)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]


def _finish(processes, timeout=180):
    """Waits for every process; asserts each exited 0 (showing its output if not)."""
    outputs = []
    for p in processes:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in processes:
                q.kill()
            raise
        assert p.returncode == 0, out[-3000:]
        outputs.append(out)
    return outputs


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r["step"] for r in records], np.array([[r["loss"], r["grad_norm"]] for r in records])


@pytest.mark.slow  # two training processes over loopback: about 6 s
@pytest.mark.parametrize("mesh", [{}, {"training.mesh.data": 1, "training.mesh.fsdp": 2}],
                         ids=["data", "fsdp"])
def test_two_processes_match_one_with_two_devices(tmp_path, mesh):
    """2 processes x 1 CPU device (gloo over loopback) == 1 process x 2 devices (1e-5), with the
    batch split over "data", or the train state sharded over "fsdp" (each process holding half
    of it: the checkpoints, the EMA weights and the sample picture gather it across processes)."""
    config = tiny_toy(**OVERRIDES, **mesh)
    multi = str(tmp_path / "multi")
    processes = _launch(multi, {**TINY, **OVERRIDES, **mesh})
    # The reference run meanwhile, in this process (conftest gives it 2 CPU devices).
    single = train.train_and_evaluate(config, str(tmp_path / "single"))
    _finish(processes)

    steps, multi_losses = _losses(multi)
    single_steps, single_losses = _losses(str(tmp_path / "single"))
    assert steps == single_steps == [1, 2, 3, 4]  # process 0 alone wrote the metrics
    np.testing.assert_allclose(multi_losses, single_losses, atol=1e-5, rtol=0)

    manager = checkpoint.checkpoint_manager(multi, create=False)
    abstract = jax.tree.map(np.asarray, train._checkpoint_items(single))
    step, state, ema = checkpoint.restore(manager, *abstract)
    manager.close()
    assert step == 4 and int(state["step"]) == 4
    _leaves_close(state["params"], single.params, atol=1e-5)
    _leaves_close(state["opt_state"], single.opt_state, atol=1e-5)
    _leaves_close(ema, single.ema_params, atol=1e-5)
    _leaves_close(jaxdiff.load(multi).params, single.ema_params, atol=1e-5)
    assert os.listdir(os.path.join(multi, "samples")) == ["step_0000004.png"]
    assert len(os.listdir(os.path.join(multi, "tensorboard"))) == 1
    assert jax.process_count() == 1  # the test process itself stayed single-host


@pytest.mark.slow  # two more processes compiling and training on loopback: about 20 s
def test_sigterm_on_one_process_stops_all_at_one_step(tmp_path):
    """SIGTERM to process 1 alone: JAX's preemption service stops both at the same step, with a
    checkpoint there, instead of process 0 waiting forever in the next all-reduce."""
    workdir = str(tmp_path / "w")
    processes = _launch(workdir, {**TINY, "training.num_steps": 2000, "training.log_every": 1,
                                  "training.steps_per_call": 1, "training.sample_every": 0,
                                  "training.checkpoint_every": 1000})
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + 120
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
        assert time.monotonic() < deadline and processes[0].poll() is None
        time.sleep(0.2)
    processes[1].send_signal(signal.SIGTERM)
    outputs = _finish(processes)
    stopped = [re.search(r"stopped at step (\d+)", out) for out in outputs]
    assert all(stopped), outputs[0][-2000:]
    step = int(stopped[0].group(1))
    assert int(stopped[1].group(1)) == step < 2000
    assert checkpoint.latest_step(workdir) == step
