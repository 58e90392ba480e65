"""Two-dimensional toy distributions, generated in code (nothing to download).

Each sampler takes an explicit `numpy.random.Generator` and returns points
float32 [n, 2] with int32 labels [n] (the mixture component, the moon, the
checkerboard cell; 0 for the swiss roll, which has no natural classes).
The parameters are module-level constants so tests and plots can compare
samples against the exact distribution.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from score_jax.errors import ConfigError

__all__ = [
    "GaussianMixture",
    "GAUSSIAN_MIXTURE",
    "TOY_NAMES",
    "TOY_NUM_CLASSES",
    "sample_toy",
    "sample_gaussian_mixture",
    "sample_checkerboard",
    "sample_swiss_roll",
    "sample_moons",
]


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  """An isotropic Gaussian mixture in 2-D.

  Attributes:
    means: [K, 2] component means.
    stds: [K] per-component standard deviation (isotropic).
    weights: [K] mixture weights, summing to 1.
  """

  means: np.ndarray
  stds: np.ndarray
  weights: np.ndarray


def _circle_mixture() -> GaussianMixture:
  # 8 modes on a circle of radius 4, well separated (neighbour distance 3.06 =
  # 7.6 std). Weights alternate 2:1 on purpose: a model that only learns the
  # support gets uniform weights, so the mode-weight test can tell the two apart.
  k = 8
  angles = 2 * math.pi * np.arange(k) / k
  means = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
  weights = np.where(np.arange(k) % 2 == 0, 2.0, 1.0)
  return GaussianMixture(
      means=means.astype(np.float64),
      stds=np.full((k,), 0.4),
      weights=weights / weights.sum(),
  )


GAUSSIAN_MIXTURE: GaussianMixture = _circle_mixture()


def sample_gaussian_mixture(
    n: int, rng: np.random.Generator, *, mixture: GaussianMixture = GAUSSIAN_MIXTURE
) -> tuple[np.ndarray, np.ndarray]:
  """Samples the mixture; the label is the component index."""
  labels = rng.choice(len(mixture.weights), size=n, p=mixture.weights)
  noise = rng.standard_normal((n, 2))
  x = mixture.means[labels] + mixture.stds[labels, None] * noise
  return x.astype(np.float32), labels.astype(np.int32)


def sample_checkerboard(
    n: int, rng: np.random.Generator, *, cell: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
  """Uniform on the 8 'black' cells of a 4x4 board covering [-2 cell, 2 cell]^2.

  A cell (i, j) = (floor(x / cell), floor(y / cell)), i, j in {-2, ..., 1}, is
  black when i + j is even. The label is the black-cell index 0..7.
  """
  col = rng.integers(0, 4, size=n)  # i + 2
  # Two black rows per column: rows with the parity of the column.
  row = 2 * rng.integers(0, 2, size=n) + (col % 2)  # j + 2, same parity as i + 2
  u = rng.random((n, 2))
  x = cell * (np.stack([col, row], axis=-1) - 2 + u)
  labels = 2 * col + row // 2
  return x.astype(np.float32), labels.astype(np.int32)


def sample_swiss_roll(
    n: int, rng: np.random.Generator, *, noise: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
  """The 2-D swiss roll of FFJORD: t (cos t, sin t) / 5, t ~ U(1.5 pi, 4.5 pi).

  `noise` is the std of the added Gaussian in output units (FFJORD's noise=1.0
  before the division by 5). Noise-free points have radius t / 5 in
  [0.3 pi, 0.9 pi] and polar angle t (mod 2 pi). Labels are all 0.
  """
  t = 1.5 * math.pi * (1.0 + 2.0 * rng.random(n))
  x = np.stack([t * np.cos(t), t * np.sin(t)], axis=-1) / 5.0
  x = x + noise * rng.standard_normal((n, 2))
  return x.astype(np.float32), np.zeros((n,), np.int32)


def sample_moons(
    n: int, rng: np.random.Generator, *, noise: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
  """Two interleaved half circles (scikit-learn's make_moons), centred, scaled by 2.

  Noise-free: moon 0 is 2 ((cos a, sin a) - (0.5, 0.25)), moon 1 is
  2 ((1 - cos a, 0.5 - sin a) - (0.5, 0.25)), a ~ U(0, pi); each moon has
  weight 1/2 and the label is the moon. `noise` is the Gaussian std in output
  units. Noise-free points lie in [-3, 3] x [-1.5, 1.5].
  """
  labels = rng.integers(0, 2, size=n)
  a = math.pi * rng.random(n)
  outer = np.stack([np.cos(a), np.sin(a)], axis=-1)
  inner = np.stack([1.0 - np.cos(a), 0.5 - np.sin(a)], axis=-1)
  x = np.where(labels[:, None] == 0, outer, inner)
  x = 2.0 * (x - np.array([0.5, 0.25]))
  x = x + noise * rng.standard_normal((n, 2))
  return x.astype(np.float32), labels.astype(np.int32)


_SAMPLERS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "gaussian_mixture": sample_gaussian_mixture,
    "checkerboard": sample_checkerboard,
    "swiss_roll": sample_swiss_roll,
    "moons": sample_moons,
}
TOY_NAMES: tuple[str, ...] = tuple(_SAMPLERS)
TOY_NUM_CLASSES: dict[str, int] = {
    "gaussian_mixture": len(GAUSSIAN_MIXTURE.weights),
    "checkerboard": 8,
    "swiss_roll": 1,
    "moons": 2,
}


def sample_toy(name: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Samples `n` points of the toy distribution `name` (one of TOY_NAMES).

  Returns:
    (x float32 [n, 2], labels int32 [n]).
  """
  if name not in _SAMPLERS:
    raise ConfigError(f"Unknown toy dataset {name!r}; choose one of {', '.join(TOY_NAMES)}.")
  return _SAMPLERS[name](n, rng)
