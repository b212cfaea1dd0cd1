"""One denoiser for every model: D(params, x, sigma, y) -> x_0 estimate, traced.

EDM (arXiv 2206.00364 Eq. 7) and k-diffusion view every diffusion model as a denoiser of
x = x_0 + sigma n at EDM's noise level sigma = sigma(t) / alpha(t). `predict` is the one place a
network is read: it asks the model's process for the time of sigma and its alpha (x_t = alpha x),
feeds the network what the parameterisation and the process say, and turns the output into x_0
and eps. Samplers, the consistency-distillation teacher, editing and the likelihood all call it,
so a new process or parameterisation is sampled, distilled and evaluated the moment it is
registered. A process with steps feeds its nearest step (EDM's iDDPM wrapper); samplers round
their grids to those steps first (`NoiseProcess.round_sigma`), so the level the network is fed
is the one integrated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff import parameterisations
from jaxdiff.bundle import DiffusionModel
from jaxdiff.diffusion import split_model_output
from jaxdiff.processes import NoiseProcess

Network = Callable[[jax.Array, jax.Array], jax.Array]  # (input, network time [B]) -> output


class Prediction(NamedTuple):
    """The denoiser's reading of x = x_0 + sigma eps: x_0, eps, and the variance channels of a
    learned-variance output (None otherwise)."""

    x0: jax.Array
    eps: jax.Array
    var_out: jax.Array | None


def apply_network(fn, params, *args):
    """A flax Module's `apply({"params": p}, *args, train=False)` or a plain `fn(params, *args)`."""
    if isinstance(fn, nn.Module):
        return fn.apply({"params": params}, *args, train=False)
    return fn(params, *args)


def broadcast_level(sigma: jax.Array, x: jax.Array) -> jax.Array:
    """sigma [B] or () shaped [B, 1, ..., 1] to broadcast against x [B, ...]."""
    sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
    return sigma.reshape(x.shape[:1] + (1,) * (x.ndim - 1))


def predict(network: Network, param: parameterisations.Parameterisation, process: NoiseProcess,
            x: jax.Array, sigma: jax.Array, *, sigma_data: float, model_var_type: str,
            clip: bool = False) -> Prediction:
    """(x_0, eps, variance channels) of a model at x = x_0 + sigma eps, sigma [B] or ().

    The network sees the model's own point x_t = alpha(t) x at t = t_of_sigma(sigma), through the
    parameterisation's input scaling, at the process's `network_time(t)`; x_0 is clipped to
    [-1, 1] when `clip`, and eps then follows from x (an eps-model's own output otherwise).
    """
    s = broadcast_level(sigma, x)
    t = process.t_of_sigma(s.reshape(x.shape[:1]))
    alpha = broadcast_level(process.alpha(t), x)
    x_model, sigma_model = alpha * x, alpha * s
    raw = network(param.network_input(x_model, alpha, sigma_model, sigma_data),
                  process.network_time(t))
    out, var_out = split_model_output(raw, model_var_type)
    x0 = param.to_x0(out, x_model, alpha, sigma_model, sigma_data)
    if clip:
        x0 = jnp.clip(x0, -1.0, 1.0)
    eps = out if param.outputs_eps and not clip else (x - x0) / s
    return Prediction(x0, eps, var_out)


def denoiser(model: DiffusionModel, *, clip_denoised: bool = False
             ) -> Callable[[Any, jax.Array, jax.Array, jax.Array | None], jax.Array]:
    """D(params, x, sigma, y) -> x_0 estimate of `model` at x = x_0 + sigma n, sigma [B] traced
    (EDM Eq. 7's view of every model as a denoiser; CD's teacher, editing and the likelihood).

    `y` (labels [B]) is passed to a class-conditional network, None otherwise. `model.params` is
    not used: the weights are the argument, so the function is pure.
    """
    param = parameterisations.get(model.model_output_type)

    def denoise(params, x: jax.Array, sigma: jax.Array, y: jax.Array | None = None) -> jax.Array:
        labels = y if model.num_classes > 0 else None
        return predict(lambda x_in, time: apply_network(model.model, params, x_in, time, labels),
                       param, model.schedule, x, sigma, sigma_data=model.sigma_data,
                       model_var_type=model.model_var_type, clip=clip_denoised).x0

    return denoise
