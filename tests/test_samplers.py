"""Samplers against exact oracles: the Bayes-optimal eps of a Gaussian mixture plays the network."""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import samplers
from jaxdiff.bundle import DiffusionModel
from jaxdiff.denoiser import denoiser
from jaxdiff.pictures import to_uint8
from jaxdiff.processes import FlowMatchingProcess, VEProcess
from jaxdiff.sampling import ddim_invert, sample
from jaxdiff.schedules import logsnr_timesteps, make_schedule, spaced_timesteps
from tests.oracles import GaussianMixture

SCHEDULE = make_schedule("linear", 1000)
# Three well separated components (7 std apart) with unequal weights, inside [-1, 1].
MIX = GaussianMixture(weights=np.array([0.5, 0.3, 0.2]),
                      means=np.array([[-0.55, -0.45], [0.55, -0.45], [0.0, 0.55]]),
                      stds=np.array([0.15, 0.15, 0.15]))
N = 4000


def oracle(params, x, t, y):
    """The exact eps-predictor E[eps | x_t]; the schedule is the ORIGINAL one."""
    del params, y
    return MIX.eps(SCHEDULE, x, t)


def run(method="ddim", **kwargs):
    kwargs.setdefault("num_samples", N)
    return sample(None, jax.random.key(0), method, model=oracle, schedule=SCHEDULE, shape=(2,),
                  **kwargs)


def component_stats(x):
    """Weights, means [K, 2] and per-axis stds [K] of samples assigned to the nearest component."""
    x = np.asarray(x)
    k = np.argmin(((x[:, None] - MIX.means[None]) ** 2).sum(-1), axis=1)
    weights = np.bincount(k, minlength=3) / len(k)
    means = np.stack([x[k == j].mean(0) for j in range(3)])
    stds = np.array([x[k == j].std(0).mean() for j in range(3)])
    return weights, means, stds


def moment_error(x) -> float:
    """sum_k |w_k - w*_k| + ||m_k - m*_k|| + |s_k - s*_k| against the exact mixture."""
    weights, means, stds = component_stats(x)
    return float(np.abs(weights - MIX.weights).sum()
                 + np.linalg.norm(means - MIX.means, axis=-1).sum()
                 + np.abs(stds - MIX.stds).sum())


def assert_mixture(x, *, weight_tol=0.03, mean_tol=0.02, std_rtol=0.05):
    weights, means, stds = component_stats(x)
    # n = 4000: the weight estimate's std is <= 0.008, the means' <= 0.004.
    np.testing.assert_allclose(weights, MIX.weights, atol=weight_tol)
    np.testing.assert_allclose(means, MIX.means, atol=mean_tol)
    np.testing.assert_allclose(stds, MIX.stds, rtol=std_rtol)


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations inside the block."""
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_ddpm_full_chain_reproduces_mixture():
    x = run("ddpm")
    assert x.shape == (N, 2) and x.dtype == jnp.float32
    assert_mixture(x)


def test_ddpm_respaced_reproduces_mixture():
    assert_mixture(run("ddpm", num_steps=250), std_rtol=0.08)


@pytest.mark.slow  # compiles three samplers with a host callback in the network: about 8 s
def test_ddpm_respaced_feeds_original_timesteps():
    seen = []

    def spy(params, x, t, y):
        jax.debug.callback(lambda t: seen.append(int(t[0])), t)
        return oracle(params, x, t, y)

    for method in ("ddpm", "ddim", "dpm_solver++"):
        seen.clear()
        sample(None, jax.random.key(0), method, num_samples=2, num_steps=7, spacing="quad",
               model=spy, schedule=SCHEDULE, shape=(2,)).block_until_ready()
        jax.effects_barrier()
        assert seen == spaced_timesteps(1000, 7, "quad")[::-1].tolist(), method


@pytest.mark.slow  # compiles 100-step DDIM and DDPM samplers: about 5 s
def test_ddim_eta1_is_ddpm_with_fixed_small():
    # DDIM Eq. 16 with eta = 1 gives sigma_t^2 = beta_tilde_t of the respaced chain: the same
    # ancestral sampler as DDPM Alg. 2, so with the same noise the samples agree.
    ddim = run("ddim", num_steps=100, eta=1.0, num_samples=64)
    ddpm = run("ddpm", num_steps=100, num_samples=64, model_var_type="fixed_small")
    np.testing.assert_allclose(ddim, ddpm, atol=2e-4)


@pytest.mark.slow  # compiles three DDPM samplers (eps, learned range, x0): about 6 s
def test_learned_range_and_x0_outputs_match_fixed_eps():
    x_eps = run("ddpm", num_steps=50, num_samples=64)

    def learned_range(params, x, t, y):  # v = -1 selects log beta_tilde (IDDPM Eq. 15)
        return jnp.concatenate([oracle(params, x, t, y), -jnp.ones_like(x)], axis=-1)

    x_lr = sample(None, jax.random.key(0), "ddpm", num_samples=64, num_steps=50,
                  model=learned_range, schedule=SCHEDULE, shape=(2,),
                  model_var_type="learned_range")
    np.testing.assert_allclose(x_lr, x_eps, atol=1e-5)

    def x0_net(params, x, t, y):
        return MIX.x0_mean(SCHEDULE, x, t)

    x_x0 = sample(None, jax.random.key(0), "ddpm", num_samples=64, num_steps=50, model=x0_net,
                  schedule=SCHEDULE, shape=(2,), model_output_type="x0")
    np.testing.assert_allclose(x_x0, x_eps, atol=1e-4)


@pytest.mark.slow  # DDIM on 4000 draws, then compiled again for a given x_T: about 5 s
def test_ddim_reproduces_mixture_and_is_deterministic():
    x = run("ddim", num_steps=100, spacing="quad")
    assert_mixture(x)
    x_T = jax.random.normal(jax.random.key(3), (64, 2))
    a = sample(None, jax.random.key(1), "ddim", x_T=x_T, model=oracle, schedule=SCHEDULE,
               shape=(2,))
    b = sample(None, jax.random.key(2), "ddim", x_T=x_T, model=oracle, schedule=SCHEDULE,
               shape=(2,))
    np.testing.assert_array_equal(a, b)


def test_ddim_eta_adds_noise():
    x_T = jax.random.normal(jax.random.key(3), (64, 2))
    kwargs = dict(x_T=x_T, model=oracle, schedule=SCHEDULE, shape=(2,), num_steps=20)
    det = sample(None, jax.random.key(1), "ddim", **kwargs)
    a = sample(None, jax.random.key(1), "ddim", eta=1.0, **kwargs)
    b = sample(None, jax.random.key(2), "ddim", eta=1.0, **kwargs)
    assert np.abs(np.asarray(a) - np.asarray(b)).mean() > 0.05  # the noise depends on the key
    assert np.abs(np.asarray(a) - np.asarray(det)).mean() > 0.05


@pytest.mark.slow  # 250-step DDIM inversions (plain and fixed-point) and their decoding: about 6 s
def test_ddim_inversion_round_trip():
    gauss = GaussianMixture(np.array([1.0]), np.array([[0.3]]), np.array([0.2]))

    def net(params, x, t, y):
        return gauss.eps(SCHEDULE, x, t)

    x0, _ = gauss.sample(jax.random.key(5), 256)
    kwargs = dict(model=net, schedule=SCHEDULE, num_steps=250)
    errors = {}
    for iterations in (0, 2):
        x_T = ddim_invert(None, x0, fixed_point_iterations=iterations, **kwargs)
        # The ODE maps N(0.3, 0.2^2) onto N(0, 1), up to DDIM's discretisation error.
        assert abs(float(jnp.std(x_T)) - 1.0) < 0.2 and abs(float(jnp.mean(x_T))) < 0.15
        decoded = sample(None, jax.random.key(9), "ddim", x_T=x_T, shape=(1,), eta=0.0,
                         clip_denoised=False, **kwargs)
        errors[iterations] = float(jnp.max(jnp.abs(decoded - x0)))
    print(f"ddim inversion round trip, 250 steps, max |x0 - decode(encode(x0))| by fixed-point "
          f"iterations: {errors}")
    # Plain inversion is off by O(h^2) per step (about 4e-2 in all here); two fixed-point
    # iterations make each step the inverse of its decoding step.
    assert errors[0] < 0.1
    assert errors[2] < 1e-3


def test_dpm_solver_pp_beats_ddim_at_20_steps():
    errors = {}
    for spacing in ("logsnr", "quad", "uniform"):
        for method in ("ddim", "dpm_solver++"):
            errors[method, spacing] = moment_error(run(method, num_steps=20, spacing=spacing))
    print("moment error at 20 steps:", {f"{m}/{s}": round(e, 4) for (m, s), e in errors.items()})
    for spacing in ("logsnr", "quad", "uniform"):
        assert errors["dpm_solver++", spacing] < 0.6 * errors["ddim", spacing]
    assert errors["dpm_solver++", "logsnr"] < 0.08


def test_ode_solvers_convergence_order_against_closed_form():
    # For x_0 ~ N(mu, s^2) the probability-flow ODE is solved in closed form: in x / alpha and
    # sigma / alpha coordinates, (x - mu) / sqrt(s^2 + sigma^2) is constant. Both solvers end
    # with the same exact step x_0 = E[x_0 | x_{t=0}], which the reference applies too.
    mu, s = 0.3, 0.2
    gauss = GaussianMixture(np.array([1.0]), np.array([[mu]]), np.array([s]))

    def net(params, x, t, y):
        return gauss.eps(SCHEDULE, x, t)

    x_T = jnp.linspace(-2.5, 2.5, 64)[:, None]
    a = np.asarray(SCHEDULE.alphas_cumprod, np.float64)
    var_T, var_0 = (1 - a[-1]) / a[-1], (1 - a[0]) / a[0]
    x_0 = mu + (np.asarray(x_T, np.float64) / np.sqrt(a[-1]) - mu) * np.sqrt(
        (s**2 + var_0) / (s**2 + var_T))
    exact = mu + s**2 / (s**2 + var_0) * (x_0 - mu)
    errors = {}
    for method in ("ddim", "dpm_solver++"):
        for num_steps in (20, 40):
            x = sample(None, jax.random.key(0), method, x_T=x_T, num_steps=num_steps,
                       spacing="logsnr", model=net, schedule=SCHEDULE, shape=(1,),
                       clip_denoised=False)
            errors[method, num_steps] = float(np.abs(np.asarray(x) - exact).max())
    print("max error against the exact ODE solution:",
          {f"{m}/{n}": f"{e:.2e}" for (m, n), e in errors.items()})
    # DDIM is first order (error halves with twice the steps), DPM-Solver++(2M) second order.
    assert 1.7 < errors["ddim", 20] / errors["ddim", 40] < 2.3
    assert errors["dpm_solver++", 20] / errors["dpm_solver++", 40] > 3.0
    assert errors["dpm_solver++", 20] < 0.2 * errors["ddim", 20]


def test_same_key_same_samples_and_padding_independence():
    a = run(num_samples=5, num_steps=10)
    b = run(num_samples=5, num_steps=10)
    np.testing.assert_array_equal(a, b)
    c = sample(None, jax.random.key(1), model=oracle, schedule=SCHEDULE, shape=(2,),
               num_samples=5, num_steps=10)
    assert np.abs(np.asarray(a) - np.asarray(c)).min() > 1e-3
    # Row i of a (partitionable threefry) draw depends on the key and i only: sample i is the
    # same whatever the batch (3 is padded to 4 for the 2 devices).
    np.testing.assert_allclose(run(num_samples=3, num_steps=10), a[:3], atol=1e-6)
    # The batch is split over both (host) devices.
    assert jax.local_device_count() == 2
    shards = run(num_samples=4, num_steps=10).addressable_shards
    assert len(shards) == 2 and all(shard.data.shape == (2, 2) for shard in shards)


def test_repeated_calls_never_recompile():
    kwargs = dict(model=oracle, schedule=SCHEDULE, shape=(2,), num_samples=6, num_steps=30)
    sample(None, jax.random.key(0), "ddim", eta=0.5, **kwargs).block_until_ready()
    with count_compiles() as compiles:
        for seed, eta in ((1, 0.0), (2, 1.0), (3, 0.25)):
            sample(None, jax.random.key(seed), "ddim", eta=eta, **kwargs).block_until_ready()
    assert compiles == []


def test_compile_count_ignores_step_values():
    # A new spacing only changes the tables (same shapes): still no compilation.
    kwargs = dict(model=oracle, schedule=SCHEDULE, shape=(2,), num_samples=6, num_steps=12)
    sample(None, jax.random.key(0), "dpm_solver++", spacing="uniform", **kwargs)
    with count_compiles() as compiles:
        sample(None, jax.random.key(0), "dpm_solver++", spacing="quad", **kwargs)
    assert compiles == []


def test_return_trajectory_is_ddim_eq_12_step_by_step():
    """The trajectory is each step's input x_i and estimate x0_i at tau_i (descending): x0_i =
    (x_i - sqrt(1 - a_i) eps*(x_i)) / sqrt(a_i), and x_{i+1} = sqrt(a_{i+1}) x0_i + sqrt(1 -
    a_{i+1}) (x_i - sqrt(a_i) x0_i) / sqrt(1 - a_i) (DDIM Eq. 12, eta = 0), written out in float64
    with the oracle's eps; the sample is the last estimate."""
    x, traj = run("ddim", num_samples=3, num_steps=8, return_trajectory=True,
                  clip_denoised=False)
    xt, x0 = np.asarray(traj["xt"], np.float64), np.asarray(traj["pred_x0"], np.float64)
    assert xt.shape == (8, 3, 2) and x0.shape == (8, 3, 2)
    tau = spaced_timesteps(1000, 8)[::-1]
    a_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))[tau]
    for i in range(8):
        eps = np.asarray(oracle(None, jnp.asarray(xt[i], jnp.float32), jnp.full(3, tau[i]), None))
        np.testing.assert_allclose(x0[i], (xt[i] - np.sqrt(1 - a_bar[i]) * eps)
                                   / np.sqrt(a_bar[i]), rtol=1e-4, atol=1e-4)
        if i < 7:
            eps_hat = (xt[i] - np.sqrt(a_bar[i]) * x0[i]) / np.sqrt(1 - a_bar[i])
            np.testing.assert_allclose(xt[i + 1], np.sqrt(a_bar[i + 1]) * x0[i]
                                       + np.sqrt(1 - a_bar[i + 1]) * eps_hat, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x, x0[-1], atol=1e-6)
    _, traj = run("ddpm", num_samples=3, num_steps=5, return_trajectory=True)
    assert traj["xt"].shape == (5, 3, 2)


class TinyDenoiser(nn.Module):
    """A small flax network with the house signature (x, t, y, train)."""

    num_classes: int = 0

    @nn.compact
    def __call__(self, x, t, y=None, train=False):
        h = jnp.concatenate([x, t[:, None] / 1000.0], axis=-1)
        if self.num_classes:
            h = h + nn.Embed(self.num_classes + 1, h.shape[-1])(y)
        return nn.Dense(x.shape[-1])(nn.silu(nn.Dense(16)(h)))


def test_diffusion_model_bundle_with_flax_module():
    module = TinyDenoiser(num_classes=3)
    params = module.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32),
                         jnp.zeros((1,), jnp.int32))["params"]
    bundle = DiffusionModel(params=params, schedule=make_schedule("linear", 100), model=module,
                            image_shape=(2,), num_classes=3)
    labels = np.array([0, 1, 2, 0, 1])
    x = jaxdiff.sample(bundle, jax.random.key(1), num_samples=5, num_steps=10, labels=labels,
                       guidance_scale=2.0)

    def guided(params, x, t, y):  # CFG written out: (1 + w) eps(x, y) - w eps(x, null = 3)
        def eps(label):
            return module.apply({"params": params}, x, t, label)
        return 3.0 * eps(y) - 2.0 * eps(jnp.full_like(y, 3))

    expected = sample(params, jax.random.key(1), "ddim", model=guided,
                      schedule=make_schedule("linear", 100), shape=(2,), num_classes=3,
                      num_samples=5, num_steps=10, labels=labels)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
    assert float(jnp.std(x)) > 0.1
    x = jaxdiff.sample(bundle, jax.random.key(1), "ddpm", num_samples=4)  # random labels
    assert x.shape == (4, 2) and bool(jnp.all(jnp.isfinite(x)))


def test_to_uint8():
    out = to_uint8(jnp.array([-1.0, -0.999, 0.0, 1.0, 1.5]))
    np.testing.assert_array_equal(out, np.array([0, 0, 128, 255, 255], np.uint8))
    assert out.dtype == np.uint8


def _classifier(params, x, t):
    return MIX.class_logits(SCHEDULE, x, t)


BAD_INPUTS = [
    (dict(method="karras"), "karras"),
    (dict(method="heun", eta=0.5), "eta"),
    (dict(method="ddpm", eta=1.0), "eta"),
    (dict(method="ddim_inversion"), "ddim_invert"),
    (dict(num_steps=0), "0"),
    (dict(num_steps=1001), "1001"),
    (dict(method="ddpm", num_steps=2000), "2000"),
    (dict(eta=1.5), "1.5"),
    (dict(eta=-0.1), "-0.1"),
    (dict(spacing="cubic"), "cubic"),
    (dict(num_samples=0), "0"),
    (dict(labels=np.zeros(3, np.int32)), "(3,)"),  # wrong length for num_samples=4
    (dict(labels=np.array([0, 1, 2, 4])), "4"),  # 3 is the null label, 4 is out of range
    (dict(labels=np.array([0, 1, 2, 3]), guidance_scale=1.0), "3"),
    (dict(labels=np.array([0, -1, 2, 0])), "-1"),
    (dict(guidance_scale=1.0), "guidance_scale=1.0"),
    (dict(guidance_scale=-1.0), "-1.0"),
    (dict(classifier=_classifier, labels=np.zeros(4, np.int32)), "classifier_params=None"),
    (dict(classifier=_classifier, classifier_params={}), "labels=None"),
    (dict(classifier=_classifier, classifier_params={}, labels=np.array([0, 1, 2, 3])), "3"),
    (dict(x_T=jnp.zeros((4, 3))), "(4, 3)"),
]


@pytest.mark.parametrize("kwargs,message", BAD_INPUTS)
def test_bad_inputs_raise_before_compiling(kwargs, message):
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "ddim")
    kwargs.setdefault("num_samples", 4)
    rng = jax.random.key(0)  # made before counting: creating a key compiles once per process
    with count_compiles() as compiles, pytest.raises(ValueError, match=None) as info:
        sample(None, rng, method, model=oracle, schedule=SCHEDULE, shape=(2,), num_classes=3,
               **kwargs)
    assert message in str(info.value)
    assert compiles == []


def test_cfg_on_unconditional_model_raises_before_compiling():
    jax.random.key(0)  # `run` makes this key; the first in a process compiles, before sampling
    with count_compiles() as compiles, pytest.raises(ValueError, match="num_classes=0"):
        run(num_samples=4, labels=np.zeros(4, np.int32), guidance_scale=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        run(num_samples=4, labels=np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="shape"):
        sample(None, jax.random.key(0), model=oracle, schedule=SCHEDULE)
    assert compiles == []


def test_sampling_timesteps_logsnr():
    tau = logsnr_timesteps(SCHEDULE, 20)
    assert tau[-1] == 999 and tau[0] == 0 and np.all(np.diff(tau) > 0)
    a = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[tau]
    lam = 0.5 * np.log(a / (1 - a))
    gaps = -np.diff(lam)
    assert gaps.max() < 1.3 * gaps.mean()  # evenly spaced in lambda up to integer rounding
    tau = logsnr_timesteps(SCHEDULE, 1000)
    np.testing.assert_array_equal(tau, np.arange(1000))


@pytest.mark.slow  # compiles a small U-Net's 20-step DDIM in float32 and in bfloat16: about 70 s
def test_bfloat16_network_samples_like_float32():
    """bfloat16 compute (float32 parameters) changes DDIM samples of the same seed only a little:
    a small U-Net with every weight random (no zero-initialised layer), 8x8 images, 20 steps."""
    from jaxdiff.models.unet import UNet

    kwargs = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                  norm_groups=8)
    f32, bf16 = UNet(**kwargs), UNet(**kwargs, dtype=jnp.bfloat16)
    x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
    params = f32.init(jax.random.key(0), x, t)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [
        leaf + 0.3 * jax.random.normal(k, leaf.shape) / np.sqrt(max(leaf.shape[-2:-1] or (1,)))
        for leaf, k in zip(leaves, keys, strict=True)])

    def draw(model):
        return sample(params, jax.random.key(2), "ddim", num_samples=16, num_steps=20,
                      model=model, schedule=SCHEDULE, shape=(8, 8, 3))

    a, b = np.asarray(draw(f32)), np.asarray(draw(bf16))
    assert a.std() > 0.2  # the samples are not trivial
    assert np.abs(a - b).max() > 0  # bfloat16 did run
    # Measured: mean |difference| 0.23% of the samples' std (the largest one pixel, 0.4).
    assert np.abs(a - b).mean() < 0.01 * a.std(), np.abs(a - b).mean() / a.std()


# ----------------------------------------------------------------------------------------------
# EDM's samplers and the continuous-time bridge (Karras et al. arXiv 2206.00364)

EDM = VEProcess(sigma_min=0.002, sigma_max=80.0)


def mixture_denoiser(params, x, t, y):
    """D*(x; sigma) of MIX as a network of EDM's process (fed c_noise = ln(sigma) / 4, x0 out)."""
    del params, y
    return MIX.denoise(x, jnp.exp(4.0 * t))


def run_edm(method, **kwargs):
    kwargs.setdefault("num_samples", N)
    return sample(None, jax.random.key(0), method, model=mixture_denoiser, schedule=EDM,
                  shape=(2,), model_output_type="x0", **kwargs)


@contextlib.contextmanager
def count_network_calls():
    """Counts executed network evaluations (a host callback inside the model: a branch that
    `lax.cond` does not take does not count)."""
    calls = []

    def counted(params, x, t, y):
        jax.debug.callback(lambda: calls.append(1))
        return mixture_denoiser(params, x, t, y)

    yield counted, calls


def test_heun_takes_2n_minus_1_network_calls():
    with count_network_calls() as (model, calls):
        sample(None, jax.random.key(0), "heun", model=model, schedule=EDM, shape=(2,),
               model_output_type="x0", num_samples=2, num_steps=18).block_until_ready()
        jax.effects_barrier()
    assert len(calls) == 35


@pytest.mark.slow  # three samplers on 4000 draws: about 5 s
def test_heun_reproduces_the_mixture_closer_than_ddim_at_equal_cost():
    """18 Heun steps (35 evaluations, EDM's grid) against 35 DDIM steps (its uniform grid), both
    on the exact eps of the mixture (a DDPM model: Heun feeds it the nearest steps). On the exact
    denoiser D* with both on EDM's grid the two tie (measured 0.120 and 0.118): this mixture's
    components are 0.15 wide, and 18 steps overshoot their means by up to 0.037 (30 steps by
    0.017, 40 by less)."""
    heun, ddim = run("heun", num_steps=18), run("ddim", num_steps=35)
    # Measured: 0.103 (heun) vs 0.134 (ddim).
    assert moment_error(heun) < moment_error(ddim), (moment_error(heun), moment_error(ddim))
    assert_mixture(run_edm("heun", num_steps=40))


def test_stochastic_samplers_reproduce_the_mixture():
    """EDM's churn, k-diffusion's ancestral Euler and plain Euler on the exact denoiser (measured
    mean errors at most 0.015, 0.011 and 0.007)."""
    assert_mixture(run_edm("heun", num_steps=40, s_churn=30.0, s_min=0.01, s_max=10.0,
                           s_noise=1.0))
    assert_mixture(run_edm("euler_ancestral", num_steps=300))
    assert_mixture(run_edm("euler", num_steps=200))


@pytest.mark.slow  # four samplers on 4000 draws, up to 300 steps: about 9 s
def test_every_method_samples_every_model():
    """The bridge both ways: DDIM and DPM-Solver++ on an EDM model; Heun and ancestral Euler on a
    DDPM eps-model (fed its nearest steps, sigma in EDM's [0.002, 80] clipped to the model's
    [0.01, 157])."""
    assert_mixture(run_edm("ddim", num_steps=100))
    assert_mixture(run_edm("dpm_solver++", num_steps=40))
    assert_mixture(run("heun", num_steps=30))
    assert_mixture(run("euler_ancestral", num_steps=300))


@pytest.mark.slow  # three grids compiled per solver: about 5 s each
@pytest.mark.parametrize("method, order", [("heun", 2.0), ("euler", 1.0)])
def test_ode_solver_order_against_the_closed_form_for_gaussian_data(method, order):
    """Data N(0, s^2): D(x; sigma) = x s^2 / (s^2 + sigma^2) and the probability-flow ODE
    dx/dsigma = (x - D) / sigma gives x(sigma) = x(sigma_max) sqrt((s^2 + sigma^2) / (s^2 +
    sigma_max^2)). The last step (sigma_min -> 0, Euler in both) is exact for this D, so the
    error is the steps' alone: O(N^-2) for Heun, O(N^-1) for Euler."""
    s = 0.5

    def gaussian(params, x, t, y):
        sigma2 = jnp.exp(8.0 * t)[:, None]
        return x * s**2 / (s**2 + sigma2)

    z = jax.random.normal(jax.random.key(1), (64, 2))
    lo, hi = EDM.sigma_min, EDM.sigma_max
    exact = np.asarray(z) * hi * np.sqrt((s**2 + lo**2) / (s**2 + hi**2)) * s**2 / (s**2 + lo**2)
    errors = []
    for n in (16, 32, 64):
        x = sample(None, jax.random.key(0), method, model=gaussian, schedule=EDM, shape=(2,),
                   model_output_type="x0", num_steps=n, x_T=z, clip_denoised=False)
        errors.append(np.abs(np.asarray(x) - exact).max())
    slopes = -np.diff(np.log2(errors))
    # Measured: heun 2.20, 2.10; euler 0.98, 0.99.
    np.testing.assert_allclose(slopes, order, atol=0.25, err_msg=str(errors))


def test_new_churn_and_grid_values_never_recompile():
    kwargs = dict(model=mixture_denoiser, schedule=EDM, shape=(2,), model_output_type="x0",
                  num_samples=6, num_steps=12)
    sample(None, jax.random.key(0), "heun", s_churn=1.0, **kwargs).block_until_ready()
    with count_compiles() as compiles:
        for seed, churn, rho in ((1, 0.0, 7.0), (2, 5.0, 3.0), (3, 2.0, 9.0)):
            sample(None, jax.random.key(seed), "heun", s_churn=churn, rho=rho,
                   **kwargs).block_until_ready()
    assert compiles == []


def test_consistency_sampler_is_algorithm_1():
    """With the exact denoiser of Gaussian data as f: one step maps sigma_max z to D; a second
    adds noise sqrt(sigma_1^2 - sigma_min^2) z' to that estimate and denoises again."""
    s = 0.5

    def gaussian(params, x, t, y):
        sigma2 = jnp.exp(8.0 * t)[:, None]
        return x * s**2 / (s**2 + sigma2)

    z = jax.random.normal(jax.random.key(1), (5, 2))
    kwargs = dict(model=gaussian, schedule=EDM, shape=(2,), model_output_type="x0", x_T=z,
                  clip_denoised=False)
    one = sample(None, jax.random.key(0), "consistency", **kwargs)
    np.testing.assert_allclose(one, np.asarray(z) * 80.0 * s**2 / (s**2 + 80.0**2), rtol=1e-5)
    two, trajectory = sample(None, jax.random.key(0), "consistency", sigmas=(80.0, 0.8),
                             return_trajectory=True, **kwargs)
    x_hat = np.asarray(trajectory["xt"][1])
    noise = (x_hat - np.asarray(one)) / np.sqrt(0.8**2 - 0.002**2)
    assert 0.3 < noise.std() < 2.0  # fresh noise of the stated scale was added
    np.testing.assert_allclose(two, x_hat * s**2 / (s**2 + 0.8**2), rtol=1e-5)


def test_consistency_sampler_adds_noise_of_cm_alg_1_scale():
    """Alg. 1's noise scale sqrt(sigma_n^2 - sigma_min^2), through `jaxdiff.sample`, with the exact
    consistency function of data N(0, s^2) as f: f*(x, sigma) = x sqrt((s^2 + sigma_min^2) /
    (s^2 + sigma^2)) (the probability-flow ODE's solution, x(sigma) / sqrt(s^2 + sigma^2)
    constant). f* maps variance v at sigma to v (s^2 + sigma_min^2) / (s^2 + sigma^2), and each
    step adds sigma_n^2 - sigma_min^2, so every level's variance is closed form; 40,000 values
    measure it to 0.7% (a 10% error in the scale moves the two-step variance by 18%)."""
    s, lo, n = 0.5, EDM.sigma_min, 20_000

    def f_star(params, x, t, y):
        sigma2 = jnp.exp(8.0 * t)[:, None]  # the VE network time is c_noise = ln(sigma) / 4
        return x * jnp.sqrt((s**2 + lo**2) / (s**2 + sigma2))

    sigmas = (80.0, 2.0, 0.5)
    x, trajectory = sample(None, jax.random.key(7), "consistency", model=f_star, schedule=EDM,
                           shape=(2,), model_output_type="x0", sigmas=sigmas, num_samples=n,
                           clip_denoised=False, return_trajectory=True)
    x_hat = np.asarray(trajectory["xt"], np.float64)
    x0 = np.asarray(trajectory["pred_x0"], np.float64)
    var = 80.0**2 * (s**2 + lo**2) / (s**2 + 80.0**2)
    np.testing.assert_allclose(x0[0].var(), var, rtol=0.03)
    for i, sigma in enumerate(sigmas[1:], start=1):
        noise = x_hat[i] - x0[i - 1]
        np.testing.assert_allclose(noise.std(), np.sqrt(sigma**2 - lo**2), rtol=0.015)
        var = (var + sigma**2 - lo**2) * (s**2 + lo**2) / (s**2 + sigma**2)
        np.testing.assert_allclose(x0[i].var(), var, rtol=0.03, err_msg=f"level {sigma}")
    np.testing.assert_allclose(np.asarray(x).var(), var, rtol=0.03)
    assert abs(float(np.asarray(x).mean())) < 4 * np.sqrt(var / (2 * n))


EDM_BAD_INPUTS = [
    (dict(method="heun", sigma_max=200.0), "sigma_max=200.0"),
    (dict(method="heun", sigma_min=1e-4), "sigma_min=0.0001"),
    (dict(method="heun", sigma_min=5.0, sigma_max=2.0), "sigma_min=5.0"),
    (dict(method="heun", churn=1.0), "'churn'"),
    (dict(method="heun", s_churn=-1.0), "-1.0"),
    (dict(method="heun", s_min=2.0, s_max=1.0), "s_max=1.0"),
    (dict(method="heun", spacing="cubic"), "cubic"),
    (dict(method="consistency", sigmas=(0.5, 2.0)), "(0.5, 2.0)"),
    (dict(method="consistency", sigmas=(2.0, 0.5), num_steps=3), "num_steps=3"),
    (dict(method="ddim", model_output_type="score"), "'score'"),
]


@pytest.mark.parametrize("kwargs,message", EDM_BAD_INPUTS)
def test_edm_bad_inputs_raise_before_compiling(kwargs, message):
    kwargs = dict(kwargs)
    method = kwargs.pop("method")
    rng = jax.random.key(0)
    with count_compiles() as compiles, pytest.raises(ValueError) as info:
        sample(None, rng, method, model=oracle, schedule=SCHEDULE, shape=(2,), num_samples=4,
               **kwargs)
    assert message in str(info.value)
    assert compiles == []


def test_time_spacings_of_every_process():
    """`uniform` and `quad` space a process's own time: a chain's steps (DDIM's), EDM's sigma
    (t = sigma) and flow matching's t; `karras` on a chain is rounded to its steps (EDM's
    iDDPM sampler), so the level integrated is one the network was trained on."""
    ve = samplers.make_grid(VEProcess(), 5, "uniform")
    np.testing.assert_allclose(ve.sigma, np.linspace(80.0, 0.002, 5), rtol=1e-12)
    fm = samplers.make_grid(FlowMatchingProcess(), 5, "uniform")
    np.testing.assert_allclose(fm.t, np.linspace(80 / 81, 0.002 / 1.002, 5), rtol=1e-6)
    np.testing.assert_allclose(fm.sigma, fm.t / (1 - fm.t), rtol=1e-9)
    quad = samplers.make_grid(VEProcess(), 5, "quad")
    np.testing.assert_allclose(quad.sigma, 0.002 + (80 - 0.002) * np.linspace(1, 0, 5) ** 2,
                               rtol=1e-9)
    chain = samplers.make_grid(SCHEDULE, 10, "uniform")
    np.testing.assert_array_equal(chain.t, spaced_timesteps(1000, 10)[::-1])
    karras = samplers.make_grid(SCHEDULE, 18, "karras")
    np.testing.assert_array_equal(karras.t, np.round(karras.t))
    np.testing.assert_allclose(karras.sigma, SCHEDULE.sigmas[karras.t.astype(int)], rtol=1e-6)


def test_bad_keys_paths_and_bundles_are_named():
    with pytest.raises(ValueError, match="rng must be a JAX PRNG key.*None"):
        sample(None, None, model=oracle, schedule=SCHEDULE, shape=(2,), num_samples=4)
    with pytest.raises(ValueError, match=r"jaxdiff.load\('runs/digits'\)"):
        sample("runs/digits", jax.random.key(0))
    module = TinyDenoiser()
    params = module.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32))
    bundle = DiffusionModel(params=params["params"], schedule=SCHEDULE, model=module,
                            image_shape=(2,))
    with pytest.raises(ValueError, match="classifier= got a diffusion model"):
        sample(bundle, jax.random.key(0), classifier=bundle, labels=np.zeros(16, np.int32))
    # A step count of any integer type is as good as a Python int.
    a = sample(bundle, jax.random.key(0), num_samples=2, num_steps=jnp.int32(5))
    b = sample(bundle, jax.random.key(0), num_samples=2, num_steps=np.int64(5))
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# Any model as a denoiser D(x; sigma) of traced levels (CD's teacher)


@pytest.mark.slow  # compiles a DDPM model's denoiser twice (once with a host callback): about 9 s
def test_denoiser_of_a_ddpm_model_is_the_exact_posterior_mean_at_its_steps():
    """At a step's own sigma, x = x_0 + sigma n is fed as sqrt(a_bar) x with that step's index:
    D equals the mixture's E[x_0 | x_t]; a level between two steps takes the nearer in log."""
    model = DiffusionModel(params=None, schedule=SCHEDULE, model=oracle, image_shape=(2,))
    steps = np.array([0, 10, 250, 600, 999])
    sigma = SCHEDULE.sigmas[steps]
    x0, _ = MIX.sample(jax.random.key(0), len(steps))
    x = x0 + jnp.asarray(sigma, jnp.float32)[:, None] * jax.random.normal(jax.random.key(1),
                                                                         (len(steps), 2))
    d = jax.jit(denoiser(model))(None, x, jnp.asarray(sigma, jnp.float32))
    a_bar = np.asarray(SCHEDULE.alphas_cumprod)[steps][:, None]
    exact = MIX.x0_mean(SCHEDULE, jnp.sqrt(a_bar) * x, jnp.asarray(steps))
    np.testing.assert_allclose(d, exact, rtol=1e-4, atol=1e-5)
    # 0.49 and 0.51 of the way in log sigma from step 250 to step 251.
    log_lo, log_hi = np.log(SCHEDULE.sigmas[250]), np.log(SCHEDULE.sigmas[251])
    between = np.exp(log_lo + np.array([0.49, 0.51]) * (log_hi - log_lo))
    seen = []

    def spy(params, x, t, y):
        jax.debug.callback(lambda t: seen.append(np.asarray(t)), t)
        return oracle(params, x, t, y)

    denoiser(model.replace(model=spy))(None, x[:2], jnp.asarray(between, jnp.float32))
    jax.effects_barrier()
    np.testing.assert_array_equal(seen[0], [250, 251])


def test_denoiser_of_an_edm_model_is_its_d():
    """A VE model with x0 output, and the same D through EDM's preconditioning (F = (D - c_skip
    x) / c_out fed c_in x): both are D itself at traced levels."""
    sigma = jnp.array([0.002, 0.05, 0.7, 3.0, 80.0])
    x = jax.random.normal(jax.random.key(2), (5, 2)) * jnp.sqrt(0.3 + sigma[:, None] ** 2)
    exact = MIX.denoise(x, sigma)
    x0_model = DiffusionModel(params=None, schedule=EDM, model=mixture_denoiser, image_shape=(2,),
                              model_output_type="x0")
    np.testing.assert_allclose(denoiser(x0_model)(None, x, sigma), exact, rtol=1e-4,
                               atol=1e-5)
    sd = 0.5

    def preconditioned(params, x_in, t, y):
        s = jnp.exp(4.0 * t)[:, None]
        total = s**2 + sd**2
        x_ve = x_in * jnp.sqrt(total)
        d = mixture_denoiser(params, x_ve, t, y)
        return (d - sd**2 / total * x_ve) / (s * sd / jnp.sqrt(total))

    edm_model = x0_model.replace(model=preconditioned, model_output_type="edm", sigma_data=sd)
    np.testing.assert_allclose(denoiser(edm_model)(None, x, sigma), exact, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.slow  # initialises a U-Net classifier and compiles two guided samplers: about 25 s
def test_a_classifier_bundle_guides_and_is_refused_as_a_sampler():
    """A loaded classifier workdir (a bundle holding a `Classifier`) is refused as the model to
    sample, and as `classifier=` stands for its network and weights (the same samples as passing
    them separately)."""
    from jaxdiff.models.classifier import Classifier

    net = Classifier(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                     num_classes=3, pool="mean")
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    classifier = DiffusionModel(params=net.init(jax.random.key(0), x, t)["params"],
                                schedule=SCHEDULE, model=net, image_shape=(8, 8, 1), num_classes=3)
    with pytest.raises(ValueError, match="noisy classifier, not a denoiser"):
        sample(classifier, jax.random.key(0))

    def denoiser(params, x, t, y):
        return 0.1 * x

    kwargs = dict(model=denoiser, schedule=SCHEDULE, shape=(8, 8, 1), num_samples=3,
                  num_steps=4, labels=np.array([0, 1, 2]), classifier_scale=50.0)
    guided = sample(None, jax.random.key(1), "ddim", classifier=classifier, **kwargs)
    by_parts = sample(None, jax.random.key(1), "ddim", classifier=net,
                      classifier_params=classifier.params, **kwargs)
    plain = sample(None, jax.random.key(1), "ddim", **{k: v for k, v in kwargs.items()
                                                      if k not in ("labels", "classifier_scale")})
    np.testing.assert_array_equal(guided, by_parts)
    assert float(jnp.abs(guided - plain).max()) > 1e-4  # the gradient did steer


def test_ddim_invert_takes_a_continuous_process_s_own_spacing():
    """ddim_invert on an EDM model with its default spacing (the process's own: Karras levels)
    encodes, and DDIM decodes the code back: fixed-point inversion converges geometrically
    (measured max error 0.55, 8.6e-3, 7.9e-5, 4.8e-7 after 0, 3, 10, 30 iterations)."""
    x0 = np.asarray(run_edm("heun", num_samples=64))
    x_T = ddim_invert(None, x0, num_steps=20, model=mixture_denoiser, schedule=EDM,
                      model_output_type="x0", fixed_point_iterations=10)
    back = sample(None, jax.random.key(1), "ddim", x_T=x_T, num_steps=20, eta=0.0,
                  clip_denoised=False, model=mixture_denoiser, schedule=EDM, shape=(2,),
                  model_output_type="x0")
    np.testing.assert_allclose(back, x0, atol=1e-3)


def test_a_karras_option_of_none_takes_its_default():
    """rho=None (as a config's unset field passes it) is EDM's rho = 7, not a TypeError."""
    np.testing.assert_array_equal(run_edm("heun", num_samples=8, rho=None),
                                  run_edm("heun", num_samples=8))
