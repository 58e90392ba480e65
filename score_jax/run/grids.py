"""Time grids fitted to a run's model, computed once and stored with the run.

`sampling.method = 'unipc'` with `sampling.schedule = 'optimized'` samples on
the grid `optimize_time_grid` fits to the model itself
(sampling.grid_batch_size latents, sampling.grid_iters Adam steps): the
sample mode keeps it in WORKDIR/time_grids/, the eval mode in
WORKDIR/eval/ckpt_<i>/, as JSON with the times and what they were fitted for;
a later run with the same settings loads it instead of fitting again.
Elsewhere (snapshot samples during training) such settings sample on the
uniform log-SNR grid.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from score_jax import files
from score_jax.run import distributed
from score_jax.samplers.time_grids import optimize_time_grid

__all__ = ["wanted", "grid_for"]

_DEFAULT_STEPS = 10  # unipc_sample's default num_steps


def wanted(settings) -> bool:
  """Whether the settings ask for an optimized grid."""
  c = settings.sampling
  return c.method.lower() == "unipc" and c.schedule == "optimized"


def _score(progs, weight, params, y, x, t):
  return progs.score_fn(params, y, weight)(x, t)


def grid_for(progs, params: Any, directory: str, weight: float = 0.0,
             rng: Optional[jax.Array] = None) -> Optional[np.ndarray]:
  """The optimized grid of the plan's programs and these parameters, or None if not wanted.

  Loads DIRECTORY/time_grid_unipc<order>_<variant>_<N>steps.json when it was
  fitted for the same settings; otherwise fits it (on every process: it is
  collective) and writes it (main process).
  """
  c = progs.plan.sampling.time_grid  # score_jax.run.plan.TimeGridSpec, None: not wanted
  if c is None:
    return None
  num_steps = c.num_steps or _DEFAULT_STEPS
  key = {"order": c.order, "variant": c.variant, "num_steps": num_steps, "eps": c.eps,
         "weight": weight, "guidance_interval": list(c.guidance_interval),
         "guide": list(c.guide) if progs.guide else None,
         "batch_size": c.batch_size, "iters": c.iters, "seed": c.seed}
  path = os.path.join(directory, f"time_grid_unipc{c.order}_{c.variant}_{num_steps}steps.json")
  stored = files.read_json(path)
  if stored is not None and stored.get("fitted_for") == key:
    logging.info("Optimized time grid from %s.", path)
    return np.asarray(stored["times"], np.float64)
  if rng is None:
    rng = jax.random.PRNGKey(c.seed)
  batch = c.batch_size
  y = jnp.arange(batch, dtype=jnp.int32) % max(progs.plan.data.num_classes, 1)
  # Parameters and labels as the Partial's arguments: traced, not baked into the program.
  score_fn = jax.tree_util.Partial(functools.partial(_score, progs, weight), params, y)
  start = time.perf_counter()
  times, info = optimize_time_grid(
      jax.random.fold_in(rng, 0x6721), progs.plan.sde, score_fn, progs.plan.data.shape(batch),
      num_steps, order=c.order, variant=c.variant, eps=c.eps, iters=c.iters)
  logging.info("Optimized a %d-step time grid in %.0f s: batch MSE to the ODE %.3g -> %.3g.",
               num_steps, time.perf_counter() - start, info["loss_uniform"], info["loss"])
  if distributed.is_main():
    files.write_json(path, {"fitted_for": key, "times": times.tolist(), "info": info})
  return times
