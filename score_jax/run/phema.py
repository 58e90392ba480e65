"""Post-hoc EMA during training (Karras et al. 2024, EDM2): the power-function EMAs of
model.phema_sigma_rels, tracked in the train state, and their snapshots.

The profile of exponent gamma after T updates averages the parameters with
weight (gamma + 1) tau^gamma / T^(gamma + 1) over the training time tau in
[0, T] (the parameters theta_t held over the step (t - 1, t]); its update is
e <- beta_t e + (1 - beta_t) theta_t with beta_t = (1 - 1/t)^(gamma + 1),
which gives theta_t the weight (t^(gamma+1) - (t-1)^(gamma+1)) / T^(gamma+1),
the profile's mass on that step, exactly. The width of a profile is its
standard deviation relative to T, sigma_rel = sqrt((gamma + 1) / ((gamma +
2)^2 (gamma + 3))), from 0 (gamma -> inf) to 1/sqrt(12) (gamma = 0, the
uniform average).

Every training.phema_snapshot_freq steps (and at the last step) the tracked
profiles are written to WORKDIR/phema/phema-<step>.npz; `score_jax.convert.phema`
reconstructs any other EMA from them after training.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import re
from typing import Any, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from score_jax import files
from score_jax.errors import ConfigError, WorkdirError

__all__ = ["SIGMA_REL_MAX", "sigma_rel_to_gamma", "gamma_to_sigma_rel", "gammas", "update",
           "Snapshot", "snapshot_dir", "list_snapshots", "SnapshotWriter", "NoSnapshotsError"]

SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)  # gamma = 0: the uniform average over [0, T]
SNAPSHOT_DIR = "phema"
_SNAPSHOT_NAME = re.compile(r"phema-(\d+)\.npz")


class NoSnapshotsError(WorkdirError):
  """A workdir holds no post-hoc EMA snapshots (of the steps asked for)."""


# ---------------------------------------------------------------------------
# Power-function profiles


def _check_sigma_rel(sigma_rel: float, where: str = "sigma_rel") -> float:
  s = float(sigma_rel)
  if not 0.0 < s <= SIGMA_REL_MAX:
    raise ConfigError(f"{where} must lie in (0, {SIGMA_REL_MAX:.4f}] (1/sqrt(12) is the uniform "
                      f"average of all steps, smaller is a shorter EMA), got {sigma_rel}.")
  return s


def gamma_to_sigma_rel(gamma: float) -> float:
  """The relative standard deviation of the power profile of exponent gamma >= 0."""
  g = float(gamma)
  return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
  """The exponent gamma >= 0 of relative width sigma_rel in (0, 1/sqrt(12)].

  sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1 is the cubic gamma^3 +
  7 gamma^2 + (16 - 1/s^2) gamma + (12 - 1/s^2) = 0; sigma_rel decreases in
  gamma >= 0, so its one root >= 0 is the largest real one.
  """
  s = _check_sigma_rel(sigma_rel)
  inv = 1.0 / (s * s)
  roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
  real = roots[np.abs(roots.imag) <= 1e-9 * np.maximum(1.0, np.abs(roots.real))].real
  return max(0.0, float(real.max()))


def gammas(settings: Any) -> Tuple[float, ...]:
  """The exponents of the profiles model.phema_sigma_rels tracks (empty: post-hoc EMA off)."""
  return tuple(sigma_rel_to_gamma(s) for s in settings.model.phema_sigma_rels)


def update(profiles: Tuple[Any, ...], params: Any, t: jax.Array,
           exponents: Sequence[float]) -> Tuple[Any, ...]:
  """The profiles after update t (1-based), each e <- beta e + (1 - beta) params.

  beta = (1 - 1/t)^(gamma + 1), computed as exp((gamma + 1) log1p(-1/t)) with
  1 - beta = -expm1(...): float32 keeps the small 1 - beta of late steps to
  its own precision (1 - 1/t rounds it away). t = 1 gives beta = 0.
  """
  log_keep = jnp.log1p(-1.0 / jnp.asarray(t, jnp.float32))
  out = []
  for e_tree, g in zip(profiles, exponents):
    scaled = (g + 1.0) * log_keep
    beta, rate = jnp.exp(scaled), -jnp.expm1(scaled)
    out.append(jax.tree.map(lambda e, p: (beta * e + rate * p).astype(e.dtype), e_tree, params))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """One stored snapshot: the profiles tracked at `step` (nimg images seen)."""
  path: str
  step: int
  nimg: int
  sigma_rels: Tuple[float, ...]

  def profile(self, index: int) -> Dict[str, np.ndarray]:
    """Profile `index`'s parameters, flattened ('Dense_0/kernel' -> array)."""
    prefix = f"ema{index}/"
    with np.load(self.path) as z:
      return {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}


def snapshot_dir(workdir: str) -> str:
  return os.path.join(workdir, SNAPSHOT_DIR)


def list_snapshots(workdir: str) -> List[Snapshot]:
  """The complete snapshots in WORKDIR/phema, by step (atomic writes: no partial one is listed)."""
  directory = snapshot_dir(workdir)
  found = []
  if os.path.isdir(directory):
    for name in os.listdir(directory):
      if _SNAPSHOT_NAME.fullmatch(name):
        path = os.path.join(directory, name)
        with np.load(path) as z:
          found.append(Snapshot(path=path, step=int(z["step"]), nimg=int(z["nimg"]),
                                sigma_rels=tuple(float(s) for s in z["sigma_rels"])))
  return sorted(found, key=lambda s: s.step)


def _leaves(tree: Any) -> Dict[str, Any]:
  """A parameter tree flattened: {'Dense_0': {'kernel': a}} -> {'Dense_0/kernel': a}."""
  return files.flatten(tree)


class SnapshotWriter:
  """Writes the tracked profiles of a train state to WORKDIR/phema, beside the training loop.

  `save` makes a device copy of the profiles (the next step donates the
  state's buffers) and returns; a background thread brings the copy to the
  host and writes it atomically. Every process makes the copy (all run the
  same device programs); process 0 writes it, unless the snapshot exists (a
  resumed run repeating steps writes the same values). With `replicated` (the
  mesh's replicated sharding) the copy is gathered whole onto every device, for
  profiles split over the devices (training.sharding = 'fsdp').
  """

  def __init__(self, workdir: str, sigma_rels: Sequence[float], batch_size: int, is_main: bool,
               replicated: Any = None):
    self.directory = snapshot_dir(workdir)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    self._copy = copy if replicated is None else jax.jit(copy, out_shardings=replicated)
    self._sigma_rels = np.asarray(sigma_rels, np.float64)
    self._batch_size = int(batch_size)
    self._is_main = is_main
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._pending: List[concurrent.futures.Future] = []

  def path(self, step: int) -> str:
    return os.path.join(self.directory, f"phema-{step:010d}.npz")

  def save(self, step: int, state: Any) -> None:
    """Starts writing the profiles of `state` (a PhemaTrainState) as snapshot `step`."""
    self._raise_errors()
    copy = self._copy((state.step, state.phema))
    if self._is_main and not os.path.exists(self.path(step)):
      self._pending.append(self._pool.submit(self._write, self.path(step), copy))

  def _write(self, path: str, copy: Tuple[Any, Tuple[Any, ...]]) -> None:
    host = lambda a: np.asarray(a.addressable_data(0))  # replicated: the local copy is whole
    step, profiles = copy
    arrays = {f"ema{i}/{k}": host(v) for i, tree in enumerate(profiles)
              for k, v in _leaves(tree).items()}
    count = int(host(step))  # the updates the state holds, the profiles' T
    files.save_npz(path, step=np.int64(count), nimg=np.int64(count * self._batch_size),
                   sigma_rels=self._sigma_rels, **arrays)

  def _raise_errors(self) -> None:
    done = [f for f in self._pending if f.done()]
    self._pending = [f for f in self._pending if not f.done()]
    for f in done:
      f.result()

  def close(self) -> None:
    """Waits for the snapshots being written; raises a writing error."""
    try:
      for f in self._pending:
        f.result()
    finally:
      self._pending = []
      self._pool.shutdown(wait=True)


# ---------------------------------------------------------------------------
# Reconstruction


