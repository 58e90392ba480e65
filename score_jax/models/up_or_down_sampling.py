"""FIR up/down-sampling (upfirdn) in pure JAX, NHWC layout.

The semantics are those of StyleGAN2's `upfirdn_2d` as used by NCSN++:
upsample by inserting zeros, pad, convolve with a normalized FIR kernel
(outer product of a 1-D kernel such as [1, 3, 3, 1]), then keep every
`down`-th sample. Instead of a depthwise convolution (slow on CPU for these
tiny kernels) the filter is applied as a sum of shifted strided slices of
the padded input, separably per axis when the kernel is given in 1-D; XLA
fuses the pad, slices and multiply-adds into one loop.

Shapes: x is [B, H, W, C] throughout.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Kernel = Union[Sequence[float], np.ndarray]

__all__ = [
    "setup_kernel",
    "upfirdn2d",
    "upsample_2d",
    "downsample_2d",
    "naive_upsample_2d",
    "naive_downsample_2d",
    "upsample_conv_2d",
    "conv_downsample_2d",
    "Conv2d",
]


def setup_kernel(k: Kernel) -> np.ndarray:
  """Normalizes a FIR kernel to unit sum; a 1-D kernel stays 1-D (separable).

  A 1-D kernel k stands for the separable 2-D kernel outer(k, k) / sum(k)^2,
  so the 1-D kernel is normalized by sum(k) and applied once per axis.
  """
  k = np.asarray(k, dtype=np.float64)
  if k.ndim not in (1, 2) or k.size == 0:
    raise ValueError(f"FIR kernel must be a non-empty 1-D or 2-D array, got shape {k.shape}.")
  if k.ndim == 2 and k.shape[0] != k.shape[1]:
    raise ValueError(f"2-D FIR kernel must be square, got shape {k.shape}.")
  return k / k.sum()


def _fir_axis(x: Array, k: np.ndarray, axis: int, up: int, down: int, pad0: int,
              pad1: int) -> Array:
  """1-D upfirdn along `axis`: zero-insert by `up`, pad, convolve with k, stride `down`."""
  n = x.shape[axis]
  cfg = [(0, 0, 0)] * x.ndim
  # Interior padding inserts up-1 zeros between samples; upfirdn also appends
  # up-1 zeros after the last sample, hence the extra high padding. lax.pad
  # accepts negative low/high padding, which crops.
  cfg[axis] = (pad0, pad1 + up - 1, up - 1)
  xp = lax.pad(x, jnp.zeros((), x.dtype), cfg)
  length = n * up + pad0 + pad1
  taps = k.shape[0]
  out_len = (length - taps) // down + 1
  if out_len <= 0:
    raise ValueError(f"upfirdn output would be empty (length {length}, kernel {taps}).")
  # True convolution: out[i] = sum_j xp[i * down + j] * k[taps - 1 - j].
  kf = k[::-1]
  out = None
  for j in range(taps):
    if kf[j] == 0:
      continue
    s = lax.slice_in_dim(xp, j, j + (out_len - 1) * down + 1, stride=down, axis=axis)
    term = s * jnp.asarray(kf[j], x.dtype)
    out = term if out is None else out + term
  if out is None:  # all-zero kernel
    shape = list(x.shape)
    shape[axis] = out_len
    out = jnp.zeros(shape, x.dtype)
  return out


def upfirdn2d(x: Array, k: Kernel, *, up: int = 1, down: int = 1,
              pad: Tuple[int, int] = (0, 0)) -> Array:
  """Upsample, FIR-filter and downsample the spatial axes of x [B, H, W, C].

  Args:
    x: [B, H, W, C].
    k: FIR kernel, 1-D (separable) or 2-D, used as given (not normalized).
    up, down: integer factors.
    pad: (pad0, pad1) padding before/after each spatial axis, applied after
      upsampling; negative values crop.
  Returns:
    [B, H', W', C] with H' = (H * up + pad0 + pad1 - kh) // down + 1.
  """
  k = np.asarray(k, dtype=np.float64)
  pad0, pad1 = pad
  if k.ndim == 1:
    x = _fir_axis(x, k, 1, up, down, pad0, pad1)
    return _fir_axis(x, k, 2, up, down, pad0, pad1)
  # Non-separable kernel: sum of kh * kw shifted slices of the padded input.
  b, h, w, c = x.shape
  cfg = [(0, 0, 0), (pad0, pad1 + up - 1, up - 1), (pad0, pad1 + up - 1, up - 1), (0, 0, 0)]
  xp = lax.pad(x, jnp.zeros((), x.dtype), cfg)
  kh, kw = k.shape
  oh = (h * up + pad0 + pad1 - kh) // down + 1
  ow = (w * up + pad0 + pad1 - kw) // down + 1
  kf = k[::-1, ::-1]
  out = jnp.zeros((b, oh, ow, c), x.dtype)
  for i in range(kh):
    for j in range(kw):
      if kf[i, j] == 0:
        continue
      s = lax.slice(xp, (0, i, j, 0), (b, i + (oh - 1) * down + 1, j + (ow - 1) * down + 1, c),
                    (1, down, down, 1))
      out = out + s * jnp.asarray(kf[i, j], x.dtype)
  return out


def _gained(k: Kernel, gain: float, factor: int, ndim_gain_power: bool) -> np.ndarray:
  """Normalized kernel times the gain; upsampling needs factor^2 to keep the mean."""
  k = setup_kernel(k)
  g = gain * (factor**2 if ndim_gain_power else 1)
  # A separable kernel is applied twice (once per axis): split the gain.
  return k * (np.sqrt(g) if k.ndim == 1 else g)


def upsample_2d(x: Array, k: Optional[Kernel] = None, factor: int = 2, gain: float = 1.0) -> Array:
  """FIR upsampling: [B, H, W, C] -> [B, H * factor, W * factor, C].

  k defaults to [1] * factor (nearest-neighbour upsampling). A constant image
  stays constant for any kernel (the kernel is scaled by factor^2, the number
  of inserted zeros per sample).
  """
  k = [1] * factor if k is None else k
  kk = _gained(k, gain, factor, True)
  p = kk.shape[0] - factor
  return upfirdn2d(x, kk, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Array, k: Optional[Kernel] = None, factor: int = 2,
                  gain: float = 1.0) -> Array:
  """FIR downsampling: [B, H, W, C] -> [B, H // factor, W // factor, C].

  k defaults to [1] * factor (box average over factor x factor blocks).
  """
  k = [1] * factor if k is None else k
  kk = _gained(k, gain, factor, False)
  p = kk.shape[0] - factor
  return upfirdn2d(x, kk, down=factor, pad=((p + 1) // 2, p // 2))


def naive_upsample_2d(x: Array, factor: int = 2) -> Array:
  """Nearest-neighbour upsampling [B, H, W, C] -> [B, fH, fW, C]."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: Array, factor: int = 2) -> Array:
  """Average pooling over non-overlapping factor x factor blocks."""
  b, h, w, c = x.shape
  return jnp.mean(x.reshape(b, h // factor, factor, w // factor, factor, c), axis=(2, 4))


def upsample_conv_2d(x: Array, w: Array, k: Optional[Kernel] = None, factor: int = 2,
                     gain: float = 1.0) -> Array:
  """Fused transposed convolution (stride `factor`) and FIR upsampling.

  Args:
    x: [B, H, W, Cin].
    w: conv kernel [kh, kw, Cin, Cout] (kh == kw), used as in the reference:
      the transposed convolution scatters w, i.e. correlates the zero-inserted
      input with w padded by kh - 1 on both sides.
  Returns:
    [B, H * factor, W * factor, Cout].
  """
  kh = w.shape[0]
  k = [1] * factor if k is None else k
  kk = _gained(k, gain, factor, True)
  p = (kk.shape[0] - factor) - (kh - 1)
  y = lax.conv_general_dilated(
      x, w, window_strides=(1, 1), padding=[(kh - 1, kh - 1)] * 2,
      lhs_dilation=(factor, factor), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return upfirdn2d(y, kk, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: Array, w: Array, k: Optional[Kernel] = None, factor: int = 2,
                       gain: float = 1.0) -> Array:
  """FIR downsampling followed by a strided VALID convolution with w [kh, kw, Cin, Cout]."""
  kh = w.shape[0]
  k = [1] * factor if k is None else k
  kk = _gained(k, gain, factor, False)
  p = (kk.shape[0] - factor) + (kh - 1)
  y = upfirdn2d(x, kk, pad=((p + 1) // 2, p // 2))
  return lax.conv_general_dilated(y, w, window_strides=(factor, factor), padding="VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv2d(nn.Module):
  """Convolution with optional fused FIR upsampling or downsampling by 2.

  Parameters: `kernel` [kernel, kernel, Cin, features] and `bias` [features].
  x [B, H, W, Cin] -> [B, H', W', features] with H' = 2H (up), H/2 (down) or H.
  """
  features: int
  kernel: int = 3
  up: bool = False
  down: bool = False
  resample_kernel: Tuple[int, ...] = (1, 3, 3, 1)
  use_bias: bool = True
  kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.up and self.down:
      raise ValueError("Conv2d cannot both upsample and downsample.")
    w = self.param("kernel", self.kernel_init,
                   (self.kernel, self.kernel, x.shape[-1], self.features), jnp.float32)
    x = x.astype(self.dtype)
    w = w.astype(self.dtype)
    if self.up:
      x = upsample_conv_2d(x, w, k=self.resample_kernel)
    elif self.down:
      x = conv_downsample_2d(x, w, k=self.resample_kernel)
    else:
      x = lax.conv_general_dilated(x, w, window_strides=(1, 1), padding="SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      b = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      x = x + b.astype(self.dtype).reshape(1, 1, 1, -1)
    return x
