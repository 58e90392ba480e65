"""tests/data/consistency/openai_ct.npz: consistency training / distillation on one fixed batch,
computed by the consistency models' authors' own JAX code (openai/consistency_models_cifar10;
made by tests/data/make_openai_cm_fixture.py, described in tests/data/consistency/README.md).

Their network is the 2021 reference's NCSN++ with two changes (no 2x - 1 input map, Fourier
features of the label itself rather than of its log), so score_jax's NCSN++ with centered=True,
fed labels exp(c_noise), runs it on the parameters converted by score_jax.convert.reference's
Flax map. These tests check that, and that the fixture's arrays follow the formulas the README
states (parameterization, sigma grid, CT pair, Heun step of the CD teacher, metrics,
weightings and batch reduction), recomputed here from the recorded inputs with score_jax's
network.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import helpers
from score_jax.convert import reference as convert
from score_jax.run import builders
from score_jax.run.settings import from_config

FIXTURE = helpers.OPENAI_CT
B, SHAPE = 4, (4, 8, 8, 3)


@functools.lru_cache(maxsize=None)
def _setup():
  """(spec, model, jitted raw network (params, x, c_noise) -> F) for the fixture's network."""
  config = helpers.openai_ct_config()
  spec = convert.reference_spec(config, "flax")
  model = builders.get_model(from_config(config))

  @jax.jit
  def net(params, x, c_noise):
    # score_jax's Fourier embedding takes log(labels); theirs embeds c_noise = 0.25 log t
    # itself, so labels = exp(c_noise) (round trip error ~3e-8 in c_noise).
    return model.apply({"params": params}, x, jnp.exp(c_noise), train=False)

  return spec, model, net


def _params(prefix):
  spec, _, _ = _setup()
  tensors = helpers.subtree(helpers.openai_ct(), prefix)
  convert.check_tensors({k: v.shape for k, v in tensors.items()}, spec, FIXTURE)
  return convert.tensors_to_params(tensors, spec)


def _karras(d):
  n = np.arange(int(d["N"]), dtype=np.float64)
  lo, hi, rho = (float(d[k]) for k in ("sigma_min", "sigma_max", "rho"))
  return (hi ** (1 / rho) + n / (int(d["N"]) - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _col(v):
  return np.asarray(v, np.float64)[:, None, None, None]


def test_fixture_arrays_and_grid():
  d = helpers.openai_ct()
  for k in ("x", "z", "net_in", "net_out", "ct/x_t", "ct/x_t2", "ct/F_t", "ct/F_t2", "cd/x_t2",
            "cd/F_t2"):
    assert d[k].shape == SHAPE and d[k].dtype == np.float32, k
  n = int(d["N"])
  assert d["sigma_grid"].shape == (n,) and d["indices"].shape == (B,)
  assert d["indices"].min() >= 0 and d["indices"].max() <= n - 2
  # Their grid is computed in float32: the rho-th power magnifies the base's rounding
  # (~1e-7) 7 times, so 2e-6 relative; the largest level is 79.999985, not 80.
  np.testing.assert_allclose(d["sigma_grid"], _karras(d), rtol=2e-6)
  assert np.all(np.diff(d["sigma_grid"]) < 0)  # n = 0 is sigma_max
  np.testing.assert_array_equal(d["t"], d["sigma_grid"][d["indices"]])
  np.testing.assert_array_equal(d["t2"], d["sigma_grid"][d["indices"] + 1])
  # With num_scales = 10 passed to the loss, the grid is the 10-level one.
  grid10 = _karras({**d, "N": np.int32(10)})
  np.testing.assert_allclose(d["ct/l2_N10/t"], grid10[d["ct/l2_N10/indices"]], rtol=2e-6)
  np.testing.assert_allclose(d["ct/l2_N10/t2"], grid10[d["ct/l2_N10/indices"] + 1], rtol=2e-6)
  # Parameter trees: the student's, the teacher's and both gradients hold the same tensors.
  student = helpers.subtree(d, "student")
  for prefix in ("teacher", "ct/l2/grad", "cd/l2/grad"):
    other = helpers.subtree(d, prefix)
    assert {k: v.shape for k, v in other.items()} == {k: v.shape for k, v in student.items()}
  # The Fourier features are constants in their network (stop_gradient).
  assert not np.any(d["ct/l2/grad/GaussianFourierProjection_0/W"])
  assert np.all(np.isfinite(np.concatenate([v.ravel() for v in helpers.subtree(d, "ct/l2/grad").values()])))


def _consistency_fn(net, params, d, x_t, t):
  """Their distiller (consistency function) with the README's coefficients, in float64."""
  sd, eps = float(d["sigma_data"]), float(d["sigma_min"])
  t64 = np.asarray(t, np.float64)
  c_in = 1 / np.sqrt(t64**2 + sd**2)
  f = np.asarray(net(params, (x_t * _col(c_in)).astype(np.float32),
                     (0.25 * np.log(t64)).astype(np.float32)), np.float64)
  c_skip = sd**2 / ((t64 - eps)**2 + sd**2)
  c_out = (t64 - eps) * sd / np.sqrt(t64**2 + sd**2)
  return _col(c_skip) * x_t + _col(c_out) * f


def _denoiser(net, params, d, x, t):
  """Their EDM denoiser of the CD teacher (no sigma_min offset), in float64."""
  sd = float(d["sigma_data"])
  t64 = np.asarray(t, np.float64)
  c_in = 1 / np.sqrt(t64**2 + sd**2)
  f = np.asarray(net(params, (x * _col(c_in)).astype(np.float32),
                     (0.25 * np.log(t64)).astype(np.float32)), np.float64)
  return _col(sd**2 / (t64**2 + sd**2)) * x + _col(t64 * sd / np.sqrt(t64**2 + sd**2)) * f


def test_score_jax_ncsnpp_reproduces_their_network_and_formulas(fast_compile):
  """One test (one compilation of the network, with fast_compile: ~3 s on CPU).

  1. score_jax's NCSN++ on their parameters (converted by the Flax reference map) gives their
  recorded raw output F(c_in x_t, c_noise). |F| <= 2.2; the two programs differ only in
  float32 round-off through ~30 layers (measured max 1.9e-6), so atol 1e-5. A wrong map or
  a missed convention is off by O(0.1): the 2021 reference's labels (Fourier features of
  log t, i.e. c_noise = log t) change the output by more than 0.05.

  2. The README's CT/CD formulas, recomputed from the fixture's inputs with score_jax's
  network (float64 outside it), reproduce the authors' recorded intermediates and losses.
  Tolerances: x_t reaches |x_t| ~ 300 (t = 80), where float32 spacing is 3e-5, so the noised
  pairs get atol 1e-4 (the Heun step's two denoiser calls add ~1e-6 relative to their
  output); consistency outputs (|F| < 3) get atol 2e-5 (the network's 1e-5 plus the float32
  inputs); losses rtol 2e-4 (squared differences of values ~0.1 apart, each within 2e-5).
  """
  del fast_compile
  d = helpers.openai_ct()
  _, _, net = _setup()
  student, teacher = _params("student"), _params("teacher")
  out = np.asarray(net(student, d["net_in"], d["net_cond"]))
  np.testing.assert_allclose(out, d["net_out"], rtol=0, atol=1e-5)
  other = np.asarray(net(student, d["net_in"], 4.0 * d["net_cond"]))
  assert np.abs(other - d["net_out"]).max() > 0.05

  x, z = d["x"].astype(np.float64), d["z"].astype(np.float64)
  t, t2 = d["t"], d["t2"]
  x_t = x + _col(t) * z
  np.testing.assert_allclose(d["ct/x_t"], x_t, rtol=0, atol=1e-4)
  np.testing.assert_allclose(d["net_in"], x_t / _col(np.sqrt(np.float64(t)**2 + 0.25)),
                             rtol=0, atol=1e-6)
  np.testing.assert_allclose(d["net_cond"], 0.25 * np.log(np.float64(t)), rtol=1e-6)
  # CT: the pair shares z (their Euler step of the ODE with the data as the denoiser).
  np.testing.assert_allclose(d["ct/x_t2"], x + _col(t2) * z, rtol=0, atol=1e-4)
  x_t, x_t2 = d["ct/x_t"].astype(np.float64), d["ct/x_t2"].astype(np.float64)
  f_t = _consistency_fn(net, student, d, x_t, t)
  f_t2 = _consistency_fn(net, student, d, x_t2, t2)
  np.testing.assert_allclose(d["ct/F_t"], f_t, rtol=0, atol=2e-5)
  np.testing.assert_allclose(d["ct/F_t2"], f_t2, rtol=0, atol=2e-5)
  # At t2 = sigma_min the consistency function is the identity (up to the float32 grid).
  last = int(np.argmax(d["indices"] == int(d["N"]) - 2))
  np.testing.assert_allclose(d["ct/F_t2"][last], d["ct/x_t2"][last], rtol=0, atol=1e-6)

  diff = (f_t - f_t2).reshape(B, -1)
  per = {"l2": np.mean(diff**2, -1), "l1": np.mean(np.abs(diff), -1),
         "linf": np.max(np.abs(diff), -1)}
  for norm, v in per.items():
    np.testing.assert_allclose(d[f"ct/{norm}/per_example"], v, rtol=2e-4)
    np.testing.assert_allclose(d[f"ct/{norm}/loss"], np.mean(v), rtol=2e-4)
  inv = 1 / np.float64(t)**2
  weights = {"snr": inv, "snrp1": inv + 1, "truncated_snr": np.maximum(inv, 1.0)}
  for name, w in weights.items():
    np.testing.assert_allclose(d[f"ct/l2_{name}/loss"], np.mean(w * per["l2"]), rtol=2e-4)

  # CD: one Heun step of the teacher's denoiser from (x_t, t) to t2; the same student.
  den = _denoiser(net, teacher, d, x_t, t)
  dx = (x_t - den) / _col(t)
  euler = x_t + _col(np.float64(t2) - t) * dx
  dx2 = (euler - _denoiser(net, teacher, d, euler, t2)) / _col(t2)
  heun = x_t + _col((np.float64(t2) - t) / 2) * (dx + dx2)
  np.testing.assert_allclose(d["cd/x_t2"], heun, rtol=0, atol=1e-4)
  f_cd = _consistency_fn(net, student, d, d["cd/x_t2"].astype(np.float64), t2)
  np.testing.assert_allclose(d["cd/F_t2"], f_cd, rtol=0, atol=2e-5)
  l2_cd = np.mean(((d["ct/F_t"] - f_cd).reshape(B, -1))**2, -1)
  np.testing.assert_allclose(d["cd/l2/per_example"], l2_cd, rtol=2e-4)
  np.testing.assert_allclose(d["cd/l2/loss"], np.mean(l2_cd), rtol=2e-4)



def test_their_gradients_convert_onto_score_jax_parameters():
  """The recorded gradients use their parameter paths; the same Flax map puts them onto
  score_jax's parameter tree (what a loss comparison needs)."""
  _, model, _ = _setup()
  params = _params("student")
  for prefix in ("ct/l2/grad", "cd/l2/grad"):
    g = _params(prefix)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(params)
    shapes = jax.tree_util.tree_map(np.shape, g)
    assert shapes == jax.tree_util.tree_map(np.shape, params)
  del model
