"""NCSNv2 on CIFAR-10: VE SDE with 232 noise levels, SMLD loss, annealed Langevin dynamics.

33.97M parameters (the width of the reference's JAX network; its PyTorch
twin has 29.69M).
"""

import ml_collections

from configs import default, ve_cifar


def get_config() -> ml_collections.ConfigDict:
  config = ve_cifar.get_config()
  config.training.continuous = False

  sampling = config.sampling
  sampling.predictor = "none"
  sampling.corrector = "ald"
  sampling.n_steps_each = 5
  sampling.snr = 0.176

  # A fresh model section: none of NCSN++'s keys apply.
  config.model = model = default.get_config().model
  model.name = "ncsnv2"
  model.sigma_min = 0.01
  model.sigma_max = 50.0
  model.num_scales = 232
  model.scale_by_sigma = True
  model.ema_rate = 0.999
  model.normalization = "InstanceNorm++"
  model.nonlinearity = "elu"
  model.nf = 128
  model.interpolation = "bilinear"
  model.dropout = 0.0

  optim = config.optim
  optim.lr = 1e-4
  optim.warmup = 0
  optim.grad_clip = -1.0  # no clipping
  return config
