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
from experiments import digits_cd
from jaxdiff import digits_scorer, inverse, operators, train
from jaxdiff.bundle import DiffusionModel
from jaxdiff.data import digits_arrays
from jaxdiff.edit import MASKS
from jaxdiff.parameterisations import CONSISTENCY_SIGMA_MIN, PARAMETERISATIONS
from tests import test_train
from tests.test_contract import SIGMA_DATA, process_of

SHAPE = (2, 2, 1)  # four pixels: the top row known, the bottom row generated
D = 4
MU = np.array([0.2, -0.1, 0.1, 0.0])
MIX = np.array([[0.5, 0.1, 0.0, 0.0], [0.3, 0.4, 0.0, 0.0],
                [0.25, 0.0, 0.2, 0.0], [0.0, 0.3, 0.1, 0.2]])  # SIGMA = MIX MIX^T, non-diagonal
INDEPENDENT = np.diag([0.4, 0.3, 0.25, 0.2])  # a diagonal SIGMA: the pixels independent
MIXES = {"correlated": MIX, "independent": INDEPENDENT}
# (mean, mix, image shape) of each oracle: the four pixels, and one RGB pixel for colourisation.
GAUSSIANS = {"correlated": (MU, MIX, SHAPE), "independent": (MU, INDEPENDENT, SHAPE),
             "colour": (MU[1:], MIX[1:, 1:], (1, 1, 3))}
MASK = np.array([1.0, 1.0, 0.0, 0.0], np.float32).reshape(SHAPE)
KNOWN, UNKNOWN = [0, 1], [2, 3]
N = 1000


def oracle_x0(mu, mix, x, level, denoises):
    """E[x_0 | x] of N(mu, mix mix^T) at x = x_0 + level n, or the consistency function there:
    mu + U diag(g) U^T (x - mu) with g = l / (l + level^2), or sqrt((l + sigma_min^2) /
    (l + level^2)), for the eigenpairs (l, U) of the covariance."""
    eig, u = np.linalg.eigh(mix @ mix.T)
    low = 0.0 if denoises else CONSISTENCY_SIGMA_MIN**2
    g = (eig[None] + low) / (eig[None] + level.reshape(-1, 1) ** 2)
    g = g if denoises else jnp.sqrt(g)
    flat = x.reshape(x.shape[0], mu.size) - mu
    return (mu + ((flat @ u) * g) @ u.T).reshape(x.shape).astype(x.dtype)


@functools.cache  # one network per setting, so that its compiled samplers are reused
def oracle_model(process_name="ddpm", param_name="eps", mix_name="correlated"):
    """A DiffusionModel whose network is the exact one of N(MU, mix mix^T) for any process and
    parameterisation (tests/test_contract.py's oracle network, for a full covariance)."""
    process = process_of(process_name)
    param = PARAMETERISATIONS[param_name]
    mu, mix, shape = GAUSSIANS[mix_name]

    def network(params, x_in, c, y):
        del params, y
        t = process.t_of_network_time(c)
        alpha = process.alpha(t).reshape(-1, 1, 1, 1)
        sigma = process.sigma(t).reshape(-1, 1, 1, 1)
        x_model = x_in / param.network_input(jnp.ones_like(x_in), alpha, sigma, SIGMA_DATA)
        x0 = oracle_x0(mu, mix, x_model / alpha, sigma / alpha, param.denoises)
        return param.target(x0, (x_model - alpha * x0) / sigma, alpha, sigma, SIGMA_DATA)

    return DiffusionModel(params=None, schedule=process, model=network, image_shape=shape,
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


@pytest.mark.parametrize("method", [
    "replace", "ddnm", pytest.param("repaint", marks=pytest.mark.slow)])  # repaint: ~5 s
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
@pytest.mark.slow  # three methods at 1,000 draws: ~10 s
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
    ("ddpm", "eps", "ddpm"),
    pytest.param("edm", "edm", "heun", marks=pytest.mark.slow),  # each process: ~3 s
    pytest.param("flow_matching", "velocity", "euler", marks=pytest.mark.slow)])
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


def test_ddnm_plus_scales_closed_form():
    """DDNM+ (arXiv 2212.00490 Eq. 19) at known values, coef 0.5, sigma_y 0.1 (full correction
    brings std 0.05): sigma_t 0.1 >= 0.05 gives lambda 1, Phi = 0.01 - 0.0025, so the step's
    noise is sqrt(0.75) of the posterior's; sigma_t 0.02 < 0.05 gives lambda 0.4 and no noise;
    sigma_t 0 (DDPM's last step) lambda 0; sigma_y 0 lambda 1 and the full noise (DDNM)."""
    lam, scale = inverse.ddnm_plus_scales(np.full(3, 0.5), np.array([0.1, 0.02, 0.0]), 0.1)
    np.testing.assert_allclose(lam, [1.0, 0.4, 0.0], rtol=1e-12)
    np.testing.assert_allclose(scale, [np.sqrt(0.75), 0.0, 0.0], atol=1e-12)
    lam, scale = inverse.ddnm_plus_scales(np.full(2, 0.5), np.array([0.1, 0.0]), 0.0)
    np.testing.assert_array_equal(lam, [1.0, 1.0])
    np.testing.assert_array_equal(scale, [1.0, 0.0])


@pytest.mark.slow  # two 20-step scans at 64 draws: ~5 s
def test_ddnm_plus_follows_a_noisy_measurement():
    """y = A x_0 + sigma_y n (2x pooling, sigma_y = 0.1, 20 steps, 64 draws): sigma_y = 0 is DDNM
    as without the option (the same array; A x = y to float32), while DDNM+ (sigma_y = 0.1) no
    longer meets y exactly but stays near it: measured rms(A x - y) 0.074 and rms(A x - A x_0)
    0.116 (the measurement's own noise is 0.1), against 0.42 for unconditional samples."""
    model, sigma_y = oracle_model(), 0.1
    x = data(MIX, 64, seed=2)
    op = operators.make_operator("downsample", x.shape, factor=2)
    clean = np.asarray(op.apply(jnp.asarray(x)))
    y = (clean + sigma_y * np.random.default_rng(0).standard_normal(clean.shape)).astype(
        np.float32)

    def ddnm(**options):
        out = jaxdiff.restore(model, jax.random.key(0), y, "downsample", factor=2,
                              method="ddnm", num_steps=20, clip_denoised=False, **options)
        return np.asarray(out), np.asarray(op.apply(out))

    (zero, a_zero), (default, _) = ddnm(sigma_y=0.0), ddnm()
    np.testing.assert_array_equal(zero, default)
    np.testing.assert_allclose(a_zero, y, atol=1e-5)
    _, a_noisy = ddnm(sigma_y=sigma_y)
    rms = np.sqrt(np.mean((a_noisy - y) ** 2))
    assert 0.2 * sigma_y < rms < sigma_y, rms
    assert 0.5 * sigma_y < np.sqrt(np.mean((a_noisy - clean) ** 2)) < 1.5 * sigma_y


W = np.array([0.0, 0.0, 1.0, 1.0], np.float32).reshape(SHAPE)  # the unknown pixels' sum


def linear_classifier(params, x, t):
    """logits (k <W, x>, -k <W, x>): label 0 pulls the unknown pixels' sum up (a noisy classifier
    read at any level)."""
    del t
    score = params["k"] * jnp.sum(x * W, axis=(1, 2, 3))
    return jnp.stack([score, -score], axis=-1)


@pytest.mark.parametrize("method, sampler", [
    ("replace", "ddpm"), pytest.param("ddnm", "ddim", marks=pytest.mark.slow)])  # ddim: ~5 s
def test_classifier_guidance_composes_with_editing(method, sampler):
    """Classifier guidance (`sample`'s classifier=, classifier_params=, classifier_scale=) on the
    mean (ddpm) and on eps (ddim): asking label 0 of a linear classifier of the unknown pixels'
    sum raises that sum over unguided inpainting of the same key, by more than 0.15 (measured
    0.29 with replace on ddpm, 2.9 with ddnm on ddim; the unknown pixels' sum has std 0.53 under
    the data), and the known pixels stay the input's."""
    model = oracle_model()
    x = data(MIX, 256, seed=9)

    def run(**guide):
        out = jaxdiff.inpaint(model, jax.random.key(0), x, MASK, method, sampler=sampler,
                              num_steps=10, clip_denoised=False, **guide)
        return np.asarray(out)

    plain = run()
    guided = run(classifier=linear_classifier, classifier_params={"k": jnp.float32(2.0)},
                 labels=np.zeros(256, np.int32), classifier_scale=2.0)
    np.testing.assert_allclose(guided[:, 0], x[:, 0], atol=1e-6)
    shift = np.mean(np.sum((guided - plain) * W, axis=(1, 2, 3)))
    assert shift > 0.15, shift


@pytest.mark.slow  # DPS and plain sampling at 1,000 draws: ~5 s
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


@pytest.mark.slow  # two scans on the colour oracle: ~3 s
def test_colourisation_keeps_the_grey_and_draws_the_colour():
    """A colour toy (one RGB pixel, correlated channels): DDNM and replacement with the grey
    operator (A = channel mean) return colours whose mean is the given grey, to float32, and
    that vary along the colour directions the grey does not fix."""
    model = oracle_model(mix_name="colour")
    mu, mix, _ = GAUSSIANS["colour"]
    x = np.clip(mu + np.random.default_rng(8).standard_normal((64, 3)) @ mix.T, -1, 1)
    grey = x.mean(-1).reshape(64, 1, 1, 1).astype(np.float32)
    for method in ("ddnm", "replace"):
        out = np.asarray(jaxdiff.restore(model, jax.random.key(0), grey, "grey", method=method,
                                         num_steps=20, clip_denoised=False))
        np.testing.assert_allclose(out.mean(-1, keepdims=True), grey, atol=1e-5)
        assert np.std(out[..., 0] - out[..., 1]) > 0.05


# ---------------------------------------------------------------------------------------------
# SDEdit, interpolation, consistency models


def test_sdedit_ends_are_the_guide_and_plain_sampling():
    """strength 0 returns the guide; strength 1 is `jaxdiff.sample` with the same key (ddpm, so
    the step noise is compared too)."""
    model = oracle_model()
    guide = data(MIX, 64, seed=3)
    rng = jax.random.key(4)
    np.testing.assert_array_equal(jaxdiff.edit(model, rng, guide, 0.0, "ddpm", num_steps=20),
                                  guide)
    full = jaxdiff.edit(model, rng, guide, 1.0, "ddpm", num_steps=20, clip_denoised=False)
    plain = jaxdiff.sample(model, rng, "ddpm", num_samples=64, num_steps=20, clip_denoised=False)
    np.testing.assert_allclose(full, plain, atol=1e-6)


@pytest.mark.slow  # two more sampler compilations: ~3 s
def test_sdedit_at_low_strength_stays_near_the_guide():
    """Measured mean |x - guide|: 0.11 at strength 0.1, 0.39 at 0.3, 0.49 for plain samples;
    strength 0.1 must stay within half the plain samples' distance."""
    model, guide, rng = oracle_model(), data(MIX, 64, seed=3), jax.random.key(4)
    plain = jaxdiff.sample(model, rng, "ddpm", num_samples=64, num_steps=20, clip_denoised=False)
    near = jaxdiff.edit(model, rng, guide, 0.1, "ddpm", num_steps=20, clip_denoised=False)
    moved = float(np.mean(np.abs(near - guide)))
    assert moved < 0.5 * np.mean(np.abs(np.asarray(plain) - guide)), moved


@pytest.mark.slow  # DDIM inversion with fixed-point iterations and decoding: ~5 s
def test_interpolation_ends_reproduce_the_inputs():
    """With the exact denoiser, DDIM inversion (3 fixed-point iterations, the default) and
    decoding on 50 steps return a and b within 0.005 (measured max 0.0016; 0.11 without the
    iterations, 0.029 with none at 200 steps); the midpoint differs from both."""
    model = oracle_model()
    a, b = data(MIX, 4, seed=5), data(MIX, 4, seed=6)
    path = np.asarray(jaxdiff.interpolate(model, a, b, num=5))
    assert path.shape == (4, 5, *SHAPE)
    np.testing.assert_allclose(path[:, 0], a, atol=0.005)
    np.testing.assert_allclose(path[:, -1], b, atol=0.005)
    assert np.min(np.abs(path[:, 2] - a).max(axis=(1, 2, 3))) > 0.05


def test_consistency_editing_is_cm_algorithm_4():
    """A consistency model (the exact consistency function of the independent pixels, on EDM's
    process) inpaints in 3 steps: known pixels exact, the others drawn from their marginal
    (mean within 4 standard errors, std within 10%: the multistep sampler's own accuracy)."""
    model = oracle_model("edm", "consistency", "independent")
    x = data(INDEPENDENT, N, seed=7)
    out = np.asarray(jaxdiff.inpaint(model, jax.random.key(0), x, MASK, "consistency",
                                     sigmas=(80.0, 1.0, 0.3), clip_denoised=False))
    out = out.reshape(N, D)
    np.testing.assert_array_equal(out[:, KNOWN], x.reshape(N, D)[:, KNOWN])
    std = np.sqrt(np.diag(INDEPENDENT @ INDEPENDENT.T))[UNKNOWN]
    assert np.all(np.abs(out[:, UNKNOWN].mean(0) - MU[UNKNOWN]) < 4 * std / np.sqrt(N))
    np.testing.assert_allclose(out[:, UNKNOWN].std(0), std, rtol=0.1)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, before anything compiles


def _bad_calls():
    model, cm = oracle_model(), oracle_model("edm", "consistency", "independent")
    x = data(MIX, 2)
    rng = jax.random.key(0)
    return {
        "unknown editing method 'paint'": lambda: jaxdiff.inpaint(model, rng, x, MASK, "paint"),
        r"mask of shape \(3,\)": lambda: jaxdiff.inpaint(model, rng, x, np.ones(3)),
        "only 0 .* and 1": lambda: jaxdiff.inpaint(model, rng, x, MASK * 0.5),
        r"must lie in \[-1, 1\]": lambda: jaxdiff.inpaint(model, rng, 2 * x + 3, MASK),
        r"shape \[B, \*\(2, 2, 1\)\]": lambda: jaxdiff.inpaint(model, rng, np.zeros((2, 4, 4, 1)),
                                                            MASK),
        "strength must lie": lambda: jaxdiff.edit(model, rng, x, 1.5),
        "strength must be": lambda: jaxdiff.edit(model, rng, x, -0.1),
        "unknown operator 'blur'": lambda: jaxdiff.restore(model, rng, x, "blur"),
        "factor=3": lambda: jaxdiff.restore(model, rng, x[:, :1, :1], factor=3),
        r"shape \[B, \*\(1, 1, 1\)\]": lambda: jaxdiff.restore(model, rng, x, factor=2),
        "needs a consistency model": lambda: jaxdiff.inpaint(model, rng, x, MASK, "consistency"),
        "needs a denoising model": lambda: jaxdiff.inpaint(cm, rng, x, MASK, "replace"),
        "takes sampler one of": lambda: jaxdiff.inpaint(model, rng, x, MASK, "repaint",
                                                        sampler="ddim"),
        "takes no option 'jump'": lambda: jaxdiff.inpaint(model, rng, x, MASK, jump=3),
        "resamplings must be": lambda: jaxdiff.inpaint(model, rng, x, MASK, resamplings=0),
        "classifier guidance needs classifier_params and labels": lambda: jaxdiff.inpaint(
            model, rng, x, MASK, "replace", classifier=linear_classifier),
        "classifier= got a diffusion model": lambda: jaxdiff.inpaint(
            model, rng, x, MASK, "replace", classifier=model, labels=[0, 1]),
        "sigma_y must be": lambda: jaxdiff.inpaint(model, rng, x, MASK, "ddnm", sigma_y=-0.1),
        r"sigma_y > 0 \(DDNM\+\) needs sampler 'ddpm'": lambda: jaxdiff.inpaint(
            model, rng, x, MASK, "ddnm", sampler="ddim", sigma_y=0.1),
        "rng must be": lambda: jaxdiff.inpaint(model, 0, x, MASK, "replace", num_steps=2),
        "labels given to an unconditional": lambda: jaxdiff.inpaint(model, rng, x, MASK,
                                                                    labels=[0, 1]),
    }


@pytest.mark.parametrize("match", list(_bad_calls()))
def test_bad_input_is_one_clear_line(match):
    with pytest.raises(ValueError, match=match) as error:
        _bad_calls()[match]()
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# The digits, held out

digits_demo = test_train.digits_demo  # the `make demo` workdir, trained once per test run


def digits_label_kept(model, cache_dir, num=100, num_steps=50):
    """Share of the first `num` test digits the digits classifier gives their true label: after
    inpainting the lower half (ddnm, repaint), after 2x super-resolution (ddnm), and for samples
    with no observation (the null label), each on the chain respaced to `num_steps` levels."""
    classifier = digits_scorer.load_classifier(str(cache_dir))
    x, labels = (a[:num] for a in digits_arrays("test"))
    rng = jax.random.key(0)
    mask = MASKS["lower_half"](model.image_shape)
    y = operators.make_operator("downsample", x.shape, factor=2).apply(jnp.asarray(x))
    images = {
        "inpaint ddnm": jaxdiff.inpaint(model, rng, x, mask, "ddnm", num_steps=num_steps),
        "inpaint repaint": jaxdiff.inpaint(model, rng, x, mask, "repaint", num_steps=num_steps,
                                           jump_length=5, resamplings=5),
        "2x ddnm": jaxdiff.restore(model, rng, y, "downsample", factor=2, num_steps=num_steps),
        "no observation": jaxdiff.sample(model, rng, "ddpm", num_samples=num,
                                         num_steps=num_steps,
                                         labels=np.full(num, model.num_classes)),
    }
    return {k: float(np.mean(digits_scorer.predict(classifier, v) == labels))
            for k, v in images.items()}


@pytest.mark.slow  # the `make demo` run (digits_demo), then four edits of 100 digits: 5.5 min
def test_digits_edits_keep_the_label(digits_demo, tmp_path):
    """Measured on the first 100 test digits (seed 0, the `make demo` model): inpainting the
    lower half keeps 0.46 of the labels with DDNM, 0.47 with RePaint, 2x super-resolution
    (DDNM) 0.66; samples with no observation 0.08 (chance). Thresholds: about 2 standard errors
    (0.05 at 100 digits) below."""
    kept = digits_label_kept(jaxdiff.load(digits_demo[0]), tmp_path)
    assert kept["no observation"] < 0.2, kept
    assert kept["inpaint ddnm"] > 0.35 and kept["inpaint repaint"] > 0.35, kept
    assert kept["2x ddnm"] > 0.55, kept


@pytest.mark.slow  # CD of the `make demo` model (300 steps, as test_train's), then three edits
def test_consistency_model_edits_digits_in_two_steps(digits_demo, tmp_path):
    """CM Alg. 4 with the CD student of the `make demo` model (levels 80 and 0.821), on the
    first 100 test digits: inpainting the lower half keeps 0.51 of the labels, 2x
    super-resolution 0.52 (measured, seed 0; one step 0.43, three levels 80, 2, 0.5: 0.48);
    two-step samples with no observation 0.1 (chance)."""
    student = test_train.with_overrides(digits_cd.get_config(), {
        "distill.teacher": digits_demo[0], "training.num_steps": test_train.DISTILL_STEPS,
        "training.checkpoint_every": test_train.DISTILL_STEPS, "training.sample_every": 0,
        "training.ema_decay": 0.98})
    train.train_and_evaluate(student, str(tmp_path / "cd"))
    model = jaxdiff.load(str(tmp_path / "cd"))
    classifier = digits_scorer.load_classifier(str(tmp_path))
    x, labels = (a[:100] for a in digits_arrays("test"))
    rng, sigmas = jax.random.key(0), (80.0, 0.821)
    y = operators.make_operator("downsample", x.shape, factor=2).apply(jnp.asarray(x))
    images = {
        "inpaint": jaxdiff.inpaint(model, rng, x, MASKS["lower_half"](model.image_shape),
                                   "consistency", sigmas=sigmas),
        "2x": jaxdiff.restore(model, rng, y, "downsample", method="consistency", sigmas=sigmas),
        "none": jaxdiff.sample(model, rng, "consistency", num_samples=100, sigmas=sigmas,
                               labels=np.full(100, model.num_classes)),
    }
    kept = {k: float(np.mean(digits_scorer.predict(classifier, v) == labels))
            for k, v in images.items()}
    assert kept["none"] < 0.2 and kept["inpaint"] > 0.4 and kept["2x"] > 0.4, kept
