"""EDM2 img512-xs (train_edm2.py preset edm2-img512-xs): 124,713,253 parameters.

  python main.py --config=configs/edm2_img512_xs.py --workdir=runs/edm2_img512_xs --mode=train \\
      --config.data.path=/data/imagenet512_latents

ImageNet 512x512 as the 64x64x4 latents of Stable Diffusion's VAE (data.dataset = 'latents';
data.path: the folder `python -m score_jax.data.encode --config.data.vae_centered=False` writes from
[0, 1] pixels, docs/latent.md), normalized per channel as EDM2 does (data.latent_scale,
data.latent_shift), class-conditional (1000 classes). EDM2's magnitude-preserving U-Net
(models/edm2.py) with 128 channels, dropout 0.0, EDM2's loss at ln sigma ~ N(-0.4, 1.0^2), Adam
(0.9, 0.99) at 0.012 ramped up over 10M images and decayed as 1 / sqrt(step / 70000), batch 2048 for
2048 Mi images (1,048,576 steps), bfloat16 compute, post-hoc EMA profiles 0.05 and 0.10
(configs/_families.py `edm2_imagenet`). Not trained here: ImageNet needs accelerators.
"""

import ml_collections

from configs import _families as families, default


def get_config() -> ml_collections.ConfigDict:
  return families.edm2_imagenet(default.get_config(), "img512-xs")
