"""Progressive distillation (jaxdiff.progressive) against closed forms: its nested cosine grid,
the target of an exact Gaussian teacher (one student DDIM step equals the teacher's two), the
loss at the exact student, the weightings, the v reading of EDM's output, the rounds and their
checks; and, in the slow tier, 8 -> 4 -> 2 rounds from a trained digits EDM model."""

import fcntl
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from experiments import digits_edm, digits_pd
from jaxdiff import checkpoint, digits_scorer, samplers, sharding, train
from jaxdiff import config as config_lib
from jaxdiff import progressive as pd
from jaxdiff.parameterisations import PARAMETERISATIONS
from jaxdiff.processes import VEProcess
from tests.test_train import _leaves_close, digits_accuracy, tiny_toy, with_overrides

MU, S = 0.4, 1.3
LEVELS = dict(sigma_min=0.002, sigma_max=80.0)


def gaussian_denoise(x, sigma):
    """E[x0 | x] of N(MU, S^2 I) data at x = x0 + sigma n."""
    a = (S**2 / (S**2 + sigma**2)).reshape((-1,) + (1,) * (x.ndim - 1))
    return MU + a * (x - MU)


def test_grid_is_nested_and_is_the_cosine_schedule():
    """Every other level of 2N steps is the grid of N (Alg. 2's t - 0.5/N, t - 1/N); one step is
    sigma_max; with an unbounded range alpha = 1 / sqrt(1 + sigma^2) = cos(pi u / 2)."""
    for n in (1, 2, 4, 8):
        np.testing.assert_allclose(pd.pd_sigmas(2 * n, **LEVELS)[::2], pd.pd_sigmas(n, **LEVELS),
                                   rtol=1e-12)
    np.testing.assert_allclose(pd.pd_sigmas(1, **LEVELS), [80.0], rtol=1e-12)
    u = np.array([0.1, 0.5, 0.9])
    with jax.enable_x64(True):
        sigma = np.asarray(pd.pd_sigma(jnp.asarray(u), sigma_min=1e-12, sigma_max=1e12))
    np.testing.assert_allclose(1 / np.sqrt(1 + sigma**2), np.cos(np.pi * u / 2), rtol=1e-9)


def _vp_ddim(x0_fn, z, sigma, sigma_next):
    """DDIM Eq. 12 (eta = 0) in the variance-preserving frame z = alpha x0 + s eps, alpha^2 +
    s^2 = 1, EDM's sigma = s / alpha; x0_fn reads EDM's frame x = z / alpha."""
    alpha, alpha_next = 1 / jnp.sqrt(1 + sigma**2), 1 / jnp.sqrt(1 + sigma_next**2)
    x0 = x0_fn(z / alpha[:, None], sigma)
    eps = (z - alpha[:, None] * x0) / (alpha * sigma)[:, None]
    return alpha_next[:, None] * x0 + (alpha_next * sigma_next)[:, None] * eps


@pytest.mark.parametrize("index", [0, 1, 5, 7])
def test_one_student_step_on_the_target_is_the_teachers_two(index):
    """With the exact Gaussian teacher, DDIM from z_t with x0 = x~ lands where the teacher's two
    DDIM steps land (both in the VP frame, DDIM Eq. 12, independent of the VE-frame target)."""
    n = 8
    sigma, mid, nxt = (jnp.full((16,), v) for v in pd.pd_levels(jnp.asarray(index), num_steps=n,
                                                                  **LEVELS))
    x0 = MU + S * jax.random.normal(jax.random.PRNGKey(0), (16, 3))
    x = x0 + sigma[:, None] * jax.random.normal(jax.random.PRNGKey(1), (16, 3))
    target = pd.pd_target(gaussian_denoise, x, sigma, mid, nxt)
    z = x / jnp.sqrt(1 + sigma**2)[:, None]
    teacher_two = _vp_ddim(gaussian_denoise, _vp_ddim(gaussian_denoise, z, sigma, mid), mid, nxt)
    student_one = _vp_ddim(lambda x_, s_: target, z, sigma, nxt)
    np.testing.assert_allclose(student_one, teacher_two, atol=2e-5)


def exact_student(n):
    """The exact PD student of the Gaussian: an Euler/DDIM step of D(x, s) = MU + a (x - MU) maps
    x - MU by e(s, s') = (S^2 + s s') / (S^2 + s^2), so the target is MU + c (x - MU) with
    c = (e(s, s') e(s', s'') - s''/s) / (1 - s''/s), at the student's own levels."""
    def e(s, t):
        return (S**2 + s * t) / (S**2 + s**2)

    with jax.enable_x64(True):
        grid = np.asarray(pd.pd_sigmas(2 * n, **LEVELS) + (0.0,))
    table = {}
    for i in range(n):
        s, s_mid, s_next = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
        table[s] = (e(s, s_mid) * e(s_mid, s_next) - s_next / s) / (1 - s_next / s)
    levels, coef = jnp.asarray(list(table)), jnp.asarray(list(table.values()))

    def student(x, sigma):
        c = coef[jnp.argmin(jnp.abs(levels[None] - sigma[:, None]), axis=1)]
        return MU + c[:, None] * (x - MU)

    return student


def test_loss_is_zero_at_the_exact_student_and_positive_at_the_teacher():
    n = 4
    x0 = MU + S * jax.random.normal(jax.random.PRNGKey(0), (64, 3))
    noise = jax.random.normal(jax.random.PRNGKey(1), (64, 3))
    index = jnp.arange(64) % n
    def loss(student):
        return jax.jit(lambda *a: pd.pd_loss(student, gaussian_denoise, *a, num_steps=n,
                                             **LEVELS))(x0, noise, index)

    np.testing.assert_allclose(loss(exact_student(n)), 0.0, atol=1e-6)
    as_teacher = loss(gaussian_denoise)
    assert float(jnp.min(as_teacher)) > 1e-6


def test_weightings_are_their_definitions():
    """'snr_trunc' max(SNR, 1) (the code's max(x_mse, eps_mse)) and 'v_mse' SNR + 1, SNR =
    1 / sigma^2: an x0 error d at fixed z is an eps error d / sigma and a v error d sqrt(1 +
    1 / sigma^2) (v = alpha eps - s x0, `parameterisations` 'v')."""
    sigma = jnp.array([0.1, 1.0, 5.0])
    np.testing.assert_allclose(pd.WEIGHTINGS["snr_trunc"](sigma), [100.0, 1.0, 1.0])
    alpha, s = 1 / jnp.sqrt(1 + sigma**2), sigma / jnp.sqrt(1 + sigma**2)
    z, x0, d = 0.7, 0.2, 1e-2
    v = PARAMETERISATIONS["v"].target
    v_of = lambda x: v(x, (z - alpha * x) / s, alpha, s, 1.0)  # noqa: E731
    np.testing.assert_allclose((v_of(x0 + d) - v_of(x0)) ** 2 / d**2,
                               pd.WEIGHTINGS["v_mse"](sigma), rtol=1e-4)


def test_edm_output_is_v_of_unit_variance_data():
    """EDM's F at sigma_data = 1 is fed z = x / sqrt(1 + sigma^2) and trained towards -v."""
    sigma = jnp.array([0.3, 2.0, 40.0])
    x0, eps = jnp.array([0.5, -1.0, 0.2]), jnp.array([1.2, 0.3, -0.7])
    alpha, s = 1 / jnp.sqrt(1 + sigma**2), sigma / jnp.sqrt(1 + sigma**2)
    edm, v = PARAMETERISATIONS["edm"], PARAMETERISATIONS["v"]
    np.testing.assert_allclose(edm.target(x0, eps, 1.0, sigma, 1.0),
                               -v.target(x0, eps, alpha, s, 1.0), rtol=1e-5)
    np.testing.assert_allclose(edm.network_input(x0 + sigma * eps, 1.0, sigma, 1.0),
                               alpha * x0 + s * eps, rtol=1e-5)


def test_ddim_takes_the_grid_as_sigmas():
    grid = pd.pd_sigmas(4, **LEVELS)
    process = VEProcess()
    options = samplers.resolve_options("ddim", process, {"sigmas": grid})
    assert samplers.get("ddim").num_steps(process, options, None) == 4
    np.testing.assert_allclose(samplers.build_grid(process, "ddim", 4, options).sigma, grid)
    default = samplers.resolve_options("ddim", process, {})
    assert len(samplers.build_grid(process, "ddim", 50, default).sigma) == 50


def test_rounds_and_their_configs():
    config = with_overrides(digits_pd.get_config(), {"distill.teacher": "/t", "pd.final_steps": 2})
    assert pd.round_steps(config) == [8, 4, 2]
    rounds = pd.plan(config, "/w")
    assert [p for p, _ in rounds] == ["/w/round_1", "/w/round_2", "/w/round_3"]
    assert [c.distill.teacher for _, c in rounds] == ["/t", "/w/round_1", "/w/round_2"]
    for (_, c), n in zip(rounds, (8, 4, 2), strict=True):
        assert c.pd.num_steps == c.sampling.num_steps == n and c.sampling.method == "ddim"
        np.testing.assert_allclose(c.sampling.sigmas, pd.pd_sigmas(n, **LEVELS))


def test_teacher_lineage():
    student = with_overrides(digits_pd.get_config(), {"pd.num_steps": 4})
    edm = digits_edm.get_config()
    assert pd.teacher_problem(edm, student) is None
    assert pd.teacher_problem(with_overrides(digits_pd.get_config(), {"pd.num_steps": 8}),
                              student) is None
    assert "a round of 4 steps distils one of 8" in pd.teacher_problem(
        with_overrides(digits_pd.get_config(), {"pd.num_steps": 4}), student)
    assert "diffusion.model_output is 'eps'" in pd.teacher_problem(
        with_overrides(digits_edm.get_config(), {"diffusion.model_output": "eps"}), student)


def test_bad_settings_are_refused_before_anything_is_written(tmp_path):
    for overrides, says in (
            ({"pd.num_steps": 6, "pd.final_steps": 4},
             "config.pd.num_steps = 6: must be pd.final_steps = 4 times a power of two"),
            ({"pd.weighting": "snr"}, "config.pd.weighting = 'snr': must be one of"),
            ({"diffusion.process": "ddpm", "diffusion.model_output": "eps"},
             "progressive distillation steps between continuous levels"),
            ({"sampling.sigmas": (80.0, 1.0)}, "a PD student's DDIM levels are its grid"),
            ({}, "consistency.method 'pd' needs the workdir of a trained model"),
            ({"distill.teacher": str(tmp_path / "none")}, "the teacher workdir does not load")):
        config = with_overrides(digits_pd.get_config(), overrides)
        with pytest.raises(ValueError) as e:
            pd.run(config, str(tmp_path / "w"))
        assert says in str(e.value), (overrides, str(e.value))
        assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow  # starts `python -m jaxdiff.progressive` (imports JAX): about 5 s
def test_command_line_refuses_bad_rounds_in_one_line(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-m", "jaxdiff.progressive", "--config", "experiments/digits_pd.py",
         "--workdir", str(tmp_path / "w"), "--config.pd.num_steps=6",
         "--config.pd.final_steps=4"], cwd=root, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "jaxdiff.progressive: error: invalid config (1 problem(s)):",
        "  - config.pd.num_steps = 6: must be pd.final_steps = 4 times a power of two (each "
        "round halves it)"]
    assert not os.path.exists(tmp_path / "w")


EDM_TOY = {"diffusion.process": "edm", "diffusion.model_output": "edm",
           "diffusion.sigma_data": 1.0}


@pytest.fixture(scope="session")
def toy_edm_teacher(tmp_path_factory):
    """A toy2d EDM model (tiny_toy's 20 steps) to distil and tune."""
    workdir = str(tmp_path_factory.mktemp("toy_edm") / "teacher")
    train.train_and_evaluate(tiny_toy(**EDM_TOY), workdir)
    return workdir


def steps_on(config, devices, state, global_batch):
    """`steps_per_call` train steps of `state` on `devices` with the teacher's weights, one
    global batch per step (`tests.test_train._steps_on` with `frozen_weights`)."""
    fns = train.train_functions(config, devices)
    n = len(devices)
    batch = jax.tree.map(lambda x: np.swapaxes(x.reshape(x.shape[0], n, x.shape[1] // n,
                                                         *x.shape[2:]), 0, 1), global_batch)
    new_state, metrics = fns.p_train_steps(
        sharding.shard_state(sharding.to_host(state), fns.shardings), batch, jax.random.PRNGKey(7),
        sharding.replicated(train.frozen_weights(config), fns.mesh))
    return sharding.to_host(new_state), np.asarray(metrics["loss"])


def two_devices_match_one(config, atol=1e-5):
    """The same global batch on 2 devices and on 1 gives the same loss (1e-5) and params (atol),
    from the teacher's weights, and the steps move them."""
    from jaxdiff.data import create_dataset

    dataset = create_dataset(config)
    batches = [dataset.batch(0), dataset.batch(1)]
    global_batch = {"x": np.stack([b["x"].reshape(-1, *b["x"].shape[2:]) for b in batches])}
    state = train.train_functions(config).init_state(jax.random.PRNGKey(0))
    state = train._from_teacher(state, train.frozen_weights(config)["teacher"],
                                train.train_functions(config).tx)
    one, loss1 = steps_on(config, jax.devices()[:1], state, global_batch)
    two, loss2 = steps_on(config, jax.devices()[:2], state, global_batch)
    np.testing.assert_allclose(loss1, loss2, atol=1e-5, rtol=0)
    _leaves_close(one.params, two.params, atol=atol)
    assert float(np.min(loss1)) > 0
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(state.params),
                                strict=True))
    assert moved > 1e-5


def tiny_pd(teacher, **overrides):
    return tiny_toy(**{**EDM_TOY, "consistency.method": "pd", "distill.teacher": teacher,
                       "pd.num_steps": 2, "pd.final_steps": 1, "optim.warmup_steps": 0,
                       **overrides})


@pytest.mark.slow  # compiles a PD step for 1 and for 2 devices: 20-90 s
def test_pd_two_devices_match_one(toy_edm_teacher):
    """Params to 1e-4: Adam's first steps divide each gradient by its own size, and PD's
    weighting (up to 1 / sigma^2 = 6 here) scales the rounding of the two devices' sums (one
    weight of 1024 moved 3.5e-5 differently)."""
    two_devices_match_one(tiny_pd(toy_edm_teacher, **{"training.steps_per_call": 2}), atol=1e-4)


@pytest.mark.slow  # toy PD rounds, straight and resumed: 1-2 minutes (each round compiles)
def test_pd_rounds_end_to_end_and_resume(tmp_path, toy_edm_teacher):
    """2 -> 1 rounds on the toy teacher: each a workdir whose config samples by DDIM on its
    own grid; a run stopped after its first round resumes to the same weights."""
    config = tiny_pd(toy_edm_teacher)
    straight = pd.run(config, str(tmp_path / "straight"))
    record = json.loads((tmp_path / "straight" / pd.ROUNDS_FILE).read_text())
    assert [(r["num_steps"], r["trained_steps"]) for r in record["rounds"]] == [(2, 20), (1, 20)]
    first = with_overrides(tiny_pd(toy_edm_teacher), {"pd.final_steps": 2})
    pd.run(first, str(tmp_path / "resumed"))
    resumed = pd.run(config, str(tmp_path / "resumed"))
    for a, b in zip(straight, resumed, strict=True):
        _leaves_close(jaxdiff.load(a).params, jaxdiff.load(b).params, atol=1e-6)
        saved = config_lib.config_from_json(open(os.path.join(b, "config.json")).read())
        assert saved.sampling.method == "ddim"
        assert len(saved.sampling.sigmas) == saved.pd.num_steps == saved.sampling.num_steps
    x = jaxdiff.sample(jaxdiff.load(resumed[-1]), jax.random.PRNGKey(0), "ddim",
                       sigmas=saved.sampling.sigmas, num_samples=8)
    assert x.shape == (8, 2) and np.isfinite(np.asarray(x)).all()


@pytest.mark.slow  # toy PD rounds, straight, stopped and resumed: 1-2 minutes
def test_pd_stopped_by_sigint_ends_the_rounds_and_resumes(tmp_path, monkeypatch, capsys,
                                                          toy_edm_teacher):
    """Ctrl-C at step 7 of round 1 saves it at a call boundary and ends the run there: no round 2 is
    distilled from the half-trained round, and none is recorded. The rerun finishes round 1, then
    round 2, to the weights of an uninterrupted run (1e-6)."""
    import signal

    from tests.test_train import _hook_data

    def send_sigint(batch):
        os.kill(os.getpid(), signal.SIGINT)
        return batch

    config = tiny_pd(toy_edm_teacher)
    straight = pd.run(config, str(tmp_path / "straight"))
    workdir = tmp_path / "w"
    with monkeypatch.context() as patch:
        _hook_data(patch, at=7, hook=send_sigint)
        started = pd.run(config, str(workdir))
    assert [os.path.basename(p) for p in started] == [os.path.basename(straight[0])]
    saved = checkpoint.checkpoint_manager(started[0]).latest_step()
    assert saved in (5, 10)  # the call boundary after the signal (one call is read ahead)
    assert f"stopped at step {saved};" in capsys.readouterr().out
    assert not (workdir / pd.ROUNDS_FILE).exists()
    assert sorted(os.listdir(workdir)) == [os.path.basename(started[0])]
    resumed = pd.run(config, str(workdir))
    record = json.loads((workdir / pd.ROUNDS_FILE).read_text())
    assert [(r["num_steps"], r["trained_steps"]) for r in record["rounds"]] == [(2, 20), (1, 20)]
    for a, b in zip(straight, resumed, strict=True):
        _leaves_close(jaxdiff.load(a).params, jaxdiff.load(b).params, atol=1e-6)


@pytest.fixture(scope="session")
def digits_edm_teacher(tmp_path_factory):
    """digits_edm.py trained in full (about 5 minutes on two cores), once per test run (shared
    by xdist's workers through a file lock, as `digits_demo`)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    workdir = root / "digits_edm_teacher"
    with open(root / "digits_edm_teacher.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "digits_edm_teacher.done").exists():
            train.train_and_evaluate(digits_edm.get_config(), str(workdir))
            (root / "digits_edm_teacher.done").write_text("")
    return str(workdir)


@pytest.mark.slow  # three PD rounds of 300 steps from the digits EDM teacher: about 6 minutes
def test_progressive_rounds_halve_the_steps_of_a_digits_edm_model(tmp_path, digits_edm_teacher):
    """digits_pd.py's rounds 8 -> 4 -> 2 from the trained digits_edm.py model: each round's
    DDIM samples at its own steps are recognised by the sklearn classifier as their label, and
    the 2-step student's digits FID is well below its first teacher's own 2 DDIM steps."""
    start = time.perf_counter()
    config = with_overrides(digits_pd.get_config(), {
        "distill.teacher": digits_edm_teacher, "pd.final_steps": 2, "training.sample_every": 0})
    workdir = str(tmp_path / "pd")
    rounds = pd.run(config, workdir)
    seconds = time.perf_counter() - start
    record = json.loads(open(os.path.join(workdir, pd.ROUNDS_FILE)).read())
    assert [r["num_steps"] for r in record["rounds"]] == [8, 4, 2]
    accuracy = {}
    for path in rounds:
        saved = config_lib.config_from_json(open(os.path.join(path, "config.json")).read())
        steps = saved.sampling.num_steps
        accuracy[steps] = digits_accuracy(jaxdiff.load(path), jax.random.PRNGKey(0), 0.0,
                                          sigmas=saved.sampling.sigmas, num_steps=steps)
    scorer = digits_scorer.load_classifier(str(tmp_path / "scorer"))
    labels = jnp.repeat(jnp.arange(10), 50)
    fid = {name: digits_scorer.fid(scorer, jaxdiff.sample(
        jaxdiff.load(path), jax.random.PRNGKey(1), "ddim", sigmas=saved.sampling.sigmas,
        num_samples=len(labels), labels=labels)) for name, path in (
            ("student", rounds[-1]), ("teacher", digits_edm_teacher))}
    print(f"digits PD (3 rounds of {config.training.num_steps} steps, {seconds:.0f} s): "
          f"accuracy by DDIM steps {accuracy}; 2-step digits FID {fid}")
    for steps, threshold in PD_THRESHOLDS.items():
        assert accuracy[steps] > threshold, (steps, accuracy)
    assert fid["student"] < 0.5 * fid["teacher"], fid


# Measured (digits_pd.py from digits_edm.py's 1200 steps, seed 0; 1000 samples): accuracy 0.941,
# 0.943, 0.949 and digits FID 0.66, 0.69, 0.76 at 8, 4, 2 steps (a fourth round: 0.954 and 0.88
# at 1 step); the teacher's own DDIM on the same grids: 0.949 / 0.83, 0.963 / 1.42 and 0.987 /
# 3.60 (two steps give class averages, easy to label and far from the digits). Chance is 0.10.
PD_THRESHOLDS = {8: 0.85, 4: 0.85, 2: 0.85}


def _official_x_target(model_x, z, logsnr, logsnr_mid, logsnr_s, first):
    """google-research diffusion_distillation/dpm.py, `Model.training_losses`' distillation
    target (two teacher DDIM steps, then "x-target implied by z_teacher"), ported to numpy;
    model_x(z, logsnr) is the teacher's x prediction, model_eps follows from it."""
    def sigmoid(v):
        return 1 / (1 + np.exp(-v))

    def softplus(v):
        return np.log1p(np.exp(v))

    def run(z_, lsnr):
        x = model_x(z_, lsnr)
        a, s = np.sqrt(sigmoid(lsnr))[:, None], np.sqrt(sigmoid(-lsnr))[:, None]
        return x, (z_ - a * x) / s

    x_pred, eps_pred = run(z, logsnr)
    z_mid = np.sqrt(sigmoid(logsnr_mid))[:, None] * x_pred + np.sqrt(
        sigmoid(-logsnr_mid))[:, None] * eps_pred
    x_pred, eps_pred = run(z_mid, logsnr_mid)
    a_s, stdv_s = np.sqrt(sigmoid(logsnr_s))[:, None], np.sqrt(sigmoid(-logsnr_s))[:, None]
    z_teacher = a_s * x_pred + stdv_s * eps_pred
    a_t = np.sqrt(sigmoid(logsnr))[:, None]
    stdv_frac = np.exp(0.5 * (softplus(logsnr) - softplus(logsnr_s)))[:, None]
    x_target = (z_teacher - stdv_frac * z) / (a_s - stdv_frac * a_t)
    return np.where(first, x_pred, x_target)


@pytest.mark.parametrize("index", [0, 1, 5, 7])
def test_target_matches_the_official_distillation_target(index):
    """pd_target in EDM's frame against the port above in the VP frame (logsnr = -2 ln sigma,
    z = x / sqrt(1 + sigma^2)), the exact Gaussian teacher in both."""
    n = 8
    levels = [np.full((16,), float(v)) for v in pd.pd_levels(jnp.asarray(index), num_steps=n,
                                                              **LEVELS)]
    sigma, mid, nxt = levels
    x0 = MU + S * np.asarray(jax.random.normal(jax.random.PRNGKey(0), (16, 3)), np.float64)
    x = x0 + sigma[:, None] * np.asarray(jax.random.normal(jax.random.PRNGKey(1), (16, 3)))
    got = pd.pd_target(gaussian_denoise, jnp.asarray(x, jnp.float32), *(
        jnp.asarray(v, jnp.float32) for v in levels))

    def model_x(z, logsnr):  # the teacher in the VP frame: D(z / alpha, sigma)
        s = np.exp(-logsnr / 2)
        return np.asarray(gaussian_denoise(z * np.sqrt(1 + s**2)[:, None], s))

    logsnr_s = -2 * np.log(np.maximum(nxt, 1e-30))  # unused where index == 0 (x_pred is taken)
    want = _official_x_target(model_x, x / np.sqrt(1 + sigma**2)[:, None], -2 * np.log(sigma),
                              -2 * np.log(mid), logsnr_s, index == 0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
