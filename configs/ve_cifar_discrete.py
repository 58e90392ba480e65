"""NCSN++ trained with the discrete SMLD objective (VE, 1000 noise levels): 62.69M parameters.

Discrete training gives integer noise-level labels, embedded sinusoidally
(Fourier features of log sigma are for continuous training).
"""

import ml_collections

from configs import ve_cifar


def get_config() -> ml_collections.ConfigDict:
  config = ve_cifar.get_config()
  config.training.continuous = False
  config.model.embedding_type = "positional"
  return config
