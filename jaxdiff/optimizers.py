"""The optimizer: gradient clipping, DDPM's warm-up and one registry entry per update rule."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import ml_collections
import optax

from jaxdiff.registry import Checker, Entry, lookup


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """lr * min(step / warmup_steps, 1): DDPM's linear warm-up, then constant."""
    lr, warmup = config.optim.lr, config.optim.warmup_steps
    if warmup == 0:
        return optax.constant_schedule(lr)
    return optax.linear_schedule(0.0, lr, warmup)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Optimizer(Entry):
    """An update rule: `make(optim section, learning-rate schedule)`; `fields` are the `optim`
    settings it reads."""

    make: Callable[[ml_collections.ConfigDict, optax.Schedule], optax.GradientTransformation]


def _check_adam(c: Checker) -> None:
    c.number("optim.b1", 0.0, 1.0)
    c.number("optim.b2", 0.0, 1.0)
    c.positive("optim.eps")


def _check_adamw(c: Checker) -> None:
    _check_adam(c)
    c.number("optim.weight_decay", 0.0, math.inf)


# DDPM's Adam (arXiv 2006.11239 App. B); AdamW's decoupled weight decay (arXiv 1711.05101).
_ADAM = {"optim.b1": 0.9, "optim.b2": 0.999, "optim.eps": 1e-8}

OPTIMIZERS: dict[str, Optimizer] = {
    "adam": Optimizer(make=lambda o, lr: optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps),
                      fields=_ADAM, check=_check_adam),
    "adamw": Optimizer(make=lambda o, lr: optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps,
                                                      weight_decay=o.weight_decay),
                       fields={**_ADAM, "optim.weight_decay": 0.0}, check=_check_adamw),
}


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Gradient clipping by global norm (if grad_clip > 0), then `optim.optimizer`'s update rule
    with warm-up."""
    o = config.optim
    opt = lookup(OPTIMIZERS, o.optimizer, "optimizer").make(o, learning_rate_schedule(config))
    if o.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip), opt)
    return opt
