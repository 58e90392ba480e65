"""SiT-XL/2 (Ma et al. 2024) on ImageNet 256x256 latents: DiT-XL/2 trained as an interpolant.

  python -m score_jax.convert --from=sit --config=configs/imagenet256_sit_xl2.py SiT-XL-2-256x256.pt runs/sit_xl2
  python main.py --config=runs/sit_xl2/config.json --workdir=runs/sit_xl2 --mode=sample
  python main.py --config=configs/imagenet256_sit_xl2.py --workdir=runs/sit_xl2 --mode=train

SiT keeps DiT's network (models/dit.py, configs/imagenet256_dit_xl2.py: XL, patch 2, 1000
classes, the same 674.83M parameters; its learned-variance channels unused, as SiT's forward
drops them) and changes the process: the linear interpolant between data and noise with
velocity prediction, score_jax's rectified flow x_t = (1 - t) x_0 + t z. SiT runs its time s
the other way (x_s = s x_0 + (1 - s) z, s = 0 noise) and predicts x_0 - z, embedding s in
[0, 1] as it is: model.parameterization = 'sit_velocity' (models/score.py) feeds the network
s = 1 - t and takes score_jax's velocity z - x_0 as its negative, so SiT's released weights
(score_jax.convert --from=sit) sample with every sampler of the rectified flow, and a network
trained here has SiT's conventions. Trained by the flow-matching loss at uniform times (SiT's
t ~ U(0, 1)).

Training as DiT's: AdamW at 1e-4 without weight decay, batch 256, EMA 0.9999, label dropout
0.1. Sampling: the probability-flow ODE with an adaptive solver (SiT's ODE sampler is
dopri5 with atol 1e-6, rtol 1e-3; FID 2.15 there, 2.06 with its SDE sampler, guidance scale
1.5, i.e. sampling.guidance_weight = 0.5; SiT guides the first 3 latent channels only, as DiT,
score_jax all 4). Data as configs/imagenet256_dit_xl2.py: `data.dataset = 'latents'`, the
ImageNet latents written by `python -m score_jax.data.encode` (docs/latent.md).
"""

import ml_collections

from configs import _families as families, imagenet256_dit_xl2


def get_config() -> ml_collections.ConfigDict:
  config = families.rectified_flow(imagenet256_dit_xl2.get_config())

  training = config.training
  training.continuous = True
  training.time_distribution = "uniform"  # SiT's t ~ U(0, 1)
  training.eps = 1e-5

  config.model.parameterization = "sit_velocity"  # SiT's time s = 1 - t and velocity x_0 - z

  sampling = config.sampling
  sampling.method = "ode"
  sampling.rtol = 1e-3
  sampling.atol = 1e-6
  sampling.eps = 1e-3
  sampling.num_steps = 0
  sampling.schedule = ""
  sampling.guidance_weight = 0.5  # SiT's cfg scale 1.5
  return config
