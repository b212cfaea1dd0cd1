"""LPIPS (jaxdiff.models.lpips): properties, and parity with the `lpips` package (parity-marked)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.consistency import lpips_distance
from jaxdiff.models.lpips import LPIPS, VGG_CHANNELS, VGG_SLICES, params_from_torch


def _random_state(rng: np.random.Generator):
    """Random torch-layout states: a VGG-16 trunk and non-negative heads."""
    vgg, prev = {}, 3
    for convs, ch in zip(VGG_SLICES, VGG_CHANNELS, strict=True):
        for idx in convs:
            vgg[f"features.{idx}.weight"] = rng.normal(0, np.sqrt(2 / (9 * prev)),
                                                       (ch, prev, 3, 3)).astype(np.float32)
            vgg[f"features.{idx}.bias"] = rng.normal(0, 0.01, ch).astype(np.float32)
            prev = ch
    lin = {f"lin{s}.model.1.weight": rng.uniform(0, 1, (1, ch, 1, 1)).astype(np.float32)
           for s, ch in enumerate(VGG_CHANNELS)}
    return lin, vgg


def test_lpips_is_zero_on_equal_images_symmetric_and_positive():
    params = params_from_torch(*_random_state(np.random.default_rng(0)))
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3), minval=-1, maxval=1)
    y = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3), minval=-1, maxval=1)
    apply = jax.jit(LPIPS().apply)
    d = apply({"params": params}, x, y)
    assert d.shape == (2,)
    np.testing.assert_allclose(apply({"params": params}, x, x), 0.0, atol=1e-7)
    np.testing.assert_allclose(apply({"params": params}, y, x), d, rtol=1e-5)
    assert np.all(np.asarray(d) > 0)


def test_lpips_rejects_mismatched_or_grey_batches():
    params = params_from_torch(*_random_state(np.random.default_rng(0)))
    with pytest.raises(ValueError, match="NHWC RGB"):
        LPIPS().apply({"params": params}, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 8, 8, 1)))


@pytest.fixture(scope="module")
def reference():
    """`lpips.LPIPS(net="vgg", pnet_rand=True)` (its calibrated heads, a randomly initialised
    torchvision trunk: nothing downloaded) and the same weights as this port's params."""
    torch = pytest.importorskip("torch")
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    lin = {k: v for k, v in state.items() if k.startswith("lin")}
    vgg = {"features." + k.split(".", 2)[2]: v for k, v in state.items()
           if k.startswith("net.slice")}
    return ref, params_from_torch(lin, vgg)


@pytest.mark.parity
@pytest.mark.parametrize("size,resize_to", [
    (32, None),
    # VGG-16 at 224 x 224 in both frameworks: 10-30 s on one shared core.
    pytest.param(8, 224, marks=pytest.mark.slow),
])
def test_lpips_matches_the_lpips_package_on_a_random_trunk(reference, size, resize_to):
    """The Flax port against the `lpips` package on random images. 8x8 images are first resized
    bilinearly to 224 as the CM code does for its LPIPS loss (torch: `F.interpolate(
    mode="bilinear", align_corners=False)`; jax: `jax.image.resize`, both half-pixel centred).
    Measured relative difference <= 2.4e-7 (float32 rounding); asserted within 1e-5."""
    import torch

    ref, params = reference
    rng = np.random.default_rng(size)
    x = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    ours = lpips_distance(jnp.asarray(x), jnp.asarray(y), params=params, resize_to=resize_to)
    tx, ty = (torch.from_numpy(a).permute(0, 3, 1, 2) for a in (x, y))
    if resize_to is not None:
        tx, ty = (torch.nn.functional.interpolate(t, size=(resize_to, resize_to), mode="bilinear",
                                                  align_corners=False) for t in (tx, ty))
    with torch.no_grad():
        theirs = ref(tx, ty).reshape(-1).numpy()
    assert np.all(theirs > 0)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-5)
