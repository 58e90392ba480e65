"""Writing files so that no reader (and no crash) ever sees half of one; nested-dict flattening.

Every file score_jax writes into a workdir goes through `atomic_write`: the
bytes go to a temporary name beside the target, which is renamed into place
once complete (a rename within a folder is atomic on POSIX file systems).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Dict, Iterator, Mapping, Optional

import numpy as np

__all__ = ["atomic_path", "atomic_write", "write_json", "read_json", "save_npz", "flatten",
           "unflatten"]


def atomic_path(path: str) -> str:
  """A temporary name beside `path` (same extension, so writers that look at it keep working)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  root, ext = os.path.splitext(path)
  return f"{root}.tmp{os.getpid()}{ext}"


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[Any]:
  """with atomic_write(path) as f: ... writes f to `path` only if the block completes."""
  tmp = atomic_path(path)
  try:
    with open(tmp, mode) as f:
      yield f
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
  with atomic_write(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def read_json(path: str) -> Optional[Any]:
  """The parsed file, or None if it does not exist."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def save_npz(path: str, **arrays: np.ndarray) -> None:
  """np.savez, atomically."""
  with atomic_write(path) as f:
    np.savez(f, **arrays)


def flatten(tree: Any, sep: str = "/", prefix: str = "", sequences: bool = False) -> Dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}; with sequences=True lists and tuples are nodes too ('a/0')."""
  if isinstance(tree, Mapping):
    items = ((str(k), v) for k, v in tree.items())
  elif sequences and isinstance(tree, (list, tuple)):
    items = ((str(i), v) for i, v in enumerate(tree))
  else:
    return {prefix: tree}
  out: Dict[str, Any] = {}
  for k, v in items:
    out.update(flatten(v, sep, f"{prefix}{sep}{k}" if prefix else k, sequences))
  return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> Dict[str, Any]:
  """Inverse of `flatten` (for mappings)."""
  tree: Dict[str, Any] = {}
  for name, v in flat.items():
    node = tree
    *parents, leaf = name.split(sep)
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree
