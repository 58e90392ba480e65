"""NCSN++ cont. (VE SDE) on CelebA-HQ 256x256: 65.57M parameters, sigma_max 348."""

import ml_collections

from configs import ve_ffhq256


def get_config() -> ml_collections.ConfigDict:
  config = ve_ffhq256.get_config()
  config.data.dataset = "celebahq"  # TFRecords folder given by data.data_dir
  return config
