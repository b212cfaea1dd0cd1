"""A trained diffusion model as one pytree: weights and schedule traced, the rest static."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct

from jaxdiff.diffusion import DEFAULT_MODEL_VAR_TYPE
from jaxdiff.processes import VEProcess
from jaxdiff.schedules import Schedule


@flax.struct.dataclass
class DiffusionModel:
    """What `jaxdiff.sample` needs: the network, its (EMA) weights, the noise process (a DDPM
    `Schedule` or EDM's `VEProcess`) and how to read the network's output.

    `params` and `schedule` are pytree leaves (traced under jit); the network definition and the
    parameterisation are static metadata, so a jitted sampler specialises on them once.
    """

    params: Any
    schedule: Schedule | VEProcess
    model: nn.Module = flax.struct.field(pytree_node=False)
    image_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    model_output_type: str = flax.struct.field(pytree_node=False, default="eps")
    model_var_type: str = flax.struct.field(pytree_node=False, default=DEFAULT_MODEL_VAR_TYPE)
    num_classes: int = flax.struct.field(pytree_node=False, default=0)
    sigma_data: float = flax.struct.field(pytree_node=False, default=0.5)  # EDM's data std
