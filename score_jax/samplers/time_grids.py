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
import math
import os
import time
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from score_jax import files
from score_jax.run import distributed
from score_jax.samplers import fast as fast_samplers
from score_jax.samplers._common import as_pytree_fn, check_choice, check_eps, check_sde, check_shape
from score_jax.sde import SDE

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

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


def _grid_from_logits(sde: SDE, theta: Array, eps: float) -> Array:
  """Times [N + 1] from T to eps with log-SNR steps in proportion softmax(theta) [N]."""
  lam_min = sde.log_snr(jnp.full((1,), sde.T, theta.dtype))[0]
  lam_max = sde.log_snr(jnp.full((1,), eps, theta.dtype))[0]
  u = jnp.concatenate([jnp.zeros((1,), theta.dtype), jnp.cumsum(jax.nn.softmax(theta))])
  t = sde.t_from_log_snr(lam_min + u * (lam_max - lam_min))
  n = theta.shape[0]
  return t.at[0].set(sde.T).at[n].set(eps)


def optimize_time_grid(rng: Array,
                       sde: SDE,
                       score_fn: ScoreFn,
                       shape: Tuple[int, ...],
                       num_steps: int,
                       order: int = 2,
                       variant: str = "bh2",
                       eps: float = 1e-3,
                       iters: int = 200,
                       learning_rate: float = 0.05,
                       reference_steps: int = 500) -> Tuple[np.ndarray, dict]:
  """A num_steps time grid for `fast_samplers.unipc_sample`, fitted to the model itself.

  On a batch of prior samples (shape, e.g. a few hundred), the grid minimizes
  the mean squared distance of UniPC's samples to the probability-flow ODE's
  (UniPC-3 with reference_steps uniform log-SNR steps, order 4), by Adam on
  the log-SNR step sizes (softmax weights: the grid stays monotone from T to
  eps), through the differentiated sampler. It starts from the uniform
  log-SNR grid and returns the best grid seen, so it is never worse than
  that one on the batch. Costs iters forward and backward passes of
  num_steps evaluations on the batch, plus the reference: compute it once
  per model, SDE and sampler, and keep it (`unipc_sample(timesteps=...)`; `grid_for`
  does so for a run).

  Returns:
    (times [num_steps + 1] float64 numpy, info) with info = {'loss_uniform',
    'loss', 'iters'}: the batch's mean squared error before and after.
  """
  eps = check_eps(check_sde(sde), eps)
  shape = check_shape(shape)
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
  if order not in (1, 2, 3):
    raise ValueError(f"order must be 1, 2 or 3, got {order!r}.")
  check_choice("UniPC variant", variant, fast_samplers.UNIPC_VARIANTS)
  score_fn = as_pytree_fn(score_fn)
  z = sde.prior_sampling(rng, shape)
  reference, _ = fast_samplers.unipc_sample(rng, sde, score_fn, shape, reference_steps, order=3, eps=eps, z=z)

  @jax.jit
  def loss_and_grad(theta, score_fn, z, reference):
    def loss(theta):
      ts = _grid_from_logits(sde, theta, eps)
      x = fast_samplers.unipc_loop(rng, sde, score_fn, shape, num_steps, order, variant,
                                   lambda i: ts[i], True, True, False, z, None)
      return jnp.mean((x - reference)**2)

    return jax.value_and_grad(loss)(theta)

  opt = optax.adam(learning_rate)
  theta = jnp.zeros((num_steps,), z.dtype)
  state = opt.init(theta)
  best, best_loss, first = theta, math.inf, None
  report = max(iters // 10, 1)
  for i in range(iters + 1):
    value, grad = loss_and_grad(theta, score_fn, z, reference)
    value = float(value)
    first = value if first is None else first
    if value < best_loss:
      best, best_loss = theta, value
    if i % report == 0:
      logging.info("Fitting a %d-step time grid: Adam step %d / %d, batch MSE to the ODE %.3g "
                   "(uniform log-SNR grid %.3g).", num_steps, i, iters, best_loss, first)
    updates, state = opt.update(grad, state)
    theta = optax.apply_updates(theta, updates)
  ts = np.asarray(_grid_from_logits(sde, best, eps), np.float64)
  ts[0], ts[-1] = sde.T, eps
  return ts, {"loss_uniform": first, "loss": best_loss, "iters": iters}
