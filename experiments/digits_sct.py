"""Continuous-time consistency training (sCT, sCM arXiv 2410.11081 Alg. 1) on the 8x8 digits.

The digits.py network on TrigFlow (digits_trigflow.py's process: sigma_d = 0.75, P_mean = -1.0,
P_std = 1.4, c_noise(t) = t) as a consistency function f = cos(t) x_t - sin(t) sigma_d
F(x_t / sigma_d, t), trained without a teacher: dx_t/dt = cos(t) z - sin(t) x_0, theta- =
stopgrad(theta), tangent normalisation c = 0.1, the adaptive weighting w_phi(t) and the prior
weighting 1 / (sigma_d tan t) (Sec. 4.2). The tangent warm-up is sCM's 10k of 400k CIFAR-10
steps (App. G) scaled to this run: H = 200 of 1600 steps. The optimizer is digits.py's (Adam,
lr 1e-3). Samples are drawn in two steps, from t_max = arctan(80 / sigma_d) and again from
t = 1.1 (App. G): `jaxdiff.sample(..., "consistency", sigmas=scm.sampling_sigmas(2, 0.75))`.
Measured (seed 0, 1600 steps, 17 min on 2 heavily shared cores; 500 samples, `digits_scorer`):
one step label accuracy 0.962, digits FID 1.59; two steps 0.964, 1.56.
"""

import ml_collections

from experiments import digits_edm, digits_trigflow
from jaxdiff import scm


def with_scm(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """`config` trained by sCT or sCD (`method`) with sCM's settings and sampled in two steps."""
    config = digits_trigflow.with_trigflow(config)
    config.diffusion.model_output = "trigflow_consistency"
    config.consistency.method = method
    config.consistency.tangent_norm_c = 0.1
    config.consistency.prior_weighting = True
    config.sampling.method = "consistency"
    config.sampling.num_steps = 2
    config.sampling.sigmas = scm.sampling_sigmas(2, config.diffusion.sigma_data)
    config.sampling.guidance_scale = 0.0
    return config


def get_config() -> ml_collections.ConfigDict:
    config = with_scm(digits_edm.get_config(), "sct")  # sigma_data 0.75
    config.consistency.tangent_warmup_steps = 200
    config.training.num_steps = 1600
    config.training.checkpoint_every = 400
    config.training.sample_every = 1600
    config.training.label_dropout = 0.0
    return config
