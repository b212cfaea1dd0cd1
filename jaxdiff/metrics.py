"""Sample-quality metrics on features: Frechet distance, Inception Score, sliced Wasserstein.

Everything here is host-side NumPy/SciPy in float64 (the statistics of a few thousand feature
vectors; no network). The feature extractors live elsewhere: `jaxdiff.models.inception` (FID and
IS, arXiv 1706.08500 and 1606.03498) and the small digits classifier in `jaxdiff.evaluate`.
Reference statistics are stored as `.npz` files with the keys `mu` and `sigma`, the layout of
pytorch-fid's `--save-stats`, so its precomputed files load here and ours load there.
"""

from __future__ import annotations

import os
import warnings

import jax
import numpy as np
from scipy import linalg


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of features [N, D] in float64, the unbiased (N - 1) covariance
    that pytorch-fid's `np.cov(..., rowvar=False)` computes."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) (FID, arXiv 1706.08500).

    The squared 2-Wasserstein distance between N(mu1, sigma1) and N(mu2, sigma2), computed as
    pytorch-fid does: `scipy.linalg.sqrtm` of the product; if that is not finite (a singular
    product), `eps` is added to both diagonals and the root taken again; an imaginary part of the
    root's diagonal above 1e-3 is an error, a smaller one (round-off) is dropped.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mean vectors must both be [D], got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must both be [{d}, {d}], got {sigma1.shape} and "
                         f"{sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary component "
                             f"{np.max(np.abs(covmean.imag)):.3g}: the covariances are not "
                             "positive semi-definite or too ill-conditioned")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits_or_probs, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) (Salimans et al., arXiv 1606.03498): (mean, std) over splits.

    Rows that are non-negative and sum to 1 are taken as probabilities, anything else as logits
    (softmaxed here). As in the original code, the N predictions are cut into `splits` equal
    consecutive parts, p(y) is each part's mean prediction, and the score is averaged over
    parts. Uniform predictions score 1; confident predictions spread evenly over K classes, K.
    """
    x = np.asarray(logits_or_probs, np.float64)
    if x.ndim != 2:
        raise ValueError(f"predictions must be [N, num_classes], got shape {x.shape}")
    if not (isinstance(splits, int) and 1 <= splits <= x.shape[0]):
        raise ValueError(f"splits must be an integer in [1, N={x.shape[0]}], got {splits!r}")
    if (x >= 0).all() and np.allclose(x.sum(axis=1), 1.0, atol=1e-4):
        log_p = np.log(np.maximum(x, 1e-300))
    else:
        log_p = x - np.logaddexp.reduce(x, axis=1, keepdims=True)
    p = np.exp(log_p)
    scores = []
    for part_p, part_log_p in zip(np.array_split(p, splits), np.array_split(log_p, splits),
                                  strict=True):
        log_marginal = np.log(np.maximum(part_p.mean(axis=0, keepdims=True), 1e-300))
        kl = np.sum(part_p * (part_log_p - log_marginal), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def sliced_wasserstein(a, b, rng: jax.Array, num_projections: int = 128) -> float:
    """The sliced 2-Wasserstein distance (E_theta W_2^2(theta.a, theta.b))^(1/2), theta uniform
    on the unit sphere, estimated with `num_projections` random directions drawn from `rng`.

    Each 1-D W_2 between the projected empirical distributions is exact for any sizes N and M
    (the quantile functions are step functions; their squared difference is integrated over the
    merged breakpoints). Two sets that differ by a shift s are sqrt(E (theta.s)^2) = |s| /
    sqrt(D) apart in D dimensions.
    """
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    if a.shape[1] != b.shape[1] or len(a) == 0 or len(b) == 0:
        raise ValueError(f"point sets must be non-empty and of one dimension, got shapes "
                         f"{a.shape} and {b.shape}")
    if not (isinstance(num_projections, int) and num_projections >= 1):
        raise ValueError(f"num_projections must be a positive integer, got {num_projections!r}")
    theta = np.asarray(jax.random.normal(rng, (a.shape[1], num_projections)), np.float64)
    theta /= np.linalg.norm(theta, axis=0, keepdims=True)
    pa, pb = np.sort(a @ theta, axis=0), np.sort(b @ theta, axis=0)
    n, m = len(a), len(b)
    edges = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    widths = np.diff(edges, prepend=0.0)
    mid = edges - widths / 2  # each merged interval lies inside one step of each function
    ia = np.minimum((mid * n).astype(np.int64), n - 1)
    ib = np.minimum((mid * m).astype(np.int64), m - 1)
    w2_squared = widths @ (pa[ia] - pb[ib]) ** 2  # [num_projections]
    return float(np.sqrt(w2_squared.mean()))


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray) -> str:
    """Writes reference statistics as `.npz` with keys mu and sigma (pytorch-fid's layout)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    return path


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a `.npz` written by `save_statistics` or pytorch-fid's --save-stats."""
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} holds {sorted(f.keys())}; reference statistics need the "
                             "keys 'mu' and 'sigma'")
        return f["mu"], f["sigma"]
