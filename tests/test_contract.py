"""The registries' contract: every process x parameterisation x sampler samples Gaussian data.

For data N(mu, s^2 I) every quantity is closed form in EDM's frame x = x_0 + sigma n: the
denoiser D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), the probability-flow ODE's solution
x(sigma) = mu + (x(sigma') - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma'^2)), and the consistency
function f(x, sigma) = x(sigma_min) of that solution. The oracle network below outputs, for any
process and parameterisation, exactly what a perfectly trained network would: it reads its
input and time back through the process (`t_of_network_time`) and the parameterisation
(`network_input`, linear in x) and returns the parameterisation's target at the oracle's x_0
(a denoiser's, or for a consistency parameterisation the consistency function). The tests are
parametrised over the registries, so a new entry is tested the moment it is registered:

- an "ode" sampler lands where the closed-form ODE takes its own first point (pathwise);
- an "sde" or "consistency" sampler draws samples with the data's mean and std.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from experiments import toy2d
from jaxdiff import samplers
from jaxdiff.bundle import DiffusionModel, make_bundle
from jaxdiff.config import default_config
from jaxdiff.denoiser import denoiser, predict
from jaxdiff.models import init_params
from jaxdiff.parameterisations import CONSISTENCY_SIGMA_MIN, PARAMETERISATIONS
from jaxdiff.processes import PROCESSES, make_process

MU = np.array([0.3, -0.2], np.float32)
S = 0.5
SIGMA_DATA = 0.5
N = 2000


def process_of(name: str):
    config = default_config()
    config.diffusion.process = name
    return make_process(config.diffusion)


def oracle_x0(x: jax.Array, level: jax.Array, denoises: bool) -> jax.Array:
    """E[x_0 | x] of N(MU, S^2 I) at x = x_0 + level n, or the consistency function there."""
    if denoises:
        return MU + S**2 / (S**2 + level**2) * (x - MU)
    return MU + (x - MU) * jnp.sqrt((S**2 + CONSISTENCY_SIGMA_MIN**2) / (S**2 + level**2))


def oracle_network(process, name: str, sigma_data: float = SIGMA_DATA):
    """model(params, x_in, c_noise, y): the exact output of parameterisation `name` (read with
    EDM's `sigma_data`)."""
    param = PARAMETERISATIONS[name]

    def network(params, x_in, c, y):
        del params, y
        t = process.t_of_network_time(c)
        alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
        x_model = x_in / param.network_input(jnp.ones_like(x_in), alpha, sigma, sigma_data)
        x0 = oracle_x0(x_model / alpha, sigma / alpha, param.denoises)
        return param.target(x0, (x_model - alpha * x0) / sigma, alpha, sigma, sigma_data)

    return network


def draw(process_name, param_name, method, **kwargs):
    process = process_of(process_name)
    return jaxdiff.sample(None, jax.random.key(0), method, model=oracle_network(process,
                                                                               param_name),
                          schedule=process, shape=(2,), model_output_type=param_name,
                          sigma_data=SIGMA_DATA, clip_denoised=False, num_samples=N, **kwargs)


def _cases(kinds):
    """(process, parameterisation, sampler) triples that fit (a consistency sampler reads a
    consistency function, the others a denoiser). Every triple runs in `make test-all`; `make
    test` runs a cover of pairs: every sampler on every process with the first parameterisation
    that fits it, and every parameterisation on every process with the first sampler."""
    first_param = {}
    first_method = {}
    for process, param, method in itertools.product(PROCESSES, PARAMETERISATIONS,
                                                     samplers.SAMPLERS):
        kind = samplers.SAMPLERS[method].kind
        if kind not in kinds or PARAMETERISATIONS[param].denoises != (kind != "consistency"):
            continue
        cover = first_param.setdefault((process, method), param) == param \
            or first_method.setdefault((process, param), method) == method
        yield pytest.param(process, param, method,
                           marks=() if cover else pytest.mark.slow)


def flow_error(process: str, param: str, method: str, num_steps: int) -> float:
    """Max |x - x_exact| / max |x_exact - MU| over the samples: the relative error of the
    sampler's end point against the closed-form flow from its own first point."""
    x, path = draw(process, param, method, num_steps=num_steps, return_trajectory=True)
    options = samplers.resolve_options(method, process_of(process), {})
    sigma0 = samplers.build_grid(process_of(process), method, num_steps, options).sigma[0]
    first = np.asarray(path["xt"][0], np.float64)
    start = first * (math.sqrt(1 + sigma0**2) if samplers.get(method).frame == "vp" else 1.0)
    exact = MU + (start - MU) * S / math.sqrt(S**2 + sigma0**2)
    return float(np.max(np.abs(np.asarray(x) - exact)) / np.max(np.abs(exact - MU)))


@pytest.mark.parametrize("process, param, method", list(_cases({"ode"})))
def test_every_ode_sampler_follows_the_closed_form_flow_at_its_order(process, param, method):
    """Relative end-point error below 8% at the method's default step count (measured up to
    6.0%: ddim-50 and heun-18 on EDM's range; dpm_solver++-20 1.9%), and falling at the
    method's order p when the steps double: e(N) / e(2N) > 2^(p - 0.6) (measured 1.9-2.1 for
    p = 1, 3.5-4.3 for p = 2). A wrong parameterisation, frame or level misses by O(1)."""
    sampler = samplers.get(method)
    steps = sampler.default_steps
    coarse, fine = (flow_error(process, param, method, n) for n in (steps, 2 * steps))
    assert coarse < 0.08, coarse
    assert coarse / fine > 2.0 ** (sampler.order - 0.6), (coarse, fine)


@pytest.mark.parametrize("process, param, method", list(_cases({"sde", "consistency"})))
def test_every_stochastic_sampler_draws_the_data(process, param, method):
    """Mean within 0.04 and std within 8% of N(MU, S^2) at 2000 samples (standard errors 0.011
    and 1.6%). Ancestral sampling converges slowly in the step count (std 10% low at 50 steps,
    5% at 200 on EDM's range, measured), so the stochastic methods take 250 steps here (a chain
    of 1000 every fourth step); the consistency sampler takes its one step."""
    steps = None if samplers.get(method).kind == "consistency" else 250
    x = np.asarray(draw(process, param, method, num_steps=steps))
    np.testing.assert_allclose(x.mean(0), MU, atol=0.04)
    np.testing.assert_allclose(x.std(0), S, rtol=0.08)


# CD's teacher (train.py: `denoiser(make_bundle(teacher_config, params=None))`) must be the
# denoiser the samplers integrate, or CD distils another ODE than the teacher's sampler's.
TEACHER_LEVELS = (0.05, 1.0, 10.0)


def teacher_and_sampler(bundle, params, x, level):
    """(the teacher's D, the sampler's D, the level) at x and the level the sampler integrates
    (the model's nearest to `level`). The sampler's D is one Euler step from that level to 0,
    which lands on x + (0 - level) (x - D) / level = D; it starts from x_T times the level."""
    rounded = float(bundle.schedule.round_sigma(jnp.asarray(level)))
    teacher = denoiser(bundle.replace(params=None))(params, x, jnp.full(x.shape[:1], rounded))
    sampled = jaxdiff.sample(bundle, jax.random.key(0), "euler", num_steps=1, sigma_max=level,
                             x_T=x / rounded, clip_denoised=False)
    return teacher, sampled, rounded


def _teacher_cases():
    """Every process with every denoising parameterisation; `-m "not slow"` runs the first
    parameterisation on each process (each case compiles a sampler, 2-3 s; the network test
    below covers each process with its own output)."""
    denoisers = [p for p in PARAMETERISATIONS if PARAMETERISATIONS[p].denoises]
    for process, param in itertools.product(PROCESSES, denoisers):
        yield pytest.param(process, param, marks=() if param == denoisers[0] else pytest.mark.slow)


@pytest.mark.parametrize("process, param", list(_teacher_cases()))
def test_cd_teacher_is_the_samplers_closed_form_denoiser(process, param):
    """Through the oracle network, CD's teacher at any level equals the closed-form Gaussian
    denoiser and the sampler's evaluation, within 1e-5 (float32)."""
    proc = process_of(process)
    bundle = DiffusionModel(params=None, schedule=proc, model=oracle_network(proc, param),
                            image_shape=(2,), model_output_type=param, sigma_data=SIGMA_DATA)
    x = MU + 3.0 * jax.random.normal(jax.random.key(1), (8, 2))
    for level in TEACHER_LEVELS:
        teacher, sampled, rounded = teacher_and_sampler(bundle, None, x, level)
        exact = oracle_x0(x, rounded, True)
        np.testing.assert_allclose(teacher, exact, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(sampled, teacher, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("process, param", [("ddpm", "eps"), ("edm", "edm"),
                                            ("flow_matching", "velocity")])
def test_cd_teacher_is_the_samplers_denoiser_of_a_network(process, param):
    """A toy2d MLP as the config builds it: CD's teacher equals `predict` wired from the
    config's fields and the sampler's evaluation, within 1e-5."""
    config = toy2d.get_config()
    config.diffusion.process, config.diffusion.model_output = process, param
    config.diffusion.sigma_data = 0.7
    bundle = make_bundle(config, params=None)
    params = init_params(bundle.model, jax.random.key(0), bundle.image_shape, 0)
    bundle = bundle.replace(params=params)
    x = 2.0 * jax.random.normal(jax.random.key(1), (8, 2))
    for level in TEACHER_LEVELS:
        teacher, sampled, rounded = teacher_and_sampler(bundle, params, x, level)
        wired = predict(lambda x_in, c: bundle.model.apply({"params": params}, x_in, c,
                                                           train=False),
                        PARAMETERISATIONS[param], make_process(config.diffusion), x,
                        jnp.full((8,), rounded), sigma_data=0.7,
                        model_var_type=config.diffusion.model_var_type).x0
        np.testing.assert_allclose(teacher, wired, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(sampled, teacher, atol=1e-5, rtol=1e-5)
