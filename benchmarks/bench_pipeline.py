"""Input pipeline throughput: images/s of score_jax's own batching, alone (the device idle).

  python benchmarks/bench_pipeline.py                       # 32 px and 256 px, all modes
  python benchmarks/bench_pipeline.py --sizes 32 --seconds 3 --repeats 2 --threads 0 2

A synthetic in-memory source of uint8 images (random pixels; 50,000 at 32 px
like CIFAR-10's training split, 1,024 at 256 px) goes through
`score_jax.data.datasets.make_batches`, the code a training run reads its data
with (shuffle order, per-example flip and dequantization draws, scaling),
for three transforms:
  flip+centered        the CIFAR-10 configs (vp_cifar.py: random_flip, centered)
  flip+dequant+center  plus uniform dequantization (per-pixel noise)
  raw                  uint8, no transform (bits/dim and FID inputs)
and three ways of consuming the batches:
  host       next(batches): numpy batches on the host
  device     each batch put on the device synchronously, then waited for
             (what the training loop does before each step today)
  prefetch   score_jax.data.datasets.Prefetch with to_device(sharding): batches
             prepared and put on the device in a background thread, 2 ahead
             of the consumer, which only waits for each one to be ready
--threads sets make_batches' reader threads (0: batches prepared in the
consuming thread, or in Prefetch's one thread); each figure is the best
over --repeats runs of --seconds each.

The training loop reads its batches through Prefetch (score_jax/run/train.py);
`prefetch` measures what Prefetch(..., to_device(...)) gives over the plain iterator.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from score_jax.run import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # main.py's CPU compiler settings, before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from score_jax.data import datasets  # noqa: E402
from score_jax.data.datasets import ArraySource  # noqa: E402

TRANSFORMS = {
    "flip+centered": dict(random_flip=True, centered=True),
    "flip+dequant+center": dict(random_flip=True, uniform_dequantization=True, centered=True),
    "raw": dict(raw=True),
}
MODES = ("host", "device", "prefetch")
# Training batch of the configs at that size (configs/vp_cifar.py, configs/ve_ffhq256.py).
DEFAULT_BATCH = {32: 128, 256: 64}
DEFAULT_EXAMPLES = {32: 50_000, 256: 1024}


def synthetic_source(size: int, num_examples: Optional[int] = None, channels: int = 3,
                     seed: int = 0) -> ArraySource:
  """An in-memory split of random uint8 images [n, size, size, channels] (labels 0..9)."""
  n = num_examples or DEFAULT_EXAMPLES.get(size, 1024)
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
  return ArraySource(images, np.arange(n, dtype=np.int32) % 10, num_classes=10)


def _batch_sharding() -> NamedSharding:
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  return NamedSharding(mesh, P("data"))


def measure(source: ArraySource, batch: int, transform: str = "flip+centered",
            mode: str = "prefetch", threads: int = 0, seconds: float = 2.0,
            warmup: int = 2) -> Dict[str, float]:
  """{'images_per_s', 'batches', 'seconds'} of reading `source` through make_batches.

  The clock starts after `warmup` batches and stops when at least `seconds`
  have passed, at a batch boundary (for the device modes: once the last
  batch is on the device).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  batches = datasets.make_batches(source, batch_size=batch, seed=0, process_index=0,
                                  process_count=1, num_threads=threads, **TRANSFORMS[transform])
  dtypes = {"image": np.uint8 if transform == "raw" else np.float32, "label": np.int32}
  put = datasets.to_device(_batch_sharding(), dtypes)
  if mode == "prefetch":
    stream = datasets.Prefetch(batches, put, size=2)
    take = lambda: next(stream)["image"].block_until_ready()
  elif mode == "device":
    stream = batches
    take = lambda: put(next(stream))["image"].block_until_ready()
  else:
    stream = batches
    take = lambda: next(stream)["image"]
  try:
    for _ in range(warmup):
      take()
    n, t0 = 0, time.perf_counter()
    while True:
      take()
      n += 1
      elapsed = time.perf_counter() - t0
      if elapsed >= seconds:
        break
  finally:
    stream.close()
  return {"images_per_s": n * batch / elapsed, "batches": n, "seconds": elapsed}


def best_of(repeats: int, *args, **kwargs) -> float:
  """The best images/s over `repeats` runs of measure(*args, **kwargs)."""
  return max(measure(*args, **kwargs)["images_per_s"] for _ in range(max(repeats, 1)))


def main(argv: List[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", type=int, nargs="+", default=[32, 256])
  parser.add_argument("--transforms", nargs="+", default=list(TRANSFORMS), choices=list(TRANSFORMS))
  parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
  parser.add_argument("--threads", type=int, nargs="+", default=[0, 2],
                      help="make_batches num_threads values to try")
  parser.add_argument("--batch", type=int, default=0, help="batch size (0: 128 at 32 px, 64 at 256)")
  parser.add_argument("--seconds", type=float, default=2.0, help="seconds per timed run")
  parser.add_argument("--repeats", type=int, default=2, help="timed runs per figure (best kept)")
  args = parser.parse_args(argv)

  print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f}); images/s, best of "
        f"{args.repeats} x {args.seconds:g} s")
  header = f"| size | transform | batch | threads | " + " | ".join(args.modes) + " |"
  print(header)
  print("|" + "---|" * (4 + len(args.modes)))
  for size in args.sizes:
    source = synthetic_source(size)
    batch = args.batch or DEFAULT_BATCH.get(size, 64)
    for transform in args.transforms:
      for threads in args.threads:
        rates = [best_of(args.repeats, source, batch, transform, mode, threads, args.seconds)
                 for mode in args.modes]
        print(f"| {size} px | {transform} | {batch} | {threads} | "
              + " | ".join(f"{r:,.0f}" for r in rates) + " |", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
