"""Progressive distillation (PD, arXiv 2202.00512 Alg. 2) of EDM's CIFAR-10 model, round by round.

`python -m jaxdiff.progressive --config experiments/cifar_pd.py --workdir runs/cifar_pd
--config.distill.teacher=<the cifar_edm.py workdir>` halves 1024 student steps down to 1, each
round a workdir. PD's own (Alg. 2, Sec. 4): every student starts as its teacher, the teacher's two
DDIM steps on the code's cosine log-SNR grid, the truncated-SNR weighting max(SNR, 1). The round
schedule, 1024 steps to start, 50k updates per round and Adam at 1e-4 with no warm-up are the
diffusion_distillation code's distillation config (`start_num_steps = 1024`,
`distill_steps_per_iter = 50000`, `lr = 1e-4`; its guided ImageNet variant, the one read); batch
128, EMA 0.9999 and dropout 0 are this file's. The paper reports CIFAR-10 FID 2.57 / 3.00 / 4.51
at 8 / 4 / 2 steps. The student is cifar_edm.py's network and EDM output (v of the unit-variance
data, see `jaxdiff.progressive`). Not run here.
"""

import ml_collections

from experiments import cifar_edm
from jaxdiff.processes import make_process
from jaxdiff.progressive import pd_sigmas


def get_config() -> ml_collections.ConfigDict:
    config = cifar_edm.get_config()
    config.model.dropout = 0.0

    config.consistency.method = "pd"
    config.pd.num_steps = 1024
    config.pd.final_steps = 1
    config.pd.weighting = "snr_trunc"
    config.distill.teacher = None  # --config.distill.teacher=<the cifar_edm.py workdir>
    config.distill.init_from_teacher = True

    config.training.batch_size = 128
    config.training.num_steps = 50_000
    config.training.ema_decay = 0.9999
    config.training.ema_halflife_kimg = None  # the fixed ema_decay, not cifar_edm.py's ramp-up
    config.training.ema_rampup_ratio = None
    config.optim.lr = 1e-4
    config.optim.warmup_steps = 0
    config.optim.grad_clip = 0.0

    process = make_process(config.diffusion)
    config.sampling.method = "ddim"
    config.sampling.eta = 0.0
    config.sampling.num_steps = config.pd.num_steps
    config.sampling.sigmas = pd_sigmas(config.pd.num_steps, sigma_min=process.sigma_min,
                                       sigma_max=process.sigma_max)
    return config
