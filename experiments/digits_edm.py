"""EDM (Karras et al. arXiv 2206.00364) on the embedded 8x8 digits: the `digits.py` network and
training length, trained with EDM's preconditioning and loss, sampled with its Heun sampler.

sigma_data = 0.75 is the std of the training digits in [-1, 1] (EDM's 0.5 is CIFAR-10's);
ln sigma ~ N(-1.2, 1.2^2) in training and sampling in [0.002, 80] with rho = 7 are EDM Table 1's;
18 Heun steps are 35 network evaluations (EDM Sec. 3). Labels are dropped with probability 0.1,
so the same network samples with classifier-free guidance.
"""

import ml_collections

from experiments import digits


def get_config() -> ml_collections.ConfigDict:
    config = digits.get_config()
    config.diffusion.process = "edm"
    config.diffusion.model_output = "edm"
    config.diffusion.sigma_data = 0.75
    config.diffusion.sigma_min = 0.002
    config.diffusion.sigma_max = 80.0
    config.diffusion.p_mean = -1.2
    config.diffusion.p_std = 1.2

    config.sampling.method = "heun"
    config.sampling.num_steps = 18
    return config
