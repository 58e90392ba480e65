"""DDPM++ cont. with the sub-VP SDE on CIFAR-10: 61.80M parameters."""

import ml_collections

from configs import vp_cifar


def get_config() -> ml_collections.ConfigDict:
  config = vp_cifar.get_config()
  config.training.sde = "subvpsde"
  return config
