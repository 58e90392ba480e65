"""Consistency sampling (score_jax.samplers.consistency) against closed forms.

For Gaussian data N(mu, s^2 I) the probability-flow trajectory through x_t ends at the
consistency function f(x_t, t) = mu + s (x_t - alpha mu) / rho, rho = sqrt(alpha^2 s^2 +
std^2), an affine map. A score function whose data prediction is f (score = (alpha f - x) /
std^2) is then an exact consistency model, and the sampler's output is Gaussian with a mean
and variance that follow from the affine maps and the re-noising x = alpha D + std z alone;
those are computed here in float64 and compared with the samples' moments.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import sde as sde_lib
from score_jax.samplers import consistency_sample
from score_jax.samplers.consistency import default_sigmas
from score_jax.sde import batch_mul

MU, S = 0.7, 0.3


def _model(sde):
  def score_fn(x, t):
    alpha, std = sde.mean_coef(t), sde.marginal_std(t)
    rho = jnp.sqrt(alpha**2 * S**2 + std**2)
    f = MU + batch_mul(S / rho, x - batch_mul(alpha, jnp.full_like(x, MU)))
    return batch_mul(1.0 / std**2, batch_mul(alpha, f) - x)
  return score_fn


def _moments(sde, sigmas):
  """Mean and variance of the samples, in float64: the prior, then f and re-noising."""
  coef = lambda t: (float(sde.mean_coef(jnp.float32(t))), float(sde.marginal_std(jnp.float32(t))))
  times = [sde.T] + [float(sde.t_from_log_snr(-jnp.log(jnp.float32(s)))) for s in sigmas]
  m, v = 0.0, float(sde.prior_std()) ** 2
  for k, t in enumerate(times):
    alpha, std = coef(t)
    if k:  # re-noise the last answer at t
      m, v = alpha * m, alpha**2 * v + std**2
    rho = math.sqrt(alpha**2 * S**2 + std**2)
    m, v = MU + S * (m - alpha * MU) / rho, (S / rho) ** 2 * v
  return m, v


@pytest.mark.parametrize("name,steps,sigmas", [("vesde", 1, ()), ("vesde", 3, (1.5, 0.2)),
                                                ("trigflow", 2, ()), ("vpsde", 2, ())])
def test_samples_have_the_closed_form_moments(name, steps, sigmas):
  sde = {"vesde": sde_lib.VESDE(0.002, 80.0), "trigflow": sde_lib.TrigFlow(0.5),
         "vpsde": sde_lib.VPSDE()}[name]
  n = 20000
  x, nfe = consistency_sample(jax.random.PRNGKey(steps), sde, _model(sde), (n, 2),
                              num_steps=steps, sigmas=sigmas, sigma_data=0.5)
  assert nfe == steps
  m, v = _moments(sde, sigmas or default_sigmas(steps, 0.5))
  x = np.asarray(x, np.float64).ravel()
  # 4 standard errors of the mean and of the variance (2 n samples, Gaussian).
  assert abs(x.mean() - m) < 4 * math.sqrt(v / x.size), (name, steps, x.mean(), m)
  assert abs(x.var() - v) < 4 * v * math.sqrt(2.0 / x.size), (name, steps, x.var(), v)
  # With only the first step, the answer is far from the data's variance (the prior's scale
  # is not the data's): the later steps are what bring it to s^2; check they do.
  if steps > 1:
    assert abs(v - S**2) < 0.02 * S**2


def test_the_default_levels_and_bad_levels():
  assert default_sigmas(1, 0.5) == ()
  # The sCM paper's two-step time t = 1.1 at sigma_d = 0.5: sigma = 0.5 tan(1.1) = 0.98.
  np.testing.assert_allclose(default_sigmas(2, 0.5), [0.5 * math.tan(0.5 * math.pi / math.sqrt(2))])
  assert abs(math.atan(default_sigmas(2, 0.5)[0] / 0.5) - 1.1) < 0.02
  sde = sde_lib.VESDE(0.002, 80.0)
  for sigmas, match in (((1.0,), "3 consistency steps start at 2"), ((0.5, 1.0), "decreasing"),
                        ((100.0, 1.0), "below the prior")):
    with pytest.raises(ValueError, match=match):
      consistency_sample(jax.random.PRNGKey(0), sde, _model(sde), (4, 2), num_steps=3,
                         sigmas=sigmas)
