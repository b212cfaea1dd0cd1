"""Flow matching on CIFAR-10: the DDPM U-Net of `cifar.py` (35.7M parameters) trained on the
straight path x_t = (1 - t) x_0 + t eps with the velocity target v = eps - x_0 (rectified flow,
arXiv 2209.03003 Sec. 2.1; conditional flow matching, arXiv 2210.02747 Eq. 23).

From the papers: rectified flow trains CIFAR-10 on the DDPM++ network for 800k steps at batch
128 (App. D; FID 2.58 with an adaptive RK45 sampler, Table 1); training times are SD3's
logit-normal(0, 1) (arXiv 2403.03206 Eq. 19 and Table 1, "rf/lognorm(0.00, 1.00)"), with no
timestep shift at 32x32 (Sec. 5.3.2 shifts above its 256^2 base). The optimiser, EMA and
schedule of `cifar.py` (DDPM's) are kept; the flow-matching settings are `digits_fm.py`'s
(`with_flow_matching`). Sampled with Heun on times uniform in t (18 steps,
35 network calls); `python -m jaxdiff.evaluate --method dpm_solver++` also samples it.
This recipe has not been run to convergence here.
"""

import ml_collections

from experiments import cifar
from experiments.digits_fm import with_flow_matching


def get_config() -> ml_collections.ConfigDict:
    config = with_flow_matching(cifar.get_config())
    config.diffusion.model_var_type = "fixed_small"
    return config
