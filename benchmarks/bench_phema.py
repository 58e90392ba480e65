"""Post-hoc EMA: how well profiles reconstructed from snapshots match the same profiles tracked.

  python benchmarks/bench_phema.py                      # configs/toy.py, 2000 steps, every 100
  python benchmarks/bench_phema.py --steps 4000 --every 200 --config configs/toy_edm.py

Trains the config (train.train_and_evaluate on a temporary workdir) with the
two EDM2 profiles (sigma_rel 0.05 and 0.10) and, tracked directly beside them,
the targets (--targets). Each target is then reconstructed at the last step
from the snapshots of the two EDM2 profiles only (score_jax.convert.phema.reconstruct)
and compared with its tracked twin over all parameters:

  residual    relative L2 distance of the reconstructed and the target averaging profile
  max / rms   largest and root-mean-square |reconstruction - tracked| over the parameters
  nearest     rms |tracked 0.05 or 0.10 profile - tracked target|, the nearer one: the
              error of using the nearest tracked profile instead of a reconstruction

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from score_jax.run import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # main.py's CPU compiler settings, before JAX starts

from score_jax.convert import phema as phema_recon
from score_jax.run import phema
from score_jax.run import settings
from score_jax.run import train  # noqa: E402

SOURCES = (0.05, 0.10)


def _flat(profile):
  return np.concatenate([np.ravel(profile[k]).astype(np.float64) for k in sorted(profile)])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/toy.py")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--every", type=int, default=100, help="training.phema_snapshot_freq")
  parser.add_argument("--targets", default="0.03,0.075,0.15,0.25")
  args = parser.parse_args()
  targets = tuple(float(v) for v in args.targets.split(","))
  spec = importlib.util.spec_from_file_location("bench_config", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  with config.unlocked():
    t = config.training
    t.n_iters, t.phema_snapshot_freq, t.snapshot_freq = args.steps, args.every, args.steps
    t.snapshot_freq_for_preemption, t.eval_freq, t.snapshot_sampling = 10 ** 9, 10 ** 9, False
    config.model.phema_sigma_rels = SOURCES + targets
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(settings.from_config(config), workdir)
    last = phema.list_snapshots(workdir)[-1]
    sources = [_flat(last.profile(i)) for i in range(len(SOURCES))]
    print(f"{args.config}, {args.steps} steps, snapshots of sigma_rel {SOURCES} every "
          f"{args.every} steps ({len(phema.list_snapshots(workdir))} snapshots), "
          f"{sources[0].size} parameters\n")
    print("| target sigma_rel | gamma | residual | max error | rms error | rms nearest |")
    print("|---|---|---|---|---|---|")
    for i, target in enumerate(targets, start=len(SOURCES)):
      direct = _flat(last.profile(i))
      rec = phema_recon.reconstruct(workdir, target, from_sigma_rels=SOURCES)
      err = _flat(rec.params) - direct
      rms = lambda a: float(np.sqrt(np.mean(a ** 2)))
      nearest = min(rms(s - direct) for s in sources)
      print(f"| {target:g} | {phema.sigma_rel_to_gamma(target):.2f} | {rec.residual:.2e} | "
            f"{np.abs(err).max():.2e} | {rms(err):.2e} | {nearest:.2e} |")


if __name__ == "__main__":
  main()
