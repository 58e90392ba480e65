"""The probability-flow ODE and its adaptive solve on the device (diffrax).

dx/dt = f(x, t) - g(t)^2 score(x, t) / 2 has the same marginals as the SDE.
`ode_sample` / `ode_encode` (sampling.py) and `log_likelihood`
(likelihood.py) all integrate it with `solve`, one jitted `while_loop`
without host round trips.

The whole batch is one ODE with one shared step size, and the step-size
controller measures the error in the RMS norm over every component of the
batch (x and, for likelihoods, the log-density together), as the 2021
reference does with scipy's RK45 over the flattened batch; that is what
makes evaluation counts comparable. The default `Method` is that RK45 on
the device: the Dormand-Prince 5(4) pair, scipy's step-size rule and its
Hairer-Wanner first step (one extra evaluation, the first one reused as the
first stage), so it takes the reference's steps, to rounding, at the same
cost and error (benchmarks/bench_ode.py compares it with Tsit5, Bosh3, PI
control and a per-example norm; tables in docs/results.md).
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar, NamedTuple, Optional, Tuple, Union

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from score_jax.sde import SDE

Array = jax.Array
PyTree = object

__all__ = ["SOLVERS", "NORMS", "CONTROLLERS", "Method", "DEFAULT", "drift", "solve"]

_DP = diffrax.Dopri5.tableau
# Dormand and Prince's (1980) embedded 4th-order weights.
_DP_B4 = np.array([5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40])


class _DormandPrince(diffrax.Dopri5):
  """Dormand-Prince 5(4) with the authors' own embedded 4th-order solution.

  This is the pair of scipy's RK45 and Hairer's DOPRI5. diffrax.Dopri5 has
  the same 5th-order solution but Shampine's (1986) embedded weights, whose
  error estimate is 2/3 of this one: at a given tolerance it takes longer
  steps, and errors larger than the reference's.
  """

  tableau: ClassVar[diffrax.ButcherTableau] = diffrax.ButcherTableau(
      a_lower=_DP.a_lower, b_sol=_DP.b_sol, b_error=_DP.b_sol - _DP_B4, c=_DP.c)


SOLVERS = {"dopri5": _DormandPrince, "dopri5_shampine": diffrax.Dopri5, "tsit5": diffrax.Tsit5,
           "bosh3": diffrax.Bosh3}
NORMS = ("batch", "example")
CONTROLLERS = ("rk45", "diffrax")


class Method(NamedTuple):
  """How `solve` integrates: the Runge-Kutta pair, controller and first step.

  Attributes:
    solver: a key of SOLVERS, explicit FSAL pairs: "dopri5" (Dormand-Prince
      5(4), scipy's RK45), "dopri5_shampine" (its 5th-order solution with
      Shampine's error estimate: diffrax.Dopri5), "tsit5" (Tsitouras 5(4)),
      "bosh3" (Bogacki-Shampine 3(2), scipy's RK23).
    controller: "rk45" (scipy's step-size rule, see _Controller) or
      "diffrax" (diffrax.PIDController).
    pcoeff, icoeff: PI coefficients ((0, 1): the plain I controller of scipy
      and most codes).
    first_step: "auto" for the Hairer-Wanner heuristic (the one scipy uses:
      one extra evaluation, its first evaluation reused as the first stage),
      or a float, the first step as a fraction of the interval.
    norm: "batch" (RMS over every component of the whole batch, one shared
      error) or "example" (the largest per-example RMS: the worst example
      sets the step).
  """
  solver: str = "dopri5"
  controller: str = "rk45"
  pcoeff: float = 0.0
  icoeff: float = 1.0
  first_step: Union[str, float] = "auto"
  norm: str = "batch"


DEFAULT = Method()


def _squares(tree) -> Tuple[Array, int]:
  """(sum of squares per example [B], components per example) of a pytree whose leaves
  all lead with the batch axis."""
  leaves = jax.tree_util.tree_leaves(tree)
  squares = sum(jnp.sum(jnp.reshape(jnp.abs(l)**2, (l.shape[0], -1)), axis=1) for l in leaves)
  return squares, sum(math.prod(l.shape[1:]) for l in leaves)


def _batch_rms(tree) -> Array:
  """RMS over every component of the whole batch (scipy's norm on the flattened batch)."""
  squares, size = _squares(tree)
  return jnp.sqrt(jnp.mean(squares) / size)


def _example_rms(tree) -> Array:
  """The largest per-example RMS."""
  squares, size = _squares(tree)
  return jnp.sqrt(jnp.max(squares) / size)


def _norm(name: str) -> Callable:
  if name not in NORMS:
    raise ValueError(f"Unknown ODE error norm {name!r}; use one of {NORMS}.")
  return _batch_rms if name == "batch" else _example_rms


class _Controller(diffrax.AbstractAdaptiveStepSizeController):
  """The step-size rule of scipy's RK45/RK23 (Hairer-Wanner II.4), optionally PI.

  The error is norm(y_error / (atol + rtol max(|y0|, |y1|))). A step is
  accepted when it is below 1; the next step is then scaled by
  min(10, 0.9 err^(-1/k)) (k the order of the error estimate), at most 1
  right after a rejection, and a rejected one retried scaled by
  max(0.2, 0.9 err^(-1/k)). With pcoeff > 0 the accepted-step factor is
  diffrax's PI form 0.9 err^(-(pcoeff + icoeff)/k) err_prev^(pcoeff/k).
  diffrax.PIDController differs from scipy's rule in two ways that cost steps
  here: an accepted step never lets the next one shrink, and a step after a
  rejection may grow again. The state also counts the attempts before the
  first accepted step (their cost depends on the first stage being stored).
  """

  rtol: float
  atol: float
  norm: Callable
  pcoeff: float
  icoeff: float

  def wrap(self, direction):
    return self

  def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
    del terms, t1, y0, args, func, error_order
    one = jnp.asarray(1.0, jnp.result_type(dt0))
    # (1 / previous accepted error, last attempt rejected, any accepted, first attempts)
    return t0 + dt0, (one, jnp.asarray(False), jnp.asarray(False), jnp.asarray(0, jnp.int32))

  def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
    del args
    prev_inv, rejected, accepted, first_attempts = controller_state

    def scaled(y0, y1, e):
      y1 = jnp.where(jnp.isnan(y1), y0, y1)
      return e / (self.atol + self.rtol * jnp.maximum(jnp.abs(y0), jnp.abs(y1)))

    err = self.norm(jax.tree_util.tree_map(scaled, y0, y1_candidate, y_error))
    err = jax.lax.stop_gradient(jnp.where(jnp.isnan(err), jnp.inf, err)).astype(prev_inv.dtype)
    keep = err < 1
    inv = 1 / jnp.maximum(err, jnp.finfo(err.dtype).tiny)
    grow = _SAFETY * inv**((self.pcoeff + self.icoeff) / error_order) * prev_inv**(
        -self.pcoeff / error_order)
    grow = jnp.minimum(jnp.where(err == 0, _FACTOR_MAX, grow), _FACTOR_MAX)
    grow = jnp.where(rejected, jnp.minimum(grow, 1.0), grow)
    shrink = jnp.maximum(_FACTOR_MIN, _SAFETY * inv**(1 / error_order))
    dt = (t1 - t0) * jnp.where(keep, grow, shrink).astype(jnp.result_type(t1))
    next_t0 = jnp.where(keep, t1, t0)
    first_attempts = first_attempts + jnp.where(accepted, 0, 1).astype(jnp.int32)
    state = (jnp.where(keep, inv, prev_inv), ~keep, accepted | keep, first_attempts)
    return keep, next_t0, next_t0 + dt, False, state, diffrax.RESULTS.successful


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


# scipy's (and Hairer-Wanner's) controller constants.
_SAFETY, _FACTOR_MIN, _FACTOR_MAX = 0.9, 0.2, 10.0


def _initial_step(vector_field, y0, f0, t0, t1, rtol, atol, norm, error_order):
  """Hairer-Wanner (Solving ODEs I, II.4) first step size: (|dt|, evaluations made).

  The step whose explicit-Euler error estimate is about 1% of the tolerance,
  from |y0|, |f0| and a difference quotient of f along one Euler probe
  (one evaluation), capped at the interval.
  """
  interval = jnp.abs(t1 - t0)
  direction = jnp.sign(t1 - t0)
  scale = jax.tree_util.tree_map(lambda y: atol + rtol * jnp.abs(y), y0)
  scaled = lambda tree: norm(jax.tree_util.tree_map(jnp.divide, tree, scale))
  d0, d1 = scaled(y0), scaled(f0)
  h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.maximum(d1, 1e-30))
  h0 = jnp.minimum(h0, interval)
  y1 = jax.tree_util.tree_map(lambda y, f: y + h0 * direction * f, y0, f0)
  f1 = vector_field(t0 + h0 * direction, y1)
  d2 = scaled(jax.tree_util.tree_map(jnp.subtract, f1, f0)) / h0
  big = jnp.maximum(d1, d2)
  h1 = jnp.where(big <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3),
                 (0.01 / jnp.maximum(big, 1e-30))**(1.0 / error_order))
  return jnp.minimum(jnp.minimum(100 * h0, h1), interval)


def drift(sde: SDE, score_fn: Callable[[Array, Array], Array], x: Array, t: Array) -> Array:
  """dx/dt of the probability-flow ODE, [B, ...], at times t [B]."""
  rev_drift, _ = sde.reverse(score_fn, probability_flow=True).sde(x, t)
  return rev_drift


def solve(vector_field: Callable[[Array, PyTree], PyTree], y0: PyTree, t0, t1, rtol: float,
          atol: float, max_steps: int = 4096, ts: Optional[Array] = None,
          method: Method = DEFAULT) -> Tuple[PyTree, Array]:
  """Integrates dy/dt = vector_field(t, y) from t0 to t1 (either direction).

  Args:
    vector_field: (t scalar, y pytree) -> dy/dt pytree; every leaf of y
      leads with the batch axis.
    y0: initial state pytree.
    t0, t1: start and end times (t1 < t0 runs backwards).
    rtol, atol: tolerances of the step-size controller (error scaled by
      atol + rtol |y| componentwise, then normed as method.norm says).
    max_steps: step limit; hitting it raises an error at run time.
    ts: optional times [K] in [t0, t1], ordered from t0 towards t1, at which
      to return the state (the solver's dense output: the steps, hence y(t1),
      are those of a solve without ts).
    method: solver, controller and first step (see `Method`).
  Returns:
    (y(t1), nfe), or with ts (y at each of ts, stacked [K, ...] per leaf,
    nfe): nfe is the number of vector-field evaluations, int32 scalar.
  """
  if method.solver not in SOLVERS:
    raise ValueError(f"Unknown ODE solver {method.solver!r}; use one of {sorted(SOLVERS)}.")
  if method.controller not in CONTROLLERS:
    raise ValueError(f"Unknown step-size controller {method.controller!r}; use one of "
                     f"{CONTROLLERS}.")
  auto = isinstance(method.first_step, str) and method.first_step == "auto"
  if not auto and not (isinstance(method.first_step, (int, float)) and
                       0 < method.first_step <= 1):
    raise ValueError(f"first_step must be 'auto' or a fraction in (0, 1], got "
                     f"{method.first_step!r}.")
  solver = SOLVERS[method.solver]()
  norm = _norm(method.norm)
  term = diffrax.ODETerm(lambda t, y, args: vector_field(t, y))
  # An explicit FSAL pair: its last stage is the next step's first, so a step
  # from a stored first stage costs stages - 1 new evaluations.
  new_per_step = len(solver.tableau.c)
  if auto:
    f0 = vector_field(t0, y0)
    dt0 = _initial_step(vector_field, y0, f0, t0, t1, rtol, atol, norm,
                        solver.order(term)) * jnp.sign(t1 - t0)
    # diffrax's RK state (first step pending, stored first stage): handing it
    # f0 makes every attempt, the first ones included, cost new_per_step.
    solver_state, evals_before = (jnp.asarray(False), f0), 2
  else:
    dt0, solver_state, evals_before = method.first_step * (t1 - t0), None, 0
  if method.controller == "rk45":
    controller = _Controller(rtol=rtol, atol=atol, norm=norm, pcoeff=method.pcoeff,
                             icoeff=method.icoeff)
  else:
    controller = _CountingPID(diffrax.PIDController(rtol=rtol, atol=atol, pcoeff=method.pcoeff,
                                                    icoeff=method.icoeff, norm=norm))
  sol = diffrax.diffeqsolve(
      term,
      solver,
      t0=t0,
      t1=t1,
      dt0=dt0,
      y0=y0,
      solver_state=solver_state,
      stepsize_controller=controller,
      saveat=diffrax.SaveAt(t1=ts is None, ts=ts, controller_state=True),
      max_steps=max_steps,
  )
  y1 = sol.ys if ts is not None else jax.tree_util.tree_map(lambda y: y[0], sol.ys)
  nfe = evals_before + new_per_step * jnp.asarray(sol.stats["num_steps"], jnp.int32)
  if solver_state is None:
    # Nothing stored until a step is accepted (diffrax keeps the state of the
    # last accepted step): each attempt up to then evaluates the first stage too.
    nfe = nfe + sol.controller_state[-1]
  return y1, nfe
