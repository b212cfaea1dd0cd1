"""ADM's noisy classifier p(y | x_t, t) (arXiv 2105.05233 Sec. 4.1): the U-Net's encoder half.

The time-conditioned down path and middle of `UNet`, then GroupNorm-swish and attention pooling
(ADM's AttentionPool2d) or mean pooling, then logits. Its gradient guides sampling
(`jaxdiff.guidance`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import AttentionPool2d, dense, group_norm
from jaxdiff.models.unet import UNetEncoder

POOLS = ("attention", "mean")


class Classifier(UNetEncoder):
    """logits [B, num_classes] = f(x_t, t); same fields as `UNet`'s down path."""

    num_classes: int = 10
    pool: str = "attention"

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, train: bool = False) -> jax.Array:
        self.check_image_shape(x.shape[1:])
        if self.num_classes < 1:
            raise ValueError(f"a classifier needs num_classes >= 1, got {self.num_classes}")
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r}: must be one of {POOLS}")
        h, _ = self.encode(x, self.embed_time(t), train)
        h = nn.swish(group_norm(self.norm_groups, "norm_out", self.dtype)(h))
        if self.pool == "attention":
            logits = AttentionPool2d(self.num_classes, self.num_heads, self.num_head_channels,
                                     self.dtype, name="pool")(h)
        else:
            logits = dense(self.num_classes, "logits", self.dtype)(h.mean(axis=(1, 2)))
        return logits.astype(jnp.float32)
