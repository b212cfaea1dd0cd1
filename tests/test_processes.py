"""Noise processes against closed forms: the discrete chain's log-SNR view and EDM's process."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdiff import diffusion, processes
from jaxdiff.config import default_config
from jaxdiff.processes import FlowMatchingProcess, VEProcess, karras_sigmas, make_process
from jaxdiff.schedules import BETA_SCHEDULES, beta_schedule, make_schedule

T = 1000


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_discrete_schedule_is_a_process_with_todays_numbers(name):
    """alpha, sigma and lambda at integer t are the float64 DDPM quantities to float32 rounding
    (1e-7 relative for the stored tables; a few ulp for the interpolating functions)."""
    betas = beta_schedule(name, T)
    a_bar = np.cumprod(1.0 - betas)
    sched = make_schedule(name, T)
    t = jnp.arange(T)
    np.testing.assert_allclose(np.asarray(sched.log_snrs, np.float64), np.log(a_bar / (1 - a_bar)),
                               rtol=1e-7, atol=1e-7)
    alpha, sigma = diffusion.alpha_sigma(sched, t, 2)
    np.testing.assert_allclose(np.asarray(alpha[:, 0], np.float64), np.sqrt(a_bar), rtol=1e-7)
    np.testing.assert_allclose(np.asarray(sigma[:, 0], np.float64), np.sqrt(1 - a_bar), rtol=1e-7)
    np.testing.assert_allclose(np.asarray(sched.alpha(t.astype(jnp.float32))), np.sqrt(a_bar),
                               rtol=2e-6, atol=1e-18)  # `sqrt` reaches a_bar ~ 1e-40
    np.testing.assert_allclose(np.asarray(sched.sigma(t.astype(jnp.float32))),
                               np.sqrt(1 - a_bar), rtol=2e-6, atol=1e-7)
    # exp(-lambda / 2) of a float32 lambda: relative error |lambda| / 2 ulp (|lambda| <= 90 here).
    np.testing.assert_allclose(sched.sigmas, np.sqrt((1 - a_bar) / a_bar), rtol=3e-6)


def test_discrete_log_snr_is_linear_between_steps_and_inverts():
    sched = make_schedule("cosine", 100)
    lam = np.asarray(sched.log_snrs, np.float64)
    t = jnp.asarray([0.0, 2.25, 50.5, 98.75, 99.0])
    expected = np.interp(np.asarray(t), np.arange(100), lam)
    np.testing.assert_allclose(np.asarray(sched.log_snr(t)), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sched.t_of_log_snr(sched.log_snr(t))), t, atol=1e-3)
    alpha, sigma = sched.alpha(t), sched.sigma(t)
    np.testing.assert_allclose(np.asarray(alpha**2 + sigma**2), 1.0, rtol=1e-6)  # VP


def test_nearest_step_of_a_noise_level():
    """t_of_sigma inverts the levels; round_sigma and network_time take the nearest step in log
    sigma (EDM's iDDPMPrecond.round_sigma), with the lower step at a tie."""
    sched = make_schedule("linear", 1000)
    sigmas = sched.sigmas
    np.testing.assert_allclose(sched.t_of_sigma(jnp.asarray(sigmas)), np.arange(1000), atol=2e-3)
    np.testing.assert_array_equal(sched.network_time(sched.t_of_sigma(jnp.asarray(sigmas))),
                                  np.arange(1000))
    # Just above step 500's level in log sigma, but nearer to it than to step 501's.
    between = np.exp(0.4 * np.log(sigmas[501]) + 0.6 * np.log(sigmas[500]))
    assert int(sched.network_time(sched.t_of_sigma(jnp.asarray([between])))[0]) == 500
    np.testing.assert_allclose(sched.round_sigma(jnp.asarray([between])), [sigmas[500]],
                               rtol=1e-5)
    assert sched.network_time(sched.t_of_sigma(jnp.asarray([1e-6, 1e6]))).tolist() == [0, 999]


def _process(name: str):
    config = default_config()
    config.diffusion.process = name
    return make_process(config.diffusion)


@pytest.mark.parametrize("name", tuple(processes.PROCESSES))
def test_every_process_answers_the_protocol_under_jit(name):
    """The contract of a process: sigma / alpha = exp(-lambda / 2), t_of_sigma and t_of_log_snr
    invert it, round_sigma is idempotent and near, every spacing's grid decreases inside the
    range, training times lie where the process is defined; all of it traced."""
    process = _process(name)
    processes.check_process(process)
    lo, hi = max(process.sigma_min, 0.002), min(process.sigma_max, 80.0)
    t = jnp.asarray(process.timesteps(12, process.default_spacing, lo, hi, 7.0), jnp.float32)
    assert np.all(np.diff(np.asarray(t)) < 0)

    @jax.jit
    def answers(t):
        sigma = processes.noise_level(process, t)
        return (sigma, process.log_snr(t), process.t_of_sigma(sigma),
                process.t_of_log_snr(process.log_snr(t)), process.round_sigma(sigma),
                process.network_time(t))

    sigma, lam, t_back, t_lam, rounded, net_t = answers(t)
    np.testing.assert_allclose(sigma, np.exp(-0.5 * np.asarray(lam)), rtol=2e-5)
    np.testing.assert_allclose(t_back, t, rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(t_lam, t, rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(process.round_sigma(rounded), rounded, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(net_t)))
    for spacing in processes.SPACINGS:
        times = process.timesteps(8, spacing, lo, hi, 7.0)
        levels = np.asarray(processes.noise_level(process, jnp.asarray(times)))
        assert np.all(np.diff(levels) <= 0), spacing
        assert process.sigma_min * 0.999 <= levels.min() and levels.max() <= process.sigma_max \
            * 1.001, spacing
    draws = process.sample_t(jax.random.key(0), (1000,))
    process.check_t(draws, 1000)


def test_flow_matching_is_the_straight_path():
    """x_t = (1 - t) x_0 + t eps (rectified flow Eq. 1), sigma_edm = t / (1 - t), SD3's
    logit-normal times (Eq. 19) and shift t' = a t / (1 + (a - 1) t) (Sec. 5.3.2)."""
    process = FlowMatchingProcess()
    t = jnp.asarray([0.1, 0.5, 0.9])
    x0, noise = jnp.full((3, 2), 0.5), jnp.full((3, 2), -1.0)
    np.testing.assert_allclose(diffusion.q_sample(process, x0, t, noise),
                               np.broadcast_to((1 - np.asarray(t))[:, None] * 0.5
                                               - np.asarray(t)[:, None], (3, 2)),
                               rtol=1e-6)
    np.testing.assert_allclose(processes.noise_level(process, t), t / (1 - t), rtol=1e-6)
    draws = np.asarray(process.sample_t(jax.random.key(1), (40000,)))
    logits = np.log(draws / (1 - draws))
    assert abs(logits.mean()) < 0.02 and abs(logits.std() - 1.0) < 0.02
    shifted = FlowMatchingProcess(shift=3.0)
    np.testing.assert_allclose(shifted.shifted(t), 3 * t / (1 + 2 * t), rtol=1e-6)
    u = np.asarray(shifted.sample_t(jax.random.key(1), (40000,)))
    np.testing.assert_allclose(np.sort(u), np.sort(3 * draws / (1 + 2 * draws)), rtol=1e-5)
    with pytest.raises(ValueError, match="t must be finite and lie in"):
        process.check_t(np.asarray([0.5, 1.5]), 2)


def test_ve_process_is_edms():
    process = VEProcess(sigma_min=0.002, sigma_max=80.0)
    sigma = jnp.asarray([0.002, 0.5, 80.0])
    np.testing.assert_allclose(process.log_snr(sigma), -2 * np.log(np.asarray(sigma)), rtol=1e-6)
    np.testing.assert_allclose(process.t_of_log_snr(process.log_snr(sigma)), sigma, rtol=1e-5)
    np.testing.assert_array_equal(process.alpha(sigma), 1.0)
    np.testing.assert_allclose(process.network_time(sigma), np.log(np.asarray(sigma)) / 4,
                               rtol=1e-6)
    x0, noise = jnp.ones((3, 2)), jnp.full((3, 2), 2.0)
    np.testing.assert_allclose(diffusion.q_sample(process, x0, sigma, noise),
                               np.broadcast_to(1.0 + 2.0 * np.asarray(sigma)[:, None], (3, 2)),
                               rtol=1e-6)
    # EDM's training distribution: ln sigma ~ N(P_mean, P_std^2).
    draws = np.log(np.asarray(process.sample_t(jax.random.key(0), (20000,))))
    assert abs(draws.mean() + 1.2) < 0.03 and abs(draws.std() - 1.2) < 0.03


def test_karras_sigmas_are_eq_5():
    s = karras_sigmas(18, 0.002, 80.0, 7.0)
    i = np.arange(18)
    expected = (80.0 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s, expected, rtol=1e-12)
    assert s[0] == pytest.approx(80.0) and s[-1] == pytest.approx(0.002)


def test_vp_log_snr_functions_agree():
    lam = jnp.linspace(-10.0, 10.0, 7)
    alpha, sigma = jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))  # VDM Eq. 4
    np.testing.assert_allclose(np.asarray(jnp.log(alpha**2 / sigma**2)), lam, atol=1e-4)
    np.testing.assert_allclose(processes.edm_sigma(lam), np.asarray(sigma / alpha), rtol=1e-5)
    np.testing.assert_allclose(processes.log_snr_of_sigma(processes.edm_sigma(lam)), lam,
                               atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sigma_min=1.0, sigma_max=1.0), "sigma_min=1.0, sigma_max=1.0"),
    (dict(sigma_min=5.0, sigma_max=1.0), "sigma_min=5.0"),
    (dict(sigma_min=0.0), "sigma_min=0.0"),
    (dict(p_std=0.0), "p_std"),
])
def test_ve_process_rejects_bad_ranges(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VEProcess(**kwargs)


def test_unknown_process_is_an_error():
    with pytest.raises(ValueError, match="'vp-sde'"):
        make_process(ml_collections.ConfigDict({"process": "vp-sde"}))
