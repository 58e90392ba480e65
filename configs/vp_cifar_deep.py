"""DDPM++ cont. deep (VP SDE): 8 residual blocks per resolution, 106.63M parameters."""

import ml_collections

from configs import vp_cifar


def get_config() -> ml_collections.ConfigDict:
  config = vp_cifar.get_config()
  config.training.n_iters = 950_001
  config.model.num_res_blocks = 8
  return config
