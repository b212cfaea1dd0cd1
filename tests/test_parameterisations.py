"""Every parameterisation against its defining equation, on VP and VE points."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import parameterisations
from jaxdiff.parameterisations import PARAMETERISATIONS

SIGMA_DATA = 0.6


def points(alpha: float, sigma: float):
    rng = np.random.default_rng(0)
    x0, eps = rng.normal(size=(2, 5, 3))
    return x0, eps, alpha * x0 + sigma * eps


CASES = [(0.8, 0.6), (0.05, 0.998749), (1.0, 2.5), (1.0, 0.01)]  # VP points, then VE (EDM) ones


@pytest.mark.parametrize("name", tuple(PARAMETERISATIONS))
@pytest.mark.parametrize("alpha, sigma", CASES)
def paper_target(name: str, x0, eps, alpha: float, sigma: float, sd: float):
    """Each entry's training target as its paper writes it, in float64: eps (DDPM Eq. 14), x_0,
    v = alpha eps - sigma x_0 (arXiv 2202.00512 Sec. 4), the velocity eps - x_0 (rectified flow
    arXiv 2209.03003 Eq. 1), for EDM (Eq. 8 and Table 1) and CM (App. C) F = (x_0 - c_skip x) /
    c_out on x = x_t / alpha = x_0 + (sigma / alpha) eps, and TrigFlow's velocity / sigma_d."""
    s = sigma / alpha
    x = x0 + s * eps
    if name == "edm":
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / np.sqrt(s**2 + sd**2)
    elif name == "consistency":
        c_skip = sd**2 / ((s - 0.002) ** 2 + sd**2)
        c_out = sd * (s - 0.002) / np.sqrt(sd**2 + s**2)
    elif name in ("trigflow", "trigflow_consistency"):
        # sCM (arXiv 2410.11081 Sec. 2): sigma_d F = dx_t/dt = cos(t) z - sin(t) x_0 on x_t =
        # cos(t) x_0 + sin(t) z, z = sigma_d eps, at t = arctan(sigma_edm / sigma_d).
        t = np.arctan(s / sd)
        return (np.cos(t) * sd * eps - np.sin(t) * x0) / sd
    else:
        return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "velocity": eps - x0}[name]
    return (x0 - c_skip * x) / c_out


@pytest.mark.parametrize("name", tuple(PARAMETERISATIONS))
@pytest.mark.parametrize("alpha, sigma", CASES)
def test_the_target_is_read_back_as_x0(name, alpha, sigma):
    """The target is the paper's (so the MSE trains what the paper trains), and to_x0 of it is
    x_0: an output equal to its training target is exact. A new entry adds its paper's target to
    `paper_target`."""
    assert name in ("eps", "x0", "v", "velocity", "edm", "consistency", "trigflow",
                    "trigflow_consistency"), \
        f"add {name!r} to paper_target"
    param = PARAMETERISATIONS[name]
    x0, eps, xt = points(alpha, sigma)
    a, s = jnp.float32(alpha), jnp.float32(sigma)
    target = param.target(x0, eps, a, s, SIGMA_DATA)
    # float32 rounding of x_0 - c_skip x grows as 1 / c_out ~ alpha / sigma (measured 2e-5 at
    # sigma = 0.01).
    np.testing.assert_allclose(target, paper_target(name, x0, eps, alpha, sigma, SIGMA_DATA),
                               rtol=1e-5, atol=1e-5 * max(1.0, alpha / sigma / 10))
    np.testing.assert_allclose(param.to_x0(target, xt, a, s, SIGMA_DATA), x0, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("name", tuple(PARAMETERISATIONS))
@pytest.mark.parametrize("alpha, sigma", CASES)
def test_x0_error_scale_is_the_derivative(name, alpha, sigma):
    """d x0_hat / d output (the factor that converts weightings), by automatic differentiation."""
    param = PARAMETERISATIONS[name]
    _, _, xt = points(alpha, sigma)
    out = jnp.zeros_like(xt)
    slope = jax.jvp(lambda o: param.to_x0(o, xt, alpha, sigma, SIGMA_DATA), (out,),
                    (jnp.ones_like(out),))[1]
    np.testing.assert_allclose(np.abs(slope), param.x0_error_scale(alpha, sigma, SIGMA_DATA),
                               rtol=1e-5)


def test_edm_preconditioning_is_table_1():
    """c_skip = s_d^2 / (sigma^2 + s_d^2), c_out = sigma s_d / sqrt(sigma^2 + s_d^2), c_in =
    1 / sqrt(sigma^2 + s_d^2) (EDM Table 1), on a VE point and on the same point scaled by a VP
    alpha (the preconditioning reads sigma / alpha and x / alpha)."""
    edm = PARAMETERISATIONS["edm"]
    sigma, sd = 2.5, SIGMA_DATA
    x = np.linspace(-3, 3, 7)
    total = sigma**2 + sd**2
    np.testing.assert_allclose(edm.network_input(x, 1.0, sigma, sd), x / np.sqrt(total), rtol=1e-6)
    f = np.cos(x)
    expected = sd**2 / total * x + sigma * sd / np.sqrt(total) * f
    np.testing.assert_allclose(edm.to_x0(f, x, 1.0, sigma, sd), expected, rtol=1e-6)
    alpha = 1 / np.sqrt(1 + sigma**2)
    np.testing.assert_allclose(edm.to_x0(f, alpha * x, alpha, alpha * sigma, sd), expected,
                               rtol=1e-6)
    # lambda(sigma) c_out^2 = 1 (EDM Eq. 8): the plain MSE of F is EDM's weighted loss.
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    assert weight * edm.x0_error_scale(1.0, sigma, sd) ** 2 == pytest.approx(1.0)


def test_v_is_progressive_distillations():
    v = PARAMETERISATIONS["v"]
    x0, eps, xt = points(0.8, 0.6)
    np.testing.assert_allclose(v.target(x0, eps, 0.8, 0.6, 0.0), 0.8 * eps - 0.6 * x0)


def test_unknown_name_is_an_error():
    names = ", ".join(repr(name) for name in PARAMETERISATIONS)
    with pytest.raises(ValueError, match=f"'score'.*{names}"):
        parameterisations.get("score")


def test_consistency_is_cm_appendix_c():
    """c_skip = s_d^2 / ((sigma - 0.002)^2 + s_d^2), c_out = s_d (sigma - 0.002) / sqrt(s_d^2 +
    sigma^2) (CM arXiv 2303.01469 App. C), c_in EDM's; f(x, sigma_min) = x whatever F is."""
    cm = PARAMETERISATIONS["consistency"]
    x, f = np.linspace(-3, 3, 7), np.cos(np.linspace(-3, 3, 7))
    # sigma = 1, s_d = 0.5 by hand: 0.25 / (0.998^2 + 0.25) = 0.2006414, 0.499 / sqrt(1.25).
    np.testing.assert_allclose(cm.to_x0(f, x, 1.0, 1.0, 0.5), 0.2006414 * x + 0.4463192 * f,
                               rtol=1e-6)
    np.testing.assert_allclose(cm.network_input(x, 1.0, 1.0, 0.5), x / np.sqrt(1.25), rtol=1e-6)
    assert parameterisations.CONSISTENCY_SIGMA_MIN == 0.002
    np.testing.assert_allclose(cm.to_x0(1e3 * f, x, 1.0, 0.002, 0.5), x, rtol=1e-6)
