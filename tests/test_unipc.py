"""UniPC (score_jax.samplers.fast.unipc_sample) against exact ODE solutions and closed forms."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import analytic
from score_jax.samplers import controllable
from score_jax.samplers import fast as fast_samplers
from score_jax.run import programs
from score_jax.run import builders
from score_jax.run import plan as plan_lib
from score_jax import samplers as sampling
from score_jax.run import settings
from score_jax.samplers import time_grids
from score_jax import sde as sde_lib
from score_jax.errors import ConfigError

from helpers import (EPS, SDES, TINY_TOY, Bias, assert_reproduces, conditional_residuals, config,
                     copy_run, mixture_setup, two_modes)

KEY = jax.random.PRNGKey(0)
CASES = [(order, variant) for order in (1, 2, 3) for variant in fast_samplers.UNIPC_VARIANTS]


def _gaussian_errors(sde, nfes, **kwargs):
  """RMS error against the exact flow map of a Gaussian (float64), per NFE."""
  g = analytic.GaussianMixture.create([1.0], [[1.0, -0.5]], covs=[[[0.25, 0.1], [0.1, 0.16]]])
  score_fn = analytic.score_fn(g, sde)
  z = sde.prior_sampling(jax.random.PRNGKey(0), (64, 2))
  exact = analytic.gaussian_flow_map(g, sde, z, jnp.ones(64), jnp.full((64,), 1e-3))
  errors = []
  for nfe in nfes:
    x, used = fast_samplers.unipc_sample(KEY, sde, score_fn, z.shape, nfe, z=z, **kwargs)
    assert used == nfe
    errors.append(float(jnp.sqrt(jnp.mean((x - exact)**2))))
  return np.asarray(errors)


# UniPC-p (predictor order p, corrector UniC-p) has global order p + 1. The
# fitted slope of log error against log NFE over 128-512 must lie within
# 0.2 of -(p + 1). Measured (float64): p = 1: -2.00 to -2.04; p = 2: -2.99 to
# -3.02; p = 3: -3.85 to -3.94 on VP, sub-VP and VE. (Over 32-128 the order-3
# errors, 1e-5 to 1e-7, still change sign between terms and the slope wanders
# from -2.1 to -3.5.) The warm-up's first-order first step would cap order 3
# at 3 in the limit, but its error constant vanishes with the data prediction's
# motion at the start of the logSNR grid: no measured effect.
ORDER_CASES = [
    pytest.param(name, order, variant,
                 marks=() if name == "vp" or (order, variant) in ((2, "bh2"), (3, "bh1"))
                 else pytest.mark.slow)
    for name in sorted(SDES) for order, variant in CASES
]


@pytest.mark.parametrize("name,order,variant", ORDER_CASES)
def test_unipc_convergence_order(name, order, variant):
  nfes = [128, 256, 512]
  with jax.enable_x64(True):
    errors = _gaussian_errors(SDES[name](1000), nfes, order=order, variant=variant)
  slope = np.polyfit(np.log(nfes), np.log(errors), 1)[0]
  assert abs(slope + order + 1) <= 0.2, (slope, errors)


def test_the_corrector_raises_the_order_by_one_and_the_predictor_alone_is_known():
  """UniP-1 is DDIM, UniP-2 with bh2 is DPM-Solver++(2M); UniC adds one order."""
  sde, _, score_fn = mixture_setup("vp", 1000)
  z = sde.prior_sampling(KEY, (256, 2))
  for steps in (6, 25):
    unip1, _ = fast_samplers.unipc_sample(KEY, sde, score_fn, z.shape, steps, order=1,
                                          corrector=False, z=z)
    ddim, _ = fast_samplers.ddim_sample(KEY, sde, score_fn, z.shape, steps, schedule="logSNR",
                                        z=z)
    np.testing.assert_allclose(unip1, ddim, atol=2e-5)
    unip2, _ = fast_samplers.unipc_sample(KEY, sde, score_fn, z.shape, steps, order=2,
                                          variant="bh2", corrector=False, z=z)
    dpm, _ = fast_samplers.dpm_solver_pp_sample(KEY, sde, score_fn, z.shape, steps, order=2, z=z)
    np.testing.assert_allclose(unip2, dpm, atol=2e-5)
  nfes = [128, 256, 512]
  with jax.enable_x64(True):
    for order in (1, 2):
      errors = _gaussian_errors(SDES["vp"](1000), nfes, order=order, corrector=False)
      slope = np.polyfit(np.log(nfes), np.log(errors), 1)[0]
      assert abs(slope + order) <= 0.15, (order, slope, errors)


def test_unipc_does_not_recompile_across_step_counts_or_sdes():
  sde, _, score_fn = mixture_setup("subvp")
  shape = (512, 2)
  fast_samplers.unipc_sample(KEY, sde, score_fn, shape, 3, order=3)
  compiled = fast_samplers._unipc._cache_size()
  for steps in (7, 12, 30):
    x, nfe = fast_samplers.unipc_sample(KEY, sde, score_fn, shape, steps, order=3)
    assert nfe == steps and bool(jnp.all(jnp.isfinite(x)))
  # New SDE parameters are traced too.
  sde2 = sde_lib.subVPSDE(0.2, 15.0, 300)
  mix = mixture_setup("subvp")[1]
  fast_samplers.unipc_sample(KEY, sde2, analytic.score_fn(mix, sde2), shape, 9, order=3)
  assert fast_samplers._unipc._cache_size() == compiled


# Measured with 100k samples at 50 NFE (benchmarks/bench_samplers.py):
# UniPC-3 bh1 std error 1.0% (VP), 2.2% (sub-VP), 1.1% (VE); UniPC-2 bh2
# 1.6%, 3.2%, 1.4%; mean errors <= 0.009, weight errors <= 0.003.
@pytest.mark.parametrize("name,order,variant", [("subvp", 3, "bh1"), ("ve", 2, "bh2")])
def test_unipc_reproduces_mixture_at_50_nfe(name, order, variant):
  sde, mix, score_fn = mixture_setup(name)
  x, nfe = fast_samplers.unipc_sample(jax.random.PRNGKey(6), sde, score_fn, (4000, 2), 50,
                                      order=order, variant=variant, eps=EPS[name])
  assert nfe == 50
  assert_reproduces(mix, sde, x, Bias(0.01, 0.015, 0.03))


def test_unipc_inpainting_keeps_known_pixels_like_the_other_ode_solvers():
  # Replacement inpainting with deterministic steps is limited by the method,
  # not the solver: measured with 20k samples (VP, 50 steps) DDIM (eta 0),
  # DPM-Solver++(2M), UniPC-2 and -3 all leave 7.6-8.2% of the samples in the
  # wrong mode, in-mode residual std 1.86-1.90 (ancestral DDIM: 2.9%, 1.17).
  # UniPC must do what DPM-Solver++ does with the same projections.
  n = 4000
  sde, mix = sde_lib.VPSDE(0.1, 20.0, 300), two_modes()
  x, labels = mix.sample(jax.random.PRNGKey(3), n)
  data = x.at[:, 1].set(0.0)  # the unknown coordinate's data must not leak
  con = controllable.inpainting(sde, data, jnp.array([[1, 0]]))
  score_fn = analytic.score_fn(mix, sde)
  out, _ = fast_samplers.unipc_sample(jax.random.PRNGKey(0), sde, score_fn, (n, 2), 50, order=2,
                                      constraint=con)
  np.testing.assert_array_equal(out[:, 0], x[:, 0])  # exactly the data
  dpm, _ = fast_samplers.dpm_solver_pp_sample(jax.random.PRNGKey(0), sde, score_fn, (n, 2), 50,
                                              constraint=con)
  stats = []
  for y in (out, dpm):
    r = conditional_residuals(mix, x, labels, y)
    in_mode = np.abs(r) < 6
    stats.append((np.mean(~in_mode), r[in_mode].mean(), r[in_mode].std()))
  (wrong, mean, std), (wrong_dpm, mean_dpm, std_dpm) = stats
  assert wrong < 0.12 and abs(wrong - wrong_dpm) <= 0.01, stats
  assert abs(mean - mean_dpm) <= 0.03 and abs(std - std_dpm) <= 0.05, stats


def _toy_settings(**sampling):
  return settings.from_config(config("toy", {"model.hidden_sizes": (16,)},
                                     **{f"sampling.{k}": v for k, v in sampling.items()}))


def test_unipc_through_the_config_path():
  s = _toy_settings(method="unipc", order=3, unipc_variant="bh1", num_steps=12, schedule="edm",
                    noise_removal=False)
  sde = builders.get_sde(s)
  score_fn = jax.tree_util.Partial(analytic.score_fn(analytic.example_mixture_2d(), sde))
  sampler = builders.get_sampler(s, sde)
  x, nfe = sampler(KEY, score_fn, (256, 2))
  assert nfe == 12
  direct, _ = fast_samplers.unipc_sample(KEY, sde, score_fn, (256, 2), 12, order=3,
                                         variant="bh1", schedule="edm", eps=s.sampling.eps)
  np.testing.assert_array_equal(x, direct)
  # The running layer's programs, with a closed-form score in place of the network.
  setup_ = plan_lib.make_plan(s, need_data=False)
  progs = programs.Programs(setup_, lambda params, y: analytic.score_fn(
      analytic.example_mixture_2d(), setup_.sde))
  x, nfe = progs.sampler(256)(None, KEY, jnp.zeros((256,), jnp.int32))
  assert int(nfe) == 12 and bool(jnp.all(jnp.isfinite(x)))


def test_unipc_settings_and_arguments_are_checked():
  assert settings.UNIPC_VARIANTS == fast_samplers.UNIPC_VARIANTS
  assert _toy_settings(method="unipc", order=1).sampling.order == 1
  with pytest.raises(ConfigError, match="sampling.order must be 1, 2 or 3 for unipc"):
    _toy_settings(method="unipc", order=4)
  with pytest.raises(ConfigError, match="sampling.unipc_variant"):
    _toy_settings(method="unipc", unipc_variant="bh3")
  sde, _, score_fn = mixture_setup("vp", 10)
  with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
    fast_samplers.unipc_sample(KEY, sde, score_fn, (4, 2), order=0)
  with pytest.raises(ValueError, match="Unknown UniPC variant 'bh3'; valid: bh1, bh2"):
    fast_samplers.unipc_sample(KEY, sde, score_fn, (4, 2), variant="bh3")
  with pytest.raises(ValueError, match="num_steps"):
    fast_samplers.unipc_sample(KEY, sde, score_fn, (4, 2), num_steps=0)


def test_a_fixed_grid_combines_with_the_other_settings_or_is_refused():
  """A fixed grid replaces num_steps, schedule and eps, which must agree with it or be unset;
  order, variant and the final denoising still apply; samplers without grids refuse one."""
  s = _toy_settings(method="unipc", order=3, unipc_variant="bh1", num_steps=12,
                    schedule="optimized", noise_removal=False)
  sde = builders.get_sde(s)
  score_fn = jax.tree_util.Partial(analytic.score_fn(analytic.example_mixture_2d(), sde))
  ts = fast_samplers.time_grid(sde, 12, "edm", eps=s.sampling.eps)
  direct, _ = fast_samplers.unipc_sample(KEY, sde, score_fn, (64, 2), order=3, variant="bh1",
                                         timesteps=ts)
  unset = _toy_settings(method="unipc", order=3, unipc_variant="bh1", noise_removal=False)
  for agreeing in (s, unset):  # num_steps 0 and schedule '': the grid decides
    x, nfe = builders.get_sampler(agreeing, sde, ts)(KEY, score_fn, (64, 2))
    assert nfe == 12
    np.testing.assert_array_equal(x, direct)
  _, nfe = builders.get_sampler(_toy_settings(method="unipc"), sde, ts)(KEY, score_fn, (64, 2))
  assert nfe == 13  # + the denoising step of sampling.noise_removal
  for changes, match in (({"num_steps": 10}, r"sampling\.num_steps = 10 \(the grid's: 12; set "
                                             r"12 or 0\)"),
                         ({"eps": 1e-2}, r"sampling\.eps = 0\.01 \(the grid's: 0\.001"),
                         ({"schedule": "edm"}, r"sampling\.schedule = 'edm' \(the grid's: "
                                              r"'optimized'; set 'optimized' or ''\)")):
    with pytest.raises(ConfigError, match=r"fixed time grid \(timesteps: 12 steps from 1 to "
                       r"0\.001\) replaces sampling\.num_steps, sampling\.schedule, "
                       r"sampling\.eps, and disagrees with " + match):
      builders.get_sampler(_toy_settings(method="unipc", **changes), sde, ts)
  for method in ("pc", "ode", "ddim", "heun", "dpm_solver"):
    with pytest.raises(ConfigError, match=f"sampling.method = '{method}' takes no fixed time "
                       "grid \\(timesteps\\); 'unipc' does"):
      builders.get_sampler(_toy_settings(method=method), sde, ts)


def test_explicit_timesteps_are_the_schedules_grid_and_do_not_recompile():
  sde, mix, score_fn = mixture_setup("ve")
  z = sde.prior_sampling(KEY, (512, 2))
  ts = fast_samplers.time_grid(sde, 12, "edm", eps=1e-5)
  a, nfe = fast_samplers.unipc_sample(KEY, sde, score_fn, z.shape, 12, schedule="edm", eps=1e-5,
                                      z=z)
  b, nfe_b = fast_samplers.unipc_sample(KEY, sde, score_fn, z.shape, z=z, timesteps=ts)
  np.testing.assert_allclose(a, b, atol=1e-5)
  assert nfe == nfe_b == 12
  compiled = fast_samplers._unipc._cache_size()
  fast_samplers.unipc_sample(KEY, sde, score_fn, z.shape, z=z,
                             timesteps=fast_samplers.time_grid(sde, 12, "uniform_t", eps=1e-4))
  assert fast_samplers._unipc._cache_size() == compiled
  for bad in ([1.0], [1.0, 0.5, 0.6, 1e-3], [0.9, 0.5, 1e-3], [1.0, 0.5, 0.0]):
    with pytest.raises(ValueError, match="timesteps"):
      fast_samplers.unipc_sample(KEY, sde, score_fn, z.shape, timesteps=np.asarray(bad))


@pytest.mark.slow  # the fit and a 20k-latent ODE solve: over a minute on 2 loaded CPU cores
def test_optimized_grid_beats_the_uniform_log_snr_grid_on_the_exact_flow():
  """Fitted on 256 latents (50 Adam steps, VP, 10 steps of UniPC-2), judged on 20k others
  against a tight ODE solution: path RMS 0.105 -> 0.045 measured. With 4096 latents and 300
  steps (bench_samplers.py) the 100k-sample std error at 10 NFE falls from 10.3% to 2.4%.
  (The default tier fits a grid through the config path: the test below.)"""
  sde, mix, score_fn = mixture_setup("vp", 1000)
  ts, info = time_grids.optimize_time_grid(jax.random.PRNGKey(0), sde, score_fn, (256, 2), 10,
                                              iters=50, reference_steps=200)
  assert ts.shape == (11,) and ts.dtype == np.float64
  assert ts[0] == sde.T and ts[-1] == 1e-3 and np.all(np.diff(ts) < 0)
  assert info["loss"] < 0.2 * info["loss_uniform"], info
  n = 20000
  z = sde.prior_sampling(jax.random.PRNGKey(7), (n, 2))
  exact, _ = sampling.ode_sample(None, sde, score_fn, (n, 2), rtol=1e-6, atol=1e-6,
                                 denoise=False, z=z)
  rms = []
  for kwargs in ({"schedule": "logSNR"}, {"timesteps": ts}):
    x, nfe = fast_samplers.unipc_sample(KEY, sde, score_fn, (n, 2), 10, z=z, **kwargs)
    assert nfe == 10
    rms.append(float(jnp.sqrt(jnp.mean((x - exact)**2))))
  assert rms[1] < rms[0] / 1.8, rms


@pytest.mark.slow  # fits a grid, samples three times, evaluates: ~20 s on 2 CPU cores
def test_optimized_grid_is_fitted_once_and_stored_with_the_run(toy_run, tmp_path, monkeypatch,
                                                              fast_compile):
  from score_jax.run import evaluate
  from score_jax.run import sample
  changes = {"sampling.method": "unipc", "sampling.schedule": "optimized",
             "sampling.num_steps": 6, "sampling.grid_batch_size": 64, "sampling.grid_iters": 5,
             "sample.num": 32, "eval.begin_ckpt": 1, "eval.end_ckpt": 1, "eval.batch_size": 32,
             "eval.num_samples": 32, "eval.enable_loss": False, "eval.enable_bpd": False,
             "eval.wait_timeout_s": 0.0}
  s = settings.from_config(config("toy", TINY_TOY, **changes))
  # The session's toy run (trained as TINY_TOY; its snapshot sampling would use logSNR).
  workdir = copy_run(toy_run[0], str(tmp_path / "run"))
  first = np.load(sample.run(s, workdir)["npz"])
  path = os.path.join(workdir, "time_grids", "time_grid_unipc2_bh2_6steps.json")
  with open(path) as f:
    stored = np.asarray(json.load(f)["times"])
  assert stored.shape == (7,) and stored[0] == 1.0 and np.all(np.diff(stored) < 0)
  assert int(first["nfe"]) == 7  # 6 steps + the final denoising
  # A second run loads the grid instead of fitting it again.
  monkeypatch.setattr(time_grids, "optimize_time_grid",
                      lambda *a, **k: (_ for _ in ()).throw(AssertionError("refitted")))
  second = np.load(sample.run(s, workdir)["npz"])
  np.testing.assert_array_equal(second["samples"], first["samples"])
  # The eval mode keeps its grid per checkpoint folder: given one, it fits nothing.
  os.makedirs(os.path.join(workdir, "eval", "ckpt_1"))
  shutil.copy(path, os.path.join(workdir, "eval", "ckpt_1"))
  (result,) = evaluate.run(s, workdir)
  assert result["sampling_nfe"] == 7
  with pytest.raises(ConfigError, match="made for sampling.method='unipc'"):
    _toy_settings(method="dpm_solver", schedule="optimized")
