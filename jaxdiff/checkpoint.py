"""Workdirs: the resolved config, orbax checkpoints, and loading a trained model back.

A workdir holds `config.json` (the resolved experiment config) and `checkpoints/<step>/` with
two orbax items: `state` (params, optimizer state, step: what resuming needs) and `ema_params`
(the weights samples are drawn from). `export` writes only `ema_params`, so a converted set of
published weights and a training run load the same way, through `load`.
"""

from __future__ import annotations

import os
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
ITEMS = ("state", "ema_params")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> str:
    """Writes the resolved config to `workdir/config.json` and returns the path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path, "w") as f:
        f.write(config_to_json(config))
    return path


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
