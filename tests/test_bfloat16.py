"""bfloat16 compute (model.dtype) verified on CPU against float32.

A tiny DDPM++ (configs/digits.py's network with one resolution: nf 16, one
residual block, attention at 8x8; VP SDE, continuous DSM) is trained
STEPS steps on the 8x8 digits at batch 32 through score_jax's training path
(make_plan, init_state, make_train_step), in float32 with two seeds and in
bfloat16 with the first seed (same init, same data order, same noise keys).

Tolerances, from the measurement in the comment at LOSS_TOL and SAMPLE_TOL:
- loss: the mean of the last LAST losses of the bfloat16 run is within
  LOSS_TOL of the float32 run's, and its smoothed curve stays within
  CURVE_TOL of float32's; both bounds are about the distance between the two
  float32 seeds, i.e. bfloat16 changes the curve no more than another seed.
- the state (parameters, Adam moments, EMA) stays float32 in the bfloat16 run;
- the bfloat16 network's output differs from the float32 one's (same
  parameters, same input) by bfloat16 rounding, within NET_TOL;
- a checkpoint (the train state saved with score_jax.run.checkpoints and restored
  into the other precision's state) samples in the other precision: Euler-
  Maruyama (SAMPLE_STEPS steps) from the same latents and noise with the
  float32 and the bfloat16 network gives finite samples within SAMPLE_TOL
  (RMS, relative to the samples' RMS) of each other, in both directions.

The training runs in a child process with one CPU device: the suite's four
simulated devices would add an all-reduce to every step for nothing here
and double the time. It takes minutes, so those checks are `slow`; the default
tier runs the same code paths for STEPS_FAST steps in-process
(test_bfloat16_train_steps_checkpoint_and_sampler_paths).
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

STEPS = 300
BATCH = 32
LAST = 100  # losses averaged at the end
SMOOTH = 50  # moving-average window of the curve comparison

# Measured (2 CPU cores, jax 0.10.2, this config): the mean of the last 100 losses
# differs by 0.0082 between the two float32 seeds and by 0.00004 between bfloat16
# and float32 with the same seed; the 50-step moving averages (after step 100) by
# at most 0.0166 between seeds and 0.00015 between precisions. The loss tolerances
# are the seed-to-seed figures rounded up: bfloat16 may move the curve no more
# than another seed does. (A single loss has a standard deviation of 0.035 at the
# end: a 100-step mean is known to ~0.0035.)
LOSS_TOL = 0.01
CURVE_TOL = 0.02
# Measured: RMS(bfloat16 net - float32 net samples) / RMS(samples) = 0.0057
# (float32-trained checkpoint) and 0.0064 (bfloat16-trained), the same latents and
# noise; other latents give 0.60. bfloat16 keeps 8 significant bits (relative
# rounding 2^-9 ~ 0.002 per operation); the network's output itself differs by
# 0.0039 (NET_TOL bounds it from both sides: bfloat16 is used, and only that).
SAMPLE_TOL = 0.03
NET_TOL = (1e-4, 0.02)
SAMPLE_STEPS = 100


def library_training(dtype: str, seed: int, init: bool = True):
  """(setup, train state (None without init), jitted step) from score_jax's training path
  for the tiny DDPM++.

  The only function here that touches score_jax's running layer (being
  refactored): settings/programs if present, else the config-based train API.
  """
  from configs import digits
  from score_jax.run import train
  from score_jax.run import state as run_state

  config = digits.get_config()
  config.model.dtype = dtype
  config.model.ch_mult = (1,)  # one resolution: compiles in seconds
  config.model.attn_resolutions = (8,)
  config.training.batch_size = BATCH
  config.optim.warmup = 50
  config.model.ema_rate = 0.99  # digits' 0.999 would still weigh the initialization 0.74 at the end
  config.model.ema_warmup = False  # the constant rate benchmarks.md's figures were measured with
  from score_jax.run import plan as plan_lib
  from score_jax.run import settings
  setup = plan_lib.make_plan(settings.from_config(config), need_data=False)
  import jax
  state = run_state.init_state(setup, jax.random.PRNGKey(seed)) if init else None
  return setup, state, train.make_train_step(setup)


def _train(dtype, seed, step_fn=None):
  import jax
  from score_jax.data import datasets

  setup, state, built = library_training(dtype, seed)
  step_fn = step_fn or built
  source = datasets.open_source("digits", "train", image_size=8, num_channels=1)
  batches = datasets.make_batches(source, batch_size=BATCH, centered=True, seed=0,
                                  process_index=0, process_count=1)
  key = jax.random.PRNGKey(1000 + seed)
  losses = []
  for _ in range(STEPS):
    batch = next(batches)
    x, y = (jax.device_put(batch[k], setup.batch_sharding) for k in ("image", "label"))
    state, metrics = step_fn(state, x, y, key)
    losses.append(metrics["loss"])
  losses = np.asarray(jax.device_get(losses))
  return setup, state, step_fn, losses


def _float_dtypes(tree):
  import jax
  return sorted({str(a.dtype) for a in jax.tree_util.tree_leaves(tree)
                 if np.issubdtype(a.dtype, np.floating)})


def _sampler(setup, steps=SAMPLE_STEPS):
  """(params, z) -> samples: Euler-Maruyama, `steps` steps from z, fixed noise keys."""
  import jax
  from score_jax import models, sde as sde_lib
  from score_jax.samplers.pc import pc_sample

  sde = setup.sde
  steps_sde = sde_lib.VPSDE(sde.beta_min, sde.beta_max, steps)  # the same marginals

  @jax.jit
  def sample(params, z):
    score = models.get_score_fn(sde, setup.model, {"params": params}, continuous=True)
    return pc_sample(jax.random.PRNGKey(0), steps_sde, lambda x, t: score(x, t), z.shape,
                     "euler_maruyama", "none", z=z)[0]
  return sample


def worker(out_dir: str) -> None:
  """Trains the three runs, crosses the checkpoints, writes results.json and arrays.npz."""
  import jax
  from score_jax import models
  from score_jax.run import checkpoints
  from score_jax.data import datasets

  t0 = time.perf_counter()
  f32_setup, f32_state, f32_step, f32_loss = _train("float32", 0)
  _, _, _, f32_seed1_loss = _train("float32", 1, f32_step)
  bf16_setup, bf16_state, _, bf16_loss = _train("bfloat16", 0)
  results = {"state_dtypes_bf16_run": {k: _float_dtypes(getattr(bf16_state, k))
                                       for k in ("params", "opt_state", "ema_params")},
             "model_dtypes": [np.dtype(s.model.dtype).name for s in (f32_setup, bf16_setup)]}
  # Checkpoints through score_jax.run.checkpoints, restored into the OTHER precision's state.
  samplers = {"float32": _sampler(f32_setup), "bfloat16": _sampler(bf16_setup)}
  z = jax.random.normal(jax.random.PRNGKey(7), (32, 8, 8, 1))
  z_other = jax.random.normal(jax.random.PRNGKey(8), (32, 8, 8, 1))
  arrays = {"f32_loss": f32_loss, "f32_seed1_loss": f32_seed1_loss, "bf16_loss": bf16_loss}
  for trained, state, other_state in (("float32", f32_state, bf16_state),
                                      ("bfloat16", bf16_state, f32_state)):
    ckpt = checkpoints.Checkpointer(os.path.join(out_dir, f"ckpt_{trained}"), async_save=False)
    ckpt.save(STEPS, state)
    restored = ckpt.restore(STEPS, other_state)  # the other run's state as the template
    ckpt.close()
    ema = restored.ema_params
    same = jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), ema, state.ema_params))
    results[f"restored_equal_{trained}"] = bool(same)
    for dtype, sample in samplers.items():
      arrays[f"{trained}_ckpt_{dtype}_net"] = np.asarray(sample(ema, z))
  arrays["float32_ckpt_float32_net_other_z"] = np.asarray(samplers["float32"](f32_state.ema_params,
                                                                            z_other))
  # The networks themselves: the same parameters and inputs, float32 vs bfloat16 compute.
  images = np.asarray(next(iter(datasets.make_batches(
      datasets.open_source("digits", "test", image_size=8, num_channels=1), batch_size=64,
      evaluation=True, centered=True, process_index=0, process_count=1)))["image"])
  t = jax.numpy.full((64,), 0.3)
  z = jax.random.normal(jax.random.PRNGKey(9), images.shape)
  x_t = jax.numpy.asarray(images) * 0.5 + 0.8 * z
  for name, setup in (("float32", f32_setup), ("bfloat16", bf16_setup)):
    score = models.get_score_fn(setup.sde, setup.model, {"params": bf16_state.ema_params},
                                continuous=True)
    arrays[f"score_{name}_net"] = np.asarray(jax.jit(lambda x, t: score(x, t))(x_t, t))
  print(f"worker: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
  np.savez(os.path.join(out_dir, "arrays.npz"), **arrays)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f)


STEPS_FAST = 2
SAMPLE_STEPS_FAST = 5


@pytest.mark.slow  # ~20 s on 2 CPU cores (train steps and every sampler in bfloat16)
def test_bfloat16_train_steps_checkpoint_and_sampler_paths(tmp_path, fast_compile):
  """The default tier's check of the paths the slow runs below exercise (compiled with
  most optimizations off): STEPS_FAST bfloat16 training steps from the float32 init, the
  state's dtypes, the bfloat16 network's output against float32's, the bfloat16-trained
  state restored into a float32 state, and a few sampling steps with the bfloat16 network."""
  import jax
  from score_jax import models
  from score_jax.data import datasets
  from score_jax.run import checkpoints

  f32_setup, init, _ = library_training("float32", 0)
  bf16_setup, _, step_fn = library_training("bfloat16", 0, init=False)
  assert np.dtype(f32_setup.model.dtype).name == "float32"
  assert np.dtype(bf16_setup.model.dtype).name == "bfloat16"
  batches = datasets.make_batches(datasets.open_source("digits", "train", image_size=8,
                                                       num_channels=1),
                                  batch_size=BATCH, centered=True, seed=0, process_index=0,
                                  process_count=1)
  state, losses = init, []
  for _ in range(STEPS_FAST):
    batch = next(batches)
    x, y = (jax.device_put(batch[k], bf16_setup.batch_sharding) for k in ("image", "label"))
    state, metrics = step_fn(state, x, y, jax.random.PRNGKey(1000))
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)) and int(state.step) == STEPS_FAST
  # The output layer starts at zero: the first loss is E|z|^2 (per dimension) of 32 x 64
  # standard normals, 1 within a few of its standard errors (sqrt(2 / 2048) = 0.03).
  assert abs(losses[0] - 1.0) < 0.15, losses
  assert losses[1] != losses[0]  # the step moved the parameters
  for part in ("params", "opt_state", "ema_params"):
    assert _float_dtypes(getattr(state, part)) == ["float32"], part
  # Same parameters and inputs: the bfloat16 network's float32 output is off by bfloat16
  # rounding.
  x_t = jax.random.normal(jax.random.PRNGKey(9), (8, 8, 8, 1))
  t = jax.numpy.full((8,), 0.3)
  out = {}
  for name, setup in (("float32", f32_setup), ("bfloat16", bf16_setup)):
    score = models.get_score_fn(setup.sde, setup.model, {"params": state.params},
                                continuous=True)
    out[name] = np.asarray(jax.jit(lambda x, t: score(x, t))(x_t, t))
  assert out["float32"].dtype == out["bfloat16"].dtype == np.float32
  rel = np.sqrt(np.mean((out["bfloat16"] - out["float32"]) ** 2) / np.mean(out["float32"] ** 2))
  assert NET_TOL[0] < rel < NET_TOL[1], rel
  # The bfloat16-trained state restores exactly into a float32 run's state ...
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(STEPS_FAST, state)
  restored = ckpt.restore(STEPS_FAST, init)
  ckpt.close()
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ... and the bfloat16 network samples from it.
  z = jax.random.normal(jax.random.PRNGKey(7), (4, 8, 8, 1))
  samples = np.asarray(_sampler(bf16_setup, SAMPLE_STEPS_FAST)(restored.ema_params, z))
  assert samples.shape == z.shape and samples.dtype == np.float32
  assert np.all(np.isfinite(samples)) and not np.array_equal(samples, np.asarray(z))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("bf16")
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in f)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], cwd=root, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(out / "results.json") as f:
    results = json.load(f)
  return results, dict(np.load(out / "arrays.npz"))


def _smooth(v):
  return np.convolve(v, np.ones(SMOOTH) / SMOOTH, mode="valid")


@pytest.mark.slow  # the three 300-step trainings: ~3.5 min on 2 CPU cores
def test_bfloat16_loss_curve_matches_float32_within_seed_noise(runs):
  _, a = runs
  f32, f32_seed1, bf16 = a["f32_loss"], a["f32_seed1_loss"], a["bf16_loss"]
  assert np.all(np.isfinite(bf16)) and len(bf16) == STEPS
  # Training works in both: the loss falls far below its start (~1.0; the output layer
  # starts at zero, so the first loss is E|z|^2 in either precision).
  assert f32[-LAST:].mean() < 0.3 * f32[:10].mean() and bf16[-LAST:].mean() < 0.3 * bf16[:10].mean()
  gap = abs(bf16[-LAST:].mean() - f32[-LAST:].mean())
  seeds = abs(f32_seed1[-LAST:].mean() - f32[-LAST:].mean())
  assert gap < LOSS_TOL, (gap, seeds)
  curve_gap = np.abs(_smooth(bf16) - _smooth(f32))[100:].max()
  curve_seeds = np.abs(_smooth(f32_seed1) - _smooth(f32))[100:].max()
  assert curve_gap < CURVE_TOL, (curve_gap, curve_seeds)
  # The tolerances are the scale of seed-to-seed noise, not far above it.
  assert seeds > 0.1 * LOSS_TOL and curve_seeds > 0.1 * CURVE_TOL


@pytest.mark.slow  # the three 300-step trainings: ~3.5 min on 2 CPU cores
def test_bfloat16_run_keeps_parameters_optimizer_and_ema_in_float32(runs):
  results, a = runs
  assert results["model_dtypes"] == ["float32", "bfloat16"]
  for part in ("params", "opt_state", "ema_params"):
    assert results["state_dtypes_bf16_run"][part] == ["float32"], part
  # The bfloat16 network computes in bfloat16: same parameters and inputs, an output
  # off by bfloat16 rounding (not float32's ~1e-7, not more than a few 2^-9).
  f32, bf16 = a["score_float32_net"], a["score_bfloat16_net"]
  assert f32.dtype == bf16.dtype == np.float32  # outputs stay float32
  rel = np.sqrt(np.mean((bf16 - f32) ** 2) / np.mean(f32 ** 2))
  assert NET_TOL[0] < rel < NET_TOL[1], rel


@pytest.mark.slow  # the three 300-step trainings: ~3.5 min on 2 CPU cores
@pytest.mark.parametrize("trained", ["float32", "bfloat16"])
def test_checkpoint_samples_in_the_other_precision(runs, trained):
  results, a = runs
  assert results[f"restored_equal_{trained}"]  # the other precision's template restores it exactly
  same = a[f"{trained}_ckpt_{trained}_net"]
  other_dtype = "bfloat16" if trained == "float32" else "float32"
  other = a[f"{trained}_ckpt_{other_dtype}_net"]
  assert np.all(np.isfinite(other))
  rms = np.sqrt(np.mean(same ** 2))
  rel = np.sqrt(np.mean((other - same) ** 2)) / rms
  assert rel < SAMPLE_TOL, rel
  # Against the scale of a real difference: other latents give other samples.
  base = a["float32_ckpt_float32_net"]
  other_z = a["float32_ckpt_float32_net_other_z"]
  assert np.sqrt(np.mean((other_z - base) ** 2) / np.mean(base ** 2)) > 10 * SAMPLE_TOL


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  worker(sys.argv[1])
