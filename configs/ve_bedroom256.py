"""NCSN++ cont. (VE SDE) on LSUN bedroom 256x256: 65.57M parameters, sigma_max 378."""

import ml_collections

from configs import ve_ffhq256


def get_config() -> ml_collections.ConfigDict:
  config = ve_ffhq256.get_config()
  config.data.dataset = "lsun/bedroom"
  config.model.sigma_max = 378.0
  return config
