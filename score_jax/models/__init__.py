"""Score networks and the map from a network to a score function.

- `NCSNpp`: NCSN++ / DDPM++ U-Net family (config names 'ncsnpp', 'ddpmpp').
- `DDPM`: the U-Net of Ho et al. ('ddpm').
- `NCSNv2`: RefineNet of NCSNv2 ('ncsnv2').
- `MLPScore`: MLP for low-dimensional data ('mlp').
- `SongUNet`: EDM's (Karras et al. 2022) DDPM++ / NCSN++ ('song_unet').
- `EDM2UNet`: EDM2's (Karras et al. 2024) magnitude-preserving U-Net and uncertainty head
  ('edm2_unet'; `models/edm2.py`).
- `DiT`: the Diffusion Transformer of Peebles & Xie (2023) ('dit'; SiT's network too).
- `vae.AutoencoderKL`, `vae.VAE`: the Stable Diffusion VAE (not a score network; read one with
  `score_jax.convert.vae.load_vae`).
- `build_model(name, **kwargs)`: explicit arguments -> module (`network_arguments(name)`: the
  arguments the network takes, its family's keys); `get_score_fn(sde, model, variables,
  continuous=...)`
  (`models/score.py`, the one place that parameterizes a score): network -> score_fn(x, t, y=None).

All networks are called as `net.apply(variables, x, labels, y=None,
train=False, rngs={'dropout': key})`.
"""

from score_jax.models.ddpm import DDPM
from score_jax.models.dit import DiT
from score_jax.models.edm2 import EDM2UNet
from score_jax.models.mlp import MLPScore
from score_jax.models.ncsnpp import NCSNpp
from score_jax.models.ncsnv2 import NCSNv2
from score_jax.models.song_unet import SongUNet
from score_jax.models.build import (DTYPES, MODELS, build_model, count_params, init_model,
                                    network_arguments)
from score_jax.models.score import (PARAMETERIZATIONS, consistency_coefficients,
                                    get_consistency_fn, get_edm_denoiser_fn, get_score_fn)

__all__ = [
    "DDPM",
    "DiT",
    "EDM2UNet",
    "MLPScore",
    "NCSNpp",
    "NCSNv2",
    "SongUNet",
    "MODELS",
    "count_params",
    "DTYPES",
    "build_model",
    "network_arguments",
    "get_score_fn",
    "get_consistency_fn",
    "get_edm_denoiser_fn",
    "consistency_coefficients",
    "PARAMETERIZATIONS",
    "init_model",
]
