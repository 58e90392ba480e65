"""Rectified flow / flow matching on scikit-learn's 8x8 digits: configs/digits.py's data
and small DDPM++.

  python main.py --config=configs/digits_rf.py --workdir=runs/digits_rf --mode=train

x_t = (1 - t) x_0 + t z (score_jax.sde.RectifiedFlow), velocity prediction v = z - x_0,
flow-matching loss at logit-normal times (m = 0, s = 1); sampled with the Heun sampler of
configs/digits_edm.py (18 steps, 35 NFE + the final denoising).
"""

import ml_collections

from configs import _families as families, digits


def get_config() -> ml_collections.ConfigDict:
  return families.rectified_flow(digits.get_config())
