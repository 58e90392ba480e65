"""Few-step samplers: DDIM, EDM-style Heun, multistep DPM-Solver++ and UniPC.

All four are written in the quantities every SDE here shares: the mean
coefficient alpha(t), the marginal std(t), the log signal-to-noise ratio
lambda(t) = log(alpha / std) and its inverse `t_from_log_snr`. The
probability-flow ODE depends on the SDE only through alpha and std, so one
implementation serves VP, sub-VP, VE (and the tutorial SDE):

- DDIM (Song et al. 2021a): x_s = alpha_s x0 + sqrt(std_s^2 - c^2) eps_hat
  + c z with c = eta * (posterior std); eta = 0 is the first-order exponential
  integrator of the ODE, eta = 1 ancestral sampling.
- Heun (Karras et al. 2022, Alg. 1-2): second-order steps of dx^/dsigma^ =
  (x^ - D(x^)) / sigma^ in the scaled variables x^ = x / alpha, sigma^ =
  std / alpha = e^-lambda, with optional stochastic churn (s_churn > 0).
- DPM-Solver++ (Lu et al. 2022, multistep 2M / 3M): exponential integrator
  in lambda on the data prediction x0, with lower-order warm-up steps.
- UniPC (Zhao et al. 2023): the same integrator's multistep predictor with a
  corrector on the next step's evaluation (one order more, no extra cost).

Each sampler is one jitted loop (`fori_loop`) and returns (x, nfe).
num_steps is traced: changing it does not recompile (the loops are
therefore not reverse-mode differentiable). Time grids run from T to eps
with schedule "uniform_t" (uniform in t), "logSNR" (uniform in lambda) or
"edm" (sigma^ spaced uniformly in sigma^(1/rho), Karras et al.); UniPC also
takes an explicit grid, e.g. one `time_grids.optimize_time_grid` fits to
the model (through `unipc_loop`, a differentiable, unrolled copy of its loop).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from score_jax.samplers._common import (Constraint, as_pytree_fn, check_choice, check_constraint,
                                       check_eps, check_sde, check_shape, checked, denoise_x0,
                                       full_t, posterior_step)
from score_jax.sde import SDE, batch_mul

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

__all__ = ["SCHEDULES", "UNIPC_VARIANTS", "time_grid", "ddim_sample", "heun_sample",
           "dpm_solver_pp_sample", "unipc_sample", "unipc_loop", "check_timesteps"]

SCHEDULES = ("uniform_t", "logSNR", "edm")


def _grid_time(sde: SDE, i: Array, num_steps: Array, schedule: str, eps, rho) -> Array:
  """Time of grid point i in 0..num_steps (decreasing from T to eps).

  A function of the index rather than a stored array, so that num_steps can
  be traced: one compiled sampler serves every number of steps.
  """
  u = i / num_steps
  if schedule == "uniform_t":
    t = sde.T + u * (eps - sde.T)
  else:
    lam_max = sde.log_snr(jnp.full((1,), eps))[0]
    lam_min = sde.log_snr(jnp.full((1,), sde.T))[0]
    if schedule == "logSNR":
      lam = lam_min + u * (lam_max - lam_min)
    else:  # "edm": sigma^ = e^-lambda spaced uniformly in sigma^(1/rho)
      smax, smin = jnp.exp(-lam_min / rho), jnp.exp(-lam_max / rho)
      lam = -rho * jnp.log(smax + u * (smin - smax))
    t = sde.t_from_log_snr(lam)
  # Pin the ends: the lambda round trip is only accurate to float precision.
  return jnp.where(i == 0, sde.T, jnp.where(i == num_steps, eps, t))


def _check_common(sde, shape, num_steps, schedule, eps, z, constraint, rho):
  check_sde(sde)
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
  check_choice("schedule", schedule, SCHEDULES)
  if not (math.isfinite(float(rho)) and float(rho) > 0):
    raise ValueError(f"rho must be a finite number > 0, got {rho!r}.")
  check_constraint(constraint)
  return check_eps(sde, eps), check_shape(shape, z)


def time_grid(sde: SDE, num_steps: int, schedule: str = "logSNR", eps: float = 1e-3,
              rho: float = 7.0) -> Array:
  """Decreasing times [num_steps + 1] from T to eps (see SCHEDULES)."""
  check_sde(sde)
  eps, _ = _check_common(sde, (1, 1), num_steps, schedule, eps, None, None, rho)
  return _grid_time(sde, jnp.arange(num_steps + 1), num_steps, schedule, eps, rho)


def _run(rng, sde, score_fn, shape, num_steps, grid, z, constraint, denoise, step, init):
  """The loop all samplers share: prior, projections, steps, final denoise.

  grid(i) -> time of grid point i (scalar). step(carry, x, t [B], s [B], i,
  key) -> (carry, x_s) moves x from grid(i) to grid(i + 1). num_steps may be
  traced (a `fori_loop` with a traced bound). Returns x at grid(num_steps),
  or its data prediction if denoise.
  """
  batch = shape[0]
  init_rng, loop_rng = jax.random.split(rng)
  x = sde.prior_sampling(init_rng, shape) if z is None else z

  def body(i, state):
    carry, x = state
    t, s = full_t(grid(i), batch), full_t(grid(i + 1), batch)
    # Fresh projection noise each step: with one fixed draw the replaced
    # coordinates of deterministic solvers drift further from p(x_u | x_k).
    k_proj, k_step = jax.random.split(jax.random.fold_in(loop_rng, i))
    if constraint is not None:
      x = constraint.project(k_proj, x, t)
    return step(carry, x, t, s, i, k_step)

  _, x = jax.lax.fori_loop(0, num_steps, body, (init, x))
  if denoise:
    t = full_t(grid(num_steps), batch)
    x = denoise_x0(sde, score_fn(x, t), x, t)
  return x if constraint is None else constraint.finalize(x)


# --- DDIM ---


@functools.partial(jax.jit, static_argnames=("shape", "schedule", "denoise"))
def _ddim(rng, sde, score_fn, shape, num_steps, schedule, eta, rho, denoise, eps, z, constraint):
  score_fn = checked(score_fn)
  grid = functools.partial(_grid_time, sde, num_steps=num_steps, schedule=schedule, eps=eps,
                           rho=rho)

  def step(carry, x, t, s, i, key):
    x0 = denoise_x0(sde, score_fn(x, t), x, t)
    mean, c = posterior_step(sde, x, x0, t, s, eta)
    return carry, mean + batch_mul(c, jax.random.normal(key, x.shape, x.dtype))

  return _run(rng, sde, score_fn, shape, num_steps, grid, z, constraint, denoise, step, ())


def ddim_sample(rng: Array,
                sde: SDE,
                score_fn: ScoreFn,
                shape: Tuple[int, ...],
                num_steps: int = 50,
                eta: float = 0.0,
                schedule: str = "uniform_t",
                rho: float = 7.0,
                eps: float = 1e-3,
                denoise: bool = False,
                z: Optional[Array] = None,
                constraint: Optional[Constraint] = None) -> Tuple[Array, int]:
  """DDIM sampling (first order), deterministic at eta = 0.

  Args:
    rng: PRNG key (prior sample, eta > 0 noise, constraint noise).
    sde, score_fn, shape: as for `sampling.pc_sample`.
    num_steps: number of steps, one score evaluation each.
    eta: 0 (deterministic DDIM) to 1 (ancestral sampling of the posterior).
    schedule, rho: the time grid (see `time_grid`).
    eps: final time in (0, T).
    denoise: finish with Tweedie's E[x_0 | x_eps] (one more evaluation).
    z: optional initial state [B, ...] at time T.
    constraint: optional projection (controllable.py) before every step.

  Returns:
    (samples [B, ...], nfe = num_steps + denoise).
  """
  eps, shape = _check_common(sde, shape, num_steps, schedule, eps, z, constraint, rho)
  if not (math.isfinite(float(eta)) and float(eta) >= 0):
    raise ValueError(f"eta must be a finite number >= 0, got {eta!r}.")
  x = _ddim(rng, sde, as_pytree_fn(score_fn), shape, num_steps, schedule, float(eta), float(rho),
            bool(denoise), eps, z, constraint)
  return x, num_steps + int(bool(denoise))


# --- EDM Heun ---


@functools.partial(jax.jit, static_argnames=("shape", "schedule", "denoise"))
def _heun(rng, sde, score_fn, shape, num_steps, schedule, rho, s_churn, s_tmin, s_tmax, s_noise,
          denoise, eps, z, constraint):
  score_fn = checked(score_fn)
  grid = functools.partial(_grid_time, sde, num_steps=num_steps, schedule=schedule, eps=eps,
                           rho=rho)
  sigma_max = 1.0 / jnp.exp(sde.log_snr(full_t(sde.T, 1)))[0]

  def sigma_hat(t):  # std / alpha = e^-lambda, [B]
    return jnp.exp(-sde.log_snr(t))

  def slope(x_hat, t):
    # dx^/dsigma^ = (x^ - D(x^)) / sigma^ = -std(t) score(alpha x^, t). The
    # second form avoids the cancellation in x^ - D at low noise (which costs
    # ~1e-3 of float32 accuracy over a few hundred steps).
    x = batch_mul(sde.mean_coef(t), x_hat)
    return batch_mul(-sde.marginal_std(t), score_fn(x, t))

  def step(carry, x, t, s, i, key):
    sig_t, sig_s = sigma_hat(t), sigma_hat(s)
    # Stochastic churn: raise the noise level by gamma, then solve from there.
    in_range = (sig_t >= s_tmin) & (sig_t <= s_tmax)
    gamma = jnp.where(in_range, jnp.minimum(s_churn / num_steps, math.sqrt(2.0) - 1.0), 0.0)
    sig_up = jnp.minimum(sig_t * (1.0 + gamma), sigma_max)
    t_up = jnp.where(gamma > 0, sde.t_from_log_snr(-jnp.log(sig_up)), t)
    noise = s_noise * jax.random.normal(key, x.shape, x.dtype)
    # sqrt(sig_up^2 - sig_t^2) written as a product: XLA contracts a^2 - b^2
    # into an FMA, which is not 0 for a == b (a 1e-4 relative error at s_churn = 0).
    churn_std = jnp.sqrt(jnp.maximum(sig_up - sig_t, 0.0) * (sig_up + sig_t))
    x_hat = batch_mul(1.0 / sde.mean_coef(t), x) + batch_mul(churn_std, noise)
    h = sig_s - sig_up
    d = slope(x_hat, t_up)
    x_euler = x_hat + batch_mul(h, d)
    x_next = x_hat + batch_mul(0.5 * h, d + slope(x_euler, s))
    return carry, batch_mul(sde.mean_coef(s), x_next)

  return _run(rng, sde, score_fn, shape, num_steps, grid, z, constraint, denoise, step, ())


def heun_sample(rng: Array,
                sde: SDE,
                score_fn: ScoreFn,
                shape: Tuple[int, ...],
                num_steps: int = 18,
                schedule: str = "edm",
                rho: float = 7.0,
                s_churn: float = 0.0,
                s_tmin: float = 0.0,
                s_tmax: float = float("inf"),
                s_noise: float = 1.0,
                eps: float = 1e-3,
                denoise: bool = False,
                z: Optional[Array] = None,
                constraint: Optional[Constraint] = None) -> Tuple[Array, int]:
  """EDM's second-order Heun sampler (Karras et al. 2022, Algorithms 1-2).

  Args:
    num_steps: Heun steps, two score evaluations each (every step ends at
      a positive noise level, so none degrades to Euler).
    s_churn, s_tmin, s_tmax, s_noise: stochastic churn as in EDM; the noise
      level sigma^ = std / alpha is raised by gamma = min(s_churn / num_steps,
      sqrt(2) - 1) when it lies in [s_tmin, s_tmax] (capped at sigma^(T)).
      s_churn = 0 (default) is the deterministic ODE solver.
    Others: as for `ddim_sample`.

  Returns:
    (samples [B, ...], nfe = 2 num_steps + denoise).
  """
  eps, shape = _check_common(sde, shape, num_steps, schedule, eps, z, constraint, rho)
  for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
    if not (math.isfinite(float(value)) and float(value) >= 0):
      raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
  if not float(s_tmax) >= float(s_tmin):
    raise ValueError(f"s_tmax must be >= s_tmin, got {s_tmax!r} < {s_tmin!r}.")
  x = _heun(rng, sde, as_pytree_fn(score_fn), shape, num_steps, schedule, float(rho),
            float(s_churn), float(s_tmin), float(s_tmax), float(s_noise), bool(denoise), eps, z,
            constraint)
  return x, 2 * num_steps + int(bool(denoise))


# --- DPM-Solver++ (multistep) ---


def _dpm_update(order_index, x, d0, d1, d2, lam_prev, lam_prev2, lam_t, lam_s, ratio, alpha_s):
  """One multistep DPM-Solver++ update of orders 1, 2, 3 (Lu et al. 2022b).

  d0, d1, d2: data predictions at lambda_t, lam_prev, lam_prev2 (newest
  first); ratio = std_s / std_t; alpha_s [B]. The second-order update is
  the reference implementation's 'dpmsolver' variant; see `third` for the
  third-order coefficient.
  """
  h = lam_s - lam_t
  phi1 = jnp.expm1(-h)
  base = batch_mul(ratio, x) - batch_mul(alpha_s * phi1, d0)

  def first():
    return base

  def second():
    r0 = (lam_t - lam_prev) / h
    return base - batch_mul(0.5 * alpha_s * phi1 / r0, d0 - d1)

  def third():
    r0, r1 = (lam_t - lam_prev) / h, (lam_prev - lam_prev2) / h
    d1_0 = batch_mul(1.0 / r0, d0 - d1)
    d1_1 = batch_mul(1.0 / r1, d1 - d2)
    diff1 = d1_0 + batch_mul(r0 / (r0 + r1), d1_0 - d1_1)
    # The second difference estimates h^2 D''/2, the Taylor coefficient
    # multiplying phi3 is h^2 D'': hence 2 / (r0 + r1). The widely copied
    # reference code uses 1 / (r0 + r1), which leaves an O(h^3) local error
    # (second order overall); tests/test_sampling.py measures the order.
    diff2 = batch_mul(2.0 / (r0 + r1), d1_0 - d1_1)
    phi2 = phi1 / h + 1.0
    phi3 = phi2 / h - 0.5
    return base + batch_mul(alpha_s * phi2, diff1) - batch_mul(alpha_s * phi3, diff2)

  return jax.lax.switch(order_index, [first, second, third])


@functools.partial(
    jax.jit, static_argnames=("shape", "order", "schedule", "lower_order_final", "denoise"))
def _dpm_pp(rng, sde, score_fn, shape, num_steps, order, schedule, rho, lower_order_final,
            denoise, eps, z, constraint):
  score_fn = checked(score_fn)
  grid = functools.partial(_grid_time, sde, num_steps=num_steps, schedule=schedule, eps=eps,
                           rho=rho)

  def lam_at(i):  # a whole-batch scalar: all examples share the grid
    return sde.log_snr(jnp.reshape(grid(i), (1,)))[0]

  def step(carry, x, t, s, i, key):
    d1, d2 = carry
    d0 = denoise_x0(sde, score_fn(x, t), x, t)
    step_order = jnp.minimum(order, i + 1)  # warm-up: not enough history yet
    if lower_order_final:
      # Few steps: high-order final steps are unstable (reference default).
      step_order = jnp.where(num_steps < 10, jnp.minimum(step_order, num_steps - i), step_order)
    lam_s, lam_t = lam_at(i + 1), lam_at(i)
    lam_prev, lam_prev2 = lam_at(jnp.maximum(i - 1, 0)), lam_at(jnp.maximum(i - 2, 0))
    ratio = sde.marginal_std(s) / sde.marginal_std(t)

    def multistep():
      return _dpm_update(step_order - 1, x, d0, d1, d2, lam_prev, lam_prev2, lam_t, lam_s, ratio,
                         sde.mean_coef(s))

    def midpoint():
      # DPM-Solver++(2S) with r = 1/2: local error O(h^3), so the warm-up
      # step does not cap the global order of 3M at 2 (one extra evaluation).
      t_mid = sde.t_from_log_snr(jnp.full_like(t, 0.5 * (lam_t + lam_s)))
      x_mid = batch_mul(sde.marginal_std(t_mid) / sde.marginal_std(t), x) - batch_mul(
          sde.mean_coef(t_mid) * jnp.expm1(-0.5 * (lam_s - lam_t)), d0)
      d_mid = denoise_x0(sde, score_fn(x_mid, t_mid), x_mid, t_mid)
      phi1 = jnp.expm1(-(lam_s - lam_t))
      return batch_mul(ratio, x) - batch_mul(sde.mean_coef(s) * phi1, d_mid)

    if order == 3:
      x = jax.lax.cond(i == 0, midpoint, multistep)
    else:
      x = multistep()
    return (d0, d1), x

  zeros = jnp.zeros(shape, jnp.result_type(float) if z is None else z.dtype)
  return _run(rng, sde, score_fn, shape, num_steps, grid, z, constraint, denoise, step,
              (zeros, zeros))


def dpm_solver_pp_sample(rng: Array,
                         sde: SDE,
                         score_fn: ScoreFn,
                         shape: Tuple[int, ...],
                         num_steps: int = 20,
                         order: int = 2,
                         schedule: str = "logSNR",
                         rho: float = 7.0,
                         lower_order_final: bool = True,
                         eps: float = 1e-3,
                         denoise: bool = False,
                         z: Optional[Array] = None,
                         constraint: Optional[Constraint] = None) -> Tuple[Array, int]:
  """Multistep DPM-Solver++ (2M or 3M) on the probability-flow ODE.

  Args:
    num_steps: steps, one score evaluation each. While the history fills,
      the first steps use lower orders: for order 3 the first step is a
      second-order single step (DPM-Solver++(2S), one extra evaluation) so
      that the global order stays 3.
    order: 1, 2 or 3.
    lower_order_final: with fewer than 10 steps, lower the order of the last
      steps (as the reference implementation does, for stability).
    Others: as for `ddim_sample`.

  Returns:
    (samples [B, ...], nfe = num_steps + (order == 3) + denoise).
  """
  eps, shape = _check_common(sde, shape, num_steps, schedule, eps, z, constraint, rho)
  if order not in (1, 2, 3):
    raise ValueError(f"order must be 1, 2 or 3, got {order!r}.")
  x = _dpm_pp(rng, sde, as_pytree_fn(score_fn), shape, num_steps, order, schedule, float(rho),
              bool(lower_order_final), bool(denoise), eps, z, constraint)
  return x, num_steps + int(order == 3) + int(bool(denoise))


# --- UniPC (multistep) ---

# UniPC (Zhao et al. 2023) in the data-prediction form. Over a step from
# lambda_b to lambda_b + h the probability-flow ODE integrates exactly to
#   x = (std / std_b) x_b + alpha sum_k h^(k+1) phi_(k+1)(-h) x0^(k)(lambda_b),
# phi_1(z) = (e^z - 1) / z, phi_(k+1)(z) = (phi_k(z) - 1 / k!) / z. The k = 0
# term is the DDIM step; the derivatives are replaced by differences
# D_j = x0(lambda_b + r_j h) - x0(lambda_b) of data predictions at other
# points, weighted B(h) a_j / r_j. Matching the Taylor terms k = 1..K asks
#   sum_j a_j r_j^(k-1) = h k! phi_(k+1)(-h) / B(h) =: g_k.
# The predictor UniP-p uses the p - 1 previous points (r_j < 0), local error
# O(h^(p+1)); the corrector UniC-p redoes the step just taken with the data
# prediction at its end (r = 1) added, local error O(h^(p+2)), and that
# evaluation is the one the next predictor needs: no extra evaluations.
# Solved exactly, B(h) cancels; it matters where a single coefficient takes
# its h -> 0 limit g_1 -> 1/2 (UniP-2 and UniC-1, as in the paper's code):
# bh1 B(h) = h, bh2 B(h) = 1 - e^-h (the paper's e^h - 1 with h -> -h for
# the data prediction); UniP-2 with bh2 is DPM-Solver++(2M).

UNIPC_VARIANTS = ("bh1", "bh2")


def _unipc_g(h: Array, variant: str) -> Tuple[Array, Array]:
  """(g [3] for k = 1, 2, 3, B(h)) of the UniPC order conditions; h > 0 scalar.

  phi_(k+1)(-h) by its series for small h (the recursion cancels there) and
  by the recursion otherwise.
  """
  small = jnp.abs(h) < 1.0
  z = jnp.where(small, -1.0, -h)  # keeps the unused recursion finite
  p1 = jnp.expm1(z) / z
  p2 = (p1 - 1.0) / z
  p3 = (p2 - 0.5) / z
  p4 = (p3 - 1.0 / 6.0) / z
  zs = -h

  def series(k):  # phi_k(zs) = sum_j zs^j / (j + k)!, 14 terms by Horner's rule
    acc = jnp.zeros_like(zs)
    for j in reversed(range(14)):
      acc = acc * zs + 1.0 / math.factorial(j + k)
    return acc

  phis = [jnp.where(small, series(k), p) for k, p in ((2, p2), (3, p3), (4, p4))]
  b = h if variant == "bh1" else -jnp.expm1(-h)
  g = jnp.stack([h * math.factorial(k) * phi for k, phi in zip((1, 2, 3), phis)]) / b
  return g, b


def _unipc_coefficients(r: Array, count: Array, h: Array, variant: str) -> Array:
  """Weights c [3] of the differences D_j in x += alpha sum_j c_j D_j.

  r [3]: the points' offsets (lambda_j - lambda_b) / h; the first `count`
  (0 to 3, traced) are used, the others get weight 0. c_j = B(h) a_j / r_j.
  """
  g, b = _unipc_g(h, variant)
  j = jnp.arange(3)
  active = j < count
  r = jnp.where(active, r, 1.0)
  powers = jnp.stack([jnp.ones_like(r), r, r * r])  # row k: r_j^k
  both = active[:, None] & active[None, :]
  R = jnp.where(both, powers, (j[:, None] == j[None, :]).astype(r.dtype))
  a = jnp.linalg.solve(R, jnp.where(active, g, 0.0))
  a = jnp.where(count == 1, jnp.where(j == 0, 0.5, 0.0).astype(r.dtype), a)
  return b * a / r


def _unipc_update(x_b, d_b, points, r, count, h, ratio, alpha, variant):
  """x = ratio x_b + alpha (1 - e^-h) d_b + alpha sum_j c_j (d_j - d_b).

  points: three data predictions (unused ones may be anything finite).
  """
  c = _unipc_coefficients(r, count, h, variant)
  x = batch_mul(ratio, x_b) + batch_mul(-alpha * jnp.expm1(-h), d_b)
  for j in range(3):
    x = x + batch_mul(alpha * c[j], points[j] - d_b)
  return x


@functools.partial(jax.jit,
                   static_argnames=("shape", "order", "variant", "schedule", "lower_order_final",
                                    "corrector", "denoise"))
def _unipc(rng, sde, score_fn, shape, num_steps, order, variant, schedule, rho, lower_order_final,
           corrector, denoise, eps, z, constraint, timesteps):
  if timesteps is None:
    grid = functools.partial(_grid_time, sde, num_steps=num_steps, schedule=schedule, eps=eps,
                             rho=rho)
  else:
    grid = lambda i: timesteps[i]
  return unipc_loop(rng, sde, score_fn, shape, num_steps, order, variant, grid,
                     lower_order_final, corrector, denoise, z, constraint)


def unipc_loop(rng, sde, score_fn, shape, num_steps, order, variant, grid, lower_order_final,
                corrector, denoise, z, constraint):
  """UniPC over the grid grid(i), i = 0..num_steps; a Python int num_steps
  makes the loop a scan, reverse-differentiable (`time_grids.optimize_time_grid`)."""
  score_fn = checked(score_fn)

  def lam_at(i):  # a whole-batch scalar: all examples share the grid
    return sde.log_snr(jnp.reshape(grid(i), (1,)))[0]

  def scalars(t):  # (std, alpha) of the whole-batch time t [B]
    return sde.marginal_std(t), sde.mean_coef(t)

  def step(carry, x, t, s, i, key):
    # carry: the previous predictor's inputs: start x_b at t_b, its data
    # prediction d_b at lam_b, and its `n_e` other points e1, e2 (lam_e).
    x_b, t_b, d_b, lam_b, e1, e2, lam_e, n_e = carry
    lam_t, lam_s = lam_at(i), lam_at(i + 1)
    d = denoise_x0(sde, score_fn(x, t), x, t)
    std_t, alpha_t = scalars(t)
    std_s, alpha_s = scalars(s)

    if corrector:
      # UniC: redo the step lam_b -> lam_t with d (r = 1) after the n_e points.
      def correct():
        h = lam_t - lam_b
        slot = jnp.arange(3)
        r_e = jnp.concatenate([(lam_e - lam_b) / h, jnp.ones((1,), h.dtype)])
        r = jnp.where(slot == n_e, 1.0, r_e)
        pts = [jnp.where(n_e == 0, d, e1), jnp.where(n_e == 1, d, e2), d]
        return _unipc_update(x_b, d_b, pts, r, n_e + 1, h, std_t / sde.marginal_std(t_b),
                             alpha_t, variant)

      x = jax.lax.cond(i > 0, correct, lambda: x)

    h = lam_s - lam_t
    ratio = std_s / std_t
    step_order = jnp.minimum(order, i + 1)  # warm-up: not enough history yet
    if lower_order_final:
      # Few steps: high-order final steps are unstable (reference default).
      step_order = jnp.where(num_steps < 10, jnp.minimum(step_order, num_steps - i), step_order)

    def multistep():
      # UniP: the previous points are d_b (the last step's start) and e1.
      lam_p = jnp.stack([lam_b, lam_e[0]])
      r = jnp.concatenate([(lam_p - lam_t) / h, jnp.ones((1,), h.dtype)])
      x_s = _unipc_update(x, d, [d_b, e1, d_b], r, step_order - 1, h, ratio, alpha_s, variant)
      return x_s, d_b, e1, lam_p, (step_order - 1).astype(jnp.int32)

    x_s, p1, p2, lam_p, n_p = multistep()
    return (x, t, d, lam_t, p1, p2, lam_p, n_p), x_s

  zeros = jnp.zeros(shape, jnp.result_type(float) if z is None else z.dtype)
  lam0 = lam_at(0)
  init = (zeros, full_t(grid(0), shape[0]), zeros, lam0, zeros, zeros, jnp.stack([lam0, lam0]),
          jnp.zeros((), jnp.int32))
  return _run(rng, sde, score_fn, shape, num_steps, grid, z, constraint, denoise, step, init)


def unipc_sample(rng: Array,
                 sde: SDE,
                 score_fn: ScoreFn,
                 shape: Tuple[int, ...],
                 num_steps: int = 10,
                 order: int = 2,
                 variant: str = "bh2",
                 schedule: str = "logSNR",
                 rho: float = 7.0,
                 lower_order_final: bool = True,
                 corrector: bool = True,
                 eps: float = 1e-3,
                 denoise: bool = False,
                 z: Optional[Array] = None,
                 constraint: Optional[Constraint] = None,
                 timesteps: Optional[Array] = None) -> Tuple[Array, int]:
  """Multistep UniPC (Zhao et al. 2023) on the probability-flow ODE.

  The predictor UniP-`order` and, on every step but the last, the corrector
  UniC-`order`, which reuses the next step's evaluation: global order
  `order` + 1 (corrector=False: UniP alone, order `order`).

  Args:
    num_steps: steps, one score evaluation each. While the history fills,
      the first steps use lower orders (as in the paper's code). The first
      step's lower order costs nothing measurable: at the start of the
      logSNR grid the data prediction hardly moves (measured: a second-order
      start through the midpoint, as `dpm_solver_pp_sample` makes for 3M,
      moves order-3 samples on the mixture by 1e-5 RMS at 10-20 steps,
      against their 1e-1 to 1e-2 path error, and costs an evaluation).
    order: 1, 2 or 3 (the predictor's order; the reference recommends 2 for
      guided and 3 for unconditional sampling).
    variant: "bh1" (B(h) = h) or "bh2" (B(h) = 1 - e^-h, DPM-Solver++ 2M's
      predictor); they differ where a coefficient takes its small-step limit.
    lower_order_final: with fewer than 10 steps, lower the order of the last
      steps (as the reference implementations do, for stability).
    corrector: apply UniC (default); False leaves the predictor alone.
    timesteps: an explicit time grid [num_steps + 1], decreasing from T to
      its last time (e.g. from `time_grids.optimize_time_grid`); it replaces num_steps,
      schedule and eps. New values do not recompile (a new length does).
    Others: as for `ddim_sample`.

  Returns:
    (samples [B, ...], nfe = num_steps + denoise).
  """
  if timesteps is not None:
    timesteps = check_timesteps(sde, timesteps)
    num_steps, eps = int(timesteps.shape[0]) - 1, float(timesteps[-1])
  eps, shape = _check_common(sde, shape, num_steps, schedule, eps, z, constraint, rho)
  if order not in (1, 2, 3):
    raise ValueError(f"order must be 1, 2 or 3, got {order!r}.")
  check_choice("UniPC variant", variant, UNIPC_VARIANTS)
  x = _unipc(rng, sde, as_pytree_fn(score_fn), shape, num_steps, order, variant, schedule,
             float(rho), bool(lower_order_final), bool(corrector), bool(denoise), eps, z,
             constraint, None if timesteps is None else jnp.asarray(timesteps))
  return x, num_steps + int(bool(denoise))


def check_timesteps(sde: SDE, timesteps) -> np.ndarray:
  """An explicit time grid as float64 numpy, checked: 1-D, >= 2 points, strictly
  decreasing from T to a last time in (0, T)."""
  check_sde(sde)
  ts = np.asarray(timesteps, np.float64)
  if ts.ndim != 1 or ts.shape[0] < 2 or not np.all(np.isfinite(ts)):
    raise ValueError(f"timesteps must be a 1-D grid of >= 2 finite times, got shape {ts.shape}.")
  if not (abs(ts[0] - sde.T) <= 1e-6 * sde.T and np.all(np.diff(ts) < 0) and ts[-1] > 0):
    raise ValueError(f"timesteps must decrease strictly from T = {sde.T} to a time > 0, got "
                     f"{ts[0]:g} ... {ts[-1]:g}.")
  return ts
