"""Exact "networks" for testing: the Bayes-optimal predictors of a Gaussian-mixture data set.

For x_0 ~ sum_k w_k N(mu_k, s_k^2 I), the noisy marginal is x_t | k ~ N(sqrt(a_bar) mu_k,
(a_bar s_k^2 + 1 - a_bar) I), so p(k | x_t), E[x_0 | x_t] and E[eps | x_t] (the minimiser of
L_simple) are closed form. Tests use them in place of a trained network.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.schedules import Schedule


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """sum_k weights[k] N(means[k], stds[k]^2 I); means has shape [K, *event_shape]."""

    weights: np.ndarray
    means: np.ndarray
    stds: np.ndarray

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.means.shape[1:])

    def sample(self, rng: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        """n draws of (x_0, k)."""
        k_rng, x_rng = jax.random.split(rng)
        k = jax.random.choice(k_rng, len(self.weights), (n,), p=jnp.asarray(self.weights))
        noise = jax.random.normal(x_rng, (n, *self.event_shape))
        stds = jnp.asarray(self.stds)[k].reshape((n,) + (1,) * len(self.event_shape))
        return jnp.asarray(self.means)[k] + stds * noise, k

    def _noisy(self, schedule: Schedule, xt: jax.Array, t: jax.Array):
        """Per-component log N(x_t; sqrt(a_bar) mu_k, v_k I) and v_k, each [B, K]."""
        a_bar = schedule.alphas_cumprod[t][:, None]  # [B, 1]
        var = a_bar * jnp.asarray(self.stds)[None] ** 2 + 1.0 - a_bar  # [B, K]
        d = int(np.prod(self.event_shape))
        diff = xt[:, None] - jnp.sqrt(a_bar).reshape(a_bar.shape + (1,) * len(self.event_shape)) \
            * jnp.asarray(self.means)[None]
        sq = jnp.sum(diff.reshape(diff.shape[:2] + (-1,)) ** 2, axis=-1)
        log_prob = -0.5 * (sq / var + d * jnp.log(2 * jnp.pi * var))
        return log_prob, var

    def class_logits(self, schedule: Schedule, xt: jax.Array, t: jax.Array) -> jax.Array:
        """log p(k | x_t) up to a constant: the exact noisy classifier, [B, K]."""
        log_prob, _ = self._noisy(schedule, xt, t)
        return jnp.log(jnp.asarray(self.weights))[None] + log_prob

    def x0_mean(self, schedule: Schedule, xt: jax.Array, t: jax.Array, y=None) -> jax.Array:
        """E[x_0 | x_t] (or E[x_0 | x_t, k=y] when a component y is given)."""
        a_bar = schedule.alphas_cumprod[t][:, None]
        log_prob, var = self._noisy(schedule, xt, t)
        if y is None:
            post = jax.nn.softmax(jnp.log(jnp.asarray(self.weights))[None] + log_prob, axis=-1)
        else:
            post = jax.nn.one_hot(y, len(self.weights))
        expand = (slice(None), slice(None)) + (None,) * len(self.event_shape)
        gain = (jnp.sqrt(a_bar) * jnp.asarray(self.stds)[None] ** 2 / var)[expand]  # [B, K, 1..]
        means = jnp.asarray(self.means)[None]
        x0_k = means + gain * (xt[:, None] - jnp.sqrt(a_bar)[expand] * means)
        return jnp.sum(post[expand] * x0_k, axis=1)

    def eps(self, schedule: Schedule, xt: jax.Array, t: jax.Array, y=None) -> jax.Array:
        """E[eps | x_t] = (x_t - sqrt(a_bar) E[x_0 | x_t]) / sqrt(1 - a_bar), L_simple optimum."""
        a_bar = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * len(self.event_shape))
        return (xt - jnp.sqrt(a_bar) * self.x0_mean(schedule, xt, t, y)) / jnp.sqrt(1.0 - a_bar)

    def denoise(self, x: jax.Array, sigma: jax.Array) -> jax.Array:
        """E[x_0 | x] for x = x_0 + sigma n (EDM's variance-exploding frame), sigma [B].

        p(k | x) ~ w_k N(x; mu_k, (s_k^2 + sigma^2) I), and given k the posterior mean is
        (s_k^2 x + sigma^2 mu_k) / (s_k^2 + sigma^2).
        """
        s2 = jnp.asarray(self.stds)[None] ** 2  # [1, K]
        var = s2 + sigma[:, None] ** 2  # [B, K]
        d = int(np.prod(self.event_shape))
        expand = (slice(None), slice(None)) + (None,) * len(self.event_shape)
        means = jnp.asarray(self.means)[None]
        diff = x[:, None] - means
        sq = jnp.sum(diff.reshape(diff.shape[:2] + (-1,)) ** 2, axis=-1)
        log_w = jnp.log(jnp.asarray(self.weights))[None] - 0.5 * (sq / var + d * jnp.log(var))
        post = jax.nn.softmax(log_w, axis=-1)
        x0_k = (s2[expand] * x[:, None] + (sigma[:, None] ** 2)[expand] * means) / var[expand]
        return jnp.sum(post[expand] * x0_k, axis=1)
