"""DiT (arXiv 2212.09748): the paper's parameter counts, the 2-D sin-cos positions, adaLN-Zero's
identity at initialisation, the configuration checks, the learning run on the digits, and
parity with diffusers' DiTTransformer2DModel through `python -m jaxdiff.convert` (`parity`)."""

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from experiments import cifar_dit, digits_dit
from jaxdiff import train
from jaxdiff.config import validate
from jaxdiff.convert import main
from jaxdiff.convert_dit import DIT_DEFAULTS, convert_diffusers_dit, dit_kwargs_from_diffusers
from jaxdiff.models import DIT_CONFIGS, DiT, create_model, init_params
from jaxdiff.models.dit import DiTBlock, sincos_2d
from tests.test_train import digits_accuracy

try:
    import diffusers
    import torch
except ImportError:
    diffusers = torch = None


def parity(test):
    """A cross-framework test: marked `parity`, skipped where torch and diffusers are not."""
    return pytest.mark.parity(pytest.mark.skipif(
        torch is None, reason="needs the parity extra (torch, diffusers)")(test))


def dit(name: str, **kwargs) -> DiT:
    cfg = DIT_CONFIGS[name]
    return DiT(num_layers=cfg["num_layers"], hidden_size=cfg["hidden_size"],
               num_heads=cfg["attention_heads"], patch_size=cfg["patch_size"], **kwargs)


# Table 4 of arXiv 2212.09748 (millions), for ImageNet 256 (32x32x4 latents, 1000 classes,
# learned sigma). The official code also counts the fixed position embedding (a frozen
# nn.Parameter; ours is a constant) and logs 675,129,632 for DiT-XL/2.
@pytest.mark.parametrize("name, millions", [("DiT-S/2", 33), ("DiT-B/2", 130), ("DiT-L/2", 458),
                                            ("DiT-XL/2", 675)])
def test_parameter_counts_are_the_papers(name, millions):
    model = dit(name, num_classes=1000, learn_sigma=True)
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0), (32, 32, 4), 1000))
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    assert round(count / 1e6) == millions
    positions = (32 // DIT_CONFIGS[name]["patch_size"]) ** 2 * DIT_CONFIGS[name]["hidden_size"]
    if name == "DiT-XL/2":
        assert count + positions == 675_129_632


def test_position_embedding_is_sines_of_column_then_row():
    emb = sincos_2d(8, 3)  # 4 channels for the column, 4 for the row; omega = 1, 1/100
    row, col = 1, 2
    expected = [math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100),
                math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100)]
    np.testing.assert_allclose(emb[row * 3 + col], expected, rtol=1e-12)


def test_adaln_zero_blocks_start_as_the_identity():
    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    c = jax.random.normal(jax.random.key(1), (2, 32))
    block = DiTBlock(num_heads=4)

    @jax.jit
    def fresh_and_trained(key):
        params = block.init(key, x, c)
        trained = jax.tree.map(lambda p: p + 0.1, params)  # the gates now see c
        return block.apply(params, x, c), block.apply(trained, x, c)

    fresh, trained = fresh_and_trained(jax.random.key(2))
    np.testing.assert_array_equal(fresh, x)
    assert float(jnp.abs(trained - x).max()) > 0.1


def test_a_fresh_dit_outputs_zero_and_tokens_map_back_to_their_patches():
    model = DiT(patch_size=2, hidden_size=32, num_layers=2, num_heads=4, num_classes=3,
                learn_sigma=True)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    t, y = jnp.array([3, 700]), jnp.array([0, 3])

    @jax.jit
    def outputs(key):
        params = model.init(key, x, t, y)["params"]
        fresh = model.apply({"params": params}, x, t, y)
        # The final modulation and linear made the identity: each output pixel is its
        # token's normalised value at the pixel's place in the patch (p, p, 2C) layout.
        params["final_linear"]["kernel"] = jnp.eye(32, 24)
        return fresh, model.apply({"params": params}, x, t, y), params

    fresh, out, params = outputs(jax.random.key(1))
    np.testing.assert_array_equal(fresh, 0.0)
    assert out.shape == (2, 8, 8, 6)
    patch = np.asarray(out)[:, 2:4, 4:6, :]  # the token in row 1, column 2 of the 4x4 grid
    tokens = np.asarray(out).reshape(2, 4, 2, 4, 2, 6).transpose(0, 1, 3, 2, 4, 5)
    np.testing.assert_array_equal(tokens[:, 1, 2], patch)
    flat = tokens[:, 1, 2].reshape(2, 24)  # (p, q, c) order, as the official unpatchify
    assert flat.std() > 0.1
    np.testing.assert_array_equal(flat[:, 6:12], patch[:, 0, 1, :])


@pytest.mark.parametrize("field, value, named, message", [
    ("model.patch_size", 3, "model.patch_size = 3", "must divide data.image_size=8"),
    ("model.hidden_size", 30, "model.hidden_size = 30", "must be divisible by 4"),
    ("model.attention_heads", 5, "model.hidden_size = 128", "by model.attention_heads=5"),
    ("model.freq_shift", 2, "model.freq_shift = 2", "must be one of"),
])
def test_a_bad_dit_setting_is_named(field, value, named, message):
    config = digits_dit.get_config()
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(ValueError, match=rf"config\.{named}: .*{message}"):
        validate(config, num_devices=1)


def test_experiments_build_their_dit():
    for module, shape in ((digits_dit, (8, 8, 1)), (cifar_dit, (32, 32, 3))):
        config = module.get_config()
        validate(config, num_devices=1)
        model = create_model(config)
        assert isinstance(model, DiT)
        shapes = jax.eval_shape(lambda m=model, s=shape, n=config.data.num_classes:
                                init_params(m, jax.random.key(0), s, n))
        outputs = shape[-1] * (2 if model.learn_sigma else 1)
        assert shapes["final_linear"]["kernel"].shape[-1] == model.patch_size**2 * outputs


@pytest.mark.slow  # trains experiments/digits_dit.py in full: 2400 steps, 33 min on a loaded VM
def test_the_digits_dit_learns(tmp_path):
    """Measured (seed 0): 0.88 conditional and 1.00 guided (w = 1) accuracy of the sklearn
    classifier on its samples (chance: 0.1)."""
    config = digits_dit.get_config()
    start = time.perf_counter()
    train.train_and_evaluate(config, str(tmp_path / "run"))
    seconds = time.perf_counter() - start
    model = jaxdiff.load(str(tmp_path / "run"))
    conditional = digits_accuracy(model, jax.random.PRNGKey(0), 0.0)
    guided = digits_accuracy(model, jax.random.PRNGKey(0), config.sampling.guidance_scale)
    print(f"digits DiT ({config.training.num_steps} steps, {seconds:.0f} s): conditional "
          f"accuracy {conditional:.2f}, guided {guided:.2f}")
    assert conditional > 0.75
    assert guided > 0.9


def diffusers_dit(seed=0, **config):
    """A DiTTransformer2DModel with random weights (norms, biases and the zero-initialised
    modulations too), its per-block embedder copies equal as in the published weights."""
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        first = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    return model


SMALL = dict(num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=6,
             num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def outputs_both(model, params, t, y, seed=1):
    """(ours, diffusers') output on the same x_t, both NCHW."""
    c = model.config
    x = torch.randn(len(t), c.in_channels, c.sample_size, c.sample_size,
                    generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(x, torch.tensor(t), torch.tensor(y)).sample.numpy()
    kwargs = dit_kwargs_from_diffusers(c)
    del kwargs["image_size"], kwargs["channels"]
    ours = jax.jit(DiT(**kwargs).apply)({"params": params},
                                        jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
                                        jnp.asarray(t), jnp.asarray(y))
    return np.asarray(ours).transpose(0, 3, 1, 2), ref


@parity
def test_dit_defaults_are_diffusers_defaults():
    import inspect
    signature = inspect.signature(diffusers.DiTTransformer2DModel.__init__).parameters
    for key, value in DIT_DEFAULTS.items():
        assert signature[key].default == value, key


@parity
def test_convert_command_gives_diffusers_eps_and_variance(tmp_path):
    model = diffusers_dit(**SMALL)
    model.save_pretrained(tmp_path / "pipeline" / "transformer", safe_serialization=True)
    main(["--from", "diffusers", "--input", str(tmp_path / "pipeline"),
          "--output", str(tmp_path / "run")])
    loaded = jaxdiff.load(str(tmp_path / "run"))
    assert loaded.model_var_type == "learned_range" and loaded.image_shape == (8, 8, 3)
    ours, ref = outputs_both(model, loaded.params, [0, 500, 999], [0, 9, 10])
    diff = np.abs(ours - ref).max(axis=(0, 2, 3))
    print(f"small DiT: max |ours - diffusers| per channel (eps, variance) = {diff}")
    assert ref[:, 3:].std() > 0.1 and ref[:, :3].std() > 0.1
    assert diff.max() < 1e-4


@parity
def test_xl_shaped_latent_dit_converts_by_function():
    """DiT-XL/2's configuration (4-channel latents, learned sigma, 1000 classes) with 2 layers:
    the published layout converts (no data set holds latents, so no workdir is written)."""
    config = {**DIT_DEFAULTS, "num_layers": 2, "out_channels": 8, "sample_size": 8}
    model = diffusers_dit(**config)
    params = convert_diffusers_dit(
        {k: v.numpy() for k, v in model.state_dict().items()}, model.config)
    ours, ref = outputs_both(model, params, [10, 900], [5, 1000])
    assert float(np.abs(ours - ref).max()) < 2e-4


@parity
def test_differing_embedder_copies_are_refused(tmp_path):
    model = diffusers_dit(**SMALL)
    with torch.no_grad():
        model.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight.add_(1.0)
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    with pytest.raises(SystemExit, match=r"1 embedder copies that differ from block 0's"):
        main(["--from", "diffusers", "--input", str(tmp_path / "model"),
              "--output", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    assert json.loads((tmp_path / "model" / "config.json").read_text())["_class_name"] == \
        "DiTTransformer2DModel"
