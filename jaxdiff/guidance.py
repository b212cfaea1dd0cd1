"""Guidance as transforms of a sampler's eps or mean: classifier (ADM) and classifier-free (CFG).

Classifier guidance (ADM arXiv 2105.05233) steers with grad_x log p_phi(y | x_t) of a noisy
classifier: Alg. 1 shifts the Gaussian mean of an ancestral step, Alg. 2 shifts eps for DDIM-like
(deterministic) samplers. Classifier-free guidance (arXiv 2207.12598) mixes the conditional and
unconditional predictions of one network that was trained with label dropout.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff.diffusion import split_model_output


def classifier_log_prob_grad(
    classifier_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    t: jax.Array,
    y: jax.Array,
) -> jax.Array:
    """grad_{x_t} log p_phi(y | x_t), per example, for logits = classifier_fn(x_t, t) [B, K]."""

    def total_log_prob(x):
        log_probs = jax.nn.log_softmax(classifier_fn(x, t).astype(jnp.float32), axis=-1)
        # Examples are independent, so the gradient of the sum is each example's own gradient.
        return jnp.sum(jnp.take_along_axis(log_probs, y[:, None], axis=-1))

    return jax.grad(total_log_prob)(x)


def condition_mean(mean: jax.Array, variance: jax.Array, grad: jax.Array, scale) -> jax.Array:
    """mu_hat = mu + s Sigma grad_x log p(y | x_t) (ADM Alg. 1, Eq. 10 with gradient scale s)."""
    return mean + scale * variance * grad


def condition_eps(eps: jax.Array, grad: jax.Array, scale,
                  sqrt_one_minus_alphas_cumprod: jax.Array) -> jax.Array:
    """eps_hat = eps - s sqrt(1 - a_bar_t) grad_x log p(y | x_t) (ADM Alg. 2, Eq. 14)."""
    return eps - scale * sqrt_one_minus_alphas_cumprod * grad


def classifier_free_output(
    model_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    t: jax.Array,
    y: jax.Array,
    *,
    null_label: int,
    guidance_scale,
    model_var_type: str,
) -> jax.Array:
    """eps_tilde = (1 + w) eps(x_t, y) - w eps(x_t, null) (CFG arXiv 2207.12598 Eq. 6).

    The conditional and unconditional predictions come from ONE network call on the doubled batch.
    The mix is affine, so it applies unchanged to x0- or v-predictions. A learned variance is
    taken from the conditional half, as GLIDE does.
    """
    both = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                    jnp.concatenate([y, jnp.full_like(y, null_label)]))
    cond, uncond = jnp.split(both, 2)
    cond_out, cond_var = split_model_output(cond, model_var_type)
    uncond_out, _ = split_model_output(uncond, model_var_type)
    guided = (1.0 + guidance_scale) * cond_out - guidance_scale * uncond_out
    return guided if cond_var is None else jnp.concatenate([guided, cond_var], axis=-1)
