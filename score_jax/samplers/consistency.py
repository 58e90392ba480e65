"""Consistency sampling (Song et al. 2023, Algorithm 1): one jump from the prior to the data,
and multistep sampling that re-noises the jump's answer to a lower noise level and jumps
again.

A consistency model f(x_t, t) maps any point of a probability-flow trajectory to its end x_0.
On the score seam it is the data prediction D(x_t, t) = (x_t + std(t)^2 s(x_t, t)) / alpha(t)
of the score function its parameterization gives (score_jax.models.get_score_fn): 'trigflow'
makes D = cos(t) x_t - sin(t) sigma_d F, the sCM consistency function, and 'consistency' the
discrete-time consistency function of iCT and ECT, so one sampler serves every family.

The times: the first jump starts at the prior's time T; a step k > 0 starts at the noise level
sigma_k = std / alpha (EDM's sigma, equal across families), x = alpha D + std z with fresh
noise z. The default levels are sigma_d tan(pi/2 sqrt(1 - k / n)) for n steps: the sCM
paper's two-step t = 1.1 (TrigFlow time, sigma = 0.98 at sigma_d = 0.5) is k = 1, n = 2.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from score_jax.samplers._common import (as_pytree_fn, check_sde, check_shape, checked,
                                        denoise_x0, full_t)
from score_jax.sde import SDE, batch_mul

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

__all__ = ["consistency_sample", "default_sigmas"]


def default_sigmas(num_steps: int, sigma_data: float) -> Tuple[float, ...]:
  """The noise levels sigma_d tan(pi/2 sqrt(1 - k / n)) of steps k = 1..n-1 (module
  docstring); () for one step."""
  return tuple(sigma_data * math.tan(0.5 * math.pi * math.sqrt(1.0 - k / num_steps))
               for k in range(1, num_steps))


@functools.partial(jax.jit, static_argnames=("shape",))
def _sample(rng, sde, score_fn, shape, times, z):
  score_fn = checked(score_fn)
  rng, prior_key = jax.random.split(rng)
  x = sde.prior_sampling(prior_key, shape) if z is None else z
  t0 = full_t(jnp.asarray(sde.T, x.dtype), shape[0])
  x0 = denoise_x0(sde, score_fn(x, t0), x, t0)

  def step(x0, inputs):
    key, t = inputs
    t = full_t(t, shape[0])
    noise = jax.random.normal(key, shape, x0.dtype)
    x = batch_mul(sde.mean_coef(t), x0) + batch_mul(sde.marginal_std(t), noise)
    return denoise_x0(sde, score_fn(x, t), x, t), None

  keys = jax.random.split(rng, times.shape[0])
  x0, _ = jax.lax.scan(step, x0, (keys, times))
  return x0


def consistency_sample(rng: Array, sde: SDE, score_fn: ScoreFn, shape: Tuple[int, ...],
                       num_steps: int = 1, sigmas: Sequence[float] = (),
                       sigma_data: float = 0.5, z: Optional[Array] = None) -> Tuple[Array, int]:
  """Samples with a consistency model in num_steps network evaluations.

  Args:
    rng: PRNG key of the prior sample and the re-noising.
    sde: the family the model was trained on.
    score_fn: s(x, t) of the consistency model (its data prediction is the consistency
      function; module docstring).
    shape: [B, ...] of the samples.
    num_steps: network evaluations (0: one).
    sigmas: the noise levels sigma = std / alpha where steps 2..n start, decreasing,
      num_steps - 1 of them; () for `default_sigmas`.
    sigma_data: the data's standard deviation, for the default levels.
    z: [B, ...] the prior sample to start from; default drawn from rng.

  Returns:
    (samples [B, ...], nfe = num_steps).

  Raises:
    ValueError: sigmas of another length than num_steps - 1, not decreasing, not > 0, or
      beyond the family's range.
  """
  sde = check_sde(sde)
  shape = check_shape(shape, z)
  num_steps = max(int(num_steps), 1)
  sigmas = tuple(float(s) for s in sigmas) or default_sigmas(num_steps, sigma_data)
  if len(sigmas) != num_steps - 1:
    raise ValueError(f"{num_steps} consistency steps start at {num_steps - 1} noise levels after "
                     f"the first; got {len(sigmas)} ({sigmas}).")
  s = np.asarray(sigmas, np.float64)
  if np.any(s <= 0) or np.any(np.diff(s) >= 0):
    raise ValueError(f"The consistency steps' noise levels must be > 0 and decreasing, got "
                     f"{sigmas}.")
  times = sde.t_from_log_snr(-jnp.log(jnp.asarray(s, jnp.float32)))
  with jax.ensure_compile_time_eval():  # a constant of the family, also inside a jit
    top = float(jnp.exp(-sde.log_snr(jnp.asarray(sde.T, jnp.float32))))
  if s.size and s[0] >= top:
    raise ValueError(f"The consistency steps' noise levels must lie below the prior's "
                     f"({top:.4g}); got {sigmas}.")
  return _sample(rng, sde, as_pytree_fn(score_fn), shape, times, z), num_steps
