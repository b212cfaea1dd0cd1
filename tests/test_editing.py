"""Editing (`jaxdiff.editing`) against closed forms on Gaussian data N(MU, SIGMA), non-diagonal.

The exact denoiser of N(mu, Sigma) at x = x_0 + sigma n is D(x, sigma) = mu + Sigma (Sigma +
sigma^2 I)^{-1} (x - mu), the probability-flow ODE's solution is x(sigma) = mu + (Sigma +
sigma^2 I)^{1/2} (Sigma + sigma'^2 I)^{-1/2} (x(sigma') - mu), and the law of the unknown
pixels u given the known ones k is Gaussian: mean mu_u + S_uk S_kk^{-1} (x_k - mu_k), covariance
S_uu - S_uk S_kk^{-1} S_ku. The oracle network (the pattern of tests/test_contract.py) returns
what a perfectly trained network of any process and parameterisation would.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import operators
from jaxdiff.bundle import DiffusionModel
from jaxdiff.parameterisations import CONSISTENCY_SIGMA_MIN, PARAMETERISATIONS
from tests.test_contract import SIGMA_DATA, process_of

SHAPE = (2, 2, 1)  # four pixels: the top row known, the bottom row generated
D = 4
MU = np.array([0.2, -0.1, 0.1, 0.0])
MIX = np.array([[0.5, 0.1, 0.0, 0.0], [0.3, 0.4, 0.0, 0.0],
                [0.25, 0.0, 0.2, 0.0], [0.0, 0.3, 0.1, 0.2]])  # SIGMA = MIX MIX^T, non-diagonal
INDEPENDENT = np.diag([0.4, 0.3, 0.25, 0.2])  # a diagonal SIGMA: the pixels independent
MIXES = {"correlated": MIX, "independent": INDEPENDENT}
MASK = np.array([1.0, 1.0, 0.0, 0.0], np.float32).reshape(SHAPE)
KNOWN, UNKNOWN = [0, 1], [2, 3]
N = 1000


def oracle_x0(mix, x, level, denoises):
    """E[x_0 | x] of N(MU, mix mix^T) at x = x_0 + level n, or the consistency function there:
    mu + U diag(g) U^T (x - mu) with g = l / (l + level^2), or sqrt((l + sigma_min^2) /
    (l + level^2)), for the eigenpairs (l, U) of the covariance."""
    eig, u = np.linalg.eigh(mix @ mix.T)
    low = 0.0 if denoises else CONSISTENCY_SIGMA_MIN**2
    g = (eig[None] + low) / (eig[None] + level.reshape(-1, 1) ** 2)
    g = g if denoises else jnp.sqrt(g)
    flat = x.reshape(x.shape[0], D) - MU
    return (MU + ((flat @ u) * g) @ u.T).reshape(x.shape).astype(x.dtype)


@functools.cache  # one network per setting, so that its compiled samplers are reused
def oracle_model(process_name="ddpm", param_name="eps", mix_name="correlated"):
    """A DiffusionModel whose network is the exact one of N(MU, mix mix^T) for any process and
    parameterisation (tests/test_contract.py's oracle network, for a full covariance)."""
    process = process_of(process_name)
    param = PARAMETERISATIONS[param_name]
    mix = MIXES[mix_name]

    def network(params, x_in, c, y):
        del params, y
        t = process.t_of_network_time(c)
        alpha = process.alpha(t).reshape(-1, 1, 1, 1)
        sigma = process.sigma(t).reshape(-1, 1, 1, 1)
        x_model = x_in / param.network_input(jnp.ones_like(x_in), alpha, sigma, SIGMA_DATA)
        x0 = oracle_x0(mix, x_model / alpha, sigma / alpha, param.denoises)
        return param.target(x0, (x_model - alpha * x0) / sigma, alpha, sigma, SIGMA_DATA)

    return DiffusionModel(params=None, schedule=process, model=network, image_shape=SHAPE,
                          model_output_type=param_name, sigma_data=SIGMA_DATA)


def conditional(mix, x_known):
    """Mean [2] and covariance [2, 2] of the unknown pixels given the known ones [2]."""
    cov = mix @ mix.T
    s_kk, s_uk = cov[np.ix_(KNOWN, KNOWN)], cov[np.ix_(UNKNOWN, KNOWN)]
    gain = s_uk @ np.linalg.inv(s_kk)
    return MU[UNKNOWN] + gain @ (x_known - MU[KNOWN]), cov[np.ix_(UNKNOWN, UNKNOWN)] - gain @ s_uk.T


def data(mix, n, seed=0):
    z = np.random.default_rng(seed).standard_normal((n, D))
    return np.clip(MU + z @ mix.T, -1, 1).reshape(n, *SHAPE).astype(np.float32)


def inpainted(method, mix_name, **options):
    """(known pixels' mean |error|, mean error [2], covariance error [2, 2], exact covariance) of N
    inpaintings of one draw of the data against the exact conditional."""
    mix = MIXES[mix_name]
    x = data(mix, 1, seed=1)
    out = jaxdiff.inpaint(oracle_model(mix_name=mix_name), jax.random.key(0),
                          np.repeat(x, N, 0), MASK, method, clip_denoised=False, **options)
    out = np.asarray(out, np.float64).reshape(N, D)
    mean, cov = conditional(mix, x.reshape(D)[KNOWN])
    return (np.abs(out[:, KNOWN] - x.reshape(D)[KNOWN]).mean(),
            out[:, UNKNOWN].mean(0) - mean, np.cov(out[:, UNKNOWN].T) - cov, cov)


# The methods' settings in the oracle tests: 100 levels of the 1000-step chain.
SETTINGS = {"replace": {"num_steps": 100}, "ddnm": {"num_steps": 100},
            "repaint": {"num_steps": 100, "jump_length": 10, "resamplings": 10}}


@pytest.mark.parametrize("method", list(SETTINGS))
def test_inpainting_is_exact_for_independent_pixels(method):
    """Pixels independent of the known ones: every method keeps the known pixels exactly and
    leaves the others as the sampler draws them: replace and ddnm pathwise (the same key gives
    `jaxdiff.sample`'s pixels, to float32), repaint in law (mean within 4 standard errors,
    variance within 4 of its, against the sampler's own draws)."""
    model = oracle_model(mix_name="independent")
    x = data(INDEPENDENT, N, seed=1)
    out = np.asarray(jaxdiff.inpaint(model, jax.random.key(0), x, MASK, method,
                                     clip_denoised=False, **SETTINGS[method])).reshape(N, D)
    plain = np.asarray(jaxdiff.sample(model, jax.random.key(0), "ddpm", num_samples=N,
                                      num_steps=100, clip_denoised=False)).reshape(N, D)
    np.testing.assert_array_equal(out[:, KNOWN], x.reshape(N, D)[:, KNOWN])
    if method != "repaint":
        np.testing.assert_allclose(out[:, UNKNOWN], plain[:, UNKNOWN], atol=1e-5)
        return
    var = plain[:, UNKNOWN].var(0)
    assert np.all(np.abs(out[:, UNKNOWN].mean(0) - plain[:, UNKNOWN].mean(0))
                  < 4 * np.sqrt(2 * var / N))
    assert np.all(np.abs(out[:, UNKNOWN].var(0) - var) < 4 * var * np.sqrt(4 / N))


# Measured mean error of the second unknown pixel (the one most tied to the known ones; exact
# conditional std 0.22, standard error 0.007 at N = 1000): replace -0.107, ddnm -0.106,
# repaint (j = 10, r = 10) -0.048. Replacement and DDNM are approximate; RePaint's resampling
# halves the bias.
def test_inpainting_with_correlated_pixels_measured_bias():
    errors = {}
    for method in SETTINGS:
        known, mean_err, cov_err, cov = inpainted(method, "correlated", **SETTINGS[method])
        assert known == 0.0
        assert np.all(np.abs(cov_err) < 0.5 * np.max(cov)), (method, cov_err)
        errors[method] = np.abs(mean_err).max()
    assert 0.08 < errors["replace"] < 0.14 and 0.08 < errors["ddnm"] < 0.14, errors
    assert errors["repaint"] < 0.6 * errors["replace"], errors


# ---------------------------------------------------------------------------------------------
# Operators, DDNM's and replacement's measurement, DPS


def test_operators_are_pseudo_inverses():
    """A A^+ = I, and A^+ A is an orthogonal projection (idempotent, self-adjoint), for each."""
    rng = np.random.default_rng(0)
    cases = [operators.make_operator("mask", (2, 4, 4, 1), mask=rng.integers(0, 2, (4, 4, 1))),
             operators.make_operator("downsample", (2, 4, 4, 1), factor=2),
             operators.make_operator("grey", (2, 2, 2, 3))]
    for op in cases:
        shape = (2, 4, 4, 1) if op.kind != "grey" else (2, 2, 2, 3)
        x, z = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
        y = op.apply(x)
        np.testing.assert_allclose(op.apply(op.pinv(y)), y, atol=1e-6)
        np.testing.assert_allclose(op.project(op.project(x)), op.project(x), atol=1e-6)
        np.testing.assert_allclose(jnp.sum(op.project(x) * z), jnp.sum(x * op.project(z)),
                                   rtol=1e-5)
    np.testing.assert_array_equal(operators.measured_shape(cases[1], (2, 4, 4, 1)), (2, 2, 2, 1))


@pytest.mark.parametrize("process, param, sampler", [
    ("ddpm", "eps", "ddpm"), ("edm", "edm", "heun"), ("flow_matching", "velocity", "euler")])
def test_ddnm_and_replace_meet_the_measurement_on_every_process(process, param, sampler):
    """DDNM's range-null x_0 and replacement's last step at sigma = 0 give A x = y (2x average
    pooling) to float32, with the sampler of each process."""
    model = oracle_model(process, param)
    x = data(MIX, 8, seed=2)
    y = operators.make_operator("downsample", x.shape, factor=2).apply(jnp.asarray(x))
    for method in ("ddnm", "replace"):
        out = jaxdiff.restore(model, jax.random.key(0), y, "downsample", factor=2,
                              method=method, sampler=sampler, num_steps=10, clip_denoised=False)
        np.testing.assert_allclose(out.mean(axis=(1, 2), keepdims=True), y, atol=1e-5)
        assert np.std(np.asarray(out)[:, 1, 1] - np.asarray(out)[:, 0, 0]) > 0.05  # not flat


def test_dps_pulls_samples_onto_the_measurement():
    """DPS (scale 0.3, 100 steps) leaves the known pixels a mean |error| of 0.10 (measured; the
    gradient step is approximate, DPS never meets y exactly), against 0.33 for unconditional
    samples; its unknown pixels' mean is within 0.06 of the exact conditional's (measured 0.03)."""
    known, mean_err, _, _ = inpainted("dps", "correlated", num_steps=100, scale=0.3)
    x = data(MIX, 1, seed=1).reshape(D)
    plain = np.asarray(jaxdiff.sample(oracle_model(), jax.random.key(0), "ddpm", num_samples=N,
                                      num_steps=100, clip_denoised=False)).reshape(N, D)
    unconditional = np.abs(plain[:, KNOWN] - x[KNOWN]).mean()
    assert unconditional > 0.25
    assert known < 0.5 * unconditional
    assert np.all(np.abs(mean_err) < 0.06), mean_err
