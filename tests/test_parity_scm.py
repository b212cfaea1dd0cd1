"""Cross-framework parity of sCM's tangent: jaxdiff's `scm.consistency_tangent` and
`normalise_tangent` against a torch port of NVlabs/FastGen's `SCMModel._jvp` and the tangent of
`_scm_pred_to_loss` (`fastgen/methods/consistency_model/sCM.py`; no official sCM code was
released): `torch.func.jvp` along (cos(t) sin(t) dx_t/dt, cos(t) sin(t)), g = -cos^2(t) (sigma_d
F - dx_t/dt) - r (cos(t) sin(t) x_t + sigma_d F_jvp), g / (||g|| + c) with FastGen's
`g_norm_spatial_invariance` off (sCM Alg. 1's ||g||). The network is analytic in both frameworks,
in float64. Where FastGen's defaults differ from Alg. 1 (not compared): it normalises g by its
RMS, not its norm, and divides the loss by D twice. Needs the `parity` extra.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxdiff import scm  # noqa: E402

pytestmark = pytest.mark.parity

SD, B, D, R, C = 0.5, 6, 5, 0.7, 0.1
W = np.random.default_rng(1).normal(size=(D, D)) * 0.3


def network(x, t, lib):
    """F(x_t / sigma_d, t): smooth in both arguments."""
    w = torch.from_numpy(W) if lib is torch else W
    return lib.tanh(x / SD @ w) * lib.cos(t)[:, None] + lib.sin(3 * t)[:, None]


def fastgen_tangent(x, t, v):
    x, t, v = map(torch.from_numpy, (x, t, v))
    a, s = torch.cos(t), torch.sin(t)
    f, f_jvp = torch.func.jvp(lambda x_, t_: network(x_, t_, torch), (x, t),
                              ((a * s)[:, None] * v, a * s))
    g = -(a * a)[:, None] * (SD * f - v) - R * ((a * s)[:, None] * x + SD * f_jvp)
    return g.numpy(), (g / (torch.linalg.vector_norm(g, dim=1, keepdim=True) + C)).numpy()


@pytest.mark.parametrize("jvp", [jax.jvp, scm.transposed_vjp], ids=["jvp", "transposed_vjp"])
def test_tangent_matches_fastgen(jvp):
    rng = np.random.default_rng(0)
    x, v = rng.normal(size=(2, B, D))
    t = rng.uniform(0.05, 1.5, size=B)
    want, want_normalised = fastgen_tangent(x, t, v)
    with jax.enable_x64(True):
        _, g = scm.consistency_tangent(lambda x_, t_: network(x_, t_, jnp), jnp.asarray(x),
                                       jnp.asarray(t), jnp.asarray(v), sigma_data=SD, warmup=R,
                                       jvp=jvp)
        np.testing.assert_allclose(g, want, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(scm.normalise_tangent(g, C), want_normalised, rtol=1e-12,
                                   atol=1e-14)
