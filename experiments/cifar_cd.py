"""Consistency distillation of EDM's CIFAR-10 model: CM's (arXiv 2303.01469) CIFAR-10 CD recipe.

From the official code's `configs/cifar10_ve_cd.py` (openai/consistency_models_cifar10) and CM
App. C / Table 3: the teacher is EDM's CIFAR-10 model (here the workdir of cifar_edm.py, given as
--config.distill.teacher); LPIPS distance, N = 18 levels, Heun teacher steps, theta- =
stopgrad(theta) (mu = 0: `jcm/losses.py` uses the online weights as target when no target EMA is
set), batch 512, 800k iterations, lr 4e-4 constant from step 0 (the config sets
`optim.warmup` to 10M images, but `jcm/losses.py`'s `get_optimizer` reads the warm-up only in its
Adam branch; its RAdam branch, which this config selects, is scale_by_radam then scale(-lr)), no
gradient clipping, sampling EMA 0.9999, dropout 0, x-flips, sigma in [0.002, 80], sigma_data =
0.5; samples in one step (sampling.method 'consistency'). Differences: jaxdiff's Adam, not RAdam;
jaxdiff's U-Net in the DDPM++ layout of cifar_edm.py, not NCSN++. As the code's
`training.finetune = True`, the student (and theta-) start from the teacher's weights
(`distill.init_from_teacher`, the default): both networks are cifar_edm.py's.
"""

import ml_collections

from experiments import cifar_edm


def get_config() -> ml_collections.ConfigDict:
    config = cifar_edm.get_config()
    config.diffusion.model_output = "consistency"
    config.model.dropout = 0.0

    config.consistency.method = "cd"
    config.consistency.distance = "lpips"
    config.consistency.lpips_heads = None  # the `lpips` package's weights/v0.1/vgg.pth
    config.consistency.lpips_vgg = None  # torchvision's vgg16-397923af.pth
    config.consistency.num_scales = 18
    config.consistency.solver = "heun"
    config.consistency.target_ema = 0.0
    config.distill.teacher = None  # --config.distill.teacher=<the cifar_edm.py workdir>

    config.training.batch_size = 512
    config.training.num_steps = 800_000
    config.training.ema_decay = 0.9999
    config.training.ema_halflife_kimg = None  # the fixed ema_decay, not cifar_edm.py's ramp-up
    config.training.ema_rampup_ratio = None
    config.optim.lr = 4e-4
    config.optim.warmup_steps = 0  # RAdam in `jcm/losses.py` ignores `optim.warmup`
    config.optim.grad_clip = 0.0

    config.sampling.method = "consistency"
    config.sampling.num_steps = 1
    return config
