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


def test_training_jit_runs_the_per_device_program_with_the_options(monkeypatch):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("d",))
    spec = jax.sharding.PartitionSpec("d")

    def step(x, y):  # this device's block [1, 6] of x, inside the global program
        return jax.shard_map(lambda x, y: (jax.lax.psum(x * y, "d"), jnp.tanh(x)), mesh=mesh,
                             in_specs=(spec, jax.sharding.PartitionSpec()),
                             out_specs=(jax.sharding.PartitionSpec(), spec))(x, y)

    tuned = compiler.training_jit(step, mesh)
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6)
    total, tanh = tuned(x, np.float32(2.0))
    np.testing.assert_allclose(total, 2 * (x[:1] + x[1:]), rtol=1e-6)
    np.testing.assert_allclose(tanh, np.tanh(x), rtol=1e-6)
    # The options reach XLA: one it does not know stops the compilation.
    monkeypatch.setitem(compiler.OPTIONS, "cpu", {"xla_no_such_option": True})
    bad = compiler.training_jit(step, mesh)
    with pytest.raises(Exception, match="xla_no_such_option"):
        bad(x, np.float32(2.0))
