"""Samplers: a registry of methods, one `lax.scan` driver, and `jaxdiff.sample`.

Every method is an entry of `SAMPLERS`: a table builder, a step `(ctx, carry, row) -> (carry,
(x, pred_x0))`, the frame it integrates in, its default step count and spacing, and the options
it takes with their defaults and checks. Tables are computed once on the host in float64 from a
grid of noise levels, so the number of steps is only the scan length: the whole sampler is jitted
once per static configuration and never recompiles for new keys, weights, scales, eta or grids.

A grid is a decreasing list of EDM noise levels sigma_i = sigma / alpha (sampling ends at
sigma = 0) with the process time t_i of each. Every model is evaluated through one denoiser
(`StepContext.denoise`): the sampler's x is rescaled to the model's own process (x = s (x_0 +
sigma eps), EDM arXiv 2206.00364 Eq. 7), the parameterisation turns the output into x_0 and eps,
and a level that is not one of a discrete model's steps feeds it the nearest step (EDM's iDDPM
wrapper). So every method samples every model: a DDPM eps-model with `heun`, an EDM model with
`ddim`. Frames: "vp" methods move x = alpha x_0 + sigma eps with alpha^2 = 1 / (1 + sigma^2) and
start from N(0, I); "ve" methods move x = x_0 + sigma eps and start from sigma_0 N(0, I).

Methods: `ddpm` (DDPM arXiv 2006.11239 Alg. 2, any variance type, full or respaced chain),
`ddim` (DDIM arXiv 2010.02502 Eq. 12 with eta), `dpm_solver++` (DPM-Solver++(2M), arXiv
2211.01095 Alg. 2), `heun` and `euler` (EDM Alg. 2, with churn), `euler_ancestral`
(k-diffusion's ancestral Euler), `consistency` (consistency models arXiv 2303.01469 Alg. 1) and
`ddim_inversion` (the DDIM ODE run forward, x_0 -> x_T, through `ddim_invert`).

Batches are sharded over all local devices along axis 0. num_samples need not divide by the device
count: the batch is padded to a multiple of it and the padding is dropped. With JAX's partitionable
threefry (`jax_threefry_partitionable`, the default) row i of a draw depends only on the key and i,
so sample i does not depend on num_samples, padding or the number of devices (a test checks it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff import guidance, parameterisations
from jaxdiff.bundle import DiffusionModel
from jaxdiff.compiler import inference_jit
from jaxdiff.diffusion import (
    DEFAULT_MODEL_VAR_TYPE,
    check_model_var_type,
    p_variance,
    q_posterior_mean_variance,
    split_model_output,
)
from jaxdiff.models import network_param_shapes, param_shapes
from jaxdiff.models.classifier import Classifier
from jaxdiff.processes import NoiseProcess, VEProcess, karras_sigmas
from jaxdiff.schedules import Schedule, schedule_from_betas, spaced_timesteps
from jaxdiff.validation import check_int, check_scale

# `uniform` and `quad` pick steps of a discrete chain (DDIM Sec. 4.2); `logsnr` spaces log-SNR
# evenly (DPM-Solver arXiv 2206.00927); `karras` is EDM Eq. 5 with exponent rho.
SPACINGS = ("uniform", "quad", "logsnr", "karras")
_STEP_SPACINGS = ("uniform", "quad")
# EDM's sampling range (Sec. 5); a discrete model's own range clips it.
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0


# ----------------------------------------------------------------------------------------------
# Grids of noise levels (host, float64)


class Grid(NamedTuple):
    """Noise levels from noise to data: EDM's sigma, a_bar = 1 / (1 + sigma^2), what the network
    is fed there, and the scale s of the model's own process (x_model = s (x_0 + sigma eps))."""

    sigma: np.ndarray
    a_bar: np.ndarray
    network_time: np.ndarray
    model_scale: np.ndarray


def sampling_timesteps(schedule: Schedule, num_steps: int, spacing: str = "uniform") -> np.ndarray:
    """Increasing original timesteps tau (last = T-1) of a sampler with num_steps network calls.

    `uniform` and `quad` are DDIM's spacings (`schedules.spaced_timesteps`); `logsnr` spaces
    lambda = log(alpha / sigma) evenly between lambda(T-1) and lambda(0), DPM-Solver's choice
    (arXiv 2206.00927), rounded to the nearest integer timestep.
    """
    T = schedule.num_timesteps
    if spacing != "logsnr":
        return spaced_timesteps(T, num_steps, spacing)
    if not 1 <= num_steps <= T:
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


def _sigma_range(process: NoiseProcess, sigma_min: float | None, sigma_max: float | None
                 ) -> tuple[float, float]:
    """The sampling range: EDM's [0.002, 80] clipped to the model's, or the one given (checked)."""
    low, high = process.sigma_min, process.sigma_max
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if value is not None and not low <= value <= high * (1 + 1e-6):
            raise ValueError(f"{name}={value} lies outside the model's noise levels "
                             f"[{low:.6g}, {high:.6g}]")
    sigma_min = max(EDM_SIGMA_MIN, low) if sigma_min is None else float(sigma_min)
    sigma_max = min(EDM_SIGMA_MAX, high) if sigma_max is None else float(sigma_max)
    if not sigma_min < sigma_max:
        raise ValueError(f"sigma_min={sigma_min} must be < sigma_max={sigma_max}")
    return sigma_min, sigma_max


def _levels_grid(process: NoiseProcess, sigma: np.ndarray) -> Grid:
    """The grid of arbitrary levels sigma (a discrete model is fed its nearest steps)."""
    sigma = np.asarray(sigma, np.float64)
    return Grid(sigma, 1.0 / (1.0 + sigma**2),
                np.asarray(process.network_time(process.t_of_sigma(sigma))), process.scale(sigma))


def make_grid(process: NoiseProcess, num_steps: int, spacing: str, *, rho: float = 7.0,
              sigma_min: float | None = None, sigma_max: float | None = None) -> Grid:
    """The noise levels of a sampler with num_steps steps, from noise to data.

    A discrete schedule's `uniform`, `quad` and `logsnr` grids are its own steps
    (`sampling_timesteps`); `karras` and a continuous process's `logsnr` space levels between
    sigma_min and sigma_max (default EDM's [0.002, 80] clipped to the model's range).
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    if process.discrete and spacing != "karras":
        tau = sampling_timesteps(process, num_steps, spacing)[::-1]
        a_bar = np.asarray(process.alphas_cumprod, np.float64)[tau]
        return Grid(process.sigmas[tau], a_bar, np.asarray(process.network_time(tau)),
                    np.sqrt(a_bar))
    if spacing in _STEP_SPACINGS:
        raise ValueError(f"spacing {spacing!r} picks steps of a discrete schedule; this process "
                         f"is continuous: use one of ('logsnr', 'karras')")
    low, high = _sigma_range(process, sigma_min, sigma_max)
    if spacing == "karras":
        sigma = karras_sigmas(num_steps, low, high, rho)
    else:
        sigma = np.exp(np.linspace(np.log(high), np.log(low), num_steps))
    return _levels_grid(process, sigma)


def _level(grid: Grid, frame: str, index=slice(None)) -> dict[str, np.ndarray]:
    """What the denoiser needs at grid levels `index`: the model's time input, the factor from
    the sampler's frame to the model's, and the model frame's alpha and sigma."""
    frame_scale = np.sqrt(grid.a_bar) if frame == "vp" else np.ones_like(grid.sigma)
    s = grid.model_scale[index]
    return {"t": grid.network_time[index], "scale": s / frame_scale[index], "alpha": s,
            "sigma": s * grid.sigma[index]}


# ----------------------------------------------------------------------------------------------
# Step functions and their tables


class Prediction(NamedTuple):
    x0: jax.Array
    eps: jax.Array
    var_out: jax.Array | None  # the variance channels of a learned-variance output


class StepContext(NamedTuple):
    """What a step needs besides its carry and table row (closures over params and labels)."""

    denoise: Callable[[jax.Array, dict], Prediction]  # (x in the sampler's frame, level)
    classifier_grad: Callable[[jax.Array, jax.Array], jax.Array] | None  # ddpm's mean guidance
    classifier_scale: jax.Array
    noise: Callable[[jax.Array], jax.Array]  # scan step number -> per-sample N(0, I)
    chain: Schedule | None  # ddpm: the (respaced) chain the table's `index` points into
    model_var_type: str
    fixed_point_iterations: int = 0  # ddim_inversion only


class Carry(NamedTuple):
    x: jax.Array
    pred_x0: jax.Array  # the previous step's estimate (DPM-Solver++'s multistep memory)
    step: jax.Array


def ddpm_tables(process: NoiseProcess, grid: Grid, options: dict) -> dict:
    """Per step from noise to data: the level and its index in the chain (0 = last step)."""
    del process, options
    return {"at": _level(grid, "vp"), "index": np.arange(len(grid.sigma))[::-1]}


def ddpm_step(ctx: StepContext, carry: Carry, row: dict):
    """x_{t-1} = mu_theta(x_t, t) + Sigma^{1/2} z, no noise at the last step (DDPM Alg. 2)."""
    x = carry.x
    pred = ctx.denoise(x, row["at"])
    index = jnp.full(x.shape[:1], row["index"])
    mean, _, _ = q_posterior_mean_variance(ctx.chain, pred.x0, x, index)
    variance, log_variance = p_variance(ctx.chain, index, pred.var_out, ctx.model_var_type,
                                        x.ndim)
    if ctx.classifier_grad is not None:
        grad = ctx.classifier_grad(x * row["at"]["scale"], jnp.full(x.shape[:1], row["at"]["t"]))
        mean = guidance.condition_mean(mean, variance, grad, ctx.classifier_scale)
    nonzero = (row["index"] > 0).astype(x.dtype)
    x_prev = mean + nonzero * jnp.exp(0.5 * log_variance) * ctx.noise(carry.step)
    return Carry(x_prev, pred.x0, carry.step + 1), (x, pred.x0)


def ddim_tables(process: NoiseProcess, grid: Grid, options: dict) -> dict:
    """a_bar_prev and sigma_t = eta sqrt((1-a_prev)/(1-a)) sqrt(1 - a/a_prev) (DDIM Eq. 16)."""
    del process
    a_prev = np.append(grid.a_bar[1:], 1.0)
    sigma = options["eta"] * np.sqrt((1.0 - a_prev) / (1.0 - grid.a_bar)
                                     * (1.0 - grid.a_bar / a_prev))
    return {"at": _level(grid, "vp"), "alphas_cumprod_prev": a_prev, "sigma": sigma}


def ddim_step(ctx: StepContext, carry: Carry, row: dict):
    """x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z (DDIM Eq. 12)."""
    pred = ctx.denoise(carry.x, row["at"])
    a_prev, sigma = row["alphas_cumprod_prev"], row["sigma"]
    direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0)) * pred.eps
    x_prev = jnp.sqrt(a_prev) * pred.x0 + direction + sigma * ctx.noise(carry.step)
    return Carry(x_prev, pred.x0, carry.step + 1), (carry.x, pred.x0)


def dpm_solver_pp_tables(process: NoiseProcess, grid: Grid, options: dict) -> dict:
    """Coefficients of DPM-Solver++(2M) (arXiv 2211.01095 Alg. 2) from the noisiest level to data.

    Step i evaluates D_i = x0_theta(x_{t_i}, t_i) and moves to t_{i+1}:
    x_{t_{i+1}} = (sigma_{i+1} / sigma_i) x_{t_i} + alpha_{i+1} (1 - e^{-h}) D,
    D = D_i + (D_i - D_{i-1}) / (2 r), h = lambda_{i+1} - lambda_i, r = h_{i-1} / h (lambda =
    log(alpha / sigma), half the log-SNR). The first step is first order (no D_{-1}), and so are
    the last two (DPM-Solver's `lower_order_final`): the last goes to sigma = 0 (h = inf,
    x_0 = D_i), and the one before it into t = 0 has a tiny r on a uniform time grid (0.19 at 20
    steps), where the 2M extrapolation overshoots.
    """
    del process, options
    a_bar = grid.a_bar
    alpha, sigma = np.sqrt(a_bar), np.sqrt(1.0 - a_bar)
    lam = 0.5 * (np.log(a_bar) - np.log1p(-a_bar))
    num_steps = len(a_bar)
    ratio, coef, correction = np.zeros(num_steps), np.ones(num_steps), np.zeros(num_steps)
    h = np.diff(lam)
    ratio[:-1] = sigma[1:] / sigma[:-1]
    coef[:-1] = -alpha[1:] * np.expm1(-h)
    correction[1:-2] = 0.5 * h[1:-1] / h[:-2]  # 1 / (2 r)
    return {"at": _level(grid, "vp"), "ratio": ratio, "coef": coef, "correction": correction}


def dpm_solver_pp_step(ctx: StepContext, carry: Carry, row: dict):
    """One DPM-Solver++(2M) step in data prediction (arXiv 2211.01095 Alg. 2; see the tables)."""
    pred = ctx.denoise(carry.x, row["at"])
    data = pred.x0 + row["correction"] * (pred.x0 - carry.pred_x0)
    x_next = row["ratio"] * carry.x + row["coef"] * data
    return Carry(x_next, pred.x0, carry.step + 1), (carry.x, pred.x0)


def ddim_inversion_tables(process: NoiseProcess, grid: Grid, options: dict) -> dict:
    """The DDIM ODE steps run backwards: clean (a_bar = 1) -> tau_0 -> ... -> tau_{S-1} = T-1.

    The step into level i first evaluates eps at the level it leaves (i - 1; level 0 for clean
    data), then optionally at the level it reaches (`next`, fixed-point refinement).
    """
    del process, options
    up = Grid(*(np.asarray(a)[::-1] for a in grid))  # increasing noise
    leave = np.append(0, np.arange(len(up.sigma) - 1))
    return {"at": _level(up, "vp", leave), "next": _level(up, "vp"),
            "alphas_cumprod": np.append(1.0, up.a_bar[:-1]), "alphas_cumprod_next": up.a_bar}


def ddim_inversion_step(ctx: StepContext, carry: Carry, row: dict):
    """x_next = sqrt(a_next) x0_hat + sqrt(1 - a_next) eps_hat: DDIM Eq. 12 (eta = 0) forward.

    Plain inversion takes eps where the step starts, so a round trip is off by O(h^2) per step.
    Each fixed-point iteration re-evaluates eps at the arrival point x_next, whose DDIM decoding
    step then returns to x exactly once the iteration converges (fixed-point inversion, AIDI).
    """
    x = carry.x
    a, a_next = row["alphas_cumprod"], row["alphas_cumprod_next"]

    def step_with(eps):
        pred_x0 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
        return jnp.sqrt(a_next) * pred_x0 + jnp.sqrt(1.0 - a_next) * eps, pred_x0

    x_next, pred_x0 = step_with(ctx.denoise(x, row["at"]).eps)
    if ctx.fixed_point_iterations:
        x_next, pred_x0 = jax.lax.fori_loop(
            0, ctx.fixed_point_iterations,
            lambda _, state: step_with(ctx.denoise(state[0], row["next"]).eps), (x_next, pred_x0))
    return Carry(x_next, pred_x0, carry.step + 1), (x, pred_x0)


def _karras_tables(process: NoiseProcess, grid: Grid, options: dict, second_order: bool
                   ) -> dict:
    """EDM Alg. 2's rows: gamma_i = min(S_churn / N, sqrt(2) - 1) on [S_min, S_max], sigma_hat =
    (1 + gamma) sigma, the noise added sqrt(sigma_hat^2 - sigma^2) S_noise, the next level, and
    whether the step is corrected (Heun, except into sigma = 0)."""
    sigma, n = grid.sigma, len(grid.sigma)
    inside = (sigma >= options["s_min"]) & (sigma <= options["s_max"])
    gamma = np.where(inside, min(options["s_churn"] / n, math.sqrt(2.0) - 1.0), 0.0)
    sigma_hat = sigma * (1.0 + gamma)
    sigma_next = np.append(sigma[1:], 0.0)
    hat = grid if options["s_churn"] == 0 else _levels_grid(process, sigma_hat)
    following = _levels_grid(process, np.append(sigma[1:], sigma[-1]))  # unused after the last
    return {"at": _level(hat, "ve"), "next": _level(following, "ve"), "sigma_hat": sigma_hat,
            "sigma_next": sigma_next, "second": (sigma_next > 0) & second_order,
            "noise_scale": np.sqrt(sigma_hat**2 - sigma**2) * options["s_noise"]}


def karras_step(ctx: StepContext, carry: Carry, row: dict):
    """EDM Alg. 2: churn, an Euler step, and (where `second`) Heun's correction."""
    x_hat = carry.x + row["noise_scale"] * ctx.noise(carry.step)
    x0 = ctx.denoise(x_hat, row["at"]).x0
    d = (x_hat - x0) / row["sigma_hat"]
    h = row["sigma_next"] - row["sigma_hat"]
    x_next = x_hat + h * d

    def correct():
        d_next = (x_next - ctx.denoise(x_next, row["next"]).x0) / row["sigma_next"]
        return x_hat + 0.5 * h * (d + d_next)

    x_next = jax.lax.cond(row["second"], correct, lambda: x_next)
    return Carry(x_next, x0, carry.step + 1), (carry.x, x0)


def euler_ancestral_tables(process: NoiseProcess, grid: Grid, options: dict) -> dict:
    """sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2)), sigma_down =
    sqrt(sigma'^2 - sigma_up^2) for each step sigma -> sigma' (k-diffusion's get_ancestral_step)."""
    del process
    sigma = grid.sigma
    sigma_next = np.append(sigma[1:], 0.0)
    up = np.minimum(sigma_next, options["eta"] * np.sqrt(
        sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return {"at": _level(grid, "ve"), "sigma": sigma, "sigma_down": np.sqrt(sigma_next**2 - up**2),
            "noise_scale": up * options["s_noise"]}


def euler_ancestral_step(ctx: StepContext, carry: Carry, row: dict):
    """An Euler step to sigma_down, then fresh noise of std sigma_up (ancestral sampling)."""
    x0 = ctx.denoise(carry.x, row["at"]).x0
    d = (carry.x - x0) / row["sigma"]
    x_next = carry.x + (row["sigma_down"] - row["sigma"]) * d \
        + row["noise_scale"] * ctx.noise(carry.step)
    return Carry(x_next, x0, carry.step + 1), (carry.x, x0)


def consistency_tables(process: NoiseProcess, grid: Grid, options: dict) -> dict:
    """Alg. 1 of consistency models: the first level from the prior, then noise of std
    sqrt(sigma_n^2 - sigma_min^2) added to each estimate (sigma_min: the process's boundary)."""
    del options
    return {"at": _level(grid, "ve"),
            "noise_scale": np.sqrt(np.maximum(grid.sigma**2 - process.sigma_min**2, 0.0))}


def consistency_step(ctx: StepContext, carry: Carry, row: dict):
    """x = f(x_hat, sigma_n), x_hat = sigma_0 z at the first step, x + noise after it (Alg. 1)."""
    x_hat = jnp.where(carry.step == 0, carry.x,
                      carry.x + row["noise_scale"] * ctx.noise(carry.step))
    x0 = ctx.denoise(x_hat, row["at"]).x0
    return Carry(x0, x0, carry.step + 1), (x_hat, x0)


# ----------------------------------------------------------------------------------------------
# The registry


def _check_unit(name: str, value) -> float:
    value = check_scale(name, value)
    if value > 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def _check_optional_sigma(name: str, value) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not 0.0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _check_spacing(name: str, value) -> str:
    if value not in SPACINGS:
        raise ValueError(f"unknown {name} {value!r}; expected one of {SPACINGS}")
    return value


def _check_sigmas(name: str, value) -> tuple[float, ...] | None:
    if value is None:
        return None
    sigmas = np.asarray(value, np.float64).reshape(-1)
    if sigmas.size < 1 or not np.all(np.isfinite(sigmas) & (sigmas > 0)) \
            or np.any(np.diff(sigmas) >= 0):
        raise ValueError(f"{name} must be a non-empty, strictly decreasing sequence of noise "
                         f"levels > 0, got {value!r}")
    return tuple(sigmas.tolist())


# Every option any method takes: its check (which names the bad value).
_OPTION_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "eta": _check_unit,
    "spacing": _check_spacing,
    "rho": lambda name, v: _check_optional_sigma(name, v),
    "sigma_min": _check_optional_sigma,
    "sigma_max": _check_optional_sigma,
    "s_churn": check_scale,
    "s_min": check_scale,
    "s_max": lambda name, v: float("inf") if v == float("inf") else check_scale(name, v),
    "s_noise": check_scale,
    "sigmas": _check_sigmas,
}
_KARRAS_OPTIONS = {"spacing": "karras", "rho": 7.0, "sigma_min": None, "sigma_max": None}
_CHURN_OPTIONS = {"s_churn": 0.0, "s_min": 0.0, "s_max": float("inf"), "s_noise": 1.0}


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One method: its tables, step, frame, default step count, options and guidance form."""

    tables: Callable[[NoiseProcess, Grid, dict], dict]
    step: Callable[[StepContext, Carry, dict], tuple]
    frame: str  # "vp": x = alpha x_0 + sigma eps from N(0, I); "ve": x = x_0 + sigma eps
    options: Mapping[str, Any]  # the options it takes and their defaults
    default_steps: int | None  # None: a discrete schedule's whole chain (1000 levels otherwise)
    classifier_guidance: str  # "mean" (ADM Alg. 1) or "eps" (ADM Alg. 2)
    uses_grid_options: bool = False  # rho, sigma_min and sigma_max shape the grid

    def num_steps(self, process: NoiseProcess, options: dict, num_steps: int | None) -> int:
        if "sigmas" in self.options:
            sigmas = options["sigmas"] or (process.sigma_max,)
            if num_steps is not None and num_steps != len(sigmas):
                raise ValueError(f"num_steps={num_steps} but sigmas holds {len(sigmas)} levels; "
                                 "give one or the other")
            return len(sigmas)
        if num_steps is not None:
            return check_int("num_steps", num_steps, 1)
        if self.default_steps is None:
            return process.num_timesteps if process.discrete else 1000
        return self.default_steps


SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(ddpm_tables, ddpm_step, "vp", {"spacing": "uniform"}, None, "mean"),
    "ddim": Sampler(ddim_tables, ddim_step, "vp", {"eta": 0.0, "spacing": "uniform"}, 50, "eps"),
    "dpm_solver++": Sampler(dpm_solver_pp_tables, dpm_solver_pp_step, "vp",
                            {"spacing": "logsnr"}, 20, "eps"),
    "heun": Sampler(functools.partial(_karras_tables, second_order=True), karras_step, "ve",
                    {**_KARRAS_OPTIONS, **_CHURN_OPTIONS}, 18, "eps", True),
    "euler": Sampler(functools.partial(_karras_tables, second_order=False), karras_step, "ve",
                     {**_KARRAS_OPTIONS, **_CHURN_OPTIONS}, 50, "eps", True),
    "euler_ancestral": Sampler(euler_ancestral_tables, euler_ancestral_step, "ve",
                               {**_KARRAS_OPTIONS, "eta": 1.0, "s_noise": 1.0}, 50, "eps", True),
    "consistency": Sampler(consistency_tables, consistency_step, "ve", {"sigmas": None}, None,
                           "eps"),
}
# Reached through `ddim_invert` only (it encodes, it does not sample).
_INVERSION = Sampler(ddim_inversion_tables, ddim_inversion_step, "vp", {"spacing": "uniform"},
                     50, "eps")


def get(method: str) -> Sampler:
    """The registry entry `method`; a ValueError naming it and the choices if there is none."""
    if method not in SAMPLERS:
        hint = "; encode with jaxdiff.ddim_invert" if method == "ddim_inversion" else ""
        raise ValueError(f"unknown sampling method {method!r}; expected one of "
                         f"{tuple(SAMPLERS)}{hint}")
    return SAMPLERS[method]


def _options(method: str, sampler: Sampler, process: NoiseProcess, given: dict) -> dict:
    """The method's options: defaults, overridden by `given` (each checked); others refused."""
    unknown = sorted(set(given) - set(sampler.options))
    if unknown:
        raise ValueError(f"method {method!r} takes no option {unknown[0]!r}; its options are "
                         f"{tuple(sampler.options)}")
    options = dict(sampler.options)
    if options.get("spacing") in _STEP_SPACINGS and not process.discrete:
        options["spacing"] = "karras"  # a continuous process has no steps to pick
    for name, value in given.items():
        options[name] = _OPTION_CHECKS[name](name, value)
    if options.get("s_max", 1.0) < options.get("s_min", 0.0):
        raise ValueError(f"s_max={options['s_max']} must be >= s_min={options['s_min']}")
    return options


def _grid(process: NoiseProcess, sampler: Sampler, num_steps: int, options: dict) -> Grid:
    if "sigmas" in sampler.options:
        sigmas = np.asarray(options["sigmas"] or (process.sigma_max,), np.float64)
        low, high = process.sigma_min, process.sigma_max
        outside = sigmas[(sigmas < low) | (sigmas > high * (1 + 1e-6))]
        if outside.size:
            raise ValueError(f"sigmas {outside.tolist()} lie outside the model's noise levels "
                             f"[{low:.6g}, {high:.6g}]")
        return _levels_grid(process, sigmas)
    kwargs = {k: options[k] for k in ("rho", "sigma_min", "sigma_max")} \
        if sampler.uses_grid_options else {}
    return make_grid(process, num_steps, options["spacing"], **kwargs)


def check_grid(process: NoiseProcess, method: str, num_steps: int | None = None,
               **options) -> None:
    """ValueError unless `method` with these options builds a grid on `process` (no compiling)."""
    sampler = get(method)
    options = _options(method, sampler, process, options)
    _grid(process, sampler, sampler.num_steps(process, options, num_steps), options)


def _chain(process: NoiseProcess, grid: Grid) -> Schedule:
    """The Markov chain through the grid's levels: beta'_i = 1 - a_bar_i / a_bar_{i-1} (IDDPM
    Sec. 4's respacing); a discrete schedule's whole chain is the schedule itself."""
    if process.discrete and np.array_equal(grid.network_time,
                                           np.arange(process.num_timesteps)[::-1]):
        return process
    a_bar = grid.a_bar[::-1]
    return schedule_from_betas(1.0 - a_bar / np.append(1.0, a_bar[:-1]))


# ----------------------------------------------------------------------------------------------
# The driver: one jitted function per static configuration


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the compiled sampler specialises on (hashable; arrays are passed separately)."""

    method: str
    model: Any  # flax Module or callable(params, x, t, y)
    classifier: Any  # flax Module, callable(params, x, t) or None
    model_output_type: str
    model_var_type: str
    sigma_data: float
    num_classes: int
    shape: tuple[int, ...]
    num_padded: int
    clip_denoised: bool
    cfg: bool
    draw_labels: bool
    has_x_init: bool
    return_trajectory: bool
    sharding: NamedSharding
    fixed_point_iterations: int = 0


def _apply(fn, params, *args):
    """A flax Module's `apply({"params": p}, *args, train=False)` or a plain `fn(params, *args)`."""
    if isinstance(fn, nn.Module):
        return fn.apply({"params": params}, *args, train=False)
    return fn(params, *args)


def _sampler(method: str) -> Sampler:
    return _INVERSION if method == "ddim_inversion" else SAMPLERS[method]


def _predict(network: Callable[[jax.Array, jax.Array], jax.Array],
             param: parameterisations.Parameterisation, x_model: jax.Array, alpha, sigma,
             t: jax.Array, sigma_data: float, model_var_type: str, clip: bool):
    """(x_0, output, variance channels) of network(input, t) at x_model = alpha x_0 + sigma eps
    of the model's own process, x_0 clipped to [-1, 1] when `clip`: the one evaluation every
    sampler and `denoiser` make."""
    raw = network(param.network_input(x_model, alpha, sigma, sigma_data), t)
    out, var_out = split_model_output(raw, model_var_type)
    x0 = param.to_x0(out, x_model, alpha, sigma, sigma_data)
    return (jnp.clip(x0, -1.0, 1.0) if clip else x0), out, var_out


def denoiser(model: DiffusionModel, *, clip_denoised: bool = False
             ) -> Callable[[Any, jax.Array, jax.Array, jax.Array | None], jax.Array]:
    """D(params, x, sigma, y) -> x_0 estimate of any model at x = x_0 + sigma n, sigma [B] traced
    (EDM arXiv 2206.00364 Eq. 7's view of every model as a denoiser; CD's teacher).

    A discrete DDPM model is fed the step nearest to sigma in log sigma and x / sqrt(1 + sigma^2)
    (EDM's iDDPM wrapper, as the samplers do); a continuous one its process's time. `y` (labels
    [B]) is passed to a class-conditional network, None otherwise. `model.params` is not used:
    the weights are the argument, so the function is pure.
    """
    param = parameterisations.get(model.model_output_type)
    process = model.schedule
    if process.discrete:
        log_sigmas = jnp.asarray(np.log(process.sigmas), jnp.float32)

    def denoise(params, x: jax.Array, sigma: jax.Array, y: jax.Array | None = None) -> jax.Array:
        expand = (-1,) + (1,) * (x.ndim - 1)
        if process.discrete:
            # argmin takes the lower step at a tie, as `Schedule.t_of_sigma` does on the host.
            t = jnp.argmin(jnp.abs(jnp.log(sigma)[:, None] - log_sigmas[None]), axis=1)
            alpha = jnp.reshape(1.0 / jnp.sqrt(1.0 + sigma**2), expand)
        else:
            t = sigma
            alpha = jnp.ones((1,) * x.ndim, x.dtype)
        x0, _, _ = _predict(
            lambda x_in, time: _apply(model.model, params, x_in, time,
                                      y if model.num_classes > 0 else None),
            param, alpha * x, alpha, alpha * jnp.reshape(sigma, expand), process.network_time(t),
            model.sigma_data, model.model_var_type, clip_denoised)
        return x0

    return denoise


@inference_jit(static_argnames=("static",))
def _run(static: _Static, params, chain, tables, init_scale, rng, labels, x_init,
         guidance_scale, classifier_params, classifier_scale):
    sampler = _sampler(static.method)
    param = parameterisations.get(static.model_output_type)
    batch_shape = (static.num_padded, *static.shape)
    if rng is not None:  # ddim_invert is deterministic and passes none
        init_key, step_key, label_key = jax.random.split(rng, 3)

    if static.draw_labels:
        labels = jax.lax.with_sharding_constraint(
            jax.random.randint(label_key, batch_shape[:1], 0, static.num_classes), static.sharding)
    y = labels if static.num_classes > 0 else None

    def network(x, t, y):
        return _apply(static.model, params, x, t, y)

    def model_output(x, t):
        if static.cfg:
            return guidance.classifier_free_output(
                network, x, t, y, null_label=static.num_classes, guidance_scale=guidance_scale,
                model_var_type=static.model_var_type)
        return network(x, t, y)

    classifier_grad = None
    if static.classifier is not None:
        def classifier_grad(x, t):
            return guidance.classifier_log_prob_grad(
                lambda x, t: _apply(static.classifier, classifier_params, x, t), x, t, labels)

    def denoise(x, level) -> Prediction:
        """(x_0, eps) of the model at `level` for x in the sampler's frame (ADM Alg. 2 guided)."""
        x_model = x * level["scale"]
        alpha, sigma = level["alpha"], level["sigma"]
        t = jnp.full(x.shape[:1], level["t"])
        x0, out, var_out = _predict(model_output, param, x_model, alpha, sigma, t,
                                    static.sigma_data, static.model_var_type,
                                    static.clip_denoised)
        eps = out if param.outputs_eps and not static.clip_denoised \
            else (x_model - alpha * x0) / sigma
        if classifier_grad is not None and sampler.classifier_guidance == "eps":
            eps = guidance.condition_eps(eps, classifier_grad(x_model, t), classifier_scale, sigma)
            x0 = (x_model - sigma * eps) / alpha
        return Prediction(x0, eps, var_out)

    def noise(step):
        return jax.lax.with_sharding_constraint(
            jax.random.normal(jax.random.fold_in(step_key, step), batch_shape), static.sharding)

    x = x_init if static.has_x_init else jax.random.normal(init_key, batch_shape)
    x = jax.lax.with_sharding_constraint(x * init_scale, static.sharding)

    ctx = StepContext(denoise, classifier_grad if sampler.classifier_guidance == "mean" else None,
                      classifier_scale, noise, chain, static.model_var_type,
                      static.fixed_point_iterations)

    def body(carry, row):
        carry, trajectory = sampler.step(ctx, carry, row)
        return carry, trajectory if static.return_trajectory else None

    carry, trajectory = jax.lax.scan(body, Carry(x, jnp.zeros_like(x), jnp.int32(0)), tables)
    return carry.x, trajectory


@functools.cache
def _batch_sharding(devices: tuple) -> NamedSharding:
    return NamedSharding(Mesh(np.array(devices), ("batch",)), PartitionSpec("batch"))


# ----------------------------------------------------------------------------------------------
# Public API


class _Resolved(NamedTuple):
    params: Any
    model: Any
    process: NoiseProcess
    shape: tuple[int, ...]
    model_output_type: str
    model_var_type: str
    sigma_data: float
    num_classes: int


def _resolve(params, model, schedule, shape, model_output_type, model_var_type, sigma_data,
             num_classes) -> _Resolved:
    """Fields of a DiffusionModel, overridden by whatever is given explicitly."""
    if isinstance(params, (str, bytes)) or hasattr(params, "__fspath__"):
        raise ValueError(f"params={params!r} is a path: load the workdir first, "
                         f"`jaxdiff.sample(jaxdiff.load({str(params)!r}), rng, ...)`")
    if isinstance(params, DiffusionModel):
        bundle = params
        if isinstance(bundle.model, Classifier):
            raise ValueError("this model is a noisy classifier, not a denoiser: it cannot draw "
                             "samples; pass it as `classifier=` to guide a diffusion model")
        resolved = _Resolved(
            bundle.params, bundle.model if model is None else model,
            bundle.schedule if schedule is None else schedule,
            tuple(bundle.image_shape if shape is None else shape),
            model_output_type or bundle.model_output_type,
            model_var_type or bundle.model_var_type,
            bundle.sigma_data if sigma_data is None else sigma_data,
            bundle.num_classes if num_classes is None else num_classes)
    else:
        for name, value in (("model", model), ("schedule", schedule), ("shape", shape)):
            if value is None:
                raise ValueError(f"{name}=None: a raw parameter tree needs explicit model=, "
                                 "schedule= and shape= (or pass a jaxdiff.bundle.DiffusionModel)")
        resolved = _Resolved(params, model, schedule, tuple(shape), model_output_type or "eps",
                             model_var_type or DEFAULT_MODEL_VAR_TYPE,
                             0.5 if sigma_data is None else sigma_data, num_classes or 0)
    parameterisations.get(resolved.model_output_type)
    check_model_var_type(resolved.model_var_type)
    if not isinstance(resolved.process, (Schedule, VEProcess)):
        raise ValueError(f"schedule must be a jaxdiff Schedule or VEProcess, got "
                         f"{type(resolved.process)}")
    check_int("num_classes", resolved.num_classes, 0)
    if not (isinstance(resolved.sigma_data, (int, float)) and resolved.sigma_data > 0):
        raise ValueError(f"sigma_data must be a number > 0, got {resolved.sigma_data!r}")
    if not callable(resolved.model):
        raise ValueError(f"model must be a flax Module or a callable, got {resolved.model!r}")
    if isinstance(resolved.model, nn.Module):
        _check_params(resolved)
    return resolved


def _check_params(res: _Resolved) -> None:
    """A clear error, before compiling, when the weights are not those of this network."""
    expected = network_param_shapes(res.model, res.shape, res.num_classes)
    got = param_shapes(res.params)
    if got == expected:
        return
    missing = sorted(set(expected) - set(got))
    surplus = sorted(set(got) - set(expected))
    wrong = [f"{k}: {got[k]} (expected {expected[k]})" for k in sorted(set(got) & set(expected))
             if got[k] != expected[k]]
    problems = [f"missing {missing[:3]}" if missing else "",
                f"unexpected {surplus[:3]}" if surplus else "",
                f"wrong shapes {wrong[:3]}" if wrong else ""]
    raise ValueError("params do not fit the model (a checkpoint of another architecture?): "
                     + "; ".join(p for p in problems if p)
                     + f" ({len(missing)} missing, {len(surplus)} unexpected, {len(wrong)} "
                     "wrongly shaped in all)")


def _check_labels(labels, num_samples: int, res: _Resolved, classifier, classifier_params,
                  guidance_scale: float) -> np.ndarray | None:
    """Labels as int32 [num_samples]; classes 0..num_classes-1, num_classes = the null label."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (num_samples,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({num_samples},), "
                         f"got dtype {labels.dtype} and shape {labels.shape}")
    if res.num_classes == 0 and classifier is None:
        raise ValueError("labels given to an unconditional model (num_classes=0) "
                         "without a classifier")
    if res.num_classes > 0:
        high = res.num_classes - 1 if guidance_scale > 0 else res.num_classes
        bad = labels[(labels < 0) | (labels > high)]
        if bad.size:
            raise ValueError(f"labels must lie in [0, {high}] (num_classes={res.num_classes}), "
                             f"got {bad[0]}")
    if classifier is not None:
        logits = jax.eval_shape(lambda: _apply(classifier, classifier_params,
                                               jnp.zeros((1, *res.shape)), jnp.zeros((1,), int)))
        bad = labels[(labels < 0) | (labels >= logits.shape[-1])]
        if bad.size:
            raise ValueError(f"labels must lie in [0, {logits.shape[-1] - 1}] for a classifier "
                             f"with {logits.shape[-1]} classes, got {bad[0]}")
    return labels.astype(np.int32)


def _pad(array: np.ndarray | jax.Array | None, num_padded: int):
    if array is None or array.shape[0] == num_padded:
        return array
    pad = [(0, num_padded - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
    return np.pad(np.asarray(array), pad)


def _resolve_classifier(classifier, classifier_params, process: NoiseProcess):
    """A loaded classifier workdir stands for its network and weights; a denoiser is refused."""
    if isinstance(classifier, DiffusionModel):
        if not isinstance(classifier.model, Classifier):
            raise ValueError("classifier= got a diffusion model (a denoiser); pass the bundle of "
                             "a noisy classifier, e.g. jaxdiff.load(<classifier workdir>)")
        if classifier_params is None:
            classifier_params = classifier.params
        classifier = classifier.model
    if classifier is not None and not process.discrete:
        raise ValueError("classifier guidance needs a model of a discrete DDPM schedule (the "
                         "noisy classifier is trained on its steps)")
    return classifier, classifier_params


def _check_rng(rng) -> None:
    """A PRNG key: a typed key array or raw uint32 [2] key data."""
    if isinstance(rng, jax.Array | np.ndarray) and (
            jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
            or (rng.dtype == np.uint32 and rng.shape == (2,))):
        return
    raise ValueError(f"rng must be a JAX PRNG key (jax.random.key(seed) or "
                     f"jax.random.PRNGKey(seed)), got {rng!r}")


class _Plan(NamedTuple):
    """A checked request: what `_run` is called with, less the key."""

    static: _Static
    params: Any
    chain: Schedule | None
    tables: dict
    init_scale: float
    labels: np.ndarray | None
    x_init: Any
    num_samples: int
    guidance_scale: float
    classifier_params: Any
    classifier_scale: float


def _prepare(params, method, *, num_samples=None, num_steps=None, labels=None,
             guidance_scale=0.0, classifier=None, classifier_params=None, classifier_scale=1.0,
             clip_denoised=True, return_trajectory=False, model=None, schedule=None, shape=None,
             model_output_type=None, model_var_type=None, num_classes=None, sigma_data=None,
             x_T=None, fixed_point_iterations=0, **options) -> _Plan:
    """Every check of `sample` (and `ddim_invert`), and the tables; compiles nothing."""
    sampler = _INVERSION if method == "ddim_inversion" else get(method)
    res = _resolve(params, model, schedule, shape, model_output_type, model_var_type,
                   sigma_data, num_classes)
    options = _options(method, sampler, res.process, options)
    classifier, classifier_params = _resolve_classifier(classifier, classifier_params,
                                                        res.process)
    if x_T is not None:
        x_T_shape = tuple(np.shape(x_T))
        if len(x_T_shape) != len(res.shape) + 1 or x_T_shape[1:] != res.shape:
            raise ValueError(f"x_T must have shape [B, *{res.shape}], got {x_T_shape}")
        if num_samples is not None and num_samples != x_T_shape[0]:
            raise ValueError(f"num_samples={num_samples} but x_T holds {x_T_shape[0]} samples")
        num_samples = x_T_shape[0]
    num_samples = check_int("num_samples", 16 if num_samples is None else num_samples, 1)
    num_steps = sampler.num_steps(res.process, options, num_steps)
    guidance_scale = check_scale("guidance_scale", guidance_scale)
    classifier_scale = check_scale("classifier_scale", classifier_scale)
    fixed_point_iterations = check_int("fixed_point_iterations", fixed_point_iterations, 0)
    if guidance_scale > 0 and labels is None:
        raise ValueError(f"guidance_scale={guidance_scale} (classifier-free guidance) needs labels")
    if guidance_scale > 0 and res.num_classes == 0:
        raise ValueError(f"guidance_scale={guidance_scale}: classifier-free guidance needs a "
                         "class-conditional model, got num_classes=0")
    if classifier is not None and (classifier_params is None or labels is None):
        raise ValueError("classifier guidance needs classifier_params and labels, got "
                         f"classifier_params={'None' if classifier_params is None else 'set'}, "
                         f"labels={'None' if labels is None else 'set'}")
    if method == "ddim_inversion" and res.num_classes > 0 and labels is None:
        raise ValueError(f"a class-conditional model (num_classes={res.num_classes}) needs labels "
                         "to invert (use num_classes as the null label)")
    labels = _check_labels(labels, num_samples, res, classifier, classifier_params, guidance_scale)

    grid = _grid(res.process, sampler, num_steps, options)
    tables = sampler.tables(res.process, grid, options)
    devices = tuple(jax.local_devices())
    static = _Static(
        method=method, model=res.model, classifier=classifier,
        model_output_type=res.model_output_type, model_var_type=res.model_var_type,
        sigma_data=float(res.sigma_data), num_classes=res.num_classes, shape=res.shape,
        num_padded=-(-num_samples // len(devices)) * len(devices),
        clip_denoised=bool(clip_denoised), cfg=guidance_scale > 0,
        draw_labels=labels is None and res.num_classes > 0,
        has_x_init=x_T is not None, return_trajectory=bool(return_trajectory),
        sharding=_batch_sharding(devices), fixed_point_iterations=fixed_point_iterations)
    return _Plan(static, res.params, _chain(res.process, grid) if method == "ddpm" else None,
                 tables, float(grid.sigma[0]) if sampler.frame == "ve" else 1.0, labels, x_T,
                 num_samples, guidance_scale, classifier_params, classifier_scale)


def _table_dtype(v: np.ndarray):
    v = np.asarray(v)
    if np.issubdtype(v.dtype, np.floating):
        return v.astype(np.float32)
    return v.astype(np.int32) if np.issubdtype(v.dtype, np.integer) else v


def _execute(plan: _Plan, rng):
    static = plan.static
    replicated = NamedSharding(static.sharding.mesh, PartitionSpec())
    params, chain, classifier_params = jax.device_put(
        (plan.params, plan.chain, plan.classifier_params), replicated)
    tables = jax.tree.map(_table_dtype, plan.tables)
    labels = None if plan.labels is None else jax.device_put(
        _pad(plan.labels, static.num_padded), static.sharding)
    x_init = plan.x_init
    if x_init is not None:
        x_init = jax.device_put(_pad(jnp.asarray(x_init, jnp.float32), static.num_padded),
                                static.sharding)
    x, trajectory = _run(static, params, chain, tables, jnp.float32(plan.init_scale), rng,
                         labels, x_init, jnp.float32(plan.guidance_scale), classifier_params,
                         jnp.float32(plan.classifier_scale))
    n = plan.num_samples
    if trajectory is None:
        return x[:n]
    xt, pred_x0 = trajectory
    return x[:n], {"xt": xt[:, :n], "pred_x0": pred_x0[:, :n]}


def check_sample_args(params, method: str = "ddim", **kwargs) -> None:
    """Every check `sample(params, rng, method, **kwargs)` makes, without sampling or compiling:
    a ValueError naming the first bad value, None when the request is good."""
    get(method)
    _prepare(params, method, **kwargs)


def sample(
    params,
    rng: jax.Array,
    method: str = "ddim",
    *,
    num_samples: int | None = None,
    num_steps: int | None = None,
    labels=None,
    guidance_scale: float = 0.0,
    classifier=None,
    classifier_params=None,
    classifier_scale: float = 1.0,
    clip_denoised: bool = True,
    return_trajectory: bool = False,
    model=None,
    schedule: Schedule | VEProcess | None = None,
    shape: tuple[int, ...] | None = None,
    model_output_type: str | None = None,
    model_var_type: str | None = None,
    num_classes: int | None = None,
    sigma_data: float | None = None,
    x_T=None,
    **options,
):
    """Draw samples from p_theta(x_0) (or p_theta(x_0 | y)) with one jitted `lax.scan`.

    params: a `DiffusionModel` (e.g. `jaxdiff.load(workdir)`), or a raw parameter tree together
    with `model=` (a flax Module called `apply({"params": p}, x, t, y, train=False)` or a
    callable `model(p, x, t, y)`), `schedule=` (a `Schedule` or a `VEProcess`) and `shape=` (one
    example's shape); for a raw tree the output type defaults to "eps", the variance type to
    "fixed_large", sigma_data to 0.5 and num_classes to 0. Explicit keywords override a bundle.
    method: a name in `SAMPLERS` — "ddpm" (default steps: the whole chain), "ddim" (50),
    "dpm_solver++" (20), "heun" (18 steps, 35 network calls), "euler" (50), "euler_ancestral"
    (50), "consistency" (one step per level of `sigmas`). `**options` are the method's own
    (`SAMPLERS[method].options`, with their defaults): `eta` (ddim in [0, 1]; euler_ancestral),
    `spacing` ("uniform", "quad", "logsnr", "karras"), `rho`, `sigma_min`, `sigma_max` (the
    Karras grid), `s_churn`, `s_min`, `s_max`, `s_noise` (EDM's stochastic sampler), `sigmas`
    (consistency: the levels of Alg. 1, default (sigma_max,)). An option a method does not take
    is an error.
    labels: int [num_samples] for a class-conditional model (default: uniform random classes;
    num_classes itself is the null label) and/or the target classes of classifier guidance.
    guidance_scale w > 0: classifier-free guidance. classifier (a flax Module with
    classifier_params, or a loaded classifier workdir) and classifier_scale s: classifier
    guidance, ADM Alg. 1 for ddpm, Alg. 2 for the others.
    num_samples: default 16, or x_T's batch when x_T (the starting N(0, I) draw, e.g. from
    `ddim_invert`) is given. Returns float32 samples [num_samples, *shape] (in [-1, 1] when
    clip_denoised), and with return_trajectory also {"xt", "pred_x0"}, each [num_steps,
    num_samples, *shape]: the input of every step (in the method's frame) and the denoised
    estimate made there. The batch is sharded over `jax.local_devices()` (padded to a multiple of
    their number); sample i depends only on (rng, i), not on num_samples or the device count.
    """
    get(method)  # "ddim_inversion" is reached through `ddim_invert` only
    plan = _prepare(params, method, num_samples=num_samples, num_steps=num_steps, labels=labels,
                    guidance_scale=guidance_scale, classifier=classifier,
                    classifier_params=classifier_params, classifier_scale=classifier_scale,
                    clip_denoised=clip_denoised, return_trajectory=return_trajectory,
                    model=model, schedule=schedule, shape=shape,
                    model_output_type=model_output_type, model_var_type=model_var_type,
                    num_classes=num_classes, sigma_data=sigma_data, x_T=x_T, **options)
    _check_rng(rng)
    return _execute(plan, rng)


def ddim_invert(
    params,
    x0,
    *,
    num_steps: int = 50,
    spacing: str = "uniform",
    labels=None,
    guidance_scale: float = 0.0,
    fixed_point_iterations: int = 0,
    return_trajectory: bool = False,
    model=None,
    schedule: Schedule | VEProcess | None = None,
    model_output_type: str | None = None,
    model_var_type: str | None = None,
    num_classes: int | None = None,
    sigma_data: float | None = None,
):
    """Encode x_0 -> x_T along the deterministic DDIM ODE (DDIM Sec. 4.3, eta = 0, Eq. 12 forward).

    Decoding with `sample(params, rng, "ddim", x_T=x_T, num_steps=..., spacing=..., eta=0,
    clip_denoised=False)` and the same steps returns x_0 up to the ODE's discretisation error
    (about 1e-2 for T = 1000 even at 1000 steps); each of `fixed_point_iterations` (one extra
    network call per step) makes every step the exact inverse of its decoding step, shrinking
    the round-trip error geometrically. x0_hat is never clipped here: that would break
    invertibility. A conditional model needs `labels` (num_classes = null label = unconditional).
    Returns x_T [B, *shape] (with return_trajectory also the trajectory, as `sample`).
    """
    x0 = jnp.asarray(x0, jnp.float32)
    shape = None if isinstance(params, DiffusionModel) else x0.shape[1:]
    if x0.ndim < 1:
        raise ValueError(f"x0 must be batched, [B, ...], got shape {x0.shape}")
    plan = _prepare(params, "ddim_inversion", num_samples=x0.shape[0], num_steps=num_steps,
                    labels=labels, guidance_scale=guidance_scale, clip_denoised=False,
                    return_trajectory=return_trajectory, model=model, schedule=schedule,
                    shape=shape, model_output_type=model_output_type,
                    model_var_type=model_var_type, num_classes=num_classes,
                    sigma_data=sigma_data, x_T=x0, fixed_point_iterations=fixed_point_iterations,
                    spacing=spacing)
    return _execute(plan, None)


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] -> uint8 in [0, 255] (round to nearest), as a NumPy array for saving."""
    images = np.asarray(images, np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
