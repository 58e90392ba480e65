"""NCSNv2 (Song & Ermon 2020): a RefineNet with InstanceNorm++ and dilations.

The network is not conditioned on the noise level: the reference divides
its output by sigma (`scale_by_sigma`), which `get_score_fn` does here.
Three depths by image size as in the reference: < 96 px (CIFAR-10, CelebA
64), <= 128 px and <= 256 px. For < 96 px the layer widths follow the
reference's JAX code (third RefineBlock with 2 nf channels), whose CIFAR-10
network has 33.97M parameters; its PyTorch twin narrows that block to nf
(29.69M).

Class conditioning (num_classes > 0) makes every normalization layer
class-conditional (conditional InstanceNorm++ as in NCSNv1, with a null
class for classifier-free guidance).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_jax.models import layers

Array = jax.Array
Dtype = Any

__all__ = ["NCSNv2", "InstanceNorm2dPlus"]


def ncsn_conv(x: Array, features: int, *, kernel_size: int = 3, use_bias: bool = True,
              dilation: int = 1, dtype: Dtype = jnp.float32) -> Array:
  """Convolution with PyTorch's default init (variance scaling 1/3, fan_in, uniform), as NCSN."""
  return nn.Conv(features, (kernel_size, kernel_size), padding="SAME", use_bias=use_bias,
                 kernel_dilation=(dilation, dilation),
                 kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                 dtype=dtype)(x)


def _scale_init(key, shape, dtype=jnp.float32):
  """N(1, 0.02^2): scales start near identity."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class InstanceNorm2dPlus(nn.Module):
  """InstanceNorm++ (or plain InstanceNorm), optionally class-conditional.

  InstanceNorm++ normalizes each channel over H, W and adds back the
  channel means normalized across channels, scaled by alpha, so that the
  relative intensity of channels (color) is not lost.
  x [B, H, W, C], y [B] int (only with num_classes > 0) -> [B, H, W, C].
  """
  plus: bool = True
  num_classes: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, y: Optional[Array] = None) -> Array:
    c = x.shape[-1]
    xf = x.astype(jnp.float32)  # statistics in float32 whatever the compute dtype
    means = jnp.mean(xf, axis=(1, 2))  # [B, C]
    var = jnp.var(xf, axis=(1, 2))  # [B, C]
    h = (xf - means[:, None, None, :]) / jnp.sqrt(var[:, None, None, :] + 1e-5)
    n = 3 if self.plus else 2
    if self.num_classes > 0:
      def init(key, shape, dtype=jnp.float32):
        # [gamma, alpha ~ N(1, 0.02) | beta = 0] per class.
        scales = _scale_init(key, (shape[0], (n - 1) * c), dtype)
        return jnp.concatenate([scales, jnp.zeros((shape[0], c), dtype)], axis=-1)

      if y is None:
        y = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
      p = nn.Embed(self.num_classes + 1, n * c, embedding_init=init)(y)  # [B, n C]
      p = p[:, None, None, :]
    else:
      names = ("gamma", "alpha", "beta") if self.plus else ("gamma", "beta")
      inits = (_scale_init, _scale_init, nn.initializers.zeros) if self.plus else (
          _scale_init, nn.initializers.zeros)
      p = jnp.concatenate([self.param(nm, fn, (c,), jnp.float32) for nm, fn in zip(names, inits)])
      p = p[None, None, None, :]
    if self.plus:
      gamma, alpha, beta = p[..., :c], p[..., c:2 * c], p[..., 2 * c:]
      m = jnp.mean(means, axis=-1, keepdims=True)
      v = jnp.var(means, axis=-1, keepdims=True)
      means_plus = (means - m) / jnp.sqrt(v + 1e-5)
      h = h + means_plus[:, None, None, :] * alpha
    else:
      gamma, beta = p[..., :c], p[..., c:]
    return (gamma * h + beta).astype(self.dtype)


class _ConvMeanPool(nn.Module):
  """Convolution then 2x2 mean pooling. x [B, H, W, C] -> [B, H/2, W/2, features]."""
  features: int
  kernel_size: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = ncsn_conv(x, self.features, kernel_size=self.kernel_size, dtype=self.dtype)
    b, hh, ww, c = h.shape
    return jnp.mean(h.reshape(b, hh // 2, 2, ww // 2, 2, c), axis=(2, 4))


class _ResidualBlock(nn.Module):
  """NCSNv2 ResNet block; 'down' halves the size unless dilated (then it keeps it)."""
  output_dim: int
  norm: Callable[..., nn.Module]
  act: Callable[[Array], Array]
  resample: Optional[str] = None
  dilation: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, y: Optional[Array]) -> Array:
    conv = functools.partial(ncsn_conv, dilation=self.dilation, dtype=self.dtype)
    h = self.act(self.norm()(x, y))
    if self.resample == "down":
      h = conv(h, x.shape[-1])
      h = self.act(self.norm()(h, y))
      if self.dilation > 1:
        h = conv(h, self.output_dim)
        shortcut = conv(x, self.output_dim)
      else:
        h = _ConvMeanPool(self.output_dim, dtype=self.dtype)(h)
        shortcut = _ConvMeanPool(self.output_dim, kernel_size=1, dtype=self.dtype)(x)
    else:
      if self.output_dim == x.shape[-1]:
        shortcut = x
      elif self.dilation > 1:
        shortcut = conv(x, self.output_dim)
      else:
        shortcut = ncsn_conv(x, self.output_dim, kernel_size=1, dtype=self.dtype)
      h = conv(h, self.output_dim)
      h = self.act(self.norm()(h, y))
      h = conv(h, self.output_dim)
    return h + shortcut


def _rcu(x: Array, features: int, n_blocks: int, n_stages: int, act, dtype) -> Array:
  """Residual conv units: n_blocks x (n_stages x (act, 3x3 conv without bias)) + skip."""
  for _ in range(n_blocks):
    residual = x
    for _ in range(n_stages):
      x = ncsn_conv(act(x), features, use_bias=False, dtype=dtype)
    x = x + residual
  return x


class _RefineBlock(nn.Module):
  """RefineNet block: adapt each input (RCU), fuse at output_shape (MSF), pool (CRP), RCU."""
  output_shape: Tuple[int, int]
  features: int
  act: Callable[[Array], Array]
  interpolation: str = "bilinear"
  end: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence[Array]) -> Array:
    act, dtype = self.act, self.dtype
    hs = [_rcu(x, x.shape[-1], 2, 2, act, dtype) for x in xs]
    if len(hs) > 1:  # multi-resolution fusion
      method = {"bilinear": "bilinear", "nearest_neighbor": "nearest"}[self.interpolation]
      h = None
      for hi in hs:
        hi = ncsn_conv(hi, self.features, dtype=dtype)
        if hi.shape[1:3] != tuple(self.output_shape):
          hi = jax.image.resize(hi, (hi.shape[0], *self.output_shape, hi.shape[-1]), method)
        h = hi if h is None else h + hi
    else:
      h = hs[0]
    # Chained residual pooling.
    h = act(h)
    path = h
    for _ in range(2):
      path = nn.max_pool(path, (5, 5), strides=(1, 1), padding="SAME")
      path = ncsn_conv(path, self.features, use_bias=False, dtype=dtype)
      h = path + h
    return _rcu(h, self.features, 3 if self.end else 1, 2, act, dtype)


# Per image-size family: residual stages (channel multiplier, dilation) and
# RefineBlock widths from the deepest stage up.
_ARCHS = {
    64: (((1, 1), (2, 1), (2, 2), (2, 4)), (2, 2, 2, 1)),
    128: (((1, 1), (2, 1), (2, 1), (4, 2), (4, 4)), (4, 2, 2, 1, 1)),
    256: (((1, 1), (2, 1), (2, 1), (2, 1), (4, 2), (4, 4)), (4, 2, 2, 2, 1, 1)),
}


class NCSNv2(nn.Module):
  """NCSNv2 RefineNet. Defaults: CIFAR-10 (nf 128, ELU, InstanceNorm++).

  Attributes:
    nf: base channels. nonlinearity: activation name.
    normalization: 'InstanceNorm++' | 'InstanceNorm'.
    interpolation: 'bilinear' | 'nearest_neighbor' for multi-resolution fusion.
    centered: inputs in [-1, 1] (else [0, 1]).
    num_classes: class conditioning through conditional norms (0 = none).
    scale_by_sigma: score = net / sigma (always for NCSN); applied by get_score_fn.
    dtype: compute dtype.
  """
  nf: int = 128
  nonlinearity: str = "elu"
  normalization: str = "InstanceNorm++"
  interpolation: str = "bilinear"
  centered: bool = False
  num_classes: int = 0
  scale_by_sigma: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, labels: Array, y: Optional[Array] = None, *,
               train: bool = False) -> Array:
    """x [B, H, W, C]; labels [B] (unused: the network is noise-unconditional);
    y [B] int or None; train (no dropout here). Returns [B, H, W, C] float32."""
    del labels, train
    layers.check_class_labels(y, self.num_classes)
    if self.normalization not in ("InstanceNorm++", "InstanceNorm"):
      raise ValueError(f"normalization {self.normalization!r} not supported "
                       "(InstanceNorm++ | InstanceNorm).")
    if self.interpolation not in ("bilinear", "nearest_neighbor"):
      raise ValueError(f"interpolation must be bilinear | nearest_neighbor, got {self.interpolation!r}.")
    size = x.shape[1]
    family = 64 if size < 96 else 128 if size <= 128 else 256
    if size > 256:
      raise ValueError(f"NCSNv2 has no architecture for {size}px images (at most 256).")
    stages, refine_mult = _ARCHS[family]
    act = layers.get_act(self.nonlinearity)
    nf, dtype = self.nf, self.dtype
    norm = functools.partial(InstanceNorm2dPlus, plus=self.normalization == "InstanceNorm++",
                             num_classes=self.num_classes, dtype=dtype)
    block = functools.partial(_ResidualBlock, norm=norm, act=act, dtype=dtype)

    h = x.astype(dtype)
    if not self.centered:
      h = 2 * h - 1.0
    h = ncsn_conv(h, nf, dtype=dtype)

    feats = []
    for i, (mult, dilation) in enumerate(stages):
      h = block(mult * nf, resample=None if i == 0 else "down", dilation=dilation)(h, y)
      h = block(mult * nf, dilation=dilation)(h, y)
      feats.append(h)

    ref = None
    for j, (feat, mult) in enumerate(zip(reversed(feats), refine_mult)):
      xs = [feat] if ref is None else [feat, ref]
      ref = _RefineBlock(feat.shape[1:3], mult * nf, act=act, interpolation=self.interpolation,
                         end=j == len(feats) - 1, dtype=dtype)(xs)

    h = act(norm()(ref, y))
    h = ncsn_conv(h, x.shape[-1], dtype=dtype)
    return h.astype(jnp.float32)
