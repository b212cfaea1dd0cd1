"""Checks of user input shared by the public functions: one error message for each kind of value."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high]; a ValueError naming `name` and the value otherwise.

    Any integer type counts (Python, NumPy, a concrete 0-d JAX array); bools and floats do not.
    """
    dtype = getattr(value, "dtype", None)
    if dtype is not None and np.ndim(value) == 0 and np.issubdtype(dtype, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f", <= {high}"
        raise ValueError(f"{name} must be >= {low}{upper}, got {value}")
    return int(value)


def check_scale(name: str, value) -> float:
    """`value` as a finite float >= 0; a ValueError naming `name` and the value otherwise."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def concrete_t(t: jax.Array, batch_size: int | None) -> np.ndarray | None:
    """t as a NumPy array once its shape ([batch] or ()) is checked; None when t is traced."""
    shape = jnp.shape(t)
    if batch_size is not None and shape not in ((), (batch_size,)):
        raise ValueError(f"t must have shape ({batch_size},) or (), got {shape}")
    return None if isinstance(t, jax.core.Tracer) else np.asarray(t)
