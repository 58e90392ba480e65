"""Score-matching losses against closed-form values on Gaussian data.

Data x0 ~ N(mu, s0^2 I) in D dimensions. Under any SDE, x_t is Gaussian with
variance v(t) = alpha^2 s0^2 + std^2, so the exact score is
-(x - alpha mu) / v and the expected per-dimension residual
E|std s + z|^2 / D equals alpha^2 s0^2 / v (the irreducible DSM loss).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from score_jax import losses
from score_jax import sde as sde_lib

MU, S0, D = 0.7, 0.5, 4
SDES = {
    "vp": sde_lib.VPSDE(0.1, 20.0, 1000),
    "subvp": sde_lib.subVPSDE(0.1, 20.0, 1000),
    "ve": sde_lib.VESDE(0.01, 50.0, 1000),
    "tutorial": sde_lib.TutorialSDE(25.0, 1000),
}


def gaussian_score(sde, scale=1.0):
  def score_fn(x, t):
    alpha, std = sde.mean_coef(t), sde.marginal_std(t)
    v = alpha**2 * S0**2 + std**2
    return -scale * (x - sde_lib.batch_mul(alpha, jnp.full_like(x, MU))) / v.reshape(-1, 1)
  return score_fn


def data(key, n):
  return MU + S0 * jax.random.normal(key, (n, D))


def expected_loss(sde, weight_fn, eps=1e-5):
  """E_{t ~ U(eps, 1)}[weight(t) alpha^2 s0^2 / v(t)] by quadrature in float64 (log t)."""
  def integrand(u):
    t = jnp.asarray([math.exp(u)], jnp.float32)
    alpha, std = sde.mean_coef(t), sde.marginal_std(t)
    val = weight_fn(t) * alpha**2 * S0**2 / (alpha**2 * S0**2 + std**2)
    return float(val[0]) * math.exp(u)
  return integrate.quad(integrand, math.log(eps), 0.0, limit=100)[0] / (1 - eps)


def g2_over_std2(sde):
  def w(t):
    g = sde.sde(jnp.zeros((1, 1)), t)[1]
    return g**2 / sde.marginal_std(t) ** 2
  return w


@pytest.mark.parametrize("name", SDES)
def test_dsm_loss_at_the_exact_score_is_the_closed_form_minimum(name, key):
  sde = SDES[name]
  n = 40000
  k1, k2 = jax.random.split(key)
  x = data(k1, n)
  loss_fn = jax.jit(lambda k, scale: losses.dsm_loss(k, sde, gaussian_score(sde, scale), x,
                                                     reduce_mean=True))
  loss, aux = loss_fn(k2, 1.0)
  assert aux.per_example.shape == (n,) and aux.t.shape == (n,)
  se = float(jnp.std(aux.per_example)) / math.sqrt(n)
  expected = expected_loss(sde, lambda t: jnp.ones_like(t))
  assert abs(float(loss) - expected) < 4 * se
  # Any other score does worse: same noise and times, so the difference is
  # the excess E|std (s - s*)|^2 > 0, far above its own sampling noise.
  for scale in (0.8, 1.2):
    worse, aux_w = loss_fn(k2, scale)
    diff = aux_w.per_example - aux.per_example
    assert float(jnp.mean(diff)) > 4 * float(jnp.std(diff)) / math.sqrt(n)


@pytest.mark.parametrize("name", SDES)
def test_likelihood_weighting_and_importance_sampling(name, key):
  """Importance-sampled t keeps the expectation and lowers the variance."""
  sde = SDES[name]
  n = 40000
  k1, k2 = jax.random.split(key)
  x = data(k1, n)
  score_fn = gaussian_score(sde)
  plain = losses.dsm_loss(k2, sde, score_fn, x, reduce_mean=True, likelihood_weighting=True)[1]
  iw = losses.dsm_loss(k2, sde, score_fn, x, reduce_mean=True, likelihood_weighting=True,
                       importance_weighting=True)[1]
  expected = expected_loss(sde, g2_over_std2(sde))
  for aux in (plain, iw):
    se = float(jnp.std(aux.per_example)) / math.sqrt(n)
    assert abs(float(jnp.mean(aux.per_example)) - expected) < 4 * se + 1e-3 * expected
  var_plain, var_iw = float(jnp.var(plain.per_example)), float(jnp.var(iw.per_example))
  if name == "ve":  # g^2 / std^2 is constant: importance sampling is uniform sampling
    assert var_iw < 1.1 * var_plain
  else:
    assert var_iw < 0.5 * var_plain


def test_reduce_sum_is_half_d_times_reduce_mean(key):
  sde = SDES["vp"]
  x = data(key, 16)
  s = gaussian_score(sde, 1.3)
  mean = losses.dsm_loss(key, sde, s, x, reduce_mean=True)[0]
  total = losses.dsm_loss(key, sde, s, x, reduce_mean=False)[0]
  np.testing.assert_allclose(total, 0.5 * D * mean, rtol=1e-6)


def test_fixed_t_matches_closed_form(key):
  sde = SDES["subvp"]
  n = 40000
  x = data(key, n)
  t = jnp.full((n,), 0.3)
  _, aux = losses.dsm_loss(key, sde, gaussian_score(sde), x, reduce_mean=True, t=t)
  alpha, std = sde.mean_coef(t[:1]), sde.marginal_std(t[:1])
  expected = float((alpha**2 * S0**2 / (alpha**2 * S0**2 + std**2))[0])
  assert abs(float(jnp.mean(aux.per_example)) - expected) < 4 * float(jnp.std(aux.per_example)) / math.sqrt(n)
  np.testing.assert_array_equal(aux.t, t)


def _discrete_expected(a, s):
  a, s = np.asarray(a, np.float64), np.asarray(s, np.float64)
  return float(np.mean(a**2 * S0**2 / (a**2 * S0**2 + s**2)))


@pytest.mark.parametrize("kind", ["ddpm", "smld"])
def test_discrete_losses_at_the_exact_score(kind, key):
  N = 100
  n = 40000
  if kind == "ddpm":
    sde = sde_lib.VPSDE(0.1, 20.0, N)
    a, s = sde.sqrt_alphas_cumprod, sde.sqrt_1m_alphas_cumprod
    fn, reduce_mean = losses.ddpm_loss, True
  else:
    sde = sde_lib.VESDE(0.01, 50.0, N)
    s = sde.discrete_sigmas
    a = jnp.ones_like(s)
    fn, reduce_mean = losses.smld_loss, True

  def score_fn(x, t):
    i = jnp.round(t * (N - 1)).astype(jnp.int32)
    v = a[i] ** 2 * S0**2 + s[i] ** 2
    return -(x - sde_lib.batch_mul(a[i], jnp.full_like(x, MU))) / v.reshape(-1, 1)

  k1, k2 = jax.random.split(key)
  loss, aux = fn(k2, sde, score_fn, data(k1, n), reduce_mean=reduce_mean)
  se = float(jnp.std(aux.per_example)) / math.sqrt(n)
  assert abs(float(loss) - _discrete_expected(a, s)) < 4 * se
  idx = np.round(np.asarray(aux.t) * (N - 1))
  np.testing.assert_allclose(idx, np.round(idx), atol=1e-4)  # t sits on the grid
  assert idx.min() == 0 and idx.max() == N - 1


def test_discrete_losses_check_the_sde(key):
  with pytest.raises(TypeError, match="VPSDE"):
    losses.ddpm_loss(key, SDES["ve"], lambda x, t: x, jnp.ones((2, 2)))
  with pytest.raises(TypeError, match="VESDE"):
    losses.smld_loss(key, SDES["vp"], lambda x, t: x, jnp.ones((2, 2)))


@pytest.mark.parametrize("name", ["subvp", "vp"])
def test_smld_loss_refuses_sdes_without_the_smld_chain(key, name):
  with pytest.raises(TypeError, match="SMLD chain"):
    losses.smld_loss(key, SDES[name], lambda x, t: x, jnp.ones((2, 2)))


def test_ddpm_loss_refuses_sub_vp(key):
  """sub-VP shares the VP drift (it subclasses VPSDE) but not the DDPM chain: the loss
  must refuse it instead of silently training on the VP chain's noise levels."""
  sde = sde_lib.subVPSDE()
  assert isinstance(sde, sde_lib.VPSDE) and sde.chain is None
  with pytest.raises(TypeError, match="subVPSDE"):
    losses.ddpm_loss(key, sde, lambda x, t: x, jnp.ones((2, 2)))


def test_bad_arguments(key):
  x = jnp.ones((2, 2))
  with pytest.raises(ValueError, match="eps"):
    losses.dsm_loss(key, SDES["vp"], lambda x, t: x, x, eps=0.0)
  with pytest.raises(ValueError, match="likelihood_weighting"):
    losses.dsm_loss(key, SDES["vp"], lambda x, t: x, x, importance_weighting=True)
  with pytest.raises(ValueError, match="shape"):
    losses.dsm_loss(key, SDES["vp"], lambda x, t: x, x, t=jnp.ones((3,)))


def test_jit_once_and_finite_gradients_at_eps(key):
  """A parameterized score -theta x / std has finite gradients at t = eps,
  where std is smallest, and the jitted loss is traced once."""
  sde = SDES["vp"]
  traces = []

  @jax.jit
  def grad_fn(theta, k, x, t):
    traces.append(1)
    score_fn = lambda y, tt: -theta * y / sde.marginal_std(tt).reshape(-1, 1)
    return jax.grad(lambda th: losses.dsm_loss(
        k, sde, lambda y, tt: -th * y / sde.marginal_std(tt).reshape(-1, 1), x,
        likelihood_weighting=True, t=t)[0])(theta), score_fn(x, t)

  x = data(key, 8)
  t_eps = jnp.full((8,), 1e-5)
  g, s = grad_fn(jnp.float32(0.9), key, x, t_eps)
  assert np.isfinite(float(g)) and np.all(np.isfinite(s))
  grad_fn(jnp.float32(1.1), jax.random.PRNGKey(3), x, t_eps * 2)
  assert len(traces) == 1


def test_implicit_and_sliced_agree_with_denoising_score_matching(key):
  """On Gaussian data at noise std sigma, with the half-sum reduction,
  DSM(s) / sigma^2 = ISM(s) + D / (2 sigma^2) for every s, so both have the same
  minimizer; sliced score matching is an unbiased estimate of ISM."""
  sigma = 0.8
  sde = sde_lib.VESDE(0.01, 50.0)
  t_sigma = float(jnp.log(sigma / 0.01) / jnp.log(50.0 / 0.01))
  v_star = S0**2 + sigma**2
  n = 40000
  kx, kn, kd, ks = jax.random.split(key, 4)
  x0 = data(kx, n)
  x_noisy = x0 + sigma * jax.random.normal(kn, x0.shape)
  vs = v_star * np.array([0.5, 0.8, 1.0, 1.25, 1.6])
  ism, dsm = [], []
  for v in vs:
    s = lambda y, v=v: -(y - MU) / v
    ism_val, ism_per = losses.implicit_score_matching_loss(s, x_noisy)
    # closed form: E[-D / v + |x - mu|^2 / (2 v^2)]
    np.testing.assert_allclose(ism_val, -D / v + D * v_star / (2 * v**2),
                               atol=4 * float(jnp.std(ism_per)) / math.sqrt(n))
    dsm_val, dsm_aux = losses.dsm_loss(kd, sde, lambda y, tt: s(y), x0,
                                       t=jnp.full((n,), t_sigma))
    dsm_scaled = dsm_val / sigma**2
    se = float(jnp.std(dsm_aux.per_example)) / sigma**2 / math.sqrt(n) + float(
        jnp.std(ism_per)) / math.sqrt(n)
    assert abs(float(dsm_scaled) - float(ism_val) - D / (2 * sigma**2)) < 4 * se
    for proj in ("gaussian", "rademacher"):
      ssm_val, ssm_per = losses.sliced_score_matching_loss(ks, s, x_noisy, n_projections=2,
                                                           projection=proj)
      diff = ssm_per - ism_per  # paired: same samples, only the projections differ
      assert abs(float(jnp.mean(diff))) < 4 * float(jnp.std(diff)) / math.sqrt(n) + 1e-6
    ism.append(float(ism_val))
    dsm.append(float(dsm_scaled))
  assert int(np.argmin(ism)) == 2 and int(np.argmin(dsm)) == 2  # the exact score wins


def test_score_matching_handles_image_shaped_inputs(key):
  """Exact trace of the Jacobian of s(x) = A x equals tr(A) for [B, H, W, C] inputs."""
  x = jax.random.normal(key, (3, 2, 2, 1))
  A = jax.random.normal(jax.random.PRNGKey(1), (4, 4))
  s = lambda y: (y.reshape(3, 4) @ A.T).reshape(y.shape)
  val, per = losses.implicit_score_matching_loss(s, x)
  expected = jnp.trace(A) + 0.5 * jnp.sum((x.reshape(3, 4) @ A.T) ** 2, axis=-1)
  np.testing.assert_allclose(per, expected, rtol=1e-5)
  with pytest.raises(ValueError, match="projection"):
    losses.sliced_score_matching_loss(key, s, x, projection="uniform")
