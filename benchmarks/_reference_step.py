"""Times the 2021 PyTorch reference's training step; run by a Python that has torch.

benchmarks/bench_reference.py starts this script with the torch Python given
by --torch_python (torch and the reference are not dependencies of
score_jax) and talks to it over stdin/stdout, one JSON object a line:

  started with: --reference PATH --module configs.vp.cifar10_ddpmpp_continuous
                --overrides JSON --batch B --threads N --cpus 0,1 --warmup W
  it prints:    {"ready": true, "params": ..., "build_s": ..., "first_step_s": ...}
  then reads:   {"steps": K}   -> {"times": [...], "cpu": [...]}: wall and CPU
                                  seconds (all threads) of K training steps
                {"steps": K, "part": "forward" | "gradient"}: the same for the
                                  step's loss alone (training mode, autograd on), or
                                  the loss and its backward pass
                {"flops": 1}   -> {"flops": F}, one step under torch's FLOP counter
                {"quit": 1}    -> exits

The step is the reference's own `losses.get_step_fn(train=True)` with its
`optimization_manager` (forward, the config's loss, backward, warm-up lr,
gradient clipping, Adam, then `ExponentialMovingAverage.update`), on the
network `models.utils.create_model` builds, as its run_lib.train does. The
reference's `op/` package compiles CUDA kernels when it is imported; on CPU
its upfirdn2d takes the pure-PyTorch path (`upfirdn2d_native`) and never calls
them, so `torch.utils.cpp_extension.load` is replaced by a stub while the
reference's modules are imported. Nothing else is changed.
"""

import argparse
import importlib
import json
import os
import sys
import time


def _import_reference(path):
  """The reference's modules from checkout `path`, with its CUDA extensions left unbuilt."""
  import torch.utils.cpp_extension as cpp_extension  # noqa: PLC0415

  class Unbuilt:
    def __init__(self, name):
      self.name = name

    def __getattr__(self, attr):
      raise RuntimeError(f"{self.name}.{attr}: the reference's CUDA op is not built on CPU")

  sys.path.insert(0, os.path.abspath(path))
  load, cpp_extension.load = cpp_extension.load, lambda name, *a, **k: Unbuilt(name)
  try:
    return {name: importlib.import_module(name) for name in (
        "op", "models.ncsnpp", "models.ddpm", "models.utils", "models.ema", "losses", "sde_lib")}
  finally:
    cpp_extension.load = load


def _config(module, overrides, batch):
  """The reference config `module` with score_jax's values for the keys both have."""
  config = importlib.import_module(module).get_config()
  if not importlib.import_module(module).__file__.startswith(sys.path[0]):
    raise ImportError(f"{module} was not found in the reference checkout {sys.path[0]} "
                      "(another configs package is on the path: unset PYTHONPATH)")
  for key, value in overrides.items():
    section, name = key.split(".")
    old = config[section][name]
    if isinstance(old, (tuple, list)):
      value = type(old)(value)
    elif isinstance(old, float):
      value = float(value)
    elif isinstance(old, int) and not isinstance(old, bool) and float(value) == int(value):
      value = int(value)  # e.g. fourier_scale: 16 there, 16.0 in score_jax
    config[section][name] = value
  config.training.batch_size = batch
  import torch  # noqa: PLC0415
  config.device = torch.device("cpu")
  return config


def _sde(sde_lib, config):
  """The SDE as the reference's run_lib.train builds it."""
  name, m = config.training.sde.lower(), config.model
  if name == "vpsde":
    return sde_lib.VPSDE(beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales)
  if name == "subvpsde":
    return sde_lib.subVPSDE(beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales)
  return sde_lib.VESDE(sigma_min=m.sigma_min, sigma_max=m.sigma_max, N=m.num_scales)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reference", required=True)
  parser.add_argument("--module", required=True)
  parser.add_argument("--overrides", default="{}")
  parser.add_argument("--batch", type=int, required=True)
  parser.add_argument("--threads", type=int, required=True)
  parser.add_argument("--cpus", default="")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.cpus:
    os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415
  torch.set_num_threads(args.threads)
  torch.set_num_interop_threads(1)
  torch.manual_seed(args.seed)

  t0 = time.perf_counter()
  mods = _import_reference(args.reference)
  config = _config(args.module, json.loads(args.overrides), args.batch)
  model = mods["models.utils"].create_model(config)
  ema = mods["models.ema"].ExponentialMovingAverage(model.parameters(),
                                                    decay=config.model.ema_rate)
  optimizer = mods["losses"].get_optimizer(config, model.parameters())
  state = dict(optimizer=optimizer, model=model, ema=ema, step=0)
  step_fn = mods["losses"].get_step_fn(
      _sde(mods["sde_lib"], config), train=True,
      optimize_fn=mods["losses"].optimization_manager(config),
      reduce_mean=config.training.reduce_mean, continuous=config.training.continuous,
      likelihood_weighting=config.training.likelihood_weighting)
  size, ch = config.data.image_size, config.data.num_channels
  x = np.random.default_rng(1).uniform(size=(args.batch, ch, size, size)).astype(np.float32)
  batch = torch.from_numpy(2 * x - 1 if config.data.centered else x)  # its data scaler
  build_s = time.perf_counter() - t0

  def step():
    loss = step_fn(state, batch)
    if not torch.isfinite(loss):
      raise FloatingPointError(f"non-finite loss {float(loss)} at step {state['step']}")

  # The step's loss (get_step_fn builds the same one for continuous training).
  loss_fn = mods["losses"].get_sde_loss_fn(
      _sde(mods["sde_lib"], config), train=True, reduce_mean=config.training.reduce_mean,
      continuous=True, likelihood_weighting=config.training.likelihood_weighting)

  def gradient():
    optimizer.zero_grad()
    loss_fn(model, batch).backward()

  parts = {"step": step, "forward": lambda: loss_fn(model, batch), "gradient": gradient}

  t0 = time.perf_counter()
  step()
  first_step_s = time.perf_counter() - t0
  for _ in range(args.warmup - 1):
    step()
  params = sum(p.numel() for p in model.parameters())
  print(json.dumps({"ready": True, "params": params, "build_s": build_s,
                    "first_step_s": first_step_s, "torch": torch.__version__,
                    "threads": torch.get_num_threads()}), flush=True)
  for line in sys.stdin:
    request = json.loads(line)
    if "steps" in request:
      run = parts[request.get("part", "step")]
      times, cpu = [], []
      for _ in range(request["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
      print(json.dumps({"times": times, "cpu": cpu}), flush=True)
    elif "flops" in request:
      from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415
      with FlopCounterMode(display=False) as counter:
        step()
      print(json.dumps({"flops": counter.get_total_flops()}), flush=True)
    else:
      return


if __name__ == "__main__":
  main()
