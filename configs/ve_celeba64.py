"""NCSN++ cont. (VE SDE) on CelebA 64x64: sigma_max 90, corrector snr 0.17."""

import ml_collections

from configs import ve_cifar


def get_config() -> ml_collections.ConfigDict:
  config = ve_cifar.get_config()
  config.data.dataset = "celeb_a"
  config.data.image_size = 64
  config.model.sigma_max = 90.0
  config.sampling.snr = 0.17
  config.eval.begin_ckpt = 1
  config.eval.end_ckpt = 26
  return config
