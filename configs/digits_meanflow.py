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

from configs import _families as families, digits


def get_config() -> ml_collections.ConfigDict:
  return families.meanflow(digits.get_config())
