"""Class-conditional DDPM on CIFAR-10, trained for classifier-free guidance (arXiv 2207.12598).

The label is replaced by the null label with probability 0.1 (the paper's p_uncond), so one
network gives both eps(x_t, y) and eps(x_t); sampling mixes them with guidance weight w.
"""

import ml_collections

from experiments import cifar


def get_config() -> ml_collections.ConfigDict:
    config = cifar.get_config()
    config.model.class_cond = True
    config.training.label_dropout = 0.1
    config.sampling.method = "ddim"
    config.sampling.num_steps = 100
    config.sampling.guidance_scale = 1.0
    return config
