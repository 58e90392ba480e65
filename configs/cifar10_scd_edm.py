"""Continuous-time consistency distillation (sCD; Lu & Song 2024) of EDM's CIFAR-10 network
(NVlabs/edm's edm-cifar10-32x32-uncond-vp.pkl, converted).

  python -m score_jax.convert --from=edm --config=configs/edm_cifar_vp.py \
      edm-cifar10-32x32-uncond-vp.pkl runs/edm_vp
  python main.py --config=configs/cifar10_scd_edm.py --workdir=runs/cifar10_scd_edm --mode=train

The teacher (training.teacher_workdir = runs/edm_vp, the converted EDM run on its VE SDE with
EDM's preconditioning) runs in its own precision without dropout; its velocity is mapped onto
TrigFlow time by score_jax.sde.trigflow_velocity_fn at equal log-SNR. The student is the
TrigFlow network of configs/cifar10_sct.py's settings with the teacher's DDPM++ backbone
(SongUNet, positional embedding), trained from scratch: EDM's F is another quantity (at
equal noise levels F_TrigFlow = -F_EDM, and the labels and input scaling differ), so the
teacher's weights do not start this network (training.init_from_teacher = False).

The paper distills on ImageNet with ln(sigma_d tan t) ~ N(-0.8, 1.6^2) [unchecked]; its
CIFAR-10 results are sCT's. The remaining settings are configs/cifar10_sct.py's (see its
list of what is checked).
"""

import ml_collections

from configs import cifar10_sct


def get_config() -> ml_collections.ConfigDict:
  config = cifar10_sct.get_config()
  training = config.training
  training.objective = "scd"
  training.teacher_workdir = "runs/edm_vp"
  training.init_from_teacher = False
  training.scm_p_mean = -0.8
  training.scm_p_std = 1.6
  model = config.model  # the teacher's DDPM++ backbone (configs/edm_cifar_vp.py)
  model.embedding_type = "positional"
  model.channel_mult_noise = 1
  model.encoder_type = "standard"
  model.resample_filter = (1, 1)
  return config
