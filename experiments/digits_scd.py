"""Continuous-time consistency distillation (sCD, sCM arXiv 2410.11081 Alg. 1) on the digits.

`python -m jaxdiff.train --config experiments/digits_scd.py --workdir runs/digits_scd
--config.distill.teacher=runs/digits_trigflow` distils the TrigFlow diffusion model of
digits_trigflow.py: dx_t/dt is the teacher's velocity sigma_d F_pretrain(x_t / sigma_d, t)
(read through its denoiser, so any trained diffusion model of the same shape can teach), and
the student starts from the teacher's weights (Alg. 1's theta <- theta_pretrain). Everything
else is digits_sct.py's: sCM's tangent normalisation, adaptive and prior weighting, two-step
sampling from t_max and t = 1.1; the warm-up H = 100 of 800 steps. Measured (seed 0; 500
samples, `digits_scorer`): one step label accuracy 0.964, digits FID 2.02; two steps 0.958, 1.99;
the teacher's Heun-18 (35 network calls) 0.956, 0.83, and its single denoising step from t_max
0.998, 12.3 (blurred class means).
"""

import ml_collections

from experiments import digits_edm, digits_sct


def get_config() -> ml_collections.ConfigDict:
    config = digits_sct.with_scm(digits_edm.get_config(), "scd")
    config.distill.teacher = None  # --config.distill.teacher=<the digits_trigflow.py workdir>
    config.distill.init_from_teacher = True
    config.consistency.tangent_warmup_steps = 100
    config.training.num_steps = 800
    config.training.checkpoint_every = 400
    config.training.sample_every = 800
    config.training.label_dropout = 0.0
    return config
