"""The DDPM U-Net (arXiv 2006.11239 App. B) with ADM's options (arXiv 2105.05233 Sec. 3).

At its defaults it is exactly the 35.7M-parameter DDPM CIFAR-10 network (and diffusers'
`UNet2DModel` of google/ddpm-cifar10-32, whose weights `jaxdiff.convert` loads). ADM's options are
switches: attention at several resolutions, multi-head attention, residual blocks that resample,
AdaGN (`use_scale_shift_norm`), sCM's adaptive double normalisation of AdaGN
(`adaptive_double_norm`, arXiv 2410.11081 Sec. 4.1), class conditioning and a learned variance
(2C outputs).

Parameters (flat names): `temb_dense0`, `temb_dense1`, `label_embed`, `conv_in`,
`down{level}_res{j}`, `down{level}_attn{j}`, `down{level}_down`, `mid_res0`, `mid_attn`,
`mid_res1`, `up{level}_res{j}`, `up{level}_attn{j}`, `up{level}_up`, `norm_out`, `conv_out`;
level 0 is the full resolution.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import (
    AttnBlock,
    Downsample,
    Dtype,
    ResBlock,
    Upsample,
    conv,
    dense,
    group_norm,
    num_attention_heads,
    timestep_embedding,
)


class UNetEncoder(nn.Module):
    """The fields, checks and down path (time embedding, down levels, middle) that the U-Net and
    the noisy classifier share. Not used on its own."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_heads: int = 1
    num_head_channels: int = -1
    resblock_updown: bool = False
    use_scale_shift_norm: bool = False
    adaptive_double_norm: bool = False
    resamp_with_conv: bool = True
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    def check_image_shape(self, shape: tuple[int, ...]) -> None:
        """Raises a ValueError if an (H, W, C) image cannot pass through this network."""
        if len(shape) != 3:
            raise ValueError(f"expected images of shape (H, W, C) (NHWC batches), got {shape}")
        height, width, _ = shape
        levels = len(self.ch_mult)
        factor = 2 ** (levels - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"image size {height}x{width} is not divisible by 2^(levels-1) = {factor}: "
                f"ch_mult={tuple(self.ch_mult)} has {levels} levels, halving the image "
                f"{levels - 1} times"
            )
        resolutions = tuple(height // 2**i for i in range(levels))
        missing = [r for r in self.attn_resolutions if r not in resolutions]
        if missing:
            raise ValueError(
                f"attn_resolutions {missing} never occur: a {height}x{width} image with "
                f"{levels} levels passes through resolutions {resolutions}"
            )
        widths = sorted({self.ch, *(self.ch * m for m in self.ch_mult)})
        bad = [c for c in widths if c % self.norm_groups]
        if bad:
            raise ValueError(
                f"channels {bad} are not divisible by the {self.norm_groups} GroupNorm groups "
                f"(ch={self.ch}, ch_mult={tuple(self.ch_mult)})"
            )
        attn_widths = {self.ch * self.ch_mult[-1]}
        attn_widths |= {self.ch * m for m, r in zip(self.ch_mult, resolutions, strict=True)
                        if r in self.attn_resolutions}
        for c in sorted(attn_widths):
            num_attention_heads(c, self.num_heads, self.num_head_channels)

    def res_block(self, out_ch: int, name: str, resample: str | None = None) -> ResBlock:
        return ResBlock(out_ch, dropout=self.dropout, groups=self.norm_groups,
                        use_scale_shift_norm=self.use_scale_shift_norm,
                        adaptive_double_norm=self.adaptive_double_norm, resample=resample,
                        dtype=self.dtype, name=name)

    def attn_block(self, name: str) -> AttnBlock:
        return AttnBlock(num_heads=self.num_heads, num_head_channels=self.num_head_channels,
                         groups=self.norm_groups, dtype=self.dtype, name=name)

    def embed_time(self, t: jax.Array) -> jax.Array:
        """Sinusoidal embedding (ch) -> Dense(4ch) -> swish -> Dense(4ch)."""
        emb = timestep_embedding(t, self.ch)
        emb = dense(4 * self.ch, "temb_dense0", self.dtype)(emb)
        return dense(4 * self.ch, "temb_dense1", self.dtype)(nn.swish(emb))

    def encode(self, x: jax.Array, emb: jax.Array, train: bool
               ) -> tuple[jax.Array, list[jax.Array]]:
        """conv_in, the down levels and the middle; returns h and the skip activations."""
        levels = len(self.ch_mult)
        h = conv(self.ch, 3, "conv_in", self.dtype)(x.astype(self.dtype))
        hs = [h]
        for level, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = self.res_block(self.ch * mult, f"down{level}_res{j}")(h, emb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = self.attn_block(f"down{level}_attn{j}")(h)
                hs.append(h)
            if level != levels - 1:
                if self.resblock_updown:
                    h = self.res_block(h.shape[-1], f"down{level}_down", "down")(h, emb, train)
                else:
                    h = Downsample(self.resamp_with_conv, self.dtype, name=f"down{level}_down")(h)
                hs.append(h)
        h = self.res_block(h.shape[-1], "mid_res0")(h, emb, train)
        h = self.attn_block("mid_attn")(h)
        h = self.res_block(h.shape[-1], "mid_res1")(h, emb, train)
        return h, hs


class UNet(UNetEncoder):
    """eps_theta(x_t, t[, y]): NHWC images and 0-based step indices in, C (or 2C) channels out.

    `out_channels` None means the input channels (doubled when `learn_sigma`: the variance
    channels follow the mean channels). `num_classes` > 0 adds `nn.Embed(num_classes + 1, 4ch)`
    of y to the time embedding; label `num_classes` is the null label of classifier-free guidance.
    """

    out_channels: int | None = None
    learn_sigma: bool = False
    num_classes: int = 0

    def check_labels(self, y: jax.Array | None) -> None:
        if self.num_classes > 0 and y is None:
            raise ValueError(
                f"this U-Net is class-conditional (num_classes={self.num_classes}): pass labels y "
                f"(use label {self.num_classes} for the null class)"
            )
        if self.num_classes == 0 and y is not None:
            raise ValueError("labels y were passed to an unconditional U-Net (num_classes=0)")

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        self.check_image_shape(x.shape[1:])
        self.check_labels(y)
        emb = self.embed_time(t)
        if self.num_classes > 0:
            emb = emb + nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=self.dtype,
                                 name="label_embed")(y)
        h, hs = self.encode(x, emb, train)
        for level in reversed(range(len(self.ch_mult))):
            for j in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = self.res_block(self.ch * self.ch_mult[level], f"up{level}_res{j}")(
                    h, emb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = self.attn_block(f"up{level}_attn{j}")(h)
            if level != 0:
                if self.resblock_updown:
                    h = self.res_block(h.shape[-1], f"up{level}_up", "up")(h, emb, train)
                else:
                    h = Upsample(self.resamp_with_conv, self.dtype, name=f"up{level}_up")(h)
        out_channels = self.out_channels or x.shape[-1] * (2 if self.learn_sigma else 1)
        h = nn.swish(group_norm(self.norm_groups, "norm_out", self.dtype)(h))
        h = conv(out_channels, 3, "conv_out", self.dtype, zero=True)(h)
        return h.astype(jnp.float32)
