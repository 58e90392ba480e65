"""Training pipeline end to end through main.py: files, resume after SIGKILL, errors."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import toy
from score_jax.run import checkpoints
from score_jax.run import evaluate
from score_jax.run import builders
from score_jax.run import plan as plan_lib
from score_jax.run import train
from score_jax.run import state as run_state
from score_jax.run import sample as sample_mode
from score_jax.run.settings import from_config as S

from helpers import env as _env, toy_mode_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny but not instantaneous toy run: enough work per step that a kill lands mid-run.
TINY = [
    "--config.training.batch_size=64",
    "--config.training.log_freq=1",
    "--config.training.eval_freq=1000000",
    "--config.model.hidden_sizes=(64,64)",
    "--config.model.num_scales=20",
    "--config.sampling.batch_size=64",
]


def _cmd(workdir, *overrides):
  return [sys.executable, os.path.join(ROOT, "main.py"), "--config=" + os.path.join(ROOT, "configs/toy.py"),
          f"--workdir={workdir}", "--mode=train", *TINY, *overrides]


def _run(workdir, *overrides, devices=4):
  proc = subprocess.run(_cmd(workdir, *overrides), env=_env(devices), cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _final_params(workdir):
  """The newest checkpoint, restored with the config the run saved."""
  config = ml_collections.ConfigDict(json.load(open(os.path.join(workdir, "config.json"))))
  setup = plan_lib.make_plan(S(config))
  template = run_state.init_state(setup, jax.random.PRNGKey(1))
  ck = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  state = ck.restore(ck.latest_step(), template)
  ck.close()
  return state


def _losses(workdir):
  by_step = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      by_step[r["step"]] = r["loss"]  # a step logged twice (before a kill, after resume) keeps the last
  return [by_step[k] for k in sorted(by_step)]


def test_train_end_to_end_on_four_devices(tmp_path):
  workdir = str(tmp_path / "run")
  _run(workdir, "--config.training.n_iters=6", "--config.training.snapshot_freq=3",
       "--config.training.snapshot_freq_for_preemption=2")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  assert cfg["training"]["n_iters"] == 6 and cfg["model"]["hidden_sizes"] == [64, 64]
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(e.startswith("events.out.tfevents") for e in events)
  samples = np.load(os.path.join(workdir, "samples", "step_6.npz"))
  assert samples["samples"].shape == (64, 2) and np.all(np.isfinite(samples["samples"]))
  assert int(samples["nfe"]) == 20
  with open(os.path.join(workdir, "samples", "step_6.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert len(_losses(workdir)) == 6
  # A second invocation finds the run finished and trains nothing more.
  _run(workdir, "--config.training.n_iters=6", "--config.training.snapshot_freq=3")
  assert len(_losses(workdir)) == 6


@pytest.mark.slow  # three main.py runs, ~45 s on 2 CPU cores; the in-process resume tests (SIGTERM, phema, fsdp) stay fast
def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
  """N steps straight == killed (mid-checkpoint likely) and resumed runs."""
  n = 40
  common = [f"--config.training.n_iters={n}", "--config.training.snapshot_freq=100000",
            "--config.training.snapshot_sampling=False", "--config.model.hidden_sizes=(128,128)",
            "--config.training.batch_size=128"]
  straight = str(tmp_path / "straight")
  _run(straight, *common, "--config.training.snapshot_freq_for_preemption=20", devices=2)

  killed = str(tmp_path / "killed")
  # Save at every step (asynchronously), so a kill very likely hits a write in progress.
  args = _cmd(killed, *common, "--config.training.snapshot_freq_for_preemption=1")
  kills = 0
  for target in (20,):
    proc = subprocess.Popen(args, env=_env(2), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckdir = os.path.join(killed, "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      steps = [int(s) for s in os.listdir(ckdir) if s.isdigit()] if os.path.isdir(ckdir) else []
      if steps and max(steps) >= target:
        break
      time.sleep(0.02)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kills += 1
    proc.wait()
  assert kills == 1, "the run finished before it could be killed; make it slower"
  _run(killed, *common, "--config.training.snapshot_freq_for_preemption=1", devices=2)

  a = _final_params(straight)
  b = _final_params(killed)
  assert int(a.step) == int(b.step) == n
  for x, y in zip(jax.tree.leaves((a.params, a.ema_params, a.opt_state)),
                  jax.tree.leaves((b.params, b.ema_params, b.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  np.testing.assert_array_equal(_losses(straight), _losses(killed))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "run")
  args = _cmd(workdir, "--config.training.n_iters=100000", "--config.training.snapshot_freq=100000",
              "--config.training.snapshot_freq_for_preemption=100000",
              "--config.training.snapshot_sampling=False")
  proc = subprocess.Popen(args, env=_env(1), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 100000
  # One line of its own (not glued to the progress bar) names the saved step; the lock is gone.
  assert re.search(rf"(^|\n)W\S* \S+ \d+ train\.py:\d+\] SIGTERM: saved checkpoint {steps[0]} ", err)
  assert not os.path.exists(os.path.join(workdir, ".lock"))


def _cache_report(stderr):
  """(loaded, stored) from main.py's closing 'Compilation cache: ...' log line."""
  line = [l for l in stderr.splitlines() if "programs loaded" in l][-1]
  # JAX's estimate of the seconds saved is negative when loading took longer than compiling.
  m = re.search(r"(\d+) programs loaded \((-?[\d.]+) s of compiling saved\), (\d+) stored", line)
  return int(m.group(1)), int(m.group(3))


@pytest.mark.slow  # two main.py runs: ~15 s on 2 CPU cores
def test_compilation_cache_serves_a_second_run(tmp_path, monkeypatch):
  """A second run of the same config loads every compiled program and computes the same."""
  cache = tmp_path / "cache"
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the toy compiles fast
  args = ("--config.training.n_iters=4", "--config.training.snapshot_sampling=False",
          f"--compilation_cache={cache}")
  loaded, stored = _cache_report(_run(str(tmp_path / "a"), *args, devices=1).stderr)
  assert loaded == 0 and stored >= 2  # at least the initializer and the training step
  assert len(os.listdir(cache)) >= stored
  loaded2, stored2 = _cache_report(_run(str(tmp_path / "b"), *args, devices=1).stderr)
  assert loaded2 >= stored and stored2 == 0
  a, b = _final_params(str(tmp_path / "a")), _final_params(str(tmp_path / "b"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_compilation_cache_settings(tmp_path, monkeypatch, caplog):
  from score_jax.run import entry as run
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  default = run.default_compilation_cache_dir()
  assert default.startswith(str(tmp_path / "xdg" / "score_jax" / "jax_cache"))
  assert run.enable_compilation_cache("none") is None and run.enable_compilation_cache("") is None
  blocked = tmp_path / "file"
  blocked.write_text("not a folder")
  with caplog.at_level("WARNING"):
    assert run.enable_compilation_cache(str(blocked / "cache")) is None  # the run goes on
  assert "cannot create" in caplog.text and blocked.read_text() == "not a folder"


def test_non_finite_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path,
                                                                               fast_compile):
  config = toy.get_config()
  workdir = str(tmp_path / "run")
  with config.unlocked():
    config.model.hidden_sizes = (32,)
    config.training.batch_size = 16
    config.training.n_iters = 4
    config.training.snapshot_freq = 2
    config.training.snapshot_sampling = False
  train.train_and_evaluate(S(config), workdir)
  good = _final_params(workdir)
  with config.unlocked():
    config.training.n_iters = 8
    config.optim.lr = float("inf")  # the first update makes the parameters non-finite
  with pytest.raises(train.NonFiniteLossError, match="non-finite"):
    train.train_and_evaluate(S(config), workdir)
  ck = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  steps = ck.all_steps()
  ck.close()
  assert max(steps) <= 6
  after = _final_params(workdir)
  for x in jax.tree.leaves(after.params):
    assert np.all(np.isfinite(np.asarray(x)))
  if max(steps) == 4:
    for x, y in zip(jax.tree.leaves(good.params), jax.tree.leaves(after.params)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("change,match", [
    ({"training.sde": "cosine"}, "Unknown training.sde 'cosine'"),
    ({"model.name": "unet9000"}, "Unknown model 'unet9000'"),
    ({"training.batch_size": 6}, "does not divide across the 4 devices"),
    ({"data.dataset": "nope"}, "nope"),
    ({"model.ema_rate": 1.5}, "ema_rate"),
    ({"sampling.method": "magic"}, "Unknown sampling.method 'magic'"),
    ({"training.continuous": False, "training.sde": "subvpsde"}, "Discrete training"),
    ({"training.sharding": "zero3"}, "Unknown training.sharding 'zero3'"),
    ({"training.sharding": "fsdp", "training.fsdp_size": 3}, "fsdp_size = 3 does not divide"),
    ({"training.fsdp_size": 2}, "with training.sharding = 'fsdp'"),
])
def test_bad_config_fails_before_compiling(tmp_path, change, match):
  config = toy.get_config()
  with config.unlocked():
    for k, v in change.items():
      section, key = k.split(".")
      config[section][key] = v
  with pytest.raises(ValueError, match=match):
    plan_lib.make_plan(S(config))


def test_image_size_must_match_the_network():
  from configs import digits
  config = digits.get_config()
  with config.unlocked():
    config.data.image_size = 12
  with pytest.raises(ValueError, match="image_size"):
    plan_lib.make_plan(S(config))


def test_train_step_is_data_parallel_and_matches_single_device():
  """The loss of the sharded step equals the loss computed on one device."""
  config = toy.get_config()
  with config.unlocked():
    config.model.hidden_sizes = (32,)
    config.training.batch_size = 8
  setup = plan_lib.make_plan(S(config))
  assert setup.mesh.devices.size == jax.device_count() == 4
  state = run_state.init_state(setup, jax.random.PRNGKey(0))
  x = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
  y = np.zeros((8,), np.int32)
  xs, ys = train.global_batch(setup, {"image": x, "label": y})
  assert len(xs.sharding.device_set) == 4
  key = jax.random.PRNGKey(5)
  loss_fn = builders.get_loss_fn(S(config), setup.sde, setup.model, train=True)
  expected = loss_fn(jax.device_get(state.params), jax.random.fold_in(key, 0), jnp.asarray(x), None)[0]
  step = train.make_train_step(setup)
  new_state, metrics = step(state, xs, ys, jax.device_put(key, setup.replicated))
  np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5)
  assert int(new_state.step) == 1


def test_train_step_applies_adam_and_ema_and_skips_a_non_finite_step():
  """A finite step equals optax's update and the EMA computed here from the step's own
  gradient; a step with a NaN in the batch leaves every array of the state as it was."""
  config = toy.get_config()
  with config.unlocked():
    config.model.hidden_sizes = (32,)
    config.training.batch_size = 8
    config.optim.warmup = 0  # so that the first step moves the parameters
  setup = plan_lib.make_plan(S(config))
  step = train.make_train_step(setup)
  state = run_state.init_state(setup, jax.random.PRNGKey(0))
  before = jax.device_get(state)  # the step donates its state
  x = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
  y = np.zeros((8,), np.int32)
  key = jax.random.PRNGKey(5)
  loss_fn = builders.get_loss_fn(S(config), setup.sde, setup.model, train=True)
  grads = jax.grad(lambda p: loss_fn(p, jax.random.fold_in(key, 0), jnp.asarray(x), None)[0])(
      before.params)
  updates, opt_state = setup.tx.update(grads, before.opt_state, before.params)
  params = optax.apply_updates(before.params, updates)
  assert config.model.ema_warmup  # the first update's decay: (1 + 1) / (10 + 1)
  rate = min(float(config.model.ema_rate), 2 / 11)
  ema = jax.tree.map(lambda e, p: rate * e + (1 - rate) * p, before.ema_params, params)

  xs, ys = train.global_batch(setup, {"image": x, "label": y})
  state, metrics = step(state, xs, ys, jax.device_put(key, setup.replicated))
  assert bool(metrics["finite"]) and int(state.step) == 1
  for want, got in ((params, state.params), (opt_state, state.opt_state), (ema, state.ema_params)):
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
  assert any(np.any(np.asarray(a) != np.asarray(b))
             for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(state.params)))

  good = jax.device_get(state)
  x[3, 1] = np.nan
  xs, ys = train.global_batch(setup, {"image": x, "label": y})
  state, metrics = step(state, xs, ys, jax.device_put(key, setup.replicated))
  assert not bool(metrics["finite"])
  assert jax.tree.structure(state) == jax.tree.structure(good)
  for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_ema_warmup_follows_the_pytorch_reference():
  """model.ema_warmup: the decay of each update is that of the PyTorch reference's
  ExponentialMovingAverage(decay, use_num_updates=True), replayed here update by update;
  off, the constant ema_rate; with EDM's half-life, the smaller of the two."""
  def reference(rate, updates):  # models/ema.py's update(): count, then cap
    num_updates, out = 0, []
    for _ in range(updates):
      num_updates += 1
      out.append(min(rate, (1 + num_updates) / (10 + num_updates)))
    return out

  config = toy.get_config()
  assert config.model.ema_warmup and config.model.ema_rate == 0.999
  steps = [0, 1, 2, 5, 100, 8988, 8990, 20000]
  want = reference(0.999, max(steps) + 1)
  decay = builders.get_ema_decay(S(config))
  for k in steps:
    np.testing.assert_allclose(float(decay(jnp.asarray(k, jnp.int32))), want[k], rtol=1e-6)
  assert want[0] == 2 / 11 and want[8988] < 0.999 == want[8990]  # cap >= 0.999 from n = 8990
  with config.unlocked():
    config.model.ema_warmup = False
  assert builders.get_ema_decay(S(config))(jnp.asarray(3)) == 0.999
  with config.unlocked():
    config.model.ema_warmup = True
    config.model.ema_halflife_kimg, config.model.ema_rampup_ratio = 1.0, 0.0
  edm = 0.5 ** (config.training.batch_size / 1000.0)
  decay = builders.get_ema_decay(S(config))
  for k in (0, 50, 5000):
    np.testing.assert_allclose(float(decay(jnp.asarray(k, jnp.int32))),
                               min(edm, (2 + k) / (11 + k)), rtol=1e-6)


def _toy_setup(batch, microbatches, hidden=(32,)):
  config = toy.get_config()
  with config.unlocked():
    config.model.hidden_sizes = hidden
    config.training.batch_size = batch
    config.training.microbatches = microbatches
  return config, plan_lib.make_plan(S(config))


def test_microbatches_accumulate_the_gradient_of_the_batch_mean_loss():
  """m micro-batches on 4 devices: loss and gradient are the means over micro-batch j =
  examples j, j + m, ... with key j of split(fold_in(key, step), m), computed here
  independently on one device by slicing."""
  m, b = 2, 16
  config, setup = _toy_setup(b, m)
  state = run_state.init_state(setup, jax.random.PRNGKey(0))
  x = np.random.default_rng(0).normal(size=(b, 2)).astype(np.float32)
  xs, ys = train.global_batch(setup, {"image": x, "label": np.zeros((b,), np.int32)})
  key = jax.random.PRNGKey(5)
  params = jax.device_get(state.params)
  grad_fn = jax.value_and_grad(builders.get_loss_fn(S(config), setup.sde, setup.model, train=True),
                               has_aux=True)
  keys = jax.random.split(jax.random.fold_in(key, 0), m)
  parts = [grad_fn(params, keys[j], jnp.asarray(x[j::m]), None) for j in range(m)]
  loss = np.mean([float(p[0][0]) for p in parts])
  grads = jax.tree.map(lambda *g: sum(g) / m, *[p[1] for p in parts])
  _, metrics = train.make_train_step(setup)(state, xs, ys, jax.device_put(key, setup.replicated))
  np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grads)), rtol=1e-5)
  # Contiguous halves give other numbers, so the check above can tell the assignment apart.
  halves = [grad_fn(params, keys[j], jnp.asarray(x[j * b // m:(j + 1) * b // m]), None)[0][0]
            for j in range(m)]
  assert abs(float(np.mean(halves)) - loss) > 1e-4


def test_microbatches_lower_the_step_memory_and_are_checked():
  """One micro-batch's activations at a time: XLA plans less temporary memory."""
  def temp_bytes(m):
    _, setup = _toy_setup(4096, m, hidden=(256, 256))
    state = jax.eval_shape(lambda: run_state.init_state(setup, jax.random.PRNGKey(0)))
    args = (state, jax.ShapeDtypeStruct((4096, 2), jnp.float32),
            jax.ShapeDtypeStruct((4096,), jnp.int32), jax.random.PRNGKey(0))
    return train.make_train_step(setup).lower(*args).compile().memory_analysis().temp_size_in_bytes

  one, four = temp_bytes(1), temp_bytes(4)
  assert four < 0.5 * one, (four, one)
  for m, b in ((0, 16), (3, 16), (4, 8)):  # 4 devices: batch 8 cannot hold 4 x 4
    config = toy.get_config()
    with config.unlocked():
      config.training.batch_size, config.training.microbatches = b, m
    with pytest.raises(ValueError, match="training.microbatches"):
      plan_lib.make_plan(S(config))


@pytest.mark.slow  # 400 steps and 500 PC steps: 1-2.5 minutes on 2 CPU cores
def test_toy_quickstart_learns_the_mode_weights(tmp_path):
  """configs/toy.py as shipped (EMA 0.999 with warm-up), 400 steps: the 2:1 alternating mode
  weights, the figure README.md quotes (measured 0.013 on one device; without the EMA
  warm-up the same run samples its initialization's noise).

  2048 samples: a weight near 1/6 has standard error sqrt(p (1 - p) / n) =
  0.008; we allow 0.035 (about 4 SE plus the model's own error after a short
  run). The weights alternate 2:1, so a model that learned only the support
  (uniform weights, 1/8 each, off by 0.042) fails.
  """
  weights, want, near = toy_mode_weights(toy.get_config(), 400, tmp_path)
  np.testing.assert_allclose(weights, want, atol=0.035)
  # Samples sit on the modes: 98.9% of the data lie within 3 std of their mean
  # (2-D: 1 - exp(-4.5)); after 400 steps about a quarter still lie between modes.
  assert near > 0.6


@pytest.mark.parametrize("sharding", [
    "replicated",
    # ~50 s more: the train state split over the two processes' devices.
    pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_processes_match_one_process(tmp_path, sharding):
  """jax.distributed on localhost (CPU collectives through gloo): two processes
  with one device each give the losses of one process with two devices and the
  same global batch (each process reads its half of every batch); with
  training.sharding = 'fsdp' each process holds half of the train state."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  common = ["--config.training.n_iters=4", "--config.training.snapshot_freq=4",
            "--config.training.snapshot_sampling=False", "--config.training.batch_size=32",
            f"--config.training.sharding={sharding}"]
  single = str(tmp_path / "single")
  _run(single, *common, devices=2)
  multi = str(tmp_path / "multi")
  procs = [subprocess.Popen(_cmd(multi, *common, f"--coordinator_address=localhost:{port}",
                                 "--num_processes=2", f"--process_id={i}"),
                            env=_env(1), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-5)
  assert len(_losses(multi)) == 4
