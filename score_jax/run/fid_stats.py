"""FID and FD-DINOv2 reference statistics of a config's training images, in one command.

  python -m score_jax.run.fid_stats --config=configs/folder.py --workdir=runs/mine \\
      --config.data.path=/data/my_images

Writes the Inception statistics of every training image (uint8, as read for
training but without flips or dequantization; eval.stats_num_images caps the
count) where `--mode=eval` looks for them: eval.stats_path, else
WORKDIR/eval/stats_<dataset>_<size>_<resize>.npz; and, when DINOv2 weights are
found (eval.dinov2_path or the converter's default location), their DINOv2
statistics beside them: eval.dinov2_stats_path, else
WORKDIR/eval/stats_<dataset>_<size>_dinov2.npz. Each needs its network's
weights; the command writes those it can and fails if it can write none. A
file already there is kept (delete it to recompute). `--mode=eval` computes the same file on first
use; this command makes it before any training, e.g. to share through
eval.stats_path, or to compare samples of another model with your data.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, List, Optional, Sequence

__all__ = ["main", "write_stats"]

_USAGE = ("python -m score_jax.run.fid_stats --config=CONFIG --workdir=WORKDIR "
          "[--config.data.path=DIR] [--config.eval.inception_path=FILE] "
          "[--config.eval.dinov2_path=FILE]")

_NAMES = {"fid": "Inception", "fd_dinov2": "DINOv2"}  # the networks
_LABELS = {"fid": "FID", "fd_dinov2": "FD-DINOv2"}


def _unit(metric: str):
  from score_jax.run.eval_metrics import fd_dinov2, fid  # pylint: disable=g-import-not-at-top
  return {"fid": fid, "fd_dinov2": fd_dinov2}[metric]


def write_stats(settings: Any, workdir: str, metric: str = "fid", **kwargs: Any):
  """(path, Stats) of the settings' training images for `metric` ('fid': Inception,
  'fd_dinov2': DINOv2); kwargs: the unit's `reference_stats` feature_fn and batch."""
  from score_jax.run.plan import make_plan  # pylint: disable=g-import-not-at-top
  return _write(make_plan(settings), workdir, metric, **kwargs)  # a missing data.path fails here


def _write(plan: Any, workdir: str, metric: str, **kwargs: Any):
  from score_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top

  unit = _unit(metric)
  if not plan.data.is_images:
    raise ConfigError(f"{_NAMES[metric]} statistics need images; data.dataset "
                      f"{plan.data.name!r} is 2-D data.")
  if "feature_fn" not in kwargs:
    if not unit.weights_path(plan):
      raise ConfigError(unit.METRIC.why_off(plan))
    unit.METRIC.check(plan)  # a missing or malformed weight file: one line naming the converter
  return unit.reference_stats(plan, workdir, **kwargs)


def available(plan: Any) -> List[str]:
  """The metrics ('fid', 'fd_dinov2') whose network weights a run plan finds."""
  return [m for m in _NAMES if plan.data.is_images and _unit(m).weights_path(plan)]


def _define_flags(fv: Any, argv: List[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  # sys_argv: the --config.<key>=value overrides are found in argv, not sys.argv.
  config_flags.DEFINE_config_file("config", None, "The run's config (its data and eval sections).",
                                  flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "The run's workdir (the statistics go to WORKDIR/eval/).",
                      flag_values=fv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m score_jax.run.fid_stats ...`; returns the exit status (score_jax.run.cli)."""
  from score_jax.run import cli  # pylint: disable=g-import-not-at-top
  from score_jax.run import settings as settings_lib  # pylint: disable=g-import-not-at-top

  argv = list(sys.argv if argv is None else argv)
  parsed = cli.parse(argv, _define_flags, _USAGE, 0)
  if parsed is None or parsed[0].config is None or parsed[0].workdir is None:
    if parsed is not None:
      print(f"usage: {_USAGE}", file=sys.stderr)
    return cli.USAGE_ERROR
  fv = parsed[0]
  logging.getLogger().setLevel(logging.INFO)

  def run() -> int:
    from score_jax.run.plan import make_plan  # pylint: disable=g-import-not-at-top

    plan = make_plan(settings_lib.from_config(fv.config))  # a missing data.path fails here
    for metric in available(plan) or ["fid"]:  # none: FID's error names the converter
      path, stats = _write(plan, fv.workdir, metric)
      print(f"{path}: {_NAMES[metric]} statistics of {stats.num_images} training images; "
            f"--mode=eval measures {_LABELS[metric]} against them.")
    return 0

  return cli.report_user_errors(run)


if __name__ == "__main__":
  from score_jax.run import xla_flags  # pylint: disable=g-import-not-at-top

  xla_flags.apply_defaults()  # before JAX starts a backend
  sys.exit(main())
