"""jaxdiff.losses against closed forms computed independently in float64 NumPy/SciPy."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

from jaxdiff import losses, parameterisations
from jaxdiff.processes import VEProcess
from jaxdiff.schedules import beta_schedule, make_schedule
from tests.oracles import GaussianMixture

LOG2 = np.log(2.0)
RTOL = 1e-5  # float32 code vs float64 references: measured worst 4e-7
LEVELS = np.linspace(-1.0, 1.0, 256)
EDGES = np.concatenate([[-np.inf], (LEVELS[:-1] + LEVELS[1:]) / 2, [np.inf]])


def reference(name: str, T: int) -> dict:
    """Every schedule quantity recomputed in float64 from DDPM Eqs. 4, 6, 7."""
    betas = beta_schedule(name, T)
    a_bar = np.cumprod(1.0 - betas)
    a_prev = np.append(1.0, a_bar[:-1])
    post_var = betas * (1.0 - a_prev) / (1.0 - a_bar)
    clipped = np.append(post_var[1] if T > 1 else betas[0], post_var[1:])
    return dict(betas=betas, a_bar=a_bar, a_prev=a_prev, post_var=post_var, clipped=clipped,
                large=np.append(clipped[0], betas[1:]),
                coef1=betas * np.sqrt(a_prev) / (1.0 - a_bar),
                coef2=(1.0 - a_prev) * np.sqrt(1.0 - betas) / (1.0 - a_bar))


def bin_probs(mean: float, scale: float) -> np.ndarray:
    """Mass of N(mean, scale^2) in each of the 256 bins (outer bins to +-inf), float64."""
    return np.diff(stats.norm.cdf(EDGES, mean, scale))


def kl64(m1, v1, m2, v2):
    return 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)


# --- normal_kl and the discretized decoder ----------------------------------------------------

def test_normal_kl_matches_closed_form_and_integral():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=20), rng.normal(size=20)
    v1, v2 = rng.uniform(0.05, 3.0, 20), rng.uniform(0.05, 3.0, 20)
    got = np.asarray(losses.normal_kl(*(jnp.asarray(a, jnp.float32)
                                        for a in (m1, np.log(v1), m2, np.log(v2)))))
    np.testing.assert_allclose(got, kl64(m1, v1, m2, v2), rtol=1e-5, atol=1e-6)
    # The definition, E_p[log p - log q], by quadrature for a few pairs.
    for i in range(3):
        p, q = stats.norm(m1[i], np.sqrt(v1[i])), stats.norm(m2[i], np.sqrt(v2[i]))
        integral, _ = integrate.quad(lambda x, p=p, q=q: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)),
                                     -30, 30, points=[m1[i]])
        np.testing.assert_allclose(got[i], integral, rtol=1e-5, atol=1e-6)


def test_normal_kl_is_accurate_for_nearly_equal_variances():
    # L_T compares N(0, 1 - a_bar_T) with N(0, 1), a_bar_T ~ 4e-5: the answer is ~ a_bar^2 / 4.
    log_v1 = np.log1p(-np.array([4e-5, 1e-3, 1e-2]))
    got = np.asarray(losses.normal_kl(0.0, jnp.asarray(log_v1, jnp.float32), 0.0, 0.0))
    np.testing.assert_allclose(got, kl64(0.0, np.exp(log_v1), 0.0, 1.0), rtol=1e-3)


@pytest.mark.parametrize("mean", [-1.3, -0.5, 0.0, 0.37, 1.0])
@pytest.mark.parametrize("scale", [1e-3, 0.02, 0.3, 1.0, 5.0])
def test_discretized_gaussian_bins_sum_to_one_and_match_scipy(mean, scale):
    log_p = np.asarray(losses.discretized_gaussian_log_likelihood(
        jnp.asarray(LEVELS, jnp.float32), jnp.float32(mean), jnp.float32(np.log(scale))),
        np.float64)
    assert np.isfinite(log_p).all()
    np.testing.assert_allclose(np.exp(log_p).sum(), 1.0, atol=2e-5)
    ref = bin_probs(mean, scale)
    big = ref > 1e-6
    np.testing.assert_allclose(np.exp(log_p[big]), ref[big], rtol=1e-3)


def test_discretized_gaussian_far_tail_and_gradients():
    # A bin 40 scales from the mean: the mass is ~1e-350 in float64 terms, its log is not.
    x, mean, scale = 0.5, 0.1, 0.01
    lo, hi = (x - 1 / 255 - mean) / scale, (x + 1 / 255 - mean) / scale
    ref = special.log_ndtr(-lo) + np.log(-np.expm1(special.log_ndtr(-hi) - special.log_ndtr(-lo)))
    got = losses.discretized_gaussian_log_likelihood(jnp.float32(x), jnp.float32(mean),
                                                     jnp.float32(np.log(scale)))
    np.testing.assert_allclose(float(got), ref, rtol=1e-4)

    def total(means, log_scales):
        return jnp.sum(losses.discretized_gaussian_log_likelihood(
            jnp.asarray(LEVELS, jnp.float32), means, log_scales))

    grads = jax.grad(total, argnums=(0, 1))(jnp.full(256, 0.95), jnp.full(256, np.log(0.01)))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_discretized_gaussian_rejects_shapes_that_do_not_broadcast():
    with pytest.raises(ValueError, match=r"\(3,\)"):
        losses.discretized_gaussian_log_likelihood(jnp.zeros(3), jnp.zeros(4), jnp.zeros(()))


# --- the terms of the bound -----------------------------------------------------------------

def expected_vb_bpd(ref: dict, t, x0, xt, eps_hat, var_type: str, v_out=None) -> np.ndarray:
    """L_{t-1} in bits/dim in float64: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t >= 1 and
    -log of p's mass in x_0's bin at t = 0 (DDPM Eq. 5, IDDPM Eq. 15's variance); x_0 on LEVELS."""
    B, D = x0.shape
    a = ref["a_bar"][t][:, None]
    x0_hat = (xt - np.sqrt(1 - a) * eps_hat) / np.sqrt(a)
    c1, c2 = ref["coef1"][t][:, None], ref["coef2"][t][:, None]
    mu, mu_hat = c1 * x0 + c2 * xt, c1 * x0_hat + c2 * xt
    if var_type == "fixed_small":
        var = np.broadcast_to(ref["clipped"][t][:, None], (B, D))
    elif var_type == "fixed_large":
        var = np.broadcast_to(ref["large"][t][:, None], (B, D))
    else:  # IDDPM Eq. 15
        frac = (v_out + 1) / 2
        var = np.exp(frac * np.log(ref["betas"][t])[:, None]
                     + (1 - frac) * np.log(ref["clipped"][t])[:, None])
    expected = kl64(mu, ref["clipped"][t][:, None], mu_hat, var).mean(1) / LOG2
    for i in np.flatnonzero(t == 0):  # -log of the N(mu_hat, var) mass of x0's bin
        idx = np.round((x0[i] + 1) * 127.5).astype(int)
        mass = [bin_probs(mu_hat[i, d], np.sqrt(var[i, d]))[idx[d]] for d in range(D)]
        expected[i] = -np.mean(np.log(mass)) / LOG2
    return expected


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned_range"])
def test_vb_terms_match_closed_form(var_type):
    T, B, D = 50, 6, 5
    sched, ref = make_schedule("linear", T), reference("linear", T)
    rng = np.random.default_rng(1)
    t = np.array([0, 1, 7, 23, 48, 49])
    x0 = LEVELS[rng.integers(0, 256, (B, D))]
    eps, eps_hat = rng.normal(size=(B, D)), rng.normal(size=(B, D))
    xt = np.sqrt(ref["a_bar"][t])[:, None] * x0 + np.sqrt(1 - ref["a_bar"][t])[:, None] * eps
    v_out = rng.uniform(-1, 1, (B, D))
    out = np.concatenate([eps_hat, v_out], -1) if var_type == "learned_range" else eps_hat
    got, pred_x0 = losses.vb_terms_bpd(
        sched, jnp.asarray(out, jnp.float32), jnp.asarray(x0, jnp.float32),
        jnp.asarray(xt, jnp.float32), jnp.asarray(t), model_output_type="eps",
        model_var_type=var_type)

    a = ref["a_bar"][t][:, None]
    x0_hat = (xt - np.sqrt(1 - a) * eps_hat) / np.sqrt(a)
    np.testing.assert_allclose(np.asarray(pred_x0), x0_hat, rtol=1e-4, atol=1e-4)
    expected = expected_vb_bpd(ref, t, x0, xt, eps_hat, var_type, v_out)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=RTOL, atol=1e-6)


def test_prior_bpd_matches_closed_form():
    sched, ref = make_schedule("cosine", 100), reference("cosine", 100)
    x0 = np.linspace(-1, 1, 12).reshape(3, 4)
    a = ref["a_bar"][-1]
    expected = kl64(np.sqrt(a) * x0, 1 - a, 0.0, 1.0).mean(1) / LOG2
    got = losses.prior_bpd(sched, jnp.asarray(x0, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-9)


# --- training losses -------------------------------------------------------------------------

def _fixed_inputs(T=40, B=8, D=3, seed=2):
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, (B, D))
    noise = rng.normal(size=(B, D))
    t = rng.integers(1, T, B)
    t[0] = 0
    return x0, noise, t


@pytest.mark.parametrize("output", ["eps", "x0", "v"])
def test_simple_loss_is_mse_to_the_target_of_the_output(output):
    T = 40
    sched, ref = make_schedule("cosine", T), reference("cosine", T)
    x0, noise, t = _fixed_inputs(T)
    pred = np.random.default_rng(3).normal(size=x0.shape)
    terms = losses.training_losses(
        sched, lambda xt, tt: jnp.asarray(pred, jnp.float32), jnp.asarray(x0, jnp.float32),
        jax.random.PRNGKey(0), model_output_type=output, t=jnp.asarray(t),
        noise=jnp.asarray(noise, jnp.float32))
    a = ref["a_bar"][t][:, None]
    target = {"eps": noise, "x0": x0, "v": np.sqrt(a) * noise - np.sqrt(1 - a) * x0}[output]
    expected = ((target - pred) ** 2).mean(1)
    np.testing.assert_allclose(np.asarray(terms["loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(terms["mse"]), expected, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(terms["t"]), t)
    assert "vb" not in terms


@pytest.mark.parametrize("output", ["eps", "x0", "v"])
@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_mse_weighted_is_the_kl_term_of_the_bound(output, var_type):
    """For t >= 1, DDPM Eq. 12's weighted MSE is the mean part of KL(q(x_{t-1}|x_t,x_0) || p)."""
    T = 40
    sched, ref = make_schedule("linear", T), reference("linear", T)
    x0, noise, t = _fixed_inputs(T)
    pred = np.random.default_rng(4).normal(size=x0.shape)
    terms = losses.training_losses(
        sched, lambda xt, tt: jnp.asarray(pred, jnp.float32), jnp.asarray(x0, jnp.float32),
        jax.random.PRNGKey(0), loss_type="mse_weighted", model_output_type=output,
        model_var_type=var_type, t=jnp.asarray(t), noise=jnp.asarray(noise, jnp.float32))
    a = ref["a_bar"][t][:, None]
    xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    x0_hat = {"eps": (xt - np.sqrt(1 - a) * pred) / np.sqrt(a), "x0": pred,
              "v": np.sqrt(a) * xt - np.sqrt(1 - a) * pred}[output]
    c1 = ref["coef1"][t][:, None]
    sigma2 = (ref["clipped"] if var_type == "fixed_small" else ref["large"])[t][:, None]
    expected = ((c1 * (x0 - x0_hat)) ** 2 / (2 * sigma2)).mean(1)
    np.testing.assert_allclose(np.asarray(terms["loss"]), expected, rtol=RTOL)
    if output == "eps":  # and literally Eq. 12's weight times the eps MSE
        b = ref["betas"][t]
        weight = b**2 / (2 * sigma2[:, 0] * (1 - b) * (1 - ref["a_bar"][t]))
        np.testing.assert_allclose(np.asarray(terms["loss"]),
                                   weight * ((noise - pred) ** 2).mean(1), rtol=RTOL)


def test_vlb_loss_is_T_times_the_term():
    """IDDPM's L_vlb (its "rescaled KL"): T L_{t-1} in bits/dim, each term against the float64
    KL (t >= 1) and decoder NLL (t = 0) of `expected_vb_bpd`."""
    T = 40
    sched, ref = make_schedule("linear", T), reference("linear", T)
    _, noise, t = _fixed_inputs(T)
    x0 = LEVELS[np.random.default_rng(6).integers(0, 256, noise.shape)]
    out = np.random.default_rng(5).normal(size=(x0.shape[0], 2 * x0.shape[1]))
    eps_hat, v_out = np.split(out, 2, axis=-1)
    v_out = np.clip(v_out, -1, 1)
    out = np.concatenate([eps_hat, v_out], -1)
    terms = losses.training_losses(
        sched, lambda xt, tt: jnp.asarray(out, jnp.float32), jnp.asarray(x0, jnp.float32),
        jax.random.PRNGKey(0), loss_type="vlb", model_var_type="learned_range",
        t=jnp.asarray(t), noise=jnp.asarray(noise, jnp.float32))
    a = ref["a_bar"][t][:, None]
    xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    expected = expected_vb_bpd(ref, t, x0, xt, eps_hat, "learned_range", v_out)
    np.testing.assert_allclose(np.asarray(terms["vb"]), expected, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(np.asarray(terms["loss"]), T * expected, rtol=RTOL, atol=1e-5)


def test_hybrid_gradient_of_the_mean_is_that_of_l_simple():
    T, B, D, lam = 30, 16, 3, 0.001
    sched = make_schedule("linear", T)
    x0, noise, t = _fixed_inputs(T, B, D)
    mean_param = jnp.asarray([0.3, -0.2, 0.1])
    var_param = jnp.asarray([0.1, 0.4, -0.5])

    def loss(mean_p, var_p, loss_type):
        def model_fn(xt, tt):
            return jnp.concatenate([jnp.broadcast_to(mean_p, xt.shape),
                                    jnp.broadcast_to(var_p, xt.shape)], -1)
        terms = losses.training_losses(
            sched, model_fn, jnp.asarray(x0, jnp.float32), jax.random.PRNGKey(0),
            loss_type=loss_type, model_var_type="learned_range", hybrid_lambda=lam,
            t=jnp.asarray(t), noise=jnp.asarray(noise, jnp.float32))
        return jnp.mean(terms["loss"])

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    g_mean, g_var = grad(mean_param, var_param, "hybrid")
    # d/dtheta of mean_b mean_d (theta_d - eps_bd)^2: the L_simple gradient only.
    expected = 2.0 * (np.asarray(mean_param)[None] - noise).mean(0) / D
    np.testing.assert_allclose(np.asarray(g_mean), expected, rtol=1e-5, atol=1e-7)
    assert np.all(np.abs(np.asarray(g_var)) > 1e-6)  # the variance is trained by L_vlb
    g_mean_vlb, _ = grad(mean_param, var_param, "vlb")
    assert np.all(np.abs(np.asarray(g_mean_vlb)) > 1e-6)  # without the stop-gradient it is not


# --- the Gaussian-data oracle ----------------------------------------------------------------

M, S = 0.1, 0.3


def _discretized_gaussian_data(n, dims, seed=0):
    gm = GaussianMixture(np.ones(1), np.full((1, dims), M), np.array([S]))
    x, _ = gm.sample(jax.random.PRNGKey(seed), n)
    idx = np.clip(np.round((np.asarray(x, np.float64) + 1) * 127.5), 0, 255).astype(int)
    return gm, idx, (idx / 127.5 - 1).astype(np.float32)


@pytest.mark.parametrize("var_type, max_gap", [("fixed_large", 0.3), ("fixed_small", 1.0)])
def test_bound_of_the_oracle_is_above_the_true_nll_of_gaussian_data(var_type, max_gap):
    T, B, D = 1000, 512, 16
    sched, ref = make_schedule("linear", T), reference("linear", T)
    gm, idx, x0 = _discretized_gaussian_data(B, D)
    nll = -np.log2(bin_probs(M, S)[idx]).mean(1)  # true NLL of each example, bits/dim

    def oracle(xt, t):
        return gm.eps(sched, xt, t)

    # For t >= 1 the oracle mean is E[mu_tilde | x_t], so E[L_{t-1}] has a closed form:
    # 0.5 (r - 1 - log r + coef1^2 Var[x0 | x_t] / sigma^2), r = beta_tilde / sigma^2.
    a = ref["a_bar"][1:]
    post_x0_var = S**2 * (1 - a) / (a * S**2 + 1 - a)
    out = losses.bits_per_dim(sched, oracle, jnp.asarray(x0), jax.random.PRNGKey(1),
                              model_var_type=var_type)
    total = np.asarray(out["total_bpd"], np.float64)
    gap = total - nll
    se = gap.std() / np.sqrt(B)
    # Measured (seeds fixed): fixed_large gap 0.165 +- 0.022 bits/dim, fixed_small
    # 0.805 +- 0.026. The bound must lie above the NLL by more than 3 standard errors and
    # not above max_gap (the measured gap plus ~6 standard errors).
    assert gap.mean() - 3 * se > 0, (var_type, gap.mean(), se)
    assert gap.mean() < max_gap, (var_type, gap.mean(), se)
    sigma2 = (ref["clipped"] if var_type == "fixed_small" else ref["large"])[1:]
    r = ref["post_var"][1:] / sigma2
    expected_vb = np.sum(0.5 * (r - 1 - np.log(r) + ref["coef1"][1:] ** 2 * post_x0_var
                                / sigma2)) / LOG2
    vb = np.asarray(out["vb_bpd"], np.float64)
    # Measured: within 1.6 standard errors of the continuous-data closed form.
    assert abs(vb.mean() - expected_vb) < 4 * vb.std() / np.sqrt(B), (vb.mean(), expected_vb)
    np.testing.assert_allclose(
        total, np.asarray(out["prior_bpd"] + out["vb_bpd"] + out["decoder_bpd"]), rtol=1e-6)
    assert out["mse"].shape == (B, T) and out["x0_mse"].shape == (B, T)


def test_oracle_minimises_l_simple():
    T, B, D = 100, 4096, 4
    sched, ref = make_schedule("linear", T), reference("linear", T)
    gm, _, x0 = _discretized_gaussian_data(B, D, seed=3)
    rng = np.random.default_rng(6)
    t = jnp.asarray(rng.integers(0, T, B))
    noise = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
    perturb = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
    predictors = {
        "oracle": lambda xt, tt: gm.eps(sched, xt, tt),
        "scaled": lambda xt, tt: 1.1 * gm.eps(sched, xt, tt),
        "shrunk": lambda xt, tt: 0.9 * gm.eps(sched, xt, tt),
        "shifted": lambda xt, tt: gm.eps(sched, xt, tt) + 0.05,
        "noised": lambda xt, tt: gm.eps(sched, xt, tt) + 0.1 * perturb,
    }
    per_example = {name: np.asarray(losses.training_losses(
        sched, fn, jnp.asarray(x0), jax.random.PRNGKey(0), t=t, noise=noise)["loss"], np.float64)
        for name, fn in predictors.items()}
    mse = {name: v.mean() for name, v in per_example.items()}
    assert all(mse["oracle"] < mse[k] for k in predictors if k != "oracle"), mse
    # E[L_simple] of the oracle is E_t Var[eps | x_t] = mean_t a_bar S^2 / (a_bar S^2 + 1 - a_bar)
    # (measured: 0.8 standard errors away).
    a = ref["a_bar"][np.asarray(t)]
    se = per_example["oracle"].std() / np.sqrt(B)
    assert abs(mse["oracle"] - np.mean(a * S**2 / (a * S**2 + 1 - a))) < 3 * se


def _never_called(xt, t):
    raise AssertionError("the network must not be called for invalid arguments")


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_type="l1"), "'l1'"),
    (dict(model_output_type="score"), "'score'"),
    (dict(model_var_type="learnt"), "'learnt'"),
    (dict(loss_type="hybrid"), "'fixed_small'"),
    (dict(loss_type="simple", model_var_type="learned_range"), "'learned_range'"),
    (dict(loss_type="mse_weighted", model_var_type="learned"), "'learned'"),
    (dict(t=jnp.asarray([0, 10])), r"T=10.*\[10\]"),
    (dict(t=jnp.asarray([-1, 3])), r"\[-1\]"),
    (dict(t=jnp.asarray([1, 2, 3])), r"\(3,\)"),
    (dict(noise=jnp.zeros((2, 5))), r"\(2, 5\)"),
])
def test_training_losses_rejects_bad_arguments_before_calling_the_network(kwargs, match):
    sched = make_schedule("linear", 10)
    with pytest.raises(ValueError, match=match):
        losses.training_losses(sched, _never_called, jnp.zeros((2, 3)), jax.random.PRNGKey(0),
                               **kwargs)


def test_training_losses_rejects_a_network_output_of_the_wrong_shape():
    sched = make_schedule("linear", 10)
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        losses.training_losses(sched, lambda xt, t: jnp.zeros((2, 4)), jnp.zeros((2, 3)),
                               jax.random.PRNGKey(0))


def test_other_functions_reject_bad_arguments():
    sched = make_schedule("linear", 10)
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="'x1'"):
        losses.bits_per_dim(sched, _never_called, x, jax.random.PRNGKey(0), model_output_type="x1")
    with pytest.raises(ValueError, match="chunk_size.*0"):
        losses.bits_per_dim(sched, _never_called, x, jax.random.PRNGKey(0), chunk_size=0)
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        losses.vb_terms_bpd(sched, x, x, jnp.zeros((2, 4)), jnp.asarray([0, 1]),
                            model_output_type="eps", model_var_type="fixed_small")
    with pytest.raises(ValueError, match="T=10"):
        losses.vb_terms_bpd(sched, x, x, x, jnp.asarray([0, 10]), model_output_type="eps",
                            model_var_type="fixed_small")


# --- loss weightings and EDM's loss ----------------------------------------------------------

WEIGHTING_CASES = [
    # (output, weighting, params, the weight of the output's MSE as a function of SNR)
    ("eps", "min_snr", {"gamma": 5.0}, lambda snr: np.minimum(snr, 5.0) / snr),
    ("x0", "min_snr", {"gamma": 5.0}, lambda snr: np.minimum(snr, 5.0)),
    ("v", "min_snr", {"gamma": 5.0}, lambda snr: np.minimum(snr, 5.0) / (snr + 1.0)),
    ("eps", "p2", {"gamma": 1.0, "k": 1.0}, lambda snr: 1.0 / (1.0 + snr)),
    ("eps", "p2", {"gamma": 0.5, "k": 2.0}, lambda snr: 1.0 / np.sqrt(2.0 + snr)),
    ("x0", "none", {}, lambda snr: np.ones_like(snr)),
]


@pytest.mark.parametrize("output, weighting, params, weight", WEIGHTING_CASES)
def test_loss_weightings_are_the_papers(output, weighting, params, weight):
    """min-SNR-gamma (arXiv 2303.09556 Sec. 3.4: min(SNR, gamma) on x_0, / SNR on eps, / (SNR + 1)
    on v) and P2 (arXiv 2204.00227 Eq. 8: 1 / (k + SNR)^gamma on eps): an output off its target
    by delta everywhere has loss weight * delta^2."""
    sched = make_schedule("linear", 1000)
    t = jnp.asarray([0, 10, 200, 500, 999])
    a = np.cumprod(1.0 - beta_schedule("linear", 1000))[np.asarray(t)]
    snr = a / (1.0 - a)
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    sa, s1 = np.sqrt(a)[:, None], np.sqrt(1.0 - a)[:, None]
    target = {"eps": noise, "x0": x0, "v": sa * noise - s1 * x0}[output]
    delta = 0.1
    terms = losses.training_losses(sched, lambda xt, tt: jnp.asarray(target + delta, jnp.float32),
                                   x0, jax.random.PRNGKey(0), model_output_type=output, t=t,
                                   noise=noise, weighting=weighting, weighting_params=params)
    np.testing.assert_allclose(terms["loss"], weight(snr) * delta**2, rtol=2e-4)


def test_weightings_are_refused_where_they_do_not_apply():
    sched = make_schedule("linear", 10)
    with pytest.raises(ValueError, match="'min-snr'"):
        losses.training_losses(sched, _never_called, jnp.zeros((2, 3)), jax.random.PRNGKey(0),
                               weighting="min-snr")
    with pytest.raises(ValueError, match="'vlb'"):
        losses.training_losses(sched, _never_called, jnp.zeros((2, 3)), jax.random.PRNGKey(0),
                               loss_type="vlb", weighting="p2")
    with pytest.raises(ValueError, match="continuous process"):
        losses.training_losses(VEProcess(), _never_called, jnp.zeros((2, 3)),
                               jax.random.PRNGKey(0), loss_type="vlb")


def test_edm_loss_is_lambda_weighted_denoising_error():
    """With the 'edm' output, L_simple = lambda(sigma) ||D(x; sigma) - x_0||^2 per dimension,
    lambda = (sigma^2 + s_d^2) / (sigma s_d)^2 (EDM Eq. 2 and Table 1)."""
    process, sd = VEProcess(), 0.5
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    sigma = jnp.asarray([0.01, 0.3, 2.0, 60.0])

    def network(x_in, c_noise):
        return jnp.sin(x_in) + c_noise[:, None]

    terms = losses.training_losses(process, network, x0, jax.random.PRNGKey(0),
                                   model_output_type="edm", sigma_data=sd, t=sigma, noise=noise)
    s = np.asarray(sigma, np.float64)[:, None]
    x = np.asarray(x0, np.float64) + s * np.asarray(noise, np.float64)
    total = s**2 + sd**2
    f = np.sin(x / np.sqrt(total)) + np.log(s) / 4
    denoised = sd**2 / total * x + s * sd / np.sqrt(total) * f
    expected = (total / (s * sd) ** 2 * (denoised - np.asarray(x0)) ** 2).mean(axis=1)
    np.testing.assert_allclose(terms["loss"], expected, rtol=2e-4)


@pytest.mark.slow  # ~15 s: fits a small network by Adam
def test_edm_loss_minimiser_is_the_ideal_denoiser_on_gaussian_data():
    """Data N(0, s^2) with s = 1.3 != sigma_data = 0.5 (else the ideal F is 0): minimising EDM's
    loss gives D(x; sigma) = x s^2 / (s^2 + sigma^2). A small MLP fit by Adam is compared on
    x in +-2 std of the noisy data, at levels where EDM's lognormal puts its training mass."""
    import optax

    from jaxdiff.models.mlp import MLPDenoiser

    s, sd, steps = 1.3, 0.5, 2000
    process = VEProcess()
    net = MLPDenoiser(hidden=32, depth=2)
    params = net.init(jax.random.key(0), jnp.zeros((1, 1)), jnp.zeros((1,)))["params"]
    tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps))

    def loss_fn(params, rng):
        x_rng, loss_rng = jax.random.split(rng)
        x0 = s * jax.random.normal(x_rng, (256, 1))
        terms = losses.training_losses(process, lambda x, t: net.apply({"params": params}, x, t),
                                       x0, loss_rng, model_output_type="edm", sigma_data=sd)
        return jnp.mean(terms["loss"])

    @jax.jit
    def train(params):
        def step(carry, rng):
            params, opt = carry
            updates, opt = tx.update(jax.grad(loss_fn)(params, rng), opt)
            return (optax.apply_updates(params, updates), opt), None

        keys = jax.random.split(jax.random.key(1), steps)
        return jax.lax.scan(step, (params, tx.init(params)), keys)[0][0]

    params = train(params)
    edm = parameterisations.get("edm")
    errors = []
    for sigma in (0.05, 0.3, 1.0):
        x = jnp.linspace(-2.0, 2.0, 21)[:, None] * np.sqrt(s**2 + sigma**2)
        f = net.apply({"params": params}, edm.network_input(x, 1.0, sigma, sd),
                      jnp.full((21,), np.log(sigma) / 4))
        ideal = x * s**2 / (s**2 + sigma**2)
        errors.append(float(jnp.max(jnp.abs(edm.to_x0(f, x, 1.0, sigma, sd) - ideal))) / s)
    # Measured: 0.14%, 0.6%, 0.7% of s.
    assert max(errors) < 0.02, errors
