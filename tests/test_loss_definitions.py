"""Every combination the config accepts trains on a non-zero loss equal to its definition.

The product diffusion.process x model_output x loss_type x loss_weighting x model_var_type is
taken over the registries, so a new entry is covered the moment it is registered. Each
combination `config.validate` accepts is evaluated by `training_losses`, called as train.py
calls it, at fixed x_0, t, noise and an output that is not the target, and compared with the
definition written here from the papers in float64: L_simple = mean (target - out)^2 with the
parameterisation's own target (DDPM Eq. 14); min-SNR's min(SNR, gamma) ||x_0 - x0_hat||^2
(arXiv 2303.09556 Eq. 7); P2's ||eps - eps_hat||^2 / (k + SNR)^gamma (arXiv 2204.00227 Eq. 8);
mse_weighted as the KL of two Gaussians with the fixed variance, ||mu_tilde(x_0) -
mu_tilde(x0_hat)||^2 / (2 sigma_t^2) (DDPM Eqs. 7, 12); vlb as T L_t in bits (DDPM Eq. 5, the
decoder's discretised likelihood at t = 0), hybrid as L_simple + lambda T L_t (IDDPM Sec. 3.1).
sigma_data is not EDM's 0.5 here, so a path that drops it computes with the wrong one.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_ndtr

import jaxdiff
from jaxdiff.config import default_config, validate
from jaxdiff.diffusion import MODEL_VAR_TYPES
from jaxdiff.losses import (
    LOSS_TYPES,
    WEIGHTINGS,
    bits_per_dim,
    training_losses,
    weighting_params,
)
from jaxdiff.parameterisations import PARAMETERISATIONS
from jaxdiff.processes import PROCESSES, make_process

FIELDS = ("process", "model_output", "loss_type", "loss_weighting", "model_var_type")
SIGMA_DATA, GAMMA, P2_GAMMA, P2_K, HYBRID_LAMBDA = 0.7, 4.0, 0.5, 2.0, 0.01
BATCH, DIM = 4, 6


def config_of(combination):
    config = default_config()
    d = config.diffusion
    for field, value in zip(FIELDS, combination, strict=True):
        d[field] = value
    d.sigma_data, d.min_snr_gamma, d.p2_gamma, d.p2_k = SIGMA_DATA, GAMMA, P2_GAMMA, P2_K
    d.hybrid_lambda = HYBRID_LAMBDA
    return config


def times(process) -> np.ndarray:
    """A chain's first, second, middle and last steps; else four levels across the range."""
    if process.num_timesteps is not None:
        return np.array([0, 1, process.num_timesteps // 2, process.num_timesteps - 1])
    return np.asarray(process.t_of_sigma(jnp.array([0.01, 0.5, 2.0, 40.0])), np.float64)


def edm_scalings(level):
    """(c_skip, c_out) of EDM Table 1 at EDM's level sigma."""
    total = level**2 + SIGMA_DATA**2
    return SIGMA_DATA**2 / total, level * SIGMA_DATA / np.sqrt(total)


def paper_target(name, x0, eps, alpha, sigma):
    """What the network of parameterisation `name` is trained to output."""
    c_skip, c_out = edm_scalings(sigma / alpha)
    t = np.arctan(sigma / alpha / SIGMA_DATA)  # TrigFlow's time (sCM arXiv 2410.11081 Sec. 2)
    return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "velocity": eps - x0,
            "edm": (x0 - c_skip * (x0 + sigma / alpha * eps)) / c_out,
            "trigflow": np.cos(t) * eps - np.sin(t) * x0 / SIGMA_DATA}[name]


def paper_x0(name, out, xt, alpha, sigma):
    """The x_0 that parameterisation `name` reads from the output `out` at x_t."""
    c_skip, c_out = edm_scalings(sigma / alpha)
    # TrigFlow: f = cos(t) x_trig - sin(t) sigma_d F with x_trig = cos(t) x_t / alpha (sCM Sec. 2).
    t = np.arctan(sigma / alpha / SIGMA_DATA)
    return {"eps": (xt - sigma * out) / alpha, "x0": out,
            "v": (alpha * xt - sigma * out) / (alpha**2 + sigma**2),
            "velocity": (xt - sigma * out) / (alpha + sigma),
            "edm": c_skip * xt / alpha + c_out * out,
            "trigflow": np.cos(t) ** 2 * xt / alpha - np.sin(t) * SIGMA_DATA * out}[name]


def chain_terms(process, t):
    """beta_t, a_bar_t, a_bar_{t-1} (1 at t = 0) and beta_tilde_t of DDPM Eq. 7, float64."""
    betas = np.asarray(process.betas, np.float64)
    a_bar = np.cumprod(1.0 - betas)
    a_prev = np.append(1.0, a_bar[:-1])
    beta_tilde = betas * (1.0 - a_prev) / (1.0 - a_bar)
    return betas[t], a_bar[t], a_prev[t], beta_tilde


def expected_loss(combination, process, x0, eps, t, out, var_out):
    """The loss of `combination` from its definition, per example, float64."""
    _, name, loss_type, weighting, var_type = combination
    t_col = t.reshape(-1, 1)
    alpha = np.asarray(process.alpha(jnp.asarray(t)), np.float64).reshape(-1, 1)
    sigma = np.asarray(process.sigma(jnp.asarray(t)), np.float64).reshape(-1, 1)
    xt = alpha * x0 + sigma * eps
    x0_hat = paper_x0(name, out, xt, alpha, sigma)
    simple = np.mean((paper_target(name, x0, eps, alpha, sigma) - out) ** 2, axis=1)
    snr = (alpha / sigma) ** 2
    if loss_type == "simple":
        if weighting == "min_snr":
            return np.mean(np.minimum(snr, GAMMA) * (x0 - x0_hat) ** 2, axis=1)
        if weighting == "p2":
            eps_hat = (xt - alpha * x0_hat) / sigma
            return np.mean((eps - eps_hat) ** 2 / (P2_K + snr) ** P2_GAMMA, axis=1)
        assert weighting == "none", f"write the definition of weighting {weighting!r} here"
        return simple
    beta, a_bar, a_prev, beta_tilde = (np.asarray(v).reshape(-1, 1) if i < 3 else v
                                       for i, v in enumerate(chain_terms(process, t)))
    coef1 = beta * np.sqrt(a_prev) / (1.0 - a_bar)
    coef2 = np.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a_bar)
    true_var = beta_tilde[np.maximum(t, 1)].reshape(-1, 1)  # beta_tilde_1 = 0 is clipped
    fixed = {"fixed_small": true_var, "fixed_large": np.where(t_col == 0, true_var, beta)}
    if loss_type == "mse_weighted":
        return np.mean(coef1**2 * (x0 - x0_hat) ** 2 / (2.0 * fixed[var_type]), axis=1)
    if var_type == "learned":
        log_var = var_out
    elif var_type == "learned_range":
        frac = (var_out + 1.0) / 2.0
        log_var = frac * np.log(beta) + (1.0 - frac) * np.log(true_var)
    else:
        log_var = np.log(fixed[var_type]) * np.ones_like(x0)
    mean = coef1 * x0_hat + coef2 * xt
    kl = 0.5 * (log_var - np.log(true_var) + true_var / np.exp(log_var) - 1.0
                + (coef1 * (x0 - x0_hat)) ** 2 / np.exp(log_var))
    scale = np.exp(0.5 * log_var)
    hi, lo = (x0 - mean + 1.0 / 255.0) / scale, (x0 - mean - 1.0 / 255.0) / scale
    # log(Phi(b) - Phi(a)) for the bin [a, b] reflected into the lower tail, where it is exact.
    upper = lo + hi > 0.0
    a, b = np.where(upper, -hi, lo), np.where(upper, -lo, hi)
    log_mass = log_ndtr(b) + np.log1p(-np.exp(log_ndtr(a) - log_ndtr(b)))
    log_bin = np.where(x0 < -0.999, log_ndtr(hi), np.where(x0 > 0.999, log_ndtr(-lo), log_mass))
    bound = np.where(t == 0, -np.mean(log_bin, axis=1), np.mean(kl, axis=1)) / math.log(2.0)
    vlb = process.num_timesteps * bound
    return vlb if loss_type == "vlb" else simple + HYBRID_LAMBDA * vlb


def named_fields(line: str) -> set[str]:
    """The combination's fields (and consistency.method) a line of validate's error names."""
    names = {f for f in FIELDS if f"diffusion.{f}" in line}
    return names | ({"consistency.method"} if "consistency.method" in line else set())


def _combinations():
    """Every combination; `-m "not slow"` runs a cover (the rest, marked slow, take 25 s in
    all): every parameterisation with every loss type on the unweighted first fixed and last
    learned variance, and every weighting and variance with the first parameterisation."""
    first_param, first_weighting = next(iter(PARAMETERISATIONS)), next(iter(WEIGHTINGS))
    learned = [name for name, entry in MODEL_VAR_TYPES.items() if entry.learned]
    cover_vars = (next(iter(MODEL_VAR_TYPES)), learned[-1])
    for combination in itertools.product(PROCESSES, PARAMETERISATIONS, LOSS_TYPES, WEIGHTINGS,
                                         MODEL_VAR_TYPES):
        _, param, _, weighting, var_type = combination
        cover = param == first_param or (weighting == first_weighting and var_type in cover_vars)
        yield pytest.param(combination, id="-".join(combination),
                           marks=() if cover else pytest.mark.slow)


@pytest.mark.parametrize("combination", list(_combinations()))
def test_accepted_combination_trains_on_its_definition(combination):
    """Accepted: the loss equals its definition within 1e-4 relative and is > 0. Refused: every
    line of the error names the field it refuses and the field it conflicts with."""
    config = config_of(combination)
    try:
        validate(config, num_devices=1)
    except ValueError as e:
        lines = [line for line in str(e).splitlines() if line.startswith("  - ")]
        assert lines, str(e)
        for line in lines:
            assert len(named_fields(line)) >= 2, line
        return
    d = config.diffusion
    process = make_process(d)
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1.0, 1.0, (BATCH, DIM))
    eps = rng.standard_normal((BATCH, DIM))
    t = times(process)
    alpha = np.asarray(process.alpha(jnp.asarray(t)), np.float64).reshape(-1, 1)
    sigma = np.asarray(process.sigma(jnp.asarray(t)), np.float64).reshape(-1, 1)
    out = paper_target(d.model_output, x0, eps, alpha, sigma) + 0.3 * rng.standard_normal(x0.shape)
    var_out = {"learned": np.log(0.02 + 0.01 * rng.uniform(size=x0.shape)),
               "learned_range": rng.uniform(-0.9, 0.9, x0.shape)}.get(d.model_var_type)
    output = out if var_out is None else np.concatenate([out, var_out], axis=-1)
    terms = training_losses(
        process, lambda x_in, c: jnp.asarray(output, jnp.float32),
        jnp.asarray(x0, jnp.float32), jax.random.key(0), loss_type=d.loss_type,
        model_output_type=d.model_output, model_var_type=d.model_var_type,
        hybrid_lambda=d.hybrid_lambda, weighting=d.loss_weighting,
        weighting_params=weighting_params(config), sigma_data=d.sigma_data,
        t=jnp.asarray(t, jnp.int32 if process.num_timesteps else jnp.float32),
        noise=jnp.asarray(eps, jnp.float32))
    expected = expected_loss(combination, process, x0, eps, t, out, var_out)
    assert np.all(np.asarray(terms["loss"]) > 0.0) and np.all(expected > 0.0)
    # The bound's KL subtracts two float32 posterior means whose difference is ~1e-4 of them at
    # t = T - 1 (coef1 = 1.3e-4), so it keeps only ~3 digits there (measured up to 4.1e-4).
    rtol = 1e-3 if d.loss_type in ("vlb", "hybrid") else 1e-4
    np.testing.assert_allclose(np.asarray(terms["loss"], np.float64), expected, rtol=rtol)


@functools.cache
def oracle_bound(name: str) -> np.ndarray:
    """`bits_per_dim` per example of test_contract's exact network of N(MU, S^2) data, output
    `name`, read with sigma_data = SIGMA_DATA (not the data's std S), on a 50-step chain."""
    from tests.test_contract import MU, S, oracle_network

    schedule = jaxdiff.make_schedule("linear", 50)
    network = oracle_network(schedule, name, sigma_data=SIGMA_DATA)
    x0 = MU + S * jax.random.normal(jax.random.key(0), (16, 2))
    return np.asarray(bits_per_dim(schedule, lambda x_in, c: network(None, x_in, c, None), x0,
                                   jax.random.key(1), model_output_type=name,
                                   sigma_data=SIGMA_DATA)["total_bpd"])


def _bound_cases():
    """The denoising parameterisations; `-m "not slow"` runs those that scale the network's input
    (each compiles the bound, 3 s), the others are marked slow."""
    first = next(iter(PARAMETERISATIONS))
    for name, param in PARAMETERISATIONS.items():
        if param.denoises and name != first:
            scales = param.network_input is not PARAMETERISATIONS[first].network_input
            yield pytest.param(name, marks=() if scales else pytest.mark.slow)


@pytest.mark.parametrize("param", list(_bound_cases()))
def test_bits_per_dim_reads_every_parameterisation_alike(param):
    """The bound of the exact network is the same whatever it outputs (as the first
    parameterisation's) within 1e-4 relative: each is fed and read as it was trained (network
    input and sigma_data). Before both were passed, an "edm" output read 11.94 bits/dim for
    11.66."""
    np.testing.assert_allclose(oracle_bound(param), oracle_bound(next(iter(PARAMETERISATIONS))),
                               rtol=1e-4)
