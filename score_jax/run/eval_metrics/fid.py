"""FID, Inception Score and KID of the generated samples against the training set's Inception
statistics, with the Inception weights `weights_path(plan)` finds: eval.inception_path, or
when it is empty the file `python -m score_jax.convert.inception SRC` writes to its default
location (`score_jax.metrics.inception.default_weights_path()`; not for the digits, which
have their own FD)."""

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
  """The Inception weight file FID uses: eval.inception_path, else the converter's default
  location if a file is there (image data other than the digits), else ''."""
  from score_jax.metrics import inception  # pylint: disable=g-import-not-at-top

  if plan.eval.inception_path:
    return plan.eval.inception_path
  default = inception.default_weights_path()
  if plan.data.pixel_dataset != "digits" and os.path.isfile(default):
    return default
  return ""


def _stats_path(plan: Plan, workdir: str) -> str:
  e = plan.eval
  if e.stats_path:
    return e.stats_path
  name = re.sub(r"[^A-Za-z0-9_.-]+", "_", plan.data.name)
  return os.path.join(workdir, "eval",
                      f"stats_{name}_{plan.data.image_size}_{e.inception_resize}.npz")


def _dataset_stats(plan: Plan, progs: Programs, workdir: str, feature_fn, batch: int):
  """The cached Inception statistics of the training images, computed on first use."""
  return dataset_stats(plan, _stats_path(plan, workdir), "Inception",
                       lambda images: batched(feature_fn, images, batch, progs.bat)["pool"],
                       batch, num_features_kept=plan.eval.kid_dataset_features)


def _inception(plan: Plan, progs: Programs):
  """(uint8 images -> {'pool', 'logits'} of the Inception network `weights_path` finds, its
  batch size)."""
  from score_jax.metrics import inception  # pylint: disable=g-import-not-at-top

  e = plan.eval
  params = jax.device_put(inception.load_inception_params(weights_path(plan)), progs.rep)
  raw_fn = progs.inception(e.inception_resize, e.inception_precision)
  return (lambda images: raw_fn(params, images)), distributed.padded(e.inception_batch_size)


def reference_stats(plan: Plan, workdir: str, *, progs: Programs | None = None,
                    feature_fn=None, batch: int = 0):
  """(path, Stats): the training images' Inception statistics as `--mode=eval` finds them
  (eval.stats_path, else WORKDIR/eval/stats_<dataset>_<size>_<resize>.npz), computed and
  cached there unless the file exists.

  feature_fn, batch: another feature network (uint8 images -> {'pool'}) and its batch size,
  for tests; default the Inception network `weights_path` finds.
  """
  progs = progs or Programs(plan)
  if feature_fn is None:
    feature_fn, batch = _inception(plan, progs)
  return _stats_path(plan, workdir), _dataset_stats(plan, progs, workdir, feature_fn, batch)


def compute(inputs: Inputs) -> Dict[str, Any]:
  """FID, IS and KID of the shards' samples against the training set's Inception statistics.

  Features of each shard are saved beside it (features_<r>.npz), so an
  interrupted run computes only the missing ones. The dataset statistics
  are computed once (all training images as uint8, eval.stats_num_images
  to cap) and cached in eval.stats_path (default WORKDIR/eval/stats_*.npz).
  """
  from score_jax.metrics import stats as metrics  # pylint: disable=g-import-not-at-top

  plan, progs = inputs.plan, inputs.progs
  e = plan.eval
  resize, precision = e.inception_resize, e.inception_precision
  feature_fn, batch = _inception(plan, progs)
  feats = shard_features(inputs, "features", "Inception features of the samples",
                         lambda samples: batched(feature_fn, samples, batch, progs.bat))
  pool, logit = feats["pool"], feats["logits"]

  stats = _dataset_stats(plan, progs, inputs.workdir, feature_fn, batch)
  result: Dict[str, Any] = {
      "fid": metrics.fid_from_stats(*metrics.stats_from_features(pool), stats.mu, stats.sigma),
      "inception_score": metrics.inception_score(logit)[0],
      "fid_dataset_images": int(stats.num_images), "fid_resize": resize,
      "fid_precision": precision}
  if stats.features is not None and stats.features.shape[0] >= 2:
    result["kid"], result["kid_std"] = metrics.kid(pool, stats.features)
  else:
    logging.info("%s holds no feature rows: KID skipped.", _stats_path(plan, inputs.workdir))
  result["fid_quantization"] = e.quantization
  logging.info("ckpt %d (step %d): FID %.3f, IS %.3f, KID %s (samples quantized by %s)",
               inputs.index, inputs.step, result["fid"], result["inception_score"],
               result.get("kid"), e.quantization)
  _warn_if_not_the_reference_network(plan)
  return result


def _warn_if_not_the_reference_network(plan: Plan) -> None:
  """For 256 px and up the reference measured FID with another network (docs/evaluation.md)."""
  if plan.data.image_size >= 256 and not plan.data.is_latents:
    logging.warning(
        "FID at %d px: the 2021 reference computed FID for image_size >= 256 with TF-Hub's "
        "imagenet/inception_v3/feature_vector/4 on x / 255 inputs, not the 2015 FID Inception "
        "used here, so this FID is not comparable with the paper's 256 / 1024 px FIDs.",
        plan.data.image_size)


def _check(plan: Plan) -> None:
  """A missing or malformed weight file fails before hours of sampling, not after."""
  from score_jax.metrics import inception  # pylint: disable=g-import-not-at-top
  inception.load_inception_params(weights_path(plan))


def _why_off(plan: Plan) -> str:
  from score_jax.metrics import inception  # pylint: disable=g-import-not-at-top

  if not plan.data.is_images:
    return "2-D data: no FID / IS / KID (they need images); see samples.png."
  if plan.data.pixel_dataset == "digits":
    return "digits: FID / IS / KID only with eval.inception_path (the digits FD is reported)."
  return (f"No FID Inception weights (eval.inception_path is empty and "
          f"{inception.default_weights_path()} does not exist): FID / IS / KID skipped. "
          f"Download {inception.PUBLISHED_URL} and run once: python -m "
          f"score_jax.convert.inception {inception.PUBLISHED_WEIGHTS}")


METRIC = Metric(enabled=lambda plan: plan.data.is_images and bool(weights_path(plan)),
                done_key=lambda plan: "fid", compute=compute, needs=("samples",),
                scalars=("fid", "inception_score", "kid"), check=_check, why_off=_why_off)
