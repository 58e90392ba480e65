"""Random access to a tfds dataset prepared on disk, without TensorFlow, never downloading.

How a split is read depends on how it was prepared:
- array_record (`tfds build NAME --file_format=array_record`):
  `builder.as_data_source(split)`, tfds's own TF-free random access.
- tfrecord (the `tfds build` / `tfds.load` default): `TfdsTFRecordSplit`,
  which indexes the split's TFRecord shards with the pure-Python reader and
  decodes each `tf.train.Example` with `features.deserialize_example_np`
  (NumPy + Pillow). Same files, same example order as tfds.
Neither path imports TensorFlow. Nothing here calls `download_and_prepare`
(and tfds 4.9's GCS lookups are disabled), so a missing dataset is reported
before any network access, with the command that prepares it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from score_jax.data.sources import DatasetNotFoundError
from score_jax.data.tfrecord import TFRecordFile

__all__ = ["open_tfds", "prepare_command", "TfdsTFRecordSplit"]


def prepare_command(name: str, data_dir: str) -> str:
  """The shell command that prepares `name` where `open_tfds` will look for it."""
  where = f" --data_dir={data_dir}" if data_dir else ""
  return f"tfds build {name}{where} --file_format=array_record"


def _missing_message(name: str, split: str, data_dir: str, looked_in: str) -> str:
  from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top

  root = data_dir or f"the tfds default {constants.get_default_data_dir()} (data.data_dir = '')"
  return (
      f"Dataset '{name}' (split '{split}') is not prepared under data_dir {root}: "
      f"looked for {os.path.join(looked_in, 'dataset_info.json')}. score_jax never downloads "
      "data. Prepare it once, on a machine with internet and TensorFlow "
      "(`pip install tensorflow tensorflow-datasets`; some datasets, e.g. celeb_a and lsun, "
      "download several GB):\n"
      f"  {prepare_command(name, data_dir)}\n"
      "(or `python -m tensorflow_datasets.scripts.download_and_prepare "
      f"--datasets={name}{' --data_dir=' + data_dir if data_dir else ''}`). "
      "Training then reads it without TensorFlow; the default tfrecord format works "
      "too, array_record reads fastest. Or set config.data.data_dir to where it already is."
  )


class TfdsTFRecordSplit:
  """A tfds split prepared as TFRecord shards, read record by record without TF.

  Indexing yields decoded example dicts like `builder.as_data_source` does.
  """

  def __init__(self, builder: Any, split: str):
    self._features = builder.info.features
    self._files: list[TFRecordFile] = []
    starts, counts = [], []
    for instruction in builder.info.splits[split].file_instructions:
      path = os.fspath(instruction.filename)
      if not os.path.isabs(path):
        path = os.path.join(os.fspath(builder.data_path), path)
      if not os.path.exists(path):
        raise DatasetNotFoundError(
            f"Dataset '{builder.name}': shard {path} listed in dataset_info.json is missing; "
            "the prepared copy is incomplete. Prepare it again with: "
            f"{prepare_command(builder.name, '')} --data_dir=...")
      f = TFRecordFile(path)
      take = instruction.take if instruction.take >= 0 else len(f) - instruction.skip
      self._files.append(f)
      starts.append(instruction.skip)
      counts.append(take)
    self._starts = np.asarray(starts, np.int64)
    self._ends = np.cumsum(counts)  # global index where each file's slice ends

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, i: int) -> dict[str, Any]:
    if not 0 <= i < len(self):
      raise IndexError(i)
    k = int(np.searchsorted(self._ends, i, side="right"))
    first = int(self._ends[k - 1]) if k else 0
    record = self._files[k][int(self._starts[k]) + i - first]
    return self._features.deserialize_example_np(record)


def open_tfds(name: str, split: str, *, data_dir: str = "") -> tuple[Any, Any]:
  """Opens a prepared tfds split for random access.

  Args:
    name: tfds name, e.g. 'cifar10', 'lsun/bedroom'.
    split: tfds split name, e.g. 'train', 'validation'.
    data_dir: tfds data_dir; '' for the tfds default (~/tensorflow_datasets or $TFDS_DATA_DIR).

  Returns:
    (records, features): `records[i]` is the decoded example dict {'image': uint8 [H, W, C], ...}.

  Raises:
    DatasetNotFoundError: the dataset is not prepared there (message has the command to prepare it).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(name, data_dir=data_dir or None)
  prepared = builder.is_prepared()
  if prepared and builder.info.file_format == tfds.core.FileFormat.TFRECORD:
    return TfdsTFRecordSplit(builder, split), builder.info.features
  try:
    # Only reads what is on disk (it has no download path); under
    # tfds.testing.mock_data it returns the mock, which is why we ask it first
    # rather than trusting is_prepared() alone.
    return builder.as_data_source(split=split), builder.info.features
  except Exception as e:  # pylint: disable=broad-except
    if not prepared:
      # tfds's own message for this case blames the file format; ours says what to do.
      raise DatasetNotFoundError(_missing_message(name, split, data_dir, os.fspath(builder.data_path))) from e
    raise
