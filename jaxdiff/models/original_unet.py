"""The original U-Net for segmentation (Ronneberger et al. 2015, arXiv 1505.04597, Fig. 1).

Unpadded 3x3 convolutions, so a 572x572 input gives a 388x388 map; skips are centre-cropped and
concatenated. Kept for reference: the diffusion U-Net (`unet.py`) descends from it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def center_crop(x: jax.Array, height: int, width: int) -> jax.Array:
    top = (x.shape[1] - height) // 2
    left = (x.shape[2] - width) // 2
    return x[:, top:top + height, left:left + width]


class OriginalUNet(nn.Module):
    """x [B, H, W, C] -> per-pixel logits [B, H - 184, W - 184, num_classes] (at 4 poolings)."""

    num_classes: int = 2
    features: tuple[int, ...] = (64, 128, 256, 512, 1024)

    def double_conv(self, x: jax.Array, features: int, name: str) -> jax.Array:
        for i in range(2):
            x = nn.relu(nn.Conv(features, (3, 3), padding="VALID", name=f"{name}_conv{i}")(x))
        return x

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        skips = []
        for level, features in enumerate(self.features[:-1]):
            x = self.double_conv(x, features, f"down{level}")
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = self.double_conv(x, self.features[-1], "bottom")
        for level in reversed(range(len(self.features) - 1)):
            features = self.features[level]
            x = nn.ConvTranspose(features, (2, 2), strides=(2, 2), name=f"up{level}_upconv")(x)
            skip = center_crop(skips.pop(), x.shape[1], x.shape[2])
            x = self.double_conv(jnp.concatenate([skip, x], axis=-1), features, f"up{level}")
        return nn.Conv(self.num_classes, (1, 1), name="conv_out")(x)
