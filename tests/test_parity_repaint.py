"""Cross-framework parity of RePaint (Lugmayr et al., arXiv 2201.09865 Alg. 1): jaxdiff's
`inpaint(..., method="repaint")` against diffusers' `RePaintScheduler` on the same eps-model (the
exact one of Gaussian data N(MU, MIX MIX^T), written in JAX and in torch), the same 50-step linear
DDPM chain, jump schedule and noise.

Where diffusers differs by construction (not compared pathwise, stated here):
- its pipeline (`RePaintPipeline.__call__`) reads every element t of `scheduler.timesteps` as a
  move *from* level t (`step(t)` down to t - 1, else `undo_step(t_last)` up to t - 1), so it
  walks the official code's list one level lower than the official pairing (`get_schedule_jump`
  read as the states visited, zip(ts[:-1], ts[1:])), which jaxdiff follows: its jumps start
  one level down, the last one from x_0 itself. The loop below drives the scheduler's own
  `step` and `undo_step` along the official pairing;
- its `step` draws one noise tensor for the known pixels' q(x_{t-1} | x_0) and the unknown
  pixels' posterior noise; the two act on disjoint pixels, so feeding it jaxdiff's two draws
  joined by the mask (`editing.draws`) is the same sample;
- its pipeline starts from pure noise, jaxdiff also replaces the known pixels at the first
  level: the loop below starts from jaxdiff's first state;
- its unknown part is DDIM's update with eta; at eta = 1 (used here) it is DDPM's posterior with
  the fixed_small variance, jaxdiff's `ddpm` step. Its `undo_step` goes up one training step
  at a time; on the full chain (here) that is jaxdiff's one up move per level.
Needs the `parity` extra: run by `make test-parity`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jaxdiff  # noqa: E402
from jaxdiff import editing, inverse  # noqa: E402
from jaxdiff.bundle import DiffusionModel  # noqa: E402
from tests.test_editing import MASK, MIX, MU, SHAPE, data  # noqa: E402

pytestmark = pytest.mark.parity

T = 50
SCHEDULE = jaxdiff.make_schedule("linear", T)  # betas 0.002 .. 0.4 (1000 / T times DDPM's)
COV = MIX @ MIX.T
B = 8


def eps_of(xp, x, a_bar):
    """E[eps | x_t] of N(MU, COV) at x_t = sqrt(a_bar) x_0 + sqrt(1 - a_bar) eps:
    x_0 = MU + COV (COV + s^2 I)^{-1} (x_t / sqrt(a_bar) - MU), s^2 = (1 - a_bar) / a_bar."""
    s2 = (1.0 - a_bar) / a_bar
    gain = xp.asarray(COV @ np.linalg.inv(COV + float(s2) * np.eye(len(MU))), dtype=xp.float32)
    mu = xp.asarray(MU, dtype=xp.float32)
    flat = x.reshape(x.shape[0], -1)
    x0 = mu + (flat / a_bar**0.5 - mu) @ gain.T
    return ((flat - a_bar**0.5 * x0) / (1.0 - a_bar) ** 0.5).reshape(x.shape)


def network(params, x, t, y):
    """The eps-model for jaxdiff: t is the chain's step index, a_bar the schedule's own."""
    del params, y
    step = t.astype(jnp.int32)
    a = jnp.asarray(SCHEDULE.alphas_cumprod, jnp.float32)[step].reshape(-1, 1)
    gain = jnp.asarray(GAINS, jnp.float32)[step]
    flat = x.reshape(x.shape[0], -1)
    x0 = MU + jnp.einsum("bij,bj->bi", gain, flat / jnp.sqrt(a) - MU)
    return ((flat - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)).reshape(x.shape)


GAINS = np.stack([COV @ np.linalg.inv(COV + s2 * np.eye(len(MU)))
                  for s2 in (1 - SCHEDULE.alphas_cumprod) / SCHEDULE.alphas_cumprod])
MODEL = DiffusionModel(params=None, schedule=SCHEDULE, model=network, image_shape=SHAPE,
                       model_output_type="eps")


def _scheduler(num_steps, jump_length, resamplings):
    scheduler = diffusers.RePaintScheduler(num_train_timesteps=T, eta=1.0,
                                           trained_betas=np.array(SCHEDULE.betas),
                                           clip_sample=False)
    scheduler.set_timesteps(num_steps, jump_length=jump_length, jump_n_sample=resamplings)
    return scheduler


@pytest.mark.parametrize("num_steps,jump_length,resamplings",
                         [(50, 10, 10), (50, 5, 3), (25, 4, 2), (10, 3, 5)])
def test_jump_schedule_is_diffusers(num_steps, jump_length, resamplings):
    """The levels jaxdiff's RePaint visits (`inverse.repaint_schedule`, then -1 = x_0) are
    `scheduler.timesteps` after set_timesteps(num_steps, jump_length, jump_n_sample) in units
    of the respaced chain (diffusers multiplies by T // num_steps), element by element."""
    visited = inverse.repaint_schedule(num_steps, jump_length, resamplings)
    scheduler = _scheduler(num_steps, jump_length, resamplings)
    assert visited[-1] == -1
    np.testing.assert_array_equal(visited[:-1] * (T // num_steps), scheduler.timesteps.numpy())
    downs = np.sum(np.diff(visited) < 0)
    assert downs == num_steps + (resamplings - 1) * len(range(0, num_steps - jump_length,
                                                               jump_length)) * jump_length


def _diffusers_repaint(scheduler, x_first, images, mask, step_noise, measurement_noise,
                       monkeypatch):
    """RePaint along the official pairing of `scheduler.timesteps` (+ [-1]) with the scheduler's
    `step` (eps from `eps_of` at its own float32 alphas_cumprod) and `undo_step`; scan step k
    uses jaxdiff's draws: a down move the step noise k on the unknown pixels and the measurement
    noise k + 1 on the known ones, an up move the step noise k."""
    a_bars = scheduler.alphas_cumprod
    ts = [int(t) for t in scheduler.timesteps] + [-1]
    x, original, mask = torch.tensor(x_first), torch.tensor(images), torch.tensor(mask)
    queue = []
    monkeypatch.setattr(diffusers.schedulers.scheduling_repaint, "randn_tensor",
                        lambda *args, **kwargs: queue.pop(0))
    for k, (t, t_next) in enumerate(zip(ts[:-1], ts[1:], strict=True)):
        if t_next < t:
            queue.append(mask * measurement_noise(k + 1) + (1 - mask) * step_noise(k))
            eps = eps_of(torch, x, a_bars[t])
            x = scheduler.step(eps, t, x, original, mask).prev_sample
        else:
            queue.append(step_noise(k))
            x = scheduler.undo_step(x, t_next)  # adds betas[t_next]: level t -> t + 1
    assert not queue
    return x.numpy()


@pytest.mark.parametrize("jump_length,resamplings", [(10, 3), (5, 2)])
def test_repaint_matches_diffusers_scheduler(jump_length, resamplings, monkeypatch):
    """Same model, chain, jumps and noise: jaxdiff's inpainting and the diffusers scheduler's
    agree to float32 rounding: within 5e-6 (measured 5.7e-7 and 4.2e-7; both compute in float32
    from float64 betas, diffusers keeps alphas_cumprod in float32; the noise of the next step
    instead moves them by 0.11), and the known pixels are the input's in both."""
    images = data(MIX, B, seed=11)
    rng = jax.random.key(3)
    out = np.asarray(jaxdiff.inpaint(MODEL, rng, images, MASK, "repaint", num_steps=T,
                                     jump_length=jump_length, resamplings=resamplings,
                                     clip_denoised=False))
    z, step_noise, measurement_noise = editing.draws(rng, images.shape)
    a_bar = SCHEDULE.alphas_cumprod[-1]
    first = np.where(MASK == 1, np.sqrt(a_bar) * images
                     + np.sqrt(1 - a_bar) * np.asarray(measurement_noise(0)), np.asarray(z))
    ref = _diffusers_repaint(_scheduler(T, jump_length, resamplings), first.astype(np.float32),
                             images, np.broadcast_to(MASK, images.shape).copy(),
                             lambda k: torch.tensor(np.asarray(step_noise(k))),
                             lambda k: torch.tensor(np.asarray(measurement_noise(k))),
                             monkeypatch)
    np.testing.assert_array_equal(out[..., 0, :, :], images[..., 0, :, :])
    np.testing.assert_allclose(ref[..., 0, :, :], images[..., 0, :, :], atol=1e-6)
    np.testing.assert_allclose(out, ref, atol=5e-6)
