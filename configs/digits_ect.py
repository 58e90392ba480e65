"""ECT (Geng et al. 2024, "Consistency Models Made Easy") on scikit-learn's 8x8 digits,
started from the EDM run of configs/digits_edm.py.

  python main.py --config=configs/digits_ect.py --workdir=runs/digits_ect --mode=train \
      --config.training.teacher_workdir=runs/digits_edm

The 'consistency' parameterization (sigma_data 0.75, sigma 0.002..80) starts from the EDM
run's EMA weights (training.init_from_teacher) and is tuned with ECT's loss
(score_jax.consistency): ln t ~ N(-1.1 + ln(0.75 / 0.5), 2^2), r = t (1 - 2^-a (1 + 8
sigmoid(-t))) with the stage a growing every 375 steps (ECT's 8 stages of CIFAR-10's 200k
iterations, over these 3,000), weighting 1 / (t - r), and locuslab/ect's default metric, the
L2 norm (pseudo-Huber c = 0). ECT's learning rate 1e-4 without warm-up (their RAdam is
Adam here).
"""

import ml_collections

from configs import _families as families, digits


def get_config() -> ml_collections.ConfigDict:
  config = families.consistency(digits.get_config(), objective="ect", sigma_data=0.75,
                                p_mean=-0.69)
  training = config.training
  training.teacher_workdir = "runs/digits_edm"
  training.init_from_teacher = True
  training.ct_huber_c = 0.0
  training.ct_ect_q = 2.0
  training.ct_ect_double = 375
  config.optim.lr = 1e-4
  config.optim.warmup = 0
  return config
