"""Progressive distillation (PD, arXiv 2202.00512 Alg. 2) of a trained digits_edm.py model.

`python -m jaxdiff.progressive --config experiments/digits_pd.py --workdir runs/digits_pd
--config.distill.teacher=runs/digits_edm` runs the rounds 8 -> 4 -> 2 -> 1 student steps
(the teacher takes 16 DDIM steps on PD's grid), each in runs/digits_pd/round_k, a workdir that
samples by DDIM on its own grid. Each student starts as its teacher (the same network and EDM
output, which is PD's v of the unit-variance data), is trained on the teacher's two DDIM steps
with the truncated-SNR weighting max(SNR, 1) (PD Sec. 4; the code's 'snr_trunc') and the code's
cosine levels, for 300 steps of batch 64 at a constant 2e-4 (the paper's rounds are of 50k
updates on CIFAR-10), sampling EMA 0.98 (the round's length). Labels are kept (no dropout): the
student is conditional as its teacher.
"""

import ml_collections

from experiments import digits_edm
from jaxdiff.processes import make_process
from jaxdiff.progressive import pd_sigmas


def get_config() -> ml_collections.ConfigDict:
    config = digits_edm.get_config()  # the digits network on EDM's process, sigma_data 0.75

    config.consistency.method = "pd"
    config.pd.num_steps = 8
    config.pd.final_steps = 1
    config.pd.weighting = "snr_trunc"
    config.distill.teacher = None  # --config.distill.teacher=<the digits_edm.py workdir>
    config.distill.init_from_teacher = True

    config.training.num_steps = 300
    config.training.checkpoint_every = 300
    config.training.sample_every = 300
    config.training.label_dropout = 0.0
    config.training.ema_decay = 0.98
    config.optim.lr = 2e-4
    config.optim.warmup_steps = 0

    # The first round's sampler; `jaxdiff.progressive` sets each round's.
    process = make_process(config.diffusion)
    config.sampling.method = "ddim"
    config.sampling.eta = 0.0
    config.sampling.num_steps = config.pd.num_steps
    config.sampling.sigmas = pd_sigmas(config.pd.num_steps, sigma_min=process.sigma_min,
                                       sigma_max=process.sigma_max)
    config.sampling.guidance_scale = 0.0
    return config
