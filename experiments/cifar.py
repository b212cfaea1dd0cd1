"""DDPM on CIFAR-10, as published (arXiv 2006.11239, Sec. 4 and App. B).

T = 1000 linear betas 1e-4..0.02, eps prediction with L_simple, the 35.7M-parameter U-Net
(ch 128, mult (1, 2, 2, 2), 2 res blocks, attention at 16x16, dropout 0.1), Adam lr 2e-4 with
5000 warm-up steps, gradient clipping at 1.0, batch 128, EMA 0.9999, random flips, 800k steps;
ancestral sampling with the fixed-large variance sigma_t^2 = beta_t.
"""

import ml_collections

from jaxdiff.config import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.data.dataset = "cifar10"
    config.data.image_size = 32
    config.data.channels = 3
    config.data.num_classes = 10
    config.data.random_flip = True

    config.model.name = "unet"
    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1
    config.model.class_cond = False

    config.diffusion.beta_schedule = "linear"
    config.diffusion.num_timesteps = 1000
    config.diffusion.model_output = "eps"
    config.diffusion.model_var_type = "fixed_large"
    config.diffusion.loss_type = "simple"

    config.training.batch_size = 128
    config.training.num_steps = 800_000
    config.training.ema_decay = 0.9999

    config.optim.optimizer = "adam"
    config.optim.lr = 2e-4
    config.optim.warmup_steps = 5000
    config.optim.grad_clip = 1.0

    config.sampling.method = "ddpm"
    config.sampling.num_steps = 1000
    return config
