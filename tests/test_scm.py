"""TrigFlow, sCT and sCD (Lu & Song, arXiv 2410.11081) against closed forms.

For data N(MU, S^2 I) the TrigFlow PF-ODE is linear: in EDM's frame x(sigma) = MU + (x(sigma') -
MU) sqrt((S^2 + sigma^2) / (S^2 + sigma'^2)), and on x_t = cos(t) x_edm at sigma = sigma_d tan t
the exact consistency function (the ODE's end at t = 0) is

    f*(x_t, t) = MU + (x_t - MU cos t) k(t),  k(t) = S / sqrt(S^2 cos^2 t + sigma_d^2 sin^2 t),

whose F* = (cos(t) x_t - f*) / (sigma_d sin t) is what a perfect network outputs. Its total
derivative along any path with velocity v is d f*/dt = (v + MU sin t) k + (x_t - MU cos t) k'(t);
along the PF-ODE it is 0. The sCM tangent computed by the library (`jax.jvp`, or the transposed
VJP the library's networks need) must equal cos(t) times that closed form.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from experiments import digits_scd, digits_sct, digits_trigflow
from jaxdiff import digits_scorer, objectives, parameterisations, scm, sharding, train
from jaxdiff.config import default_config, validate
from jaxdiff.data import create_dataset
from jaxdiff.denoiser import predict
from jaxdiff.models import MLPDenoiser
from jaxdiff.processes import TrigFlowProcess, make_process

MU = np.array([0.3, -0.2], np.float32)
S = 0.4
SD = 0.5
PROCESS = TrigFlowProcess(sigma_data=SD)


def k(t):
    return S / jnp.sqrt(S**2 * jnp.cos(t) ** 2 + SD**2 * jnp.sin(t) ** 2)


def k_prime(t):
    c, s = np.cos(t), np.sin(t)
    return -S * s * c * (SD**2 - S**2) / (S**2 * c**2 + SD**2 * s**2) ** 1.5


def f_star(x_t, t):
    t = t[:, None]
    return MU + (x_t - MU * jnp.cos(t)) * k(t)


def big_f_star(x_t, t):
    """F*(x_t / sigma_d, t): the network output of the exact consistency function."""
    tb = t[:, None]
    return (jnp.cos(tb) * x_t - f_star(x_t, t)) / (SD * jnp.sin(tb))


def exact_denoiser(x, sigma):
    """E[x_0 | x_0 + sigma n] of N(MU, S^2 I)."""
    sigma = sigma[:, None]
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def draws(n=64, seed=0, t=None):
    k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
    x0 = MU + S * jax.random.normal(k0, (n, 2))
    z = SD * jax.random.normal(k1, (n, 2))
    t = PROCESS.sample_t(k2, (n,)) if t is None else jnp.full((n,), t)
    x_t = jnp.cos(t)[:, None] * x0 + jnp.sin(t)[:, None] * z
    return x0, z, t, x_t


# --- The process and the parameterisation ----------------------------------------------------


def test_trigflow_process_closed_forms_under_jit():
    """alpha = cos t, sigma = sigma_d sin t, EDM's level sigma_d tan t, log-SNR = -2 ln(sigma_d
    tan t), and the inverses, traced."""
    t = jnp.array([1e-3, 0.3, 0.8, 1.2, 1.56])

    @jax.jit
    def answers(t):
        p = PROCESS
        return (p.alpha(t), p.sigma(t), p.sigma(t) / p.alpha(t), p.log_snr(t),
                p.t_of_sigma(SD * jnp.tan(t)), p.t_of_log_snr(p.log_snr(t)),
                p.t_of_network_time(p.network_time(t)))

    alpha, sigma, level, log_snr, t1, t2, t3 = answers(t)
    tn = np.asarray(t, np.float64)
    np.testing.assert_allclose(alpha, np.cos(tn), rtol=1e-6)
    np.testing.assert_allclose(sigma, SD * np.sin(tn), rtol=1e-6)
    np.testing.assert_allclose(level, SD * np.tan(tn), rtol=1e-5)
    np.testing.assert_allclose(log_snr, np.log(np.cos(tn) ** 2 / (SD * np.sin(tn)) ** 2),
                               rtol=1e-5)
    for back in (t1, t2, t3):
        np.testing.assert_allclose(back, tn, rtol=1e-5)
    assert PROCESS.sigma_max == 80.0 and math.isclose(
        float(PROCESS.t_of_sigma(80.0)), math.atan(80.0 / SD), rel_tol=1e-6)


def test_the_proposal_is_lognormal_in_edm_sigma():
    """sigma_d tan t of sCM's proposal has ln of mean P_mean and std P_std (20000 draws; standard
    errors 0.01)."""
    p = TrigFlowProcess(sigma_data=0.75, p_mean=-1.0, p_std=1.4)
    t = p.sample_t(jax.random.key(0), (20_000,))
    assert float(t.min()) > 0 and float(t.max()) < math.pi / 2
    tau = np.log(0.75 * np.tan(np.asarray(t, np.float64)))
    assert abs(tau.mean() + 1.0) < 0.04 and abs(tau.std() - 1.4) < 0.04


@pytest.mark.parametrize("name", ["trigflow", "trigflow_consistency"])
def test_trigflow_boundary_and_form(name):
    """f(x, 0) = x whatever the network says, and f = cos(t) x_t - sin(t) sigma_d F(x_t /
    sigma_d, t) at every t (through `denoiser.predict`, EDM's sigma = sigma_d tan t)."""
    param = parameterisations.get(name)
    x = jax.random.normal(jax.random.key(0), (4, 3))
    out = jax.random.normal(jax.random.key(1), (4, 3))
    zero = jnp.zeros((4, 1))
    np.testing.assert_array_equal(param.to_x0(out, x, jnp.ones((4, 1)), zero, SD), x)

    def network(x_in, c):
        return jnp.sin(3.0 * x_in) + c[:, None]

    t = jnp.array([0.1, 0.5, 1.0, 1.5])
    x_t = 2.0 * x
    edm = x_t / jnp.cos(t)[:, None]
    got = predict(network, param, PROCESS, edm, SD * jnp.tan(t), sigma_data=SD,
                  model_var_type="fixed_small").x0
    tb = t[:, None]
    want = jnp.cos(tb) * x_t - jnp.sin(tb) * SD * network(x_t / SD, t)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --- The tangent -------------------------------------------------------------------------------


def test_teacher_velocity_is_the_pf_odes_derivative():
    """dx_t/dt of the exact denoiser equals the finite difference (float64) of the closed-form
    ODE solution x_t(t) = cos(t) x_edm(sigma_d tan t)."""
    with jax.enable_x64(True):
        _, _, t, x_t = draws(8, t=0.9)
        x_t, t = x_t.astype(jnp.float64), t.astype(jnp.float64)

        def along(u):  # the trajectory through x_t at t, read at time u
            s0, s1 = SD * jnp.tan(t)[:, None], SD * jnp.tan(u)
            x_edm = MU + (x_t / jnp.cos(t)[:, None] - MU) * jnp.sqrt((S**2 + s1**2)
                                                                    / (S**2 + s0**2))
            return jnp.cos(u) * x_edm

        h = 1e-5
        fd = (along(0.9 + h) - along(0.9 - h)) / (2 * h)
        v = scm.teacher_velocity(exact_denoiser, x_t, t, sigma_data=SD)
        np.testing.assert_allclose(v, fd, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("jvp", [jax.jvp, scm.transposed_vjp], ids=["jvp", "transposed_vjp"])
def test_tangent_is_cos_t_times_the_closed_form_derivative(jvp):
    """For the data's velocity (sCT) g = cos(t) d f*/dt of the closed form; along the exact
    teacher's (sCD) it is 0: f* is constant on its trajectories. The first term alone at r = 0."""
    x0, z, t, x_t = draws(256)
    v = scm.data_velocity(x0, z, t)
    tangent = jax.jit(functools.partial(scm.consistency_tangent, big_f_star, sigma_data=SD,
                                        jvp=jvp))
    f_minus, g = tangent(x_t, t, v)
    tb = np.asarray(t, np.float64)[:, None]
    xn, vn = np.asarray(x_t, np.float64), np.asarray(v, np.float64)
    dfdt = (vn + MU * np.sin(tb)) * np.asarray(k(tb)) + (xn - MU * np.cos(tb)) * k_prime(tb)
    np.testing.assert_allclose(f_minus, big_f_star(x_t, t), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g, np.cos(tb) * dfdt, rtol=2e-3, atol=2e-4)
    teacher = scm.teacher_velocity(exact_denoiser, x_t, t, sigma_data=SD)
    _, g_ode = tangent(x_t, t, teacher)
    assert float(jnp.max(jnp.abs(g_ode))) < 2e-4, float(jnp.max(jnp.abs(g_ode)))
    _, g0 = tangent(x_t, t, v, warmup=0.0)
    np.testing.assert_allclose(g0, -np.cos(tb) ** 2 * (SD * np.asarray(f_minus) - vn),
                               rtol=1e-5, atol=1e-6)


def test_transposed_vjp_runs_through_custom_vjp_networks():
    """The library's MLP adds its biases by a custom-VJP op, which `jax.jvp` refuses; the
    transposed VJP gives the same J v as the full Jacobian by reverse mode."""
    net = MLPDenoiser(hidden=8, depth=1)
    params = net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]

    def fn(x, t):
        return net.apply({"params": params}, x, t)

    x, t = jax.random.normal(jax.random.key(1), (3, 2)), jnp.array([0.2, 0.7, 1.3])
    dx, dt = jax.random.normal(jax.random.key(2), (3, 2)), jnp.array([1.0, -0.5, 2.0])
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(fn, (x, t), (dx, dt))
    out, jv = jax.jit(scm.transposed_vjp, static_argnums=0)(fn, (x, t), (dx, dt))
    jx, jt = jax.jit(jax.jacrev(fn, argnums=(0, 1)))(x, t)
    want = jnp.einsum("bdce,ce->bd", jx, dx) + jnp.einsum("bdc,c->bd", jt, dt)
    np.testing.assert_allclose(out, fn(x, t), rtol=1e-6)
    np.testing.assert_allclose(jv, want, rtol=1e-4, atol=1e-5)


def test_tangent_normalisation_and_warmup():
    g = jnp.array([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4]])
    n = scm.normalise_tangent(g, 0.1)
    np.testing.assert_allclose(jnp.linalg.norm(n, axis=1), [5 / 5.1, 0.0, 0.5 / 0.6], rtol=1e-6)
    np.testing.assert_allclose([scm.tangent_warmup(s, 100) for s in (0, 50, 100, 400)],
                               [0.0, 0.5, 1.0, 1.0])
    assert float(scm.tangent_warmup(0, 0)) == 1.0


# --- The loss ----------------------------------------------------------------------------------


def _scm_losses(net, x0, z, t, x_t, velocity, w):
    f_minus, g = scm.consistency_tangent(net, x_t, t, velocity, sigma_data=SD)
    g = scm.normalise_tangent(g, 0.1)
    return scm.scm_loss(net(x_t, t), f_minus, g, w, t, sigma_data=SD, prior_weighting=True)


def test_scd_loss_is_zero_at_the_exact_solution_and_positive_away():
    """With the exact teacher the sCD loss (w = 0) of F* is ~0 (its tangent vanishes) and that
    of F* + 0.2 x_t is O(1) larger."""
    x0, z, t, x_t = draws(256)
    teacher = scm.teacher_velocity(exact_denoiser, x_t, t, sigma_data=SD)
    w = jnp.zeros_like(t)
    exact = _scm_losses(big_f_star, x0, z, t, x_t, teacher, w)
    wrong = _scm_losses(lambda x, t: big_f_star(x, t) + 0.2 * x, x0, z, t, x_t, teacher, w)
    assert float(jnp.max(exact)) < 1e-6, float(jnp.max(exact))
    assert float(jnp.min(wrong)) > 0 and float(jnp.mean(wrong)) > 1e-3, float(jnp.mean(wrong))


def test_sct_gradient_vanishes_in_expectation_at_the_exact_solution():
    """sCT's per-sample tangent is not 0 at F* (the data's velocity is not the ODE's), but its
    mean given x_t is, so the objective's gradient in a direction h, E[-g . h], is 0 at F* (within
    Monte Carlo error, raw tangent: normalisation is not linear) and restoring away from it."""
    x0, z, t, x_t = draws(40_000, seed=3)
    v = scm.data_velocity(x0, z, t)
    h = jnp.tanh(x_t) * jnp.cos(t)[:, None]

    @jax.jit
    def moments(theta):
        _, g = scm.consistency_tangent(lambda x, t: big_f_star(x, t) + theta * jnp.tanh(x)
                                       * jnp.cos(t)[:, None], x_t, t, v, sigma_data=SD)
        per = -jnp.sum(g * h, axis=1)
        return jnp.mean(per), jnp.std(per) / math.sqrt(len(per))

    def gradient(theta):
        return tuple(float(m) for m in moments(jnp.float32(theta)))

    at, err = gradient(0.0)
    above, _ = gradient(0.3)
    below, _ = gradient(-0.3)
    assert abs(at) < 3 * err, (at, err)
    assert above > 10 * err and below < -10 * err, (above, below, err)


def test_adaptive_weighting_minimiser_is_minus_log_of_the_weighted_error():
    """d/dw (e^w m - w) = 0 at w = -log m: w(t) learns the log of the loss's scale."""
    m = jnp.array([0.01, 1.0, 30.0])
    w = -jnp.log(m)
    grad = jax.grad(lambda w: jnp.sum(jnp.exp(w) * m - w))(w)
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)


# --- Sampling ----------------------------------------------------------------------------------


def oracle_network(params, x_in, c, y=None):
    """F* of the consistency parameterisation as a network of (x_t / sigma_d, c_noise = t)."""
    del params, y
    return big_f_star(SD * x_in, c)


def test_one_and_two_step_samples_of_the_exact_f_are_the_data():
    """method="consistency" on a TrigFlow model: one step from sigma = 80 (t_max) is f*(sin(t_max)
    z) exactly; one and two steps (sCM's intermediate t = 1.1) both have the data's mean and
    std (4000 samples: standard errors 0.006 and 1.1%)."""
    kw = dict(model=oracle_network, schedule=PROCESS, shape=(2,),
              model_output_type="trigflow_consistency", sigma_data=SD, clip_denoised=False)
    z = jax.random.normal(jax.random.key(5), (16, 2))
    one = jaxdiff.sample(None, jax.random.key(0), "consistency", x_T=z, num_samples=16, **kw)
    t_max = math.atan(80.0 / SD)
    np.testing.assert_allclose(one, MU + (80.0 * z - MU) * math.cos(t_max) * float(k(t_max)),
                               rtol=1e-4, atol=1e-4)
    for steps in (1, 2):
        x = np.asarray(jaxdiff.sample(None, jax.random.key(1), "consistency", num_samples=4000,
                                      sigmas=scm.sampling_sigmas(steps, SD), **kw))
        np.testing.assert_allclose(x.mean(0), MU, atol=0.025)
        np.testing.assert_allclose(x.std(0), S, rtol=0.05)
    assert scm.sampling_sigmas(2, SD) == (80.0, SD * math.tan(1.1))
    with pytest.raises(ValueError, match="num_steps=3"):
        scm.sampling_sigmas(3, SD)


# --- Configs -----------------------------------------------------------------------------------


def _scm_config(method):
    config = default_config()
    config.data.dataset = "toy2d"
    config.data.channels = 2
    config.model.name = "mlp"
    config.consistency.method = method
    return config


@pytest.mark.parametrize("method", ["sct", "scd"])
def test_scm_refuses_other_processes_and_outputs_naming_them(method):
    config = _scm_config(method)
    with pytest.raises(ValueError) as e:
        validate(config, num_devices=1)
    text = str(e.value)
    assert f"config.diffusion.process = 'ddpm': consistency.method {method!r} trains on the " \
           "'trigflow' process" in text
    assert "config.diffusion.model_output = 'eps'" in text
    assert ("config.distill.teacher = None" in text) == (method == "scd")
    config.diffusion.process, config.diffusion.model_output = "trigflow", "trigflow_consistency"
    config.consistency.tangent_norm_c = 0.0
    with pytest.raises(ValueError, match=r"consistency.tangent_norm_c = 0.0: must be a number"):
        validate(config, num_devices=1)


def test_trigflow_process_is_built_from_the_config():
    config = _scm_config("sct")
    config.diffusion.process = "trigflow"
    config.diffusion.sigma_data, config.diffusion.p_mean, config.diffusion.p_std = 0.75, -1.0, 1.4
    assert make_process(config.diffusion) == TrigFlowProcess(sigma_data=0.75, p_mean=-1.0,
                                                             p_std=1.4)



# --- Training (slow) ---------------------------------------------------------------------------

SCM = {"diffusion.process": "trigflow", "diffusion.model_output": "trigflow_consistency",
       "diffusion.sigma_data": SD, "consistency.tangent_warmup_steps": 10,
       "sampling.method": "consistency", "sampling.num_steps": 2,
       "sampling.sigmas": scm.sampling_sigmas(2, SD), "sampling.num_samples": 64}


def tiny_scm(method, **overrides):
    from tests.test_train import tiny_toy

    return tiny_toy(**{**SCM, "consistency.method": method, "training.sample_every": 10,
                       **overrides})


@pytest.fixture(scope="module")
def trigflow_teacher(tmp_path_factory):
    """A toy2d TrigFlow diffusion model (tiny_toy's 20 steps) to distil."""
    from tests.test_train import tiny_toy

    workdir = str(tmp_path_factory.mktemp("teacher") / "trigflow")
    train.train_and_evaluate(tiny_toy(**{"diffusion.process": "trigflow",
                                         "diffusion.model_output": "trigflow",
                                         "diffusion.sigma_data": SD}), workdir)
    return workdir


@pytest.mark.slow  # 20 sCT / sCD steps of the toy MLP each: 10-30 s
@pytest.mark.parametrize("method", ["sct", "scd"])
def test_scm_trains_end_to_end(tmp_path, method, trigflow_teacher):
    """Trains with the adaptive weighting beside the network (params['objective']), loads the
    network alone, and one step samples f(sin(t_max) sigma_d z, t_max) of the loaded network; sCD
    starts from the teacher's network and a fresh w_phi."""
    overrides = {"distill.teacher": trigflow_teacher} if method == "scd" else {}
    workdir = str(tmp_path / method)
    state = train.train_and_evaluate(tiny_scm(method, **overrides), workdir)
    assert int(state.step) == 20 and state.target_params is None
    assert set(state.params) - set(objectives.network_params(state.params)) == {objectives.OWN}
    assert os.path.exists(os.path.join(workdir, "samples", "step_0000020.png"))
    model = jaxdiff.load(workdir)
    assert objectives.OWN not in model.params
    assert model.model_output_type == "trigflow_consistency"
    z = jax.random.normal(jax.random.key(3), (8, 2))
    one = jaxdiff.sample(model, jax.random.key(0), "consistency", x_T=z, clip_denoised=False)
    t_max = jnp.full((8,), math.atan(80.0 / SD))
    x_t = math.sin(t_max[0]) * SD * z
    big_f = model.model.apply({"params": model.params}, x_t / SD, t_max)
    np.testing.assert_allclose(one, jnp.cos(t_max[0]) * x_t - jnp.sin(t_max[0]) * SD * big_f,
                               rtol=1e-4, atol=1e-4)


def _steps(config, devices, state, batches, frozen):
    fns = train.train_functions(config, devices)
    n = len(devices)
    shard = lambda x: np.swapaxes(x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:]), 0, 1)  # noqa: E731
    new, metrics = fns.p_train_steps(sharding.shard_state(sharding.to_host(state), fns.shardings),
                                     jax.tree.map(shard, batches), jax.random.key(7),
                                     sharding.replicated(frozen, fns.mesh))
    return sharding.to_host(new), np.asarray(metrics["loss"])


@pytest.mark.slow  # compiles an sCT / sCD step for 1 and 2 devices: 20-40 s each
@pytest.mark.parametrize("method", ["sct", "scd"])
def test_two_devices_match_one(method, trigflow_teacher):
    """The same global batch on 2 devices and on 1: the same loss (1e-5) and weights (1e-4), the
    adaptive weighting's included (per-example t and z, the teacher a replicated argument). Adam's
    first steps move a weight by ~lr whatever its gradient's size, so the summation order's
    roundoff in a near-zero gradient shows in the weights: measured 2.2e-5 on 1 of 1024 (sCT)."""
    from tests.test_train import _leaves_close

    overrides = {"optim.warmup_steps": 0, "training.steps_per_call": 2}
    if method == "scd":
        overrides["distill.teacher"] = trigflow_teacher
    config = tiny_scm(method, **overrides)
    dataset = create_dataset(config)
    batches = {"x": np.stack([dataset.batch(i)["x"].reshape(-1, 2) for i in (0, 1)])}
    state = train.train_functions(config).init_state(jax.random.key(0))
    frozen = train.frozen_weights(config)
    one, loss1 = _steps(config, jax.devices()[:1], state, batches, frozen)
    two, loss2 = _steps(config, jax.devices()[:2], state, batches, frozen)
    np.testing.assert_allclose(loss1, loss2, atol=1e-5, rtol=0)
    _leaves_close(one.params, two.params, atol=1e-4)
    moved = float(np.max(np.abs(one.params[objectives.OWN]["Dense_1"]["kernel"])))
    assert moved > 1e-4  # w_phi trained (its last layer starts at zero)


@pytest.mark.slow  # three sCT runs of the toy MLP: about 15 s
def test_sct_resume_continues_exactly(tmp_path):
    """20 steps in one go == 10, stop, 10 more (1e-6): the tangent warm-up reads the restored
    step and w_phi's weights and moments are restored with the network's."""
    from tests.test_train import _leaves_close

    straight = train.train_and_evaluate(tiny_scm("sct"), str(tmp_path / "straight"))
    half = str(tmp_path / "half")
    train.train_and_evaluate(tiny_scm("sct", **{"training.num_steps": 10}), half)
    resumed = train.train_and_evaluate(tiny_scm("sct"), half)
    for field in ("params", "ema_params", "opt_state"):
        _leaves_close(getattr(straight, field), getattr(resumed, field), atol=1e-6)


@pytest.fixture(scope="module")
def digits_trigflow_teacher(tmp_path_factory):
    """digits_trigflow.py trained in full (1200 steps, about 5 minutes on 2 quiet cores)."""
    workdir = str(tmp_path_factory.mktemp("digits") / "digits_trigflow")
    train.train_and_evaluate(digits_trigflow.get_config(), workdir)
    return workdir


def digits_scores(model, sigmas, cache_dir):
    """(label accuracy, digits FID) of 50 samples per class by `method="consistency"`."""
    classifier = digits_scorer.load_classifier(cache_dir)
    labels = jnp.repeat(jnp.arange(10), 50)
    x = jaxdiff.sample(model, jax.random.key(0), "consistency", num_samples=len(labels),
                       labels=labels, sigmas=sigmas)
    accuracy = float(np.mean(digits_scorer.predict(classifier, x) == np.asarray(labels)))
    return accuracy, digits_scorer.fid(classifier, x)


@pytest.mark.slow  # the TrigFlow teacher (1200 steps) and 800 sCD steps: 10-25 minutes
def test_scd_distils_the_digits_teacher_into_one_and_two_steps(tmp_path,
                                                               digits_trigflow_teacher):
    """digits_scd.py from digits_trigflow.py, as the command line runs it. Measured (seed 0):
    one step 0.964 accuracy / digits FID 2.02, two steps (t = 1.1) 0.958 / 1.99 (the command
    line, one device); 0.956 / 2.15 and 0.952 / 1.98 here (two devices, 15 min); the teacher's
    own single denoising step from t_max is 0.998 / 12.3 (blurred class means: recognised, far
    from the data), its Heun-18 (35 calls) 0.956 / 0.83. The thresholds: recognisable digits, and
    one step far closer to the data than the teacher's."""
    config = digits_scd.get_config()
    config.distill.teacher = digits_trigflow_teacher
    train.train_and_evaluate(config, str(tmp_path / "scd"))
    model = jaxdiff.load(str(tmp_path / "scd"))
    cache = str(tmp_path / "cache")
    for steps in (1, 2):
        accuracy, fid = digits_scores(model, scm.sampling_sigmas(steps, model.sigma_data), cache)
        print(f"sCD digits, {steps} step(s): accuracy {accuracy:.3f}, digits FID {fid:.2f}")
        assert accuracy > 0.85 and fid < 4.0, (steps, accuracy, fid)


@pytest.mark.slow  # 1600 sCT steps of the digits U-Net: 7-20 minutes
def test_sct_trains_one_and_two_step_digits_without_a_teacher(tmp_path):
    """digits_sct.py as it is. Measured (seed 0): one step 0.962 accuracy / digits FID 1.59, two
    steps 0.964 / 1.56 (the command line, one device); 0.956 / 1.50 and 0.966 / 1.52 here (two
    devices, 7 min on 2 lightly shared cores)."""
    train.train_and_evaluate(digits_sct.get_config(), str(tmp_path / "sct"))
    model = jaxdiff.load(str(tmp_path / "sct"))
    for steps in (1, 2):
        accuracy, fid = digits_scores(model, scm.sampling_sigmas(steps, model.sigma_data),
                                      str(tmp_path / "cache"))
        print(f"sCT digits, {steps} step(s): accuracy {accuracy:.3f}, digits FID {fid:.2f}")
        assert accuracy > 0.85 and fid < 4.0, (steps, accuracy, fid)


@pytest.mark.slow  # three sCT runs of the toy MLP: about 15 s
def test_sct_stopped_by_sigint_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    """Ctrl-C at step 7 saves at the next call boundary and stops; the rerun's 20 steps equal
    an uninterrupted run's (1e-6), w_phi's weights included."""
    import signal

    from tests.test_train import _hook_data, _leaves_close

    def send_sigint(batch):
        os.kill(os.getpid(), signal.SIGINT)
        return batch

    straight = train.train_and_evaluate(tiny_scm("sct"), str(tmp_path / "straight"))
    with monkeypatch.context() as patch:
        _hook_data(patch, at=7, hook=send_sigint)
        stopped = train.train_and_evaluate(tiny_scm("sct"), str(tmp_path / "w"))
    assert int(stopped.step) in (5, 10)  # the call boundary after the signal
    assert f"stopped at step {int(stopped.step)};" in capsys.readouterr().out
    resumed = train.train_and_evaluate(tiny_scm("sct"), str(tmp_path / "w"))
    assert int(resumed.step) == 20
    _leaves_close(straight.params, resumed.params, atol=1e-6)
    _leaves_close(straight.params[objectives.OWN], resumed.params[objectives.OWN], atol=1e-6)


@pytest.mark.slow  # four sCD runs of the toy MLP (and the toy teacher): about 20 s
def test_scd_resumes_and_sigint_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys,
                                                             trigflow_teacher):
    """sCD from the toy TrigFlow teacher: 20 steps straight equal 10, stop, 10 more, and equal a
    run that Ctrl-C stopped at a call boundary and a rerun finished (1e-6), w_phi's included."""
    import signal

    from tests.test_train import _hook_data, _leaves_close

    def config(**overrides):
        return tiny_scm("scd", **{"distill.teacher": trigflow_teacher, **overrides})

    def send_sigint(batch):
        os.kill(os.getpid(), signal.SIGINT)
        return batch

    straight = train.train_and_evaluate(config(), str(tmp_path / "straight"))
    half = str(tmp_path / "half")
    train.train_and_evaluate(config(**{"training.num_steps": 10}), half)
    resumed = train.train_and_evaluate(config(), half)
    for field in ("params", "ema_params", "opt_state"):
        _leaves_close(getattr(straight, field), getattr(resumed, field), atol=1e-6)
    with monkeypatch.context() as patch:
        _hook_data(patch, at=7, hook=send_sigint)
        stopped = train.train_and_evaluate(config(), str(tmp_path / "w"))
    assert int(stopped.step) in (5, 10)  # the call boundary after the signal
    assert f"stopped at step {int(stopped.step)};" in capsys.readouterr().out
    resumed = train.train_and_evaluate(config(), str(tmp_path / "w"))
    assert int(resumed.step) == 20
    _leaves_close(straight.params, resumed.params, atol=1e-6)
    _leaves_close(straight.params[objectives.OWN], resumed.params[objectives.OWN], atol=1e-6)
