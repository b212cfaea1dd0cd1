"""Exact log-likelihood of data under the probability-flow ODE of any diffusion model.

Every process is read in EDM's frame y = x / alpha = x_0 + sigma n (EDM arXiv 2206.00364 Eq. 7),
whose probability-flow ODE is dy/dsigma = (y - D(y, sigma)) / sigma (EDM Eq. 3-4, s = 1) for the
denoiser D = E[x_0 | y]. It is integrated in u = ln sigma, dy/du = f(y, u) = y - D(y, e^u), from
sigma_min (the data end, y = x_0, as score_sde starts at t = eps) to sigma_max, together with the
instantaneous change of variables (FFJORD arXiv 1810.01367 Eq. 4; score_sde arXiv 2011.13456
App. D.2): ln p_0(y_0) = ln p_T(y_T) + int div_y f du, with div f = d - tr(dD/dy). The prior p_T
is the variance-exploding one, N(0, sigma_max^2 I): it ignores the data's own mean m and variance
s^2 at sigma_max, an error of O(d s^2 / sigma_max^2) nats for centred data, plus
m.(x - m) / (s sigma_max) where the mean is not zero (measured in tests/test_likelihood.py).

The registries below name the choices: `SOLVERS` (fixed-step Heun and RK4 on a grid uniform in
ln sigma, adaptive Dormand-Prince and Tsitouras through diffrax), `DIVERGENCES` (the exact trace
or Hutchinson's estimator) and `PROBES` (Hutchinson's probe distributions).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxdiff import parameterisations
from jaxdiff.bundle import DiffusionModel
from jaxdiff.denoiser import denoiser

Array = jax.Array
# denoise(y [B, ...], sigma [B], args) -> D(y, sigma) [B, ...]; args is a traced pytree.
Denoise = Callable[[Array, Array, Any], Array]


# ---------------------------------------------------------------------------------------------
# Divergence: (D(y), tr dD/dy [B]) of a denoiser acting on each example alone. Both use
# reverse-mode vector-Jacobian products, as score_sde does: the U-Net's GroupNorm and bias ops
# have hand-written VJPs (jaxdiff.models.ops), which forward mode cannot differentiate.


def _exact_trace(denoise_at: Callable[[Array], Array], y: Array, probe: Array | None
                 ) -> tuple[Array, Array]:
    """tr(dD/dy) as the sum of e_i^T (dD/dy) e_i over the d basis vectors (exact, d VJPs)."""
    del probe
    batch, d = y.shape[0], math.prod(y.shape[1:])
    out, vjp = jax.vjp(denoise_at, y)
    basis = jnp.eye(d, dtype=y.dtype).reshape((d, 1, *y.shape[1:]))
    diagonal = jax.lax.map(lambda e: jnp.sum(
        (vjp(jnp.broadcast_to(e, y.shape))[0] * e).reshape(batch, d), axis=1), basis)
    return out, jnp.sum(diagonal, axis=0)


def _hutchinson_trace(denoise_at: Callable[[Array], Array], y: Array, probe: Array | None
                      ) -> tuple[Array, Array]:
    """tr(dD/dy) ~ eps^T (dD/dy) eps, unbiased for E[eps eps^T] = I (Hutchinson 1989; FFJORD
    Sec. 3.1), one VJP."""
    out, vjp = jax.vjp(denoise_at, y)
    return out, jnp.sum((vjp(probe)[0] * probe).reshape(y.shape[0], -1), axis=1)


DIVERGENCES: dict[str, Callable] = {"exact": _exact_trace, "hutchinson": _hutchinson_trace}


def _rademacher(rng: Array, shape: tuple[int, ...]) -> Array:
    return jax.random.rademacher(rng, shape, jnp.float32)


PROBES: dict[str, Callable[[Array, tuple[int, ...]], Array]] = {
    "rademacher": _rademacher, "gaussian": jax.random.normal}


# ---------------------------------------------------------------------------------------------
# Solvers of dz/du = F(u, z), z = (y, integral of div f).


@dataclasses.dataclass(frozen=True)
class Solver:
    """An explicit Runge-Kutta scheme by its Butcher tableau (a, b, c), fixed steps, or an
    adaptive diffrax solver by its class name (diffrax is imported on first use: it adds 0.8 s,
    a fifth, to `import jaxdiff`)."""

    tableau: tuple[tuple[tuple[float, ...], ...], tuple[float, ...], tuple[float, ...]] | None \
        = None
    adaptive: str | None = None

    @property
    def evaluations(self) -> int:
        """Right-hand-side evaluations per fixed step."""
        return len(self.tableau[1])


def _runge_kutta_step(tableau, field, z, u, h):
    """One explicit Runge-Kutta step, a `lax.scan` over the stages so that the denoiser is
    traced (and compiled) once whatever the order: stage i evaluates F at
    (u + c_i h, z + h sum_j a_ij k_j) (Butcher 1964); the step adds h sum_i b_i k_i."""
    a, b, c = (jnp.asarray(v, jnp.float32) for v in tableau)
    stages = jax.tree.map(lambda v: jnp.zeros((len(b), *v.shape), v.dtype), z)

    def stage(k, i):
        z_i = jax.tree.map(lambda v, kv: v + h * jnp.tensordot(a[i], kv, axes=1), z, k)
        k_i = field(u + c[i] * h, z_i)
        return jax.tree.map(lambda kv, ki: kv.at[i].set(ki), k, k_i), None

    k, _ = jax.lax.scan(stage, stages, jnp.arange(len(b)))
    return jax.tree.map(lambda v, kv: v + h * jnp.tensordot(b, kv, axes=1), z, k)


# Adaptive solvers go through diffrax: an embedded error estimate, a PID step-size controller
# with rtol/atol (score_sde uses SciPy's RK45 at 1e-5) and step statistics, under jit.
SOLVERS: dict[str, Solver] = {
    # Heun's trapezoidal rule, second order (EDM Alg. 1 lines 5-8).
    "heun": Solver(tableau=(((0.0, 0.0), (1.0, 0.0)), (0.5, 0.5), (0.0, 1.0))),
    # The classical fourth-order Runge-Kutta method.
    "rk4": Solver(tableau=(((0.0, 0.0, 0.0, 0.0), (0.5, 0.0, 0.0, 0.0), (0.0, 0.5, 0.0, 0.0),
                            (0.0, 0.0, 1.0, 0.0)),
                           (1 / 6, 1 / 3, 1 / 3, 1 / 6), (0.0, 0.5, 0.5, 1.0))),
    "dopri5": Solver(adaptive="Dopri5"),  # Dormand-Prince RK45, score_sde's method
    "tsit5": Solver(adaptive="Tsit5"),
}


_REGISTRIES = {"solver": ("ODE solver", SOLVERS), "divergence": ("divergence", DIVERGENCES),
               "probe": ("Hutchinson probe", PROBES)}


def check_options(**options) -> None:
    """The given options of `ode_log_likelihood` (solver, divergence, probe, num_steps, rtol,
    atol, max_steps): a ValueError naming the first bad one, before anything compiles."""
    for name, value in options.items():
        if name in _REGISTRIES:
            kind, registry = _REGISTRIES[name]
            if value not in registry:
                raise ValueError(f"unknown {kind} {value!r}; expected one of {tuple(registry)}")
        elif name in ("num_steps", "max_steps"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        elif name in ("rtol", "atol"):
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        else:
            raise ValueError(f"unknown ODE likelihood option {name!r}; expected one of "
                             "solver, divergence, probe, num_steps, rtol, atol, max_steps")


def _check_sigmas(sigma_min: float, sigma_max: float) -> None:
    if not 0.0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"the ODE needs 0 < sigma_min < sigma_max < inf, got "
                         f"sigma_min={sigma_min}, sigma_max={sigma_max}")


# ---------------------------------------------------------------------------------------------
# The likelihood.


@functools.partial(jax.jit, static_argnames=(
    "denoise", "solver", "divergence", "probe", "num_steps", "rtol", "atol", "max_steps"))
def _solve(denoise: Denoise, args, x0: Array, rng: Array, sigma_min: Array, sigma_max: Array, *,
           solver: str, divergence: str, probe: str, num_steps: int, rtol: float, atol: float,
           max_steps: int) -> tuple[Array, Array]:
    batch, d = x0.shape[0], math.prod(x0.shape[1:])
    eps = PROBES[probe](rng, x0.shape) if divergence == "hutchinson" else None
    trace = DIVERGENCES[divergence]

    def field(u, z):
        """(dy/du, d(ln p_0 - ln p_T)/du) = (y - D(y, e^u), d - tr dD/dy): the identity's
        trace d is exact, only tr dD/dy is estimated (less variance than a probe of the whole
        drift under a Gaussian probe)."""
        y, _ = z
        sigma = jnp.full((batch,), jnp.exp(u), y.dtype)
        x0_hat, tr = trace(lambda v: denoise(v, sigma, args), y, eps)
        return y - x0_hat, d - tr

    z = (x0, jnp.zeros((batch,), x0.dtype))
    u0, u1 = jnp.log(sigma_min), jnp.log(sigma_max)
    spec = SOLVERS[solver]
    if spec.adaptive is None:
        h = (u1 - u0) / num_steps
        z, _ = jax.lax.scan(
            lambda z, i: (_runge_kutta_step(spec.tableau, field, z, u0 + i * h, h), None), z,
            jnp.arange(num_steps))
        nfe = jnp.int32(spec.evaluations * num_steps)
    else:
        import diffrax

        solution = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda u, z, _: field(u, z)), getattr(diffrax, spec.adaptive)(),
            u0, u1, None, z, stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=max_steps, saveat=diffrax.SaveAt(t1=True))
        z = jax.tree.map(lambda v: v[-1], solution.ys)
        nfe = _adaptive_nfe(solution.stats["num_steps"])
    y_T, delta = z
    prior = -0.5 * (d * jnp.log(2 * jnp.pi * sigma_max**2)
                    + jnp.sum(y_T.reshape(batch, -1) ** 2, axis=1) / sigma_max**2)
    return prior + delta, nfe


def _adaptive_nfe(num_steps: Array) -> Array:
    """Evaluations of diffrax's first-same-as-last 7-stage solvers: 1 at the start and 6 per
    step tried, accepted or rejected (counted in tests/test_likelihood.py)."""
    return 1 + 6 * num_steps


def ode_log_likelihood(
    denoise: Denoise,
    x0: Array,
    rng: Array,
    *,
    sigma_min: float,
    sigma_max: float,
    args: Any = None,
    solver: str = "rk4",
    num_steps: int = 64,
    divergence: str = "exact",
    probe: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
) -> tuple[Array, Array]:
    """ln p_0(x0) under the probability-flow ODE of `denoise` (score_sde App. D.2), in nats [B].

    denoise(y, sigma [B], args) -> D(y, sigma) = E[x_0 | y = x_0 + sigma n] (`args`, a pytree
    such as the weights and labels, is traced: new values do not recompile; the callable itself
    is static, so keep one to compile once per configuration). x0 [B, ...] is the data at
    sigma_min, where the ODE starts. `solver` in `SOLVERS`: "heun" and "rk4" take `num_steps`
    steps uniform in ln sigma; "dopri5" and "tsit5" adapt their steps to rtol/atol (at most
    `max_steps`). `divergence` in `DIVERGENCES`: "exact" costs d vector-Jacobian products per
    evaluation (small d), "hutchinson" one, with a `probe` from `PROBES` drawn once per solve
    from `rng` (FFJORD; score_sde). Returns (ln p [B], nfe: the ODE's right-hand-side
    evaluations, each one denoiser call and its divergence).
    """
    check_options(solver=solver, divergence=divergence, probe=probe, num_steps=num_steps,
                  rtol=rtol, atol=atol, max_steps=max_steps)
    _check_sigmas(float(sigma_min), float(sigma_max))
    x0 = jnp.asarray(x0, jnp.float32)
    if x0.ndim < 2:
        raise ValueError(f"x0 must be batched, [B, ...], got shape {x0.shape}")
    return _solve(denoise, args, x0, rng, jnp.float32(sigma_min), jnp.float32(sigma_max),
                  solver=solver, divergence=divergence, probe=probe, num_steps=num_steps,
                  rtol=float(rtol), atol=float(atol), max_steps=max_steps)


# ---------------------------------------------------------------------------------------------
# Bits per dimension of 8-bit data.


def dequantise(x, rng: Array) -> Array:
    """8-bit images -> continuous data in [-1, 1): (k + U) / 256 * 2 - 1 with U ~ U[0, 1) per
    pixel level k (score_sde's uniform dequantisation). x: uint8, or floats in [-1, 1] on the
    255-level grid k / 127.5 - 1."""
    x = np.asarray(x)
    k = x.astype(np.float32) if x.dtype == np.uint8 else np.clip(
        np.round((x.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.float32)
    return (jnp.asarray(k) + jax.random.uniform(rng, k.shape)) / 128.0 - 1.0


def bits_per_dim(log_p: Array, d: int) -> Array:
    """-log2 P(8-bit x) / d bounded through the dequantised density of data in [-1, 1):
    -ln p / (d ln 2) + 7, the 7 = log2(256 / 2) of the bin width 2/256 (score_sde's offset
    7 - inverse_scaler(-1) with centred data)."""
    return -log_p / (d * math.log(2.0)) + 7.0


def check_model(model: DiffusionModel) -> None:
    """A ValueError for a model with no probability-flow ODE (a consistency model)."""
    if not parameterisations.get(model.model_output_type).denoises:
        raise ValueError("no likelihood is defined for a consistency model: it maps noise to "
                         "data in one step and has no probability-flow ODE (evaluate a diffusion "
                         "model, e.g. its teacher)")


# One denoise callable per network, reading and process, so that `_solve` compiles once for each;
# the most recent few are kept (each holds its compiled solver in jit's cache).
_MODEL_DENOISERS: collections.OrderedDict[Any, Denoise] = collections.OrderedDict()
_KEPT_DENOISERS = 8


def _model_denoise(model: DiffusionModel) -> Denoise:
    """denoise(y, sigma, {"params", "labels"}) of `model` through `jaxdiff.denoiser`, the one
    D(params, x, sigma, y) of every model; cached by the network, its reading and the process's
    values (the process is host data to the denoiser: a discrete one rounds sigma to its steps)."""
    leaves, treedef = jax.tree.flatten(model.schedule)
    key = (model.replace(params=None, schedule=None), treedef,
           tuple(np.asarray(v).tobytes() for v in leaves))
    if key not in _MODEL_DENOISERS:
        D = denoiser(model.replace(params=None))
        conditional = model.num_classes > 0

        def denoise(y, sigma, args):
            return D(args["params"], y, sigma, args["labels"] if conditional else None)

        _MODEL_DENOISERS[key] = denoise
        while len(_MODEL_DENOISERS) > _KEPT_DENOISERS:
            _MODEL_DENOISERS.popitem(last=False)
    _MODEL_DENOISERS.move_to_end(key)
    return _MODEL_DENOISERS[key]


def bits_per_dim_ode(
    model: DiffusionModel,
    x,
    rng: Array,
    *,
    labels=None,
    batch_size: int = 64,
    **options,
) -> dict[str, np.ndarray]:
    """Bits/dim of 8-bit examples x [N, *shape] (uint8, or floats in [-1, 1]) under the
    probability-flow ODE of `model` (score_sde's bpd: dequantised, then `ode_log_likelihood`).

    The denoiser is `jaxdiff.denoiser.denoiser(model)` between the process's sigma_min and
    sigma_max. A class-conditional model is scored given `labels` [N], else with its null label
    (num_classes). Batch b uses fold_in(rng, b) for its dequantisation noise and probe, and is
    padded with its last example so that every batch runs the one compiled solve. `options` are
    those of `ode_log_likelihood`. Returns per example "bpd" [N] and "nfe" [N] (its batch's).
    """
    check_model(model)
    check_options(**options)
    x = np.asarray(x)
    n = len(x)
    if n == 0 or x.shape[1:] != tuple(model.image_shape):
        raise ValueError(f"x must be [N, *{tuple(model.image_shape)}] with N >= 1, got shape "
                         f"{x.shape}")
    if labels is not None and not model.num_classes:
        raise ValueError("labels given to an unconditional model (num_classes=0)")
    labels = np.full(n, model.num_classes, np.int32) if labels is None else np.asarray(
        labels, np.int32)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    bad = labels[(labels < 0) | (labels > model.num_classes)]
    if bad.size:
        raise ValueError(f"labels must lie in [0, {model.num_classes}] ({model.num_classes}: the "
                         f"null label), got {bad[0]}")
    process = model.schedule
    denoise = _model_denoise(model)
    batch_size = min(batch_size, n)
    d = math.prod(x.shape[1:])
    bpd, nfe = [], []
    for b, start in enumerate(tqdm(range(0, n, batch_size), desc="bits/dim (ODE)", unit="batch")):
        index = np.minimum(np.arange(start, start + batch_size), n - 1)
        noise_key, probe_key = jax.random.split(jax.random.fold_in(rng, b))
        log_p, evaluations = ode_log_likelihood(
            denoise, dequantise(x[index], noise_key), probe_key,
            sigma_min=process.sigma_min, sigma_max=process.sigma_max,
            args={"params": model.params, "labels": jnp.asarray(labels[index])}, **options)
        keep = min(batch_size, n - start)
        bpd.append(np.asarray(bits_per_dim(log_p, d))[:keep])
        nfe.append(np.full(keep, int(evaluations)))
    return {"bpd": np.concatenate(bpd), "nfe": np.concatenate(nfe)}

