"""The probability-flow ODE likelihood against closed forms.

Gaussian data x ~ N(mu, C) has the exact denoiser D(y, sigma) = mu + C (C + sigma^2 I)^-1 (y - mu),
and its ODE dy/du = sigma^2 (C + sigma^2 I)^-1 (y - mu) is solved in C's eigenbasis: each
coordinate z_i of y - mu grows by sqrt((l_i + sigma_max^2) / (l_i + sigma_min^2)). So the number
the solver approximates (ln N(y_T; 0, sigma_max^2 I) + ln det dy_T/dy_0) and the data's own
log-density ln N(x; mu, C) are both closed form; they differ by the VE prior's error.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import digits
from jaxdiff import likelihood
from jaxdiff.bundle import DiffusionModel, make_bundle
from jaxdiff.config import default_config
from jaxdiff.models import create_model
from jaxdiff.processes import PROCESSES, VEProcess, make_process
from jaxdiff.schedules import make_schedule
from tests.oracles import GaussianMixture

D = 16
EDM = VEProcess()  # sigma in [0.002, 80]


@dataclasses.dataclass(frozen=True)
class Gaussian:
    """N(mu, C) with C = Q diag(l) Q^T, float64 on the host."""

    mu: np.ndarray
    q: np.ndarray
    l: np.ndarray  # noqa: E741

    @classmethod
    def random(cls, seed: int, d: int = D, mean: float = 0.5, scale: float = 0.5):
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        return cls(mean * rng.uniform(-1, 1, d), q, scale**2 * rng.uniform(0.2, 1.0, d))

    def denoise(self, y, sigma, args):
        """E[x_0 | y = x_0 + sigma n], sigma [B] (Tweedie / the Gaussian posterior mean)."""
        del args
        q, lam, mu = (jnp.asarray(v, jnp.float32) for v in (self.q, self.l, self.mu))
        gain = lam / (lam + sigma[:, None] ** 2)  # [B, d]
        return mu + ((y - mu) @ q * gain) @ q.T

    def sample(self, seed: int, n: int) -> np.ndarray:
        z = np.random.default_rng(seed).standard_normal((n, len(self.l)))
        return (self.mu + (z * np.sqrt(self.l)) @ self.q.T).astype(np.float32)

    def log_density(self, x, extra_var: float = 0.0) -> np.ndarray:
        """ln N(x; mu, C + extra_var I)."""
        z = (np.asarray(x, np.float64) - self.mu) @ self.q
        var = self.l + extra_var
        return -0.5 * (np.sum(z**2 / var + np.log(2 * np.pi * var), axis=1))

    def flow(self, x, sigma_min: float, sigma_max: float) -> np.ndarray:
        """What the ODE computes exactly: ln N(y_T; 0, sigma_max^2 I) + ln |dy_T / dy_0|."""
        ratio = np.sqrt((self.l + sigma_max**2) / (self.l + sigma_min**2))
        y_T = self.mu + ((np.asarray(x, np.float64) - self.mu) @ self.q * ratio) @ self.q.T
        d = len(self.l)
        prior = -0.5 * (d * np.log(2 * np.pi * sigma_max**2) + np.sum(y_T**2, 1) / sigma_max**2)
        return prior + np.sum(np.log(ratio))


GAUSS = Gaussian.random(0)
X = GAUSS.sample(1, 8)
# (num_steps, tolerance in nats) for which each solver meets the exact flow on EDM's range; the
# errors measured at these settings (16 dimensions, float32) are in the comments.
SETTINGS = {"heun": (512, 2e-2),  # 6e-3
            "rk4": (64, 2e-3),  # 5e-4
            "dopri5": (1, 2e-3),  # 6e-4 at rtol = atol = 1e-5, 139 evaluations
            "tsit5": (1, 2e-3)}  # 2e-4


def _log_p(gauss, x, sigma_min=EDM.sigma_min, sigma_max=EDM.sigma_max, rng=None, **options):
    log_p, nfe = likelihood.ode_log_likelihood(
        gauss.denoise, x, jax.random.key(0) if rng is None else rng, sigma_min=sigma_min,
        sigma_max=sigma_max, **options)
    return np.asarray(log_p, np.float64), int(nfe)


@pytest.mark.parametrize("solver", tuple(likelihood.SOLVERS))
def test_each_solver_gives_the_gaussian_log_density(solver):
    num_steps, tolerance = SETTINGS[solver]
    got, nfe = _log_p(GAUSS, X, solver=solver, num_steps=num_steps)
    np.testing.assert_allclose(got, GAUSS.flow(X, EDM.sigma_min, EDM.sigma_max), atol=tolerance)
    # The VE prior and the start at sigma_min add 0.02 nats at most here (measured 0.011).
    np.testing.assert_allclose(got, GAUSS.log_density(X), atol=tolerance + 0.02)
    if likelihood.SOLVERS[solver].adaptive is None:
        assert nfe == likelihood.SOLVERS[solver].evaluations * num_steps


def test_heun_converges_at_second_order():
    expected = GAUSS.flow(X, EDM.sigma_min, EDM.sigma_max)
    errors = [np.abs(_log_p(GAUSS, X, solver="heun", num_steps=n)[0] - expected).max()
              for n in (64, 128, 256)]
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    assert np.all((ratios > 3.4) & (ratios < 4.6)), (errors, ratios)  # 4 = 2^2; measured ~3.7-3.9


@pytest.mark.parametrize("solver", [s for s, v in likelihood.SOLVERS.items() if v.adaptive])
def test_adaptive_solvers_report_the_evaluations_they_make(solver):
    count = [0]

    def counted(y, sigma, args):
        jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
        return GAUSS.denoise(y, sigma, args)

    log_p, nfe = likelihood.ode_log_likelihood(
        counted, X, jax.random.key(0), sigma_min=EDM.sigma_min, sigma_max=EDM.sigma_max,
        solver=solver, divergence="hutchinson")
    jax.block_until_ready(log_p)
    assert int(nfe) == count[0] > 20


@pytest.mark.parametrize("name", tuple(PROCESSES))
def test_every_process_range_gives_the_gaussian_log_density(name):
    """The ODE between each process's sigma_min and sigma_max (DDPM's linear schedule: 0.01 to
    157; EDM: 0.002 to 80). Centred data: the VE prior's error is within d s^2 / sigma_max^2."""
    config = default_config()
    config.diffusion.process = name
    process = make_process(config.diffusion)
    gauss = dataclasses.replace(GAUSS, mu=np.zeros(D))
    x = gauss.sample(2, 8)
    got, _ = _log_p(gauss, x, process.sigma_min, process.sigma_max, num_steps=128)
    np.testing.assert_allclose(got, gauss.flow(x, process.sigma_min, process.sigma_max),
                               atol=2e-3)
    smoothed = gauss.log_density(x, process.sigma_min**2)  # the data at sigma_min, exactly
    assert np.abs(got - smoothed).max() < D * gauss.l.max() / process.sigma_max**2 + 2e-3
    assert np.abs(got - gauss.log_density(x)).max() < 0.05


def test_the_ve_prior_error_is_measured():
    """The prior N(0, sigma_max^2 I) in place of the true N(mu, C + sigma_max^2 I): at a small
    sigma_max = 4 the ODE's answer moves from ln N(x; mu, C) by exactly the closed-form mismatch,
    within d s^2 / sigma_max^2 for centred data and larger by m.(x - m) / (s sigma_max) for a
    mean m."""
    sigma_max = 4.0
    centred = dataclasses.replace(GAUSS, mu=np.zeros(D))
    for gauss, bound in ((centred, D * GAUSS.l.max() / sigma_max**2),
                         (GAUSS, D * GAUSS.l.max() / sigma_max**2 + np.abs(
                             (X - GAUSS.mu) @ GAUSS.mu).max() / (np.sqrt(GAUSS.l.min())
                                                                 * sigma_max))):
        x = gauss.sample(3, 8)
        got, _ = _log_p(gauss, x, sigma_max=sigma_max, num_steps=128)
        error = got - gauss.log_density(x, EDM.sigma_min**2)
        expected = gauss.flow(x, EDM.sigma_min, sigma_max) - gauss.log_density(
            x, EDM.sigma_min**2)
        np.testing.assert_allclose(error, expected, atol=1e-3)
        assert 1e-3 < np.abs(error).max() < bound


@pytest.mark.parametrize("probe", tuple(likelihood.PROBES))
def test_hutchinson_is_unbiased(probe):
    """1024 copies of one example, each with its own probe from one key: the mean estimate lies
    within 4 standard errors of the exact divergence's answer, and the spread is not zero (C is
    not diagonal, so a Rademacher probe has variance 2 sum_{i != j} J_ij^2 too)."""
    x = np.repeat(X[:1], 1024, axis=0)
    exact, _ = _log_p(GAUSS, X[:1], num_steps=32)
    got, _ = _log_p(GAUSS, x, num_steps=32, divergence="hutchinson", probe=probe,
                    rng=jax.random.key(5))
    sem = got.std(ddof=1) / np.sqrt(len(got))
    assert sem > 1e-3
    assert abs(got.mean() - exact[0]) < 4 * sem
    other, _ = _log_p(GAUSS, x[:4], num_steps=32, divergence="hutchinson", probe=probe,
                      rng=jax.random.key(6))
    assert not np.allclose(other, got[:4])


@pytest.mark.parametrize("options, message", [
    (dict(solver="euler"), r"unknown ODE solver 'euler'; expected one of \('heun', 'rk4'"),
    (dict(divergence="skilling"), r"unknown divergence 'skilling'; expected one of \('exact'"),
    (dict(probe="normal"), r"unknown Hutchinson probe 'normal'; expected one of \('rademacher'"),
    (dict(num_steps=0), r"num_steps must be an integer >= 1, got 0"),
    (dict(rtol=0.0), r"rtol must be a number > 0, got 0.0"),
    (dict(sigma_max=math.inf), r"0 < sigma_min < sigma_max < inf"),
], ids=["solver", "divergence", "probe", "steps", "rtol", "sigma_max"])
def test_bad_options_are_refused_before_compiling(options, message):
    def never(*args):
        raise AssertionError("compiled before checking")

    kwargs = dict(sigma_min=0.002, sigma_max=80.0) | options
    with pytest.raises(ValueError, match=message):
        likelihood.ode_log_likelihood(never, X, jax.random.key(0), **kwargs)


# ---------------------------------------------------------------------------------------------
# Bits per dimension.


def test_dequantisation_fills_each_bin_and_the_offset_is_seven_bits():
    k = np.arange(256, dtype=np.uint8)[:, None].repeat(4, 1)
    y = np.asarray(likelihood.dequantise(k, jax.random.key(0)))
    np.testing.assert_array_equal(np.floor((y + 1) * 128), k)  # U[0, 1) inside bin k
    floats = k.astype(np.float32) / 127.5 - 1  # the data's [-1, 1] grid
    np.testing.assert_array_equal(likelihood.dequantise(floats, jax.random.key(0)), y)
    # The uniform density on [-1, 1)^d, 2^-d, is 8 bits per 8-bit dimension.
    assert float(likelihood.bits_per_dim(jnp.float32(-4 * np.log(2)), 4)) == pytest.approx(8.0)


def tiny_config(**diffusion):
    config = digits.get_config()
    config.model.ch = 32
    config.model.ch_mult = (1,)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.diffusion.num_timesteps = 20
    config.diffusion.update(diffusion)
    return config


@pytest.fixture(scope="module")
def tiny_bundle():
    """A tiny class-conditional digits U-Net, untrained (random weights)."""
    config = tiny_config()
    model = create_model(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                            jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: 0.05 * rng.standard_normal(s.shape, np.float32), shapes)
    return make_bundle(config, params)


@pytest.mark.slow  # ~11 s on two CPU cores: it compiles the U-Net's VJP inside the ODE solve
def test_bits_per_dim_ode_of_a_real_model(tiny_bundle):
    """Three examples in batches of two (the last padded): finite; labels reach the network
    (default: the null label); later calls reuse the first call's compilation."""
    x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1)).astype(np.uint8)
    options = dict(batch_size=2, num_steps=2, solver="heun", divergence="hutchinson")
    got = likelihood.bits_per_dim_ode(tiny_bundle, x, jax.random.key(0), **options)
    assert got["bpd"].shape == (3,) and np.all(np.isfinite(got["bpd"]))
    np.testing.assert_array_equal(got["nfe"], 4)
    compiled = likelihood._solve._cache_size()
    null = likelihood.bits_per_dim_ode(tiny_bundle, x, jax.random.key(0),
                                       labels=np.full(3, tiny_bundle.num_classes), **options)
    np.testing.assert_array_equal(null["bpd"], got["bpd"])
    labelled = likelihood.bits_per_dim_ode(tiny_bundle, x, jax.random.key(0),
                                           labels=np.array([1, 2, 3]), **options)
    assert not np.array_equal(labelled["bpd"], got["bpd"])
    assert likelihood._solve._cache_size() == compiled


def test_a_consistency_model_has_no_likelihood(tiny_bundle):
    model = dataclasses.replace(tiny_bundle, model_output_type="consistency")
    with pytest.raises(ValueError, match="no likelihood is defined for a consistency model"):
        likelihood.bits_per_dim_ode(model, np.zeros((1, 8, 8, 1), np.uint8), jax.random.key(0))


def test_bits_per_dim_ode_refuses_bad_input(tiny_bundle):
    x = np.zeros((2, 8, 8, 1), np.uint8)
    with pytest.raises(ValueError, match=r"unknown ODE solver 'rk45'"):
        likelihood.bits_per_dim_ode(tiny_bundle, x, jax.random.key(0), solver="rk45")
    with pytest.raises(ValueError, match=r"x must be \[N, \*\(8, 8, 1\)\]"):
        likelihood.bits_per_dim_ode(tiny_bundle, x[:, :4], jax.random.key(0))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        likelihood.bits_per_dim_ode(tiny_bundle, x, jax.random.key(0), labels=[1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\] .*got 11"):
        likelihood.bits_per_dim_ode(tiny_bundle, x, jax.random.key(0), labels=[0, 11])


def _oracle_eps(params, x, t, y):
    """The exact eps predictor of GAUSS_ISO at DDPM step t (`tests.oracles`), as a network."""
    del params, y
    return ISO_MIXTURE.eps(DDPM, x, t)


DDPM = make_schedule("linear", 1000)
GAUSS_ISO = Gaussian(np.array([0.3, -0.2, 0.1, 0.0]), np.eye(4), np.full(4, 0.2**2))
ISO_MIXTURE = GaussianMixture(np.ones(1), GAUSS_ISO.mu[None], np.sqrt(GAUSS_ISO.l[:1]))


def test_bits_per_dim_ode_of_a_ddpm_bundle_is_the_closed_form():
    """The whole path, samplers.denoiser's reading of a discrete eps network (fed the step
    nearest to sigma) included: the exact eps predictor of N(mu, s^2 I) as a DDPM model, on
    8-bit data dequantised with the key the function documents, against the closed-form flow in
    bits/dim. Measured: 2.2e-4 bits/dim at most with rk4's 64 steps, the effect of rounding
    sigma to DDPM's 1000 steps (dopri5: 1.3e-3 in 319 evaluations, the rounding's jumps
    costing it steps)."""
    bundle = DiffusionModel(params={}, schedule=DDPM, model=_oracle_eps, image_shape=(4,))
    x = np.round((GAUSS_ISO.sample(4, 32) + 1) * 127.5).clip(0, 255).astype(np.uint8)
    rng = jax.random.key(7)
    got = likelihood.bits_per_dim_ode(bundle, x, rng, batch_size=32)
    y = likelihood.dequantise(x, jax.random.split(jax.random.fold_in(rng, 0))[0])
    expected = likelihood.bits_per_dim(GAUSS_ISO.flow(y, DDPM.sigma_min, DDPM.sigma_max), 4)
    np.testing.assert_allclose(got["bpd"], expected, atol=1e-3)


def test_the_denoisers_kept_for_compiled_solves_are_bounded(tiny_bundle):
    """One denoise callable per network, reading and process (so a model's solves compile
    once); an evaluation loop over many models keeps only the most recent few."""
    first = likelihood._model_denoise(tiny_bundle)
    assert likelihood._model_denoise(tiny_bundle) is first
    for k in range(2 * likelihood._KEPT_DENOISERS):
        other = dataclasses.replace(tiny_bundle, schedule=make_schedule("linear", 20 + k))
        likelihood._model_denoise(other)
    assert len(likelihood._MODEL_DENOISERS) == likelihood._KEPT_DENOISERS
    assert likelihood._model_denoise(tiny_bundle) is not first
