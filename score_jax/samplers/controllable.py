"""Controllable generation (Song et al. 2021, Sec. 5 and App. I) and guidance.

Two mechanisms, usable with any sampler that takes a score_fn and (for
constraints) a `constraint` argument: `sampling.pc_sample` and the fast
samplers `ddim_sample`, `heun_sample`, `dpm_solver_pp_sample`, `unipc_sample`.

- Constraints (per-step projections): before each step at noise level t,
  the known coordinates of the state are replaced by a fresh sample of the
  data's perturbation kernel p_0t(. | data), so the known part is always
  distributed as the SDE says at that level; at the end they are set exactly
  to the data. `inpainting` knows pixels through a mask; `colorization` is
  inpainting in an orthogonal colour basis whose first axis is the gray
  level (the kernel stays isotropic under an orthogonal change of basis).
- Score transforms: `classifier_guidance` adds scale * grad_x log p_t(y | x)
  of a noise-conditional classifier; `classifier_free_guidance` mixes a
  conditional score_fn(x, t, y) with its unconditional output (y = None):
  (1 + w) s(x, t, y) - w s(x, t, None); `classifier_free_guidance_interval`
  guides only for noise levels sigma^ = std / alpha in an interval
  (Kynkaanniemi et al. 2024); `autoguidance` guides a model with a weaker
  version of itself (Karras et al. 2024): (1 + w) s_main - w s_weak. They
  return `jax.tree_util.Partial` pytrees, so labels, weights and intervals
  are traced (no recompilation).

Weights follow one convention: w = 0 is the unguided score. The papers write
D = D_u + w' (D_c - D_u) with w' = 1 + w (w' = 1: no guidance); a mix of
data predictions D with coefficients summing to 1 is the same mix of scores,
since s = (alpha D - x) / std^2 is affine in D.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from score_jax.samplers._common import as_pytree_fn, call_score, check_sde
from score_jax.sde import SDE, batch_mul

Array = jax.Array
Partial = jax.tree_util.Partial

__all__ = [
    "Inpainting",
    "inpainting",
    "COLOR_BASIS",
    "colorization",
    "condition_on",
    "classifier_guidance",
    "classifier_free_guidance",
    "classifier_free_guidance_interval",
    "autoguidance",
]

# Orthonormal columns; the first is the gray direction (1, 1, 1) / sqrt(3), so
# the first coordinate of x @ COLOR_BASIS is sqrt(3) times the channel mean.
COLOR_BASIS = np.array([
    [1 / math.sqrt(3), 1 / math.sqrt(2), 1 / math.sqrt(6)],
    [1 / math.sqrt(3), -1 / math.sqrt(2), 1 / math.sqrt(6)],
    [1 / math.sqrt(3), 0.0, -2 / math.sqrt(6)],
])


class Inpainting(NamedTuple):
  """Known coordinates fixed to data; a pytree `constraint` for the samplers.

  Build with `inpainting` or `colorization`.
  """

  sde: SDE
  data: Array  # [B, ...] in the basis coordinates; used where mask is True
  mask: Array  # [B, ...] bool, True = known
  basis: Optional[Array] = None  # [C, C] orthogonal, acting on the last axis

  def _to_basis(self, x: Array) -> Array:
    return x if self.basis is None else x @ self.basis

  def _from_basis(self, y: Array) -> Array:
    return y if self.basis is None else y @ self.basis.T

  def project(self, rng: Array, x: Array, t: Array) -> Array:
    """Known part <- a sample of p_0t(. | data) at times t [B]; x [B, ...]."""
    mean, std = self.sde.marginal_prob(self.data, t)
    known = mean + batch_mul(std, jax.random.normal(rng, x.shape, x.dtype))
    return self._from_basis(jnp.where(self.mask, known, self._to_basis(x)))

  def finalize(self, x: Array) -> Array:
    """Known part <- the data exactly."""
    return self._from_basis(jnp.where(self.mask, self.data, self._to_basis(x)))


def inpainting(sde: SDE, data: Array, mask: Array) -> Inpainting:
  """Inpainting constraint: data [B, ...] is kept where mask (broadcastable
  to data.shape; nonzero = known) is set, the rest is generated."""
  check_sde(sde)
  data = jnp.asarray(data, jnp.result_type(float))
  mask = jnp.asarray(mask)
  if mask.ndim != data.ndim:
    raise ValueError(f"mask must have data's rank {data.ndim} (size-1 axes broadcast), "
                     f"got shape {mask.shape} for data {data.shape}.")
  try:
    mask = jnp.broadcast_to(mask != 0, data.shape)
  except ValueError:
    raise ValueError(f"mask {mask.shape} does not broadcast to data {data.shape}.") from None
  return Inpainting(sde, data, mask)


def colorization(sde: SDE, gray: Array) -> Inpainting:
  """Colorization constraint from gray levels gray [B, ..., 1] (channel means).

  The generated RGB images [B, ..., 3] (channels last) have channel mean
  exactly gray; the two chroma coordinates of COLOR_BASIS are generated.
  For a colour reference r, pass r.mean(-1, keepdims=True).
  """
  check_sde(sde)
  gray = jnp.asarray(gray, jnp.result_type(float))
  if gray.ndim < 2 or gray.shape[-1] != 1:
    raise ValueError(f"gray must be [B, ..., 1] (channel means), got shape {gray.shape}.")
  basis = jnp.asarray(COLOR_BASIS, gray.dtype)
  # Coordinates in the basis: sqrt(3) * mean on the gray axis, chroma unknown.
  data = jnp.concatenate([math.sqrt(3.0) * gray, jnp.zeros_like(gray), jnp.zeros_like(gray)], -1)
  mask = jnp.broadcast_to(jnp.arange(3) == 0, data.shape)
  return Inpainting(sde, data, mask, basis)


def _conditioned(score_fn, y, x, t):
  return call_score(score_fn, x, t, y)


def condition_on(score_fn: Callable, y: Array) -> Partial:
  """score_fn(x, t, y) with the labels y [B] bound: a score_fn(x, t)."""
  return Partial(_conditioned, as_pytree_fn(score_fn), y)


def _classifier_guided(score_fn, log_prob_fn, y, scale, x, t):
  score = call_score(score_fn, x, t)

  def guided(score):
    grad = jax.grad(lambda v: jnp.sum(log_prob_fn(v, t, y)))(x)
    return score + scale * grad

  # Scale 0 skips the classifier: no cost, and the unguided result exactly
  # (XLA would otherwise share and refuse work between the two networks).
  return jax.lax.cond(scale == 0, lambda s: s, guided, score)


def classifier_guidance(score_fn: Callable, classifier_log_prob: Callable, y: Array,
                        scale: float | Array = 1.0) -> Partial:
  """Score of p_t(x) p_t(y | x)^scale (Song et al. 2021, Sec. 5).

  Args:
    score_fn: unconditional score_fn(x, t).
    classifier_log_prob: noise-conditional classifier log p_t(y | x),
      (x [B, ...], t [B], y [B]) -> [B]; examples must be independent (the
      gradient of the batch sum is taken).
    y: labels [B].
    scale: guidance scale (1 samples p_t(x | y)); 0 gives the unguided score.
  Returns:
    score_fn(x, t) = s(x, t) + scale * grad_x log p_t(y | x).
  """
  return Partial(_classifier_guided, as_pytree_fn(score_fn), as_pytree_fn(classifier_log_prob),
                 jnp.asarray(y), jnp.asarray(scale, jnp.result_type(float)))


def _classifier_free(score_fn, y, w, x, t):
  cond = call_score(score_fn, x, t, y)
  uncond = call_score(score_fn, x, t, None)
  return (1.0 + w) * cond - w * uncond


def classifier_free_guidance(score_fn: Callable, y: Array, w: float | Array) -> Partial:
  """Classifier-free guidance (Ho & Salimans 2022) in score form.

  Args:
    score_fn: conditional score_fn(x, t, y) where y = None is the null label.
    y: labels [B].
    w: guidance weight; 0 is plain conditional sampling, w > 0 sharpens
      p(y | x) (the score of p(x | y) p(y | x)^w).
  Returns:
    score_fn(x, t) = (1 + w) s(x, t, y) - w s(x, t, None): two evaluations
    of score_fn per call (samplers count calls of the returned function).
  """
  return Partial(_classifier_free, as_pytree_fn(score_fn), jnp.asarray(y),
                 jnp.asarray(w, jnp.result_type(float)))


def _guided(main_fn, other_fn, w, sde, lo, hi, x, t):
  """(1 + w_t) main - w_t other, w_t = w where lo <= sigma^(t) <= hi, else 0.

  `other` is evaluated only when some example of the batch is guided: outside
  the interval (or at w = 0) the result is `main` itself, bit for bit.
  """
  main = call_score(main_fn, x, t)
  w_t = jnp.full(t.shape, w, main.dtype)
  if sde is not None:
    sigma = jnp.exp(-sde.log_snr(t))  # sigma^ = std / alpha
    w_t = jnp.where((sigma >= lo) & (sigma <= hi), w_t, 0.0)

  def guided(main):
    other = call_score(other_fn, x, t)
    return batch_mul(1.0 + w_t, main) - batch_mul(w_t, other)

  return jax.lax.cond(jnp.any(w_t != 0), guided, lambda m: m, main)


def _interval(sde: Optional[SDE], interval) -> tuple:
  """(sde, lo, hi) as the guided score takes them; interval None: guide everywhere."""
  if interval is None:
    return None, 0.0, 0.0
  check_sde(sde)
  try:
    lo, hi = (float(v) for v in interval)
  except (TypeError, ValueError):
    raise ValueError(f"interval must be two numbers (lo, hi) of sigma^ = std / alpha, "
                     f"got {interval!r}.") from None
  if math.isnan(lo) or math.isnan(hi):
    raise ValueError(f"interval must be two numbers (lo, hi), got {interval!r}.")
  return sde, lo, hi


def classifier_free_guidance_interval(score_fn: Callable, y: Array, w: float | Array, sde: SDE,
                                      interval: tuple) -> Partial:
  """Classifier-free guidance limited to an interval of noise levels (Kynkaanniemi et al. 2024).

  Args:
    score_fn: conditional score_fn(x, t, y) where y = None is the null label.
    y: labels [B].
    w: guidance weight (w = 0: plain conditional sampling).
    sde: the SDE, for sigma^(t) = std(t) / alpha(t) = e^-lambda(t).
    interval: (lo, hi): guide where lo <= sigma^(t) <= hi; elsewhere the
      plain conditional score (weight 0; the paper's weight 1). An empty
      interval (lo > hi, or one the samplers never visit) is unguided
      sampling, bit for bit.
  Returns:
    score_fn(x, t): (1 + w) s(x, t, y) - w s(x, t, None) inside the
    interval; the unconditional evaluation is skipped for batches outside.
  """
  sde, lo, hi = _interval(sde, interval)
  fn = as_pytree_fn(score_fn)
  return Partial(_guided, condition_on(fn, y), condition_on(fn, None),
                 jnp.asarray(w, jnp.result_type(float)), sde,
                 jnp.asarray(lo, jnp.result_type(float)), jnp.asarray(hi, jnp.result_type(float)))


def autoguidance(score_main: Callable, score_weak: Callable, w: float | Array, *,
                 sde: Optional[SDE] = None, interval: Optional[tuple] = None) -> Partial:
  """Autoguidance (Karras et al. 2024): guide a model with a weaker version of itself.

  D = D_weak + w' (D_main - D_weak) with w' = 1 + w; in score form
  s = s_weak + (1 + w) (s_main - s_weak) = (1 + w) s_main - w s_weak. The
  guide is the same model less trained or smaller, with the same SDE (and
  labels, for conditional models); it works for unconditional models too.

  Args:
    score_main, score_weak: score_fn(x, t) of the main model and of the guide.
    w: guidance weight; 0 is the main model alone (the guide is not evaluated).
    sde, interval: optionally guide only for lo <= sigma^(t) <= hi (as in
      `classifier_free_guidance_interval`).
  Returns:
    score_fn(x, t) = (1 + w) s_main(x, t) - w s_weak(x, t).
  """
  sde, lo, hi = _interval(sde, interval)
  return Partial(_guided, as_pytree_fn(score_main), as_pytree_fn(score_weak),
                 jnp.asarray(w, jnp.result_type(float)), sde,
                 jnp.asarray(lo, jnp.result_type(float)), jnp.asarray(hi, jnp.result_type(float)))
