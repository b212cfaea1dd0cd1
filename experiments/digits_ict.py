"""Improved consistency training (iCT, arXiv 2310.14189) on the embedded 8x8 digits, no teacher.

The digits.py network and data on EDM's process (sigma_data = 0.75 as in digits_edm.py), trained
by iCT's loss: theta- = stopgrad(theta) (Sec. 3.2), lambda = 1 / (sigma_{n+1} - sigma_n) (Sec.
3.1), pseudo-Huber d with c = 0.00054 sqrt(d) (Sec. 3.3), levels from the discretised lognormal
P_mean = -1.1, P_std = 2.0 (Sec. 3.5) and N doubling from s0 = 10 to s1 = 1280 (Sec. 3.4). Its
samples are drawn in one step, or two with the second level 0.821 (iCT Sec. 4's CIFAR-10 choice).
"""

import ml_collections

from experiments import digits_edm


def get_config() -> ml_collections.ConfigDict:
    config = digits_edm.get_config()  # the digits network on EDM's process, sigma_data 0.75
    config.diffusion.model_output = "consistency"

    config.consistency.method = "ict"
    config.consistency.distance = "pseudo_huber"
    config.consistency.huber_c = None
    config.consistency.start_scales = 10
    config.consistency.end_scales = 1280
    config.consistency.p_mean = -1.1
    config.consistency.p_std = 2.0

    config.training.num_steps = 2400
    config.training.checkpoint_every = 400
    config.training.sample_every = 1200
    config.training.label_dropout = 0.0

    config.sampling.method = "consistency"
    config.sampling.num_steps = 2
    config.sampling.sigmas = (80.0, 0.821)
    config.sampling.guidance_scale = 0.0
    return config
