"""What a training step optimises: one registry entry per objective.

`OBJECTIVES` holds plain diffusion training (spelled `consistency.method = 'none'` in a config,
as every workdir has it), the consistency objectives CD, CT and iCT (CM arXiv 2303.01469; iCT
arXiv 2310.14189) and the noisy classifier's cross-entropy, which its network selects (`Network.
objective`). Each entry owns its config fields and checks, including the combinations with the
process, parameterisation and network that mean nothing; `of_config` is the one place that says
which entry a config trains.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxdiff import consistency as cm
from jaxdiff import ect, parameterisations, processes, scm
from jaxdiff.denoiser import predict
from jaxdiff.diffusion import q_sample
from jaxdiff.losses import training_losses, weighting_params
from jaxdiff.models import get_network
from jaxdiff.models.adaptive_weighting import AdaptiveWeighting
from jaxdiff.processes import NoiseProcess
from jaxdiff.registry import Checker, Entry, is_int, lookup, names
from jaxdiff.samplers import ODE_STEPS
from jaxdiff.sharding import DEVICE_AXES

# Streams folded into a step's key, so each use of randomness has its own.
EXAMPLES, DROPOUT, LOSS = 0, 1, 2


def example_keys(step_key: jax.Array, stream: int, n: int) -> jax.Array:
    """One key per example of this device's n, keyed by the example's global batch index."""
    index = jax.lax.axis_index(DEVICE_AXES) * n + jnp.arange(n)
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(step_key, stream), index)


class StepInputs(NamedTuple):
    """What an objective reads besides the parameters it differentiates."""

    config: ml_collections.ConfigDict
    process: NoiseProcess
    apply: Callable[..., jax.Array]  # (params, x, time, y[, dropout_key]) -> output, train mode
    x0: jax.Array
    y: jax.Array | None  # the labels the denoiser is conditioned on (dropped to the null label)
    labels: jax.Array | None  # the batch's labels as they are (the classifier's targets)
    t: jax.Array  # per-example times and noise, drawn by the train step
    noise: jax.Array
    step: jax.Array
    step_key: jax.Array
    target_params: Any  # theta- (None where the objective has none)
    teacher: Callable | None  # CD: D(teacher_weights, x, sigma, y) (`jaxdiff.denoiser.denoiser`)
    frozen: dict[str, Any]  # `frozen_weights`: the teacher's and LPIPS's, replicated arguments


def _diffusion_loss(params, inputs: StepInputs):
    """The denoising loss of `diffusion` (`jaxdiff.losses.training_losses`)."""
    d = inputs.config.diffusion
    terms = training_losses(
        inputs.process,
        lambda xt, t: inputs.apply(params, xt, t, inputs.y),
        inputs.x0,
        jax.random.fold_in(inputs.step_key, LOSS),  # unused: t and noise are given
        loss_type=d.loss_type,
        model_output_type=d.model_output,
        model_var_type=d.model_var_type,
        hybrid_lambda=d.hybrid_lambda,
        weighting=d.loss_weighting,
        weighting_params=weighting_params(inputs.config),
        sigma_data=d.sigma_data,
        t=inputs.t,
        noise=inputs.noise,
    )
    extra = {k: jnp.mean(terms[k]) for k in ("mse", "vb") if k in terms}
    return jnp.mean(terms["loss"]), extra


def curriculum_steps(config: ml_collections.ConfigDict) -> int:
    """K of the CT / iCT curricula: `consistency.curriculum_steps`, else the run's length."""
    return config.consistency.curriculum_steps or config.training.num_steps


def _cd_example(student, params, x0, key, inputs: StepInputs, y, distance):
    c = inputs.config.consistency
    return cm.cd_loss(
        student, params, inputs.target_params, x0, key, num_scales=c.num_scales,
        teacher_denoise=lambda x, sigma: inputs.teacher(inputs.frozen["teacher"], x, sigma, y),
        solver=c.solver, distance=distance, sigma_max=inputs.process.sigma_max)[0]


def _ct_example(student, params, x0, key, inputs: StepInputs, y, distance):
    c = inputs.config.consistency
    n = cm.ct_num_scales(inputs.step, total_steps=curriculum_steps(inputs.config),
                         start_scales=c.start_scales, end_scales=c.end_scales)
    return cm.ct_loss(student, params, inputs.target_params, x0, key, num_scales=n,
                      distance=distance, sigma_max=inputs.process.sigma_max)[0]


def _ict_example(student, params, x0, key, inputs: StepInputs, y, distance):
    c = inputs.config.consistency
    n = cm.ict_num_scales(inputs.step, total_steps=curriculum_steps(inputs.config),
                          start_scales=c.start_scales, end_scales=c.end_scales)
    return cm.ict_loss(student, params, x0, key, num_scales=n, distance=distance,
                       p_mean=c.p_mean, p_std=c.p_std, sigma_max=inputs.process.sigma_max)[0]


def consistency_distance(config: ml_collections.ConfigDict, frozen: dict[str, Any]
                         ) -> cm.Distance:
    """d of `consistency.distance`, its options bound (the weights it loaded from `frozen`, under
    its name)."""
    name = config.consistency.distance
    options = cm.DISTANCES[name].options(config, frozen.get(name))
    return cm.get_distance(name, **options)


def _consistency_loss(example_loss):
    """The objective of a per-example consistency loss: each example (and its label) gets its
    own key from its global batch index, so the step does the same arithmetic on any number of
    devices; the network sees it as a batch of one. Its dropout key comes from that key too, and
    the online and the target network share it, as in the CM code (`cm/karras_diffusion.py`
    restores the RNG state between the two calls)."""

    def loss(params, inputs: StepInputs):
        distance = consistency_distance(inputs.config, inputs.frozen)
        keys = example_keys(inputs.step_key, LOSS, inputs.x0.shape[0])
        y = inputs.y if inputs.y is not None else jnp.zeros(inputs.x0.shape[:1], jnp.int32)

        def one(x0, key, label):
            label = label[None] if inputs.y is not None else None
            dropout_key = jax.random.fold_in(key, DROPOUT)
            student = cm.make_student(
                lambda p, x_in, time: inputs.apply(p, x_in, time, label, dropout_key),
                sigma_data=inputs.config.diffusion.sigma_data, process=inputs.process)
            return example_loss(student, params, x0[None], key, inputs, label, distance)[0]

        return jnp.mean(jax.vmap(one)(inputs.x0, keys, y)), {}

    return loss



# The key of an objective's own weights in the trained parameters (sCM's adaptive weighting
# w_phi): trained with the network's, never fed to it (`network_params`).
OWN = "objective"


def network_params(params: Any) -> Any:
    """The network's weights of a trained parameter tree: without the objective's own (`OWN`)."""
    if isinstance(params, dict) and OWN in params:
        return {k: v for k, v in params.items() if k != OWN}
    return params


def _init_adaptive_weighting(config: ml_collections.ConfigDict, rng: jax.Array) -> Any:
    return AdaptiveWeighting().init(rng, jnp.zeros((1,)))["params"]


def _scm_loss(velocity):
    """The sCM objective (arXiv 2410.11081 Alg. 1) of a velocity(inputs, x0, z, x_t) -> dx_t/dt:
    x_t = cos(t) x_0 + sin(t) z at the step's t and z = sigma_d noise (per-example draws, so any
    number of devices does the same arithmetic), theta- = stopgrad(theta) for the tangent, the
    adaptive weighting w_phi(t) trained with theta (`params[OWN]`)."""

    def loss(params, inputs: StepInputs):
        c, sd = inputs.config.consistency, inputs.config.diffusion.sigma_data
        net_params = network_params(params)
        t, x0 = inputs.t, inputs.x0
        z = sd * inputs.noise
        x_t = scm._bcast(jnp.cos(t), x0) * x0 + scm._bcast(jnp.sin(t), x0) * z

        def net(p):
            # F(x_t / sigma_d, c_noise(t)): one dropout key for F_theta and F_theta-.
            return lambda x, time: inputs.apply(p, x / sd, inputs.process.network_time(time),
                                                inputs.y)

        dxt_dt = jax.lax.stop_gradient(velocity(inputs, x0, z, x_t))
        f_minus, g = scm.consistency_tangent(
            net(jax.lax.stop_gradient(net_params)), x_t, t, dxt_dt, sigma_data=sd,
            warmup=scm.tangent_warmup(inputs.step, c.tangent_warmup_steps),
            jvp=scm.transposed_vjp)
        g = scm.normalise_tangent(g, c.tangent_norm_c)
        w = AdaptiveWeighting().apply({"params": params[OWN]}, inputs.process.network_time(t))
        losses = scm.scm_loss(net(net_params)(x_t, t), f_minus, g, w, t, sigma_data=sd,
                              prior_weighting=c.prior_weighting)
        return jnp.mean(losses), {"adaptive_weight": jnp.mean(w)}

    return loss


def _sct_velocity(inputs: StepInputs, x0, z, x_t):
    return scm.data_velocity(x0, z, inputs.t)


def _scd_velocity(inputs: StepInputs, x0, z, x_t):
    return scm.teacher_velocity(
        lambda x, sigma: inputs.teacher(inputs.frozen["teacher"], x, sigma, inputs.y),
        x_t, inputs.t, sigma_data=inputs.config.diffusion.sigma_data)


def _ect_example(student, params, x0, key, inputs: StepInputs, y, distance):
    del y, distance  # ECT's distance is its own (`ect.huber_c`)
    e, c = inputs.config.ect, inputs.config.consistency
    return ect.ect_loss(student, params, x0, key,
                        stage=ect.ect_stage(inputs.step, stage_steps=e.stage_steps), q=e.q, k=e.k,
                        b=e.b, mapping=e.mapping, huber_c=e.huber_c, p_mean=c.p_mean,
                        p_std=c.p_std, sigma_min=inputs.process.sigma_min,
                        sigma_max=inputs.process.sigma_max)[0]


def _pd_loss(params, inputs: StepInputs):
    """PD Alg. 2 (`progressive.pd_loss`): each example's student step drawn from its own key, its
    noise the step's; the teacher sees the labels the student sees."""
    from jaxdiff import progressive  # not at import: `python -m jaxdiff.progressive` runs it

    config, d = inputs.config, inputs.config.diffusion
    param = parameterisations.get(d.model_output)

    def student(x, sigma):
        return predict(lambda x_in, time: inputs.apply(params, x_in, time, inputs.y), param,
                       inputs.process, x, sigma, sigma_data=d.sigma_data,
                       model_var_type=d.model_var_type).x0

    def teacher(x, sigma):
        return inputs.teacher(inputs.frozen["teacher"], x, sigma, inputs.y)

    keys = example_keys(inputs.step_key, LOSS, inputs.x0.shape[0])
    index = jax.vmap(lambda k: jax.random.randint(k, (), 0, config.pd.num_steps))(keys)
    losses = progressive.pd_loss(student, teacher, inputs.x0, inputs.noise, index,
                                 num_steps=config.pd.num_steps,
                                 sigma_min=inputs.process.sigma_min,
                                 sigma_max=inputs.process.sigma_max, weighting=config.pd.weighting)
    return jnp.mean(losses), {}


def _classifier_loss(params, inputs: StepInputs):
    """The noisy classifier's cross-entropy -log p(y | x_t) (ADM arXiv 2105.05233 Sec. 4)."""
    xt = q_sample(inputs.process, inputs.x0, inputs.t, inputs.noise)
    logits = inputs.apply(params, xt, inputs.process.network_time(inputs.t), None)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, inputs.labels)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == inputs.labels)
    return jnp.mean(losses), {"accuracy": accuracy}


# ---------------------------------------------------------------------------------------------
# Checks.


def _check_no_teacher(c: Checker) -> None:
    name = of_config_name(c.config)
    c.check("distill.teacher", lambda v: v is None,
            f"only consistency.method {names(OBJECTIVES, lambda o: o.distils)} distils a "
            f"teacher; this config's is {name!r}")


def _check_diffusion(c: Checker) -> None:
    _check_no_teacher(c)
    output = c.get("diffusion.model_output")
    if not parameterisations.PARAMETERISATIONS[output].denoises:
        c.fail("diffusion.model_output", "a consistency model is trained by consistency.method "
               f"{names(OBJECTIVES, lambda o: o.parameterisation == output)}")


def _check_classifier(c: Checker) -> None:
    _check_no_teacher(c)
    network = c.get("model.name")
    c.check("consistency.method", lambda v: not OBJECTIVES[v].consistency,
            f"model.name {network!r} trains by its own objective "
            f"({get_network(network).objective!r}), not as a consistency model")


def _check_parameterisation(c: Checker) -> None:
    method = c.get("consistency.method")
    output = OBJECTIVES[method].parameterisation
    c.check("diffusion.model_output", lambda v: v == output,
            f"consistency.method {method!r} trains the {output!r} parameterisation")


def _check_consistency(c: Checker) -> None:
    method = c.get("consistency.method")
    c.check("diffusion.process", lambda v: processes.PROCESSES[v].exploding,
            f"consistency.method {method!r} trains on the "
            f"{names(processes.PROCESSES, lambda p: p.exploding)} process (x = x0 + sigma n)")
    _check_parameterisation(c)
    sigma_min = parameterisations.CONSISTENCY_SIGMA_MIN
    c.check("diffusion.sigma_min", lambda v: v == sigma_min,
            f"a consistency model meets the identity at sigma_min = {sigma_min}")
    if c.one_of("consistency.distance", tuple(cm.DISTANCES)):
        check = cm.DISTANCES[c.get("consistency.distance")].check
        if check is not None:
            check(c)


def _check_teacher(c: Checker, what: str,
                   fits: Callable[[ml_collections.ConfigDict], str | None] | None = None,
                   *, starts_from_it: bool = False) -> None:
    """distill.teacher names a workdir that can teach this config (`distill.teacher_problem`)
    and whose saved config `fits` (None, else why not); `starts_from_it`: the method starts the
    student from the teacher's weights (distill.init_from_teacher must be True)."""
    if starts_from_it:
        c.check("distill.init_from_teacher", lambda v: v is True,
                f"{what} starts the student from the teacher's weights")
    else:
        c.boolean("distill.init_from_teacher")
    teacher = c.get("distill.teacher")
    if not isinstance(teacher, str):
        c.fail("distill.teacher", f"{what} needs the workdir of a trained model: "
               "--config.distill.teacher=<workdir>")
        return
    from jaxdiff.distill import teacher_problem  # distill reads workdirs' configs
    from jaxdiff.workdir import read_config

    problem = teacher_problem(teacher, c.config) or (fits and fits(read_config(teacher)))
    if problem:
        c.fail("distill.teacher", problem)


def _check_cd(c: Checker) -> None:
    _check_consistency(c)
    c.one_of("consistency.solver", tuple(ODE_STEPS))
    c.integer("consistency.num_scales", 2)
    c.number("consistency.target_ema", 0.0, 1.0)
    _check_teacher(c, "consistency distillation ('cd')")


def _check_curriculum(c: Checker) -> bool:
    _check_no_teacher(c)
    _check_consistency(c)
    if c.integer("consistency.start_scales", 1):
        low = c.get("consistency.start_scales")
        c.check("consistency.end_scales", lambda v: is_int(v) and v >= low,
                f"must be an integer >= consistency.start_scales = {low}")
    return c.check("consistency.curriculum_steps", lambda v: v is None or (is_int(v) and v >= 1),
                   "must be None (training.num_steps) or an integer >= 1")


def _check_ct(c: Checker) -> None:
    _check_curriculum(c)
    c.number("consistency.start_ema", 0.0, 1.0, low_open=True)


def _check_ict(c: Checker) -> None:
    c.number("consistency.p_mean", -math.inf, math.inf)
    c.positive("consistency.p_std")
    if _check_curriculum(c) and not c.errors:
        try:
            cm.ict_num_scales(0, total_steps=curriculum_steps(c.config),
                              start_scales=c.get("consistency.start_scales"),
                              end_scales=c.get("consistency.end_scales"))
        except ValueError as e:
            c.fail("consistency.curriculum_steps", f"iCT's curriculum: {e}")


def _check_scm(c: Checker) -> None:
    method = c.get("consistency.method")
    process = OBJECTIVES[method].process
    c.check("diffusion.process", lambda v: v == process,
            f"consistency.method {method!r} trains on the {process!r} process")
    _check_parameterisation(c)
    c.integer("consistency.tangent_warmup_steps", 0)
    c.positive("consistency.tangent_norm_c")
    c.boolean("consistency.prior_weighting")


def _check_sct(c: Checker) -> None:
    _check_no_teacher(c)
    _check_scm(c)


def _check_scd(c: Checker) -> None:
    _check_scm(c)
    _check_teacher(c, "continuous-time consistency distillation ('scd')")


def _ect_teacher_problem(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict
                         ) -> str | None:
    """Why the teacher whose config is `saved` cannot be tuned by ECT into `config` (None if it
    can): ECT starts from an EDM model of the same sigma_data."""
    d, own = saved.diffusion, config.diffusion
    denoiser = parameterisations.get(own.model_output).denoiser
    if d.process != own.process or d.model_output != denoiser:
        return (f"ECT tunes a diffusion model of this consistency model's process and input "
                f"(diffusion.process {own.process!r}, model_output {denoiser!r}), the teacher is "
                f"{d.process!r} with output {d.model_output!r}")
    if d.sigma_data != config.diffusion.sigma_data:
        return (f"the teacher's diffusion.sigma_data is {d.sigma_data}, this model's "
                f"{config.diffusion.sigma_data}")
    return None


def _check_ect(c: Checker) -> None:
    _check_consistency(c)
    c.check("consistency.distance", lambda v: v == "l2",
            "ECT measures its own adaptive pseudo-Huber distance (ect.huber_c); leave "
            "consistency.distance at 'l2'")
    c.number("consistency.p_mean", -math.inf, math.inf)
    c.positive("consistency.p_std")
    c.number("ect.q", 1.0, math.inf, low_open=True)
    c.number("ect.k", 0.0, math.inf)
    c.number("ect.b", -math.inf, math.inf)
    c.one_of("ect.mapping", ect.MAPPINGS)
    c.integer("ect.stage_steps", 1)
    c.number("ect.huber_c", 0.0, math.inf)
    if not c.errors:
        _check_teacher(c, "consistency.method 'ect'",
                       lambda saved: _ect_teacher_problem(saved, c.config), starts_from_it=True)


def _check_pd(c: Checker) -> None:
    from jaxdiff import progressive  # not at import: `python -m jaxdiff.progressive` runs it

    c.check("diffusion.process", lambda v: not processes.PROCESSES[v].steps,
            "progressive distillation steps between continuous levels (progressive.pd_sigmas): "
            f"use the {names(processes.PROCESSES, lambda p: not p.steps)} process")
    c.check("diffusion.model_output",
            lambda v: parameterisations.PARAMETERISATIONS[v].denoises,
            "a PD student is a diffusion model (PD Sec. 4: 'v'; 'edm' is v of scaled data)")
    c.one_of("pd.weighting", tuple(progressive.WEIGHTINGS))
    if c.integer("pd.final_steps", 1) and c.integer("pd.num_steps", 1):
        final = c.get("pd.final_steps")
        c.check("pd.num_steps", lambda v: v % final == 0 and (v // final).bit_count() == 1,
                f"must be pd.final_steps = {final} times a power of two (each round halves it)")
    if not c.errors:
        _check_pd_sampling(c)
    if not c.errors:
        _check_teacher(c, "consistency.method 'pd'",
                       lambda saved: progressive.teacher_problem(saved, c.config),
                       starts_from_it=True)


def _check_pd_sampling(c: Checker) -> None:
    from jaxdiff import progressive  # not at import: `python -m jaxdiff.progressive` runs it

    config = c.config
    if config.sampling.sigmas is None:
        return
    process = processes.make_process(config.diffusion)
    grid = progressive.pd_sigmas(config.pd.num_steps, sigma_min=process.sigma_min,
                                 sigma_max=process.sigma_max)
    c.check("sampling.sigmas", lambda v: len(v) == len(grid) and all(
        math.isclose(a, b, rel_tol=1e-6) for a, b in zip(v, grid, strict=True)),
        f"a PD student's DDIM levels are its grid (progressive.pd_sigmas of pd.num_steps = "
        f"{config.pd.num_steps}) or None")


# ---------------------------------------------------------------------------------------------
# The registry.


@dataclasses.dataclass(frozen=True, kw_only=True)
class Objective(Entry):
    """What a step trains: a loss (params, StepInputs) -> (loss, extra metrics), the rate
    mu(config, step) of its target network theta- (None: it keeps none), whether it distils
    `distill.teacher`, whether it follows a curriculum of K steps, whether it trains a
    consistency function (CM Eq. 4) with a distance (`consistency.distance`), whether
    `consistency.method` selects it (False: a network does, `Network.objective`), and the
    initialiser of weights of its own (config, rng) -> tree, trained beside the network's under
    `OWN` (None: it has none), and the consistency parameterisation it trains (None: a
    denoiser's)."""

    loss: Callable[[Any, StepInputs], tuple[jax.Array, dict[str, jax.Array]]]
    target_rate: Callable[[ml_collections.ConfigDict, jax.Array], jax.Array] | None = None
    distils: bool = False
    curriculum: bool = False
    consistency: bool = False
    method: bool = True
    own_params: Callable[[ml_collections.ConfigDict, jax.Array], Any] | None = None
    parameterisation: str | None = None
    process: str | None = None  # the process it trains on (None: any its checks accept)


_placeholder = ml_collections.config_dict.placeholder
# The distance of every consistency objective (CM's CIFAR-10 CT settings, App. C) and the fields
# of every distance (`consistency.DISTANCES`).
_DISTANCE = {"consistency.distance": "l2",
             **{path: default for entry in cm.DISTANCES.values()
                for path, default in entry.fields.items()}}
# The CT / iCT curricula: s0, s1 (and CT's mu0) stretched over K steps (None: num_steps).
_CURRICULUM = {"consistency.start_scales": 2, "consistency.end_scales": 150,
               "consistency.curriculum_steps": _placeholder(int)}
# sCM's tangent warm-up H, normalisation constant c and prior weighting 1 / (sigma_d tan t).
_SCM = {"consistency.tangent_warmup_steps": 10_000, "consistency.tangent_norm_c": 0.1,
        "consistency.prior_weighting": True}

OBJECTIVES: dict[str, Objective] = {
    # Diffusion training (`jaxdiff.losses.training_losses`): 'none', as workdirs spell it.
    "none": Objective(loss=_diffusion_loss, check=_check_diffusion),
    # CM Algorithm 2: a fixed mu (CM App. C); the teacher's ODE step and its N. Whether the
    # student (and its target) start from the teacher's weights, as in the CM code
    # (`scripts/cm_train.py`), needs the teacher's network to be the student's.
    "cd": Objective(
        loss=_consistency_loss(_cd_example), distils=True, consistency=True, check=_check_cd,
        parameterisation="consistency",
        target_rate=lambda config, step: jnp.float32(config.consistency.target_ema),
        fields={**_DISTANCE, "consistency.solver": "heun", "consistency.num_scales": 18,
                "consistency.target_ema": 0.95, "distill.teacher": _placeholder(str),
                "distill.init_from_teacher": True}),
    # CM Algorithm 3 with mu(k) of the curriculum (CM App. C).
    "ct": Objective(
        loss=_consistency_loss(_ct_example), curriculum=True, consistency=True, check=_check_ct,
        parameterisation="consistency",
        target_rate=lambda config, step: cm.ct_target_ema(
            step, total_steps=curriculum_steps(config),
            start_scales=config.consistency.start_scales,
            end_scales=config.consistency.end_scales, start_ema=config.consistency.start_ema),
        fields={**_DISTANCE, **_CURRICULUM, "consistency.start_ema": 0.9}),
    # iCT Sec. 3.2: theta- = stopgrad(theta), no target network; the levels drawn from a
    # discretised lognormal (Sec. 3.5).
    "ict": Objective(
        loss=_consistency_loss(_ict_example), curriculum=True, consistency=True, check=_check_ict,
        parameterisation="consistency",
        fields={**_DISTANCE, **_CURRICULUM, "consistency.p_mean": -1.1, "consistency.p_std": 2.0}),
    # ECT (arXiv 2406.14548; locuslab/ect `training/loss.py`, `ct_train.py` defaults): tuned from
    # an EDM teacher's weights, theta- = stopgrad(theta), dt shrunk every `ect.stage_steps`.
    "ect": Objective(
        loss=_consistency_loss(_ect_example), distils=True, consistency=True, check=_check_ect,
        parameterisation="consistency",
        fields={**_DISTANCE, "consistency.p_mean": -1.1, "consistency.p_std": 2.0,
                "ect.q": 2.0, "ect.k": 8.0, "ect.b": 1.0, "ect.mapping": "sigmoid",
                "ect.stage_steps": 25_000, "ect.huber_c": 0.0,
                "distill.teacher": _placeholder(str), "distill.init_from_teacher": True}),
    # Progressive distillation (arXiv 2202.00512 Alg. 2): one round of pd.num_steps student
    # steps; `python -m jaxdiff.progressive` runs the rounds down to pd.final_steps.
    "pd": Objective(
        loss=_pd_loss, distils=True, check=_check_pd,
        fields={"pd.num_steps": 8, "pd.final_steps": 1, "pd.weighting": "snr_trunc",
                "distill.teacher": _placeholder(str), "distill.init_from_teacher": True}),
    # sCM (arXiv 2410.11081 Alg. 1): sCT reads dx_t/dt from the sample, sCD from
    # distill.teacher; tangent warm-up H = 10k and normalisation c = 0.1 (App. G; NVlabs/FastGen
    # config_scm.py), the adaptive weighting w_phi trained beside theta (Sec. 4.2).
    "sct": Objective(
        loss=_scm_loss(_sct_velocity), consistency=True, check=_check_sct,
        parameterisation="trigflow_consistency", process="trigflow",
        own_params=_init_adaptive_weighting, fields=_SCM),
    "scd": Objective(
        loss=_scm_loss(_scd_velocity), consistency=True, distils=True, check=_check_scd,
        parameterisation="trigflow_consistency", process="trigflow",
        own_params=_init_adaptive_weighting,
        fields={**_SCM, "distill.teacher": _placeholder(str), "distill.init_from_teacher": True}),
    # The noisy classifier of classifier guidance; selected by model.name 'classifier'.
    "classifier": Objective(loss=_classifier_loss, method=False, check=_check_classifier),
}


def get(name: str) -> Objective:
    """The entry of objective `name`; a ValueError naming it and the choices if there is none."""
    return lookup(OBJECTIVES, name, "objective (consistency.method)")


def of_config_name(config: ml_collections.ConfigDict) -> str:
    """The name of the objective `config` trains: its network's own, else `consistency.method`'s."""
    return get_network(config.model.name).objective or config.consistency.method


def of_config(config: ml_collections.ConfigDict) -> Objective:
    """The entry of the objective `config` trains (`of_config_name`)."""
    return get(of_config_name(config))
