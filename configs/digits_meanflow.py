"""MeanFlow (Geng et al. 2025) on scikit-learn's 8x8 digits: configs/digits.py's data and
small DDPM++ with a second time input, one- and two-step generation.

  python main.py --config=configs/digits_meanflow.py --workdir=runs/digits_meanflow --mode=train
  python main.py --config=runs/digits_meanflow/config.json --workdir=runs/digits_meanflow \
      --mode=sample --config.sampling.num_steps=2

The network learns the average velocity u(z_t, r, t) on the rectified-flow path x_t =
(1 - t) x_0 + t z with the MeanFlow loss (score_jax.meanflow) at the paper's ImageNet
settings: logit-normal times (m = -0.4, s = 1), r < t on a quarter of the batch, the adaptive
weight 1 / (error + 1e-3) (power 1). Sampled in sampling.num_steps jumps (1 or 2).
"""

import ml_collections

from configs import digits


def get_config() -> ml_collections.ConfigDict:
  config = digits.get_config()
  training = config.training
  training.sde = "rectified_flow"
  training.objective = "meanflow"
  training.time_distribution = "logit_normal"
  training.logit_mean = -0.4
  training.logit_std = 1.0
  training.meanflow_ratio = 0.25
  training.meanflow_power = 1.0
  training.meanflow_c = 1e-3
  config.model.second_time = True
  config.sampling.method = "meanflow"
  config.sampling.num_steps = 1
  config.eval.enable_bpd = False  # the likelihood integrates a score; this network gives u
  return config
