"""Sampling and encoding along the probability-flow ODE (Song et al. 2021, Sec. 4.3), with
the adaptive solve of `probability_flow.solve`."""

from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from score_jax.samplers import probability_flow
from score_jax.samplers._common import (as_pytree_fn, check_eps, check_sde, check_shape,
                                        check_tolerance, checked, denoise_x0, full_t)
from score_jax.sde import SDE

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

__all__ = ["ode_sample", "ode_encode"]


@functools.partial(jax.jit, static_argnames=("shape",))
def _ode_sample(rng, sde, score_fn, shape, rtol, atol, denoise, eps, z):
  score_fn = checked(score_fn)
  x = sde.prior_sampling(rng, shape) if z is None else z

  def vector_field(t, x):
    return probability_flow.drift(sde, score_fn, x, full_t(t, shape[0]))

  x, nfe = probability_flow.solve(vector_field, x, jnp.asarray(sde.T, x.dtype),
                                  jnp.asarray(eps, x.dtype), rtol, atol)
  t = full_t(eps, shape[0])
  # `denoise` is traced (one program for both); the untaken branch costs nothing.
  x = jax.lax.cond(denoise, lambda x: denoise_x0(sde, score_fn(x, t), x, t), lambda x: x, x)
  return x, nfe + denoise.astype(nfe.dtype)


def ode_sample(rng: Array,
               sde: SDE,
               score_fn: ScoreFn,
               shape: Tuple[int, ...],
               rtol: float = 1e-5,
               atol: float = 1e-5,
               denoise: bool = True,
               eps: float = 1e-3,
               z: Optional[Array] = None) -> Tuple[Array, Array]:
  """Samples by integrating the probability-flow ODE from T to eps.

  Adaptive Dormand-Prince 5(4) on the device, scipy RK45's algorithm (error
  control by rtol/atol).

  Args:
    rng: PRNG key for the prior sample (unused when z is given).
    shape: [B, ...] of the samples (must equal z.shape if z is given).
    denoise: finish with Tweedie's denoising step E[x_0 | x_eps] (1 NFE).
    eps: end time in (0, T).
    z: optional latent [B, ...] at time T (decoding, interpolation).

  Returns:
    (samples [B, ...], nfe): nfe (int32 scalar) counts every score
    evaluation of the solve, from the solver's step statistics.
  """
  check_sde(sde)
  eps = check_eps(sde, eps)
  shape = check_shape(shape, z)
  rtol, atol = check_tolerance("rtol", rtol), check_tolerance("atol", atol)
  return _ode_sample(rng, sde, as_pytree_fn(score_fn), shape, rtol, atol, jnp.bool_(denoise), eps,
                     z)


@jax.jit
def _ode_encode(sde, score_fn, x, rtol, atol, eps):
  score_fn = checked(score_fn)

  def vector_field(t, y):
    return probability_flow.drift(sde, score_fn, y, full_t(t, x.shape[0]))

  return probability_flow.solve(vector_field, x, jnp.asarray(eps, x.dtype),
                                jnp.asarray(sde.T, x.dtype), rtol, atol)


def ode_encode(sde: SDE,
               score_fn: ScoreFn,
               x: Array,
               rtol: float = 1e-5,
               atol: float = 1e-5,
               eps: float = 1e-3) -> Tuple[Array, Array]:
  """Encodes data x [B, ...] (taken as the state at time eps) into latents at T.

  The inverse of `ode_sample(..., z=latent, denoise=False)` up to solver
  tolerance; interpolating latents and decoding them interpolates data.

  Returns:
    (z [B, ...], nfe int32 scalar).
  """
  check_sde(sde)
  eps = check_eps(sde, eps)
  check_shape(x.shape)
  rtol, atol = check_tolerance("rtol", rtol), check_tolerance("atol", atol)
  return _ode_encode(sde, as_pytree_fn(score_fn), x, rtol, atol, eps)
