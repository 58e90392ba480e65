"""Continuous-time consistency distillation (sCD; Lu & Song 2024) on the 2-D toy data: the
student of configs/toy_sct.py learns from a trained TrigFlow diffusion run.

  python main.py --config=configs/toy_trigflow.py --workdir=runs/toy_trigflow --mode=train \
      --config.model.trigflow_label_scale=1.0
  python main.py --config=configs/toy_scd.py --workdir=runs/toy_scd --mode=train

The velocity dx_t/dt of the sCM tangent is the teacher's (score_jax.sde.trigflow_velocity_fn:
any teacher family, here TrigFlow itself) instead of sCT's cos(t) z - sin(t) x_0; the
student starts from the teacher's EMA weights (training.init_from_teacher: the same network,
its output is the velocity the consistency function starts from; hence the teacher is
trained with toy_sct.py's time label, c_noise(t) = t), as the paper initializes sCD. A teacher of
another family (configs/toy_edm.py) also works with --config.training.init_from_teacher=False
(the student then starts from scratch).

4,000 steps, the learning rate decayed to 0 by a cosine (toy_sct.py's). Measured (one
device, EMA, 8,192 samples; teacher: 4,000 toy_trigflow.py steps with the label t):
largest mode-weight error 0.023 at 1 and 2 steps, 34% and 35% of the samples off every
mode (the data: 1.1%), well behind sCT's 6.0% and 4.8%: the student starts from the
teacher's velocity network, and its one-step map stays wide around every mode (the RMS
distance of the on-mode samples is 0.54 against the data's 0.39).
"""

import ml_collections

from configs import toy_sct


def get_config() -> ml_collections.ConfigDict:
  config = toy_sct.get_config()
  training = config.training
  training.objective = "scd"
  training.teacher_workdir = "runs/toy_trigflow"
  training.init_from_teacher = True
  training.n_iters = 4000
  return config
