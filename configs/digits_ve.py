"""The VE SDE (NCSN++-style score network) on scikit-learn's 8x8 digits: configs/digits.py's
data, network size and steps, for the family comparison in docs/results.md.

  python main.py --config=configs/digits_ve.py --workdir=runs/digits_ve --mode=train

Data in [0, 1] (not centered, as for the paper's VE runs); sigma_max = 5, about the largest
distance between two digits (4.8 in these units: the rule of Song and Ermon 2020 that the
paper's sigma_max follows), sigma_min = 0.01; Fourier time embedding and the output scaled
by 1 / sigma, as in configs/ve_cifar.py. Sampled with PC reverse diffusion + Langevin.
"""

import ml_collections

from configs import digits


def get_config() -> ml_collections.ConfigDict:
  config = digits.get_config()
  config.training.sde = "vesde"
  config.data.centered = False
  model = config.model
  model.sigma_min = 0.01
  model.sigma_max = 5.0
  model.scale_by_sigma = True
  model.embedding_type = "fourier"
  model.fourier_scale = 16.0
  sampling = config.sampling
  sampling.predictor = "reverse_diffusion"
  sampling.corrector = "langevin"
  sampling.snr = 0.16
  return config
