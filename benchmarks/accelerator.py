"""One command for a first look at an accelerator: training, sampling, eval and input speed.

  python benchmarks/accelerator.py                    # ~10 minutes on one GPU / TPU host
  python benchmarks/accelerator.py --only train,sample --time-budget-s 300
  python benchmarks/accelerator.py --tiny --out /tmp/acc   # the same code paths, ~1 min on CPU

On whatever backend JAX sees it measures, in this order (most informative first):
  pipeline   score_jax's input pipeline alone (synthetic uint8 images in memory,
             make_batches with the CIFAR-10 configs' flip + centering, put on the
             device 2 batches ahead by datasets.Prefetch), 32 px and 256 px;
  train      training images/s of DDPM++ cont. (configs/vp_cifar.py) and NCSN++
             cont. (configs/ve_cifar.py), float32 and bfloat16 compute
             (model.dtype), per-device batch 128, then 512 (256 if 512 runs out
             of memory); the library's train step (forward, DSM loss, backward,
             clipping, Adam, EMA), compile time, peak device memory, XLA's FLOP
             count of the compiled step and MFU against the chip's peak;
  dit        DiT-XL/2 training on 32x32x4 latents (configs/imagenet256_dit_xl2.py,
             class-conditional, 675M parameters), bfloat16 compute, per-device batch
             32 (DiT's 256 on 8 GPUs), with training.sharding = 'replicated' and
             'fsdp' (parameters, EMA and Adam state split over all devices: on one
             device the same program plus the sharding constraints);
  jvp        the train steps that differentiate the network with jax.jvp (the
             few-step generators: MeanFlow and sCT; benchmarks/_objectives.py) of
             DDPM++ at per-device batch 128, float32 and bfloat16, beside the
             plain step above: the same figures, and the ratios time_ratio,
             memory_ratio (XLA's memory plan) and peak_memory_ratio to the plain step's (the goal: at most 2x the
             time and 1.5x the memory). An objective the settings reject is
             recorded as skipped;
  sample     DPM-Solver++ (2M, 20 NFE) with DDPM++ and PC (reverse diffusion +
             Langevin, snr 0.16) with NCSN++, batch 1024 per device; PC is timed
             over 100 steps and reported per 1000 steps (the paper's N);
  inception  FID Inception pool features of 32 px uint8 images (random weights:
             speed does not depend on them), batch 500 per device;
  bpd        bits/dim of one batch (64 per device) with DDPM++ along the
             probability-flow ODE, rtol = atol = 1e-5, Hutchinson (Rademacher).
Network parameters are random (drawn on the host: nothing but the measured
programs is compiled), so the ODE's NFE in `bpd` is not a trained model's;
it is recorded with the rate.

Each measurement runs in its own process (peak device memory is per
process and an out-of-memory failure stays contained; --one-process runs
them all in one, as --tiny does, and then peak_memory_gb is the process's
peak so far). The processes may use 90% of the device memory
(XLA_PYTHON_CLIENT_MEM_FRACTION, unless set) and compile without a
persistent compilation cache (compile_s is a cold compile). Results go,
after EVERY measurement, to OUT/<device_kind>.json (a list of records) and
OUT/<device_kind>.md (a table), so a run that is cut off keeps what it
finished; --time-budget-s stops the run (killing a measurement in flight)
when the budget is spent and records what was not run.

--tiny (tiny networks: 8x8 images, nf 8, one resolution; batches 2 and 8 -> 4;
PC timed over 5 steps; XLA's CPU optimizer at level 0) runs every code path
in about a minute on 2 CPU cores; its figures mean nothing and go to
OUT/<device_kind>-tiny.json. CPU is not in the peak table, so its MFU is null.

Record fields: name, network, config, dtype, batch (global), per_device_batch,
images_per_s, step_s, compile_s, flops_per_step (XLA's cost analysis of the
compiled, per-device program; flops_per_step_lowered: of the program before
optimization, for comparison), mfu, peak_flops (and peak_basis: bf16, tf32 or
fp32: float32 convolutions and matrix products run as TF32 on NVIDIA GPUs
from Ampere on and as one bf16 pass on TPUs under JAX's default precision),
peak_memory_gb (device.memory_stats()['peak_bytes_in_use'], null where the
backend has none, e.g. CPU), step_memory_gb (XLA's memory plan of the
program), nfe, error (out-of-memory and other failures are recorded, and the
run goes on).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
if HERE not in sys.path:
  sys.path.insert(0, HERE)

KINDS = ("pipeline", "train", "jvp", "dit", "sample", "inception", "bpd")
_RECORD = "@@accelerator "  # prefix of the child's machine-readable lines

# ---------------------------------------------------------------------------
# Peak dense FLOP/s per device (no structured sparsity), in TFLOP/s.
# GPUs: NVIDIA's datasheets (H100 / H200 / GH200 / A100 / V100 / L4 / L40S / A10
# Tensor Core GPU datasheets, which quote TF32 and BF16 "with sparsity": the
# dense figure is half of that). TPUs: Google Cloud's TPU system-architecture
# pages (peak bf16 per chip; a JAX device is a chip from v4 on and a TensorCore,
# half a chip, on v2/v3). TPUs have no separate f32 rate: under JAX's default
# precision an f32 matrix product is one bf16 pass on the MXU, so f32 MFU is
# against the bf16 peak. V100 and T4 have no bf16 units (XLA computes bf16
# through f32 there): no bf16 peak, so no bf16 MFU.
# (patterns that must all appear in the lower-cased device_kind, name, bf16, tf32, fp32)
PEAK_TFLOPS: List[Tuple[Tuple[str, ...], str, Optional[float], Optional[float], float]] = [
    (("gh200",), "GH200", 989.5, 494.5, 67.0),
    (("h200", "nvl"), "H200 NVL", 835.5, 417.5, 60.0),
    (("h200",), "H200 SXM", 989.5, 494.5, 67.0),
    (("h100", "pcie"), "H100 PCIe", 756.5, 378.0, 51.0),
    (("h100", "nvl"), "H100 NVL", 835.5, 417.5, 60.0),
    (("h100",), "H100 SXM", 989.5, 494.5, 67.0),
    (("a100",), "A100", 312.0, 156.0, 19.5),
    (("v100", "pcie"), "V100 PCIe", None, None, 14.0),
    (("v100",), "V100 SXM2", None, None, 15.7),
    (("l40s",), "L40S", 362.0, 183.0, 91.6),
    (("l4",), "L4", 121.0, 60.0, 30.3),
    (("a10",), "A10", 125.0, 62.5, 31.2),
    (("t4",), "T4", None, None, 8.1),
    (("tpu v2",), "TPU v2 (per core)", 22.5, None, 22.5),
    (("tpu v3",), "TPU v3 (per core)", 61.5, None, 61.5),
    (("tpu v4",), "TPU v4", 275.0, None, 275.0),
    (("tpu v5 lite",), "TPU v5e", 197.0, None, 197.0),
    (("tpu v5e",), "TPU v5e", 197.0, None, 197.0),
    (("tpu v5p",), "TPU v5p", 459.0, None, 459.0),
    (("tpu v5",), "TPU v5p", 459.0, None, 459.0),
    (("tpu v6 lite",), "TPU v6e", 918.0, None, 918.0),
    (("tpu v6e",), "TPU v6e", 918.0, None, 918.0),
]


def chip_peak(device_kind: str) -> Optional[Dict[str, Any]]:
  """{'name', 'bf16', 'tf32', 'fp32'} in FLOP/s for a known device_kind, else None."""
  kind = device_kind.lower()
  for patterns, name, bf16, tf32, fp32 in PEAK_TFLOPS:
    # Whole words, so that 'a10' is neither 'a100' nor 'a10g' and 'l4' is not 'l40s'.
    if all(re.search(rf"(?<![a-z0-9]){re.escape(p)}(?![a-z0-9])", kind) for p in patterns):
      scale = lambda v: None if v is None else v * 1e12
      return {"name": name, "bf16": scale(bf16), "tf32": scale(tf32), "fp32": scale(fp32)}
  return None


def peak_for(peak: Optional[Dict[str, Any]], dtype: str, platform: str,
             matmul_precision: Optional[str]) -> Tuple[Optional[float], Optional[str]]:
  """(peak FLOP/s, basis) a computation in `dtype` is measured against."""
  if peak is None:
    return None, None
  if dtype == "bfloat16":
    return peak["bf16"], "bf16"
  exact_f32 = str(matmul_precision).lower() in ("highest", "float32")
  if platform == "gpu" and peak["tf32"] is not None and not exact_f32:
    return peak["tf32"], "tf32"
  return peak["fp32"], "fp32"


# ---------------------------------------------------------------------------
# The plan: which measurements, in which order.

FULL = dict(dit_batch=32, train_batch=128, train_big=(512, 256), sample_batch=1024, pc_steps=100,
            dpm_nfe=20, inception_batch=500, bpd_batch=64, train_steps=10,
            pipeline_seconds=2.0, pipeline_examples={32: 50_000, 256: 1024})
TINY = dict(dit_batch=2, train_batch=2, train_big=(8, 4), sample_batch=4, pc_steps=5, dpm_nfe=20,
            inception_batch=2, bpd_batch=2, train_steps=2, pipeline_seconds=0.3,
            pipeline_examples={32: 2048, 256: 64})
NETWORKS = {"ddpmpp": "configs/vp_cifar.py", "ncsnpp": "configs/ve_cifar.py",
            "dit_xl2": "configs/imagenet256_dit_xl2.py"}
UNET_NETWORKS = ("ddpmpp", "ncsnpp")  # the `train` units; DiT-XL/2 is the `dit` kind's
JVP_NETWORK = "ddpmpp"
JVP_OBJECTIVES = ("meanflow", "sct")  # entries of benchmarks/_objectives.py


def plan(kinds: List[str], tiny: bool) -> List[Dict[str, Any]]:
  """The measurements in run order. A unit with 'if_oom' runs only if that unit ran out of memory."""
  p = TINY if tiny else FULL
  units: List[Dict[str, Any]] = []

  def train(network, dtype, batch, if_oom=None, objective="denoising", sharding="replicated"):
    what = network if objective == "denoising" else f"{network}-{objective}"
    what = what if sharding == "replicated" else f"{what}-{sharding}"
    units.append({"id": f"train-{what}-{dtype}-{batch}", "kind": "train", "network": network,
                  "dtype": dtype, "per_device_batch": batch, "if_oom": if_oom,
                  "objective": objective, "sharding": sharding})

  if "pipeline" in kinds:
    for size in (32, 256):
      units.append({"id": f"pipeline-{size}", "kind": "pipeline", "size": size})
  if "train" in kinds:  # batch 128 of everything first, the large batches last
    for network in UNET_NETWORKS:
      for dtype in ("float32", "bfloat16"):
        train(network, dtype, p["train_batch"])
  if "jvp" in kinds:  # beside the plain step of the same network, dtype and batch
    for objective in JVP_OBJECTIVES:
      for dtype in ("float32", "bfloat16"):
        train(JVP_NETWORK, dtype, p["train_batch"], objective=objective)
  if "dit" in kinds:
    for sharding in ("replicated", "fsdp"):
      train("dit_xl2", "bfloat16", p["dit_batch"], sharding=sharding)
  if "sample" in kinds:
    units.append({"id": "sample-dpm", "kind": "sample", "sampler": "dpm_solver++",
                  "network": "ddpmpp"})
    units.append({"id": "sample-pc", "kind": "sample", "sampler": "pc", "network": "ncsnpp"})
  if "inception" in kinds:
    units.append({"id": "inception", "kind": "inception"})
  if "bpd" in kinds:
    units.append({"id": "bpd", "kind": "bpd", "network": "ddpmpp"})
  if "train" in kinds:
    big, fallback = p["train_big"]
    for network in UNET_NETWORKS:
      for dtype in ("bfloat16", "float32"):
        first = f"train-{network}-{dtype}-{big}"
        train(network, dtype, big)
        train(network, dtype, fallback, if_oom=first)
  return units


# ---------------------------------------------------------------------------
# Child side: the measurements. Imports of JAX happen here only, so that the
# parent never holds the device.


def library_train_step(config):
  """(plan, jitted train step, TrainState) as score_jax's training loop builds them."""
  from score_jax.run import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from score_jax.run import settings, train  # pylint: disable=g-import-not-at-top
  from score_jax.run import state as run_state  # pylint: disable=g-import-not-at-top
  plan = plan_lib.make_plan(settings.from_config(config), need_data=False)
  return plan, train.make_train_step(plan), run_state.TrainState


def network_config(network: str, tiny: bool, dtype: str = "float32", batch: int = 8,
                   num_scales: Optional[int] = None, objective: str = "denoising"):
  """The paper config of `network` (NETWORKS), made tiny with --tiny, with the train
  objective's overrides (benchmarks/_objectives.py)."""
  import _objectives  # pylint: disable=g-import-not-at-top
  from configs import imagenet256_dit_xl2, ve_cifar, vp_cifar  # pylint: disable=g-import-not-at-top
  config = {"ddpmpp": vp_cifar, "ncsnpp": ve_cifar,
            "dit_xl2": imagenet256_dit_xl2}[network].get_config()
  _objectives.apply(config, _objectives.get(objective))
  config.model.dtype = dtype
  config.training.batch_size = batch
  if num_scales is not None:
    config.model.num_scales = num_scales
  if tiny and network == "dit_xl2":  # the same DiT code: width 32, one block, 8x8 latents
    config.data.image_size = 8
    config.model.hidden_size, config.model.depth, config.model.num_heads = 32, 1, 2
  elif tiny:  # the same networks' code, one resolution, 8 channels, 8x8 images
    config.data.image_size = 8
    config.model.nf = 8
    config.model.ch_mult = (1,)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
  return config


def _host_params(model, shape, seed=0):
  """Random parameters drawn on the host (scaled normal), shaped by jax.eval_shape of init."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from score_jax import models  # pylint: disable=g-import-not-at-top

  shapes = jax.eval_shape(lambda r: models.init_model(r, model, shape), jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)

  def draw(s):
    scale = 1.0 / math.sqrt(math.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.1
    return jnp.asarray(rng.normal(size=s.shape) * scale, jnp.float32)

  return jax.tree_util.tree_map(draw, shapes)["params"]


def _flops(stage) -> Optional[float]:
  """XLA's FLOP count of a Lowered or Compiled program (None where the backend has none)."""
  try:
    cost = stage.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  value = (cost or {}).get("flops")
  return float(value) if value is not None and value > 0 else None


def _planned_gb(compiled) -> Optional[float]:
  try:
    mem = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return None
  if mem is None:
    return None
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
           - mem.alias_size_in_bytes)
  return total / 1e9


def _peak_gb() -> Optional[float]:
  import jax  # pylint: disable=g-import-not-at-top
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    return None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 1e9


def is_oom(error: BaseException) -> bool:
  text = f"{type(error).__name__}: {error}".lower()
  return any(s in text for s in ("resource_exhausted", "resource exhausted", "out of memory",
                                 "oom when allocating", "failed to allocate"))


def _random_images(shape, centered: bool, seed: int = 1):
  import numpy as np  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(seed).uniform(size=shape).astype(np.float32)
  return x * 2.0 - 1.0 if centered else x


def _timed_calls(call, min_seconds: float = 2.0, max_calls: int = 3) -> Tuple[float, Any]:
  """(seconds of one call, last output): one call; if it was short, the best of up to
  max_calls more (the first call after compiling can carry one-time costs)."""
  import jax  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  out = jax.block_until_ready(call())
  best = time.perf_counter() - t0
  if best < min_seconds:
    for _ in range(max_calls - 1):
      t0 = time.perf_counter()
      out = jax.block_until_ready(call())
      best = min(best, time.perf_counter() - t0)
  return best, out


class Context:
  """What every measurement needs: the options, the device and its peak."""

  def __init__(self, tiny: bool, train_steps: int, simulate_oom_batch: int = 0):
    import jax  # pylint: disable=g-import-not-at-top
    self.tiny = tiny
    self.p = dict(TINY if tiny else FULL)
    if train_steps:
      self.p["train_steps"] = train_steps
    self.simulate_oom_batch = simulate_oom_batch
    device = jax.devices()[0]
    self.n_dev = jax.device_count()
    self.platform = device.platform
    self.device_kind = device.device_kind
    self.peak = chip_peak(self.device_kind)
    self.matmul_precision = jax.config.jax_default_matmul_precision

  def device_info(self) -> Dict[str, Any]:
    import jax  # pylint: disable=g-import-not-at-top
    return {"device_kind": self.device_kind, "platform": self.platform, "device_count": self.n_dev,
            "process_count": jax.process_count(), "jax": jax.__version__,
            "peak_name": self.peak["name"] if self.peak else None,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}

  def mfu(self, flops: Optional[float], seconds: float, dtype: str):
    """(MFU, peak FLOP/s, basis) of a program of `flops` per call taking `seconds` per call."""
    peak, basis = peak_for(self.peak, dtype, self.platform, self.matmul_precision)
    return mfu(flops, seconds, peak), peak, basis


def mfu(flops: Optional[float], seconds: float, peak: Optional[float]) -> Optional[float]:
  """Model FLOP utilization: flops per call / seconds per call / peak FLOP/s (None if unknown)."""
  if flops is None or peak is None or not seconds > 0:
    return None
  return flops / seconds / peak


def measure_train(unit: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  per_dev, dtype = unit["per_device_batch"], unit["dtype"]
  batch = per_dev * ctx.n_dev
  if ctx.simulate_oom_batch and per_dev >= ctx.simulate_oom_batch:
    raise MemoryError(f"RESOURCE_EXHAUSTED: simulated (--simulate-oom-batch "
                      f"{ctx.simulate_oom_batch}) at per-device batch {per_dev}")
  objective = unit.get("objective", "denoising")
  config = network_config(unit["network"], ctx.tiny, dtype, batch, objective=objective)
  config.training.sharding = unit.get("sharding", "replicated")
  try:
    setup, step_fn, train_state = library_train_step(config)
  except Exception as e:  # noqa: BLE001 - the settings' ConfigError
    import _objectives  # pylint: disable=g-import-not-at-top
    if type(e).__name__ != "ConfigError" or not _objectives.get(objective).optional:
      raise
    return {"skipped": True, "note": f"skipped: the settings reject training.objective = "
                                     f"{objective!r} ({str(e).splitlines()[0][:200]})"}
  size, ch = config.data.image_size, config.data.num_channels
  params = _host_params(setup.model, (1, size, size, ch))
  state = train_state(step=jnp.int32(0), params=params, opt_state=setup.tx.init(params),
                      ema_params=jax.tree_util.tree_map(jnp.copy, params))
  state = jax.device_put(state, setup.state_shardings(state))  # replicated, or split (fsdp)
  x = jax.device_put(_random_images((batch, size, size, ch), bool(config.data.centered)),
                     setup.batch_sharding)
  y = jax.device_put(np.zeros((batch,), np.int32), setup.batch_sharding)
  key = jax.random.PRNGKey(0)

  t0 = time.perf_counter()
  lowered = step_fn.lower(state, x, y, key)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  state, metrics = compiled(state, x, y, key)  # warm-up
  jax.block_until_ready(metrics["loss"])
  steps = ctx.p["train_steps"]
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, x, y, key)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - t0) / steps
  if not (bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))):
    raise FloatingPointError("non-finite loss in the timed steps")
  flops = _flops(compiled)
  flops_lowered = _flops(lowered)
  # A backend that leaves library calls (e.g. cuDNN convolutions) out of the
  # optimized program's count would understate MFU: fall back to the count
  # before optimization then, and say so.
  flops_basis = "compiled"
  if flops is None or (flops_lowered is not None and flops < 0.5 * flops_lowered):
    flops, flops_basis = flops_lowered, "lowered"
  mfu, peak, basis = ctx.mfu(flops, step_s, dtype)
  return {"images_per_s": batch / step_s, "step_s": step_s, "compile_s": compile_s,
          "flops_per_step": flops, "flops_per_step_lowered": flops_lowered,
          "flops_basis": flops_basis, "mfu": mfu, "peak_flops": peak, "peak_basis": basis,
          "step_memory_gb": _planned_gb(compiled), "steps_timed": steps,
          "loss": float(metrics["loss"])}


def _score_setup(network: str, ctx: Context, batch: int, num_scales: Optional[int] = None):
  """(setup, params, score(params) -> score_fn(x, t), config) of a network with random params."""
  from score_jax import models  # pylint: disable=g-import-not-at-top
  config = network_config(network, ctx.tiny, "float32", batch, num_scales)
  setup, _, _ = library_train_step(config)
  size, ch = config.data.image_size, config.data.num_channels
  params = _host_params(setup.model, (1, size, size, ch))
  continuous = bool(config.training.continuous)

  def score(p):
    base = models.get_score_fn(setup.sde, setup.model, {"params": p}, continuous=continuous)
    return lambda x, t: base(x, t)

  return setup, params, score, config


def measure_sample(unit: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  from score_jax.samplers.fast import dpm_solver_pp_sample  # pylint: disable=g-import-not-at-top
  from score_jax.samplers.pc import pc_sample  # pylint: disable=g-import-not-at-top

  batch = ctx.p["sample_batch"] * ctx.n_dev
  pc = unit["sampler"] == "pc"
  steps = ctx.p["pc_steps"] if pc else ctx.p["dpm_nfe"]
  setup, params, score, config = _score_setup(unit["network"], ctx, batch,
                                              num_scales=steps if pc else None)
  size, ch = config.data.image_size, config.data.num_channels
  shape = (batch, size, size, ch)
  nfe_box = []

  def run(p, key):
    if pc:
      x, nfe = pc_sample(key, setup.sde, score(p), shape, "reverse_diffusion", "langevin",
                         snr=0.16, n_steps=1, denoise=True, eps=1e-5)
    else:
      x, nfe = dpm_solver_pp_sample(key, setup.sde, score(p), shape, num_steps=steps, order=2)
    nfe_box.append(int(nfe))
    return x

  fn = jax.jit(run, out_shardings=setup.batch_sharding)
  key = jax.random.PRNGKey(3)
  t0 = time.perf_counter()
  compiled = fn.lower(params, key).compile()
  compile_s = time.perf_counter() - t0
  seconds, x = _timed_calls(lambda: compiled(params, key))
  if not bool(jax.numpy.isfinite(x).all()):
    raise FloatingPointError("non-finite samples")
  out = {"compile_s": compile_s, "nfe": nfe_box[-1], "step_memory_gb": _planned_gb(compiled),
         "seconds": seconds}
  if pc:  # timed over `steps` of N = 1000; the rate per 1000 steps is the paper's sampler
    per_1000 = seconds * 1000.0 / steps
    out.update(images_per_s=batch / per_1000, steps_timed=steps, seconds_per_1000_steps=per_1000,
               note=f"{steps} steps timed, rate per 1000 steps (NFE 2000)")
  else:
    out.update(images_per_s=batch / seconds, note=f"DPM-Solver++ 2M, {nfe_box[-1]} NFE")
  return {**out, "batch": batch, "per_device_batch": ctx.p["sample_batch"]}


def measure_inception(unit: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from score_jax.metrics import inception  # pylint: disable=g-import-not-at-top

  del unit
  batch = ctx.p["inception_batch"] * ctx.n_dev
  mesh = jax.make_mesh((ctx.n_dev,), ("data",))
  params = jax.device_put(inception.random_inception_params(0), NamedSharding(mesh, P()))
  images = jax.device_put(np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), np.uint8),
                          NamedSharding(mesh, P("data")))
  t0 = time.perf_counter()
  compiled = inception.inception_features.lower(params, images).compile()
  compile_s = time.perf_counter() - t0
  seconds, out = _timed_calls(lambda: compiled(params, images))
  if not bool(np.all(np.isfinite(np.asarray(out["pool"])))):
    raise FloatingPointError("non-finite features")
  flops = _flops(compiled)
  # Precision 'highest' (the FID default): true f32 arithmetic, against the f32 peak.
  peak = ctx.peak["fp32"] if ctx.peak is not None else None
  return {"images_per_s": batch / seconds, "step_s": seconds, "compile_s": compile_s,
          "flops_per_step": flops, "mfu": mfu(flops, seconds, peak), "peak_flops": peak,
          "peak_basis": "fp32" if peak else None,
          "step_memory_gb": _planned_gb(compiled), "batch": batch,
          "per_device_batch": ctx.p["inception_batch"], "dtype": "float32",
          "note": "32 px uint8 resized to 299, precision 'highest', resize tf1"}


def measure_bpd(unit: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from score_jax.likelihood import bits_per_dim  # pylint: disable=g-import-not-at-top

  batch = ctx.p["bpd_batch"] * ctx.n_dev
  setup, params, score, config = _score_setup(unit["network"], ctx, batch)
  size, ch = config.data.image_size, config.data.num_channels
  images = jax.device_put(np.random.default_rng(0).integers(0, 256, (batch, size, size, ch),
                                                           np.uint8), setup.batch_sharding)
  centered = bool(config.data.centered)

  def run(p, key, imgs):
    bpd, _, nfe = bits_per_dim(key, setup.sde, score(p), imgs, centered, hutchinson="rademacher",
                               rtol=1e-5, atol=1e-5)
    return bpd, nfe

  fn = jax.jit(run)
  key = jax.random.PRNGKey(4)
  t0 = time.perf_counter()
  compiled = fn.lower(params, key, images).compile()
  compile_s = time.perf_counter() - t0
  seconds, (bpd, nfe) = _timed_calls(lambda: compiled(params, key, images))
  bpd = np.asarray(bpd)
  if not np.all(np.isfinite(bpd)):
    raise FloatingPointError("non-finite bits/dim")
  return {"images_per_s": batch / seconds, "step_s": seconds, "compile_s": compile_s,
          "nfe": int(nfe), "step_memory_gb": _planned_gb(compiled), "batch": batch,
          "per_device_batch": ctx.p["bpd_batch"], "dtype": "float32",
          "mean_bpd": float(bpd.mean()),
          "note": f"rtol = atol = 1e-5, Rademacher, {int(nfe)} NFE (random parameters)"}


def measure_pipeline(unit: Dict[str, Any], ctx: Context) -> List[Dict[str, Any]]:
  import bench_pipeline  # pylint: disable=g-import-not-at-top

  size = unit["size"]
  batch = bench_pipeline.DEFAULT_BATCH[size]
  source = bench_pipeline.synthetic_source(size, ctx.p["pipeline_examples"][size])
  out = []
  for mode in ("prefetch", "host"):
    r = bench_pipeline.measure(source, batch, "flip+centered", mode, threads=0,
                               seconds=ctx.p["pipeline_seconds"])
    out.append({"name": f"pipeline {size}px {mode}", "images_per_s": r["images_per_s"],
                "batch": batch, "mode": mode,
                "note": (f"{size}x{size}x3 uint8 in memory, flip + centered, "
                         + ("put on the device 2 ahead (Prefetch)" if mode == "prefetch"
                            else "numpy batches on the host"))})
  return out


MEASURE = {"train": measure_train, "sample": measure_sample, "inception": measure_inception,
           "bpd": measure_bpd, "pipeline": measure_pipeline}


def describe(unit: Dict[str, Any]) -> Dict[str, Any]:
  """The identifying fields of a unit's records."""
  kind = unit["kind"]
  base = {"unit": unit["id"], "name": kind}
  if kind == "train":
    objective = unit.get("objective", "denoising")
    base.update(network=unit["network"], config=NETWORKS[unit["network"]], dtype=unit["dtype"],
                per_device_batch=unit["per_device_batch"], objective=objective,
                sharding=unit.get("sharding", "replicated"))
    if objective != "denoising":
      base["name"] = f"train {objective}"
    elif base["sharding"] != "replicated":
      base["name"] = f"train {base['sharding']}"
  elif kind == "sample":
    base.update(name=f"sample {unit['sampler']}", network=unit["network"],
                config=NETWORKS[unit["network"]], dtype="float32")
  elif kind == "bpd":
    base.update(network=unit["network"], config=NETWORKS[unit["network"]])
  elif kind == "inception":
    base.update(network="inception")
  elif kind == "pipeline":
    base.update(name=f"pipeline {unit['size']}px", network="-", dtype="uint8->float32")
  return base


def _emit(payload: Dict[str, Any]) -> None:
  sys.stdout.write(_RECORD + json.dumps(payload) + "\n")
  sys.stdout.flush()


def child_main(spec_path: str) -> None:
  with open(spec_path) as f:
    spec = json.load(f)
  ctx = Context(spec["tiny"], spec["train_steps"], spec.get("simulate_oom_batch", 0))
  _emit({"device": ctx.device_info()})
  oom = dict(spec["oom"])  # unit id -> ran out of memory
  for unit in spec["units"]:
    if unit.get("if_oom") and not oom.get(unit["if_oom"], False):
      _emit({"skip": unit["id"]})
      continue
    _emit({"start": unit["id"]})
    base = describe(unit)
    try:
      results = MEASURE[unit["kind"]](unit, ctx)
    except Exception as e:  # noqa: BLE001 - recorded; the run goes on
      oom[unit["id"]] = is_oom(e)
      message = f"{type(e).__name__}: {e}".strip().splitlines()
      results = [{"error": " ".join(message)[:600], "oom": oom[unit["id"]]}]
    results = results if isinstance(results, list) else [results]
    for r in results:
      record = {**base, **r}
      if "batch" not in record and "per_device_batch" in record:
        record["batch"] = record["per_device_batch"] * ctx.n_dev
      record.setdefault("peak_memory_gb", _peak_gb())
      _emit({"record": record})
    _emit({"done": unit["id"]})


# ---------------------------------------------------------------------------
# Parent side: run the plan in child processes, write the results.

COLUMNS = [("name", "measurement"), ("network", "network"), ("dtype", "dtype"), ("batch", "batch"),
           ("images_per_s", "images/s"), ("mfu", "MFU"), ("flops_per_step", "GFLOP/call"),
           ("compile_s", "compile s"), ("peak_memory_gb", "peak GB"),
           ("step_memory_gb", "plan GB"), ("note", "note")]


def _cell(key: str, record: Dict[str, Any]) -> str:
  value = record.get(key)
  if key == "note" and record.get("error"):
    return ("out of memory: " if record.get("oom") else "error: ") + record["error"][:120]
  if value is None:
    return "-"
  if key == "mfu":
    return f"{100 * value:.1f}%"
  if key == "images_per_s":
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"
  if key == "flops_per_step":
    return f"{value / 1e9:.4g}"
  if key.endswith("_gb"):
    return f"{value:.3g}"
  if isinstance(value, float):
    return f"{value:.2f}"
  return str(value).replace("|", "/")


def markdown(records: List[Dict[str, Any]], header: Dict[str, Any]) -> str:
  lines = [f"# score_jax on {header.get('device_kind', '?')}", "",
           f"{header.get('device_count', '?')} device(s), {header.get('platform', '?')}, "
           f"jax {header.get('jax', '?')}, {header.get('date', '')}; "
           f"peak FLOP/s from the table in benchmarks/accelerator.py: "
           f"{header.get('peak_name') or 'unknown device (no MFU)'}. "
           f"{'--tiny: tiny networks and batches (code paths only, not figures). ' if header.get('tiny') else ''}"
           f"Elapsed {header.get('elapsed_s', 0):.0f} s of a {header.get('time_budget_s', 0):.0f} s budget.",
           "", "| " + " | ".join(title for _, title in COLUMNS) + " |",
           "|" + "---|" * len(COLUMNS)]
  for r in records:
    lines.append("| " + " | ".join(_cell(key, r) for key, _ in COLUMNS) + " |")
  return "\n".join(lines) + "\n"


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "device"


def jvp_ratios(record: Dict[str, Any], earlier: List[Dict[str, Any]]) -> Dict[str, Any]:
  """A JVP train step's time_ratio, memory_ratio (XLA's memory plan) and peak_memory_ratio
  (the device's peak, each measurement in its own process; None where the backend keeps no
  statistics) to the plain step of the same network, dtype and batch among the earlier
  records, and a note saying them; {} for other records or without a measured plain step."""
  if record.get("objective", "denoising") == "denoising" or "step_s" not in record:
    return {}
  same = lambda r: (r.get("name") == "train" and not r.get("error") and "step_s" in r and
                    all(r.get(k) == record.get(k) for k in ("network", "dtype", "batch")))
  plain = next((r for r in reversed(earlier) if same(r)), None)
  if plain is None:
    return {}
  memory = (record["step_memory_gb"] / plain["step_memory_gb"]
            if record.get("step_memory_gb") and plain.get("step_memory_gb") else None)
  peak = (record["peak_memory_gb"] / plain["peak_memory_gb"]
          if record.get("peak_memory_gb") and plain.get("peak_memory_gb") else None)
  time_ratio = record["step_s"] / plain["step_s"]
  note = f"{time_ratio:.2f}x the plain step's time" + (
      f", {memory:.2f}x its memory plan" if memory is not None else "") + (
      f", {peak:.2f}x its peak memory" if peak is not None else "")
  return {"time_ratio": time_ratio, "memory_ratio": memory, "peak_memory_ratio": peak,
          "note": note}


class Results:
  """The records so far, written to OUT/<device_kind>.json and .md after every change."""

  def __init__(self, out_dir: str, tiny: bool, budget_s: float):
    self.out_dir = out_dir
    self.records: List[Dict[str, Any]] = []
    self.header: Dict[str, Any] = {"tiny": tiny, "time_budget_s": budget_s,
                                   "date": datetime.datetime.now().isoformat(timespec="seconds")}
    self.t0 = time.perf_counter()
    self.json_path = self.md_path = None

  def set_device(self, info: Dict[str, Any]) -> None:
    if self.json_path is None:
      self.header.update(info)
      stem = _safe(info["device_kind"]) + ("-tiny" if self.header["tiny"] else "")
      os.makedirs(self.out_dir, exist_ok=True)
      self.json_path = os.path.join(self.out_dir, stem + ".json")
      self.md_path = os.path.join(self.out_dir, stem + ".md")

  def add(self, record: Dict[str, Any]) -> None:
    if self.json_path is None:  # no process got as far as the device
      self.set_device({"device_kind": "unknown"})
    context = {k: self.header.get(k) for k in ("device_kind", "device_count", "platform", "jax")}
    self.records.append({**record, **jvp_ratios(record, self.records), **context,
                         "tiny": self.header["tiny"]})
    self.write()

  def write(self) -> None:
    if self.json_path is None:
      return
    self.header["elapsed_s"] = time.perf_counter() - self.t0
    for path, text in ((self.json_path, json.dumps(self.records, indent=1) + "\n"),
                       (self.md_path, markdown(self.records, self.header))):
      with open(path + ".tmp", "w") as f:
        f.write(text)
      os.replace(path + ".tmp", path)


def _reader(stream, lines: "queue.Queue[Optional[str]]") -> None:
  for line in iter(stream.readline, ""):
    lines.put(line)
  lines.put(None)


def _progress(results: Results, text: str) -> None:
  print(f"[{time.perf_counter() - results.t0:6.1f} s] {text}", flush=True)


def _summary(record: Dict[str, Any]) -> str:
  what = " ".join(str(record.get(k)) for k in ("name", "network", "dtype") if record.get(k))
  what += f" batch {record.get('batch')}"
  if record.get("error"):
    return f"{what}: {'OUT OF MEMORY' if record.get('oom') else 'ERROR'} {record['error'][:200]}"
  if record.get("skipped"):
    return f"{what}: {record.get('note', 'skipped')}"
  parts = [f"{record['images_per_s']:,.1f} images/s"]
  if record.get("mfu") is not None:
    parts.append(f"MFU {100 * record['mfu']:.1f}%")
  if record.get("compile_s") is not None:
    parts.append(f"compile {record['compile_s']:.1f} s")
  if record.get("peak_memory_gb") is not None:
    parts.append(f"peak {record['peak_memory_gb']:.2f} GB")
  if record.get("time_ratio") is not None:
    parts.append(f"{record['time_ratio']:.2f}x the plain step's time, "
                 f"{record['memory_ratio']:.2f}x its memory plan")
  return f"{what}: " + ", ".join(parts)


def run_plan(units: List[Dict[str, Any]], args, results: Results) -> None:
  """Runs the units in child processes (one each, or all in one) within the time budget."""
  pending = list(units)
  oom: Dict[str, bool] = {}
  deadline = results.t0 + args.time_budget_s
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # no other process holds the device
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile times are cold compiles
  if args.tiny:  # tiny programs: compile time is all there is; spare the optimizer
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  while pending and time.perf_counter() < deadline:
    batch_units = pending if args.one_process else pending[:1]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
      json.dump({"units": batch_units, "oom": oom, "tiny": args.tiny,
                 "train_steps": args.steps, "simulate_oom_batch": args.simulate_oom_batch}, f)
      spec = f.name
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", spec],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=ROOT, start_new_session=True)
    lines: "queue.Queue[Optional[str]]" = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    tail: List[str] = []
    current, started, timed_out = None, False, False
    while True:
      remaining = deadline - time.perf_counter()
      if remaining <= 0:
        timed_out = True
        break
      try:
        line = lines.get(timeout=min(remaining, 5.0))
      except queue.Empty:
        continue
      if line is None:
        break
      if not line.startswith(_RECORD):
        tail = (tail + [line.rstrip()])[-40:]
        if args.verbose:
          print("    " + line.rstrip(), flush=True)
        continue
      msg = json.loads(line[len(_RECORD):])
      if "device" in msg:
        results.set_device(msg["device"])
        if len(results.records) == 0 and not results.header.get("announced"):
          results.header["announced"] = True
          d = msg["device"]
          _progress(results, f"{d['device_count']} x {d['device_kind']} ({d['platform']}), jax "
                    f"{d['jax']}; peak table: {d['peak_name'] or 'unknown device, MFU null'}; "
                    f"writing {results.json_path}")
      if "start" in msg:
        current, started = msg["start"], True
        _progress(results, f"{current} ...")
      if "record" in msg:
        record = msg["record"]
        if record.get("error"):
          oom[record["unit"]] = bool(record.get("oom"))
        results.add(record)
        _progress(results, _summary(record))
      if "skip" in msg or "done" in msg:
        finished = msg.get("skip") or msg.get("done")
        pending = [u for u in pending if u["id"] != finished]
        current = None if current == finished else current
    if timed_out:
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    os.unlink(spec)
    if current is not None and any(u["id"] == current for u in pending):
      unit = next(u for u in pending if u["id"] == current)
      why = ("time budget spent (killed)" if timed_out else
             f"process ended (exit {proc.returncode}): " + " / ".join(tail[-3:]))
      record = {**describe(unit), "error": why[:600], "oom": is_oom(RuntimeError(why))}
      oom[unit["id"]] = record["oom"]
      results.add(record)
      _progress(results, _summary(record))
      pending = [u for u in pending if u["id"] != current]
    elif not started and not timed_out:
      # Died before starting anything (the backend, an import): give up rather than loop.
      print(f"child process failed (exit {proc.returncode}):\n" + "\n".join(tail),
            file=sys.stderr)
      break
  for unit in pending:
    if unit.get("if_oom") and not oom.get(unit["if_oom"], False):
      continue
    results.add({**describe(unit), "error": "not run: time budget spent", "oom": False})
  results.write()


def main(argv: List[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tiny", action="store_true",
                      help="tiny networks and batches: the same code paths in about a minute on CPU")
  parser.add_argument("--out", default=os.path.join(HERE, "results"),
                      help="folder for <device_kind>.json and .md (default benchmarks/results)")
  parser.add_argument("--only", default=",".join(KINDS),
                      help=f"comma-separated subset of {','.join(KINDS)}")
  parser.add_argument("--time-budget-s", type=float, default=0.0,
                      help="stop after this many seconds (default 480; 300 with --tiny)")
  parser.add_argument("--steps", type=int, default=0, help="timed training steps (default 10; 2 tiny)")
  parser.add_argument("--one-process", action=argparse.BooleanOptionalAction, default=None,
                      help="all measurements in one child process (default with --tiny) instead "
                      "of one process each")
  parser.add_argument("--verbose", action="store_true", help="show the child processes' output")
  parser.add_argument("--simulate-oom-batch", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    child_main(args.child)
    return 0
  kinds = [k.strip() for k in args.only.split(",") if k.strip()]
  unknown = sorted(set(kinds) - set(KINDS))
  if unknown:
    parser.error(f"--only: unknown {unknown}; choose from {', '.join(KINDS)}")
  args.time_budget_s = args.time_budget_s or (300.0 if args.tiny else 480.0)
  if args.one_process is None:
    args.one_process = args.tiny
  results = Results(os.path.abspath(args.out), args.tiny, args.time_budget_s)
  units = plan(kinds, args.tiny)
  _progress(results, f"{len(units)} measurements planned ({', '.join(kinds)}), budget "
            f"{args.time_budget_s:.0f} s")
  run_plan(units, args, results)
  if results.md_path:
    print(markdown(results.records, results.header))
    _progress(results, f"wrote {results.json_path} and {results.md_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
