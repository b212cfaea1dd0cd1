"""Flow matching against closed forms: the loss's minimiser and its irreducible value.

For data x_0 ~ N(mu, s^2 I) and x_t = a x_0 + b eps (a = 1 - t, b = t), (x_0, eps, x_t) are
jointly Gaussian, so the velocity v = eps - x_0 has, per dimension,
E[v | x_t] = -mu + c / V (x_t - a mu) and Var(v | x_t) = 1 + s^2 - c^2 / V, with
V = Var(x_t) = a^2 s^2 + b^2 and c = Cov(v, x_t) = b - a s^2. E[v | x_t] minimises the
velocity MSE; the minimum is E_t[Var(v | x_t)].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.losses import training_losses
from jaxdiff.processes import FlowMatchingProcess

MU, S = 0.3, 0.5
BATCH, DIM = 4096, 64


def velocity_moments(x_t: jax.Array, t: jax.Array, mu: float = MU, s: float = S):
    """(E[v | x_t], Var(v | x_t)) of N(mu, s^2) data; t broadcasts against x_t."""
    a, b = 1.0 - t, t
    var_xt, cov = a**2 * s**2 + b**2, b - a * s**2
    return -mu + cov / var_xt * (x_t - a * mu), 1.0 + s**2 - cov**2 / var_xt


def closed_form_network(mu: float = MU, s: float = S):
    """The velocity network of N(mu, s^2) data: fed x_t and 1000 t (SD3's, diffusers')."""
    def network(x_in, c):
        return velocity_moments(x_in, (c / 1000.0)[:, None], mu, s)[0]
    return network


# Directions h(x_t, t) of the perturbation: the stationarity condition E[(out - v) h] = 0 must
# hold for every function of (x_t, t), and these probe the constant, linear and t-weighted parts.
DIRECTIONS = {
    "constant": lambda x, t: jnp.ones_like(x),
    "x_t": lambda x, t: x,
    "t x_t": lambda x, t: t * x,
    "t^2": lambda x, t: t**2 * jnp.ones_like(x),
}


def _gradient_and_error(process, network, rng, direction):
    """The mean loss's derivative along `direction` and its Monte-Carlo standard error."""
    x0 = MU + S * jax.random.normal(rng, (BATCH, DIM))
    noise = jax.random.normal(jax.random.fold_in(rng, 1), x0.shape)
    t = process.sample_t(jax.random.fold_in(rng, 2), (BATCH,))
    x_t = (1.0 - t)[:, None] * x0 + t[:, None] * noise

    def mean_loss(eps):
        def model_fn(x_in, c):
            return network(x_in, c) + eps * direction(x_in, (c / 1000.0)[:, None])
        return jnp.mean(training_losses(process, model_fn, x0, rng, model_output_type="velocity",
                                        t=t, noise=noise)["loss"])

    grad = jax.grad(mean_loss)(0.0)
    # The summands 2 (out - v) h / DIM per example are independent with mean zero at the optimum.
    summand = 2.0 * (network(x_t, 1000.0 * t) - (noise - x0)) * direction(x_t, t[:, None])
    error = float(jnp.std(jnp.mean(summand, axis=1)) / np.sqrt(BATCH))
    return float(grad), error, float(jnp.mean(mean_loss(0.0)))


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_closed_form_velocity_is_stationary_for_the_flow_matching_loss(shift, direction):
    """d/d eps of the mean loss at E[v | x_t] + eps h is zero within 5 standard errors along
    every direction h, and a near miss (the velocity of N(0.35, 0.6^2) data instead of
    N(0.3, 0.5^2)) is detected along the same h. Measured: |grad| / error <= 1.04 at the
    minimiser, >= 35 at the near miss."""
    process = FlowMatchingProcess(shift=shift)
    rng = jax.random.key(0)
    grad, error, _ = _gradient_and_error(process, closed_form_network(), rng,
                                         DIRECTIONS[direction])
    assert abs(grad) < 5.0 * error, (grad, error)
    wrong, _, _ = _gradient_and_error(process, closed_form_network(0.35, 0.6), rng,
                                      DIRECTIONS[direction])
    assert abs(wrong) > 10.0 * error, (wrong, error)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matching_loss_at_its_minimiser_is_the_irreducible_variance(shift):
    """With t drawn by the process (SD3's shifted logit-normal), the mean loss at E[v | x_t]
    equals E_t[Var(v | x_t)] at the same t within 1% (Monte-Carlo std 0.3%: BATCH * DIM
    squared Gaussians; measured 0.17% at shift 1, 0.08% at shift 3)."""
    process = FlowMatchingProcess(shift=shift)
    rng = jax.random.key(1)
    x0 = MU + S * jax.random.normal(rng, (BATCH, DIM))
    terms = training_losses(process, closed_form_network(), x0, jax.random.fold_in(rng, 1),
                            model_output_type="velocity")
    irreducible = velocity_moments(0.0, terms["t"])[1]
    np.testing.assert_allclose(float(jnp.mean(terms["loss"])), float(jnp.mean(irreducible)),
                               rtol=0.01)
    # The perturbation raises the mean loss by the perturbation's mean square (here 0.01),
    # exactly up to the cross term, which is the stationarity test's.
    shifted = training_losses(process, lambda x, c: closed_form_network()(x, c) + 0.1, x0,
                              jax.random.fold_in(rng, 1), model_output_type="velocity")
    np.testing.assert_allclose(float(jnp.mean(shifted["loss"] - terms["loss"])), 0.01,
                               atol=0.002)
