"""Read NVlabs/edm and NVlabs/edm2 network pickles with numpy, without torch, running nothing
they contain.

EDM (Karras et al. 2022) releases its networks, and its training loop writes
its snapshots, as plain Python pickles (protocol 4) of *persistent classes*
(its `torch_utils.persistence`): each network module is pickled as a call of
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with
meta = {type: 'class', version, module_src: the source code of the module
that defines the class, class_name, state: the object's attribute dict}.
Loading such a file with `pickle` executes module_src; this reader never
does. It rebuilds an allow-list only:

- persistent objects -> `PersistentObject` records (class name, version,
  module_src kept as inert text, state);
- `torch.nn.ModuleDict` / `ModuleList` / `Sequential` -> `TorchModule`
  records (their state);
- tensors and parameters (`torch._utils._rebuild_tensor_v2`,
  `_rebuild_parameter`) over storages stored inline
  (`torch.storage._load_from_bytes` of a legacy-format `torch.save` stream,
  read by `score_jax.convert.torch_pickle.load_legacy_bytes`) -> numpy arrays;
- OrderedDicts, sets, numpy scalars, dtypes and arrays of plain dtypes (EDM2's
  `StabilityVAEEncoder` keeps its per-channel scale and bias as arrays),
  `dnnlib.util.EasyDict` (a plain dict);

and refuses every other global with an `EDMPickleError` that names it.
`state_dict(module)` lists a module's tensors as torch's `state_dict()`
names and orders them (parameters, then persistent buffers, then the
submodules' in order; None entries skipped).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
from typing import Any, Dict, Mapping, Optional

import numpy as np

from score_jax.convert import torch_pickle
from score_jax.errors import UserError

__all__ = ["EDMPickleError", "PersistentObject", "TorchModule", "load", "loads", "state_dict"]


class EDMPickleError(UserError, ValueError):
  """The file is not an EDM network pickle this reader accepts."""


class PersistentObject:
  """An object of one of EDM's persistent classes, as data (nothing of it runs).

  Attributes:
    class_name: e.g. 'EDMPrecond', 'SongUNet', 'UNetBlock', 'EDMLoss'.
    version: torch_utils.persistence's format version (6 in EDM).
    module_src: the source code of the defining module, as stored (inert text).
    state: the object's attributes (for torch modules: `_parameters`,
      `_buffers`, `_modules`, `_init_kwargs`, ...).
  """

  def __init__(self, class_name: str, version: int, module_src: str, state: Dict[str, Any]):
    self.class_name = class_name
    self.version = version
    self.module_src = module_src
    self.state = state

  def __setstate__(self, state: Any) -> None:
    raise pickle.UnpicklingError(f"persistent {self.class_name} with state outside its record")

  @property
  def init_kwargs(self) -> Optional[Dict[str, Any]]:
    """The constructor's keyword arguments as recorded (`_init_kwargs`), or None."""
    kw = self.state.get("_init_kwargs")
    return dict(kw) if isinstance(kw, Mapping) else None

  @property
  def modules(self) -> Mapping[str, Any]:
    return self.state.get("_modules") or {}

  def __repr__(self) -> str:
    return f"PersistentObject({self.class_name!r}, version={self.version})"


class TorchModule:
  """A plain torch container module (ModuleDict, ModuleList, Sequential), as data."""

  torch_class = "torch.nn.Module"

  def __new__(cls, *args: Any):
    if args:
      raise pickle.UnpicklingError(f"{cls.torch_class} pickled with arguments {args!r}")
    self = super().__new__(cls)
    self.state = {}
    return self

  def __setstate__(self, state: Any) -> None:
    if not isinstance(state, dict):
      raise pickle.UnpicklingError(f"{self.torch_class}: state is a {type(state).__name__}")
    self.state = state

  @property
  def modules(self) -> Mapping[str, Any]:
    return self.state.get("_modules") or {}

  def __repr__(self) -> str:
    return f"TorchModule({self.torch_class!r})"


def _container(name: str) -> type:
  return type(name, (TorchModule,), {"torch_class": f"torch.nn.{name}"})


_CONTAINERS = {name: _container(name) for name in ("ModuleDict", "ModuleList", "Sequential")}


class _EasyDict(dict):
  """dnnlib.util.EasyDict as a plain dict (its attribute access is not needed)."""

  def __setstate__(self, state: Any) -> None:
    if state:
      raise pickle.UnpicklingError("dnnlib.util.EasyDict with instance state")


_META_KEYS = {"type", "version", "module_src", "class_name", "state"}


def _reconstruct_persistent_obj(meta: Any) -> PersistentObject:
  if not isinstance(meta, dict) or set(meta) != _META_KEYS:
    keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
    raise pickle.UnpicklingError(f"a persistent object whose record is not {{type, version, "
                                 f"module_src, class_name, state}} ({keys})")
  if meta["type"] != "class":
    raise pickle.UnpicklingError(f"a persistent object of type {meta['type']!r} (only 'class')")
  name, src, state = meta["class_name"], meta["module_src"], meta["state"]
  if not (isinstance(name, str) and name.isidentifier()) or not isinstance(src, str):
    raise pickle.UnpicklingError(f"a persistent object with class name {name!r}")
  if state is None:
    state = {}
  if not isinstance(state, dict):
    raise pickle.UnpicklingError(f"persistent {name}: state is a {type(state).__name__}")
  version = meta["version"]
  if isinstance(version, bool) or not isinstance(version, int):
    raise pickle.UnpicklingError(f"persistent {name}: version {version!r}")
  return PersistentObject(name, version, src, state)


def _load_from_bytes(data: Any) -> Any:
  if not isinstance(data, (bytes, bytearray)):
    raise pickle.UnpicklingError(f"an inline storage that is not bytes ({type(data).__name__})")
  storage = torch_pickle.load_legacy_bytes(bytes(data), "an inline storage")
  if not isinstance(storage, torch_pickle._Storage):  # pylint: disable=protected-access
    raise pickle.UnpicklingError(f"an inline storage blob holding a {type(storage).__name__}")
  return storage


def _tensor(*args: Any) -> np.ndarray:
  return torch_pickle._rebuild_tensor(*args).materialize()  # pylint: disable=protected-access


def _numpy_reconstruct(cls: Any, shape: Any, typecode: Any) -> np.ndarray:
  """numpy's `_reconstruct`: an empty array that the pickle's BUILD then fills (numpy's own
  `__setstate__`, over a dtype `_numpy_dtype` let through: never one holding objects)."""
  if cls is not np.ndarray:
    raise pickle.UnpicklingError(f"a numpy array of class {cls!r}")
  if not isinstance(typecode, bytes) or not isinstance(shape, tuple):
    raise pickle.UnpicklingError("a numpy array with a malformed header")
  return np.ndarray.__new__(np.ndarray, shape, np.dtype(typecode))


def _parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None, *unused) -> Any:
  if not isinstance(data, np.ndarray):
    raise pickle.UnpicklingError(f"a parameter over a {type(data).__name__}")
  return data


_ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch._utils", "_rebuild_tensor"): _tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): tuple,
    ("numpy", "dtype"): torch_pickle._numpy_dtype,  # pylint: disable=protected-access
    ("numpy.core.multiarray", "scalar"): torch_pickle._numpy_scalar,  # pylint: disable=protected-access
    ("numpy._core.multiarray", "scalar"): torch_pickle._numpy_scalar,  # pylint: disable=protected-access
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    **{("torch.nn.modules.container", name): cls for name, cls in _CONTAINERS.items()},
}


class _Unpickler(pickle.Unpickler):

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise pickle.UnpicklingError(
        f"it needs {module}.{name}, which this reader refuses: it rebuilds only EDM's "
        "persistent-class records, tensors, inline storages, torch ModuleDicts/ModuleLists and "
        "plain containers, and runs nothing the file contains")

  def persistent_load(self, pid):
    raise pickle.UnpicklingError(f"a persistent id {pid!r} (EDM pickles have none; a torch.save "
                                 "zip or legacy file is read by score_jax.convert.torch_pickle)")


def loads(data: bytes, where: str = "<bytes>") -> Any:
  """`load` of a pickle held in memory."""
  if data[:1] != b"\x80" or data[1:2] not in (b"\x02", b"\x03", b"\x04", b"\x05"):
    raise EDMPickleError(f"{where} is not a Python pickle of protocol 2-5 (EDM's are protocol 4; "
                         "a torch.save .pth file is read by --from=pytorch).")
  try:
    return _Unpickler(io.BytesIO(data)).load()
  except (pickle.UnpicklingError, ValueError, EOFError, KeyError, TypeError, AttributeError,
          IndexError, struct.error) as e:
    raise EDMPickleError(f"{where} cannot be read as an EDM network pickle: "
                         f"{type(e).__name__}: {e}") from None


def load(path: str | os.PathLike) -> Any:
  """Reads an EDM pickle (a network snapshot or a released network).

  Returns:
    The pickled object: for a snapshot, a dict {'ema': PersistentObject
    (EDMPrecond), 'loss_fn': ..., 'augment_pipe': ..., 'dataset_kwargs': dict}.
  Raises:
    FileNotFoundError: no such file.
    EDMPickleError: not a pickle, or one that needs anything outside the
      allow-list (named).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No such file {path}.")
  with open(path, "rb") as f:
    data = f.read()
  return loads(data, path)


def snapshot_network(obj: Any, error: type, *, source: str, weights: str, family: str,
                     kind: str, weights_note: str) -> PersistentObject:
  """The persistent network of a network snapshot of EDM's or EDM2's training loop (its 'ema'
  entry) or of a bare network pickle; anything else raises `error` with one line naming it.
  `family` ('EDM', 'EDM2') and `kind` ('network snapshot') name the expected file,
  `weights_note` what such files hold, for a --weights other than 'ema'."""
  if weights != "ema":
    raise error(f"{weights_note}; --weights={weights} is not available for them.")
  if isinstance(obj, Mapping):
    if "ema" not in obj:
      raise error(f"{source} has no 'ema' network (top-level keys: {sorted(map(str, obj))}); "
                  f"it is not an {family} {kind}.")
    obj = obj["ema"]
  if not isinstance(obj, PersistentObject):
    raise error(f"{source}: the network is a {type(obj).__name__}, not an {family} persistent "
                "network.")
  return obj


def _items(mapping: Any, where: str):
  if mapping is None:
    return []
  if not isinstance(mapping, Mapping):
    raise EDMPickleError(f"{where} is a {type(mapping).__name__}, not a dict of tensors.")
  return list(mapping.items())


def state_dict(module: Any, prefix: str = "") -> "collections.OrderedDict[str, np.ndarray]":
  """A module's tensors named and ordered as torch's `module.state_dict()`.

  Parameters first, then buffers (without `_non_persistent_buffers_set`), then
  each submodule's under '<name>.'; None entries are skipped.
  """
  out: "collections.OrderedDict[str, np.ndarray]" = collections.OrderedDict()
  if not isinstance(module, (PersistentObject, TorchModule)):
    raise EDMPickleError(f"{prefix or 'the object'} is a {type(module).__name__}, not a torch module.")
  state = module.state
  skip = state.get("_non_persistent_buffers_set") or set()
  for kind in ("_parameters", "_buffers"):
    for name, value in _items(state.get(kind), f"{prefix}{kind}"):
      if value is None or (kind == "_buffers" and name in skip):
        continue
      if not isinstance(value, np.ndarray):
        raise EDMPickleError(f"{prefix}{name} is a {type(value).__name__}, not a tensor.")
      out[prefix + str(name)] = value
  for name, child in _items(state.get("_modules"), f"{prefix}_modules"):
    if child is not None:
      out.update(state_dict(child, f"{prefix}{name}."))
  return out
