"""The eval mode's metrics, one unit per module (interface: `base.Metric`).

`METRICS` is the one table: name -> unit, in the order they run (a unit runs
after the units it needs). Adding a metric is a module with a `METRIC` and a
line here. Every unit reads the run plan and the programs, never settings,
and lives here, in the running layer, because it drives the jitted programs,
the datasets and the workdir's files (score_jax.metrics holds the math they
call: Inception, DINOv2, FID/IS/KID, the digits classifier).
"""

from __future__ import annotations

from typing import Dict, List

from score_jax.run.eval_metrics import digits, fd_dinov2, fid, likelihood, loss, samples
from score_jax.run.eval_metrics.base import Inputs, Metric, Progress
from score_jax.run.plan import Plan

__all__ = ["METRICS", "Metric", "Inputs", "Progress", "enabled", "scalar_names"]

METRICS: Dict[str, Metric] = {
    "loss": loss.METRIC,
    "likelihood": likelihood.METRIC,
    "samples": samples.METRIC,
    "fid": fid.METRIC,
    "fd_dinov2": fd_dinov2.METRIC,
    "digits": digits.METRIC,
}


def enabled(plan: Plan) -> List[str]:
  """The units the plan enables, in table order: on, and every unit they need on too."""
  on: List[str] = []
  for name, metric in METRICS.items():
    if metric.enabled(plan) and all(n in on for n in metric.needs):
      on.append(name)
  return on


def scalar_names() -> List[str]:
  """Every unit's TensorBoard scalars."""
  return [k for metric in METRICS.values() for k in metric.scalars]
