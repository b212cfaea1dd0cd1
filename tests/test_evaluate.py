"""The evaluator: bits/dim against `losses.bits_per_dim` on an exact oracle, the digits FID's
ordering, pictures, and `python -m jaxdiff.evaluate` end to end on a tiny exported workdir."""

import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from PIL import Image
from scipy import special

import jaxdiff.workdir
from experiments import digits, digits_edm, digits_ict, toy2d
from jaxdiff import checkpoint, digits_scorer, evaluate, losses, pictures
from jaxdiff.bundle import DiffusionModel
from jaxdiff.data import digits_arrays
from jaxdiff.models import create_model
from jaxdiff.schedules import beta_schedule, make_schedule
from tests.oracles import GaussianMixture

T = 20


def tiny_digits_config(experiment=digits):
    config = experiment.get_config()
    config.model.ch = 32
    config.model.ch_mult = (1,)
    config.model.attn_resolutions = ()
    config.diffusion.num_timesteps = T
    config.sampling.num_steps = 4
    return config


def _export_tiny(directory: str, config=None) -> str:
    """A tiny class-conditional digits U-Net (untrained) at checkpoint step 7."""
    config = tiny_digits_config() if config is None else config
    model = create_model(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                            jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))["params"]
    rng = np.random.default_rng(0)  # random weights without compiling `init`
    params = jax.tree.map(lambda s: 0.05 * rng.standard_normal(s.shape, np.float32), shapes)
    return checkpoint.export(directory, config, params, step=7)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return _export_tiny(str(tmp_path_factory.mktemp("run")))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


# ---------------------------------------------------------------------------------------------
# Bits per dimension on an exact oracle.


class OracleNet(nn.Module):
    """The Bayes-optimal eps predictor of an equal-weight Gaussian mixture, as a network."""

    means: tuple
    stds: tuple

    def __call__(self, x, t, y=None, train=False):
        k = len(self.stds)
        mixture = GaussianMixture(np.full(k, 1.0 / k), np.asarray(self.means, np.float32),
                                  np.asarray(self.stds, np.float32))
        return mixture.eps(make_schedule("linear", T), x, t, y)


def _oracle_bundle(means, stds, num_classes):
    means = np.asarray(means, np.float32)
    return DiffusionModel(
        params={}, schedule=make_schedule("linear", T),
        model=OracleNet(tuple(map(tuple, means.reshape(len(means), -1).tolist())), tuple(stds)),
        image_shape=(4,), model_output_type="eps", model_var_type="fixed_small",
        num_classes=num_classes)


def _quantised(x):
    return np.round((np.clip(x, -1, 1) + 1) * 127.5) / 127.5 - 1


def test_bits_per_dim_of_one_gaussian_is_its_closed_form():
    """x_0 ~ N(mu, s^2 I) under its exact eps predictor: E[x_0 | x_t] = mu + k (x_0 - mu) +
    k r eps with k = a s^2 / (a s^2 + 1 - a), r = sqrt((1 - a) / a), a = a_bar_t. The prior term
    is exact; each KL term, coef1^2 |x_0 - E[x_0 | x_t]|^2 / (2 beta_tilde) (equal variances),
    has a closed-form mean and variance over the noise; the decoder's mean over the noise is
    taken by Monte Carlo in float64 with SciPy's normal CDF. s = 0.1 keeps clipping idle."""
    mu, s, n = np.array([0.2, -0.1, 0.4, 0.0]), 0.1, 512
    bundle = _oracle_bundle([mu], [s], num_classes=0)
    rng = np.random.default_rng(0)
    x0 = _quantised(mu + s * rng.standard_normal((n, 4)))
    got = evaluate.dataset_bits_per_dim(bundle, x0.astype(np.float32), None, jax.random.key(1),
                                        batch_size=128, chunk_size=T)

    betas = np.minimum(np.linspace(1e-4, 0.02, T) * 1000 / T, 0.999)  # `linear` at T = 20
    a_bar = np.cumprod(1.0 - betas)
    a_prev = np.append(1.0, a_bar[:-1])
    beta_tilde = betas * (1.0 - a_prev) / (1.0 - a_bar)
    coef1 = betas * np.sqrt(a_prev) / (1.0 - a_bar)
    bits = 4 * np.log(2.0)  # nats of a 4-dimensional example -> bits/dim
    prior = 0.5 * (a_bar[-1] * x0**2 - a_bar[-1] - np.log1p(-a_bar[-1])).sum(1) / bits
    np.testing.assert_allclose(got["prior_bpd"], prior.mean(), rtol=1e-4)

    k = a_bar * s**2 / (a_bar * s**2 + 1.0 - a_bar)  # [T]
    r = np.sqrt((1.0 - a_bar) / a_bar)
    dev = (x0 - mu)[:, None, :]  # [n, 1, 4]
    mean_sq = ((1 - k)[:, None] ** 2 * dev**2 + (k * r)[:, None] ** 2).sum(-1)  # [n, T]
    var_sq = (2 * (k * r)[:, None] ** 4 + 4 * ((k * r) * (1 - k))[:, None] ** 2 * dev**2).sum(-1)
    c = coef1**2 / (2 * np.maximum(beta_tilde, 1e-300)) / bits  # [T]; t = 0 is the decoder
    vb = (c[1:] * mean_sq[:, 1:]).sum(1)
    vb_sd = np.sqrt((c[1:] ** 2 * var_sq[:, 1:]).sum() / n**2)
    assert got["vb_bpd"] == pytest.approx(vb.mean(), abs=4 * vb_sd)

    draws = 400
    eps = rng.standard_normal((draws, n, 4))
    mean0 = mu + k[0] * (x0 - mu) + k[0] * r[0] * eps  # E[x_0 | x_1], the decoder's mean
    scale0 = np.sqrt(beta_tilde[1])  # fixed_small: log beta_tilde clipped to beta_tilde_2
    upper = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
    lower = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
    log_p = np.log(special.ndtr((upper - mean0) / scale0) - special.ndtr((lower - mean0) / scale0))
    decoder = -log_p.sum(-1) / bits  # [draws, n]
    tolerance = 4 * decoder.std() / np.sqrt(n)
    assert got["decoder_bpd"] == pytest.approx(decoder.mean(), abs=tolerance)
    assert got["total_bpd"] == pytest.approx(
        got["prior_bpd"] + got["vb_bpd"] + got["decoder_bpd"], rel=1e-5)


def test_bits_per_dim_batches_pad_with_the_last_example_and_fold_in_their_index():
    bundle = _oracle_bundle([[0.2, -0.1, 0.4, 0.0]], [0.3], num_classes=0)
    mixture = GaussianMixture(np.ones(1), np.asarray([[0.2, -0.1, 0.4, 0.0]]), np.asarray([0.3]))
    x0 = np.asarray(_quantised(mixture.sample(jax.random.key(0), 7)[0]), np.float32)
    rng = jax.random.key(1)
    # Batches of 5 and 2 (padded to 5 with copies of the last example); batch b draws its noise
    # from fold_in(rng, b), and the padding rows are dropped.
    got = evaluate.dataset_bits_per_dim(bundle, x0, None, rng, batch_size=5, chunk_size=7)
    batches = [x0[:5], x0[[5, 6, 6, 6, 6]]]
    direct = [losses.bits_per_dim(
        bundle.schedule, lambda xt, t: mixture.eps(bundle.schedule, xt, t), jnp.asarray(x),
        jax.random.fold_in(rng, b), model_output_type="eps", model_var_type="fixed_small",
        chunk_size=T, clip_denoised=True) for b, x in enumerate(batches)]
    keys = ("total_bpd", "prior_bpd", "vb_bpd", "decoder_bpd")
    expected = {k: np.concatenate([direct[0][k], direct[1][k][:2]]).mean() for k in keys}
    chex.assert_trees_all_close({k: got[k] for k in keys}, expected, rtol=1e-5, atol=1e-7)
    total = np.concatenate([direct[0]["total_bpd"], direct[1]["total_bpd"][:2]]).astype(float)
    assert got["total_bpd_sem"] == pytest.approx(total.std(ddof=1) / np.sqrt(len(total)))


def test_conditional_bits_per_dim_uses_each_example_s_label():
    means = np.array([[0.6, 0.6, -0.6, 0.2], [-0.6, -0.6, 0.6, -0.2]])
    bundle = _oracle_bundle(means, [0.05, 0.05], num_classes=2)
    labels = np.arange(16) % 2
    x0 = means[labels] + 0.05 * np.random.default_rng(0).standard_normal((16, 4))
    x0 = np.asarray(_quantised(x0), np.float32)
    rng = jax.random.key(3)

    def bpd(x, y, batch_size):
        return evaluate.dataset_bits_per_dim(bundle, x, y, rng, batch_size=batch_size,
                                             chunk_size=5)

    mixed = bpd(x0, labels, 16)
    # Each class on its own (all labels equal, so their order cannot matter): another draw of
    # the noise, the same bound.
    alone = [bpd(x0[labels == k], labels[labels == k], 8) for k in (0, 1)]
    expected = np.mean([a["total_bpd"] for a in alone])
    tolerance = 4 * np.hypot(mixed["total_bpd_sem"], np.hypot(*[a["total_bpd_sem"]
                                                                 for a in alone]) / 2)
    assert mixed["total_bpd"] == pytest.approx(expected, abs=tolerance)
    # Swapped labels score far worse: the labels follow their examples.
    assert bpd(x0, 1 - labels, 16)["total_bpd"] > mixed["total_bpd"] + 1.0


def test_bits_per_dim_rejects_missing_labels_for_a_conditional_model():
    bundle = _oracle_bundle(np.zeros((2, 4)), [0.1, 0.1], num_classes=2)
    with pytest.raises(ValueError, match="needs labels"):
        evaluate.dataset_bits_per_dim(bundle, np.zeros((2, 4)), None, jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# Digits FID.


def _blur(images):
    """A [1, 2, 1] / 4 binomial blur along both axes, edges replicated."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    rows = (padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]) / 4
    return (rows[:, :, :-2] + 2 * rows[:, :, 1:-1] + rows[:, :, 2:]) / 4


def test_digits_fid_orders_real_blurred_and_noise(cache_dir):
    classifier = digits_scorer.load_classifier(cache_dir, seed=0)
    assert classifier["accuracy"] > 0.85
    test_digits = digits_arrays("test")[0]
    real = digits_scorer.fid(classifier, test_digits)
    blurred = digits_scorer.fid(classifier, _blur(test_digits))
    noise = digits_scorer.fid(
        classifier, np.random.default_rng(0).uniform(-1, 1, test_digits.shape))
    assert real < 10 and 2 * real < blurred < noise / 2 and noise > 50
    # Cached and deterministic: a fresh training with the same seed gives the same network.
    assert os.path.exists(os.path.join(cache_dir, "digits_classifier_seed0.npz"))
    x, y = digits_arrays("train")
    again = digits_scorer._train(jnp.asarray(x.reshape(len(x), -1)), jnp.asarray(y),
                                 jax.random.key(0), digits_scorer.TRAIN_STEPS)
    np.testing.assert_array_equal(np.asarray(again["w1"]), classifier["w1"])


# ---------------------------------------------------------------------------------------------
# Pictures.


def _read(path):
    return np.asarray(Image.open(path))


def test_save_grid_tiles_images_with_white_borders(tmp_path):
    images = np.stack([np.full((32, 32, 3), v) for v in (-1.0, 0.0, 1.0)])
    path = pictures.save_grid(images, str(tmp_path / "g.png"), nrow=2)
    grid = _read(path)
    assert grid.shape == (2 * 33 + 1, 2 * 33 + 1, 3)
    assert (grid[1:33, 1:33] == 0).all() and (grid[1:33, 34:66] == 128).all()
    assert (grid[34:66, 1:33] == 255).all() and (grid[0] == 255).all()
    small = pictures.save_grid(np.zeros((4, 8, 8, 1)), str(tmp_path / "s.png"), nrow=4)
    assert _read(small).shape == (4 * 10, 4 * 37)  # the 8x8 tiles enlarged 4 times
    with pytest.raises(ValueError, match="nrow"):
        pictures.save_grid(images, str(tmp_path / "bad.png"), nrow=0)


def test_trajectory_strip_and_guidance_sweep_layouts(tmp_path):
    steps, n = 7, 2
    trajectory = {"xt": np.zeros((steps, n, 32, 32, 1)), "pred_x0": np.ones((steps, n, 32, 32, 1))}
    strip = _read(pictures.save_trajectory(trajectory, str(tmp_path / "t.png"), num_frames=4))
    assert strip.shape == (2 * n * 33 + 1, 4 * 33 + 1)  # x_t and x0 rows per sample
    assert strip[1, 1] == 128 and strip[34, 1] == 255
    sweep = _read(pictures.save_guidance_sweep(np.zeros((3, 5, 32, 32, 3)),
                                               str(tmp_path / "w.png")))
    assert sweep.shape == (3 * 33 + 1, 5 * 33 + 1, 3)


def test_save_scatter_draws_points(tmp_path):
    points, _ = np.random.default_rng(0).normal(size=(50, 2)), None
    image = _read(pictures.save_scatter(points, str(tmp_path / "p.png"), reference=points + 1,
                                        size=100))
    assert image.shape == (100, 100, 3)
    blue = (image[..., 2] > 150) & (image[..., 0] < 100)
    grey = (image[..., 0] == 170) & (image[..., 2] == 170)
    assert blue.sum() > 50 and grey.sum() > 50
    with pytest.raises(ValueError, match=r"points must be \[N, 2\]"):
        pictures.save_scatter(np.zeros((3, 3)), str(tmp_path / "q.png"))


# ---------------------------------------------------------------------------------------------
# The command and its errors.


def _run_command(*args):
    """`python -m jaxdiff.evaluate ARGS` in this process (the same absl flags and main)."""
    argv = ["jaxdiff.evaluate", *args]
    flags.FLAGS(argv)
    try:
        evaluate.main(argv[:1])
    finally:
        flags.FLAGS.unparse_flags()


SAMPLING = dict(num_samples=20, batch_size=32, num_steps=3)  # shared, so jit caches are shared
ODE = dict(bpd_ode_steps=2, bpd_ode_solver="heun")  # 4 network evaluations: a smoke test


@pytest.mark.slow  # bpd, sampling, digits FID and pictures of a U-Net workdir: about 12 s
def test_evaluate_command_end_to_end(workdir, cache_dir, capsys):
    _run_command(f"--workdir={workdir}", "--metrics=bpd,grid,digits_fid",
                 "--num_bpd_examples=16", "--guidance_scales=0,2", f"--cache_dir={cache_dir}",
                 *(f"--{k}={v}" for k, v in (SAMPLING | ODE).items()))
    out = capsys.readouterr().out
    assert "total_bpd" in out and "bpd_ode" in out and "digits_fid" in out
    assert "metrics_7.json" in out
    with open(os.path.join(workdir, "eval", "metrics_7.json")) as f:
        record = json.load(f)
    m = record["metrics"]
    assert record["step"] == 7 and record["settings"]["num_steps"] == 3
    # DDPM: its variational bound and the ODE likelihood, and the file says so.
    assert record["settings"]["bpd"] == ["vlb", "ode"]
    assert record["settings"]["bpd_ode"] == dict(solver="heun", num_steps=2,
                                                 divergence="hutchinson")
    assert np.isfinite(m["bpd_ode"]) and m["bpd_ode_sem"] > 0 and m["bpd_ode_nfe"] == 4
    np.testing.assert_allclose(m["total_bpd"], m["prior_bpd"] + m["vb_bpd"] + m["decoder_bpd"],
                               rtol=1e-5)
    # L_T of the first 16 test digits in float64: KL(N(sqrt(a_T) x_0, 1 - a_T) || N(0, I)) per
    # dimension, in bits (DDPM Eq. 5), for the workdir's linear T = 20 schedule.
    x0 = digits_arrays("test")[0][:16].reshape(16, -1).astype(np.float64)
    a_T = np.prod(1.0 - beta_schedule("linear", T))
    prior = 0.5 * (-np.log1p(-a_T) + (1 - a_T) + a_T * x0**2 - 1.0).mean(1) / np.log(2.0)
    np.testing.assert_allclose(m["prior_bpd"], prior.mean(), rtol=1e-4)
    assert m["total_bpd"] > m["prior_bpd"] and m["digits_fid"] > m["digits_fid_real_test"] > 0
    # 20 samples of an untrained network: a count of 20, and below the classifier's own accuracy.
    accuracy = m["digits_label_accuracy"]
    assert accuracy * 20 == pytest.approx(round(accuracy * 20))
    assert accuracy < 0.5 < m["digits_classifier_test_accuracy"]
    names = sorted(os.path.basename(p) for p in record["pictures"])
    assert names == ["guidance_7.png", "samples_7.png", "trajectory_7.png"]
    # Two guidance scales: two rows of 8x8 tiles with borders, enlarged 4 times.
    assert _read(os.path.join(workdir, "eval", "guidance_7.png")).shape[0] == 4 * (2 * 9 + 1)


def test_fid_and_is_with_a_stand_in_feature_network(workdir, cache_dir, tmp_path, monkeypatch):
    """The FID/IS plumbing (features of samples and of the train split, the cached reference
    .npz) with a cheap stand-in for Inception: the first 16 pixels and 10 of them as logits."""
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")

    def stand_in(path):
        assert path == str(weights)
        return lambda images: (images.reshape(len(images), -1)[:, :16].astype(np.float32),
                               images.reshape(len(images), -1)[:, :10].astype(np.float32))

    monkeypatch.setattr(evaluate, "inception_extractor", stand_in)
    record = evaluate.evaluate(workdir, ["fid", "is"], inception_weights=str(weights),
                               cache_dir=str(tmp_path), **SAMPLING)
    assert record["metrics"]["fid"] > 0 and record["metrics"]["is"] >= 1
    assert os.path.exists(tmp_path / "fid_stats_digits_8_train.npz")


def test_toy2d_workdir_gets_a_sliced_wasserstein_distance_and_a_scatter(tmp_path):
    config = toy2d.get_config()
    config.diffusion.num_timesteps = T
    config.sampling.num_steps = 4
    model = create_model(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2)),
                            jnp.zeros(1, jnp.int32))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: 0.01 * rng.standard_normal(s.shape, np.float32), shapes)
    workdir = checkpoint.export(str(tmp_path / "toy"), config, params, step=3)
    record = evaluate.evaluate(workdir, ["swd", "grid"], num_samples=64, batch_size=64)
    assert record["metrics"]["swd"] > 0
    assert [os.path.basename(p) for p in record["pictures"]] == ["scatter_3.png"]
    with pytest.raises(ValueError, match="metric 'bpd' does not apply: it needs images; data "
                       "set 'toy2d' holds 2-D points; metric 'digits_fid' does not apply"):
        evaluate.evaluate(workdir, ["bpd", "digits_fid"])


def test_errors_say_what_to_do(workdir, tmp_path):
    with pytest.raises(ValueError, match="unknown metric.*choose from bpd, fid, is"):
        evaluate.evaluate(workdir, ["bpd", "kid"])
    with pytest.raises(FileNotFoundError) as info:
        evaluate.evaluate(workdir, ["fid"], inception_weights=str(tmp_path / "missing.pth"))
    assert "pt_inception-2015-12-05-6726825d.pth" in str(info.value)
    assert "--inception_weights" in str(info.value)
    with pytest.raises(FileNotFoundError, match="not a jaxdiff workdir.*jaxdiff.train"):
        evaluate.evaluate(str(tmp_path), ["bpd"])
    jaxdiff.workdir.write_config(str(tmp_path / "empty"), tiny_digits_config())
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*train first"):
        evaluate.evaluate(str(tmp_path / "empty"), ["bpd"])
    with pytest.raises(ValueError, match="metric 'swd' does not apply: it compares 2-D "
                                         "points; data set 'digits' holds images"):
        evaluate.evaluate(workdir, ["swd"])


@pytest.fixture
def nothing_computed(monkeypatch):
    """Makes the first step of any evaluation (the test split, samples) fail loudly."""
    def computed(*args, **kwargs):
        raise AssertionError("the evaluation started computing before its checks")

    monkeypatch.setattr(evaluate, "create_dataset", computed)
    monkeypatch.setattr(evaluate, "draw_samples", computed)


@pytest.mark.parametrize("options, message", [
    (dict(method="DDIM"), r"unknown sampling method 'DDIM'"),
    (dict(method="ddim", eta=5.0), r"eta.*5\.0"),
    (dict(method="ddpm", eta=0.5), r"method 'ddpm' takes no option 'eta'"),
    (dict(num_steps=10000), r"num_steps.*10000"),
    (dict(guidance_scale=-1.0), r"guidance_scale.*-1\.0"),
    (dict(guidance_scales=[0.0, -1.0]), r"guidance_scale.*-1\.0"),
    (dict(num_bpd_examples=0), r"num_bpd_examples .* got 0"),
    (dict(bpd_chunk_size=0), r"bpd_chunk_size .* got 0"),
    (dict(bpd_ode_solver="euler"), r"unknown ODE solver 'euler'; expected one of \('heun'"),
    (dict(bpd_ode_divergence="trace"), r"unknown divergence 'trace'; expected one of"),
    (dict(bpd_ode_steps=0), r"num_steps must be an integer >= 1, got 0"),
], ids=["method", "eta", "eta-ddpm", "num_steps", "scale", "sweep", "bpd_examples", "chunk",
        "ode_solver", "ode_divergence", "ode_steps"])
def test_bad_options_are_refused_before_any_computation(workdir, options, message,
                                                        nothing_computed, tmp_path):
    with pytest.raises(ValueError, match=message):
        evaluate.evaluate(workdir, ["bpd", "grid", "digits_fid"], cache_dir=str(tmp_path),
                          output_dir=str(tmp_path / "out"), **options)
    assert not (tmp_path / "out" / "metrics_7.json").exists()


def test_an_unwritable_output_is_refused_before_any_computation(workdir, nothing_computed,
                                                                 tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"jaxdiff.evaluate: .*'.*file/eval' is not writable"):
        _run_command(f"--workdir={workdir}", "--metrics=bpd",
                     f"--output_dir={tmp_path / 'file' / 'eval'}")
    with pytest.raises(jaxdiff.workdir.WorkdirError, match=r"'.*file/cache' is not writable"):
        evaluate.evaluate(workdir, ["bpd", "digits_fid"], output_dir=str(tmp_path / "out"),
                          cache_dir=str(tmp_path / "file" / "cache"))


def test_each_metric_is_written_as_soon_as_it_is_known(workdir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("sampling failed")

    monkeypatch.setattr(evaluate, "draw_samples", broken)
    with pytest.raises(RuntimeError, match="sampling failed"):
        evaluate.evaluate(workdir, ["bpd", "digits_fid"], num_bpd_examples=4,
                          cache_dir=str(tmp_path), output_dir=str(tmp_path / "out"),
                          **SAMPLING, **ODE)
    with open(tmp_path / "out" / "metrics_7.json") as f:
        record = json.load(f)
    assert record["pending"] == ["digits_fid"]
    m = record["metrics"]
    np.testing.assert_allclose(m["total_bpd"], m["prior_bpd"] + m["vb_bpd"] + m["decoder_bpd"],
                               rtol=1e-5)
    assert not os.path.exists(os.path.join(workdir, "eval", "metrics_7.json.tmp"))


def test_command_reports_errors_without_a_traceback(tmp_path):
    with pytest.raises(SystemExit) as info:
        _run_command(f"--workdir={tmp_path}", "--metrics=bpd,nope")
    assert str(info.value).startswith("jaxdiff.evaluate: unknown metric(s) ['nope']")


@pytest.mark.slow  # ~12 s on two CPU cores: it compiles the U-Net's VJP inside the ODE solve
def test_an_edm_workdir_gets_the_ode_likelihood(tmp_path):
    """A continuous-time process has no variational bound here: bpd is the ODE's alone (this
    was an AttributeError, 'VEProcess' object has no attribute 'num_timesteps')."""
    workdir = _export_tiny(str(tmp_path / "edm"), tiny_digits_config(digits_edm))
    record = evaluate.evaluate(workdir, ["bpd"], num_bpd_examples=4, **ODE)
    assert record["settings"]["bpd"] == ["ode"]
    assert sorted(record["metrics"]) == ["bpd_ode", "bpd_ode_nfe", "bpd_ode_sem"]
    assert np.isfinite(record["metrics"]["bpd_ode"])


def test_a_consistency_workdir_is_refused_bpd_before_any_computation(tmp_path,
                                                                      nothing_computed):
    config = tiny_digits_config(digits_ict)
    config.sampling.num_steps = len(config.sampling.sigmas)
    workdir = _export_tiny(str(tmp_path / "ict"), config)
    with pytest.raises(SystemExit) as info:
        _run_command(f"--workdir={workdir}", "--metrics=bpd,grid")
    assert str(info.value).startswith("jaxdiff.evaluate: metric 'bpd' does not apply: no "
                                      "likelihood is defined for a consistency model")
    assert "\n" not in str(info.value)
    assert not os.path.exists(os.path.join(workdir, "eval"))
