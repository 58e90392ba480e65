"""ECT (Geng et al. 2024, "Consistency Models Made Easy") on CIFAR-10: EDM's DDPM++
(55.73M parameters) tuned from EDM's unconditional VP network into a consistency model.

  python -m score_jax.convert --from=edm --config=configs/edm_cifar_vp.py \
      edm-cifar10-32x32-uncond-vp.pkl runs/edm_cifar10_uncond_vp
  python main.py --config=configs/cifar10_ect.py --workdir=runs/cifar10_ect --mode=train \
      --config.training.teacher_workdir=runs/edm_cifar10_uncond_vp

As locuslab/ect's run_ecm.sh and ct_train.py set it: `--arch=ddpmpp` (SongUNet, 128
channels, multipliers (2, 2, 2), 4 blocks, attention at 16x16, positional embedding),
`--transfer` from EDM's edm-cifar10-32x32-uncond-vp.pkl (training.init_from_teacher),
batch 128, 25.6 Mimg = 200,000 iterations, learning rate 1e-4 (their RAdam; Adam here,
betas 0.9 / 0.999, eps 1e-8, no warm-up, no clipping, non-finite gradient entries set to
zero), dropout 0.2, no augmentation, EMA decay 0.9999, and ECMLoss's defaults:
ln t ~ N(-1.1, 2^2), r = t (1 - 2^-a (1 + 8 sigmoid(-t))) with the stage a growing every
250 ticks of 12.8 kimg = 25,000 iterations, weighting 1 / (t - r), the L2 norm of the
difference (c = 0). The network keeps EDM's 9 augmentation inputs (zero labels: 1,152
weights that never change) so that the teacher's weights fit it; ECT's own network drops
them (55,732,739 parameters).

Differences from their code: their training-time preconditioning has no sigma_min offset
(EDM's c_skip, c_out, the boundary enforced by the target x at r = 0) and their sampler's
offset is at 0.003; here f has the offset at sigma_min = 0.002 throughout (c_skip and c_out
change by < 1% for t > 0.2). Two-step sampling as theirs:
--config.sampling.num_steps=2 --config.sampling.consistency_sigmas='(0.821,)'.
"""

import ml_collections

from configs import _families as families, edm_cifar_vp


def get_config() -> ml_collections.ConfigDict:
  config = families.consistency(edm_cifar_vp.get_config(), objective="ect", sigma_data=0.5)
  training = config.training
  training.batch_size = 128
  training.n_iters = 200_000
  training.snapshot_freq = 10_000
  training.reduce_mean = False
  training.teacher_workdir = "runs/edm_cifar10_uncond_vp"
  training.init_from_teacher = True
  training.ct_huber_c = 0.0
  training.ct_ect_q = 2.0
  training.ct_ect_double = 25_000
  training.ct_ect_k = 8.0
  training.ct_ect_b = 1.0
  data = config.data
  data.augment_p = 0.0
  model = config.model
  model.dropout = 0.2
  model.ema_halflife_kimg = 0.0
  model.ema_rate = 0.9999
  model.ema_warmup = False
  optim = config.optim
  optim.lr = 1e-4
  optim.lr_rampup_kimg = 0.0
  optim.warmup = 0
  optim.grad_clip = 0.0
  optim.nonfinite_grads = "zero"  # their nan_to_num of the gradients (as EDM)
  return config
