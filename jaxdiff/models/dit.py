"""DiT, the diffusion transformer (Peebles & Xie, arXiv 2212.09748), as in its official code.

Patches of p x p pixels are embedded (a stride-p convolution) and given fixed 2-D sin-cos
positions; the noise level and the label are embedded and summed into one conditioning vector c
(Sec. 3.2); `num_layers` adaLN-Zero blocks each regress a shift, scale and gate of both of their
branches from c, their regressions initialised to zero, so every block starts as the identity;
the final layer (adaptive LayerNorm, linear) maps each token back to p x p x C (2C with a learned
variance) values. Attention is `jax.nn.dot_product_attention`.

Parameters (flat names): `x_embed`, `t_embed0`, `t_embed1`, `y_embed`, `block{i}` (its
`adaLN_modulation`, `qkv`, `proj`, `fc1`, `fc2`), `final_adaLN_modulation`, `final_linear`.
diffusers' `DiTTransformer2DModel` computes the same network with two differences of detail,
which are settings here: its timestep frequencies are shifted (`freq_shift=1`) and the norm
before each MLP uses its `norm_eps` (`mlp_norm_eps`); `jaxdiff.convert` sets both.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.layers import Conv, Dense, Dtype, dense, timestep_embedding

# Table 1 of arXiv 2212.09748: (layers N, hidden size d, heads) of each model size.
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# The `model` fields of DiT-{size}/{patch} (patch sizes 2, 4, 8 as in the paper).
DIT_CONFIGS = {
    f"DiT-{size}/{patch}": {"num_layers": layers, "hidden_size": hidden,
                            "attention_heads": heads, "patch_size": patch}
    for size, (layers, hidden, heads) in DIT_SIZES.items() for patch in (2, 4, 8)
}

FREQUENCY_DIM = 256  # the width of the sinusoidal timestep embedding (DiT's TimestepEmbedder)

xavier_patches = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[sin(pos omega), cos(pos omega)] [M, dim], omega_k = 10000^(-2k/dim) (MAE's, as DiT's)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(positions.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """The fixed position embedding [grid*grid, dim] of a grid x grid token map, row-major: the
    first dim/2 channels embed the column, the last dim/2 the row."""
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                             indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x (1 + scale) + shift, per example (adaLN, arXiv 2212.09748 Sec. 3.2)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the channels without its own scale and shift (adaLN regresses them)."""
    return nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=False, dtype=x.dtype)(x)


def modulation(c: jax.Array, chunks: int, name: str, dtype: Dtype) -> list[jax.Array]:
    """Linear(SiLU(c)) split in `chunks`; zero-initialised (adaLN-Zero)."""
    return jnp.split(dense(chunks * c.shape[-1], name, dtype, zero=True)(nn.silu(c)), chunks, -1)


class DiTBlock(nn.Module):
    """x + gate_msa Attn(adaLN(x)), then x + gate_mlp MLP(adaLN(x)) (arXiv 2212.09748 Fig. 3)."""

    num_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    mlp_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array, train: bool = False) -> jax.Array:
        B, T, D = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(
            c, 6, "adaLN_modulation", self.dtype)
        h = modulate(layer_norm(x, 1e-6), shift_msa, scale_msa)
        q, k, v = jnp.split(dense(3 * D, "qkv", self.dtype)(h), 3, axis=-1)
        heads = [a.reshape(B, T, self.num_heads, D // self.num_heads) for a in (q, k, v)]
        h = jax.nn.dot_product_attention(*heads).reshape(B, T, D)
        h = nn.Dropout(self.dropout, deterministic=not train)(dense(D, "proj", self.dtype)(h))
        x = x + gate_msa[:, None] * h
        h = modulate(layer_norm(x, self.mlp_norm_eps), shift_mlp, scale_mlp)
        h = jax.nn.gelu(dense(int(D * self.mlp_ratio), "fc1", self.dtype)(h), approximate=True)
        h = dense(D, "fc2", self.dtype)(nn.Dropout(self.dropout, deterministic=not train)(h))
        return x + gate_mlp[:, None] * h


class DiT(nn.Module):
    """eps_theta(x_t, t[, y]) of NHWC images, as a transformer over p x p patches.

    `num_classes` > 0 embeds labels in `num_classes + 1` rows, the last the null label of
    classifier-free guidance (the labels are dropped by training's `label_dropout`, as the
    official LabelEmbedder does). `learn_sigma` doubles the output channels (variance after
    mean). `freq_shift` 0 and `mlp_norm_eps` 1e-6 are the official code's; diffusers' are 1 and
    its `norm_eps`.
    """

    patch_size: int = 2
    hidden_size: int = 1152
    num_layers: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 0
    learn_sigma: bool = False
    dropout: float = 0.0
    freq_shift: int = 0
    mlp_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    def check_image_shape(self, shape: tuple[int, ...]) -> None:
        """Raises a ValueError if an (H, W, C) image cannot pass through this network."""
        if len(shape) != 3:
            raise ValueError(f"expected images of shape (H, W, C) (NHWC batches), got {shape}")
        height, width, _ = shape
        if height != width or height % self.patch_size:
            raise ValueError(f"DiT takes square images whose side is divisible by patch_size="
                             f"{self.patch_size}, got {height}x{width}")
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by 4 (the 2-D "
                             f"sin-cos positions) and by num_heads={self.num_heads}")

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        self.check_image_shape(x.shape[1:])
        if (self.num_classes > 0) != (y is not None):
            raise ValueError(f"this DiT has num_classes={self.num_classes}: pass labels y exactly "
                             f"when num_classes > 0 (label {self.num_classes} is the null class)")
        B, H, W, C = x.shape
        p, D = self.patch_size, self.hidden_size
        x = Conv(D, (p, p), strides=(p, p), padding="VALID", kernel_init=xavier_patches,
                 dtype=self.dtype, name="x_embed")(x)
        grid = H // p
        x = x.reshape(B, grid * grid, D) + jnp.asarray(sincos_2d(D, grid), self.dtype)
        t_freq = timestep_embedding(t, FREQUENCY_DIM, freq_shift=self.freq_shift, cos_first=True)
        std = nn.initializers.normal(0.02)
        c = Dense(D, kernel_init=std, dtype=self.dtype, name="t_embed0")(t_freq)
        c = Dense(D, kernel_init=std, dtype=self.dtype, name="t_embed1")(nn.silu(c))
        if self.num_classes > 0:
            c = c + nn.Embed(self.num_classes + 1, D, embedding_init=std, dtype=self.dtype,
                             name="y_embed")(y)
        for i in range(self.num_layers):
            x = DiTBlock(self.num_heads, self.mlp_ratio, self.dropout, self.mlp_norm_eps,
                         self.dtype, name=f"block{i}")(x, c, train)
        shift, scale = modulation(c, 2, "final_adaLN_modulation", self.dtype)
        out = C * (2 if self.learn_sigma else 1)
        x = dense(p * p * out, "final_linear", self.dtype, zero=True)(
            modulate(layer_norm(x, 1e-6), shift, scale))
        x = x.reshape(B, grid, grid, p, p, out).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(B, H, W, out).astype(jnp.float32)
