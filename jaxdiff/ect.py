"""Easy Consistency Tuning (ECT): a consistency model tuned from a trained diffusion model.

Geng, Pokle, Luo, Lin & Kolter 2024, "Consistency Models Made Easy" (arXiv 2406.14548; code
locuslab/ect, `training/loss.py` `ECMLoss`). ECT starts the consistency function f from a
trained EDM denoiser (at the first stage r is far below t) and shrinks dt in stages towards the
consistency condition f(x_t, t) = f(x_r, r) at r -> t, on the same noise: x_t = x0 + t n,
x_r = x0 + r n (no teacher ODE step, as CT). The loss is w(t, r) d(f_theta(x_t, t),
stopgrad f_theta(x_r, r)) with w = 1 / (t - r) and d the adaptive pseudo-Huber
sqrt(||.||^2 + c^2) - c. In the EDM frame of `jaxdiff.consistency`: t and r are noise levels.

The boundary: the code's network meets the identity at r = 0 and replaces f(x_r, r) by the data
where r = 0; jaxdiff's consistency parameterisation meets it at sigma_min (f(x, sigma_min) = x),
so where r <= sigma_min the target is f(x_{sigma_min}, sigma_min) = x0 + sigma_min n.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.consistency import Student, _bcast, _flat

MAPPINGS = ("sigmoid", "const")


def ect_stage(step: jax.Array | int, *, stage_steps: int) -> jax.Array:
    """The stage s = floor(step / stage_steps): dt shrinks at each (the code's
    `stage = cur_tick // double_ticks`)."""
    return jnp.asarray(step, jnp.int32) // stage_steps


def ect_r(t: jax.Array, stage: jax.Array | int, *, q: float = 2.0, k: float = 8.0,
          b: float = 1.0, mapping: str = "sigmoid") -> jax.Array:
    """r = max(t (1 - q^-(s+1) n(t)), 0), ECT's dt -> 0 mapping function (Sec. 3; the code's
    `t_to_r_sigmoid` / `t_to_r_const`): n(t) = 1 + k sigmoid(-b t) ('sigmoid') or 1 ('const')."""
    if mapping not in MAPPINGS:
        raise ValueError(f"unknown ECT mapping {mapping!r}; expected one of {MAPPINGS}")
    adjust = 1.0 + k * jax.nn.sigmoid(-b * t) if mapping == "sigmoid" else 1.0
    decay = jnp.asarray(q, jnp.float32) ** -(jnp.asarray(stage, jnp.float32) + 1.0)
    return jnp.maximum(t * (1.0 - decay * adjust), 0.0)


def adaptive_pseudo_huber(x: jax.Array, y: jax.Array, *, c: float) -> jax.Array:
    """d(x, y) = sqrt(||x - y||_2^2 + c^2) - c per example (ECT's adaptive weighting, the code's
    "Adaptive Weighting (p=0.5) through Huber Loss"; c = 0 is the code's default, the L2 norm).
    Unlike `consistency.pseudo_huber_distance` it allows c = 0 with a zero gradient at x = y,
    where the norm's derivative is 0 / 0 (a clipped t = sigma_min gives x = y exactly)."""
    sq = jnp.sum(_flat(x - y) ** 2, axis=-1) + c**2
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0) - c


def ect_weight(t: jax.Array, r: jax.Array) -> jax.Array:
    """w(t, r) = 1 / (t - r), ECT's weighting function (the code's `loss / (t - r)`)."""
    return 1.0 / (t - r)


def ect_loss(student_fn: Student, params, x0: jax.Array, rng: jax.Array, *,
             stage: jax.Array | int, q: float = 2.0, k: float = 8.0, b: float = 1.0,
             mapping: str = "sigmoid", huber_c: float = 0.0, p_mean: float = -1.1,
             p_std: float = 2.0, sigma_min: float, sigma_max: float
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-example ECT loss w(t, r) (sqrt(||f(x_t, t) - f(x_r, r)||^2 + c^2) - c), and t, r.

    ln t ~ N(P_mean, P_std^2) (iCT's lognormal; the code's defaults -1.1 and 2.0), kept within the
    model's levels [sigma_min, sigma_max]; r = `ect_r(t, stage)`; one noise n for both points;
    theta- = stopgrad(theta) (the code's `torch.no_grad()`; one dropout mask: the caller's).
    """
    t_rng, n_rng = jax.random.split(rng)
    shape = (x0.shape[0],)
    t = jnp.clip(jnp.exp(p_mean + p_std * jax.random.normal(t_rng, shape)), sigma_min, sigma_max)
    r = ect_r(t, stage, q=q, k=k, b=b, mapping=mapping)
    n = jax.random.normal(n_rng, x0.shape)
    online = student_fn(params, x0 + _bcast(t, x0) * n, t)
    boundary = r <= sigma_min
    r_eval = jnp.where(boundary, sigma_min, r)
    target = jnp.where(_bcast(boundary, x0), x0 + sigma_min * n,
                       student_fn(params, x0 + _bcast(r_eval, x0) * n, r_eval))
    d = adaptive_pseudo_huber(online, jax.lax.stop_gradient(target), c=huber_c)
    return ect_weight(t, r) * d, t, r
