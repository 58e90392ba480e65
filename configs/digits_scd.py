"""Continuous-time consistency distillation (sCD; Lu & Song 2024) on scikit-learn's 8x8
digits from the EDM run of configs/digits_edm.py.

  python main.py --config=configs/digits_edm.py --workdir=runs/digits_edm --mode=train
  python main.py --config=configs/digits_scd.py --workdir=runs/digits_scd --mode=train

The student is configs/digits_sct.py's TrigFlow network, trained from scratch: the EDM
teacher's network predicts another quantity (EDM's F is the negative of TrigFlow's F at the
same noise level, with other input scaling and noise labels), so its weights are no start
for this one (training.init_from_teacher is refused for teachers of another family). The
tangent's velocity dx_t/dt is the teacher's, mapped onto TrigFlow time by
score_jax.sde.trigflow_velocity_fn; the time distribution is the paper's sCD one (P_mean
-0.8, P_std 1.6), P_mean moved by ln(0.75 / 0.5) for sigma_d = 0.75. The sCM adaptive
weighting is off (training.scm_adaptive_weighting = False), as in configs/toy_scd.py: from the
same kind of teacher, FD@355 at 1 / 2 steps was 0.650 / 0.675 without it and 0.927 / 1.031
with it (docs/few_step.md).
"""

import math

import ml_collections

from configs import digits_sct


def get_config() -> ml_collections.ConfigDict:
  config = digits_sct.get_config()
  training = config.training
  training.objective = "scd"
  training.teacher_workdir = "runs/digits_edm"
  training.scm_p_mean = -0.8 + math.log(0.75 / 0.5)
  training.scm_p_std = 1.6
  training.scm_adaptive_weighting = False
  return config
