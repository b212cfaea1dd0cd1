"""What a network outputs: one registry entry per parameterisation.

Every entry reads a point x_t = alpha x_0 + sigma eps of any noise process (alpha, sigma arrays
broadcastable against x_t; `sigma_data` is the data std that EDM's preconditioning assumes) and
says: what the network is fed, how its output becomes x_0 (eps then follows from x_t), what it is
trained to output, and by how much an output error moves x_0 (the factor that converts a loss
weighting stated on ||x_0 - x0_hat||^2 into one on the output's MSE). Adding a parameterisation
is one entry in `PARAMETERISATIONS`; `get` refuses an unknown name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff.processes import VEProcess
from jaxdiff.registry import Checker, Entry, lookup

Array = jax.Array


def _identity_input(x_t: Array, alpha: Array, sigma: Array, sigma_data: float) -> Array:
    del alpha, sigma, sigma_data
    return x_t


@dataclasses.dataclass(frozen=True, kw_only=True)
class Parameterisation(Entry):
    """One way of reading a network's output (see the module docstring); `fields` are the
    `diffusion` settings it reads (EDM's and CM's `sigma_data`)."""

    to_x0: Callable[[Array, Array, Array, Array, float], Array]  # (out, x_t, alpha, sigma, sd)
    target: Callable[[Array, Array, Array, Array, float], Array]  # (x_0, eps, alpha, sigma, sd)
    x0_error_scale: Callable[[Array, Array, float], Array]  # (alpha, sigma, sd) -> d x0 / d out
    network_input: Callable[[Array, Array, Array, float], Array] = _identity_input
    outputs_eps: bool = False  # the output IS eps: use it as is rather than via x_0
    denoises: bool = True  # x_0 is E[x_0 | x_t]; False: a consistency function (CM Eq. 4)
    # A consistency function's denoising counterpart: the parameterisation that feeds the network
    # the same input, so a diffusion model of it can start the consistency model (ECT).
    denoiser: str | None = None


def _edm_coefficients(alpha: Array, sigma: Array, sigma_data: float):
    """(c_skip, c_out, c_in) of EDM Table 1 at sigma_edm = sigma / alpha."""
    s = sigma / alpha
    total = s**2 + sigma_data**2
    return sigma_data**2 / total, s * sigma_data / jnp.sqrt(total), 1.0 / jnp.sqrt(total)


# EDM's data standard deviation (arXiv 2206.00364 Table 1), which its scalings assume.
_SIGMA_DATA = {"diffusion.sigma_data": 0.5}


def _check_sigma_data(c: Checker) -> None:
    c.positive("diffusion.sigma_data")


# Where a consistency function meets the identity, f(x, sigma_min) = x: the `VEProcess` default
# (EDM's and CM's 0.002); `config.validate` holds a consistency model's process to it.
CONSISTENCY_SIGMA_MIN = VEProcess().sigma_min


def consistency_scalings(sigma: Array, *, sigma_data: float,
                         sigma_min: float = CONSISTENCY_SIGMA_MIN):
    """(c_skip, c_out, c_in) of CM (arXiv 2303.01469) Appendix C: c_skip = sigma_data^2 /
    ((sigma - sigma_min)^2 + sigma_data^2), c_out = sigma_data (sigma - sigma_min) /
    sqrt(sigma_data^2 + sigma^2), so f(x, sigma_min) = x exactly (Eq. 4's boundary condition);
    c_in = 1 / sqrt(sigma^2 + sigma_data^2) is EDM's (Table 1)."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = sigma_data * (sigma - sigma_min) / jnp.sqrt(sigma_data**2 + sigma**2)
    return c_skip, c_out, 1.0 / jnp.sqrt(sigma**2 + sigma_data**2)


def _consistency_to_x0(out, x_t, alpha, sigma, sigma_data):
    c_skip, c_out, _ = consistency_scalings(sigma / alpha, sigma_data=sigma_data)
    return c_skip * (x_t / alpha) + c_out * out


def _consistency_target(x0, eps, alpha, sigma, sigma_data):
    c_skip, c_out, _ = consistency_scalings(sigma / alpha, sigma_data=sigma_data)
    return (x0 - c_skip * (x0 + sigma / alpha * eps)) / c_out


def _edm_to_x0(out, x_t, alpha, sigma, sigma_data):
    c_skip, c_out, _ = _edm_coefficients(alpha, sigma, sigma_data)
    return c_skip * (x_t / alpha) + c_out * out


def _edm_target(x0, eps, alpha, sigma, sigma_data):
    c_skip, c_out, _ = _edm_coefficients(alpha, sigma, sigma_data)
    return (x0 - c_skip * (x0 + sigma / alpha * eps)) / c_out


def _edm_input(x_t, alpha, sigma, sigma_data):
    return _edm_coefficients(alpha, sigma, sigma_data)[2] * (x_t / alpha)


def _trigflow_to_x0(out, x_t, alpha, sigma, sigma_data):
    c_skip, c_out, _ = _edm_coefficients(alpha, sigma, sigma_data)
    return c_skip * (x_t / alpha) - c_out * out


def _trigflow_target(x0, eps, alpha, sigma, sigma_data):
    c_skip, c_out, _ = _edm_coefficients(alpha, sigma, sigma_data)
    return (c_skip * (x0 + sigma / alpha * eps) - x0) / c_out


# TrigFlow's f = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, c_noise(t)) (sCM arXiv 2410.11081
# Sec. 2), read at t = arctan(sigma_edm / sigma_d) on any process: with x = x_t / cos(t) it is
# EDM's c_skip x - c_out F fed c_in x (cos^2 t = c_skip, sigma_d sin t = c_out, cos(t) / sigma_d =
# c_in), i.e. EDM's F with its sign flipped, and its target sigma_d F = cos(t) z - sin(t) x_0 is
# the TrigFlow velocity dx_t/dt. f(x, 0) = x holds exactly (sin 0 = 0).
_TRIGFLOW = dict(to_x0=_trigflow_to_x0, target=_trigflow_target,
                 x0_error_scale=lambda alpha, sigma, sd: _edm_coefficients(alpha, sigma, sd)[1],
                 network_input=_edm_input, fields=_SIGMA_DATA, check=_check_sigma_data)


PARAMETERISATIONS: dict[str, Parameterisation] = {
    # eps_theta (DDPM arXiv 2006.11239 Eq. 11): x_0 = (x_t - sigma eps) / alpha.
    "eps": Parameterisation(
        to_x0=lambda out, x_t, alpha, sigma, sd: (x_t - sigma * out) / alpha,
        target=lambda x0, eps, alpha, sigma, sd: eps,
        x0_error_scale=lambda alpha, sigma, sd: sigma / alpha,
        outputs_eps=True),
    # x_0 itself (DDPM Sec. 3.2's alternative).
    "x0": Parameterisation(
        to_x0=lambda out, x_t, alpha, sigma, sd: out,
        target=lambda x0, eps, alpha, sigma, sd: x0,
        x0_error_scale=lambda alpha, sigma, sd: jnp.ones_like(alpha)),
    # v = alpha eps - sigma x_0 (progressive distillation arXiv 2202.00512 Sec. 4), so
    # alpha x_t - sigma v = (alpha^2 + sigma^2) x_0 (= x_0 on a variance-preserving process).
    "v": Parameterisation(
        to_x0=lambda out, x_t, alpha, sigma, sd:
            (alpha * x_t - sigma * out) / (alpha**2 + sigma**2),
        target=lambda x0, eps, alpha, sigma, sd: alpha * eps - sigma * x0,
        x0_error_scale=lambda alpha, sigma, sd: sigma / (alpha**2 + sigma**2)),
    # The velocity v = eps - x_0 of the straight path x_t = (1 - t) x_0 + t eps (rectified flow
    # arXiv 2209.03003 Eq. 1; flow matching arXiv 2210.02747 Eq. 23), read on any process as
    # x_0 = (x_t - sigma v) / (alpha + sigma): exact wherever x_t = alpha x_0 + sigma eps.
    "velocity": Parameterisation(
        to_x0=lambda out, x_t, alpha, sigma, sd: (x_t - sigma * out) / (alpha + sigma),
        target=lambda x0, eps, alpha, sigma, sd: eps - x0,
        x0_error_scale=lambda alpha, sigma, sd: sigma / (alpha + sigma)),
    # EDM's preconditioned F: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) on x = x_t / alpha
    # (EDM arXiv 2206.00364 Eq. 7, Table 1); the target (x_0 - c_skip x) / c_out makes the plain
    # MSE of F equal EDM's loss lambda(sigma) ||D - x_0||^2, since lambda c_out^2 = 1 (Eq. 8).
    "edm": Parameterisation(
        to_x0=_edm_to_x0,
        target=_edm_target,
        x0_error_scale=lambda alpha, sigma, sd: _edm_coefficients(alpha, sigma, sd)[1],
        network_input=_edm_input,
        fields=_SIGMA_DATA, check=_check_sigma_data),
    # A consistency function f = c_skip x + c_out F(c_in x; c_noise) on x = x_t / alpha (CM Eq. 5
    # with Appendix C's scalings): the network is fed EDM's c_in x and the process's time, so
    # its c_noise is the process's `network_time`, as for "edm"; the target is the denoising
    # one, (x_0 - c_skip x) / c_out. CD, CT and iCT train it by their own losses.
    "consistency": Parameterisation(
        to_x0=_consistency_to_x0,
        target=_consistency_target,
        x0_error_scale=lambda alpha, sigma, sd:
            consistency_scalings(sigma / alpha, sigma_data=sd)[1],
        network_input=_edm_input,
        denoises=False, denoiser="edm", fields=_SIGMA_DATA, check=_check_sigma_data),
    # TrigFlow's diffusion model: F regresses the velocity / sigma_d (the flow loss of sCM
    # Sec. 2 is its plain MSE times sigma_d^2), so f is the denoiser E[x_0 | x_t].
    "trigflow": Parameterisation(**_TRIGFLOW),
    # The same f as a consistency function (sCM Sec. 3), trained by sCT / sCD.
    "trigflow_consistency": Parameterisation(**_TRIGFLOW, denoises=False, denoiser="trigflow"),
}


def get(name: str) -> Parameterisation:
    """The registry entry `name`; a ValueError naming it and the choices if there is none."""
    return lookup(PARAMETERISATIONS, name, "model output type (parameterisation)")
