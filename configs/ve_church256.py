"""NCSN++ cont. (VE SDE) on LSUN church_outdoor 256x256: 65.57M parameters, sigma_max 380."""

import ml_collections

from configs import ve_ffhq256


def get_config() -> ml_collections.ConfigDict:
  config = ve_ffhq256.get_config()
  config.data.dataset = "lsun/church_outdoor"
  config.model.sigma_max = 380.0
  return config
