"""The sample-quality stages of the eval mode: FID / IS / KID and the digits FD.

Both read the sample shards the sampling stage of `score_jax.run.evaluate` wrote
(WORKDIR/eval/ckpt_<k>/samples_<r>.npz) and keep what they compute beside
them, so an interrupted eval computes only what is missing.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Dict, List

import jax
import numpy as np
from jax.sharding import NamedSharding

from score_jax import plotting
from score_jax.run import distributed
from score_jax.run import programs
from score_jax.run.distributed import global_array, local_rows, sync, to_host
from score_jax.run.programs import Programs
from score_jax.run.settings import Settings

Array = jax.Array

__all__ = ["fid_stage", "digits_stage", "shard_path", "shard_count", "batched",
           "warn_if_not_the_reference_network"]


def shard_path(out_dir: str, kind: str, r: int) -> str:
  return os.path.join(out_dir, f"{kind}_{r}.npz")


def shard_count(path: str) -> int:
  """Samples in a shard file, -1 if absent or unreadable."""
  try:
    with np.load(path) as f:
      return int(f["samples"].shape[0])
  except (OSError, KeyError, ValueError):
    return -1


def batched(fn: Callable[[Array], Dict[str, Array]], data: np.ndarray, batch: int,
            sharding: NamedSharding) -> Dict[str, np.ndarray]:
  """fn over data [N, ...] in fixed-size batches (the last one padded: one compilation)."""
  outs: Dict[str, List[np.ndarray]] = {}
  for start in range(0, data.shape[0], batch):
    chunk = data[start:start + batch]
    n = chunk.shape[0]
    res = fn(global_array(sharding, local_rows(distributed.pad_rows(chunk, batch))))
    for k, v in res.items():
      outs.setdefault(k, []).append(to_host(v)[:n])
  return {k: np.concatenate(v) for k, v in outs.items()}


def _stats_path(s: Settings, workdir: str) -> str:
  if s.eval.stats_path:
    return s.eval.stats_path
  name = re.sub(r"[^A-Za-z0-9_.-]+", "_", s.data.dataset)
  return os.path.join(workdir, "eval",
                      f"stats_{name}_{s.data.image_size}_{s.eval.inception_resize}.npz")


def _dataset_stats(progs: Programs, workdir: str, feature_fn, batch: int):
  """The cached Inception statistics of the training images, computed on first use."""
  from score_jax.metrics import stats as metrics  # pylint: disable=g-import-not-at-top

  s = progs.settings
  stats_path = _stats_path(s, workdir)
  exists = os.path.exists(stats_path)
  sync("stats_exists")  # every process must take the same branch: computing is collective
  if exists:
    return metrics.load_stats(stats_path)
  logging.info("Computing Inception statistics of the %s training images -> %s (once).",
               s.data.dataset, stats_path)
  # Every process reads whole global batches; _batched gives the devices their rows.
  train_images = (b["image"][b["mask"]] for b in programs.get_dataset(
      s, "train", evaluation=True, raw=True, batch_size=batch, process_index=0,
      process_count=1))
  # Only process 0 writes the cache; the others keep theirs in a private file.
  path = stats_path if distributed.is_main() else f"{stats_path}.process{jax.process_index()}"
  stats = metrics.dataset_stats(
      path, train_images, lambda images: batched(feature_fn, images, batch, progs.bat)["pool"],
      recompute=True, num_features_kept=s.eval.kid_dataset_features,
      max_images=s.eval.stats_num_images or None)
  if not distributed.is_main():
    os.remove(path)
  return stats


def fid_stage(progs: Programs, workdir: str, out_dir: str, rounds: int) -> Dict[str, Any]:
  """FID, IS and KID of the shards' samples against the training set's Inception statistics.

  Features of each shard are saved beside it (features_<r>.npz), so an
  interrupted run computes only the missing ones. The dataset statistics
  are computed once (all training images as uint8, eval.stats_num_images
  to cap) and cached in eval.stats_path (default WORKDIR/eval/stats_*.npz).
  """
  from score_jax.metrics import inception
  from score_jax.metrics import stats as metrics  # pylint: disable=g-import-not-at-top

  s = progs.settings
  params = jax.device_put(inception.load_inception_params(s.eval.inception_path), progs.rep)
  resize, precision = s.eval.inception_resize, s.eval.inception_precision
  batch = distributed.padded(s.eval.inception_batch_size)
  raw_fn = progs.inception(resize, precision)
  feature_fn = lambda images: raw_fn(params, images)

  def features_done(r: int) -> bool:  # present and made from the shard as it is now
    path = shard_path(out_dir, "features", r)
    if not os.path.exists(path):
      return False
    with np.load(path) as f:
      return f["pool"].shape[0] == shard_count(shard_path(out_dir, "samples", r))

  todo = {r for r in range(rounds) if not features_done(r)}
  sync(f"features_todo_{out_dir}")  # decided alike on every process: Inception is collective
  pools, logits = [], []
  for r in range(rounds):
    path = shard_path(out_dir, "features", r)
    if r in todo:
      with np.load(shard_path(out_dir, "samples", r)) as f:
        feats = batched(feature_fn, f["samples"], batch, progs.bat)
      pool, logit = feats["pool"], feats["logits"]
      if distributed.is_main():
        plotting.save_arrays(path, pool=pool, logits=logit)
    else:
      with np.load(path) as f:
        pool, logit = f["pool"], f["logits"]
    pools.append(pool)
    logits.append(logit)
  pool, logit = np.concatenate(pools), np.concatenate(logits)

  stats = _dataset_stats(progs, workdir, lambda x: raw_fn(params, x), batch)
  result: Dict[str, Any] = {
      "fid": metrics.fid_from_stats(*metrics.stats_from_features(pool), stats.mu, stats.sigma),
      "inception_score": metrics.inception_score(logit)[0],
      "fid_dataset_images": int(stats.num_images), "fid_resize": resize,
      "fid_precision": precision}
  if stats.features is not None and stats.features.shape[0] >= 2:
    result["kid"], result["kid_std"] = metrics.kid(pool, stats.features)
  else:
    logging.info("%s holds no feature rows: KID skipped.", _stats_path(s, workdir))
  return result


def digits_stage(progs: Programs, workdir: str, out_dir: str, rounds: int) -> Dict[str, Any]:
  """digits FD, its floor and the classifier scores of the shards' samples (digits_metric.py).

  Host-side and cheap: every process computes the same numbers; process 0
  alone writes the classifier cache. Class-conditional shards add the
  accuracy with respect to the requested labels.
  """
  from score_jax.metrics import digits as digits_metric  # pylint: disable=g-import-not-at-top

  metric = digits_metric.load_or_train(os.path.join(workdir, "eval", "digits_classifier.npz"),
                                       write=distributed.is_main())
  samples, labels = [], []
  for r in range(rounds):
    with np.load(shard_path(out_dir, "samples", r)) as f:
      samples.append(f["samples"])
      if "labels" in f.files:
        labels.append(f["labels"])
  scores = metric.scores(np.concatenate(samples), np.concatenate(labels) if labels else None)
  return {**scores, "digits_fd_floor": metric.floor}


# ----------------------------------------------------------------------------
# One checkpoint, and the eval mode


def warn_if_not_the_reference_network(s: Settings) -> None:
  """For 256 px and up the reference measured FID with another network (docs/evaluation.md)."""
  if s.data.image_size >= 256:
    logging.warning(
        "FID at %d px: the 2021 reference computed FID for image_size >= 256 with TF-Hub's "
        "imagenet/inception_v3/feature_vector/4 on x / 255 inputs, not the 2015 FID Inception "
        "used here, so this FID is not comparable with the paper's 256 / 1024 px FIDs.",
        s.data.image_size)


