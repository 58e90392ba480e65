"""scikit-learn's 8x8 handwritten digits as a small uint8 image dataset.

The 1797 images ship inside scikit-learn (no download). Their pixels are
counts 0..16 (each 8x8 pixel is the number of 'on' pixels in a 4x4 block of a
32x32 bitmap), so there are 17 levels; they are mapped to uint8 with
round(v * 255 / 16), which keeps all 17 levels distinct, sends 0 -> 0 and
16 -> 255, and is invertible (round(u * 16 / 255) gives v back).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["DIGITS_NUM_CLASSES", "TEST_EVERY", "load_digits"]

DIGITS_NUM_CLASSES = 10
# Within each class, in file order, every TEST_EVERY-th example is a test
# example: stratified, and deterministic without any RNG or scikit-learn
# version dependence. (A plain index % 5 rule is not: the file cycles
# through the classes with period 10, so it would favour two classes.)
TEST_EVERY = 5


@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits as _sk_load_digits  # heavy import, only when used

  bunch = _sk_load_digits()
  counts = np.asarray(bunch.images)  # float64 [1797, 8, 8], values 0..16
  images = np.round(counts * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = np.asarray(bunch.target, dtype=np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def _test_mask(labels: np.ndarray) -> np.ndarray:
  """bool [n]: the example is the TEST_EVERY-th, 2 TEST_EVERY-th, ... of its class."""
  rank = np.empty(len(labels), np.int64)  # position of each example within its class
  for c in np.unique(labels):
    where = np.flatnonzero(labels == c)
    rank[where] = np.arange(len(where))
  return rank % TEST_EVERY == TEST_EVERY - 1


def load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [n, 8, 8, 1], labels int32 [n]) of 'train' or 'test'.

  'train' has 1442 images, 'test' 355 (34-36 per class); disjoint, covering all 1797.
  """
  images, labels = _all_digits()
  is_test = _test_mask(labels)
  if split == "train":
    keep = ~is_test
  elif split == "test":
    keep = is_test
  else:
    raise ValueError(f"digits has splits 'train' and 'test', got {split!r}.")
  return images[keep], labels[keep]
