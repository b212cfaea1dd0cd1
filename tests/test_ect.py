"""Easy Consistency Tuning (jaxdiff.ect) against hand values and closed forms: the mapping
r(t) and its stages, the weighting and the adaptive pseudo-Huber distance, and the loss at the
exact consistency function of Gaussian data (through its linear probability-flow ODE); and, in
the slow tier, ECT of a trained digits EDM model."""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from experiments import digits_ect
from jaxdiff import config as config_lib
from jaxdiff import ect, train
from jaxdiff.consistency import SIGMA_MIN
from tests import test_progressive
from tests.test_train import _leaves_close, digits_accuracy, tiny_toy, with_overrides

# The fixtures, each trained once per run.
digits_edm_teacher = test_progressive.digits_edm_teacher
toy_edm_teacher = test_progressive.toy_edm_teacher


def tiny_ect(teacher, **overrides):
    return tiny_toy(**{**test_progressive.EDM_TOY, "diffusion.model_output": "consistency",
                       "consistency.method": "ect", "distill.teacher": teacher,
                       "ect.stage_steps": 5, "optim.warmup_steps": 0,
                       "sampling.method": "consistency", "sampling.num_steps": 2,
                       "sampling.sigmas": (80.0, 0.8), **overrides})


@pytest.mark.slow  # compiles an ECT step for 1 and for 2 devices: 20-90 s
def test_ect_two_devices_match_one(toy_edm_teacher):
    test_progressive.two_devices_match_one(tiny_ect(toy_edm_teacher, **{
        "training.steps_per_call": 2}))


@pytest.mark.slow  # three toy ECT runs: 20-50 s
def test_ect_resumes_to_the_same_weights(tmp_path, toy_edm_teacher):
    """20 steps straight equal 10 then 10 (the stage of dt is the step's), from the teacher's
    weights; the result samples as a consistency model."""
    straight = train.train_and_evaluate(tiny_ect(toy_edm_teacher), str(tmp_path / "straight"))
    half = str(tmp_path / "half")
    train.train_and_evaluate(tiny_ect(toy_edm_teacher, **{"training.num_steps": 10}), half)
    resumed = train.train_and_evaluate(tiny_ect(toy_edm_teacher), half)
    assert int(resumed.step) == int(straight.step) == 20
    for field in ("params", "ema_params", "opt_state"):
        _leaves_close(getattr(straight, field), getattr(resumed, field), atol=1e-6)
    model = jaxdiff.load(half)
    assert model.model_output_type == "consistency"
    x = jaxdiff.sample(model, jax.random.PRNGKey(0), "consistency", num_samples=8)
    assert x.shape == (8, 2) and np.isfinite(np.asarray(x)).all()

@pytest.mark.slow  # three toy ECT runs: 20-50 s
def test_ect_stopped_by_sigint_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys,
                                                           toy_edm_teacher):
    """Ctrl-C at step 7 saves at the next call boundary and stops; the rerun's 20
    steps equal an uninterrupted run's (1e-6)."""
    import os
    import signal

    from tests.test_train import _hook_data

    def send_sigint(batch):
        os.kill(os.getpid(), signal.SIGINT)
        return batch

    straight = train.train_and_evaluate(tiny_ect(toy_edm_teacher), str(tmp_path / "straight"))
    with monkeypatch.context() as patch:
        _hook_data(patch, at=7, hook=send_sigint)
        stopped = train.train_and_evaluate(tiny_ect(toy_edm_teacher), str(tmp_path / "w"))
    assert int(stopped.step) in (5, 10)  # the call boundary after the signal
    assert f"stopped at step {int(stopped.step)};" in capsys.readouterr().out
    resumed = train.train_and_evaluate(tiny_ect(toy_edm_teacher), str(tmp_path / "w"))
    assert int(resumed.step) == 20
    for field in ("params", "ema_params", "opt_state"):
        _leaves_close(getattr(straight, field), getattr(resumed, field), atol=1e-6)


Q, K, B = 2.0, 8.0, 1.0


def test_mapping_at_hand_values():
    """r = t (1 - q^-(s+1) (1 + k sigmoid(-b t))), clamped at 0 (ECT Eq. 12, the code's
    `t_to_r_sigmoid`), and r = t (1 - q^-(s+1)) for 'const'."""
    t = jnp.array([0.5, 2.0, 10.0])
    r0 = ect.ect_r(t, 0, q=Q, k=K, b=B)
    # t = 2: sigmoid(-2) = 0.1192029, n = 1.9536234, r = 2 (1 - 0.9768117) = 0.0463766.
    # t = 0.5: n = 4.0203253 > 2, so r clamps to 0; t = 10: n = 1.0003632, r = 4.9981840.
    np.testing.assert_allclose(r0, [0.0, 0.0463766, 4.9981840], atol=2e-6)
    r3 = ect.ect_r(t, 3, q=Q, k=K, b=B)  # q^-4 = 1/16
    expected = [x * (1 - (1 + K / (1 + math.exp(B * x))) / 16) for x in (0.5, 2.0, 10.0)]
    np.testing.assert_allclose(r3, expected, rtol=1e-6)
    np.testing.assert_allclose(ect.ect_r(t, 2, q=Q, mapping="const"), t * 7 / 8, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown ECT mapping 'linear'"):
        ect.ect_r(t, 0, mapping="linear")


def test_r_tends_to_t_as_the_stages_advance():
    """0 <= r < t, and (t - r) / t <= q^-(s+1) (1 + k/2) -> 0 (the consistency condition's
    dt -> 0)."""
    t = jnp.exp(jnp.linspace(math.log(SIGMA_MIN), math.log(80.0), 200))
    gaps = []
    for stage in range(12):
        r = ect.ect_r(t, stage, q=Q, k=K, b=B)
        assert bool(jnp.all((r >= 0) & (r < t)))
        gap = float(jnp.max((t - r) / t))
        assert gap <= min(1.0, Q ** -(stage + 1) * (1 + K / 2)) + 1e-6
        gaps.append(gap)
    assert gaps[-1] < 3e-3 and all(a >= b for a, b in zip(gaps, gaps[1:], strict=False))


def test_stage_counts_stage_steps():
    np.testing.assert_array_equal(ect.ect_stage(jnp.array([0, 99, 100, 250]), stage_steps=100),
                                  [0, 0, 1, 2])


def test_weighting_and_adaptive_pseudo_huber_are_their_definitions():
    t, r = jnp.array([1.0, 3.0]), jnp.array([0.5, 2.75])
    np.testing.assert_allclose(ect.ect_weight(t, r), [2.0, 4.0])
    x = jnp.array([[3.0, 4.0], [1.0, 1.0]])
    y = jnp.array([[0.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(ect.adaptive_pseudo_huber(x, y, c=0.0), [5.0, 0.0])
    np.testing.assert_allclose(ect.adaptive_pseudo_huber(x, y, c=1.0),
                               [math.sqrt(26.0) - 1.0, 0.0], rtol=1e-6)
    grad = jax.grad(lambda v: ect.adaptive_pseudo_huber(v, y, c=0.0).sum())(x)
    np.testing.assert_allclose(grad, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)  # finite at x = y


MU, S = 0.3, 1.5


def f_star(s):
    """The exact consistency function of N(MU, s^2 I): the PF-ODE keeps (x - MU) /
    sqrt(s^2 + sigma^2) fixed, so f*(x, sigma) = MU + (x - MU) sqrt((s^2 + sigma_min^2) / (s^2 +
    sigma^2)) (CM Eq. 3 with D(x, sigma) = (s^2 x + sigma^2 MU) / (s^2 + sigma^2))."""
    def f(params, x, sigma):
        del params
        g = jnp.sqrt((s**2 + SIGMA_MIN**2) / (s**2 + sigma**2))
        return MU + (x - MU) * g.reshape((-1,) + (1,) * (x.ndim - 1))
    return f


def _loss(student, x0, stage, rng=None):
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return jax.jit(lambda x, key: ect.ect_loss(student, None, x, key, stage=stage, q=Q, k=K, b=B,
                                               sigma_min=SIGMA_MIN, sigma_max=80.0))(x0, rng)


@pytest.mark.parametrize("stage", [0, 7])
def test_loss_is_zero_at_the_exact_consistency_function_of_a_point(stage):
    """Data N(MU, 0): x0 + sigma n is the ODE's trajectory, f* is constant on it, the loss is 0
    (r = 0 included: the boundary target x0 + sigma_min n); positive for a wrong f."""
    with jax.enable_x64(True):  # w = 1 / (t - r) magnifies float32's rounding at late stages
        x0 = jnp.full((256, 4), MU, jnp.float64)
        loss, t, r = _loss(f_star(0.0), x0, stage)
        assert float(jnp.min(t - r)) > 0 and bool(jnp.any(r <= SIGMA_MIN))
        np.testing.assert_allclose(loss, 0.0, atol=1e-9)
        wrong = _loss(f_star(1.0), x0, stage)[0]  # N(MU, 1)'s f*
    # Zero only at t = sigma_min, where every f meets the identity (t is clipped there).
    assert float(jnp.min(jnp.where(t > SIGMA_MIN, wrong, 1.0))) > 1e-6


def test_loss_of_the_exact_gaussian_f_tends_to_its_derivative_along_the_noise():
    """Data N(MU, S^2): f* is not constant along x0 + sigma n, and the weighted loss tends, as dt
    -> 0, to ||d/dsigma f*(x0 + sigma n, sigma)|| = ||g'(t) (x0 + t n - MU) + g(t) n||, with
    g(sigma) = sqrt((S^2 + sigma_min^2) / (S^2 + sigma^2)): each example against that closed form
    (the noise is the one ect_loss draws from the key's second half)."""
    rng = jax.random.PRNGKey(1)
    with jax.enable_x64(True):
        x0 = MU + S * jax.random.normal(jax.random.PRNGKey(2), (64, 3), jnp.float64)
        loss, t, r = _loss(f_star(S), x0, 20, rng)
        n = jax.random.normal(jax.random.split(rng)[1], x0.shape, jnp.float64)
        g = jnp.sqrt((S**2 + SIGMA_MIN**2) / (S**2 + t**2))
        dg = -t * g / (S**2 + t**2)
        limit = jnp.linalg.norm(dg[:, None] * (x0 + t[:, None] * n - MU) + g[:, None] * n,
                                axis=-1)
        live = r > SIGMA_MIN
        np.testing.assert_allclose(loss[live], limit[live], rtol=1e-3)
        assert float(jnp.min(limit)) > 0


def test_config_refusals_name_the_field():
    base = with_overrides(digits_ect.get_config(), {"distill.teacher": None})
    for path, value, says in (
            ("ect.q", 1.0, "config.ect.q = 1.0: must be a number in (1.0, inf)"),
            ("ect.mapping", "linear", "config.ect.mapping = 'linear': must be one of"),
            ("ect.huber_c", -0.1, "config.ect.huber_c = -0.1: must be a number in [0.0, inf)"),
            ("consistency.distance", "l1", "ECT measures its own adaptive pseudo-Huber"),
            ("distill.init_from_teacher", False, "starts the student from the teacher's")):
        config = with_overrides(digits_ect.get_config(), {path: value})
        with pytest.raises(ValueError, match=None) as e:
            config_lib.validate(config)
        assert says in str(e.value), (path, str(e.value))
    with pytest.raises(ValueError) as e:
        config_lib.validate(base)
    assert "consistency.method 'ect' needs the workdir of a trained model" in str(e.value)


@pytest.mark.slow  # ECT of the digits EDM teacher (digits_edm_teacher): about 4 minutes
def test_ect_of_a_digits_edm_model_draws_recognisable_digits(tmp_path, digits_edm_teacher):
    """digits_ect.py from the trained digits_edm.py model: one- and two-step (80, 0.821)
    samples the sklearn classifier recognises as their label."""
    start = time.perf_counter()
    config = with_overrides(digits_ect.get_config(), {"distill.teacher": digits_edm_teacher,
                                                      "training.sample_every": 0})
    train.train_and_evaluate(config, str(tmp_path / "ect"))
    seconds = time.perf_counter() - start
    model = jaxdiff.load(str(tmp_path / "ect"))
    one = digits_accuracy(model, jax.random.PRNGKey(0), 0.0, method="consistency")
    two = digits_accuracy(model, jax.random.PRNGKey(0), 0.0, method="consistency",
                          sigmas=(80.0, 0.821))
    print(f"digits ECT ({config.training.num_steps} steps, {seconds:.0f} s): one-step accuracy "
          f"{one:.2f}, two-step {two:.2f}")
    assert one > ECT_ONE_STEP_THRESHOLD
    assert two > ECT_TWO_STEP_THRESHOLD


# Measured (digits_ect.py's 800 steps from digits_edm.py's 1200, seed 0; 1000 samples): 0.957
# one-step (digits FID 1.03), 0.963 two-step (0.79); chance is 0.10.
ECT_ONE_STEP_THRESHOLD = 0.85
ECT_TWO_STEP_THRESHOLD = 0.85


# --- Parity with a port of the official code: locuslab/ect training/loss.py, class ECMLoss ------

def _official_t_to_r(t, stage, q=2.0, k=8.0, b=1.0, adj="sigmoid"):
    """ECMLoss.t_to_r_sigmoid / t_to_r_const in numpy (torch.sigmoid -> 1 / (1 + exp(-x)))."""
    adjust = 1 + k / (1 + np.exp(b * t)) if adj == "sigmoid" else 1.0
    decay = 1 / q ** (stage + 1)
    return np.clip(t * (1 - decay * adjust), 0, None)


def _official_loss_tail(d_yt, d_yr, t, r, c):
    """ECMLoss.__call__ after the two network calls: the L2, the pseudo-Huber, / (t - r)."""
    loss = np.sum(((d_yt - d_yr) ** 2).reshape(d_yt.shape[0], -1), axis=-1)
    loss = np.sqrt(loss + c**2) - c if c > 0 else np.sqrt(loss)
    return loss / (t - r)


@pytest.mark.parametrize("adj", ["sigmoid", "const"])
def test_mapping_matches_the_official_t_to_r(adj):
    t = np.geomspace(0.002, 80.0, 101)  # float32 against float64: 1e-6 where r cancels to ~0
    for stage in (0, 1, 3, 9):
        np.testing.assert_allclose(np.asarray(ect.ect_r(jnp.asarray(t), stage, mapping=adj)),
                                   _official_t_to_r(t, stage, adj=adj), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("c", [0.0, 0.03])
def test_loss_matches_the_official_ecmloss(c):
    """The same t, r, noise and network as ECMLoss (stage 3: every r > 0, so both take the
    network's D(y + r eps, r) as the target)."""
    def net(w, x, sigma):
        return w * x / (1.0 + sigma[:, None]) + jnp.tanh(x)

    x0 = jax.random.normal(jax.random.PRNGKey(1), (64, 3))
    rng = jax.random.PRNGKey(2)
    got, t, r = ect.ect_loss(net, 0.7, x0, rng, stage=3, huber_c=c, p_mean=-0.2, p_std=0.8,
                             sigma_min=SIGMA_MIN, sigma_max=80.0)
    n = jax.random.normal(jax.random.split(rng)[1], x0.shape)  # ect_loss's draw of eps
    t, r = np.asarray(t), np.asarray(r)
    assert r.min() > SIGMA_MIN
    np.testing.assert_allclose(r, _official_t_to_r(t, 3), rtol=2e-6)
    d_yt = np.asarray(net(0.7, x0 + t[:, None] * n, jnp.asarray(t)))
    d_yr = np.asarray(net(0.7, x0 + r[:, None] * n, jnp.asarray(r)))
    np.testing.assert_allclose(np.asarray(got), _official_loss_tail(d_yt, d_yr, t, r, c),
                               rtol=1e-5)


def test_the_teacher_is_a_diffusion_model_of_the_students_process_and_input():
    """ECT starts from a diffusion model that feeds its network what the consistency model does
    (the 'consistency' parameterisation's `denoiser`, 'edm', on the student's process)."""
    from experiments import digits, digits_edm
    from jaxdiff.objectives import _ect_teacher_problem

    student = digits_ect.get_config()
    assert _ect_teacher_problem(digits_edm.get_config(), student) is None
    assert ("model_output 'edm'), the teacher is 'ddpm' with output 'eps'"
            in _ect_teacher_problem(digits.get_config(), student))
