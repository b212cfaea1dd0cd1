"""diffusers UNet2DModel weights to a jaxdiff workdir: the command's checks on its input and
output (offline, on weights written with `diffusers_state_dict`), and cross-framework parity:
converted weights give diffusers' eps (the `parity` extra, torch and diffusers: run by
`make test-parity`).
"""

import inspect
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import checkpoint
from jaxdiff.convert import (
    DDPM_CIFAR10_CONFIG,
    DIFFUSERS_DEFAULTS,
    config_from_diffusers,
    convert_diffusers,
    convert_diffusers_unet,
    diffusers_state_dict,
    load_diffusers_state_dict,
    main,
    unet_kwargs_from_diffusers,
)
from jaxdiff.models.unet import UNet

try:
    import diffusers
    import torch
except ImportError:
    diffusers = torch = None


def parity(test):
    """A cross-framework test: marked `parity`, skipped where torch and diffusers are not."""
    return pytest.mark.parity(pytest.mark.skipif(
        torch is None, reason="needs the parity extra (torch, diffusers)")(test))

DDPM_CIFAR10 = DDPM_CIFAR10_CONFIG
# Small: 16x16, two levels, GroupNorm(8), two attention heads at 16x16 and four in the middle.
SMALL = {**DDPM_CIFAR10, "sample_size": 16, "block_out_channels": (32, 64),
         "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 16,
         "down_block_types": ("AttnDownBlock2D", "DownBlock2D"),
         "up_block_types": ("UpBlock2D", "AttnUpBlock2D")}


def diffusers_unet(config, seed=0):
    """A UNet2DModel with random weights (norms and biases too, so every mapping is exercised)."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def eps_both(model, params, size, t, network=None, seed=1):
    """(ours, diffusers') eps on the same x_t, both NCHW; `network` defaults to the UNet that
    `unet_kwargs_from_diffusers` describes."""
    x = torch.randn(len(t), model.config.in_channels, size, size,
                    generator=torch.Generator().manual_seed(seed))
    t = torch.tensor(t)
    with torch.no_grad():
        ref = model(x, t).sample.numpy()
    if network is None:
        kwargs = unet_kwargs_from_diffusers(model.config)
        del kwargs["image_size"], kwargs["channels"]
        network = UNet(**kwargs)
    ours = jax.jit(network.apply)({"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
                                jnp.asarray(t.numpy()))
    return np.asarray(ours).transpose(0, 3, 1, 2), ref


def save_both(model, directory):
    """The model as diffusers saves it (config.json + safetensors), and as a torch .bin."""
    model.save_pretrained(directory, safe_serialization=True)
    path = os.path.join(directory, "weights.bin")
    torch.save(model.state_dict(), path)
    return os.path.join(directory, "diffusion_pytorch_model.safetensors"), path


@parity
def test_defaults_are_diffusers_defaults():
    signature = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    for key, value in DIFFUSERS_DEFAULTS.items():
        default = signature[key].default
        assert (tuple(default) if isinstance(default, (list, tuple)) else default) == value, key


@parity
def test_ddpm_cifar10_parity(tmp_path):
    model = diffusers_unet(DDPM_CIFAR10)
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    safetensors_path, bin_path = save_both(model, tmp_path)
    params = convert_diffusers_unet(load_diffusers_state_dict(str(tmp_path)), model.config)
    from_bin = convert_diffusers_unet(load_diffusers_state_dict(bin_path), model.config)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(from_bin), strict=True):
        np.testing.assert_array_equal(a, b)
    ours, ref = eps_both(model, params, 32, [10, 900])
    diff = float(np.abs(ours - ref).max())
    print(f"DDPM CIFAR-10 (35.7M): max |eps_jax - eps_diffusers| = {diff:.3g}")
    assert diff < 1e-4


@parity
def test_small_multihead_parity(tmp_path):
    model = diffusers_unet(SMALL)
    safetensors_path, bin_path = save_both(model, tmp_path)
    for path in (safetensors_path, bin_path):
        params = convert_diffusers_unet(load_diffusers_state_dict(path), model.config)
        ours, ref = eps_both(model, params, 16, [0, 499, 999])
        diff = float(np.abs(ours - ref).max())
        print(f"small U-Net from {os.path.basename(path)}: max abs diff = {diff:.3g}")
        assert diff < 1e-4


@parity
def test_our_weights_written_for_diffusers_give_diffusers_the_same_eps():
    """`diffusers_state_dict` (ours -> diffusers) loads strictly into UNet2DModel, which then
    predicts what our network predicts."""
    kwargs = unet_kwargs_from_diffusers(SMALL)
    del kwargs["image_size"], kwargs["channels"]
    network = UNet(**kwargs)
    params = network.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros(1, jnp.int32))
    params = jax.tree.map(  # no zero-initialised layer, so every weight counts
        lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params["params"])
    model = diffusers.UNet2DModel(**SMALL).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in
                           diffusers_state_dict(params, SMALL).items()}, strict=True)
    ours, ref = eps_both(model, params, 16, [3, 700], network=network)
    assert float(np.abs(ours - ref).max()) < 1e-4


@parity
def test_mismatched_state_dict_is_reported_by_name():
    model = diffusers_unet(SMALL)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    del state["mid_block.attentions.0.to_q.weight"]
    state["down_blocks.0.resnets.0.extra.weight"] = np.zeros(3)
    state["conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    with pytest.raises(ValueError) as info:
        convert_diffusers_unet(state, model.config)
    message = str(info.value)
    assert "1 missing keys (the config's U-Net has them, the weights do not):\n" \
        "    mid_block.attentions.0.to_q.weight\n" in message
    assert "1 surplus keys (in the weights, not in the config's U-Net):\n" \
        "    down_blocks.0.resnets.0.extra.weight\n" in message
    assert "1 shape mismatches:\n    conv_in.weight: (32, 3, 5, 5) does not convert to " \
        "conv_in/kernel (3, 3, 3, 32)" in message


def test_unsupported_settings_are_reported_by_name():
    config = {**SMALL, "flip_sin_to_cos": True, "downsample_padding": 1,
              "up_block_types": ("UpBlock2D", "UpBlock2D")}
    with pytest.raises(ValueError) as info:
        unet_kwargs_from_diffusers(config)
    for name in ("flip_sin_to_cos=True", "downsample_padding=1", "up_block_types"):
        assert name in str(info.value)


@parity
def test_cli_round_trip(tmp_path):
    import jaxdiff

    config = {**SMALL, "norm_num_groups": 32}  # a jaxdiff config describes 32 groups
    model = diffusers_unet(config)
    source = tmp_path / "diffusers"
    model.save_pretrained(source, safe_serialization=True)
    main(["--from", "diffusers", "--input", str(source), "--output", str(tmp_path / "run")])
    loaded = jaxdiff.load(str(tmp_path / "run"))
    assert loaded.image_shape == (16, 16, 3) and loaded.num_classes == 0
    assert (loaded.model_output_type, loaded.model_var_type) == ("eps", "fixed_large")
    betas = np.asarray(loaded.schedule.betas)
    np.testing.assert_allclose(betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-5)
    ours, ref = eps_both(model, loaded.params, 16, [3, 700], loaded.model)
    assert float(np.abs(ours - ref).max()) < 1e-4


# ---------------------------------------------------------------------------------------------
# The command's checks, offline: weights written in diffusers' layout by diffusers_state_dict.

# 8x8, two levels, GroupNorm(32) (a jaxdiff config describes 32 groups), attention at 4x4.
TINY = {**DDPM_CIFAR10, "sample_size": 8, "block_out_channels": (32, 64),
        "layers_per_block": 1, "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D")}


def write_diffusers_model(directory, unet_config, seed=0):
    """A UNet2DModel as diffusers saves it (config.json + safetensors); returns our params."""
    from safetensors.numpy import save_file

    kwargs = unet_kwargs_from_diffusers(unet_config)
    size, channels = kwargs.pop("image_size"), kwargs.pop("channels")
    shapes = jax.eval_shape(UNet(**kwargs).init, jax.random.key(0),
                            jnp.zeros((1, size, size, channels)), jnp.zeros(1, jnp.int32))
    rng = np.random.default_rng(seed)  # random values: no initialiser's zeros hide a mapping
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                          shapes["params"])
    os.makedirs(directory, exist_ok=True)
    save_file(diffusers_state_dict(params, unet_config),
              os.path.join(directory, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"_class_name": "UNet2DModel", **unet_config}, f)
    return params


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_non_empty_output_is_refused_and_overwrite_replaces_it_whole(tmp_path):
    # A trained workdir of another model: 16x16 images, a checkpoint at step 5.
    other = {**TINY, "sample_size": 16}
    old_params = write_diffusers_model(tmp_path / "other", other, seed=1)
    workdir = tmp_path / "run"
    checkpoint.export(str(workdir), config_from_diffusers(other), old_params, step=5)
    old_config = (workdir / "config.json").read_text()
    params = write_diffusers_model(tmp_path / "model", TINY)
    args = ["--from", "diffusers", "--input", str(tmp_path / "model"), "--output", str(workdir)]

    with pytest.raises(SystemExit, match=r"--output '.*run' is not empty.*--overwrite"):
        main(args)
    assert (workdir / "config.json").read_text() == old_config
    assert_same_params(jaxdiff.load(str(workdir)).params, old_params)

    main([*args, "--overwrite"])
    steps = [n for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
    assert steps == ["0"]  # step 5 of the old model is gone
    loaded = jaxdiff.load(str(workdir))
    assert loaded.image_shape == (8, 8, 3)
    assert_same_params(loaded.params, params)
    assert sorted(os.listdir(tmp_path)) == ["model", "other", "run"]  # nothing left over


def test_an_empty_or_absent_output_is_written(tmp_path):
    params = write_diffusers_model(tmp_path / "model", TINY)
    (tmp_path / "empty").mkdir()
    for output in (tmp_path / "empty", tmp_path / "new" / "run"):
        assert convert_diffusers(str(tmp_path / "model"), str(output)) == str(output)
        assert_same_params(jaxdiff.load(str(output)).params, params)


def test_a_saved_pipeline_is_read_from_its_unet_folder(tmp_path):
    params = write_diffusers_model(tmp_path / "pipeline" / "unet", TINY)
    (tmp_path / "pipeline" / "model_index.json").write_text('{"unet": ["diffusers", "x"]}')
    convert_diffusers(str(tmp_path / "pipeline"), str(tmp_path / "run"))
    assert_same_params(jaxdiff.load(str(tmp_path / "run")).params, params)


@pytest.mark.parametrize("make, message", [
    (lambda d: None, r"--input '.*missing' does not exist"),
    (lambda d: d.mkdir(), r"holds no config\.json, and no unet/config\.json"),
    (lambda d: d.write_bytes(b"x"), r"'.*missing' is a file: pass its config\.json with --config"),
], ids=["absent", "an empty directory", "a file"])
def test_a_bad_input_is_named(tmp_path, make, message):
    make(tmp_path / "missing")
    with pytest.raises(SystemExit, match=message):
        main(["--from", "diffusers", "--input", str(tmp_path / "missing"),
              "--output", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_bad_safetensors_file_is_named(tmp_path):
    write_diffusers_model(tmp_path / "model", TINY)
    weights = tmp_path / "model" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(SystemExit, match=rf"{weights} is not a readable safetensors file"):
        main(["--from", "diffusers", "--input", str(tmp_path / "model"),
              "--output", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_weights_of_another_config_give_a_short_summary(tmp_path):
    write_diffusers_model(tmp_path / "model", TINY)
    bigger = {**TINY, "block_out_channels": (32, 64, 64), "layers_per_block": 2,
              "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")}
    (tmp_path / "model" / "config.json").write_text(json.dumps(bigger))
    with pytest.raises(ValueError) as info:
        convert_diffusers(str(tmp_path / "model"), str(tmp_path / "run"))
    message = str(info.value)
    assert len(message) < 2000, message
    assert "is the config the one saved with these weights?" in message
    # Each kind counted, five of it shown, the rest counted.
    for kind in ("missing keys", "surplus keys", "shape mismatches"):
        assert re.search(rf"^  \d+ {kind}\b.*:$", message, re.MULTILINE), kind
    shown = [line for line in message.splitlines() if line.startswith("    ")]
    assert len(shown) == 3 * 6 and sum(line.startswith("    ... and ") for line in shown) == 3
