"""Beta schedules and every quantity derived from them, as one immutable pytree.

The forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) is fixed by its
betas (DDPM arXiv 2006.11239 Eq. 2); everything the losses and samplers need follows from them
in closed form (DDPM Eqs. 4, 6, 7). Quantities are computed in float64 with NumPy and stored as
float32 arrays, so a `Schedule` can be passed into jitted code as an ordinary pytree.

Indices are 0-based: array index i holds the quantity for the paper's t = i + 1.

A `Schedule` is also a noise process in continuous time (`jaxdiff.processes.NoiseProcess`):
t in [0, T-1] is real, the log-SNR is linear in t between steps, and the integer steps give
exactly the discrete quantities above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.validation import check_int, concrete_t

BETA_SCHEDULES = ("linear", "sqrt_linear", "quad", "sigmoid", "sqrt", "cosine")
DDIM_SPACINGS = ("uniform", "quad")

# DDPM's end points (arXiv 2006.11239 Sec. 4), latent diffusion's `linear_start`/`linear_end`.
LINEAR_START, LINEAR_END = 1e-4, 0.02
_MAX_BETA = 0.999


def beta_schedule(
    name: str,
    num_timesteps: int,
    *,
    linear_start: float = LINEAR_START,
    linear_end: float = LINEAR_END,
) -> np.ndarray:
    """The betas beta_1..beta_T of a named schedule, float64, shape [T]; clipped at 0.999.

    Each schedule follows the code that introduced it, end points included:

    - `linear`: betas evenly spaced from linear_start to linear_end (DDPM), both end points
      scaled by 1000 / T as improved-diffusion's `get_named_beta_schedule` does (Improved DDPM,
      arXiv 2102.09672), so the total noise stays about the same whatever T is.
    - `sqrt_linear`, `quad`, `sqrt`: latent diffusion's `make_beta_schedule` (arXiv 2112.10752
      code), end points used as given at every T: `sqrt_linear` evenly spaced betas, `quad`
      squares of evenly spaced sqrt(beta), `sqrt` square roots of evenly spaced betas.
    - `sigmoid`: sigmoid(linspace(-6, 6)) rescaled to the end points, unscaled (DDIM's code,
      arXiv 2010.02502).
    - `cosine`: Improved DDPM Eq. 17 with s = 0.008; it has no end points.

    At T = 1000 `linear` and `sqrt_linear` coincide. Latent diffusion names the curves
    differently: its `linear` is our `quad`; its `sqrt_linear`, `sqrt` and `cosine` are ours.
    """
    if name not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; expected one of {BETA_SCHEDULES}")
    T = check_int("num_timesteps", num_timesteps, 1)
    if name == "cosine":
        return cosine_betas(T)
    for key, value in (("linear_start", linear_start), ("linear_end", linear_end)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not (
                0.0 < value < 1.0):
            raise ValueError(f"{key} must be a number in (0, 1), got {value!r}")
    if not linear_start < linear_end:
        raise ValueError(f"linear_start must be below linear_end, got linear_start="
                         f"{linear_start!r} and linear_end={linear_end!r}")
    start, end = float(linear_start), float(linear_end)
    if name == "linear":
        scale = 1000.0 / T
        start, end = scale * start, scale * end
    if name in ("linear", "sqrt_linear"):
        betas = np.linspace(start, end, T, dtype=np.float64)
    elif name == "quad":
        betas = np.linspace(start**0.5, end**0.5, T, dtype=np.float64) ** 2
    elif name == "sigmoid":
        betas = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T))) * (end - start) + start
    else:  # sqrt
        betas = np.linspace(start, end, T, dtype=np.float64) ** 0.5
    return np.minimum(betas, _MAX_BETA)


def cosine_alphas_cumprod(t: np.ndarray, s: float = 0.008) -> np.ndarray:
    """a_bar(t) = f(t) / f(0), f(t) = cos((t + s) / (1 + s) pi / 2)^2, t in [0,1] (IDDPM Eq. 17)."""
    f = np.cos((np.asarray(t, np.float64) + s) / (1.0 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1.0 + s) * math.pi / 2) ** 2
    return f / f0


def cosine_betas(num_timesteps: int, s: float = 0.008) -> np.ndarray:
    """beta_t = min(1 - a_bar(t/T) / a_bar((t-1)/T), 0.999) (Improved DDPM Sec. 3.2)."""
    grid = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    a_bar = cosine_alphas_cumprod(grid, s)
    return np.minimum(1.0 - a_bar[1:] / a_bar[:-1], _MAX_BETA)


@flax.struct.dataclass
class Schedule:
    """The betas and every quantity of DDPM Eqs. 4-7 derived from them, each float32 [T]."""

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    log_snrs: jax.Array  # lambda_t = log(a_bar_t / (1 - a_bar_t)) (VDM arXiv 2107.00630 Eq. 3)

    default_spacing = "uniform"

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    # The noise-process view (`jaxdiff.processes.NoiseProcess`): t real in [0, T-1].

    def _steps(self) -> jax.Array:
        return jnp.arange(self.num_timesteps, dtype=self.log_snrs.dtype)

    def log_snr(self, t: jax.Array) -> jax.Array:
        """lambda(t), linear between the steps (exact at integer t)."""
        return jnp.interp(t, self._steps(), self.log_snrs)

    def alpha(self, t: jax.Array) -> jax.Array:
        """sqrt(a_bar(t)) = sqrt(sigmoid(lambda(t))); the table's own value at an integer step."""
        if jnp.issubdtype(jnp.result_type(t), jnp.integer):
            return self.sqrt_alphas_cumprod[t]
        return jnp.sqrt(jax.nn.sigmoid(self.log_snr(t)))

    def sigma(self, t: jax.Array) -> jax.Array:
        """sqrt(1 - a_bar(t)) = sqrt(sigmoid(-lambda(t))); the table's own at an integer step."""
        if jnp.issubdtype(jnp.result_type(t), jnp.integer):
            return self.sqrt_one_minus_alphas_cumprod[t]
        return jnp.sqrt(jax.nn.sigmoid(-self.log_snr(t)))

    def t_of_log_snr(self, log_snr: jax.Array) -> jax.Array:
        """The inverse of `log_snr` (lambda decreases with t), clipped to [0, T-1]."""
        return jnp.interp(-log_snr, -self.log_snrs, self._steps())

    def t_of_sigma(self, sigma: jax.Array) -> jax.Array:
        """The (real) time of EDM's level sigma = exp(-lambda / 2), clipped to [0, T-1]."""
        return self.t_of_log_snr(-2.0 * jnp.log(sigma))

    def nearest_step(self, t: jax.Array) -> jax.Array:
        """The step whose level is nearest to the level at time t, in sigma (EDM's
        iDDPMPrecond.round_sigma: argmin |sigma - u_j|), the lower one at a tie; int32."""
        top = self.num_timesteps - 1
        lo = jnp.clip(jnp.floor(t), 0, max(top - 1, 0)).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, top)
        sigma, s_lo, s_hi = (jnp.exp(-0.5 * lam) for lam in
                             (self.log_snr(t), self.log_snrs[lo], self.log_snrs[hi]))
        return jnp.where(sigma - s_lo <= s_hi - sigma, lo, hi)

    def round_sigma(self, sigma: jax.Array) -> jax.Array:
        """The level of the step nearest to sigma (`nearest_step`): the levels the network was
        trained on, as EDM's iDDPM sampler rounds its grid."""
        return jnp.exp(-0.5 * self.log_snrs[self.nearest_step(self.t_of_sigma(sigma))])

    @property
    def sigmas(self) -> np.ndarray:
        """EDM's noise level of each step, sqrt(1 / a_bar_t - 1) = exp(-lambda_t / 2), float64
        on the host (from lambda: 1 - a_bar in float32 cancels at small t)."""
        return np.exp(-0.5 * np.asarray(self.log_snrs, np.float64))

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def network_time(self, t: jax.Array) -> jax.Array:
        """The network takes the step index: the nearest step of a real t (`nearest_step`)."""
        return self.nearest_step(t)

    def t_of_network_time(self, c: jax.Array) -> jax.Array:
        return jnp.asarray(c, self.log_snrs.dtype)

    def sample_t(self, rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """t uniform on {0..T-1} (DDPM Alg. 1)."""
        return jax.random.randint(rng, shape, 0, self.num_timesteps)

    def timesteps(self, num_steps: int, spacing: str, sigma_min: float, sigma_max: float,
                  rho: float) -> np.ndarray:
        """Decreasing steps of a grid: `uniform` and `quad` are DDIM's (`spaced_timesteps`),
        `logsnr` DPM-Solver's (`logsnr_timesteps`), both over the whole chain; `karras` (EDM
        Eq. 5 between sigma_min and sigma_max) is rounded to the nearest steps, as EDM's iDDPM
        sampler rounds it (`round_sigma`), so that the integrated level is the network's own."""
        if spacing == "karras":
            from jaxdiff.processes import karras_sigmas  # processes imports this module

            sigma = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
            return np.asarray(self.nearest_step(self.t_of_sigma(jnp.asarray(sigma))), np.float64)
        if spacing == "logsnr":
            return logsnr_timesteps(self, num_steps)[::-1].astype(np.float64)
        return spaced_timesteps(self.num_timesteps, num_steps, spacing)[::-1].astype(np.float64)

    def check_t(self, t: jax.Array, batch_size: int | None = None) -> None:
        """Integer step indices in [0, T-1], shaped [batch] or ()."""
        check_timesteps(t, self.num_timesteps, batch_size)


def check_timesteps(t: jax.Array, num_timesteps: int, batch_size: int | None = None) -> None:
    """ValueError for a t of the wrong shape, or (when t is concrete) outside [0, T-1]."""
    t = concrete_t(t, batch_size)
    if t is None:
        return
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"t must hold integer step indices, got dtype {t.dtype}")
    bad = t[(t < 0) | (t >= num_timesteps)]
    if bad.size:
        raise ValueError(f"t must lie in [0, {num_timesteps - 1}] (T={num_timesteps}), "
                         f"got {bad[:4].tolist()}")


def logsnr_timesteps(schedule: Schedule, num_steps: int) -> np.ndarray:
    """Increasing steps (last = T-1) spacing lambda evenly between lambda(T-1) and lambda(0),
    rounded to the nearest step: DPM-Solver's grid (arXiv 2206.00927) on a discrete chain."""
    T = schedule.num_timesteps
    num_steps = check_int("num_steps", num_steps, 1)
    if num_steps > T:
        raise ValueError(f"num_steps must lie in [1, T={T}], got {num_steps}")
    lam = np.asarray(schedule.log_snrs, np.float64)  # decreasing in t
    grid = np.linspace(lam[0], lam[-1], num_steps)
    steps = np.searchsorted(-lam, -grid)  # first t with lambda(t) <= grid point
    below = np.clip(steps - 1, 0, T - 1)
    steps = np.clip(steps, 0, T - 1)
    steps = np.where(np.abs(lam[below] - grid) < np.abs(lam[steps] - grid), below, steps)
    steps[-1] = T - 1
    ramp = np.arange(num_steps)
    # Rounding can merge neighbours: push them apart, keeping room for the ones above.
    steps = np.maximum.accumulate(steps - ramp) + ramp
    return np.minimum(steps, T - num_steps + ramp)


def schedule_from_betas(betas: np.ndarray | Sequence[float]) -> Schedule:
    """Every derived quantity of DDPM Eqs. 4 and 7, computed in float64 from the betas."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas <= 1)):
        bad = betas[~((betas > 0) & (betas <= 1))]
        raise ValueError(f"betas must lie in (0, 1], got values such as {bad[:3].tolist()}")
    alphas = 1.0 - betas
    a_bar = np.cumprod(alphas)
    a_bar_prev = np.append(1.0, a_bar[:-1])
    posterior_variance = betas * (1.0 - a_bar_prev) / (1.0 - a_bar)
    # beta_tilde_1 = 0: the log is clipped to beta_tilde_2, as DDPM's code does.
    first = posterior_variance[1] if betas.size > 1 else betas[0]
    posterior_log_variance_clipped = np.log(np.append(first, posterior_variance[1:]))
    quantities = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=a_bar,
        alphas_cumprod_prev=a_bar_prev,
        sqrt_alphas_cumprod=np.sqrt(a_bar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - a_bar),
        log_one_minus_alphas_cumprod=np.log(1.0 - a_bar),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / a_bar),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / a_bar - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(a_bar_prev) / (1.0 - a_bar),
        posterior_mean_coef2=(1.0 - a_bar_prev) * np.sqrt(alphas) / (1.0 - a_bar),
        log_snrs=np.log(a_bar) - np.log1p(-a_bar),
    )
    return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in quantities.items()})


def make_schedule(
    name: str,
    num_timesteps: int,
    *,
    linear_start: float = LINEAR_START,
    linear_end: float = LINEAR_END,
) -> Schedule:
    """The `Schedule` of a named beta schedule with T steps (end points as in `beta_schedule`)."""
    return schedule_from_betas(beta_schedule(name, num_timesteps, linear_start=linear_start,
                                             linear_end=linear_end))


def spaced_timesteps(num_timesteps: int, num_steps: int, spacing: str = "uniform") -> np.ndarray:
    """An increasing subsequence tau of {0..T-1} of length S (DDIM Sec. 4.2, App. D.2).

    `uniform` takes every T/S-th step; `quad` spaces sqrt(tau) evenly, as DDIM does for CIFAR-10.
    The last step T-1 is always kept, so sampling starts from the prior.
    """
    if spacing not in DDIM_SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {DDIM_SPACINGS}")
    num_timesteps = check_int("num_timesteps", num_timesteps, 1)
    num_steps = check_int("num_steps", num_steps, 1)
    if num_steps > num_timesteps:
        raise ValueError(f"num_steps must lie in [1, T={num_timesteps}], got {num_steps}")
    if spacing == "uniform":
        grid = np.linspace(0, num_timesteps - 1, num_steps)
    else:
        grid = np.linspace(0, np.sqrt(num_timesteps - 1), num_steps) ** 2
    steps = np.floor(grid).astype(np.int64)
    steps[-1] = num_timesteps - 1
    # Rounding can merge neighbours at the start of the quadratic grid: push them apart.
    ramp = np.arange(num_steps)
    return np.maximum.accumulate(steps - ramp) + ramp


def respace(schedule: Schedule, timesteps: np.ndarray | Sequence[int]) -> Schedule:
    """The schedule of tau: beta'_i = 1 - a_bar_{tau_i} / a_bar_{tau_{i-1}} (IDDPM Sec. 4)."""
    timesteps = np.asarray(timesteps)
    T = schedule.num_timesteps
    if timesteps.ndim != 1 or timesteps.size < 1:
        raise ValueError(f"timesteps must be a non-empty 1-D array, got shape {timesteps.shape}")
    if not np.issubdtype(timesteps.dtype, np.integer):
        raise ValueError(f"timesteps must be integers, got dtype {timesteps.dtype}")
    if np.any(np.diff(timesteps) <= 0) or timesteps[0] < 0 or timesteps[-1] >= T:
        raise ValueError(f"timesteps must be strictly increasing within [0, {T - 1}], "
                         f"got {timesteps.tolist()[:8]}...")
    a_bar = np.cumprod(1.0 - np.asarray(schedule.betas, dtype=np.float64))[timesteps]
    return schedule_from_betas(1.0 - a_bar / np.append(1.0, a_bar[:-1]))


def extract(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """values[t], shaped [batch, 1, ..., 1] to broadcast against an array of rank `ndim`."""
    out = values[t]
    return out.reshape(out.shape + (1,) * (ndim - out.ndim))
