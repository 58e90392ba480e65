"""The data scaler: the affine map between images in [0, 1] and the model's space."""

from __future__ import annotations

import math
from typing import NamedTuple, TypeVar

import numpy as np

__all__ = ["DataScaler", "data_scaler", "to_uint8"]

ArrayT = TypeVar("ArrayT")


class DataScaler(NamedTuple):
  """x01 -> scale x01 + shift (numpy or jax arrays); `inverse` maps back to [0, 1]."""

  scale: float
  shift: float

  def __call__(self, x01: ArrayT) -> ArrayT:
    return self.scale * x01 + self.shift

  def inverse(self, x: ArrayT) -> ArrayT:
    return (x - self.shift) / self.scale

  @property
  def log_abs_det_per_dim(self) -> float:
    """log |d model / d x01| per dimension (the Jacobian is diagonal)."""
    return math.log(abs(self.scale))


def data_scaler(centered: bool) -> DataScaler:
  """[0, 1] data (centered=False) or [-1, 1] data (centered=True)."""
  return DataScaler(2.0, -1.0) if centered else DataScaler(1.0, 0.0)


def to_uint8(x: np.ndarray, centered: bool, quantization: str = "truncate") -> np.ndarray:
  """Model-space images -> uint8 [0, 255].

  'truncate' is the reference's np.clip(x * 255, 0, 255).astype(np.uint8),
  behind the paper's FIDs; 'round' takes the nearest level, as the data were
  quantized (half a level higher on average).
  """
  x = data_scaler(centered).inverse(np.asarray(x, np.float32)) * 255.0
  if quantization == "round":
    x = np.round(x)
  return np.clip(x, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------
# Stages of one checkpoint's evaluation
