"""Continuous-time consistency models on TrigFlow: sCT and sCD.

Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models" (arXiv
2410.11081; "sCM" below). On TrigFlow x_t = cos(t) x_0 + sin(t) z, z ~ N(0, sigma_d^2 I)
(`processes.TrigFlowProcess`), the consistency function is f(x_t, t) = cos(t) x_t - sin(t)
sigma_d F(x_t / sigma_d, c_noise(t)) (the `trigflow_consistency` parameterisation) and the
continuous-time objective's gradient is that of ||F_theta - F_theta- - g||^2 / 2 with the tangent
g = cos(t) df_theta-/dt, the total derivative along the PF-ODE dx_t/dt (sCM Sec. 3-4, Alg. 1).
`jax.jvp` of the network gives df/dt in one forward-mode pass. sCD reads dx_t/dt from a trained
diffusion model (any process and parameterisation, through its denoiser), sCT from the sample:
dx_t/dt = cos(t) z - sin(t) x_0.

The network changes of sCM Sec. 4.1: c_noise(t) = t (`TrigFlowProcess.network_time`) with a
positional time embedding, which jaxdiff's U-Net already has (DDPM's sinusoidal
`timestep_embedding`, not EDM's Fourier features of scale 16), and adaptive double normalisation,
AdaGN's norm(h) * pnorm(s(t)) + pnorm(b(t)) (`model.adaptive_double_norm`, with
`model.use_scale_shift_norm`). The U-Net's and MLP's custom-VJP
ops refuse forward mode, so the objectives take the tangent by `transposed_vjp`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Velocity = Callable[[Array, Array], Array]  # (x_t, t [B]) -> F(x_t / sigma_d, c_noise(t))

# sCM Sec. 4.1 / App. G: sampling starts at t_max = arctan(sigma_max / sigma_d) with EDM's
# sigma_max = 80, and the two-step sampler re-noises to the intermediate t = 1.1.
SIGMA_MAX = 80.0
T_MID = 1.1


def _bcast(v: Array, x: Array) -> Array:
    return jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))


def sampling_sigmas(num_steps: int, sigma_data: float) -> tuple[float, ...]:
    """EDM levels of sCM's 1- and 2-step samplers, for `method="consistency"`'s `sigmas=`:
    t_max (sigma = 80) then t = 1.1 (sigma = sigma_d tan 1.1) (sCM App. G)."""
    if num_steps not in (1, 2):
        raise ValueError(f"sCM's sampler takes 1 or 2 steps, got num_steps={num_steps!r}")
    return (SIGMA_MAX, sigma_data * math.tan(T_MID))[:num_steps]


def data_velocity(x0: Array, z: Array, t: Array) -> Array:
    """dx_t/dt = cos(t) z - sin(t) x_0 of the sample's own path (sCT, sCM Alg. 1)."""
    return _bcast(jnp.cos(t), x0) * z - _bcast(jnp.sin(t), x0) * x0


def teacher_velocity(denoise: Callable[[Array, Array], Array], x_t: Array, t: Array, *,
                     sigma_data: float) -> Array:
    """dx_t/dt = (cos(t) x_t - D(x_t / cos t, sigma_d tan t)) / sin(t): the PF-ODE of a denoiser
    D(x, sigma) of x = x_0 + sigma n (EDM Eq. 3) in TrigFlow's time; for a TrigFlow teacher it is
    sigma_d F_pretrain(x_t / sigma_d, t) (sCD, sCM Alg. 1)."""
    cos, sin = _bcast(jnp.cos(t), x_t), _bcast(jnp.sin(t), x_t)
    return (cos * x_t - denoise(x_t / cos, sigma_data * jnp.tan(t))) / sin


def tangent_warmup(step: Array, warmup_steps: int) -> Array:
    """r = min(1, step / H), the weight of the tangent's second term (sCM Sec. 4.2, Alg. 1)."""
    if warmup_steps == 0:
        return jnp.float32(1.0)
    return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


def transposed_vjp(fn: Callable, primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    """(fn(*primals), J tangents) as `jax.jvp` returns them, computed as the VJP of the VJP: u ->
    J^T u is linear, so its own VJP is v -> J v. Exact where `jax.jvp` is, and it also runs
    through `jax.custom_vjp` functions, which forward mode refuses (the U-Net's and MLP's
    GroupNorm and bias additions, `jaxdiff.models.ops`, have hand-written backward passes)."""
    out, vjp = jax.vjp(fn, *primals)
    _, vjp_of_vjp = jax.vjp(vjp, jnp.zeros_like(out))
    return out, vjp_of_vjp(tangents)[0]


Jvp = Callable[[Callable, tuple, tuple], tuple[Array, Array]]  # jax.jvp's signature


def consistency_tangent(net: Velocity, x_t: Array, t: Array, dxt_dt: Array, *, sigma_data: float,
                        warmup: Array | float = 1.0, jvp: Jvp = jax.jvp) -> tuple[Array, Array]:
    """(F_theta-(x_t, t), g) with g = -cos^2(t) (sigma_d F - dx_t/dt) - r cos(t) sin(t) (x_t +
    sigma_d dF/dt) = cos(t) df/dt at r = 1 (sCM Alg. 1, "JVP rearrangement").

    cos(t) sin(t) dF/dt is one `jax.jvp` of `net` at (x_t, t) along (cos(t) sin(t) dx_t/dt,
    cos(t) sin(t)), the scaling sCM applies to keep it finite as t -> pi/2 (`transposed_vjp`
    for networks with custom VJPs). `net` is read as given: pass it stopped weights (theta- =
    stopgrad(theta))."""
    cs = jnp.cos(t) * jnp.sin(t)
    f_minus, cs_dfdt = jvp(net, (x_t, t), (_bcast(cs, x_t) * dxt_dt, cs))
    cos = _bcast(jnp.cos(t), x_t)
    g = -cos**2 * (sigma_data * f_minus - dxt_dt) - warmup * (
        _bcast(cs, x_t) * x_t + sigma_data * cs_dfdt)
    return f_minus, g


def normalise_tangent(g: Array, c: float) -> Array:
    """g / (||g|| + c) per example (sCM Sec. 4.2, "tangent normalization")."""
    norm = jnp.sqrt(jnp.sum(jnp.reshape(g, (g.shape[0], -1)) ** 2, axis=-1))
    return g / _bcast(norm + c, g)


def scm_loss(f_theta: Array, f_minus: Array, g: Array, w: Array, t: Array, *, sigma_data: float,
             prior_weighting: bool) -> Array:
    """Per-example e^{w(t)} / D ||F_theta - F_theta- - g||^2 - w(t), the adaptively weighted sCM
    loss (sCM Sec. 4.2, Alg. 1), times the prior weighting 1 / (sigma_d tan t) when asked (sCM
    Sec. 4.2; NVlabs/FastGen `prior_weighting_enabled`). Its gradient in theta is that of the
    continuous-time objective; the minimising w is -log of the weighted squared error."""
    d = jnp.reshape(f_theta - jax.lax.stop_gradient(f_minus) - g, (g.shape[0], -1))
    mse = jnp.mean(d**2, axis=-1)
    if prior_weighting:
        mse = mse / (sigma_data * jnp.tan(t))
    return jnp.exp(w) * mse - w
