"""Noise processes in continuous time: x_t = alpha(t) x_0 + sigma(t) eps.

Every process is read through its log signal-to-noise ratio lambda(t) = log(alpha^2 / sigma^2)
(VDM arXiv 2107.00630 Eq. 3) or, equivalently, EDM's noise level sigma_edm = sigma / alpha =
exp(-lambda / 2): x_t = alpha (x_0 + sigma_edm eps) (EDM arXiv 2206.00364 Eq. 7). Every process
answers the same questions in `jnp`, under `jit` (`NoiseProcess`), so one denoiser, every sampler
and the likelihood work on every process:

- `jaxdiff.schedules.Schedule`, DDPM's variance-preserving chain with t the step index in
  [0, T-1] and log-SNR linear between steps. It has steps: the network takes step indices and a
  level that is not one of its own is rounded to the nearest (EDM's `round_sigma`);
- `VEProcess`, EDM's variance-exploding process (alpha = 1, sigma(t) = t);
- `FlowMatchingProcess`, the straight path x_t = (1 - t) x_0 + t eps of rectified flow and
  flow matching;
- `TrigFlowProcess`, sCM's x_t = cos(t) x_0 + sin(t) z with z ~ N(0, sigma_d^2 I).

`PROCESSES` maps the config's `diffusion.process` to its entry: adding a process is one class
and one entry.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.registry import Checker, Entry, lookup
from jaxdiff.schedules import BETA_SCHEDULES, LINEAR_END, LINEAR_START, make_schedule
from jaxdiff.validation import concrete_t

# `uniform` and `quad` space the process's time (a chain's own steps, DDIM Sec. 4.2); `logsnr`
# spaces log-SNR evenly (DPM-Solver arXiv 2206.00927); `karras` is EDM Eq. 5 with exponent rho.
SPACINGS = ("uniform", "quad", "logsnr", "karras")


def edm_sigma(log_snr: jax.Array) -> jax.Array:
    """EDM's noise level sigma = exp(-lambda / 2), the noise std of x / alpha."""
    return jnp.exp(-0.5 * log_snr)


def log_snr_of_sigma(sigma: jax.Array) -> jax.Array:
    """lambda = -2 ln sigma, the inverse of `edm_sigma`."""
    return -2.0 * jnp.log(sigma)


def karras_sigma(index: jax.Array, *, num_scales: jax.Array | int, sigma_min: float,
                 sigma_max: float, rho: float = 7.0) -> jax.Array:
    """sigma_i = (sigma_min^(1/rho) + i/(N-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, the
    i-th of N levels in ascending order (EDM Eq. 5; CM arXiv 2303.01469 App. C). N may be traced:
    the consistency curricula change it during training without recompiling."""
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    frac = jnp.asarray(index) / (jnp.asarray(num_scales) - 1.0)
    return (lo + frac * (hi - lo)) ** rho


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0
                  ) -> np.ndarray:
    """The N levels of `karras_sigma` from noise to data, float64 on the host; N = 1 gives
    [sigma_max]."""
    if num_steps == 1:
        return np.array([float(sigma_max)])
    with jax.enable_x64(True):
        return np.asarray(karras_sigma(jnp.arange(num_steps - 1, -1, -1, dtype=jnp.float64),
                                       num_scales=num_steps, sigma_min=sigma_min,
                                       sigma_max=sigma_max, rho=rho))


class NoiseProcess(Protocol):
    """What the denoiser, samplers, losses and likelihood ask of a process; t is its own time.

    Traced (`jnp`, any shape): `log_snr`, `alpha`, `sigma`, their inverses `t_of_log_snr` and
    `t_of_sigma` (of EDM's level sigma / alpha), `round_sigma` (the nearest level the model was
    trained on), `network_time` (what the network is fed) and `sample_t` (training times).
    Host: the range of levels, the time grids of the spacings, and checks.
    """

    num_timesteps: int | None  # the chain's length where the process has steps, else None
    default_spacing: str  # the grid of a sampler that picks none

    def log_snr(self, t: jax.Array) -> jax.Array: ...

    def alpha(self, t: jax.Array) -> jax.Array: ...

    def sigma(self, t: jax.Array) -> jax.Array: ...

    def t_of_log_snr(self, log_snr: jax.Array) -> jax.Array: ...

    def t_of_sigma(self, sigma: jax.Array) -> jax.Array: ...

    def round_sigma(self, sigma: jax.Array) -> jax.Array: ...

    def network_time(self, t: jax.Array) -> jax.Array: ...

    def t_of_network_time(self, c: jax.Array) -> jax.Array: ...

    def sample_t(self, rng: jax.Array, shape: tuple[int, ...]) -> jax.Array: ...

    def timesteps(self, num_steps: int, spacing: str, sigma_min: float, sigma_max: float,
                  rho: float) -> np.ndarray:
        """Decreasing times of a grid of num_steps levels, from noise to data (host)."""

    def check_t(self, t: jax.Array, batch_size: int | None = None) -> None: ...

    @property
    def sigma_min(self) -> float: ...

    @property
    def sigma_max(self) -> float: ...


_PROCESS_MEMBERS = ("num_timesteps", "default_spacing", "sigma_min", "sigma_max", "log_snr",
                    "alpha", "sigma", "t_of_log_snr", "t_of_sigma", "round_sigma", "network_time",
                    "t_of_network_time", "sample_t", "timesteps", "check_t")


def check_process(process: Any) -> None:
    """ValueError naming what `process` lacks of `NoiseProcess`, if anything."""
    missing = [name for name in _PROCESS_MEMBERS if not hasattr(process, name)]
    if missing:
        raise ValueError(f"schedule must be a noise process (jaxdiff.processes.NoiseProcess, e.g. "
                         f"a Schedule, VEProcess or FlowMatchingProcess); {type(process).__name__}"
                         f" lacks {missing}")


def noise_level(process: NoiseProcess, t: jax.Array) -> jax.Array:
    """EDM's sigma = sigma(t) / alpha(t) at the process's time t."""
    return process.sigma(t) / process.alpha(t)


def spaced_levels(num_steps: int, spacing: str, sigma_min: float, sigma_max: float, rho: float
                  ) -> np.ndarray:
    """Decreasing levels of the spacings that do not depend on the process: `logsnr` (even in
    log sigma, i.e. in log-SNR) and `karras` (EDM Eq. 5), float64."""
    if spacing == "karras":
        return karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def continuous_timesteps(process: NoiseProcess, num_steps: int, spacing: str, sigma_min: float,
                         sigma_max: float, rho: float) -> np.ndarray:
    """A continuous process's grid: `uniform` and `quad` space its time between the times of
    sigma_max and sigma_min (quad: evenly in sqrt of the distance from the data end), the other
    spacings its levels (`spaced_levels`)."""
    if spacing not in ("uniform", "quad"):
        levels = spaced_levels(num_steps, spacing, sigma_min, sigma_max, rho)
        return np.asarray(process.t_of_sigma(jnp.asarray(levels)))
    t_lo, t_hi = (float(process.t_of_sigma(jnp.asarray(s))) for s in (sigma_min, sigma_max))
    ramp = np.linspace(1.0, 0.0, num_steps)
    return t_lo + (t_hi - t_lo) * (ramp if spacing == "uniform" else ramp**2)


def check_positive_t(t: jax.Array, batch_size: int | None, high: float = math.inf) -> None:
    """t of shape [batch] or (), and (when concrete) in (0, high]."""
    t = concrete_t(t, batch_size)
    if t is None:
        return
    bad = t[~(np.isfinite(t) & (t > 0) & (t <= high))]
    if bad.size:
        raise ValueError(f"t must be finite and lie in (0, {high}], got {bad[:4].tolist()}")


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

    num_timesteps = None
    default_spacing = "karras"

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

    def t_of_sigma(self, sigma: jax.Array) -> jax.Array:
        return sigma

    def round_sigma(self, sigma: jax.Array) -> jax.Array:
        return sigma

    def network_time(self, t: jax.Array) -> jax.Array:
        """c_noise = ln(sigma) / 4 (EDM Table 1)."""
        return jnp.log(t) / 4.0

    def t_of_network_time(self, c: jax.Array) -> jax.Array:
        return jnp.exp(4.0 * c)

    def sample_t(self, rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """sigma with ln sigma ~ N(P_mean, P_std^2), EDM's training distribution (Table 1)."""
        return jnp.exp(self.p_mean + self.p_std * jax.random.normal(rng, shape))

    def timesteps(self, num_steps: int, spacing: str, sigma_min: float, sigma_max: float,
                  rho: float) -> np.ndarray:
        return continuous_timesteps(self, num_steps, spacing, sigma_min, sigma_max, rho)

    def check_t(self, t: jax.Array, batch_size: int | None = None) -> None:
        check_positive_t(t, batch_size)


@flax.struct.dataclass
class FlowMatchingProcess:
    """x_t = (1 - t) x_0 + t eps, t in (0, 1): the straight path of rectified flow (arXiv
    2209.03003 Eq. 1) and conditional flow matching's optimal-transport path (arXiv 2210.02747
    Eq. 20 with sigma_min = 0). EDM's level is sigma = t / (1 - t).

    Training times are SD3's logit-normal t = sigmoid(m + s n) (arXiv 2403.03206 Eq. 19), shifted
    by t' = a t / (1 + (a - 1) t) (SD3 Sec. 5.3.2, a = `shift`); the `uniform` sampling grid is
    shifted alike (diffusers' FlowMatchEulerDiscreteScheduler). `t_min`, `t_max` bound the levels
    a sampler may visit (t = 1 is pure noise at sigma = inf).
    """

    logit_mean: float = flax.struct.field(pytree_node=False, default=0.0)
    logit_std: float = flax.struct.field(pytree_node=False, default=1.0)
    shift: float = flax.struct.field(pytree_node=False, default=1.0)
    t_min: float = flax.struct.field(pytree_node=False, default=1e-4)
    t_max: float = flax.struct.field(pytree_node=False, default=0.999)

    num_timesteps = None
    default_spacing = "uniform"

    def __post_init__(self):
        if not 0.0 < self.t_min < self.t_max < 1.0:
            raise ValueError(f"FlowMatchingProcess needs 0 < t_min < t_max < 1, got "
                             f"t_min={self.t_min}, t_max={self.t_max}")
        if not (self.logit_std > 0.0 and self.shift > 0.0):
            raise ValueError(f"FlowMatchingProcess needs logit_std > 0 and shift > 0, got "
                             f"logit_std={self.logit_std}, shift={self.shift}")

    @property
    def sigma_min(self) -> float:
        return self.t_min / (1.0 - self.t_min)

    @property
    def sigma_max(self) -> float:
        return self.t_max / (1.0 - self.t_max)

    def log_snr(self, t: jax.Array) -> jax.Array:
        return 2.0 * (jnp.log1p(-t) - jnp.log(t))

    def alpha(self, t: jax.Array) -> jax.Array:
        return 1.0 - t

    def sigma(self, t: jax.Array) -> jax.Array:
        return t

    def t_of_log_snr(self, log_snr: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(-0.5 * log_snr)

    def t_of_sigma(self, sigma: jax.Array) -> jax.Array:
        return sigma / (1.0 + sigma)

    def round_sigma(self, sigma: jax.Array) -> jax.Array:
        return sigma

    def network_time(self, t: jax.Array) -> jax.Array:
        """1000 t, the timestep SD3 and diffusers feed a flow-matching network."""
        return 1000.0 * t

    def t_of_network_time(self, c: jax.Array) -> jax.Array:
        return c / 1000.0

    def shifted(self, t: jax.Array) -> jax.Array:
        """t' = a t / (1 + (a - 1) t), SD3's resolution-dependent timestep shift (Sec. 5.3.2)."""
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def sample_t(self, rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """t = shift(sigmoid(m + s n)), n ~ N(0, 1): SD3's logit-normal (Eq. 19), shifted."""
        t = jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(rng, shape))
        return jnp.clip(self.shifted(t), self.t_min, self.t_max)

    def timesteps(self, num_steps: int, spacing: str, sigma_min: float, sigma_max: float,
                  rho: float) -> np.ndarray:
        t = continuous_timesteps(self, num_steps, spacing, sigma_min, sigma_max, rho)
        return np.asarray(self.shifted(jnp.asarray(t))) if spacing == "uniform" else t

    def check_t(self, t: jax.Array, batch_size: int | None = None) -> None:
        check_positive_t(t, batch_size, high=1.0)


@flax.struct.dataclass
class TrigFlowProcess:
    """TrigFlow: x_t = cos(t) x_0 + sin(t) z, z ~ N(0, sigma_d^2 I), t in [0, pi/2] (sCM arXiv
    2410.11081 Sec. 2). EDM's level is sigma = sigma_d tan(t), so x_t = cos(t) (x_0 + sigma n).

    Training times are sCM's proposal t = arctan(e^tau / sigma_d), tau ~ N(P_mean, P_std^2)
    (Alg. 1): EDM's lognormal of sigma read as a time. `sigma_min`, `sigma_max` bound the levels
    a sampler may visit; sigma_max = 80 is sCM's t_max = arctan(80 / sigma_d) (Sec. 4.1).
    """

    sigma_data: float = flax.struct.field(pytree_node=False, default=0.5)
    sigma_min: float = flax.struct.field(pytree_node=False, default=0.002)
    sigma_max: float = flax.struct.field(pytree_node=False, default=80.0)
    p_mean: float = flax.struct.field(pytree_node=False, default=-1.0)
    p_std: float = flax.struct.field(pytree_node=False, default=1.4)

    num_timesteps = None
    default_spacing = "karras"

    def __post_init__(self):
        if not (self.sigma_data > 0.0 and 0.0 < self.sigma_min < self.sigma_max < math.inf
                and self.p_std > 0.0):
            raise ValueError(f"TrigFlowProcess needs sigma_data > 0, 0 < sigma_min < sigma_max "
                             f"< inf and p_std > 0, got sigma_data={self.sigma_data}, "
                             f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, "
                             f"p_std={self.p_std}")

    def log_snr(self, t: jax.Array) -> jax.Array:
        """lambda = log(cos^2 t / (sigma_d^2 sin^2 t)) = -2 ln(sigma_d tan t)."""
        return log_snr_of_sigma(self.sigma_data * jnp.tan(t))

    def alpha(self, t: jax.Array) -> jax.Array:
        return jnp.cos(t)

    def sigma(self, t: jax.Array) -> jax.Array:
        return self.sigma_data * jnp.sin(t)

    def t_of_log_snr(self, log_snr: jax.Array) -> jax.Array:
        return self.t_of_sigma(edm_sigma(log_snr))

    def t_of_sigma(self, sigma: jax.Array) -> jax.Array:
        """t = arctan(sigma / sigma_d), the inverse of sigma = sigma_d tan t."""
        return jnp.arctan(sigma / self.sigma_data)

    def round_sigma(self, sigma: jax.Array) -> jax.Array:
        return sigma

    def network_time(self, t: jax.Array) -> jax.Array:
        """c_noise(t) = t, sCM's identity time transformation (Sec. 4.1)."""
        return t

    def t_of_network_time(self, c: jax.Array) -> jax.Array:
        return c

    def sample_t(self, rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """t = arctan(e^tau / sigma_d), tau ~ N(P_mean, P_std^2) (sCM Alg. 1's proposal)."""
        tau = self.p_mean + self.p_std * jax.random.normal(rng, shape)
        return self.t_of_sigma(jnp.exp(tau))

    def timesteps(self, num_steps: int, spacing: str, sigma_min: float, sigma_max: float,
                  rho: float) -> np.ndarray:
        return continuous_timesteps(self, num_steps, spacing, sigma_min, sigma_max, rho)

    def check_t(self, t: jax.Array, batch_size: int | None = None) -> None:
        check_positive_t(t, batch_size, high=math.pi / 2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProcessEntry(Entry):
    """One process of `PROCESSES`: its constructor from a config's `diffusion` section, the
    `diffusion` fields it reads (with their defaults) and their checks, and what it is: whether
    it has a chain's steps (the variational bound and a learned variance are terms of them) and
    whether it is variance-exploding, x = x_0 + sigma n (the frame of CM's losses)."""

    make: Callable[[ml_collections.ConfigDict], NoiseProcess]
    steps: bool = False
    exploding: bool = False


def _ddpm(diffusion: ml_collections.ConfigDict):
    return make_schedule(diffusion.beta_schedule, diffusion.num_timesteps,
                         linear_start=diffusion.linear_start, linear_end=diffusion.linear_end)


def _check_ddpm(c: Checker) -> None:
    c.one_of("diffusion.beta_schedule", BETA_SCHEDULES)
    c.integer("diffusion.num_timesteps", 1)
    start_ok = c.number("diffusion.linear_start", 0.0, 1.0, low_open=True)
    if c.number("diffusion.linear_end", 0.0, 1.0, low_open=True) and start_ok:
        start = c.get("diffusion.linear_start")
        c.check("diffusion.linear_end", lambda v: v > start,
                f"must be above diffusion.linear_start = {start!r}")


def _check_edm(c: Checker) -> None:
    c.number("diffusion.p_mean", -math.inf, math.inf)
    c.positive("diffusion.p_std")
    if c.positive("diffusion.sigma_min") and c.positive("diffusion.sigma_max"):
        c.check("diffusion.sigma_max", lambda v: v > c.get("diffusion.sigma_min"),
                f"must be > diffusion.sigma_min = {c.get('diffusion.sigma_min')}")


def _check_flow_matching(c: Checker) -> None:
    c.number("diffusion.logit_mean", -math.inf, math.inf)
    c.positive("diffusion.logit_std")
    c.positive("diffusion.shift")


def _check_trigflow(c: Checker) -> None:
    _check_edm(c)
    c.positive("diffusion.sigma_data")


_VE, _FM = VEProcess(), FlowMatchingProcess()

PROCESSES: dict[str, ProcessEntry] = {
    # DDPM's chain (arXiv 2006.11239 Sec. 4): T steps of a beta schedule. `linear` scales its end
    # points by 1000 / T, `quad`, `sqrt_linear`, `sqrt` and `sigmoid` use them as given,
    # `cosine` has none (`schedules.beta_schedule`).
    "ddpm": ProcessEntry(
        make=_ddpm, steps=True, check=_check_ddpm,
        fields={"diffusion.beta_schedule": "linear", "diffusion.num_timesteps": 1000,
                "diffusion.linear_start": LINEAR_START, "diffusion.linear_end": LINEAR_END}),
    # EDM (arXiv 2206.00364 Table 1): sigma in [sigma_min, sigma_max], ln sigma ~ N(P_mean, P_std).
    "edm": ProcessEntry(
        make=lambda d: VEProcess(sigma_min=d.sigma_min, sigma_max=d.sigma_max, p_mean=d.p_mean,
                                 p_std=d.p_std),
        exploding=True, check=_check_edm,
        fields={"diffusion.sigma_min": _VE.sigma_min, "diffusion.sigma_max": _VE.sigma_max,
                "diffusion.p_mean": _VE.p_mean, "diffusion.p_std": _VE.p_std}),
    # Rectified flow (arXiv 2209.03003): SD3's logit-normal training times (arXiv 2403.03206
    # Eq. 19) and timestep shift (Sec. 5.3.2).
    "flow_matching": ProcessEntry(
        make=lambda d: FlowMatchingProcess(logit_mean=d.logit_mean, logit_std=d.logit_std,
                                           shift=d.shift),
        check=_check_flow_matching,
        fields={"diffusion.logit_mean": _FM.logit_mean, "diffusion.logit_std": _FM.logit_std,
                "diffusion.shift": _FM.shift}),
    # TrigFlow (sCM arXiv 2410.11081 Sec. 2): EDM's sigma range and lognormal proposal read as
    # t = arctan(sigma / sigma_d); sCM's CIFAR-10 P_mean = -1.0, P_std = 1.4 are set by configs.
    "trigflow": ProcessEntry(
        make=lambda d: TrigFlowProcess(sigma_data=d.sigma_data, sigma_min=d.sigma_min,
                                       sigma_max=d.sigma_max, p_mean=d.p_mean, p_std=d.p_std),
        check=_check_trigflow,
        fields={"diffusion.sigma_data": 0.5, "diffusion.sigma_min": _VE.sigma_min,
                "diffusion.sigma_max": _VE.sigma_max, "diffusion.p_mean": _VE.p_mean,
                "diffusion.p_std": _VE.p_std}),
}


def make_process(diffusion: ml_collections.ConfigDict) -> Any:
    """The noise process a config's `diffusion` section describes."""
    return get(diffusion.process).make(diffusion)


def get(name: str) -> ProcessEntry:
    """The registry entry `name`; a ValueError naming it and the choices if there is none."""
    return lookup(PROCESSES, name, "diffusion process")
