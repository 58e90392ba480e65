"""FD-DINOv2 (EDM2's fd_dinov2): the Frechet distance between DINOv2 ViT-L/14 features of the
generated samples and of the training images, with the weights `weights_path(plan)` finds:
eval.dinov2_path, or when it is empty the file `python -m score_jax.convert.dinov2 SRC` writes
to its default location (`score_jax.metrics.dinov2.default_weights_path()`; not for the
digits). Features as EDM2's calculate_metrics.py computes them (score_jax.metrics.dinov2), the
distance as FID's (score_jax.metrics.stats.fid_from_stats)."""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict

import jax

from score_jax.run import distributed
from score_jax.run.eval_metrics.base import Inputs, Metric, batched, dataset_stats, shard_features
from score_jax.run.plan import Plan
from score_jax.run.programs import Programs


def weights_path(plan: Plan) -> str:
  """The DINOv2 weight file: eval.dinov2_path, else the converter's default location if a file
  is there (image data other than the digits), else ''."""
  from score_jax.metrics import dinov2  # pylint: disable=g-import-not-at-top

  if plan.eval.dinov2_path:
    return plan.eval.dinov2_path
  default = dinov2.default_weights_path()
  if plan.data.pixel_dataset != "digits" and os.path.isfile(default):
    return default
  return ""


def stats_path(plan: Plan, workdir: str) -> str:
  """eval.dinov2_stats_path, else WORKDIR/eval/stats_<dataset>_<size>_dinov2.npz (beside
  FID's statistics)."""
  if plan.eval.dinov2_stats_path:
    return plan.eval.dinov2_stats_path
  name = re.sub(r"[^A-Za-z0-9_.-]+", "_", plan.data.name)
  return os.path.join(workdir, "eval", f"stats_{name}_{plan.data.image_size}_dinov2.npz")


def _network(plan: Plan, progs: Programs):
  """(uint8 images -> {'features'} of the DINOv2 network `weights_path` finds, its batch
  size)."""
  from score_jax.metrics import dinov2  # pylint: disable=g-import-not-at-top

  params, arch = dinov2.load_dinov2_params(weights_path(plan))
  params = jax.device_put(params, progs.rep)
  raw_fn = progs.dinov2(arch, plan.eval.dinov2_precision)
  return (lambda images: raw_fn(params, images)), distributed.padded(plan.eval.dinov2_batch_size)


def _dataset_stats(plan: Plan, progs: Programs, workdir: str, feature_fn, batch: int):
  return dataset_stats(plan, stats_path(plan, workdir), "DINOv2",
                       lambda images: batched(feature_fn, images, batch, progs.bat)["features"],
                       batch)


def reference_stats(plan: Plan, workdir: str, *, progs: Programs | None = None,
                    feature_fn=None, batch: int = 0):
  """(path, Stats): the training images' DINOv2 statistics as `--mode=eval` finds them
  (`stats_path`), computed and cached there unless the file exists.

  feature_fn, batch: another feature network (uint8 images -> {'features'}) and its batch
  size, for tests; default the DINOv2 network `weights_path` finds.
  """
  progs = progs or Programs(plan)
  if feature_fn is None:
    feature_fn, batch = _network(plan, progs)
  return stats_path(plan, workdir), _dataset_stats(plan, progs, workdir, feature_fn, batch)


def compute(inputs: Inputs) -> Dict[str, Any]:
  """FD-DINOv2 of the shards' samples against the training images' DINOv2 statistics.

  Features of each shard are saved beside it (dinov2_<r>.npz), so an interrupted run computes
  only the missing ones; the dataset statistics are computed once and cached (`stats_path`).
  """
  from score_jax.metrics import stats as metrics  # pylint: disable=g-import-not-at-top

  plan, progs = inputs.plan, inputs.progs
  feature_fn, batch = _network(plan, progs)
  feats = shard_features(inputs, "dinov2", "DINOv2 features of the samples",
                         lambda samples: batched(feature_fn, samples, batch, progs.bat))
  stats = _dataset_stats(plan, progs, inputs.workdir, feature_fn, batch)
  fd = metrics.fid_from_stats(*metrics.stats_from_features(feats["features"]), stats.mu,
                              stats.sigma)
  logging.info("ckpt %d (step %d): FD-DINOv2 %.3f", inputs.index, inputs.step, fd)
  return {"fd_dinov2": fd, "fd_dinov2_dataset_images": int(stats.num_images)}


def _check(plan: Plan) -> None:
  """A missing or malformed weight file fails before hours of sampling, not after."""
  from score_jax.metrics import dinov2  # pylint: disable=g-import-not-at-top
  dinov2.load_dinov2_params(weights_path(plan))


def _why_off(plan: Plan) -> str:
  from score_jax.metrics import dinov2  # pylint: disable=g-import-not-at-top

  if not plan.data.is_images:
    return "2-D data: no FD-DINOv2 (it needs images)."
  if plan.data.pixel_dataset == "digits":
    return "digits: FD-DINOv2 only with eval.dinov2_path."
  return (f"No DINOv2 weights (eval.dinov2_path is empty and {dinov2.default_weights_path()} "
          f"does not exist): FD-DINOv2 skipped. Download {dinov2.PUBLISHED_URL} and run once: "
          f"python -m score_jax.convert.dinov2 {dinov2.PUBLISHED_WEIGHTS}")


METRIC = Metric(enabled=lambda plan: plan.data.is_images and bool(weights_path(plan)),
                done_key=lambda plan: "fd_dinov2", compute=compute, needs=("samples",),
                scalars=("fd_dinov2",), check=_check, why_off=_why_off)
