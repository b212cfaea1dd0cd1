"""Published diffusers U-Net and DiT weights (e.g. google/ddpm-cifar10-32) as a jaxdiff workdir.

    python -m jaxdiff.convert --from diffusers --input DIR --output WORKDIR

DIR holds diffusers' `config.json` and `diffusion_pytorch_model.safetensors` (or `.bin`), or is a
saved pipeline with them in `unet/` (or `transformer/`); a weights file can be given instead
with `--config CONFIG_JSON`. WORKDIR must be new or empty unless `--overwrite` is given, which
replaces it whole.
The workdir is written by `jaxdiff.checkpoint.export` and loads with `jaxdiff.load`: the DDPM
schedule (linear betas, T=1000, eps prediction, fixed-large variance) with the converted network
as its EMA weights.

A DiT (`DiTTransformer2DModel`) is converted by `jaxdiff.convert_dit`.

`diffusers_state_dict` is the inverse, our U-Net params in diffusers' layout (the Colab notebook's
offline stand-in for the published weights is written with it).

torch and safetensors are optional: only reading the weights file imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.convert_dit import convert_diffusers_dit, dit_config_from_diffusers, is_diffusers_dit
from jaxdiff.models.unet import UNet

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# google/ddpm-cifar10-32's config.json: DDPM's CIFAR-10 network (arXiv 2006.11239 App. B).
DDPM_CIFAR10_CONFIG: dict[str, Any] = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, norm_eps=1e-6, norm_num_groups=32, flip_sin_to_cos=False,
    freq_shift=1, downsample_padding=0, act_fn="silu", center_input_sample=False,
    time_embedding_type="positional", mid_block_scale_factor=1,
)

# diffusers' UNet2DModel defaults for settings a config.json may leave out.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
}

# What our network computes, as diffusers settings; any other value is refused by name.
REQUIRED: dict[str, Any] = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "mid_block_scale_factor": 1,
    "downsample_padding": 0,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "norm_eps": 1e-6,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
}


def load_diffusers_state_dict(path: str) -> dict[str, np.ndarray]:
    """The float32 arrays of a diffusers weights file (.safetensors or a torch .bin), by key.

    `path` is the file, or a directory holding `diffusion_pytorch_model.safetensors|.bin`.
    """
    if os.path.isdir(path):
        found = [os.path.join(path, f) for f in WEIGHT_FILES
                 if os.path.exists(os.path.join(path, f))]
        if not found:
            raise FileNotFoundError(f"{path} holds none of {WEIGHT_FILES}")
        path = found[0]
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
        return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}
    import torch

    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file it cannot unpickle
        raise ValueError(f"{path} is not a readable torch weights file: {e}") from e
    return {k: v.detach().to(torch.float32).numpy() for k, v in tensors.items()}


def _setting(diffusers_config: Mapping[str, Any], key: str) -> Any:
    value = diffusers_config.get(key, DIFFUSERS_DEFAULTS[key])
    return tuple(value) if isinstance(value, list) else value


def unet_kwargs_from_diffusers(diffusers_config: Mapping[str, Any]) -> dict[str, Any]:
    """`UNet` keyword arguments (plus `image_size`, `channels`) equivalent to a UNet2DModel config.

    Raises one ValueError naming every setting our U-Net does not implement.
    """
    get = lambda key: _setting(diffusers_config, key)  # noqa: E731
    problems = [f"{key}={get(key)!r} (supported: {want!r})"
                for key, want in REQUIRED.items() if get(key) != want]
    name = diffusers_config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        problems.append(f"_class_name={name!r} (supported: 'UNet2DModel')")
    size = get("sample_size")
    if isinstance(size, tuple):
        size = size[0] if len(set(size)) == 1 else size
    if not isinstance(size, int):
        problems.append(f"sample_size={size!r} (supported: one int, square images)")
    if get("out_channels") != get("in_channels"):
        problems.append(f"out_channels={get('out_channels')} != in_channels={get('in_channels')}")
    channels = tuple(get("block_out_channels"))
    ch = channels[0]
    if any(c % ch for c in channels):
        problems.append(f"block_out_channels={channels} (each must be a multiple of the first)")
    down, up = tuple(get("down_block_types")), tuple(get("up_block_types"))
    allowed_down = ("DownBlock2D", "AttnDownBlock2D")
    if any(b not in allowed_down for b in down):
        problems.append(f"down_block_types={down} (supported: {allowed_down})")
    mirrored = tuple(b.replace("Down", "Up") for b in reversed(down))
    if up != mirrored:
        problems.append(f"up_block_types={up} (supported: the mirror of down_block_types, "
                        f"{mirrored})")
    groups = get("norm_num_groups")
    if get("attn_norm_num_groups") not in (None, groups):
        problems.append(f"attn_norm_num_groups={get('attn_norm_num_groups')} != "
                        f"norm_num_groups={groups}")
    if problems:
        raise ValueError("diffusers UNet2DModel config not supported: " + "; ".join(problems))
    head_dim = get("attention_head_dim")
    return dict(
        image_size=size,
        channels=get("in_channels"),
        ch=ch,
        ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=get("layers_per_block"),
        attn_resolutions=tuple(size // 2**i for i, b in enumerate(down) if b.startswith("Attn")),
        dropout=float(get("dropout")),
        num_heads=1,
        num_head_channels=-1 if head_dim is None else head_dim,
        norm_groups=groups,
    )


def dataset_of_channels(channels: int) -> str:
    """The data set a converted network of `channels` input channels is configured with."""
    datasets = {3: "cifar10", 1: "mnist"}
    if channels not in datasets:
        raise ValueError(f"in_channels={channels}: only 1 or 3 channels are supported (a latent "
                         "model needs its auto-encoder, which jaxdiff does not convert)")
    return datasets[channels]


def config_from_diffusers(diffusers_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A jaxdiff experiment config for a converted UNet2DModel, on DDPM's CIFAR-10 schedule."""
    from jaxdiff.config import default_config

    kwargs = unet_kwargs_from_diffusers(diffusers_config)
    if kwargs["norm_groups"] != 32:
        raise ValueError(
            f"norm_num_groups={kwargs['norm_groups']}: a jaxdiff config describes U-Nets with "
            "32 GroupNorm groups only; convert_diffusers_unet still converts the weights"
        )
    config = default_config()
    config.data.dataset = dataset_of_channels(kwargs["channels"])
    config.data.image_size = kwargs["image_size"]
    config.data.channels = kwargs["channels"]
    config.model.name = "unet"
    for key in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "num_heads",
                "num_head_channels"):
        config.model[key] = kwargs[key]
    config.model.class_cond = False
    config.model.resblock_updown = False
    config.model.use_scale_shift_norm = False
    config.model.resamp_with_conv = True
    config.diffusion.beta_schedule = "linear"
    config.diffusion.num_timesteps = 1000
    config.diffusion.model_output = "eps"
    config.diffusion.model_var_type = "fixed_large"
    config.diffusion.loss_type = "simple"
    return config


_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
           "conv2": "conv2", "shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP = {"temb_dense0": "time_embedding.linear_1", "temb_dense1": "time_embedding.linear_2",
        "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out",
        "mid_res0": "mid_block.resnets.0", "mid_res1": "mid_block.resnets.1",
        "mid_attn": "mid_block.attentions.0"}


_BLOCK = re.compile(r"(down|up)(\d+)_(res|attn|down|up)(\d*)")


def _diffusers_module(path: tuple[str, ...], levels: int) -> str:
    """The diffusers module name of our module at `path` (e.g. ('up3_res0', 'conv1'))."""
    top, *rest = path
    if top in _TOP:
        prefix = _TOP[top]
    else:
        side, level, kind, index = _BLOCK.fullmatch(top).groups()
        block = int(level) if side == "down" else levels - 1 - int(level)
        group = {"res": "resnets", "attn": "attentions"}.get(kind, f"{kind}samplers")
        prefix = f"{side}_blocks.{block}.{group}.{index or 0}"
    if not rest:
        return prefix
    table = _ATTN if "attn" in top else _RESNET if "res" in top else {"conv": "conv"}
    return f"{prefix}.{table[rest[0]]}"


def _diffusers_key(path: tuple[str, ...], levels: int) -> str:
    """The diffusers state-dict key of our parameter at `path` (e.g. ('conv_in', 'kernel'))."""
    return f"{_diffusers_module(path[:-1], levels)}.{'bias' if path[-1] == 'bias' else 'weight'}"


def _relayout(leaf: str, array: np.ndarray, *, to_torch: bool) -> np.ndarray:
    """A parameter between torch's layout and ours: conv kernels OIHW <-> HWIO, Linear/Dense
    weights transposed; biases and norms as they are."""
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose((3, 2, 0, 1) if to_torch else (2, 3, 1, 0))
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def convert_diffusers_unet(
    state_dict: Mapping[str, Any], unet_config: Mapping[str, Any]
) -> dict[str, Any]:
    """Our U-Net params from a diffusers UNet2DModel state dict and its config (config.json).

    Raises one ValueError naming every missing key, surplus key and shape mismatch.
    """
    kwargs = unet_kwargs_from_diffusers(unet_config)
    size, channels = kwargs.pop("image_size"), kwargs.pop("channels")
    model = UNet(**kwargs)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)),
                           jnp.zeros((1,), jnp.int32))
    )["params"]
    levels = len(kwargs["ch_mult"])
    state = {k: np.asarray(v) for k, v in state_dict.items()}
    missing, mismatched, params = [], [], {}
    for path, leaf in flax.traverse_util.flatten_dict(abstract).items():
        key = _diffusers_key(path, levels)
        if key not in state:
            missing.append(key)
            continue
        value = _relayout(path[-1], state.pop(key), to_torch=False)
        if value.shape != leaf.shape:
            mismatched.append(f"{key}: {tuple(state_dict[key].shape)} does not convert to "
                              f"{'/'.join(path)} {tuple(leaf.shape)}")
            continue
        params[path] = jnp.asarray(value, jnp.float32)
    surplus = sorted(state)
    if missing or surplus or mismatched:
        lines = [_summary(what, keys) for what, keys in (
            ("missing keys (the config's U-Net has them, the weights do not)", missing),
            ("surplus keys (in the weights, not in the config's U-Net)", surplus),
            ("shape mismatches", mismatched)) if keys]
        raise ValueError(
            f"the weights do not fit the U-Net their config.json describes ({len(params)} of "
            f"{len(params) + len(missing) + len(mismatched)} parameters fit); is the config the "
            "one saved with these weights?\n" + "\n".join(lines)
        )
    return flax.traverse_util.unflatten_dict(params)


SUMMARY_ITEMS = 5  # a mismatch error lists this many keys of each kind, then counts the rest


def _summary(what: str, items: list[str]) -> str:
    shown = "\n".join(f"    {item}" for item in items[:SUMMARY_ITEMS])
    more = len(items) - SUMMARY_ITEMS
    return f"  {len(items)} {what}:\n{shown}" + (f"\n    ... and {more} more" if more > 0 else "")


def diffusers_state_dict(
    params: Mapping[str, Any], unet_config: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """The inverse of `convert_diffusers_unet`: our U-Net params as the state dict of the
    UNet2DModel that `unet_config` describes (contiguous float32 arrays in torch's layouts, as
    `safetensors.numpy.save_file` writes them), e.g. to write a model in diffusers' format offline.
    """
    levels = len(unet_kwargs_from_diffusers(unet_config)["ch_mult"])
    return {
        _diffusers_key(path, levels): np.ascontiguousarray(
            _relayout(path[-1], np.asarray(value, np.float32), to_torch=True))
        for path, value in flax.traverse_util.flatten_dict(params).items()
    }


def model_directory(input_path: str) -> str:
    """The directory of the model in `input_path`: the directory itself, or the `unet/` (or
    `transformer/`) subfolder of a saved pipeline (model_index.json beside it)."""
    if not os.path.exists(input_path):
        raise FileNotFoundError(f"--input {input_path!r} does not exist")
    if not os.path.isdir(input_path):
        raise ValueError(f"--input {input_path!r} is a file: pass its config.json with --config")
    for directory in (input_path, *(os.path.join(input_path, d) for d in ("unet", "transformer"))):
        if os.path.exists(os.path.join(directory, "config.json")):
            return directory
    raise FileNotFoundError(
        f"--input {input_path!r} holds no config.json, and no unet/config.json as a saved "
        f"pipeline would; give the model's directory, or a weights file with --config")


def check_output(output: str, overwrite: bool) -> None:
    """FileExistsError unless `output` is absent, empty, or (with `overwrite`) a directory."""
    if os.path.isfile(output):
        raise FileExistsError(f"--output {output!r} is a file; give a directory to write")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise FileExistsError(
            f"--output {output!r} is not empty (it holds {sorted(os.listdir(output))[:5]}); "
            "its config and checkpoints would be replaced: choose a new directory, or pass "
            "--overwrite to replace everything in it")


def convert_diffusers(
    input_path: str, output: str, config_path: str | None = None, *, overwrite: bool = False
) -> str:
    """Converts a diffusers UNet2DModel or DiT (directory, saved pipeline, or weights file +
    config.json) to a workdir at `output`, which must be absent or empty unless `overwrite`.

    Everything is read and converted before `output` is touched; with `overwrite` the old
    directory is replaced whole, so a new config never sits beside old checkpoints.
    """
    from jaxdiff.checkpoint import export
    from jaxdiff.workdir import check_not_held

    check_not_held(output)
    check_output(output, overwrite)
    if config_path is None:
        input_path = model_directory(input_path)
        config_path = os.path.join(input_path, "config.json")
    elif not os.path.exists(input_path):
        raise FileNotFoundError(f"--input {input_path!r} does not exist")
    with open(config_path) as f:
        diffusers_config = json.load(f)
    if is_diffusers_dit(diffusers_config):
        config = dit_config_from_diffusers(diffusers_config, dataset_of_channels)
        params = convert_diffusers_dit(load_diffusers_state_dict(input_path), diffusers_config)
    else:
        config = config_from_diffusers(diffusers_config)
        params = convert_diffusers_unet(load_diffusers_state_dict(input_path), diffusers_config)
    target = os.path.abspath(output)
    staging = f"{target}.converting-{os.getpid()}"
    try:
        export(staging, config, params)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        check_not_held(target)  # again: a run may have started while converting
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(target):
        retired = f"{target}.replaced-{os.getpid()}"
        os.rename(target, retired)
        os.rename(staging, target)
        shutil.rmtree(retired)
    else:
        os.rename(staging, target)
    return output


def main(argv: list[str] | None = None) -> None:
    from jaxdiff.workdir import WorkdirError

    parser = argparse.ArgumentParser(prog="python -m jaxdiff.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", choices=("diffusers",), required=True)
    parser.add_argument("--input", required=True,
                        help="diffusers model directory, or a weights file (with --config)")
    parser.add_argument("--config", default=None,
                        help="diffusers config.json (if --input is a file)")
    parser.add_argument("--output", required=True,
                        help="jaxdiff workdir to write: a new or empty directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace everything in a non-empty --output")
    args = parser.parse_args(argv)
    try:
        workdir = convert_diffusers(args.input, args.output, args.config,
                                    overwrite=args.overwrite)
    except (ValueError, OSError, WorkdirError) as e:
        sys.exit(f"jaxdiff.convert: {e}")
    print(f"wrote {workdir}")


if __name__ == "__main__":
    main()
