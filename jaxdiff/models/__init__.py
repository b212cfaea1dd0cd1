"""Flax networks. They hold no diffusion mathematics.

Every denoiser is called `apply({"params": p}, x, t, y=None, train=False, rngs={"dropout": key})`
(x NHWC, or [B, D] points for the MLP; t 0-based step indices; y labels, or None); the noisy
classifier is `apply({"params": p}, x, t, train=False) -> logits`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxdiff.diffusion import LEARNED_VAR_TYPES
from jaxdiff.models.classifier import Classifier
from jaxdiff.models.mlp import MLPDenoiser
from jaxdiff.models.original_unet import OriginalUNet
from jaxdiff.models.unet import UNet

__all__ = ["Classifier", "MLPDenoiser", "OriginalUNet", "UNet", "create_model", "init_params",
           "label_classes", "network_param_shapes", "param_shapes"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def label_classes(config: ml_collections.ConfigDict) -> int:
    """The number of classes the denoiser is conditioned on (0: unconditional)."""
    if config.model.name == "classifier" or not config.model.class_cond:
        return 0
    return config.data.num_classes


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The network of an experiment config (`config.model.name`: 'unet', 'mlp' or 'classifier').

    A learned variance (`diffusion.model_var_type` learned/learned_range) doubles the outputs;
    `model.class_cond` embeds `data.num_classes` labels (+ the null label). The image shape is
    checked here, before anything is traced.
    """
    m, data = config.model, config.data
    learn_sigma = config.diffusion.model_var_type in LEARNED_VAR_TYPES
    num_classes = label_classes(config)
    if m.class_cond and data.num_classes < 1:
        raise ValueError(f"model.class_cond=True needs data.num_classes >= 1, "
                         f"got {data.num_classes}")
    if data.channels < 1:
        raise ValueError(f"data.channels must be >= 1, got {data.channels}")
    if m.name == "mlp":
        return MLPDenoiser(hidden=m.hidden, depth=m.depth, num_classes=num_classes,
                           learn_sigma=learn_sigma, dropout=m.dropout)
    if m.name not in ("unet", "classifier"):
        raise ValueError(f"model.name={m.name!r}: must be 'unet', 'mlp' or 'classifier'")
    if m.dtype not in DTYPES:
        raise ValueError(f"model.dtype={m.dtype!r}: must be one of {tuple(DTYPES)}")
    shared = dict(
        ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout, num_heads=m.num_heads,
        num_head_channels=m.num_head_channels, resblock_updown=m.resblock_updown,
        use_scale_shift_norm=m.use_scale_shift_norm, resamp_with_conv=m.resamp_with_conv,
        dtype=DTYPES[m.dtype],
    )
    if m.name == "classifier":
        model = Classifier(num_classes=data.num_classes, pool=m.pool, **shared)
    else:
        model = UNet(learn_sigma=learn_sigma, num_classes=num_classes, **shared)
    model.check_image_shape((data.image_size, data.image_size, data.channels))
    return model


def init_params(model: nn.Module, rng: jax.Array, shape: tuple[int, ...], num_classes: int) -> Any:
    """Fresh parameters of a denoiser or classifier for examples of `shape` (labelled when
    `num_classes` > 0); under `jax.eval_shape`, their shapes alone."""
    x = jnp.zeros((1, *shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    kwargs = {"y": jnp.zeros((1,), jnp.int32)} if num_classes else {}
    return model.init({"params": rng, "dropout": rng}, x, t, train=False, **kwargs)["params"]


def param_shapes(params: Any) -> dict[str, tuple[int, ...]]:
    """{'conv_in/kernel': shape, ...} of a parameter tree (of arrays, or of their shapes)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
            for path, leaf in leaves}


@functools.lru_cache(maxsize=16)
def network_param_shapes(model: nn.Module, shape: tuple[int, ...], num_classes: int) -> dict:
    """`param_shapes` of the parameters `init_params` gives `model` (traced, nothing computed)."""
    return param_shapes(jax.eval_shape(
        lambda: init_params(model, jax.random.key(0), shape, num_classes)))
