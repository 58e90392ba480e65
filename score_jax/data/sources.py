"""Random-access example sources: what the batching pipeline reads from.

A source is a finite, indexable dataset split. `read(indices)` returns the
examples at those indices, already decoded and brought to their final shape
(images uint8 [n, H, W, C], toy points float32 [n, 2]) with int32 labels [n].
Reads must be thread-safe: the pipeline prepares several batches at once.
Order, shuffling, sharding, augmentation and scaling are the pipeline's job.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import numpy as np

from score_jax.errors import UserError

__all__ = ["DatasetNotFoundError", "Source", "ArraySource", "RecordSource"]


class DatasetNotFoundError(UserError, FileNotFoundError):
  """A dataset is not on disk. The message says where we looked and how to prepare it."""


class Source(Protocol):
  """A finite random-access split.

  Attributes:
    shape: per-example data shape, (H, W, C) for images or (2,) for toy points.
    num_classes: number of label classes; 0 when the data has no labels (labels read as 0).
    needs_io: True when reading decodes files (the pipeline then reads in threads).
    class_names: label k's name where the data names its classes (class folders), else ().
  """

  shape: tuple[int, ...]
  num_classes: int
  needs_io: bool
  class_names: tuple[str, ...]

  def __len__(self) -> int:
    ...

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """indices int [n] -> (data [n, *shape], labels int32 [n])."""
    ...


class ArraySource:
  """A split held in memory (toy points, digits)."""

  needs_io = False
  class_names: tuple[str, ...] = ()

  def __init__(self, data: np.ndarray, labels: np.ndarray, *, num_classes: int):
    if len(data) != len(labels):
      raise ValueError(f"{len(data)} examples but {len(labels)} labels.")
    self.data = data
    self.labels = np.asarray(labels, np.int32)
    self.shape = tuple(data.shape[1:])
    self.num_classes = num_classes

  def __len__(self) -> int:
    return len(self.data)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.data[indices], self.labels[indices]


class RecordSource:
  """A split of stored records, decoded one by one.

  Args:
    records: anything with len() and integer indexing (a tfds data source, a
      list of TFRecord files wrapped by the caller, ...).
    to_example: record -> (data [*shape], label int); does decoding and resizing.
    shape: the per-example shape `to_example` produces.
    num_classes: 0 if the records have no labels.
    name: used in error messages.
  """

  needs_io = True
  class_names: tuple[str, ...] = ()

  def __init__(self, records: Any, to_example: Callable[[Any], tuple[np.ndarray, int]], *,
               shape: Sequence[int], num_classes: int, name: str):
    self.records = records
    self.to_example = to_example
    self.shape = tuple(shape)
    self.num_classes = num_classes
    self.name = name

  def __len__(self) -> int:
    return len(self.records)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    data = np.empty((len(indices),) + self.shape, np.uint8)
    labels = np.empty((len(indices),), np.int32)
    for k, i in enumerate(indices):
      # One record at a time: tfds's batched __getitems__ is not supported by
      # tfds.testing.mock_data, and the pipeline already overlaps batches.
      x, y = self.to_example(self.records[int(i)])
      if x.shape != self.shape:
        raise ValueError(f"{self.name}: example {int(i)} has shape {x.shape}, expected {self.shape}.")
      data[k], labels[k] = x, y
    return data, labels
