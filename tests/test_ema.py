"""The sampling EMA's decay: fixed, or EDM's half-life with its ramp-up, at known steps."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import train
from jaxdiff.config import default_config, validate
from jaxdiff.data import create_dataset
from jaxdiff.train import ema_rate
from tests.test_train import _steps_on, tiny_toy


def _config(halflife_kimg=None, rampup=None, batch=512):
    config = default_config()
    config.training.batch_size = batch
    config.training.ema_halflife_kimg = halflife_kimg
    config.training.ema_rampup_ratio = rampup
    return config


def test_without_a_half_life_the_decay_is_ema_decay_at_every_step():
    config = _config()
    config.training.ema_decay = 0.98
    assert [ema_rate(config, jnp.int32(s)) for s in (0, 1, 10**6)] == [0.98] * 3


def test_half_life_without_ramp_up_is_constant():
    # 0.5 ** (512 / 500,000): EDM config F's per-step decay (App. F.3).
    rates = [float(ema_rate(_config(500.0), jnp.int32(s))) for s in (0, 7, 10**6)]
    np.testing.assert_allclose(rates, [0.5 ** (512 / 500_000)] * 3, rtol=1e-6)
    np.testing.assert_allclose(rates[0], 0.99929, atol=5e-6)


def test_ramp_up_caps_the_half_life_at_a_fraction_of_the_images_seen():
    """NVlabs/edm training_loop.py: h = min(500k, cur_nimg * 0.05), beta = 0.5 ** (512 / h),
    cur_nimg = step * 512 before the update."""
    config = _config(500.0, 0.05)
    steps = [0, 1, 100, 1000, 10_000, 19_532, 100_000]
    expected = [0.5 ** (512 / max(min(500_000.0, s * 512 * 0.05), 1e-8)) for s in steps]
    got = [float(ema_rate(config, jnp.int32(s))) for s in steps]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
    assert got[0] == 0.0  # the first update copies the weights
    np.testing.assert_allclose(got[1], 0.5 ** 20, rtol=1e-5)  # h = 25.6 images: 1/20 batch
    np.testing.assert_allclose(got[3], 0.5 ** 0.02, rtol=1e-6)  # h = 25,600 images
    assert got[4] < got[5] == got[6]  # ramped up to 10 Mimg, then the 0.5 Mimg half-life


def test_cifar_edm_has_edms_ema_and_its_students_keep_their_fixed_decay():
    edm = importlib.import_module("experiments.cifar_edm").get_config()
    assert (edm.training.ema_halflife_kimg, edm.training.ema_rampup_ratio) == (500.0, 0.05)
    validate(edm, num_devices=1)
    for name in ("cifar_cd", "cifar_ict", "cifar_ect", "cifar_pd"):
        c = importlib.import_module(f"experiments.{name}").get_config()
        assert c.training.ema_halflife_kimg is None and c.training.ema_rampup_ratio is None


def test_the_train_step_averages_with_the_ramped_decay():
    """Two steps with ramp-up ratio 0.5: beta = 0 at step 0 (the EMA becomes p1), then
    0.5 ** (1 / 0.5) = 0.25 at step 1, so the EMA is 0.25 p1 + 0.75 p2, whatever it held before."""
    config = tiny_toy(**{"optim.warmup_steps": 0, "training.steps_per_call": 1,
                         "training.ema_halflife_kimg": 1000.0, "training.ema_rampup_ratio": 0.5})
    dataset = create_dataset(config)
    state = train.train_functions(config).init_state(jax.random.PRNGKey(0))
    state = state.replace(ema_params=jax.tree.map(jnp.zeros_like, state.ema_params))
    devices = jax.devices()[:1]

    def step_batch(i):  # [devices, B / devices, ...] -> one step of the global batch
        return {k: v.reshape(1, -1, *v.shape[2:]) for k, v in dataset.batch(i).items()
                if k in ("x", "label")}

    one, _ = _steps_on(config, devices, state, step_batch(0))
    ema1, p1 = (jax.tree.map(np.array, t) for t in (one.ema_params, one.params))  # copies
    two, _ = _steps_on(config, devices, one, step_batch(1))
    for e, p in zip(jax.tree.leaves(ema1), jax.tree.leaves(p1), strict=True):
        np.testing.assert_array_equal(e, p)
    for e, a, b in zip(jax.tree.leaves(two.ema_params), jax.tree.leaves(p1),
                       jax.tree.leaves(two.params), strict=True):
        assert np.max(np.abs(np.asarray(b) - a)) > 1e-4  # the second step moved the weights
        np.testing.assert_allclose(np.asarray(e), 0.25 * a + 0.75 * np.asarray(b),
                                   rtol=1e-5, atol=1e-7)
