"""The Stable Diffusion VAE: diffusers' `AutoencoderKL` as a Flax module.

The autoencoder of latent diffusion (Rombach et al. 2022) in the layout diffusers gives it
(`diffusers.AutoencoderKL` with DownEncoderBlock2D / UpDecoderBlock2D blocks and SiLU), the
latent space of DiT, SiT, REPA and EDM2-512 through the released sd-vae-ft-mse / sd-vae-ft-ema:

  encoder   conv_in (3x3) -> one down block per entry of block_out_channels
              (layers_per_block ResNet blocks; all but the last end in a stride-2 3x3
              convolution after padding one zero row and column at the bottom and right)
            -> mid block (ResNet, single-head self-attention, ResNet)
            -> GroupNorm, SiLU, conv_out (3x3) to 2 * latent_channels -> quant_conv (1x1)
  posterior the channels split into mean and log-variance, the log-variance clipped to
            [-30, 20] (`DiagonalGaussian`)
  decoder   post_quant_conv (1x1) -> conv_in (3x3) -> mid block -> one up block per level,
              widest first (layers_per_block + 1 ResNet blocks; all but the last end in a
              nearest-neighbour 2x upsampling and a 3x3 convolution)
            -> GroupNorm, SiLU, conv_out (3x3)

ResNet blocks are GroupNorm, SiLU, 3x3 conv, GroupNorm, SiLU, 3x3 conv plus the input (through
a 1x1 conv where the width changes); every GroupNorm has norm_num_groups groups and eps 1e-6.
The attention normalizes its input with the same GroupNorm, projects it with dense layers
(to_q, to_k, to_v, to_out) and adds the result to its input; it has one head as wide as the
block. Parameter paths follow diffusers' names (`encoder/down_blocks_0/resnets_1/conv1/kernel`
is diffusers' `encoder.down_blocks.0.resnets.1.conv1.weight`), which is what
`score_jax.convert.vae` relies on.

Images are NHWC in [-1, 1]; latents are NHWC with latent_channels channels at 1 / 2^(levels - 1)
of the resolution (sd-vae-ft-mse: 4 x H/8 x W/8). `VAE.encode(params, x) -> (mean, logvar)` and
`VAE.decode(params, z)` work on the autoencoder's own latents: neither applies the scaling
factor. The code that trains or samples in latent space multiplies by it (latents =
scaling_factor * z, with z drawn from or the mode of the posterior) and divides by it before
`decode`; `score_jax.convert.vae.load_vae` returns the factor from the folder's config
(0.18215 for sd-vae-ft-mse).

`SD_VAE_FT_MSE` holds sd-vae-ft-mse's constructor arguments (83,653,863 parameters).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

__all__ = ["AutoencoderKL", "DiagonalGaussian", "VAE", "SD_VAE_FT_MSE", "LOGVAR_RANGE"]

# Where diffusers clips the posterior's log-variance (DiagonalGaussianDistribution).
LOGVAR_RANGE = (-30.0, 20.0)

# The configuration of stabilityai/sd-vae-ft-mse (and sd-vae-ft-ema, the same network), as
# AutoencoderKL constructor arguments; its scaling factor is 0.18215.
SD_VAE_FT_MSE: Dict[str, Any] = dict(in_channels=3, out_channels=3,
                                     block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                     latent_channels=4, norm_num_groups=32)


def _conv(features: int, kernel: int, name: Optional[str], dtype: Dtype, stride: int = 1,
          padding: Any = None) -> nn.Conv:
  """A convolution padded as torch's Conv2d(padding=kernel // 2) unless `padding` is given."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, name=name)


def _norm(groups: int, name: str, dtype: Dtype) -> nn.GroupNorm:
  # The two-pass variance (torch's): E[x^2] - E[x]^2 loses digits where |mean| >> std.
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, dtype=dtype,
                      name=name)


class ResnetBlock(nn.Module):
  """diffusers' ResnetBlock2D without time embedding: x + conv(silu(norm(conv(silu(norm(x))))))."""
  out_channels: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.silu(_norm(self.groups, "norm1", self.dtype)(x))
    h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
    h = nn.silu(_norm(self.groups, "norm2", self.dtype)(h))
    h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
    return x + h


class Attention(nn.Module):
  """Single-head self-attention over the pixels with a GroupNorm in front and a residual."""
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    y = _norm(self.groups, "group_norm", self.dtype)(x).reshape(b, h * w, 1, c)  # [B, T, 1, C]
    q, k, v = (nn.Dense(c, dtype=self.dtype, name=name)(y) for name in ("to_q", "to_k", "to_v"))
    y = jax.nn.dot_product_attention(q, k, v)  # scale 1 / sqrt(C), diffusers' for one head
    y = nn.Dense(c, dtype=self.dtype, name="to_out")(y)
    return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
  """ResNet block, attention (unless add_attention is False), ResNet block."""
  groups: int
  add_attention: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = Attention(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
  """Stride-2 3x3 convolution after one zero row and column at the bottom and right."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, "conv", self.dtype, stride=2, padding="VALID")(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 convolution."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, "conv", self.dtype)(x)


class Block(nn.Module):
  """num_layers ResNet blocks to `out_channels`, then the resampling layer if any."""
  out_channels: int
  num_layers: int
  groups: int
  resample: str  # 'down', 'up' or 'none'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
    if self.resample == "down":
      x = Downsample(self.dtype, name="downsamplers_0")(x)
    elif self.resample == "up":
      x = Upsample(self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Image [B, H, W, in] -> [B, H / 2^(L-1), W / 2^(L-1), out] (before quant_conv)."""
  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  mid_block_add_attention: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = tuple(self.block_out_channels)
    x = _conv(channels[0], 3, "conv_in", self.dtype)(x)
    for i, c in enumerate(channels):
      resample = "down" if i < len(channels) - 1 else "none"
      x = Block(c, self.layers_per_block, self.groups, resample, self.dtype,
                name=f"down_blocks_{i}")(x)
    x = MidBlock(self.groups, self.mid_block_add_attention, self.dtype, name="mid_block")(x)
    x = nn.silu(_norm(self.groups, "conv_norm_out", self.dtype)(x))
    return _conv(self.out_channels, 3, "conv_out", self.dtype)(x)


class Decoder(nn.Module):
  """Latent [B, h, w, in] (after post_quant_conv) -> image [B, h 2^(L-1), w 2^(L-1), out]."""
  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  mid_block_add_attention: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    channels = tuple(reversed(self.block_out_channels))
    x = _conv(channels[0], 3, "conv_in", self.dtype)(z)
    x = MidBlock(self.groups, self.mid_block_add_attention, self.dtype, name="mid_block")(x)
    for i, c in enumerate(channels):
      resample = "up" if i < len(channels) - 1 else "none"
      x = Block(c, self.layers_per_block + 1, self.groups, resample, self.dtype,
                name=f"up_blocks_{i}")(x)
    x = nn.silu(_norm(self.groups, "conv_norm_out", self.dtype)(x))
    return _conv(self.out_channels, 3, "conv_out", self.dtype)(x)


@flax.struct.dataclass
class DiagonalGaussian:
  """The encoder's posterior q(z | x) = N(mean, exp(logvar)), elementwise.

  Attributes:
    mean: [B, h, w, latent_channels].
    logvar: the same shape, already clipped to LOGVAR_RANGE.
  """
  mean: Array
  logvar: Array

  @property
  def std(self) -> Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> Array:
    return jnp.exp(self.logvar)

  def sample(self, key: Array) -> Array:
    """mean + std * eps with eps ~ N(0, I) drawn from `key`."""
    eps = jax.random.normal(key, self.mean.shape, self.mean.dtype)
    return self.mean + self.std * eps

  def mode(self) -> Array:
    return self.mean


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL (see the module docstring); fields are its config keys.

  `apply(variables, x)` returns decode(mean of encode(x)), used to initialize; the methods
  `encode` and `decode` (through `VAE`, or `apply(..., method='encode')`) are the interface.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: Dtype = jnp.float32

  def setup(self):
    common = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block, groups=self.norm_num_groups,
                  mid_block_add_attention=self.mid_block_add_attention, dtype=self.dtype)
    self.encoder = Encoder(out_channels=2 * self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    if self.use_quant_conv:
      self.quant_conv = _conv(2 * self.latent_channels, 1, None, self.dtype)
    if self.use_post_quant_conv:
      self.post_quant_conv = _conv(self.latent_channels, 1, None, self.dtype)

  def encode(self, x: Array) -> Tuple[Array, Array]:
    """Images [B, H, W, in_channels] in [-1, 1] -> the posterior's (mean, logvar), each
    [B, H / f, W / f, latent_channels] with f = 2^(levels - 1), logvar clipped to LOGVAR_RANGE."""
    h = self.encoder(x)
    if self.use_quant_conv:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: Array) -> Array:
    """Latents [B, h, w, latent_channels] (unscaled) -> images [B, h f, w f, out_channels]."""
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: Array) -> Array:
    mean, _ = self.encode(x)
    return self.decode(mean)


@functools.partial(jax.jit, static_argnums=0)
def _encode(module: AutoencoderKL, params: Any, x: Array) -> Tuple[Array, Array]:
  return module.apply({"params": params}, x, method=AutoencoderKL.encode)


@functools.partial(jax.jit, static_argnums=0)
def _decode(module: AutoencoderKL, params: Any, z: Array) -> Array:
  return module.apply({"params": params}, z, method=AutoencoderKL.decode)


@dataclasses.dataclass(frozen=True)
class VAE:
  """An `AutoencoderKL` with jitted `encode(params, x)` and `decode(params, z)`.

  One compilation per module and input shape (the module is a static argument). Inside a
  jitted function of your own, call `module.apply(..., method=AutoencoderKL.encode)` or these
  methods alike: they trace.
  """
  module: AutoencoderKL

  def encode(self, params: Any, x: Array) -> Tuple[Array, Array]:
    """Images [B, H, W, C] in [-1, 1] -> (mean, logvar) of the posterior (unscaled latents)."""
    return _encode(self.module, params, x)

  def posterior(self, params: Any, x: Array) -> DiagonalGaussian:
    return DiagonalGaussian(*self.encode(params, x))

  def decode(self, params: Any, z: Array) -> Array:
    """Unscaled latents [B, h, w, latent_channels] -> images [B, H, W, C] (about [-1, 1])."""
    return _decode(self.module, params, z)

  def init_shapes(self, image_shape: Sequence[int]) -> Any:
    """The parameters' shapes (ShapeDtypeStructs) for images of `image_shape` [B, H, W, C]:
    `jax.eval_shape` of the initialization, nothing allocated."""
    return jax.tree_util.tree_map(lambda s: s, _init_shapes(self.module, tuple(image_shape)))


@functools.lru_cache(maxsize=16)
def _init_shapes(module: AutoencoderKL, image_shape: Tuple[int, ...]) -> Any:
  x = jax.ShapeDtypeStruct(image_shape, jnp.float32)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]
