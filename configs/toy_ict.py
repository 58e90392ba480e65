"""iCT (Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models") on the
2-D toy data: configs/toy.py's data and MLP, one- and two-step generation.

  python main.py --config=configs/toy_ict.py --workdir=runs/toy_ict --mode=train

The 'consistency' parameterization on EDM's process (sigma 0.002..80) with sigma_data 2.86
(the mixture's standard deviation per coordinate, as configs/toy_edm.py); iCT's
discretization curriculum over the run (N from 11 to 1281 levels in 8 stages), the
discretized lognormal over the intervals with iCT's P_std = 2 and P_mean = -1.1 moved by
ln(2.86 / 0.5) = 1.74 (as toy_edm.py moves EDM's), the weighting 1 / (sigma_{i+1} -
sigma_i), the pseudo-Huber metric and no EMA target (score_jax.consistency); 6,000 steps with
the learning rate decayed to 0 by a cosine (optim.lr_decay). Measured (one device, EMA, 8,192
samples): largest mode-weight error 0.021 (1 step) and 0.015 (2 steps), 7.0% and 5.9% of
the samples off every mode (the data: 1.1%; the few-step check allows 2.2%), 606 s on 2
shared CPU cores. At 3,000 steps without the decay (2,048 samples): 0.028 and 0.019, 20% and
26%.
"""

import ml_collections

from configs import _families as families, toy


def get_config() -> ml_collections.ConfigDict:
  config = families.consistency(toy.get_config(), objective="ict", sigma_data=2.86,
                                p_mean=0.64)
  config.training.n_iters = 6000
  config.optim.lr_decay = "cosine"
  return config
