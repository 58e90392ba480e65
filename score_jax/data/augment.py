"""EDM's non-leaky augmentation (Karras et al. 2022, after Karras et al. 2020's ADA).

Each training image is transformed at random with probability p (times a
multiplier per transform) and the network is told, through augmentation
labels (9 in EDM's CIFAR-10 setting), what was done; at sampling time the labels are zero, so the network
generates un-augmented images and the transforms do not leak into the samples.
`augment(rng, images, aug)` runs on the device inside the train step, per
example, and is pure and jittable; `Augment` holds the static settings.

The transforms, in EDM's order (NVlabs/edm's `training/augment.py`; images
NHWC, x the width axis, y the height axis):

1. Pixel blitting, exact on the pixel grid:
   - `xflip`, `yflip`: mirror along x / y; applied to half the selected images.
   - `rotate_int`: a quarter turn k in {0, 1, 2, 3}, uniform (square images).
   - `translate_int`: an integer shift (tx, ty), tx = round(u W max), u ~
     U(-1, 1) (max = translate_int_max, 1/8); the output pixel (x, y) reads
     the input at (x - tx, y + ty), reflected at the borders (without
     repeating the edge pixel). EDM's signs: x moves by +tx, y by -ty.
2. Geometric transforms, composed into one map G^-1 from output to input
   coordinates (pixel units, origin at the image center):
   G^-1 = S(1 / s) R(a) [R(-r) S(1 / s', s') R(r)] T(-t), applied right to left
   to an output point, with R(a) the matrix [[cos a, -sin a], [sin a, cos a]]:
   - `scale`: s = 2^(w scale_std), w ~ N(0, 1) (scale_std 0.2);
   - `rotate_frac`: a ~ U(-pi, pi) rotate_frac_max;
   - `aniso`: s' = 2^(w aniso_std), w ~ N(0, 1), along the axes rotated by r ~
     U(-pi, pi) with probability aniso_rotate_prob (1/2), else r = 0;
   - `translate_frac`: t = (w_x W, w_y H) translate_frac_std, w ~ N(0, 1)^2.
   They are executed together as EDM does: the image is reflect-padded (by
   size - 1 on each side, the most EDM pads; EDM pads as far as the mapped
   corners need, which gives the same values wherever they are sampled),
   upsampled 2x with the sym6 wavelet low-pass filter, sampled bilinearly at
   the mapped points (zero outside the padded image), and filtered and
   decimated back with the same filter (tests/test_augment.py checks this
   against a transcription of EDM's steps). Images whose draws leave G the
   identity are returned unchanged (the resampling would return them up to
   float rounding). As in EDM, the grid takes the filter's delay as 5 samples
   where its centroid is 5.10, so the maps act about a point ~0.05 px off the
   center.

Labels, one column per enabled transform's value (EDM's layout; 9 with EDM's
CIFAR-10 setting of xflip, yflip, scale, rotate_frac, aniso, translate_frac):
xflip [flip]; yflip [flip]; rotate_int [k in (1, 2), k in (2, 3)]; translate_int
[tx / (W max), ty / (H max)]; scale [w]; rotate_frac [cos a - 1, sin a]; aniso
[w cos r, w sin r]; translate_frac [w_x, w_y]. Every label is 0 when its
transform is not applied. A transform with multiplier 0 is skipped and has no
columns; each is selected independently with probability min(multiplier p, 1)
(EDM's CIFAR-10 xflip = 1e8 selects every image, so half are flipped).
EDM's aniso labels are also those of (-w, r + pi), the inverse stretch: when
r != 0 they do not say which way the image was stretched.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = ["Augment", "Transforms", "EDM_CIFAR10", "MULTIPLIERS", "SYM6", "augment",
           "sample_transforms", "augment_labels", "geometric_matrix", "blit", "warp"]

# Probability multipliers, in EDM's order of application; `Augment` fields and
# the config keys data.augment_<name>.
MULTIPLIERS = ("xflip", "yflip", "rotate_int", "translate_int", "scale", "rotate_frac", "aniso",
               "translate_frac")
# Label columns of each transform when enabled.
_LABEL_COLUMNS = {"xflip": 1, "yflip": 1, "rotate_int": 2, "translate_int": 2, "scale": 1,
                  "rotate_frac": 2, "aniso": 2, "translate_frac": 2}
_GEOMETRIC = ("scale", "rotate_frac", "aniso", "translate_frac")

# Low-pass decomposition filter of Daubechies' least-asymmetric wavelet with 6
# vanishing moments (sym6): orthonormal under even shifts, sum sqrt(2).
SYM6 = np.array([
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148])
# Pixels of margin the output grid keeps around the image for the decimating filter.
_MARGIN = len(SYM6) // 4


@dataclasses.dataclass(frozen=True)
class Augment:
  """The augmentation's static settings (EDM's AugmentPipe arguments of its geometric part).

  p: overall probability; the multipliers scale it per transform (0 = the
  transform is off and has no label columns). The ranges are EDM's defaults.
  """
  p: float = 0.0
  xflip: float = 0.0
  yflip: float = 0.0
  rotate_int: float = 0.0
  translate_int: float = 0.0
  scale: float = 0.0
  rotate_frac: float = 0.0
  aniso: float = 0.0
  translate_frac: float = 0.0
  translate_int_max: float = 0.125  # of the image size
  scale_std: float = 0.2  # of log2 s
  rotate_frac_max: float = 1.0  # of a half turn each way
  aniso_std: float = 0.2  # of log2 s'
  aniso_rotate_prob: float = 0.5
  translate_frac_std: float = 0.125  # of the image size

  def __post_init__(self):
    # Messages start with the field's name (settings prefix it with 'data.augment_').
    for name in ("p", "aniso_rotate_prob"):
      value = getattr(self, name)
      if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1] (a probability), got {value}.")
    for name in MULTIPLIERS + ("translate_int_max", "scale_std", "rotate_frac_max", "aniso_std",
                               "translate_frac_std"):
      value = getattr(self, name)
      if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}.")

  @property
  def enabled(self) -> bool:
    """Whether any image can be transformed (p > 0 and a multiplier > 0)."""
    return self.p > 0 and any(getattr(self, n) > 0 for n in MULTIPLIERS)

  @property
  def label_dim(self) -> int:
    """Number of label columns: 2 per enabled transform, 1 for each flip (9 for EDM's CIFAR-10)."""
    return sum(_LABEL_COLUMNS[n] for n in MULTIPLIERS if getattr(self, n) > 0)

  def probability(self, name: str) -> float:
    """The probability that transform `name` is selected for an image."""
    return min(getattr(self, name) * self.p, 1.0)


# EDM's CIFAR-10 setting (train.py --augment=0.12): x-flip always selected (so 50%).
EDM_CIFAR10 = Augment(p=0.12, xflip=1e8, yflip=1.0, scale=1.0, rotate_frac=1.0, aniso=1.0,
                      translate_frac=1.0)


class Transforms(NamedTuple):
  """The per-example draws of one batch; zero where a transform is off or not selected."""
  xflip: Array  # [B] int32 0 | 1
  yflip: Array  # [B] int32 0 | 1
  quarter_turns: Array  # [B] int32 0..3
  shift: Array  # [B, 2] int32 (tx, ty) pixels
  scale: Array  # [B] w: s = 2^(w scale_std)
  angle: Array  # [B] a, radians
  aniso: Array  # [B] w: s' = 2^(w aniso_std)
  aniso_angle: Array  # [B] r, radians
  offset: Array  # [B, 2] (w_x, w_y): t = (w_x W, w_y H) translate_frac_std


def sample_transforms(rng: Array, aug: Augment, batch: int, height: int, width: int) -> Transforms:
  """Independent draws for `batch` images of height x width, with EDM's distributions.

  All uniform draws come from one [B, 16] array and the normal ones from one [B, 4]
  array (a fair coin is u < 1/2, a quarter turn floor(4 u)).
  """
  rng_u, rng_n = jax.random.split(rng)
  u = jax.random.uniform(rng_u, (batch, 16))
  n = jax.random.normal(rng_n, (batch, 4))

  def gated(name: str, column: int, draw: Array) -> Array:
    """draw where transform `name` is selected (uniform column `column`), else 0."""
    if getattr(aug, name) <= 0:
      return jnp.zeros_like(draw)
    mask = u[:, column] < aug.probability(name)
    return jnp.where(mask.reshape(mask.shape + (1,) * (draw.ndim - 1)), draw, 0)

  coin = lambda column: (u[:, column] < 0.5).astype(jnp.int32)
  signed = lambda column: 2.0 * u[:, column] - 1.0  # U(-1, 1)
  size = jnp.array([[width, height]], jnp.float32) * aug.translate_int_max
  shift = jnp.round(jnp.stack([signed(7), signed(8)], axis=1) * size).astype(jnp.int32)
  return Transforms(
      xflip=gated("xflip", 0, coin(1)),
      yflip=gated("yflip", 2, coin(3)),
      quarter_turns=gated("rotate_int", 4, jnp.minimum(jnp.floor(4.0 * u[:, 5]), 3.0).astype(
          jnp.int32)),
      shift=gated("translate_int", 6, shift),
      scale=gated("scale", 9, n[:, 0]),
      angle=gated("rotate_frac", 10, signed(11) * (np.pi * aug.rotate_frac_max)),
      aniso=gated("aniso", 12, n[:, 1]),
      aniso_angle=jnp.where(u[:, 14] < aug.aniso_rotate_prob, signed(13) * np.pi, 0.0)
      if aug.aniso > 0 else jnp.zeros((batch,), jnp.float32),
      offset=gated("translate_frac", 15, n[:, 2:4]),
  )


def augment_labels(aug: Augment, tr: Transforms, height: int, width: int) -> Array:
  """The network's conditioning [B, aug.label_dim] (float32), in EDM's column order."""
  cols = {
      "xflip": lambda: [tr.xflip],
      "yflip": lambda: [tr.yflip],
      "rotate_int": lambda: [(tr.quarter_turns == 1) | (tr.quarter_turns == 2),
                             (tr.quarter_turns == 2) | (tr.quarter_turns == 3)],
      "translate_int": lambda: [tr.shift[:, 0] / (width * aug.translate_int_max),
                                tr.shift[:, 1] / (height * aug.translate_int_max)],
      "scale": lambda: [tr.scale],
      "rotate_frac": lambda: [jnp.cos(tr.angle) - 1.0, jnp.sin(tr.angle)],
      "aniso": lambda: [tr.aniso * jnp.cos(tr.aniso_angle), tr.aniso * jnp.sin(tr.aniso_angle)],
      "translate_frac": lambda: [tr.offset[:, 0], tr.offset[:, 1]],
  }
  columns = [c.astype(jnp.float32) for n in MULTIPLIERS if getattr(aug, n) > 0 for c in cols[n]()]
  if not columns:
    return jnp.zeros((tr.xflip.shape[0], 0), jnp.float32)
  return jnp.stack(columns, axis=1)


def _rotation(a: Array) -> Array:
  """[B, 2, 2] rotation matrices [[cos a, -sin a], [sin a, cos a]]."""
  c, s = jnp.cos(a), jnp.sin(a)
  return jnp.stack([jnp.stack([c, -s], -1), jnp.stack([s, c], -1)], -2)


def _diag(sx: Array, sy: Array) -> Array:
  zero = jnp.zeros_like(sx)
  return jnp.stack([jnp.stack([sx, zero], -1), jnp.stack([zero, sy], -1)], -2)


def geometric_matrix(aug: Augment, tr: Transforms, height: int, width: int) -> Array:
  """G^-1 [B, 2, 3]: output point (x, y) -> input point A (x, y) + b, centered pixel units."""
  s = jnp.exp2(-tr.scale * aug.scale_std)
  a = jnp.exp2(-tr.aniso * aug.aniso_std)
  r = tr.aniso_angle
  linear = (_diag(s, s) @ _rotation(tr.angle) @ _rotation(-r) @ _diag(a, 1.0 / a)
            @ _rotation(r))
  t = tr.offset * (jnp.array([[width, height]], jnp.float32) * aug.translate_frac_std)
  return jnp.concatenate([linear, -(linear @ t[:, :, None])], axis=2)


def _reflect(index: Array, size: int) -> Array:
  """Indices reflected into [0, size) without repeating the edge (period 2 size - 2)."""
  return size - 1 - jnp.abs(size - 1 - jnp.mod(index, 2 * size - 2))


def blit(images: Array, tr: Transforms, aug: Augment) -> Array:
  """The exact pixel transforms: flips, quarter turns, integer translation (reflected)."""
  batch, height, width, _ = images.shape
  per_example = lambda mask: mask.astype(bool).reshape(batch, 1, 1, 1)
  if aug.xflip > 0:
    images = jnp.where(per_example(tr.xflip), images[:, :, ::-1], images)
  if aug.yflip > 0:
    images = jnp.where(per_example(tr.yflip), images[:, ::-1], images)
  if aug.rotate_int > 0:
    k = tr.quarter_turns
    images = jnp.where(per_example((k == 1) | (k == 2)), images[:, :, ::-1], images)
    images = jnp.where(per_example((k == 2) | (k == 3)), images[:, ::-1], images)
    images = jnp.where(per_example((k == 1) | (k == 3)), jnp.swapaxes(images, 1, 2), images)
  if aug.translate_int > 0:
    xs = _reflect(jnp.arange(width)[None, :] - tr.shift[:, :1], width)  # [B, W]
    ys = _reflect(jnp.arange(height)[None, :] + tr.shift[:, 1:], height)  # [B, H]
    images = jax.vmap(lambda im, y, x: im[y][:, x])(images, ys, xs)
  return images


@functools.lru_cache(maxsize=None)
def _resampling_matrices(n: int) -> Tuple[np.ndarray, np.ndarray]:
  """The linear maps of `warp` along one axis of n pixels, as matrices (float32).

  up [2 (3 n - 2), n]: reflect padding by n - 1, then 2x upsampling: zeros between the
  samples and the sym6 filter, up[m] = sum_i xpad[i] h[m - 2 i + 5] (sample m at m / 2).
  down [n, 2 (n + 2 M)]: the sym6 filter and 2x decimation, down[k] = sum_j x[2 k + j - 5] h[j]
  (zero outside x), cropped to the image (M = _MARGIN pixels each side).
  """
  taps = len(SYM6)
  pad = np.pad(np.eye(n), ((n - 1, n - 1), (0, 0)), mode="reflect")  # [3n - 2, n]
  m, i = np.arange(2 * len(pad))[:, None], np.arange(len(pad))[None, :]
  k = m - 2 * i + taps // 2 - 1
  up = np.where((k >= 0) & (k < taps), SYM6[np.clip(k, 0, taps - 1)], 0.0) @ pad
  size = n + 2 * _MARGIN
  k, j = np.arange(_MARGIN, _MARGIN + n)[:, None], np.arange(2 * size)[None, :]
  idx = j - 2 * k + taps // 2 - 1
  down = np.where((idx >= 0) & (idx < taps), SYM6[np.clip(idx, 0, taps - 1)], 0.0)
  return up.astype(np.float32), down.astype(np.float32)


def warp(images: Array, g_inv: Array) -> Array:
  """Resamples images [B, H, W, C]: output pixel p reads the input at G^-1 p ([B, 2, 3]).

  Coordinates are in pixels from the image center, (W - 1) / 2 and (H - 1) / 2.
  EDM's execution: reflect padding (H - 1 and W - 1 pixels), 2x sym6 upsampling,
  bilinear sampling on a 2x grid (zero outside the padded image), sym6 decimation.
  """
  batch, height, width, channels = images.shape
  ph, pw = height - 1, width - 1
  (up_y, down_y), (up_x, down_x) = _resampling_matrices(height), _resampling_matrices(width)
  hi = jax.lax.Precision.HIGHEST
  up = jnp.einsum("yi,bijc,xj->byxc", up_y, images.astype(jnp.float32), up_x, precision=hi)
  # The output's 2x grid: the image and _MARGIN pixels around it; sample n at n / 2 pixels.
  gy = jnp.arange(2 * (height + 2 * _MARGIN)) / 2 - (height + 2 * _MARGIN - 1) / 2
  gx = jnp.arange(2 * (width + 2 * _MARGIN)) / 2 - (width + 2 * _MARGIN - 1) / 2
  yy, xx = jnp.meshgrid(gy, gx, indexing="ij")
  points = jnp.stack([xx, yy, jnp.ones_like(xx)], axis=0).reshape(3, -1)  # [3, N]
  mapped = g_inv.astype(jnp.float32) @ points  # [B, 2, N]
  # Input point -> index on the upsampled padded grid.
  u = 2.0 * (mapped[:, 0] + (width - 1) / 2 + pw)
  v = 2.0 * (mapped[:, 1] + (height - 1) / 2 + ph)

  def sample(plane, v, u):  # plane [Hu, Wu]; v, u [N]
    return jax.scipy.ndimage.map_coordinates(plane, [v, u], order=1, mode="constant", cval=0.0)

  per_channel = jax.vmap(sample, in_axes=(2, None, None), out_axes=1)  # -> [N, C]
  sampled = jax.vmap(per_channel)(up, v, u).reshape(batch, gy.shape[0], gx.shape[0], channels)
  down = jnp.einsum("yi,bijc,xj->byxc", down_y, sampled, down_x, precision=hi)
  return down.astype(images.dtype)


def _moved(tr: Transforms) -> Array:
  """[B] bool: the geometric draws make G^-1 other than the identity."""
  return ((tr.scale != 0) | (tr.angle != 0) | (tr.aniso != 0) | jnp.any(tr.offset != 0, axis=1))


def augment(rng: Array, images: Array, aug: Augment) -> Tuple[Array, Array]:
  """EDM's augmentation of images [B, H, W, C] -> (images, labels [B, aug.label_dim]).

  Per example random; with aug.enabled False the images are returned as given
  with zero labels.
  """
  if images.ndim != 4:
    raise ValueError(f"augment takes images [B, H, W, C], got shape {images.shape}.")
  batch, height, width, _ = images.shape
  if aug.rotate_int > 0 and height != width:
    raise ValueError(f"rotate_int (quarter turns) needs square images, got {height}x{width}.")
  if aug.translate_int > 0 and min(height, width) < 2:
    raise ValueError(f"translate_int needs images of at least 2x2, got {height}x{width}.")
  if not aug.enabled:
    return images, jnp.zeros((batch, aug.label_dim), jnp.float32)
  tr = sample_transforms(rng, aug, batch, height, width)
  images = blit(images, tr, aug)
  if any(getattr(aug, n) > 0 for n in _GEOMETRIC):
    warped = warp(images, geometric_matrix(aug, tr, height, width))
    images = jnp.where(_moved(tr)[:, None, None, None], warped, images)
  return images, augment_labels(aug, tr, height, width)
