"""The U-Net's building blocks (DDPM arXiv 2006.11239 App. B, with ADM's options, arXiv 2105.05233).

All layers are NHWC. Parameters are float32; `dtype` is the compute dtype. Initialisation follows
the DDPM code: variance scaling (fan_avg, uniform) everywhere, and zeros for the last layer of
each residual branch, so every block starts as the identity.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxdiff.models import ops

Dtype = Any

default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zeros_init = nn.initializers.zeros


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0, *,
                       freq_shift: int = 1, cos_first: bool = False) -> jax.Array:
    """DDPM's sinusoidal embedding of step indices t [B] -> [B, dim]: sines, then cosines.

    Frequencies exp(-log(max_period) i / (dim/2 - freq_shift)), i = 0..dim/2-1, as in the DDPM
    code and diffusers' `get_timestep_embedding(flip_sin_to_cos=cos_first,
    downscale_freq_shift=freq_shift)`; DiT's code (arXiv 2212.09748) has freq_shift 0, cos first.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                    / max(half - freq_shift, 1))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    waves = [jnp.cos(args), jnp.sin(args)] if cos_first else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(waves, axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def num_attention_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Heads of an attention layer over `channels`: channels / num_head_channels, else num_heads."""
    if num_head_channels != -1:
        if num_head_channels < 1 or channels % num_head_channels:
            raise ValueError(
                f"num_head_channels={num_head_channels} does not divide the {channels} channels "
                "of an attention layer"
            )
        return channels // num_head_channels
    if num_heads < 1 or channels % num_heads:
        raise ValueError(
            f"num_heads={num_heads} does not divide the {channels} channels of an attention layer"
        )
    return num_heads


class Conv(nn.Module):
    """flax's `nn.Conv` (NHWC, HWIO kernel, same parameter names), its bias added by
    `ops.add_channel_bias`. `upsample`: a 3x3 SAME convolution of the nearest-neighbour 2x
    up-sampled input, as `conv3x3_of_upsampled`."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Any = "SAME"
    kernel_init: Any = default_init
    dtype: Dtype = jnp.float32
    upsample: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init,
                            (*self.kernel_size, x.shape[-1], self.features))
        bias = self.param("bias", zeros_init, (self.features,))
        if self.upsample:
            if (tuple(self.kernel_size), tuple(self.strides), self.padding) != ((3, 3), (1, 1),
                                                                               "SAME"):
                raise ValueError("Conv(upsample=True) is a 3x3 SAME convolution of stride 1, "
                                 f"got kernel_size={self.kernel_size}, "
                                 f"strides={self.strides}, padding={self.padding!r}")
            y = conv3x3_of_upsampled(x.astype(self.dtype), kernel)
        else:
            y = lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype),
                                         self.strides, self.padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return ops.add_channel_bias(y, bias.astype(self.dtype))


class Dense(nn.Module):
    """flax's `nn.Dense` (same parameter names), its bias added by `ops.add_channel_bias`."""

    features: int
    kernel_init: Any = default_init
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", zeros_init, (self.features,))
        y = lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            (((x.ndim - 1,), (0,)), ((), ())))
        return ops.add_channel_bias(y, bias.astype(self.dtype))


class GroupNorm(nn.Module):
    """flax's `nn.GroupNorm` (same parameter names and values), as `ops.group_norm`."""

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"num_groups={self.num_groups} does not divide the {channels} "
                             "channels of a GroupNorm")
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", zeros_init, (channels,))
        return ops.group_norm(x, scale, bias, self.num_groups, self.epsilon, self.dtype)


def conv(features: int, kernel: int, name: str, dtype: Dtype, *, stride: int = 1,
         padding: Any = "SAME", zero: bool = False, upsample: bool = False) -> Conv:
    return Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                kernel_init=zeros_init if zero else default_init, dtype=dtype,
                upsample=upsample, name=name)


def dense(features: int, name: str, dtype: Dtype, *, zero: bool = False) -> Dense:
    return Dense(features, kernel_init=zeros_init if zero else default_init, dtype=dtype,
                 name=name)


def group_norm(groups: int, name: str, dtype: Dtype) -> GroupNorm:
    return GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype, name=name)


def pixel_norm(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over the last axis (ProGAN's pixelwise feature normalisation,
    Karras et al. arXiv 1710.10196 Sec. 4.2), its statistic in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    return (xf * lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)).astype(x.dtype)


def upsample_nearest(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def downsample_avg(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Downsample(nn.Module):
    """Halves H and W: a stride-2 3x3 conv padded (0, 1) on each axis (as TF 'SAME' and diffusers'
    `downsample_padding=0`), or 2x2 average pooling."""

    with_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.with_conv:
            return downsample_avg(x)
        return conv(x.shape[-1], 3, "conv", self.dtype, stride=2,
                    padding=((0, 1), (0, 1)))(x)


# Which of a 3x3 kernel's rows (or columns) -1, 0, +1 read the same input row after nearest
# up-sampling, for an output row of phase 0 (even) and 1 (odd): phase 0 reads input rows
# i-1 (tap -1) and i (taps 0, +1); phase 1 reads i (taps -1, 0) and i+1 (tap +1).
_PHASE_TAPS = ((((1, 0, 0), (0, 1, 1)), (1, 0)), (((1, 1, 0), (0, 0, 1)), (0, 1)))


def conv3x3_of_upsampled(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """conv3x3_SAME(upsample_nearest(x), kernel) [B, 2H, 2W, O], computed at x's resolution.

    Each of the four output phases (even/odd row, even/odd column) is a 2x2 convolution of x
    whose taps are sums of the 3x3 kernel's (the sub-pixel form of Shi et al., arXiv 1609.05158):
    16 taps per input pixel instead of 36, the same result up to float rounding.
    """
    b, h, w, _ = x.shape
    phases = []
    for rows, row_pad in _PHASE_TAPS:
        for cols, col_pad in _PHASE_TAPS:
            folded = jnp.einsum("py,qx,yxio->pqio", jnp.array(rows, kernel.dtype),
                                jnp.array(cols, kernel.dtype), kernel)
            phases.append(lax.conv_general_dilated(
                x, folded.astype(x.dtype), (1, 1), (row_pad, col_pad),
                dimension_numbers=("NHWC", "HWIO", "NHWC")))
    y = jnp.stack(phases).reshape(2, 2, b, h, w, -1)  # [row phase, column phase, B, H, W, O]
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(b, 2 * h, 2 * w, -1)


class Upsample(nn.Module):
    """Doubles H and W: nearest neighbour, then (optionally) a 3x3 conv."""

    with_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.with_conv:
            return conv(x.shape[-1], 3, "conv", self.dtype, upsample=True)(x)
        return upsample_nearest(x)


class ResBlock(nn.Module):
    """GroupNorm-swish-conv, + Dense(swish(emb)), GroupNorm-swish-dropout-conv, + shortcut.

    `use_scale_shift_norm` (ADM's AdaGN) replaces the added embedding by
    GroupNorm(h) * (1 + scale) + shift; `adaptive_double_norm` (sCM's, arXiv 2410.11081 Sec. 4.1)
    makes it GroupNorm(h) * pnorm(scale) + pnorm(shift), pnorm = `pixel_norm`. `resample`
    'up'/'down' makes it ADM's resampling block: both branches are resampled (nearest / average
    pooling) after the first norm.
    """

    out_ch: int
    dropout: float = 0.0
    groups: int = 32
    use_scale_shift_norm: bool = False
    adaptive_double_norm: bool = False
    resample: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
        if self.adaptive_double_norm and not self.use_scale_shift_norm:
            raise ValueError("adaptive_double_norm=True normalises AdaGN's scale and shift: it "
                             "needs use_scale_shift_norm=True")
        h = nn.swish(group_norm(self.groups, "norm1", self.dtype)(x))
        if self.resample == "up":  # h is up-sampled inside conv1, in sub-pixel form
            x = upsample_nearest(x)
        elif self.resample == "down":
            h, x = downsample_avg(h), downsample_avg(x)
        h = conv(self.out_ch, 3, "conv1", self.dtype, upsample=self.resample == "up")(h)
        emb_dim = 2 * self.out_ch if self.use_scale_shift_norm else self.out_ch
        emb_out = dense(emb_dim, "temb_proj", self.dtype)(nn.swish(emb))
        norm2 = group_norm(self.groups, "norm2", self.dtype)
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out[:, None, None, :], 2, axis=-1)
            if self.adaptive_double_norm:
                h = norm2(h) * pixel_norm(scale) + pixel_norm(shift)
            else:
                h = norm2(h) * (1 + scale) + shift
        else:
            h = norm2(ops.add_channel_bias(h, emb_out))
        h = nn.swish(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(self.out_ch, 3, "conv2", self.dtype, zero=True)(h)
        if x.shape[-1] != self.out_ch:
            x = conv(self.out_ch, 1, "shortcut", self.dtype)(x)
        return x + h


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions: GroupNorm, q/k/v, softmax(q k^T / sqrt(d)) v,
    proj_out, residual. Multi-head as in ADM (`num_heads`, or `num_head_channels` per head)."""

    num_heads: int = 1
    num_head_channels: int = -1
    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        B, H, W, C = x.shape
        heads = num_attention_heads(C, self.num_heads, self.num_head_channels)
        h = group_norm(self.groups, "norm", self.dtype)(x).reshape(B, H * W, C)
        q, k, v = (
            dense(C, name, self.dtype)(h).reshape(B, H * W, heads, C // heads)
            for name in ("q", "k", "v")
        )
        h = jax.nn.dot_product_attention(q, k, v).reshape(B, H * W, C)
        h = dense(C, "proj_out", self.dtype, zero=True)(h)
        return x + h.reshape(B, H, W, C)


class AttentionPool2d(nn.Module):
    """ADM's attention pooling: the mean token attends over [mean, positions] (+ learned
    positional embedding); its output is projected to `out_dim`."""

    out_dim: int
    num_heads: int = 1
    num_head_channels: int = -1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        B, H, W, C = x.shape
        heads = num_attention_heads(C, self.num_heads, self.num_head_channels)
        tokens = x.reshape(B, H * W, C)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        pos = self.param("positional_embedding", nn.initializers.normal(C**-0.5),
                         (H * W + 1, C), jnp.float32)
        tokens = tokens + pos.astype(tokens.dtype)
        q = dense(C, "q", self.dtype)(tokens[:, :1]).reshape(B, 1, heads, C // heads)
        k, v = (
            dense(C, name, self.dtype)(tokens).reshape(B, H * W + 1, heads, C // heads)
            for name in ("k", "v")
        )
        h = jax.nn.dot_product_attention(q, k, v).reshape(B, C)
        return dense(self.out_dim, "proj_out", self.dtype)(h)
