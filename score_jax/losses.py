"""Score-matching losses as pure functions.

Every loss takes a score function and an explicit PRNG key and returns
`(loss, LossAux)`: the scalar batch mean and per-example terms, so that
`jax.value_and_grad(..., has_aux=True)` works directly. The per-example
residual and weighting are written for one example and `vmap`ped; the score
function itself is called on the whole batch (networks are batched).

- `dsm_loss`: continuous denoising score matching for any SDE, with a time
  distribution (`uniform`, EDM's `lognormal_sigma`, flow matching's
  `logit_normal`) and a weighting (`default` std^2, likelihood, `edm`,
  `velocity`) of its one residual |std s + z|^2.
- `edm2_loss`: EDM2's loss, EDM's weighted denoising error divided by a learned uncertainty
  e^u(sigma) plus u(sigma), at log-normal sigma.
- `ddpm_loss`: the DDPM discrete loss (epsilon prediction, L_simple).
- `smld_loss`: the NCSN discrete loss (random noise level, sigma^2 weight).
- `implicit_score_matching_loss`, `sliced_score_matching_loss`: score
  matching without noise, for low-dimensional data.

A network-backed `score_fn` closes over its parameters, so gradients with
respect to the parameters flow through the closure.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from score_jax.samplers._common import check_eps
from score_jax.sde import SDE, VESDE, VPSDE, batch_mul

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]  # (x [B, ...], t [B]) -> [B, ...]

__all__ = [
    "LossAux",
    "TimeDistribution",
    "TIME_DISTRIBUTIONS",
    "WEIGHTINGS",
    "sample_time",
    "loss_weight",
    "dsm_loss",
    "edm2_loss",
    "ddpm_loss",
    "smld_loss",
    "implicit_score_matching_loss",
    "sliced_score_matching_loss",
]


class LossAux(NamedTuple):
  per_example: Array  # [B] loss of each example
  t: Array  # [B] times (or discrete-time labels as times) used


class TimeDistribution(NamedTuple):
  """The distribution of t in the continuous DSM loss, on [eps, T].

  - 'uniform': t ~ U(eps, T) (the 2021 losses; loc and scale unused).
  - 'lognormal_sigma' (EDM): ln sigma^ ~ N(loc, scale^2) for the scaled noise
    level sigma^ = std / alpha = e^-lambda, mapped to t through the SDE's
    `t_from_log_snr`; EDM's P_mean = -1.2, P_std = 1.2 by default.
  - 'logit_normal' (flow matching, as in current image models): logit(t) ~
    N(loc, scale^2), m = 0, s = 1 by default.
  The normals are truncated to the SDE's range [eps, T] (sampled there
  exactly, not clipped): for RectifiedFlow and VP that cuts < 1e-6 of the
  mass, for VE with sigma_min = 0.01 EDM's sigma^ < 0.01 (0.25%).
  """
  name: str = "uniform"
  loc: Optional[float] = None  # None: the distribution's default
  scale: Optional[float] = None

  def params(self) -> Tuple[float, float]:
    """(loc, scale) with the defaults filled in."""
    loc, scale = _TIME_DEFAULTS[self.name]
    return (loc if self.loc is None else float(self.loc),
            scale if self.scale is None else float(self.scale))


_TIME_DEFAULTS = {"uniform": (0.0, 1.0), "lognormal_sigma": (-1.2, 1.2),
                  "logit_normal": (0.0, 1.0)}
TIME_DISTRIBUTIONS = tuple(_TIME_DEFAULTS)
WEIGHTINGS = ("default", "edm", "velocity")


def _as_time_distribution(dist: Union[str, TimeDistribution]) -> TimeDistribution:
  dist = TimeDistribution(dist) if isinstance(dist, str) else dist
  if not isinstance(dist, TimeDistribution) or dist.name not in _TIME_DEFAULTS:
    raise ValueError(f"Unknown time distribution {dist!r}; choose from {list(TIME_DISTRIBUTIONS)} "
                     "(a name or a losses.TimeDistribution).")
  loc, scale = dist.params()
  if not (math.isfinite(loc) and math.isfinite(scale) and scale > 0):
    raise ValueError(f"The {dist.name} time distribution needs a finite loc and a scale > 0, "
                     f"got {loc!r}, {scale!r}.")
  return dist


def sample_time(rng: Array, sde: SDE, shape, eps: float = 1e-5,
                distribution: Union[str, TimeDistribution] = "uniform") -> Array:
  """Times t [shape] in [eps, T] drawn from `distribution` (see TimeDistribution)."""
  dist = _as_time_distribution(distribution)
  lo_t, hi_t = jnp.asarray(eps, jnp.float32), jnp.asarray(sde.T, jnp.float32)
  if dist.name == "uniform":
    return jax.random.uniform(rng, shape, minval=eps, maxval=sde.T)
  loc, scale = dist.params()
  if dist.name == "logit_normal" and sde.T > 1.0:
    raise ValueError(f"The logit_normal time distribution draws t in (0, 1); "
                     f"{type(sde).__name__} runs to T = {sde.T:.4g}. Use 'lognormal_sigma'.")
  if dist.name == "lognormal_sigma":  # u = ln sigma^ = -lambda(t), increasing in t
    lo, hi = -sde.log_snr(lo_t[None])[0], -sde.log_snr(hi_t[None])[0]
    to_t = lambda u: sde.t_from_log_snr(-u)
  else:  # logit_normal: u = logit(t); logit(1) = inf is a valid bound
    lo, hi = jnp.log(lo_t) - jnp.log1p(-lo_t), jnp.log(hi_t) - jnp.log1p(-hi_t)
    to_t = jax.nn.sigmoid
  n = jax.random.truncated_normal(rng, (lo - loc) / scale, (hi - loc) / scale, shape)
  return jnp.clip(to_t(loc + scale * n), eps, sde.T)  # clip: float round-off of the maps


def loss_weight(sde: SDE, t: Array, weighting: str = "default", sigma_data: float = 0.5) -> Array:
  """The weight [B] on the DSM residual |std s + z|^2 at times t [B].

  - 'default': 1, i.e. lambda(t) = std^2 on |s + z / std|^2 (the 2021 loss).
  - 'edm': (sigma^2 + sd^2) / sd^2 with sigma = sigma^ = std / alpha. EDM's
    loss lambda(sigma) |D - x_0|^2 with lambda = (sigma^2 + sd^2) / (sigma
    sd)^2 in score terms: the data prediction D = (x_t + std^2 s) / alpha
    has D - x_0 = sigma^ (std s + z), so lambda |D - x_0|^2 = (sigma^2 +
    sd^2) / sd^2 |std s + z|^2; at an EDM-preconditioned network it is
    |F - F_target|^2, unit weight on the network output.
  - 'velocity': (det / alpha)^2, det = alpha std' - std alpha' (= (std
    dlambda/dt)^2). The flow-matching loss |v - (alpha' x_0 + std' z)|^2 of
    the velocity v that the score s implies (models.get_score_fn) equals
    (det / alpha)^2 |std s + z|^2; for RectifiedFlow 1 / (1 - t)^2 on
    |v - (z - x_0)|^2.
  """
  if weighting == "default":
    return jnp.ones_like(t)
  alpha, std = sde.mean_coef(t), sde.marginal_std(t)
  if weighting == "edm":
    return 1.0 + (std / (sigma_data * alpha)) ** 2
  if weighting == "velocity":
    d_alpha, d_std = sde.coef_derivatives(t)
    return ((alpha * d_std - std * d_alpha) / alpha) ** 2
  raise ValueError(f"Unknown weighting {weighting!r}; choose from {list(WEIGHTINGS)}.")


def _reduce(sq: Array, reduce_mean: bool) -> Array:
  """Per-example reduction over dimensions: mean, or 0.5 * sum (the reference's)."""
  return jnp.mean(sq) if reduce_mean else 0.5 * jnp.sum(sq)


def _weighted_residual(score: Array, z: Array, std: Array, weight: Array, reduce_mean: bool) -> Array:
  """weight * reduce(|std * score + z|^2) for ONE example.

  |std s + z|^2 = std^2 |s + z / std|^2: the DSM residual with lambda = std^2
  folded in; `weight` carries lambda / std^2 for other weightings.
  """
  return weight * _reduce(jnp.square(std * score + z), reduce_mean)


_batched_residual = jax.vmap(_weighted_residual, in_axes=(0, 0, 0, 0, None))


def dsm_loss(
    rng: Array,
    sde: SDE,
    score_fn: ScoreFn,
    x: Array,
    *,
    eps: float = 1e-5,
    reduce_mean: bool = False,
    likelihood_weighting: bool = False,
    importance_weighting: bool = False,
    t: Optional[Array] = None,
    time_distribution: Union[str, TimeDistribution] = "uniform",
    weighting: str = "default",
    sigma_data: float = 0.5,
) -> Tuple[Array, LossAux]:
  """Continuous denoising score matching (Song et al. 2021, eq. 7).

  t ~ U(eps, T), x_t = mean + std z, per-example loss
  lambda(t) reduce(|s(x_t, t) + z / std|^2) with lambda = std^2 by default or
  g(t)^2 with `likelihood_weighting` (then the loss bounds the negative
  log-likelihood). `importance_weighting` (only with likelihood weighting)
  samples t with density proportional to g^2 / std^2 instead of uniformly and
  reweights, which keeps the expectation and reduces its variance.

  The same residual serves the later losses through `time_distribution` and
  `weighting` (`sample_time`, `loss_weight`): EDM's loss is
  time_distribution='lognormal_sigma', weighting='edm'; flow matching on
  RectifiedFlow is weighting='velocity' with 'uniform' or 'logit_normal' t.
  The weighting is a property of the objective, not of the network's
  parameterization, which only changes how the score is computed.

  Args:
    rng: PRNG key.
    sde: the forward SDE.
    score_fn: (x [B, ...], t [B]) -> score [B, ...].
    x: data batch [B, ...].
    t: optional fixed times [B] (e.g. to evaluate the loss per noise level);
      sampled from `time_distribution` when None.
    time_distribution: a name of TIME_DISTRIBUTIONS or a TimeDistribution.
    weighting: a name of WEIGHTINGS (likelihood weighting: the flag above).
    sigma_data: sigma_data of the 'edm' weighting.
  Returns:
    (scalar batch mean, LossAux with per-example losses [B] and t [B]).
  """
  check_eps(sde, eps)
  if importance_weighting and not likelihood_weighting:
    raise ValueError("importance_weighting applies to the likelihood-weighted loss; "
                     "set likelihood_weighting=True as well.")
  dist = _as_time_distribution(time_distribution)
  if weighting not in WEIGHTINGS:
    raise ValueError(f"Unknown weighting {weighting!r}; choose from {list(WEIGHTINGS)}.")
  if likelihood_weighting and weighting != "default":
    raise ValueError(f"likelihood_weighting is a weighting of its own; it does not combine with "
                     f"weighting={weighting!r}.")
  if importance_weighting and dist.name != "uniform":
    raise ValueError(f"importance_weighting samples t itself; it does not combine with the "
                     f"{dist.name} time distribution.")
  if weighting == "edm" and not (math.isfinite(float(sigma_data)) and float(sigma_data) > 0):
    raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data!r}.")
  b = x.shape[0]
  rng_t, rng_z = jax.random.split(rng)
  if t is not None:
    if importance_weighting:
      raise ValueError("importance_weighting samples t itself; do not pass t as well.")
    if t.shape != (b,):
      raise ValueError(f"t must have shape [B] = {(b,)}, got {t.shape}.")
  elif importance_weighting:
    t, weight = sde.sample_importance_time(rng_t, (b,), eps)
  else:
    t = sample_time(rng_t, sde, (b,), eps, dist)
  z = jax.random.normal(rng_z, x.shape, x.dtype)
  mean, std = sde.marginal_prob(x, t)
  x_t = mean + batch_mul(std, z)
  score = score_fn(x_t, t)
  if not importance_weighting:
    if likelihood_weighting:
      g = sde.sde(jnp.zeros_like(x), t)[1]
      weight = g**2 / std**2
    else:
      weight = loss_weight(sde, t, weighting, sigma_data)
  per_example = _batched_residual(score, z, std, weight, reduce_mean)
  return jnp.mean(per_example), LossAux(per_example, t)


def edm2_loss(denoise_fn: Callable[[Array, Array], Array], logvar_fn: Callable[[Array], Array],
              x: Array, sigma: Array, z: Array, *, sigma_data: float = 0.5
              ) -> Tuple[Array, Array]:
  """EDM2's uncertainty-weighted loss (Karras et al. 2024, eq. 21; NVlabs/edm2 `EDM2Loss`).

  Per example, summed over its n elements as EDM2 sums its loss tensor:
  sum_i [w(sigma) / e^u (D_i - x_i)^2 + u] = w(sigma) e^-u |D - x|^2 + n u, with
  D = denoise_fn(x + sigma z, sigma), u = logvar_fn(sigma), EDM's weight w(sigma) =
  (sigma^2 + sd^2) / (sigma sd)^2. At the optimal u, e^u = w |D - x|^2 / n: the weight
  adapts so every noise level contributes equally.

  Args:
    denoise_fn: (x_t [B, ...], sigma [B]) -> D [B, ...].
    logvar_fn: sigma [B] -> u [B].
    x: data [B, ...]; sigma: noise levels [B] (EDM2 draws ln sigma ~ N(P_mean, P_std^2));
    z: standard normal noise [B, ...].
  Returns:
    (scalar batch mean, per-example losses [B]); EDM2 backpropagates the sum over the batch
    divided by the batch size, the mean.
  """
  sigma = sigma.astype(jnp.float32)
  denoised = denoise_fn(x + batch_mul(sigma, z), sigma)
  u = logvar_fn(sigma).astype(jnp.float32)  # [B]
  weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
  n = math.prod(x.shape[1:])
  sq = jnp.sum(jnp.square(denoised - x).reshape(x.shape[0], -1), axis=1)  # [B]
  per_example = weight * jnp.exp(-u) * sq + n * u
  return jnp.mean(per_example), per_example


def _discrete_loss(rng, score_fn, x, num_scales, mean_coefs, stds, reduce_mean):
  """Shared body of the discrete losses: index i ~ U{0..N-1}, x_i = a_i x + s_i z."""
  b = x.shape[0]
  rng_i, rng_z = jax.random.split(rng)
  i = jax.random.randint(rng_i, (b,), 0, num_scales)
  t = i.astype(jnp.float32) / max(num_scales - 1, 1)
  z = jax.random.normal(rng_z, x.shape, x.dtype)
  std = stds[i]
  x_t = batch_mul(mean_coefs[i], x) + batch_mul(std, z)
  score = score_fn(x_t, t)
  per_example = _batched_residual(score, z, std, jnp.ones_like(std), reduce_mean)
  return jnp.mean(per_example), LossAux(per_example, t)


def ddpm_loss(rng: Array, sde: VPSDE, score_fn: ScoreFn, x: Array, *,
              reduce_mean: bool = True) -> Tuple[Array, LossAux]:
  """DDPM L_simple: |eps_theta(x_i, i) - z|^2 at a random step i of the chain.

  The score function receives t = i / (N - 1) (the time of step i) and the
  epsilon prediction is -sqrt(1 - alphabar_i) * score, so the residual is
  |sqrt(1 - alphabar_i) score + z|^2.
  """
  if sde.chain != "ddpm":
    raise TypeError(f"ddpm_loss needs an SDE with the DDPM chain (VPSDE), got "
                     f"{type(sde).__name__}, whose chain is {sde.chain!r}; use dsm_loss "
                     "(continuous training) for it.")
  return _discrete_loss(rng, score_fn, x, sde.N, sde.sqrt_alphas_cumprod,
                        sde.sqrt_1m_alphas_cumprod, reduce_mean)


def smld_loss(rng: Array, sde: VESDE, score_fn: ScoreFn, x: Array, *,
              reduce_mean: bool = False) -> Tuple[Array, LossAux]:
  """NCSN loss: sigma_i^2 |s(x + sigma_i z, i) + z / sigma_i|^2, i ~ U{0..N-1}.

  The score function receives t = i / (N - 1), the time of sigma_i on the
  SMLD grid.
  """
  if sde.chain != "smld":
    raise TypeError(f"smld_loss needs an SDE with the SMLD chain of noise levels (VESDE), got "
                     f"{type(sde).__name__}, whose chain is {sde.chain!r}; use dsm_loss "
                     "(continuous training) for it.")
  sigmas = sde.discrete_sigmas
  return _discrete_loss(rng, score_fn, x, sde.N, jnp.ones_like(sigmas), sigmas, reduce_mean)


def _flat_score_fn(score_fn: Callable[[Array], Array], x: Array):
  """Wraps score_fn to act on [B, D] flattened inputs."""
  shape = x.shape
  return lambda v: score_fn(v.reshape(shape)).reshape(shape[0], -1)


def implicit_score_matching_loss(score_fn: Callable[[Array], Array], x: Array) -> Tuple[Array, Array]:
  """Hyvarinen's score matching: E[tr(d s / d x) + |s|^2 / 2], exact trace.

  Costs D Jacobian-vector products; meant for low-dimensional data. Equals
  E|s - grad log p|^2 / 2 minus a constant independent of s.

  Args:
    score_fn: x [B, ...] -> score [B, ...] (no time argument; a noise-level
      conditional model can be bound with functools.partial).
    x: samples [B, ...].
  Returns:
    (scalar mean, per-example values [B]).
  """
  flat = _flat_score_fn(score_fn, x)
  xf = x.reshape(x.shape[0], -1)
  d = xf.shape[1]
  s = flat(xf)

  def diag_term(e):  # e: [D] basis vector, the same for every example
    v = jnp.broadcast_to(e, xf.shape)
    return jnp.sum(jax.jvp(flat, (xf,), (v,))[1] * v, axis=-1)  # [B]

  trace = jnp.sum(jax.vmap(diag_term)(jnp.eye(d, dtype=xf.dtype)), axis=0)
  per_example = trace + 0.5 * jnp.sum(s**2, axis=-1)
  return jnp.mean(per_example), per_example


def sliced_score_matching_loss(rng: Array, score_fn: Callable[[Array], Array], x: Array, *,
                               n_projections: int = 1,
                               projection: str = "gaussian") -> Tuple[Array, Array]:
  """Sliced score matching (Song et al. 2019): E_v[v^T (ds/dx) v + (v^T s)^2 / 2].

  Unbiased for the implicit score matching objective when E[v v^T] = I
  ('gaussian' or 'rademacher' projections); one JVP per projection.

  Returns:
    (scalar mean, per-example values [B]).
  """
  if projection not in ("gaussian", "rademacher"):
    raise ValueError(f"projection must be 'gaussian' or 'rademacher', got {projection!r}.")
  flat = _flat_score_fn(score_fn, x)
  xf = x.reshape(x.shape[0], -1)
  shape = (n_projections,) + xf.shape
  if projection == "gaussian":
    vs = jax.random.normal(rng, shape, xf.dtype)
  else:
    vs = jax.random.rademacher(rng, shape, xf.dtype)

  def one(v):
    s, jv = jax.jvp(flat, (xf,), (v,))
    return jnp.sum(v * jv, axis=-1) + 0.5 * jnp.sum(v * s, axis=-1) ** 2

  per_example = jnp.mean(jax.vmap(one)(vs), axis=0)
  return jnp.mean(per_example), per_example
