"""A small residual MLP denoiser for 2-D toy data: the same call as the U-Net on [B, D] points."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import dense, timestep_embedding


class MLPDenoiser(nn.Module):
    """eps_theta(x_t, t[, y]) for points x [B, D]: `depth` residual blocks of width `hidden`, each
    adding a projection of the (time + label) embedding.

    `out_dim` None means D (2D when `learn_sigma`). `num_classes` > 0 embeds labels in
    `num_classes + 1` rows, the last the null label of classifier-free guidance.
    """

    hidden: int = 256
    depth: int = 4
    num_classes: int = 0
    out_dim: int | None = None
    learn_sigma: bool = False
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        if x.ndim != 2:
            raise ValueError(f"MLPDenoiser takes points [B, D], got shape {x.shape}")
        if self.num_classes > 0 and y is None:
            raise ValueError(f"this MLP is class-conditional (num_classes={self.num_classes}): "
                             f"pass labels y (label {self.num_classes} is the null class)")
        if self.num_classes == 0 and y is not None:
            raise ValueError("labels y were passed to an unconditional MLP (num_classes=0)")
        emb = dense(self.hidden, "temb_dense0", jnp.float32)(
            timestep_embedding(t, self.hidden))
        emb = dense(self.hidden, "temb_dense1", jnp.float32)(nn.swish(emb))
        if self.num_classes > 0:
            emb = emb + nn.Embed(self.num_classes + 1, self.hidden, name="label_embed")(y)
        h = dense(self.hidden, "dense_in", jnp.float32)(x)
        for i in range(self.depth):
            r = dense(self.hidden, f"block{i}_dense0", jnp.float32)(nn.swish(h))
            r = r + dense(self.hidden, f"block{i}_temb", jnp.float32)(nn.swish(emb))
            r = nn.Dropout(self.dropout, deterministic=not train)(nn.swish(r))
            h = h + dense(self.hidden, f"block{i}_dense1", jnp.float32)(r)
        out_dim = self.out_dim or x.shape[-1] * (2 if self.learn_sigma else 1)
        return dense(out_dim, "dense_out", jnp.float32)(nn.swish(h))
