"""Guidance interval and autoguidance (score_jax.samplers.controllable) on closed-form scores."""

import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import toy
from score_jax import analytic
from score_jax.samplers import controllable
from score_jax.samplers import fast as fast_samplers
from score_jax.run import programs
from score_jax.run import builders
from score_jax.run import plan as plan_lib
from score_jax.run import sample
from score_jax.run import settings
from score_jax.run import train
from score_jax.run import state as run_state
from score_jax.data import toy as toy_data
from score_jax import sde as sde_lib
from score_jax.errors import ConfigError

from helpers import TINY_TOY, config, copy_run

N = 2000


def _sample(sde, score_fn, steps=20):
  return fast_samplers.unipc_sample(jax.random.PRNGKey(4), sde, score_fn, (N, 2), steps)[0]


def _sigma_range(sde, steps=20, eps=1e-3):
  ts = fast_samplers.time_grid(sde, steps, "logSNR", eps)
  sigma = np.asarray(jnp.exp(-sde.log_snr(ts)))
  return sigma.min(), sigma.max()


def test_guidance_interval_weight_zero_and_an_empty_interval_are_unguided_bit_for_bit():
  sde, mix = sde_lib.subVPSDE(0.1, 20.0, 10), analytic.example_mixture_2d()
  score_fn = analytic.conditional_score_fn(mix, sde)
  y = jnp.arange(N, dtype=jnp.int32) % 3
  unguided = _sample(sde, controllable.condition_on(score_fn, y))
  lo, hi = _sigma_range(sde)
  for w, interval in ((0.0, (0.0, np.inf)), (0.0, (0.5, 2.0)), (3.0, (2.0, 1.0)),
                      (3.0, (2.0 * hi, 4.0 * hi)), (3.0, (0.0, 0.5 * lo))):
    guided = controllable.classifier_free_guidance_interval(score_fn, y, w, sde, interval)
    np.testing.assert_array_equal(_sample(sde, guided), unguided, err_msg=str((w, interval)))


def test_inside_the_interval_it_is_classifier_free_guidance_and_outside_conditional():
  sde, mix = sde_lib.VPSDE(0.1, 20.0, 10), analytic.example_mixture_2d()
  score_fn = analytic.conditional_score_fn(mix, sde)
  y = jnp.arange(N, dtype=jnp.int32) % 3
  x = jax.random.normal(jax.random.PRNGKey(0), (N, 2))
  interval = (0.3, 3.0)
  guided = controllable.classifier_free_guidance_interval(score_fn, y, 2.5, sde, interval)
  cfg = controllable.classifier_free_guidance(score_fn, y, 2.5)
  cond = controllable.condition_on(score_fn, y)
  for t in (0.05, 0.2, 0.4, 0.5, 0.9):  # sigma^ 0.17, 0.72, 2.03, 3.41, 58.8
    tt = jnp.full((N,), t)
    sigma = float(jnp.exp(-sde.log_snr(tt))[0])
    want = cfg if interval[0] <= sigma <= interval[1] else cond
    np.testing.assert_allclose(guided(x, tt), want(x, tt), rtol=1e-5, atol=1e-4)
  # Per example: a batch that straddles the interval's edge.
  tt = jnp.where(jnp.arange(N) % 2 == 0, 0.05, 0.3)
  want = jnp.where((jnp.arange(N) % 2 == 0)[:, None], cond(x, tt), cfg(x, tt))
  np.testing.assert_allclose(guided(x, tt), want, rtol=1e-5, atol=1e-4)
  # An interval covering the whole path is classifier-free guidance throughout.
  full = controllable.classifier_free_guidance_interval(score_fn, y, 2.5, sde, (0.0, np.inf))
  np.testing.assert_allclose(_sample(sde, full), _sample(sde, cfg), atol=1e-5)


_uncond_calls = []


def _counting_uncond(inner, x, t, y):
  if y is None:
    jax.debug.callback(lambda: _uncond_calls.append(1))
  return inner(x, t, y)


def test_the_unconditional_evaluation_runs_only_inside_the_interval():
  sde, mix = sde_lib.VPSDE(0.1, 20.0, 10), analytic.example_mixture_2d()
  score_fn = jax.tree_util.Partial(_counting_uncond, analytic.conditional_score_fn(mix, sde))
  y = jnp.zeros((64,), jnp.int32)
  interval = (0.2, 2.0)
  steps = 20
  ts = fast_samplers.time_grid(sde, steps, "logSNR", 1e-3)[:-1]  # where the score is evaluated
  sigma = np.asarray(jnp.exp(-sde.log_snr(ts)))
  inside = int(np.sum((sigma >= interval[0]) & (sigma <= interval[1])))
  assert 0 < inside < steps
  _uncond_calls.clear()
  guided = controllable.classifier_free_guidance_interval(score_fn, y, 2.0, sde, interval)
  x, nfe = fast_samplers.unipc_sample(jax.random.PRNGKey(0), sde, guided, (64, 2), steps)
  jax.block_until_ready(x)
  jax.effects_barrier()
  assert len(_uncond_calls) == inside and nfe == steps


def _toy_settings(**changes):
  return settings.from_config(config("toy", {"model.hidden_sizes": (16,)}, **changes))


def test_programs_apply_the_configured_guidance_interval():
  s = _toy_settings(**{"model.num_classes": 3, "sampling.guidance_interval": (0.3, 3.0)})
  sde = builders.get_sde(s)
  mix = analytic.example_mixture_2d()
  setup = plan_lib.assemble(s, sde, None, None, None)
  cond = analytic.conditional_score_fn(mix, sde)
  progs = programs.Programs(setup, lambda params, y: (lambda x, t: cond(x, t, y)))
  y = jnp.arange(8, dtype=jnp.int32) % 3
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 2))
  score = progs.score_fn(None, y, 2.0)
  for t, inside in ((0.05, False), (0.3, True), (0.5, False)):
    tt = jnp.full((8,), t)
    want = (controllable.classifier_free_guidance(cond, y, 2.0) if inside else
            controllable.condition_on(cond, y))(x, tt)
    np.testing.assert_allclose(score(x, tt), want, rtol=1e-5, atol=1e-4)
  # (0, 0) is guidance everywhere.
  progs = programs.Programs(plan_lib.assemble(s.replace(sampling={"guidance_interval": (0, 0)}), sde,
                                           None, None, None),
                            lambda params, y: (lambda x, t: cond(x, t, y)))
  tt = jnp.full((8,), 0.05)
  np.testing.assert_allclose(progs.score_fn(None, y, 2.0)(x, tt),
                             controllable.classifier_free_guidance(cond, y, 2.0)(x, tt),
                             rtol=1e-5, atol=1e-4)
  for bad in ((1.0,), (-1.0, 2.0), (0.5, "x"), 3.0):
    raw = toy.get_config().to_dict()
    raw["sampling"]["guidance_interval"] = bad
    with pytest.raises(ConfigError, match="sampling.guidance_interval"):
      settings.from_config(raw)
  with pytest.raises(ValueError, match="interval must be two numbers"):
    controllable.classifier_free_guidance_interval(cond, y, 1.0, sde, (1.0, math.nan))
  with pytest.raises(TypeError, match="score_jax.sde.SDE"):
    controllable.classifier_free_guidance_interval(cond, y, 1.0, None, (1.0, 2.0))


def test_autoguidance_with_the_main_model_as_guide_is_unguided():
  sde, mix = sde_lib.VESDE(0.01, 50.0, 10), analytic.example_mixture_2d()
  main = analytic.score_fn(mix, sde)
  unguided = fast_samplers.unipc_sample(jax.random.PRNGKey(4), sde, main, (N, 2), 20, eps=1e-5)[0]
  for w in (0.0, 1.5):
    guided = controllable.autoguidance(main, main, w)
    x = fast_samplers.unipc_sample(jax.random.PRNGKey(4), sde, guided, (N, 2), 20, eps=1e-5)[0]
    if w == 0.0:  # the guide is not even evaluated
      np.testing.assert_array_equal(x, unguided)
    else:  # (1 + w) s - w s = s up to rounding
      np.testing.assert_allclose(x, unguided, rtol=1e-5, atol=1e-4)
  # A weaker guide (the mixture with wider components): D = D_weak + (1 + w) (D_main - D_weak).
  weak = analytic.score_fn(mix._replace(eigvals=mix.eigvals * 2.0), sde)
  x = jax.random.normal(jax.random.PRNGKey(0), (N, 2))
  t = jnp.full((N,), 0.3)
  alpha, std = sde.mean_coef(t)[:, None], sde.marginal_std(t)[:, None]
  denoised = lambda s: (x + std**2 * s) / alpha  # D = E[x0 | x_t]
  w = 2.0
  got = controllable.autoguidance(main, weak, w)(x, t)
  d = denoised(weak(x, t)) + (1 + w) * (denoised(main(x, t)) - denoised(weak(x, t)))
  np.testing.assert_allclose(got, (alpha * d - x) / std**2, rtol=1e-4, atol=1e-3)
  # With an interval, only there.
  inside = controllable.autoguidance(main, weak, w, sde=sde, interval=(1e3, 2e3))
  np.testing.assert_array_equal(inside(x, t), main(x, t))


# The session's toy run (helpers.TINY_TOY: 20 steps, checkpoints at 10 and 20) with these
# sampling and eval settings.
TINY = {**TINY_TOY, "sampling.method": "unipc", "sampling.num_steps": 8, "sample.num": 64,
        "eval.begin_ckpt": 2, "eval.end_ckpt": 2, "eval.batch_size": 64,
        "eval.num_samples": 64, "eval.enable_loss": False, "eval.enable_bpd": False,
        "eval.enable_sampling": True, "eval.wait_timeout_s": 0.0}


def _config(base, **changes):
  return settings.from_config(config("toy", base, **changes))


def test_autoguidance_from_the_sample_and_eval_modes(toy_run, tmp_path):
  """sample.guide_workdir / guide_step reach the sample and eval modes (a 20-step toy run,
  guided by its step-10 checkpoint); a guide of another SDE is refused."""
  from score_jax.run import checkpoints
  from score_jax.run import evaluate  # pylint: disable=g-import-not-at-top
  workdir = copy_run(toy_run[0], str(tmp_path / "run"))  # the session's run, trained as TINY
  s = _config(TINY)
  guide = {"guide_workdir": workdir, "guide_step": 10}
  plain = _samples(s, workdir, str(tmp_path / "a"))
  guided = _samples(s, workdir, str(tmp_path / "b"), sampling={"guidance_weight": 1.0},
                    sample=guide)
  itself = _samples(s, workdir, str(tmp_path / "c"), sampling={"guidance_weight": 1.0},
                    sample={"guide_workdir": workdir})
  assert np.all(np.isfinite(guided)) and np.abs(guided - plain).max() > 1e-2
  np.testing.assert_allclose(itself, plain, atol=1e-4)
  # The eval mode samples with the guide too, and its shards remember it.
  copy = str(tmp_path / "copy")
  shutil.copytree(os.path.join(workdir, "checkpoints"), os.path.join(copy, "checkpoints"))
  shards = []
  for w, where, changes in ((0.0, copy, {}), (1.0, workdir, guide)):
    evaluate.run(s.replace(sampling={"guidance_weight": w}, sample=changes), where)
    with np.load(os.path.join(where, "eval", "ckpt_2", "samples_0.npz")) as f:
      shards.append(f["samples"])
  assert np.all(np.isfinite(shards[1])) and np.abs(shards[1] - shards[0]).max() > 1e-2
  with pytest.raises(ValueError, match="other sampling settings"):
    evaluate.run(s, workdir)
  # A guide must share the SDE.
  ve = _config(TINY, **{"training.sde": "vesde"})
  other = str(tmp_path / "ve")
  os.makedirs(other)
  run_state.save_config(ve, other)
  ck = checkpoints.Checkpointer(os.path.join(other, "checkpoints"))
  ck.save(10, run_state.init_state(plan_lib.make_plan(ve), jax.random.PRNGKey(0)))
  ck.close()
  with pytest.raises(ConfigError, match="another SDE"):
    sample.run(s.replace(sampling={"guidance_weight": 1.0}, sample={"guide_workdir": other}),
               workdir)


def _mode_statistics(x):
  """(share of samples > 3 std from every mode, largest mode-weight error) on the toy mixture."""
  mix = toy_data.GAUSSIAN_MIXTURE
  d = np.linalg.norm(np.asarray(x)[:, None, :] - mix.means[None], axis=-1) / mix.stds[None]
  weights = np.bincount(d.argmin(1), minlength=len(mix.weights)) / len(x)
  return float(np.mean(d.min(1) > 3.0)), float(np.abs(weights - mix.weights).max())


@pytest.fixture(scope="module")
def long_toy_run(tmp_path_factory):
  """The toy mixture's MLP trained 4000 steps (checkpoints every 500) by the real loop."""
  config = toy.get_config()
  with config.unlocked():
    for key, value in {"training.n_iters": 4000, "training.snapshot_freq": 500,
                       "training.snapshot_freq_for_preemption": 500, "training.batch_size": 256,
                       "training.eval_freq": 10**6, "training.snapshot_sampling": False,
                       "model.hidden_sizes": (128, 128, 128), "model.ema_rate": 0.99,
                       "model.ema_warmup": False,  # as when results.md's figures were measured
                       "model.num_scales": 100, "sampling.method": "unipc",
                       "sampling.num_steps": 30, "sample.num": 4096}.items():
      section, name = key.split(".")
      config[section][name] = value
  s = settings.from_config(config)
  workdir = str(tmp_path_factory.mktemp("autoguidance") / "run")
  train.train_and_evaluate(s, workdir)
  return s, workdir


def _samples(s, workdir, out, **changes):
  s = s.replace(sample={"output_dir": out, **changes.get("sample", {})},
                sampling=changes.get("sampling", {}))
  with np.load(sample.run(s, workdir)["npz"]) as f:
    return f["samples"]


@pytest.mark.slow  # 60-80 s on 2 CPU cores, mostly the 4000 training steps
def test_autoguidance_with_an_early_checkpoint_cuts_the_samples_between_modes(long_toy_run,
                                                                           tmp_path):
  """Measured here (4096 samples, UniPC-2 30 steps + denoise): unguided 5.2% of the samples
  more than 3 std from every mode (the data: 1.1%), mode weights off by 0.009; guided by
  the step-500 checkpoint with w = 1: 1.1%, 0.014. On one device with 8192 samples:
  4.6% -> 1.0% (weights 0.008 -> 0.009); w = 0.5: 1.9%, w = 2: 0.8% but weights off by
  0.024; later guides help less (step 2000, w = 1: 3.6%)."""
  s, workdir = long_toy_run
  unguided = _samples(s, workdir, str(tmp_path / "a"))
  guided = _samples(s, workdir, str(tmp_path / "b"), sampling={"guidance_weight": 1.0},
                    sample={"guide_workdir": workdir, "guide_step": 500})
  (out_u, werr_u), (out_g, werr_g) = _mode_statistics(unguided), _mode_statistics(guided)
  assert out_u > 0.03, (out_u, werr_u)  # the model leaves samples between the modes...
  assert out_g < 0.5 * out_u, (out_g, out_u)  # ...guidance pulls most of them in
  assert werr_g <= 0.02, (werr_g, werr_u)
  # The main model as its own guide changes nothing (up to rounding).
  itself = _samples(s, workdir, str(tmp_path / "c"), sampling={"guidance_weight": 1.0},
                    sample={"guide_workdir": workdir, "guide_step": -1, "num": 1024})
  small = _samples(s, workdir, str(tmp_path / "d"), sample={"num": 1024})
  np.testing.assert_allclose(itself, small, atol=1e-4)
