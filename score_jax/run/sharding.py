"""How a run lays its arrays over the devices: the mesh, the batch, the train state.

Every run uses one 2-D mesh with the axes ('data', 'fsdp') over all devices of
the process group. The batch is split over both axes (every device holds
batch_size / device_count rows). The train state is

- replicated (training.sharding = 'replicated'): the 'fsdp' axis has length 1
  and every device holds the whole state (plain data parallelism);
- sharded (training.sharding = 'fsdp', ZeRO-3 style): the 'fsdp' axis has
  length training.fsdp_size, and each array of the state (parameters, EMA,
  post-hoc EMA profiles, optimizer moments) is split along its largest axis
  that the fsdp size divides; arrays below `MIN_SHARDED_SIZE` elements, or with
  no such axis, stay replicated. Along 'data' the state is replicated (with
  data = 1, the default, each device holds about 1/device_count of it).

The train step is the same program in both cases: `jax.jit` with these
shardings as in_shardings/out_shardings, and XLA inserts the all-gathers of
the parameters and the reduce-scatters of the gradients (`state_shardings`).
"""

from __future__ import annotations

import collections
import math
from typing import Any, Dict, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["AXES", "MIN_SHARDED_SIZE", "make_mesh", "fsdp_size", "batch_sharding",
           "replicated", "fsdp_spec", "state_shardings", "device_bytes"]

AXES = ("data", "fsdp")
# Arrays smaller than this (4 KiB of float32) stay whole on every device: biases and norm
# scales are a sliver of the bytes, and gathering each costs a collective of its own.
MIN_SHARDED_SIZE = 1024


def make_mesh(fsdp: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """The ('data', 'fsdp') mesh of `devices` (default: all), 'fsdp' of length `fsdp`.

  Raises:
    ValueError: fsdp does not divide the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"The fsdp axis length {fsdp} does not divide the {n} devices.")
  auto = (jax.sharding.AxisType.Auto,) * 2
  # Auto axes: XLA propagates the batch sharding through the step (explicit
  # sharding-in-types would need annotations inside every loss and sampler).
  return jax.make_mesh((n // fsdp, fsdp), AXES, axis_types=auto, devices=devices)


def fsdp_size(mesh: Mesh) -> int:
  """The length of the mesh's 'fsdp' axis (1 on a mesh without one)."""
  return dict(mesh.shape).get("fsdp", 1)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The batch's first axis split over every axis of the mesh (all devices)."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], size: int, min_size: int = MIN_SHARDED_SIZE) -> P:
  """The PartitionSpec of an array of `shape` over an fsdp axis of `size` devices: its
  largest axis that `size` divides (the last of equal ones: the output features of a
  dense kernel, of a convolution), or P() (replicated) for small or indivisible arrays."""
  if size <= 1 or math.prod(shape) < min_size:
    return P()
  fits = [i for i, d in enumerate(shape) if d % size == 0]
  if not fits:
    return P()
  axis = max(fits, key=lambda i: (shape[i], i))
  return P(*(("fsdp" if i == axis else None) for i in range(len(shape))))


def state_shardings(tree: Any, mesh: Mesh, min_size: int = MIN_SHARDED_SIZE) -> Any:
  """A NamedSharding per array of `tree` (arrays or ShapeDtypeStructs): `fsdp_spec` along
  the mesh's 'fsdp' axis; all replicated where that axis has length 1.

  Parameters and their optimizer moments have the same shapes, so each moment is
  split like its parameter and the update runs on the local shards alone.
  """
  size = fsdp_size(mesh)
  return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(a.shape, size, min_size)), tree)


def device_bytes(tree: Any) -> Dict[jax.Device, int]:
  """Bytes each device holds of the arrays of `tree` (the sum of its shards' sizes);
  ShapeDtypeStructs with a sharding count as the arrays they describe."""
  out: Dict[jax.Device, int] = collections.defaultdict(int)
  for leaf in jax.tree.leaves(tree):
    itemsize = leaf.dtype.itemsize
    if isinstance(leaf, jax.Array):
      for shard in leaf.addressable_shards:
        out[shard.device] += shard.data.size * itemsize
      continue
    sharding = leaf.sharding
    for device, index in sharding.devices_indices_map(tuple(leaf.shape)).items():
      sizes = [len(range(*s.indices(d))) for s, d in zip(index, leaf.shape)]
      out[device] += math.prod(sizes) * itemsize
  return dict(out)
