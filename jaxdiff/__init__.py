# ruff: noqa: E402  (the imports follow the start-up signal handler, on purpose)
"""jaxdiff: the diffusion-model canon as pure, composable JAX functions."""

import signal
import sys

# `python -m jaxdiff.train`: a Ctrl-C while the libraries below load (seconds) is recorded here
# rather than raised inside an import as a traceback; the command reads it as it starts.
STARTUP_SIGNALS: list[int] = []
_argv = getattr(sys, "orig_argv", [])
if "-m" in _argv[:-1] and _argv[_argv.index("-m") + 1] == "jaxdiff.train":
    signal.signal(signal.SIGINT, lambda signum, frame: STARTUP_SIGNALS.append(signum))

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
