"""Cross-framework parity: diffusers' UNet2DModel weights, converted, give the same eps.

Needs the `parity` extra (torch, diffusers, safetensors): run by `make test-parity`.
"""

import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxdiff.convert import (  # noqa: E402
    DDPM_CIFAR10_CONFIG,
    DIFFUSERS_DEFAULTS,
    convert_diffusers_unet,
    diffusers_state_dict,
    load_diffusers_state_dict,
    main,
    unet_kwargs_from_diffusers,
)
from jaxdiff.models.unet import UNet  # noqa: E402

pytestmark = pytest.mark.parity

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


def test_defaults_are_diffusers_defaults():
    signature = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    for key, value in DIFFUSERS_DEFAULTS.items():
        default = signature[key].default
        assert (tuple(default) if isinstance(default, (list, tuple)) else default) == value, key


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


def test_small_multihead_parity(tmp_path):
    model = diffusers_unet(SMALL)
    safetensors_path, bin_path = save_both(model, tmp_path)
    for path in (safetensors_path, bin_path):
        params = convert_diffusers_unet(load_diffusers_state_dict(path), model.config)
        ours, ref = eps_both(model, params, 16, [0, 499, 999])
        diff = float(np.abs(ours - ref).max())
        print(f"small U-Net from {os.path.basename(path)}: max abs diff = {diff:.3g}")
        assert diff < 1e-4


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


def test_mismatched_state_dict_is_reported_by_name():
    model = diffusers_unet(SMALL)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    del state["mid_block.attentions.0.to_q.weight"]
    state["down_blocks.0.resnets.0.extra.weight"] = np.zeros(3)
    state["conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    with pytest.raises(ValueError) as info:
        convert_diffusers_unet(state, model.config)
    message = str(info.value)
    assert "missing keys ['mid_block.attentions.0.to_q.weight']" in message
    assert "surplus keys ['down_blocks.0.resnets.0.extra.weight']" in message
    assert "conv_in.weight: (32, 3, 5, 5) does not convert to conv_in/kernel (3, 3, 3, 32)" \
        in message


def test_unsupported_settings_are_reported_by_name():
    config = {**SMALL, "flip_sin_to_cos": True, "downsample_padding": 1,
              "up_block_types": ("UpBlock2D", "UpBlock2D")}
    with pytest.raises(ValueError) as info:
        unet_kwargs_from_diffusers(config)
    for name in ("flip_sin_to_cos=True", "downsample_padding=1", "up_block_types"):
        assert name in str(info.value)


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
