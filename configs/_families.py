"""The EDM and rectified-flow families as deltas over any config (data and network kept).

configs/toy_edm.py, digits_edm.py, toy_rf.py and digits_rf.py apply them to the toy and
digits configs, so the families differ from VP / VE there in these keys only.
"""

import ml_collections


def _edm_heun(config: ml_collections.ConfigDict, eps: float) -> None:
  """EDM's deterministic Heun sampler: 18 steps on the rho = 7 grid, 35 NFE + denoising."""
  sampling = config.sampling
  sampling.method = "heun"
  sampling.num_steps = 18
  sampling.schedule = "edm"
  sampling.eps = eps


def edm(config: ml_collections.ConfigDict, *, sigma_data: float,
        p_mean: float = -1.2) -> ml_collections.ConfigDict:
  """EDM's preconditioning, loss (ln sigma ~ N(p_mean, 1.2^2), EDM's weighting) and sampler on
  EDM's process x = x_0 + sigma z: the VE SDE with sigma 0.002..80."""
  training = config.training
  training.sde = "vesde"
  training.time_distribution = "lognormal_sigma"
  training.p_mean = p_mean
  training.p_std = 1.2
  training.weighting = "edm"
  model = config.model
  model.parameterization = "edm"
  model.sigma_data = sigma_data
  model.sigma_min = 0.002
  model.sigma_max = 80.0
  _edm_heun(config, eps=1e-5)
  return config


def rectified_flow(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """x_t = (1 - t) x_0 + t z, velocity prediction, flow matching at logit-normal times,
  sampled with EDM's Heun sampler."""
  training = config.training
  training.sde = "rectified_flow"
  training.time_distribution = "logit_normal"
  training.weighting = "velocity"
  config.model.parameterization = "velocity"
  _edm_heun(config, eps=1e-3)
  return config
