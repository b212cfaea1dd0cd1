"""TrigFlow diffusion (sCM arXiv 2410.11081 Sec. 2) on the embedded 8x8 digits: sCD's teacher.

The `digits.py` network and training length on x_t = cos(t) x_0 + sin(t) z, z ~ N(0, sigma_d^2 I),
with F trained on the velocity: the plain MSE of the `trigflow` parameterisation is sCM's flow
loss ||sigma_d F - dx_t/dt||^2 / sigma_d^2. sigma_d = 0.75 is the digits' std (as in
digits_edm.py); t = arctan(e^tau / sigma_d), tau ~ N(-1.0, 1.4^2), sCM's CIFAR-10 proposal
(App. G; NVlabs/FastGen config_scm.py), and c_noise(t) = t (Sec. 4.1). Sampled like
digits_edm.py with Heun, 18 steps on EDM's levels sigma = sigma_d tan t in [0.002, 80].
"""

import ml_collections

from experiments import digits_edm


def with_trigflow(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` on TrigFlow with sCM's CIFAR-10 proposal (its sigma_data and range kept)."""
    config.diffusion.process = "trigflow"
    config.diffusion.p_mean = -1.0
    config.diffusion.p_std = 1.4
    return config


def get_config() -> ml_collections.ConfigDict:
    config = with_trigflow(digits_edm.get_config())  # sigma_data 0.75, sigma in [0.002, 80]
    config.diffusion.model_output = "trigflow"
    return config
