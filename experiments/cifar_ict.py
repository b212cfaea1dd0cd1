"""Improved consistency training (iCT, arXiv 2310.14189) on CIFAR-10, unconditional, no teacher.

iCT's CIFAR-10 settings (Sec. 3 and 4): theta- = stopgrad(theta), pseudo-Huber d with c = 0.03
(= 0.00054 sqrt(3072), Sec. 3.3), lognormal levels P_mean = -1.1, P_std = 2.0 (Sec. 3.5), N
doubling from s0 = 10 to s1 = 1280 over K = 400k iterations (Sec. 3.4), dropout 0.3, batch
1024, lr 1e-4 (no warm-up or gradient clipping is stated), sampling EMA 0.99993, one- or
two-step sampling with the second level 0.821 (Sec. 4).
EDM's process and scalings (sigma in [0.002, 80], sigma_data = 0.5). Differences: jaxdiff's
Adam, not RAdam; jaxdiff's U-Net in the DDPM++ layout of cifar_edm.py, not NCSN++ with iCT's
Fourier scale 0.02 (c_noise here is EDM's ln(sigma) / 4).
"""

import ml_collections

from experiments import cifar_edm


def get_config() -> ml_collections.ConfigDict:
    config = cifar_edm.get_config()
    config.diffusion.model_output = "consistency"
    config.model.dropout = 0.3

    config.consistency.method = "ict"
    config.consistency.distance = "pseudo_huber"
    config.consistency.huber_c = 0.03
    config.consistency.start_scales = 10
    config.consistency.end_scales = 1280
    config.consistency.p_mean = -1.1
    config.consistency.p_std = 2.0

    config.training.batch_size = 1024
    config.training.num_steps = 400_000
    config.training.ema_decay = 0.99993
    config.training.ema_halflife_kimg = None  # the fixed ema_decay, not cifar_edm.py's ramp-up
    config.training.ema_rampup_ratio = None
    config.optim.lr = 1e-4
    config.optim.warmup_steps = 0
    config.optim.grad_clip = 0.0

    config.sampling.method = "consistency"
    config.sampling.num_steps = 2
    config.sampling.sigmas = (80.0, 0.821)
    return config
