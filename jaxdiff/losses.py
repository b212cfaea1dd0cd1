"""Training losses and the variational bound in bits per dimension.

Pure functions over arrays. On a discrete schedule `t` holds 0-based step indices [batch] (index
i is the paper's t = i + 1, so index 0 is the decoder term L_0); on a continuous process it is
the process's time (EDM: sigma). Every per-example quantity is averaged over the data
dimensions, so the bound is in bits/dim and the MSEs are per dimension, the units Improved DDPM
(arXiv 2102.09672) chose its hybrid weight lambda = 0.001 in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.scipy.special import log_ndtr

from jaxdiff import parameterisations, processes
from jaxdiff.compiler import inference_jit
from jaxdiff.diffusion import (
    DEFAULT_MODEL_VAR_TYPE,
    MODEL_VAR_TYPES,
    alpha_sigma,
    check_model_var_type,
    p_mean_variance,
    predict_eps_from_x0,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    split_model_output,
)
from jaxdiff.processes import NoiseProcess
from jaxdiff.registry import Checker, Entry, lookup, names, value
from jaxdiff.schedules import Schedule, check_timesteps, extract
from jaxdiff.validation import check_int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Weighting(Entry):
    """A weight of ||x_0 - x0_hat||^2 at a point's SNR (alpha^2 / sigma^2), `weight(snr,
    **params)`; `params` maps its keywords to the config fields that hold them. None: L_simple
    itself."""

    weight: Callable[..., jax.Array] | None = None
    params: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _check_weighting(c: Checker) -> None:
    _check_combination(c, "diffusion.loss_weighting")


def _check_min_snr(c: Checker) -> None:
    c.positive("diffusion.min_snr_gamma")
    _check_weighting(c)


def _check_p2(c: Checker) -> None:
    c.number("diffusion.p2_gamma", 0.0, math.inf)
    c.positive("diffusion.p2_k")
    _check_weighting(c)


# Loss weightings of L_simple, each stated as the weight of ||x_0 - x0_hat||^2 at a point's SNR;
# `training_losses` converts it to the weight of the output's MSE through the parameterisation,
# so one weighting means one objective whatever the network outputs.
WEIGHTINGS: dict[str, Weighting] = {
    "none": Weighting(),  # L_simple itself: unit weight on the output's MSE (DDPM Eq. 14)
    # min(SNR, gamma) on x_0 (Hang et al. arXiv 2303.09556 Eq. 7): min(SNR, gamma) / SNR on eps.
    "min_snr": Weighting(weight=lambda snr, gamma: jnp.minimum(snr, gamma),
                         params={"gamma": "diffusion.min_snr_gamma"},
                         fields={"diffusion.min_snr_gamma": 5.0}, check=_check_min_snr),
    # 1 / (k + SNR)^gamma on eps (Choi et al. arXiv 2204.00227 Eq. 8), SNR times it on x_0.
    "p2": Weighting(weight=lambda snr, gamma, k: snr / (k + snr) ** gamma,
                    params={"gamma": "diffusion.p2_gamma", "k": "diffusion.p2_k"},
                    fields={"diffusion.p2_gamma": 1.0, "diffusion.p2_k": 1.0}, check=_check_p2),
}


def get_weighting(name: str) -> Weighting:
    """The entry of loss weighting `name`; a ValueError naming it and the choices if none."""
    return lookup(WEIGHTINGS, name, "loss weighting")


def weighting_params(config: ml_collections.ConfigDict) -> dict[str, float]:
    """The parameters of `config.diffusion.loss_weighting`, as `training_losses` takes them."""
    entry = get_weighting(config.diffusion.loss_weighting)
    return {k: value(config, path) for k, path in entry.params.items()}


ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _mean_flat(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array,
              logvar2: jax.Array) -> jax.Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, nats (DDPM Eq. 5 closed form)."""
    ratio = logvar1 - logvar2
    # expm1(r) - r instead of exp(r) - 1 - r: the variance terms nearly cancel for L_T.
    return 0.5 * (jnp.expm1(ratio) - ratio + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array,
                                        log_scales: jax.Array) -> jax.Array:
    """log N(means, e^(2 log_scales)) mass of x's bin of 256 in [-1, 1] (DDPM Sec. 3.3 decoder L_0).

    Bins have width 2/255 around the 256 levels; the outermost extend to -inf and +inf, so the
    256 probabilities sum to one. DDPM's code uses a tanh approximation of the normal CDF and
    log(max(cdf_delta, 1e-12)); here the exact `log_ndtr` is used and log(Phi(b) - Phi(a)) is
    evaluated in the lower tail (reflected when the bin lies above the mean), so the log mass
    stays accurate far from the mean and every branch keeps finite gradients.
    """
    jnp.broadcast_shapes(jnp.shape(x), jnp.shape(means), jnp.shape(log_scales))
    inv_scale = jnp.exp(-log_scales)
    lo = inv_scale * (x - means - 1.0 / 255.0)
    hi = inv_scale * (x - means + 1.0 / 255.0)
    upper = lo + hi > 0.0
    a = jnp.where(upper, -hi, lo)
    b = jnp.where(upper, -lo, hi)
    log_b = log_ndtr(b)
    log_bin = log_b + jnp.log(jnp.maximum(-jnp.expm1(log_ndtr(a) - log_b), 1e-30))
    return jnp.where(x < -0.999, log_ndtr(hi), jnp.where(x > 0.999, log_ndtr(-lo), log_bin))


def _check_same_shape(name: str, a: jax.Array, ref: jax.Array) -> None:
    if jnp.shape(a) != jnp.shape(ref):
        raise ValueError(f"{name} shape {jnp.shape(a)} does not match x0 shape {jnp.shape(ref)}")


def vb_terms_bpd(
    schedule: Schedule,
    model_output: jax.Array,
    x0: jax.Array,
    xt: jax.Array,
    t: jax.Array,
    *,
    model_output_type: str,
    model_var_type: str,
    clip_denoised: bool = False,
    sigma_data: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), at t=0 -log p(x_0|x_1); bpd (DDPM Eq. 5).

    `sigma_data` is what the parameterisation's preconditioning assumes (EDM's). Returns
    (per-example terms [B], the network's x_0 estimate).
    """
    parameterisations.get(model_output_type)
    check_model_var_type(model_var_type)
    _check_same_shape("x_t", xt, x0)
    check_timesteps(t, schedule.num_timesteps, x0.shape[0])
    p = p_mean_variance(schedule, model_output, xt, t, model_output_type=model_output_type,
                        model_var_type=model_var_type, clip_denoised=clip_denoised,
                        sigma_data=sigma_data)
    true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x0, xt, t)
    kl = _mean_flat(normal_kl(true_mean, true_log_variance, p.mean, p.log_variance))
    decoder_nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance))
    return jnp.where(t == 0, decoder_nll, kl) / math.log(2.0), p.pred_x0


def prior_bpd(schedule: Schedule, x0: jax.Array) -> jax.Array:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, per example (DDPM Eq. 5); no parameters."""
    t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = q_mean_variance(schedule, x0, t)
    return _mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)


def _true_bound_weight(schedule: Schedule, xt: jax.Array, t: jax.Array, log_variance: jax.Array,
                       param: parameterisations.Parameterisation, sigma_data: float) -> jax.Array:
    """beta_t^2 / (2 sigma_t^2 alpha_t (1 - a_bar_t)) (DDPM Eq. 12), per squared output error.

    The eps error is (alpha / sigma) (d x_0 / d output) times the output's error, so the weight
    is rescaled by that factor squared and weight * MSE is the same KL for every output.
    """
    ndim = xt.ndim
    # 1 - a_bar from its float64-derived square root: 1 - a_bar in float32 cancels at small t.
    alpha, sigma = alpha_sigma(schedule, t, ndim)
    weight = extract(schedule.betas, t, ndim) ** 2 / (
        2.0 * jnp.exp(log_variance) * extract(schedule.alphas, t, ndim) * sigma**2)
    return weight * (alpha / sigma * param.x0_error_scale(alpha, sigma, sigma_data)) ** 2


class _Point(NamedTuple):
    """What a loss type reads of one training point (`training_losses`)."""

    process: NoiseProcess
    model_output: jax.Array  # the whole output (with a learned variance's channels)
    out: jax.Array  # its mean part
    var_out: jax.Array | None
    x0: jax.Array
    xt: jax.Array
    t: jax.Array
    alpha: jax.Array
    sigma: jax.Array
    squared_error: jax.Array  # (target - out)^2
    model_output_type: str
    model_var_type: str
    hybrid_lambda: float
    weighting: Weighting
    weighting_params: dict[str, float]
    sigma_data: float


def _simple(p: _Point) -> dict[str, jax.Array]:
    if p.weighting.weight is None:
        return {"loss": _mean_flat(p.squared_error)}
    param = parameterisations.get(p.model_output_type)
    weight = p.weighting.weight((p.alpha / p.sigma) ** 2, **p.weighting_params) \
        * param.x0_error_scale(p.alpha, p.sigma, p.sigma_data) ** 2
    return {"loss": _mean_flat(weight * p.squared_error)}


def _mse_weighted(p: _Point) -> dict[str, jax.Array]:
    log_variance = p_mean_variance(p.process, p.model_output, p.xt, p.t,
                                   model_output_type=p.model_output_type,
                                   model_var_type=p.model_var_type, clip_denoised=False,
                                   sigma_data=p.sigma_data).log_variance
    weight = _true_bound_weight(p.process, p.xt, p.t, log_variance,
                                parameterisations.get(p.model_output_type), p.sigma_data)
    return {"loss": _mean_flat(weight * p.squared_error)}


def _bound_terms(p: _Point, model_output: jax.Array) -> jax.Array:
    vb, _ = vb_terms_bpd(p.process, model_output, p.x0, p.xt, p.t,
                         model_output_type=p.model_output_type, model_var_type=p.model_var_type,
                         clip_denoised=False, sigma_data=p.sigma_data)
    return vb


def _vlb(p: _Point) -> dict[str, jax.Array]:
    vb = _bound_terms(p, p.model_output)
    return {"vb": vb, "loss": p.process.num_timesteps * vb}


def _hybrid(p: _Point) -> dict[str, jax.Array]:
    # The mean part frozen in L_t, so that L_vlb trains only the learned variance.
    vb = _bound_terms(p, jnp.concatenate([jax.lax.stop_gradient(p.out), p.var_out], axis=-1))
    return {"vb": vb,
            "loss": _mean_flat(p.squared_error) + p.hybrid_lambda * p.process.num_timesteps * vb}


def combination_problems(loss_type: str, model_var_type: str, weighting: str, *,
                         steps: bool) -> list[tuple[str, str]]:
    """The rules a loss type breaks with this variance type, weighting and a process with
    (`steps`) or without steps, as (config field, why) pairs: the one statement of them, which
    `config.validate` and `training_losses` both read."""
    entry, learned = LOSS_TYPES[loss_type], MODEL_VAR_TYPES[model_var_type].learned
    problems = []
    if entry.chain and not steps:
        problems.append(("diffusion.loss_type", (
            f"{loss_type!r} is a term of the chain's bound, which needs a process with steps "
            f"(diffusion.process {names(processes.PROCESSES, lambda e: e.steps)}); a continuous "
            f"process trains with loss_type {names(LOSS_TYPES, lambda e: not e.chain)}")))
    if learned and entry.trains_variance is False:
        problems.append(("diffusion.loss_type", (
            f"a learned variance (diffusion.model_var_type {model_var_type!r}) is trained only by "
            f"the {names(LOSS_TYPES, lambda e: e.trains_variance is not False)} loss")))
    if not learned and entry.trains_variance:
        problems.append(("diffusion.loss_type", (
            f"{loss_type!r} trains a learned variance, not diffusion.model_var_type "
            f"{model_var_type!r}; set it to {names(MODEL_VAR_TYPES, lambda e: e.learned)}")))
    if WEIGHTINGS[weighting].weight is not None and not entry.weighted:
        problems.append(("diffusion.loss_weighting", (
            f"a loss weighting reweights diffusion.loss_type "
            f"{names(LOSS_TYPES, lambda e: e.weighted)} only, not {loss_type!r} (it carries its "
            "own weights)")))
    return problems


def _check_combination(c: Checker, field: str) -> None:
    """The `combination_problems` of the config's loss that concern `field`."""
    problems = combination_problems(
        c.get("diffusion.loss_type"), c.get("diffusion.model_var_type"),
        c.get("diffusion.loss_weighting"),
        steps=processes.get(c.get("diffusion.process")).steps)
    for path, why in problems:
        if path == field:
            c.fail(path, why)


def _check_loss_type(c: Checker) -> None:
    _check_combination(c, "diffusion.loss_type")


def _check_hybrid(c: Checker) -> None:
    c.number("diffusion.hybrid_lambda", 0.0, math.inf)
    _check_loss_type(c)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossType(Entry):
    """A training loss: `terms(point)` -> {"loss", and "vb" for the bound's}; `chain`: a term of
    the discrete chain's bound (needs a process with steps); `trains_variance`: True, it trains
    only a learned variance's; False, only a fixed variance's; None, either; `weighted`: it takes
    a loss weighting (`WEIGHTINGS`)."""

    terms: Callable[[_Point], dict[str, jax.Array]]
    chain: bool = False
    trains_variance: bool | None = False
    weighted: bool = False


LOSS_TYPES: dict[str, LossType] = {
    # L_simple (DDPM Eq. 14; for EDM's F exactly EDM's weighted loss), reweighted by a weighting.
    "simple": LossType(terms=_simple, weighted=True, check=_check_loss_type),
    # The MSE times DDPM Eq. 12's weight: for t >= 1 it equals L_{t-1} in nats/dim.
    "mse_weighted": LossType(terms=_mse_weighted, chain=True, check=_check_loss_type),
    # T * L_t, an unbiased one-sample estimate of L_vlb in bits/dim.
    "vlb": LossType(terms=_vlb, chain=True, trains_variance=None, check=_check_loss_type),
    # L_simple + lambda * T * L_t (IDDPM Sec. 3.1).
    "hybrid": LossType(terms=_hybrid, chain=True, trains_variance=True, check=_check_hybrid,
                       fields={"diffusion.hybrid_lambda": 0.001}),
}


def get_loss_type(name: str) -> LossType:
    """The entry of loss type `name`; a ValueError naming it and the choices if there is none."""
    return lookup(LOSS_TYPES, name, "loss type")


def training_losses(
    process: NoiseProcess,
    model_fn: ModelFn,
    x0: jax.Array,
    rng: jax.Array,
    *,
    loss_type: str = "simple",
    model_output_type: str = "eps",
    model_var_type: str = DEFAULT_MODEL_VAR_TYPE,
    hybrid_lambda: float = 0.001,
    weighting: str = "none",
    weighting_params: dict[str, float] | None = None,
    sigma_data: float = 0.5,
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """The per-example training loss at one t (DDPM Eqs. 12, 14; IDDPM Sec. 3.1; EDM Eq. 2).

    `model_fn(x_in, time)` returns the network output (2C channels for a learned variance), fed
    what the parameterisation and the process say (x_t and the step index for DDPM; EDM's c_in x
    and c_noise). With `t` None, t is drawn from `process.sample_t` (uniform steps; EDM's
    lognormal sigma); with `noise` None, eps ~ N(0, I) from `rng`.

    - `simple`: L_simple, the MSE between the output and its target (eps, x_0, v or EDM's F;
      DDPM Eq. 14; for EDM's F exactly EDM's weighted loss), reweighted by `weighting` (a name
      in `WEIGHTINGS`, its parameters in `weighting_params`).
    - `mse_weighted`: the same MSE times DDPM Eq. 12's weight beta_t^2 / (2 sigma_t^2 alpha_t
      (1 - a_bar_t)) (converted for other outputs), sigma_t^2 the fixed variance of
      `model_var_type` (beta_tilde_2 at t = 0); for t >= 1 this equals L_{t-1} in nats/dim.
    - `vlb`: T * L_t, an unbiased one-sample estimate of the whole bound L_vlb in bits/dim
      (guided-diffusion's rescaled KL).
    - `hybrid`: L_simple + lambda * T * L_t with the mean part of the output frozen in L_t, so
      L_vlb trains only the learned variance (IDDPM Sec. 3.1). T * L_t estimates L_vlb, which
      reproduces guided-diffusion's `mse + vb * T / 1000` at lambda = 0.001.
    The last three need a discrete schedule.

    Returns per-example "loss", "mse" and "t", plus "vb" (L_t in bits/dim) for `vlb`/`hybrid`.
    """
    param = parameterisations.get(model_output_type)
    check_model_var_type(model_var_type)
    entry = get_loss_type(loss_type)
    weighting_entry = get_weighting(weighting)
    problems = combination_problems(loss_type, model_var_type, weighting,
                                    steps=process.num_timesteps is not None)
    if problems:
        given = {"diffusion.loss_type": loss_type, "diffusion.loss_weighting": weighting}
        raise ValueError("; ".join(f"{field} = {given[field]!r}: {why}" for field, why in problems))
    batch = x0.shape[0]
    t_rng, noise_rng = jax.random.split(rng)
    if t is None:
        t = process.sample_t(t_rng, (batch,))
    else:
        process.check_t(t, batch)
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
    if noise is None:
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    _check_same_shape("noise", noise, x0)

    xt = q_sample(process, x0, t, noise)
    alpha, sigma = alpha_sigma(process, t, x0.ndim)
    model_output = model_fn(param.network_input(xt, alpha, sigma, sigma_data),
                            process.network_time(t))
    out, var_out = split_model_output(model_output, model_var_type)
    _check_same_shape("model output (mean part)", out, x0)
    squared_error = (param.target(x0, noise, alpha, sigma, sigma_data) - out) ** 2
    point = _Point(process, model_output, out, var_out, x0, xt, t, alpha, sigma, squared_error,
                   model_output_type, model_var_type, hybrid_lambda, weighting_entry,
                   dict(weighting_params or {}), sigma_data)
    return {"mse": _mean_flat(squared_error), "t": t, **entry.terms(point)}


def bits_per_dim(
    schedule: Schedule,
    model_fn: ModelFn,
    x0: jax.Array,
    rng: jax.Array,
    *,
    model_output_type: str = "eps",
    model_var_type: str = DEFAULT_MODEL_VAR_TYPE,
    chunk_size: int = 100,
    clip_denoised: bool = False,
    sigma_data: float = 0.5,
) -> dict[str, jax.Array]:
    """The whole variational bound L_vlb = L_T + sum_t L_{t-1} + L_0 in bits/dim (DDPM Eq. 5).

    `model_fn(x_in, time)` is fed as in `training_losses`: what the parameterisation makes of
    x_t (with the model's `sigma_data`) and the schedule's network time.

    Every one of the T terms is evaluated for every example with fresh noise, `chunk_size` steps
    per network call (the batch of a call is chunk_size * B), in one jitted `lax.map` over the
    chunks: memory is bounded by one chunk and the network is traced once whatever T is. The
    noise of step t is drawn from fold_in(rng, t), so the result does not depend on chunk_size.
    The jit caches on `model_fn`'s identity: to evaluate many batches with one compilation,
    pass the same `model_fn`, or jit a function of (params, x0, rng) that calls this one.

    Returns per example [B]: "total_bpd", "prior_bpd" (L_T), "vb_bpd" (the KL terms t >= 1),
    "decoder_bpd" (L_0); and per example and step [B, T]: "mse" (eps) and "x0_mse".
    """
    parameterisations.get(model_output_type)
    check_model_var_type(model_var_type)
    check_int("chunk_size", chunk_size, 1)
    if jnp.ndim(x0) < 2:
        raise ValueError(f"x0 must be batched, [B, ...], got shape {jnp.shape(x0)}")
    return _bits_per_dim(schedule, x0, rng, model_fn=model_fn, model_output_type=model_output_type,
                         model_var_type=model_var_type, chunk_size=int(chunk_size),
                         clip_denoised=clip_denoised, sigma_data=float(sigma_data))


@inference_jit(static_argnames=("model_fn", "model_output_type", "model_var_type", "chunk_size",
                                "clip_denoised", "sigma_data"))
def _bits_per_dim(schedule, x0, rng, *, model_fn, model_output_type, model_var_type, chunk_size,
                  clip_denoised, sigma_data):
    param = parameterisations.get(model_output_type)
    num_timesteps = schedule.num_timesteps
    batch = x0.shape[0]
    chunk = min(chunk_size, num_timesteps)
    num_chunks = -(-num_timesteps // chunk)
    # The last chunk is padded with copies of step T-1; the padding is sliced off below.
    steps = jnp.minimum(jnp.arange(num_chunks * chunk), num_timesteps - 1)
    steps = steps.reshape(num_chunks, chunk)
    x0_rep = jnp.broadcast_to(x0, (chunk, *x0.shape)).reshape(chunk * batch, *x0.shape[1:])

    def terms_of_chunk(chunk_steps):
        noise = jax.vmap(lambda s: jax.random.normal(jax.random.fold_in(rng, s), x0.shape,
                                                     x0.dtype))(chunk_steps)
        noise = noise.reshape(x0_rep.shape)
        t = jnp.repeat(chunk_steps, batch)
        xt = q_sample(schedule, x0_rep, t, noise)
        alpha, sigma = alpha_sigma(schedule, t, xt.ndim)
        output = model_fn(param.network_input(xt, alpha, sigma, sigma_data),
                          schedule.network_time(t))
        vb, pred_x0 = vb_terms_bpd(schedule, output, x0_rep, xt, t,
                                   model_output_type=model_output_type,
                                   model_var_type=model_var_type, clip_denoised=clip_denoised,
                                   sigma_data=sigma_data)
        eps_mse = _mean_flat((predict_eps_from_x0(schedule, xt, t, pred_x0) - noise) ** 2)
        x0_mse = _mean_flat((pred_x0 - x0_rep) ** 2)
        return tuple(v.reshape(chunk, batch) for v in (vb, eps_mse, x0_mse))

    per_step = jax.lax.map(terms_of_chunk, steps)
    vb, eps_mse, x0_mse = (v.reshape(num_chunks * chunk, batch)[:num_timesteps].T
                           for v in per_step)
    prior = prior_bpd(schedule, x0)
    decoder = vb[:, 0]
    kl = jnp.sum(vb[:, 1:], axis=1)
    return {"total_bpd": prior + kl + decoder, "prior_bpd": prior, "vb_bpd": kl,
            "decoder_bpd": decoder, "mse": eps_mse, "x0_mse": x0_mse}
