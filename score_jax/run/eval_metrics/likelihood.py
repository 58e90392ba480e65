"""Likelihood on eval.bpd_dataset with the probability-flow ODE, eval.bpd_passes passes:
bits/dim of uniformly dequantized 8-bit images, or (2-D toy data) the negative
log-likelihood in nats per dimension; mean and standard error."""

from __future__ import annotations

import logging
import math
from typing import Any, Dict

import jax
import numpy as np

from score_jax.run.distributed import check_batch, global_array, to_host
from score_jax.run.eval_metrics.base import Inputs, Metric, Stage
from score_jax.run.plan import Plan


def _name(plan: Plan) -> str:
  return "bpd" if plan.data.is_images else "nll_nats_per_dim"


def compute(inputs: Inputs) -> Dict[str, Any]:
  """eval.bpd_passes passes of the likelihood over eval.bpd_dataset, resumable per batch.

  Pass p, batch i use the key fold_in(fold_in(rng, p), i) for dequantization
  and the Hutchinson probes, so a batch redone after an interruption gives
  the same values. Per-pass sums (of values and squares, in float64) go to
  progress.json after every batch.

  Returns (images; 'nll_nats_per_dim' etc. for 2-D data):
    bpd: mean over all passes and examples; bpd_stderr: standard error over
    the N test examples, sqrt(var / N) with the variance over all values
    (passes repeat the same examples, so N, not N * passes);
    bpd_passes: each pass's mean; likelihood_nfe: mean NFE per batch.
  """
  plan, progs, progress = inputs.plan, inputs.progs, inputs.progress
  e, images = plan.eval, plan.data.is_images
  batch = check_batch("eval.batch_size", e.batch_size)
  num_passes = e.bpd_passes
  options = dict(e.likelihood_kwargs(), batch_size=batch, dataset=e.bpd_dataset)
  state = progress.data.get("likelihood")
  if state is None or state.get("settings") != options:
    if state is not None:
      logging.warning("Likelihood settings changed since the last run; starting its passes anew.")
    state = {"settings": options, "passes": []}
    progress.data["likelihood"] = state
  per_pass_batches = len(plan.data.batches(e.bpd_dataset, evaluation=True, raw=images,
                                           batch_size=batch))
  done = sum(r["next_batch"] for r in state["passes"][:num_passes])
  stage = Stage(f"likelihood ({num_passes} x {per_pass_batches} batches)",
                num_passes * per_pass_batches, min(done, num_passes * per_pass_batches))
  for p in range(num_passes):
    if p == len(state["passes"]):
      state["passes"].append({"next_batch": 0, "sum": 0.0, "sumsq": 0.0, "count": 0,
                              "nfe_sum": 0.0, "batches": 0, "done": False})
    rec = state["passes"][p]
    if rec["done"]:
      continue
    fn = progs.likelihood()
    pass_key = jax.random.fold_in(inputs.rng, p)
    it = plan.data.batches(e.bpd_dataset, evaluation=True, raw=images, batch_size=batch,
                           start_step=rec["next_batch"])
    for i, b in enumerate(it, start=rec["next_batch"]):
      data = b["image"] if images else b["image"].astype(np.float32)
      value, nfe = fn(inputs.params, jax.random.fold_in(pass_key, i),
                      global_array(progs.bat, data),
                      global_array(progs.bat, b["label"].astype(np.int32)))
      value = to_host(value).astype(np.float64)
      mask = to_host(global_array(progs.bat, b["mask"]))
      if not np.all(np.isfinite(value[mask])):
        raise FloatingPointError(f"Non-finite likelihood in pass {p}, batch {i}: the ODE solve "
                                 "failed (try a larger eval.likelihood_rtol / atol).")
      rec.update(next_batch=i + 1, sum=rec["sum"] + float(value[mask].sum()),
                 sumsq=rec["sumsq"] + float((value[mask]**2).sum()),
                 count=rec["count"] + int(mask.sum()), nfe_sum=rec["nfe_sum"] + float(nfe),
                 batches=rec["batches"] + 1)
      progress.save()
      stage.step()
      logging.debug("likelihood pass %d batch %d: running mean %.5f", p, i,
                    rec["sum"] / rec["count"])
    rec["done"] = True
    progress.save()
  stage.close()
  passes = state["passes"][:num_passes]
  total = sum(r["sum"] for r in passes)
  sumsq = sum(r["sumsq"] for r in passes)
  count = sum(r["count"] for r in passes)
  mean = total / count
  var = max(sumsq / count - mean**2, 0.0)
  per_pass = count // num_passes
  name = _name(plan)
  logging.info("ckpt %d (step %d): %s %.4f +- %.4f", inputs.index, inputs.step, name, mean,
               math.sqrt(var / per_pass))
  return {name: mean, f"{name}_stderr": math.sqrt(var / per_pass),
          f"{name}_passes": [r["sum"] / r["count"] for r in passes],
          "likelihood_examples": per_pass,
          "likelihood_nfe": sum(r["nfe_sum"] for r in passes) / sum(r["batches"] for r in passes)}


METRIC = Metric(enabled=lambda plan: plan.eval.enable_bpd, done_key=_name, compute=compute,
                stream=2, scalars=("bpd", "bpd_stderr", "nll_nats_per_dim",
                                   "nll_nats_per_dim_stderr"))
