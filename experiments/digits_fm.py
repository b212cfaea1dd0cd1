"""Flow matching (rectified flow, arXiv 2209.03003; flow matching, arXiv 2210.02747) on the
embedded 8x8 digits: the `digits.py` network and training length, trained on the straight path
x_t = (1 - t) x_0 + t eps with the velocity v = eps - x_0 as target (the conditional
flow-matching loss, FM Eq. 23, is L_simple of the "velocity" parameterisation).

Training times are SD3's logit-normal with m = 0, s = 1 (arXiv 2403.03206 Eq. 19, its best
"rf/lognorm(0.00, 1.00)"), no timestep shift (SD3 Sec. 5.3.2 shifts for resolutions above its
256^2 base; 8x8 is far below it). Sampled with Heun on times uniform in t, the rectified-flow
Euler grid (18 steps, 35 network calls, as `digits_edm.py`).
"""

import ml_collections

from experiments import digits


def with_flow_matching(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` trained by flow matching as above and sampled by Heun on uniform times (also
    `cifar_fm.py`'s settings)."""
    config.diffusion.process = "flow_matching"
    config.diffusion.model_output = "velocity"
    config.diffusion.logit_mean = 0.0
    config.diffusion.logit_std = 1.0
    config.diffusion.shift = 1.0

    config.sampling.method = "heun"
    config.sampling.num_steps = 18
    config.sampling.spacing = "uniform"
    return config


def get_config() -> ml_collections.ConfigDict:
    return with_flow_matching(digits.get_config())
