"""EDM (Karras et al. arXiv 2206.00364) on CIFAR-10, on jaxdiff's U-Net.

Its preconditioning and loss (Table 1: sigma_data = 0.5, ln sigma ~ N(-1.2, 1.2^2), c_noise =
ln(sigma) / 4) with the CIFAR-10 training settings of config F (App. F.3, Table 7): batch 512, Adam
lr 10e-4 ramped up over the first 10 Mimg (19,531 steps), 200 Mimg of training (390,625 steps),
EMA half-life 0.5 Mimg (decay 0.5^(512 / 500,000) = 0.99929 per step) ramped up as
NVlabs/edm's `training/training_loop.py` (ema_rampup_ratio = 0.05: the half-life is at most 5% of
the images seen, reaching 0.5 Mimg at 10 Mimg), dropout 0.13, x-flips, no
gradient clipping. The network is DDPM++'s layout (App. F.2: 128 channels, multipliers
(2, 2, 2), 4 residual blocks per resolution, attention at 16x16) on jaxdiff's U-Net, not NCSN++;
EDM's non-leaking augmentation (probability 0.12) is not implemented. Sampling: Heun, 18 steps
(35 network evaluations), S_churn = 0 (deterministic, EDM Sec. 3; FID 1.97 unconditional there).
"""

import ml_collections

from experiments import cifar


def get_config() -> ml_collections.ConfigDict:
    config = cifar.get_config()  # the data: CIFAR-10 with x-flips, unconditional
    config.model.ch_mult = (2, 2, 2)
    config.model.num_res_blocks = 4
    config.model.dropout = 0.13

    config.diffusion.process = "edm"
    config.diffusion.model_output = "edm"
    config.diffusion.sigma_data = 0.5
    config.diffusion.sigma_min = 0.002
    config.diffusion.sigma_max = 80.0
    config.diffusion.p_mean = -1.2
    config.diffusion.p_std = 1.2

    config.training.batch_size = 512
    config.training.num_steps = 390_625
    config.training.ema_halflife_kimg = 500.0  # ema_decay is then unused
    config.training.ema_rampup_ratio = 0.05

    config.optim.lr = 1e-3  # Adam with (0.9, 0.999, 1e-8), as cifar.py's
    config.optim.warmup_steps = 19_531
    config.optim.grad_clip = 0.0

    config.sampling.method = "heun"
    config.sampling.num_steps = 18
    return config
