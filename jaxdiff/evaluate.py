"""`python -m jaxdiff.evaluate --workdir DIR --metrics bpd,fid,is,grid,digits_fid`: evaluation.

Metrics (`--metrics`, comma separated):
  bpd         bits/dim over the test split, by two methods; `settings.bpd` in the metrics file
              names those computed. Class-conditional models are scored given the true labels.
              - bpd_ode (every process): the probability-flow ODE likelihood
                (`jaxdiff.likelihood`, score_sde arXiv 2011.13456 App. D.2), the data uniformly
                dequantised as score_sde does, with `--bpd_ode_solver` (default rk4),
                `--bpd_ode_steps` (32, fixed-step solvers) and `--bpd_ode_divergence` (default
                hutchinson, a Rademacher probe per solve; exact: d VJPs per evaluation);
                bpd_ode_sem is its standard error over the examples, bpd_ode_nfe the network
                evaluations per example.
              - total_bpd (discrete DDPM processes only): the variational bound (DDPM Eq. 5,
                every one of the T terms per example), as total, prior (L_T), vb (the KL terms)
                and decoder (L_0). Data are not dequantised: as in DDPM, L_0 is a discrete
                decoder that integrates p(x_0|x_1) over each 8-bit pixel bin of width 2/255, so
                the total bounds the discrete -log2 P(x) / D and compares directly with the
                dequantised bpd_ode (which upper-bounds the same quantity in expectation).
              A consistency model has no likelihood: bpd is refused for it.
  fid, is     FID against the train split (arXiv 1706.08500) and the Inception Score
              (arXiv 1606.03498) of `--num_samples` samples, with pytorch-fid's Inception-v3
              weights (`--inception_weights`). Reference statistics are cached as .npz.
  digits_fid  for the digits data set: the Frechet distance in the 128-d hidden layer of a small
              MLP classifier trained on the real training digits (cached in `--cache_dir`), plus
              the same distance of the 297 held-out real test digits, that of the first 297
              samples (digits_fid_at_test_size: FID is biased upwards at small sizes, so compare
              these two) and, for a conditional model, the classifier's accuracy on the
              samples' labels. The test digits come from other writers: they score about 4.3,
              random 297-digit subsets of the training digits about 1.2-1.5.
  swd         for 2-D toy data: the sliced 2-Wasserstein distance to fresh data points.
  grid        pictures: a sample grid (a scatter for 2-D data), a trajectory strip of x_t and
              predicted x_0, and for a conditional model a guidance-scale sweep.

Every option, the sampler's settings and the output location are checked before anything is
computed. Samples are drawn once and shared by every metric; results are printed as a table and
written to `--output_dir` (default `workdir/eval`) as `metrics_<step>.json`, rewritten as each
metric becomes known, pictures as `*_<step>.png`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from jaxdiff import checkpoint, digits_scorer, likelihood, losses, metrics, pictures
from jaxdiff.bundle import DiffusionModel
from jaxdiff.compiler import inference_jit
from jaxdiff.config import sampling_options
from jaxdiff.data import create_dataset, digits_arrays, get_dataset, toy2d_sample
from jaxdiff.models import inception
from jaxdiff.pictures import to_uint8
from jaxdiff.sampling import check_sample_args, sample
from jaxdiff.workdir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    WorkdirError,
    check_not_held,
    check_writable,
    read_config,
)

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "jaxdiff")
# Streams of the evaluation key: samples, bpd noise, pictures, sliced-Wasserstein projections,
# the ODE likelihood's dequantisation and probes.
_SAMPLES, _BPD, _PICTURES, _SWD, _BPD_ODE = 0, 1, 2, 3, 4


# ---------------------------------------------------------------------------------------------
# Bits per dimension.


@inference_jit(static_argnames=("chunk_size", "clip_denoised"))
def _bpd_batch(bundle: DiffusionModel, x0, labels, rng, *, chunk_size: int, clip_denoised: bool):
    def model_fn(x_in, t):
        # bits_per_dim stacks the batch chunk-major ([chunk * B]), so labels repeat by tiling.
        y = None if labels is None else jnp.tile(labels, x_in.shape[0] // labels.shape[0])
        return bundle.model.apply({"params": bundle.params}, x_in, t, y=y, train=False)

    return losses.bits_per_dim(bundle.schedule, model_fn, x0, rng,
                               model_output_type=bundle.model_output_type,
                               model_var_type=bundle.model_var_type, chunk_size=chunk_size,
                               clip_denoised=clip_denoised, sigma_data=bundle.sigma_data)


def dataset_bits_per_dim(
    bundle: DiffusionModel,
    x,
    labels,
    rng: jax.Array,
    *,
    batch_size: int = 64,
    chunk_size: int = 100,
    clip_denoised: bool = True,
) -> dict[str, float]:
    """Mean bits/dim of examples x [N, *shape] (labels [N] for a conditional model, else None)
    under `bundle`, through `losses.bits_per_dim`.

    Batch b uses the key fold_in(rng, b); the last batch is padded with copies of its last
    example so that every batch compiles once. Returns the means of total_bpd, prior_bpd,
    vb_bpd and decoder_bpd, and total_bpd_sem (the standard error of the total's mean).
    """
    x = np.asarray(x, np.float32)
    n = len(x)
    if n == 0:
        raise ValueError("no examples to evaluate bits/dim on")
    if bundle.num_classes and labels is None:
        raise ValueError(f"a class-conditional model (num_classes={bundle.num_classes}) needs "
                         "labels")
    labels = None if not bundle.num_classes else np.asarray(labels, np.int32)
    batch_size = min(batch_size, n)
    keys = ("total_bpd", "prior_bpd", "vb_bpd", "decoder_bpd")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for b, start in enumerate(tqdm(range(0, n, batch_size), desc="bits/dim", unit="batch")):
        index = np.minimum(np.arange(start, start + batch_size), n - 1)
        out = _bpd_batch(bundle, x[index], None if labels is None else labels[index],
                         jax.random.fold_in(rng, b), chunk_size=chunk_size,
                         clip_denoised=clip_denoised)
        for k in keys:
            parts[k].append(np.asarray(out[k])[: min(batch_size, n - start)])
    values = {k: np.concatenate(v).astype(np.float64) for k, v in parts.items()}
    result = {k: float(v.mean()) for k, v in values.items()}
    result["total_bpd_sem"] = float(values["total_bpd"].std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    return result


# ---------------------------------------------------------------------------------------------
# Sampling.


def draw_samples(
    bundle: DiffusionModel,
    rng: jax.Array,
    num_samples: int,
    *,
    batch_size: int,
    method: str,
    clip_denoised: bool = True,
    **settings: Any,
) -> tuple[np.ndarray, np.ndarray | None]:
    """num_samples samples in batches (batch b from fold_in(rng, b)) and their labels: for a
    conditional model the classes in turn (sample i has label i mod num_classes), else None.
    `settings` are further `jaxdiff.sample` keywords (num_steps, guidance_scale, the method's
    options)."""
    labels = sample_labels(bundle, num_samples)
    out = []
    for b, start in enumerate(tqdm(range(0, num_samples, batch_size), desc="sampling",
                                   unit="batch")):
        stop = min(start + batch_size, num_samples)
        out.append(np.asarray(sample(
            bundle, jax.random.fold_in(rng, b), method, num_samples=stop - start,
            clip_denoised=clip_denoised, labels=None if labels is None else labels[start:stop],
            **settings)))
    return np.concatenate(out), labels


def sample_labels(bundle: DiffusionModel, num_samples: int) -> np.ndarray | None:
    """The labels of the evaluation's samples: the classes in turn, None if unconditional."""
    return np.arange(num_samples) % bundle.num_classes if bundle.num_classes else None


def sampler_settings(
    config: ml_collections.ConfigDict,
    bundle: DiffusionModel,
    method: str | None,
    num_steps: int | None,
    eta: float | None,
    guidance_scale: float | None,
    sigmas: Sequence[float] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The sampling method and its `jaxdiff.sample` keywords: the config's `sampling` block where
    an argument is None (its step count and options only for the config's own method; another
    method starts from its defaults); no guidance for an unconditional model. `sigmas`: the
    noise levels of a multistep consistency sampler."""
    same_method = method is None or method == config.sampling.method
    method = config.sampling.method if method is None else method
    settings: dict[str, Any] = sampling_options(config) if same_method else {}
    if eta is not None:
        settings["eta"] = eta
    if sigmas is not None:
        settings["sigmas"] = tuple(float(s) for s in sigmas)
    settings["num_steps"] = (config.sampling.num_steps if same_method and sigmas is None
                             else None) if num_steps is None else num_steps
    settings["guidance_scale"] = 0.0 if not bundle.num_classes else (
        config.sampling.guidance_scale if guidance_scale is None else guidance_scale)
    return method, settings


# ---------------------------------------------------------------------------------------------
# Features: Inception-v3 (FID, IS).


def inception_extractor(weights_path: str | None) -> Callable[[np.ndarray], tuple]:
    """A jitted function uint8 images [B, H, W, C] -> (pool features [B, 2048], logits [B, 1008])
    with pytorch-fid's weights read from `weights_path` (a .pth file)."""
    if weights_path is None or not os.path.exists(weights_path):
        raise FileNotFoundError(inception.missing_weights_message(weights_path))
    variables = inception.load_pytorch_fid_weights(weights_path)
    network = inception.InceptionV3()

    @inference_jit
    def extract(images):
        return network.apply(variables, inception.preprocess(images))

    return extract


def batched_features(extract: Callable, images: np.ndarray, batch_size: int,
                     desc: str = "features") -> tuple[np.ndarray, ...]:
    """`extract` over images in batches (the last one padded, so it compiles once); its outputs
    concatenated as NumPy arrays."""
    n = len(images)
    outs: list[tuple[np.ndarray, ...]] = []
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch"):
        index = np.minimum(np.arange(start, start + batch_size), n - 1)
        out = extract(images[index])
        out = out if isinstance(out, tuple) else (out,)
        outs.append(tuple(np.asarray(o)[: min(batch_size, n - start)] for o in out))
    return tuple(np.concatenate(parts) for parts in zip(*outs, strict=True))


def reference_statistics(
    path: str, compute: Callable[[], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) cached at `path` (.npz): loaded if present, else computed from the features
    `compute()` returns and saved there."""
    if os.path.exists(path):
        return metrics.load_statistics(path)
    mu, sigma = metrics.feature_statistics(compute())
    metrics.save_statistics(path, mu, sigma)
    return mu, sigma


# ---------------------------------------------------------------------------------------------
# The metrics: a registry whose entries say what they compute and where they apply.


@dataclasses.dataclass
class Evaluation:
    """What every metric reads: the workdir's model and config, the sampler, the evaluation's
    key and options, and the samples (drawn once, on first use, and shared)."""

    config: ml_collections.ConfigDict
    bundle: DiffusionModel
    step: int
    rng: jax.Array
    method: str
    settings: dict[str, Any]
    options: dict[str, Any]  # `evaluate`'s keywords
    out_dir: str
    record: dict[str, Any]

    @property
    def points(self) -> bool:
        return get_dataset(self.config.data.dataset).points

    @functools.cached_property
    def drawn(self) -> tuple[np.ndarray, np.ndarray | None]:
        return draw_samples(self.bundle, jax.random.fold_in(self.rng, _SAMPLES),
                            self.options["num_samples"], batch_size=self.options["batch_size"],
                            method=self.method, clip_denoised=not self.points, **self.settings)

    @functools.cached_property
    def extract(self) -> Callable[[np.ndarray], tuple]:
        """The feature network of FID and IS: the given one, else Inception-v3."""
        return self.options["feature_extractor"] or inception_extractor(
            self.options["inception_weights"])

    @functools.cached_property
    def inception(self) -> tuple[np.ndarray, np.ndarray]:
        """The samples' features and logits (FID and IS share them)."""
        return batched_features(self.extract, to_uint8(self.drawn[0]),
                                self.options["batch_size"], "inception")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Metric:
    """A metric: its results from an evaluation (`compute`), whether it reads the samples, why
    it does not apply to a workdir's config or model (`refuses`: a reason, or None), the
    directories it fills besides the output (`caches(options)`), and the settings it records."""

    compute: Callable[[Evaluation], dict[str, float]]
    sampled: bool = True
    refuses: Callable[[ml_collections.ConfigDict, DiffusionModel | None], str | None] = (
        lambda config, bundle: None)
    caches: Callable[[dict[str, Any]], list[str]] = lambda options: []
    settings: Callable[[Evaluation], dict[str, Any]] = lambda run: {}


def _images_only(config: ml_collections.ConfigDict, bundle: DiffusionModel | None) -> str | None:
    if get_dataset(config.data.dataset).points:
        return f"it needs images; data set {config.data.dataset!r} holds 2-D points"
    return None


def _bpd_refuses(config: ml_collections.ConfigDict, bundle: DiffusionModel | None) -> str | None:
    if bundle is not None:
        try:
            likelihood.check_model(bundle)
        except ValueError as e:
            return str(e)
    return _images_only(config, bundle)


def _bpd_methods(bundle: DiffusionModel) -> list[str]:
    """DDPM's variational bound needs the chain's steps; the ODE likelihood every process."""
    return ["ode"] if bundle.schedule.num_timesteps is None else ["vlb", "ode"]


def _bpd(run: Evaluation) -> dict[str, float]:
    o, bundle = run.options, run.bundle
    test = create_dataset(run.config, "test")
    n = test.num_examples if o["num_bpd_examples"] is None else min(o["num_bpd_examples"],
                                                                    test.num_examples)
    examples = test.examples(np.arange(n))
    labels = examples["label"] if bundle.num_classes else None
    results: dict[str, float] = {}
    if "vlb" in _bpd_methods(bundle):
        # A network call sees chunk * B images: keep that near batch_size.
        chunk = min(o["bpd_chunk_size"], bundle.schedule.num_timesteps)
        results.update(dataset_bits_per_dim(
            bundle, examples["x"], labels, jax.random.fold_in(run.rng, _BPD),
            batch_size=max(1, o["batch_size"] // chunk), chunk_size=chunk))
    ode = likelihood.bits_per_dim_ode(bundle, examples["x"], jax.random.fold_in(run.rng, _BPD_ODE),
                                      labels=labels, batch_size=o["batch_size"],
                                      **o["ode_options"])
    results["bpd_ode"] = float(ode["bpd"].astype(np.float64).mean())
    results["bpd_ode_sem"] = float(ode["bpd"].std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    results["bpd_ode_nfe"] = float(ode["nfe"].mean())
    return results


def _reference_path(config: ml_collections.ConfigDict, cache_dir: str,
                    reference_stats: str | None) -> str:
    return reference_stats or os.path.join(
        cache_dir, f"fid_stats_{config.data.dataset}_{config.data.image_size}_train.npz")


def _fid(run: Evaluation) -> dict[str, float]:
    features = run.inception[0]

    def real_features():
        train = create_dataset(run.config, "train")
        x = train.examples(np.arange(train.num_examples))["x"]
        return batched_features(run.extract, to_uint8(x), run.options["batch_size"],
                                "inception (real)")[0]

    mu, sigma = reference_statistics(
        _reference_path(run.config, run.options["cache_dir"], run.options["reference_stats"]),
        real_features)
    return {"fid": metrics.frechet_distance(*metrics.feature_statistics(features), mu, sigma)}


def _fid_caches(options: dict[str, Any]) -> list[str]:
    """The reference statistics' directory, when they are still to be computed."""
    ref = options["reference_stats"]
    if ref and os.path.exists(ref):
        return []
    return [os.path.dirname(os.path.abspath(ref)) if ref else options["cache_dir"]]


def _feature_network(run: Evaluation) -> dict[str, str]:
    given = run.options["feature_extractor"]
    return {"feature_network": getattr(given, "__name__", "custom") if given else "inception-v3"}


def _inception_score(run: Evaluation) -> dict[str, float]:
    score, std = metrics.inception_score(run.inception[1],
                                         splits=min(10, run.options["num_samples"]))
    return {"is": score, "is_std": std}


def _digits_fid(run: Evaluation) -> dict[str, float]:
    samples, labels = run.drawn
    classifier = digits_scorer.load_classifier(run.options["cache_dir"])  # one, whatever the seed
    test_digits = digits_arrays("test")[0]
    results = {"digits_fid": digits_scorer.fid(classifier, samples),
               "digits_fid_real_test": digits_scorer.fid(classifier, test_digits)}
    if len(samples) >= len(test_digits):  # the bias of FID depends on the sample size
        results["digits_fid_at_test_size"] = digits_scorer.fid(classifier,
                                                               samples[: len(test_digits)])
    results["digits_classifier_test_accuracy"] = float(classifier["accuracy"])
    if labels is not None:
        results["digits_label_accuracy"] = float(
            np.mean(digits_scorer.predict(classifier, samples) == labels))
    return results


def _swd(run: Evaluation) -> dict[str, float]:
    samples = run.drawn[0]
    real, _ = toy2d_sample(run.config.data.toy_distribution, run.options["seed"], len(samples))
    return {"swd": metrics.sliced_wasserstein(samples, real, jax.random.fold_in(run.rng, _SWD),
                                              num_projections=256)}


def _grid(run: Evaluation) -> dict[str, float]:
    run.record["pictures"] += _pictures(run, jax.random.fold_in(run.rng, _PICTURES))
    return {}


METRICS: dict[str, Metric] = {
    "bpd": Metric(compute=_bpd, sampled=False, refuses=_bpd_refuses,
                  settings=lambda run: {"bpd": _bpd_methods(run.bundle),
                                        "bpd_ode": run.options["ode_options"]}),
    "fid": Metric(compute=_fid, refuses=_images_only, caches=_fid_caches,
                  settings=_feature_network),
    "is": Metric(compute=_inception_score, refuses=_images_only, settings=_feature_network),
    # The digits classifier is trained on the digits' train split on first use (cached).
    "digits_fid": Metric(
        compute=_digits_fid, caches=lambda options: [options["cache_dir"]],
        refuses=lambda config, bundle: None if config.data.dataset == "digits" else
        f"it scores 8x8 digits with a classifier trained on them; data set "
        f"{config.data.dataset!r} is not 'digits'"),
    "swd": Metric(compute=_swd, refuses=lambda config, bundle: None if get_dataset(
        config.data.dataset).points else f"it compares 2-D points; data set "
        f"{config.data.dataset!r} holds images"),
    "grid": Metric(compute=_grid),
}


def check_metrics(names: Sequence[str]) -> tuple[str, ...]:
    """The requested metric names, deduplicated in order; a ValueError names any unknown one."""
    names = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {unknown or names!r}: choose from "
                         f"{', '.join(METRICS)} (comma separated, e.g. --metrics bpd,grid)")
    return names


def _check_applicable(names: tuple[str, ...], config: ml_collections.ConfigDict,
                      bundle: DiffusionModel | None = None) -> None:
    """ValueError naming every metric that does not apply to the workdir's data (and, given
    `bundle`, its model), and why."""
    refused = [f"metric {name!r} does not apply: {why}" for name in names
               if (why := METRICS[name].refuses(config, bundle)) is not None]
    if refused:
        raise ValueError("; ".join(refused))


# ---------------------------------------------------------------------------------------------
# The evaluation.


def _latest_step(workdir: str) -> int:
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    step = None
    if os.path.isdir(directory):
        manager = checkpoint.checkpoint_manager(workdir, create=False)
        step = manager.latest_step()
        manager.close()
    if step is None:
        raise FileNotFoundError(
            f"no checkpoint in {directory}: train first (python -m jaxdiff.train --config "
            f"experiments/<name>.py --workdir {workdir}) or write one with "
            "jaxdiff.checkpoint.export")
    return step


def evaluate(
    workdir: str,
    metric_names: Sequence[str],
    *,
    num_samples: int = 1000,
    batch_size: int = 256,
    method: str | None = None,
    num_steps: int | None = None,
    eta: float | None = None,
    sigmas: Sequence[float] | None = None,
    guidance_scale: float | None = None,
    guidance_scales: Sequence[float] = (0.0, 1.0, 3.0),
    inception_weights: str | None = None,
    feature_extractor: Callable[[np.ndarray], tuple] | None = None,
    reference_stats: str | None = None,
    num_bpd_examples: int | None = None,
    bpd_chunk_size: int = 100,
    bpd_ode_solver: str = "rk4",
    bpd_ode_steps: int = 32,
    bpd_ode_divergence: str = "hutchinson",
    cache_dir: str = DEFAULT_CACHE_DIR,
    output_dir: str | None = None,
    step: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluates the workdir's model (EMA weights of the latest checkpoint, or `step`).

    Every argument, the sampler's settings and the places results are written to are checked
    before anything is computed (a ValueError, FileNotFoundError or `workdir.WorkdirError`).
    Sampling settings default to the config's `sampling` block (its step count and options
    only when `method` is the config's method). `batch_size` is the number of images per
    network call: samples and Inception batches hold that many, a bits/dim call holds
    batch_size // min(bpd_chunk_size, T) examples at min(bpd_chunk_size, T) timesteps each, an
    ODE likelihood call batch_size examples. `bpd_ode_*` are the ODE likelihood's solver, step
    count and divergence (`jaxdiff.likelihood.ode_log_likelihood`).
    `feature_extractor` (uint8 images [B, H, W, C] -> (features [B, D], logits [B, K])) replaces
    Inception-v3 for fid/is, e.g. a stand-in where pytorch-fid's weights cannot be had; reference
    statistics are cached by data set only, so give it its own `cache_dir` or `reference_stats`.
    The record {"step", "metrics", "settings", "pictures", "seconds", "pending"} is written to
    `output_dir/metrics_<step>.json` (default `workdir/eval`) as soon as each metric is known,
    "pending" naming those still to come; the complete record is returned.
    """
    names = check_metrics(metric_names)
    if ("fid" in names or "is" in names) and feature_extractor is None and (
            inception_weights is None or not os.path.exists(inception_weights)):
        raise FileNotFoundError(inception.missing_weights_message(inception_weights))
    for name, value, low in (("num_samples", num_samples, 2), ("batch_size", batch_size, 1),
                             ("bpd_chunk_size", bpd_chunk_size, 1), ("seed", seed, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    ode_options = dict(solver=bpd_ode_solver, num_steps=bpd_ode_steps,
                       divergence=bpd_ode_divergence)
    likelihood.check_options(**ode_options)
    if num_bpd_examples is not None and (not isinstance(num_bpd_examples, int)
                                         or num_bpd_examples < 1):
        raise ValueError(f"num_bpd_examples must be None (all) or an integer >= 1, got "
                         f"{num_bpd_examples!r}")
    if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
        raise FileNotFoundError(
            f"{workdir!r} is not a jaxdiff workdir (no {CONFIG_FILE}): train one with "
            "python -m jaxdiff.train --config experiments/<name>.py --workdir DIR, or write one "
            "with jaxdiff.checkpoint.export")
    config = read_config(workdir)
    _check_applicable(names, config)
    if step is None:
        _latest_step(workdir)  # a workdir without a checkpoint: say how to make one
    step, bundle = checkpoint.load_step(workdir, step)
    _check_applicable(names, config, bundle)
    points = get_dataset(config.data.dataset).points
    method, settings = sampler_settings(config, bundle, method, num_steps, eta, guidance_scale,
                                        sigmas)
    if any(METRICS[n].sampled for n in names):
        first = min(batch_size, num_samples)
        check_sample_args(bundle, method, num_samples=first, clip_denoised=not points,
                          labels=sample_labels(bundle, first), **settings)
    if "grid" in names and bundle.num_classes:  # the guidance sweep
        k = bundle.num_classes
        for w in guidance_scales:
            check_sample_args(bundle, method, num_samples=k, labels=np.arange(k),
                              return_trajectory=True, **dict(settings, guidance_scale=w))
    options = dict(num_samples=num_samples, batch_size=batch_size, seed=seed,
                   guidance_scales=guidance_scales, inception_weights=inception_weights,
                   feature_extractor=feature_extractor, reference_stats=reference_stats,
                   num_bpd_examples=num_bpd_examples, bpd_chunk_size=bpd_chunk_size,
                   ode_options=ode_options, cache_dir=cache_dir)
    out_dir = os.path.join(workdir, "eval") if output_dir is None else output_dir
    written = [out_dir] + [d for n in names for d in METRICS[n].caches(options)]
    for directory in dict.fromkeys(written):
        check_not_held(directory)
        check_writable(directory)

    start_time = time.time()
    path = os.path.join(out_dir, f"metrics_{step}.json")
    record: dict[str, Any] = {"step": int(step), "metrics": {}, "settings": {
        "method": method, **settings, "num_samples": num_samples, "seed": seed,
        "metrics": list(names), "num_bpd_examples": num_bpd_examples,
        "feature_network": None}, "pictures": [], "path": path}
    run = Evaluation(config, bundle, step, jax.random.key(seed), method, settings, options,
                     out_dir, record)
    for name in names:
        record["settings"].update(METRICS[name].settings(run))
    for name in METRICS:  # the registry's order: the likelihood first, the pictures last
        if name in names:
            record["metrics"].update(METRICS[name].compute(run))
            record["pending"] = [n for n in record.get("pending", names) if n != name]
            record["seconds"] = round(time.time() - start_time, 2)
            _write_json(path, {k: v for k, v in record.items() if k != "path"})
    return record


def _write_json(path: str, record: dict[str, Any]) -> None:
    """Writes `record` so that a reader sees the previous version or this one, never half."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)


def _pictures(run: Evaluation, rng: jax.Array) -> list[str]:
    samples, out_dir, step = run.drawn[0], run.out_dir, run.step
    bundle, method, settings = run.bundle, run.method, run.settings
    if run.points:
        reference, _ = toy2d_sample(run.config.data.toy_distribution, run.options["seed"] + 1,
                                    len(samples))
        return [pictures.save_scatter(samples, os.path.join(out_dir, f"scatter_{step}.png"),
                                      reference)]
    k = bundle.num_classes
    nrow = k if k else 10
    written = [pictures.save_grid(samples[: nrow * 10], os.path.join(out_dir,
                                                                     f"samples_{step}.png"), nrow)]
    trajectory_path = os.path.join(out_dir, f"trajectory_{step}.png")
    if not k:
        _, trajectory = sample(bundle, rng, method, num_samples=8, return_trajectory=True,
                               **settings)
        return written + [pictures.save_trajectory(trajectory, trajectory_path)]
    # One sampler call per scale, one sample per class from the same noise; the trajectory
    # picture (first 8 classes) is the run at the evaluation's own scale. One compilation.
    scales = list(dict.fromkeys([settings["guidance_scale"],
                                 *map(float, run.options["guidance_scales"])]))
    runs = {w: sample(bundle, rng, method, num_samples=k, return_trajectory=True,
                      labels=np.arange(k), **dict(settings, guidance_scale=w)) for w in scales}
    trajectory = {name: v[:, :8] for name, v in runs[settings["guidance_scale"]][1].items()}
    written.append(pictures.save_trajectory(trajectory, trajectory_path))
    sweep = np.stack([runs[float(w)][0] for w in run.options["guidance_scales"]])
    written.append(pictures.save_guidance_sweep(sweep, os.path.join(out_dir,
                                                                    f"guidance_{step}.png")))
    return written


def format_table(record: dict[str, Any]) -> str:
    """The metrics of an evaluation record as an aligned two-column text table."""
    rows = [(name, f"{value:.4f}") for name, value in record["metrics"].items()]
    rows += [("picture", p) for p in record["pictures"]]
    width = max([len(r[0]) for r in rows] + [6])
    lines = [f"{'metric':<{width}}  value", "-" * (width + 12)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


# `--workdir` means the same as in jaxdiff.train, which may be imported in the same process.
_WORKDIR = flags.DEFINE_string("workdir", None, "workdir of a trained or exported model",
                               allow_override=True)
_METRICS = flags.DEFINE_list("metrics", ["bpd", "grid"],
                             f"comma-separated subset of {tuple(METRICS)}")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1000, "samples for fid/is/digits_fid/swd/grid")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "images per network call (sampling, "
                                   "features; bpd: examples x timesteps)")
_METHOD = flags.DEFINE_string("method", None, "sampler (default: the config's)")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "sampling steps (default: the config's)")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (default: the config's)")
_SIGMAS = flags.DEFINE_list("sigmas", None, "noise levels of multistep consistency sampling, "
                            "decreasing, comma separated (default: the config's)")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "classifier-free guidance scale")
_SCALES = flags.DEFINE_list("guidance_scales", ["0", "1", "3"], "scales of the guidance sweep")
_WEIGHTS = flags.DEFINE_string(
    "inception_weights", None,
    f"pytorch-fid's Inception weights (.pth), from {inception.FID_WEIGHTS_URL}")
_REF = flags.DEFINE_string("reference_stats", None, "FID reference statistics .npz (mu, sigma)")
_BPD_EXAMPLES = flags.DEFINE_integer("num_bpd_examples", None, "test examples for bpd (all)")
_CHUNK = flags.DEFINE_integer("bpd_chunk_size", 100, "timesteps per network call in bpd")
_ODE_SOLVER = flags.DEFINE_string("bpd_ode_solver", "rk4", "bpd_ode's ODE solver, one of "
                                  f"{tuple(likelihood.SOLVERS)}")
_ODE_STEPS = flags.DEFINE_integer("bpd_ode_steps", 32, "bpd_ode's steps (fixed-step solvers)")
_ODE_DIVERGENCE = flags.DEFINE_string("bpd_ode_divergence", "hutchinson", "bpd_ode's divergence, "
                                      f"one of {tuple(likelihood.DIVERGENCES)}")
_CACHE = flags.DEFINE_string("cache_dir", DEFAULT_CACHE_DIR, "cache of reference statistics "
                             "and the digits classifier")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "where metrics_<step>.json and the "
                                  "pictures go (default: WORKDIR/eval)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of samples, bpd noise and pictures")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    try:
        record = evaluate(
            _WORKDIR.value, _METRICS.value, num_samples=_NUM_SAMPLES.value,
            batch_size=_BATCH_SIZE.value, method=_METHOD.value, num_steps=_NUM_STEPS.value,
            eta=_ETA.value, guidance_scale=_GUIDANCE.value,
            sigmas=None if _SIGMAS.value is None else [float(s) for s in _SIGMAS.value],
            guidance_scales=[float(s) for s in _SCALES.value],
            inception_weights=_WEIGHTS.value, reference_stats=_REF.value,
            num_bpd_examples=_BPD_EXAMPLES.value, bpd_chunk_size=_CHUNK.value,
            bpd_ode_solver=_ODE_SOLVER.value, bpd_ode_steps=_ODE_STEPS.value,
            bpd_ode_divergence=_ODE_DIVERGENCE.value,
            cache_dir=_CACHE.value, output_dir=_OUTPUT_DIR.value, step=_STEP.value,
            seed=_SEED.value)
    except (ValueError, FileNotFoundError, WorkdirError) as e:
        sys.exit(f"jaxdiff.evaluate: {e}")
    print(format_table(record))
    print(f"written to {record['path']}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
