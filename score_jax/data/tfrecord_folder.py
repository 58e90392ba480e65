"""FFHQ / CelebA-HQ as the reference read them: ProGAN/StyleGAN `dataset_tool.py` TFRecords.

Each record is a tf.train.Example with 'shape' (int64 [3]) and 'data' (bytes:
the raw uint8 pixels). dataset_tool writes channels first, [C, H, W], and the
reference transposes to [H, W, C]; a record whose shape is already
channels-last (last dim 1 or 3, first dim larger) is taken as [H, W, C].
dataset_tool writes one file per resolution, `NAME-rXX.tfrecords` with
XX = log2(resolution): given a folder we pick the file for image_size.
"""

from __future__ import annotations

import glob
import math
import os
import re

import numpy as np

from score_jax.errors import ConfigError

from score_jax.data.sources import DatasetNotFoundError, RecordSource
from score_jax.data.tfrecord import TFRecordFile, make_example, parse_example

__all__ = ["decode_image_record", "encode_image_record", "find_tfrecords", "open_tfrecord_images"]


def decode_image_record(record: bytes) -> np.ndarray:
  """A dataset_tool record -> uint8 [H, W, C]."""
  example = parse_example(record)
  shape = [int(s) for s in example["shape"]]
  image = np.frombuffer(example["data"][0], np.uint8).reshape(shape)
  if shape[0] in (1, 3) and shape[-1] not in (1, 3):
    image = image.transpose(1, 2, 0)
  return image


def encode_image_record(image: np.ndarray) -> bytes:
  """uint8 [H, W, C] -> a dataset_tool record (stored [C, H, W], as dataset_tool does)."""
  chw = np.ascontiguousarray(np.asarray(image, np.uint8).transpose(2, 0, 1))
  return make_example({"shape": list(chw.shape), "data": [chw.tobytes()]})


def _how_to(name: str) -> str:
  return (f"Create the {name} TFRecords once with dataset_tool.py of NVIDIA's progressive_growing_of_gans "
          "or stylegan repository (e.g. `python dataset_tool.py create_from_images DEST_DIR IMAGES_DIR`), "
          "then set config.data.data_dir (or config.data.tfrecords_path) to DEST_DIR or to the "
          "`*-rXX.tfrecords` file of your resolution.")


def find_tfrecords(path: str, *, image_size: int, name: str) -> list[str]:
  """The TFRecord file(s) to read: `path` itself if a file, else the folder's file for image_size."""
  if not path:
    raise DatasetNotFoundError(f"Dataset '{name}' needs a TFRecord path, and data_dir/tfrecords_path is empty. "
                               + _how_to(name))
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise DatasetNotFoundError(f"Dataset '{name}': {path} does not exist. " + _how_to(name))
  files = sorted(set(glob.glob(os.path.join(path, "*.tfrecords")) + glob.glob(os.path.join(path, "*.tfrecord*"))))
  by_level = {}
  for f in files:
    m = re.search(r"-r(\d+)\.tfrecords?$", os.path.basename(f))
    if m:
      by_level[int(m.group(1))] = f
  if by_level:
    level = int(round(math.log2(image_size))) if image_size > 0 else -1
    if 2 ** level != image_size or level not in by_level:
      raise DatasetNotFoundError(
          f"Dataset '{name}': {path} has TFRecords for resolutions "
          f"{sorted(2 ** k for k in by_level)}, none for image_size {image_size} "
          f"(expected a file named *-r{max(level, 0):02d}.tfrecords).")
    return [by_level[level]]
  if not files:
    raise DatasetNotFoundError(f"Dataset '{name}': no *.tfrecords files in {path}. " + _how_to(name))
  return files


class _ConcatRecords:
  """Several TFRecord files as one indexable sequence of records."""

  def __init__(self, paths: list[str]):
    self._files = [TFRecordFile(p) for p in paths]
    self._ends = np.cumsum([len(f) for f in self._files])

  def __len__(self) -> int:
    return int(self._ends[-1])

  def __getitem__(self, i: int) -> bytes:
    k = int(np.searchsorted(self._ends, i, side="right"))
    return self._files[k][i - (int(self._ends[k - 1]) if k else 0)]


def open_tfrecord_images(path: str, *, image_size: int, num_channels: int, name: str) -> RecordSource:
  """A RecordSource over dataset_tool TFRecords at `path` (file or folder); labels are 0."""
  records = _ConcatRecords(find_tfrecords(path, image_size=image_size, name=name))
  if len(records) == 0:
    raise DatasetNotFoundError(f"Dataset '{name}': the TFRecords under {path} hold no records.")
  first = decode_image_record(records[0]).shape
  if first != (image_size, image_size, num_channels):
    raise ConfigError(f"Dataset '{name}': records in {path} are {first}, but the config asks for "
                     f"image_size {image_size} and num_channels {num_channels}.")
  return RecordSource(records, lambda r: (decode_image_record(r), 0), shape=first, num_classes=0, name=name)
