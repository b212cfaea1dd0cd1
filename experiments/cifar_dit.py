"""Class-conditional DiT-B/2 on CIFAR-10 pixels, with DiT's training settings (arXiv 2212.09748).

Sec. 3 and 4 of the paper: T = 1000 linear betas 1e-4..0.02, eps prediction and a learned
(range) variance trained by improved DDPM's L_simple + L_vlb (Eq. 16 of arXiv 2102.09672),
AdamW at a constant lr 1e-4 without weight decay or warm-up, batch 256, EMA 0.9999, random
flips, labels dropped with probability 0.1 for classifier-free guidance; sampled with 250
ancestral (DDPM) steps and guidance scale 1.5 (Sec. 5), w = 0.5 in Eq. 6 of arXiv 2207.12598's
(1 + w) form. DiT-B/2 (12 layers,
width 768, 12 heads) over 2x2 pixel patches: 256 tokens, as a 256x256 image's latents give it.
"""

import ml_collections

from experiments import cifar_cond
from jaxdiff.models import DIT_CONFIGS


def get_config() -> ml_collections.ConfigDict:
    config = cifar_cond.get_config()
    config.model.name = "dit"
    config.model.update(DIT_CONFIGS["DiT-B/2"])
    config.model.dropout = 0.0
    config.diffusion.model_var_type = "learned_range"
    config.diffusion.loss_type = "hybrid"
    config.training.batch_size = 256
    config.training.ema_decay = 0.9999
    config.optim.optimizer = "adamw"
    config.optim.weight_decay = 0.0
    config.optim.lr = 1e-4
    config.optim.warmup_steps = 0
    config.optim.grad_clip = 0.0
    config.sampling.method = "ddpm"
    config.sampling.num_steps = 250
    config.sampling.guidance_scale = 0.5
    return config
