"""Pictures a person looks at: sample grids, scatter plots, figures.

Every file is written to a temporary name and renamed into place, so a
reader (or a crash) never sees a half-written picture or array file.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

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


def scatter_frame(samples: np.ndarray, data: Optional[np.ndarray] = None,
                  reach: float = 3.0) -> Tuple[np.ndarray, np.ndarray]:
  """(lo [2], hi [2]): the axes limits of a scatter plot of 2-D samples [N, 2] beside data.

  The frame holds every finite point of both, with a 5% margin, so that samples
  far from the data (a short or diverged run) are seen rather than cropped. Only
  points further than `reach` times the width of the bulk (the 5th..95th
  percentiles of data and of samples, joined) from the bulk are left out, so
  that a few outliers do not shrink the rest to a dot; `save_scatter` counts the
  samples left outside in the title.
  """
  sets = [np.asarray(p, np.float64).reshape(-1, 2) for p in (samples, data) if p is not None]
  sets = [p[np.all(np.isfinite(p), axis=1)] for p in sets]
  sets = [p for p in sets if len(p)]
  if not sets:
    return np.full(2, -1.0), np.full(2, 1.0)
  bulk_lo = np.min([np.percentile(p, 5.0, axis=0) for p in sets], axis=0)
  bulk_hi = np.max([np.percentile(p, 95.0, axis=0) for p in sets], axis=0)
  width = np.maximum(bulk_hi - bulk_lo, 1e-6)
  points = np.concatenate(sets)
  lo, hi = np.empty(2), np.empty(2)
  for a in range(2):
    v = points[:, a]
    v = v[(v >= bulk_lo[a] - reach * width[a]) & (v <= bulk_hi[a] + reach * width[a])]
    lo[a], hi[a] = v.min(), v.max()  # the bulk itself is inside, so v is not empty
  margin = 0.05 * np.maximum(hi - lo, 1e-6)
  return lo - margin, hi + margin


def save_scatter(path: str, samples: np.ndarray, data: Optional[np.ndarray] = None,
                 title: str = "") -> Tuple[np.ndarray, np.ndarray]:
  """2-D samples [N, 2] beside the data [M, 2], on shared axes that show every sample
  (`scatter_frame`); samples a frame cut for outliers leaves out, and non-finite ones,
  are counted in the samples panel's title.

  Returns:
    The axes limits (lo [2], hi [2]).
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  samples = np.asarray(samples)
  lo, hi = scatter_frame(samples, data)
  inside = np.all((samples >= lo) & (samples <= hi), axis=1)  # False for NaN
  outside = int(len(samples) - inside.sum())
  name = "samples" + (f" ({outside} of {len(samples)} outside the frame)" if outside else "")
  panels = [(name, samples)] + ([("data", data)] if data is not None else [])
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False)
  for ax, (label, pts) in zip(axes[0], panels):
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_title(label)
    ax.set_aspect("equal")
  if title:
    fig.suptitle(title)
  save_figure(path, fig)
  return lo, hi


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
