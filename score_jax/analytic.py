"""Closed-form marginals of Gaussian and Gaussian-mixture data under any SDE.

If the data are a mixture sum_k w_k N(mu_k, Sigma_k), the perturbed marginal
of every SDE with kernel p_0t(x_t | x_0) = N(alpha(t) x_0, std(t)^2 I) is the
mixture sum_k w_k N(alpha mu_k, alpha^2 Sigma_k + std^2 I). Its log-density,
score, class posterior and (for one Gaussian) the probability-flow ODE map are
all exact, which makes this module the oracle of the sampler and likelihood
tests, and a ground truth for benchmarks.

The family is defined through `sde.mean_coef` and `sde.marginal_std`, so it
solves the Fokker-Planck equation of the SDE exactly (each SDE's std obeys
d std^2/dt = 2 f std^2 + g^2). For the VE SDE, whose std(0) = sigma_min, the
t = 0 member is the data convolved with N(0, sigma_min^2 I).

Covariances are stored by their eigendecomposition Sigma_k = U_k diag(lam_k)
U_k^T: the perturbed covariance shares the eigenvectors, so inverses and
log-determinants at any t cost O(D^2) per component.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from score_jax.sde import SDE

Array = jax.Array

__all__ = [
    "GaussianMixture",
    "log_prob",
    "score",
    "score_fn",
    "conditional_score_fn",
    "class_log_prob",
    "class_log_prob_fn",
    "gaussian_flow_map",
    "ModeStatistics",
    "mode_statistics",
    "example_mixture_2d",
]


class GaussianMixture(NamedTuple):
  """A Gaussian mixture in D dimensions (a pytree: pass it through `jit`).

  Build it with `GaussianMixture.create`.
  """

  weights: Array  # [K], sum to 1
  means: Array  # [K, D]
  eigvals: Array  # [K, D], eigenvalues of the covariances (>= 0)
  eigvecs: Array  # [K, D, D], columns are the eigenvectors

  @classmethod
  def create(cls, weights, means, covs=None, stds=None) -> "GaussianMixture":
    """A mixture from weights [K], means [K, D] and covs [K, D, D] or stds [K, D].

    Give either full covariances or per-dimension standard deviations. The
    eigendecomposition runs once in float64 numpy.
    """
    weights = np.asarray(weights, np.float64)
    means = np.asarray(means, np.float64)
    if means.ndim != 2 or weights.shape != means.shape[:1]:
      raise ValueError(
          f"weights must be [K] and means [K, D], got {weights.shape} and {means.shape}.")
    if np.any(weights < 0) or not math.isclose(weights.sum(), 1.0, rel_tol=1e-6):
      raise ValueError(f"weights must be non-negative and sum to 1, got {weights}.")
    k, d = means.shape
    if (covs is None) == (stds is None):
      raise ValueError("Give exactly one of covs [K, D, D] and stds [K, D].")
    if stds is not None:
      stds = np.broadcast_to(np.asarray(stds, np.float64), (k, d))
      covs = np.einsum("kd,de->kde", stds**2, np.eye(d))
    covs = np.asarray(covs, np.float64)
    if covs.shape != (k, d, d):
      raise ValueError(f"covs must be [K, D, D] = {(k, d, d)}, got {covs.shape}.")
    if not np.allclose(covs, np.swapaxes(covs, -1, -2)):
      raise ValueError("covs must be symmetric.")
    eigvals, eigvecs = np.linalg.eigh(covs)
    if np.any(eigvals < -1e-12):
      raise ValueError("covs must be positive semi-definite.")
    as_jnp = lambda a: jnp.asarray(a, dtype=jnp.result_type(float))
    return cls(as_jnp(weights), as_jnp(means), as_jnp(np.maximum(eigvals, 0.0)),
               as_jnp(eigvecs))

  @property
  def dim(self) -> int:
    return self.means.shape[-1]

  @property
  def covs(self) -> Array:
    """Covariances [K, D, D]."""
    return jnp.einsum("kde,ke,kfe->kdf", self.eigvecs, self.eigvals, self.eigvecs)

  def at(self, sde: SDE, t) -> "GaussianMixture":
    """The perturbed mixture p_t at one scalar time t."""
    t = jnp.reshape(jnp.asarray(t, self.means.dtype), (1,))
    alpha = sde.mean_coef(t)[0]
    std = sde.marginal_std(t)[0]
    return self._replace(means=alpha * self.means, eigvals=alpha**2 * self.eigvals + std**2)

  def sample(self, rng: Array, n: int) -> Tuple[Array, Array]:
    """n samples [n, D] and their component labels [n] (int32)."""
    k_rng, z_rng = jax.random.split(rng)
    labels = jax.random.choice(k_rng, self.weights.shape[0], (n,), p=self.weights)
    z = jax.random.normal(z_rng, (n, self.dim), self.means.dtype)
    scaled = z * jnp.sqrt(self.eigvals[labels])
    x = self.means[labels] + jnp.einsum("nde,ne->nd", self.eigvecs[labels], scaled)
    return x, labels.astype(jnp.int32)


def _flat(mix: GaussianMixture, x: Array) -> Array:
  d = math.prod(x.shape[1:])
  if d != mix.dim:
    raise ValueError(f"x {x.shape} has {d} dimensions per example; the mixture has {mix.dim}.")
  return x.reshape(x.shape[0], d)


def _components(mix: GaussianMixture, sde: SDE, x: Array, t: Array):
  """Per-component pieces at times t [B].

  Returns:
    log_joint [B, K] = log w_k + log N_k(x), and the per-component scores
    [B, K, D] = -C_k^{-1} (x - alpha mu_k) of the flattened x.
  """
  xf = _flat(mix, x)  # [B, D]
  t = jnp.broadcast_to(t, (xf.shape[0],))
  alpha = sde.mean_coef(t)  # [B]
  std = sde.marginal_std(t)  # [B]
  var = alpha[:, None, None] ** 2 * mix.eigvals[None] + std[:, None, None] ** 2  # [B, K, D]
  diff = xf[:, None, :] - alpha[:, None, None] * mix.means[None]  # [B, K, D]
  y = jnp.einsum("bkd,kde->bke", diff, mix.eigvecs)  # eigen-coordinates
  log_n = -0.5 * (jnp.sum(y**2 / var, -1) + jnp.sum(jnp.log(var), -1) +
                  mix.dim * math.log(2 * math.pi))  # [B, K]
  comp_scores = -jnp.einsum("bke,kde->bkd", y / var, mix.eigvecs)  # [B, K, D]
  return jnp.log(mix.weights)[None] + log_n, comp_scores


def log_prob(mix: GaussianMixture, sde: SDE, x: Array, t: Array) -> Array:
  """log p_t(x) [B] for x [B, ...] (flattened to D) at times t [B]."""
  log_joint, _ = _components(mix, sde, x, t)
  return jax.nn.logsumexp(log_joint, axis=-1)


def score(mix: GaussianMixture, sde: SDE, x: Array, t: Array) -> Array:
  """grad_x log p_t(x), same shape as x [B, ...]."""
  log_joint, comp_scores = _components(mix, sde, x, t)
  resp = jax.nn.softmax(log_joint, axis=-1)  # [B, K]
  return jnp.einsum("bk,bkd->bd", resp, comp_scores).reshape(x.shape)


def score_fn(mix: GaussianMixture, sde: SDE) -> jax.tree_util.Partial:
  """The exact score as a `score_fn(x, t)`; a pytree, so samplers trace mix and sde."""
  return jax.tree_util.Partial(score, mix, sde)


def _conditional_score(mix: GaussianMixture, sde: SDE, x: Array, t: Array,
                       y: Optional[Array] = None) -> Array:
  if y is None:
    return score(mix, sde, x, t)
  _, comp_scores = _components(mix, sde, x, t)
  picked = jnp.take_along_axis(comp_scores, y[:, None, None], axis=1)[:, 0]  # [B, D]
  return picked.reshape(x.shape)


def conditional_score_fn(mix: GaussianMixture, sde: SDE) -> jax.tree_util.Partial:
  """A `score_fn(x, t, y=None)` with the component index as class label.

  y [B] int selects grad log p_t(x | y) (that component's Gaussian); y=None
  is the unconditional (mixture) score, the convention of classifier-free
  guidance's null label.
  """
  return jax.tree_util.Partial(_conditional_score, mix, sde)


def class_log_prob(mix: GaussianMixture, sde: SDE, x: Array, t: Array, y: Array) -> Array:
  """log p_t(y | x) [B]: the exact noise-conditional classifier of the components."""
  log_joint, _ = _components(mix, sde, x, t)
  log_post = jax.nn.log_softmax(log_joint, axis=-1)
  return jnp.take_along_axis(log_post, y[:, None], axis=1)[:, 0]


def class_log_prob_fn(mix: GaussianMixture, sde: SDE) -> jax.tree_util.Partial:
  """`class_log_prob` as a `log_prob_fn(x, t, y) -> [B]` pytree."""
  return jax.tree_util.Partial(class_log_prob, mix, sde)


def gaussian_flow_map(mix: GaussianMixture, sde: SDE, x: Array, t_from: Array,
                      t_to: Array) -> Array:
  """Exact probability-flow ODE solution for single-Gaussian data (K = 1).

  The score of a Gaussian is linear and decouples along the eigenvectors of
  its covariance, where the ODE moves each coordinate affinely: the
  standardized coordinate (y - alpha mu) / sqrt(alpha^2 lam + std^2) is
  constant along the flow.

  Args:
    x: [B, ...] states at times t_from [B]; t_to [B] the target times.
  Returns:
    The states at t_to, shaped like x.
  """
  if mix.weights.shape[0] != 1:
    raise ValueError("gaussian_flow_map needs a single Gaussian (K = 1).")
  xf = _flat(mix, x)
  mean, lam, vecs = mix.means[0], mix.eigvals[0], mix.eigvecs[0]

  def moments(t):
    alpha, std = sde.mean_coef(t), sde.marginal_std(t)
    return alpha[:, None] * mean[None], jnp.sqrt(alpha[:, None] ** 2 * lam[None] +
                                                  std[:, None] ** 2)

  m_from, s_from = moments(t_from)
  m_to, s_to = moments(t_to)
  c = ((xf - m_from) @ vecs) / s_from  # [B, D] standardized eigen-coordinates
  return (m_to + (c * s_to) @ vecs.T).reshape(x.shape)


class ModeStatistics(NamedTuple):
  """Per-component statistics of samples assigned to the mixture's components."""

  weights: Array  # [K] fraction of samples per component
  means: Array  # [K, D]
  stds: Array  # [K, D] per-dimension standard deviations
  counts: Array  # [K]


def mode_statistics(mix: GaussianMixture, samples: Array) -> ModeStatistics:
  """Assigns samples [n, ...] to their most probable component (at t = 0) and
  returns per-component weights, means and standard deviations.

  With well separated components (means many stds apart) the assignment is
  almost never wrong, so these estimate the sampler's per-mode moments.
  """
  x = _flat(mix, samples)
  k = mix.weights.shape[0]
  # The t = 0 posterior without any SDE: alpha = 1, std = 0.
  var = mix.eigvals
  y = jnp.einsum("nkd,kde->nke", x[:, None, :] - mix.means[None], mix.eigvecs)
  log_joint = jnp.log(mix.weights)[None] - 0.5 * (
      jnp.sum(y**2 / var[None], -1) + jnp.sum(jnp.log(var), -1)[None])
  onehot = jax.nn.one_hot(jnp.argmax(log_joint, -1), k, dtype=x.dtype)  # [n, K]
  counts = onehot.sum(0)
  safe = jnp.maximum(counts, 1.0)[:, None]
  means = onehot.T @ x / safe
  second = onehot.T @ x**2 / safe
  var_hat = (second - means**2) * (safe / jnp.maximum(safe - 1.0, 1.0))  # unbiased
  return ModeStatistics(counts / x.shape[0], means, jnp.sqrt(jnp.maximum(var_hat, 0.0)),
                        counts)


def example_mixture_2d() -> GaussianMixture:
  """The 2-D three-component mixture of the tests and benchmarks.

  Unequal weights (0.25, 0.35, 0.4), one correlated component, standard
  deviations 0.3-0.4 and means at least 3.5 apart, so that components are
  separated by > 4 standard deviations (assignment errors ~1e-5) while the
  reverse dynamics still has to split the mass between modes.
  """
  return GaussianMixture.create(
      [0.25, 0.35, 0.4], [[-2.0, 0.0], [2.0, 1.5], [1.5, -2.0]],
      covs=[[[0.09, 0.0], [0.0, 0.16]], [[0.12, 0.05], [0.05, 0.09]], [[0.1, 0.0], [0.0, 0.1]]])
