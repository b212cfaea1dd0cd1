"""Frechet distance, Inception Score, sliced Wasserstein and the FID Inception-v3, each against an
independent computation (closed forms, eigendecompositions; pytorch-fid for the parity tests)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

from jaxdiff import metrics
from jaxdiff.models import inception


def _random_features(seed, n=400, d=6, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mixing * scale + shift


def _frechet_by_eigh(mu1, s1, mu2, s2):
    """Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)), a symmetric PSD root by eigh."""
    w, v = linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(np.maximum(w, 0))) @ v.T
    inner = linalg.eigvalsh(root1 @ s2 @ root1)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(
        np.sqrt(np.maximum(inner, 0)))


def test_feature_statistics_are_mean_and_unbiased_covariance():
    x = _random_features(0, n=50, d=4)
    mu, sigma = metrics.feature_statistics(x)
    centred = x - x.sum(0) / len(x)
    np.testing.assert_allclose(mu, x.sum(0) / len(x))
    np.testing.assert_allclose(sigma, centred.T @ centred / (len(x) - 1), rtol=1e-12)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    mu, sigma = metrics.feature_statistics(_random_features(1))
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_is_symmetric_and_matches_an_independent_formula():
    a = metrics.feature_statistics(_random_features(2))
    b = metrics.feature_statistics(_random_features(3, shift=0.5, scale=1.3))
    ab, ba = metrics.frechet_distance(*a, *b), metrics.frechet_distance(*b, *a)
    assert ab > 1.0
    np.testing.assert_allclose(ab, ba, rtol=1e-8)
    np.testing.assert_allclose(ab, _frechet_by_eigh(*a, *b), rtol=1e-8)


def test_frechet_distance_of_one_dimensional_gaussians():
    # W_2^2(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2.
    d = metrics.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]])
    np.testing.assert_allclose(d, 3.0**2 + (2.0 - 3.0) ** 2, rtol=1e-12)


def test_frechet_distance_of_singular_covariances_uses_the_eps_fallback():
    # Fewer samples than dimensions: rank-deficient covariances, as with small FID sample sets.
    a = metrics.feature_statistics(_random_features(4, n=5, d=8))
    b = metrics.feature_statistics(_random_features(5, n=5, d=8))
    d = metrics.frechet_distance(*a, *b)
    assert np.isfinite(d)
    np.testing.assert_allclose(d, _frechet_by_eigh(*a, *b), rtol=1e-3)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"covariances must both be \[3, 3\]"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="mean vectors"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match=r"features must be \[N, D\]"):
        metrics.feature_statistics(np.zeros(5))


def test_inception_score_of_uniform_and_of_confident_predictions():
    k, n = 7, 70
    uniform = np.full((n, k), 1.0 / k)
    one_hot = np.eye(k)[np.arange(n) % k]
    assert metrics.inception_score(uniform, splits=10) == pytest.approx((1.0, 0.0), abs=1e-9)
    assert metrics.inception_score(one_hot, splits=10) == pytest.approx((k, 0.0), abs=1e-9)


def test_inception_score_of_logits_equals_that_of_their_softmax():
    logits = np.random.default_rng(0).normal(size=(60, 5)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    mean, std = metrics.inception_score(logits, splits=3)
    assert (mean, std) == pytest.approx(metrics.inception_score(probs, splits=3), rel=1e-9)
    # The definition, split by split: exp(mean_x KL(p(y|x) || mean_x p(y|x))).
    expected = [np.exp(np.mean(np.sum(p * np.log(p / p.mean(0)), axis=1)))
                for p in np.split(probs, 3)]
    assert (mean, std) == pytest.approx((np.mean(expected), np.std(expected)), rel=1e-9)


def test_inception_score_rejects_bad_splits():
    with pytest.raises(ValueError, match="splits must be an integer in"):
        metrics.inception_score(np.eye(3), splits=4)


def test_sliced_wasserstein_of_identical_sets_is_zero():
    a = _random_features(6, n=300, d=3)
    rng = jax.random.key(0)
    assert metrics.sliced_wasserstein(a, a, rng) < 1e-12
    # The same empirical distribution at another size (each point twice) is also at distance 0.
    assert metrics.sliced_wasserstein(a, np.concatenate([a, a]), rng) < 1e-12


def test_sliced_wasserstein_of_shifted_sets_is_the_projected_shift():
    a = np.random.default_rng(7).normal(size=(500, 1))
    assert metrics.sliced_wasserstein(a, a + 0.7, jax.random.key(1)) == pytest.approx(0.7)
    # In D dimensions the mean squared projection of a shift s is |s|^2 / D.
    b = _random_features(8, n=500, d=2)
    shift = np.array([3.0, -4.0])
    swd = metrics.sliced_wasserstein(b, b + shift, jax.random.key(2), num_projections=4000)
    assert swd == pytest.approx(5.0 / np.sqrt(2.0), rel=0.03)


def test_sliced_wasserstein_matches_sorted_difference_for_equal_sizes():
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(50, 1)), rng.exponential(size=(50, 1))
    expected = np.sqrt(np.mean((np.sort(a[:, 0]) - np.sort(b[:, 0])) ** 2))
    assert metrics.sliced_wasserstein(a, b, jax.random.key(3), 8) == pytest.approx(expected)


def test_statistics_round_trip_through_npz(tmp_path):
    mu, sigma = metrics.feature_statistics(_random_features(10, n=20, d=3))
    path = metrics.save_statistics(str(tmp_path / "ref.npz"), mu, sigma)
    loaded = metrics.load_statistics(path)
    np.testing.assert_array_equal(loaded[0], mu)
    np.testing.assert_array_equal(loaded[1], sigma)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="need the keys 'mu' and 'sigma'"):
        metrics.load_statistics(str(tmp_path / "bad.npz"))


# ---------------------------------------------------------------------------------------------
# The FID Inception-v3.


def _abstract_variables():
    return jax.eval_shape(inception.InceptionV3().init, jax.random.key(0),
                          jnp.zeros((1, 299, 299, 3)))


def test_inception_maps_299_pixels_to_2048_features_and_1008_logits():
    variables = _abstract_variables()
    features, logits = jax.eval_shape(inception.InceptionV3().apply, variables,
                                      jax.ShapeDtypeStruct((3, 299, 299, 3), jnp.float32))
    assert features.shape == (3, 2048) and logits.shape == (3, 1008)
    preprocessed = jax.eval_shape(inception.preprocess,
                                  jax.ShapeDtypeStruct((3, 8, 8, 1), jnp.uint8))
    assert preprocessed.shape == (3, 299, 299, 3)


def test_preprocess_maps_uint8_to_minus_one_one():
    images = jnp.asarray([[[[0]], [[255]]]], jnp.uint8)  # [1, 2, 1, 1]
    x = inception.preprocess(jnp.tile(images, (1, 1, 2, 1)))
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert x.shape == (1, 299, 299, 3)


def _torch_names(variables) -> dict[str, np.ndarray]:
    """The inverse of the conversion, written out independently: Flax variables -> a
    torchvision-named state dict with PyTorch layouts."""
    names = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
             "var": "running_var"}
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        keys = [str(k.key) for k in path][1:]
        value = np.asarray(leaf)
        if keys[-1] == "kernel":
            value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
        out[".".join(keys[:-1] + [names[keys[-1]]])] = value
        if keys[-1] == "mean":
            out[".".join(keys[:-1] + ["num_batches_tracked"])] = np.zeros((), np.int64)
    return out


def _random_variables(seed=0):
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        positive = str(path[-1].key) == "var"
        if positive:
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.standard_normal(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(draw, _abstract_variables())


def test_conversion_inverts_the_torch_layout_and_names_missing_and_surplus_keys():
    variables = _random_variables()
    state_dict = _torch_names(variables)
    assert state_dict["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state_dict["fc.weight"].shape == (1008, 2048)
    converted = inception.convert_state_dict(state_dict)
    for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    broken = dict(state_dict)
    del broken["Mixed_7c.branch_pool.bn.running_var"]
    broken["Mixed_8a.conv.weight"] = np.zeros(1)
    broken["fc.weight"] = np.zeros((1000, 2048))
    with pytest.raises(ValueError) as info:
        inception.convert_state_dict(broken)
    message = str(info.value)
    assert "missing: batch_stats/Mixed_7c/branch_pool/bn/var" in message
    assert "surplus: Mixed_8a.conv.weight" in message
    assert "wrong shape: fc.weight: (2048, 1000)" in message


def test_missing_weights_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        inception.load_pytorch_fid_weights(str(tmp_path / "nope.pth"))
    assert inception.FID_WEIGHTS_URL in str(info.value)
    assert "--inception_weights" in str(info.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in inception.FID_WEIGHTS_URL


# ---------------------------------------------------------------------------------------------
# Parity with pytorch-fid itself (the `parity` extra: torch, torchvision, pytorch-fid 0.3.0).


def _recording(make, built: list):
    """`make`, keeping what it returns in `built`."""

    def wrapped(*args, **kwargs):
        built.append(make(*args, **kwargs))
        return built[-1]

    return wrapped


@pytest.fixture(scope="module")
def pytorch_fid_outputs():
    """pytorch-fid's `InceptionV3` (FID variant) and ours on the same uint8 images, random weights:
    ((pool features, logits) of ours, (pool features, logits) of pytorch-fid).

    pytorch-fid builds its network in `fid_inception_v3()` and downloads the weights there; the
    download is replaced by the network's own random initial state (the network is kept where
    `_inception_v3` creates it), so the architecture, the state dict's names and layouts and the
    forward pass are all pytorch-fid's. The batch-norm scales and offsets are then drawn at random
    and the running statistics set by one pass over other random images (train mode, cumulative
    average), which keeps every activation of order one. The offsets are positive (most units in
    ReLU's linear part): a random network with batch norm is chaotic, its sensitivity to its input
    growing exponentially with depth (Yang et al. 2019, arXiv 1902.08129), and with offsets around
    zero float32 round-off alone moved the pool features by 5e-4 (pytorch-fid in float32 against
    itself in float64); here, by about 1e-5.
    """
    fid = pytest.importorskip("pytorch_fid.inception")
    torch = fid.torch
    torch.manual_seed(0)
    built = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fid, "_inception_v3", _recording(fid._inception_v3, built))
        patch.setattr(fid, "load_state_dict_from_url", lambda url, **_: built[0].state_dict())
        peer = fid.InceptionV3([3], resize_input=True, normalize_input=True,
                               use_fid_inception=True)
    network = built[0]  # fid_inception_v3()'s network: peer's blocks and the 1008-way fc
    batch_norms = [m for m in peer.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in batch_norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(0.5, 1.5)
            bn.reset_running_stats()
            bn.momentum = None
        peer.train()
        peer(torch.rand(4, 3, 32, 32))
        peer.eval()

    variables = inception.convert_state_dict(
        {k: v.numpy() for k, v in network.state_dict().items()})

    # CIFAR-sized uint8 images, fed to pytorch-fid as its fid_score does: float [0, 1], NCHW.
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        (pool,) = peer(torch.from_numpy(images.transpose(0, 3, 1, 2) / np.float32(255)))
        pool = pool[:, :, 0, 0]
        expected = (pool.numpy(), network.fc(pool).numpy())
    x = inception.preprocess(jnp.asarray(images))
    got = [np.asarray(g) for g in jax.jit(inception.InceptionV3().apply)(variables, x)]
    return got, expected


@pytest.mark.parity
def test_inception_pool_features_match_pytorch_fid(pytorch_fid_outputs):
    (got, _), (expected, _) = pytorch_fid_outputs
    # Absolute 1e-4, both in float32: the features are of order one (asserted), so this is also
    # about 1e-4 relative to their scale, and a feature scale that vanished could not pass it.
    # Measured: 1.4e-5, float32 round-off (pytorch-fid in float32 is 2e-5 from itself in float64,
    # ours 8e-6; in float64 throughout the two agree to 2e-14).
    assert 0.1 < np.abs(expected).max() < 10 and expected.std() > 0.01
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parity
def test_inception_logits_match_pytorch_fid_fc(pytorch_fid_outputs):
    (_, got), (_, expected) = pytorch_fid_outputs
    # The 1008 logits of the Inception Score: pytorch-fid's fc on its features. Measured: 4e-6.
    assert expected.shape == (3, inception.NUM_LOGITS) and expected.std() > 0.01
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parity
def test_preprocess_matches_torch_bilinear_interpolation():
    # Non-square images: the end-to-end test above feeds square ones only.
    torch = pytest.importorskip("torch")
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 20, 3), dtype=np.uint8)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    expected = 2 * torch.nn.functional.interpolate(
        x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    got = np.asarray(inception.preprocess(jnp.asarray(images))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
