"""Host <-> global array helpers for runs over several devices and processes.

A global batch is split over all devices of the mesh (score_jax.run.sharding);
with several processes each holds a contiguous slice of its rows. Process 0
writes files.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding

from score_jax.errors import ConfigError

__all__ = ["to_host", "sync", "any_process", "global_array", "local_rows", "pad_rows", "padded", "check_batch",
           "is_main"]


def is_main() -> bool:
  return jax.process_index() == 0


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process) sharded array as one numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sync(name: str) -> None:
  """A barrier across processes (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def global_array(sharding: NamedSharding, local: np.ndarray) -> jax.Array:
  """This process's rows -> the global batch array, sharded along the mesh."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def local_rows(a: np.ndarray) -> np.ndarray:
  """This process's contiguous slice of a global batch (all of it with one process)."""
  p, n = jax.process_index(), jax.process_count()
  rows = a.shape[0] // n
  return a[p * rows:(p + 1) * rows]


def pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
  """The first `rows` rows of a, repeating its last row where it has fewer."""
  if a.shape[0] >= rows:
    return a[:rows]
  return np.concatenate([a, np.repeat(a[-1:], rows - a.shape[0], axis=0)])


def padded(n: int) -> int:
  """n rounded up to a multiple of the device count (extra rows are cut afterwards)."""
  d = jax.device_count()
  return math.ceil(n / d) * d


def check_batch(name: str, batch: int) -> int:
  """`batch` if it splits over all devices and processes, else a ConfigError naming `name`."""
  n = jax.device_count()
  if batch < 1 or batch % n or batch % jax.process_count():
    raise ConfigError(f"{name} = {batch} must be a positive multiple of the device count {n} "
                      f"(the batch is split over all devices); e.g. --config.{name}="
                      f"{max(1, math.ceil(batch / n)) * n}.")
  return batch
