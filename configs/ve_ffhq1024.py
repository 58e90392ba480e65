"""NCSN++ cont. (VE SDE) on FFHQ 1024x1024: 105.79M parameters, sigma_max 1348.

nf 16 with channel multipliers up to 32, one block per resolution; batch 8,
EMA 0.9999, snr 0.15, per-dimension mean loss.
"""

import ml_collections

from configs import ve_ffhq256


def get_config() -> ml_collections.ConfigDict:
  config = ve_ffhq256.get_config()

  training = config.training
  training.batch_size = 8
  training.reduce_mean = True

  config.sampling.snr = 0.15

  evaluate = config.eval
  evaluate.begin_ckpt = 1
  evaluate.end_ckpt = 96
  evaluate.batch_size = 1024
  evaluate.enable_sampling = False

  config.data.image_size = 1024

  model = config.model
  model.sigma_max = 1348.0
  model.ema_rate = 0.9999
  model.nf = 16
  model.ch_mult = (1, 2, 4, 8, 16, 32, 32, 32)
  model.num_res_blocks = 1
  return config
