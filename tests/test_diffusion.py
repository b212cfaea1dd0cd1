"""jaxdiff.diffusion against closed forms recomputed in float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import diffusion
from jaxdiff.schedules import beta_schedule, make_schedule

T = 100
NAME = "cosine"


def f32(x):
    return jnp.asarray(x, jnp.float32)


def ref64(name=NAME, steps=T):
    betas = beta_schedule(name, steps)
    a_bar = np.cumprod(1.0 - betas)
    return betas, a_bar, np.concatenate([[1.0], a_bar[:-1]])


@pytest.fixture(scope="module")
def sched():
    return make_schedule(NAME, T)


def random_batch(seed, B=6, D=4):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, T, B)
    t[0], t[1] = 0, T - 1
    return t, rng.uniform(-1, 1, (B, D)), rng.normal(size=(B, D))


def test_q_sample_has_the_moments_of_ddpm_eq_4(sched):
    n = 100_000
    t = np.array([0, 10, 50, 99])
    x0 = np.array([[0.9, -0.4], [0.5, 0.0], [-1.0, 0.3], [0.2, 0.7]])
    noise = jax.random.normal(jax.random.PRNGKey(0), (n, 4, 2))
    draws = jax.vmap(lambda e: diffusion.q_sample(sched, f32(x0), jnp.asarray(t), e))(noise)
    draws = np.asarray(draws, np.float64)
    _, a_bar, _ = ref64()
    a = a_bar[t][:, None]
    mean, var = draws.mean(0), draws.var(0)
    assert np.all(np.abs(mean - np.sqrt(a) * x0) < 5 * np.sqrt((1 - a) / n))
    # The sample variance of n normal draws has standard deviation var * sqrt(2 / n).
    assert np.all(np.abs(var - (1 - a)) < 5 * (1 - a) * np.sqrt(2 / n))
    q_mean, q_var, q_log_var = diffusion.q_mean_variance(sched, f32(x0), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(q_mean), np.sqrt(a) * x0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(q_var), 1 - a, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(q_log_var), np.log1p(-a), rtol=1e-5)


def test_posterior_is_the_product_of_gaussians(sched):
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): precisions add, means weight by them."""
    t, x0, _ = random_batch(1)
    xt = np.random.default_rng(2).normal(size=x0.shape)
    betas, _, a_prev = ref64()
    b, ap = betas[t][:, None], a_prev[t][:, None]
    mean, var, log_var = diffusion.q_posterior_mean_variance(sched, f32(x0), f32(xt),
                                                             jnp.asarray(t))
    mean, var, log_var = (np.asarray(v, np.float64) for v in (mean, var, log_var))
    later = t > 0
    prec = 1 / (1 - ap[later]) + (1 - b[later]) / b[later]
    bayes_var = 1 / prec
    bayes_mean = bayes_var * (np.sqrt(ap[later]) * x0[later] / (1 - ap[later])
                              + np.sqrt(1 - b[later]) * xt[later] / b[later])
    np.testing.assert_allclose(mean[later], bayes_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(var[later], bayes_var, rtol=1e-5)
    np.testing.assert_allclose(log_var[later], np.log(bayes_var), rtol=1e-5)
    # At t = 1 (index 0) the posterior is a point mass at x_0; its log variance is clipped to
    # log beta_tilde_2 (DDPM's code).
    np.testing.assert_allclose(mean[0], x0[0], rtol=1e-6, atol=1e-7)
    assert var[0].item() == 0.0
    beta_tilde_2 = betas[1] * (1 - a_prev[1]) / (1 - a_prev[2])
    np.testing.assert_allclose(log_var[0].item(), np.log(beta_tilde_2), rtol=1e-5)


def test_both_forms_of_mu_tilde_agree(sched):
    """DDPM Eq. 7 with x_0 = (x_t - sqrt(1 - a_bar) eps) / sqrt(a_bar) is Eq. 11."""
    t, x0, eps = random_batch(3)
    betas, a_bar, _ = ref64()
    b, a = betas[t][:, None], a_bar[t][:, None]
    xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    x0_hat = f32((xt - np.sqrt(1 - a) * eps) / np.sqrt(a))
    mean, _, _ = diffusion.q_posterior_mean_variance(sched, x0_hat, f32(xt), jnp.asarray(t))
    eq11 = (xt - b / np.sqrt(1 - a) * eps) / np.sqrt(1 - b)
    np.testing.assert_allclose(np.asarray(mean), eq11, rtol=1e-4, atol=1e-5)


def test_eps_from_x0_inverts_eq_4(sched):
    t, x0, eps = random_batch(4)
    _, a_bar, _ = ref64()
    a = a_bar[t][:, None]
    xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    eps_hat = diffusion.predict_eps_from_x0(sched, f32(xt), jnp.asarray(t), f32(x0))
    np.testing.assert_allclose(np.asarray(eps_hat), eps, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("output", ["eps", "x0", "v"])
@pytest.mark.parametrize("var_type", diffusion.MODEL_VAR_TYPES)
def test_p_mean_variance_matches_hand_formulas(sched, output, var_type):
    t, x0, eps = random_batch(5)
    rng = np.random.default_rng(6)
    out = rng.normal(size=x0.shape)
    var_out = rng.uniform(-1, 1, x0.shape) if var_type == "learned_range" \
        else rng.normal(-6, 1, x0.shape)
    learned = var_type in ("learned", "learned_range")
    model_output = np.concatenate([out, var_out], -1) if learned else out
    betas, a_bar, a_prev = ref64()
    b, a, ap = betas[t][:, None], a_bar[t][:, None], a_prev[t][:, None]
    xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    p = diffusion.p_mean_variance(sched, f32(model_output), f32(xt), jnp.asarray(t),
                                  model_output_type=output, model_var_type=var_type,
                                  clip_denoised=False)

    x0_hat = {"eps": (xt - np.sqrt(1 - a) * out) / np.sqrt(a), "x0": out,
              "v": np.sqrt(a) * xt - np.sqrt(1 - a) * out}[output]
    mean = (b * np.sqrt(ap) * x0_hat + (1 - ap) * np.sqrt(1 - b) * xt) / (1 - a)
    post_var = betas * (1 - a_prev) / (1 - a_bar)
    clipped = np.concatenate([[post_var[1]], post_var[1:]])[t][:, None]
    if var_type == "fixed_small":
        var, log_var = post_var[t][:, None] + 0 * out, np.log(clipped) + 0 * out
    elif var_type == "fixed_large":  # beta_t, with beta_tilde_2 at the first step
        var = np.where(t[:, None] == 0, post_var[1], b) + 0 * out
        log_var = np.log(var)
    elif var_type == "learned":
        var, log_var = np.exp(var_out), var_out
    else:  # IDDPM Eq. 15
        log_var = (var_out + 1) / 2 * np.log(b) + (1 - var_out) / 2 * np.log(clipped)
        var = np.exp(log_var)
    np.testing.assert_allclose(np.asarray(p.pred_x0), x0_hat, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(p.mean), mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(p.variance), var, rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(np.asarray(p.log_variance), log_var, rtol=1e-4, atol=1e-5)
    eps_hat = (xt - np.sqrt(a) * x0_hat) / np.sqrt(1 - a)
    np.testing.assert_allclose(np.asarray(p.pred_eps)[1:], eps_hat[1:], rtol=1e-3, atol=1e-3)


def test_clip_denoised_clips_x0_and_recomputes_eps(sched):
    t = jnp.asarray([5, 50])
    xt = f32([[0.3, -0.2], [1.5, -2.0]])
    out = f32([[3.0, -0.5], [0.1, 4.0]])
    p = diffusion.p_mean_variance(sched, out, xt, t, model_output_type="x0", clip_denoised=True)
    np.testing.assert_allclose(np.asarray(p.pred_x0), [[1.0, -0.5], [0.1, 1.0]], rtol=1e-7)
    _, a_bar, _ = ref64()
    a = a_bar[[5, 50]][:, None]
    np.testing.assert_allclose(np.asarray(p.pred_eps),
                               (np.asarray(xt) - np.sqrt(a) * np.asarray(p.pred_x0))
                               / np.sqrt(1 - a), rtol=1e-4)


def test_fixed_large_with_a_single_step():
    sched = make_schedule("linear", 1)
    p = diffusion.p_mean_variance(sched, f32([[0.1]]), f32([[0.2]]), jnp.asarray([0]),
                                  model_var_type="fixed_large")
    np.testing.assert_allclose(np.asarray(p.variance), [[0.1]], rtol=1e-6)


def test_p_mean_variance_traces_under_jit(sched):
    """With t traced (one compilation for every step) the mean is still DDPM Eq. 11,
    (x_t - beta_t / sqrt(1 - a_bar_t) eps) / sqrt(1 - beta_t), and the variance beta_tilde_t."""
    f = jax.jit(lambda out, xt, t: diffusion.p_mean_variance(
        sched, out, xt, t, clip_denoised=False)[:2])
    t, xt, eps = random_batch(7)
    mean, var = f(f32(eps), f32(xt), jnp.asarray(t))
    betas, a_bar, a_prev = ref64()
    b, a, ap = betas[t][:, None], a_bar[t][:, None], a_prev[t][:, None]
    np.testing.assert_allclose(np.asarray(mean), (xt - b / np.sqrt(1 - a) * eps) / np.sqrt(1 - b),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(var), b * (1 - ap) / (1 - a) + 0 * xt, rtol=1e-4,
                               atol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(model_output_type="score"), "'score'"),
    (dict(model_var_type="learnt"), "'learnt'"),
    (dict(model_output=jnp.zeros((2, 4))), r"\(2, 4\)"),
    (dict(model_output=jnp.zeros((3, 3))), "batch 3"),
    (dict(model_output=jnp.zeros((2, 5)), model_var_type="learned_range"), r"2C.*\(2, 5\)"),
    (dict(model_output=jnp.zeros((2, 3)), model_var_type="learned"), r"2C.*\(2, 3\)"),
    (dict(t=jnp.asarray([0, 100])), r"T=100.*\[100\]"),
    (dict(t=jnp.asarray([-2, 3])), r"\[-2\]"),
    (dict(t=jnp.asarray([1, 2, 3])), r"\(3,\)"),
    (dict(t=jnp.asarray([1.0, 2.0])), "integer"),
])
def test_p_mean_variance_rejects_bad_input(sched, kwargs, match):
    args = dict(model_output=jnp.zeros((2, 3)), t=jnp.asarray([0, 1]))
    args.update(kwargs)
    model_output, t = args.pop("model_output"), args.pop("t")
    with pytest.raises(ValueError, match=match):
        diffusion.p_mean_variance(sched, model_output, jnp.zeros((2, 3)), t, **args)


def test_forward_process_rejects_bad_input(sched):
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"noise shape \(2, 4\)"):
        diffusion.q_sample(sched, x, jnp.asarray([0, 1]), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\[100\]"):
        diffusion.q_sample(sched, x, jnp.asarray([0, 100]), x)
    with pytest.raises(ValueError, match=r"x_0 shape \(2, 4\)"):
        diffusion.q_posterior_mean_variance(sched, jnp.zeros((2, 4)), x, jnp.asarray([0, 1]))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        diffusion.q_mean_variance(sched, x, jnp.zeros(4, jnp.int32))
