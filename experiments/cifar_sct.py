"""Continuous-time consistency training (sCT, sCM arXiv 2410.11081) on CIFAR-10, unconditional.

sCM's CIFAR-10 settings as NVlabs/FastGen's sCM recipe (`fastgen/configs/methods/config_scm.py`,
"default values from Appendix G.2 CIFAR-10") gives them: sigma_d = 0.5, P_mean = -1.0, P_std =
1.4, tangent normalisation c = 0.1, tangent warm-up H = 10,000 steps, prior weighting 1 / (sigma_d
tan t), dropout 0.20, RAdam with betas (0.9, 0.99), no learning-rate warm-up and no effective
gradient clipping (FastGen clips at a norm of 1e6). Samples are drawn in two steps from t_max =
arctan(80 / 0.5) and t = 1.1 (sCM App. G); sCM's abstract reports 2-step FID 2.06 on CIFAR-10.
Not taken from the paper here: the batch size, run length and EMA are cifar_edm.py's (EDM config
F, 512 x 390,625 steps); the learning rate 1e-4 is the one FastGen's RAdam recipes start from and
was not checked against sCM's table. The network changes of sCM Sec. 4.1 are on: DDPM's positional
time embedding (the U-Net's) and AdaGN with adaptive double normalisation (norm(h) * pnorm(s) +
pnorm(b)). Differences: jaxdiff's Adam, not RAdam; jaxdiff's U-Net in cifar_edm.py's DDPM++
layout, not NCSN++. This recipe has not been run to convergence here.
"""

import ml_collections

from experiments import cifar_edm, digits_sct


def get_config() -> ml_collections.ConfigDict:
    config = digits_sct.with_scm(cifar_edm.get_config(), "sct")  # sigma_d 0.5, sigma in [0.002, 80]
    config.model.dropout = 0.2
    config.model.use_scale_shift_norm = True
    config.model.adaptive_double_norm = True
    config.consistency.tangent_warmup_steps = 10_000
    config.optim.lr = 1e-4
    config.optim.b2 = 0.99
    config.optim.warmup_steps = 0
    config.optim.grad_clip = 0.0
    return config
