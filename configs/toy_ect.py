"""ECT (Geng et al. 2024, "Consistency Models Made Easy") on the 2-D toy data, started from
the EDM run of configs/toy_edm.py.

  python main.py --config=configs/toy_edm.py --workdir=runs/toy_edm --mode=train
  python main.py --config=configs/toy_ect.py --workdir=runs/toy_ect --mode=train \
      --config.training.teacher_workdir=runs/toy_edm

The 'consistency' parameterization (sigma_data 2.86, sigma 0.002..80, as toy_edm.py) starts
from the EDM run's EMA weights (training.init_from_teacher) and is tuned with ECT's loss
(score_jax.consistency): ln t ~ N(-1.1 + 1.74, 2^2) (moved as toy_edm.py moves EDM's
P_mean), r = t (1 - 2^-a (1 + 8 sigmoid(-t))) with the stage a growing every 500 of the
4,000 steps (ECT's 8 stages), weighting 1 / (t - r) and locuslab/ect's default metric, the
L2 norm (pseudo-Huber c = 0); toy.py's learning rate 1e-3 without warm-up, decayed to 0 by a
cosine (optim.lr_decay). Measured (one device, from 2,000 EDM steps, EMA, 8,192 samples):
largest mode-weight error 0.016 (1 step) and 0.010 (2 steps), 24% and 20% of the samples off
every mode (the data: 1.1%). At a constant rate (2,048 samples): 0.021 and 0.010, 35% and
34%; at 2,000 steps and learning rate 3e-4, 62%.
"""

import ml_collections

from configs import _families as families, toy


def get_config() -> ml_collections.ConfigDict:
  config = families.consistency(toy.get_config(), objective="ect", sigma_data=2.86,
                                p_mean=0.64)
  training = config.training
  training.n_iters = 4000
  training.teacher_workdir = "runs/toy_edm"
  training.init_from_teacher = True
  training.ct_huber_c = 0.0
  training.ct_ect_q = 2.0
  training.ct_ect_double = 500
  config.optim.warmup = 0
  config.optim.lr_decay = "cosine"
  return config
