"""Private helpers shared by the samplers, the likelihood and controllable generation.

Argument checks run on the host before tracing so that errors name the bad
argument; `call_score` checks the score's shape at trace time (shapes are
static, so this costs nothing at run time).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, Tuple

import jax
import jax.numpy as jnp

from score_jax.sde import SDE, batch_mul

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


class Constraint(Protocol):
  """A per-step projection for controllable generation (see controllable.py).

  Samplers call `project(rng, x, t)` on their state x [B, ...] at noise
  level t [B] before every score evaluation step, and `finalize(x)` on the
  output. Implementations are pytrees so they pass through `jit`.
  """

  def project(self, rng: Array, x: Array, t: Array) -> Array:
    ...

  def finalize(self, x: Array) -> Array:
    ...


def as_pytree_fn(fn: Callable) -> jax.tree_util.Partial:
  """Makes a callable a pytree argument for `jit`.

  A `jax.tree_util.Partial` is kept as is: its bound arrays (network
  parameters, labels, mixture parameters) are traced, so new values do not
  recompile. Any other callable is wrapped without bound arguments; `jit`
  then caches on the callable's identity (reuse the same object).
  """
  if not callable(fn):
    raise TypeError(f"Expected a callable score_fn(x, t), got {type(fn).__name__}.")
  return fn if isinstance(fn, jax.tree_util.Partial) else jax.tree_util.Partial(fn)


def call_score(score_fn: Callable, x: Array, t: Array, *args) -> Array:
  """score_fn(x, t, *args) with a clear error when its shape is not x's."""
  s = score_fn(x, t, *args)
  if getattr(s, "shape", None) != x.shape:
    raise ValueError(
        f"score_fn returned shape {getattr(s, 'shape', type(s))} for x of shape {x.shape}; "
        "a score has the shape of its input.")
  return s


def checked(score_fn: Callable) -> ScoreFn:
  """A shape-checking view of score_fn, for use inside traced code."""
  return lambda x, t: call_score(score_fn, x, t)


def check_sde(sde: Any) -> SDE:
  if not isinstance(sde, SDE):
    raise TypeError(f"sde must be a score_jax.sde.SDE, got {type(sde).__name__}.")
  return sde


def check_eps(sde: SDE, eps: Any) -> float:
  """eps must lie in (0, T): the score is singular at 0 and T ends the path."""
  try:
    value = float(eps)
  except (TypeError, ValueError):
    raise TypeError(f"eps must be a number in (0, T), got {eps!r}.") from None
  if not (math.isfinite(value) and 0.0 < value < sde.T):
    raise ValueError(f"eps must lie in (0, T) = (0, {sde.T}), got {eps!r}.")
  return value


def check_tolerance(name: str, value: Any) -> float:
  value = float(value)
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
  return value


def check_shape(shape: Any, z: Optional[Array] = None) -> Tuple[int, ...]:
  """A static batch-first shape; must equal z.shape when an initial z is given."""
  if shape is None and z is not None:
    shape = z.shape
  try:
    shape = tuple(int(d) for d in shape)
  except TypeError:
    raise TypeError(f"shape must be a sequence of ints [B, ...], got {shape!r}.") from None
  if len(shape) < 2 or any(d < 1 for d in shape):
    raise ValueError(f"shape must be [B, ...] with at least one data axis and sizes >= 1, "
                     f"got {shape}.")
  if z is not None and tuple(z.shape) != shape:
    raise ValueError(f"z has shape {tuple(z.shape)} but shape is {shape}.")
  return shape


def check_choice(kind: str, name: str, valid: Mapping[str, Any] | Sequence[str]) -> str:
  if name not in valid:
    raise ValueError(f"Unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}.")
  return name


def check_constraint(constraint: Any) -> None:
  if constraint is not None and not (hasattr(constraint, "project") and
                                     hasattr(constraint, "finalize")):
    raise TypeError("constraint must have project(rng, x, t) and finalize(x) methods "
                    f"(see score_jax.samplers.controllable), got {type(constraint).__name__}.")


def full_t(t: Array, batch: int) -> Array:
  """A scalar time broadcast to [B]."""
  return jnp.full((batch,), t)


def denoise_x0(sde: SDE, score: Array, x: Array, t: Array) -> Array:
  """Tweedie's E[x_0 | x_t] = (x + std^2 score) / alpha, the data prediction."""
  std = sde.marginal_std(t)
  return batch_mul(1.0 / sde.mean_coef(t), x + batch_mul(std**2, score))


def posterior_step(sde: SDE, x: Array, x0: Array, t: Array, s: Array,
                   eta: float | Array) -> Tuple[Array, Array]:
  """The DDIM step from t to s < t given a data prediction x0.

  x_s = alpha_s x0 + sqrt(std_s^2 - c^2) eps_hat + c z, eps_hat = (x -
  alpha_t x0) / std_t, c = eta * std of the Gaussian posterior q(x_s | x_t,
  x0). eta = 1 samples that posterior (ancestral sampling), eta = 0 is the
  deterministic DDIM / first-order DPM-Solver step. Only alpha and std enter,
  so one formula serves every SDE.

  Returns: (mean [B, ...], c [B]) with x_s = mean + c z.
  """
  a_t, a_s = sde.mean_coef(t), sde.mean_coef(s)
  std_t, std_s = sde.marginal_std(t), sde.marginal_std(s)
  a_ts = a_t / a_s
  var_ts = jnp.maximum(std_t**2 - a_ts**2 * std_s**2, 0.0)  # transition variance s -> t
  c = eta * jnp.sqrt(var_ts) * std_s / std_t
  eps_hat = batch_mul(1.0 / std_t, x - batch_mul(a_t, x0))
  mean = batch_mul(a_s, x0) + batch_mul(jnp.sqrt(jnp.maximum(std_s**2 - c**2, 0.0)), eps_hat)
  return mean, c
