"""For data.dataset 'digits' (and latents of the digits, decoded): the digits FD of the generated
samples, its floor and the classifier scores (score_jax/metrics/digits.py: a small classifier
trained in seconds, cached in WORKDIR/eval/digits_classifier.npz)."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict

import numpy as np

from score_jax.run import distributed
from score_jax.run.eval_metrics.base import Inputs, Metric, shard_path


def compute(inputs: Inputs) -> Dict[str, Any]:
  """digits FD, its floor and the classifier scores of the shards' samples.

  Host-side and cheap: every process computes the same numbers; process 0
  alone writes the classifier cache. Class-conditional shards add the
  accuracy with respect to the requested labels.
  """
  from score_jax.metrics import digits as digits_metric  # pylint: disable=g-import-not-at-top

  metric = digits_metric.load_or_train(
      os.path.join(inputs.workdir, "eval", "digits_classifier.npz"), write=distributed.is_main())
  samples, labels = [], []
  for r in range(inputs.results["sampling_rounds"]):
    with np.load(shard_path(inputs.out_dir, "samples", r)) as f:
      samples.append(f["samples"])
      if "labels" in f.files:
        labels.append(f["labels"])
  scores = metric.scores(np.concatenate(samples), np.concatenate(labels) if labels else None)
  result = {**scores, "digits_fd_floor": metric.floor}
  logging.info("ckpt %d (step %d): digits FD %.4f (floor %.4f), confident %.3f, "
               "classifier score %.3f", inputs.index, inputs.step, result["digits_fd"],
               result["digits_fd_floor"], result["digits_confident"],
               result["digits_classifier_score"])
  return result


METRIC = Metric(enabled=lambda plan: plan.data.pixel_dataset.lower() == "digits",
                done_key=lambda plan: "digits_fd", compute=compute, needs=("samples",),
                scalars=("digits_fd", "digits_fd_floor", "digits_fd_355", "digits_confident",
                         "digits_classifier_score", "digits_class_balance",
                         "digits_label_accuracy"))
