"""Pictures a person looks at: sample grids, scatter plots, figures.

Every file is written to a temporary name and renamed into place, so a
reader (or a crash) never sees a half-written picture or array file.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from score_jax.files import atomic_write, save_npz


def image_grid(images: np.ndarray, ncols: Optional[int] = None, pad: int = 1) -> np.ndarray:
  """[N, H, W, C] floats in [0, 1] -> one uint8 grid image [rows*(H+pad)+pad, ..., C]."""
  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.float32)
  for k in range(n):
    r, q = divmod(k, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[k]
  return np.round(grid * 255.0).astype(np.uint8)


def save_image_grid(path: str, images: np.ndarray, ncols: Optional[int] = None,
                    min_size: int = 256) -> None:
  """Writes a PNG grid of [N, H, W, C] images in [0, 1], upscaled (nearest) for small images."""
  from PIL import Image

  grid = image_grid(images, ncols)
  scale = max(1, min_size // max(grid.shape[:2]))
  if scale > 1:
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  with atomic_write(path) as f:
    img.save(f, format="PNG")


def save_scatter(path: str, samples: np.ndarray, data: Optional[np.ndarray] = None,
                 title: str = "") -> None:
  """2-D samples beside the data, on shared axes."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [("samples", samples)] + ([("data", data)] if data is not None else [])
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False)
  ref = data if data is not None else samples
  lo, hi = np.percentile(ref, 0.5, axis=0), np.percentile(ref, 99.5, axis=0)
  margin = 0.15 * (hi - lo)
  for ax, (name, pts) in zip(axes[0], panels):
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
    ax.set_xlim(lo[0] - margin[0], hi[0] + margin[0])
    ax.set_ylim(lo[1] - margin[1], hi[1] + margin[1])
    ax.set_title(name)
    ax.set_aspect("equal")
  if title:
    fig.suptitle(title)
  save_figure(path, fig)


def save_figure(path: str, fig, dpi: int = 100) -> None:
  """Writes a matplotlib figure as PNG (tight layout, atomically) and closes it."""
  import matplotlib.pyplot as plt

  fig.tight_layout()
  try:
    with atomic_write(path) as f:
      fig.savefig(f, dpi=dpi, format="png")
  finally:
    plt.close(fig)


save_arrays = save_npz  # np.savez written atomically
