"""The sample mode: `run(settings, workdir)` writes samples of one checkpoint.

`--mode=sample` loads one checkpoint (sample.ckpt_step, default the newest
intact one) and writes sample.num samples as PNG, .npz and .json with any
sampler, named by task, step, sampler and NFE and never overwritten; sample.task
picks unconditional generation, inpainting or colorization of given images,
or interpolation through the probability-flow ODE. Class-conditional models
take sample.class_label and sampling.guidance_weight (classifier-free
guidance). Each task is a unit of score_jax.run.sample_tasks (`TASKS`);
`load_images`, `inpainting_mask` and `slerp` are their inputs.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Mapping, Optional

import jax
import numpy as np

from score_jax import files, plotting
from score_jax.run import checkpoints
from score_jax.run import load as runs
from score_jax.run import programs
from score_jax.run import state as run_state
from score_jax.run.distributed import global_array, is_main, local_rows
from score_jax.run.plan import Plan, make_plan
from score_jax.run.sample_tasks import (MASKS, TASKS, ImagesError, MissingImagesError, TaskInputs,
                                        TaskOutput, inpainting_mask, load_images, sample_labels,
                                        slerp)
from score_jax.run.settings import Settings

__all__ = ["run", "load_images", "inpainting_mask", "slerp", "MASKS", "ImagesError",
           "MissingImagesError"]

_GRID_SIZE = 64  # images in the PNG grid


def run(settings: Settings, workdir: str) -> Dict[str, str]:
  """The sample mode: writes sample.num samples of one checkpoint (EMA parameters).

  sample.task:
    generate: unconditional (or class-conditional, sample.class_label,
      sampling.guidance_weight) samples with the sampling section's sampler.
    inpaint: fills the unknown part (sample.mask) of sample.images_path
      (default: the dataset's first test images).
    colorize: colors gray versions of sample.images_path (default: the test
      images; RGB models).
    interpolate: sample.interpolation_steps points along a slerp between two
      latents of the probability-flow ODE: the encodings of the first two
      images of sample.images_path, or two prior draws when it is empty.
  Files, in <out> = sample.output_dir or WORKDIR/sample, named
  <task>_step<k>_<sampler>_nfe<n> (`output_base`; interpolate's sampler is
  the ODE) and never overwritten (a second run gets _2, _3, ...):
  .png (grid, or scatter for 2-D data), .npz ('samples' in model space,
  'images' uint8 for image data (for data.dataset='latents' the samples are latents and
  'images' their decoding through data.vae or the VAE of the latent dataset), 'labels', 'nfe', and
  'inputs' for inpaint / colorize) and .json (task, step, sampler, NFE and the sampling section).

  Returns:
    {'png': path, 'npz': path, 'json': path}.
  """
  plan = make_plan(settings, need_data=False)
  task = TASKS[plan.sample.task]
  task.check(plan)
  sample_labels(plan, 1)  # a bad class label fails before the checkpoint loads
  if plan.data.is_latents:  # and a missing or foreign VAE (data.vae, data.path)
    from score_jax.data import latents  # pylint: disable=g-import-not-at-top
    latents.latent_decoder(plan.data.source)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  step, params = checkpoints.restore_intact(
      ckpt_dir, lambda k: run_state.restore_ema_params(plan, ckpt_dir, k), plan.sample.ckpt_step)
  progs = programs.Programs(plan, guide=runs.load_guide(settings, plan))
  params = progs.guided(params)
  rng = jax.random.fold_in(jax.random.PRNGKey(plan.sample.seed), step)
  put = lambda a: global_array(progs.bat, local_rows(a))
  out = task.run(TaskInputs(plan, progs, params, rng, workdir, put))
  return write(plan, out, workdir, step, sampling=settings.raw["sampling"])


def sampler_name(plan: Plan) -> str:
  """The sampler a task uses: sampling.method, or 'ode' for interpolate (the probability-flow
  ODE whatever the method)."""
  return "ode" if plan.sample.task == "interpolate" else plan.sampling.method


def output_base(out_dir: str, task: str, step: int, sampler: str, nfe: int) -> str:
  """<out_dir>/<task>_step<step>_<sampler>_nfe<nfe>, with _2, _3, ... appended while a file of
  that name (.png, .npz or .json) exists: earlier samples are never overwritten."""
  stem = os.path.join(out_dir, f"{task}_step{step}_{sampler}_nfe{nfe}")
  base, n = stem, 1
  while any(os.path.exists(base + ext) for ext in (".png", ".npz", ".json")):
    n += 1
    base = f"{stem}_{n}"
  return base


def write(plan: Plan, out: TaskOutput, workdir: str, step: int,
          sampling: Optional[Mapping[str, Any]] = None) -> Dict[str, str]:
  """<out>/<task>_step<k>_<sampler>_nfe<n>.png, .npz and .json of a task's output (process 0
  writes); `sampling`, the sampling section, goes into the .json."""
  x, task, data = out.x, plan.sample.task, plan.data
  if not np.all(np.isfinite(x)):
    raise FloatingPointError("Sampling produced non-finite values.")
  nfe, sampler = int(out.nfe), sampler_name(plan)
  base = output_base(plan.sample.output_dir or os.path.join(workdir, "sample"), task, step,
                     sampler, nfe)
  arrays = dict(out.arrays, samples=x.astype(np.float32), nfe=np.asarray(nfe))
  if data.num_classes > 0:
    arrays["labels"] = out.labels
  if is_main():
    if data.is_images:
      arrays["images"] = data.to_images(x, plan.sample.quantization)  # latents: decoded
      shown = arrays["images"]
      if out.shown_inputs is not None:  # inputs above their results
        shown = np.concatenate([out.shown_inputs[:_GRID_SIZE // 2], shown[:_GRID_SIZE // 2]])
      plotting.save_image_grid(base + ".png", shown.astype(np.float32) / 255.0, ncols=out.ncols)
    else:
      points = next(iter(data.batches("test", evaluation=True, batch_size=2048, process_index=0,
                                      process_count=1)))["image"]
      plotting.save_scatter(base + ".png", x, np.asarray(points),
                            title=f"{task}, step {step}, {sampler}, {nfe} score evaluations")
    plotting.save_arrays(base + ".npz", **arrays)
    files.write_json(base + ".json", {
        "task": task, "step": step, "sampler": sampler, "nfe": nfe, "num": int(len(x)),
        "seed": plan.sample.seed, "sampling": dict(sampling or {}),
        "png": os.path.basename(base + ".png"), "npz": os.path.basename(base + ".npz")})
    logging.info("Wrote %s.png, .npz and .json (%d samples, %s, %d score evaluations).", base,
                 len(x), sampler, nfe)
  return {"png": base + ".png", "npz": base + ".npz", "json": base + ".json"}
