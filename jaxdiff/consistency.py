"""Consistency models: one-step generation by distillation (CD) and by training alone (CT, iCT).

Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models" (arXiv 2303.01469; "CM" below) and
Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models" (arXiv 2310.14189;
"iCT"). Everything lives in EDM's variance-exploding frame: x = x0 + sigma n, and the
probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma of a denoiser D (CM Eq. 3 with
t = sigma). A consistency function f(x, sigma) maps every point of an ODE trajectory to the
trajectory's end at sigma_min.

Noise levels are indexed 0-based in ascending order: sigmas[i] is the paper's sigma_{i+1}, so
the paper's adjacent pair (sigma_n, sigma_{n+1}), n = 1..N-1, is (sigmas[i], sigmas[i + 1]),
i = 0..N-2, and the losses return that i. The number of levels N is traced (the curricula
change it during training without recompiling): levels are computed from their index, never
gathered from a table.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxdiff import parameterisations, processes
from jaxdiff.models.lpips import LPIPS, load_params
from jaxdiff.parameterisations import CONSISTENCY_SIGMA_MIN
from jaxdiff.processes import VEProcess
from jaxdiff.registry import Checker, Entry, is_number, lookup
from jaxdiff.samplers import ODE_STEPS

SIGMA_MIN = CONSISTENCY_SIGMA_MIN
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5
RHO = 7.0
VE = VEProcess(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)  # CM's process: EDM's, x = x0 + sigma n

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]  # D(x, sigma [B]) -> x0_hat
Student = Callable[..., jax.Array]  # f(params, x, sigma [B]) -> x0_hat
Distance = Callable[[jax.Array, jax.Array], jax.Array]  # d(x, y) -> [B]


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    """v [B] shaped to broadcast over x [B, ...]."""
    return jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))


# --- Parameterisation -------------------------------------------------------------------------


def make_student(network: Callable[[object, jax.Array, jax.Array], jax.Array], *,
                 sigma_data: float = SIGMA_DATA, process: VEProcess = VE) -> Student:
    """f_theta(params, x, sigma) for a raw network(params, inputs, time [B]) -> F: the
    "consistency" parameterisation (CM Appendix C) fed c_in x and
    `process.network_time(sigma)`, as training and `jaxdiff.sample` evaluate one."""
    param = parameterisations.get("consistency")

    def student(params, x: jax.Array, sigma: jax.Array) -> jax.Array:
        s, one = _bcast(sigma, x), jnp.ones((), x.dtype)
        out = network(params, param.network_input(x, one, s, sigma_data),
                      process.network_time(sigma))
        return param.to_x0(out, x, one, s, sigma_data)

    return student


# --- Noise levels and curricula ----------------------------------------------------------------


def karras_sigma(index: jax.Array, *, num_scales: jax.Array | int,
                 sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                 rho: float = RHO) -> jax.Array:
    """CM's levels (App. C): `processes.karras_sigma` with CM's range and rho as defaults."""
    return processes.karras_sigma(index, num_scales=num_scales, sigma_min=sigma_min,
                                  sigma_max=sigma_max, rho=rho)


def ct_num_scales(step: jax.Array | int, *, total_steps: int, start_scales: int = 2,
                  end_scales: int = 150) -> jax.Array:
    """N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1 (CM Appendix C, CT's curriculum).

    The official code clamps the ceil term at 1 before adding 1 (so N >= 2 even for s0 = 1);
    for s0 >= 2 that never binds. Defaults are CM's CIFAR-10 CT (s0 = 2, s1 = 150).
    """
    k = jnp.asarray(step, jnp.float32)
    inner = jnp.sqrt(k / total_steps * ((end_scales + 1) ** 2 - start_scales**2)
                     + start_scales**2)
    return jnp.maximum(jnp.ceil(inner - 1.0), 1.0).astype(jnp.int32) + 1


def ct_target_ema(step: jax.Array | int, *, total_steps: int, start_scales: int = 2,
                  end_scales: int = 150, start_ema: float = 0.9) -> jax.Array:
    """mu(k) = exp(s0 log(mu0) / (N(k) - 1)), the target EMA rate of CT (CM Appendix C, code form).

    The paper's text divides by N(k); both official codebases (`jcm/losses.py`
    `get_ema_scales_fn`, `cm/script_util.py` `create_ema_and_scales_fn`) divide by N(k) - 1,
    which is what produced the paper's results, so that form is implemented: mu(0) = mu0^2 for
    s0 = 2 (0.81 for mu0 = 0.9), where the text gives mu0.
    """
    n = ct_num_scales(step, total_steps=total_steps, start_scales=start_scales,
                      end_scales=end_scales)
    return jnp.exp(start_scales * math.log(start_ema) / (n - 1).astype(jnp.float32))


def ict_num_scales(step: jax.Array | int, *, total_steps: int, start_scales: int = 10,
                   end_scales: int = 1280) -> jax.Array:
    """N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1))
    (iCT Sec. 3.4, the exponential curriculum: N doubles from 11 to 1281 in equal stages)."""
    stages = math.log2(math.floor(end_scales / start_scales)) + 1
    stage_steps = math.floor(total_steps / stages)
    if stage_steps < 1:
        raise ValueError(f"total_steps={total_steps} is fewer than the curriculum's {stages:g} "
                         f"stages (s0={start_scales}, s1={end_scales})")
    stage = jnp.asarray(step, jnp.int32) // stage_steps
    return jnp.minimum(start_scales * 2.0 ** stage, end_scales).astype(jnp.int32) + 1


def ict_sample_index(rng: jax.Array, shape: tuple[int, ...], *, num_scales: jax.Array | int,
                     p_mean: float = -1.1, p_std: float = 2.0, sigma_min: float = SIGMA_MIN,
                     sigma_max: float = SIGMA_MAX, rho: float = RHO) -> jax.Array:
    """i with p(sigma_i) ~ erf((log sigma_{i+1} - P_mean) / (sqrt2 P_std)) - erf((log sigma_i -
    P_mean) / (sqrt2 P_std)) (iCT Sec. 3.5, the discretised lognormal).

    That is the probability that log sigma ~ N(P_mean, P_std^2), conditioned on [sigma_min,
    sigma_max], falls between the two levels, so a truncated normal is drawn and its bin found by
    inverting `karras_sigma`; this works for a traced N, where a categorical over N - 1 weights
    would need N static.
    """
    lo, hi = (math.log(sigma_min) - p_mean) / p_std, (math.log(sigma_max) - p_mean) / p_std
    sigma = jnp.exp(p_mean + p_std * jax.random.truncated_normal(rng, lo, hi, shape))
    r_lo, r_hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    n = jnp.asarray(num_scales, jnp.float32)
    i = jnp.floor((sigma ** (1.0 / rho) - r_lo) / (r_hi - r_lo) * (n - 1.0))
    return jnp.clip(i, 0, n - 2).astype(jnp.int32)


def ema_update(target_params, params, *, mu: jax.Array | float):
    """theta- <- stopgrad(mu theta- + (1 - mu) theta) (CM Eq. 8, Algorithms 2-3). CD uses a fixed
    mu (CM Appendix C), CT `ct_target_ema`, iCT none (`ict_loss` takes theta- = theta)."""
    return jax.tree_util.tree_map(
        lambda t, p: jax.lax.stop_gradient(mu * t + (1.0 - mu) * p), target_params, params)


# --- Distances ---------------------------------------------------------------------------------


def _flat(x: jax.Array) -> jax.Array:
    return jnp.reshape(x, (x.shape[0], -1))


def l2_distance(x: jax.Array, y: jax.Array) -> jax.Array:
    """d(x, y) = ||x - y||_2^2 / D per example (CM Sec. 3; the CM code's mean over dimensions)."""
    return jnp.mean(_flat(x - y) ** 2, axis=-1)


def l1_distance(x: jax.Array, y: jax.Array) -> jax.Array:
    """d(x, y) = ||x - y||_1 / D per example (CM Sec. 3; the CM code's mean over dimensions)."""
    return jnp.mean(jnp.abs(_flat(x - y)), axis=-1)


def pseudo_huber_distance(x: jax.Array, y: jax.Array, *, c: float | None = None) -> jax.Array:
    """d(x, y) = sqrt(||x - y||_2^2 + c^2) - c over the whole example (iCT Sec. 3.3), c = 0.00054
    sqrt(D) unless given (iCT Sec. 3.3: 0.03 for 32x32x3 CIFAR-10)."""
    flat = _flat(x - y)
    if c is None:
        c = 0.00054 * math.sqrt(flat.shape[-1])
    return jnp.sqrt(jnp.sum(flat**2, axis=-1) + c**2) - c


def lpips_distance(x: jax.Array, y: jax.Array, *, params, resize_to: int | None = 224
                   ) -> jax.Array:
    """LPIPS(x, y) of NHWC images in [-1, 1] (Zhang et al. 2018; CM Sec. 3 uses it as d).

    As in the CM code (`jcm/losses.py`), both images are first resized bilinearly to
    `resize_to` x `resize_to` (None keeps their size); a single channel is repeated to three.
    """
    if x.shape[-1] == 1:
        x, y = jnp.repeat(x, 3, axis=-1), jnp.repeat(y, 3, axis=-1)
    if resize_to is not None:
        size = (x.shape[0], resize_to, resize_to, x.shape[-1])
        x = jax.image.resize(x, size, method="bilinear")
        y = jax.image.resize(y, size, method="bilinear")
    return LPIPS().apply({"params": params}, x, y)


def _check_pseudo_huber(c: Checker) -> None:
    c.check("consistency.huber_c", lambda v: v is None or (is_number(v) and v > 0),
            "must be None (0.00054 sqrt(d), iCT Sec. 3.3) or a number > 0")


def _check_lpips(c: Checker) -> None:
    for field in ("lpips_heads", "lpips_vgg"):
        c.check(f"consistency.{field}", lambda v: isinstance(v, str) and os.path.isfile(v),
                "distance 'lpips' needs the path of an existing weights file")


def _load_lpips(config: ml_collections.ConfigDict) -> Any:
    return load_params(config.consistency.lpips_heads, config.consistency.lpips_vgg)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistanceEntry(Entry):
    """A distance d(x, y) -> [B] of `DISTANCES`: `fn(x, y, **options)`; `options(config,
    weights)` its options from the `consistency` fields it owns (and the weights `load(config)`
    gave on the host, which a step takes as a replicated argument)."""

    fn: Callable[..., jax.Array]
    options: Callable[[ml_collections.ConfigDict, Any], dict] = lambda config, weights: {}
    load: Callable[[ml_collections.ConfigDict], Any] | None = None


DISTANCES: dict[str, DistanceEntry] = {
    "l2": DistanceEntry(fn=l2_distance),
    "l1": DistanceEntry(fn=l1_distance),
    # iCT's c (Sec. 3.3); None: 0.00054 sqrt(d).
    "pseudo_huber": DistanceEntry(
        fn=pseudo_huber_distance, options=lambda config, weights: {"c": config.consistency.huber_c},
        fields={"consistency.huber_c": ml_collections.config_dict.placeholder(float)},
        check=_check_pseudo_huber),
    # The `lpips` package's vgg.pth heads and a torchvision VGG-16 state dict.
    "lpips": DistanceEntry(
        fn=lpips_distance, options=lambda config, weights: {"params": weights}, load=_load_lpips,
        fields={"consistency.lpips_heads": ml_collections.config_dict.placeholder(str),
                "consistency.lpips_vgg": ml_collections.config_dict.placeholder(str)},
        check=_check_lpips),
}


def get_distance(name: str, **options) -> Distance:
    """The registered distance d(x, y) -> [B] called `name`, with its keyword options bound
    (`params=` for 'lpips', `c=` for 'pseudo_huber')."""
    return functools.partial(lookup(DISTANCES, name, "consistency distance").fn, **options)


def _check_solver(solver: str) -> None:
    if solver not in ODE_STEPS:
        raise ValueError(f"unknown teacher ODE solver {solver!r}; choose one of "
                         f"{tuple(ODE_STEPS)}")


# --- Losses ------------------------------------------------------------------------------------


def _consistency_distance(student_fn: Student, params, target_params, x_next, sigma_next, x_hat,
                          sigma_n, distance: Distance) -> jax.Array:
    """d(f_theta(x_{n+1}, sigma_{n+1}), f_theta-(x_hat_n, sigma_n)), the target's gradient
    stopped (CM Eq. 7 and Eq. 10)."""
    online = student_fn(params, x_next, sigma_next)
    target = jax.lax.stop_gradient(student_fn(target_params, x_hat, sigma_n))
    return distance(online, target)


def _uniform_pair(rng, x0, *, num_scales, sigma_min, sigma_max, rho):
    """i ~ U{0..N-2}, the adjacent levels (sigmas[i], sigmas[i+1]) and z ~ N(0, I)."""
    i_rng, z_rng = jax.random.split(rng)
    i = jax.random.randint(i_rng, (x0.shape[0],), 0, jnp.asarray(num_scales) - 1)
    kw = dict(num_scales=num_scales, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    return i, karras_sigma(i, **kw), karras_sigma(i + 1, **kw), jax.random.normal(z_rng, x0.shape)


def cd_loss(student_fn: Student, params, target_params, x0: jax.Array, rng: jax.Array, *,
            num_scales: jax.Array | int, teacher_denoise: Denoiser, solver: str = "heun",
            distance: Distance = l2_distance, sigma_min: float = SIGMA_MIN,
            sigma_max: float = SIGMA_MAX, rho: float = RHO) -> tuple[jax.Array, jax.Array]:
    """Per-example consistency distillation loss and level index i (CM Algorithm 2, Eq. 7).

    x_{n+1} = x0 + sigma_{n+1} z; x_hat_n is one teacher ODE step (`solver`) from it to sigma_n;
    loss d(f_theta(x_{n+1}, sigma_{n+1}), f_theta-(x_hat_n, sigma_n)) with theta- stop-gradient and
    lambda = 1, the weighting of all the paper's experiments.
    """
    _check_solver(solver)
    i, sigma_n, sigma_next, z = _uniform_pair(rng, x0, num_scales=num_scales, sigma_min=sigma_min,
                                              sigma_max=sigma_max, rho=rho)
    x_next = x0 + _bcast(sigma_next, x0) * z
    x_hat = jax.lax.stop_gradient(ODE_STEPS[solver](teacher_denoise, x_next, sigma_next,
                                                    sigma_n)[0])
    return _consistency_distance(student_fn, params, target_params, x_next, sigma_next, x_hat,
                                 sigma_n, distance), i


def ct_loss(student_fn: Student, params, target_params, x0: jax.Array, rng: jax.Array, *,
            num_scales: jax.Array | int, distance: Distance = l2_distance,
            sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
            rho: float = RHO) -> tuple[jax.Array, jax.Array]:
    """Per-example consistency training loss and level index i (CM Algorithm 3, Eq. 10).

    The teacher step is replaced by the same noise at the lower level: x_hat_n = x0 + sigma_n z;
    lambda = 1.
    """
    i, sigma_n, sigma_next, z = _uniform_pair(rng, x0, num_scales=num_scales, sigma_min=sigma_min,
                                              sigma_max=sigma_max, rho=rho)
    return _consistency_distance(student_fn, params, target_params,
                                 x0 + _bcast(sigma_next, x0) * z, sigma_next,
                                 x0 + _bcast(sigma_n, x0) * z, sigma_n, distance), i


def ict_loss(student_fn: Student, params, x0: jax.Array, rng: jax.Array, *,
             num_scales: jax.Array | int, distance: Distance = pseudo_huber_distance,
             p_mean: float = -1.1, p_std: float = 2.0, sigma_min: float = SIGMA_MIN,
             sigma_max: float = SIGMA_MAX, rho: float = RHO) -> tuple[jax.Array, jax.Array]:
    """Per-example improved consistency training loss and level index i (iCT Sec. 3).

    CT with theta- = stopgrad(theta) (Sec. 3.2), levels drawn from the discretised lognormal
    (Sec. 3.5), weighted by lambda = 1 / (sigma_{n+1} - sigma_n) (Sec. 3.1), pseudo-Huber d
    (Sec. 3.3).
    """
    i_rng, z_rng = jax.random.split(rng)
    kw = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    i = ict_sample_index(i_rng, (x0.shape[0],), num_scales=num_scales, p_mean=p_mean,
                         p_std=p_std, **kw)
    sigma_n = karras_sigma(i, num_scales=num_scales, **kw)
    sigma_next = karras_sigma(i + 1, num_scales=num_scales, **kw)
    z = jax.random.normal(z_rng, x0.shape)
    d = _consistency_distance(student_fn, params, params, x0 + _bcast(sigma_next, x0) * z,
                              sigma_next, x0 + _bcast(sigma_n, x0) * z, sigma_n, distance)
    return d / (sigma_next - sigma_n), i
