"""The diffusion mathematics: forward process, posterior, p(x_{t-1} | x_t).

Pure functions over arrays. On a discrete schedule `t` holds 0-based step indices, shape [batch]
(index i is the paper's t = i + 1); on a continuous process (`q_sample`) it is the process's
time. `x` is any array whose leading axis is the batch (NHWC images, [B, D] points).
Learned-variance network outputs carry the variance channels after the mean channels on the
last axis. Papers: DDPM arXiv 2006.11239, Improved DDPM arXiv 2102.09672, DDIM arXiv 2010.02502.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff import parameterisations, processes
from jaxdiff.processes import NoiseProcess
from jaxdiff.registry import Checker, Entry, lookup, names
from jaxdiff.schedules import Schedule, check_timesteps, extract

# Sigma_t = beta_tilde_t, the posterior's variance (Improved DDPM's choice for few-step sampling):
# the default of the config and of every function; DDPM's CIFAR-10 recipe sets "fixed_large".
DEFAULT_MODEL_VAR_TYPE = "fixed_small"


def _fixed_small(schedule: Schedule, t: jax.Array, var_out: None, ndim: int):
    return (extract(schedule.posterior_variance, t, ndim),
            extract(schedule.posterior_log_variance_clipped, t, ndim))


def _fixed_large(schedule: Schedule, t: jax.Array, var_out: None, ndim: int):
    # beta_tilde_1 = 0, so the first step uses beta_tilde_2 (beta_1 when T = 1).
    first = schedule.posterior_variance[1] if schedule.num_timesteps > 1 else schedule.betas[0]
    variance = extract(schedule.betas.at[0].set(first), t, ndim)
    return variance, jnp.log(variance)


def _learned(schedule: Schedule, t: jax.Array, var_out: jax.Array, ndim: int):
    return jnp.exp(var_out), var_out


def _learned_range(schedule: Schedule, t: jax.Array, var_out: jax.Array, ndim: int):
    min_log = extract(schedule.posterior_log_variance_clipped, t, ndim)
    max_log = extract(jnp.log(schedule.betas), t, ndim)
    frac = (var_out + 1.0) / 2.0
    log_variance = frac * max_log + (1.0 - frac) * min_log
    return jnp.exp(log_variance), log_variance


def _check_learned(c: Checker) -> None:
    if processes.get(c.get("diffusion.process")).steps:
        return
    chains = names(processes.PROCESSES, lambda p: p.steps)
    c.fail("diffusion.model_var_type",
           f"a learned variance belongs to a chain's steps (diffusion.process {chains}), not "
           f"the {c.get('diffusion.process')!r} process")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VarianceType(Entry):
    """Sigma_t of p(x_{t-1} | x_t): `variance(schedule, t, var_out, ndim)` -> (Sigma, log Sigma);
    `learned`: the network outputs it, in C more channels after the mean's."""

    variance: Callable[[Schedule, jax.Array, jax.Array | None, int], tuple[jax.Array, jax.Array]]
    learned: bool = False


MODEL_VAR_TYPES: dict[str, VarianceType] = {
    # beta_tilde_t (DDPM Sec. 3.2), the log clipped at the first step where beta_tilde_1 = 0.
    "fixed_small": VarianceType(variance=_fixed_small),
    # beta_t, with beta_tilde_2 at the first step as DDPM's code does.
    "fixed_large": VarianceType(variance=_fixed_large),
    # The network outputs log Sigma.
    "learned": VarianceType(variance=_learned, learned=True, check=_check_learned),
    # log Sigma = v log beta_t + (1 - v) log beta_tilde_t, v = (output + 1) / 2 (IDDPM Eq. 15).
    "learned_range": VarianceType(variance=_learned_range, learned=True, check=_check_learned),
}


def check_model_var_type(model_var_type: str) -> VarianceType:
    """The entry of `model_var_type`; a ValueError naming it and the choices if there is none."""
    return lookup(MODEL_VAR_TYPES, model_var_type, "model variance type")


def alpha_sigma(process: NoiseProcess, t: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
    """(alpha(t), sigma(t)) shaped [batch, 1, ..., 1] to broadcast against a rank-`ndim` x."""
    t = jnp.asarray(t)
    shape = t.shape + (1,) * (ndim - t.ndim)
    return process.alpha(t).reshape(shape), process.sigma(t).reshape(shape)


def q_mean_variance(schedule: Schedule, x0: jax.Array, t: jax.Array):
    """q(x_t | x_0) = N(sqrt(a_bar_t) x_0, (1 - a_bar_t) I) (DDPM Eq. 4): (mean, var, log_var)."""
    check_timesteps(t, schedule.num_timesteps, x0.shape[0])
    mean = extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
    variance = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) ** 2
    log_variance = extract(schedule.log_one_minus_alphas_cumprod, t, x0.ndim)
    return mean, variance, log_variance


def q_sample(process: NoiseProcess, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = alpha(t) x_0 + sigma(t) eps, a draw of q(x_t | x_0) (DDPM Eq. 4; EDM Eq. 7)."""
    process.check_t(t, x0.shape[0])
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {noise.shape} does not match x_0 shape {x0.shape}")
    alpha, sigma = alpha_sigma(process, t, x0.ndim)
    return alpha * x0 + sigma * noise


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


def predict_eps_from_x0(schedule: Schedule, xt: jax.Array, t: jax.Array,
                        x0: jax.Array) -> jax.Array:
    """eps = (x_t - sqrt(a_bar_t) x_0) / sqrt(1 - a_bar_t), DDPM Eq. 4 solved for eps."""
    alpha, sigma = alpha_sigma(schedule, t, xt.ndim)
    return (xt - alpha * x0) / sigma


def split_model_output(model_output: jax.Array, model_var_type: str):
    """(mean part, variance part or None): learned variances follow the mean on the last axis."""
    if check_model_var_type(model_var_type).learned:
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


def p_variance(schedule: Schedule, t: jax.Array, var_out: jax.Array | None,
               model_var_type: str, ndim: int) -> tuple[jax.Array, jax.Array]:
    """(Sigma_t, log Sigma_t) of p(x_{t-1} | x_t) for a variance type (DDPM Sec. 3.2; IDDPM
    Eq. 15; the log clipped at the first step, where beta_tilde_1 = 0).

    `fixed_small` Sigma = beta_tilde_t, `fixed_large` Sigma = beta_t (with beta_tilde_2 at the
    first step, as DDPM's code does), `learned` (the network outputs log Sigma) and
    `learned_range` (log Sigma = v log beta_t + (1 - v) log beta_tilde_t, v = (output + 1) / 2).
    """
    return check_model_var_type(model_var_type).variance(schedule, t, var_out, ndim)


def p_mean_variance(
    schedule: Schedule,
    model_output: jax.Array,
    xt: jax.Array,
    t: jax.Array,
    *,
    model_output_type: str = "eps",
    model_var_type: str = DEFAULT_MODEL_VAR_TYPE,
    clip_denoised: bool = True,
    sigma_data: float = 0.5,
) -> PMeanVariance:
    """p_theta(x_{t-1} | x_t) = N(mu_tilde(x_t, x0_hat), Sigma_t) (DDPM Eqs. 1, 11; IDDPM Eq. 15).

    x0_hat reads the output through the parameterisation `model_output_type` (any entry of
    `parameterisations.PARAMETERISATIONS`); Sigma_t is `p_variance`'s.
    """
    param = parameterisations.get(model_output_type)
    check_model_var_type(model_var_type)
    if model_output.shape[0] != xt.shape[0]:
        raise ValueError(f"model output batch {model_output.shape[0]} != x_t batch {xt.shape[0]}")
    check_timesteps(t, schedule.num_timesteps, xt.shape[0])
    out, var_out = split_model_output(model_output, model_var_type)
    if out.shape != xt.shape:
        raise ValueError(f"model output shape {out.shape} does not match x_t shape {xt.shape}")
    variance, log_variance = (jnp.broadcast_to(v, xt.shape) for v in
                              p_variance(schedule, t, var_out, model_var_type, xt.ndim))
    alpha, sigma = alpha_sigma(schedule, t, xt.ndim)
    pred_x0 = param.to_x0(out, xt, alpha, sigma, sigma_data)
    if clip_denoised:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    pred_eps = (out if param.outputs_eps and not clip_denoised
                else predict_eps_from_x0(schedule, xt, t, pred_x0))
    mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, xt, t)
    return PMeanVariance(mean, variance, log_variance, pred_x0, pred_eps)
