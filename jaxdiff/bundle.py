"""A trained diffusion model as one pytree (weights and schedule traced, the rest static), and
the factory that builds one from an experiment config."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import ml_collections

from jaxdiff.diffusion import DEFAULT_MODEL_VAR_TYPE
from jaxdiff.models import create_model, get_network, label_classes
from jaxdiff.processes import NoiseProcess, make_process


@flax.struct.dataclass
class DiffusionModel:
    """What `jaxdiff.sample` needs: the network, its (EMA) weights, the noise process (any
    `jaxdiff.processes.NoiseProcess`) and how to read the network's output.

    `params` and `schedule` are pytree leaves (traced under jit); the network definition and the
    parameterisation are static metadata, so a jitted sampler specialises on them once.
    """

    params: Any
    schedule: NoiseProcess
    model: nn.Module = flax.struct.field(pytree_node=False)
    image_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    model_output_type: str = flax.struct.field(pytree_node=False, default="eps")
    model_var_type: str = flax.struct.field(pytree_node=False, default=DEFAULT_MODEL_VAR_TYPE)
    num_classes: int = flax.struct.field(pytree_node=False, default=0)
    sigma_data: float = flax.struct.field(pytree_node=False, default=0.5)  # EDM's data std


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The shape of one example: (H, W, C), or (D,) for points."""
    if get_network(config.model.name).points:
        return (config.data.channels,)
    size = config.data.image_size
    return (size, size, config.data.channels)


def make_bundle(config: ml_collections.ConfigDict, params: Any, model: Any = None,
                process: Any = None) -> DiffusionModel:
    """The `DiffusionModel` of an experiment config with `params` (network and process built from
    the config unless given). A classifier's bundle carries its classes in `num_classes`."""
    d = config.diffusion
    denoises = get_network(config.model.name).denoises
    classes = label_classes(config) if denoises else config.data.num_classes
    return DiffusionModel(
        params=params,
        schedule=make_process(d) if process is None else process,
        model=create_model(config) if model is None else model,
        image_shape=image_shape(config),
        model_output_type=d.model_output,
        model_var_type=d.model_var_type,
        num_classes=classes,
        sigma_data=d.sigma_data,
    )
