"""Likelihoods against closed-form Gaussian-mixture log-densities.

What log_likelihood computes exactly: log p_eps(x) + [prior_logp(z) -
log p_T(z)], the closed-form log-density at eps plus the (closed-form)
mismatch between the prior and the true marginal at T at the ODE's end
point z. The mismatch is a property of the SDE (up to 0.06 nats here for VE),
not of the solver, so the tests compare against the sum. All in float32.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import analytic, likelihood
from score_jax import sde as sde_lib

SDES = {
    "vp": sde_lib.VPSDE(0.1, 20.0, 1000),
    "subvp": sde_lib.subVPSDE(0.1, 20.0, 1000),
    "ve": sde_lib.VESDE(0.01, 50.0, 1000),
}
EPS = 1e-5
Z = 4.5  # standard errors allowed for Monte Carlo checks


def expected_logp(mix, sde, x, z):
  batch = x.shape[0]
  return (analytic.log_prob(mix, sde, x, jnp.full((batch,), EPS)) + sde.prior_logp(z) -
          analytic.log_prob(mix, sde, z, jnp.full((batch,), sde.T)))


@pytest.mark.parametrize("name", sorted(SDES))
def test_exact_trace_matches_closed_form(name):
  sde, mix = SDES[name], analytic.example_mixture_2d()
  x, _ = mix.sample(jax.random.PRNGKey(5), 64)
  logp, z, nfe = likelihood.log_likelihood(None, sde, analytic.score_fn(mix, sde), x, "exact")
  err = np.abs(np.asarray(logp - expected_logp(mix, sde, x, z)))
  # The bar is 0.02 nats; float32 with rtol = atol = 1e-5 (the RK45 solve) gives a
  # largest error below 5e-3 and a mean near 1e-4.
  assert err.max() < 0.02 and err.mean() < 2e-3, err
  assert 20 < int(nfe) < 1000
  assert z.shape == x.shape


def test_hutchinson_estimators_are_unbiased():
  sde, mix = SDES["vp"], analytic.example_mixture_2d()
  points, repeats = 8, 128
  x0, _ = mix.sample(jax.random.PRNGKey(6), points)
  x = jnp.repeat(x0, repeats, axis=0)  # [points * repeats, 2], one probe each
  score_fn = analytic.score_fn(mix, sde)
  stds = {}
  for kind in ("rademacher", "gaussian"):
    logp, z, _ = likelihood.log_likelihood(jax.random.PRNGKey(7), sde, score_fn, x, kind)
    diff = np.asarray(logp - expected_logp(mix, sde, x, z)).reshape(points, repeats)
    se = diff.std(axis=1, ddof=1) / math.sqrt(repeats)
    assert np.all(se > 0), kind  # a real estimator: probes vary
    assert np.all(np.abs(diff.mean(axis=1)) < Z * se), (kind, diff.mean(axis=1), se)
    pooled_se = diff.std(ddof=1) / math.sqrt(diff.size)
    assert abs(diff.mean()) < Z * pooled_se, kind
    stds[kind] = diff.std()
  # Rademacher probes minimise the estimator's variance (Hutchinson 1990).
  assert stds["rademacher"] < stds["gaussian"]


# A Gaussian model of 2x2 gray images: N(M01, S01^2) per pixel on [0, 1] data.
M01, S01 = 0.4, 0.15
SHAPE = (256, 2, 2, 1)
D = 4


def gaussian_model(centered):
  """The same image distribution expressed in the model space of the scaler."""
  scaler = likelihood.data_scaler(centered)
  return analytic.GaussianMixture.create([1.0], [[scaler(M01)] * D],
                                         stds=[[abs(scaler.scale) * S01] * D])


def prior_mismatch(model, sde, z):
  """prior_logp(z) - log p_T(z) [B]: the part of logp owed to the prior."""
  return sde.prior_logp(z) - analytic.log_prob(model, sde, z, jnp.full((z.shape[0],), sde.T))


def test_bits_per_dim_of_a_gaussian_matches_closed_form_and_scaler_offset():
  sde = SDES["vp"]
  x01 = jnp.clip(M01 + S01 * jax.random.normal(jax.random.PRNGKey(8), SHAPE), 1e-3, 1 - 1e-3)
  true_bpd = {}
  for centered in (False, True):
    model = gaussian_model(centered)
    bpd, z, _ = likelihood.bits_per_dim(jax.random.PRNGKey(9), sde,
                                        analytic.score_fn(model, sde), x01, centered, "exact")
    scaler = likelihood.data_scaler(centered)
    # bits/dim = -(log p(y) / D + log scale - log 256) / ln 2, y = scaler(x01).
    logp = expected_logp(model, sde, scaler(x01), z)
    expected = -(logp / D + math.log(scaler.scale) - math.log(256.0)) / math.log(2.0)
    np.testing.assert_allclose(bpd, expected, atol=1e-3)
    true_bpd[centered] = np.asarray(bpd + prior_mismatch(model, sde, z) / (D * math.log(2.0)))
  # One distribution of images in two model spaces: with the scaler's
  # Jacobian the bits/dim agree once the prior mismatch (which differs between
  # the spaces) is removed; a hard-coded offset of 8 for centered data would
  # be 1 bit off. The eps-perturbation is not rescaled, hence the 1e-3.
  np.testing.assert_allclose(true_bpd[False], true_bpd[True], atol=1e-3)


def test_bits_per_dim_dequantizes_uint8_images():
  sde = SDES["vp"]
  x01 = M01 + S01 * jax.random.normal(jax.random.PRNGKey(10), SHAPE)
  images = jnp.clip(jnp.floor(256 * x01), 0, 255).astype(jnp.uint8)
  model = gaussian_model(centered=True)
  bpd, z, _ = likelihood.bits_per_dim(jax.random.PRNGKey(11), sde, analytic.score_fn(model, sde),
                                      images, True, "exact")
  # E_u[-log N(y; m, v)] for y = 2 (k + u) / 256 - 1, u ~ U[0, 1): the
  # square's mean is (E y - m)^2 + Var y with Var y = (2 / 256)^2 / 12.
  batch = SHAPE[0]
  t = jnp.full((batch,), EPS)
  alpha, std = sde.mean_coef(t)[:, None], sde.marginal_std(t)[:, None]
  mean, var = alpha * (2 * M01 - 1), alpha**2 * (2 * S01)**2 + std**2
  ey = (2 * (images.reshape(batch, D).astype(jnp.float32) + 0.5) / 256 - 1)
  nll = jnp.sum(0.5 * jnp.log(2 * math.pi * var) + ((ey - mean)**2 + (2 / 256)**2 / 12) /
                (2 * var), axis=1)
  mismatch = prior_mismatch(model, sde, z)
  expected = (nll - mismatch) / (D * math.log(2)) - math.log2(2.0) + 8.0
  diff = np.asarray(bpd - expected)
  assert abs(diff.mean()) < Z * diff.std(ddof=1) / math.sqrt(batch), diff.mean()
  assert np.all(np.isfinite(diff)) and diff.std() > 0  # dequantization noise is real


def test_bits_per_dim_rejects_quantized_or_out_of_range_floats():
  sde = SDES["vp"]
  model = gaussian_model(centered=False)
  score_fn = analytic.score_fn(model, sde)
  key = jax.random.PRNGKey(0)
  k = jax.random.randint(key, SHAPE, 0, 256)
  for grid in (255.0, 256.0):
    with pytest.raises(ValueError, match=f"grid k/{int(grid)}"):
      likelihood.bits_per_dim(key, sde, score_fn, k.astype(jnp.float32) / grid, False)
  with pytest.raises(ValueError, match=r"dequantized data in \[0, 1\]"):
    likelihood.bits_per_dim(key, sde, score_fn, k.astype(jnp.float32), False)
  with pytest.raises(ValueError, match=r"\[0, 255\]"):
    likelihood.bits_per_dim(key, sde, score_fn, k.astype(jnp.int32) + 1, False)


def test_likelihood_argument_checks():
  sde, mix = SDES["vp"], analytic.example_mixture_2d()
  score_fn = analytic.score_fn(mix, sde)
  x = jnp.zeros((2, 2))
  with pytest.raises(ValueError, match="valid: exact, gaussian, rademacher"):
    likelihood.log_likelihood(None, sde, score_fn, x, "skilling")
  with pytest.raises(ValueError, match=r"eps must lie in \(0, T\)"):
    likelihood.log_likelihood(None, sde, score_fn, x, eps=0.0)
  with pytest.raises(ValueError, match="rtol"):
    likelihood.log_likelihood(None, sde, score_fn, x, rtol=-1.0)


@pytest.mark.slow
def test_likelihood_solve_costs_no_more_than_scipy_rk45_at_no_larger_error():
  """log_likelihood's solve against scipy's RK45 (the reference's solver) on the same ODE
  for (x, log-density), flattened over the batch as the reference does: rtol = atol =
  1e-3, the exact trace, VP; error of log p against scipy's DOP853 at 1e-8.

  The default solve is RK45's algorithm, so it takes the same steps: at most one
  step (6 NFE) more, and an error within 10% (float32 field, float64 scipy state:
  rounding can flip a step-size decision). The scipy field's divergence is the
  trace of jax.jacfwd per example, independent of the solver's JVP basis trick.
  """
  from jax.flatten_util import ravel_pytree
  from scipy import integrate

  from score_jax.samplers import probability_flow
  sde, mix = SDES["vp"], analytic.example_mixture_2d()
  score_fn = analytic.score_fn(mix, sde)
  n = 128
  x, _ = mix.sample(jax.random.PRNGKey(8), n)
  state0 = (x, jnp.zeros((n,), x.dtype))
  flat0, unravel = ravel_pytree(state0)

  def drift_one(v, t):
    return probability_flow.drift(sde, score_fn, v[None], jnp.full((1,), t))[0]

  @jax.jit
  def fun(t, flat):
    y, _ = unravel(flat)
    jac = jax.vmap(jax.jacfwd(drift_one), in_axes=(0, None))(y, t)
    return ravel_pytree((jax.vmap(drift_one, in_axes=(0, None))(y, t),
                         jnp.trace(jac, axis1=1, axis2=2)))[0]

  def scipy_logp(method, tol):
    sol = integrate.solve_ivp(lambda t, y: np.asarray(fun(t, jnp.asarray(y, x.dtype))),
                              (EPS, sde.T), np.asarray(flat0), method=method, rtol=tol, atol=tol)
    assert sol.success
    z, delta = unravel(jnp.asarray(sol.y[:, -1], x.dtype))
    return np.asarray(sde.prior_logp(z) + delta, np.float64), sol.nfev

  ref, _ = scipy_logp("DOP853", 1e-8)
  rk45, rk45_nfe = scipy_logp("RK45", 1e-3)
  logp, _, nfe = likelihood.log_likelihood(None, sde, score_fn, x, "exact", rtol=1e-3, atol=1e-3,
                                           eps=EPS)
  err = lambda v: float(np.mean(np.abs(np.asarray(v, np.float64) - ref)))
  assert int(nfe) <= rk45_nfe + 6, (int(nfe), rk45_nfe)
  assert err(logp) <= 1.1 * err(rk45), (err(logp), err(rk45))
