"""EDM (Karras et al. 2022) on CIFAR-10, NCSN++ backbone: 56.40M parameters.

configs/edm_cifar_vp.py with EDM's NCSN++ (`--arch=ncsnpp --precond=edm`,
the `-ve` networks): Fourier embedding of the noise level (scale 16; its 128
frequencies are fixed, a buffer in EDM and a gradient-free parameter here,
not counted in the 56,397,827), noise embedding twice as wide, residual
encoder (a downsampling convolution pyramid of the input), [1, 3, 3, 1]
resampling filter. The same training, sampler and conversion
(`--from=edm --config=configs/edm_cifar_ve.py edm-cifar10-32x32-uncond-ve.pkl
DST`); 10 classes add 2,816 parameters. EDM's augmentation and its handling
of non-finite gradients as in configs/edm_cifar_vp.py.
"""

import ml_collections

from configs import edm_cifar_vp


def get_config() -> ml_collections.ConfigDict:
  config = edm_cifar_vp.get_config()
  model = config.model
  model.embedding_type = "fourier"
  model.fourier_scale = 16.0
  model.channel_mult_noise = 2
  model.encoder_type = "residual"
  model.resample_filter = (1, 3, 3, 1)
  return config
