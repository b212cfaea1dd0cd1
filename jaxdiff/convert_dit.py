"""diffusers' DiT weights (e.g. facebook/DiT-XL-2-256's `transformer/`) as our `DiT`.

`python -m jaxdiff.convert --from diffusers --input DIR ...` reads a `DiTTransformer2DModel`, or
the `Transformer2DModel` with `norm_type='ada_norm_zero'` that the published pipelines save, and
converts it here. The transformer only: the published DiTs denoise the 32x32x4 latents of Stable
Diffusion's auto-encoder, which is out of scope, so a 4-channel DiT converts to parameters
(`convert_diffusers_dit`) but has no data set to make a workdir of; 1- and 3-channel DiTs do.

diffusers keeps a copy of the timestep and label embedders in every block (`norm1.emb`), equal in
the published weights; ours has one, and the copies must be equal to convert.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.models.dit import DiT

DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")

# diffusers' DiTTransformer2DModel defaults for settings a config.json may leave out.
DIT_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None,
    "num_layers": 28, "dropout": 0.0, "attention_bias": True, "sample_size": 32,
    "patch_size": 2, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5,
}
# What our DiT computes, as diffusers settings; any other value is refused by name.
DIT_REQUIRED: dict[str, Any] = {
    "activation_fn": "gelu-approximate", "attention_bias": True, "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
}
# Transformer2DModel settings that make it something other than a DiT (their defaults: off).
NOT_DIT = ("cross_attention_dim", "num_vector_embeds", "only_cross_attention")

_EMBEDDERS = {"t_embed0": "timestep_embedder.linear_1", "t_embed1": "timestep_embedder.linear_2",
              "y_embed": "class_embedder.embedding_table"}
_BLOCK = {"adaLN_modulation": "norm1.linear", "proj": "attn1.to_out.0", "fc1": "ff.net.0.proj",
          "fc2": "ff.net.2"}
_TOP = {"x_embed": "pos_embed.proj", "final_adaLN_modulation": "proj_out_1",
        "final_linear": "proj_out_2"}


def is_diffusers_dit(diffusers_config: Mapping[str, Any]) -> bool:
    """Whether a diffusers config.json describes a DiT (rather than a UNet2DModel)."""
    return diffusers_config.get("_class_name") in DIT_CLASSES


def dit_kwargs_from_diffusers(diffusers_config: Mapping[str, Any]) -> dict[str, Any]:
    """`DiT` keyword arguments (plus `image_size`, `channels`) equivalent to a diffusers DiT
    config. Raises one ValueError naming every setting our DiT does not implement."""
    get = lambda key: diffusers_config.get(key, DIT_DEFAULTS[key])  # noqa: E731
    problems = [f"{key}={get(key)!r} (supported: {want!r})"
                for key, want in DIT_REQUIRED.items() if get(key) != want]
    problems += [f"{key}={diffusers_config[key]!r} (supported: unset, a DiT has no text input)"
                 for key in NOT_DIT if diffusers_config.get(key)]
    channels, out = get("in_channels"), get("out_channels")
    if out not in (None, channels, 2 * channels):
        problems.append(f"out_channels={out} (supported: in_channels={channels}, or twice it "
                        "for a learned variance)")
    size = get("sample_size")
    if not isinstance(size, int) or size % get("patch_size"):
        problems.append(f"sample_size={size!r} (supported: one int divisible by patch_size)")
    if problems:
        raise ValueError("diffusers DiT config not supported: " + "; ".join(problems))
    return dict(
        image_size=size, channels=channels, patch_size=get("patch_size"),
        hidden_size=get("num_attention_heads") * get("attention_head_dim"),
        num_layers=get("num_layers"), num_heads=get("num_attention_heads"),
        num_classes=get("num_embeds_ada_norm"), learn_sigma=out == 2 * channels,
        dropout=float(get("dropout")), freq_shift=1, mlp_norm_eps=float(get("norm_eps")),
    )


def dit_config_from_diffusers(diffusers_config: Mapping[str, Any],
                              dataset_of_channels: Callable[[int], str]
                              ) -> ml_collections.ConfigDict:
    """A jaxdiff experiment config for a converted DiT (on the data set of its channels), with
    DiT's diffusion: linear betas, T = 1000, eps and (2C outputs) a learned-range variance
    (arXiv 2212.09748 Sec. 3)."""
    from jaxdiff.config import default_config

    kwargs = dit_kwargs_from_diffusers(diffusers_config)
    config = default_config()
    config.data.dataset = dataset_of_channels(kwargs["channels"])
    config.data.image_size = kwargs["image_size"]
    config.data.channels = kwargs["channels"]
    config.data.num_classes = kwargs["num_classes"]
    config.model.name = "dit"
    config.model.class_cond = True
    config.model.dropout = kwargs["dropout"]
    config.model.attention_heads = kwargs["num_heads"]
    for key in ("patch_size", "hidden_size", "num_layers", "freq_shift", "mlp_norm_eps"):
        config.model[key] = kwargs[key]
    config.diffusion.beta_schedule = "linear"
    config.diffusion.num_timesteps = 1000
    config.diffusion.model_output = "eps"
    config.diffusion.model_var_type = "learned_range" if kwargs["learn_sigma"] else "fixed_large"
    config.diffusion.loss_type = "hybrid" if kwargs["learn_sigma"] else "simple"
    return config


def _diffusers_keys(path: tuple[str, ...]) -> list[str]:
    """The diffusers state-dict keys of our parameter at `path` (three for a fused qkv)."""
    *module, leaf = path
    suffix = "bias" if leaf == "bias" else "weight"
    top = module[0]
    if top in _EMBEDDERS:
        return [f"transformer_blocks.0.norm1.emb.{_EMBEDDERS[top]}.{suffix}"]
    if top in _TOP:
        return [f"{_TOP[top]}.{suffix}"]
    block = f"transformer_blocks.{top.removeprefix('block')}"
    if module[1] == "qkv":
        return [f"{block}.attn1.to_{x}.{suffix}" for x in "qkv"]
    return [f"{block}.{_BLOCK[module[1]]}.{suffix}"]


def _ours(leaf: str, arrays: list[np.ndarray]) -> np.ndarray:
    """torch's layout to ours: conv OIHW -> HWIO, Linear weights transposed (q, k, v side by
    side in a fused qkv kernel), biases and embeddings as they are."""
    if leaf == "kernel" and arrays[0].ndim == 4:
        return arrays[0].transpose(2, 3, 1, 0)
    if leaf == "kernel":
        return np.concatenate([a.T for a in arrays], axis=1)
    return np.concatenate(arrays)


def convert_diffusers_dit(state_dict: Mapping[str, Any], diffusers_config: Mapping[str, Any]
                          ) -> dict[str, Any]:
    """Our DiT params from a diffusers DiT state dict and its config.json.

    Raises one ValueError naming every missing key, surplus key, shape mismatch and block whose
    embedder copy differs from block 0's.
    """
    from jaxdiff.convert import _summary

    kwargs = dit_kwargs_from_diffusers(diffusers_config)
    size, channels = kwargs.pop("image_size"), kwargs.pop("channels")
    model = DiT(**kwargs)
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, size, size, channels)), jnp.zeros((1,), jnp.int32),
        jnp.zeros((1,), jnp.int32)))["params"]
    state = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    missing, mismatched, differing, params = [], [], [], {}
    for path, leaf in flax.traverse_util.flatten_dict(abstract).items():
        keys = _diffusers_keys(path)
        if any(k not in state for k in keys):
            missing += [k for k in keys if k not in state]
            continue
        value = _ours(path[-1], [state.pop(k) for k in keys])
        if value.shape != leaf.shape:
            mismatched.append(f"{', '.join(keys)} do not convert to {'/'.join(path)} "
                              f"{tuple(leaf.shape)} (got {value.shape})")
            continue
        params[path] = jnp.asarray(value)
    for key in [k for k in state if ".norm1.emb." in k]:
        first = "transformer_blocks.0." + key.split(".", 2)[2]
        copy = state.pop(key)
        if first not in state_dict or not np.array_equal(copy, np.asarray(state_dict[first])):
            differing.append(key)
    surplus = sorted(state)
    if missing or surplus or mismatched or differing:
        lines = [_summary(what, keys) for what, keys in (
            ("missing keys (the config's DiT has them, the weights do not)", missing),
            ("surplus keys (in the weights, not in the config's DiT)", surplus),
            ("shape mismatches", mismatched),
            ("embedder copies that differ from block 0's (our DiT shares one)", differing))
            if keys]
        raise ValueError("the weights do not fit the DiT their config.json describes; is the "
                         "config the one saved with these weights?\n" + "\n".join(lines))
    return flax.traverse_util.unflatten_dict(params)
