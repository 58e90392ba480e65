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

# Tsit5 has 7 stages, the last of which is the first of the next step (FSAL),
# also after a rejected step: one evaluation at the start, then 6 per attempted
# step. tests/test_sampling.py checks this count against a runtime counter.
_NEW_EVALS_PER_STEP = 6
# Initial step as a fraction of the interval; the PID controller adapts from
# there. Giving it explicitly keeps the evaluation count exact (no heuristic).
_DT0_FRACTION = 1e-2


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
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      saveat=diffrax.SaveAt(t1=True) if ts is None else diffrax.SaveAt(ts=ts),
      max_steps=max_steps,
  )
  y1 = sol.ys if ts is not None else jax.tree_util.tree_map(lambda y: y[0], sol.ys)
  nfe = 1 + _NEW_EVALS_PER_STEP * jnp.asarray(sol.stats["num_steps"], jnp.int32)
  return y1, nfe
