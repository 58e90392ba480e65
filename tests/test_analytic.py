"""The closed-form oracle against scipy, autodiff and the probability-flow ODE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from score_jax import analytic
from score_jax.samplers import probability_flow
from score_jax import sde as sde_lib

SDES = {
    "vp": sde_lib.VPSDE(0.1, 20.0, 100),
    "subvp": sde_lib.subVPSDE(0.1, 20.0, 100),
    "ve": sde_lib.VESDE(0.01, 50.0, 100),
    "tutorial": sde_lib.TutorialSDE(25.0, 100),
}
WEIGHTS = [0.25, 0.35, 0.4]
MEANS = [[-2.0, 0.0, 0.5], [2.0, 1.5, -1.0], [1.5, -2.0, 0.0]]
COVS = [
    [[0.09, 0.0, 0.02], [0.0, 0.16, 0.0], [0.02, 0.0, 0.1]],
    [[0.12, 0.05, 0.0], [0.05, 0.09, 0.0], [0.0, 0.0, 0.2]],
    [[0.1, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 0.1]],
]


def mixture():
  return analytic.GaussianMixture.create(WEIGHTS, MEANS, covs=COVS)


def scipy_log_prob(sde, x, t):
  """log p_t(x) per example from scipy, float64, one time per example."""
  out = []
  for xi, ti in zip(np.asarray(x, np.float64), np.asarray(t, np.float64)):
    alpha = float(sde.mean_coef(jnp.asarray([ti]))[0])
    std = float(sde.marginal_std(jnp.asarray([ti]))[0])
    comps = [
        np.log(w) + stats.multivariate_normal(
            alpha * np.asarray(m), alpha**2 * np.asarray(c) + std**2 * np.eye(3)).logpdf(xi)
        for w, m, c in zip(WEIGHTS, MEANS, COVS)
    ]
    out.append(np.logaddexp.reduce(comps))
  return np.asarray(out)


@pytest.mark.parametrize("name", sorted(SDES))
def test_log_prob_and_score_match_scipy_and_autodiff(name):
  sde, mix = SDES[name], mixture()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 3)).astype(np.float32) * 2
  t = np.array([0.0, 1e-3, 0.1, 0.4, 0.8, 1.0], np.float32)
  logp = jax.jit(analytic.log_prob)(mix, sde, jnp.asarray(x), jnp.asarray(t))
  np.testing.assert_allclose(logp, scipy_log_prob(sde, x, t), rtol=1e-5, atol=1e-4)
  grad = jax.jit(jax.grad(lambda v: jnp.sum(analytic.log_prob(mix, sde, v, jnp.asarray(t)))))(
      jnp.asarray(x))
  np.testing.assert_allclose(jax.jit(analytic.score)(mix, sde, jnp.asarray(x), jnp.asarray(t)),
                             grad, rtol=1e-4, atol=1e-4)


def test_event_shape_is_flattened_and_checked():
  sde, mix = SDES["vp"], mixture()
  x = jnp.ones((4, 3))
  t = jnp.full((4,), 0.3)
  s_flat = analytic.score(mix, sde, x, t)
  s_img = analytic.score(mix, sde, x.reshape(4, 1, 3, 1), t)
  assert s_img.shape == (4, 1, 3, 1)
  np.testing.assert_array_equal(s_img.reshape(4, 3), s_flat)
  with pytest.raises(ValueError, match="dimensions per example"):
    analytic.score(mix, sde, jnp.ones((4, 2)), t)


@jax.jit
def _posterior_checks(mix, sde, x, t, y):
  logs = jnp.stack([analytic.class_log_prob(mix, sde, x, t, jnp.full(y.shape, k, jnp.int32))
                    for k in range(3)], axis=1)
  # Bayes: grad log p(x | y) = grad log p(x) + grad log p(y | x).
  grad_post = jax.grad(lambda v: jnp.sum(analytic.class_log_prob(mix, sde, v, t, y)))(x)
  cond = analytic.conditional_score_fn(mix, sde)
  return (jax.nn.logsumexp(logs, axis=1), cond(x, t, y), analytic.score(mix, sde, x, t) + grad_post,
          cond(x, t, None), analytic.score(mix, sde, x, t))


def test_class_posterior_and_conditional_scores():
  sde, mix = SDES["ve"], mixture()
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 3)) * 3
  t = jnp.full((5,), 0.5)
  y = jnp.array([0, 1, 2, 1, 0], jnp.int32)
  norm, cond, bayes, uncond, score = _posterior_checks(mix, sde, x, t, y)
  np.testing.assert_allclose(norm, 0.0, atol=1e-5)
  np.testing.assert_allclose(cond, bayes, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(uncond, score)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_gaussian_flow_map_solves_the_probability_flow_ode(name):
  sde = SDES[name]
  g = analytic.GaussianMixture.create([1.0], [MEANS[1]], covs=[COVS[1]])
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 3))
  t0 = jnp.full((4,), 0.3)
  h = 1e-3
  forward = analytic.gaussian_flow_map(g, sde, x, t0, t0 + h)
  backward = analytic.gaussian_flow_map(g, sde, x, t0, t0 - h)
  central = (forward - backward) / (2 * h)  # dx/dt along the map, O(h^2)
  drift = probability_flow.drift(sde, analytic.score_fn(g, sde), x, t0)
  np.testing.assert_allclose(central, drift, rtol=2e-3, atol=2e-3)
  # The map composes: t0 -> 1 -> t0 is the identity.
  there = analytic.gaussian_flow_map(g, sde, x, t0, jnp.ones(4))
  np.testing.assert_allclose(analytic.gaussian_flow_map(g, sde, there, jnp.ones(4), t0), x,
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="single Gaussian"):
    analytic.gaussian_flow_map(mixture(), sde, x, t0, t0)


def test_sampling_and_mode_statistics_recover_the_parameters():
  mix = mixture()
  n = 40_000
  x, labels = mix.sample(jax.random.PRNGKey(3), n)
  st = analytic.mode_statistics(mix, x)
  w = np.asarray(WEIGHTS)
  # 5 standard errors: sqrt(w (1-w) / n) for weights, sigma / sqrt(n_k) for
  # means, sigma / sqrt(2 n_k) for standard deviations of Gaussian data.
  stds = np.sqrt(np.einsum("kdd->kd", np.asarray(COVS)))
  n_k = w[:, None] * n
  np.testing.assert_array_less(np.abs(st.weights - w), 5 * np.sqrt(w * (1 - w) / n))
  np.testing.assert_array_less(np.abs(st.means - np.asarray(MEANS)), 5 * stds / np.sqrt(n_k))
  np.testing.assert_array_less(np.abs(st.stds - stds), 5 * stds / np.sqrt(2 * n_k))
  # Labels agree with the assignment (components are far apart).
  assert np.abs(np.bincount(np.asarray(labels), minlength=3) / n - st.weights).max() < 1e-3


def test_bad_parameters_raise():
  with pytest.raises(ValueError, match="sum to 1"):
    analytic.GaussianMixture.create([0.5, 0.6], [[0.0], [1.0]], stds=[[1.0], [1.0]])
  with pytest.raises(ValueError, match="exactly one"):
    analytic.GaussianMixture.create([1.0], [[0.0]])
  with pytest.raises(ValueError, match="semi-definite"):
    analytic.GaussianMixture.create([1.0], [[0.0, 0.0]], covs=[[[1.0, 2.0], [2.0, 1.0]]])
  with pytest.raises(ValueError, match="symmetric"):
    analytic.GaussianMixture.create([1.0], [[0.0, 0.0]], covs=[[[1.0, 0.5], [0.0, 1.0]]])
