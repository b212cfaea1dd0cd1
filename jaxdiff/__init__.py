"""jaxdiff: the diffusion-model canon as pure, composable JAX functions."""

from jaxdiff.schedules import Schedule, beta_schedule, make_schedule, respace, spaced_timesteps

__all__ = ["Schedule", "beta_schedule", "make_schedule", "respace", "spaced_timesteps"]
