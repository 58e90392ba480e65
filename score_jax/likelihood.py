"""Exact likelihoods through the probability-flow ODE (Song et al. 2021, App. D).

Along dx/dt = f~(x, t) = f(x, t) - g(t)^2 score(x, t) / 2 the log-density
obeys d log p_t(x_t) / dt = -div f~(x_t, t), so

  log p_eps(x) = log p_T(x_T) + int_eps^T div f~(x_t, t) dt,

with x_T the ODE solution from x_eps = x and log p_T replaced by the prior.
x and the divergence integral are solved together by one adaptive RK45
solve on the device. The divergence is exact (D Jacobian-vector products,
for low-dimensional data and tests) or the Hutchinson-Skilling estimate
v^T (df~/dx) v with one probe v per example held fixed along the path
(Rademacher or Gaussian; unbiased for every fixed-path solve).

`bits_per_dim` turns this into the image metric for 8-bit data.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from score_jax.samplers import probability_flow
from score_jax.samplers._common import (as_pytree_fn, check_choice, check_eps, check_sde,
                                       check_shape, check_tolerance, checked, full_t)
from score_jax.data.scaling import DataScaler, data_scaler
from score_jax.sde import SDE, sum_except_batch as _sum_except_batch

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

__all__ = ["HUTCHINSON", "log_likelihood", "DataScaler", "data_scaler", "dequantize",
           "bits_per_dim"]

HUTCHINSON = ("rademacher", "gaussian", "exact")


def _divergence_fn(f: Callable[[Array], Array], x: Array,
                   probe: Optional[Array]) -> Tuple[Array, Array]:
  """(f(x) [B, ...], divergence [B]) of an example-wise map f.

  Exact (Jacobian trace) when probe is None, else the Hutchinson estimate
  probe^T (df/dx) probe.
  """
  if probe is None:
    # f acts on each example separately, so a basis vector broadcast over the
    # batch gives every example's Jacobian column at once: D JVPs in all.
    fx, f_jvp = jax.linearize(f, x)
    d = math.prod(x.shape[1:])
    basis = jnp.eye(d, dtype=x.dtype).reshape((d,) + x.shape[1:])  # [D, ...]

    def diag_entry(e):
      v = jnp.broadcast_to(e, x.shape)
      return _sum_except_batch(f_jvp(v) * v)  # [B]

    return fx, jnp.sum(jax.lax.map(diag_entry, basis), axis=0)
  fx, jv = jax.jvp(f, (x,), (probe,))
  return fx, _sum_except_batch(jv * probe)


@functools.partial(jax.jit, static_argnames=("exact",))
def _log_likelihood(rng, sde, score_fn, x, exact, gaussian, rtol, atol, eps):
  # The two Hutchinson probes share one compiled program (`gaussian` is traced).
  score_fn = checked(score_fn)
  batch = x.shape[0]
  probe = None
  if not exact:
    probe = jnp.where(gaussian, jax.random.normal(rng, x.shape, x.dtype),
                      jax.random.rademacher(rng, x.shape, x.dtype))

  def vector_field(t, state):
    y, _ = state
    t = full_t(t, batch)
    return _divergence_fn(lambda v: probability_flow.drift(sde, score_fn, v, t), y, probe)

  state0 = (x, jnp.zeros((batch,), x.dtype))
  (z, delta_logp), nfe = probability_flow.solve(vector_field, state0, jnp.asarray(eps, x.dtype),
                                                jnp.asarray(sde.T, x.dtype), rtol, atol)
  return sde.prior_logp(z) + delta_logp, z, nfe


def _check_args(sde, hutchinson, shape, rtol, atol, eps):
  """Host-side checks; returns (exact, gaussian, rtol, atol, eps) for the solve."""
  check_sde(sde)
  check_choice("hutchinson estimator", hutchinson, HUTCHINSON)
  check_shape(shape)
  return (hutchinson == "exact", hutchinson == "gaussian", check_tolerance("rtol", rtol),
          check_tolerance("atol", atol), check_eps(sde, eps))


def log_likelihood(rng: Array,
                   sde: SDE,
                   score_fn: ScoreFn,
                   x: Array,
                   hutchinson: str = "rademacher",
                   rtol: float = 1e-5,
                   atol: float = 1e-5,
                   eps: float = 1e-5) -> Tuple[Array, Array, Array]:
  """log p_eps(x) in nats under the probability-flow ODE of (sde, score_fn).

  Args:
    rng: PRNG key for the Hutchinson probes (unused for "exact").
    sde: the forward SDE.
    score_fn: score_fn(x [B, ...], t [B]) -> [B, ...].
    x: data [B, ...], taken as the state at time eps.
    hutchinson: "rademacher", "gaussian" (unbiased estimates) or "exact"
      (the full Jacobian trace: D extra JVPs per evaluation).
    rtol, atol: tolerances of the adaptive solver (on x and log p jointly).
    eps: start time in (0, T) (the score is singular at 0).

  Returns:
    (logp [B] in nats, z [B, ...] the latent at T, nfe int32 scalar): nfe
    counts vector-field evaluations, each one score evaluation plus its
    JVPs.
  """
  exact, gaussian, rtol, atol, eps = _check_args(sde, hutchinson, x.shape, rtol, atol, eps)
  x = jnp.asarray(x, jnp.result_type(float))
  return _log_likelihood(rng, sde, as_pytree_fn(score_fn), x, exact, gaussian, rtol, atol, eps)


# --- bits per dimension for 8-bit images ---

_LEVELS = 256  # values of 8-bit data


def dequantize(rng: Array, images: Array) -> Array:
  """Uniform dequantization of integer images in {0..255}: (k + U[0,1)) / 256."""
  u = jax.random.uniform(rng, images.shape, jnp.result_type(float))
  return (images.astype(u.dtype) + u) / _LEVELS


def _check_images(images) -> None:
  """Host-side checks of the input's domain (skipped under tracing)."""
  if isinstance(images, jax.core.Tracer):
    return
  values = np.asarray(jax.device_get(images))
  if np.issubdtype(values.dtype, np.integer):
    if values.min() < 0 or values.max() > _LEVELS - 1:
      raise ValueError(f"Integer images must lie in [0, {_LEVELS - 1}], got values in "
                       f"[{values.min()}, {values.max()}].")
    return
  if not np.issubdtype(values.dtype, np.floating):
    raise TypeError(f"images must be uint8 or float, got dtype {values.dtype}.")
  if not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 1:
    raise ValueError("Float images must be dequantized data in [0, 1]; pass uint8 images to "
                     "have them dequantized here.")
  for levels in (_LEVELS - 1, _LEVELS):
    scaled = values.astype(np.float64) * levels
    if np.all(np.abs(scaled - np.round(scaled)) < 1e-3):
      raise ValueError(
          f"Float images lie on the grid k/{levels}: they are quantized 8-bit data. A "
          "continuous density on them gives meaningless (often negative) bits/dim; pass the "
          "uint8 images (dequantized here) or dequantize them with `dequantize`.")


def bits_per_dim(rng: Array,
                 sde: SDE,
                 score_fn: ScoreFn,
                 images: Array,
                 centered: bool,
                 hutchinson: str = "rademacher",
                 rtol: float = 1e-5,
                 atol: float = 1e-5,
                 eps: float = 1e-5) -> Tuple[Array, Array, Array]:
  """Bits per dimension of 8-bit images under the model.

  The negative log-likelihood in bits of the dequantized integers y = k + u
  in [0, 256)^D, per dimension: -(log p_model(scaler(y / 256)) + D log
  scale) / (D ln 2) + log2 256. For [0, 1] data (scale 1) the offset is 8
  bits, for centered [-1, 1] data (scale 2) 7 bits.

  Args:
    rng: PRNG key (dequantization noise and Hutchinson probes).
    images: uint8 (or any integer) images [B, ...] in {0..255}, dequantized
      here with uniform noise; or float images in [0, 1] that are already
      dequantized. Float images on the grid k/255 or k/256 raise an error.
    centered: whether the model works on [-1, 1] data (else [0, 1]).
    Others: as for `log_likelihood`.

  Returns:
    (bpd [B], z [B, ...], nfe int32 scalar).
  """
  exact, gaussian, rtol, atol, eps = _check_args(sde, hutchinson, images.shape, rtol, atol, eps)
  _check_images(images)
  deq_rng, probe_rng = jax.random.split(rng)
  images = jnp.asarray(images)
  if jnp.issubdtype(images.dtype, jnp.integer):
    x01 = dequantize(deq_rng, images)
  else:
    x01 = images.astype(jnp.result_type(float))
  scaler = data_scaler(centered)
  # Not jitted as a whole: the ODE solve is `log_likelihood`'s compiled
  # program, shared with direct calls; the rest is elementwise.
  logp, z, nfe = _log_likelihood(probe_rng, sde, as_pytree_fn(score_fn), scaler(x01), exact,
                                 gaussian, rtol, atol, eps)
  d = math.prod(images.shape[1:])
  # Density of y = 256 x01 in [0, 256)^D: p_model(scaler(y / 256)) (scale / 256)^D.
  log_density = logp / d + scaler.log_abs_det_per_dim - math.log(_LEVELS)
  return -log_density / math.log(2.0), z, nfe
