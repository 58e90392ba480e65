"""Inpainting, colorization and guidance against closed-form conditionals."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import analytic
from score_jax.samplers import controllable
from score_jax.samplers import fast as fast_samplers
from score_jax import samplers as sampling
from score_jax import sde as sde_lib

from helpers import conditional_residuals, two_modes

Z = 4.5  # standard errors allowed (see tests/test_sampling.py)
N = 4000


def _pc(sde, score_fn, con):
  return sampling.pc_sample(jax.random.PRNGKey(0), sde, score_fn, (N, 2), constraint=con)


def _ddim(sde, score_fn, con):
  return fast_samplers.ddim_sample(jax.random.PRNGKey(0), sde, score_fn, (N, 2), 200, eta=1.0,
                                   schedule="logSNR", constraint=con)


# Replacement inpainting is exact only in the limit of perfect mixing: the
# generated coordinate can commit to a mode before the known one is seen.
# Measured with 20k samples (VP and VE): PC (reverse diffusion + Langevin,
# N = 300) 0.6% of samples in the wrong mode, in-mode residual std 1.04;
# ancestral DDIM (200 steps, no corrector) 2.1% and 1.18. The allowances
# (wrong-mode fraction, residual std excess) round these up.
INPAINT = {"pc": (_pc, 0.015, 0.07), "ddim": (_ddim, 0.035, 0.25)}


@pytest.mark.parametrize("sampler", sorted(INPAINT))
def test_inpainting_keeps_known_pixels_and_samples_the_conditional(sampler):
  run, wrong_mode, std_excess = INPAINT[sampler]
  sde, mix = sde_lib.VPSDE(0.1, 20.0, 300), two_modes()
  x, labels = mix.sample(jax.random.PRNGKey(3), N)
  data = x.at[:, 1].set(0.0)  # the unknown coordinate's data must not leak
  con = controllable.inpainting(sde, data, jnp.array([[1, 0]]))
  out, _ = run(sde, analytic.score_fn(mix, sde), con)
  np.testing.assert_array_equal(out[:, 0], x[:, 0])  # exactly the data
  r = conditional_residuals(mix, x, labels, out)
  in_mode = np.abs(r) < 6
  assert np.mean(~in_mode) <= wrong_mode
  r = r[in_mode]
  assert abs(r.mean()) <= Z / math.sqrt(r.size) + 0.03
  assert abs(r.std() - 1.0) <= Z / math.sqrt(2 * r.size) + std_excess


def test_projection_matches_the_perturbation_kernel():
  sde = sde_lib.VESDE(0.01, 50.0, 10)
  data = jnp.array([[3.0, -1.0]])
  con = controllable.inpainting(sde, data, jnp.array([[0, 1]]))
  x = jnp.full((1, 2), 7.0)
  t = jnp.array([0.4])
  draws = jax.vmap(lambda k: con.project(k, x, t))(jax.random.split(jax.random.PRNGKey(0), 20000))
  np.testing.assert_array_equal(draws[:, 0, 0], 7.0)  # unknown part untouched
  std = float(sde.marginal_std(t)[0])
  known = np.asarray(draws[:, 0, 1])
  assert abs(known.mean() + 1.0) < Z * std / math.sqrt(known.size)
  assert abs(known.std() / std - 1.0) < Z / math.sqrt(2 * known.size)
  np.testing.assert_array_equal(con.finalize(x), jnp.array([[7.0, -1.0]]))


def test_colorization_fixes_gray_and_samples_the_chroma_conditional():
  # Pixels with independent channels N(mu_c, s^2): given the channel mean g,
  # E[x | g] = mu + (g - mean(mu)) and sd[x_c | g] = s sqrt(2 / 3).
  mu, s = np.array([0.6, 0.3, -0.3]), 0.2
  shape = (500, 2, 2, 3)
  model = analytic.GaussianMixture.create([1.0], [np.tile(mu, 4)], stds=[[s] * 12])
  sde = sde_lib.VESDE(0.01, 20.0, 10)
  gray = 0.1 + 0.2 * jax.random.normal(jax.random.PRNGKey(1), shape[:-1] + (1,))
  con = controllable.colorization(sde, gray)
  out, _ = fast_samplers.ddim_sample(jax.random.PRNGKey(2), sde, analytic.score_fn(model, sde),
                                     shape, 200, eta=1.0, schedule="logSNR", eps=1e-5,
                                     constraint=con)
  np.testing.assert_allclose(out.mean(-1, keepdims=True), gray, atol=1e-5)
  expected = jnp.asarray(mu).reshape(1, 1, 1, 3) + (gray - mu.mean())
  resid = np.asarray(out - expected).reshape(-1, 3)
  sd = s * math.sqrt(2 / 3)
  n = resid.shape[0]
  # Channels sum to zero in resid, so compare per channel; 5% bias allowance
  # for the ancestral sampler with replacement (as for inpainting).
  assert np.all(np.abs(resid.mean(0)) < Z * sd / math.sqrt(n) + 0.01)
  assert np.all(np.abs(resid.std(0) / sd - 1) < Z / math.sqrt(2 * n) + 0.05)


def _ancestral(sde, score_fn, key=5):
  return fast_samplers.ddim_sample(jax.random.PRNGKey(key), sde, score_fn, (N, 2), 200, eta=1.0,
                                   schedule="logSNR")


def test_classifier_free_guidance_weight_zero_is_conditional_sampling():
  sde, mix = sde_lib.subVPSDE(0.1, 20.0, 10), analytic.example_mixture_2d()
  score_fn = analytic.conditional_score_fn(mix, sde)
  y = jnp.arange(N, dtype=jnp.int32) % 3
  conditional, nfe_c = _ancestral(sde, controllable.condition_on(score_fn, y), key=4)
  guided, nfe_g = _ancestral(sde, controllable.classifier_free_guidance(score_fn, y, 0.0), key=4)
  np.testing.assert_array_equal(guided, conditional)
  assert nfe_c == nfe_g  # calls of the guided score_fn (each runs the network twice)
  # w > 0 (same compiled program: w is traced) still lands every sample on its class.
  strong, _ = _ancestral(sde, controllable.classifier_free_guidance(score_fn, y, 3.0), key=4)
  assert not np.allclose(strong, conditional)
  log_post = np.stack([analytic.class_log_prob(mix, sde, strong, jnp.zeros(N), jnp.full(N, k))
                       for k in range(3)], 1)
  np.testing.assert_array_equal(log_post.argmax(1), y)


def test_classifier_guidance_scale_zero_is_unguided_and_scale_one_is_conditional():
  sde, mix = sde_lib.subVPSDE(0.1, 20.0, 10), analytic.example_mixture_2d()
  score_fn = analytic.score_fn(mix, sde)
  classifier = analytic.class_log_prob_fn(mix, sde)
  y = jnp.full((N,), 1, jnp.int32)

  def run(f):
    return _ancestral(sde, f)[0]

  unguided = run(score_fn)
  np.testing.assert_array_equal(
      run(controllable.classifier_guidance(score_fn, classifier, y, 0.0)), unguided)
  # Scale 1 with the exact noise-conditional classifier is exact conditional
  # sampling: all mass in component 1, with its mean and std.
  x = run(controllable.classifier_guidance(score_fn, classifier, y, 1.0))
  st = analytic.mode_statistics(mix, x)
  assert float(st.weights[1]) > 0.995
  std = np.sqrt(np.diag(np.asarray(mix.covs[1])))
  assert np.all(np.abs(np.asarray(st.means[1] - mix.means[1])) < Z * std / math.sqrt(N) + 0.02)
  assert np.all(np.abs(np.asarray(st.stds[1]) / std - 1) < Z / math.sqrt(2 * N) + 0.04)


def test_bad_constraint_arguments_raise():
  sde = sde_lib.VPSDE(0.1, 20.0, 10)
  with pytest.raises(ValueError, match="rank"):
    controllable.inpainting(sde, jnp.zeros((4, 2)), jnp.ones((2,)))
  with pytest.raises(ValueError, match="does not broadcast"):
    controllable.inpainting(sde, jnp.zeros((4, 2)), jnp.ones((3, 2)))
  with pytest.raises(ValueError, match=r"\[B, \.\.\., 1\]"):
    controllable.colorization(sde, jnp.zeros((4, 2, 2, 3)))
  with pytest.raises(TypeError, match="score_jax.sde.SDE"):
    controllable.inpainting(None, jnp.zeros((4, 2)), jnp.ones((4, 2)))
