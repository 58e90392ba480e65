"""The digits in the latent space of a small VAE: the latent pipeline end to end on a CPU.

  python -m score_jax.data.train_vae --config=configs/digits.py --config.data.image_size=16 \\
      --out=runs/digits_vae
  python -m score_jax.data.encode --vae=runs/digits_vae --config=configs/digits.py \\
      --config.data.image_size=16 --splits=train,test --out=runs/digits_latents
  python main.py --config=configs/digits_latent.py --workdir=runs/digits_latent --mode=train
  python main.py --config=configs/digits_latent.py --workdir=runs/digits_latent --mode=sample

The 8x8 digits upsampled to 16x16 (nearest neighbour) are encoded by a two-level
AutoencoderKL into 8x8x4 latents (posterior mean and std, docs/latent.md); the same small
DDPM++ as configs/digits.py learns their scaled draws on the VP SDE, and samples are decoded
back to 16x16 digits through the VAE the latent folder's meta.json names.
"""

import ml_collections

from configs import digits


def get_config() -> ml_collections.ConfigDict:
  config = digits.get_config()
  data = config.data
  data.dataset = "latents"
  data.path = "runs/digits_latents"  # written by python -m score_jax.data.encode
  data.image_size = 8  # the latents' height and width (16 px / 2)
  data.num_channels = 4  # the VAE's latent_channels
  return config
