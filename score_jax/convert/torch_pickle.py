"""Read (and write) PyTorch `torch.save` checkpoints with numpy, without torch.

Two on-disk formats exist and both are read:

* zip (torch >= 1.6, the default since): a zip archive with one top folder
  `<root>/` holding `data.pkl` (the pickled object), `data/<key>` (one raw
  storage per key, little-endian unless `<root>/byteorder` says "big") and
  `version`. Tensors are pickled as `torch._utils._rebuild_tensor_v2(storage,
  offset, size, stride, ...)` and storages as persistent ids
  `("storage", <torch.FloatStorage etc.>, key, location, numel)`.
* legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`): a stream of
  pickles: magic number, protocol version 1001, system info, the object (with
  persistent ids `("storage", type, key, location, numel, view_metadata)`), the
  list of storage keys; then for each key an int64 element count followed by
  the raw bytes. The published FID Inception weights date from that era.

Unpickling goes through an allow-list (`find_class`): only OrderedDict, the
tensor/parameter rebuild functions, storage classes and dtypes resolve, and
`argparse.Namespace` (as the inert `Namespace`, its attributes set from the
pickle), so a checkpoint cannot run arbitrary code. Tensors come back as numpy arrays
(bfloat16 through `ml_dtypes`).

`save_state_dict` writes a flat `{name: array}` dict in the zip format that
`torch.load` reads; it exists to make test fixtures without torch.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Dict, Mapping

import ml_dtypes
import numpy as np

from score_jax import files

__all__ = ["Namespace", "load", "load_legacy_bytes", "load_state_dict", "save_state_dict",
           "flatten"]

# Storage class name -> numpy dtype (little-endian).
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "UntypedStorage": np.dtype("u1"),
}
# torch dtype name (as pickled, `torch.<name>`) -> numpy dtype.
_TORCH_DTYPES = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _StorageType:
  """Stand-in for a `torch.<X>Storage` class: only its dtype matters."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _Storage:
  """A flat typed buffer; `data` is filled once its bytes have been read."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype = dtype
    self.numel = numel
    self.data: np.ndarray | None = None


def _as_array(storage: _Storage, offset: int, size, stride) -> np.ndarray:
  if storage.data is None:
    raise ValueError("checkpoint refers to a storage whose data was not found")
  flat = storage.data
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  if not size:
    return np.array(flat[offset], dtype=flat.dtype)
  if any(s == 0 for s in size):
    return np.zeros(size, dtype=flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if offset < 0 or last >= flat.size:
    raise ValueError(f"tensor view (offset {offset}, size {size}, stride {stride}) "
                     f"exceeds its storage of {flat.size} elements")
  view = np.lib.stride_tricks.as_strided(
      flat[offset:], shape=size,
      strides=tuple(s * flat.itemsize for s in stride), writeable=False)
  return np.array(view)  # copy: independent, contiguous, native order


class _Tensor:
  """Deferred tensor: the legacy format reads storages after the object."""

  def __init__(self, storage, offset, size, stride, dtype=None):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
    self.dtype = dtype

  def materialize(self) -> np.ndarray:
    arr = _as_array(self.storage, self.offset, self.size, self.stride)
    if self.dtype is not None and arr.dtype != self.dtype:
      arr = arr.view(self.dtype) if arr.dtype == np.uint8 else arr.astype(self.dtype)
    return arr


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, dtype, metadata=None):
  # v3 pickles an untyped (byte) storage plus the element dtype.
  del requires_grad, backward_hooks, metadata
  return _ByteTensor(storage, storage_offset, size, stride, dtype)


class _ByteTensor(_Tensor):

  def materialize(self) -> np.ndarray:
    raw = self.storage.data
    if raw is None:
      raise ValueError("checkpoint refers to a storage whose data was not found")
    typed = _Storage(self.dtype, raw.size // self.dtype.itemsize)
    typed.data = raw.view(self.dtype)
    return _as_array(typed, self.offset, self.size, self.stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  del requires_grad, backward_hooks
  return data


def _numpy_scalar(dtype: np.dtype, data: bytes = b"") -> Any:
  """A pickled numpy scalar (e.g. the float64 learning rate of an optimizer state)."""
  dtype = np.dtype(dtype)
  if dtype.hasobject or not isinstance(data, bytes) or len(data) != dtype.itemsize:
    raise pickle.UnpicklingError(f"refusing a numpy scalar of dtype {dtype}")
  return np.frombuffer(data, dtype)[0]


def _numpy_dtype(name: Any, align: bool = False, copy: bool = True) -> np.dtype:
  dtype = np.dtype(name, align, copy)
  if dtype.hasobject:
    raise pickle.UnpicklingError(f"refusing a numpy dtype that holds objects ({dtype})")
  return dtype


class Namespace:
  """Stand-in for `argparse.Namespace`, the arguments a training script saves beside its weights
  (facebookresearch/DiT's train.py): a plain holder of the pickled attributes, no methods run."""

  def __repr__(self) -> str:
    return "Namespace(" + ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items())) + ")"


_ALLOWED = {
    ("argparse", "Namespace"): Namespace,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): lambda s, enc="latin1": s.encode(enc),
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, persistent_load_fn):
    super().__init__(file, encoding="latin1")
    self._persistent_load_fn = persistent_load_fn

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == "torch" and name in _TORCH_DTYPES:
      return _TORCH_DTYPES[name]
    raise pickle.UnpicklingError(
        f"checkpoint needs {module}.{name}, which this torch-free reader does "
        "not allow (only tensors, storages and plain containers are read)")

  def persistent_load(self, pid):
    return self._persistent_load_fn(pid)


def _materialize(obj: Any) -> Any:
  if isinstance(obj, _Tensor):
    return obj.materialize()
  if isinstance(obj, collections.OrderedDict):
    out = collections.OrderedDict((k, _materialize(v)) for k, v in obj.items())
    return out
  if isinstance(obj, dict):
    return {k: _materialize(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_materialize(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_materialize(v) for v in obj)
  return obj


def _storage_dtype(storage_type) -> np.dtype:
  if isinstance(storage_type, _StorageType):
    return storage_type.dtype
  if isinstance(storage_type, np.dtype):  # newer pickles may name a dtype
    return storage_type
  raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkls = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pkls) != 1:
      raise ValueError(f"{path}: zip file is not a torch checkpoint "
                       f"(expected one '<root>/data.pkl', found {pkls})")
    root = pkls[0][: -len("data.pkl")]
    big_endian = False
    if root + "byteorder" in names:
      big_endian = zf.read(root + "byteorder").decode().strip() == "big"
    storages: Dict[str, _Storage] = {}

    def persistent_load(pid):
      kind = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
      if kind != "storage":
        raise pickle.UnpicklingError(f"unsupported persistent id {kind!r}")
      storage_type, key, _, numel = pid[1:5]
      key = str(key)
      if key not in storages:
        dtype = _storage_dtype(storage_type)
        raw = zf.read(f"{root}data/{key}")
        dt = dtype.newbyteorder(">" if big_endian else "<") if dtype.itemsize > 1 else dtype
        st = _Storage(dtype, len(raw) // dtype.itemsize)
        st.data = np.frombuffer(raw, dtype=dt).astype(dtype, copy=False)
        storages[key] = st
      return storages[key]

    obj = _Unpickler(io.BytesIO(zf.read(pkls[0])), persistent_load).load()
  return _materialize(obj)


def _load_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    return _load_legacy_stream(f, path)


class _PlainUnpickler(pickle.Unpickler):
  """For the legacy format's header pickles (numbers, a dict, a list of keys): no globals."""

  def find_class(self, module: str, name: str):
    raise pickle.UnpicklingError(f"checkpoint header needs {module}.{name}; a torch header "
                                 "holds only numbers, strings and plain containers")

  def persistent_load(self, pid):
    raise pickle.UnpicklingError("checkpoint header holds a persistent id")


def _plain_load(f: Any) -> Any:
  return _PlainUnpickler(f, encoding="latin1").load()


def _load_legacy_stream(f: Any, path: str) -> Any:
  """The legacy format from an open binary file; `path` names it in errors."""
  try:
    magic = _plain_load(f)
  except Exception as e:  # not a pickle at all
    raise ValueError(f"{path}: not a torch checkpoint (neither zip nor "
                     f"legacy pickle format): {e}") from None
  if magic != _LEGACY_MAGIC:
    raise ValueError(f"{path}: not a torch checkpoint (bad magic number; the "
                     "pre-0.4 tar format is not supported)")
  protocol = _plain_load(f)
  if protocol != _LEGACY_PROTOCOL:
    raise ValueError(f"{path}: unsupported legacy protocol {protocol}")
  sys_info = _plain_load(f)
  if not isinstance(sys_info, dict):
    raise ValueError(f"{path}: not a torch checkpoint (no system info after the magic number)")
  if not sys_info.get("little_endian", True):
    raise ValueError(f"{path}: big-endian legacy checkpoints are not supported")
  storages: Dict[str, _Storage] = {}

  def persistent_load(pid):
    kind = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
    if kind != "storage":
      raise pickle.UnpicklingError(f"unsupported persistent id {kind!r}")
    storage_type, key, _, numel, view_metadata = pid[1:6]
    key = str(key)
    if key not in storages:
      storages[key] = _Storage(_storage_dtype(storage_type), int(numel))
    st = storages[key]
    if view_metadata is not None:  # storage view (torch < 1.0)
      view_key, offset, view_size = view_metadata
      view = _StorageView(st, int(offset), int(view_size))
      return view
    return st

  obj = _Unpickler(f, persistent_load).load()
  keys = _plain_load(f)
  for key in keys:
    st = storages[str(key)]
    (numel,) = struct.unpack("<q", f.read(8))
    nbytes = numel * st.dtype.itemsize
    raw = f.read(nbytes)
    if len(raw) != nbytes:
      raise ValueError(f"{path}: truncated file (storage {key})")
    st.data = np.frombuffer(raw, dtype=st.dtype)
  return _materialize(obj)


class _StorageView(_Storage):

  def __init__(self, base: _Storage, offset: int, size: int):
    super().__init__(base.dtype, size)
    self.base, self.offset = base, offset

  @property
  def data(self):
    if self.base.data is None:
      return None
    return self.base.data[self.offset: self.offset + self.numel]

  @data.setter
  def data(self, value):
    pass


def load(path: str | os.PathLike) -> Any:
  """Loads a `torch.save` file; tensors become numpy arrays.

  Args:
    path: a .pth/.pt file in the zip or the legacy format.
  Returns:
    The pickled object (dicts, OrderedDicts, lists, numbers) with every tensor
    replaced by an `np.ndarray` of the tensor's dtype and shape.
  Raises:
    FileNotFoundError: no such file.
    ValueError / pickle.UnpicklingError: not a torch checkpoint, or it holds
      objects other than tensors and plain containers.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such checkpoint file: {path}")
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  return _load_legacy(path)


def load_legacy_bytes(data: bytes, where: str = "<bytes>") -> Any:
  """A legacy-format `torch.save` stream held in memory, e.g. a storage pickled inline.

  Plain pickles of tensors (as NVlabs/edm writes its networks) store each
  storage as `torch.storage._load_from_bytes(<legacy torch.save of the
  storage>)`; this reads such a blob with the same allow-list (a storage comes
  back with its data). `where` names the source in errors.
  """
  return _load_legacy_stream(io.BytesIO(data), where)


def flatten(tree: Any, prefix: str = "", sep: str = ".") -> Dict[str, np.ndarray]:
  """Flattens nested dicts/lists into `{"a.b.0": array}`; drops non-numeric leaves."""
  out: Dict[str, np.ndarray] = {}
  for name, leaf in files.flatten(tree, sep, prefix, sequences=True).items():
    if isinstance(leaf, np.ndarray):
      out[name] = leaf
    elif isinstance(leaf, (bool, int, float, np.number)):
      out[name] = np.asarray(leaf)
  return out


def load_state_dict(path: str | os.PathLike, key: str | None = None) -> Dict[str, np.ndarray]:
  """Loads a checkpoint as a flat `{dotted.name: np.ndarray}` dict.

  Args:
    path: a `torch.save` file.
    key: if given, the entry of the top-level dict to take (e.g. "model" or
      "ema" of a training checkpoint) before flattening.
  Returns:
    Flat dict in file order; nested dicts/lists are joined with "."; numeric
    scalars become 0-d arrays; other leaves (strings, None) are dropped.
  """
  obj = load(path)
  if key is not None:
    if not isinstance(obj, Mapping) or key not in obj:
      have = list(obj) if isinstance(obj, Mapping) else type(obj).__name__
      raise KeyError(f"{os.fspath(path)}: no top-level entry {key!r} (has {have})")
    obj = obj[key]
  return flatten(obj)


# ---------------------------------------------------------------------------
# Writer (zip format), pickle opcodes emitted by hand so torch is not needed.

_NP_TO_STORAGE = {
    np.dtype("float64"): "DoubleStorage",
    np.dtype("float32"): "FloatStorage",
    np.dtype("float16"): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype("int64"): "LongStorage",
    np.dtype("int32"): "IntStorage",
    np.dtype("int16"): "ShortStorage",
    np.dtype("int8"): "CharStorage",
    np.dtype("uint8"): "ByteStorage",
    np.dtype("bool"): "BoolStorage",
}


class _OpWriter:
  """Emits protocol-2 pickle opcodes for str, int, bool, tuples, tensors."""

  def __init__(self):
    self.buf = io.BytesIO()
    self.buf.write(b"\x80\x02")  # PROTO 2

  def op(self, b: bytes):
    self.buf.write(b)

  def global_(self, module: str, name: str):
    self.op(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

  def str_(self, s: str):
    b = s.encode("utf-8")
    self.op(b"X" + struct.pack("<I", len(b)) + b)  # BINUNICODE

  def int_(self, v: int):
    if 0 <= v < 2**31:
      self.op(b"J" + struct.pack("<i", v))  # BININT
    else:
      b = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
      self.op(b"\x8a" + bytes([len(b)]) + b)  # LONG1

  def bool_(self, v: bool):
    self.op(b"\x88" if v else b"\x89")

  def tuple_(self, items, emit):
    self.op(b"(")  # MARK
    for it in items:
      emit(it)
    self.op(b"t")  # TUPLE

  def empty_ordered_dict(self):
    self.global_("collections", "OrderedDict")
    self.op(b")R")  # EMPTY_TUPLE, REDUCE


def save_state_dict(path: str | os.PathLike, state: Mapping[str, np.ndarray]) -> None:
  """Writes `{name: array}` as a torch zip checkpoint (`torch.load`-able).

  Each array gets its own contiguous storage. Used for fixtures and tests.
  """
  w = _OpWriter()
  w.empty_ordered_dict()
  w.op(b"(")  # MARK for SETITEMS
  blobs = []
  for i, (name, arr) in enumerate(state.items()):
    arr = np.asarray(arr, order="C")  # (ascontiguousarray would make 0-d 1-d)
    if arr.dtype not in _NP_TO_STORAGE:
      raise TypeError(f"{name}: dtype {arr.dtype} has no torch storage type")
    key = str(i)
    blobs.append((key, arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()))
    w.str_(name)
    w.global_("torch._utils", "_rebuild_tensor_v2")
    w.op(b"(")  # args tuple
    # persistent id ('storage', <type>, key, 'cpu', numel)
    w.op(b"(")
    w.str_("storage")
    w.global_("torch", _NP_TO_STORAGE[arr.dtype])
    w.str_(key)
    w.str_("cpu")
    w.int_(arr.size)
    w.op(b"tQ")  # TUPLE, BINPERSID
    w.int_(0)  # storage offset
    w.tuple_(arr.shape, w.int_)
    strides = [s // arr.itemsize for s in arr.strides] if arr.size else [0] * arr.ndim
    if arr.ndim and arr.size == 0:  # contiguous strides for empty tensors
      strides = [int(np.prod(arr.shape[d + 1:])) for d in range(arr.ndim)]
    w.tuple_(strides, w.int_)
    w.bool_(False)  # requires_grad
    w.empty_ordered_dict()  # backward_hooks
    w.op(b"tR")  # TUPLE, REDUCE
  w.op(b"u.")  # SETITEMS, STOP
  root = "archive/"
  with zipfile.ZipFile(os.fspath(path), "w", compression=zipfile.ZIP_STORED) as zf:
    zf.writestr(root + "data.pkl", w.buf.getvalue())
    zf.writestr(root + "byteorder", "little")
    for key, raw in blobs:
      zf.writestr(f"{root}data/{key}", raw)
    zf.writestr(root + "version", "3\n")
