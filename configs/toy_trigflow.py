"""TrigFlow (Lu & Song 2024) on the 2-D toy data: configs/toy.py's data and MLP.

  python main.py --config=configs/toy_trigflow.py --workdir=runs/toy_trigflow --mode=train

x_t = cos(t) x_0 + sin(t) z with z ~ N(0, sigma_d^2 I) on t in [0, pi/2]
(score_jax.sde.TrigFlow); the network sees x_t / sigma_d and sigma_d F predicts the
velocity cos(t) z - sin(t) x_0 (model.parameterization = 'trigflow'), trained with the
sCM paper's diffusion loss |sigma_d F - v|^2 (training.weighting = 'velocity') at
ln(sigma_d tan t) ~ N(p_mean, 1.4^2). sigma_d = 2.86 is the data's standard deviation per
coordinate (as configs/toy_edm.py); the paper's p_mean = -1.0 for images with sigma_d =
0.5 is moved by ln(2.86 / 0.5) = 1.74 so that the noise levels keep their ratio to the
data's scale. Sampled with EDM's Heun sampler (18 steps, 35 NFE + the final denoising);
any other sampler (pc, ode, ddim, dpm_solver) runs on it too.
"""

import ml_collections

from configs import _families as families, toy


def get_config() -> ml_collections.ConfigDict:
  return families.trigflow(toy.get_config(), sigma_data=2.86, p_mean=0.74)
