"""A noisy CIFAR-10 classifier p(y | x_t, t) for classifier guidance (ADM, arXiv 2105.05233 Sec. 4).

The U-Net encoder with attention pooling, trained with cross-entropy on x_t ~ q(x_t | x_0) at
uniformly drawn t, on the same schedule as `cifar.py`.
"""

import ml_collections

from experiments import cifar


def get_config() -> ml_collections.ConfigDict:
    config = cifar.get_config()
    config.model.name = "classifier"
    config.model.pool = "attention"
    config.model.dropout = 0.0
    config.model.num_head_channels = 64
    config.model.use_scale_shift_norm = True
    config.model.resblock_updown = True
    config.training.num_steps = 150_000
    config.training.sample_every = 0
    config.training.ema_decay = 0.9999
    config.optim.optimizer = "adamw"
    config.optim.lr = 3e-4
    config.optim.warmup_steps = 0
    config.optim.weight_decay = 0.05
    return config
