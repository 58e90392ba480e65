"""SDE library against closed forms, Monte Carlo and the discrete chains."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from score_jax import sde as sde_lib

ALL_SDES = {
    "vp": lambda N=1000: sde_lib.VPSDE(0.1, 20.0, N),
    "subvp": lambda N=1000: sde_lib.subVPSDE(0.1, 20.0, N),
    "ve": lambda N=1000: sde_lib.VESDE(0.01, 50.0, N),
    "tutorial": lambda N=1000: sde_lib.TutorialSDE(25.0, N),
}


def closed_form(name, params, t):
  """(mean coef, std, g) in float64 numpy, written from the paper's formulas."""
  t = np.asarray(t, np.float64)
  if name in ("vp", "subvp"):
    b0, b1 = params
    coef = np.exp(-0.25 * t**2 * (b1 - b0) - 0.5 * t * b0)
    beta = b0 + t * (b1 - b0)
    if name == "vp":
      return coef, np.sqrt(1 - coef**2), np.sqrt(beta)
    g2 = beta * (1 - np.exp(-2 * b0 * t - (b1 - b0) * t**2))
    return coef, 1 - coef**2, np.sqrt(g2)
  if name == "ve":
    smin, smax = params
    sigma = smin * (smax / smin) ** t
    return np.ones_like(t), sigma, sigma * np.sqrt(2 * np.log(smax / smin))
  (s,) = params
  return np.ones_like(t), np.sqrt((s ** (2 * t) - 1) / (2 * np.log(s))), s**t


def build(name, params, N=1000):
  cls = {"vp": sde_lib.VPSDE, "subvp": sde_lib.subVPSDE, "ve": sde_lib.VESDE,
         "tutorial": sde_lib.TutorialSDE}[name]
  return cls(*params, N=N)


RANDOM_PARAMS = {
    "vp": [(0.1, 20.0), (0.05, 7.3), (1.2, 13.0)],
    "subvp": [(0.1, 20.0), (0.3, 5.0)],
    "ve": [(0.01, 50.0), (0.002, 378.0), (0.5, 3.0)],
    "tutorial": [(25.0,), (3.7,)],
}
CASES = [(n, p) for n, ps in RANDOM_PARAMS.items() for p in ps]


@pytest.mark.parametrize("name,params", CASES)
def test_marginals_drift_diffusion_match_closed_form(name, params):
  sde = build(name, params)
  rng = np.random.default_rng(0)
  t = rng.uniform(1e-3, 1.0, size=7).astype(np.float32)
  x = rng.normal(size=(7, 3, 2)).astype(np.float32)
  coef, std, g = closed_form(name, params, t)
  mean, std_j = sde.marginal_prob(jnp.asarray(x), jnp.asarray(t))
  assert std_j.shape == (7,)
  np.testing.assert_allclose(std_j, std, rtol=2e-5)
  np.testing.assert_allclose(mean, coef[:, None, None] * x, rtol=2e-5, atol=1e-6)
  drift, diffusion = sde.sde(jnp.asarray(x), jnp.asarray(t))
  assert diffusion.shape == (7,)
  np.testing.assert_allclose(diffusion, g, rtol=2e-5)
  if name in ("vp", "subvp"):
    beta = params[0] + t * (params[1] - params[0])
    np.testing.assert_allclose(drift, -0.5 * beta[:, None, None] * x, rtol=2e-5, atol=1e-6)
  else:
    np.testing.assert_array_equal(drift, 0.0)


@pytest.mark.parametrize("name", ALL_SDES)
def test_derivative_of_variance_is_consistent_with_the_sde(name):
  """For a linear SDE, d var/dt = 2 f_coef var + g^2 and d coef/dt = f_coef coef.

  In float64: the right-hand side cancels catastrophically for VP at large t.
  """
  with jax.enable_x64(True):
    _check_moment_odes(ALL_SDES[name]())


def _check_moment_odes(sde):
  t = jnp.linspace(0.05, 0.95, 9, dtype=jnp.float64)

  def var(tt):
    return sde.marginal_std(tt[None])[0] ** 2

  def coef(tt):
    return sde.mean_coef(tt[None])[0]

  dvar = jax.vmap(jax.grad(var))(t)
  dcoef = jax.vmap(jax.grad(coef))(t)
  ones = jnp.ones((t.shape[0], 1))
  f_coef = sde.sde(ones, t)[0][:, 0]
  g = sde.sde(ones, t)[1]
  np.testing.assert_allclose(dcoef, f_coef * sde.mean_coef(t), rtol=1e-10)
  # (The reference's VE std omits the sigma_min^2 offset of the exact variance,
  # which does not change its derivative.)
  np.testing.assert_allclose(dvar, 2 * f_coef * sde.marginal_std(t) ** 2 + g**2, rtol=1e-10)


@pytest.mark.parametrize("name", ALL_SDES)
def test_prior(name, key):
  sde = ALL_SDES[name]()
  z = jax.random.normal(key, (5, 4, 3)) * 3.0
  expected = stats.norm.logpdf(np.asarray(z, np.float64), scale=float(sde.prior_std()))
  np.testing.assert_allclose(sde.prior_logp(z), expected.reshape(5, -1).sum(-1), rtol=1e-5)
  samples = sde.prior_sampling(key, (20000, 2))
  # The prior is the marginal at T for data at the origin (mean coef e^{-5} for VP).
  std_T = float(sde.marginal_std(jnp.ones((1,)))[0])
  assert abs(float(jnp.std(samples)) / std_T - 1) < 0.02  # SE ~ 1/sqrt(2 * 40000) = 0.35%


def test_vp_discretize_is_the_ddpm_chain():
  N = 50
  sde = sde_lib.VPSDE(0.3, 12.0, N)
  betas = np.linspace(0.3 / N, 12.0 / N, N)
  np.testing.assert_allclose(sde.discrete_betas, betas, rtol=1e-6)
  np.testing.assert_allclose(sde.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)
  i = np.arange(N)
  t = jnp.asarray(i / (N - 1), jnp.float32)
  x = jnp.ones((N, 2))
  f, G = sde.discretize(x, t)
  np.testing.assert_allclose(f[:, 0], np.sqrt(1 - betas) - 1, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(G, np.sqrt(betas), rtol=1e-5)
  np.testing.assert_allclose(sde.corrector_alpha(t), 1 - betas, rtol=1e-6)


def test_ve_discretize_is_the_smld_chain():
  N = 40
  sde = sde_lib.VESDE(0.02, 80.0, N)
  sigmas = np.exp(np.linspace(np.log(0.02), np.log(80.0), N))
  np.testing.assert_allclose(sde.discrete_sigmas, sigmas, rtol=1e-5)
  t = jnp.asarray(np.arange(N) / (N - 1), jnp.float32)
  f, G = sde.discretize(jnp.ones((N, 3)), t)
  np.testing.assert_array_equal(f, 0.0)
  prev = np.concatenate([[0.0], sigmas[:-1]])
  np.testing.assert_allclose(G, np.sqrt(sigmas**2 - prev**2), rtol=1e-4)
  np.testing.assert_allclose(sde.corrector_alpha(t), 1.0)


def test_time_index_on_the_sampler_grid():
  """linspace(T, eps, N) maps onto N-1, ..., 0 like the reference's truncation."""
  for N, eps in [(1000, 1e-3), (1000, 1e-5), (232, 1e-5), (10, 0.05)]:
    sde = sde_lib.VESDE(N=N)
    t = jnp.linspace(1.0, eps, N)
    np.testing.assert_array_equal(sde.time_index(t), np.arange(N - 1, -1, -1))


def _propagate_chain(sde, times):
  """Mean coefficient and variance of x_k after the chain steps at `times`, from x_0 = 1."""
  m, v = 1.0, 0.0
  ones = jnp.ones((len(times), 1))
  f, G = sde.discretize(ones, jnp.asarray(times, jnp.float32))
  ratio = np.asarray(1.0 + f[:, 0], np.float64)
  G = np.asarray(G, np.float64)
  ms, vs = [], []
  for r, g in zip(ratio, G):
    m, v = r * m, r**2 * v + g**2
    ms.append(m)
    vs.append(v)
  return np.array(ms), np.sqrt(np.array(vs))


@pytest.mark.parametrize("name", ["subvp", "tutorial"])
def test_exact_transition_chains_reproduce_the_marginals(name):
  N = 200
  sde = ALL_SDES[name](N)
  times = np.arange(1, N + 1) / N
  m, s = _propagate_chain(sde, times)
  t = jnp.asarray(times, jnp.float32)
  np.testing.assert_allclose(m, sde.mean_coef(t), rtol=1e-4)
  np.testing.assert_allclose(s, sde.marginal_std(t), rtol=2e-3, atol=1e-5)


def test_ddpm_chain_converges_to_the_vp_marginals():
  """Step i of the DDPM chain sits at t = i / (N - 1); the gap in mean and
  variance closes like 1 / N (the std near t = 0 only like 1 / sqrt(N))."""
  errors = []
  for N in (20, 200, 2000):
    sde = ALL_SDES["vp"](N)
    times = np.arange(N) / (N - 1)
    m, s = _propagate_chain(sde, times)
    t = jnp.asarray(times, jnp.float32)
    err_m = np.max(np.abs(m - np.asarray(sde.mean_coef(t))))
    err_v = np.max(np.abs(s**2 - np.asarray(sde.marginal_std(t)) ** 2))
    errors.append(max(err_m, err_v))
  assert errors[0] > 5 * errors[1] > 25 * errors[2]
  assert errors[2] < 2e-3


def test_smld_chain_is_exact_on_its_grid():
  """Sum of G_j^2 telescopes to sigma_i^2, and the sigmas sit on sigma(i / (N - 1))."""
  N = 300
  sde = ALL_SDES["ve"](N)
  times = np.arange(N) / (N - 1)
  m, s = _propagate_chain(sde, times)
  np.testing.assert_array_equal(m, 1.0)
  np.testing.assert_allclose(s, sde.marginal_std(jnp.asarray(times, jnp.float32)), rtol=1e-4)


@pytest.mark.parametrize("name,ts", [("vp", (0.1, 0.3, 1.0)), ("subvp", (0.1, 0.3, 1.0)),
                                     ("ve", (0.5, 0.75, 1.0)), ("tutorial", (0.2, 0.6, 1.0))])
def test_forward_simulation_reproduces_marginal_prob(name, ts, key):
  """Euler-Maruyama on a fine grid from fixed x0 matches marginal_prob.

  n = 20000 paths in 2 dimensions: the mean's standard error is std / sqrt(n)
  (0.7% of std) and the std's relative error 1 / sqrt(2 * 2n) (0.35%); we
  allow 5 standard errors plus 1% for the O(dt) bias of the scheme. VE is
  checked where its reference std, which omits sigma_min^2, is exact to 1e-4.
  """
  sde = ALL_SDES[name]()
  n, steps = 20000, 2000
  x0 = jnp.array([1.5, -0.5])
  dt = 1.0 / steps

  @jax.jit
  def simulate(key):
    def step(x, inp):
      i, k = inp
      t = jnp.full((n,), i * dt)
      drift, g = sde.sde(x, t)
      x = x + drift * dt + sde_lib.batch_mul(g * jnp.sqrt(dt), jax.random.normal(k, x.shape))
      return x, x
    keys = jax.random.split(key, steps)
    _, xs = jax.lax.scan(step, jnp.broadcast_to(x0, (n, 2)), (jnp.arange(steps), keys))
    return xs

  xs = simulate(key)
  for t in ts:
    x_t = np.asarray(xs[int(round(t * steps)) - 1], np.float64)
    mean, std = sde.marginal_prob(x0[None], jnp.array([t]))
    mean, std = np.asarray(mean[0]), float(std[0])
    np.testing.assert_allclose(x_t.mean(0), mean, atol=5 * std / math.sqrt(n) + 0.01 * std)
    assert abs(x_t.std(0).mean() / std - 1) < 5 / math.sqrt(4 * n) + 0.01


@pytest.mark.parametrize("name", ALL_SDES)
@pytest.mark.parametrize("probability_flow", [False, True])
def test_reverse_drifts(name, probability_flow, key):
  sde = ALL_SDES[name]()
  x = jax.random.normal(key, (4, 3, 3, 2))
  t = jnp.array([0.01, 0.2, 0.6, 1.0])

  def score_fn(x, t):
    return -x * 0.7 + sde_lib.batch_mul(t, jnp.ones_like(x))

  rsde = sde.reverse(score_fn, probability_flow)
  s = score_fn(x, t)
  f, g = sde.sde(x, t)
  scale = 0.5 if probability_flow else 1.0
  drift, diffusion = rsde.sde(x, t)
  np.testing.assert_allclose(drift, f - (scale * g**2)[:, None, None, None] * s, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(diffusion, 0.0 if probability_flow else g)
  fd, G = sde.discretize(x, t)
  rev_f, rev_G = rsde.discretize(x, t)
  np.testing.assert_allclose(rev_f, fd - (scale * G**2)[:, None, None, None] * s, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(rev_G, 0.0 if probability_flow else G)


@pytest.mark.parametrize("name", ALL_SDES)
def test_log_snr_inverse(name):
  sde = ALL_SDES[name]()
  t = jnp.linspace(1e-3, 1.0, 50)
  lam = sde.log_snr(t)
  assert np.all(np.diff(np.asarray(lam)) < 0)
  np.testing.assert_allclose(sde.t_from_log_snr(lam), t, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("name,params", [(n, ps[0]) for n, ps in RANDOM_PARAMS.items()])
def test_importance_time_distribution(name, params, key):
  """Samples follow the density g^2/std^2 on [eps, 1]: a KS test against the CDF
  integrated numerically from the closed forms (trapezoid rule on a fine log-t
  grid, since the density has a 1/t singularity at 0 for VP-type SDEs)."""
  sde = build(name, params)
  eps = 1e-5
  u = np.linspace(np.log(eps), 0.0, 200001)
  _, std, g = closed_form(name, params, np.exp(u))
  cdf = integrate.cumulative_trapezoid((g / std) ** 2 * np.exp(u), u, initial=0.0)
  Z = cdf[-1]
  t, w = sde.sample_importance_time(key, (4000,), eps)
  np.testing.assert_allclose(w, Z / (1 - eps), rtol=1e-3)
  ks = stats.kstest(np.asarray(t), lambda q: np.interp(np.log(q), u, cdf / Z))
  assert ks.pvalue > 1e-3


def test_jit_with_sde_argument_does_not_recompile():
  traces = []

  @jax.jit
  def f(sde, x, t):
    traces.append(1)
    return sde.marginal_prob(x, t)[0] + sde.discretize(x, t)[0]

  x, t = jnp.ones((2, 3)), jnp.array([0.2, 0.4])
  f(sde_lib.VPSDE(0.1, 20.0, 100), x, t)
  out = f(sde_lib.VPSDE(0.2, 10.0, 100), x, t)
  assert len(traces) == 1
  np.testing.assert_allclose(out, sde_lib.VPSDE(0.2, 10.0, 100).marginal_prob(x, t)[0]
                             + sde_lib.VPSDE(0.2, 10.0, 100).discretize(x, t)[0], rtol=1e-6)
  f(sde_lib.VPSDE(0.2, 10.0, 200), x, t)  # N is static: a new trace
  assert len(traces) == 2


def test_sdes_are_immutable():
  sde = sde_lib.VPSDE()
  with pytest.raises(Exception, match="immutable"):
    sde.beta_min = 3.0
  assert sde.replace(beta_max=10.0).beta_max == 10.0 and sde.beta_max == 20.0


@pytest.mark.parametrize("ctor,match", [
    (lambda: sde_lib.VPSDE(beta_min=1.0, beta_max=0.5), "beta_max"),
    (lambda: sde_lib.VPSDE(beta_min=-0.1), "beta_min"),
    (lambda: sde_lib.subVPSDE(beta_min=2.0, beta_max=2.0), "beta_max"),
    (lambda: sde_lib.VESDE(sigma_min=0.0), "sigma_min"),
    (lambda: sde_lib.VESDE(sigma_min=1.0, sigma_max=0.5), "sigma_max"),
    (lambda: sde_lib.VPSDE(N=0), "N must be an integer >= 1"),
    (lambda: sde_lib.VESDE(N=2.5), "N must be"),
    (lambda: sde_lib.TutorialSDE(sigma=1.0), "sigma must be"),
    (lambda: sde_lib.VESDE(sigma_max=float("nan")), "sigma_max"),
])
def test_invalid_arguments(ctor, match):
  with pytest.raises(ValueError, match=match):
    ctor()
