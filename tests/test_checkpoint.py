"""Workdirs written by earlier releases keep loading, sampling and resuming exactly as before."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np

import jaxdiff
import jaxdiff.workdir
from jaxdiff import checkpoint
from jaxdiff.schedules import Schedule

DATA = os.path.join(os.path.dirname(__file__), "data")
# A toy2d MLP workdir (T = 100, 4 training steps) written by jaxdiff 0.1.0 before the
# continuous-time core, and samples drawn from it then with the keys below.
OLD_WORKDIR = os.path.join(DATA, "workdir_v0_1")
OLD_SAMPLES = os.path.join(DATA, "workdir_v0_1_samples.npz")


def test_a_previous_release_workdir_samples_exactly_as_before():
    model = jaxdiff.load(OLD_WORKDIR)
    assert isinstance(model.schedule, Schedule) and model.schedule.num_timesteps == 100
    expected = np.load(OLD_SAMPLES)
    draws = {
        "ddim": jaxdiff.sample(model, jax.random.PRNGKey(3), "ddim", num_steps=5, num_samples=6),
        "ddpm": jaxdiff.sample(model, jax.random.PRNGKey(4), "ddpm", num_samples=6),
        "dpm": jaxdiff.sample(model, jax.random.PRNGKey(5), "dpm_solver++", num_steps=6,
                              num_samples=6),
    }
    for name, x in draws.items():
        np.testing.assert_allclose(np.asarray(x), expected[name], atol=1e-5, err_msg=name)
    # The samplers added since (heun, euler_ancestral) on a DDPM eps-model, as this one is, are
    # checked against the exact mixture in test_samplers.py (test_every_method_samples_every_model,
    # test_heun_reproduces_the_mixture_closer_than_ddim_at_equal_cost).


def test_a_previous_release_workdir_resumes(tmp_path):
    """Its config.json lacks the fields added since; they read as their defaults, which train
    as the run did, so resuming is allowed and continues from step 4."""
    from jaxdiff import train

    workdir = str(tmp_path / "old")
    shutil.copytree(OLD_WORKDIR, workdir)
    config = jaxdiff.workdir.read_config(workdir)
    assert config.diffusion.process == "ddpm" and config.diffusion.loss_weighting == "none"
    config.training.num_steps = 6
    checkpoint.check_resumable(workdir, config)
    state = train.train_and_evaluate(config, workdir)
    assert int(state.step) == 6
    assert checkpoint.latest_step(workdir) == 6
