"""iCT (Song & Dhariwal 2023) on scikit-learn's 8x8 digits: configs/digits.py's data and
small DDPM++, one- and two-step generation.

  python main.py --config=configs/digits_ict.py --workdir=runs/digits_ict --mode=train

The 'consistency' parameterization on EDM's process (sigma 0.002..80) with sigma_data 0.75
(the centered digits' standard deviation, as configs/digits_edm.py), trained from scratch
with iCT's loss (score_jax.consistency): the curriculum N = 11..1281 over the 3,000 steps,
the discretized lognormal with P_std = 2 and P_mean = -1.1 moved by ln(0.75 / 0.5) = 0.41,
weighting 1 / (sigma_{i+1} - sigma_i), the pseudo-Huber metric (c = 0.00054 sqrt(64) x 1.5)
and the online network as its own target. Sampled in sampling.num_steps consistency steps.
"""

import ml_collections

from configs import _families as families, digits


def get_config() -> ml_collections.ConfigDict:
  return families.consistency(digits.get_config(), objective="ict", sigma_data=0.75,
                              p_mean=-0.69)
