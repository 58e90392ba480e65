"""score_jax's training step beside the 2021 PyTorch reference's, timed in one run.

  python benchmarks/bench_reference.py --reference=/path/to/score_sde_pytorch \\
      --torch_python=/path/to/venv/bin/python [--configs=vp_cifar,ve_cifar,digits] \\
      [--batch=8] [--repeats=5] [--steps=2]

For each config, the same network at the same batch size takes training
steps on both sides: forward, the config's loss (continuous DSM for the
continuous configs), backward, gradient clipping, Adam and EMA. score_jax's
step is train.make_train_step (what main.py runs), timed in this process; the
reference's is its own `losses.get_step_fn` on the network its
`models.utils.create_model` builds, run by benchmarks/_reference_step.py in a
subprocess of --torch_python (torch and the reference are not dependencies of
score_jax; on CPU the reference's upfirdn2d takes its pure-PyTorch path).
The reference config is the paper config of the same network, with score_jax's
values for the keys the two share (SHARED_KEYS); the parameter counts of both
are printed to show the networks are the same.

Both sides run on the same --threads CPUs: torch.set_num_threads(n) (one
inter-op thread) in the reference, and XLA's intra-op pool, which XLA:CPU
sizes from the process's CPU affinity (no flag sets it), in score_jax; with
fewer threads than CPUs both processes are pinned to the first n CPUs.
Setup is reported apart from the steps: the reference's first step (model
built, first oneDNN kernels), score_jax's trace and compile. After --warmup
untimed steps on each side, --repeats rounds alternate the sides (reference
then score_jax, then score_jax then reference, ...), --steps timed steps
each, so that other load on the machine falls on both alike. The table gives
median ms/step over all timed steps with their range, the ratio of the
medians (reference / score_jax: above 1, score_jax is faster), the range of
the per-round ratios (each from one round's medians, so both sides of it ran
under the same load), median CPU seconds per step (all threads) and their
ratio, and GFLOP per step: XLA's cost analysis of score_jax's compiled step
(all operations), and torch.utils.flop_counter's count for the reference
(convolutions and matrix products only). On a machine shared with other
work, one thread per side (--threads=1) keeps the comparison about the
arithmetic: with more threads than free cores, the runtimes' threads wait for
each other, and that waiting, not the arithmetic, decides the times.

--parts adds a table of the step's loss alone and the loss with its gradient
(continuous DSM), timed on both sides in the same alternating rounds, and the
differences of the medians: backward, and the update (clipping, Adam, EMA).
--no_reference times only score_jax (the reference columns stay empty); --json
writes every timing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from score_jax.run import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # main.py's CPU compiler settings, before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402

import bench_models  # noqa: E402
from configs import digits, ve_cifar, vp_cifar  # noqa: E402
from score_jax import files
from score_jax.run import plan as plan_lib
from score_jax.run import settings  # noqa: E402
from score_jax.errors import UserError  # noqa: E402

_VP = "configs.vp.cifar10_ddpmpp_continuous"
_VE = "configs.ve.cifar10_ncsnpp_continuous"


def _tiny():
  """A DDPM++ of 2,801 parameters on 8 px digits, one resolution (tests: quick to compile)."""
  config = digits.get_config()
  config.model.nf = 4
  config.model.ch_mult = (1,)
  config.model.attn_resolutions = ()
  config.training.batch_size = 4
  return config


# name: (score_jax config, reference config module, label, batch when --batch is not given:
#        None = the config's own)
CONFIGS = {
    "vp_cifar": (vp_cifar.get_config, _VP, "DDPM++ cont.", 8),
    "ve_cifar": (ve_cifar.get_config, _VE, "NCSN++ cont.", 8),
    "ddpmpp_small": (bench_models._small_ddpmpp, _VP, "DDPM++ small (nf 32, ch_mult 1,2,2)", 8),
    "digits": (digits.get_config, _VP, "DDPM++ digits", None),
    "tiny": (_tiny, _VP, "DDPM++ tiny", None),
}
# Keys the reference's networks, SDEs, losses and optimizer read, under the same names in
# score_jax's configs: the reference config gets score_jax's values for them. Not
# model.num_scales: it changes no arithmetic of a continuous-time step, and the reference's
# DDPM++ indexes its table of num_scales sigmas with the label 999 t, so it needs 1000.
SHARED_KEYS = (
    "data.image_size", "data.num_channels", "data.centered",
    "model.nf", "model.ch_mult", "model.num_res_blocks", "model.attn_resolutions",
    "model.dropout", "model.resamp_with_conv", "model.conditional", "model.fir",
    "model.fir_kernel", "model.skip_rescale", "model.resblock_type", "model.progressive",
    "model.progressive_input", "model.progressive_combine", "model.attention_type",
    "model.init_scale", "model.embedding_type", "model.fourier_scale", "model.conv_size",
    "model.scale_by_sigma", "model.nonlinearity", "model.ema_rate", "model.sigma_min",
    "model.sigma_max", "model.beta_min", "model.beta_max",
    "optim.lr", "optim.beta1", "optim.eps", "optim.warmup", "optim.grad_clip",
    "optim.weight_decay", "training.sde", "training.continuous", "training.reduce_mean",
    "training.likelihood_weighting",
)


def shared_values(config) -> Dict[str, Any]:
  """score_jax's values of SHARED_KEYS (those its config has), JSON-ready."""
  out = {}
  for key in SHARED_KEYS:
    section, name = key.split(".")
    if name in config[section]:
      value = config[section][name]
      out[key] = list(value) if isinstance(value, tuple) else value
  return out


class Reference:
  """The reference's training step in a subprocess of the torch Python (_reference_step.py)."""

  def __init__(self, torch_python: str, reference: str, module: str, overrides: Dict[str, Any],
               batch: int, threads: int, cpus: str, warmup: int):
    self.proc = subprocess.Popen(
        [torch_python, os.path.join(HERE, "_reference_step.py"), "--reference", reference,
         "--module", module, "--overrides", json.dumps(overrides), "--batch", str(batch),
         "--threads", str(threads), "--cpus", cpus, "--warmup", str(warmup)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        # score_jax's configs/ on PYTHONPATH would shadow the reference's (a namespace package).
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    self.info = self._read()

  def _read(self) -> Dict[str, Any]:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the reference's step process exited ({self.proc.wait()}); "
                         "its error is printed above")
    return json.loads(line)

  def ask(self, **request) -> Dict[str, Any]:
    self.proc.stdin.write(json.dumps(request) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.write(json.dumps({"quit": 1}) + "\n")
      self.proc.stdin.close()
      self.proc.wait()


class ScoreJaxStep:
  """score_jax's training step (train.make_train_step), compiled, with its state."""

  def __init__(self, config, batch: int, warmup: int):
    _, params = bench_models._model_and_params(config)
    self.params = sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
    step_fn, (self.state, self.x, self.y) = bench_models._train_step(config, params, batch)
    self.key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    self.compiled = step_fn.lower(self.state, self.x, self.y, self.key).compile()
    self.compile_s = time.perf_counter() - t0
    self.flops = float(self.compiled.cost_analysis().get("flops", math.nan))
    for _ in range(warmup):
      self._step()
    setup = plan_lib.make_plan(settings.from_config(config), need_data=False)
    self.loss_fn = setup.train_loss
    self.parts = {}

  def _part(self, part: str):
    """The step's loss alone ("forward") or with its gradient ("gradient"), compiled."""
    if part not in self.parts:
      loss = lambda p, k, x: self.loss_fn(p, k, x, None)[0]
      fn = jax.jit(loss if part == "forward" else jax.grad(loss))
      compiled = fn.lower(self.state.params, self.key, self.x).compile()
      self.parts[part] = lambda: jax.block_until_ready(compiled(self.state.params, self.key,
                                                                self.x))
      self.parts[part]()  # warm-up
    return self.parts[part]

  def _step(self):
    self.state, metrics = self.compiled(self.state, self.x, self.y, self.key)
    jax.block_until_ready((self.state, metrics))
    if not bool(metrics["finite"]):
      raise FloatingPointError(f"score_jax: non-finite loss at step {int(self.state.step)}")

  def steps(self, n: int, part: str = "step") -> Dict[str, List[float]]:
    run = self._step if part == "step" else self._part(part)
    times, cpu = [], []
    for _ in range(n):
      t0, c0 = time.perf_counter(), time.process_time()
      run()
      times.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - c0)
    return {"times": times, "cpu": cpu}


def summarize(ref_rounds: Optional[List[List[float]]], jax_rounds: List[List[float]]
              ) -> Dict[str, float]:
  """Medians (s), ranges and ratios of per-round step times; ref_rounds None: score_jax only."""
  out = {}
  sides = {"jax": jax_rounds} if ref_rounds is None else {"ref": ref_rounds, "jax": jax_rounds}
  for side, rounds in sides.items():
    flat = [t for r in rounds for t in r]
    out[f"{side}_median"] = float(np.median(flat))
    out[f"{side}_min"], out[f"{side}_max"] = float(min(flat)), float(max(flat))
  if ref_rounds is not None:
    out["ratio"] = out["ref_median"] / out["jax_median"]
    per_round = [float(np.median(r) / np.median(j)) for r, j in zip(ref_rounds, jax_rounds)]
    out["ratio_min"], out["ratio_max"] = min(per_round), max(per_round)
  return out


def _ms(seconds: float) -> str:
  ms = 1000 * seconds
  return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _gflop(flops: Optional[float]) -> str:
  if flops is None:
    return "-"
  g = flops / 1e9
  return f"{g:.0f}" if g >= 10 else f"{g:.2f}"


HEADER = ("| network (config) | batch | params ref / score_jax | GFLOP/step score_jax (XLA) / "
          "ref (convs + matmuls) | ref ms/step: median (range) | score_jax ms/step: median "
          "(range) | ratio ref / score_jax | per-round ratios | CPU s/step ref / score_jax | "
          "CPU ratio | setup s: ref first step / score_jax compile |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(r: Dict[str, Any]) -> str:
  """One Markdown row of the result r of one config (see bench_config)."""
  s, has_ref = r["summary"], "ref" in r
  ref = r.get("ref", {})
  cells = [
      f"{r['label']} (`{r['config']}`)", str(r["batch"]),
      f"{ref['params'] / 1e6:.4g}M / {r['jax']['params'] / 1e6:.4g}M" if has_ref
      else f"- / {r['jax']['params'] / 1e6:.4g}M",
      f"{_gflop(r['jax']['flops'])} / {_gflop(ref.get('flops'))}",
      f"{_ms(s['ref_median'])} ({_ms(s['ref_min'])}-{_ms(s['ref_max'])})" if has_ref else "-",
      f"{_ms(s['jax_median'])} ({_ms(s['jax_min'])}-{_ms(s['jax_max'])})",
      f"{s['ratio']:.2f}" if has_ref else "-",
      f"{s['ratio_min']:.2f}-{s['ratio_max']:.2f}" if has_ref else "-",
      (f"{np.median(ref['cpu']):.2f}" if has_ref else "-") + f" / {np.median(r['jax']['cpu']):.2f}",
      f"{np.median(ref['cpu']) / np.median(r['jax']['cpu']):.2f}" if has_ref else "-",
      (f"{ref['first_step_s']:.1f}" if has_ref else "-") + f" / {r['jax']['compile_s']:.1f}",
  ]
  return "| " + " | ".join(cells) + " |"


PARTS_HEADER = ("| network (config) | batch | part | ref ms | score_jax ms | ratio ref / score_jax | "
                "per-round ratios | CPU s ref / score_jax | CPU ratio |\n"
                "|---|---|---|---|---|---|---|---|---|")


def parts_rows(r: Dict[str, Any]) -> List[str]:
  """Markdown rows of the medians of r's parts (--parts) and the differences between them.

  The differences (backward = loss and gradient - loss; update etc. = step - loss and
  gradient) subtract medians taken in different rounds: under changing load they can
  come out negative; their CPU seconds are steadier.
  """
  has_ref = "ref" in r
  parts = {"forward": r["parts"]["forward"], "gradient": r["parts"]["gradient"],
           "step": {"summary": r["summary"], "ref_cpu": r.get("ref", {}).get("cpu"),
                    "jax_cpu": r["jax"]["cpu"]}}
  wall = {k: (v["summary"].get("ref_median", math.nan), v["summary"]["jax_median"])
          for k, v in parts.items()}
  cpu = {k: (float(np.median(v["ref_cpu"])) if has_ref else math.nan,
             float(np.median(v["jax_cpu"]))) for k, v in parts.items()}
  rows = []

  def row(part, w, c, ratios=None):
    cells = [f"{r['label']} (`{r['config']}`)", str(r["batch"]), part,
             _ms(w[0]) if has_ref else "-", _ms(w[1]),
             f"{w[0] / w[1]:.2f}" if has_ref else "-",
             f"{ratios[0]:.2f}-{ratios[1]:.2f}" if has_ref and ratios else "-",
             (f"{c[0]:.3g}" if has_ref else "-") + f" / {c[1]:.3g}",
             f"{c[0] / c[1]:.2f}" if has_ref else "-"]
    rows.append("| " + " | ".join(cells) + " |")

  names = {"forward": "forward (loss)", "gradient": "forward + backward", "step": "whole step"}
  for part, name in names.items():
    m = parts[part]["summary"]
    row(name, wall[part], cpu[part], (m["ratio_min"], m["ratio_max"]) if has_ref else None)
  minus = lambda d, a, b: (d[a][0] - d[b][0], d[a][1] - d[b][1])
  row("backward (difference)", minus(wall, "gradient", "forward"),
      minus(cpu, "gradient", "forward"))
  row("update etc. (difference)", minus(wall, "step", "gradient"), minus(cpu, "step", "gradient"))
  return rows


def _progress(message: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_config(name: str, batch: Optional[int], args, cpus: str) -> Dict[str, Any]:
  """Both sides' timings of config `name`, interleaved over args.repeats rounds."""
  get_config, module, label, default_batch = CONFIGS[name]
  config = get_config()
  batch = batch or default_batch or config.training.batch_size
  ref = None
  if not args.no_reference:
    ref = Reference(args.torch_python, args.reference, module, shared_values(config), batch,
                    args.threads, cpus, args.warmup)
  try:
    if ref is not None:
      _progress(f"{name}: reference ready, first step {ref.info['first_step_s']:.1f} s")
    ours = ScoreJaxStep(config, batch, args.warmup)
    _progress(f"{name}: score_jax compiled in {ours.compile_s:.1f} s")

    def interleaved(part):
      """{"ref": rounds, "jax": rounds, "ref_cpu": [...], "jax_cpu": [...]} of `part`."""
      rounds = {"ref": [], "ref_cpu": [], "jax": [], "jax_cpu": []}
      for i in range(args.repeats):
        for side in ("ref", "jax") if i % 2 == 0 else ("jax", "ref"):
          if side == "ref" and ref is None:
            continue
          got = (ref.ask(steps=args.steps, part=part) if side == "ref"
                 else ours.steps(args.steps, part))
          rounds[side].append(got["times"])
          rounds[f"{side}_cpu"] += got["cpu"]
        _progress(f"{name} {part}: round {i + 1}/{args.repeats} done")
      return rounds

    rounds = interleaved("step")
    result = {"config": name, "label": label, "batch": batch,
              "jax": {"params": ours.params, "flops": ours.flops, "compile_s": ours.compile_s,
                      "times": rounds["jax"], "cpu": rounds["jax_cpu"]}}
    if ref is not None:
      flops = ref.ask(flops=1)["flops"] if args.flops else None
      result["ref"] = {"params": ref.info["params"], "flops": flops,
                       "first_step_s": ref.info["first_step_s"], "build_s": ref.info["build_s"],
                       "times": rounds["ref"], "cpu": rounds["ref_cpu"]}
    result["summary"] = summarize(rounds["ref"] if ref is not None else None, rounds["jax"])
    result["jax"]["final_step"] = int(ours.state.step)  # warm-up and timed steps taken
    if args.parts:
      result["parts"] = {}
      for part in ("forward", "gradient"):
        got = interleaved(part)
        result["parts"][part] = {
            "ref": got["ref"], "jax": got["jax"], "ref_cpu": got["ref_cpu"],
            "jax_cpu": got["jax_cpu"],
            "summary": summarize(got["ref"] if ref is not None else None, got["jax"])}
    return result
  finally:
    if ref is not None:
      ref.close()


def _check_args(args) -> None:
  unknown = [c for c in args.configs if c not in CONFIGS]
  if unknown:
    raise UserError(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
  if args.json and os.path.exists(args.json):
    raise UserError(f"--json={args.json} exists; pass a new path (or remove the old file)")
  if args.no_reference:
    return
  if not args.reference or not os.path.isfile(os.path.join(args.reference, "losses.py")):
    raise UserError(f"--reference={args.reference!r} is not a checkout of "
                    "yang-song/score_sde_pytorch (no losses.py in it); pass its folder, or "
                    "--no_reference")
  if not args.torch_python or not os.access(args.torch_python, os.X_OK):
    raise UserError(f"--torch_python={args.torch_python!r} is not an executable; pass a Python "
                    "that has torch, numpy and ml_collections, or --no_reference")


def _git_commit(path: str) -> str:
  proc = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True,
                        text=True)
  return proc.stdout.strip() or "unknown"


def main(argv: List[str]) -> List[Dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--reference", default="", help="checkout of yang-song/score_sde_pytorch")
  parser.add_argument("--torch_python", default="", help="a Python with torch, numpy, ml_collections")
  parser.add_argument("--configs", default="vp_cifar,ve_cifar,digits",
                      help="comma-separated, of: " + ", ".join(CONFIGS))
  parser.add_argument("--batch", type=int, default=None,
                      help="batch size for every config (default: 8 for the CIFAR-10 networks, "
                      "the config's own for digits)")
  parser.add_argument("--repeats", type=int, default=5, help="rounds of alternating sides")
  parser.add_argument("--steps", type=int, default=2, help="timed steps per side and round")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="threads (CPUs) for each side (default: all this process may use)")
  parser.add_argument("--no_flops", dest="flops", action="store_false",
                      help="skip the reference's FLOP count (one more of its steps per config)")
  parser.add_argument("--parts", action="store_true",
                      help="also time the step's loss alone and the loss with its gradient, on\n"
                      "both sides, interleaved alike (a second table: where the time goes)")
  parser.add_argument("--no_reference", action="store_true", help="time score_jax only")
  parser.add_argument("--json", default="", help="also write every timing to this file")
  args = parser.parse_args(argv)
  args.configs = [c for c in args.configs.split(",") if c]
  _check_args(args)
  allowed = sorted(os.sched_getaffinity(0))
  if not 1 <= args.threads <= len(allowed):
    raise UserError(f"--threads={args.threads}: this process may use {len(allowed)} CPUs")
  cpus = allowed[:args.threads]
  if len(cpus) < len(allowed):  # before JAX starts its CPU client, which sizes its pool by this
    os.sched_setaffinity(0, cpus)
  torch_info = ""
  if not args.no_reference:
    torch_info = subprocess.run([args.torch_python, "-c", "import torch; print(torch.__version__)"],
                                capture_output=True, text=True).stdout.strip()
    torch_info = f", torch {torch_info}, reference {_git_commit(args.reference)}"
  load0 = os.getloadavg()[0]
  command = "python benchmarks/bench_reference.py " + " ".join(argv)
  print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: `{command}`\n"
        f"jax {jax.__version__}{torch_info}; threads: {args.threads} per side, on CPUs "
        f"{','.join(map(str, cpus))} of {os.cpu_count()}; XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}; {args.warmup} warm-up steps, then {args.repeats} "
        f"rounds x {args.steps} timed steps per side", flush=True)
  print(HEADER, flush=True)
  results = []
  for name in args.configs:
    results.append(bench_config(name, args.batch, args, ",".join(map(str, cpus))))
    print(table_row(results[-1]), flush=True)
    if args.json:
      files.write_json(args.json, {"command": command, "threads": args.threads,
                                   "results": results})
  if args.parts:
    print("\nWhere the time goes (medians, ms):\n" + PARTS_HEADER)
    for r in results:
      print("\n".join(parts_rows(r)))
  print(f"(load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)")
  return results


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except UserError as e:
    sys.exit(f"error: {e}")
