"""`python -m jaxdiff.train --config experiments/<name>.py --workdir DIR`: train and sample.

The loop is Flax-example shaped (`create_train_state`, `train_step`, `train_and_evaluate`) with
score_sde's `pmap(scan(train_step))` to run `training.steps_per_call` steps per device call:
the per-device forward and backward pass written with `jax.shard_map` over a ("data", "fsdp")
mesh of the devices (`training.mesh`), the train state global arrays sharded along "fsdp"
(`state_shardings`), the update under `jax.jit` (`train_step`, `make_p_train_steps`).
Everything random is a pure function of (seed, step): the batch (`Dataset.batch(step)`), each
example's t, noise and label dropout (keyed by its index in the global batch, so a step does the
same arithmetic on any number of devices) and the dropout keys (per device for a diffusion step,
per example for a consistency loss). Resuming from a
checkpoint at step s therefore continues exactly as if the run had never stopped.

Running the same command again resumes from the latest complete checkpoint (after a kill -9
too: orbax finalises a checkpoint by renaming it). SIGTERM or Ctrl-C (SIGINT) saves a checkpoint
and exits cleanly (during start-up: ends it before the loop); a second Ctrl-C aborts at once,
without saving. The handlers only set a flag (`_Stop`): nothing is raised inside a library.
A non-finite loss or gradient stops the run (or, with `training.skip_nonfinite`, skips that
update). Before compiling, the workdir is checked: writable, room for the checkpoints, not held
by another run (`workdir.workdir_lock`), no checkpoint of a different model or objective in
it; nothing of the run is written into it before every check has passed.

Scalars go to `workdir/metrics.jsonl` (one JSON object per log step) and, with the sample grids,
to TensorBoard event files in `workdir/tensorboard/` (written by tensorboardX:
`flax.metrics.tensorboard` needs TensorFlow, which jaxdiff does not install); sample grids of the
EMA weights also to `workdir/samples/step_XXXXXXX.png`.

With `config.distributed`, `jax.distributed.initialize()` joins the processes of a multi-host
run (TPU pod, SLURM / Open MPI / Kubernetes GPU cluster, detected by JAX; elsewhere
`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`). Each process loads its
own share of every global batch and the step averages over all devices of all
processes. Process 0 alone writes logs, metrics, TensorBoard and sample grids; every process
takes part in saving checkpoints (orbax coordinates them), so the workdir must be on a
file system all hosts share. SIGTERM to any process stops them all at one step, with a
checkpoint there (JAX's preemption service agrees on the step).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags
from PIL import Image
from tensorboardX import SummaryWriter
from tqdm import tqdm

import jaxdiff
from jaxdiff import checkpoint, pictures
from jaxdiff import consistency as cm
from jaxdiff.bundle import DiffusionModel, image_shape, make_bundle
from jaxdiff.compiler import training_jit
from jaxdiff.config import (
    check_overrides,
    config_from_json,
    config_to_json,
    describe_fields,
    sampling_options,
    validate,
)
from jaxdiff.data import get_dataset, to_float
from jaxdiff.denoiser import denoiser
from jaxdiff.models import create_model, get_network, init_params, label_classes
from jaxdiff.objectives import (
    DROPOUT,
    EXAMPLES,
    OWN,
    StepInputs,
    curriculum_steps,
    example_keys,
    network_params,
    of_config,
)
from jaxdiff.optimizers import create_optimizer, learning_rate_schedule
from jaxdiff.prefetch import prefetch_to_device
from jaxdiff.processes import NoiseProcess, make_process
from jaxdiff.sampling import sample
from jaxdiff.sharding import (
    DEVICE_AXES,
    batch_sharding,
    device_mesh,
    fsdp_dim,
    replicated,
    shard_state,
    spec,
    state_shardings,
    to_host,
)
from jaxdiff.workdir import (
    CHECKPOINT_DIR,
    WorkdirError,
    check_free_space,
    check_not_held,
    check_writable,
    read_config,
    release_own_lock,
    workdir_lock,
    write_config,
)

# Streams folded into the run's key (and into each step's key), so each use of randomness
# has its own.
_INIT, _STEP, _SAMPLE = 0, 1, 2


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. The PRNG is not stored: step keys are fold_in(seed key, step).

    `target_params` is a consistency model's target network theta- (CM arXiv 2303.01469 Eq. 8:
    CD's and CT's); None where the objective has none (diffusion training, iCT). It is not the
    sampling EMA `ema_params` (rate `ema_rate`).
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    target_params: Any = None


# ---------------------------------------------------------------------------------------------
# State and optimizer.


def create_train_state(
    config: ml_collections.ConfigDict,
    model: Any,
    rng: jax.Array,
    tx: optax.GradientTransformation,
) -> TrainState:
    """Fresh parameters (EMA = params) and optimizer state (pure; jit it)."""
    objective = of_config(config)
    params = init_params(model, rng, image_shape(config), label_classes(config))
    if objective.own_params is not None:  # trained beside the network's (sCM's w_phi)
        params = {**params, OWN: objective.own_params(config, jax.random.fold_in(rng, 1))}
    has_target = objective.target_rate is not None
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params),
        target_params=params if has_target else None,
    )


def _from_teacher(state: TrainState, teacher_params: Any, tx: optax.GradientTransformation
                  ) -> TrainState:
    """A fresh state whose weights (and EMA and target) are the teacher's, as the CM code starts
    CD (`scripts/cm_train.py`); `distill.teacher_problem` has checked that they fit."""
    params = jax.tree.map(jnp.asarray, teacher_params)
    if OWN in state.params:  # the objective's own weights are not the teacher's
        params = {**params, OWN: state.params[OWN]}
    return state.replace(params=params, ema_params=params, opt_state=tx.init(params),
                         target_params=None if state.target_params is None else params)


# ---------------------------------------------------------------------------------------------
# The step.


def _example_draws(config: ml_collections.ConfigDict, process: NoiseProcess, step_key: jax.Array,
                   x0: jax.Array):
    """Per-example t, noise and label-drop coins, keyed by the example's global batch index."""
    keys = example_keys(step_key, EXAMPLES, x0.shape[0])

    def draw(key):
        k_t, k_noise, k_drop = jax.random.split(key, 3)
        t = process.sample_t(k_t, ())
        noise = jax.random.normal(k_noise, x0.shape[1:], x0.dtype)
        drop = jax.random.bernoulli(k_drop, config.training.label_dropout)
        return t, noise, drop

    return jax.vmap(draw)(keys)


def _as_trained(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the defaults the step resolves made explicit (a curriculum's K), so that
    resuming compares what is trained."""
    config = config_from_json(config_to_json(config))
    if of_config(config).curriculum:
        config.consistency.curriculum_steps = curriculum_steps(config)
    return config


def frozen_weights(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The weights a step reads but does not train, loaded on the host: CD's teacher (its EMA
    weights) under "teacher", a distance's (LPIPS's VGG-16 and heads) under its name. The step
    takes them as a replicated argument, so they are never folded into the compiled program as
    constants."""
    c, weights = config.consistency, {}
    objective = of_config(config)
    if objective.distils:
        try:
            weights["teacher"] = checkpoint.load(config.distill.teacher).params
        except checkpoint.CorruptCheckpointError as e:
            raise WorkdirError(
                f"the teacher is broken: distill.teacher={config.distill.teacher!r} has "
                f"{e.what}\nretrain the teacher, restore its checkpoints from a backup or "
                "give another one; nothing was written to this run's workdir") from None
    load = cm.DISTANCES[c.distance].load if objective.consistency else None
    if load is not None:
        try:
            weights[c.distance] = load(config)
        except (OSError, ValueError) as e:
            raise WorkdirError(f"the weights of distance {c.distance!r} do not "
                               f"load: {e}") from None
    return weights


def ema_rate(config: ml_collections.ConfigDict, step: jax.Array) -> float | jax.Array:
    """The sampling EMA's decay for the update of `step`: `training.ema_decay`, or with
    `training.ema_halflife_kimg` EDM's beta = 0.5 ** (batch / max(h, 1e-8)), h = min(half-life,
    step * batch * ema_rampup_ratio) images (arXiv 2206.00364 App. F.3; NVlabs/edm
    training/training_loop.py, where cur_nimg = step * batch)."""
    training = config.training
    if training.ema_halflife_kimg is None:
        return training.ema_decay
    halflife = jnp.asarray(training.ema_halflife_kimg * 1000.0, jnp.float32)
    if training.ema_rampup_ratio is not None:
        seen = jnp.asarray(step, jnp.float32) * training.batch_size
        halflife = jnp.minimum(halflife, seen * training.ema_rampup_ratio)
    return 0.5 ** (training.batch_size / jnp.maximum(halflife, 1e-8))


def _device_loss_and_grads(
    params: Any,
    target_params: Any,
    step: jax.Array,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    frozen: dict[str, Any],
    *,
    config: ml_collections.ConfigDict,
    model: Any,
    process: NoiseProcess,
    teacher: Callable | None,
) -> tuple[Any, dict[str, jax.Array]]:
    """This device's gradients and metrics on its share of the global batch (inside shard_map,
    over the mesh axes `DEVICE_AXES`), with the whole weights in hand.

    `rng` is the run's step-stream key (identical on every device); this step's randomness is
    folded from it and `step`; dropout also from the device's index over the mesh.
    """
    step_key = jax.random.fold_in(rng, step)
    dropout_key = jax.random.fold_in(
        jax.random.fold_in(step_key, DROPOUT), jax.lax.axis_index(DEVICE_AXES)
    )
    x0 = to_float(batch["x"])  # uint8 pixels travel; [-1, 1] floats are made here
    t, noise, drop = _example_draws(config, process, step_key, x0)
    labels = batch.get("label")
    y = None
    if label_classes(config):
        y = jnp.where(drop, config.data.num_classes, labels).astype(jnp.int32)
    objective = of_config(config)

    def apply(params, x, time, y, dropout=dropout_key):
        conditioning = {} if y is None else {"y": y}
        return model.apply({"params": params}, x, time, train=True, rngs={"dropout": dropout},
                           **conditioning)

    inputs = StepInputs(config, process, apply, x0, y, labels, t, noise, step, step_key,
                        target_params, teacher, frozen)
    (loss, extra), grads = jax.value_and_grad(
        lambda params: objective.loss(params, inputs), has_aux=True)(params)
    return grads, {"loss": loss, **extra}


def _fsdp_dims(tree: Any, fsdp: int) -> Any:
    """Per leaf, the dimension it is sharded along over "fsdp" (None: replicated)."""
    return jax.tree.map(lambda x: fsdp_dim(x.shape, fsdp), tree)


def _gather(tree: Any, dims: Any) -> Any:
    """The whole weights from this device's fsdp shards (all-gathered, tiled)."""
    return jax.tree.map(lambda x, d: x if d is None else
                        jax.lax.all_gather(x, "fsdp", axis=d, tiled=True), tree, dims,
                        is_leaf=lambda x: x is None)


def _mean_gradient(grads: Any, dims: Any, fsdp: int) -> Any:
    """The batch's mean gradient in the params' layout: reduce-scattered over "fsdp" along the
    sharded dimension, averaged over "data" (all-reduced over both axes where replicated)."""
    def one(g, d):
        if d is None:
            return jax.lax.pmean(g, DEVICE_AXES)
        scattered = jax.lax.psum_scatter(g, "fsdp", scatter_dimension=d, tiled=True)
        return jax.lax.pmean(scattered / fsdp, "data")

    return jax.tree.map(one, grads, dims, is_leaf=lambda x: x is None)


def mesh_gradients(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    frozen: dict[str, Any] | None = None,
    *,
    config: ml_collections.ConfigDict,
    model: Any,
    process: NoiseProcess,
    mesh: jax.sharding.Mesh,
    teacher: Callable | None = None,
) -> tuple[Any, dict[str, jax.Array]]:
    """The batch's mean gradient (in the params' sharding) and metrics, from a global batch
    [devices, per_device, ...]: the per-device program (`jax.shard_map` over `mesh`, as
    `jax.pmap` ran it), each device's block of the batch, the fsdp-sharded weights all-gathered,
    the gradients reduce-scattered back into the params' sharding and averaged over the batch.
    """
    fsdp = mesh.shape["fsdp"]
    dims, target_dims = _fsdp_dims(state.params, fsdp), _fsdp_dims(state.target_params, fsdp)
    specs = jax.tree.map(spec, dims, is_leaf=lambda x: x is None)
    target_specs = jax.tree.map(spec, target_dims, is_leaf=lambda x: x is None)
    loss_and_grads = functools.partial(_device_loss_and_grads, config=config, model=model,
                                       process=process, teacher=teacher)

    def on_device(params, target_params, step, batch, rng, frozen):
        first = functools.partial(jax.tree.map, lambda x: x[0])  # this device's block
        grads, metrics = loss_and_grads(_gather(params, dims), _gather(target_params, target_dims),
                                        step, first(batch), rng, frozen)
        return _mean_gradient(grads, dims, fsdp), jax.lax.pmean(metrics, DEVICE_AXES)

    replicated, split = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(DEVICE_AXES)
    return jax.shard_map(
        on_device, mesh=mesh, in_specs=(specs, target_specs, replicated, split, replicated,
                                        replicated),
        out_specs=(specs, replicated), check_vma=False,
    )(state.params, state.target_params, state.step, batch, rng, {} if frozen is None else frozen)


def apply_gradients(
    state: TrainState,
    grads: Any,
    metrics: dict[str, jax.Array],
    *,
    config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The optimizer update, the EMA and the target network, on the global arrays: optax's
    global-norm clipping and `grad_norm` are over the whole gradient."""
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_rate(config, state.step)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    metrics = {
        "loss": metrics["loss"],
        "grad_norm": grad_norm,
        "lr": jnp.asarray(learning_rate_schedule(config)(state.step), jnp.float32),
        **{name: value for name, value in metrics.items() if name != "loss"},
    }
    objective = of_config(config)
    target_params = state.target_params
    if objective.target_rate is not None:  # theta- <- stopgrad(mu theta- + (1 - mu) theta)
        target_params = cm.ema_update(target_params, params,
                                      mu=objective.target_rate(config, state.step))
    new = (params, ema_params, opt_state, target_params)
    if config.training.skip_nonfinite:
        # One decision for the whole state: the loss is averaged and the gradient norm global.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        old = (state.params, state.ema_params, state.opt_state, state.target_params)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    new_state = TrainState(step=state.step + 1, params=new[0], ema_params=new[1], opt_state=new[2],
                           target_params=new[3])
    return new_state, metrics


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    frozen: dict[str, Any] | None = None,
    *,
    config: ml_collections.ConfigDict,
    model: Any,
    process: NoiseProcess,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    teacher: Callable | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step of the global state on a global batch [devices, per_device, ...]:
    `mesh_gradients`, then `apply_gradients`."""
    grads, metrics = mesh_gradients(state, batch, rng, frozen, config=config, model=model,
                                    process=process, mesh=mesh, teacher=teacher)
    return apply_gradients(state, grads, metrics, config=config, tx=tx)


def make_p_train_steps(
    config: ml_collections.ConfigDict,
    model: Any,
    process: NoiseProcess,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    shardings: TrainState,
    teacher: Callable | None = None,
) -> Callable:
    """`lax.scan(train_step)` over the steps axis of the batches, jitted over the global arrays
    of `mesh` (`train_step`'s per-device part a `jax.shard_map`).

    Called as `p_steps(state, batches, rng, frozen)`: `state` global arrays with `shardings`
    (`state_shardings`), batches [devices, steps, per_device, ...] (global arrays,
    `batch_sharding`, or host arrays in one process), rng and `frozen` (`frozen_weights`; CD's
    teacher is read through `teacher`, `jaxdiff.denoiser.denoiser`) replicated; returns the new
    state and the metrics [steps]. The input state is donated. Several steps per call save
    dispatch on accelerators; on CPUs use one (XLA:CPU runs convolutions inside a loop far more
    slowly).
    """
    step = functools.partial(train_step, config=config, model=model, process=process, tx=tx,
                             mesh=mesh, teacher=teacher)

    def steps(state, batches, rng, frozen):
        if jax.tree.leaves(batches)[0].shape[1] == 1:
            # No loop for one step: XLA:CPU runs a scan body's convolutions ~30x slower.
            state, metrics = step(state, jax.tree.map(lambda b: b[:, 0], batches), rng, frozen)
            return state, jax.tree.map(lambda m: m[None], metrics)
        return jax.lax.scan(lambda s, b: step(s, b, rng, frozen), state,
                            jax.tree.map(lambda b: jnp.swapaxes(b, 0, 1), batches))

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return training_jit(steps, mesh, in_shardings=(shardings, batch_sharding(mesh), replicated,
                                                   replicated),
                        out_shardings=(shardings, replicated), donate_argnums=(0,))


class TrainFunctions(NamedTuple):
    """The network, noise process, optimizer and jitted functions one config trains with."""

    model: Any
    process: NoiseProcess
    tx: optax.GradientTransformation
    init_state: Callable[[jax.Array], TrainState]  # jitted create_train_state, placed sharded
    p_train_steps: Callable  # make_p_train_steps
    teacher: DiffusionModel | None  # CD: the teacher's network and process (weights: `_train`)
    mesh: jax.sharding.Mesh  # (data, fsdp) of training.mesh
    shardings: TrainState  # state_shardings of the train state on `mesh`


# Fields that change the loop but not the compiled step: runs differing only in these (e.g. a
# longer run resumed from a shorter one) share `train_functions` and so never recompile.
_LOOP_FIELDS = ("num_steps", "log_every", "checkpoint_every", "sample_every", "keep_checkpoints")


def train_functions(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> TrainFunctions:
    """`TrainFunctions` for `config` on `devices` (default: every process's); one per config."""
    step_config = config_from_json(config_to_json(config))
    if of_config(config).curriculum:  # K is the step's, not the loop's
        step_config.consistency.curriculum_steps = curriculum_steps(config)
    for field in _LOOP_FIELDS:
        step_config.training[field] = 1
    del step_config["sampling"]
    devices = tuple(jax.devices() if devices is None else devices)
    return _train_functions(config_to_json(step_config), devices)


@functools.lru_cache(maxsize=8)
def _train_functions(config_json: str, devices: tuple[jax.Device, ...]) -> TrainFunctions:

    config = config_from_json(config_json)
    model = create_model(config)
    process = make_process(config.diffusion)
    tx = create_optimizer(config)
    mesh = device_mesh(devices, config.training.mesh.fsdp)
    create = functools.partial(create_train_state, config, model, tx=tx)
    shardings = state_shardings(jax.eval_shape(create, rng=jax.random.key(0)), mesh)
    init_state = jax.jit(lambda rng: create(rng=rng), out_shardings=shardings)
    teacher = None
    if of_config(config).distils:
        teacher = make_bundle(read_config(config.distill.teacher), params=None)
    p_train_steps = make_p_train_steps(config, model, process, tx, mesh, shardings,
                                       None if teacher is None else denoiser(teacher))
    return TrainFunctions(model, process, tx, init_state, p_train_steps, teacher, mesh, shardings)


# ---------------------------------------------------------------------------------------------
# Pictures.


def sample_picture(
    config: ml_collections.ConfigDict,
    bundle: DiffusionModel,
    rng: jax.Array,
    path: str,
    reference: np.ndarray | None = None,
) -> str:
    """EMA samples by the config's sampler (`config.sampling`) as a PNG: one row per class if
    conditional. For points (toy2d) a scatter over `reference` (real points) instead of a grid.
    """
    kwargs: dict[str, Any] = {"method": config.sampling.method,
                              "num_steps": config.sampling.num_steps, **sampling_options(config)}
    if get_dataset(config.data.dataset).points:
        points = sample(
            bundle, rng, num_samples=config.sampling.num_samples, clip_denoised=False, **kwargs
        )
        return pictures.save_scatter(np.asarray(points), path, reference=reference)
    if bundle.num_classes:
        per_class = max(1, min(10, config.sampling.num_samples // bundle.num_classes))
        labels = jnp.repeat(jnp.arange(bundle.num_classes), per_class)
        kwargs.update(labels=labels, guidance_scale=config.sampling.guidance_scale)
        num, nrow = bundle.num_classes * per_class, per_class
    else:
        num = min(config.sampling.num_samples, 64)
        nrow = math.ceil(num / max(1, int(math.sqrt(num))))
    images = sample(bundle, rng, num_samples=num, **kwargs)
    return pictures.save_grid(np.asarray(images), path, nrow=nrow)


# ---------------------------------------------------------------------------------------------
# The loop.


class _Stop:
    """What SIGTERM and SIGINT (Ctrl-C) ask for. The handler only sets `requested` (and
    `signum`): the loop saves a checkpoint at the next step boundary and returns, and start-up
    ends at its next phase (`check`). Nothing is raised from a handler, so no signal ever lands
    inside XLA, orbax or a garbage-collection callback."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None

    def __call__(self, signum, frame):
        del frame
        self.requested = True
        self.signum = self.signum or signum

    def check(self) -> None:
        """Ends a start-up that a signal interrupted, here in the run's own code."""
        if self.requested:
            raise Interrupted(self.signum)


class Interrupted(KeyboardInterrupt):
    """A signal stopped the run before its loop began (nothing saved)."""

    def __init__(self, signum: int | None):
        super().__init__(signum)
        self.signum = signum or signal.SIGINT


@contextlib.contextmanager
def _stop_on_signals(workdir: str) -> Iterator[_Stop]:
    """A `_Stop` set by SIGTERM and SIGINT for the block (the main thread of a single-process
    run; JAX's preemption service stops a multi-host run). A watcher thread reads the signals
    from `signal.set_wakeup_fd`, so it sees them at once even while the main thread is inside
    compiled code or a save: it logs the first, and at a second Ctrl-C ends the process
    (`_abort`)."""
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
        yield stop
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(read, workdir), daemon=True,
                               name="jaxdiff-signals")
    watcher.start()
    try:
        yield stop
    finally:
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(write)  # the watcher reads end-of-file and returns
        watcher.join(timeout=5)
        os.close(read)


def _watch(fd: int, workdir: str) -> None:
    interrupts, warned = 0, False
    while data := os.read(fd, 64):
        for signum in data:
            if signum not in (signal.SIGINT, signal.SIGTERM):
                continue
            interrupts += signum == signal.SIGINT
            if interrupts >= 2:
                _abort(workdir)
            if not warned:
                again = " (Ctrl-C again to abort without saving)" \
                    if signum == signal.SIGINT else ""
                logging.warning("%s received: will save a checkpoint and stop%s",
                                signal.Signals(signum).name, again)
                warned = True


def _abort(workdir: str) -> None:
    """A second Ctrl-C: one line, the lock released, exit 130 at once, whatever the main thread
    is doing. A save it cuts short is an orbax tmp directory, or a step without its SHA256SUMS:
    either way not committed, so loading and resuming fall back from it."""
    sys.stdout.flush()
    print(f"\njaxdiff.train: interrupted: {_last_saved(workdir)}", file=sys.stderr, flush=True)
    release_own_lock(workdir)
    os._exit(128 + signal.SIGINT)


def _checkpoint_items(state: TrainState) -> tuple[dict[str, Any], Any]:
    """(what resuming needs, the EMA weights) of a state (global arrays as they are sharded, or
    their abstract shapes and shardings to restore into); the target
    network only where the objective keeps one, so a diffusion run's layout is unchanged."""
    resume = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    if state.target_params is not None:
        resume["target_params"] = state.target_params
    return resume, state.ema_params


def _check_finite(metrics: dict[str, np.ndarray], first_step: int, saved: int | None) -> None:
    """FloatingPointError naming the first step whose loss or gradient norm is not finite
    (`saved`: the step of the run's last checkpoint, None if there is none)."""
    bad = ~(np.isfinite(metrics["loss"]) & np.isfinite(metrics["grad_norm"]))
    if bad.any():
        i = int(np.argmax(bad))
        step = first_step + i
        raise FloatingPointError(
            f"non-finite training loss {metrics['loss'][i]} at step {step} (gradient norm "
            f"{metrics['grad_norm'][i]}; the update from step {step} to {step + 1}); stopping "
            f"without saving this state, {_kept(saved)}. "
            "Lower optim.lr, raise optim.warmup_steps, set optim.grad_clip, or set "
            "training.skip_nonfinite=True to skip such updates."
        )


def _check_not_all_skipped(skipped: int, start: int, step: int, saved: int | None) -> None:
    """FloatingPointError if every update since `start` was non-finite (skip_nonfinite skipped
    them all: the weights never changed)."""
    if skipped == step - start > 0:
        raise FloatingPointError(
            f"every update from step {start} to step {step} ({skipped} of {skipped}) had a "
            f"non-finite loss or gradient and was skipped (training.skip_nonfinite): the weights "
            f"have not changed; stopping, {_kept(saved)}. Lower optim.lr, raise "
            "optim.warmup_steps, set optim.grad_clip, or check the data for NaNs.")


def _kept(saved: int | None) -> str:
    if saved is None:
        return "no checkpoint has been saved (nothing to resume from)"
    return f"the last checkpoint (step {saved}) is kept"


def _trim_metrics(path: str, step: int) -> None:
    """Drops the records of `path` after `step` (written by a run that died before saving them
    in a checkpoint, and about to be written again) and any half-written last line."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", math.inf) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _metrics_line(step: int, scalars: dict[str, float]) -> str:
    """One metrics.jsonl record; a non-finite value (all updates skipped) is null, as JSON has
    no NaN."""
    record = {name: value if math.isfinite(value) else None for name, value in scalars.items()}
    return json.dumps({"step": step, **record}, allow_nan=False) + "\n"


def _nothing_to_do(start: int, num_steps: int) -> str:
    """What a resumed run whose checkpoint is at or past `training.num_steps` says."""
    if start == num_steps:
        return f"training already finished: the checkpoint is at step {start} = training.num_steps"
    return (
        f"training is already past training.num_steps={num_steps}: the checkpoint is at step "
        f"{start}; nothing to train (set --config.training.num_steps above {start} to continue)"
    )


def _state_bytes(state: TrainState) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (or resumes) the experiment `config` in `workdir`; returns the final state.

    Before compiling anything it checks the config, that `workdir` is writable and has room for
    the checkpoints, that no other run holds it, and that a checkpoint already in it is of the
    same model and objective; each failure is a ValueError or `WorkdirError` saying
    what to change. The checkpoint is then restored (a run with nothing left to train returns
    here, having written nothing), the teacher's and LPIPS's weights loaded and the data set
    fetched and prepared, and only after that is `config.json` written: a start that fails
    leaves the workdir as it found it (one it had to create is removed, with the parents it
    created).
    """
    from jaxdiff.data import create_dataset

    initialize_distributed(config)
    validate(config)
    # The topmost directory that creating `workdir` adds (it or a parent), None if it exists.
    created, path = None, os.path.abspath(workdir)
    while not os.path.exists(path):
        created, path = path, os.path.dirname(path)
    primary = jax.process_index() == 0
    if primary:  # the others share process 0's lock
        check_not_held(workdir)
    check_writable(workdir)
    # Other processes of a multi-host run share process 0's lock (and its config.json).
    lock = workdir_lock(workdir) if primary else contextlib.nullcontext()
    try:
        with _stop_on_signals(workdir) as stop, lock:
            checkpoint.check_resumable(workdir, config, _as_trained)
            fns = train_functions(config)
            key = jax.random.PRNGKey(config.seed)
            abstract = jax.tree.map(
                lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                jax.eval_shape(fns.init_state, jax.random.fold_in(key, _INIT)), fns.shardings)
            check_free_space(
                workdir, _state_bytes(abstract), config.training.keep_checkpoints
            )
            stop.check()
            state = _restore(config, workdir, abstract)
            start = 0 if state is None else int(state.step)
            num_steps = config.training.num_steps
            if start >= num_steps:  # nothing to train: nothing is written either
                if primary:
                    print(_nothing_to_do(start, num_steps))
                return state
            stop.check()
            frozen = frozen_weights(config)
            stop.check()
            # A first run downloads and prepares the data here, before config.json is written.
            dataset = create_dataset(config, split="train")
            stop.check()
            # Every check has passed: only now is anything of the run written.
            if primary:
                write_config(workdir, config)
            return _train(config, workdir, fns, key, dataset, state, frozen, stop)
    except BaseException:
        path = os.path.abspath(workdir)
        with contextlib.suppress(OSError):  # not empty: the run had started
            while created is not None and path != os.path.dirname(created):
                os.rmdir(path)
                path = os.path.dirname(path)
        raise


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """`jax.distributed.initialize()` if `config.distributed` (once; before any computation).

    JAX detects TPU pods and SLURM, Open MPI and Kubernetes clusters itself; elsewhere it reads
    `JAX_COORDINATOR_ADDRESS` (host:port of process 0), and this reads `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID`. On CPUs the processes all-reduce through gloo.
    """
    if not config.get("distributed", False) or jax.distributed.is_initialized():
        return
    count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        num_processes=None if count is None else int(count),
        process_id=None if index is None else int(index),
    )


def _restore(config: ml_collections.ConfigDict, workdir: str, abstract: TrainState
             ) -> TrainState | None:
    """The state of the latest intact checkpoint in `workdir` (None if there is none; creates
    nothing), restored into the shardings of `abstract` (whatever mesh wrote it)."""
    if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
        return None
    manager = checkpoint.checkpoint_manager(workdir, create=False)
    try:
        restored = checkpoint.restore(manager, *_checkpoint_items(abstract))
    finally:
        manager.close()
    if restored is None:
        return None
    step, resume, ema = restored
    if jax.process_index() == 0:
        print(f"resuming from the checkpoint at step {step} in {manager.directory}")
    return TrainState(step=jnp.asarray(resume["step"]), params=resume["params"], ema_params=ema,
                      opt_state=resume["opt_state"], target_params=resume.get("target_params"))


def _train(
    config: ml_collections.ConfigDict, workdir: str, fns: TrainFunctions, key: jax.Array,
    dataset: Any, restored: TrainState | None, frozen: dict[str, Any], stop: _Stop,
) -> TrainState:
    primary = jax.process_index() == 0
    state = fns.init_state(jax.random.fold_in(key, _INIT)) if restored is None else restored
    manager = checkpoint.checkpoint_manager(workdir, config.training.keep_checkpoints)
    start = int(state.step)
    num_steps = config.training.num_steps
    k = config.training.steps_per_call
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    writer = None
    if primary:
        _trim_metrics(metrics_path, start)
        # purge_step drops events after `start` written by a run that died before saving them.
        writer = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start + 1)

    if restored is None and "teacher" in frozen and config.distill.init_from_teacher:
        state = shard_state(_from_teacher(state, frozen["teacher"], fns.tx), fns.shardings)
    # Otherwise the state is placed already, in buffers of its own: `init_state` is jitted
    # with the state's shardings as out_shardings, and a checkpoint is restored into them.
    frozen = replicated(frozen, fns.mesh)
    step_key = jax.random.fold_in(key, _STEP)
    bundle = make_bundle(config, params=None, model=fns.model, process=fns.process)
    reference = None
    if get_dataset(config.data.dataset).points:
        reference = np.asarray(dataset.batch(0)["x"]).reshape(-1, config.data.channels)

    # Several processes must stop at the same step: JAX's preemption service (which catches
    # SIGTERM on any of them) picks it (`_stop_on_signals` installs no handler then).
    multihost = jax.process_count() > 1
    picture = None
    bar = tqdm(total=num_steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
               disable=not primary)
    images_seen, clock, skipped, run_skipped = 0, time.perf_counter(), 0, 0
    saved = None if restored is None else start
    step = start
    batches = dataset.iterate(start)

    def chunks() -> Iterator[dict[str, np.ndarray]]:  # [local_devices, k, per_device, ...]
        while True:
            chunk = [next(batches) for _ in range(k)]
            yield jax.tree.map(lambda *xs: np.stack(xs, axis=1), *chunk)

    # The next chunk travels to this process's devices, as its share of the global arrays the
    # step takes, while the current one's steps run.
    device_chunks = prefetch_to_device(chunks(), batch_sharding(fns.mesh), size=1)
    try:
        while step < num_steps:
            state, metrics = fns.p_train_steps(state, next(device_chunks), step_key, frozen)
            metrics = to_host(metrics)
            good = np.ones(k, bool)
            if "skipped" in metrics:
                good = metrics.pop("skipped") == 0
                skipped += int(np.sum(~good))
                run_skipped += int(np.sum(~good))
            else:
                _check_finite(metrics, step, saved)
            step += k
            if multihost and multihost_utils.reached_preemption_sync_point(step // k):
                logging.warning("preemption notice: will save a checkpoint and stop")
                stop.requested = True
            bar.update(k)
            images_seen += k * config.training.batch_size

            if step % config.training.log_every == 0 or step == num_steps:
                _check_not_all_skipped(run_skipped, start, step, saved)
            if primary and (step % config.training.log_every == 0 or step == num_steps):
                now = time.perf_counter()
                rate = images_seen / (now - clock)
                images_seen, clock = 0, now
                scalars = {name: float(np.mean(v[good])) if good.any() else math.nan
                           for name, v in metrics.items()}
                scalars["images_per_sec"] = rate
                if config.training.skip_nonfinite:
                    scalars["skipped"] = skipped  # non-finite updates since the last record
                    skipped = 0
                with open(metrics_path, "a") as f:
                    f.write(_metrics_line(step, scalars))
                for name, value in scalars.items():
                    writer.add_scalar(f"train/{name}", value, step)
                bar.set_postfix(loss=f"{scalars['loss']:.4f}", img_s=f"{rate:.0f}")
            final = step == num_steps
            if step % config.training.checkpoint_every == 0 or final or stop.requested:
                checkpoint.save(manager, step, *_checkpoint_items(state))
                saved = step
            sample_every = config.training.sample_every
            sampling_now = get_network(config.model.name).denoises and sample_every and (
                step % sample_every == 0 or final)
            if sampling_now:  # on every process: the EMA may be gathered from all of them
                ema = to_host(state.ema_params)
            if primary and sampling_now:
                bundle = bundle.replace(params=network_params(ema))
                path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
                key_s = jax.random.fold_in(jax.random.fold_in(key, _SAMPLE), step)
                picture = sample_picture(config, bundle, key_s, path, reference)
                with Image.open(picture) as image:
                    grid = np.asarray(image.convert("RGB"))
                writer.add_image("samples", grid, step, dataformats="HWC")
                writer.flush()
                clock = time.perf_counter()
            if stop.requested:
                break
    finally:
        device_chunks.close()
        batches.close()
        bar.close()
        manager.wait_until_finished()
        manager.close()
        if writer is not None:
            writer.close()
    if stop.requested:
        print(f"stopped at step {step}; checkpoint saved; rerun the command to resume")
    samples_dir = os.path.join(workdir, "samples")
    if picture is None and os.path.isdir(samples_dir) and os.listdir(samples_dir):
        picture = os.path.join(samples_dir, max(os.listdir(samples_dir)))
    if primary and picture is not None:
        print(f"samples: {picture}")
    return to_host(state)


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and samples")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    initialize_distributed(_CONFIG.value)  # before `validate` counts the devices
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    try:
        validate(_CONFIG.value)
    except ValueError as e:  # the error alone, not absl's usage text before it
        sys.exit(f"jaxdiff.train: error: {e}")
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (WorkdirError, FloatingPointError) as e:
        _exit(f"jaxdiff.train: error: {e}")
    except OSError as e:  # a full disk or a vanished file while writing logs, metrics, samples
        _exit(f"jaxdiff.train: error: {e}; {_last_saved(_WORKDIR.value)}")
    except KeyboardInterrupt as e:  # a signal during start-up (`_Stop.check`): nothing saved
        print(f"jaxdiff.train: interrupted: {_last_saved(_WORKDIR.value)}", file=sys.stderr)
        sys.exit(128 + getattr(e, "signum", signal.SIGINT))


def _exit(message: str, timeout_s: float = 30.0) -> None:
    """Exits with `message` as the last thing printed. Orbax's threads finishing a failed save
    log the same error again (at ERROR) as they end, some during the interpreter's shutdown:
    the ones running are joined, and what any later one logs is dropped. Orbax's own thread
    class re-raises its target's error from `join`: that is the error `message` reports."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            with contextlib.suppress(Exception):
                thread.join(timeout_s)
    logging.set_verbosity(logging.FATAL)
    print(message, file=sys.stderr, flush=True)
    # What orbax's asyncio callbacks print as the interpreter shuts down ("Event loop is closed",
    # since its saves hold sharded device arrays) goes nowhere: `message` stays the last line.
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    sys.exit(1)


def _last_saved(workdir: str) -> str:
    """What an interrupted run leaves to resume from."""
    step = checkpoint.latest_committed_step(workdir)
    if step is None:
        return "no checkpoint saved; rerun the command to start again"
    return f"the latest checkpoint is at step {step}; rerun the command to resume from it"


USAGE = (
    "usage: python -m jaxdiff.train --config experiments/<name>.py --workdir DIR "
    "[--config.<section>.<field>=<value> ...]\n"
    "       python -m jaxdiff.train --help[=<section>]   (the config fields and their defaults)"
)


def _before_flags(argv: Sequence[str]) -> None:
    """Answers `--help[=section]` (exit 0) and refuses an unknown `--config.*` field in one line
    (exit 1), before absl parses the flags: its --help exits 1 without the config's fields and
    an unknown field fails with a traceback from inside ml_collections."""
    for arg in argv[1:]:
        if arg in ("-h", "--help", "-help") or arg.startswith("--help="):
            path = _config_path(argv)
            try:
                experiment = None if path is None else _experiment(path)
                fields = describe_fields(arg.partition("=")[2] or None, experiment)
            except (ValueError, OSError, AttributeError) as e:
                sys.exit(f"jaxdiff.train: error: {e}")
            whose = ("experiment files start from these defaults" if path is None
                     else f"the values of {path}")
            print(f"{USAGE}\n\nTrains (or resumes) the experiment in DIR and samples from it."
                  f"\n\nconfig fields ({whose}):\n{fields}")
            sys.exit(0)
    try:
        check_overrides(argv[1:])
    except ValueError as e:
        sys.exit(f"jaxdiff.train: error: {e}")
    path = _config_path(argv)
    if path is not None:  # a file that does not load: one line, not ml_collections' traceback
        try:
            _experiment(path)
        except Exception as e:  # whatever the user's file raises
            sys.exit(f"jaxdiff.train: error: --config {path!r} does not load: "
                     f"{type(e).__name__}: {e}")


def _config_path(argv: Sequence[str]) -> str | None:
    """The file of `--config FILE` or `--config=FILE` in `argv` (None if not given)."""
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(("--config=", "-config=")):
            return arg.partition("=")[2]
    return None


def _experiment(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of the experiment file at `path` (as `--config` loads it)."""
    import importlib.util

    if not os.path.isfile(path):
        raise OSError(f"no such file {path!r}")
    spec = importlib.util.spec_from_file_location("_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _interrupted_at_start() -> None:
    print("jaxdiff.train: interrupted: before training began; nothing was written",
          file=sys.stderr)
    sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if jaxdiff.STARTUP_SIGNALS:  # a Ctrl-C while the libraries loaded
        _interrupted_at_start()
    try:
        _before_flags(sys.argv)
        flags.mark_flags_as_required(["config", "workdir"])
        app.run(main)
    except KeyboardInterrupt:  # before `main` handles it: reading the flags and the config
        _interrupted_at_start()
