"""XLA:CPU compiler defaults, set when score_jax is imported (before JAX starts a backend).

jaxlib 0.10's CPU compiler hands convolutions to YNNPACK by default. For the
U-Nets' training step that is the slow path: the weight gradient of a 3x3
convolution with 128 channels at 32x32 resolution and batch 32 takes 0.4-2 s
through YNNPACK (depending on load) and 70-100 ms through XLA's own
convolution (benchmarks/bench_conv.py). YNNPACK's reductions, on the other
hand, are much faster than XLA's (GroupNorm statistics and the bias
gradients of every layer). So score_jax asks for YNNPACK fusions of
reductions only:

    --xla_cpu_experimental_ynn_fusion_type=reduce

Measured with benchmarks/bench_models.py on the 2-core CPU (DDPM++ cont.,
CIFAR-10 training step): 10.0 -> 4.5 s/step at batch 8, 101 -> 19 s at batch 32
(README, "Benchmarks"). The flag only affects XLA's CPU compiler; GPU and TPU
compilations ignore it.

The default is applied only when
  - the user's XLA_FLAGS do not already set the flag (theirs wins),
  - SCORE_JAX_XLA_DEFAULTS is not "0" (the opt-out),
  - the installed jaxlib knows the flag (XLA aborts the process on an unknown
    flag in XLA_FLAGS, so a jaxlib without it gets nothing).
XLA reads XLA_FLAGS once, when JAX starts its first backend; importing
score_jax after JAX has already computed something leaves the flags as they
were (`applied()` then reports False).
"""

from __future__ import annotations

import glob
import importlib.util
import mmap
import os
from typing import MutableMapping, Optional

FLAG = "xla_cpu_experimental_ynn_fusion_type"
VALUE = "reduce"
OPT_OUT = "SCORE_JAX_XLA_DEFAULTS"

_applied: Optional[bool] = None


def _jaxlib_knows(flag: str) -> bool:
  """Whether the installed jaxlib's XLA defines `flag` (searched in its shared libraries)."""
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    return False
  needle = flag.encode()
  for directory in spec.submodule_search_locations:
    for path in glob.glob(os.path.join(directory, "*.so")):
      if os.path.getsize(path) < 1 << 20:  # stubs; XLA lives in the big library
        continue
      with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m.find(needle) >= 0:
          return True
  return False


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # noqa: BLE001 - private API; if it moved, assume not started
    return False


def apply(environ: MutableMapping[str, str] = os.environ) -> bool:
  """Add score_jax's XLA:CPU default to environ["XLA_FLAGS"]; True if it was added."""
  if environ.get(OPT_OUT, "1") == "0":
    return False
  flags = environ.get("XLA_FLAGS", "")
  if FLAG in flags or not _jaxlib_knows(FLAG):
    return False
  environ["XLA_FLAGS"] = f"{flags} --{FLAG}={VALUE}".strip()
  return True


def applied() -> bool:
  """Whether this process's JAX runs with score_jax's XLA:CPU default."""
  return bool(_applied)


def apply_at_import() -> None:
  global _applied
  if _applied is None:
    _applied = False if _backend_started() else apply()
