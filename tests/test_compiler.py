"""jaxdiff.compiler: the per-backend compiler options, and that they change no result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import compiler
from jaxdiff.models.unet import UNet


def test_cpu_switches_ynnpack_fusion_and_the_concurrency_scheduler_off(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert compiler.compiler_options("cpu") == {
        "xla_cpu_experimental_ynn_fusion_type": "",
        "xla_cpu_enable_concurrency_optimized_scheduler": False}
    assert compiler.compiler_options("tpu") is None
    assert compiler.compiler_options("gpu") is None


def test_an_option_set_in_xla_flags_is_left_to_the_user(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    assert compiler.compiler_options("cpu") == {
        "xla_cpu_enable_concurrency_optimized_scheduler": False}


@pytest.mark.slow  # initialises a 16x16 U-Net and compiles it two ways per case: about 13 s
@pytest.mark.parametrize("decorate", [
    lambda f: compiler.inference_jit(f),
    lambda f: compiler.inference_jit(static_argnames=("scale",))(f),
])
def test_inference_jit_gives_the_network_s_jit_result(decorate):
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    t = jnp.array([3, 500])
    params = model.init(jax.random.key(1), x, t)["params"]

    def forward(params, x, t, scale=1.0):
        return scale * model.apply({"params": params}, x, t)

    tuned = decorate(forward)
    assert tuned.__name__ == "forward"
    np.testing.assert_allclose(tuned(params, x, t, scale=2.0),
                               jax.jit(forward, static_argnames=("scale",))(params, x, t, 2.0),
                               rtol=1e-5, atol=1e-5)
    assert "conv" in tuned.lower(params, x, t, scale=2.0).as_text()


def test_inference_jit_inside_another_jit_compiles():
    @compiler.inference_jit
    def inner(x):
        return jnp.sin(x) * 2

    outer = compiler.inference_jit(lambda x: inner(x) + 1)
    x = jnp.linspace(0, 1, 5)
    np.testing.assert_allclose(outer(x), jnp.sin(x) * 2 + 1, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda x: inner(x) + 1)(x), jnp.sin(x) * 2 + 1, rtol=1e-6)


def test_training_pmap_gives_pmap_s_result_and_compiles_once_per_signature():
    def step(x, y):
        return jax.lax.psum(x * y, "d"), jnp.tanh(x)

    kwargs = dict(axis_name="d", in_axes=(0, None), devices=jax.devices()[:1])
    tuned, plain = compiler.training_pmap(step, **kwargs), jax.pmap(step, **kwargs)
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(1, 6)
    for y in (np.float32(2.0), np.float32(3.0)):
        for got, want in zip(tuned(x, y), plain(x, y), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6)
    assert tuned.compile(x, np.float32(5.0)) is tuned.compile(x, np.float32(2.0))
    assert tuned.compile(x[:, :3], np.float32(2.0)) is not tuned.compile(x, np.float32(2.0))
