"""Easy Consistency Tuning (ECT, arXiv 2406.14548) of a trained digits_edm.py model.

`python -m jaxdiff.train --config experiments/digits_ect.py --workdir runs/digits_ect
--config.distill.teacher=runs/digits_edm` tunes the EDM model into a consistency model of the
same network (its weights, `distill.init_from_teacher`; the consistency scalings of CM App. C at
sigma_data = 0.75). ECT's settings are its code's CIFAR-10 run (locuslab/ect `run_ecm.sh`,
`ct_train.py` defaults) where they carry over: ln t ~ N(-1.1, 2.0^2), the sigmoid mapping with
q = 2, k = 8, b = 1, w = 1 / (t - r), c = 0, theta- = stopgrad(theta); the code's 8 stages of
dt (200k iterations, dt halved every 25k) become 8 stages over 800 steps of batch 64. Adam at
2e-4 with no warm-up (the code: RAdam at 1e-4 from step 0), sampling EMA 0.99 (the run's length).
Samples in one step from sigma = 80, or two with the code's second level 0.821 (`mid_t`).
"""

import ml_collections

from experiments import digits_edm


def get_config() -> ml_collections.ConfigDict:
    config = digits_edm.get_config()  # the digits network on EDM's process, sigma_data 0.75
    config.diffusion.model_output = "consistency"

    config.consistency.method = "ect"
    config.consistency.p_mean = -1.1
    config.consistency.p_std = 2.0
    config.ect.mapping = "sigmoid"
    config.ect.q = 2.0
    config.ect.k = 8.0
    config.ect.b = 1.0
    config.ect.huber_c = 0.0
    config.ect.stage_steps = 100
    config.distill.teacher = None  # --config.distill.teacher=<the digits_edm.py workdir>
    config.distill.init_from_teacher = True

    config.training.num_steps = 800
    config.training.checkpoint_every = 400
    config.training.sample_every = 800
    config.training.label_dropout = 0.0
    config.training.ema_decay = 0.99
    config.optim.lr = 2e-4
    config.optim.warmup_steps = 0

    config.sampling.method = "consistency"
    config.sampling.num_steps = 1
    config.sampling.sigmas = (80.0,)
    config.sampling.guidance_scale = 0.0
    return config
