"""Discrete-time consistency training: iCT (Song & Dhariwal 2023) and ECT (Geng et al. 2024).

A consistency model f(x, sigma) (models.get_consistency_fn: f(x, sigma_min) = x) maps a point
x_0 + sigma z of the probability-flow ODE's trajectory to its start. Consistency training
(Song et al. 2023, "Consistency Models", eq. 10) ties two noise levels s < t on one
trajectory, approximated with the same noise z (CT's Euler step with the data as the
denoiser is exactly x_0 + s z):

    L = E[ lambda(s, t) d(f_theta(x_0 + t z, t), f_theta-(x_0 + s z, s)) ]      (1)

where theta- is a stop-gradient copy of theta. Both networks get the same dropout key
(the authors' code: openai/consistency_models_cifar10 jcm/losses.py, and locuslab/ect's
training/loss.py share the dropout mask).

**iCT** ("Improved Techniques for Training Consistency Models"):
- Karras' grid of N levels, sigma_i = (sigma_min^(1/rho) + i / (N - 1) (sigma_max^(1/rho) -
  sigma_min^(1/rho)))^rho, i = 0..N-1 increasing; pairs (s, t) = (sigma_i, sigma_{i+1}).
- The curriculum (sec. 3.3, eq. 6): N(k) = min(s0 2^floor(k / K'), s1) + 1,
  K' = floor(K / (log2 floor(s1 / s0) + 1)), s0 = 10, s1 = 1280, K the total iterations.
- The index distribution (sec. 3.4): p(i) proportional to
  erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std)) - erf((ln sigma_i - P_mean) / (sqrt(2) P_std)),
  P_mean = -1.1, P_std = 2.0: a discretized lognormal over the intervals.
- The weighting lambda = 1 / (sigma_{i+1} - sigma_i) (sec. 3.2), the pseudo-Huber metric
  d(x, y) = sqrt(||x - y||^2 + c^2) - c with c = 0.00054 sqrt(dim) (sec. 3.3), and
  theta- = stop_gradient(theta) (no EMA teacher, sec. 3.2).

**ECT** ("Consistency Models Made Easy", locuslab/ect training/loss.py ECMLoss): continuous
t with ln t ~ N(P_mean, P_std^2) (-1.1, 2.0), and

    r = max(t (1 - q^-a n(t)), 0),   n(t) = 1 + k sigmoid(-b t),  a = max(ceil(step / d), 1)

(k = 8, b = 1; q = 2 and d = 25,000 iterations at CIFAR-10's batch 128: `ct_train.py`'s
defaults, the dt halving every `double` = 250 ticks of 12.8 kimg; the stage index there is
(tick - 1) // double + 1, i.e. ceil(tick / double), and 1 in the first tick). The target is
f_theta-(x_0 + r z, r), or x_0 itself where r = 0; the weighting 1 / (t - r) and the metric
the same pseudo-Huber form with c (their default c = 0: the L2 norm ||diff||).

The original CT (the authors' JAX code) takes the mean of squares over the entries ('l2')
and uniform or SNR-type weightings; those are here too so that their losses are reproduced
exactly (tests/test_consistency.py).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import erf

from score_jax.sde import batch_mul

Array = jax.Array
ConsistencyFn = Callable[[Array, Array], Array]  # f(x [B, ...], sigma [B]) -> [B, ...]

__all__ = ["METRICS", "WEIGHTINGS", "karras_sigmas", "ict_num_scales", "ict_index_logits",
           "ect_r", "ict_huber_c", "distance", "weighting", "CTTerms", "ct_loss"]

METRICS = ("l2", "pseudo_huber")
WEIGHTINGS = ("uniform", "ict", "snr", "snrp1", "truncated_snr")


def karras_sigmas(i: Array, n: Array, sigma_min: float, sigma_max: float,
                  rho: float = 7.0) -> Array:
  """sigma_i of Karras' N-level grid, increasing in i (sigma_0 = sigma_min).

  Written as the authors' CT code writes its decreasing grid, with j = N - 1 - i:
  (sigma_max^(1/rho) + j / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, so that the
  float32 values are theirs (a float32 grid is ~2e-6 relative off the exact one).

  Args:
    i: int indices [...] in 0..N-1.
    n: N (int, may be traced).
    sigma_min, sigma_max, rho: the grid's ends and exponent.
  Returns:
    float32 [...] noise levels.
  """
  j = (jnp.asarray(n, jnp.int32) - 1 - jnp.asarray(i, jnp.int32)).astype(jnp.float32)
  frac = j / (jnp.asarray(n, jnp.float32) - 1.0)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return (hi + frac * (lo - hi)) ** rho


def ict_num_scales(step: Array, total_steps: int, s0: int = 10, s1: int = 1280) -> Array:
  """iCT's discretization curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1 (int32).

  K' = floor(K / (log2 floor(s1 / s0) + 1)), K = total_steps; step = k, the completed
  optimizer steps. N doubles s0 -> s1 in equal stages (s0 = 10, s1 = 1280: 8 stages).
  """
  stages = math.floor(math.log2(s1 // s0)) + 1
  k_prime = max(total_steps // stages, 1)
  doublings = jnp.minimum(jnp.asarray(step, jnp.int32) // k_prime, 30)
  return jnp.minimum(s0 * 2 ** doublings, s1).astype(jnp.int32) + 1


def ict_index_logits(n: Array, max_n: int, sigma_min: float, sigma_max: float, rho: float,
                     p_mean: float, p_std: float) -> Array:
  """log p(i), i = 0..max_n - 2, of iCT's discretized lognormal over the N - 1 intervals.

  p(i) proportional to erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std)) -
  erf((ln sigma_i - P_mean) / (sqrt(2) P_std)) for i < N - 1 and 0 (log: -inf) beyond:
  fixed length max_n - 1 so that a traced N keeps one shape.
  """
  i = jnp.arange(max_n - 1)
  valid = i < jnp.asarray(n) - 1
  i_safe = jnp.where(valid, i, 0)
  lo = karras_sigmas(i_safe, n, sigma_min, sigma_max, rho)
  hi = karras_sigmas(i_safe + 1, n, sigma_min, sigma_max, rho)
  scale = math.sqrt(2.0) * p_std
  mass = erf((jnp.log(hi) - p_mean) / scale) - erf((jnp.log(lo) - p_mean) / scale)
  return jnp.where(valid, jnp.log(jnp.maximum(mass, 1e-30)), -jnp.inf)


def ect_r(t: Array, step: Array, *, q: float = 2.0, double: int = 25_000, k: float = 8.0,
          b: float = 1.0) -> Array:
  """ECT's r(t) = max(t (1 - q^-a (1 + k sigmoid(-b t))), 0), a = max(ceil(step / double), 1).

  step: completed optimizer steps (the stage grows every `double` of them).
  """
  step = jnp.asarray(step, jnp.int32)
  a = jnp.maximum((step + double - 1) // double, 1).astype(jnp.float32)
  decay = jnp.asarray(q, jnp.float32) ** (-a)
  return jnp.maximum(t * (1.0 - decay * (1.0 + k * jax.nn.sigmoid(-b * t))), 0.0)


def ict_huber_c(dim: int, c0: float = 0.00054) -> float:
  """iCT's pseudo-Huber constant c = c0 sqrt(dim) (c0 = 0.00054: CIFAR-10's c = 0.03)."""
  return c0 * math.sqrt(dim)


def distance(diff: Array, metric: str, c: float = 0.0) -> Array:
  """Per-example distance [B] of diff [B, ...].

  'l2': the mean of squares over the entries (the original CT code's 'l2');
  'pseudo_huber': sqrt(||diff||^2 + c^2) - c (iCT; c = 0: ECT's default ||diff||), written
  as ||diff||^2 / (sqrt(||diff||^2 + c^2) + c) so that it is accurate for small diff.
  """
  sq = jnp.reshape(diff, (diff.shape[0], -1)) ** 2
  if metric == "l2":
    return jnp.mean(sq, axis=-1)
  if metric == "pseudo_huber":
    s = jnp.sum(sq, axis=-1)
    if c == 0:
      return jnp.sqrt(s)
    return s / (jnp.sqrt(s + c**2) + c)
  raise ValueError(f"Unknown metric {metric!r}; choose from {list(METRICS)}.")


def weighting(name: str, s: Array, t: Array) -> Array:
  """lambda(s, t) [B] of the pair s < t: 'uniform' 1, 'ict' 1 / (t - s), and the original CT
  code's 'snr' 1 / t^2, 'snrp1' 1 / t^2 + 1, 'truncated_snr' max(1 / t^2, 1)."""
  if name == "uniform":
    return jnp.ones_like(t)
  if name == "ict":
    return 1.0 / (t - s)
  if name == "snr":
    return 1.0 / t**2
  if name == "snrp1":
    return 1.0 / t**2 + 1.0
  if name == "truncated_snr":
    return jnp.maximum(1.0 / t**2, 1.0)
  raise ValueError(f"Unknown weighting {name!r}; choose from {list(WEIGHTINGS)}.")


class CTTerms(NamedTuple):
  loss: Array  # [B] lambda d
  distance: Array  # [B] d(f(x_t, t), f-(x_s, s))
  weight: Array  # [B] lambda


def ct_loss(f_online: ConsistencyFn, f_target: ConsistencyFn, x: Array, z: Array, s: Array,
            t: Array, *, metric: str, c: float, weight: str) -> CTTerms:
  """Eq. (1) per example: lambda(s, t) d(f(x + t z, t), stop_gradient(f-(x + s z, s))).

  Args:
    f_online: f_theta(x, sigma).
    f_target: f_theta-(x, sigma) (its output is stop-gradiented here). Where s = 0 (ECT's
      clamped r) the target is x itself.
    x: data [B, ...]; z: N(0, I) noise [B, ...], shared by both points.
    s, t: [B] noise levels, s < t.
    metric, c: `distance`'s; weight: `weighting`'s name.
  Returns:
    CTTerms with [B] entries.
  """
  online = f_online(x + batch_mul(t, z), t)
  s_safe = jnp.where(s > 0, s, t)  # keep the unused branch finite
  target = f_target(x + batch_mul(s_safe, z), s_safe)
  target = jnp.where(jnp.reshape(s > 0, (-1,) + (1,) * (x.ndim - 1)), target, x)
  d = distance(online - jax.lax.stop_gradient(target), metric, c)
  lam = weighting(weight, s, t)
  return CTTerms(lam * d, d, lam)
