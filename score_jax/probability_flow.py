"""The probability-flow ODE and its adaptive solve on the device (diffrax).

dx/dt = f(x, t) - g(t)^2 score(x, t) / 2 has the same marginals as the SDE.
`ode_sample` / `ode_encode` (sampling.py) and `log_likelihood`
(likelihood.py) all integrate it with `solve`, one jitted `while_loop`
without host round trips.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import diffrax
import jax
import jax.numpy as jnp

from score_jax.sde import SDE

Array = jax.Array
PyTree = object

__all__ = ["drift", "solve"]

# Tsit5 has 7 stages, the last of which is the first of the next step (FSAL).
# A step that starts from a stored last stage costs 6 evaluations. Until the
# first step is accepted there is nothing stored (diffrax keeps the solver state
# of the last accepted step), so every attempt before that, rejected or not,
# costs 7. _CountingPID counts those attempts; tests/test_sampling.py checks the
# total against a runtime counter, with and without a rejected first step.
_NEW_EVALS_PER_STEP = 6
# Initial step as a fraction of the interval; the PID controller adapts from
# there. Giving it explicitly keeps the evaluation count exact (no heuristic).
_DT0_FRACTION = 1e-2


class _CountingPID(diffrax.AbstractAdaptiveStepSizeController):
  """diffrax.PIDController that also counts the attempts before the first accepted step."""

  inner: diffrax.PIDController
  rtol: float
  atol: float
  norm: Callable

  def __init__(self, inner: diffrax.PIDController):
    self.inner = inner
    self.rtol, self.atol, self.norm = inner.rtol, inner.atol, inner.norm

  def wrap(self, direction):
    return _CountingPID(self.inner.wrap(direction))

  def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
    tnext, state = self.inner.init(terms, t0, t1, y0, dt0, args, func, error_order)
    # (inner state, any step accepted yet, attempts up to the first acceptance)
    return tnext, (state, jnp.asarray(False), jnp.asarray(0, jnp.int32))

  def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
    state, accepted, first_attempts = controller_state
    keep, tprev, tnext, jump, state, result = self.inner.adapt_step_size(
        t0, t1, y0, y1_candidate, args, y_error, error_order, state)
    first_attempts = first_attempts + jnp.where(accepted, 0, 1).astype(jnp.int32)
    return keep, tprev, tnext, jump, (state, accepted | keep, first_attempts), result


def drift(sde: SDE, score_fn: Callable[[Array, Array], Array], x: Array, t: Array) -> Array:
  """dx/dt of the probability-flow ODE, [B, ...], at times t [B]."""
  rev_drift, _ = sde.reverse(score_fn, probability_flow=True).sde(x, t)
  return rev_drift


def solve(vector_field: Callable[[Array, PyTree], PyTree], y0: PyTree, t0, t1, rtol: float,
          atol: float, max_steps: int = 4096, ts: Optional[Array] = None) -> Tuple[PyTree, Array]:
  """Integrates dy/dt = vector_field(t, y) from t0 to t1 (either direction).

  Args:
    vector_field: (t scalar, y pytree) -> dy/dt pytree.
    y0: initial state pytree.
    t0, t1: start and end times (t1 < t0 runs backwards).
    rtol, atol: tolerances of the PID step-size controller (error in RMS norm).
    max_steps: step limit; hitting it raises an error at run time.
    ts: optional times [K] in [t0, t1], ordered from t0 towards t1, at which
      to return the state (the solver's dense output: the steps, hence y(t1),
      are those of a solve without ts).
  Returns:
    (y(t1), nfe), or with ts (y at each of ts, stacked [K, ...] per leaf,
    nfe): nfe is the number of vector-field evaluations, int32 scalar.
  """
  term = diffrax.ODETerm(lambda t, y, args: vector_field(t, y))
  sol = diffrax.diffeqsolve(
      term,
      diffrax.Tsit5(),
      t0=t0,
      t1=t1,
      dt0=_DT0_FRACTION * (t1 - t0),
      y0=y0,
      stepsize_controller=_CountingPID(diffrax.PIDController(rtol=rtol, atol=atol)),
      saveat=diffrax.SaveAt(t1=ts is None, ts=ts, controller_state=True),
      max_steps=max_steps,
  )
  y1 = sol.ys if ts is not None else jax.tree_util.tree_map(lambda y: y[0], sol.ys)
  first_attempts = sol.controller_state[2]
  nfe = first_attempts + _NEW_EVALS_PER_STEP * jnp.asarray(sol.stats["num_steps"], jnp.int32)
  return y1, nfe
