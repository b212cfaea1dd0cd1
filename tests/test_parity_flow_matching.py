"""Cross-framework parity of flow-matching sampling: jaxdiff's `euler` on `FlowMatchingProcess`
against diffusers' `FlowMatchEulerDiscreteScheduler` (diffusers 0.42), with shift 1 and 3.

The grid. diffusers' `set_timesteps(sigmas=u)` shifts the given times u, t = a u / (1 + (a - 1)
u), exactly as jaxdiff's `uniform` spacing shifts its even times between the times of
sigma_max and sigma_min (`FlowMatchingProcess.timesteps`); both end at t = 0. Where they differ
by design: diffusers' default grid (`set_timesteps(N)`) starts at t = 1 (pure noise, EDM's
sigma = inf), which jaxdiff's range leaves out (t_max = 0.999: its samplers move EDM's
x / (1 - t)); and it ends at the shift applied twice to 1/T (its sigma_min is stored shifted
and shifted again), where jaxdiff shifts a range once.

The step. jaxdiff's Euler runs in EDM's frame x = x_t / (1 - t), s = t / (1 - t), with the
denoiser D = x_t - t v of a velocity v (the `velocity` parameterisation, alpha + sigma = 1):
(x - D) / s = (x_t t / (1 - t) + t v) (1 - t) / t = x_t + (1 - t) v, and s' - s = (t' - t) /
((1 - t)(1 - t')), so x_t' = (1 - t') (x + (s' - s)(x - D) / s) = x_t (1 - t') / (1 - t) +
(t' - t) / (1 - t) (x_t + (1 - t) v) = x_t + (t' - t) v: rectified flow's Euler step, the
scheduler's `prev_sample = sample + dt * model_output`, exactly.

The network is analytic in both frameworks: the exact velocity E[eps - x_0 | x_t] of a
symmetric two-Gaussian mixture, so every difference is the samplers'. Needs the `parity` extra.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jaxdiff  # noqa: E402
from jaxdiff.processes import FlowMatchingProcess  # noqa: E402
from jaxdiff.samplers import make_grid  # noqa: E402

pytestmark = pytest.mark.parity

T = 1000  # diffusers' num_train_timesteps; both networks are fed 1000 t
DIM, BATCH, STEPS = 8, 16, 28
MIX_STD = 0.4  # the data: (N(m, s^2 I) + N(-m, s^2 I)) / 2
MIX_MEAN = np.linspace(-0.8, 0.8, DIM)
# The unshifted range of times: the process's widest (t_max = 0.999) down to 1/T.
U_HI, U_LO = 0.999, 1.0 / T


def mixture_velocity(xp, x, t, mean):
    """E[eps - x_0 | x_t] at x_t = (1 - t) x_0 + t eps: with V = (1 - t)^2 s^2 + t^2 and the
    posterior mean of the component m_bar = m tanh((1 - t) <x_t, m> / V), E[x_0 | x_t] = m_bar +
    (1 - t) s^2 / V (x_t - (1 - t) m_bar) and E[eps | x_t] = t / V (x_t - (1 - t) m_bar)."""
    a = 1.0 - t
    var = a**2 * MIX_STD**2 + t**2
    m_bar = mean * xp.tanh(a * (x * mean).sum(axis=1, keepdims=True) / var)
    resid = x - a * m_bar
    return t / var * resid - (m_bar + a * MIX_STD**2 / var * resid)


def velocity_jax(params, x, c, y):
    return mixture_velocity(jnp, x, (c / T)[:, None], jnp.asarray(MIX_MEAN, jnp.float32))


def velocity_torch(x, timestep):
    return mixture_velocity(torch, x, timestep / T, torch.tensor(MIX_MEAN, dtype=torch.float32))


def scheduler(shift: float):
    return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)


def jax_grid(shift: float):
    """jaxdiff's uniform grid over the unshifted times [U_LO, U_HI] (given as EDM levels)."""
    return make_grid(FlowMatchingProcess(shift=shift), STEPS, "uniform",
                     sigma_min=U_LO / (1 - U_LO), sigma_max=U_HI / (1 - U_HI))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_shifted_uniform_grid_is_diffusers(shift):
    """The same unshifted range gives the same shifted times (within float32, 1e-6); diffusers'
    default grid is the shift of an even grid from 1 to the twice-shifted 1/T."""
    sched = scheduler(shift)
    sched.set_timesteps(sigmas=np.linspace(U_HI, U_LO, STEPS))
    np.testing.assert_allclose(jax_grid(shift).t, sched.sigmas.numpy()[:-1], atol=1e-6)
    assert sched.sigmas[-1] == 0.0
    process = FlowMatchingProcess(shift=shift)
    sched.set_timesteps(STEPS)
    default = np.asarray(process.shifted(np.linspace(1.0, float(process.shifted(1.0 / T)),
                                                     STEPS)))
    np.testing.assert_allclose(sched.sigmas.numpy()[:-1], default, atol=1e-6)
    assert sched.sigmas[0] == 1.0 > process.t_max


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_matches_flow_match_euler_discrete_scheduler(shift):
    """Same grid, network and first point x_{t_0} = t_0 z: every step's x_t and the samples agree
    within 1e-4 (data scale 1). Measured: 3.1e-5 at shift 1, 5.6e-6 at shift 3, nearly all
    jaxdiff's float32 rounding (3.1e-5 from a float64 Euler; diffusers' float32 is closer): its
    EDM frame x_t / (1 - t) is 1000 x_t at t_0 = 0.999, so the first step rounds at 1e3 times
    the data's scale (8.8e-6 after it at shift 1), where the scheduler's x_t frame does not."""
    grid = jax_grid(shift)
    noise = np.asarray(jax.random.normal(jax.random.key(0), (BATCH, DIM)))
    x, path = jaxdiff.sample(
        None, jax.random.key(1), "euler", model=velocity_jax,
        schedule=FlowMatchingProcess(shift=shift), shape=(DIM,), model_output_type="velocity",
        clip_denoised=False, x_T=noise, num_steps=STEPS, spacing="uniform",
        sigma_min=U_LO / (1 - U_LO), sigma_max=U_HI / (1 - U_HI), return_trajectory=True)
    # jaxdiff's trajectory is in EDM's frame x_t / (1 - t).
    jax_path = np.asarray(path["xt"]) * (1.0 - grid.t)[:, None, None]

    sched = scheduler(shift)
    sched.set_timesteps(sigmas=np.linspace(U_HI, U_LO, STEPS))
    latents = sched.sigmas[0] * torch.tensor(noise)
    torch_path = []
    for timestep in sched.timesteps:
        torch_path.append(latents.numpy())
        latents = sched.step(velocity_torch(latents, timestep), timestep, latents).prev_sample
    np.testing.assert_allclose(jax_path, np.stack(torch_path), atol=1e-4)
    np.testing.assert_allclose(np.asarray(x), latents.numpy(), atol=1e-4)
    # Not trivially equal: the samples moved away from the start and between the shifts.
    assert np.abs(np.asarray(x) - jax_path[0]).max() > 0.5
