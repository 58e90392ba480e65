"""The cost of EDM's augmentation (score_jax.data.augment) on the default device.

Times (ms, best of --reps, after one compiling call) the jitted augmentation of
a batch of CIFAR-10-sized images [B, 32, 32, 3] with EDM's CIFAR-10 setting
(p = 0.12) and with every image transformed (p = 1), and the warp alone.

Usage:
  python benchmarks/bench_augment.py [--batches 128 512] [--reps 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from score_jax.run import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # main.py's CPU compiler settings, before JAX starts

import jax
import jax.numpy as jnp

from score_jax.data import augment


def _best(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[128, 512])
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args()
  run = jax.jit(augment.augment, static_argnums=2)
  warp = jax.jit(augment.warp)
  every = dataclasses.replace(augment.EDM_CIFAR10, p=1.0)
  print(f"Device: {jax.devices()[0].device_kind} ({jax.default_backend()})\n")
  print("| batch | EDM p = 0.12 (ms) | p = 1 (ms) | warp alone (ms) | images/s at p = 0.12 |")
  print("|------:|------------------:|-----------:|----------------:|---------------------:|")
  for b in args.batches:
    x = jax.random.uniform(jax.random.PRNGKey(0), (b, 32, 32, 3), minval=-1.0, maxval=1.0)
    key = jax.random.PRNGKey(1)
    g = jnp.tile(jnp.array([[[0.9, -0.2, 0.5], [0.2, 1.1, -0.3]]]), (b, 1, 1))
    t_edm = _best(run, key, x, augment.EDM_CIFAR10, reps=args.reps)
    t_all = _best(run, key, x, every, reps=args.reps)
    t_warp = _best(warp, x, g, reps=args.reps)
    print(f"| {b} | {t_edm:.1f} | {t_all:.1f} | {t_warp:.1f} | {b / t_edm * 1e3:,.0f} |")


if __name__ == "__main__":
  main()
