"""LPIPS with the VGG-16 trunk (Zhang, Isola, Efros, Shechtman & Wang 2018, arXiv 1801.03924).

d(x, y) = sum_l mean_hw || w_l * (phi_l(x) / |phi_l(x)| - phi_l(y) / |phi_l(y)|) ||^2 (the paper's
Eq. 1), phi_l the VGG-16 activations relu1_2 .. relu5_3 of the input shifted and scaled as the
`lpips` package's `ScalingLayer` (version 0.1), |.| the channel-wise norm (+ 1e-10) and w_l the
calibrated non-negative 1x1 `lin` heads. Images are NHWC in [-1, 1].

Weights: the heads ship inside the `lpips` pip package (`lpips/weights/v0.1/vgg.pth`, in its
GitHub repository richzhang/PerceptualSimilarity too), the trunk is torchvision's ImageNet VGG-16
(`https://download.pytorch.org/models/vgg16-397923af.pth`). `params_from_torch` maps numpy copies
of both to this module's parameters; `load_params` reads the two `.pth` files without torch
(`jaxdiff.models.pth`).
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.pth import load_state_dict

# VGG-16 `features` indices of the 3x3 convolutions in each of LPIPS's five slices; a 2x2 max
# pool precedes every slice but the first.
VGG_SLICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """LPIPS(x, y) -> [B] for NHWC images x, y in [-1, 1] (three channels)."""

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS compares two NHWC RGB batches of one shape, got {x.shape} "
                             f"and {y.shape}")
        shift, scale = jnp.asarray(SHIFT), jnp.asarray(SCALE)
        h = (jnp.concatenate([x, y]) - shift) / scale
        total = 0.0
        for s, (convs, ch) in enumerate(zip(VGG_SLICES, VGG_CHANNELS, strict=True)):
            if s:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            for idx in convs:
                h = nn.relu(nn.Conv(ch, (3, 3), padding=1, name=f"conv{idx}")(h))
            unit = h / (jnp.sqrt(jnp.sum(h**2, axis=-1, keepdims=True)) + 1e-10)
            diff = (unit[: x.shape[0]] - unit[x.shape[0]:]) ** 2
            head = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{s}")(diff)
            total = total + jnp.mean(head, axis=(1, 2, 3))
        return total


def params_from_torch(lin_state: Mapping[str, np.ndarray],
                      vgg_state: Mapping[str, np.ndarray]) -> dict:
    """LPIPS params from numpy copies of the `lpips` heads (`lin{l}.model.1.weight`, [1, C, 1, 1])
    and a torchvision VGG-16 (`features.{i}.weight` [O, I, 3, 3], `features.{i}.bias`)."""
    params = {}
    for convs in VGG_SLICES:
        for idx in convs:
            w = np.asarray(vgg_state[f"features.{idx}.weight"], np.float32)
            params[f"conv{idx}"] = {"kernel": w.transpose(2, 3, 1, 0),
                                    "bias": np.asarray(vgg_state[f"features.{idx}.bias"],
                                                       np.float32)}
    for s in range(len(VGG_SLICES)):
        w = np.asarray(lin_state[f"lin{s}.model.1.weight"], np.float32)
        params[f"lin{s}"] = {"kernel": w.transpose(2, 3, 1, 0)}
    return params


def load_params(lin_path: str, vgg_path: str) -> dict:
    """LPIPS params from the `lpips` package's `vgg.pth` and a torchvision VGG-16 `.pth`; a
    ValueError names a file that is not one of them."""
    lin, vgg = load_state_dict(lin_path), load_state_dict(vgg_path)
    try:
        return params_from_torch(lin, vgg)
    except KeyError as e:
        raise ValueError(f"{lin_path} must be the lpips package's vgg.pth heads and {vgg_path} "
                         f"torchvision's VGG-16 state dict: {e} is missing") from None
