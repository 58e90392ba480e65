"""Speed of the score networks on this machine: training step and network evaluation.

For each selected network it measures
  - compile: seconds to compile one training step at batch 8: the library's
    step (train.make_train_step, as main.py runs it: forward, the config's
    continuous DSM loss, backward, gradient clipping, Adam, EMA),
  - s/step at batch 8 and 32 (mean over timed steps after a warm-up step),
    and CPU-seconds per step at batch 8 (all threads; unlike wall time it
    barely changes when other processes share the cores),
  - s/eval: one network evaluation (score_fn, no dropout) at batch 64,
  - GFLOP per training step at batch 8 (XLA's cost analysis of the compiled
    step) and the rate it ran at, against the machine's float32 matmul rate
    (printed in the header: a 2048 x 2048 matmul), the ceiling for any
    implementation of the same arithmetic on this machine,
  - step GB at batch 8 and 32: the memory XLA plans for one compiled
    training step (arguments, outputs and temporaries; the donated state is
    counted once), i.e. what the step needs on the device,
  - peak RSS of the process that ran it (each network runs in its own
    process, so the peaks do not mix); it includes the compiler's own memory
    and the batch-64 evaluation, so it is above either step's figure.
With --breakdown it splits the batch-8 step's time instead: the forward loss,
the loss and its gradient, the whole step, and every convolution of the step
(forward, input gradient, weight gradient) and every matrix product
(attention, dense layers) compiled and timed alone, summed,
and the update (clipping, Adam, EMA: train.apply_update) timed alone:
the time the step's arithmetic needs at the rate this machine runs it, and
how much of the step is everything else (norms, softmax, activations,
dropout, layout changes, the optimizer).
With --compile-cache it measures only the batch-8 step's trace-and-compile
time, twice in fresh processes sharing a new compilation-cache folder (as
main.py's --compilation_cache): cold (compiling and storing) and from the
cache (loading), with the number of programs stored and loaded.

Usage:
  python benchmarks/bench_models.py                          # all networks
  python benchmarks/bench_models.py --configs ddpmpp_small ddpmpp --steps 3
  python benchmarks/bench_models.py --configs ddpmpp --dtype bfloat16
  python benchmarks/bench_models.py --configs ncsnpp --compile-cache   # compile, cold vs cached
  python benchmarks/bench_models.py --configs ddpmpp --breakdown       # arithmetic vs the rest

Networks: ncsnpp (configs/ve_cifar.py, NCSN++ cont., VE), ddpmpp
(configs/vp_cifar.py, DDPM++ cont., VP), ddpmpp_small (DDPM++ with nf 32,
ch_mult (1, 2, 2), one residual block per resolution).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from score_jax.run import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # main.py's CPU compiler settings, before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import ve_cifar, vp_cifar  # noqa: E402
from score_jax import models
from score_jax.run import xla_flags as _xla_flags
from score_jax.run import builders
from score_jax.run import plan as plan_lib
from score_jax.run import entry as run
from score_jax.run import settings
from score_jax.run import train  # noqa: E402
from score_jax.run import state as run_state


def _small_ddpmpp():
  config = vp_cifar.get_config()
  config.model.nf = 32
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  return config


CONFIGS = {
    "ncsnpp": ve_cifar.get_config,
    "ddpmpp": vp_cifar.get_config,
    "ddpmpp_small": _small_ddpmpp,
}


def _host_params(model, shape, seed=0):
  """Parameters drawn on the host (init's own compilation is not what we time)."""
  shapes = jax.eval_shape(lambda r: models.init_model(r, model, shape), jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  scale = lambda s: 1.0 / math.sqrt(math.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.1
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(size=s.shape) * scale(s), jnp.float32), shapes)


def _model_and_params(config):
  """The config's network and host-drawn parameters for it."""
  model = builders.get_model(settings.from_config(config))
  size, ch = config.data.image_size, config.data.num_channels
  return model, _host_params(model, (1, size, size, ch))["params"]


def _train_step(config, params, batch: int):
  """The library's training step (train.make_train_step, as main.py runs it) and its inputs."""
  config.training.batch_size = batch
  setup = plan_lib.make_plan(settings.from_config(config), need_data=False)
  size, ch = config.data.image_size, config.data.num_channels
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(batch, size, size, ch)), jnp.float32)
  y = jnp.zeros((batch,), jnp.int32)
  state = run_state.TrainState(step=jnp.int32(0), params=params, opt_state=setup.tx.init(params),
                           ema_params=jax.tree_util.tree_map(jnp.copy, params))
  return train.make_train_step(setup), (state, x, y)


def compile_through_cache(name: str, cache_dir: str) -> Dict[str, float]:
  """Seconds to trace and compile the batch-8 step with main.py's compilation cache in cache_dir."""
  stats = run.enable_compilation_cache(cache_dir)  # before anything compiles, as in main.py
  config = CONFIGS[name]()
  _, params = _model_and_params(config)
  step_fn, (state, x, y) = _train_step(config, params, 8)
  t0 = time.perf_counter()
  step_fn.lower(state, x, y, jax.random.PRNGKey(0)).compile()
  return {"compile_s": time.perf_counter() - t0, "loaded": stats.loaded, "stored": stats.written}


def bench_one(name: str, steps: int, dtype: str, remat: bool = False,
              microbatches: int = 1) -> Dict[str, float]:
  config = CONFIGS[name]()
  config.model.dtype = dtype
  config.model.remat = remat
  config.training.microbatches = microbatches
  model, params = _model_and_params(config)
  sde = builders.get_sde(settings.from_config(config))
  size, ch = config.data.image_size, config.data.num_channels
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  result: Dict[str, float] = {"params_M": n_params / 1e6}
  key = jax.random.PRNGKey(0)

  for batch in (8, 32):
    step_fn, (state, x, y) = _train_step(config, params, batch)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, x, y, key).compile()
    if batch == 8:
      result["compile_s"] = time.perf_counter() - t0
      result["gflop_b8"] = float(compiled.cost_analysis().get("flops", math.nan)) / 1e9
    mem = compiled.memory_analysis()  # XLA's buffer plan: what the step needs on the device
    if mem is not None:
      result[f"step_mem_gb_b{batch}"] = (mem.argument_size_in_bytes + mem.temp_size_in_bytes +
                                         mem.output_size_in_bytes - mem.alias_size_in_bytes) / 1e9
    state, metrics = compiled(state, x, y, key)  # warm-up
    metrics["loss"].block_until_ready()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
      state, metrics = compiled(state, x, y, key)
    metrics["loss"].block_until_ready()
    result[f"step_s_b{batch}"] = (time.perf_counter() - t0) / steps
    # CPU seconds (all threads): robust to other processes sharing the cores.
    result[f"step_cpu_s_b{batch}"] = (time.process_time() - c0) / steps
    if not (bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))):
      raise FloatingPointError(f"{name}: non-finite loss at batch {batch}")
    params = state.params

  score_fn = jax.jit(lambda p, x, t: models.get_score_fn(sde, model, {"params": p},
                                                         continuous=True)(x, t))
  x = jnp.asarray(np.random.default_rng(2).uniform(size=(64, size, size, ch)), jnp.float32)
  t = jnp.full((64,), 0.5)
  score_fn(params, x, t).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(steps):
    out = score_fn(params, x, t)
  out.block_until_ready()
  result["eval_s_b64"] = (time.perf_counter() - t0) / steps
  result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
  return result


_PRODUCTS = ("conv_general_dilated", "dot_general")


def _step_products(jaxpr, found=None):
  """{(operand shapes, params): [count, eqn]} for the convolutions and matrix products in jaxpr.

  Walks nested jaxprs (jit, custom_jvp, checkpoint); an operation inside a
  loop body or a branch is counted once, so this is for steps without
  scan/while/cond around the network (microbatches 1; the step's cond holds
  only the update).
  """
  from jax.extend import core as jex_core  # noqa: PLC0415
  found = {} if found is None else found
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _PRODUCTS:
      key = (tuple(tuple(v.aval.shape) for v in eqn.invars),
             tuple(sorted((k, repr(v)) for k, v in eqn.params.items())))
      found.setdefault(key, [0, eqn])[0] += 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jex_core.ClosedJaxpr):
          _step_products(sub.jaxpr, found)
        elif isinstance(sub, jex_core.Jaxpr):
          _step_products(sub, found)
  return found


def _best_seconds(call, reps: int) -> float:
  """Best wall seconds of call() over reps calls, after a warm-up call."""
  jax.block_until_ready(call())
  best = math.inf
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    best = min(best, time.perf_counter() - t0)
  return best


def _fed_forward(compiled, state, *rest):
  """A call that runs compiled(state, *rest) and keeps the returned state for the next call
  (the state is donated); returns the call and a getter of the current state."""
  box = [state]

  def call():
    out = compiled(box[0], *rest)
    box[0] = out[0] if isinstance(out, tuple) else out
    return out
  return call, lambda: box[0]


def breakdown(name: str, reps: int) -> Dict[str, float]:
  """Seconds of the batch-8 step's parts, and of its convolutions and matrix products timed
  alone (best of reps)."""
  config = CONFIGS[name]()
  _, params = _model_and_params(config)
  step_fn, (state, x, y) = _train_step(config, params, 8)
  setup = plan_lib.make_plan(settings.from_config(config), need_data=False)
  loss_fn = setup.train_loss
  key = jax.random.PRNGKey(0)
  result: Dict[str, float] = {}
  for part, fn in (("forward", lambda p, k, x: loss_fn(p, k, x, None)[0]),
                   ("gradient", jax.grad(lambda p, k, x: loss_fn(p, k, x, None)[0]))):
    compiled = jax.jit(fn).lower(params, key, x).compile()
    result[f"{part}_s"] = _best_seconds(lambda: compiled(params, key, x), reps)
  call, current = _fed_forward(step_fn.lower(state, x, y, key).compile(), state, x, y, key)
  result["step_s"] = _best_seconds(call, reps)
  state = current()
  # The update alone (clipping, Adam, EMA), on a copy of the state.
  update = jax.jit(lambda st, g: train.apply_update(setup, st, g), donate_argnums=(0,))
  grads = jax.tree_util.tree_map(lambda p: p * 1e-3, state.params)
  copy = jax.tree_util.tree_map(jnp.copy, state)
  call, _ = _fed_forward(update.lower(copy, grads).compile(), copy, grads)
  result["update_s"] = _best_seconds(call, reps)
  del call, copy

  rng = np.random.default_rng(0)
  for part, fn in (("forward", lambda p, k, x: loss_fn(p, k, x, None)[0]), ("step", None)):
    jaxpr = (jax.make_jaxpr(fn)(state.params, key, x) if fn is not None
             else jax.make_jaxpr(step_fn)(state, x, y, key))
    for kind in ("conv", "dot"):
      result.update({f"{part}_{kind}_n": 0, f"{part}_{kind}_s": 0.0, f"{part}_{kind}_gflop": 0.0})
    for n, eqn in _step_products(jaxpr.jaxpr).values():
      kind = "conv" if eqn.primitive.name == "conv_general_dilated" else "dot"
      op = jax.jit(lambda a, b, eqn=eqn: eqn.primitive.bind(a, b, **eqn.params))
      args = [jnp.asarray(rng.normal(size=v.aval.shape), jnp.float32) for v in eqn.invars]
      one = op.lower(*args).compile()
      result[f"{part}_{kind}_n"] += n
      result[f"{part}_{kind}_s"] += n * _best_seconds(lambda: one(*args), reps)
      result[f"{part}_{kind}_gflop"] += n * float(one.cost_analysis().get("flops", math.nan)) / 1e9
  return result


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
  """float32 GFLOP/s of an n x n matmul on the default device (best of reps)."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  best = _best_seconds(lambda: mm(a), reps)
  return 2 * n**3 / best / 1e9


def _child(args: List[str], env: Dict[str, str]):
  """json result of this script run with args in a fresh process (None, printed, on failure)."""
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)] + args, capture_output=True,
                        text=True, env=env)
  if proc.returncode != 0:
    print(f"{args[1]:<14} failed:\n{proc.stderr[-2000:]}")
    return None
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _compile_cache_table(names: List[str], env: Dict[str, str]) -> None:
  print(f"{'network':<14}{'compile s (cold)':>18}{'stored':>8}{'compile s (cache)':>19}{'loaded':>8}")
  for name in names:
    with tempfile.TemporaryDirectory(prefix="bench_models_cache_") as cache:
      cold = _child(["--one", name, "--cache-dir", cache], env)
      warm = cold and _child(["--one", name, "--cache-dir", cache], env)
    if warm:
      print(f"{name:<14}{cold['compile_s']:>18.1f}{cold['stored']:>8d}{warm['compile_s']:>19.1f}"
            f"{warm['loaded']:>8d}", flush=True)


def _breakdown_table(names: List[str], reps: int, env: Dict[str, str]) -> None:
  print("batch 8, seconds (best of --steps). 'alone': the part's convolutions and matrix products\n"
        "(attention, dense layers) each compiled and timed alone, summed; 'update': clipping, Adam\n"
        "and EMA timed alone; 'rest': the step less its convolutions and matrix products")
  print(f"{'network':<14}{'forward':>9}{'alone':>7}{'gradient':>10}{'step':>7}{'update':>8}"
        f"{'convs':>7}{'GFLOP':>7}{'alone':>7}{'matmuls':>9}{'GFLOP':>7}{'alone':>7}{'GFLOP/s':>9}"
        f"{'rest':>7}")
  for name in names:
    r = _child(["--one", name, "--steps", str(reps), "--breakdown"], env)
    if r is None:
      continue
    seconds = r["step_conv_s"] + r["step_dot_s"]
    gflop = r["step_conv_gflop"] + r["step_dot_gflop"]
    print(f"{name:<14}{r['forward_s']:>9.2f}{r['forward_conv_s'] + r['forward_dot_s']:>7.2f}"
          f"{r['gradient_s']:>10.2f}{r['step_s']:>7.2f}{r['update_s']:>8.2f}"
          f"{r['step_conv_n']:>7d}{r['step_conv_gflop']:>7.0f}{r['step_conv_s']:>7.2f}"
          f"{r['step_dot_n']:>9d}{r['step_dot_gflop']:>7.0f}{r['step_dot_s']:>7.2f}"
          f"{gflop / seconds:>9.0f}{r['step_s'] - seconds:>7.2f}", flush=True)


def main(argv: List[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
  parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--remat", action="store_true",
                      help="gradient checkpointing of the U-Net blocks (model.remat)")
  parser.add_argument("--microbatches", type=int, default=1,
                      help="gradient accumulation over this many micro-batches "
                      "(training.microbatches; must divide 8)")
  parser.add_argument("--xla-flags", default="",
                      help="extra XLA_FLAGS for the measuring processes, given with '=' as the\n"
                      "value starts with '--', e.g. --xla-flags=--xla_backend_optimization_level=1\n"
                      "(faster compile); one that sets\n"
                      "a flag of score_jax's CPU defaults replaces that default (" +
                      ", ".join(f"{n}={v}" for n, v in _xla_flags.DEFAULTS) +
                      "; see score_jax/run/xla_flags.py)")
  parser.add_argument("--compile-cache", action="store_true",
                      help="only time the batch-8 step's compilation, cold and then again from\n"
                      "main.py's compilation cache (a fresh temporary folder)")
  parser.add_argument("--breakdown", action="store_true",
                      help="split the batch-8 step's time: forward, gradient, whole step, and the\n"
                      "step's convolutions and matrix products each timed alone (summed)")
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child-process mode
  parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)  # with --one
  args = parser.parse_args(argv)

  if args.one and args.cache_dir:
    print(json.dumps(compile_through_cache(args.one, args.cache_dir)))
    return
  if args.one and args.breakdown:
    print(json.dumps(breakdown(args.one, args.steps)))
    return
  if args.one:
    print(json.dumps(bench_one(args.one, args.steps, args.dtype, args.remat, args.microbatches)))
    return

  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "").split()
  for name, value in _xla_flags.DEFAULTS:  # the caller's choice replaces score_jax's default
    if name in args.xla_flags:
      flags = [f for f in flags if f != f"--{name}={value}"]
  env["XLA_FLAGS"] = " ".join(flags + args.xla_flags.split())
  env[_xla_flags.OPT_OUT] = "0"  # the children run with exactly env["XLA_FLAGS"]
  load = os.getloadavg()[0]
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPU cores "
        f"(load average {load:.1f}), dtype {args.dtype}, {args.steps} timed steps, "
        f"remat {args.remat}, microbatches {args.microbatches}, XLA_FLAGS={env['XLA_FLAGS']!r}")
  if args.compile_cache:
    _compile_cache_table(args.configs, env)
    return
  print(f"float32 matmul (2048 x 2048) on this machine: {matmul_gflops():.0f} GFLOP/s")
  if args.breakdown:
    _breakdown_table(args.configs, args.steps, env)
    return
  header = (f"{'network':<14}{'params':>9}{'compile s':>11}{'s/step b8':>11}{'cpu-s b8':>10}"
            f"{'GFLOP b8':>10}{'GFLOP/s b8':>12}{'s/step b32':>12}{'img/s b32':>11}{'s/eval b64':>12}{'step GB b8':>12}"
            f"{'step GB b32':>13}{'peak GB':>9}")
  print(header)
  for name in args.configs:
    r = _child(["--one", name, "--steps", str(args.steps), "--dtype", args.dtype,
                "--microbatches", str(args.microbatches)] + ["--remat"] * args.remat, env)
    if r is None:
      continue
    print(f"{name:<14}{r['params_M']:>8.2f}M{r['compile_s']:>11.1f}{r['step_s_b8']:>11.2f}"
          f"{r['step_cpu_s_b8']:>10.2f}{r['gflop_b8']:>10.0f}{r['gflop_b8'] / r['step_s_b8']:>12.0f}"
          f"{r['step_s_b32']:>12.2f}{32 / r['step_s_b32']:>11.2f}{r['eval_s_b64']:>12.2f}"
          f"{r.get('step_mem_gb_b8', math.nan):>12.2f}{r.get('step_mem_gb_b32', math.nan):>13.2f}"
          f"{r['peak_rss_gb']:>9.2f}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
