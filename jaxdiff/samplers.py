"""Samplers: the step mathematics of every method and its registry, `SAMPLERS`.

Every method is an entry of `SAMPLERS`: a table builder, a step `(ctx, carry, row) -> (carry,
(x, pred_x0))`, the frame it integrates in, its default step count and spacing, and the options
it takes with their defaults and checks. Tables are computed once on the host in float64 from a
grid of noise levels, so the number of steps is only the scan length: the request layer
(`jaxdiff.sampling`) jits the whole sampler once per static configuration, and it never
recompiles for new keys, weights, scales, eta or grids.

A grid is a decreasing list of EDM noise levels sigma_i = sigma / alpha (sampling ends at
sigma = 0), with the process time t_i of each, built by the process itself
(`NoiseProcess.timesteps`: a chain's own steps, or levels rounded to them). Every model is
evaluated through the one denoiser (`jaxdiff.denoiser.predict`), so every method samples every
model. Frames: "vp" methods move x = alpha x_0 + sigma eps with alpha^2 = 1 / (1 + sigma^2) and
start from N(0, I); "ve" methods move x = x_0 + sigma eps and start from sigma_0 N(0, I).

Methods: `ddpm` (DDPM arXiv 2006.11239 Alg. 2, any variance type, full or respaced chain),
`ddim` (DDIM arXiv 2010.02502 Eq. 12 with eta), `dpm_solver++` (DPM-Solver++(2M), arXiv
2211.01095 Alg. 2), `heun` and `euler` (EDM arXiv 2206.00364 Alg. 2, with churn),
`euler_ancestral` (k-diffusion's ancestral Euler), `consistency` (consistency models arXiv
2303.01469 Alg. 1) and `ddim_inversion` (the DDIM ODE run forward, x_0 -> x_T, through
`jaxdiff.ddim_invert`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import guidance
from jaxdiff.denoiser import Prediction, broadcast_level
from jaxdiff.diffusion import p_variance, q_posterior_mean_variance
from jaxdiff.processes import SPACINGS, NoiseProcess, noise_level
from jaxdiff.registry import MISSING, Checker, Entry, names
from jaxdiff.schedules import Schedule, schedule_from_betas
from jaxdiff.validation import check_int, check_scale

# EDM's sampling range (Sec. 5); a model's own range clips it.
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0


# ----------------------------------------------------------------------------------------------
# Grids of noise levels (host, float64)


class Grid(NamedTuple):
    """Noise levels from noise to data: EDM's sigma and the process's time t of each, with
    a_bar = 1 / (1 + sigma^2), the variance-preserving frame's signal fraction."""

    sigma: np.ndarray
    t: np.ndarray

    @property
    def a_bar(self) -> np.ndarray:
        return 1.0 / (1.0 + self.sigma**2)


def _sigma_range(process: NoiseProcess, sigma_min: float | None, sigma_max: float | None
                 ) -> tuple[float, float]:
    """The sampling range: EDM's [0.002, 80] clipped to the model's, or the one given (checked)."""
    low, high = process.sigma_min, process.sigma_max
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if value is not None and not low * (1 - 1e-6) <= value <= high * (1 + 1e-6):
            raise ValueError(f"{name}={value} lies outside the model's noise levels "
                             f"[{low:.6g}, {high:.6g}]")
    sigma_min = max(EDM_SIGMA_MIN, low) if sigma_min is None else float(sigma_min)
    sigma_max = min(EDM_SIGMA_MAX, high) if sigma_max is None else float(sigma_max)
    if not sigma_min < sigma_max:
        raise ValueError(f"sigma_min={sigma_min} must be < sigma_max={sigma_max}")
    return sigma_min, sigma_max


def grid_of_times(process: NoiseProcess, t) -> Grid:
    """The grid at the process's times t (float64: the process is evaluated with x64 on)."""
    with jax.enable_x64(True):
        t = jnp.asarray(t, jnp.float64)
        return Grid(np.asarray(noise_level(process, t)), np.asarray(t))


def levels_grid(process: NoiseProcess, sigma) -> Grid:
    """The grid at levels sigma, each rounded to the model's own (`round_sigma`)."""
    with jax.enable_x64(True):
        sigma = process.round_sigma(jnp.asarray(sigma, jnp.float64))
        return Grid(np.asarray(sigma), np.asarray(process.t_of_sigma(sigma)))


def make_grid(process: NoiseProcess, num_steps: int, spacing: str, *, rho: float = 7.0,
              sigma_min: float | None = None, sigma_max: float | None = None) -> Grid:
    """The noise levels of a sampler with num_steps steps, from noise to data: the process's own
    grid of the spacing (`NoiseProcess.timesteps`) between sigma_min and sigma_max (default EDM's
    [0.002, 80] clipped to the model's range; a chain's step spacings take its whole chain)."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    low, high = _sigma_range(process, sigma_min, sigma_max)
    with jax.enable_x64(True):
        times = process.timesteps(num_steps, spacing, low, high, rho)
    return grid_of_times(process, times)


def _level(sigma: np.ndarray, frame: str) -> dict[str, np.ndarray]:
    """What the denoiser needs at levels sigma: the level and the factor from the sampler's
    frame to EDM's (x_edm = x * frame_scale)."""
    scale = np.sqrt(1.0 + sigma**2) if frame == "vp" else np.ones_like(sigma)
    return {"sigma": sigma, "frame_scale": scale}


# ----------------------------------------------------------------------------------------------
# Step functions and their tables


class StepContext(NamedTuple):
    """What a step needs besides its carry and table row (closures over params and labels)."""

    denoise: Callable[[jax.Array, dict], Prediction]  # (x in the sampler's frame, level)
    classifier_grad: Callable[[jax.Array, dict], jax.Array] | None  # ddpm's mean guidance
    classifier_scale: jax.Array
    noise: Callable[[jax.Array], jax.Array]  # scan step number -> per-sample N(0, I)
    chain: Schedule | None  # ddpm: the (respaced) chain the table's `index` points into
    model_var_type: str
    fixed_point_iterations: int = 0  # ddim_inversion only


class Carry(NamedTuple):
    x: jax.Array
    pred_x0: jax.Array  # the previous step's estimate (DPM-Solver++'s multistep memory)
    step: jax.Array


def euler_step(denoise: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
               sigma: jax.Array, sigma_next: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x', x0_hat): one Euler step of dx/dsigma = (x - D(x, sigma)) / sigma from sigma to
    sigma_next (EDM Alg. 1 without the correction; CM Eq. 3). sigma: () or [B]."""
    x0 = denoise(x, sigma)
    d = (x - x0) / broadcast_level(sigma, x)
    return x + broadcast_level(sigma_next - sigma, x) * d, x0


def heun_step(denoise: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
              sigma: jax.Array, sigma_next: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x', x0_hat): one Heun step of the probability-flow ODE to sigma_next > 0 (EDM Alg. 1;
    the CM code's `heun_solver`)."""
    x0 = denoise(x, sigma)
    h = broadcast_level(sigma_next - sigma, x)
    d = (x - x0) / broadcast_level(sigma, x)
    x_euler = x + h * d
    d_next = (x_euler - denoise(x_euler, sigma_next)) / broadcast_level(sigma_next, x)
    return x + 0.5 * h * (d + d_next), x0


# The ODE steps a consistency-distillation teacher takes (`consistency.cd_loss`).
ODE_STEPS: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {
    "euler": euler_step, "heun": heun_step}


def ddpm_tables(process: NoiseProcess, grid: Grid, options: dict) -> dict:
    """Per step from noise to data: the level and its index in the chain (0 = last step)."""
    del process, options
    return {"at": _level(grid.sigma, "vp"), "index": np.arange(len(grid.sigma))[::-1]}


def ddpm_step(ctx: StepContext, carry: Carry, row: dict):
    """x_{t-1} = mu_theta(x_t, t) + Sigma^{1/2} z, no noise at the last step (DDPM Alg. 2)."""
    x = carry.x
    pred = ctx.denoise(x, row["at"])
    index = jnp.full(x.shape[:1], row["index"])
    mean, _, _ = q_posterior_mean_variance(ctx.chain, pred.x0, x, index)
    variance, log_variance = p_variance(ctx.chain, index, pred.var_out, ctx.model_var_type,
                                        x.ndim)
    if ctx.classifier_grad is not None:
        grad = ctx.classifier_grad(x, row["at"])
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
    return {"at": _level(grid.sigma, "vp"), "alphas_cumprod_prev": a_prev, "sigma": sigma}


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
    return {"at": _level(grid.sigma, "vp"), "ratio": ratio, "coef": coef,
            "correction": correction}


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
    up = grid.sigma[::-1]  # increasing noise
    leave = up[np.append(0, np.arange(len(up) - 1))]
    a_bar = 1.0 / (1.0 + up**2)
    return {"at": _level(leave, "vp"), "next": _level(up, "vp"),
            "alphas_cumprod": np.append(1.0, a_bar[:-1]), "alphas_cumprod_next": a_bar}


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
    (1 + gamma) sigma rounded to the model's levels (EDM's `round_sigma`), the noise added
    sqrt(sigma_hat^2 - sigma^2) S_noise, the next level, and whether the step is corrected
    (Heun, except into sigma = 0)."""
    sigma, n = grid.sigma, len(grid.sigma)
    inside = (sigma >= options["s_min"]) & (sigma <= options["s_max"])
    gamma = np.where(inside, min(options["s_churn"] / n, math.sqrt(2.0) - 1.0), 0.0)
    sigma_hat = levels_grid(process, sigma * (1.0 + gamma)).sigma if options["s_churn"] \
        else sigma
    sigma_next = np.append(sigma[1:], 0.0)
    return {"sigma_hat": sigma_hat, "sigma_next": sigma_next,
            "second": (sigma_next > 0) & second_order,
            "noise_scale": np.sqrt(np.maximum(sigma_hat**2 - sigma**2, 0.0)) * options["s_noise"]}


def karras_step(ctx: StepContext, carry: Carry, row: dict):
    """EDM Alg. 2: churn, then a Heun step (`second`) or an Euler step."""
    x_hat = carry.x + row["noise_scale"] * ctx.noise(carry.step)

    def denoise(x, sigma):
        return ctx.denoise(x, {"sigma": sigma, "frame_scale": 1.0}).x0

    args = (denoise, x_hat, row["sigma_hat"], row["sigma_next"])
    x_next, x0 = jax.lax.cond(row["second"], lambda: heun_step(*args),
                              lambda: euler_step(*args))
    return Carry(x_next, x0, carry.step + 1), (carry.x, x0)


def euler_ancestral_tables(process: NoiseProcess, grid: Grid, options: dict) -> dict:
    """sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2)), sigma_down =
    sqrt(sigma'^2 - sigma_up^2) for each step sigma -> sigma' (k-diffusion's get_ancestral_step)."""
    del process
    sigma = grid.sigma
    sigma_next = np.append(sigma[1:], 0.0)
    up = np.minimum(sigma_next, options["eta"] * np.sqrt(
        sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return {"at": _level(sigma, "ve"), "sigma": sigma,
            "sigma_down": np.sqrt(sigma_next**2 - up**2), "noise_scale": up * options["s_noise"]}


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
    return {"at": _level(grid.sigma, "ve"),
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


def _check_spacing(name: str, value) -> str | None:
    if value is None:
        return None
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


class Option(NamedTuple):
    """An option a method takes: the type of its config field (`sampling.<name>`, None there
    meaning the method's own default) and its check, which names the bad value."""

    type: type
    check: Callable[[str, Any], Any]


# Every option any method takes.
OPTIONS: dict[str, Option] = {
    "eta": Option(float, _check_unit),
    "spacing": Option(str, _check_spacing),
    "rho": Option(float, _check_optional_sigma),
    "sigma_min": Option(float, _check_optional_sigma),
    "sigma_max": Option(float, _check_optional_sigma),
    "s_churn": Option(float, check_scale),
    "s_min": Option(float, check_scale),
    "s_max": Option(float, lambda name, v: math.inf if v == math.inf else check_scale(name, v)),
    "s_noise": Option(float, check_scale),
    "sigmas": Option(tuple, _check_sigmas),
}
_KARRAS_OPTIONS = {"spacing": "karras", "rho": 7.0, "sigma_min": None, "sigma_max": None}
_CHURN_OPTIONS = {"s_churn": 0.0, "s_min": 0.0, "s_max": math.inf, "s_noise": 1.0}


def _check_options(c: Checker) -> None:
    """The `sampling.<option>` fields of the selected method (None: its own default), and None
    in every field that only other methods take (a value there would be ignored)."""
    method = c.get("sampling.method")
    taken = SAMPLERS[method].options
    for name, option in OPTIONS.items():
        value = c.get(f"sampling.{name}")
        if value is MISSING or value is None:
            continue
        if name not in taken:
            c.fail(f"sampling.{name}", f"method {method!r} takes no {name} (None here; "
                   f"{names(SAMPLERS, lambda s, n=name: n in s.options)} take it)")
            continue
        try:
            option.check(name, value)
        except (TypeError, ValueError) as e:
            c.fail(f"sampling.{name}", str(e))


@dataclasses.dataclass(frozen=True)
class Sampler(Entry):
    """One method: its tables, step, frame, default step count, options and guidance form.

    Its config fields are `sampling.<option>` for each option it takes (None: the default
    here). A `spacing` option whose default is None takes the process's own (`default_spacing`:
    a chain's uniform steps, EDM's Karras levels, flow matching's uniform times)."""

    tables: Callable[[NoiseProcess, Grid, dict], dict]
    step: Callable[[StepContext, Carry, dict], tuple]
    frame: str  # "vp": x = alpha x_0 + sigma eps from N(0, I); "ve": x = x_0 + sigma eps
    kind: str  # "ode" (deterministic), "sde" (draws noise), "consistency" (CM Alg. 1)
    order: int  # the global error's order in the step size (an ODE method's)
    options: Mapping[str, Any]  # the options it takes and their defaults
    default_steps: int | None  # None: a chain's every step (1000 levels otherwise)
    classifier_guidance: str  # "mean" (ADM Alg. 1) or "eps" (ADM Alg. 2)
    uses_grid_options: bool = False  # rho, sigma_min and sigma_max shape the grid
    walks_chain: bool = False  # steps along the Markov chain through the grid (`chain`)

    def __post_init__(self):
        object.__setattr__(self, "fields", {
            f"sampling.{name}": ml_collections.config_dict.placeholder(OPTIONS[name].type)
            for name in self.options})
        object.__setattr__(self, "check", _check_options)

    def levels(self, process: NoiseProcess, options: dict) -> tuple[float, ...] | None:
        """The grid's levels where they are given (`sigmas`), or a consistency sampler's one
        level sigma_max (CM Alg. 1); None: the spacing's grid."""
        if options.get("sigmas") is not None:
            return options["sigmas"]
        return (process.sigma_max,) if self.kind == "consistency" else None

    def num_steps(self, process: NoiseProcess, options: dict, num_steps: int | None) -> int:
        sigmas = self.levels(process, options)
        if sigmas is not None:
            if num_steps is not None and num_steps != len(sigmas):
                raise ValueError(f"num_steps={num_steps} but sigmas holds {len(sigmas)} levels; "
                                 "give one or the other")
            return len(sigmas)
        if num_steps is not None:
            return check_int("num_steps", num_steps, 1)
        return self.default_steps or process.num_timesteps or 1000


SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(ddpm_tables, ddpm_step, "vp", "sde", 1, {"spacing": None}, None, "mean",
                    walks_chain=True),
    "ddim": Sampler(ddim_tables, ddim_step, "vp", "ode", 1,
                    {"eta": 0.0, "spacing": None, "sigmas": None}, 50, "eps"),
    "dpm_solver++": Sampler(dpm_solver_pp_tables, dpm_solver_pp_step, "vp", "ode", 2,
                            {"spacing": "logsnr"}, 20, "eps"),
    "heun": Sampler(functools.partial(_karras_tables, second_order=True), karras_step, "ve",
                    "ode", 2, {**_KARRAS_OPTIONS, **_CHURN_OPTIONS}, 18, "eps", True),
    "euler": Sampler(functools.partial(_karras_tables, second_order=False), karras_step, "ve",
                     "ode", 1, {**_KARRAS_OPTIONS, **_CHURN_OPTIONS}, 50, "eps", True),
    "euler_ancestral": Sampler(euler_ancestral_tables, euler_ancestral_step, "ve", "sde",
                               1, {**_KARRAS_OPTIONS, "eta": 1.0, "s_noise": 1.0}, 50, "eps", True),
    "consistency": Sampler(consistency_tables, consistency_step, "ve", "consistency",
                           1, {"sigmas": None}, None, "eps"),
}
# Reached through `ddim_invert` only (it encodes, it does not sample).
INVERSION = Sampler(ddim_inversion_tables, ddim_inversion_step, "vp", "ode", 1,
                    {"spacing": None},
                    50, "eps")


def get(method: str) -> Sampler:
    """The registry entry `method`; a ValueError naming it and the choices if there is none."""
    if method == "ddim_inversion":
        return INVERSION
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampling method {method!r}; expected one of "
                         f"{tuple(SAMPLERS)}")
    return SAMPLERS[method]


def resolve_options(method: str, process: NoiseProcess, given: dict) -> dict:
    """The method's options: defaults (a spacing of None: the process's own), overridden by
    `given` (each checked); an option the method does not take is refused."""
    sampler = get(method)
    unknown = sorted(set(given) - set(sampler.options))
    if unknown:
        raise ValueError(f"method {method!r} takes no option {unknown[0]!r}; its options are "
                         f"{tuple(sampler.options)}")
    options = dict(sampler.options)
    for name, value in given.items():
        options[name] = OPTIONS[name].check(name, value)
    if "spacing" in options and options["spacing"] is None:
        options["spacing"] = process.default_spacing
    if "rho" in options and options["rho"] is None:
        options["rho"] = _KARRAS_OPTIONS["rho"]
    if options.get("s_max", 1.0) < options.get("s_min", 0.0):
        raise ValueError(f"s_max={options['s_max']} must be >= s_min={options['s_min']}")
    return options


def build_grid(process: NoiseProcess, method: str, num_steps: int, options: dict) -> Grid:
    """The grid of a method with resolved options on a process."""
    sampler = get(method)
    levels = sampler.levels(process, options)
    if levels is not None:
        sigmas = np.asarray(levels, np.float64)
        low, high = process.sigma_min, process.sigma_max
        outside = sigmas[(sigmas < low * (1 - 1e-6)) | (sigmas > high * (1 + 1e-6))]
        if outside.size:
            raise ValueError(f"sigmas {outside.tolist()} lie outside the model's noise levels "
                             f"[{low:.6g}, {high:.6g}]")
        return levels_grid(process, sigmas)
    kwargs = {k: options[k] for k in ("rho", "sigma_min", "sigma_max")} \
        if sampler.uses_grid_options else {}
    return make_grid(process, num_steps, options["spacing"], **kwargs)


def check_grid(process: NoiseProcess, method: str, num_steps: int | None = None,
               **options) -> None:
    """ValueError unless `method` with these options builds a grid on `process` (no compiling)."""
    options = resolve_options(method, process, options)
    build_grid(process, method, get(method).num_steps(process, options, num_steps), options)


def chain(grid: Grid) -> Schedule:
    """The Markov chain through the grid's levels: beta'_i = 1 - a_bar_i / a_bar_{i-1} (IDDPM
    Sec. 4's respacing; a chain's every step gives back its own betas)."""
    a_bar = grid.a_bar[::-1]
    return schedule_from_betas(1.0 - a_bar / np.append(1.0, a_bar[:-1]))
