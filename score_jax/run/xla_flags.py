"""XLA:CPU compiler defaults, set by the entry points (main.py, the converters, the benchmarks)
before JAX starts a backend; `import score_jax` leaves XLA_FLAGS alone.

Two settings (their measurements: docs/training.md, "CPU compiler settings", and
docs/benchmarks.md; benchmarks/bench_models.py and benchmarks/bench_conv.py):

  --xla_cpu_experimental_ynn_fusion_type=reduce
      jaxlib 0.10's CPU compiler hands convolutions to YNNPACK by default,
      and YNNPACK's weight gradient of a convolution is the slow path of a
      U-Net training step. Its reductions (GroupNorm statistics, bias
      gradients) are faster than XLA's, so only reductions stay on YNNPACK.

  --xla_cpu_enable_concurrency_optimized_scheduler=false
      XLA:CPU orders a program breadth-first by default, to run independent
      operations side by side; that keeps many activations alive at once.
      The depth-first memory scheduler plans less memory for the training
      step at the same step time.

Each default is applied only when
  - the user's XLA_FLAGS do not already set that flag (theirs wins),
  - SCORE_JAX_XLA_DEFAULTS is not "0" (the opt-out for all of them),
  - the installed jaxlib knows the flag (XLA aborts the process on an unknown
    flag in XLA_FLAGS, so a jaxlib without it gets nothing).
XLA reads XLA_FLAGS once, when JAX starts its first backend; importing
`apply_defaults()` after JAX has already computed something leaves the flags as they
were (`applied()` then reports no flags). The flags only affect XLA's CPU
compiler; GPU and TPU compilations ignore them.
"""

from __future__ import annotations

import glob
import importlib.util
import mmap
import os
from typing import MutableMapping, Optional, Tuple

# (flag, value) pairs: the convolution setting, then the scheduler.
DEFAULTS: Tuple[Tuple[str, str], ...] = (
    ("xla_cpu_experimental_ynn_fusion_type", "reduce"),
    ("xla_cpu_enable_concurrency_optimized_scheduler", "false"),
)
OPT_OUT = "SCORE_JAX_XLA_DEFAULTS"

_applied: Optional[Tuple[str, ...]] = None


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


def apply(environ: MutableMapping[str, str] = os.environ) -> Tuple[str, ...]:
  """Add score_jax's XLA:CPU defaults to environ["XLA_FLAGS"]; returns the flags added."""
  if environ.get(OPT_OUT, "1") == "0":
    return ()
  flags = environ.get("XLA_FLAGS", "")
  added = tuple(f"--{name}={value}" for name, value in DEFAULTS
                if name not in flags and _jaxlib_knows(name))
  if added:
    environ["XLA_FLAGS"] = " ".join([flags] + list(added)).strip()
  return added


def applied() -> Tuple[str, ...]:
  """The defaults this process's JAX runs with (empty: none, e.g. JAX started first)."""
  return _applied or ()


def apply_defaults() -> Tuple[str, ...]:
  """Applies the defaults once per process, unless a JAX backend already started; returns them."""
  global _applied
  if _applied is None:
    _applied = () if _backend_started() else apply()
  return _applied
