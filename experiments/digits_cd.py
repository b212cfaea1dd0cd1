"""Consistency distillation (CM arXiv 2303.01469, Alg. 2) of the embedded default, digits.py.

`python -m jaxdiff.train --config experiments/digits_cd.py --workdir runs/digits_cd
--config.distill.teacher=runs/digits` distils the class-conditional DDPM model trained by
digits.py into a one-step consistency model of the same network, conditioned on the same labels.
The student is the digits network on EDM's process (sigma in [0.002, 80], sigma_data = 0.75 as
in digits_edm.py); CD's settings are CM's CIFAR-10 ones where they carry over: N = 18 levels, Heun
teacher steps (CM App. C, Table 3), theta- = stopgrad(theta) (mu = 0: jcm/losses.py takes the
online weights as target when `configs/cifar10_ve_cd.py` sets no target EMA). The distance is l2,
not LPIPS (a VGG on 8x8 digits measures little). 800 steps of batch 64 (digits.py's optimizer),
the length the test of recognisable one-step digits needs. Sampling: one step from sigma = 80
(Alg. 1).

The student starts from fresh weights, not the teacher's (the CM code's start, and
`distill.init_from_teacher`'s default): that start suits an EDM teacher, whose network is fed
what the student's is, but this DDPM teacher's network is fed step indices and predicts noise.
Measured (800 steps, `benchmarks/digits_samplers.py`): one-step digits FID 2.88 from fresh
weights, 4.11 from the teacher's; two steps 2.30 and 2.29.
"""

import ml_collections

from experiments import digits_edm


def get_config() -> ml_collections.ConfigDict:
    config = digits_edm.get_config()  # the digits network on EDM's process, sigma_data 0.75
    config.diffusion.model_output = "consistency"

    config.consistency.method = "cd"
    config.consistency.num_scales = 18
    config.consistency.solver = "heun"
    config.consistency.target_ema = 0.0
    config.consistency.distance = "l2"
    config.distill.teacher = None  # --config.distill.teacher=<the digits.py workdir>
    config.distill.init_from_teacher = False

    config.training.num_steps = 800
    config.training.checkpoint_every = 400
    config.training.sample_every = 800
    config.training.label_dropout = 0.0

    config.sampling.method = "consistency"
    config.sampling.num_steps = 1
    config.sampling.guidance_scale = 0.0
    return config
