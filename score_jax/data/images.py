"""Crop and resize of uint8 images, the reference's recipes with Pillow instead of TF.

The reference (`tf.image.resize(..., antialias=True)`) resized float images.
We resize the uint8 image with Pillow and keep uint8: Pillow widens its
bilinear / bicubic kernel by the scale factor when shrinking, which is the
same antialiasing idea as TF's `antialias=True` (values differ by rounding,
not by kind), and the result stays an 8-bit image, which uniform
dequantization and bits/dim assume. All images are [H, W, C] uint8.
"""

from __future__ import annotations

import numpy as np

__all__ = ["center_crop", "resize", "resize_small", "crop_resize"]


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The central size x size window; top-left at ((H - size) // 2, (W - size) // 2)."""
  h, w = image.shape[:2]
  if size > min(h, w):
    raise ValueError(f"Cannot center-crop {size}x{size} from a {h}x{w} image.")
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def resize(image: np.ndarray, height: int, width: int, *, method: str = "bilinear") -> np.ndarray:
  """Resizes to height x width with Pillow ('bilinear' | 'bicubic' | 'nearest')."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if image.shape[:2] == (height, width):
    return image
  resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
              "nearest": Image.Resampling.NEAREST}[method]
  channels = image.shape[-1]
  # Pillow has no HxWx1 mode: resize the 2-D gray image and put the axis back.
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize((width, height), resample=resample))
  return out[..., None] if channels == 1 else out


def resize_small(image: np.ndarray, resolution: int, *, method: str = "bilinear") -> np.ndarray:
  """Resizes so that the shorter side is `resolution`, keeping the aspect ratio."""
  h, w = image.shape[:2]
  ratio = resolution / min(h, w)
  # round() is half-to-even like the reference's tf.round.
  return resize(image, int(round(h * ratio)), int(round(w * ratio)), method=method)


def crop_resize(image: np.ndarray, resolution: int) -> np.ndarray:
  """Central square crop of side min(H, W), then bicubic resize (reference LSUN)."""
  h, w = image.shape[:2]
  crop = min(h, w)
  image = image[(h - crop) // 2:(h + crop) // 2, (w - crop) // 2:(w + crop) // 2]
  return resize(image, resolution, resolution, method="bicubic")
