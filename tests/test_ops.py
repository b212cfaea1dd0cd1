"""jaxdiff.models.ops: GroupNorm and bias additions against flax's GroupNorm and plain addition,
values and gradients (their backward passes are written by hand); the layers built on them, and
the sub-pixel up-sampling convolution, against flax's layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import ops
from jaxdiff.models.layers import Conv, Dense, GroupNorm, Upsample, upsample_nearest


def _inputs(shape, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = 3.0 * jax.random.normal(keys[0], shape) + 1.5  # a mean and scale far from 0 and 1
    scale = 1.0 + 0.5 * jax.random.normal(keys[1], shape[-1:])
    bias = jax.random.normal(keys[2], shape[-1:])
    weight = jax.random.normal(keys[3], shape)  # makes the loss depend on every output
    return x, scale, bias, weight


@pytest.mark.slow  # compiles ours and Flax's, values and gradients: up to 12 s each
@pytest.mark.parametrize("shape,groups", [((2, 8, 8, 64), 32), ((3, 4, 6, 12), 3), ((2, 16, 6), 2)])
def test_group_norm_matches_flax_values_and_gradients(shape, groups):
    x, scale, bias, weight = _inputs(shape)
    flax_gn = nn.GroupNorm(num_groups=groups, epsilon=1e-6)
    params = {"params": {"scale": scale, "bias": bias}}

    def ours(x, scale, bias):
        return jnp.sum(weight * ops.group_norm(x, scale, bias, groups, 1e-6, jnp.float32))

    def theirs(x, scale, bias):
        return jnp.sum(weight * flax_gn.apply({"params": {"scale": scale, "bias": bias}}, x))

    np.testing.assert_allclose(ops.group_norm(x, scale, bias, groups, 1e-6, jnp.float32),
                               flax_gn.apply(params, x), rtol=1e-5, atol=1e-5)
    got = jax.grad(ours, argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(theirs, argnums=(0, 1, 2))(x, scale, bias)
    for name, g, w in zip(("x", "scale", "bias"), got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()),
                                   err_msg=name)


@pytest.mark.slow  # compiles values and gradients in two dtypes: about 9 s
def test_group_norm_in_bfloat16_returns_bfloat16_and_float32_gradients():
    x, scale, bias, weight = _inputs((2, 4, 4, 8))
    y = ops.group_norm(x, scale, bias, 4, 1e-6, jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(y.astype(jnp.float32),
                               ops.group_norm(x, scale, bias, 4, 1e-6, jnp.float32),
                               rtol=1e-2, atol=2e-2)
    grads = jax.grad(lambda x, s: jnp.sum(ops.group_norm(x, s, bias, 4, 1e-6, jnp.bfloat16)
                                          .astype(jnp.float32) * weight), (0, 1))(x, scale)
    assert [g.dtype for g in grads] == [jnp.float32, jnp.float32]


@pytest.mark.parametrize("bias_shape", [(16,), (3, 16)])
def test_add_channel_bias_matches_addition_values_and_gradients(bias_shape):
    h = jax.random.normal(jax.random.key(0), (3, 5, 7, 16))
    bias = jax.random.normal(jax.random.key(1), bias_shape)
    weight = jax.random.normal(jax.random.key(2), h.shape)
    expand = bias if len(bias_shape) == 1 else bias[:, None, None, :]
    np.testing.assert_allclose(ops.add_channel_bias(h, bias), h + expand, rtol=1e-6)
    got = jax.grad(lambda h, b: jnp.sum(weight * ops.add_channel_bias(h, b)), (0, 1))(h, bias)
    want = jax.grad(
        lambda h, b: jnp.sum(weight * (h + (b if b.ndim == 1 else b[:, None, None, :]))),
        (0, 1))(h, bias)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # compiles ours and Flax's layers, values and gradients: up to 8 s each
@pytest.mark.parametrize("ours,theirs,shape", [
    (Conv(6, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1))),
     nn.Conv(6, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1))), (2, 8, 8, 4)),
    (Conv(6, (1, 1)), nn.Conv(6, (1, 1)), (2, 5, 5, 4)),
    (Dense(6), nn.Dense(6), (2, 9, 4)),
    (GroupNorm(num_groups=2), nn.GroupNorm(num_groups=2, epsilon=1e-6), (2, 4, 4, 6)),
])
def test_layers_take_flax_s_parameters_and_give_flax_s_values(ours, theirs, shape):
    x = jax.random.normal(jax.random.key(0), shape)
    params = theirs.init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape),
                          params)  # non-zero biases
    assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(params)
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-5,
                               atol=1e-5)


def test_group_norm_layer_names_groups_that_do_not_divide_the_channels():
    with pytest.raises(ValueError, match="num_groups=4 does not divide the 6 channels"):
        GroupNorm(num_groups=4).init(jax.random.key(0), jnp.ones((1, 2, 2, 6)))


@pytest.mark.slow  # compiles two up-sampling convolutions and their gradients: about 5 s each
@pytest.mark.parametrize("shape,dtype", [((2, 5, 7, 3), jnp.float32), ((1, 4, 4, 16), jnp.float32),
                                         ((2, 4, 6, 8), jnp.bfloat16)])
def test_upsample_is_flax_conv_of_the_nearest_upsampled_input(shape, dtype):
    """Values and gradients (input, kernel, bias) of the four 2x2 phase convolutions against
    flax's 3x3 convolution of the up-sampled image; odd sizes put every phase at an edge."""
    x = jax.random.normal(jax.random.key(0), shape)
    channels = shape[-1]
    theirs = nn.Conv(channels, (3, 3), padding="SAME")
    kernel = jax.random.normal(jax.random.key(1), (3, 3, channels, channels)) / channels
    params = {"params": {"conv": {"kernel": kernel,
                                  "bias": jnp.arange(channels) / channels}}}
    weight = jax.random.normal(jax.random.key(2),
                               (shape[0], 2 * shape[1], 2 * shape[2], channels))
    ours = Upsample(dtype=dtype)
    assert (jax.tree.structure(jax.eval_shape(ours.init, jax.random.key(1), x))
            == jax.tree.structure(params))

    def loss_ours(p, x):
        return jnp.sum(weight * ours.apply(p, x).astype(jnp.float32))

    def loss_theirs(p, x):
        return jnp.sum(weight * theirs.apply({"params": p["params"]["conv"]}, upsample_nearest(x)))

    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    want = jax.jit(theirs.apply)({"params": params["params"]["conv"]}, upsample_nearest(x))
    got = jax.jit(ours.apply)(params, x)
    assert got.dtype == dtype
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=tol,
                               atol=tol * float(jnp.abs(want).max()))
    got_grads = jax.jit(jax.grad(loss_ours, (0, 1)))(params, x)
    want_grads = jax.jit(jax.grad(loss_theirs, (0, 1)))(params, x)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * float(jnp.abs(w).max()))


def test_upsampling_conv_names_a_kernel_it_cannot_take():
    with pytest.raises(ValueError, match=r"3x3 SAME .* kernel_size=\(1, 1\)"):
        Conv(4, (1, 1), upsample=True).init(jax.random.key(0), jnp.ones((1, 2, 2, 4)))
