"""eval.num_samples samples from the configured sampler, in rounds of eval.batch_size, written
as array shards (what the sample-quality units read), plus a PNG grid (a scatter plot beside
the data for 2-D data); yields their count, NFE and speed."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List

import jax
import numpy as np

from score_jax import plotting
from score_jax.run import distributed
from score_jax.run.distributed import check_batch, global_array, local_rows, sync, to_host
from score_jax.run.eval_metrics.base import Inputs, Metric, Stage, shard_count, shard_path
from score_jax.run.plan import Plan
from score_jax.run import grids

_GRID_SIZE = 64  # images in the PNG grid
_SCATTER_POINTS = 8192  # toy samples in the scatter plot


def _round_sizes(num_samples: int, batch: int) -> List[int]:
  """Samples kept from each round: full batches, the last one cut to the total."""
  return [min(batch, num_samples - start) for start in range(0, num_samples, batch)]


def compute(inputs: Inputs) -> Dict[str, Any]:
  """Writes eval.num_samples samples as shards samples_<r>.npz, skipping finished rounds.

  Round r samples a full batch with key fold_in(rng, r) and keeps its first
  min(B, num_samples - r B) samples, so shards always add up to exactly
  num_samples. A shard of the wrong size (num_samples changed) is redone.
  Class-conditional models cycle through the labels.
  """
  plan, progs, progress, out_dir = inputs.plan, inputs.progs, inputs.progress, inputs.out_dir
  batch = check_batch("eval.batch_size", plan.eval.batch_size)
  sizes = _round_sizes(plan.eval.num_samples, batch)
  made_with = plan.eval.sampling_fingerprint
  old = progress.data.get("sampling_settings")
  if old is not None and old != made_with and any(
      os.path.exists(shard_path(out_dir, "samples", r)) for r in range(len(sizes))):
    raise ValueError(
        f"The sample shards in {out_dir} were made with other sampling settings (sampler, "
        "model, seed or eval.batch_size); mixing them would be wrong. Delete that folder "
        "or run with the original settings.")
  progress.data["sampling_settings"] = made_with
  progress.save()
  num_classes = plan.data.num_classes
  weight = plan.sampling.guidance_weight
  params = progs.guided(inputs.params)  # with the autoguidance guide's, if any
  rng = inputs.rng
  # Decided before anything is written, and alike on every process: sampling is collective.
  todo = [r for r, n in enumerate(sizes) if shard_count(shard_path(out_dir, "samples", r)) != n]
  sync(f"sampling_todo_{out_dir}")
  sample_fn = None
  new_samples, seconds, compile_s = 0, 0.0, 0.0
  stage = Stage(f"sampling ({plan.eval.num_samples} samples)", len(sizes),
                len(sizes) - len(todo), unit="round")
  for r in todo:
    n, path = sizes[r], shard_path(out_dir, "samples", r)
    y = global_array(progs.bat, local_rows(((r * batch + np.arange(batch)) % max(num_classes, 1))
                                           .astype(np.int32)))
    key = jax.random.fold_in(rng, r)
    if sample_fn is None:
      # Compiled ahead of the first round, so samples/s counts sampling only.
      start = time.perf_counter()
      timesteps = grids.grid_for(progs, params, out_dir, weight, rng)  # unipc 'optimized'
      sample_fn = progs.sampler(batch, weight, timesteps).lower(params, key, y).compile()
      compile_s = time.perf_counter() - start
    start = time.perf_counter()
    x, nfe = sample_fn(params, key, y)
    x = to_host(x)[:n]
    seconds += time.perf_counter() - start
    if not np.all(np.isfinite(x)):
      raise FloatingPointError(f"Sampling round {r} produced non-finite values.")
    labels = to_host(y)[:n]
    if distributed.is_main():
      # Images as uint8 (latents decoded by the VAE first, and kept as 'latents').
      samples = plan.data.to_images(x, plan.eval.quantization) if plan.data.is_images else x
      arrays = {"samples": samples, "nfe": np.asarray(int(nfe))}
      if plan.data.is_latents:
        arrays["latents"] = x.astype(np.float32)
      if num_classes > 0:
        arrays["labels"] = labels
      plotting.save_arrays(path, **arrays)  # atomic: a shard on disk is a finished round
    new_samples += n
    stage.step()
    logging.debug("sampling round %d/%d: %d samples, %d score evaluations, %.1f s", r + 1,
                  len(sizes), n, int(nfe), seconds)
  stage.close()
  sync("sampling")
  if distributed.is_main():
    _write_picture(plan, out_dir, len(sizes))
  result: Dict[str, Any] = {"num_samples": sum(sizes), "sampling_rounds": len(sizes)}
  all_nfe = []
  for r in range(len(sizes)):
    with np.load(shard_path(out_dir, "samples", r)) as f:
      all_nfe.append(int(f["nfe"]))
  result["sampling_nfe"] = float(np.mean(all_nfe))
  if new_samples:  # this run's rounds only; a resumed run may have done none
    result["samples_per_s"] = new_samples / seconds
    result["sampling_compile_s"] = compile_s
  return result


def _write_picture(plan: Plan, out_dir: str, rounds: int) -> None:
  """samples.png: a grid of the first samples, or for 2-D data a scatter beside the test data."""
  path = os.path.join(out_dir, "samples.png")
  if plan.data.is_images:
    x = np.load(shard_path(out_dir, "samples", 0))["samples"][:_GRID_SIZE]
    plotting.save_image_grid(path, x.astype(np.float32) / 255.0)
    return
  pts, total = [], 0
  for r in range(rounds):
    if total >= _SCATTER_POINTS:
      break
    pts.append(np.load(shard_path(out_dir, "samples", r))["samples"])
    total += pts[-1].shape[0]
  data = next(iter(plan.data.batches("test", evaluation=True, batch_size=_SCATTER_POINTS,
                                     process_index=0, process_count=1)))["image"]
  plotting.save_scatter(path, np.concatenate(pts)[:_SCATTER_POINTS], np.asarray(data),
                        title=f"{min(total, _SCATTER_POINTS)} samples")


METRIC = Metric(enabled=lambda plan: plan.eval.enable_sampling,
                done_key=lambda plan: "num_samples", compute=compute, stream=3,
                scalars=("sampling_nfe", "samples_per_s"))
