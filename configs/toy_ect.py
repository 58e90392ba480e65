"""ECT (Geng et al. 2024, "Consistency Models Made Easy") on the 2-D toy data, started from
the EDM run of configs/toy_edm.py.

  python main.py --config=configs/toy_edm.py --workdir=runs/toy_edm --mode=train
  python main.py --config=configs/toy_ect.py --workdir=runs/toy_ect --mode=train \
      --config.training.teacher_workdir=runs/toy_edm

The 'consistency' parameterization (sigma_data 2.86, sigma 0.002..80, as toy_edm.py) starts
from the EDM run's EMA weights (training.init_from_teacher) and is tuned with ECT's loss
(score_jax.consistency): ln t ~ N(-1.1 + 1.74, 2^2) (moved as toy_edm.py moves EDM's
P_mean), r = t (1 - 2^-a (1 + 8 sigmoid(-t))) with the stage a growing every 500 of the
4,000 steps (ECT's 8 stages), weighting 1 / (t - r); toy.py's learning rate 1e-3 without
warm-up, decayed to 0 by a cosine (optim.lr_decay). The metric is the pseudo-Huber distance
with c = 0.1 (training.ct_huber_c = 0.1 / sqrt(2): it is scaled by sqrt(dim)), not
locuslab/ect's default L2 norm (c = 0): c = 0.1 makes the loss quadratic where the two ends
differ by less than 0.1 (the data's std is 2.86), which halved the off-mode share here; why
it helps was not worked out. Measured (one device, from 2,000 EDM steps, EMA, 8,192 samples;
largest mode-weight error and share of samples off every mode, 1 step / 2 steps; the data's
share 1.1%): c = 0.1: 0.007, 11.8% / 0.008, 10.9%; at 16,000 steps (stages of 2,000): 0.014,
9.5% / 0.014, 8.4%; the same 4,000 steps from scratch (no teacher): 13.5% / 12.3%. Other c
at 4,000 steps: 0 (the L2 norm) 24% / 20%, 0.0044 (iCT's, as toy_ict.py) 28% / 26%, 0.03 18%
/ 16%, 0.3 15% / 12%, 1 16% / 13%. With c = 0: the weight 1 instead of 1 / (t - r) 45% /
45%; 16 stages of 250 steps 33% / 31% at 3,000 steps, then non-finite as r approaches t in
float32.
"""

import math

import ml_collections

from configs import _families as families, toy


def get_config() -> ml_collections.ConfigDict:
  config = families.consistency(toy.get_config(), objective="ect", sigma_data=2.86,
                                p_mean=0.64)
  training = config.training
  training.n_iters = 4000
  training.teacher_workdir = "runs/toy_edm"
  training.init_from_teacher = True
  training.ct_huber_c = 0.1 / math.sqrt(2)  # c = 0.1: ct_huber_c is scaled by sqrt(dim)
  training.ct_ect_q = 2.0
  training.ct_ect_double = 500
  config.optim.warmup = 0
  config.optim.lr_decay = "cosine"
  return config
