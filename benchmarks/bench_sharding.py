"""What training.sharding = 'fsdp' saves: per-device bytes of the train state, and the step time.

  python benchmarks/bench_sharding.py                                # NCSN++ deep, 8 devices
  python benchmarks/bench_sharding.py --config vp_cifar_deep --devices 16
  python benchmarks/bench_sharding.py --config ve_cifar_deep --set model.nf=256
  python benchmarks/bench_sharding.py --skip_timing --json out.json

Two parts, each in both modes (training.sharding = 'replicated' and 'fsdp' over all
devices) on `--devices` simulated CPU devices:

- memory of --config's network (any configs/NAME.py or a path to a config file; default
  the CIFAR-10 NCSN++ deep, configs/ve_cifar_deep.py): the bytes each device holds of the
  parameters plus the optimizer state (and of the EMA, and of the whole train state),
  from the abstract state (`state.abstract_state`: shapes and shardings, nothing
  allocated), so a network of any size needs no memory. The goal: fsdp within 5% of
  1/devices of replicated (the arrays that stay whole, sharding.MIN_SHARDED_SIZE, are
  the excess).
- step time of --time_config's network (small: the toy MLP by default) on the same
  devices: seconds per training step after a warm-up (each step waited for, as training
  on a CPU mesh does), and the memory XLA plans per device for the compiled step
  (arguments, outputs, temporaries). Simulated devices share the host's cores, so the
  time shows the collectives' overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = ("replicated", "fsdp")


def _parse() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="ve_cifar_deep",
                      help="configs/NAME.py or a config file: the network whose bytes are counted")
  parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="a change to --config (repeatable), e.g. --set model.nf=256")
  parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
  parser.add_argument("--time_config", default="toy", help="the small network that is timed")
  parser.add_argument("--time_batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
  parser.add_argument("--skip_timing", action="store_true")
  parser.add_argument("--json", default="", help="also write the results to this file")
  return parser.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # before JAX starts
  os.environ["XLA_FLAGS"] = " ".join(
      [f for f in os.environ.get("XLA_FLAGS", "").split()
       if "xla_force_host_platform_device_count" not in f]
      + [f"--xla_force_host_platform_device_count={ARGS.devices}"])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

from score_jax.run import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # main.py's CPU compiler settings, before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402

from score_jax.run import plan as plan_lib  # noqa: E402
from score_jax.run import settings as settings_lib  # noqa: E402
from score_jax.run import sharding  # noqa: E402
from score_jax.run import state as run_state  # noqa: E402
from score_jax.run import train  # noqa: E402


def load_config(name: str, changes: List[str]) -> Any:
  """configs/NAME.py (or the file NAME) with SECTION.KEY=VALUE changes (Python literals)."""
  path = name if name.endswith(".py") else os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  with config.unlocked():
    for change in changes:
      key, value = change.split("=", 1)
      section, field = key.split(".")
      try:
        value = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        pass  # a bare string
      config[section][field] = value
  return config


def _settings(config: Any, mode: str, batch: int = 0) -> settings_lib.Settings:
  s = settings_lib.from_config(config)
  changes = {"sharding": mode, "fsdp_size": 0}
  n = jax.device_count()
  if batch or s.training.batch_size % n:
    changes["batch_size"] = batch or n * max(1, s.training.batch_size // n)
  return s.replace(training=changes)


def _per_device(tree: Any) -> int:
  """The most bytes any device holds of `tree`'s arrays."""
  return max(sharding.device_bytes(tree).values()) if jax.tree.leaves(tree) else 0


def memory(config: Any) -> Dict[str, Any]:
  """Per-device bytes of the train state's parts in both modes (abstract: nothing allocated)."""
  out: Dict[str, Any] = {}
  for mode in MODES:
    plan = plan_lib.make_plan(_settings(config, mode), need_data=False)
    state = run_state.abstract_state(plan)
    out[mode] = {
        "params_and_opt_bytes": _per_device((state.params, state.opt_state)),
        "params_bytes": _per_device(state.params),
        "opt_state_bytes": _per_device(state.opt_state),
        "ema_bytes": _per_device(state.ema_params),
        "state_bytes": _per_device(state),
    }
    if mode == "replicated":
      leaves = jax.tree.leaves(state.params)
      out["num_params"] = int(sum(a.size for a in leaves))
      out["arrays"] = len(leaves)
      out["whole_in_fsdp"] = sum(
          1 for a in leaves
          if sharding.fsdp_spec(a.shape, jax.device_count()) == jax.sharding.PartitionSpec())
  ratio = out["fsdp"]["params_and_opt_bytes"] / out["replicated"]["params_and_opt_bytes"]
  out["fsdp_over_replicated"] = ratio
  out["excess_over_ideal"] = ratio * jax.device_count() - 1.0
  return out


def step_time(config: Any, batch: int, steps: int) -> Dict[str, Any]:
  """Seconds per training step and the compiled step's planned memory, both modes."""
  out: Dict[str, Any] = {}
  for mode in MODES:
    plan = plan_lib.make_plan(_settings(config, mode, batch), need_data=False)
    state = run_state.init_state(plan, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    x = rng.normal(size=plan.data.shape(batch)).astype(np.float32)
    xs, ys = train.global_batch(plan, {"image": x, "label": np.zeros((batch,), np.int32)})
    key = jax.device_put(jax.random.PRNGKey(1), plan.replicated)
    step = train.make_train_step(plan)
    t0 = time.perf_counter()
    compiled = step.lower(state, xs, ys, key).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    for _ in range(2):  # warm-up
      state, metrics = compiled(state, xs, ys, key)
      jax.block_until_ready(metrics["loss"])
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, xs, ys, key)
      jax.block_until_ready(metrics["loss"])
    out[mode] = {"s_per_step": (time.perf_counter() - t0) / steps, "compile_s": compile_s,
                 "state_bytes": _per_device(state)}
    if mem is not None:
      out[mode].update(argument_bytes=int(mem.argument_size_in_bytes),
                       temp_bytes=int(mem.temp_size_in_bytes))
  return out


def _mb(n: float) -> str:
  return f"{n / 2**20:10.2f}"


def main() -> None:
  args = ARGS
  n = jax.device_count()
  results: Dict[str, Any] = {"devices": n, "config": args.config, "set": args.set,
                             "platform": jax.devices()[0].platform, "jax": jax.__version__}
  mem = memory(load_config(args.config, args.set))
  results["memory"] = mem
  print(f"{args.config} {' '.join(args.set)}: {mem['num_params'] / 1e6:.1f}M parameters in "
        f"{mem['arrays']} arrays ({mem['whole_in_fsdp']} stay whole under fsdp), {n} devices")
  print(f"{'MiB per device':24s}{'replicated':>12s}{'fsdp':>12s}{'ratio':>9s}")
  for key, label in (("params_and_opt_bytes", "params + optimizer"), ("params_bytes", "params"),
                     ("opt_state_bytes", "optimizer state"), ("ema_bytes", "EMA"),
                     ("state_bytes", "whole train state")):
    r, f = mem["replicated"][key], mem["fsdp"][key]
    print(f"{label:24s}{_mb(r):>12s}{_mb(f):>12s}{f / r if r else 0:9.4f}")
  print(f"fsdp / replicated (params + optimizer) = {mem['fsdp_over_replicated']:.4f}, ideal "
        f"1/{n} = {1 / n:.4f}: {100 * mem['excess_over_ideal']:+.2f}% over "
        f"({'within' if mem['excess_over_ideal'] <= 0.05 else 'NOT within'} 5%)")
  if not args.skip_timing:
    timing = step_time(load_config(args.time_config, []), args.time_batch, args.steps)
    results["timing"] = {"config": args.time_config, "batch": args.time_batch, **timing}
    print(f"\nstep time, {args.time_config} at batch {args.time_batch} ({args.steps} steps, "
          f"{n} simulated devices on {os.cpu_count()} cores)")
    print(f"{'mode':12s}{'ms/step':>10s}{'compile s':>11s}{'state MiB':>11s}{'args MiB':>10s}"
          f"{'temp MiB':>10s}")
    for mode in MODES:
      t = timing[mode]
      print(f"{mode:12s}{1e3 * t['s_per_step']:10.2f}{t['compile_s']:11.2f}"
            f"{_mb(t['state_bytes']):>11s}{_mb(t.get('argument_bytes', 0)):>10s}"
            f"{_mb(t.get('temp_bytes', 0)):>10s}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
