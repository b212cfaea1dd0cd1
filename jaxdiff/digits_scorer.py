"""The digits scorer: a small classifier of the 8x8 digits, trained once on the real training
digits, whose hidden layer gives digits FID features (a Frechet distance in the place of
Inception's, arXiv 1706.08500) and whose predictions give the label accuracy of a conditional
model's samples. `evaluate --metrics digits_fid` and `benchmarks/digits_samplers.py` use it.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff import metrics
from jaxdiff.data import DIGITS_SIZE, digits_arrays

HIDDEN = 128
TRAIN_STEPS = 500


def _logits(params: dict, x):
    hidden = jax.nn.relu(jnp.reshape(x, (x.shape[0], -1)) @ params["w1"] + params["b1"])
    return hidden, hidden @ params["w2"] + params["b2"]


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _train(x, y, rng, num_steps: int):
    k1, k2 = jax.random.split(rng)
    params = {"w1": jax.random.normal(k1, (x.shape[1], HIDDEN)) / np.sqrt(x.shape[1]),
              "b1": jnp.zeros(HIDDEN),
              "w2": jax.random.normal(k2, (HIDDEN, 10)) / np.sqrt(HIDDEN),
              "b2": jnp.zeros(10)}
    tx = optax.adam(3e-3)

    def loss(p):
        ce = optax.softmax_cross_entropy_with_integer_labels(_logits(p, x)[1], y).mean()
        return ce + 1e-4 * (jnp.sum(p["w1"] ** 2) + jnp.sum(p["w2"] ** 2))

    def step(carry, _):
        p, state = carry
        updates, state = tx.update(jax.grad(loss)(p), state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=num_steps)
    return params


def load_classifier(cache_dir: str, seed: int = 0) -> dict[str, np.ndarray]:
    """The digits feature network: a 64-128-10 ReLU MLP trained (full-batch Adam, a fixed number
    of steps, so deterministic given `seed`) on the real training digits on first use and cached
    as `cache_dir/digits_classifier_seed<seed>.npz`. Its test accuracy is stored as "accuracy"."""
    path = os.path.join(cache_dir, f"digits_classifier_seed{seed}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            return dict(f)
    x, y = digits_arrays("train")
    params = _train(jnp.asarray(x.reshape(len(x), -1)), jnp.asarray(y), jax.random.key(seed),
                    TRAIN_STEPS)
    params = {k: np.asarray(v) for k, v in params.items()}
    x_test, y_test = digits_arrays("test")
    params["accuracy"] = np.asarray(np.mean(predict(params, x_test) == y_test))
    os.makedirs(cache_dir, exist_ok=True)
    np.savez(path, **params)
    return params


def features(classifier: dict, images) -> np.ndarray:
    """The classifier's hidden layer [N, 128] for digits [N, 8, 8, 1] in [-1, 1]."""
    images = np.asarray(images, np.float32)
    if images.shape[1:] != (DIGITS_SIZE, DIGITS_SIZE, 1):
        raise ValueError(f"digits must be [N, 8, 8, 1], got shape {images.shape}")
    return np.asarray(_logits(classifier, images)[0])


def predict(classifier: dict, images) -> np.ndarray:
    """The classifier's predicted class [N] for digits [N, 8, 8, 1] in [-1, 1]."""
    return np.asarray(_logits(classifier, np.asarray(images, np.float32))[1].argmax(-1))


def fid(classifier: dict, images) -> float:
    """Frechet distance between the classifier features of `images` and of the training digits."""
    mu, sigma = metrics.feature_statistics(features(classifier, digits_arrays("train")[0]))
    return metrics.frechet_distance(*metrics.feature_statistics(
        features(classifier, images)), mu, sigma)
