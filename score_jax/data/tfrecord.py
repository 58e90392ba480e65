"""TFRecord files read and written in pure Python, without TensorFlow.

A TFRecord file is a sequence of records, each
  uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)
(little endian). `TFRecordFile` indexes a file once by walking the headers
(seeking over the data, so indexing reads 12 bytes per record), then reads any
record by offset with `os.pread`, which is thread-safe and needs no shared
file position. The length CRC is checked while indexing, which catches a
misaligned or truncated file; the data CRC is not checked on read because a
pure-Python CRC over every image would cost more than decoding it.

`tf.train.Example` protos are parsed with the generated classes that
tensorflow-datasets ships (`tensorflow_datasets.proto`), again without TF.
"""

from __future__ import annotations

import os
import struct
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "TFRecordFile",
    "masked_crc32c",
    "write_tfrecord",
    "parse_example",
    "make_example",
]


def _crc32c_table() -> tuple[int, ...]:
  poly = 0x82F63B78  # Castagnoli, reflected
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ poly if c & 1 else c >> 1
    table.append(c)
  return tuple(table)


_TABLE = _crc32c_table()


def _crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The CRC32-C that TFRecord stores: rotated right by 15 bits plus a constant."""
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_tfrecord(path: str | os.PathLike, records: Iterable[bytes]) -> int:
  """Writes records to a TFRecord file (with both CRCs); returns the count.

  Pure Python, so CRCs cost ~1 s per MB: meant for tests and small conversions.
  """
  count = 0
  with open(path, "wb") as f:
    for data in records:
      header = struct.pack("<Q", len(data))
      f.write(header)
      f.write(struct.pack("<I", masked_crc32c(header)))
      f.write(data)
      f.write(struct.pack("<I", masked_crc32c(data)))
      count += 1
  return count


class TFRecordFile:
  """Random access to the records of one TFRecord file.

  Attributes:
    path: the file.
    offsets: int64 [n] byte offset of each record's data.
    lengths: int64 [n] byte length of each record's data.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self.offsets, self.lengths = self._index()
    self._fd: int | None = os.open(self.path, os.O_RDONLY)

  def _index(self) -> tuple[np.ndarray, np.ndarray]:
    offsets, lengths = [], []
    size = os.path.getsize(self.path)
    with open(self.path, "rb") as f:
      pos = 0
      while pos < size:
        header = f.read(12)
        if len(header) < 12:
          raise ValueError(f"{self.path}: truncated record header at byte {pos}.")
        (length,) = struct.unpack("<Q", header[:8])
        (crc,) = struct.unpack("<I", header[8:])
        if crc != masked_crc32c(header[:8]):
          raise ValueError(f"{self.path}: corrupt record length at byte {pos} (CRC mismatch); "
                           "not a TFRecord file, or a damaged one.")
        offsets.append(pos + 12)
        lengths.append(length)
        pos += 12 + length + 4
        if pos > size:
          raise ValueError(f"{self.path}: truncated record at byte {offsets[-1] - 12}.")
        f.seek(pos)
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)

  def __len__(self) -> int:
    return len(self.offsets)

  def __getitem__(self, i: int) -> bytes:
    if self._fd is None:
      raise ValueError(f"{self.path} is closed.")
    return os.pread(self._fd, int(self.lengths[i]), int(self.offsets[i]))

  def close(self) -> None:
    # getattr: __del__ also runs when __init__ failed before opening the file.
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)
      self._fd = None

  def __del__(self):
    self.close()


def parse_example(record: bytes) -> dict[str, list]:
  """Parses a serialized tf.train.Example into {name: list of values}.

  bytes_list -> list[bytes], int64_list -> list[int], float_list -> list[float].
  """
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top

  example = tf_example_pb2.Example.FromString(record)
  out = {}
  for name, feature in example.features.feature.items():
    kind = feature.WhichOneof("kind")
    out[name] = list(getattr(feature, kind).value) if kind else []
  return out


def make_example(features: Mapping[str, Sequence[int] | Sequence[float] | Sequence[bytes]]) -> bytes:
  """Serializes {name: values} to a tf.train.Example (kind chosen from the values' type)."""
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top

  example = tf_example_pb2.Example()
  for name, values in features.items():
    values = list(values)
    feature = example.features.feature[name]
    if values and isinstance(values[0], bytes):
      feature.bytes_list.value.extend(values)
    elif values and isinstance(values[0], float):
      feature.float_list.value.extend(values)
    else:
      feature.int64_list.value.extend(int(v) for v in values)
  return example.SerializeToString()
