"""Frechet distance, Inception Score, sliced Wasserstein and the FID Inception-v3, each against an
independent computation (closed forms, eigendecompositions, PyTorch for the parity tests)."""

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
# Parity with PyTorch (the `parity` extra). pytorch-fid itself cannot be installed beside this
# torch (it needs torchvision), so its FID blocks are written out below in PyTorch from
# pytorch-fid's source: the pooling semantics and weight layouts are then PyTorch's own.


def _torch_reference():
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    class Conv(nn.Module):
        def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding,
                                  bias=False)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def avg(x):
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    class A(nn.Module):
        def __init__(self, cin, pool):
            super().__init__()
            self.branch1x1 = Conv(cin, 64, 1)
            self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
            self.branch3x3dbl_1 = Conv(cin, 64, 1)
            self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
            self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
            self.branch_pool = Conv(cin, pool, 1)

        def forward(self, x):
            return torch.cat([
                self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(avg(x))], 1)

    class B(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = Conv(cin, 384, 3, stride=2)
            self.branch3x3dbl_1 = Conv(cin, 64, 1)
            self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
            self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

        def forward(self, x):
            return torch.cat([
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2)], 1)

    class C(nn.Module):
        def __init__(self, cin, c7):
            super().__init__()
            self.branch1x1 = Conv(cin, 192, 1)
            self.branch7x7_1 = Conv(cin, c7, 1)
            self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
            self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = Conv(cin, c7, 1)
            self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
            self.branch_pool = Conv(cin, 192, 1)

        def forward(self, x):
            d = x
            for i in range(1, 6):
                d = getattr(self, f"branch7x7dbl_{i}")(d)
            return torch.cat([
                self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), d,
                self.branch_pool(avg(x))], 1)

    class D(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
            self.branch7x7x3_1 = Conv(cin, 192, 1)
            self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
            self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
            self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

        def forward(self, x):
            b7 = x
            for i in range(1, 5):
                b7 = getattr(self, f"branch7x7x3_{i}")(b7)
            return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                              F.max_pool2d(x, 3, stride=2)], 1)

    class E(nn.Module):
        def __init__(self, cin, max_pool):
            super().__init__()
            self.max_pool = max_pool
            self.branch1x1 = Conv(cin, 320, 1)
            self.branch3x3_1 = Conv(cin, 384, 1)
            self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
            self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = Conv(cin, 448, 1)
            self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
            self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
            self.branch_pool = Conv(cin, 192, 1)

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg(x)
            return torch.cat([
                self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)

    class FIDInception(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
            self.Conv2d_2a_3x3 = Conv(32, 32, 3)
            self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
            self.Conv2d_3b_1x1 = Conv(64, 80, 1)
            self.Conv2d_4a_3x3 = Conv(80, 192, 3)
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
            self.Mixed_6a = B(288)
            self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
            self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
            self.Mixed_7a = D(768)
            self.Mixed_7b, self.Mixed_7c = E(1280, False), E(2048, True)
            self.fc = nn.Linear(2048, 1008)

        def forward(self, x):
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
            x = F.max_pool2d(x, 3, stride=2)
            for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
                x = getattr(self, f"Mixed_{name}")(x)
            pool = x.mean((2, 3))
            return pool, self.fc(pool)

    return torch, FIDInception


@pytest.mark.parity
def test_inception_matches_the_pytorch_fid_blocks_on_random_weights():
    torch, FIDInception = _torch_reference()
    torch.manual_seed(0)
    net = FIDInception().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    variables = inception.convert_state_dict(
        {k: v.numpy() for k, v in net.state_dict().items()})
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 107, 107)).astype(np.float32)
    with torch.no_grad():
        expected = [t.numpy() for t in net(torch.from_numpy(x))]
    got = inception.InceptionV3().apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(g), e, rtol=2e-3, atol=2e-3 * np.abs(e).max())


@pytest.mark.parity
def test_preprocess_matches_torch_bilinear_interpolation():
    torch = pytest.importorskip("torch")
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 20, 3), dtype=np.uint8)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    expected = 2 * torch.nn.functional.interpolate(
        x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    got = np.asarray(inception.preprocess(jnp.asarray(images))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
