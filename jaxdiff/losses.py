"""Training losses and the variational bound in bits per dimension.

Pure functions over arrays; `t` holds 0-based step indices [batch] (index i is the paper's
t = i + 1, so index 0 is the decoder term L_0). Every per-example quantity is averaged over the
data dimensions, so the bound is in bits/dim and the MSEs are per dimension, the units Improved
DDPM (arXiv 2102.09672) chose its hybrid weight lambda = 0.001 in.

Importance sampling of t (IDDPM Sec. 3.3) is a small pytree threaded through the train step:

    t, weights = sample_timesteps(rng_t, batch, T, history)
    terms = training_losses(schedule, model_fn, x0, rng, loss_type="vlb", t=t, ...)
    loss = jnp.mean(weights * terms["loss"])
    history = update_loss_history(history, t, terms["vb"])

(with data parallelism, gather t and terms["vb"] across devices before the update, so every
replica keeps the same history).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from jaxdiff.compiler import inference_jit
from jaxdiff.diffusion import (
    check_model_output,
    check_model_var_type,
    check_timesteps,
    p_mean_variance,
    predict_eps_from_x0,
    predict_v,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    split_model_output,
)
from jaxdiff.schedules import Schedule, extract

LOSS_TYPES = ("simple", "mse_weighted", "vlb", "hybrid")
LEARNED_VAR_TYPES = ("learned", "learned_range")
# IDDPM Sec. 3.3: 10 recent values of L_t per step, mixed with a little uniform probability.
HISTORY_LENGTH = 10
UNIFORM_PROB = 1e-3

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
) -> tuple[jax.Array, jax.Array]:
    """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), at t=0 -log p(x_0|x_1); bpd (DDPM Eq. 5).

    Returns (per-example terms [B], the network's x_0 estimate).
    """
    check_model_output(model_output_type)
    check_model_var_type(model_var_type)
    _check_same_shape("x_t", xt, x0)
    check_timesteps(t, schedule.num_timesteps, x0.shape[0])
    p = p_mean_variance(schedule, model_output, xt, t, model_output_type=model_output_type,
                        model_var_type=model_var_type, clip_denoised=clip_denoised)
    true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x0, xt, t)
    kl = _mean_flat(normal_kl(true_mean, true_log_variance, p.mean, p.log_variance))
    decoder_nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance))
    return jnp.where(t == 0, decoder_nll, kl) / math.log(2.0), p.pred_x0


def prior_bpd(schedule: Schedule, x0: jax.Array) -> jax.Array:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, per example (DDPM Eq. 5); no parameters."""
    t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = q_mean_variance(schedule, x0, t)
    return _mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)


def _check_loss_type(loss_type: str, model_var_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {loss_type!r}; expected one of {LOSS_TYPES}")
    learned = model_var_type in LEARNED_VAR_TYPES
    if loss_type == "hybrid" and not learned:
        raise ValueError(f"loss type 'hybrid' trains a learned variance; model_var_type "
                         f"{model_var_type!r} is fixed (use one of {LEARNED_VAR_TYPES})")
    if loss_type in ("simple", "mse_weighted") and learned:
        raise ValueError(f"loss type {loss_type!r} does not train the variance of model_var_type "
                         f"{model_var_type!r}; use 'hybrid' or 'vlb'")


def _true_bound_weight(schedule: Schedule, xt: jax.Array, t: jax.Array, log_variance: jax.Array,
                       model_output_type: str) -> jax.Array:
    """beta_t^2 / (2 sigma_t^2 alpha_t (1 - a_bar_t)) (DDPM Eq. 12), per squared output error.

    For x_0 and v outputs the eps error is sqrt(a_bar / (1 - a_bar)) resp. sqrt(a_bar) times the
    output's error, so the weight is rescaled and weight * MSE is the same KL for every output.
    """
    ndim = xt.ndim
    # 1 - a_bar from its float64-derived square root: 1 - a_bar in float32 cancels at small t.
    one_minus_a_bar = extract(schedule.sqrt_one_minus_alphas_cumprod, t, ndim) ** 2
    weight = extract(schedule.betas, t, ndim) ** 2 / (
        2.0 * jnp.exp(log_variance) * extract(schedule.alphas, t, ndim) * one_minus_a_bar)
    if model_output_type == "x0":
        weight = weight / extract(schedule.sqrt_recipm1_alphas_cumprod, t, ndim) ** 2
    elif model_output_type == "v":
        weight = weight * extract(schedule.alphas_cumprod, t, ndim)
    return weight


def training_losses(
    schedule: Schedule,
    model_fn: ModelFn,
    x0: jax.Array,
    rng: jax.Array,
    *,
    loss_type: str = "simple",
    model_output_type: str = "eps",
    model_var_type: str = "fixed_small",
    hybrid_lambda: float = 0.001,
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """The per-example training loss at one t (DDPM Eqs. 12, 14; IDDPM Sec. 3.1).

    `model_fn(x_t, t)` returns the network output (2C channels for a learned variance). With
    `t` None, t is uniform on {0..T-1}; with `noise` None, eps ~ N(0, I) from `rng`.

    - `simple`: L_simple, the MSE between the output and its target (eps, x_0 or v; DDPM Eq. 14).
    - `mse_weighted`: the same MSE times DDPM Eq. 12's weight beta_t^2 / (2 sigma_t^2 alpha_t
      (1 - a_bar_t)) (converted for x_0 and v outputs), sigma_t^2 the fixed variance of
      `model_var_type` (beta_tilde_2 at t = 0); for t >= 1 this equals L_{t-1} in nats/dim.
    - `vlb`: T * L_t, an unbiased one-sample estimate of the whole bound L_vlb in bits/dim
      (guided-diffusion's rescaled KL); weight it by `sample_timesteps`'s weights when t
      is importance-sampled.
    - `hybrid`: L_simple + lambda * T * L_t with the mean part of the output frozen in L_t, so
      L_vlb trains only the learned variance (IDDPM Sec. 3.1). T * L_t estimates L_vlb, which
      reproduces guided-diffusion's `mse + vb * T / 1000` at lambda = 0.001.

    Returns per-example "loss", "mse" and "t", plus "vb" (L_t in bits/dim) for `vlb`/`hybrid`.
    """
    check_model_output(model_output_type)
    check_model_var_type(model_var_type)
    _check_loss_type(loss_type, model_var_type)
    num_timesteps = schedule.num_timesteps
    batch = x0.shape[0]
    t_rng, noise_rng = jax.random.split(rng)
    if t is None:
        t, _ = sample_timesteps(t_rng, batch, num_timesteps)
    else:
        check_timesteps(t, num_timesteps, batch)
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
    if noise is None:
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    _check_same_shape("noise", noise, x0)

    xt = q_sample(schedule, x0, t, noise)
    model_output = model_fn(xt, t)
    out, var_out = split_model_output(model_output, model_var_type)
    _check_same_shape("model output (mean part)", out, x0)
    if model_output_type == "eps":
        target = noise
    elif model_output_type == "x0":
        target = x0
    else:
        target = predict_v(schedule, x0, t, noise)
    squared_error = (target - out) ** 2
    terms = {"mse": _mean_flat(squared_error), "t": t}

    if loss_type == "simple":
        terms["loss"] = terms["mse"]
    elif loss_type == "mse_weighted":
        log_variance = p_mean_variance(schedule, model_output, xt, t,
                                       model_output_type=model_output_type,
                                       model_var_type=model_var_type,
                                       clip_denoised=False).log_variance
        weight = _true_bound_weight(schedule, xt, t, log_variance, model_output_type)
        terms["loss"] = _mean_flat(weight * squared_error)
    else:
        if loss_type == "hybrid":
            model_output = jnp.concatenate([jax.lax.stop_gradient(out), var_out], axis=-1)
        vb, _ = vb_terms_bpd(schedule, model_output, x0, xt, t,
                             model_output_type=model_output_type,
                             model_var_type=model_var_type, clip_denoised=False)
        terms["vb"] = vb
        vlb = num_timesteps * vb
        terms["loss"] = vlb if loss_type == "vlb" else terms["mse"] + hybrid_lambda * vlb
    return terms


@flax.struct.dataclass
class LossHistory:
    """The last HISTORY_LENGTH values of L_t seen at each step t (IDDPM Sec. 3.3), oldest first.

    history: float32 [T, HISTORY_LENGTH]; counts: int32 [T], how many entries are filled.
    """

    history: jax.Array
    counts: jax.Array

    @property
    def num_timesteps(self) -> int:
        return self.history.shape[0]


def init_loss_history(num_timesteps: int) -> LossHistory:
    """An empty history: `sample_timesteps` stays uniform until every step has 10 values."""
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) \
            or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    return LossHistory(jnp.zeros((num_timesteps, HISTORY_LENGTH), jnp.float32),
                       jnp.zeros((num_timesteps,), jnp.int32))


def update_loss_history(history: LossHistory, t: jax.Array, losses: jax.Array) -> LossHistory:
    """Append each losses[i] to the history of step t[i], dropping the oldest (IDDPM Sec. 3.3)."""
    if jnp.shape(t) != jnp.shape(losses) or jnp.ndim(t) != 1:
        raise ValueError(f"t and losses must be 1-D of one shape, got {jnp.shape(t)} and "
                         f"{jnp.shape(losses)}")
    check_timesteps(t, history.num_timesteps)
    history, _ = jax.lax.scan(_push_loss, history, (jnp.asarray(t), jnp.asarray(losses)))
    return history


def _push_loss(history: LossHistory, step_loss: tuple[jax.Array, jax.Array]):
    step, loss = step_loss
    row = jnp.append(history.history[step, 1:], loss.astype(history.history.dtype))
    counts = history.counts.at[step].set(jnp.minimum(history.counts[step] + 1, HISTORY_LENGTH))
    return LossHistory(history.history.at[step].set(row), counts), None


def sample_timesteps(rng: jax.Array, batch_size: int, num_timesteps: int,
                     history: LossHistory | None = None) -> tuple[jax.Array, jax.Array]:
    """t ~ p_t, weights 1 / (T p_t): mean(weights * L_t) estimates mean_t L_t (IDDPM Sec. 3.3).

    Without a history, or until every step has 10 recorded values, p is uniform (weights 1);
    then p_t is proportional to sqrt(E[L_t^2]) over the recorded values, mixed with 1e-3 of the
    uniform distribution so that no step's weight can blow up.
    """
    if history is None:
        t = jax.random.randint(rng, (batch_size,), 0, num_timesteps)
        return t, jnp.ones((batch_size,), jnp.float32)
    if history.num_timesteps != num_timesteps:
        raise ValueError(f"loss history has {history.num_timesteps} steps, expected "
                         f"num_timesteps={num_timesteps}")
    rms = jnp.sqrt(jnp.mean(history.history**2, axis=-1))
    probs = (1.0 - UNIFORM_PROB) * rms / jnp.sum(rms) + UNIFORM_PROB / num_timesteps
    ready = jnp.all(history.counts >= HISTORY_LENGTH) & (jnp.sum(rms) > 0)
    probs = jnp.where(ready, probs, 1.0 / num_timesteps)
    t = jax.random.choice(rng, num_timesteps, (batch_size,), p=probs)
    return t, 1.0 / (num_timesteps * probs[t])


def bits_per_dim(
    schedule: Schedule,
    model_fn: ModelFn,
    x0: jax.Array,
    rng: jax.Array,
    *,
    model_output_type: str = "eps",
    model_var_type: str = "fixed_small",
    chunk_size: int = 100,
    clip_denoised: bool = False,
) -> dict[str, jax.Array]:
    """The whole variational bound L_vlb = L_T + sum_t L_{t-1} + L_0 in bits/dim (DDPM Eq. 5).

    Every one of the T terms is evaluated for every example with fresh noise, `chunk_size` steps
    per network call (the batch of a call is chunk_size * B), in one jitted `lax.map` over the
    chunks: memory is bounded by one chunk and the network is traced once whatever T is. The
    noise of step t is drawn from fold_in(rng, t), so the result does not depend on chunk_size.
    The jit caches on `model_fn`'s identity: to evaluate many batches with one compilation,
    pass the same `model_fn`, or jit a function of (params, x0, rng) that calls this one.

    Returns per example [B]: "total_bpd", "prior_bpd" (L_T), "vb_bpd" (the KL terms t >= 1),
    "decoder_bpd" (L_0); and per example and step [B, T]: "mse" (eps) and "x0_mse".
    """
    check_model_output(model_output_type)
    check_model_var_type(model_var_type)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if jnp.ndim(x0) < 2:
        raise ValueError(f"x0 must be batched, [B, ...], got shape {jnp.shape(x0)}")
    return _bits_per_dim(schedule, x0, rng, model_fn=model_fn, model_output_type=model_output_type,
                         model_var_type=model_var_type, chunk_size=int(chunk_size),
                         clip_denoised=clip_denoised)


@inference_jit(static_argnames=("model_fn", "model_output_type", "model_var_type", "chunk_size",
                                "clip_denoised"))
def _bits_per_dim(schedule, x0, rng, *, model_fn, model_output_type, model_var_type, chunk_size,
                  clip_denoised):
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
        vb, pred_x0 = vb_terms_bpd(schedule, model_fn(xt, t), x0_rep, xt, t,
                                   model_output_type=model_output_type,
                                   model_var_type=model_var_type, clip_denoised=clip_denoised)
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
