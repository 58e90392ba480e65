"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling").

On the linear path z_t = (1 - t) x + t e (t = 1 is noise e ~ N(0, I), the rectified-flow
convention), the network learns the average velocity between times r <= t,

    u(z_t, r, t) = (z_t - z_r) / (t - r),  the displacement of the ODE dz/dt = v(z, t),

so that one step z_r = z_t - (t - r) u(z_t, r, t) jumps along the trajectory. Differentiating
(t - r) u = z_t - z_r in t gives the MeanFlow identity

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),
    d/dt u = v . grad_z u + du/dt   (r held fixed),

whose right side is the training target: its total derivative is one `jax.jvp` of u over
(z, r, t) with tangent (v, 0, 1), and the conditional velocity v = e - x stands for
v(z_t, t) (the target is affine in v, so its mean given z_t is the identity's).

This module is the math layer: `u_fn(z [B, ...], r [B], t [B]) -> [B, ...]` is any average
velocity; `network_u_fn` builds one from a network that takes a second time input.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array
UFn = Callable[[Array, Array, Array], Array]

__all__ = ["MeanFlowTerms", "sample_times", "target", "loss", "sample", "sampler",
           "network_u_fn"]


class MeanFlowTerms(NamedTuple):
  """Per-example terms of the MeanFlow loss."""
  loss: Array  # [B] adaptively weighted squared error
  error: Array  # [B] ||u - u_tgt||^2, summed over the data dimensions


def _bcast(a: Array, like: Array) -> Array:
  """[B] -> [B, 1, ..., 1] against like [B, ...]."""
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def sample_times(key: Array, batch: int, *, ratio: float = 0.25, p_mean: float = -0.4,
                 p_std: float = 1.0) -> Tuple[Array, Array]:
  """The paper's (r, t): two logit-normal times sigmoid(p_mean + p_std n), sorted so r <= t;
  the first int((1 - ratio) batch) examples get r = t (plain flow matching there), as the
  paper's code lays out the batch.

  Args:
    key: PRNG key.
    batch: B.
    ratio: share of the batch with r != t (the paper's best: 0.25).
    p_mean, p_std: the logit-normal's location and scale (the paper: -0.4, 1.0).

  Returns:
    (r, t), each [B] float32 in (0, 1), r <= t.
  """
  a, b = jax.nn.sigmoid(p_mean + p_std * jax.random.normal(key, (2, batch)))
  t, r = jnp.maximum(a, b), jnp.minimum(a, b)
  distinct = jnp.arange(batch) >= int(batch * (1.0 - ratio))
  return jnp.where(distinct, r, t), t


def target(u_fn: UFn, z: Array, r: Array, t: Array, v: Array,
           tangent: Optional[Array] = None) -> Tuple[Array, Array]:
  """u(z, r, t) and the MeanFlow target v - (t - r) d/dt u (stop-gradient).

  Args:
    u_fn: average velocity u(z, r, t).
    z: [B, ...] points z_t.
    r, t: [B] times, r <= t.
    v: [B, ...] velocity at (z, t): e - x in training, or the marginal velocity.
    tangent: [B, ...] the velocity along which d/dt u moves z (default v).

  Returns:
    (u [B, ...], u_tgt [B, ...]); gradients flow through u only.
  """
  tangent = v if tangent is None else tangent
  u, du_dt = jax.jvp(u_fn, (z, r, t), (tangent, jnp.zeros_like(r), jnp.ones_like(t)))
  u_tgt = v - _bcast(t - r, v) * du_dt
  return u, jax.lax.stop_gradient(u_tgt)


def loss(u_fn: UFn, x: Array, e: Array, r: Array, t: Array, *, v: Optional[Array] = None,
         power: float = 1.0, c: float = 1e-3, model_tangent: bool = False) -> MeanFlowTerms:
  """The MeanFlow loss per example, with the paper's adaptive weighting.

  The squared error ||u - u_tgt||^2 (summed over data dimensions) is divided by
  sg((||u - u_tgt||^2 + c)^power): power = 0 is the plain squared error, power = 1 (the
  paper's choice) a scale-free one, close to the Pseudo-Huber loss.

  Args:
    u_fn: average velocity u(z, r, t).
    x: [B, ...] data; e: [B, ...] noise, N(0, I).
    r, t: [B] times from `sample_times`.
    v: [B, ...] the velocity to use at z_t; default the conditional velocity e - x.
    power, c: the weight 1 / (error + c)^power.
    model_tangent: move z along the network's own instantaneous velocity sg(u(z, t, t))
      in d/dt u instead of v (one more network evaluation): the marginal velocity's
      estimate, where v = e - x is one draw around it; the target keeps v.

  Returns:
    MeanFlowTerms with [B] entries.
  """
  z = (1 - _bcast(t, x)) * x + _bcast(t, x) * e
  v = e - x if v is None else v
  tangent = jax.lax.stop_gradient(u_fn(z, t, t)) if model_tangent else None
  u, u_tgt = target(u_fn, z, r, t, v, tangent)
  err = jnp.sum(jnp.square(u - u_tgt).reshape(u.shape[0], -1), axis=1)
  weight = jax.lax.stop_gradient(1.0 / (err + c) ** power)
  return MeanFlowTerms(loss=weight * err, error=err)


def sample(u_fn: UFn, e: Array, times: Sequence[float] = (1.0, 0.0)) -> Array:
  """Samples by jumps z_r = z_t - (t - r) u(z_t, r, t) along decreasing `times`.

  Args:
    u_fn: average velocity u(z, r, t).
    e: [B, ...] noise N(0, I), the state at times[0] (1 for the prior).
    times: the grid from 1 to 0: (1, 0) is one step, (1, 0.5, 0) two.

  Returns:
    [B, ...] the state at times[-1].
  """
  z = e
  ones = jnp.ones((e.shape[0],), e.dtype)
  for t, r in zip(times[:-1], times[1:]):
    z = z - (t - r) * u_fn(z, r * ones, t * ones)
  return z


def sampler(rng: Array, sde: Any, u_fn: UFn, shape: Sequence[int], *, num_steps: int = 1,
            z: Optional[Array] = None) -> Tuple[Array, int]:
  """The few-step sampler on the running layer's seam (score_jax.run.sampler_specs): `sample`
  on the uniform grid of num_steps jumps from 1 to 0.

  Args:
    rng: PRNG key of the noise (unused when z is given).
    sde: unused (the path is the rectified flow's, whose prior at t = 1 is N(0, I)).
    u_fn: average velocity u(z, r, t).
    shape: [B, ...] of the samples.
    num_steps: network evaluations (0: one).
    z: [B, ...] the noise to start from; default drawn from rng.

  Returns:
    (samples [B, ...], nfe = num_steps).
  """
  del sde
  num_steps = max(int(num_steps), 1)
  e = jax.random.normal(rng, tuple(shape)) if z is None else z
  times = [1.0 - k / num_steps for k in range(num_steps + 1)]
  return sample(u_fn, e, times), num_steps


def network_u_fn(model: Any, variables: Mapping[str, Any], y: Optional[Array] = None, *,
                 train: bool = False, rngs: Optional[Mapping[str, Array]] = None,
                 augment_labels: Optional[Array] = None) -> UFn:
  """u(z, r, t) of a network built with `second_time=True`: noise labels t and t - r (the
  paper conditions on (t, t - r)); augment_labels [B, augment_dim] (EDM's augmentation,
  constant in the derivative) reach networks that take them, None for the others."""
  extra = {} if augment_labels is None else {"augment_labels": augment_labels}

  # The labels are t and t - r themselves, as in the paper's code: the total derivative
  # d/dt u then stays O(1). (Labels 999 t, the rectified-flow convention of models/score.py,
  # multiply it by 999 through the noise embedding, and the unweighted loss diverges.)
  def u_fn(z: Array, r: Array, t: Array) -> Array:
    return model.apply(variables, z, t, y, train=train, rngs=rngs, labels2=t - r, **extra)

  return u_fn
