"""The diffusion mathematics: forward process, posterior, parameterisations, p(x_{t-1} | x_t).

Pure functions over arrays. `t` holds 0-based step indices, shape [batch] (index i is the paper's
t = i + 1); `x` is any array whose leading axis is the batch (NHWC images, [B, D] points).
Learned-variance network outputs carry the variance channels after the mean channels on the
last axis. Papers: DDPM arXiv 2006.11239, Improved DDPM arXiv 2102.09672, DDIM arXiv 2010.02502,
progressive distillation (v-prediction) arXiv 2202.00512.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.schedules import Schedule, extract

MODEL_OUTPUTS = ("eps", "x0", "v")
MODEL_VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")


def check_model_output(model_output_type: str) -> None:
    if model_output_type not in MODEL_OUTPUTS:
        raise ValueError(f"unknown model output type {model_output_type!r}; "
                         f"expected one of {MODEL_OUTPUTS}")


def check_model_var_type(model_var_type: str) -> None:
    if model_var_type not in MODEL_VAR_TYPES:
        raise ValueError(f"unknown model variance type {model_var_type!r}; "
                         f"expected one of {MODEL_VAR_TYPES}")


def check_timesteps(t: jax.Array, num_timesteps: int, batch_size: int | None = None) -> None:
    """ValueError for a t of the wrong shape, or (when t is concrete) outside [0, T-1]."""
    shape = jnp.shape(t)
    if batch_size is not None and shape not in ((), (batch_size,)):
        raise ValueError(f"t must have shape ({batch_size},) or (), got {shape}")
    if isinstance(t, jax.core.Tracer):
        return
    t = np.asarray(t)
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"t must hold integer step indices, got dtype {t.dtype}")
    bad = t[(t < 0) | (t >= num_timesteps)]
    if bad.size:
        raise ValueError(f"t must lie in [0, {num_timesteps - 1}] (T={num_timesteps}), "
                         f"got {bad[:4].tolist()}")


def q_mean_variance(schedule: Schedule, x0: jax.Array, t: jax.Array):
    """q(x_t | x_0) = N(sqrt(a_bar_t) x_0, (1 - a_bar_t) I) (DDPM Eq. 4): (mean, var, log_var)."""
    check_timesteps(t, schedule.num_timesteps, x0.shape[0])
    mean = extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
    variance = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) ** 2
    log_variance = extract(schedule.log_one_minus_alphas_cumprod, t, x0.ndim)
    return mean, variance, log_variance


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(a_bar_t) x_0 + sqrt(1 - a_bar_t) eps, a draw of q(x_t | x_0) (DDPM Eq. 4)."""
    check_timesteps(t, schedule.num_timesteps, x0.shape[0])
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {noise.shape} does not match x_0 shape {x0.shape}")
    return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_posterior_mean_variance(schedule: Schedule, x0: jax.Array, xt: jax.Array, t: jax.Array):
    """q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I) (DDPM Eqs. 6-7): (mean, var, log_var)."""
    check_timesteps(t, schedule.num_timesteps, xt.shape[0])
    if x0.shape != xt.shape:
        raise ValueError(f"x_0 shape {x0.shape} does not match x_t shape {xt.shape}")
    mean = (extract(schedule.posterior_mean_coef1, t, xt.ndim) * x0
            + extract(schedule.posterior_mean_coef2, t, xt.ndim) * xt)
    variance = extract(schedule.posterior_variance, t, xt.ndim)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, xt.ndim)
    return mean, variance, log_variance


def predict_x0_from_eps(schedule: Schedule, xt: jax.Array, t: jax.Array,
                        eps: jax.Array) -> jax.Array:
    """x_0 = (x_t - sqrt(1 - a_bar_t) eps) / sqrt(a_bar_t): DDPM Eq. 4 for x_0 (DDIM Eq. 9)."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt
            - extract(schedule.sqrt_recipm1_alphas_cumprod, t, xt.ndim) * eps)


def predict_eps_from_x0(schedule: Schedule, xt: jax.Array, t: jax.Array,
                        x0: jax.Array) -> jax.Array:
    """eps = (x_t - sqrt(a_bar_t) x_0) / sqrt(1 - a_bar_t), DDPM Eq. 4 solved for eps."""
    return ((extract(schedule.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt - x0)
            / extract(schedule.sqrt_recipm1_alphas_cumprod, t, xt.ndim))


def predict_v(schedule: Schedule, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """v = sqrt(a_bar_t) eps - sqrt(1 - a_bar_t) x_0 (progressive distillation Sec. 4)."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * eps
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def predict_x0_from_v(schedule: Schedule, xt: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """x_0 = sqrt(a_bar_t) x_t - sqrt(1 - a_bar_t) v (arXiv 2202.00512 App. D)."""
    return (extract(schedule.sqrt_alphas_cumprod, t, xt.ndim) * xt
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * v)


def predict_eps_from_v(schedule: Schedule, xt: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """eps = sqrt(1 - a_bar_t) x_t + sqrt(a_bar_t) v (arXiv 2202.00512 App. D)."""
    return (extract(schedule.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * xt
            + extract(schedule.sqrt_alphas_cumprod, t, xt.ndim) * v)


def split_model_output(model_output: jax.Array, model_var_type: str):
    """(mean part, variance part or None): learned variances follow the mean on the last axis."""
    check_model_var_type(model_var_type)
    if model_var_type in ("learned", "learned_range"):
        if model_output.shape[-1] % 2:
            raise ValueError(f"a {model_var_type!r} model outputs 2C channels on the last axis, "
                             f"got shape {model_output.shape}")
        return jnp.split(model_output, 2, axis=-1)
    return model_output, None


class PMeanVariance(NamedTuple):
    """p(x_{t-1} | x_t) = N(mean, exp(log_variance)), with the network's x_0 and eps estimates."""

    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_x0: jax.Array
    pred_eps: jax.Array


def p_mean_variance(
    schedule: Schedule,
    model_output: jax.Array,
    xt: jax.Array,
    t: jax.Array,
    *,
    model_output_type: str = "eps",
    model_var_type: str = "fixed_small",
    clip_denoised: bool = True,
) -> PMeanVariance:
    """p_theta(x_{t-1} | x_t) = N(mu_tilde(x_t, x0_hat), Sigma_t) (DDPM Eqs. 1, 11; IDDPM Eq. 15).

    Variance types: `fixed_small` Sigma = beta_tilde_t, `fixed_large` Sigma = beta_t (with
    beta_tilde_2 at the first step, as DDPM's code does), `learned` (the network outputs
    log Sigma) and `learned_range` (log Sigma = v log beta_t + (1 - v) log beta_tilde_t,
    IDDPM Eq. 15, v = (output + 1) / 2).
    """
    check_model_output(model_output_type)
    check_model_var_type(model_var_type)
    if model_output.shape[0] != xt.shape[0]:
        raise ValueError(f"model output batch {model_output.shape[0]} != x_t batch {xt.shape[0]}")
    check_timesteps(t, schedule.num_timesteps, xt.shape[0])
    out, var_out = split_model_output(model_output, model_var_type)
    if out.shape != xt.shape:
        raise ValueError(f"model output shape {out.shape} does not match x_t shape {xt.shape}")

    if model_var_type == "fixed_small":
        variance = extract(schedule.posterior_variance, t, xt.ndim)
        log_variance = extract(schedule.posterior_log_variance_clipped, t, xt.ndim)
    elif model_var_type == "fixed_large":
        # beta_tilde_1 = 0, so the first step uses beta_tilde_2 (beta_1 when T = 1).
        first = schedule.posterior_variance[1] if schedule.num_timesteps > 1 else schedule.betas[0]
        large = schedule.betas.at[0].set(first)
        variance = extract(large, t, xt.ndim)
        log_variance = jnp.log(variance)
    elif model_var_type == "learned":
        log_variance = var_out
        variance = jnp.exp(log_variance)
    else:
        min_log = extract(schedule.posterior_log_variance_clipped, t, xt.ndim)
        max_log = extract(jnp.log(schedule.betas), t, xt.ndim)
        frac = (var_out + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
        variance = jnp.exp(log_variance)
    variance = jnp.broadcast_to(variance, xt.shape)
    log_variance = jnp.broadcast_to(log_variance, xt.shape)

    if model_output_type == "eps":
        pred_x0 = predict_x0_from_eps(schedule, xt, t, out)
    elif model_output_type == "x0":
        pred_x0 = out
    else:
        pred_x0 = predict_x0_from_v(schedule, xt, t, out)
    if clip_denoised:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    pred_eps = (out if model_output_type == "eps" and not clip_denoised
                else predict_eps_from_x0(schedule, xt, t, pred_x0))
    mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, xt, t)
    return PMeanVariance(mean, variance, log_variance, pred_x0, pred_eps)
