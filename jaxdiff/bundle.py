"""A trained diffusion model as one pytree: weights and schedule traced, the rest static."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct

from jaxdiff.schedules import Schedule


@flax.struct.dataclass
class DiffusionModel:
    """What `jaxdiff.sample` needs: the network, its (EMA) weights, the schedule and how to read it.

    `params` and `schedule` are pytree leaves (traced under jit); the network definition and the
    parameterisation are static metadata, so a jitted sampler specialises on them once.
    """

    params: Any
    schedule: Schedule
    model: nn.Module = flax.struct.field(pytree_node=False)
    image_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    model_output_type: str = flax.struct.field(pytree_node=False, default="eps")
    model_var_type: str = flax.struct.field(pytree_node=False, default="fixed_large")
    num_classes: int = flax.struct.field(pytree_node=False, default=0)
