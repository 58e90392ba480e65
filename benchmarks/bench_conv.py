"""One 3x3 convolution of the U-Nets and its two gradients under each XLA:CPU setting.

Times (ms, best of --reps) the forward convolution, its input gradient (dx)
and its weight gradient (dw) at the U-Nets' shapes, in one process per
setting of --xla_cpu_experimental_ynn_fusion_type:
  jaxlib      jaxlib's own default (convolutions on YNNPACK),
  score_jax   score_jax's default, 'reduce' (score_jax/run/xla_flags.py),
  none        nothing on YNNPACK.
This is the measurement behind score_jax's CPU compiler setting.

Usage:
  python benchmarks/bench_conv.py [--batches 8 32] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import List

SHAPES = ((32, 128), (16, 256), (8, 256))  # (resolution, channels) of the CIFAR-10 U-Nets
_FLAG = "xla_cpu_experimental_ynn_fusion_type"
SETTINGS = {"jaxlib": None, "score_jax": "reduce", "none": ""}


def _measure(batches: List[int], reps: int) -> dict:
  import jax  # imported here: the parent sets XLA_FLAGS for each child first
  import jax.numpy as jnp

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  fns = {
      "fwd": jax.jit(lambda x, w, g: conv(x, w)),
      "dx": jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[0]),
      "dw": jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[1]),
  }
  out = {}
  for b in batches:
    for h, c in SHAPES:
      keys = jax.random.split(jax.random.PRNGKey(0), 3)
      x = jax.random.normal(keys[0], (b, h, h, c))
      w = jax.random.normal(keys[1], (3, 3, c, c)) / (3 * c**0.5)
      g = jax.random.normal(keys[2], (b, h, h, c))
      for name, fn in fns.items():
        fn(x, w, g).block_until_ready()
        best = float("inf")
        for _ in range(reps):
          t0 = time.perf_counter()
          fn(x, w, g).block_until_ready()
          best = min(best, time.perf_counter() - t0)
        out[f"{b},{h},{c},{name}"] = best * 1e3
  return out


def main(argv: List[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(_measure(args.batches, args.reps)))
    return

  results = {}
  for setting, value in SETTINGS.items():
    env = dict(os.environ)
    env["SCORE_JAX_XLA_DEFAULTS"] = "0"  # the child never imports score_jax; be explicit anyway
    # The caller's other XLA flags stay; this one is the setting under test.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if _FLAG not in f]
    env["XLA_FLAGS"] = " ".join(flags + ([] if value is None else [f"--{_FLAG}={value}"]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--reps",
                           str(args.reps), "--batches"] + [str(b) for b in args.batches],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
      print(f"{setting}: failed\n{proc.stderr[-1500:]}")
      continue
    results[setting] = json.loads(proc.stdout.strip().splitlines()[-1])

  print(f"3x3 convolution, float32, {os.cpu_count()} CPU cores (load average "
        f"{os.getloadavg()[0]:.1f}); ms, best of {args.reps}")
  cols = [(s, op) for s in results for op in ("fwd", "dx", "dw")]
  print(f"{'batch':>5} {'HxW':>6} {'C':>4} " + "".join(f"{s + ' ' + op:>15}" for s, op in cols))
  for b in args.batches:
    for h, c in SHAPES:
      row = "".join(f"{results[s][f'{b},{h},{c},{op}']:>15.1f}" for s, op in cols)
      print(f"{b:>5} {f'{h}x{h}':>6} {c:>4} {row}")


if __name__ == "__main__":
  main(sys.argv[1:])
