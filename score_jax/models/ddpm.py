"""The DDPM U-Net of Ho et al. (2020), as ported by the 2021 reference.

It is the NCSN++ family's network with DDPM residual blocks and Ho et al.'s
choices: GroupNorm with 32 groups, no skip rescaling, nearest upsampling +
conv and strided-conv downsampling, no FIR and no pyramids, sinusoidal
embedding of the time step, attention at 16 px. The CIFAR-10 configuration
has 35.22M parameters, as the reference's (checked in tests/test_models.py).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import jax.numpy as jnp

from score_jax.models.ncsnpp import NCSNpp

__all__ = ["DDPM"]


class DDPM(NCSNpp):
  """Ho et al.'s U-Net: NCSNpp with DDPM defaults. Defaults: the CIFAR-10 configuration.

  Called like every network: `apply(variables, x, labels, y=None, train=False)`
  with labels the (possibly fractional) DDPM time steps.
  """
  nf: int = 128
  ch_mult: Tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Tuple[int, ...] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  conditional: bool = True
  fir: bool = False
  skip_rescale: bool = False
  resblock_type: str = "ddpm"
  progressive: str = "none"
  progressive_input: str = "none"
  init_scale: float = 0.0
  embedding_type: str = "positional"
  nonlinearity: str = "swish"
  centered: bool = True
  num_classes: int = 0
  scale_by_sigma: bool = False
  num_groups: Optional[int] = 32
  remat: bool = False
  dtype: Any = jnp.float32
