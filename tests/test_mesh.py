"""The training step on a ("data", "fsdp") mesh: the same losses and weights as one device on any
mesh shape, the train state sharded along "fsdp", resuming across mesh shapes, the bad meshes.

The 4-device cases run `python tests/test_mesh.py` in subprocesses with
--xla_force_host_platform_device_count (conftest gives the tests 2 CPU devices).
"""

import copy
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxdiff
from jaxdiff import sharding, train
from jaxdiff.bundle import make_bundle
from jaxdiff.config import config_from_json, config_to_json, validate
from jaxdiff.data import create_dataset
from tests.test_train import ROOT, tiny_toy, with_overrides

STEPS = 3
RESUME = {"training.num_steps": 4, "training.steps_per_call": 1, "training.log_every": 1,
          "training.checkpoint_every": 2, "training.sample_every": 0, "optim.warmup_steps": 0}


def _with(config, overrides):
    """A copy of `config` with `overrides` (with_overrides changes the config it is given)."""
    return with_overrides(copy.deepcopy(config), overrides)


def _mesh(config, data, fsdp):
    return _with(config, {"training.mesh.data": data, "training.mesh.fsdp": fsdp})


def _run_steps(config, devices, state, batches):
    """`STEPS` steps of `state` on `devices` (one call each): (final host state, losses)."""
    fns = train.train_functions(config, devices)
    n = len(devices)
    placed, losses = sharding.shard_state(sharding.to_host(state), fns.shardings), []
    for b in batches:  # [B, ...] -> [devices, 1, B / n, ...]
        batch = {k: v.reshape(n, 1, v.shape[0] // n, *v.shape[1:]) for k, v in b.items()}
        placed, metrics = fns.p_train_steps(placed, batch, jax.random.PRNGKey(7), {})
        losses.append(float(np.asarray(metrics["loss"])[0]))
    return placed, np.array(losses)


def _state_bytes_per_device(state):
    """The largest number of bytes of the state that one device holds (its addressable shards)."""
    held = {}
    for leaf in jax.tree.leaves(state):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values())


def _worker_meshes(out):
    """On 4 devices: 1 vs 4x1, 1x4, 2x2 for `STEPS` steps; the state's bytes per device."""
    config = tiny_toy(**{"optim.warmup_steps": 0, "data.num_classes": 8,
                         "model.class_cond": True, "training.label_dropout": 0.5})
    dataset = create_dataset(config)
    batches = [{k: b[k].reshape(-1, *b[k].shape[2:]) for k in ("x", "label")}
               for b in (dataset.batch(s) for s in range(STEPS))]
    state = train.train_functions(config, jax.devices()[:1]).init_state(jax.random.PRNGKey(0))
    one, losses_one = _run_steps(config, jax.devices()[:1], state, batches)
    result = {"losses": {"1": losses_one.tolist()}, "weights": {}, "bytes": {}}
    for data, fsdp in ((4, 1), (1, 4), (2, 2)):
        name = f"{data}x{fsdp}"
        mesh_config = _mesh(config, data, fsdp)
        new, losses = _run_steps(mesh_config, jax.devices(), state, batches)
        result["losses"][name] = losses.tolist()
        result["weights"][name] = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(sharding.to_host((one.params, one.ema_params))),
                            jax.tree.leaves(sharding.to_host((new.params, new.ema_params))),
                            strict=True))
        result["bytes"][name] = _state_bytes_per_device(new)
        result.setdefault("sharded_leaves", {})[name] = sum(
            not x.sharding.is_fully_replicated for x in jax.tree.leaves(new))
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)


def _worker_resume(out):
    """On 4 devices: 4 steps on 4x1 in one go; 2 steps on 4x1, then resumed to 4 on 2x2."""
    whole = _mesh(tiny_toy(**RESUME), 4, 1)
    np.savez(os.path.join(out, "whole.npz"), *jax.tree.leaves(
        train.train_and_evaluate(whole, os.path.join(out, "whole")).params))
    half = _with(whole, {"training.num_steps": 2})
    np.savez(os.path.join(out, "half.npz"), *jax.tree.leaves(
        train.train_and_evaluate(half, os.path.join(out, "half")).params))
    shutil.copytree(os.path.join(out, "half"), os.path.join(out, "half_for_one"))
    resumed = train.train_and_evaluate(_mesh(whole, 2, 2), os.path.join(out, "half"))
    np.savez(os.path.join(out, "resumed_2x2.npz"), *jax.tree.leaves(resumed.params))
    np.savez(os.path.join(out, "resumed_2x2_ema.npz"), *jax.tree.leaves(resumed.ema_params))


def _worker_one(out):
    """On 1 device: the 4x1 checkpoint at step 2 resumed to step 4; the EMA weights that the 2x2
    mesh saved sharded, loaded whole (`jaxdiff.load`)."""
    resumed = train.train_and_evaluate(_mesh(tiny_toy(**RESUME), -1, 1),
                                       os.path.join(out, "half_for_one"))
    np.savez(os.path.join(out, "resumed_1.npz"), *jax.tree.leaves(resumed.params))
    loaded = jaxdiff.load(os.path.join(out, "half"))
    np.savez(os.path.join(out, "loaded_ema.npz"), *jax.tree.leaves(loaded.params))


def _subprocess(mode, out, devices):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), mode, str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh")
    _subprocess("meshes", out, 4)
    with open(out / "result.json") as f:
        return out, json.load(f)


def test_every_mesh_shape_matches_one_device(four_devices):
    """4x1, 1x4 and 2x2 give one device's losses and weights for 3 steps (1e-5), with leaves
    really sharded on the fsdp meshes, and the step moved the weights."""
    _, result = four_devices
    for name in ("4x1", "1x4", "2x2"):
        np.testing.assert_allclose(result["losses"][name], result["losses"]["1"], atol=1e-5,
                                   rtol=0, err_msg=name)
        assert result["weights"][name] < 1e-5, (name, result["weights"][name])
    assert result["sharded_leaves"]["4x1"] == 0
    assert result["sharded_leaves"]["1x4"] > 0 and result["sharded_leaves"]["2x2"] > 0
    assert len(set(np.round(result["losses"]["1"], 6))) == STEPS  # three different batches


def test_train_state_bytes_per_device_fall_with_fsdp(four_devices):
    """Measured from the arrays' addressable shards: fsdp=4 holds < 0.3 of the replicated
    state per device, fsdp=2 about half."""
    _, result = four_devices
    replicated = result["bytes"]["4x1"]
    assert result["bytes"]["1x4"] < 0.3 * replicated, result["bytes"]
    assert result["bytes"]["2x2"] < 0.55 * replicated, result["bytes"]


@pytest.mark.slow  # two processes, four training runs: about 30 s
def test_checkpoint_of_4x1_resumes_on_2x2_and_on_one_device(tmp_path):
    """Stopped at step 2 on a 4x1 mesh, resumed to step 4 on 2x2 and on one device: the weights
    of the 4 steps in one go (1e-5); the 2x2 run's sharded EMA loads on one device as it was."""
    out = tmp_path
    _subprocess("resume", out, 4)
    _subprocess("one", out, 1)
    whole = np.load(out / "whole.npz")
    moved = np.load(out / "half.npz")
    assert max(np.max(np.abs(whole[k] - moved[k])) for k in whole.files) > 1e-4
    for name in ("resumed_2x2.npz", "resumed_1.npz"):
        got = np.load(out / name)
        assert got.files == whole.files
        for k in whole.files:
            np.testing.assert_allclose(got[k], whole[k], atol=1e-5, rtol=0, err_msg=name)
    saved, loaded = np.load(out / "resumed_2x2_ema.npz"), np.load(out / "loaded_ema.npz")
    assert saved.files == loaded.files
    for k in saved.files:
        np.testing.assert_array_equal(loaded[k], saved[k])


def _problem(config, num_devices):
    with pytest.raises(ValueError) as error:
        validate(config, num_devices=num_devices)
    lines = str(error.value).splitlines()
    assert len(lines) == 2 and lines[0] == "invalid config (1 problem(s)):", lines
    return lines[1]


def test_bad_meshes_are_one_line_each():
    """A mesh that is not the device count, a batch it does not split, an fsdp axis with nothing
    to shard: one line naming the field and its value (validate: before anything compiles)."""
    config = tiny_toy()
    assert _problem(_mesh(config, 3, 1), 4) == \
        "  - config.training.mesh.data = 3: data x fsdp must equal the 4 devices"
    assert _problem(_mesh(config, -1, 3), 4) == \
        "  - config.training.mesh.fsdp = 3: data x fsdp must equal the 4 devices"
    assert _problem(_with(_mesh(config, 2, 3), {"training.batch_size": 16}), 6) == (
        "  - config.training.batch_size = 16: must be divisible by the 6 devices "
        "(training.mesh data x fsdp)")
    # toy2d's MLP (hidden 32, 2-d points): no dimension of its parameters is a multiple of 7.
    shapes = jax.eval_shape(train.train_functions(config).init_state,
                            jax.random.PRNGKey(0)).params
    assert not any(d % 7 == 0 for x in jax.tree.leaves(shapes) for d in x.shape)
    assert _problem(_with(_mesh(config, 1, 7), {"training.batch_size": 14}), 7) == (
        "  - config.training.mesh.fsdp = 7: no parameter of model 'mlp' has a dimension it "
        "divides: nothing to shard")
    validate(_with(_mesh(config, 1, 4), {"training.batch_size": 16}), num_devices=4)


def test_a_config_json_without_training_mesh_loads_as_data_parallel():
    """A workdir's config.json from before training.mesh reads as every device on "data"."""
    saved = json.loads(config_to_json(tiny_toy()))
    del saved["training"]["mesh"]
    config = config_from_json(json.dumps(saved))
    assert (config.training.mesh.data, config.training.mesh.fsdp) == (-1, 1)
    validate(config, num_devices=2)


def test_fsdp_dim_is_the_largest_dimension_fsdp_divides():
    assert sharding.fsdp_dim((3, 8, 4), 4) == 1
    assert sharding.fsdp_dim((4, 4), 2) == 0
    assert sharding.fsdp_dim((3, 5), 2) is None
    assert sharding.fsdp_dim((), 2) is None
    assert sharding.fsdp_dim((8, 16), 1) is None


def test_sample_takes_fsdp_sharded_params():
    """`jaxdiff.sample` on a bundle whose params are sharded over a 1x2 mesh draws what it draws
    from the same params on the host."""
    config = _mesh(tiny_toy(), 1, 2)
    fns = train.train_functions(config, jax.devices()[:2])
    state = fns.init_state(jax.random.PRNGKey(0))
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(state.params))
    sharded = make_bundle(config, params=state.params)
    host = make_bundle(config, params=sharding.to_host(state.params))
    key = jax.random.PRNGKey(3)
    a = jaxdiff.sample(sharded, key, "ddim", num_samples=8, num_steps=4, clip_denoised=False)
    b = jaxdiff.sample(host, key, "ddim", num_samples=8, num_steps=4, clip_denoised=False)
    assert float(np.std(np.asarray(b))) > 0.1
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


if __name__ == "__main__":
    {"meshes": _worker_meshes, "resume": _worker_resume, "one": _worker_one}[sys.argv[1]](
        sys.argv[2])


def _buffers(tree):
    return [shard.data.unsafe_buffer_pointer() for leaf in jax.tree.leaves(tree)
            for shard in leaf.addressable_shards]


@pytest.mark.parametrize("fsdp", [1, 2])
def test_placed_state_owns_its_buffers(fsdp):
    """The step donates the state it is given: shard_state copies every leaf, even a state whose
    weights, EMA and target are one set of device arrays (as `_from_teacher` makes them) already
    on the devices. Aliased, the step freed buffers it still read (segfaults in the slow tier)."""
    config = tiny_toy(**{"training.mesh.fsdp": fsdp})
    fns = train.train_functions(config)
    state = fns.init_state(jax.random.PRNGKey(0))
    first = jax.devices()[0]  # as `_from_teacher` leaves them: the teacher's, on one device
    params = jax.tree.map(lambda x: jax.device_put(np.asarray(x), first), state.params)
    shared = state.replace(params=params, ema_params=params)
    placed = sharding.shard_state(shared, fns.shardings)
    pointers = _buffers(placed)
    assert len(set(pointers)) == len(pointers)
    assert not set(pointers) & set(_buffers(shared))
    new, _ = fns.p_train_steps(placed, _one_step_batch(config), jax.random.PRNGKey(7), {})
    assert int(sharding.to_host(new.step)) == 1
    sharding.to_host(shared)  # the caller's arrays survive the donation (deleted ones raise)


def _one_step_batch(config):
    b = create_dataset(config).batch(0)
    n = jax.device_count()
    return {k: np.asarray(b[k]).reshape(n, 1, -1, *np.asarray(b[k]).shape[2:])
            for k in ("x", "label") if k in b}
