"""EDM (Karras et al. 2022) on scikit-learn's 8x8 digits: configs/digits.py's data and
small DDPM++, trained with EDM's preconditioning and loss.

  python main.py --config=configs/digits_edm.py --workdir=runs/digits_edm --mode=train

EDM's process x = x_0 + sigma z is the VE SDE on EDM's noise range sigma 0.002..80;
EDM's loss (ln sigma ~ N(-1.2, 1.2^2), weight (sigma^2 + sigma_data^2) / (sigma
sigma_data)^2 on |D - x_0|^2) and Heun sampler (18 steps, 35 NFE + the final denoising).
sigma_data = 0.75: the standard deviation of the centered digits (EDM's 0.5 is CIFAR-10's).
"""

import ml_collections

from configs import _families as families, digits


def get_config() -> ml_collections.ConfigDict:
  return families.edm(digits.get_config(), sigma_data=0.75)
