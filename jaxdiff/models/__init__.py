"""Flax networks. They hold no diffusion mathematics.

Every denoiser is called `apply({"params": p}, x, t, y=None, train=False, rngs={"dropout": key})`
(x NHWC, or [B, D] points for the MLP; t 0-based step indices; y labels, or None); the noisy
classifier is `apply({"params": p}, x, t, train=False) -> logits`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxdiff.data import DATASETS
from jaxdiff.diffusion import check_model_var_type
from jaxdiff.models.classifier import POOLS, Classifier
from jaxdiff.models.dit import DIT_CONFIGS, DiT
from jaxdiff.models.mlp import MLPDenoiser
from jaxdiff.models.original_unet import OriginalUNet
from jaxdiff.models.unet import UNet
from jaxdiff.registry import Checker, Entry, is_int, lookup, names

__all__ = ["DIT_CONFIGS", "NETWORKS", "Classifier", "DiT", "MLPDenoiser", "OriginalUNet", "UNet",
           "create_model", "get_network", "init_params", "label_classes", "network_param_shapes",
           "param_shapes"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Network(Entry):
    """A network of `NETWORKS`: `build(config, num_classes, learn_sigma)` -> its Flax module (the
    `model` fields it reads are its `fields`); `points`: it takes [B, D] points, not images;
    `objective`: the objective it trains by (`jaxdiff.objectives.OBJECTIVES`), None for a
    denoiser (trained by `consistency.method`'s); a denoiser is conditioned on the labels."""

    build: Callable[[ml_collections.ConfigDict, int, bool], nn.Module]
    points: bool = False
    objective: str | None = None

    @property
    def denoises(self) -> bool:
        """A denoiser: sampled, conditioned on labels, trained by `consistency.method`'s."""
        return self.objective is None


def _check_data_kind(c: Checker) -> None:
    dataset, name = c.get("data.dataset"), c.get("model.name")
    takes = names(NETWORKS, lambda n: n.points == DATASETS[dataset].points)
    if DATASETS[dataset].points and not NETWORKS[name].points:
        c.fail("model.name", f"{dataset} (points) needs model.name {takes}")
    elif NETWORKS[name].points and not DATASETS[dataset].points:
        c.fail("model.name", f"{name!r} takes points, not {dataset} images; use {takes}")


def _check_mlp(c: Checker) -> None:
    _check_data_kind(c)
    c.integer("model.hidden", 1)
    c.integer("model.depth", 1)


def _check_unet(c: Checker) -> None:
    _check_data_kind(c)
    c.one_of("model.dtype", tuple(DTYPES))
    c.integer("model.ch", 1)
    c.integer("model.num_res_blocks", 1)
    c.integer("model.num_heads", 1)
    c.check("model.num_head_channels", lambda v: is_int(v) and (v == -1 or v >= 1),
            "must be -1 (use num_heads) or a positive integer")
    c.boolean("model.resblock_updown")
    adagn_ok = c.boolean("model.use_scale_shift_norm")
    if (c.boolean("model.adaptive_double_norm") and adagn_ok
            and c.get("model.adaptive_double_norm") and not c.get("model.use_scale_shift_norm")):
        c.fail("model.adaptive_double_norm", "sCM's adaptive double normalisation normalises "
               "AdaGN's scale and shift: it needs model.use_scale_shift_norm=True")
    c.boolean("model.resamp_with_conv")
    mult_ok = c.check(
        "model.ch_mult",
        lambda v: isinstance(v, (tuple, list)) and len(v) > 0
        and all(is_int(m) and m >= 1 for m in v),
        "must be a non-empty tuple of positive integers",
    )
    size = c.get("data.image_size")
    if not (mult_ok and is_int(size) and size >= 1):
        return
    levels = len(c.get("model.ch_mult"))
    factor = 2 ** (levels - 1)
    if c.check("data.image_size", lambda v: v % factor == 0,
               f"model.ch_mult has {levels} levels, so the U-Net halves the image "
               f"{levels - 1} times: image_size must be divisible by {factor}"):
        resolutions = tuple(size // 2**i for i in range(levels))
        c.check(
            "model.attn_resolutions",
            lambda v: isinstance(v, (tuple, list)) and all(r in resolutions for r in v),
            f"must be a tuple of resolutions the U-Net reaches: {resolutions}",
        )


def _check_classifier(c: Checker) -> None:
    _check_unet(c)
    c.one_of("model.pool", POOLS)
    if is_int(c.get("data.num_classes")):
        c.check("data.num_classes", lambda v: v > 0, "a classifier needs num_classes > 0")


def _check_dit(c: Checker) -> None:
    _check_data_kind(c)
    c.one_of("model.dtype", tuple(DTYPES))
    for field in ("num_layers", "hidden_size", "attention_heads", "patch_size"):
        c.integer(f"model.{field}", 1)
    c.positive("model.mlp_ratio")
    c.one_of("model.freq_shift", (0, 1))
    c.positive("model.mlp_norm_eps")
    hidden, heads = c.get("model.hidden_size"), c.get("model.attention_heads")
    if is_int(hidden) and is_int(heads) and heads >= 1:
        c.check("model.hidden_size", lambda v: v % 4 == 0 and v % heads == 0,
                f"must be divisible by 4 (the 2-D sin-cos positions) and by "
                f"model.attention_heads={heads}")
    size, patch = c.get("data.image_size"), c.get("model.patch_size")
    if is_int(size) and is_int(patch) and patch >= 1:
        c.check("model.patch_size", lambda v: size % v == 0,
                f"must divide data.image_size={size} (the image is cut into patches)")


def _unet_options(m: ml_collections.ConfigDict) -> dict[str, Any]:
    if m.dtype not in DTYPES:
        raise ValueError(f"model.dtype={m.dtype!r}: must be one of {tuple(DTYPES)}")
    return dict(
        ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout, num_heads=m.num_heads,
        num_head_channels=m.num_head_channels, resblock_updown=m.resblock_updown,
        use_scale_shift_norm=m.use_scale_shift_norm,
        adaptive_double_norm=m.adaptive_double_norm, resamp_with_conv=m.resamp_with_conv,
        dtype=DTYPES[m.dtype],
    )


def _image_network(module: nn.Module, config: ml_collections.ConfigDict) -> nn.Module:
    data = config.data
    module.check_image_shape((data.image_size, data.image_size, data.channels))
    return module


# The DDPM U-Net's CIFAR-10 settings (arXiv 2006.11239 App. B), which the classifier shares.
_UNET_FIELDS = {
    "model.ch": 128, "model.ch_mult": (1, 2, 2, 2), "model.num_res_blocks": 2,
    "model.attn_resolutions": (16,), "model.num_heads": 1, "model.num_head_channels": -1,
    "model.resblock_updown": False, "model.use_scale_shift_norm": False,
    "model.adaptive_double_norm": False,
    "model.resamp_with_conv": True, "model.dtype": "float32",
}

NETWORKS: dict[str, Network] = {
    "unet": Network(
        build=lambda config, num_classes, learn_sigma: _image_network(UNet(
            learn_sigma=learn_sigma, num_classes=num_classes, **_unet_options(config.model)),
            config),
        fields=_UNET_FIELDS, check=_check_unet),
    "mlp": Network(
        build=lambda config, num_classes, learn_sigma: MLPDenoiser(
            hidden=config.model.hidden, depth=config.model.depth, num_classes=num_classes,
            learn_sigma=learn_sigma, dropout=config.model.dropout),
        points=True, fields={"model.hidden": 256, "model.depth": 4}, check=_check_mlp),
    # The noisy classifier p(y | x_t) of classifier guidance (ADM arXiv 2105.05233 Sec. 4).
    "classifier": Network(
        build=lambda config, num_classes, learn_sigma: _image_network(Classifier(
            num_classes=config.data.num_classes, pool=config.model.pool,
            **_unet_options(config.model)), config),
        objective="classifier", fields={**_UNET_FIELDS, "model.pool": "attention"},
        check=_check_classifier),
    # DiT (arXiv 2212.09748); the default size is DiT-S/2, the others are `DIT_CONFIGS`.
    "dit": Network(
        build=lambda config, num_classes, learn_sigma: _image_network(DiT(
            patch_size=config.model.patch_size, hidden_size=config.model.hidden_size,
            num_layers=config.model.num_layers, num_heads=config.model.attention_heads,
            mlp_ratio=config.model.mlp_ratio, num_classes=num_classes, learn_sigma=learn_sigma,
            dropout=config.model.dropout, freq_shift=config.model.freq_shift,
            mlp_norm_eps=config.model.mlp_norm_eps, dtype=DTYPES[config.model.dtype]), config),
        fields={**{f"model.{k}": v for k, v in DIT_CONFIGS["DiT-S/2"].items()},
                "model.mlp_ratio": 4.0, "model.freq_shift": 0, "model.mlp_norm_eps": 1e-6,
                "model.dtype": "float32"},
        check=_check_dit),
}


def get_network(name: str) -> Network:
    """The entry of network `name`; a ValueError naming it and the choices if there is none."""
    return lookup(NETWORKS, name, "network (model.name)")


def label_classes(config: ml_collections.ConfigDict) -> int:
    """The number of classes the denoiser is conditioned on (0: unconditional; a network that
    trains by its own objective, the classifier, is conditioned on none)."""
    if not get_network(config.model.name).denoises or not config.model.class_cond:
        return 0
    return config.data.num_classes


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The network of an experiment config (`config.model.name`, an entry of `NETWORKS`).

    A learned variance (`diffusion.model_var_type` learned/learned_range) doubles the outputs;
    `model.class_cond` embeds `data.num_classes` labels (+ the null label). The image shape is
    checked here, before anything is traced.
    """
    m, data = config.model, config.data
    network = get_network(m.name)
    learn_sigma = check_model_var_type(config.diffusion.model_var_type).learned
    if m.class_cond and data.num_classes < 1:
        raise ValueError(f"model.class_cond=True needs data.num_classes >= 1, "
                         f"got {data.num_classes}")
    if data.channels < 1:
        raise ValueError(f"data.channels must be >= 1, got {data.channels}")
    return network.build(config, label_classes(config), learn_sigma)


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
