"""Continuous-time consistency models (score_jax.scm) against closed forms.

Gaussian data x_0 ~ N(0, S^2 I) on TrigFlow (x_t = cos t x_0 + sin t z, z ~ N(0, SD^2 I)):
x_t ~ N(0, m(t)^2 I), m^2 = cos^2 t S^2 + sin^2 t SD^2, the probability-flow velocity is
dx_t/dt = E[cos t z - sin t x_0 | x_t] = (d log m / dt) x_t, so x_t / m(t) is constant along
trajectories and the exact consistency function is f(x_t, t) = S x_t / m(t). With
f = cos t x_t - sin t SD F(x_t / SD, t) the exact network is

    F*(u, t) = u (cos t - S / m(t)) / sin t        (u = x_t / SD).

At F*, df/dt = 0 along the ODE, so the sCM tangent g = cos t df/dt vanishes (r = 1): the
target F^- + g is F^- and the loss gradient is zero (exactly with the marginal velocity,
sCD; in expectation over x_0 given x_t with the conditional one, sCT, g being affine in it).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import scm
from score_jax import sde as sde_lib
from score_jax.errors import ConfigError
from score_jax.models.score import TRIGFLOW_LABEL_SCALE

import helpers

S, SD, D = 0.7, 0.5, 3


def _col(a, like):
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def _m(t):
  return jnp.sqrt(jnp.cos(t)**2 * S**2 + jnp.sin(t)**2 * SD**2)


def F_star(u, t, a=1.0):
  """a times the exact network (a = 1: the consistency function of the Gaussian data)."""
  return a * u * _col((jnp.cos(t) - S / _m(t)) / jnp.sin(t), u)


def v_marginal(x, t):
  """The exact probability-flow velocity (d log m / dt) x."""
  return x * _col(jnp.cos(t) * jnp.sin(t) * (SD**2 - S**2) / _m(t)**2, x)


def _times(n, seed=0):
  return scm.sample_times(jax.random.PRNGKey(seed), n, p_mean=-1.0, p_std=1.4, sigma_data=SD)


# --- the math layer ---


def _toy_net(kind):
  """A float64 network F(u, t) with the two kinds of time embedding of the TrigFlow label
  (models.score: t * 999 / (pi / 2)): positional (of the label) or Fourier (of its log), as
  the networks embed them (their own JVPs: tests/test_jvp.py)."""
  rng = np.random.default_rng(0)
  w1, w2 = rng.normal(size=(D, 16)) / 2, rng.normal(size=(16, 16)) / 4
  w3, freqs = rng.normal(size=(16, D)) / 4, rng.normal(size=(8,)) * 4.0

  def F(u, t):
    label = t * TRIGFLOW_LABEL_SCALE
    if kind == "positional":  # sinusoids of the label, frequencies 10000^(-k / 7)
      proj = label[:, None] * jnp.exp(-math.log(10_000) * jnp.arange(8) / 7)[None]
    else:  # of the log label, Gaussian frequencies (scale 4)
      proj = jnp.log(label)[:, None] * freqs[None] * 2 * np.pi
    emb = jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)
    return jnp.tanh(u @ w1 + emb @ w2) @ w3

  return F


@pytest.mark.parametrize("kind", ["positional", "fourier"])
def test_tangent_from_one_jvp_equals_a_central_difference(kind):
  """g from scm.tangent's jvp against g from a float64 central difference of F along
  (dx/dt, 1): h = 1e-6 gives truncation ~ h^2 F''' and round-off ~ 1e-16 |F| / h, both
  below 1e-7 relative at these slopes (label frequencies up to ~600 per unit t)."""
  with jax.enable_x64(True):
    F = _toy_net(kind)
    key = jax.random.split(jax.random.PRNGKey(1), 2)
    x = jax.random.normal(key[0], (6, D), jnp.float64)
    v = jax.random.normal(key[1], (6, D), jnp.float64)
    t = jnp.linspace(0.05, 1.5, 6, dtype=jnp.float64)
    r = 0.7
    F_out, g = jax.jit(lambda *a: scm.tangent(F, *a, SD, r))(x, t, v)
    h = 1e-6
    dF = (F((x + h * v) / SD, t + h) - F((x - h * v) / SD, t - h)) / (2 * h)
    cos, sin = _col(jnp.cos(t), x), _col(jnp.sin(t), x)
    want = -cos**2 * (SD * F_out - v) - r * (cos * sin * x + SD * cos * sin * dF)
    np.testing.assert_allclose(np.asarray(F_out), np.asarray(F(x / SD, t)), rtol=1e-12)
    scale = np.abs(np.asarray(want)).max()
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), atol=1e-7 * scale)
    # The time part matters: without d_t F the tangent differs (the jvp reaches the label).
    dF_x = (F((x + h * v) / SD, t) - F((x - h * v) / SD, t)) / (2 * h)
    assert np.abs(np.asarray(SD * cos * sin * (dF - dF_x))).max() > 1e-2 * scale


def test_exact_consistency_function_has_zero_tangent_with_the_marginal_velocity():
  """sCD with the exact velocity: g = cos t df/dt = 0 at F* (r = 1); not at r = 1/2 or at a
  wrong network. Float32: g is a difference of O(1) terms, so |g| < 1e-5 of them."""
  t = _times(256)
  x = _m(t)[:, None] * jax.random.normal(jax.random.PRNGKey(2), (256, D))
  v = v_marginal(x, t)
  scale = np.abs(np.asarray(v)).max() + np.abs(np.asarray(x)).max()
  tangent = jax.jit(lambda a, r: scm.tangent(lambda u, tt: F_star(u, tt, a), x, t, v, SD, r)[1])
  g = tangent(1.0, 1.0)
  assert np.abs(np.asarray(g)).max() < 1e-5 * scale
  g_half, g_wrong = tangent(1.0, 0.5), tangent(1.2, 1.0)
  assert np.abs(np.asarray(g_half)).max() > 1e-2 * scale
  assert np.abs(np.asarray(g_wrong)).max() > 1e-2 * scale


@jax.jit
def _grad_a(x0, z, t, a, v=None, c=0.1):
  return jax.grad(lambda aa: jnp.mean(scm.loss(lambda u, tt: F_star(u, tt, aa), x0, z, t,
                                               sigma_data=SD, v=v, r=1.0, c=c).loss))(a)


def test_scd_loss_gradient_vanishes_at_the_exact_consistency_function():
  """With the marginal velocity the target is F^- exactly, so d loss / d a = 0 at a = 1
  (normalized tangent, c = 0.1), and not at a = 1.2."""
  n = 512
  t = _times(n, seed=3)
  kx, kz = jax.random.split(jax.random.PRNGKey(3))
  x0 = S * jax.random.normal(kx, (n, D))
  z = SD * jax.random.normal(kz, (n, D))
  v = jax.jit(lambda: v_marginal(_col(jnp.cos(t), x0) * x0 + _col(jnp.sin(t), x0) * z, t))()
  assert abs(float(_grad_a(x0, z, t, 1.0, v))) < 1e-5
  assert abs(float(_grad_a(x0, z, t, 1.2, v))) > 1e-2


def test_sct_loss_gradient_vanishes_in_expectation_at_the_exact_consistency_function():
  """sCT's conditional velocity cos t z - sin t x_0: for one x_t, draw x_0 from its posterior
  N(cos t S^2 x_t / m^2, S^2 SD^2 sin^2 t / m^2) and z from x_t = cos t x_0 + sin t z. The
  unnormalized loss's gradient in a is linear in v, so its mean at a = 1 is zero: within
  5 standard errors of the sample mean; at a = 1.2 far outside them."""
  n, t0 = 8192, 0.6
  t = jnp.full((n,), t0)
  x_t = jnp.broadcast_to(jnp.array([0.9, -0.4, 0.3]), (n, D))
  m2 = _m(t)[:, None]**2
  mean = jnp.cos(t)[:, None] * S**2 * x_t / m2
  std = S * SD * jnp.sin(t)[:, None] / jnp.sqrt(m2)
  x0 = mean + std * jax.random.normal(jax.random.PRNGKey(4), (n, D))
  z = (x_t - jnp.cos(t)[:, None] * x0) / jnp.sin(t)[:, None]

  @jax.jit
  def per_example(a):
    return jax.vmap(jax.grad(lambda aa, x0_, z_, t_: scm.loss(
        lambda u, tt: F_star(u, tt, aa), x0_[None], z_[None], t_[None], sigma_data=SD,
        r=1.0, c=None).loss[0]), in_axes=(None, 0, 0, 0))(a, x0, z, t)

  for a, zero in ((1.0, True), (1.2, False)):
    grads = np.asarray(per_example(a), np.float64)
    se = grads.std() / math.sqrt(n)
    assert (abs(grads.mean()) < 5 * se) == zero, (a, grads.mean(), se)


def test_teacher_velocity_of_an_analytic_edm_teacher_is_the_exact_velocity():
  """sCD's velocity: an EDM (VE) teacher whose score is the exact Gaussian one,
  -x / (S^2 + sigma^2), mapped onto TrigFlow by sde.trigflow_velocity_fn, is v_marginal."""
  ve = sde_lib.VESDE(0.002, 80.0)
  trig = sde_lib.TrigFlow(SD)
  score = lambda x, s: -x / _col(S**2 + ve.marginal_std(s)**2, x)
  t = _times(128, seed=5)
  x = _m(t)[:, None] * jax.random.normal(jax.random.PRNGKey(5), (128, D))
  got = jax.jit(sde_lib.trigflow_velocity_fn(ve, score, trig))(x, t)
  np.testing.assert_allclose(np.asarray(got), np.asarray(v_marginal(x, t)), rtol=2e-4,
                             atol=2e-5)


def test_warmup_and_normalization_formulas():
  assert [float(scm.tangent_warmup(s, 100)) for s in (0, 25, 100, 400)] == [0, 0.25, 1, 1]
  assert float(scm.tangent_warmup(0, 0)) == 1.0
  g = jnp.array([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4]])
  out, norm = scm.normalize_tangent(g, 0.1)
  np.testing.assert_allclose(np.asarray(norm), [5.0, 0.0, 0.5], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out), np.asarray(g) / np.array([[5.1], [0.1], [0.6]]),
                             rtol=1e-6)


def test_adaptive_weighting_is_minimized_at_the_log_error():
  """loss = e^{-u} err + u: d/du = 0 at u = log err (the learned weight is 1 / err), and the
  loss's error term is ||F - F^- - g||^2 / D with g normalized."""
  t = _times(4, seed=6)
  kx, kz = jax.random.split(jax.random.PRNGKey(6))
  x0, z = S * jax.random.normal(kx, (4, D)), SD * jax.random.normal(kz, (4, D))
  F = lambda u, tt: F_star(u, tt, 1.3)

  @jax.jit
  def run(u):
    plain = scm.loss(F, x0, z, t, sigma_data=SD, r=1.0, c=0.1)
    _, g = scm.tangent(F, _col(jnp.cos(t), x0) * x0 + _col(jnp.sin(t), x0) * z, t,
                       _col(jnp.cos(t), x0) * z - _col(jnp.sin(t), x0) * x0, SD, 1.0)
    du = jax.grad(lambda uu: jnp.sum(scm.loss(F, x0, z, t, sigma_data=SD, r=1.0, c=0.1,
                                              logvar=uu).loss))(jnp.log(plain.error) + u)
    return plain, scm.normalize_tangent(g, 0.1)[0], du

  plain, gn, du = run(0.0)
  np.testing.assert_allclose(np.asarray(plain.loss), np.asarray(plain.error), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(plain.error), np.sum(np.asarray(gn)**2, 1) / D,
                             rtol=1e-5)
  assert np.abs(np.asarray(du)).max() < 1e-5
  assert np.abs(np.asarray(run(0.5)[2])).min() > 0.1  # 1 - e^{-0.5}


def test_time_distribution_is_lognormal_in_sigma_d_tan_t():
  """ln(sigma_d tan t) ~ N(P_mean, P_std^2): mean and std of 200k draws within 5 standard
  errors (std of the mean P_std / sqrt(n); of the std about P_std / sqrt(2 n))."""
  n, p_mean, p_std = 200_000, -0.8, 1.6
  t = scm.sample_times(jax.random.PRNGKey(7), n, p_mean=p_mean, p_std=p_std, sigma_data=SD)
  lam = np.log(SD * np.tan(np.asarray(t, np.float64)))
  assert abs(lam.mean() - p_mean) < 5 * p_std / math.sqrt(n)
  assert abs(lam.std() - p_std) < 5 * p_std / math.sqrt(2 * n)
  assert float(t.min()) > 0 and float(t.max()) <= 0.5 * math.pi - 1e-3


# --- the run layer ---

SMALL = {"model.hidden_sizes": (16, 16), "model.nf": 8, "training.batch_size": 8}


def test_sct_loss_runs_in_bfloat16_through_the_run_layer(fast_compile):
  """configs/toy_sct.py with the adaptive weighting (the sCM paper's; the toy config leaves it
  off) and model.dtype = 'bfloat16': the network is WithLogvar(net), whose
  call is net's on params['net'] (so the sampler and the score seam see the bare network)
  and whose head starts at u = 0; its train loss and gradients are finite (the JVP runs in
  the network's precision) and the head receives a gradient. (float32: the slow toy runs.)"""
  from score_jax.models import init_model
  from score_jax.models.logvar import WithLogvar
  from score_jax.run import builders
  from score_jax.run.builders import LossContext
  from score_jax.run.settings import from_config

  s = from_config(helpers.config("toy_sct", SMALL, **{"model.dtype": "bfloat16",
                                                      "training.scm_adaptive_weighting": True}))
  model = builders.get_model(s)
  assert isinstance(model, WithLogvar)
  params = jax.jit(lambda r: init_model(r, model, (8, 2)))(jax.random.PRNGKey(0))["params"]
  assert set(params) == {"net", "logvar"}
  x = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (8, 2))
  labels = jnp.linspace(1.0, 900.0, 8)
  wrapped, bare, u = jax.jit(lambda p: (
      model.apply({"params": p}, x, labels), model.net.apply({"params": p["net"]}, x, labels),
      model.apply({"params": p}, labels / 700.0, method=WithLogvar.log_variance)))(params)
  np.testing.assert_array_equal(np.asarray(wrapped), np.asarray(bare))
  np.testing.assert_array_equal(np.asarray(u), np.zeros(8))
  loss_fn = builders.get_loss_fn(s, builders.get_sde(s), model, train=True)
  f = lambda p: loss_fn(p, jax.random.PRNGKey(2), x, None, None, LossContext(jnp.int32(3)))[0]
  loss, grads = jax.jit(jax.value_and_grad(f))(params)
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["logvar"]["bias"]).max()) > 0


@pytest.mark.parametrize("change, words", [
    ({"sampling.method": "heun"}, "sampling.method = 'consistency'"),
    ({"training.sde": "vesde", "model.parameterization": "edm"}, "training.sde = 'trigflow'"),
    ({"eval.enable_bpd": True}, "eval.enable_bpd = False"),
    ({"training.scm_tangent_c": 0.0}, "scm_tangent_c must be > 0"),
    ({"training.objective": "scd"}, "teacher_workdir"),
])
def test_scm_settings_are_checked_in_one_line(change, words):
  from score_jax.run.settings import from_config

  with pytest.raises(ConfigError) as e:
    from_config(helpers.config("toy_sct", **change))
  assert words in str(e.value) and "\n" not in str(e.value)


# --- learning the toy mixture (slow) ---

TEACHER = {"model.trigflow_label_scale": 1.0, "training.n_iters": 20_000,
           "optim.lr_decay": "cosine"}  # configs/toy_scd.py's teacher command


def _train(cfg, workdir, steps):
  from score_jax.run import train
  from score_jax.run.settings import from_config

  with cfg.unlocked():
    cfg.training.n_iters = cfg.training.snapshot_freq = steps
    cfg.training.snapshot_sampling = False
  return train.train_and_evaluate(from_config(cfg), str(workdir))


@pytest.mark.slow  # configs/toy_sct.py's 32,000 training steps: ~17 min on 2 CPU cores
def test_toy_sct_learns_the_mixture_in_one_and_two_steps(tmp_path):
  """configs/toy_sct.py as shipped through the training loop; 1- and 2-step samples of the
  EMA network against the mixture (helpers.assert_few_step_mixture: weights within 0.03, at
  most twice the data's 1.1% off every mode, on 8,192 samples). Measured: largest weight
  error 0.023 and 0.012, off-mode share 1.8% and 1.8%; with the adaptive weighting the
  config leaves off, 6,000 steps gave 6.0% and 4.8% (configs/toy_sct.py's docstring)."""
  cfg = helpers.config("toy_sct")
  state = _train(cfg, tmp_path / "run", cfg.training.n_iters)
  out, data_off = helpers.assert_few_step_mixture(cfg, state.ema_params)
  print("toy sct", out, data_off)


@pytest.mark.slow  # a 20,000-step TrigFlow teacher, then 24,000 student steps: ~16 min alone
def test_toy_scd_distills_a_trained_teacher_in_one_and_two_steps(tmp_path):
  """configs/toy_scd.py as shipped: configs/toy_trigflow.py trained with the docstring's
  teacher command (the student's time label t, 20,000 steps, cosine decay) is the teacher,
  the student starts from its EMA weights (a bare network's tree into the student's network:
  state.start_from_teacher) and learns with the teacher's velocity; its 1- and 2-step
  samples pass helpers.assert_few_step_mixture. Measured (the check's 8,192 samples; largest
  weight error, off-mode share at 1 / 2 steps; the data: 1.1%, the limit 2.2%) in two
  trainings: 0.005, 1.7% / 0.005, 1.6% and 0.005, 1.5% / 0.005, 1.5%."""
  label_scale = helpers.config("toy_sct").model.trigflow_label_scale
  assert label_scale == TEACHER["model.trigflow_label_scale"]
  teacher = helpers.config("toy_trigflow", **TEACHER)
  _train(teacher, tmp_path / "teacher", teacher.training.n_iters)
  cfg = helpers.config("toy_scd", **{"training.teacher_workdir": str(tmp_path / "teacher")})
  state = _train(cfg, tmp_path / "run", cfg.training.n_iters)
  out, data_off = helpers.assert_few_step_mixture(cfg, state.ema_params)
  print("toy scd", out, data_off)


class _ExactTrigFlowNet(nn.Module):
  """a F*(u, t) as a network of the 'trigflow' parameterization (labels t * scale, the
  config's model.trigflow_label_scale), with the scalar a its only parameter."""
  scale: float = TRIGFLOW_LABEL_SCALE

  @nn.compact
  def __call__(self, x, labels, y=None, *, train=False):
    a = self.param("a", nn.initializers.ones, ())
    return F_star(x, labels / self.scale, a)


class _ExactVENet(nn.Module):
  """The exact score of N(0, S^2 I) data under the VE SDE: labels are sigma ('default')."""

  @nn.compact
  def __call__(self, x, labels, y=None, *, train=False):
    return -x / _col(S**2 + labels**2, x)


def test_scd_run_layer_loss_vanishes_at_the_exact_student_of_an_exact_edm_teacher():
  """builders' 'scd' loss end to end: student a F* on TrigFlow (sigma_d = SD), teacher the
  exact Gaussian score on EDM's VE SDE mapped onto TrigFlow time; the gradient in a is zero
  at a = 1 (to float32 round-off) and not at a = 1.2."""
  import types
  from score_jax.run import builders
  from score_jax.run.builders import LossContext
  from score_jax.run.plan import ScoreSpec
  from score_jax.run.settings import from_config

  s = from_config(helpers.config("toy_sct", **{
      "training.objective": "scd", "training.teacher_workdir": "unused",
      "training.scm_adaptive_weighting": False, "model.sigma_data": SD,
      "training.scm_warmup_steps": 0}))
  teacher = types.SimpleNamespace(sde=sde_lib.VESDE(0.002, 80.0), model=_ExactVENet(),
                                  score=ScoreSpec(True, "default", 0.5, 0))
  loss_fn = builders.get_loss_fn(s, builders.get_sde(s),
                                 _ExactTrigFlowNet(s.model.trigflow_label_scale), train=True,
                                 teacher=teacher)
  x = S * jax.random.normal(jax.random.PRNGKey(8), (512, D))
  grad = jax.jit(jax.grad(lambda p: loss_fn(p, jax.random.PRNGKey(9), x, None, None,
                                            LossContext(jnp.int32(0), {}))[0]))
  assert abs(float(grad({"a": jnp.float32(1.0)})["a"])) < 1e-5
  assert abs(float(grad({"a": jnp.float32(1.2)})["a"])) > 1e-2
