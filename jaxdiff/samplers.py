"""Samplers: one pure step function per method, one `lax.scan` driver, and `jaxdiff.sample`.

Every method is a step `(ctx, carry, table_row) -> (carry, (x_t, pred_x0))` scanned over per-step
tables that are computed once on the host in float64 (timesteps, a_bar, DDIM sigmas, DPM-Solver++
coefficients). The number of steps is therefore only the scan length: the whole sampler is jitted
once per static configuration and never recompiles for new keys, weights, scales or eta.

Methods: `ddpm` (DDPM arXiv 2006.11239 Alg. 2, any variance type, full or respaced chain),
`ddim` (DDIM arXiv 2010.02502 Eq. 12 with eta), `dpm_solver++` (DPM-Solver++(2M), arXiv
2211.01095 Alg. 2) and `ddim_invert` (the DDIM ODE run forward, x_0 -> x_T). A respaced sampler
always feeds the network the ORIGINAL timesteps.

Batches are sharded over all local devices along axis 0. num_samples need not divide by the device
count: the batch is padded to a multiple of it and the padding is dropped. With JAX's partitionable
threefry (`jax_threefry_partitionable`, the default) row i of a draw depends only on the key and i,
so sample i does not depend on num_samples, padding or the number of devices (a test checks it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff import guidance
from jaxdiff.bundle import DiffusionModel
from jaxdiff.compiler import inference_jit
from jaxdiff.diffusion import check_model_output, check_model_var_type, p_mean_variance
from jaxdiff.schedules import SPACINGS, Schedule, respace, spaced_timesteps

METHODS = ("ddpm", "ddim", "dpm_solver++")
SAMPLER_SPACINGS = (*SPACINGS, "logsnr")
_DEFAULT_STEPS = {"ddim": 50, "dpm_solver++": 20}  # ddpm: the full chain, T steps


# ----------------------------------------------------------------------------------------------
# Step tables (host, float64)


def sampling_timesteps(schedule: Schedule, num_steps: int, spacing: str = "uniform") -> np.ndarray:
    """Increasing original timesteps tau (last = T-1) of a sampler with num_steps network calls.

    `uniform` and `quad` are DDIM's spacings (`schedules.spaced_timesteps`); `logsnr` spaces
    lambda = log(alpha / sigma) evenly between lambda(T-1) and lambda(0), DPM-Solver's choice
    (arXiv 2206.00927), rounded to the nearest integer timestep.
    """
    T = schedule.num_timesteps
    if spacing != "logsnr":
        return spaced_timesteps(T, num_steps, spacing)
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must lie in [1, T={T}], got {num_steps}")
    lam = _log_snr(np.asarray(schedule.alphas_cumprod, np.float64))  # decreasing in t
    grid = np.linspace(lam[0], lam[-1], num_steps)
    steps = np.searchsorted(-lam, -grid)  # first t with lambda(t) <= grid point
    below = np.clip(steps - 1, 0, T - 1)
    steps = np.clip(steps, 0, T - 1)
    steps = np.where(np.abs(lam[below] - grid) < np.abs(lam[steps] - grid), below, steps)
    steps[-1] = T - 1
    ramp = np.arange(num_steps)
    # Rounding can merge neighbours: push them apart, keeping room for the ones above.
    steps = np.maximum.accumulate(steps - ramp) + ramp
    return np.minimum(steps, T - num_steps + ramp)


def _log_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """lambda = log(alpha / sigma) = 0.5 log(a_bar / (1 - a_bar)) (DPM-Solver notation)."""
    return 0.5 * (np.log(alphas_cumprod) - np.log1p(-alphas_cumprod))


def _ddpm_tables(schedule: Schedule, timesteps: np.ndarray) -> tuple[Schedule, dict]:
    """The (respaced) schedule and, per step from noise to data, its index and the original t."""
    num_steps = len(timesteps)
    steps = schedule if num_steps == schedule.num_timesteps else respace(schedule, timesteps)
    index = np.arange(num_steps)[::-1]
    return steps, {"index": index, "t": timesteps[::-1]}


def _ddim_tables(schedule: Schedule, timesteps: np.ndarray, eta: float) -> dict:
    """a_bar_prev and sigma_t = eta sqrt((1-a_prev)/(1-a)) sqrt(1 - a/a_prev) (DDIM Eq. 16)."""
    a_bar = np.asarray(schedule.alphas_cumprod, np.float64)[timesteps]
    a_prev = np.append(1.0, a_bar[:-1])
    sigma = eta * np.sqrt((1.0 - a_prev) / (1.0 - a_bar) * (1.0 - a_bar / a_prev))
    rows = {"t": timesteps, "alphas_cumprod_prev": a_prev, "sigma": sigma}
    return {k: v[::-1] for k, v in rows.items()}


def _dpm_solver_pp_tables(schedule: Schedule, timesteps: np.ndarray) -> dict:
    """Coefficients of DPM-Solver++(2M) (arXiv 2211.01095 Alg. 2) from tau[-1] = T-1 to clean data.

    Step i evaluates D_i = x0_theta(x_{t_i}, t_i) and moves to t_{i+1}:
    x_{t_{i+1}} = (sigma_{i+1} / sigma_i) x_{t_i} + alpha_{i+1} (1 - e^{-h}) D,
    D = D_i + (D_i - D_{i-1}) / (2 r), h = lambda_{i+1} - lambda_i, r = h_{i-1} / h. The first step
    is first order (no D_{-1}), and so are the last two (DPM-Solver's `lower_order_final`): the
    last goes to sigma = 0 (h = inf, x_0 = D_i), and the one before it into t = 0 has a tiny r on
    a uniform time grid (0.19 at 20 steps), where the 2M extrapolation overshoots.
    """
    a_bar = np.asarray(schedule.alphas_cumprod, np.float64)[timesteps][::-1]
    alpha, sigma, lam = np.sqrt(a_bar), np.sqrt(1.0 - a_bar), _log_snr(a_bar)
    num_steps = len(timesteps)
    ratio, coef, correction = np.zeros(num_steps), np.ones(num_steps), np.zeros(num_steps)
    h = np.diff(lam)
    ratio[:-1] = sigma[1:] / sigma[:-1]
    coef[:-1] = -alpha[1:] * np.expm1(-h)
    correction[1:-2] = 0.5 * h[1:-1] / h[:-2]  # 1 / (2 r)
    return {"t": timesteps[::-1], "ratio": ratio, "coef": coef, "correction": correction}


def _ddim_inversion_tables(schedule: Schedule, timesteps: np.ndarray) -> dict:
    """The DDIM ODE steps run backwards: clean (a_bar = 1) -> tau_0 -> ... -> tau_{S-1} = T-1.

    The step into tau_i first evaluates eps at the level it leaves (tau_{i-1}; tau_0 for clean
    data), then optionally at the level it reaches (`t_next`, fixed-point refinement).
    """
    a_bar = np.asarray(schedule.alphas_cumprod, np.float64)[timesteps]
    return {"t": np.append(timesteps[0], timesteps[:-1]), "t_next": timesteps,
            "alphas_cumprod": np.append(1.0, a_bar[:-1]), "alphas_cumprod_next": a_bar}


# ----------------------------------------------------------------------------------------------
# Step functions


class StepContext(NamedTuple):
    """What a step needs besides its carry and table row (closures over params and labels)."""

    schedule: Schedule  # the schedule the table's `index` points into
    model_output: Callable[[jax.Array, jax.Array], jax.Array]  # (x, original t) -> output
    classifier_grad: Callable[[jax.Array, jax.Array], jax.Array] | None
    classifier_scale: jax.Array
    noise: Callable[[jax.Array], jax.Array]  # scan step number -> per-sample N(0, I)
    model_output_type: str
    model_var_type: str
    clip_denoised: bool
    fixed_point_iterations: int = 0  # ddim_invert only


class Carry(NamedTuple):
    x: jax.Array
    pred_x0: jax.Array  # previous step's estimate (DPM-Solver++ multistep memory)
    step: jax.Array


def _eps_and_x0(ctx: StepContext, x: jax.Array, t: jax.Array):
    """(x0_hat, eps_hat) at (x_t, original t); classifier guidance in its eps form (ADM Alg. 2)."""
    out = p_mean_variance(ctx.schedule, ctx.model_output(x, t), x, t,
                          model_output_type=ctx.model_output_type,
                          model_var_type=ctx.model_var_type, clip_denoised=ctx.clip_denoised)
    pred_x0, eps = out.pred_x0, out.pred_eps
    if ctx.classifier_grad is not None:
        sqrt_1m = ctx.schedule.sqrt_one_minus_alphas_cumprod[t].reshape((-1,) + (1,) * (x.ndim - 1))
        eps = guidance.condition_eps(eps, ctx.classifier_grad(x, t), ctx.classifier_scale, sqrt_1m)
        sqrt_a = ctx.schedule.sqrt_alphas_cumprod[t].reshape(sqrt_1m.shape)
        pred_x0 = (x - sqrt_1m * eps) / sqrt_a
    return pred_x0, eps


def ddpm_step(ctx: StepContext, carry: Carry, row: dict):
    """x_{t-1} = mu_theta(x_t, t) + Sigma^{1/2} z, no noise at the last step (DDPM Alg. 2)."""
    x = carry.x
    index = jnp.full(x.shape[:1], row["index"])
    out = p_mean_variance(ctx.schedule, ctx.model_output(x, jnp.full(x.shape[:1], row["t"])), x,
                          index, model_output_type=ctx.model_output_type,
                          model_var_type=ctx.model_var_type, clip_denoised=ctx.clip_denoised)
    mean = out.mean
    if ctx.classifier_grad is not None:
        grad = ctx.classifier_grad(x, jnp.full(x.shape[:1], row["t"]))
        mean = guidance.condition_mean(mean, out.variance, grad, ctx.classifier_scale)
    nonzero = (row["index"] > 0).astype(x.dtype)
    x_prev = mean + nonzero * jnp.exp(0.5 * out.log_variance) * ctx.noise(carry.step)
    return Carry(x_prev, out.pred_x0, carry.step + 1), (x, out.pred_x0)


def ddim_step(ctx: StepContext, carry: Carry, row: dict):
    """x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z (DDIM Eq. 12)."""
    x = carry.x
    pred_x0, eps = _eps_and_x0(ctx, x, jnp.full(x.shape[:1], row["t"]))
    a_prev, sigma = row["alphas_cumprod_prev"], row["sigma"]
    direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0)) * eps
    x_prev = jnp.sqrt(a_prev) * pred_x0 + direction + sigma * ctx.noise(carry.step)
    return Carry(x_prev, pred_x0, carry.step + 1), (x, pred_x0)


def dpm_solver_pp_step(ctx: StepContext, carry: Carry, row: dict):
    """One DPM-Solver++(2M) step in data prediction (arXiv 2211.01095 Alg. 2; see the tables)."""
    x = carry.x
    pred_x0, _ = _eps_and_x0(ctx, x, jnp.full(x.shape[:1], row["t"]))
    data = pred_x0 + row["correction"] * (pred_x0 - carry.pred_x0)
    x_next = row["ratio"] * x + row["coef"] * data
    return Carry(x_next, pred_x0, carry.step + 1), (x, pred_x0)


def ddim_inversion_step(ctx: StepContext, carry: Carry, row: dict):
    """x_next = sqrt(a_next) x0_hat + sqrt(1 - a_next) eps_hat: DDIM Eq. 12 (eta = 0) forward.

    Plain inversion takes eps where the step starts, so a round trip is off by O(h^2) per step.
    Each fixed-point iteration re-evaluates eps at the arrival point x_next, whose DDIM decoding
    step then returns to x exactly once the iteration converges (fixed-point inversion, AIDI).
    """
    x = carry.x
    a, a_next = row["alphas_cumprod"], row["alphas_cumprod_next"]

    def step_with(eps):
        pred_x0 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
        return jnp.sqrt(a_next) * pred_x0 + jnp.sqrt(1.0 - a_next) * eps, pred_x0

    x_next, pred_x0 = step_with(_eps_and_x0(ctx, x, jnp.full(x.shape[:1], row["t"]))[1])
    if ctx.fixed_point_iterations:
        t_next = jnp.full(x.shape[:1], row["t_next"])
        x_next, pred_x0 = jax.lax.fori_loop(
            0, ctx.fixed_point_iterations,
            lambda _, state: step_with(_eps_and_x0(ctx, state[0], t_next)[1]), (x_next, pred_x0))
    return Carry(x_next, pred_x0, carry.step + 1), (x, pred_x0)


_STEPS = {"ddpm": ddpm_step, "ddim": ddim_step, "dpm_solver++": dpm_solver_pp_step,
          "ddim_inversion": ddim_inversion_step}


# ----------------------------------------------------------------------------------------------
# The driver: one jitted function per static configuration


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the compiled sampler specialises on (hashable; arrays are passed separately)."""

    method: str
    model: Any  # flax Module or callable(params, x, t, y)
    classifier: Any  # flax Module, callable(params, x, t) or None
    model_output_type: str
    model_var_type: str
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


def _apply(fn, params, *args):
    """A flax Module's `apply({"params": p}, *args, train=False)` or a plain `fn(params, *args)`."""
    if isinstance(fn, nn.Module):
        return fn.apply({"params": params}, *args, train=False)
    return fn(params, *args)


@inference_jit(static_argnames=("static",))
def _run(static: _Static, params, schedule, tables, rng, labels, x_init, guidance_scale,
         classifier_params, classifier_scale):
    batch_shape = (static.num_padded, *static.shape)
    if rng is not None:  # ddim_invert is deterministic and passes none
        init_key, step_key, label_key = jax.random.split(rng, 3)

    if static.draw_labels:
        labels = jax.lax.with_sharding_constraint(
            jax.random.randint(label_key, batch_shape[:1], 0, static.num_classes), static.sharding)
    y = labels if static.num_classes > 0 else None

    def network(x, t, y):
        return _apply(static.model, params, x, t, y)

    def model_output(x, t):
        if static.cfg:
            return guidance.classifier_free_output(
                network, x, t, y, null_label=static.num_classes, guidance_scale=guidance_scale,
                model_var_type=static.model_var_type)
        return network(x, t, y)

    classifier_grad = None
    if static.classifier is not None:
        def classifier_grad(x, t):
            return guidance.classifier_log_prob_grad(
                lambda x, t: _apply(static.classifier, classifier_params, x, t), x, t, labels)

    def noise(step):
        return jax.lax.with_sharding_constraint(
            jax.random.normal(jax.random.fold_in(step_key, step), batch_shape), static.sharding)

    x = x_init if static.has_x_init else jax.random.normal(init_key, batch_shape)
    x = jax.lax.with_sharding_constraint(x, static.sharding)

    ctx = StepContext(schedule, model_output, classifier_grad, classifier_scale, noise,
                      static.model_output_type, static.model_var_type, static.clip_denoised,
                      static.fixed_point_iterations)
    step = _STEPS[static.method]

    def body(carry, row):
        carry, trajectory = step(ctx, carry, row)
        return carry, trajectory if static.return_trajectory else None

    carry, trajectory = jax.lax.scan(body, Carry(x, jnp.zeros_like(x), jnp.int32(0)), tables)
    return carry.x, trajectory


@functools.cache
def _batch_sharding(devices: tuple) -> NamedSharding:
    return NamedSharding(Mesh(np.array(devices), ("batch",)), PartitionSpec("batch"))


# ----------------------------------------------------------------------------------------------
# Public API


class _Resolved(NamedTuple):
    params: Any
    model: Any
    schedule: Schedule
    shape: tuple[int, ...]
    model_output_type: str
    model_var_type: str
    num_classes: int


def _resolve(params, model, schedule, shape, model_output_type, model_var_type,
             num_classes) -> _Resolved:
    """Fields of a DiffusionModel, overridden by whatever is given explicitly."""
    if isinstance(params, DiffusionModel):
        bundle = params
        resolved = _Resolved(
            bundle.params, bundle.model if model is None else model,
            bundle.schedule if schedule is None else schedule,
            tuple(bundle.image_shape if shape is None else shape),
            model_output_type or bundle.model_output_type,
            model_var_type or bundle.model_var_type,
            bundle.num_classes if num_classes is None else num_classes)
    else:
        for name, value in (("model", model), ("schedule", schedule), ("shape", shape)):
            if value is None:
                raise ValueError(f"{name}=None: a raw parameter tree needs explicit model=, "
                                 "schedule= and shape= (or pass a jaxdiff.bundle.DiffusionModel)")
        resolved = _Resolved(params, model, schedule, tuple(shape), model_output_type or "eps",
                             model_var_type or "fixed_small", num_classes or 0)
    check_model_output(resolved.model_output_type)
    check_model_var_type(resolved.model_var_type)
    if not isinstance(resolved.schedule, Schedule):
        raise ValueError(f"schedule must be a jaxdiff Schedule, got {type(resolved.schedule)}")
    if not (isinstance(resolved.num_classes, (int, np.integer)) and resolved.num_classes >= 0):
        raise ValueError(f"num_classes must be an integer >= 0, got {resolved.num_classes!r}")
    if not callable(resolved.model):
        raise ValueError(f"model must be a flax Module or a callable, got {resolved.model!r}")
    if isinstance(resolved.model, nn.Module):
        _check_params(resolved)
    return resolved


@functools.lru_cache(maxsize=16)
def _param_shapes(model: nn.Module, shape: tuple[int, ...], conditional: bool) -> dict:
    """{path: shape} of the parameters `model` creates for examples of `shape` (no compiling)."""
    x, t = jnp.zeros((1, *shape)), jnp.zeros((1,), jnp.int32)
    y = (jnp.zeros((1,), jnp.int32),) if conditional else ()
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, *y, train=False))
    return _shapes(variables["params"])


def _shapes(params) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


def _check_params(res: _Resolved) -> None:
    """A clear error, before compiling, when the weights are not those of this network."""
    expected = _param_shapes(res.model, res.shape, res.num_classes > 0)
    got = _shapes(res.params)
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


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f", <= {high}"
        raise ValueError(f"{name} must be >= {low}{upper}, got {value}")
    return int(value)


def _check_scale(name: str, value) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


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
        logits = jax.eval_shape(lambda: _apply(classifier, classifier_params,
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


def _execute(static: _Static, res: _Resolved, schedule: Schedule, tables: dict, rng, labels,
             x_init, num_samples: int, guidance_scale: float, classifier_params,
             classifier_scale: float):
    replicated = NamedSharding(static.sharding.mesh, PartitionSpec())
    params, schedule, classifier_params = jax.device_put(
        (res.params, schedule, classifier_params), replicated)
    tables = {k: np.asarray(v, np.float32 if np.issubdtype(v.dtype, np.floating) else
                            np.int32 if np.issubdtype(v.dtype, np.integer) else v.dtype)
              for k, v in tables.items()}
    labels = None if labels is None else jax.device_put(_pad(labels, static.num_padded),
                                                        static.sharding)
    if x_init is not None:
        x_init = jax.device_put(_pad(jnp.asarray(x_init, jnp.float32), static.num_padded),
                                static.sharding)
    x, trajectory = _run(static, params, schedule, tables, rng, labels, x_init,
                         jnp.float32(guidance_scale), classifier_params,
                         jnp.float32(classifier_scale))
    if trajectory is None:
        return x[:num_samples]
    xt, pred_x0 = trajectory
    return x[:num_samples], {"xt": xt[:, :num_samples], "pred_x0": pred_x0[:, :num_samples]}


def sample(
    params,
    rng: jax.Array,
    method: str = "ddim",
    *,
    num_samples: int | None = None,
    num_steps: int | None = None,
    eta: float = 0.0,
    spacing: str | None = None,
    labels=None,
    guidance_scale: float = 0.0,
    classifier=None,
    classifier_params=None,
    classifier_scale: float = 1.0,
    clip_denoised: bool = True,
    return_trajectory: bool = False,
    model=None,
    schedule: Schedule | None = None,
    shape: tuple[int, ...] | None = None,
    model_output_type: str | None = None,
    model_var_type: str | None = None,
    num_classes: int | None = None,
    x_T=None,
):
    """Draw samples from p_theta(x_0) (or p_theta(x_0 | y)) with one jitted `lax.scan`.

    params: a `DiffusionModel`, or a raw parameter tree together with `model=` (a flax Module
    called `apply({"params": p}, x, t, y, train=False)` or a callable `model(p, x, t, y)`),
    `schedule=` and `shape=` (one example's shape); for a raw tree the output and variance types
    default to "eps" and "fixed_small" and num_classes to 0. Explicit keywords override a bundle.
    method: "ddpm" (num_steps default T; fewer steps respace the chain), "ddim" (default 50 steps,
    `eta` in [0, 1]) or "dpm_solver++" (default 20 steps). spacing: "uniform", "quad" or "logsnr";
    default "logsnr" for dpm_solver++ (DPM-Solver's choice for pixel-space models), "uniform"
    otherwise.
    labels: int [num_samples] for a class-conditional model (default: uniform random classes;
    num_classes itself is the null label) and/or the target classes of classifier guidance.
    guidance_scale w > 0: classifier-free guidance. classifier (+ classifier_params,
    classifier_scale s): classifier guidance, ADM Alg. 1 for ddpm, Alg. 2 for ddim/dpm_solver++.
    num_samples: default 16, or x_T's batch when x_T (the starting noise, e.g. from `ddim_invert`)
    is given. Returns float32 samples [num_samples, *shape] (in [-1, 1] when clip_denoised), and
    with return_trajectory also {"xt", "pred_x0"}, each [num_steps, num_samples, *shape]: the
    input of every step and the denoised estimate made there. The batch is sharded over
    `jax.local_devices()` (padded to a multiple of their number); sample i depends only on
    (rng, i), not on num_samples or the device count.
    """
    if method not in METHODS:
        hint = "; encode with jaxdiff.ddim_invert" if method == "ddim_inversion" else ""
        raise ValueError(f"unknown sampling method {method!r}; expected one of {METHODS}{hint}")
    if spacing is None:
        spacing = "logsnr" if method == "dpm_solver++" else "uniform"
    if spacing not in SAMPLER_SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SAMPLER_SPACINGS}")
    res = _resolve(params, model, schedule, shape, model_output_type, model_var_type, num_classes)
    T = res.schedule.num_timesteps
    if x_T is not None:
        x_T_shape = tuple(np.shape(x_T))
        if len(x_T_shape) != len(res.shape) + 1 or x_T_shape[1:] != res.shape:
            raise ValueError(f"x_T must have shape [B, *{res.shape}], got {x_T_shape}")
        if num_samples is not None and num_samples != x_T_shape[0]:
            raise ValueError(f"num_samples={num_samples} but x_T holds {x_T_shape[0]} samples")
        num_samples = x_T_shape[0]
    num_samples = _check_int("num_samples", 16 if num_samples is None else num_samples, 1)
    default_steps = T if method == "ddpm" else _DEFAULT_STEPS[method]
    num_steps = _check_int("num_steps", default_steps if num_steps is None else num_steps, 1, T)
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    guidance_scale = _check_scale("guidance_scale", guidance_scale)
    classifier_scale = _check_scale("classifier_scale", classifier_scale)
    if guidance_scale > 0 and labels is None:
        raise ValueError(f"guidance_scale={guidance_scale} (classifier-free guidance) needs labels")
    if guidance_scale > 0 and res.num_classes == 0:
        raise ValueError(f"guidance_scale={guidance_scale}: classifier-free guidance needs a "
                         "class-conditional model, got num_classes=0")
    if classifier is not None and (classifier_params is None or labels is None):
        raise ValueError("classifier guidance needs classifier_params and labels, got "
                         f"classifier_params={'None' if classifier_params is None else 'set'}, "
                         f"labels={'None' if labels is None else 'set'}")
    labels = _check_labels(labels, num_samples, res, classifier, classifier_params, guidance_scale)

    timesteps = sampling_timesteps(res.schedule, num_steps, spacing)
    step_schedule = res.schedule
    if method == "ddpm":
        step_schedule, tables = _ddpm_tables(res.schedule, timesteps)
    elif method == "ddim":
        tables = _ddim_tables(res.schedule, timesteps, eta)
    else:
        tables = _dpm_solver_pp_tables(res.schedule, timesteps)

    devices = tuple(jax.local_devices())
    static = _Static(
        method=method, model=res.model, classifier=classifier,
        model_output_type=res.model_output_type, model_var_type=res.model_var_type,
        num_classes=res.num_classes, shape=res.shape,
        num_padded=-(-num_samples // len(devices)) * len(devices),
        clip_denoised=bool(clip_denoised), cfg=guidance_scale > 0,
        draw_labels=labels is None and res.num_classes > 0,
        has_x_init=x_T is not None, return_trajectory=bool(return_trajectory),
        sharding=_batch_sharding(devices))
    return _execute(static, res, step_schedule, tables, rng, labels, x_T, num_samples,
                    guidance_scale, classifier_params, classifier_scale)


def ddim_invert(
    params,
    x0,
    *,
    num_steps: int = 50,
    spacing: str = "uniform",
    labels=None,
    guidance_scale: float = 0.0,
    fixed_point_iterations: int = 0,
    return_trajectory: bool = False,
    model=None,
    schedule: Schedule | None = None,
    model_output_type: str | None = None,
    model_var_type: str | None = None,
    num_classes: int | None = None,
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
    if spacing not in SAMPLER_SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SAMPLER_SPACINGS}")
    x0 = jnp.asarray(x0, jnp.float32)
    shape = None if isinstance(params, DiffusionModel) else x0.shape[1:]
    res = _resolve(params, model, schedule, shape, model_output_type, model_var_type, num_classes)
    if tuple(x0.shape[1:]) != res.shape:
        raise ValueError(f"x0 must have shape [B, *{res.shape}], got {tuple(x0.shape)}")
    num_samples = _check_int("batch size of x0", x0.shape[0], 1)
    num_steps = _check_int("num_steps", num_steps, 1, res.schedule.num_timesteps)
    fixed_point_iterations = _check_int("fixed_point_iterations", fixed_point_iterations, 0)
    guidance_scale = _check_scale("guidance_scale", guidance_scale)
    if guidance_scale > 0 and labels is None:
        raise ValueError(f"guidance_scale={guidance_scale} (classifier-free guidance) needs labels")
    if guidance_scale > 0 and res.num_classes == 0:
        raise ValueError(f"guidance_scale={guidance_scale}: classifier-free guidance needs a "
                         "class-conditional model, got num_classes=0")
    if res.num_classes > 0 and labels is None:
        raise ValueError(f"a class-conditional model (num_classes={res.num_classes}) needs labels "
                         "to invert (use num_classes as the null label)")
    labels = _check_labels(labels, num_samples, res, None, None, guidance_scale)
    tables = _ddim_inversion_tables(res.schedule,
                                    sampling_timesteps(res.schedule, num_steps, spacing))
    devices = tuple(jax.local_devices())
    static = _Static(
        method="ddim_inversion", model=res.model, classifier=None,
        model_output_type=res.model_output_type, model_var_type=res.model_var_type,
        num_classes=res.num_classes, shape=res.shape,
        num_padded=-(-num_samples // len(devices)) * len(devices), clip_denoised=False,
        cfg=guidance_scale > 0, draw_labels=False, has_x_init=True,
        return_trajectory=bool(return_trajectory), sharding=_batch_sharding(devices),
        fixed_point_iterations=fixed_point_iterations)
    return _execute(static, res, res.schedule, tables, None, labels, x0, num_samples,
                    guidance_scale, None, 0.0)


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] -> uint8 in [0, 255] (round to nearest), as a NumPy array for saving."""
    images = np.asarray(images, np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
