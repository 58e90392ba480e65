"""digits FD of a trained digits run's samples, per sampler and number of score evaluations.

  python benchmarks/digits_fd.py --workdir=runs/digits [--samples=1000] [--step=-1]
      [--samplers=pc_em,pc_langevin,ode,ddim,ddim_eta1,heun,heun_churn,dpm_solver,dpm_solver3]
      [--nfe=10,20,50] [--pc_nfe=50,100,500,1000] [--ode_tol=1e-3,1e-5]
      [--guide_step=1000 --guide_weights=0.5,1] [--cfg_weights=0.5,1] [--guided_only]
      [--samplers=consistency --few_steps=1,2]  (consistency models; meanflow for MeanFlow)

Loads the run's config (WORKDIR/config.json) and the EMA parameters of its
newest checkpoint (or --step), draws --samples samples with each sampler at
each budget, and prints a Markdown table of the digits numbers
(score_jax/metrics/digits.py), headed by the held-out real digits (the floor).
digits FD is against the 1442 training images, over all --samples samples.
FD@M, M = min(--samples, 355), is the mean over disjoint sets of M samples,
and the floor row gives it for sets of M held-out real digits (at M = 355,
the held-out set's size, the floor itself), so the two compare at equal N
(FD is biased upwards at small N; the header names M). The classifier is
cached in WORKDIR/eval/digits_classifier.npz, as in --mode=eval.

Samplers: config (the run's own config.sampling, unchanged), pc_em (Euler-Maruyama predictor, no corrector: the paper's VP
setting and configs/digits.py's; N = NFE steps), pc_langevin (reverse
diffusion + one Langevin corrector step: N = NFE / 2), ode (adaptive
probability-flow ODE, one row per tolerance; NFE as measured), ddim
(eta 0), ddim_eta1 (eta 1: ancestral), heun (EDM, deterministic), heun_churn
(EDM, stochastic, s_churn 20), dpm_solver (DPM-Solver++ 2M), dpm_solver3
(3M), unipc / unipc3 (UniPC-2 bh2 / UniPC-3 bh1 on the log-SNR grid), unipc_opt
(UniPC-3 bh1 on the grid fitted to the model, `time_grids.optimize_time_grid`, stored in
WORKDIR/time_grids/ as by --mode=sample): NFE score evaluations. Every sampler ends with its
denoising step when the config says so (sampling.noise_removal), counted in NFE. The few-step
generators: consistency (a consistency model's one- and multistep sampling, with the config's
sampling.consistency_sigmas) and meanflow (a MeanFlow run's jumps), each at --few_steps
network evaluations.

Guided rows: --guide_step=S adds, for each sampler x budget and each weight of
--guide_weights, autoguidance by the same run's checkpoint at step S (D = D_S + w (D -
D_S)); --cfg_weights adds classifier-free guidance rows (a class-conditional run trained
with training.class_dropout > 0). --guidance_interval=LO,HI applies either only for
sigma^ in [LO, HI].
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from score_jax.run import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # main.py's CPU compiler settings, before JAX starts

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _workdir  # noqa: E402
from score_jax.data import datasets
from score_jax.data.digits import load_digits
from score_jax.metrics import digits as digits_metric
from score_jax.run import load as runs
from score_jax.run import settings
from score_jax.run import grids  # noqa: E402

Overrides = Dict[str, object]


# name -> (row label, sampling.method, further overrides)
_FAST = {
    "ddim": ("DDIM", "ddim", {"sampling.eta": 0.0}),
    "ddim_eta1": ("DDIM eta=1 (ancestral)", "ddim", {"sampling.eta": 1.0}),
    "heun": ("EDM Heun", "heun", {"sampling.s_churn": 0.0}),
    "heun_churn": ("EDM Heun, s_churn=20", "heun", {"sampling.s_churn": 20.0}),
    "dpm_solver": ("DPM-Solver++ 2M", "dpm_solver", {"sampling.order": 2}),
    "dpm_solver3": ("DPM-Solver++ 3M", "dpm_solver", {"sampling.order": 3}),
    "unipc": ("UniPC-2 bh2", "unipc", {"sampling.order": 2, "sampling.unipc_variant": "bh2"}),
    "unipc3": ("UniPC-3 bh1", "unipc", {"sampling.order": 3, "sampling.unipc_variant": "bh1"}),
    "unipc_opt": ("UniPC-3 bh1, optimized grid", "unipc", {
        "sampling.order": 3, "sampling.unipc_variant": "bh1", "sampling.schedule": "optimized"}),
}


def _variants(args) -> List[Tuple[str, Overrides]]:
  """(row label, config overrides) of every sampler x budget asked for."""
  rows: List[Tuple[str, Overrides]] = []
  for name in args.samplers:
    if name == "config":
      rows.append(("the run's own sampler (its config.sampling)", {}))
    elif name == "pc_em":
      for n in args.pc_nfe:
        rows.append((f"PC Euler-Maruyama, N={n}", {"sampling.method": "pc",
                     "sampling.predictor": "euler_maruyama", "sampling.corrector": "none",
                     "model.num_scales": n}))
    elif name == "pc_langevin":
      for n in args.pc_nfe:
        rows.append((f"PC reverse diffusion + Langevin, N={n // 2}", {
            "sampling.method": "pc", "sampling.predictor": "reverse_diffusion",
            "sampling.corrector": "langevin", "model.num_scales": max(n // 2, 1)}))
    elif name == "ode":
      for tol in args.ode_tol:
        rows.append((f"probability-flow ODE, tol={tol:g}", {"sampling.method": "ode",
                     "sampling.rtol": tol, "sampling.atol": tol}))
    elif name in ("consistency", "meanflow"):
      for n in args.few_steps:
        label = "consistency sampling" if name == "consistency" else "MeanFlow"
        rows.append((f"{label}, {n} step{'s' if n > 1 else ''}",
                     {"sampling.method": name, "sampling.num_steps": n}))
    elif name in _FAST:
      label, method, extra = _FAST[name]
      for n in args.nfe:
        # Each sampler on its own default grid (Heun: EDM's; the others: uniform log-SNR),
        # whatever grid the run's config samples on, so rows compare across runs.
        over: Overrides = {"sampling.method": method, "sampling.num_steps": n,
                           "sampling.schedule": "", **extra}
        rows.append((f"{label}, {n} steps", over))
    else:
      raise ValueError(f"unknown sampler {name!r}")
  guided = []
  interval = {"sampling.guidance_interval": tuple(args.guidance_interval)} if (
      args.guidance_interval) else {}
  span = f", sigma^ in [{args.guidance_interval[0]:g}, {args.guidance_interval[1]:g}]" if (
      interval) else ""
  for label, over in rows:
    for w in args.guide_weights if args.guide_step >= 0 else ():
      guided.append((f"{label}, autoguided by step {args.guide_step}, w={w:g}{span}", {
          **over, **interval, "sampling.guidance_weight": w,
          "sample.guide_workdir": args.workdir, "sample.guide_step": args.guide_step}))
    for w in args.cfg_weights:
      guided.append((f"{label}, classifier-free guidance w={w:g}{span}", {
          **over, **interval, "sampling.guidance_weight": w}))
  return guided if args.guided_only else rows + guided


def _with(config: ml_collections.ConfigDict, overrides: Overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def _sample(setup, params, config, num: int, batch: int, seed: int,
            workdir: str) -> Tuple[np.ndarray, int, float]:
  """(uint8 samples [num, 8, 8, 1], NFE per sample, seconds without compilation: the grid
  fit of an optimized schedule is not counted, it is done once per model)."""
  s = settings.from_config(config)
  progs = _workdir.with_settings(setup, s, runs.load_guide(s, setup))
  num_classes = progs.plan.data.num_classes
  weight = progs.plan.sampling.guidance_weight
  params = progs.guided(params)
  timesteps = grids.grid_for(progs, params, os.path.join(workdir, "time_grids"), weight)
  fn = progs.sampler(batch, weight, timesteps)
  key = jax.random.PRNGKey(seed)
  labels = lambda r: progs.put(((r * batch + np.arange(batch)) % max(num_classes, 1))
                               .astype(np.int32))
  fn = fn.lower(params, key, labels(0)).compile()
  out, seconds, nfe = [], 0.0, 0
  for r in range(-(-num // batch)):
    start = time.perf_counter()
    x, nfe = fn(params, jax.random.fold_in(key, r), labels(r))
    x = np.asarray(jax.device_get(x))
    seconds += time.perf_counter() - start
    out.append(x)
  x = datasets.inverse_scaler(progs.plan.data.centered)(np.concatenate(out)[:num])
  if not np.all(np.isfinite(x)):
    raise FloatingPointError("sampling produced non-finite values")
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8), int(nfe), seconds


def fd_at(metric: digits_metric.DigitsMetric, images: np.ndarray, m: int) -> float:
  """FD@m: the mean digits FD of the disjoint sets of m images in `images` (m <= len)."""
  return float(np.mean([metric.fd(images[k * m:(k + 1) * m]) for k in range(len(images) // m)]))


def _row(label: str, nfe: str, s: Dict[str, float], fd_m: float, seconds: str) -> str:
  fd = s.get("digits_fd", s.get("digits_fd_floor"))
  return (f"| {label} | {nfe} | {fd:.3f} | {fd_m:.3f} | {s['digits_confident']:.3f} | "
          f"{s['digits_classifier_score']:.2f} | {s['digits_class_balance']:.3f} | {seconds} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  split = lambda cast: (lambda text: [cast(v) for v in text.split(",") if v])
  parser.add_argument("--workdir", required=True, help="a digits training run")
  parser.add_argument("--config", default="", help="config file (default WORKDIR/config.json)")
  parser.add_argument("--step", type=int, default=-1, help="checkpoint step (-1: newest)")
  parser.add_argument("--samples", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=0, help="0: config.eval.batch_size")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--samplers", type=split(str),
                      default="pc_em,pc_langevin,ode,ddim,ddim_eta1,heun,heun_churn,"
                      "dpm_solver,dpm_solver3")
  parser.add_argument("--nfe", type=split(int), default="10,20,50")
  parser.add_argument("--pc_nfe", type=split(int), default="50,100,500,1000")
  parser.add_argument("--few_steps", type=split(int), default="1,2",
                      help="network evaluations of the consistency and meanflow rows")
  parser.add_argument("--ode_tol", type=split(float), default="1e-3,1e-5")
  parser.add_argument("--guide_step", type=int, default=-1,
                      help="autoguidance rows: the checkpoint step of this run to guide with")
  parser.add_argument("--guide_weights", type=split(float), default="1")
  parser.add_argument("--cfg_weights", type=split(float), default="",
                      help="classifier-free guidance rows (a conditional run)")
  parser.add_argument("--guided_only", action="store_true",
                      help="only the guided rows (the unguided ones measured before)")
  parser.add_argument("--guidance_interval", type=split(float), default="",
                      help="LO,HI: guide only for sigma^ in [LO, HI]")
  args = parser.parse_args()

  config = ml_collections.ConfigDict(_workdir.load_settings(args.workdir, args.config).raw)
  if str(config.data.dataset).lower() != "digits":
    raise SystemExit(f"{args.workdir} is a {config.data.dataset!r} run; digits FD needs digits.")
  setup, params, step = _workdir.load_run(args.workdir, settings.from_config(config), args.step)
  devices = jax.device_count()
  batch = args.batch or int(config.eval.batch_size)
  batch = -(-min(batch, args.samples) // devices) * devices
  metric = digits_metric.load_or_train(os.path.join(args.workdir, "eval", "digits_classifier.npz"))
  print(f"run {args.workdir}, step {step}; {args.samples} samples per row, batch {batch}, "
        f"{devices} x {jax.devices()[0].device_kind}")
  if args.samples < 2:
    raise SystemExit("--samples must be at least 2 (an FD needs a covariance).")
  m = min(args.samples, digits_metric.HELD_OUT_SIZE)
  held_out = load_digits("test")[0]
  print(f"digits FD: all {args.samples} samples against the training digits; FD@{m}: the mean "
        f"over disjoint sets of {m} samples, the floor row's over sets of {m} held-out digits.")
  print(f"| sampler | NFE | digits FD | FD@{m} | confident | classifier score | class balance | "
        "sampling s |")
  print("|---|---|---|---|---|---|---|---|")
  print(_row("held-out real digits (floor)", "-", metric.reference,
             fd_at(metric, held_out, m), "-"), flush=True)
  for label, overrides in _variants(args):
    try:
      x, nfe, seconds = _sample(setup, params, _with(config, overrides), args.samples, batch,
                                args.seed, args.workdir)
    except ValueError as e:  # a setting the sampler refuses, e.g. a DDPM chain with N <= beta_max
      print(f"| {label} | n/a: {str(e).split(';')[0]} | | | | | | |", flush=True)
      continue
    print(_row(label, str(nfe), metric.scores(x), fd_at(metric, x, m), f"{seconds:.1f}"),
          flush=True)


if __name__ == "__main__":
  main()
