"""Cost of the JVP train steps (few-step generators) against the plain diffusion step.

MeanFlow (training.objective = 'meanflow') and the continuous-time consistency models
(sCT / sCD) differentiate the network along the trajectory with jax.jvp inside the loss,
so their train step runs the network forward, its tangent, and the backward pass of both.
The goal: such a step costs at most 2x the time and 1.5x the memory of the plain
diffusion step ('denoising') of the same network. This script measures both on this
machine, for each network in float32 and bfloat16 compute (model.dtype).

Every row is the library's own jitted train step (score_jax.run.plan.make_plan +
score_jax.run.train.make_train_step, as main.py builds it: loss, backward, clipping,
Adam, EMA) from the network's config with the objective's overrides (OBJECTIVES below).
  ms/step  median wall time of --steps steps after compiling and one warm-up step (each
           step blocked on with block_until_ready), and its ratio ('x') to 'denoising'; the
           objectives of a table's network and dtype are timed in turns, a step each, so
           that a change in the machine's load reaches them alike;
  CPU ms/step  the same steps' median CPU time (all threads of this process): on shared
           cores it changes less than wall time with the other processes' load;
  temp MB  XLA's temporary buffers of the compiled step (memory_analysis()
           temp_size_in_bytes): the activations kept for the backward pass, the part the
           objective changes;
  total MB temp + arguments + outputs - aliased (the donated train state counted once):
           what the step needs on the device; the state (parameters, Adam moments, EMA) is
           the same for every objective, so this ratio is closer to 1 than temp's.

Networks (--size=cpu, the default: the CIFAR-10 configs' networks made small, so that the
whole run takes ~3 minutes on 2 CPU cores; --size=cifar: the configs' own sizes, for an
accelerator):
  song_unet  configs/edm_cifar_vp.py (SongUNet, EDM's DDPM++), augmentation off,
  ddpmpp     configs/vp_cifar.py (NCSN++ code with the DDPM++ settings),
  ncsnpp     configs/ve_cifar.py (NCSN++: FIR resampling, progressive input/output),
  mlp        configs/toy.py (the 2-D toy's MLP).
The baseline row 'denoising' is each config's own diffusion step (continuous DSM; EDM's
preconditioning and weighting for SongUNet; model.second_time off); the JVP rows switch the objective and what it needs (MeanFlow: the rectified-flow
path and the second time input).

Usage:
  python benchmarks/bench_jvp.py                          # CPU sizes, all networks
  python benchmarks/bench_jvp.py --size=cifar --steps 10  # on an accelerator
  python benchmarks/bench_jvp.py --networks ddpmpp --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from score_jax.run import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # main.py's CPU compiler settings, before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import edm_cifar_vp, toy, ve_cifar, vp_cifar  # noqa: E402
from score_jax.errors import ConfigError  # noqa: E402
from score_jax.run import plan as plan_lib  # noqa: E402
from score_jax.run import settings  # noqa: E402
from score_jax.run import state as run_state  # noqa: E402
from score_jax.run import train  # noqa: E402

import _objectives  # noqa: E402
from accelerator import _host_params  # noqa: E402  (parameters drawn on the host)
from _objectives import OBJECTIVES, Objective  # noqa: E402


def _small_image_net(config, nf: int = 16):
  """A CIFAR-10 config's network at CPU size: 16x16 images, one resolution with one residual
  block and attention (with two resolutions XLA's CPU compiler takes about a minute per step
  on shared cores)."""
  config.data.image_size = 16
  config.model.nf = nf
  config.model.ch_mult = (1,)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (16,)
  return config


def _song_unet():
  config = edm_cifar_vp.get_config()
  config.data.augment_p = 0.0  # MeanFlow's networks take no augmentation labels
  config.model.augment_dim = 0
  config.data.random_flip = True
  return config


def _small_mlp():
  config = toy.get_config()
  config.model.hidden_sizes = (128, 128, 128)
  return config


# name -> (config at --size=cifar, config at --size=cpu, default batch at each size).
NETWORKS: Dict[str, Tuple[Callable[[], Any], Callable[[], Any], Tuple[int, int]]] = {
    "song_unet": (_song_unet, lambda: _small_image_net(_song_unet()), (128, 8)),
    "ddpmpp": (vp_cifar.get_config, lambda: _small_image_net(vp_cifar.get_config()), (128, 8)),
    "ncsnpp": (ve_cifar.get_config, lambda: _small_image_net(ve_cifar.get_config()), (128, 8)),
    "mlp": (toy.get_config, _small_mlp, (4096, 512)),
}


def network_config(network: str, size: str, objective: Objective, dtype: str, batch: int):
  """The network's config at `size` with the objective's overrides, dtype and batch."""
  cifar, cpu, _ = NETWORKS[network]
  config = (cifar if size == "cifar" else cpu)()
  _objectives.apply(config, objective)
  config.model.dtype = dtype
  config.training.batch_size = batch
  return config


class Step:
  """The library's train step for a config, compiled, with its inputs; call() runs one step."""

  def __init__(self, config):
    """Raises ConfigError where the settings reject the config."""
    setup = plan_lib.make_plan(settings.from_config(config), need_data=False)
    step_fn = train.make_train_step(setup)
    data_shape = tuple(setup.data.shape(1))[1:]  # [2] for the toy data, else [H, W, C]
    batch = config.training.batch_size
    params = _host_params(setup.model, (1,) + data_shape)
    self.state = run_state.TrainState(step=jnp.int32(0), params=params,
                                      opt_state=setup.tx.init(params),
                                      ema_params=jax.tree_util.tree_map(jnp.copy, params))
    rng = np.random.default_rng(1)
    self.x = jax.device_put(rng.uniform(-1, 1, size=(batch,) + data_shape).astype(np.float32),
                            setup.batch_sharding)
    self.y = jax.device_put(np.zeros((batch,), np.int32), setup.batch_sharding)
    self.key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    self.compiled = step_fn.lower(self.state, self.x, self.y, self.key).compile()
    self.compile_s = time.perf_counter() - t0
    self.metrics = None
    self.wall, self.cpu = [], []
    self.call()  # warm-up, not recorded
    self.wall, self.cpu = [], []

  def call(self) -> None:
    """One step (the state is donated: the next call continues from it), timed."""
    t0, c0 = time.perf_counter(), time.process_time()
    self.state, self.metrics = self.compiled(self.state, self.x, self.y, self.key)
    jax.block_until_ready((self.state, self.metrics))
    self.wall.append(time.perf_counter() - t0)
    self.cpu.append(time.process_time() - c0)

  def result(self) -> Dict[str, float]:
    """{'ms': median wall ms/step, 'cpu_ms': median CPU ms/step (all threads), 'temp_mb',
    'total_mb', 'compile_s', 'loss'}."""
    loss = float(self.metrics["loss"])
    if not (bool(self.metrics["finite"]) and math.isfinite(loss)):
      raise FloatingPointError(f"non-finite loss {loss}")
    out = {"ms": 1e3 * float(np.median(self.wall)), "cpu_ms": 1e3 * float(np.median(self.cpu)),
           "compile_s": self.compile_s, "loss": loss, "temp_mb": math.nan, "total_mb": math.nan}
    mem = self.compiled.memory_analysis()
    if mem is not None:
      out["temp_mb"] = mem.temp_size_in_bytes / 1e6
      out["total_mb"] = (mem.temp_size_in_bytes + mem.argument_size_in_bytes +
                         mem.output_size_in_bytes - mem.alias_size_in_bytes) / 1e6
    return out


def measure(configs: Dict[str, Any], steps: int) -> Dict[str, Any]:
  """{name: Step.result() or the ConfigError} of the configs' train steps.

  All are compiled first, then timed in `steps` rounds of one step each, so that a change
  in the machine's load (other processes on shared cores) reaches every objective alike
  and the ratios stay meaningful.
  """
  built: Dict[str, Any] = {}
  for name, config in configs.items():
    try:
      built[name] = Step(config)
    except ConfigError as e:
      built[name] = e
  runs = [b for b in built.values() if isinstance(b, Step)]
  for _ in range(steps):
    for b in runs:
      b.call()
  return {name: b.result() if isinstance(b, Step) else b for name, b in built.items()}


def _commit() -> str:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    out = subprocess.run(["git", "-C", root, "log", "-1", "--format=%h %cs"], capture_output=True,
                         text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
    return out + (" (with uncommitted changes)" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _row(objective: str, dtype: str, r: Optional[Dict[str, float]],
         base: Optional[Dict[str, float]], note: str = "") -> str:
  if r is None:
    return f"| {objective} | {dtype} | - | - | - | - | - | - | - | - | {note} |"
  ratio = lambda k: f"{r[k] / base[k]:.2f}" if base and base[k] > 0 else "-"
  return (f"| {objective} | {dtype} | {r['ms']:.1f} | {ratio('ms')} | {r['cpu_ms']:.1f} | "
          f"{ratio('cpu_ms')} | {r['temp_mb']:.1f} | "
          f"{ratio('temp_mb')} | {r['total_mb']:.1f} | {ratio('total_mb')} | "
          f"compile {r['compile_s']:.0f} s{'; ' + note if note else ''} |")


def main(argv: List[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="cpu", choices=["cpu", "cifar"])
  parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
  parser.add_argument("--objectives", nargs="+", default=[o.name for o in OBJECTIVES],
                      choices=[o.name for o in OBJECTIVES])
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                      choices=["float32", "bfloat16"])
  parser.add_argument("--batch", type=int, default=0,
                      help="global batch (default: 8 (MLP 512) at --size=cpu, 128 (MLP 4096) at "
                      "--size=cifar)")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per row (median)")
  args = parser.parse_args(argv)

  print(f"commit {_commit()}; jax {jax.__version__}; devices {jax.devices()}; "
        f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f}); size {args.size}; "
        f"median of {args.steps} steps")
  objectives = [o for o in OBJECTIVES if o.name in args.objectives]
  for network in args.networks:
    batch = args.batch or NETWORKS[network][2][0 if args.size == "cifar" else 1]
    print(f"\n{network} (batch {batch})\n")
    print("| objective | dtype | ms/step | x | CPU ms/step | x | temp MB | x | total MB | x | |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
      results = measure({o.name: network_config(network, args.size, o, dtype, batch)
                         for o in objectives}, args.steps)
      base = results.get(OBJECTIVES[0].name)
      for objective in objectives:
        r = results[objective.name]
        if isinstance(r, ConfigError):
          if not objective.optional:
            raise r
          print(_row(objective.name, dtype, None, None,
                     f"skipped: the settings reject it ({str(r).splitlines()[0][:120]})"),
                flush=True)
          continue
        print(_row(objective.name, dtype, r, base), flush=True)

if __name__ == "__main__":
  main(sys.argv[1:])
