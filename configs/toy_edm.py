"""EDM (Karras et al. 2022) on the 2-D toy data: configs/toy.py's data and MLP, trained
with EDM's preconditioning and loss.

  python main.py --config=configs/toy_edm.py --workdir=runs/toy_edm --mode=train

EDM's own process x = x_0 + sigma z is the VE SDE (alpha = 1) on EDM's noise range
sigma 0.002..80; the network is preconditioned (model.parameterization = 'edm') with
sigma_data the data's standard deviation (2.86 per coordinate for the 8-mode circle of
radius 4), trained with ln sigma ~ N(p_mean, p_std^2) and EDM's weighting, sampled with
EDM's Heun sampler (18 steps, 35 NFE + the final denoising). EDM's p_mean = -1.2 is set
for images with sigma_data = 0.5; here it is moved by ln(2.86 / 0.5) = 1.74 so that the
noise levels keep their ratio to the data's scale.
"""

import ml_collections

from configs import _families as families, toy


def get_config() -> ml_collections.ConfigDict:
  return families.edm(toy.get_config(), sigma_data=2.86, p_mean=0.54)
