"""Continuous-time consistency models (Lu & Song 2024, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", sCM): the sCT and sCD objectives on TrigFlow.

TrigFlow (score_jax.sde.TrigFlow): x_t = cos(t) x_0 + sin(t) z, z ~ N(0, sigma_d^2 I),
t in [0, pi/2]. The network F sees x_t / sigma_d and the consistency function is

    f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t),        f(x_0, 0) = x_0,

the data prediction of models.get_score_fn's 'trigflow' parameterization, which the
consistency sampler (score_jax.samplers.consistency) uses. Along the probability-flow ODE
(velocity dx_t/dt) a consistency function is constant, df/dt = 0, where

    df/dt = -cos(t) (sigma_d F - dx_t/dt) - sin(t) (x_t + sigma_d dF/dt),
    dF/dt = grad_x F . dx_t/dt / sigma_d + d_t F      (F at (x_t / sigma_d, t)).

The paper's continuous-time gradient (its Eq. for the sCM objective) is that of

    L(theta) = E_t,x_t [ ||F_theta - F^- - g||^2 / D ],                       (Algorithm 1)
    g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF^-/dt),

with F^- = stop_gradient(F_theta) (at theta^- = theta the loss's value is ||g||^2 / D and its
gradient -2 g . grad F_theta / D, i.e. g = cos(t) df/dt at r = 1). The stabilizers of Sec. 4.2:

- tangent warm-up: r = min(1, step / H) ramps the second term in over the first H steps;
- tangent normalization: g <- g / (||g|| + c), c = 0.1, the norm per example over all data
  dimensions;
- adaptive weighting: loss = e^{w(t)} / D ||F_theta - F^- - g||^2 - w(t) with a learned w
  (EDM2's uncertainty weighting; here w = -logvar of a small head on t, so that
  loss = ||.||^2 / (D e^{logvar}) + logvar, minimized at e^{logvar} = E||.||^2 / D).

dF^-/dt is one forward-mode product (`jax.jvp`) of F in its two inputs (x_t / sigma_d, t)
with the tangent cos(t) sin(t) (dx_t/dt / sigma_d, 1): the paper's "JVP rearrangement", in
which the factor cos(t) sin(t) keeps the tangent O(1) where dF/dt is large (t -> 0 or
t -> pi/2). The velocity dx_t/dt is cos(t) z - sin(t) x_0 for consistency training (sCT; its
conditional mean given x_t is the marginal velocity, and g is affine in it) and a teacher's
velocity for distillation (sCD; score_jax.sde.trigflow_velocity_fn maps any teacher family
onto TrigFlow time).

Times: tan(t) = e^tau / sigma_d, tau ~ N(P_mean, P_std^2) (EDM's log-normal noise levels;
the paper's CIFAR-10 sCT uses P_mean = -1.0, P_std = 1.4).

The authors published no code; this module follows the paper's Algorithm 1 and text.

This is the math layer: F_fn(u [B, ...], t [B]) -> [B, ...] is any TrigFlow network function
(u = x_t / sigma_d, t the TrigFlow time, not a network label).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array
FFn = Callable[[Array, Array], Array]  # F(x_t / sigma_d [B, ...], t [B]) -> [B, ...]

__all__ = ["SCMTerms", "sample_times", "tangent_warmup", "normalize_tangent", "tangent",
           "loss", "consistency_fn"]


class SCMTerms(NamedTuple):
  """Per-example terms of the sCM loss."""
  loss: Array  # [B] the (adaptively weighted) loss
  error: Array  # [B] ||F_theta - F^- - g||^2 / D
  tangent_norm: Array  # [B] ||g|| before normalization


def _bcast(a: Array, like: Array) -> Array:
  """[B] -> [B, 1, ..., 1] against like [B, ...]."""
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def _sq_norm(a: Array) -> Array:
  """[B, ...] -> [B] sum of squares over the data dimensions (float32)."""
  return jnp.sum(jnp.square(a.astype(jnp.float32)).reshape(a.shape[0], -1), axis=1)


def sample_times(key: Array, batch: int, *, p_mean: float, p_std: float, sigma_data: float,
                 t_min: float = 0.0, t_max: float = 0.5 * math.pi - 1e-3) -> Array:
  """The paper's training times: tan(t) = e^tau / sigma_d, tau ~ N(p_mean, p_std^2), so that
  EDM's noise level sigma_d tan(t) is log-normal; clipped to [t_min, t_max].

  Returns:
    t [B] float32.
  """
  tau = p_mean + p_std * jax.random.normal(key, (batch,))
  t = jnp.arctan2(jnp.exp(tau), sigma_data)
  return jnp.clip(t, t_min, t_max)


def tangent_warmup(step: Array, warmup_steps: int) -> Array:
  """r = min(1, step / H), H = warmup_steps (0: r = 1 from the start)."""
  if warmup_steps <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(jnp.asarray(step, jnp.float32) / float(warmup_steps), 1.0)


def normalize_tangent(g: Array, c: float) -> Tuple[Array, Array]:
  """g / (||g|| + c) per example (the norm over all data dimensions).

  Returns:
    (normalized g [B, ...], ||g|| [B]).
  """
  norm = jnp.sqrt(_sq_norm(g))
  return g / _bcast(norm + c, g).astype(g.dtype), norm


def tangent(F_fn: FFn, x_t: Array, t: Array, v: Array, sigma_data: float,
            r: Array = 1.0) -> Tuple[Array, Array]:
  """F(x_t / sigma_d, t) and the unnormalized tangent g from one `jax.jvp`.

  Args:
    F_fn: the network function F(u, t).
    x_t: [B, ...] points on the path.
    t: [B] TrigFlow times.
    v: [B, ...] the velocity dx_t/dt at (x_t, t).
    sigma_data: sigma_d.
    r: the tangent warm-up factor (scalar or [B]).

  Returns:
    (F [B, ...], g [B, ...]): F carries the gradient of F_fn's closure (the forward pass of
    F_theta); g is computed from F^- = stop_gradient(F) and
    cos(t) sin(t) dF^-/dt, both without gradient.
  """
  cos, sin = jnp.cos(t), jnp.sin(t)
  cs = cos * sin
  u = x_t / sigma_data
  F, cs_dF = jax.jvp(F_fn, (u, t), (_bcast(cs, v) * v / sigma_data, cs))
  F_minus, cs_dF = jax.lax.stop_gradient(F), jax.lax.stop_gradient(cs_dF)
  r = _bcast(jnp.broadcast_to(jnp.asarray(r, jnp.float32), t.shape), x_t)
  g = (-_bcast(cos**2, x_t) * (sigma_data * F_minus - v)
       - r * (_bcast(cs, x_t) * x_t + sigma_data * cs_dF))
  return F, g


def loss(F_fn: FFn, x0: Array, z: Array, t: Array, *, sigma_data: float,
         v: Optional[Array] = None, r: Array = 1.0, c: Optional[float] = 0.1,
         logvar: Optional[Array] = None) -> SCMTerms:
  """The sCM loss per example (Algorithm 1).

  Args:
    F_fn: the network function F_theta(u, t); gradients flow through its closure.
    x0: [B, ...] data.
    z: [B, ...] noise, N(0, sigma_d^2 I) (not unit variance).
    t: [B] times from `sample_times`.
    sigma_data: sigma_d.
    v: [B, ...] the velocity dx_t/dt at x_t: a teacher's (sCD); None: the conditional
      velocity cos(t) z - sin(t) x_0 (sCT).
    r: tangent warm-up factor (`tangent_warmup`).
    c: tangent normalization constant (None: no normalization).
    logvar: [B] the adaptive weighting head's output (w = -logvar); None: no adaptive
      weighting (loss = error).

  Returns:
    SCMTerms with [B] entries.
  """
  cos, sin = _bcast(jnp.cos(t), x0), _bcast(jnp.sin(t), x0)
  x_t = cos * x0 + sin * z
  if v is None:
    v = cos * z - sin * x0
  F, g = tangent(F_fn, x_t, t, v, sigma_data, r)
  if c is None:
    norm = jnp.sqrt(_sq_norm(g))
  else:
    g, norm = normalize_tangent(g, c)
  target = jax.lax.stop_gradient(F + g)
  dim = math.prod(x0.shape[1:])
  err = _sq_norm(F - target) / dim
  if logvar is None:
    out = err
  else:
    logvar = logvar.astype(jnp.float32)
    out = jnp.exp(-logvar) * err + logvar
  return SCMTerms(loss=out, error=err, tangent_norm=norm)


def consistency_fn(F_fn: FFn, sigma_data: float) -> Callable[[Array, Array], Array]:
  """f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t)."""

  def f(x: Array, t: Array) -> Array:
    return (_bcast(jnp.cos(t), x) * x
            - _bcast(jnp.sin(t), x) * sigma_data * F_fn(x / sigma_data, t))

  return f
