"""Guidance against exact oracles: the mixture's noisy classifier and class-conditional eps."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import guidance
from jaxdiff.sampling import sample
from jaxdiff.schedules import make_schedule, spaced_timesteps
from tests.oracles import GaussianMixture

SCHEDULE = make_schedule("linear", 1000)
MIX = GaussianMixture(weights=np.array([0.5, 0.3, 0.2]),
                      means=np.array([[-0.55, -0.45], [0.55, -0.45], [0.0, 0.55]]),
                      stds=np.array([0.15, 0.15, 0.15]))
N = 2000
LABELS = np.arange(N, dtype=np.int32) % 3  # every component asked for equally often


def unconditional(params, x, t, y):
    del params, y
    return MIX.eps(SCHEDULE, x, t)


def conditional(params, x, t, y):
    """eps(x_t, y) for y in {0, 1, 2}; y = 3 (the null label) is the unconditional eps."""
    del params
    cond = MIX.eps(SCHEDULE, x, t, jnp.minimum(y, 2))
    return jnp.where((y == 3)[:, None], MIX.eps(SCHEDULE, x, t), cond)


def classifier(params, x, t):
    del params
    return MIX.class_logits(SCHEDULE, x, t)


def nearest_component(x) -> np.ndarray:
    return np.argmin(((np.asarray(x)[:, None] - MIX.means[None]) ** 2).sum(-1), axis=1)


def hit_rate(x, labels) -> float:
    return float(np.mean(nearest_component(x) == labels))


def test_classifier_guidance_ddpm_form():
    kwargs = dict(model=unconditional, schedule=SCHEDULE, shape=(2,), num_samples=N,
                  num_steps=250)
    guided = sample(None, jax.random.key(0), "ddpm", labels=LABELS, classifier=classifier,
                    classifier_params={}, classifier_scale=1.0, **kwargs)
    unguided = sample(None, jax.random.key(0), "ddpm", **kwargs)
    rate = hit_rate(guided, LABELS)
    weights = np.bincount(nearest_component(unguided), minlength=3) / N
    print(f"classifier guidance (ADM Alg. 1, s=1): {rate:.4f} in the requested component; "
          f"unguided proportions {weights}")
    assert rate >= 0.95
    np.testing.assert_allclose(weights, MIX.weights, atol=0.035)  # n = 2000: std <= 0.011


def test_classifier_guidance_ddim_form():
    guided = sample(None, jax.random.key(1), "ddim", labels=LABELS, classifier=classifier,
                    classifier_params={}, classifier_scale=1.0, model=unconditional,
                    schedule=SCHEDULE, shape=(2,), num_samples=N, num_steps=50)
    rate = hit_rate(guided, LABELS)
    print(f"classifier guidance (ADM Alg. 2, DDIM, s=1): {rate:.4f} in the requested component")
    assert rate >= 0.95


def test_classifier_guidance_dpm_solver_pp_rare_class():
    labels = np.full(N, 2, np.int32)  # the lightest component, weight 0.2
    guided = sample(None, jax.random.key(2), "dpm_solver++", labels=labels, classifier=classifier,
                    classifier_params={}, classifier_scale=2.0, model=unconditional,
                    schedule=SCHEDULE, shape=(2,), num_samples=N)
    rate = hit_rate(guided, labels)
    print(f"classifier guidance (DPM-Solver++, s=2), class of weight 0.2: {rate:.4f}")
    assert rate >= 0.95


def test_classifier_free_guidance_one_batched_call():
    batches = []

    def spy(params, x, t, y):
        batches.append(x.shape[0])  # runs once per trace: the scan body calls the network once
        return conditional(params, x, t, y)

    x = sample(None, jax.random.key(3), "ddim", labels=LABELS, guidance_scale=1.0, model=spy,
               schedule=SCHEDULE, shape=(2,), num_classes=3, num_samples=N, num_steps=50)
    rate = hit_rate(x, LABELS)
    print(f"classifier-free guidance (w=1, DDIM): {rate:.4f} in the requested component")
    assert rate >= 0.95
    assert batches == [2 * N]
    # The null label gives back the unconditional model: its samples follow the mixture weights.
    null = sample(None, jax.random.key(3), "ddim", labels=np.full(N, 3, np.int32),
                  model=conditional, schedule=SCHEDULE, shape=(2,), num_classes=3,
                  num_samples=N, num_steps=50)
    weights = np.bincount(nearest_component(null), minlength=3) / N
    np.testing.assert_allclose(weights, MIX.weights, atol=0.035)


def test_classifier_free_guidance_ddpm():
    x = sample(None, jax.random.key(4), "ddpm", labels=LABELS, guidance_scale=2.0,
               model=conditional, schedule=SCHEDULE, shape=(2,), num_classes=3, num_samples=N,
               num_steps=250)
    assert hit_rate(x, LABELS) >= 0.95


def test_classifier_log_prob_grad_matches_closed_form():
    # Linear logits W x: grad log softmax_y = W_y - sum_k p_k W_k.
    w = jax.random.normal(jax.random.key(0), (3, 2))
    x = jax.random.normal(jax.random.key(1), (5, 2))
    y = jnp.array([0, 1, 2, 1, 0])
    grad = guidance.classifier_log_prob_grad(lambda x, t: x @ w.T, x, jnp.zeros(5, int), y)
    p = jax.nn.softmax(x @ w.T)
    np.testing.assert_allclose(grad, w[y] - p @ w, rtol=1e-5, atol=1e-6)


def test_condition_transforms():
    """For a linear log p(y | x) = g x, p(x) p(y | x)^s of a Gaussian p(x) is the product ADM's
    Alg. 1 samples from: its mean (by quadrature on a grid, per element) is condition_mean's,
    and its score (by central differences of the log density) is -condition_eps / sqrt(1 - a_bar)
    when eps = -sqrt(1 - a_bar) score of p (Alg. 2's eps_hat)."""
    rng = np.random.default_rng(0)
    mean, var = rng.normal(size=(2, 3)), rng.uniform(0.1, 2.0, (2, 3))
    grad, scale = rng.normal(size=(2, 3)), 3.0
    got_mean = np.asarray(guidance.condition_mean(jnp.asarray(mean, jnp.float32),
                                                  jnp.asarray(var, jnp.float32),
                                                  jnp.asarray(grad, jnp.float32), scale))
    sqrt_1m_a = 0.6
    x = rng.normal(size=(2, 3))
    eps = (x - mean) / var * sqrt_1m_a  # -sqrt(1 - a_bar) times the score of N(mean, var)
    got_eps = np.asarray(guidance.condition_eps(jnp.asarray(eps, jnp.float32),
                                                jnp.asarray(grad, jnp.float32), scale,
                                                jnp.float32(sqrt_1m_a)))
    for i in np.ndindex(mean.shape):
        def log_tilted(z, i=i):
            return -0.5 * (z - mean[i]) ** 2 / var[i] + scale * grad[i] * z

        sd = np.sqrt(var[i])
        grid = np.linspace(mean[i] - 30 * sd, mean[i] + 30 * sd, 200_001)
        weights = np.exp(log_tilted(grid) - log_tilted(grid).max())
        np.testing.assert_allclose(got_mean[i], (grid * weights).sum() / weights.sum(),
                                   rtol=1e-5, atol=1e-5)
        h = 1e-4
        score = (log_tilted(x[i] + h) - log_tilted(x[i] - h)) / (2 * h)
        np.testing.assert_allclose(got_eps[i], -sqrt_1m_a * score, rtol=1e-4, atol=1e-4)


def test_classifier_free_output_mixes_mean_keeps_conditional_variance():
    def model_fn(x, t, y):  # mean channels = label, variance channels = 10 * label
        y = y.astype(jnp.float32)[:, None]
        return jnp.concatenate([jnp.broadcast_to(y, x.shape),
                                jnp.broadcast_to(10 * y, x.shape)], axis=-1)

    x = jnp.zeros((2, 3))
    out = guidance.classifier_free_output(model_fn, x, jnp.zeros(2, int), jnp.array([1, 2]),
                                          null_label=5, guidance_scale=2.0,
                                          model_var_type="learned_range")
    expected_mean = 3.0 * jnp.array([1.0, 2.0]) - 2.0 * 5.0
    np.testing.assert_allclose(out[:, :3], jnp.broadcast_to(expected_mean[:, None], (2, 3)))
    np.testing.assert_allclose(out[:, 3:], jnp.broadcast_to(jnp.array([[10.0], [20.0]]), (2, 3)))


class LinearClassifier(nn.Module):
    @nn.compact
    def __call__(self, x, t, train=False):
        return nn.Dense(3)(x)


def test_flax_module_classifier():
    """A Flax module classifier guides DDIM as ADM Alg. 2 says, written out in float64: for logits
    x W + b, grad log p(y | x) = W_y - sum_k p_k W_k; eps_hat = eps - sqrt(1 - a_bar) s grad;
    x_prev = sqrt(a_bar_prev) x0_hat + sqrt(1 - a_bar_prev) eps_hat (DDIM Eq. 12, eta = 0)."""
    rng = np.random.default_rng(0)
    w, b = 0.5 * rng.standard_normal((2, 3)), 0.1 * rng.standard_normal(3)
    params = {"Dense_0": {"kernel": jnp.asarray(w, jnp.float32),
                          "bias": jnp.asarray(b, jnp.float32)}}
    labels, scale = np.array([0, 1, 2, 1]), 2.0
    x_T = rng.standard_normal((4, 2)).astype(np.float32)
    got = sample(None, jax.random.key(5), "ddim", labels=labels, classifier=LinearClassifier(),
                 classifier_params=params, classifier_scale=scale, model=unconditional,
                 schedule=SCHEDULE, shape=(2,), num_samples=4, num_steps=10,
                 clip_denoised=False, x_T=x_T)

    a_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    steps = spaced_timesteps(1000, 10, "uniform")
    x = x_T.astype(np.float64)
    for i in reversed(range(10)):
        ab, ab_prev = a_bar[steps[i]], a_bar[steps[i - 1]] if i else 1.0
        eps = np.asarray(MIX.eps(SCHEDULE, jnp.asarray(x, jnp.float32),
                                 jnp.full(4, steps[i])), np.float64)
        logits = x @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = w.T[labels] - p @ w.T
        eps_hat = eps - np.sqrt(1.0 - ab) * scale * grad
        x0_hat = (x - np.sqrt(1.0 - ab) * eps_hat) / np.sqrt(ab)
        x = np.sqrt(ab_prev) * x0_hat + np.sqrt(1.0 - ab_prev) * eps_hat
    unguided = sample(None, jax.random.key(5), "ddim", model=unconditional, schedule=SCHEDULE,
                      shape=(2,), num_samples=4, num_steps=10, clip_denoised=False, x_T=x_T)
    assert np.abs(np.asarray(unguided) - x).min() > 0.05  # the guidance moved every sample
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-3, atol=1e-3)


def test_new_scales_never_recompile():
    kwargs = dict(model=conditional, schedule=SCHEDULE, shape=(2,), num_classes=3, num_samples=6,
                  num_steps=10, labels=np.array([0, 1, 2, 0, 1, 2]), classifier=classifier,
                  classifier_params={})
    sample(None, jax.random.key(0), guidance_scale=1.0, classifier_scale=1.0, **kwargs)
    compiles = []

    def listener(event, duration, **unused):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for w, s in ((3.0, 0.5), (0.5, 4.0)):
            sample(None, jax.random.key(1), guidance_scale=w, classifier_scale=s,
                   **kwargs).block_until_ready()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
