"""A noisy classifier p(y | x_t, t) on the 8x8 digits matching `digits.py` (classifier guidance)."""

import ml_collections

from experiments import digits


def get_config() -> ml_collections.ConfigDict:
    config = digits.get_config()
    config.model.name = "classifier"
    config.model.class_cond = False
    config.model.pool = "mean"
    config.training.label_dropout = 0.0
    config.training.sample_every = 0
    config.training.num_steps = 2000
    config.sampling.guidance_scale = 0.0
    return config
