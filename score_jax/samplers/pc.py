"""Predictor-corrector samplers (Song et al. 2021); the probability-flow ODE is in `ode.py`.

`pc_sample` runs N predictor-corrector steps on timesteps linspace(T, eps, N)
in one jitted `lax.scan`: at each step the corrector (Langevin MCMC at the
current noise level) runs first, then the predictor (one step of a reverse
SDE solver); the last step returns the predictor's noise-free mean when
`denoise`. `ode_sample` integrates the probability-flow ODE from T to eps
with an adaptive Runge-Kutta solver on the device, and `ode_encode` runs it
the other way (data -> latent).

All samplers take an `SDE` and a `score_fn(x, t) -> score` with x [B, ...]
and t [B]; they never see networks or configs. Pass the score as a
`jax.tree_util.Partial(fn, params)` to keep parameters traced (no
recompilation when they change); a plain function is cached by identity.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from score_jax.samplers._common import (Constraint, as_pytree_fn, check_choice,
                                       check_constraint, check_eps, check_sde, check_shape,
                                       check_tolerance, checked, denoise_x0, full_t,
                                       posterior_step)
from score_jax.sde import SDE, VESDE, VPSDE, batch_mul

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

__all__ = ["pc_sample", "PREDICTORS", "CORRECTORS"]


# --- predictors ---
# A predictor is an update rule (sde, x, t [B], score [B, ...], z [B, ...],
# probability_flow) -> (x, x_mean) given the score at (x, t) and fresh noise z.
# The sampler evaluates the score once, outside the rules, and picks the rule
# with `lax.switch` on a traced index: every predictor-corrector combination
# shares one compiled program that contains the score function once per role.


def _constant(score: Array) -> ScoreFn:
  return lambda x, t: score


def _euler_maruyama(sde: SDE, x, t, score, z, probability_flow):
  # dt = -T/N like the reference: N steps cover [0, T] whatever eps is.
  dt = -sde.T / sde.N
  drift, diffusion = sde.reverse(_constant(score), probability_flow).sde(x, t)
  x_mean = x + drift * dt
  return x_mean + batch_mul(diffusion * jnp.sqrt(-dt), z), x_mean


def _reverse_diffusion(sde: SDE, x, t, score, z, probability_flow):
  rev_f, rev_g = sde.reverse(_constant(score), probability_flow).discretize(x, t)
  x_mean = x - rev_f
  return x_mean + batch_mul(rev_g, z), x_mean


def _ancestral_vp(sde: VPSDE, x, t, score, z):
  # DDPM ancestral step (Ho et al. 2020) on the VP chain.
  beta = sde.discrete_betas[sde.time_index(t)]
  x_mean = batch_mul(1.0 / jnp.sqrt(1.0 - beta), x + batch_mul(beta, score))
  return x_mean + batch_mul(jnp.sqrt(beta), z), x_mean


def _ancestral_ve(sde: VESDE, x, t, score, z):
  # SMLD ancestral step: the Gaussian posterior between geometric sigmas.
  i = sde.time_index(t)
  sigmas = sde.discrete_sigmas
  sigma = sigmas[i]
  prev = jnp.where(i == 0, 0.0, sigmas[jnp.maximum(i - 1, 0)])
  x_mean = x + batch_mul(sigma**2 - prev**2, score)
  std = jnp.sqrt(prev**2 * (sigma**2 - prev**2) / sigma**2)
  return x_mean + batch_mul(std, z), x_mean


def _ancestral_posterior(sde: SDE, x, t, score, z):
  # Any other SDE (sub-VP, Tutorial): sample the exact Gaussian posterior
  # q(x_s | x_t, x0_hat) of its chain (exact transitions from s = t - T/N).
  s = jnp.maximum(t - sde.T / sde.N, 0.0)
  x_mean, std = posterior_step(sde, x, denoise_x0(sde, score, x, t), t, s, eta=1.0)
  return x_mean + batch_mul(std, z), x_mean


# The DDPM and SMLD chains have their own ancestral formulas; exact types, so
# SDEs without a chain (sub-VP among them) take the exact Gaussian posterior.
_ANCESTRAL = {"ddpm": _ancestral_vp, "smld": _ancestral_ve}


def _ancestral_sampling(sde: SDE, x, t, score, z, probability_flow):
  del probability_flow  # rejected in pc_sample's checks
  return _ANCESTRAL.get(sde.chain, _ancestral_posterior)(sde, x, t, score, z)


def _no_predictor(sde, x, t, score, z, probability_flow):
  return x, x


# --- correctors ---
# Langevin MCMC at a fixed noise level: x <- x + h score + sqrt(2 h) z. The
# correctors differ only in the step size h [B], a rule (sde, t, score, z, snr).


def _batch_mean_norm(v: Array) -> Array:
  return jnp.mean(jnp.linalg.norm(v.reshape(v.shape[0], -1), axis=-1))


def _langevin_step_size(sde: SDE, t, score, z, snr):
  # 2 alpha (snr |z| / |s|)^2 with norms averaged over the batch, as in the
  # reference (per-example norms are too noisy in low dimension).
  return 2.0 * sde.corrector_alpha(t) * (snr * _batch_mean_norm(z) / _batch_mean_norm(score))**2


def _ald_step_size(sde: SDE, t, score, z, snr):
  # NCSN's annealed Langevin dynamics: 2 alpha (snr std(t))^2.
  return 2.0 * sde.corrector_alpha(t) * (snr * sde.marginal_std(t))**2


# name -> rule; the dict order fixes the traced branch index.
PREDICTORS = {
    "euler_maruyama": _euler_maruyama,
    "reverse_diffusion": _reverse_diffusion,
    "ancestral_sampling": _ancestral_sampling,
    "none": None,
}
CORRECTORS = {
    "langevin": _langevin_step_size,
    "ald": _ald_step_size,
    "none": None,
}
_PREDICTOR_RULES = [f for f in PREDICTORS.values() if f is not None]
_CORRECTOR_RULES = [f for f in CORRECTORS.values() if f is not None]


def _index(table: dict, name: str) -> int:
  """Branch index of a name; -1 for "none"."""
  return -1 if table[name] is None else list(table).index(name)


def _predict(kind: Array, sde: SDE, score_fn: ScoreFn, x, t, z, probability_flow):
  def run(x):
    branches = [functools.partial(rule, sde, probability_flow=probability_flow)
                for rule in _PREDICTOR_RULES]
    return jax.lax.switch(kind, branches, x, t, score_fn(x, t), z)

  return jax.lax.cond(kind >= 0, run, lambda x: (x, x), x)


def _correct(kind: Array, sde: SDE, score_fn: ScoreFn, x, t, rng, snr, n_steps):
  """n_steps (traced) Langevin steps with the step-size rule `kind`."""
  rules = [functools.partial(rule, sde) for rule in _CORRECTOR_RULES]

  def step(j, carry):
    x, _ = carry
    score = score_fn(x, t)
    z = jax.random.normal(jax.random.fold_in(rng, j), x.shape, x.dtype)
    h = jax.lax.switch(kind, rules, t, score, z, snr)
    x_mean = x + batch_mul(h, score)
    return x_mean + batch_mul(jnp.sqrt(2.0 * h), z), x_mean

  return jax.lax.cond(kind >= 0, lambda x: jax.lax.fori_loop(0, n_steps, step, (x, x)),
                      lambda x: (x, x), x)


def _check_ddpm_chain(sde: SDE, predictor: str, corrector: str) -> None:
  """The DDPM chain's betas linspace(beta_min, beta_max, N) / N must be < 1."""
  uses_chain = ((sde.chain == "ddpm" and predictor in ("reverse_diffusion", "ancestral_sampling"))
                or (isinstance(sde, VPSDE) and corrector != "none"))  # alpha = 1 - beta_i
  if uses_chain and sde.beta_max / sde.N >= 1.0:
    raise ValueError(
        f"{type(sde).__name__} with N = {sde.N} has discrete betas up to beta_max / N = "
        f"{sde.beta_max / sde.N:.3g} >= 1, which the {predictor} / {corrector} steps cannot "
        f"use; take N > beta_max (= {sde.beta_max}) or euler_maruyama without a corrector.")


@functools.partial(jax.jit, static_argnames=("shape", "probability_flow", "denoise"))
def _pc_sample(rng, sde, score_fn, shape, predictor, corrector, snr, n_steps, probability_flow,
               denoise, eps, z, constraint):
  score_fn = checked(score_fn)
  init_rng, loop_rng = jax.random.split(rng)
  x = sde.prior_sampling(init_rng, shape) if z is None else z
  timesteps = jnp.linspace(sde.T, eps, sde.N)

  def project(key, x, t):
    return x if constraint is None else constraint.project(key, x, t)

  def body(carry, i):
    x, _ = carry
    t = full_t(timesteps[i], shape[0])
    k_corr, k_pred, k_proj1, k_proj2 = jax.random.split(jax.random.fold_in(loop_rng, i), 4)
    x = project(k_proj1, x, t)
    x, x_mean = _correct(corrector, sde, score_fn, x, t, k_corr, snr, n_steps)
    x = project(k_proj2, x, t)
    z = jax.random.normal(k_pred, shape, x.dtype)
    x, x_mean = _predict(predictor, sde, score_fn, x, t, z, probability_flow)
    return (x, x_mean), None

  (x, x_mean), _ = jax.lax.scan(body, (x, x), jnp.arange(sde.N))
  out = x_mean if denoise else x
  return out if constraint is None else constraint.finalize(out)


def pc_sample(rng: Array,
              sde: SDE,
              score_fn: ScoreFn,
              shape: Tuple[int, ...],
              predictor: str = "reverse_diffusion",
              corrector: str = "langevin",
              snr: float = 0.16,
              n_steps: int = 1,
              probability_flow: bool = False,
              denoise: bool = True,
              eps: float = 1e-3,
              z: Optional[Array] = None,
              constraint: Optional[Constraint] = None) -> Tuple[Array, int]:
  """Predictor-corrector sampling (Song et al. 2021, Algorithm 1).

  Args:
    rng: PRNG key; per-step keys are `fold_in(rng, step)` on the device.
    sde: the forward SDE; its N sets the number of steps.
    score_fn: score_fn(x [B, ...], t [B]) -> score [B, ...].
    shape: [B, ...] of the samples.
    predictor: one of PREDICTORS ("euler_maruyama", "reverse_diffusion",
      "ancestral_sampling", "none"). Ancestral sampling uses the DDPM chain
      for VPSDE, the SMLD chain for VESDE and the exact Gaussian posterior of
      the chain for other SDEs (sub-VP, Tutorial).
    corrector: one of CORRECTORS ("langevin", "ald", "none").
    snr: signal-to-noise ratio of the corrector's step size.
    n_steps: corrector steps per noise level.
    probability_flow: predict along the probability-flow ODE instead of the
      reverse SDE (not with ancestral sampling).
    denoise: return the last predictor step's noise-free mean.
    eps: last time of the grid linspace(T, eps, N), in (0, T).
    z: optional initial state [B, ...] at time T instead of a prior sample.
    constraint: optional projection (controllable.py) applied before the
      corrector and before the predictor at each step, and to the output.

  Returns:
    (samples [B, ...], nfe): nfe = N * (predictor score calls +
    n_steps corrector calls), i.e. N (n_steps + 1) with both on.

  The predictor, corrector, snr, n_steps and eps are traced: changing them
  does not recompile (only shape, probability_flow and denoise are static).
  """
  check_sde(sde)
  check_choice("predictor", predictor, PREDICTORS)
  check_choice("corrector", corrector, CORRECTORS)
  if predictor == corrector == "none":
    raise ValueError("predictor and corrector cannot both be 'none'.")
  if probability_flow and predictor == "ancestral_sampling":
    raise ValueError("ancestral_sampling has no probability-flow version; use "
                     "reverse_diffusion or euler_maruyama with probability_flow=True.")
  if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
    raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}.")
  snr = check_tolerance("snr", snr)
  eps = check_eps(sde, eps)
  shape = check_shape(shape, z)
  check_constraint(constraint)
  _check_ddpm_chain(sde, predictor, corrector)
  pred, corr = _index(PREDICTORS, predictor), _index(CORRECTORS, corrector)
  x = _pc_sample(rng, sde, as_pytree_fn(score_fn), shape, jnp.int32(pred), jnp.int32(corr), snr,
                 n_steps, bool(probability_flow), bool(denoise), eps, z, constraint)
  calls = int(pred >= 0) + n_steps * int(corr >= 0)
  return x, sde.N * calls
