"""Rectified flow / flow matching on the 2-D toy data: configs/toy.py's data and MLP.

  python main.py --config=configs/toy_rf.py --workdir=runs/toy_rf --mode=train

x_t = (1 - t) x_0 + t z (score_jax.sde.RectifiedFlow), the network predicts the velocity
v = z - x_0 (model.parameterization = 'velocity'), trained with the flow-matching loss
|v - (z - x_0)|^2 (training.weighting = 'velocity') at logit-normal times (m = 0, s = 1).
Sampled with the same Heun sampler as configs/toy_edm.py (18 steps, 35 NFE + the final
denoising); any other sampler (pc, ode, ddim, dpm_solver) runs on it too.
"""

import ml_collections

from configs import _families as families, toy


def get_config() -> ml_collections.ConfigDict:
  return families.rectified_flow(toy.get_config())
