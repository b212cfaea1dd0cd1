"""Easy Consistency Tuning (ECT, arXiv 2406.14548) of EDM's CIFAR-10 model: the ECT code's run.

From locuslab/ect `run_ecm.sh` and `ct_train.py`'s defaults: the teacher is an EDM CIFAR-10 model
(the code transfers NVIDIA's `edm-cifar10-32x32-uncond-vp`; here the workdir of cifar_edm.py,
--config.distill.teacher), whose weights the student starts from; batch 128, lr 1e-4 from step
0, 25.6 Mimg (200k iterations), dropout 0.2, no augmentation, EMA 0.9999 per step, no gradient
clipping; ln t ~ N(-1.1, 2.0^2); the sigmoid mapping q = 2, k = 8, b = 1 with dt halved every 250
ticks of 12.8 kimg (25k iterations: 8 stages); w = 1 / (t - r); c = 0 (the L2 norm). Samples in
one step from sigma = 80, or two with the code's second level 0.821 (`mid_t`); the code's README
gives FID 3.86 (one step) and 2.15 (two) at 200k iterations. Differences: jaxdiff's Adam, not
RAdam; jaxdiff's U-Net in cifar_edm.py's DDPM++ layout. Not run to convergence here.
"""

import ml_collections

from experiments import cifar_edm


def get_config() -> ml_collections.ConfigDict:
    config = cifar_edm.get_config()
    config.diffusion.model_output = "consistency"
    config.model.dropout = 0.2

    config.consistency.method = "ect"
    config.consistency.p_mean = -1.1
    config.consistency.p_std = 2.0
    config.ect.mapping = "sigmoid"
    config.ect.q = 2.0
    config.ect.k = 8.0
    config.ect.b = 1.0
    config.ect.huber_c = 0.0
    config.ect.stage_steps = 25_000
    config.distill.teacher = None  # --config.distill.teacher=<the cifar_edm.py workdir>
    config.distill.init_from_teacher = True

    config.training.batch_size = 128
    config.training.num_steps = 200_000
    config.training.ema_decay = 0.9999
    config.training.ema_halflife_kimg = None  # the fixed ema_decay, not cifar_edm.py's ramp-up
    config.training.ema_rampup_ratio = None
    config.optim.lr = 1e-4
    config.optim.warmup_steps = 0
    config.optim.grad_clip = 0.0

    config.sampling.method = "consistency"
    config.sampling.num_steps = 1
    config.sampling.sigmas = (80.0,)
    return config
