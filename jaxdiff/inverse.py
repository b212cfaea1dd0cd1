"""The mathematics of editing with a trained denoiser: pure functions over arrays and operators.

All of it is written in EDM's frame x = x_0 + sigma n (the sampler's frame is converted at the
call), with `op` a linear operator of `jaxdiff.operators` (A, A^+, A^+ A) and y = A x_0 the
measurement.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.operators import Operator


def replace_measured(op: Operator, y: jax.Array, x: jax.Array, sigma: jax.Array,
                     noise: jax.Array) -> jax.Array:
    """x' = A^+ (y + sigma A n) + (I - A^+ A) x: the measured part of x at level sigma replaced
    by a draw of q(x_sigma | x_0) (score_sde arXiv 2011.13456 App. I.2; RePaint arXiv 2201.09865
    Eq. 8; at sigma = 0 consistency models' Alg. 4 step A^{-1}[(Ay)(1 - Omega) + (Ax) Omega])."""
    return x - op.project(x) + op.pinv(y) + sigma * op.project(noise)


def range_null_x0(op: Operator, y: jax.Array, x0: jax.Array, lam=1.0) -> jax.Array:
    """x0_hat = x0 - lam A^+ (A x0 - y): at lam = 1 the range-null decomposition A^+ y + (I -
    A^+ A) x0 (DDNM arXiv 2212.00490 Eq. 13), so that A x0_hat = y exactly; lam = lambda_t < 1
    is DDNM+'s partial correction for a noisy y (Eq. 17, Sigma_t = lambda_t I)."""
    return x0 - lam * op.project(x0) + lam * op.pinv(y)


def ddnm_plus_scales(coef: np.ndarray, sigma: np.ndarray, sigma_y: float):
    """(lambda_t, sqrt(Phi_t) / sigma_t) of DDNM+ (arXiv 2212.00490 Eq. 19) for the DDPM posterior
    x_{t-1} = coef x0_hat + ... + sigma_t z: lambda_t = min(1, sigma_t / (coef sigma_y)) and
    Phi_t = sigma_t^2 - (coef lambda_t sigma_y)^2, so that the noise lambda_t A^+ n that y = A x_0
    + sigma_y n brings, plus the step's own noise sqrt(Phi_t) z, is the posterior's sigma_t^2."""
    coef, sigma = np.asarray(coef, np.float64), np.asarray(sigma, np.float64)
    reach = coef * sigma_y  # the std the full correction would bring
    lam = np.where(sigma >= reach, 1.0, sigma / np.where(sigma >= reach, 1.0, reach))
    phi = sigma**2 - (reach * lam) ** 2
    return lam, np.sqrt(phi / np.where(sigma > 0, sigma**2, 1.0))


def residual_norm(op: Operator, y: jax.Array, x0: jax.Array) -> jax.Array:
    """||y - A(x0)||_2 per example [B] (DPS arXiv 2209.14687 Alg. 1's data term, unsquared as
    in its code: zeta_i = zeta' / ||y - A(x0_hat)|| makes its step zeta' grad ||.||)."""
    r = y - op.apply(x0)
    return jnp.sqrt(jnp.sum(r.reshape(r.shape[0], -1) ** 2, axis=-1))


def slerp(a: jax.Array, b: jax.Array, alpha: jax.Array) -> jax.Array:
    """Spherical interpolation of each pair (a_i, b_i) at fractions alpha [K] -> [B, K, ...]
    (DDIM arXiv 2010.02502 Sec. 5.3 / App. D.5, after White 2016): sin((1 - alpha) theta) /
    sin(theta) a + sin(alpha theta) / sin(theta) b, theta the angle between a and b."""
    flat_a, flat_b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    cos = jnp.sum(flat_a * flat_b, -1) / (jnp.linalg.norm(flat_a, axis=-1)
                                          * jnp.linalg.norm(flat_b, axis=-1))
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))[:, None]  # [B, 1]
    alpha = jnp.asarray(alpha, a.dtype)[None]  # [1, K]
    wa = jnp.sin((1.0 - alpha) * theta) / jnp.sin(theta)
    wb = jnp.sin(alpha * theta) / jnp.sin(theta)
    expand = (...,) + (None,) * (a.ndim - 1)
    return wa[expand] * a[:, None] + wb[expand] * b[:, None]


def repaint_schedule(num_steps: int, jump_length: int, resamplings: int) -> np.ndarray:
    """The chain indices RePaint visits, num_steps - 1 down to -1 (= x_0), going back up
    `jump_length` steps (r - 1) times at every multiple of it (RePaint Alg. 1 with its jumps,
    the official code's `get_schedule_jump`)."""
    jumps = {t: resamplings - 1 for t in range(0, num_steps - jump_length, jump_length)}
    t, visited = num_steps, []
    while t >= 1:
        t -= 1
        visited.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                visited.append(t)
    visited.append(-1)
    return np.asarray(visited)
