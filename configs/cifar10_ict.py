"""iCT (Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models") on
CIFAR-10: NCSN++, 56.40M parameters, one-step generation (reported FID 2.51; 2.24 in two
steps).

  python main.py --config=configs/cifar10_ict.py --workdir=runs/cifar10_ict --mode=train

iCT's code is unreleased. From the paper (sec. 3 and appendix): the NCSN++ of Song et al.
2023 (the consistency models' CIFAR-10 network), trained from scratch with the curriculum
s0 = 10, s1 = 1280 over K = 400,000 iterations, the lognormal index distribution (P_mean
-1.1, P_std 2.0), weighting 1 / (sigma_{i+1} - sigma_i), the pseudo-Huber metric with
c = 0.00054 sqrt(3072) = 0.03, no EMA target, dropout 0.3, Fourier features of scale 0.02
(less sensitive to the noise level than CT's 16), EDM's sigma 0.002..80 with rho = 7 and
sigma_data 0.5, batch 1024, Adam with learning rate 1e-4, and an EMA of the weights with
decay 0.99993 for evaluation.

The network's remaining settings are those of the authors' CT code
(openai/consistency_models_cifar10, configs/cifar10_ve_ct_ema.py: nf 128, channel
multipliers (2, 2, 2), 4 residual blocks per resolution, attention at 16x16, BigGAN
residual blocks, FIR resampling, residual input pyramid; 56,395,523 trainable parameters
there and here, plus the 128 constant Fourier frequencies; their data in [-1, 1] without an
input map, data.centered = True). Not checkable without iCT's code: Adam's beta2 and eps
(0.999, 1e-8 here, as CT), whether the learning rate warms up (none here), gradient
clipping (none), and the random horizontal flip (on, as CT).
"""

import ml_collections

from configs import _families as families, ve_cifar


def get_config() -> ml_collections.ConfigDict:
  config = families.consistency(ve_cifar.get_config(), objective="ict", sigma_data=0.5)
  training = config.training
  training.batch_size = 1024
  training.n_iters = 400_000
  training.snapshot_freq = 10_000
  training.snapshot_freq_for_preemption = 5_000
  training.ct_s0 = 10
  training.ct_s1 = 1280
  config.data.centered = True
  config.data.random_flip = True
  model = config.model
  model.scale_by_sigma = False
  model.ch_mult = (2, 2, 2)
  model.dropout = 0.3
  model.fourier_scale = 0.02
  model.ema_rate = 0.99993
  model.ema_warmup = False
  optim = config.optim
  optim.optimizer = "Adam"
  optim.lr = 1e-4
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.warmup = 0
  optim.grad_clip = 0.0
  return config
