"""jaxdiff.schedules against the schedules' definitions, recomputed in float64 NumPy."""

import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import losses
from jaxdiff.config import default_config, validate
from jaxdiff.schedules import (
    BETA_SCHEDULES,
    beta_schedule,
    cosine_alphas_cumprod,
    extract,
    make_schedule,
    respace,
    schedule_from_betas,
    spaced_timesteps,
)


def definition(name: str, T: int, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    """The betas of each named schedule, written out from its paper/code: `linear`'s end points
    x 1000/T (improved-diffusion), the others' as given (latent diffusion, DDIM's sigmoid)."""
    if name == "linear":  # DDPM Sec. 4, scaled as improved-diffusion does
        start, end = start * 1000 / T, end * 1000 / T
    if name in ("linear", "sqrt_linear"):
        betas = start + (end - start) * np.arange(T) / max(T - 1, 1)
    elif name == "quad":
        betas = (math.sqrt(start) + (math.sqrt(end) - math.sqrt(start)) * np.arange(T)
                 / max(T - 1, 1)) ** 2
    elif name == "sigmoid":
        x = -6.0 + 12.0 * np.arange(T) / max(T - 1, 1)
        betas = start + (end - start) / (1.0 + np.exp(-x))
    elif name == "sqrt":
        betas = np.sqrt(start + (end - start) * np.arange(T) / max(T - 1, 1))
    else:  # cosine, IDDPM Eq. 17 with s = 0.008
        f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = 1.0 - f[1:] / f[:-1]
    return np.minimum(betas, 0.999)


def iddpm_get_named_beta_schedule(name: str, T: int) -> np.ndarray:
    """improved-diffusion's `get_named_beta_schedule` (gaussian_diffusion.py), its `linear`."""
    assert name == "linear"
    scale = 1000 / T
    return np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64)


def ldm_make_beta_schedule(schedule: str, n: int, start: float = 1e-4, end: float = 2e-2,
                           cosine_s: float = 8e-3) -> np.ndarray:
    """Latent diffusion's `make_beta_schedule` (ldm/modules/diffusionmodules/util.py) in NumPy."""
    if schedule == "linear":
        return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    if schedule == "cosine":
        steps = np.arange(n + 1, dtype=np.float64) / n + cosine_s
        alphas = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
        alphas = alphas / alphas[0]
        return np.clip(1 - alphas[1:] / alphas[:-1], 0, 0.999)
    if schedule == "sqrt_linear":
        return np.linspace(start, end, n, dtype=np.float64)
    return np.linspace(start, end, n, dtype=np.float64) ** 0.5  # sqrt


@pytest.mark.parametrize("name", BETA_SCHEDULES)
@pytest.mark.parametrize("T", [1, 10, 1000])
def test_betas_lie_in_unit_interval_and_a_bar_decreases(name, T):
    betas = beta_schedule(name, T)
    assert betas.shape == (T,) and betas.dtype == np.float64
    assert np.all((betas > 0) & (betas < 1))
    a_bar = np.asarray(make_schedule(name, T).alphas_cumprod)
    assert a_bar.dtype == np.float32 and np.all(a_bar > 0) and a_bar[0] < 1
    assert np.all(np.diff(a_bar) < 0)


@pytest.mark.parametrize("name", BETA_SCHEDULES)
@pytest.mark.parametrize("T", [1, 10, 400, 1000, 4000])
def test_betas_match_their_definitions(name, T):
    # cosine's 1 - f(t)/f(t-1) cancels: its small betas carry ~1e-11 relative rounding.
    rtol = 1e-9 if name == "cosine" else 1e-12
    np.testing.assert_allclose(beta_schedule(name, T), definition(name, T), rtol=rtol)


@pytest.mark.parametrize("name", BETA_SCHEDULES)
@pytest.mark.parametrize("T", [10, 400, 1000])
def test_end_points_reach_every_schedule_but_cosine(name, T):
    kwargs = dict(linear_start=0.00085, linear_end=0.012)  # Stable Diffusion's
    np.testing.assert_allclose(beta_schedule(name, T, **kwargs),
                               definition(name, T, 0.00085, 0.012), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(make_schedule(name, T, **kwargs).betas),
                               definition(name, T, 0.00085, 0.012), rtol=1e-6)


@pytest.mark.parametrize("T", [1, 400, 1000, 4000])
def test_linear_is_improved_diffusions_at_every_T(T):
    # Bit for bit: the digits default (T = 400) keeps the numbers it was trained with.
    np.testing.assert_array_equal(beta_schedule("linear", T), iddpm_get_named_beta_schedule(
        "linear", T).clip(max=0.999))


def test_linear_end_points_at_1000_steps_are_ddpms():
    betas = beta_schedule("linear", 1000)
    assert betas[0] == 1e-4 and betas[-1] == 0.02
    sched = make_schedule("linear", 1000)
    assert sched.betas[0] == np.float32(1e-4) and sched.betas[-1] == np.float32(0.02)


def test_prior_term_of_the_linear_schedule_is_about_1e5_bits_per_dim():
    """DDPM Sec. 4: with T = 1000 and the linear schedule, L_T ~ 1e-5 bits/dim."""
    a_bar_T = np.prod(1.0 - np.linspace(1e-4, 0.02, 1000))
    x0 = np.linspace(-1.0, 1.0, 256)[None]  # every pixel level once
    # KL(N(sqrt(a) x, 1 - a) || N(0, 1)) = (a x^2 - a - log(1 - a)) / 2 nats.
    expected = (a_bar_T * x0**2 - a_bar_T - np.log1p(-a_bar_T)) / 2 / np.log(2)
    got = float(losses.prior_bpd(make_schedule("linear", 1000), jnp.asarray(x0, jnp.float32))[0])
    np.testing.assert_allclose(got, expected.mean(), rtol=1e-3)
    assert got < 1e-5
    assert expected.max() < 3e-5  # the worst pixel value, +-1


@pytest.mark.parametrize("T", [10, 1000])
def test_cosine_a_bar_is_iddpm_eq_17(T):
    t = np.arange(1, T + 1) / T
    f = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    betas = beta_schedule("cosine", T)
    a_bar = np.cumprod(1.0 - betas)
    unclipped = betas < 0.999  # only the last step(s) hit the 0.999 clip
    assert unclipped[: T - 1].all()
    np.testing.assert_allclose(a_bar[unclipped], f[unclipped], rtol=1e-10)
    np.testing.assert_allclose(cosine_alphas_cumprod(t), f, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(np.asarray(make_schedule("cosine", T).alphas_cumprod)[unclipped],
                               f[unclipped], rtol=1e-5)


@pytest.mark.parametrize("T", [10, 400, 1000, 4000])
@pytest.mark.parametrize("ends", [(1e-4, 0.02), (0.00085, 0.012)])
@pytest.mark.parametrize("ldm_name, ours", [("linear", "quad"), ("sqrt_linear", "sqrt_linear"),
                                            ("cosine", "cosine"), ("sqrt", "sqrt")])
def test_latent_diffusion_names_map_to_ours_unscaled(ldm_name, ours, ends, T):
    start, end = ends
    np.testing.assert_allclose(beta_schedule(ours, T, linear_start=start, linear_end=end),
                               ldm_make_beta_schedule(ldm_name, T, start, end), rtol=1e-12)


def test_linear_and_sqrt_linear_agree_only_at_1000_steps():
    np.testing.assert_allclose(beta_schedule("linear", 1000), beta_schedule("sqrt_linear", 1000),
                               rtol=1e-12)
    # At T = 400 linear's end points are 2.5x larger: 2.5e-4 and 0.05 against 1e-4 and 0.02.
    np.testing.assert_allclose(beta_schedule("linear", 400)[[0, -1]], [2.5e-4, 0.05], rtol=1e-12)
    np.testing.assert_allclose(beta_schedule("sqrt_linear", 400)[[0, -1]], [1e-4, 0.02],
                               rtol=1e-12)


@pytest.mark.parametrize("name, T", [("linear", 1000), ("cosine", 1000), ("quad", 10),
                                     ("sigmoid", 50), ("linear", 1), ("cosine", 2)])
def test_derived_quantities_match_float64(name, T):
    betas = definition(name, T)
    a_bar = np.cumprod(1.0 - betas)
    a_prev = np.concatenate([[1.0], a_bar[:-1]])
    post_var = betas * (1.0 - a_prev) / (1.0 - a_bar)
    expected = dict(
        betas=betas, alphas=1.0 - betas, alphas_cumprod=a_bar, alphas_cumprod_prev=a_prev,
        sqrt_alphas_cumprod=a_bar**0.5, sqrt_one_minus_alphas_cumprod=(1.0 - a_bar) ** 0.5,
        log_one_minus_alphas_cumprod=np.log(1.0 - a_bar),
        sqrt_recip_alphas_cumprod=a_bar**-0.5, sqrt_recipm1_alphas_cumprod=(1.0 / a_bar - 1) ** 0.5,
        posterior_variance=post_var,
        # DDPM's code: log(beta_tilde) with beta_tilde_1 = 0 replaced by beta_tilde_2.
        posterior_log_variance_clipped=np.log(np.concatenate(
            [[post_var[1] if T > 1 else betas[0]], post_var[1:]])),
        posterior_mean_coef1=betas * a_prev**0.5 / (1.0 - a_bar),
        posterior_mean_coef2=(1.0 - a_prev) * (1.0 - betas) ** 0.5 / (1.0 - a_bar),
    )
    sched = make_schedule(name, T)
    assert sched.num_timesteps == T
    for field, value in expected.items():
        got = getattr(sched, field)
        assert got.dtype == jnp.float32 and got.shape == (T,), field
        np.testing.assert_allclose(np.asarray(got), value, rtol=2e-6, atol=1e-30, err_msg=field)


@pytest.mark.parametrize("spacing", ["uniform", "quad"])
@pytest.mark.parametrize("T, S", [(1, 1), (10, 1), (10, 3), (10, 10), (1000, 7), (1000, 50),
                                  (1000, 250), (1000, 999), (4000, 100)])
def test_spaced_timesteps_are_increasing_and_end_at_the_last_step(T, S, spacing):
    steps = spaced_timesteps(T, S, spacing)
    assert steps.shape == (S,) and np.issubdtype(steps.dtype, np.integer)
    assert np.all(np.diff(steps) > 0)
    assert steps[-1] == T - 1 and steps[0] >= 0
    if S > 1:
        assert steps[0] == 0


def test_spaced_timesteps_follow_their_grids():
    # Uniform: floor of an even grid over [0, T-1]. Quad: an even grid in sqrt(t) (DDIM App. D.2).
    np.testing.assert_array_equal(spaced_timesteps(1000, 10, "uniform"),
                                  [0, 111, 222, 333, 444, 555, 666, 777, 888, 999])
    expected = np.floor((np.arange(10) * math.sqrt(999) / 9) ** 2).astype(int)
    expected[-1] = 999
    np.testing.assert_array_equal(spaced_timesteps(1000, 10, "quad"), expected)
    assert np.array_equal(spaced_timesteps(1000, 1000, "quad"), np.arange(1000))


@pytest.mark.parametrize("args, match", [
    ((10, 0), "num_steps.*0"),
    ((10, 11), "num_steps.*11"),
    ((10, 2.5), "num_steps.*2.5"),
    ((10, True), "num_steps.*True"),
    ((0, 1), "num_timesteps.*0"),
    ((7.5, 2), "num_timesteps.*7.5"),
    ((10, 3, "log"), "spacing 'log'"),
])
def test_spaced_timesteps_reject_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        spaced_timesteps(*args)


# respace works from the float32 betas: cosine's last beta, 0.999, carries a relative error of
# 6e-5 in 1 - beta, which shows as 1.3e-5 in the last a_bar (measured); elsewhere ~1e-7.
RESPACE_RTOL = 3e-5


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_respacing_the_full_sequence_is_the_identity(name):
    sched = make_schedule(name, 1000)
    full = respace(sched, np.arange(1000))
    np.testing.assert_allclose(np.asarray(full.alphas_cumprod), np.asarray(sched.alphas_cumprod),
                               rtol=RESPACE_RTOL)
    chex.assert_trees_all_close(full, sched, rtol=1e-4)  # every derived quantity


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["uniform", "quad"])
def test_respaced_a_bar_equals_a_bar_at_the_kept_steps(name, spacing):
    sched = make_schedule(name, 1000)
    kept = spaced_timesteps(1000, 50, spacing)
    short = respace(sched, kept)
    a_bar = np.cumprod(1.0 - definition(name, 1000))
    assert short.num_timesteps == 50
    np.testing.assert_allclose(np.asarray(short.alphas_cumprod), a_bar[kept], rtol=RESPACE_RTOL)
    # beta'_i = 1 - a_bar_{tau_i} / a_bar_{tau_{i-1}} (IDDPM Sec. 4), with a_bar_{tau_0 - 1} = 1.
    expected = 1.0 - a_bar[kept] / np.concatenate([[1.0], a_bar[kept[:-1]]])
    np.testing.assert_allclose(np.asarray(short.betas), expected, rtol=1e-4)


@pytest.mark.parametrize("timesteps, match", [
    ([], "non-empty"),
    ([[0, 1]], "1-D"),
    ([0, 5, 5], "strictly increasing"),
    ([3, 1], "strictly increasing"),
    ([-1, 4], "strictly increasing"),
    ([0, 10], r"within \[0, 9\]"),
    ([0.0, 4.0], "integers"),
])
def test_respace_rejects_bad_timesteps(timesteps, match):
    with pytest.raises(ValueError, match=match):
        respace(make_schedule("linear", 10), np.asarray(timesteps))


@pytest.mark.parametrize("args, kwargs, match", [
    (("laplace", 10), {}, "'laplace'"),
    (("linear", 0), {}, "got 0"),
    (("linear", -3), {}, "got -3"),
    (("linear", 2.5), {}, "got 2.5"),
    (("cosine", "10"), {}, "got '10'"),
    (("linear", True), {}, "got True"),
    (("quad", 10), dict(linear_start=0.0), "linear_start .* got 0.0"),
    (("sqrt", 10), dict(linear_end=1.5), "linear_end .* got 1.5"),
    (("sigmoid", 10), dict(linear_end="0.02"), "linear_end .* got '0.02'"),
    (("linear", 10), dict(linear_start=0.02, linear_end=1e-4),
     "linear_start=0.02 and linear_end=0.0001"),
])
def test_beta_schedule_rejects_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        beta_schedule(*args, **kwargs)
    with pytest.raises(ValueError, match=match):
        make_schedule(*args, **kwargs)


@pytest.mark.parametrize("start, end, match", [
    (0.0, 0.02, r"config\.diffusion\.linear_start = 0\.0: must be a number in \(0\.0, 1\.0\)"),
    (1e-4, 1.0, r"config\.diffusion\.linear_end = 1\.0: must be a number in"),
    (0.02, 1e-4, r"config\.diffusion\.linear_end = 0\.0001: must be above "
                 r"diffusion\.linear_start = 0\.02"),
])
def test_config_end_points_are_checked(start, end, match):
    config = default_config()
    config.diffusion.linear_start, config.diffusion.linear_end = start, end
    with pytest.raises(ValueError, match=match):
        validate(config, num_devices=1)


def test_config_end_points_default_to_ddpms():
    config = default_config()
    validate(config, num_devices=1)
    assert (config.diffusion.linear_start, config.diffusion.linear_end) == (1e-4, 0.02)


@pytest.mark.parametrize("betas, match", [([], "non-empty"), ([0.1, 0.0], "0.0"),
                                          ([0.5, 1.5], "1.5"), ([[0.1]], "1-D")])
def test_schedule_from_betas_rejects_bad_betas(betas, match):
    with pytest.raises(ValueError, match=match):
        schedule_from_betas(betas)


class JittedTest(chex.TestCase):
    """The schedule's functions of arrays, called as they are and under jit."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_extract_broadcasts_per_example_values(self):
        values = jnp.arange(10.0)
        out = self.variant(extract, static_argnums=2)(values, jnp.asarray([3, 7]), 4)
        chex.assert_shape(out, (2, 1, 1, 1))
        np.testing.assert_array_equal(np.asarray(out).ravel(), [3.0, 7.0])

    @chex.variants(with_jit=True, without_jit=True)
    def test_a_schedule_is_a_pytree_of_its_float64_values(self):
        sched = make_schedule("cosine", 100)
        t = jnp.asarray([0, 50, 99])
        fn = self.variant(lambda s, t: extract(s.sqrt_alphas_cumprod, t, 2) * s.betas[t, None])
        a_bar = np.cumprod(1.0 - definition("cosine", 100))
        expected = (np.sqrt(a_bar) * definition("cosine", 100))[[0, 50, 99], None]
        chex.assert_trees_all_close(fn(sched, t), expected.astype(np.float32), rtol=1e-5)
