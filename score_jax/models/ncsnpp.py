"""NCSN++ and DDPM++: one configurable U-Net family (Song et al. 2021, Sec. 4.3).

NCSN++ (VE) uses BigGAN-type residual blocks with FIR resampling, Gaussian
Fourier embeddings of log sigma and a progressive-growing input pyramid;
DDPM++ (VP, sub-VP) is the same network with positional embeddings, no FIR
and no pyramid. Architectures follow the 2021 reference module by module,
so the parameter counts match it exactly.

Labels: with `embedding_type='fourier'` the network embeds log(labels)
(VE continuous training passes labels = sigma(t)); with 'positional' it
embeds the labels themselves (999 t for VP, t (N - 1) or an integer noise
index for discrete training). See `score_jax.models.build.get_score_fn`.

The output is NOT divided by sigma here: `scale_by_sigma` is read by
`get_score_fn`, which owns every SDE-dependent output scaling, so the network
needs no noise schedule.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_jax.models import layers

Array = jax.Array

__all__ = ["NCSNpp"]


class NCSNpp(nn.Module):
  """The NCSN++ / DDPM++ U-Net. Defaults: CIFAR-10 NCSN++ cont. (VE, 62.76M params).

  Attributes:
    nf: base channel count.
    ch_mult: channel multiplier per resolution (len = number of resolutions).
    num_res_blocks: residual blocks per resolution.
    attn_resolutions: spatial sizes (of H) with self-attention.
    dropout: dropout rate inside residual blocks.
    resamp_with_conv: resample with a convolution (DDPM-type blocks, pyramids).
    conditional: condition on the noise label (time embedding).
    fir, fir_kernel: FIR resampling and its 1-D kernel.
    skip_rescale: divide residual sums by sqrt(2).
    resblock_type: 'biggan' (resampling blocks) or 'ddpm' (separate resamplers).
    progressive: output pyramid 'none' | 'output_skip' | 'residual'.
    progressive_input: input pyramid 'none' | 'input_skip' | 'residual'.
    progressive_combine: 'sum' | 'cat' (for 'input_skip').
    attention_type: only 'ddpm' (single-head self-attention).
    init_scale: init scale of the last conv of each residual branch (0 -> 1e-10).
    fourier_scale: std of the Gaussian Fourier features.
    embedding_type: 'fourier' (of log labels) | 'positional' (sinusoidal).
    nonlinearity: activation name.
    centered: inputs are in [-1, 1]; otherwise [0, 1] and mapped by 2x - 1.
    num_classes: number of classes for class conditioning; 0 = unconditional.
    scale_by_sigma: the score is net / sigma (VE); applied by get_score_fn.
    num_groups: GroupNorm groups; None means min(C // 4, 32) per layer.
    remat: gradient checkpointing of every residual and attention block
      (activations recomputed in the backward pass: less memory, ~1 more
      forward of compute; same parameters and outputs).
    augment_dim: width of EDM's augmentation labels (score_jax.data.augment), added
      to the noise embedding through a bias-free dense layer 'map_augment' as
      EDM's networks do (zero labels add nothing); 0 = none (the 2021 network).
    second_time: take a second label (`labels2`, MeanFlow's t - r; None: 0), whose
      positional embedding, through a dense layer 'map_noise2', is added to the noise
      embedding.
    dtype: compute dtype (parameters are float32, the output float32).
  """
  nf: int = 128
  ch_mult: Tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 4
  attn_resolutions: Tuple[int, ...] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  conditional: bool = True
  fir: bool = True
  fir_kernel: Tuple[int, ...] = (1, 3, 3, 1)
  skip_rescale: bool = True
  resblock_type: str = "biggan"
  progressive: str = "none"
  progressive_input: str = "residual"
  progressive_combine: str = "sum"
  attention_type: str = "ddpm"
  init_scale: float = 0.0
  fourier_scale: float = 16.0
  embedding_type: str = "fourier"
  nonlinearity: str = "swish"
  centered: bool = False
  num_classes: int = 0
  scale_by_sigma: bool = True
  num_groups: Optional[int] = None
  remat: bool = False
  augment_dim: int = 0
  second_time: bool = False
  dtype: Any = jnp.float32

  def _check(self) -> None:
    if self.progressive not in ("none", "output_skip", "residual"):
      raise ValueError(f"progressive must be none | output_skip | residual, got {self.progressive!r}.")
    if self.progressive_input not in ("none", "input_skip", "residual"):
      raise ValueError("progressive_input must be none | input_skip | residual, "
                       f"got {self.progressive_input!r}.")
    if self.embedding_type not in ("fourier", "positional"):
      raise ValueError(f"embedding_type must be fourier | positional, got {self.embedding_type!r}.")
    if self.resblock_type not in ("ddpm", "biggan"):
      raise ValueError(f"resblock_type must be ddpm | biggan, got {self.resblock_type!r}.")
    if self.progressive_combine not in ("sum", "cat"):
      raise ValueError(f"progressive_combine must be sum | cat, got {self.progressive_combine!r}.")
    if self.attention_type != "ddpm":
      raise ValueError(f"attention_type {self.attention_type!r} not supported (only 'ddpm').")

  def _embed(self, labels: Array, y: Optional[Array], act,
             augment_labels: Optional[Array] = None,
             labels2: Optional[Array] = None) -> Optional[Array]:
    """Noise-level, augmentation and class embedding -> [B, 4 nf] or None."""
    nf = self.nf
    temb = None
    aug = layers.augment_input(augment_labels, self.augment_dim, labels.shape[0])
    if self.augment_dim > 0 and not self.conditional:
      raise ValueError("augment_dim > 0 needs the noise embedding (conditional=True).")
    if labels2 is not None and not self.second_time:
      raise ValueError("labels2 needs a network built with second_time=True.")
    if self.second_time and not self.conditional:
      raise ValueError("second_time needs the noise embedding (conditional=True).")
    if self.conditional:
      if self.embedding_type == "fourier":
        # Fourier features of log(label): for VE, log sigma spans a range
        # of ~9 units that the scale-16 features resolve finely.
        temb = layers.GaussianFourierProjection(embedding_size=nf, scale=self.fourier_scale)(
            jnp.log(labels.astype(jnp.float32)))
      else:
        temb = layers.get_timestep_embedding(labels, nf)
      if self.augment_dim > 0:
        temb = temb + nn.Dense(temb.shape[-1], use_bias=False, kernel_init=layers.default_init(),
                               name="map_augment")(aug)
      if self.second_time:  # None: 0, MeanFlow's r = t
        labels2 = jnp.zeros_like(labels) if labels2 is None else labels2
        temb = temb + nn.Dense(temb.shape[-1], kernel_init=layers.default_init(),
                               name="map_noise2")(layers.get_timestep_embedding(labels2, nf))
      temb = layers.dense(temb, nf * 4, dtype=self.dtype)
      temb = layers.dense(act(temb), nf * 4, dtype=self.dtype)
    if self.num_classes > 0:
      cemb = layers.ClassEmbedding(self.num_classes, nf * 4)(y, labels.shape[0])
      cemb = cemb.astype(self.dtype)
      temb = cemb if temb is None else temb + cemb
    return temb

  @nn.compact
  def __call__(self, x: Array, labels: Array, y: Optional[Array] = None, *,
               train: bool = False, augment_labels: Optional[Array] = None,
               labels2: Optional[Array] = None) -> Array:
    """Score-network output.

    Args:
      x: [B, H, W, C] images (H, W divisible by 2^(len(ch_mult) - 1)).
      labels: [B] noise labels (see module docstring).
      y: optional [B] int class labels (num_classes = null label).
      train: enables dropout (needs rngs={'dropout': key}).
      augment_labels: optional [B, augment_dim] augmentation labels; None = zero.
      labels2: optional [B] second time labels (second_time only); None = zero.
    Returns:
      [B, H, W, C] float32.
    """
    self._check()
    layers.check_class_labels(y, self.num_classes)
    act = layers.get_act(self.nonlinearity)
    nf, dtype = self.nf, self.dtype
    num_resolutions = len(self.ch_mult)
    channels = x.shape[-1]
    temb = self._embed(labels, y, act, augment_labels, labels2)

    groups = self.num_groups
    attn = functools.partial(layers.AttnBlock, init_scale=self.init_scale,
                             skip_rescale=self.skip_rescale, num_groups=groups, dtype=dtype,
                             remat=self.remat)
    upsample = functools.partial(layers.Upsample, with_conv=self.resamp_with_conv, fir=self.fir,
                                 fir_kernel=self.fir_kernel, dtype=dtype)
    downsample = functools.partial(layers.Downsample, with_conv=self.resamp_with_conv,
                                   fir=self.fir, fir_kernel=self.fir_kernel, dtype=dtype)
    # The pyramids resample the 3-channel image (input) / output branch.
    pyramid_upsample = functools.partial(layers.Upsample, fir=self.fir, fir_kernel=self.fir_kernel,
                                         with_conv=self.progressive == "residual", dtype=dtype)
    pyramid_downsample = functools.partial(layers.Downsample, fir=self.fir,
                                           fir_kernel=self.fir_kernel,
                                           with_conv=self.progressive_input == "residual",
                                           dtype=dtype)
    if self.resblock_type == "ddpm":
      resblock = functools.partial(layers.ResnetBlockDDPM, act=act, dropout=self.dropout,
                                   init_scale=self.init_scale, skip_rescale=self.skip_rescale,
                                   num_groups=groups, dtype=dtype, remat=self.remat)
    else:
      resblock = functools.partial(layers.ResnetBlockBigGAN, act=act, dropout=self.dropout,
                                   fir=self.fir, fir_kernel=self.fir_kernel,
                                   init_scale=self.init_scale, skip_rescale=self.skip_rescale,
                                   num_groups=groups, dtype=dtype, remat=self.remat)
    norm_act = lambda h: act(layers.group_norm(h, groups, dtype))

    x = x.astype(dtype)
    if not self.centered:
      x = 2 * x - 1.0  # data in [0, 1] -> [-1, 1]

    # Downsampling path.
    input_pyramid = x if self.progressive_input != "none" else None
    hs = [layers.conv3x3(x, nf, dtype=dtype)]
    for i_level in range(num_resolutions):
      for _ in range(self.num_res_blocks):
        h = resblock(out_ch=nf * self.ch_mult[i_level])(hs[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn()(h)
        hs.append(h)

      if i_level != num_resolutions - 1:
        if self.resblock_type == "ddpm":
          h = downsample()(hs[-1])
        else:
          h = resblock(down=True)(hs[-1], temb, train)

        if self.progressive_input == "input_skip":
          input_pyramid = pyramid_downsample()(input_pyramid)
          h = layers.Combine(method=self.progressive_combine, dtype=dtype)(input_pyramid, h)
        elif self.progressive_input == "residual":
          input_pyramid = pyramid_downsample(out_ch=h.shape[-1])(input_pyramid)
          if self.skip_rescale:
            input_pyramid = (input_pyramid + h) / np.sqrt(2.0)
          else:
            input_pyramid = input_pyramid + h
          h = input_pyramid
        hs.append(h)

    h = hs[-1]
    h = resblock()(h, temb, train)
    h = attn()(h)
    h = resblock()(h, temb, train)

    # Upsampling path.
    pyramid = None
    for i_level in reversed(range(num_resolutions)):
      for _ in range(self.num_res_blocks + 1):
        h = resblock(out_ch=nf * self.ch_mult[i_level])(
            jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
      if h.shape[1] in self.attn_resolutions:
        h = attn()(h)

      if self.progressive != "none":
        if i_level == num_resolutions - 1:
          if self.progressive == "output_skip":
            pyramid = layers.conv3x3(norm_act(h), channels, init_scale=self.init_scale,
                                     dtype=dtype)
          else:  # residual
            pyramid = layers.conv3x3(norm_act(h), h.shape[-1], dtype=dtype)
        elif self.progressive == "output_skip":
          pyramid = pyramid_upsample()(pyramid)
          pyramid = pyramid + layers.conv3x3(norm_act(h), channels, init_scale=self.init_scale,
                                             dtype=dtype)
        else:  # residual
          pyramid = pyramid_upsample(out_ch=h.shape[-1])(pyramid)
          pyramid = (pyramid + h) / np.sqrt(2.0) if self.skip_rescale else pyramid + h
          h = pyramid

      if i_level != 0:
        if self.resblock_type == "ddpm":
          h = upsample()(h)
        else:
          h = resblock(up=True)(h, temb, train)

    assert not hs, "skip connections left over"
    if self.progressive == "output_skip":
      h = pyramid
    else:
      h = layers.conv3x3(norm_act(h), channels, init_scale=self.init_scale, dtype=dtype)
    return h.astype(jnp.float32)
