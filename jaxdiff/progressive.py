"""Progressive distillation (PD): a student that takes one DDIM step where its teacher took two.

Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models" (arXiv
2202.00512; code google-research/diffusion_distillation, `dpm.py` `training_losses`). A round
trains a student of N steps, initialised as its teacher of 2N steps (Alg. 2), so that one DDIM
step from level t to t - 1/N lands where the teacher's two steps via t - 0.5/N land; the next
round's teacher is this student: N -> N/2 -> ... -> 1. `python -m jaxdiff.progressive` runs the
rounds, each a normal workdir.

In EDM's frame x = x_0 + sigma n (`jaxdiff.denoiser`): DDIM with eta = 0 is the Euler step of the
probability-flow ODE in sigma (DDIM Sec. 4.3; EDM Sec. 3), `samplers.euler_step`, and the levels
are the code's cosine schedule, logsnr(u) = -2 ln tan(a u + b), i.e. sigma(u) = tan(a u + b),
between the model's sigma_min and sigma_max: the grid of 2N steps holds the grid of N at every
other level, as Alg. 2 needs. The paper's student outputs v = alpha eps - sigma x_0 (Sec. 4);
EDM's preconditioned output F (parameterisation 'edm') is -v of the data scaled to unit
variance (with sigma_data = 1: c_in x = z, c_skip = alpha^2, c_out = sigma in the VP frame, so
F's target (x_0 - c_skip x) / c_out = sigma x_0 - alpha eps), so an EDM teacher distils as is.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.denoiser import broadcast_level
from jaxdiff.samplers import euler_step

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]  # D(x, sigma [B]) -> x0_hat

ROUNDS_FILE = "rounds.json"

# The loss weightings of the code's `mean_loss_weight_type` as functions of EDM's sigma
# (SNR = 1 / sigma^2) on the x_0 MSE: 'snr_trunc' max(SNR, 1) (PD Sec. 4's "truncated SNR"),
# 'v_mse' SNR + 1 (the MSE of v).
WEIGHTINGS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "snr_trunc": lambda sigma: jnp.maximum(sigma**-2, 1.0),
    "v_mse": lambda sigma: sigma**-2 + 1.0,
}


def pd_sigma(u: jax.Array, *, sigma_min: float, sigma_max: float) -> jax.Array:
    """sigma(u) = tan(atan(sigma_min) + u (atan(sigma_max) - atan(sigma_min))), u in [0, 1]: the
    cosine log-SNR schedule of the PD code (`logsnr_schedule_cosine`, alpha = cos(pi u / 2) when
    the range is unbounded; PD Sec. 2) in EDM's sigma = exp(-logsnr / 2)."""
    lo, hi = math.atan(sigma_min), math.atan(sigma_max)
    return jnp.tan(lo + jnp.asarray(u) * (hi - lo))


def pd_sigmas(num_steps: int, *, sigma_min: float, sigma_max: float) -> tuple[float, ...]:
    """The N levels of a PD student from noise to data, sigma(i / N) for i = N..1 (then 0): the
    `sigmas` of its DDIM sampler (float64, on the host)."""
    with jax.enable_x64(True):
        u = jnp.arange(num_steps, 0, -1, dtype=jnp.float64) / num_steps
        return tuple(np.asarray(pd_sigma(u, sigma_min=sigma_min, sigma_max=sigma_max)).tolist())


def pd_target(teacher: Denoiser, x: jax.Array, sigma: jax.Array, sigma_mid: jax.Array,
              sigma_next: jax.Array) -> jax.Array:
    """x~ of PD Alg. 2: the x_0 from which one DDIM step (x, sigma) -> sigma_next lands on x'',
    the teacher's two DDIM steps via sigma_mid: x~ = (x'' - (sigma''/sigma) x) / (1 - sigma''/sigma)
    (Alg. 2's (z'' - (s''/s) z) / (a'' - (s''/s) a) with z = a x); x'' itself where sigma'' = 0."""
    x_mid = euler_step(teacher, x, sigma, sigma_mid)[0]
    x_next = euler_step(teacher, x_mid, sigma_mid, sigma_next)[0]
    ratio = broadcast_level(sigma_next / sigma, x)
    return (x_next - ratio * x) / (1.0 - ratio)


def pd_levels(index: jax.Array, *, num_steps: int, sigma_min: float, sigma_max: float
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sigma, sigma_mid, sigma_next) of student step `index` in 0..N-1 counted from the data
    end: u = (index + 1) / N, u - 0.5 / N, u - 1 / N (the code's `u = (t + 1) / num_steps`),
    sigma_next = 0 for the last step."""
    u = (jnp.asarray(index, jnp.float32) + 1.0) / num_steps
    levels = dict(sigma_min=sigma_min, sigma_max=sigma_max)
    sigma_next = jnp.where(index == 0, 0.0, pd_sigma(u - 1.0 / num_steps, **levels))
    return pd_sigma(u, **levels), pd_sigma(u - 0.5 / num_steps, **levels), sigma_next


def pd_loss(student: Denoiser, teacher: Denoiser, x0: jax.Array, noise: jax.Array,
            index: jax.Array, *, num_steps: int, sigma_min: float, sigma_max: float,
            weighting: str = "snr_trunc") -> jax.Array:
    """Per-example PD loss w(sigma) ||x~ - x0_hat(x)||^2 / D at x = x_0 + sigma n (Alg. 2), index
    the student's step (`pd_levels`), x~ from the teacher (`pd_target`), gradient stopped."""
    sigma, sigma_mid, sigma_next = pd_levels(index, num_steps=num_steps, sigma_min=sigma_min,
                                             sigma_max=sigma_max)
    x = x0 + broadcast_level(sigma, x0) * noise
    target = jax.lax.stop_gradient(pd_target(teacher, x, sigma, sigma_mid, sigma_next))
    mse = jnp.mean(jnp.reshape(student(x, sigma) - target, (x0.shape[0], -1)) ** 2, axis=-1)
    return WEIGHTINGS[weighting](sigma) * mse


# ---------------------------------------------------------------------------------------------
# The rounds.


def teacher_problem(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict
                    ) -> str | None:
    """Why the teacher whose config is `saved` cannot teach the PD round `config` (None if it
    can): the student starts as the teacher, so both read the network the same way; a PD teacher
    is the round before, of twice the steps on the same levels."""
    d, sd = config.diffusion, saved.diffusion
    for field in ("process", "model_output", "sigma_data"):
        if sd[field] != d[field]:
            return (f"the student starts as its teacher (Alg. 2), but the teacher's "
                    f"diffusion.{field} is {sd[field]!r}, this student's {d[field]!r}")
    if saved.consistency.method == config.consistency.method:  # the teacher is a PD round
        if saved.pd.num_steps != 2 * config.pd.num_steps:
            return (f"the teacher is a PD round of {saved.pd.num_steps} steps; a round of "
                    f"{config.pd.num_steps} steps distils one of {2 * config.pd.num_steps}")
        from jaxdiff.processes import make_process

        ranges = [(p.sigma_min, p.sigma_max) for p in map(make_process, (sd, d))]
        if ranges[0] != ranges[1]:
            return (f"the teacher's levels span {ranges[0]}, this student's {ranges[1]}: their "
                    "grids (pd_sigmas) would differ")
    return None


def round_steps(config: ml_collections.ConfigDict) -> list[int]:
    """The student steps of each round: pd.num_steps, halved down to pd.final_steps."""
    steps = [config.pd.num_steps]
    while steps[-1] > config.pd.final_steps:
        steps.append(steps[-1] // 2)
    return steps


def round_config(config: ml_collections.ConfigDict, num_steps: int, teacher: str
                 ) -> ml_collections.ConfigDict:
    """`config` as the round of `num_steps` student steps distilling `teacher`: it samples by
    DDIM on its own grid (`pd_sigmas`) by default."""
    from jaxdiff.config import config_from_json, config_to_json
    from jaxdiff.processes import make_process

    config = config_from_json(config_to_json(config))
    process = make_process(config.diffusion)
    config.pd.num_steps = num_steps
    config.distill.teacher = teacher
    config.sampling.method = "ddim"
    config.sampling.num_steps = num_steps
    config.sampling.eta = 0.0
    config.sampling.sigmas = pd_sigmas(num_steps, sigma_min=process.sigma_min,
                                       sigma_max=process.sigma_max)
    return config


def plan(config: ml_collections.ConfigDict, workdir: str
         ) -> list[tuple[str, ml_collections.ConfigDict]]:
    """(workdir, config) of each round: `workdir`/round_k, its teacher round k-1's workdir
    (round 1's: `distill.teacher`)."""
    rounds, teacher = [], config.distill.teacher
    for k, n in enumerate(round_steps(config), start=1):
        path = os.path.join(workdir, f"round_{k}")
        rounds.append((path, round_config(config, n, teacher)))
        teacher = path
    return rounds


def run(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """Trains (or resumes) every round of `config` under `workdir` and records them in
    `workdir`/rounds.json; returns the rounds' workdirs.

    Round 1's config is validated in full (its teacher included) before anything is written;
    the later rounds differ from it only in their step count, sampler grid and teacher, the
    round before them, which `jaxdiff.train` checks as it starts each. A round that SIGINT or
    SIGTERM stopped ends the run there (no later round distils the half-trained one); the
    rerun resumes it. Then the rounds' workdirs so far are returned.
    """
    from jaxdiff import train
    from jaxdiff.config import validate
    from jaxdiff.workdir import check_writable, write_atomically

    validate(config)
    rounds = plan(config, workdir)
    validate(rounds[0][1])
    check_writable(workdir)
    record = {"teacher": config.distill.teacher, "rounds": []}
    for k, (path, round_cfg) in enumerate(rounds, start=1):
        state = train.train_and_evaluate(round_cfg, path)
        if int(state.step) < round_cfg.training.num_steps:  # a signal stopped it, saved
            return [p for p, _ in rounds[:k]]
        record["rounds"].append({"round": k, "num_steps": round_cfg.pd.num_steps,
                                 "workdir": os.path.basename(path),
                                 "teacher": round_cfg.distill.teacher,
                                 "trained_steps": int(state.step)})
        write_atomically(os.path.join(workdir, ROUNDS_FILE), json.dumps(record, indent=1))
    return [path for path, _ in rounds]


def main(argv: Sequence[str]) -> None:
    from absl import flags, logging

    from jaxdiff import train
    from jaxdiff.workdir import WorkdirError

    if len(argv) > 1:
        sys.exit(f"jaxdiff.progressive: error: unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    try:
        run(train._CONFIG.value, train._WORKDIR.value)
    except (ValueError, WorkdirError, FloatingPointError) as e:
        sys.exit(f"jaxdiff.progressive: error: {e}")


if __name__ == "__main__":
    from absl import app, flags

    from jaxdiff import train

    train._before_flags(sys.argv)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
