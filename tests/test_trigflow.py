"""TrigFlow against closed forms: its SDE, samplers and the likelihood on the exact mixture
score, the 'trigflow' parameterization and loss, and teachers mapped onto TrigFlow time."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from score_jax import analytic, losses, models
from score_jax import samplers as sampling
from score_jax import sde as sde_lib
from score_jax.samplers import fast as fast_samplers
from score_jax.run import plan as plan_lib
from score_jax.run.settings import from_config as S
from helpers import (ODE_BIAS, Bias, LinearNet, assert_exact_likelihood, assert_reproduces,
                     config, toy_mode_weights)

SD = 2.0  # sigma_d of the tests: about the scale of analytic.example_mixture_2d
EPS = 1e-3  # sampling eps: std(eps) = SD sin(eps)


def trig(N=300):
  return sde_lib.TrigFlow(sigma_data=SD, N=N)


# --- the SDE ---


def test_marginals_schedule_and_forward_sde_match_closed_form():
  sde = trig()
  t = jnp.asarray(np.random.default_rng(0).uniform(1e-3, sde.T, 9), jnp.float32)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(9, 3)), jnp.float32)
  mean, std = sde.marginal_prob(x, t)  # x_0 fixed: mean cos(t) x_0, std sin(t) sigma_d
  np.testing.assert_allclose(mean, np.cos(t)[:, None] * x, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(std, SD * np.sin(t), rtol=1e-6)
  drift, g = sde.sde(x, t)
  np.testing.assert_allclose(drift, -np.tan(t)[:, None] * x, rtol=1e-5)
  np.testing.assert_allclose(g, SD * np.sqrt(2 * np.tan(t)), rtol=1e-5)
  np.testing.assert_allclose(sde.log_snr(t), -np.log(SD * np.tan(t)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sde.t_from_log_snr(sde.log_snr(t)), t, rtol=1e-5)
  np.testing.assert_allclose(sde.t_from_log_snr(jnp.array([-200.0, 200.0])), [math.pi / 2, 0],
                             atol=1e-7)
  d_alpha, d_std = sde.coef_derivatives(t)
  np.testing.assert_allclose(d_alpha, -np.sin(t), rtol=1e-6)
  np.testing.assert_allclose(d_std, SD * np.cos(t), rtol=1e-5, atol=1e-6)
  # The forward SDE has these marginals: d alpha/dt = f alpha, d std^2/dt = 2 f std^2 + g^2.
  with jax.enable_x64(True):
    tt = jnp.linspace(0.05, 1.5, 9, dtype=jnp.float64)
    f, g = sde.sde(jnp.ones((9, 1), jnp.float64), tt)
    dcoef = jax.vmap(jax.grad(lambda s: sde.mean_coef(s)))(tt)
    dvar = jax.vmap(jax.grad(lambda s: sde.marginal_std(s) ** 2))(tt)
    np.testing.assert_allclose(dcoef, f[:, 0] * sde.mean_coef(tt), rtol=1e-12)
    np.testing.assert_allclose(dvar, 2 * f[:, 0] * sde.marginal_std(tt) ** 2 + g**2, rtol=1e-12)
  assert sde.chain is None and sde.T == math.pi / 2 - 1e-3
  np.testing.assert_allclose(float(sde.prior_std()), SD * math.sin(sde.T), rtol=1e-6)


def test_ends_and_parameters_are_checked_and_sigma_data_is_a_leaf():
  with pytest.raises(ValueError, match="T must lie in \\(0, pi/2\\).*singular"):
    sde_lib.TrigFlow(T=math.pi / 2)
  with pytest.raises(ValueError, match="sigma_data must be a finite number > 0"):
    sde_lib.TrigFlow(sigma_data=0.0)
  with pytest.raises(ValueError, match="logit_normal.*Use 'lognormal_sigma'"):
    losses.sample_time(jax.random.PRNGKey(0), trig(), (4,), 1e-5, "logit_normal")
  traces = []

  @jax.jit
  def f(s, t):
    traces.append(1)
    return s.marginal_std(t)

  np.testing.assert_allclose(f(trig(), jnp.full((2,), 0.5)), SD * math.sin(0.5), rtol=1e-6)
  np.testing.assert_allclose(f(sde_lib.TrigFlow(0.5, N=300), jnp.full((2,), 0.5)),
                             0.5 * math.sin(0.5), rtol=1e-6)
  assert len(traces) == 1 and jax.tree_util.tree_leaves(trig()) == [SD]


def test_importance_time_distribution(key):
  """Density g^2 / std^2 = 2 / (sin t cos t) on [eps, T]: CDF (log tan t - log tan eps) / Z."""
  sde, eps = trig(), 1e-5
  z = math.log(math.tan(sde.T)) - math.log(math.tan(eps))
  cdf = lambda q: (np.log(np.tan(q)) - math.log(math.tan(eps))) / z
  t, w = sde.sample_importance_time(key, (4000,), eps)
  np.testing.assert_allclose(w, 2 * z / (sde.T - eps), rtol=1e-4)
  assert stats.kstest(np.asarray(t, np.float64), cdf).pvalue > 1e-3


def test_lognormal_sigma_times_follow_the_papers_proposal(key):
  """ln(sigma_d tan t) ~ N(P_mean, P_std^2): the sCM paper's time distribution is EDM's."""
  sde = trig()
  t = losses.sample_time(key, sde, (4000,), 1e-5, losses.TimeDistribution(
      "lognormal_sigma", -1.0, 1.4))
  u = np.log(SD * np.tan(np.asarray(t, np.float64)))
  assert stats.kstest(u, stats.norm(-1.0, 1.4).cdf).pvalue > 1e-3


# --- samplers and the likelihood on the exact mixture score ---

CASES = {
    "ode": (lambda k, s, f, sh: sampling.ode_sample(k, s, f, sh, eps=EPS), ODE_BIAS),
    "heun_100": (lambda k, s, f, sh: fast_samplers.heun_sample(
        k, s, f, sh, 50, schedule="edm", eps=EPS), Bias(0.01, 0.02, 0.05)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_samplers_transport_the_prior_to_the_mixture(case):
  run, bias = CASES[case]
  sde, mix = trig(), analytic.example_mixture_2d()
  x, _ = run(jax.random.PRNGKey(1), sde, analytic.score_fn(mix, sde), (4000, 2))
  assert_reproduces(mix, sde, x, bias)


def test_exact_likelihood_matches_closed_form():
  """Within 0.02 nats of the closed form (RectifiedFlow's allowance)."""
  assert_exact_likelihood(trig(), analytic.example_mixture_2d())


# --- the 'trigflow' parameterization and its loss ---


def _velocity(mix, sde, x, t):
  """E[cos(t) z - sin(t) x_0 | x_t] of the mixture from its exact score, [B, D]."""
  s = analytic.score(mix, sde, x, t)
  std = sde.marginal_std(t)[:, None]
  x0 = (x + std**2 * s) / jnp.cos(t)[:, None]
  z = -std * s * SD  # z ~ N(0, sigma_d^2): z = sigma_d e, e = -std s
  return jnp.cos(t)[:, None] * z - jnp.sin(t)[:, None] * x0


class OracleF:
  """A 'network' F(x / sigma_d, label) with sigma_d F the mixture's exact velocity; it
  reads t back from the label and checks that its input was scaled by 1 / sigma_d."""

  scale_by_sigma = False
  embedding_type = "positional"

  def __init__(self, mix, sde):
    self.mix, self.sde = mix, sde

  def apply(self, variables, x, labels, y=None, *, train=False, rngs=None):
    t = labels * (math.pi / 2) / 999.0
    return _velocity(self.mix, self.sde, x * SD, t) / SD


def _noisy(sde, mix, n=256, seed=3):
  t = jnp.asarray(np.random.default_rng(seed).uniform(0.02, 1.5, n), jnp.float32)
  x0, _ = mix.sample(jax.random.PRNGKey(seed), n)
  mean, std = sde.marginal_prob(x0, t)
  return x0, t, mean + std[:, None] * jax.random.normal(jax.random.PRNGKey(seed + 1), x0.shape)


def test_trigflow_score_of_the_ideal_velocity_is_the_exact_score():
  sde, mix = trig(), analytic.example_mixture_2d()
  score_fn = models.get_score_fn(sde, OracleF(mix, sde), {}, continuous=True,
                                 parameterization="trigflow")
  _, t, x = _noisy(sde, mix)
  exact = analytic.score(mix, sde, x, t)
  scale = np.linalg.norm(np.asarray(exact), axis=-1, keepdims=True) + 1.0 / np.asarray(
      sde.marginal_std(t))[:, None]
  np.testing.assert_array_less(np.abs(np.asarray(score_fn(x, t) - exact)) / scale, 2e-4)
  # The probability-flow ODE's drift is the velocity the network predicts.
  drift = sde.reverse(score_fn, probability_flow=True).sde(x, t)[0]
  np.testing.assert_allclose(drift, _velocity(mix, sde, x, t), rtol=2e-3, atol=2e-3)


def test_trigflow_parameterization_errors():
  model = OracleF(analytic.example_mixture_2d(), trig())
  with pytest.raises(ValueError, match="TrigFlow's.*not VPSDE's.*'velocity'"):
    models.get_score_fn(sde_lib.VPSDE(), model, {}, continuous=True, parameterization="trigflow")
  with pytest.raises(ValueError, match="continuous-time"):
    models.get_score_fn(trig(), model, {}, continuous=False, parameterization="trigflow")


def test_velocity_weighting_is_the_papers_diffusion_loss():
  """weighting='velocity' on the DSM residual of the 'trigflow' score is the sCM paper's
  |sigma_d F(x_t / sigma_d, t) - (cos(t) z - sin(t) x_0)|^2 of the network's own output,
  and sigma_d^2 times EDM's weighting (TrigFlow diffusion is EDM in other variables)."""
  sde, net = trig(), LinearNet()
  variables = {"w": jnp.array([[0.3, -0.7], [1.1, 0.2]]), "c": jnp.array([0.5, -1.0])}
  score_fn = models.get_score_fn(sde, net, variables, continuous=True,
                                 parameterization="trigflow")
  x0, _ = analytic.example_mixture_2d().sample(jax.random.PRNGKey(0), 512)
  rng = jax.random.PRNGKey(1)
  _, aux = losses.dsm_loss(rng, sde, score_fn, x0, weighting="velocity",
                           time_distribution="lognormal_sigma")
  t = aux.t
  e = jax.random.normal(jax.random.split(rng)[1], x0.shape)  # dsm_loss's own noise
  z = SD * e
  x_t = jnp.cos(t)[:, None] * x0 + jnp.sin(t)[:, None] * z
  f_out = net.apply(variables, x_t / SD, t * 999.0 / (math.pi / 2))
  v = jnp.cos(t)[:, None] * z - jnp.sin(t)[:, None] * x0
  want = 0.5 * jnp.sum((SD * f_out - v) ** 2, -1)
  np.testing.assert_allclose(aux.per_example, want, rtol=2e-3, atol=1e-4)
  np.testing.assert_allclose(losses.loss_weight(sde, t, "velocity"),
                             SD**2 * losses.loss_weight(sde, t, "edm", sigma_data=SD), rtol=1e-5)


# --- teachers in TrigFlow variables ---

TEACHERS = {"vp": sde_lib.VPSDE(), "ve": sde_lib.VESDE(), "rf": sde_lib.RectifiedFlow(),
            "edm": sde_lib.VESDE(0.002, 80.0)}


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_teacher_mapped_to_trigflow_time_is_trigflows_own_score(name):
  """The change of variables x_trig = x_s / r(s), tan t = std / (alpha sigma_d) carries the
  teacher's exact mixture score onto TrigFlow's closed-form score of the same data, and its
  velocity onto the PF-ODE drift of that score."""
  teacher, sde, mix = TEACHERS[name], trig(), analytic.example_mixture_2d()
  s = jnp.linspace(0.05, 0.95, 7)
  t, r = sde_lib.trigflow_time(teacher, s, SD)
  alpha, std = teacher.mean_coef(s), teacher.marginal_std(s)
  np.testing.assert_allclose(jnp.cos(t), alpha / r, rtol=1e-5)  # x_s / r = cos(t) x_0 + ...
  np.testing.assert_allclose(SD * jnp.sin(t), std / r, rtol=1e-5)  # ... sin(t) sigma_d e
  s_back, r_back = sde_lib.teacher_time(teacher, sde, t)
  np.testing.assert_allclose(s_back, s, rtol=2e-4)
  np.testing.assert_allclose(r_back, r, rtol=2e-4)

  lo, hi = float(sde_lib.trigflow_time(teacher, jnp.array([1e-2]), SD)[0][0]), float(
      sde_lib.trigflow_time(teacher, jnp.array([teacher.T]), SD)[0][0])
  t = jnp.asarray(np.random.default_rng(0).uniform(lo, hi, 256), jnp.float32)
  x0, _ = mix.sample(jax.random.PRNGKey(3), 256)
  mean, std = sde.marginal_prob(x0, t)
  x = mean + std[:, None] * jax.random.normal(jax.random.PRNGKey(4), x0.shape)
  mapped = sde_lib.trigflow_score_fn(teacher, analytic.score_fn(mix, teacher), sde)
  exact = analytic.score(mix, sde, x, t)
  scale = np.linalg.norm(np.asarray(exact), axis=-1, keepdims=True) + 1.0 / np.asarray(std)[:, None]
  np.testing.assert_array_less(np.abs(np.asarray(mapped(x, t) - exact)) / scale, 1e-3)
  velocity = sde_lib.trigflow_velocity_fn(teacher, analytic.score_fn(mix, teacher), sde)(x, t)
  want = _velocity(mix, sde, x, t)
  np.testing.assert_array_less(np.abs(np.asarray(velocity - want)) / (
      np.linalg.norm(np.asarray(want), axis=-1, keepdims=True) + 1.0), 2e-3)


# --- settings and configs ---


@pytest.mark.parametrize("changes,match", [
    ({"model.parameterization": "trigflow"}, "set training.sde = 'trigflow'"),
    ({"training.sde": "trigflow", "training.continuous": False}, "continuous = True"),
    ({"training.sde": "trigflow", "training.time_distribution": "logit_normal"},
     "'lognormal_sigma'"),
])
def test_settings_check_the_trigflow_keys(changes, match):
  with pytest.raises(ValueError, match=match):
    plan_lib.make_plan(S(config("toy", **changes)))


def test_toy_trigflow_builds_trigflow_and_traces_a_train_step():
  """configs/toy_trigflow.py builds TrigFlow with its sigma_d and the 'trigflow' network, and
  its train step traces with the state's shapes (jax.eval_shape: no compile; the slow test
  below trains it)."""
  from score_jax.run import state as run_state, train
  setup = plan_lib.make_plan(S(config("toy_trigflow", **{"training.batch_size": 8})))
  assert isinstance(setup.sde, sde_lib.TrigFlow) and setup.sde.sigma_data == 2.86
  assert setup.score.parameterization == "trigflow"
  state = run_state.abstract_state(setup)
  x = jax.ShapeDtypeStruct((8, 2), jnp.float32)
  y = jax.ShapeDtypeStruct((8,), jnp.int32)
  new_state, metrics = jax.eval_shape(train.make_train_step(setup), state, x, y,
                                      jax.random.PRNGKey(0))
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert metrics["loss"].shape == ()


@pytest.mark.slow  # 400 training steps: 1-1.5 min on 2 CPU cores
def test_toy_trigflow_learns_the_mode_weights(tmp_path):
  """configs/toy_trigflow.py (TrigFlow velocity network and loss, Heun 18 steps), 400 steps:
  the 2:1 mode weights within 0.035 as the EDM and rectified-flow toys. Measured on one
  device: 0.014 at 400 steps (30 s)."""
  from configs import toy_trigflow
  weights, want, _ = toy_mode_weights(toy_trigflow.get_config(), 400, tmp_path)
  np.testing.assert_allclose(weights, want, atol=0.035)
