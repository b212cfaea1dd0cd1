"""The networks: DDPM's exact CIFAR-10 U-Net size, shapes, conditioning, dropout, ADM options,
the noisy classifier, the 2015 U-Net, the toy MLP, and every configuration error."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cifar, cifar_classifier, digits, toy2d
from jaxdiff.data import digits_arrays
from jaxdiff.models import Classifier, MLPDenoiser, OriginalUNet, UNet, create_model
from jaxdiff.models.layers import (
    AttnBlock,
    Downsample,
    ResBlock,
    Upsample,
    pixel_norm,
    timestep_embedding,
    upsample_nearest,
)

SMALL = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
             norm_groups=8)


def init(model, x, *args):
    """Random parameters of `model` (numpy draws on `jax.eval_shape`'s tree: compiling the real
    initialisers costs seconds per model on a CPU), scaled like a trained network's."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), x, *args)["params"]
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if path[-1].key in ("kernel", "embedding", "positional_embedding"):
            std = 1 / math.sqrt(math.prod(leaf.shape[:-1]))
            return jnp.asarray(std * rng.standard_normal(leaf.shape), jnp.float32)
        base = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(base + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@functools.partial(jax.jit, static_argnames=("model", "train"))
def apply(model, params, *args, train=False, key=None):
    rngs = {} if key is None else {"dropout": key}
    return model.apply({"params": params}, *args, train=train, rngs=rngs)


def num_params(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def abstract_params(model, shape, *args):
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[:1], jnp.int32),
                           *args)
    )["params"]


def test_cifar10_unet_has_ddpm_parameter_count():
    # DDPM's CIFAR-10 network (arXiv 2006.11239 App. B): 35.7M parameters, exactly as diffusers'
    # UNet2DModel of google/ddpm-cifar10-32 counts them.
    model = create_model(cifar.get_config())
    assert model == UNet()
    assert num_params(abstract_params(model, (1, 32, 32, 3))) == 35_746_307


def test_timestep_embedding_is_ddpm_sinusoid():
    t = jnp.array([0, 7, 999])
    emb = np.asarray(timestep_embedding(t, 8))
    freqs = 10000.0 ** (-np.arange(4) / 3)
    expected = np.concatenate([np.sin(np.outer([0, 7, 999], freqs)),
                               np.cos(np.outer([0, 7, 999], freqs))], axis=1)
    np.testing.assert_allclose(emb, expected, atol=1e-4)


@pytest.fixture(scope="module")
def conditional():
    model = UNet(**SMALL, num_classes=3)
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    t = jnp.array([3, 500])
    params = (init(model, x, t, jnp.zeros((2,), jnp.int32)))
    return model, params, x, t


def test_residual_branches_start_at_zero():
    # DDPM's initialisation: the last layer of each residual branch is zero, so blocks start
    # as the identity (and the U-Net's output as zero).
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 8))
    emb = jnp.ones((1, 32))
    out, variables = ResBlock(8, groups=4).init_with_output(jax.random.key(1), x, emb)
    assert not np.any(variables["params"]["conv2"]["kernel"])
    np.testing.assert_array_equal(out, x)
    attn = AttnBlock(groups=4)
    out, _ = attn.init_with_output(jax.random.key(1), x)
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("scale_shift", [False, True])
def test_upsampling_res_block_is_the_plain_block_of_the_upsampled_input(scale_shift):
    # GroupNorm's statistics, swish and the residual commute with nearest up-sampling, so ADM's
    # "up" block (conv1 in sub-pixel form) must equal the plain block (a plain conv1) on the
    # up-sampled input, with the same parameters.
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 8))
    emb = jax.random.normal(jax.random.key(1), (2, 16))
    up = ResBlock(8, groups=4, resample="up", use_scale_shift_norm=scale_shift)
    plain = ResBlock(8, groups=4, use_scale_shift_norm=scale_shift)
    params = init(up, x, emb)
    assert jax.tree.structure(params) == jax.tree.structure(init(plain, upsample_nearest(x), emb))
    got = jax.jit(up.apply)({"params": params}, x, emb)
    want = jax.jit(plain.apply)({"params": params}, upsample_nearest(x), emb)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_pixel_norm_is_progans_closed_form():
    x = np.array([[3.0, -4.0], [0.0, 0.0], [1e3, 1e3]], np.float32)
    want = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-8)  # arXiv 1710.10196 Sec. 4.2
    np.testing.assert_allclose(pixel_norm(jnp.asarray(x)), want, rtol=1e-6)
    np.testing.assert_allclose(want[0], [3 / 12.5**0.5, -4 / 12.5**0.5], rtol=1e-6)


def _adagn_blocks(x, emb):
    """A ResBlock with AdaGN, one with sCM's adaptive double normalisation, and shared
    parameters (the two have the same ones)."""
    adagn = ResBlock(8, groups=4, use_scale_shift_norm=True)
    double = ResBlock(8, groups=4, use_scale_shift_norm=True, adaptive_double_norm=True)
    params = init(adagn, x, emb)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, init(double, x, emb))
    params["conv2"]["kernel"] = params["conv1"]["kernel"]  # a residual branch that is not zero
    return adagn, double, params


def test_adaptive_double_norm_is_adagn_with_pixel_normalised_scale_and_shift():
    """sCM Sec. 4.1: y = norm(x) * pnorm(s(t)) + pnorm(b(t)). With the time projection's kernel
    zero and its bias (c 1, d 1), pnorm gives (sign(c) 1, sign(d) 1) whatever c and d: the block
    equals AdaGN's norm(x) * (1 + s) + b at s = sign(c) - 1, b = sign(d)."""
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    emb = jax.random.normal(jax.random.key(1), (2, 16))
    adagn, double, params = _adagn_blocks(x, emb)
    kernel = jnp.zeros_like(params["temb_proj"]["kernel"])
    for c, d in [(3.7, -0.2), (-0.05, 41.0)]:
        ones = jnp.ones(8)
        got = double.apply({"params": {**params, "temb_proj": {
            "kernel": kernel, "bias": jnp.concatenate([c * ones, d * ones])}}}, x, emb)
        want = adagn.apply({"params": {**params, "temb_proj": {
            "kernel": kernel,
            "bias": jnp.concatenate([(np.sign(c) - 1) * ones, np.sign(d) * ones])}}}, x, emb)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_adaptive_double_norm_ignores_the_time_projections_magnitude():
    """pnorm is invariant to positive scaling, so scaling the time projection (kernel and bias)
    by 50 leaves the block's output unchanged; AdaGN's output moves (the growth sCM blames for
    unstable consistency training)."""
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    emb = jax.random.normal(jax.random.key(1), (2, 16))
    adagn, double, params = _adagn_blocks(x, emb)
    scaled = {**params, "temb_proj": jax.tree.map(lambda p: 50 * p, params["temb_proj"])}
    for block, moves in [(double, False), (adagn, True)]:
        before, after = (block.apply({"params": p}, x, emb) for p in (params, scaled))
        change = float(jnp.abs(after - before).max() / jnp.abs(before).max())
        assert (change > 0.5) if moves else (change < 1e-5), (block, change)


def test_output_shapes_eps_and_learned_variance():
    x = jnp.zeros((2, 8, 8, 3))
    t = jnp.array([0, 999])
    for kwargs, channels in [({}, 3), ({"learn_sigma": True}, 6), ({"out_channels": 5}, 5)]:
        model = UNet(**SMALL, **kwargs)
        out = jax.eval_shape(lambda m=model: m.init_with_output(jax.random.key(0), x, t))[0]
        assert out.shape == (2, 8, 8, channels) and out.dtype == jnp.float32


@pytest.mark.slow  # compiles a conditional and an unconditional U-Net: about 8 s
def test_class_conditioning_adds_the_label_embedding_to_the_time_embedding(conditional):
    """ADM's emb = time_embed(t) + label_emb(y): the conditional U-Net at label k is the
    unconditional one whose last time-embedding bias has row k of the table added; labels are
    read per example; 3 classes + the null label."""
    model, params, x, t = conditional
    table = params["label_embed"]["embedding"]
    assert table.shape == (4, 64)
    unconditional = {name: p for name, p in params.items() if name != "label_embed"}
    out = []
    for k in range(4):
        folded = dict(unconditional, temb_dense1=dict(
            unconditional["temb_dense1"], bias=unconditional["temb_dense1"]["bias"] + table[k]))
        out.append(apply(model, params, x, t, jnp.full((2,), k)))
        want = apply(UNet(**SMALL), folded, x, t)
        np.testing.assert_allclose(out[k], want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    assert min(float(jnp.abs(out[k] - out[0]).max()) for k in range(1, 4)) > 1e-3
    mixed = apply(model, params, x, t, jnp.array([2, 0]))
    np.testing.assert_allclose(mixed, jnp.stack([out[2][0], out[0][1]]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # compiles the small U-Net in train and eval mode: about 14 s
def test_dropout_only_when_training():
    model = UNet(**{**SMALL, "dropout": 0.5})
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    t = jnp.array([3, 500])
    params = (init(model, x, t))
    k0, k1 = jax.random.key(0), jax.random.key(1)
    evaluation = apply(model, params, x, t)
    np.testing.assert_array_equal(apply(model, params, x, t, key=k1), evaluation)
    np.testing.assert_array_equal(apply(model, params, x, t, train=True, key=k0),
                                  apply(model, params, x, t, train=True, key=k0))
    a = apply(model, params, x, t, train=True, key=k0)
    b = apply(model, params, x, t, train=True, key=k1)
    assert float(jnp.abs(a - b).max()) > 1e-3
    assert float(jnp.abs(a - evaluation).max()) > 1e-3


def attention_reference(x, p, heads: int, groups: int) -> np.ndarray:
    """AttnBlock in float64 NumPy: x + proj_out(multi-head softmax(q k^T / sqrt(d)) v) on
    GroupNorm(x) (eps 1e-6), `heads` heads of C / heads channels (ADM's QKVAttention)."""
    x = np.asarray(x, np.float64)
    B, H, W, C = x.shape
    g = x.reshape(B, H * W, groups, C // groups)
    g = (g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-6)
    h = g.reshape(B, H * W, C) * np.asarray(p["norm"]["scale"]) + np.asarray(p["norm"]["bias"])

    def dense(name, a):
        return a @ np.asarray(p[name]["kernel"], np.float64) + np.asarray(p[name]["bias"])

    q, k, v = (dense(n, h).reshape(B, H * W, heads, C // heads) for n in ("q", "k", "v"))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(C // heads)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(B, H * W, C)
    return x + dense("proj_out", out).reshape(B, H, W, C)


@pytest.mark.slow  # compiles two ADM-option U-Nets with their layers' activations: about 7 s each
@pytest.mark.parametrize("options, heads", [
    (dict(num_head_channels=8, resblock_updown=True, use_scale_shift_norm=True), {16: 2, 32: 4}),
    (dict(num_heads=4, resamp_with_conv=False), {16: 4, 32: 4}),
])
def test_adm_options_reach_their_layers(options, heads):
    """ADM's options, read from the layers they configure while the U-Net runs: every attention
    block (at the resolutions asked) is multi-head attention in float64 with C / num_head_channels
    or num_heads heads; without resamp_with_conv the resampling is 2x2 average pooling and
    nearest repetition exactly; resblock_updown resamples in residual blocks (with AdaGN's (scale,
    shift) = 2 x 16 projections) instead."""
    model = UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8, 4),
                 dropout=0.1, learn_sigma=True, num_classes=10, norm_groups=8, **options)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    t, y = jnp.array([1, 2]), jnp.array([3, 10])
    params = init(model, x, t, y)
    modules = []

    @jax.jit
    def run(params):
        """The output, and each layer's (input, output, parameters), recorded as it is traced."""
        seen = []

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and isinstance(
                    context.module, (AttnBlock, Downsample, Upsample, ResBlock)):
                modules.append(context.module)
                seen.append((args[0], out, context.module.variables.get("params", {})))
            return out

        with nn.intercept_methods(record):
            out = model.apply({"params": params}, x, t, y, train=True,
                              rngs={"dropout": jax.random.key(1)})
        return out, seen

    out, seen = run(params)
    calls = [(m, *arrays) for m, arrays in zip(modules, seen, strict=True)]
    assert out.shape == (2, 8, 8, 6) and bool(jnp.all(jnp.isfinite(out)))
    attention = [c for c in calls if isinstance(c[0], AttnBlock)]
    assert sorted(a[1].shape[1] for a in attention) == [4, 4, 4, 4, 8, 8, 8]  # 2 down, mid, 3 up
    for _, a_in, a_out, p in attention:
        np.testing.assert_allclose(a_out, attention_reference(a_in, p, heads[a_in.shape[-1]], 8),
                                   rtol=1e-4, atol=1e-4)
    resampling = [c for c in calls if isinstance(c[0], (Downsample, Upsample))]
    blocks = [c for c in calls if isinstance(c[0], ResBlock) and c[0].resample]
    if options.get("resblock_updown"):
        assert not resampling and sorted(b[0].resample for b in blocks) == ["down", "up"]
        assert params["down0_down"]["temb_proj"]["kernel"].shape == (64, 32)
    else:
        assert not blocks and len(resampling) == 2
        assert "down0_down" not in params and "up1_up" not in params  # no weights
        for module, r_in, r_out, _ in resampling:
            r_in = np.asarray(r_in)
            B, H, W, C = r_in.shape
            want = (r_in.reshape(B, H // 2, 2, W // 2, 2, C).mean((2, 4))
                    if isinstance(module, Downsample) else r_in.repeat(2, 1).repeat(2, 2))
            np.testing.assert_allclose(r_out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # compiles the digits U-Net: about 5 s
def test_digits_config_fits_the_digits():
    """The digits network read against the data set itself: one input and output channel per
    image channel, a label row per class present in the data plus the null label, attention at
    4x4 only (the 8x8 images' second level), and an eps of the images' shape for real digits."""
    images, labels = digits_arrays("test")
    model = create_model(digits.get_config())
    x, y = jnp.asarray(images[:2]), jnp.asarray(labels[:2])
    t = jnp.array([0, 5])
    params = init(model, x, t, y)
    channels, classes = images.shape[-1], len(np.unique(labels))
    assert (channels, classes) == (1, 10)
    assert params["label_embed"]["embedding"].shape == (classes + 1, 4 * 32)
    assert params["conv_in"]["kernel"].shape == (3, 3, channels, 32)
    assert params["conv_out"]["kernel"].shape == (3, 3, 32, channels)  # fixed_large: eps only
    assert sorted(name for name in params if "attn" in name) == [
        "down1_attn0", "mid_attn", "up1_attn0", "up1_attn1"]
    out = apply(model, params, x, t, y)
    assert out.shape == images[:2].shape and float(jnp.std(out)) > 0


@pytest.mark.slow  # compiles the small U-Net in float32 and bfloat16: about 18 s
def test_bfloat16_compute_keeps_float32_params():
    model = UNet(**SMALL, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(2), (1, 8, 8, 3))
    t = jnp.array([3])
    params = (init(model, x, t))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    out = apply(model, params, x, t)
    ref = apply(UNet(**SMALL), params, x, t)
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max())


@pytest.mark.parametrize("kwargs, shape, y, message", [
    (dict(ch_mult=(1, 2, 2)), (1, 18, 18, 3), None, "image size 18x18 .* 3 levels"),
    (dict(attn_resolutions=(7,)), (1, 8, 8, 3), None, r"attn_resolutions \[7\] never occur"),
    (dict(num_heads=3), (1, 8, 8, 3), None, "num_heads=3 does not divide the 32 channels"),
    (dict(num_head_channels=24), (1, 8, 8, 3), None, "num_head_channels=24"),
    (dict(num_classes=10), (1, 8, 8, 3), None, "class-conditional .* pass labels y"),
    (dict(), (1, 8, 8, 3), jnp.zeros((1,), jnp.int32), "unconditional"),
    (dict(ch=12), (1, 8, 8, 3), None, r"channels \[12\] are not divisible by the 8"),
    (dict(adaptive_double_norm=True), (1, 8, 8, 3), None,
     "adaptive_double_norm=True .* needs use_scale_shift_norm=True"),
])
def test_bad_unet_configs_raise(kwargs, shape, y, message):
    model = UNet(**{**SMALL, **kwargs})
    with pytest.raises(ValueError, match=message):
        abstract_params(model, shape, y)


def test_create_model_checks_config_early():
    config = cifar.get_config()
    config.data.image_size = 36
    with pytest.raises(ValueError, match="image size 36x36 .* 4 levels"):
        create_model(config)
    config = cifar.get_config()
    config.model.class_cond = True
    config.data.num_classes = 0
    with pytest.raises(ValueError, match="num_classes"):
        create_model(config)


def test_create_model_maps_config():
    config = cifar.get_config()
    config.model.class_cond = True
    config.diffusion.model_var_type = "learned_range"
    config.model.dtype = "bfloat16"
    model = create_model(config)
    assert (model.num_classes, model.learn_sigma, model.dtype) == (10, True, jnp.bfloat16)
    classifier = create_model(cifar_classifier.get_config())
    assert isinstance(classifier, Classifier) and classifier.num_classes == 10
    assert classifier.pool == "attention" and classifier.num_head_channels == 64


@pytest.mark.parametrize("pool, head", [("attention", "pool"), ("mean", "logits")])
def test_classifier_logits(pool, head):
    model = Classifier(**SMALL, num_classes=7, pool=pool, num_head_channels=8)
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
    t = jnp.array([0, 10, 999])
    params = (init(model, x, t))
    assert head in params and not any(k.startswith("up") for k in params)
    logits = apply(model, params, x, t)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    other = apply(model, params, x, t[::-1])
    assert float(jnp.abs(logits - other).max()) > 1e-4  # time-conditioned
    if pool == "attention":
        assert params["pool"]["positional_embedding"].shape == (4 * 4 + 1, 32)


def test_original_unet_572_to_388():
    """Ronneberger et al. Fig. 1: a 572x572 tile gives a 388x388 map, and the parameters are the
    figure's layers counted by hand: two 3x3 convolutions per level (64 ... 1024 channels), 2x2
    up-convolutions halving the channels, 3x3 convolutions on the concatenated skip, a 1x1 head."""
    out, variables = jax.eval_shape(lambda: OriginalUNet(num_classes=2).init_with_output(
        jax.random.key(0), jnp.zeros((1, 572, 572, 1))))
    assert out.shape == (1, 388, 388, 2)

    def conv(k, c_in, c_out):
        return k * k * c_in * c_out + c_out

    widths = (64, 128, 256, 512, 1024)
    inputs = (1, *widths[:-1])
    count = sum(conv(3, c_in, c) + conv(3, c, c) for c_in, c in zip(inputs, widths, strict=True))
    count += sum(conv(2, 2 * c, c) + conv(3, 2 * c, c) + conv(3, c, c) for c in widths[:-1])
    count += conv(1, 64, 2)
    assert num_params(variables["params"]) == count == 31_030_658


def test_mlp_denoiser():
    x = jax.random.normal(jax.random.key(0), (5, 2))
    t = jnp.arange(5) * 100
    model = create_model(toy2d.get_config())
    assert isinstance(model, MLPDenoiser)
    y = jnp.zeros((5,), jnp.int32) if model.num_classes else None
    assert apply(model, init(model, x, t, y), x, t, y).shape == (5, 2)
    conditional = MLPDenoiser(hidden=32, depth=2, num_classes=4, learn_sigma=True)
    params = init(conditional, x, t, jnp.zeros((5,), jnp.int32))
    a = apply(conditional, params, x, t, jnp.zeros((5,), jnp.int32))
    b = apply(conditional, params, x, t, jnp.full((5,), 4))
    assert a.shape == (5, 4) and float(jnp.abs(a - b).max()) > 1e-4
    with pytest.raises(ValueError, match=r"points \[B, D\]"):
        conditional.init(jax.random.key(0), jnp.zeros((5, 2, 1)), t, jnp.zeros((5,), jnp.int32))
