"""FID Inception throughput: images/s of `inception_features` on this machine.

  python benchmarks/bench_inception.py [--batch_sizes 16 64] [--image_size 32]

Random weights (speed does not depend on the values); uint8 inputs of
`image_size` resized to 299 inside the jitted function, as in evaluation.
The batch is sharded over all local devices. Prints a table with the time the
50k-image protocol (one pass over 50k samples) would take at that rate.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from score_jax.run import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # main.py's CPU compiler settings, before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from score_jax.metrics import inception as inc  # noqa: E402


def bench(params, batch: int, image_size: int, iters: int, precision: str, resize: str):
  n_dev = jax.local_device_count()
  if batch % n_dev:
    raise ValueError(f"batch {batch} not divisible by {n_dev} devices")
  mesh = jax.make_mesh((n_dev,), ("data",))
  images = np.random.default_rng(0).integers(0, 256, (batch, image_size, image_size, 3),
                                             dtype=np.uint8)
  images = jax.device_put(images, NamedSharding(mesh, P("data")))
  params = jax.device_put(params, NamedSharding(mesh, P()))
  fn = lambda: inc.inception_features(params, images, resize=resize, precision=precision)
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(fn())  # warm-up
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fn()
  jax.block_until_ready(out)
  step_s = (time.perf_counter() - t0) / iters
  return compile_s, step_s


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_sizes", type=int, nargs="+", default=[16, 64])
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--precision", default="highest", choices=["highest", "high", "default"])
  parser.add_argument("--resize", default="tf1", choices=list(inc.RESIZE_METHODS))
  args = parser.parse_args()

  params = inc.random_inception_params(0)
  dev = jax.devices()[0]
  print(f"backend {jax.default_backend()}, {jax.device_count()} x {dev.device_kind}, "
        f"input {args.image_size}px uint8 -> 299, precision {args.precision}, "
        f"resize {args.resize}")
  print(f"{'batch':>6} {'compile s':>10} {'s/batch':>9} {'images/s':>9} {'50k images':>11}")
  for b in args.batch_sizes:
    compile_s, step_s = bench(params, b, args.image_size, args.iters, args.precision, args.resize)
    ips = b / step_s
    print(f"{b:>6} {compile_s:>10.1f} {step_s:>9.3f} {ips:>9.1f} {50_000 / ips / 60:>9.1f} min")


if __name__ == "__main__":
  main()
