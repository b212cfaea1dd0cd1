"""Noise processes in continuous time: x_t = alpha(t) x_0 + sigma(t) eps.

Every process is read through its log signal-to-noise ratio lambda(t) = log(alpha^2 / sigma^2)
(VDM arXiv 2107.00630 Eq. 3) or, equivalently, EDM's noise level sigma_edm = sigma / alpha =
exp(-lambda / 2): x_t = s (x_0 + sigma_edm eps) with s = alpha (EDM arXiv 2206.00364 Eq. 7). Two
processes are here, and both satisfy `NoiseProcess`:

- `jaxdiff.schedules.Schedule`, DDPM's discrete variance-preserving chain (alpha^2 + sigma^2 = 1)
  with t the step index in [0, T-1], log-SNR linear between steps, the network fed step indices;
- `VEProcess`, EDM's variance-exploding process (alpha = 1, sigma(t) = t in [sigma_min,
  sigma_max]), the network fed c_noise = ln(sigma) / 4 (EDM Table 1).

Samplers work on noise levels sigma_edm, so any model samples with any sampler: a discrete model
is evaluated at the nearest step of a level that is not one of its own (EDM's iDDPM wrapper).
`PROCESSES` maps the config's `diffusion.process` to a constructor: one entry per process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def alpha_sigma_vp(log_snr: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha, sigma) of a variance-preserving process: alpha^2 = sigmoid(lambda) (VDM Eq. 4)."""
    return jnp.sqrt(jax.nn.sigmoid(log_snr)), jnp.sqrt(jax.nn.sigmoid(-log_snr))


def edm_sigma(log_snr: jax.Array) -> jax.Array:
    """EDM's noise level sigma = exp(-lambda / 2), the noise std of x / alpha."""
    return jnp.exp(-0.5 * log_snr)


def log_snr_of_sigma(sigma: jax.Array) -> jax.Array:
    """lambda = -2 ln sigma, the inverse of `edm_sigma`."""
    return -2.0 * jnp.log(sigma)


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0
                  ) -> np.ndarray:
    """sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i = 0..N-1, decreasing (EDM Eq. 5), float64; N = 1 gives [sigma_max]."""
    if num_steps == 1:
        return np.array([float(sigma_max)])
    ramp = np.linspace(0.0, 1.0, num_steps)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


class NoiseProcess(Protocol):
    """What samplers and losses ask of a process (both `Schedule` and `VEProcess` answer)."""

    discrete: bool  # True: the network takes integer step indices and t lies on a chain

    def log_snr(self, t: jax.Array) -> jax.Array: ...

    def alpha(self, t: jax.Array) -> jax.Array: ...

    def sigma(self, t: jax.Array) -> jax.Array: ...

    def t_of_log_snr(self, log_snr: jax.Array) -> jax.Array: ...

    def scale(self, sigma: np.ndarray) -> np.ndarray:
        """s(sigma_edm): the process writes x = s (x_0 + sigma_edm eps) (host, float64)."""

    def t_of_sigma(self, sigma: np.ndarray) -> np.ndarray:
        """The time at which the process reaches noise level sigma_edm (host)."""

    def network_time(self, t: jax.Array) -> jax.Array:
        """What the network is fed at time t."""

    def sample_t(self, rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Training times: the distribution the loss is averaged over."""

    @property
    def sigma_min(self) -> float: ...

    @property
    def sigma_max(self) -> float: ...


@flax.struct.dataclass
class VEProcess:
    """EDM's process: x_sigma = x_0 + sigma eps, sigma(t) = t, s(t) = 1 (EDM Table 1, 'Ours').

    `p_mean`, `p_std` give the training distribution ln sigma ~ N(P_mean, P_std^2) (EDM Table 1,
    'Noise distribution'); sampling uses sigma in [sigma_min, sigma_max].
    """

    sigma_min: float = flax.struct.field(pytree_node=False, default=0.002)
    sigma_max: float = flax.struct.field(pytree_node=False, default=80.0)
    p_mean: float = flax.struct.field(pytree_node=False, default=-1.2)
    p_std: float = flax.struct.field(pytree_node=False, default=1.2)

    discrete = False

    def __post_init__(self):
        if not 0.0 < self.sigma_min < self.sigma_max < math.inf:
            raise ValueError(f"VEProcess needs 0 < sigma_min < sigma_max < inf, got "
                             f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")
        if not self.p_std > 0.0:
            raise ValueError(f"VEProcess needs p_std > 0, got {self.p_std}")

    def log_snr(self, t: jax.Array) -> jax.Array:
        return log_snr_of_sigma(t)

    def alpha(self, t: jax.Array) -> jax.Array:
        return jnp.ones_like(t)

    def sigma(self, t: jax.Array) -> jax.Array:
        return t

    def t_of_log_snr(self, log_snr: jax.Array) -> jax.Array:
        return edm_sigma(log_snr)

    def scale(self, sigma: np.ndarray) -> np.ndarray:
        return np.ones_like(np.asarray(sigma, np.float64))

    def t_of_sigma(self, sigma: np.ndarray) -> np.ndarray:
        return np.asarray(sigma, np.float64)

    def network_time(self, t: jax.Array) -> jax.Array:
        """c_noise = ln(sigma) / 4 (EDM Table 1)."""
        return jnp.log(t) / 4.0

    def sample_t(self, rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """sigma with ln sigma ~ N(P_mean, P_std^2), EDM's training distribution (Table 1)."""
        return jnp.exp(self.p_mean + self.p_std * jax.random.normal(rng, shape))


def _ddpm(diffusion: ml_collections.ConfigDict):
    from jaxdiff.schedules import make_schedule

    return make_schedule(diffusion.beta_schedule, diffusion.num_timesteps,
                         linear_start=diffusion.linear_start, linear_end=diffusion.linear_end)


def _edm(diffusion: ml_collections.ConfigDict) -> VEProcess:
    return VEProcess(sigma_min=diffusion.sigma_min, sigma_max=diffusion.sigma_max,
                     p_mean=diffusion.p_mean, p_std=diffusion.p_std)


# diffusion.process -> the process of a config's diffusion section.
PROCESSES: dict[str, Callable[[ml_collections.ConfigDict], Any]] = {"ddpm": _ddpm, "edm": _edm}


def make_process(diffusion: ml_collections.ConfigDict) -> NoiseProcess:
    """The noise process a config's `diffusion` section describes."""
    if diffusion.process not in PROCESSES:
        raise ValueError(f"unknown diffusion process {diffusion.process!r}; expected one of "
                         f"{tuple(PROCESSES)}")
    return PROCESSES[diffusion.process](diffusion)
