"""jaxdiff: the diffusion-model canon as pure, composable JAX functions."""

from jaxdiff.checkpoint import load
from jaxdiff.editing import edit, inpaint, interpolate, restore
from jaxdiff.likelihood import bits_per_dim_ode, ode_log_likelihood
from jaxdiff.pictures import to_uint8
from jaxdiff.sampling import ddim_invert, sample
from jaxdiff.schedules import Schedule, beta_schedule, make_schedule, respace, spaced_timesteps

__all__ = ["Schedule", "ddim_invert", "sample", "to_uint8", "load",
           "beta_schedule", "make_schedule", "respace", "spaced_timesteps",
           "bits_per_dim_ode", "ode_log_likelihood",
           "inpaint", "restore", "edit", "interpolate"]
