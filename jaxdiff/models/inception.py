"""Inception-v3 as FID computes it: the 2015 TensorFlow graph, as pytorch-fid rebuilds it.

FID (arXiv 1706.08500) and the Inception Score are defined by one network: TensorFlow's
`classify_image_graph_def.pb` of 2015-12-05, an Inception-v3 with 1008 classes whose pooling
differs from torchvision's in three places. pytorch-fid's `FIDInceptionA/C/E_1/E_2` reproduce
them and so does this module: average pools exclude the zero padding (`count_include_pad=False`)
and the last block (Mixed_7c) max-pools its pooling branch. Module and parameter names are
torchvision's, so `load_pytorch_fid_weights` maps pytorch-fid's released state dict
(`pt_inception-2015-12-05-6726825d.pth`) one to one.

Inputs go through `preprocess`: uint8 images [B, H, W, C] (C = 1 is repeated to 3) are scaled to
[0, 1], resized to 299x299 bilinearly with half-pixel centres and no antialiasing (PyTorch's
`F.interpolate(mode='bilinear', align_corners=False)`, which pytorch-fid uses) and mapped to
[-1, 1]. The network returns the 2048-d pool features (FID) and the 1008 logits (IS).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
INPUT_SIZE = 299
NUM_LOGITS = 1008


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 1 or 3] -> float32 [B, 299, 299, 3] in [-1, 1], as pytorch-fid feeds it."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [B, H, W, 1 or 3], got shape {images.shape}")
    x = images.astype(jnp.float32) / 255.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear",
                             antialias=False)
    return 2.0 * x - 1.0


def _pairs(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, running statistics), ReLU."""

    features: int
    kernel_size: int | tuple[int, int]
    strides: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = _pairs(self.padding)
        x = nn.Conv(self.features, _pairs(self.kernel_size), strides=_pairs(self.strides),
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool(x: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1, the padding left out of the average (the TF graph's pool)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x: jax.Array, stride: int = 2, pad: int = 0) -> jax.Array:
    return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    """Mixed_5b/c/d (pytorch-fid's FIDInceptionA)."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: the 35 -> 17 reduction."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(384, 3, strides=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b/c/d/e (pytorch-fid's FIDInceptionC): factorised 7x7 convolutions."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: the 17 -> 8 reduction."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (avg pool, FIDInceptionE_1) and Mixed_7c (max pool, FIDInceptionE_2)."""

    max_pool: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool(x, stride=1, pad=1) if self.max_pool else _avg_pool(x)
        bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """FID Inception-v3: preprocessed images [B, 299, 299, 3] in [-1, 1] ->
    (pool features [B, 2048], logits [B, 1008])."""

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = BasicConv2d(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool(x)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        return pool, nn.Dense(NUM_LOGITS, name="fc")(pool)


def missing_weights_message(path: str | None) -> str:
    """What to do when the FID Inception weights are not at `path`."""
    where = "no file given" if path is None else f"{path!r} does not exist"
    return (f"FID/IS need pytorch-fid's Inception weights ({where}). Download "
            f"{FID_WEIGHTS_URL} and pass its path with --inception_weights.")


# torchvision's BatchNorm2d / Conv2d / Linear names -> Flax's (collection, name).
_LEAF_NAMES = {
    ("conv", "weight"): ("params", "kernel"),
    ("bn", "weight"): ("params", "scale"),
    ("bn", "bias"): ("params", "bias"),
    ("bn", "running_mean"): ("batch_stats", "mean"),
    ("bn", "running_var"): ("batch_stats", "var"),
    ("fc", "weight"): ("params", "kernel"),
    ("fc", "bias"): ("params", "bias"),
}


def _flax_value(torch_leaf: tuple[str, str], value: np.ndarray) -> np.ndarray:
    if torch_leaf == ("conv", "weight"):
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if torch_leaf == ("fc", "weight"):
        return value.T
    return value


@functools.cache
def _variable_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """(collection, *module path, name) -> shape of every variable of `InceptionV3`."""
    variables = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                               jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))
    return {tuple(str(k.key) for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(dict(variables))[0]}


def convert_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """pytorch-fid's Inception state dict (name -> array) -> Flax variables
    {"params", "batch_stats"} of `InceptionV3`.

    Every name of the network must be present with its shape; a missing or surplus name, or a
    wrong shape, is a ValueError that lists them all (batch norms' `num_batches_tracked` and the
    unused `AuxLogits.*` head of torchvision are ignored).
    """
    flat_expected = _variable_shapes()
    converted: dict[tuple[str, ...], np.ndarray] = {}
    seen: set[tuple[str, ...]] = set()
    surplus, bad_shapes = [], []
    for name, value in state_dict.items():
        parts = tuple(name.split("."))
        if parts[-1] == "num_batches_tracked" or parts[0] == "AuxLogits":
            continue
        leaf = parts[-2:]
        if leaf not in _LEAF_NAMES:
            surplus.append(name)
            continue
        collection, flax_name = _LEAF_NAMES[leaf]
        key = (collection, *parts[:-1], flax_name)
        if key not in flat_expected:
            surplus.append(name)
            continue
        seen.add(key)
        array = _flax_value(leaf, np.asarray(value, np.float32))
        if array.shape != flat_expected[key]:
            bad_shapes.append(f"{name}: {array.shape} (as {'/'.join(key)}), expected "
                              f"{flat_expected[key]}")
            continue
        converted[key] = array
    missing = sorted("/".join(k) for k in flat_expected if k not in seen)
    problems = ([f"missing: {', '.join(missing)}"] if missing else []) + \
               ([f"surplus: {', '.join(sorted(surplus))}"] if surplus else []) + \
               ([f"wrong shape: {'; '.join(bad_shapes)}"] if bad_shapes else [])
    if problems:
        raise ValueError("the state dict is not pytorch-fid's FID Inception-v3:\n  "
                         + "\n  ".join(problems))
    variables: dict[str, Any] = {}
    for key, array in converted.items():
        node = variables
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = jnp.asarray(array)
    return variables


def load_pytorch_fid_weights(path: str) -> dict[str, Any]:
    """Flax variables of `InceptionV3` from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`.

    torch is imported here only (it is a test/conversion extra, not a dependency of jaxdiff).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(missing_weights_message(path))
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading the .pth Inception weights needs torch (CPU is enough): "
                          "pip install torch") from e
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return convert_state_dict({k: v.numpy() for k, v in state_dict.items()})
