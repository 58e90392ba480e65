"""The eval loss: the training objective's mean per-example loss over the eval split ('test')."""

from __future__ import annotations

import logging
from typing import Any, Dict

import jax
import numpy as np

from score_jax.run.distributed import global_array, to_host
from score_jax.run.eval_metrics.base import Inputs, Metric


def compute(inputs: Inputs) -> Dict[str, Any]:
  """Mean per-example loss of the parameters over the whole eval split, without dropout."""
  progress, progs = inputs.progress, inputs.progs
  if "loss" not in progress.data:
    fn = progs.loss()
    total = count = 0.0
    for i, batch in enumerate(inputs.plan.data.batches("test", evaluation=True)):
      x = global_array(progs.bat, batch["image"].astype(np.float32))
      y = global_array(progs.bat, batch["label"].astype(np.int32))
      per = to_host(fn(inputs.params, jax.random.fold_in(inputs.rng, i), x, y))
      mask = to_host(global_array(progs.bat, batch["mask"]))  # padding of the last batch
      total += float(np.sum(per[mask], dtype=np.float64))
      count += int(mask.sum())
    progress.data["loss"] = {"eval_loss": total / count, "eval_loss_examples": int(count)}
    progress.save()
  values = progress.data["loss"]
  logging.info("ckpt %d (step %d): eval loss %.5g", inputs.index, inputs.step,
               values["eval_loss"])
  return values


METRIC = Metric(enabled=lambda plan: plan.eval.enable_loss, done_key=lambda plan: "eval_loss",
                compute=compute, stream=1, scalars=("eval_loss",))
