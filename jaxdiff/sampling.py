"""Sampling requests: `jaxdiff.sample` and `jaxdiff.ddim_invert`, their checks, and the driver.

A request is checked whole (`check_sample_args` makes the same checks without sampling) before
anything compiles; its grid and tables come from the method's registry entry
(`jaxdiff.samplers`), and `_run` runs the method's step in one jitted `lax.scan`, once per static
configuration. Every model is read through the one denoiser (`jaxdiff.denoiser.predict`);
classifier guidance reads a noisy classifier through its own process.

Batches are sharded over all local devices along axis 0. num_samples need not divide by the device
count: the batch is padded to a multiple of it and the padding is dropped. With JAX's partitionable
threefry (`jax_threefry_partitionable`, the default) row i of a draw depends only on the key and i,
so sample i does not depend on num_samples, padding or the number of devices (a test checks it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff import guidance, parameterisations, samplers
from jaxdiff.bundle import DiffusionModel
from jaxdiff.compiler import inference_jit
from jaxdiff.denoiser import Prediction, apply_network, predict
from jaxdiff.diffusion import DEFAULT_MODEL_VAR_TYPE, check_model_var_type
from jaxdiff.models import network_param_shapes, param_shapes
from jaxdiff.models.classifier import Classifier
from jaxdiff.processes import NoiseProcess, check_process
from jaxdiff.samplers import Carry, StepContext
from jaxdiff.validation import check_int, check_scale


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the compiled sampler specialises on (hashable; arrays are passed separately)."""

    method: str
    model: Any  # flax Module or callable(params, x, t, y)
    classifier: Any  # flax Module, callable(params, x, t) or None
    model_output_type: str
    model_var_type: str
    sigma_data: float
    num_classes: int
    shape: tuple[int, ...]
    num_padded: int
    clip_denoised: bool
    cfg: bool
    draw_labels: bool
    has_x_init: bool
    return_trajectory: bool
    sharding: NamedSharding
    fixed_point_iterations: int = 0


def classifier_gradient(classifier, classifier_params, classifier_process, labels):
    """(x, level) -> grad_x log p(y | x) in the sampler's frame, the classifier read at its own
    process's point and time of the level (ADM's noisy classifier); None without a classifier."""
    if classifier is None:
        return None

    def classifier_grad(x, level):
        sigma = jnp.full(x.shape[:1], level["sigma"], x.dtype)
        t = classifier_process.t_of_sigma(sigma)
        alpha = classifier_process.alpha(t).reshape((-1,) + (1,) * (x.ndim - 1))
        return guidance.classifier_log_prob_grad(
            lambda x, t: apply_network(classifier, classifier_params,
                                       alpha * level["frame_scale"] * x, t),
            x, classifier_process.network_time(t), labels)

    return classifier_grad


def classifier_guided(pred: Prediction, x, level, grad, classifier_scale) -> Prediction:
    """`pred` at x (the sampler's frame) with eps shifted by the classifier's gradient `grad`
    (ADM arXiv 2105.05233 Alg. 2): the score of x_edm = x_0 + sigma eps is -eps / sigma, and
    guidance adds s grad log p."""
    grad_edm = grad / level["frame_scale"]
    eps = guidance.condition_eps(pred.eps, grad_edm, classifier_scale, level["sigma"])
    return Prediction(x * level["frame_scale"] - level["sigma"] * eps, eps, pred.var_out)


def guided_denoiser(static: _Static, params, process, labels, guidance_scale, classifier_params,
                    classifier_process, classifier_scale):
    """(denoise(x, level) -> Prediction, the classifier's gradient or None) of a request: the
    model through the one denoiser at the level, x in the sampler's frame, with classifier-free
    guidance and, for a method that guides eps, the classifier's (ADM Alg. 2)."""
    sampler = samplers.get(static.method)
    param = parameterisations.get(static.model_output_type)
    y = labels if static.num_classes > 0 else None

    def network(x, t, y):
        return apply_network(static.model, params, x, t, y)

    def model_output(x, t):
        if static.cfg:
            return guidance.classifier_free_output(
                network, x, t, y, null_label=static.num_classes, guidance_scale=guidance_scale,
                model_var_type=static.model_var_type)
        return network(x, t, y)

    classifier_grad = classifier_gradient(static.classifier, classifier_params,
                                          classifier_process, labels)

    def denoise(x, level) -> Prediction:
        """(x_0, eps) of the model at `level` for x in the sampler's frame (ADM Alg. 2 guided)."""
        pred = predict(model_output, param, process, x * level["frame_scale"], level["sigma"],
                       sigma_data=static.sigma_data, model_var_type=static.model_var_type,
                       clip=static.clip_denoised)
        if classifier_grad is None or sampler.classifier_guidance != "eps":
            return pred
        return classifier_guided(pred, x, level, classifier_grad(x, level), classifier_scale)

    return denoise, classifier_grad


@inference_jit(static_argnames=("static",))
def _run(static: _Static, params, process, chain, tables, init_scale, rng, labels, x_init,
         guidance_scale, classifier_params, classifier_process, classifier_scale):
    sampler = samplers.get(static.method)
    batch_shape = (static.num_padded, *static.shape)
    if rng is not None:  # ddim_invert is deterministic and passes none
        init_key, step_key, label_key = jax.random.split(rng, 3)

    if static.draw_labels:
        labels = jax.lax.with_sharding_constraint(
            jax.random.randint(label_key, batch_shape[:1], 0, static.num_classes), static.sharding)
    denoise, classifier_grad = guided_denoiser(static, params, process, labels, guidance_scale,
                                               classifier_params, classifier_process,
                                               classifier_scale)

    def noise(step):
        return jax.lax.with_sharding_constraint(
            jax.random.normal(jax.random.fold_in(step_key, step), batch_shape), static.sharding)

    x = x_init if static.has_x_init else jax.random.normal(init_key, batch_shape)
    x = jax.lax.with_sharding_constraint(x * init_scale, static.sharding)

    ctx = StepContext(denoise, classifier_grad if sampler.classifier_guidance == "mean" else None,
                      classifier_scale, noise, chain, static.model_var_type,
                      static.fixed_point_iterations)

    def body(carry, row):
        carry, trajectory = sampler.step(ctx, carry, row)
        return carry, trajectory if static.return_trajectory else None

    carry, trajectory = jax.lax.scan(body, Carry(x, jnp.zeros_like(x), jnp.int32(0)), tables)
    return carry.x, trajectory


@functools.cache
def _batch_sharding(devices: tuple) -> NamedSharding:
    return NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))


# ----------------------------------------------------------------------------------------------
# Public API


class _Resolved(NamedTuple):
    params: Any
    model: Any
    process: NoiseProcess
    shape: tuple[int, ...]
    model_output_type: str
    model_var_type: str
    sigma_data: float
    num_classes: int


def _resolve(params, model, schedule, shape, model_output_type, model_var_type, sigma_data,
             num_classes) -> _Resolved:
    """Fields of a DiffusionModel, overridden by whatever is given explicitly."""
    if isinstance(params, (str, bytes)) or hasattr(params, "__fspath__"):
        raise ValueError(f"params={params!r} is a path: load the workdir first, "
                         f"`jaxdiff.sample(jaxdiff.load({str(params)!r}), rng, ...)`")
    if isinstance(params, DiffusionModel):
        bundle = params
        if isinstance(bundle.model, Classifier):
            raise ValueError("this model is a noisy classifier, not a denoiser: it cannot draw "
                             "samples; pass it as `classifier=` to guide a diffusion model")
        resolved = _Resolved(
            bundle.params, bundle.model if model is None else model,
            bundle.schedule if schedule is None else schedule,
            tuple(bundle.image_shape if shape is None else shape),
            model_output_type or bundle.model_output_type,
            model_var_type or bundle.model_var_type,
            bundle.sigma_data if sigma_data is None else sigma_data,
            bundle.num_classes if num_classes is None else num_classes)
    else:
        for name, value in (("model", model), ("schedule", schedule), ("shape", shape)):
            if value is None:
                raise ValueError(f"{name}=None: a raw parameter tree needs explicit model=, "
                                 "schedule= and shape= (or pass a jaxdiff.bundle.DiffusionModel)")
        resolved = _Resolved(params, model, schedule, tuple(shape), model_output_type or "eps",
                             model_var_type or DEFAULT_MODEL_VAR_TYPE,
                             0.5 if sigma_data is None else sigma_data, num_classes or 0)
    parameterisations.get(resolved.model_output_type)
    check_model_var_type(resolved.model_var_type)
    check_process(resolved.process)
    check_int("num_classes", resolved.num_classes, 0)
    if not (isinstance(resolved.sigma_data, (int, float)) and resolved.sigma_data > 0):
        raise ValueError(f"sigma_data must be a number > 0, got {resolved.sigma_data!r}")
    if not callable(resolved.model):
        raise ValueError(f"model must be a flax Module or a callable, got {resolved.model!r}")
    if isinstance(resolved.model, nn.Module):
        _check_params(resolved)
    return resolved


def _check_params(res: _Resolved) -> None:
    """A clear error, before compiling, when the weights are not those of this network."""
    expected = network_param_shapes(res.model, res.shape, res.num_classes)
    got = param_shapes(res.params)
    if got == expected:
        return
    missing = sorted(set(expected) - set(got))
    surplus = sorted(set(got) - set(expected))
    wrong = [f"{k}: {got[k]} (expected {expected[k]})" for k in sorted(set(got) & set(expected))
             if got[k] != expected[k]]
    problems = [f"missing {missing[:3]}" if missing else "",
                f"unexpected {surplus[:3]}" if surplus else "",
                f"wrong shapes {wrong[:3]}" if wrong else ""]
    raise ValueError("params do not fit the model (a checkpoint of another architecture?): "
                     + "; ".join(p for p in problems if p)
                     + f" ({len(missing)} missing, {len(surplus)} unexpected, {len(wrong)} "
                     "wrongly shaped in all)")


def _check_labels(labels, num_samples: int, res: _Resolved, classifier, classifier_params,
                  guidance_scale: float) -> np.ndarray | None:
    """Labels as int32 [num_samples]; classes 0..num_classes-1, num_classes = the null label."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (num_samples,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({num_samples},), "
                         f"got dtype {labels.dtype} and shape {labels.shape}")
    if res.num_classes == 0 and classifier is None:
        raise ValueError("labels given to an unconditional model (num_classes=0) "
                         "without a classifier")
    if res.num_classes > 0:
        high = res.num_classes - 1 if guidance_scale > 0 else res.num_classes
        bad = labels[(labels < 0) | (labels > high)]
        if bad.size:
            raise ValueError(f"labels must lie in [0, {high}] (num_classes={res.num_classes}), "
                             f"got {bad[0]}")
    if classifier is not None:
        logits = jax.eval_shape(lambda: apply_network(classifier, classifier_params,
                                               jnp.zeros((1, *res.shape)), jnp.zeros((1,), int)))
        bad = labels[(labels < 0) | (labels >= logits.shape[-1])]
        if bad.size:
            raise ValueError(f"labels must lie in [0, {logits.shape[-1] - 1}] for a classifier "
                             f"with {logits.shape[-1]} classes, got {bad[0]}")
    return labels.astype(np.int32)


def _pad(array: np.ndarray | jax.Array | None, num_padded: int):
    if array is None or array.shape[0] == num_padded:
        return array
    pad = [(0, num_padded - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
    return np.pad(np.asarray(array), pad)


def _resolve_classifier(classifier, classifier_params, process: NoiseProcess):
    """(network, weights, process) of the classifier: a loaded classifier workdir stands for all
    three; a raw network is read on the model's process. A denoiser is refused."""
    if isinstance(classifier, DiffusionModel):
        if not isinstance(classifier.model, Classifier):
            raise ValueError("classifier= got a diffusion model (a denoiser); pass the bundle of "
                             "a noisy classifier, e.g. jaxdiff.load(<classifier workdir>)")
        if classifier_params is None:
            classifier_params = classifier.params
        return classifier.model, classifier_params, classifier.schedule
    return classifier, classifier_params, process


def _check_rng(rng) -> None:
    """A PRNG key: a typed key array or raw uint32 [2] key data."""
    if isinstance(rng, jax.Array | np.ndarray) and (
            jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
            or (rng.dtype == np.uint32 and rng.shape == (2,))):
        return
    raise ValueError(f"rng must be a JAX PRNG key (jax.random.key(seed) or "
                     f"jax.random.PRNGKey(seed)), got {rng!r}")


class _Plan(NamedTuple):
    """A checked request: what `_run` is called with, less the key."""

    static: _Static
    params: Any
    process: NoiseProcess
    chain: Any  # ddpm: the chain through the grid (a `Schedule`), else None
    tables: dict
    init_scale: float
    labels: np.ndarray | None
    x_init: Any
    num_samples: int
    guidance_scale: float
    classifier_params: Any
    classifier_process: NoiseProcess
    classifier_scale: float


def _prepare(params, method, *, num_samples=None, num_steps=None, labels=None,
             guidance_scale=0.0, classifier=None, classifier_params=None, classifier_scale=1.0,
             clip_denoised=True, return_trajectory=False, model=None, schedule=None, shape=None,
             model_output_type=None, model_var_type=None, num_classes=None, sigma_data=None,
             x_T=None, fixed_point_iterations=0, **options) -> _Plan:
    """Every check of `sample` (and `ddim_invert`), and the tables; compiles nothing."""
    sampler = samplers.get(method)
    res = _resolve(params, model, schedule, shape, model_output_type, model_var_type,
                   sigma_data, num_classes)
    options = samplers.resolve_options(method, res.process, options)
    classifier, classifier_params, classifier_process = _resolve_classifier(
        classifier, classifier_params, res.process)
    if x_T is not None:
        x_T_shape = tuple(np.shape(x_T))
        if len(x_T_shape) != len(res.shape) + 1 or x_T_shape[1:] != res.shape:
            raise ValueError(f"x_T must have shape [B, *{res.shape}], got {x_T_shape}")
        if num_samples is not None and num_samples != x_T_shape[0]:
            raise ValueError(f"num_samples={num_samples} but x_T holds {x_T_shape[0]} samples")
        num_samples = x_T_shape[0]
    num_samples = check_int("num_samples", 16 if num_samples is None else num_samples, 1)
    num_steps = sampler.num_steps(res.process, options, num_steps)
    guidance_scale = check_scale("guidance_scale", guidance_scale)
    classifier_scale = check_scale("classifier_scale", classifier_scale)
    fixed_point_iterations = check_int("fixed_point_iterations", fixed_point_iterations, 0)
    if guidance_scale > 0 and labels is None:
        raise ValueError(f"guidance_scale={guidance_scale} (classifier-free guidance) needs labels")
    if guidance_scale > 0 and res.num_classes == 0:
        raise ValueError(f"guidance_scale={guidance_scale}: classifier-free guidance needs a "
                         "class-conditional model, got num_classes=0")
    if classifier is not None and (classifier_params is None or labels is None):
        raise ValueError("classifier guidance needs classifier_params and labels, got "
                         f"classifier_params={'None' if classifier_params is None else 'set'}, "
                         f"labels={'None' if labels is None else 'set'}")
    if method == "ddim_inversion" and res.num_classes > 0 and labels is None:
        raise ValueError(f"a class-conditional model (num_classes={res.num_classes}) needs labels "
                         "to invert (use num_classes as the null label)")
    labels = _check_labels(labels, num_samples, res, classifier, classifier_params, guidance_scale)

    grid = samplers.build_grid(res.process, method, num_steps, options)
    tables = sampler.tables(res.process, grid, options)
    devices = tuple(jax.local_devices())
    static = _Static(
        method=method, model=res.model, classifier=classifier,
        model_output_type=res.model_output_type, model_var_type=res.model_var_type,
        sigma_data=float(res.sigma_data), num_classes=res.num_classes, shape=res.shape,
        num_padded=-(-num_samples // len(devices)) * len(devices),
        clip_denoised=bool(clip_denoised), cfg=guidance_scale > 0,
        draw_labels=labels is None and res.num_classes > 0,
        has_x_init=x_T is not None, return_trajectory=bool(return_trajectory),
        sharding=_batch_sharding(devices), fixed_point_iterations=fixed_point_iterations)
    return _Plan(static, res.params, res.process,
                 samplers.chain(grid) if sampler.walks_chain else None,
                 tables, float(grid.sigma[0]) if sampler.frame == "ve" else 1.0, labels, x_T,
                 num_samples, guidance_scale, classifier_params, classifier_process,
                 classifier_scale)


def _table_dtype(v: np.ndarray):
    v = np.asarray(v)
    if np.issubdtype(v.dtype, np.floating):
        return v.astype(np.float32)
    return v.astype(np.int32) if np.issubdtype(v.dtype, np.integer) else v


def _execute(plan: _Plan, rng):
    static = plan.static
    replicated = NamedSharding(static.sharding.mesh, PartitionSpec())
    params, process, chain, classifier_params, classifier_process = jax.device_put(
        (plan.params, plan.process, plan.chain, plan.classifier_params,
         plan.classifier_process), replicated)
    tables = jax.tree.map(_table_dtype, plan.tables)
    labels = None if plan.labels is None else jax.device_put(
        _pad(plan.labels, static.num_padded), static.sharding)
    x_init = plan.x_init
    if x_init is not None:
        x_init = jax.device_put(_pad(jnp.asarray(x_init, jnp.float32), static.num_padded),
                                static.sharding)
    x, trajectory = _run(static, params, process, chain, tables, jnp.float32(plan.init_scale),
                         rng, labels, x_init, jnp.float32(plan.guidance_scale),
                         classifier_params, classifier_process,
                         jnp.float32(plan.classifier_scale))
    n = plan.num_samples
    if trajectory is None:
        return x[:n]
    xt, pred_x0 = trajectory
    return x[:n], {"xt": xt[:, :n], "pred_x0": pred_x0[:, :n]}


def _sampling_method(method: str) -> None:
    """`samplers.get`, less the private "ddim_inversion" (reached through `ddim_invert`)."""
    if method == "ddim_inversion":
        raise ValueError(f"unknown sampling method {method!r}; expected one of "
                         f"{tuple(samplers.SAMPLERS)}; encode with jaxdiff.ddim_invert")
    samplers.get(method)


def check_sample_args(params, method: str = "ddim", **kwargs) -> None:
    """Every check `sample(params, rng, method, **kwargs)` makes, without sampling or compiling:
    a ValueError naming the first bad value, None when the request is good."""
    _sampling_method(method)
    _prepare(params, method, **kwargs)


def sample(
    params,
    rng: jax.Array,
    method: str = "ddim",
    *,
    num_samples: int | None = None,
    num_steps: int | None = None,
    labels=None,
    guidance_scale: float = 0.0,
    classifier=None,
    classifier_params=None,
    classifier_scale: float = 1.0,
    clip_denoised: bool = True,
    return_trajectory: bool = False,
    model=None,
    schedule: NoiseProcess | None = None,
    shape: tuple[int, ...] | None = None,
    model_output_type: str | None = None,
    model_var_type: str | None = None,
    num_classes: int | None = None,
    sigma_data: float | None = None,
    x_T=None,
    **options,
):
    """Draw samples from p_theta(x_0) (or p_theta(x_0 | y)) with one jitted `lax.scan`.

    params: a `DiffusionModel` (e.g. `jaxdiff.load(workdir)`), or a raw parameter tree together
    with `model=` (a flax Module called `apply({"params": p}, x, t, y, train=False)` or a
    callable `model(p, x, t, y)`), `schedule=` (any `jaxdiff.processes.NoiseProcess`) and
    `shape=` (one example's shape); for a raw tree the output type defaults to "eps", the
    variance type to "fixed_small", sigma_data to 0.5 and num_classes to 0. Explicit keywords
    override a bundle.
    method: a name in `SAMPLERS` — "ddpm" (default steps: the whole chain), "ddim" (50),
    "dpm_solver++" (20), "heun" (18 steps, 35 network calls), "euler" (50), "euler_ancestral"
    (50), "consistency" (one step per level of `sigmas`). `**options` are the method's own
    (`SAMPLERS[method].options`, with their defaults): `eta` (ddim in [0, 1]; euler_ancestral),
    `spacing` ("uniform", "quad", "logsnr", "karras"), `rho`, `sigma_min`, `sigma_max` (the
    Karras grid), `s_churn`, `s_min`, `s_max`, `s_noise` (EDM's stochastic sampler), `sigmas`
    (consistency: the levels of Alg. 1, default (sigma_max,); ddim: its grid in place of the
    spacing's, e.g. a progressive-distillation student's). An option a method does not take is
    an error.
    labels: int [num_samples] for a class-conditional model (default: uniform random classes;
    num_classes itself is the null label) and/or the target classes of classifier guidance.
    guidance_scale w > 0: classifier-free guidance. classifier (a flax Module with
    classifier_params, or a loaded classifier workdir) and classifier_scale s: classifier
    guidance, ADM Alg. 1 for ddpm, Alg. 2 for the others.
    num_samples: default 16, or x_T's batch when x_T (the starting N(0, I) draw, e.g. from
    `ddim_invert`) is given. Returns float32 samples [num_samples, *shape] (in [-1, 1] when
    clip_denoised), and with return_trajectory also {"xt", "pred_x0"}, each [num_steps,
    num_samples, *shape]: the input of every step (in the method's frame) and the denoised
    estimate made there. The batch is sharded over `jax.local_devices()` (padded to a multiple of
    their number); sample i depends only on (rng, i), not on num_samples or the device count.
    """
    _sampling_method(method)
    plan = _prepare(params, method, num_samples=num_samples, num_steps=num_steps, labels=labels,
                    guidance_scale=guidance_scale, classifier=classifier,
                    classifier_params=classifier_params, classifier_scale=classifier_scale,
                    clip_denoised=clip_denoised, return_trajectory=return_trajectory,
                    model=model, schedule=schedule, shape=shape,
                    model_output_type=model_output_type, model_var_type=model_var_type,
                    num_classes=num_classes, sigma_data=sigma_data, x_T=x_T, **options)
    _check_rng(rng)
    return _execute(plan, rng)


def ddim_invert(
    params,
    x0,
    *,
    num_steps: int = 50,
    spacing: str | None = None,
    labels=None,
    guidance_scale: float = 0.0,
    fixed_point_iterations: int = 0,
    return_trajectory: bool = False,
    model=None,
    schedule: NoiseProcess | None = None,
    model_output_type: str | None = None,
    model_var_type: str | None = None,
    num_classes: int | None = None,
    sigma_data: float | None = None,
):
    """Encode x_0 -> x_T along the deterministic DDIM ODE (DDIM Sec. 4.3, eta = 0, Eq. 12 forward).

    Decoding with `sample(params, rng, "ddim", x_T=x_T, num_steps=..., spacing=..., eta=0,
    clip_denoised=False)` and the same steps returns x_0 up to the ODE's discretisation error
    (about 1e-2 for T = 1000 even at 1000 steps); each of `fixed_point_iterations` (one extra
    network call per step) makes every step the exact inverse of its decoding step, shrinking
    the round-trip error geometrically. x0_hat is never clipped here: that would break
    invertibility. A conditional model needs `labels` (num_classes = null label = unconditional).
    Returns x_T [B, *shape] (with return_trajectory also the trajectory, as `sample`).
    """
    x0 = jnp.asarray(x0, jnp.float32)
    shape = None if isinstance(params, DiffusionModel) else x0.shape[1:]
    if x0.ndim < 1:
        raise ValueError(f"x0 must be batched, [B, ...], got shape {x0.shape}")
    plan = _prepare(params, "ddim_inversion", num_samples=x0.shape[0], num_steps=num_steps,
                    labels=labels, guidance_scale=guidance_scale, clip_denoised=False,
                    return_trajectory=return_trajectory, model=model, schedule=schedule,
                    shape=shape, model_output_type=model_output_type,
                    model_var_type=model_var_type, num_classes=num_classes,
                    sigma_data=sigma_data, x_T=x0, fixed_point_iterations=fixed_point_iterations,
                    spacing=spacing)
    return _execute(plan, None)
