"""Eval and sample modes end to end: files, metrics, resume after SIGKILL, closed forms."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import toy
from score_jax import analytic, builders, evaluate, train
from score_jax.data import toy as toy_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny toy run: 20 steps, checkpoints at 10 and 20 (indices 1 and 2).
TOY = {
    "training.batch_size": 64, "training.n_iters": 20, "training.snapshot_freq": 10,
    "training.snapshot_freq_for_preemption": 10, "training.log_freq": 10,
    "training.eval_freq": 10**6, "training.snapshot_sampling": False,
    "model.hidden_sizes": (32, 32), "model.num_scales": 20,
    "eval.begin_ckpt": 1, "eval.end_ckpt": 2, "eval.batch_size": 64,
    "eval.enable_loss": False, "eval.enable_bpd": False, "eval.enable_sampling": True,
    "eval.num_samples": 100, "eval.wait_timeout_s": 0.0,
}


def _config(base=TOY, **changes):
  config = toy.get_config()
  with config.unlocked():
    for k, v in {**base, **changes}.items():
      section, key = k.split(".")
      config[section][key] = v
  return config


def _flags(overrides):
  out = []
  for k, v in overrides.items():
    v = f"({','.join(map(str, v))})" if isinstance(v, tuple) else v
    out.append(f"--config.{k}={v}")
  return out


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  """A workdir trained for 20 steps through the real training loop."""
  workdir = str(tmp_path_factory.mktemp("toy") / "run")
  train.train_and_evaluate(_config(), workdir)
  return workdir


def _fresh_copy(toy_run, tmp_path):
  """The trained run's checkpoints in a new workdir (each test evaluates from scratch)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(os.path.join(toy_run, "checkpoints"), os.path.join(workdir, "checkpoints"))
  return workdir


def test_checkpoint_indices_map_to_steps():
  c = _config(**{"training.n_iters": 25, "eval.begin_ckpt": 1, "eval.end_ckpt": 9})
  assert evaluate.checkpoint_steps(c) == [(1, 10), (2, 20), (3, 25)]  # 3: the final step
  c = _config(**{"training.n_iters": 1_300_001, "training.snapshot_freq": 50_000,
                 "eval.begin_ckpt": 9, "eval.end_ckpt": 26})
  assert evaluate.checkpoint_steps(c)[0] == (9, 450_000)
  assert evaluate.checkpoint_steps(c)[-1] == (26, 1_300_000)
  with pytest.raises(ValueError, match="begin_ckpt must be >= 1"):
    evaluate.checkpoint_steps(_config(**{"eval.begin_ckpt": 0}))
  with pytest.raises(ValueError, match="after the end of training.*begin_ckpt=1 --config.eval.end_ckpt=2"):
    evaluate.checkpoint_steps(_config(**{"eval.begin_ckpt": 9, "eval.end_ckpt": 26}))


def test_wait_for_checkpoint_polls_times_out_and_gives_up_early(toy_run, tmp_path):
  src = os.path.join(toy_run, "checkpoints")
  ckdir = str(tmp_path / "checkpoints")
  os.makedirs(ckdir)
  with pytest.raises(evaluate.CheckpointWaitError, match="Waited"):
    evaluate.wait_for_checkpoint(ckdir, 10, timeout_s=0.3, poll_s=0.1, final_step=20)

  def write_later():  # a checkpoint appears, complete, while eval waits (rename is atomic)
    time.sleep(0.5)
    shutil.copytree(os.path.join(src, "10"), os.path.join(ckdir, "10.tmp"))
    os.rename(os.path.join(ckdir, "10.tmp"), os.path.join(ckdir, "10"))

  thread = threading.Thread(target=write_later)
  thread.start()
  start = time.monotonic()
  evaluate.wait_for_checkpoint(ckdir, 10, timeout_s=60, poll_s=0.1, final_step=20)
  thread.join()
  assert time.monotonic() - start < 30
  # Step 5 is not a snapshot and training moved past it: it will never appear.
  start = time.monotonic()
  with pytest.raises(evaluate.CheckpointWaitError, match="will not appear"):
    evaluate.wait_for_checkpoint(ckdir, 5, timeout_s=60, poll_s=0.1, final_step=20)
  assert time.monotonic() - start < 5


def _env(devices=4):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def test_eval_killed_midway_resumes_without_redoing_rounds(toy_run, tmp_path):
  workdir = _fresh_copy(toy_run, tmp_path)
  # Slow rounds (1000 predictor + 1000 corrector steps each) so that the kill lands mid-run.
  slow = {"eval.begin_ckpt": 2, "eval.num_samples": 1000, "eval.batch_size": 128,
          "model.num_scales": 1000, "sampling.corrector": "langevin"}
  args = [sys.executable, os.path.join(ROOT, "main.py"), "--config=" + os.path.join(ROOT, "configs/toy.py"),
          f"--workdir={workdir}", "--mode=eval", *_flags({**TOY, **slow})]
  proc = subprocess.Popen(args, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  out_dir = os.path.join(workdir, "eval", "ckpt_2")
  first = os.path.join(out_dir, "samples_0.npz")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not os.path.exists(first):
    time.sleep(0.01)
  assert proc.poll() is None, "eval finished or failed before the kill: " + proc.stderr.read()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  shards = sorted(f for f in os.listdir(out_dir) if f.startswith("samples_"))
  assert 1 <= len(shards) < 8 and not os.path.exists(os.path.join(workdir, "eval", "ckpt_2.json"))
  before = {f: os.stat(os.path.join(out_dir, f)).st_mtime_ns for f in shards}
  first_samples = np.load(first)["samples"]

  results = evaluate.eval(_config(**slow), workdir)  # the restart, in this process
  after = sorted(f for f in os.listdir(out_dir) if f.startswith("samples_") and f.endswith(".npz"))
  assert after == [f"samples_{r}.npz" for r in range(8)]
  for f, mtime in before.items():  # finished rounds were not redone
    assert os.stat(os.path.join(out_dir, f)).st_mtime_ns == mtime
  total = [np.load(os.path.join(out_dir, f))["samples"] for f in after]
  assert sum(len(s) for s in total) == 1000 and len(total[-1]) == 1000 - 7 * 128
  samples = np.concatenate(total)
  assert np.all(np.isfinite(samples)) and samples.shape == (1000, 2)
  assert len(np.unique(samples[:, 0])) == 1000  # no round was written twice
  np.testing.assert_array_equal(np.load(first)["samples"], first_samples)
  result = json.load(open(os.path.join(workdir, "eval", "ckpt_2.json")))
  assert result == results[0]
  assert result["num_samples"] == 1000 and result["step"] == 20 and result["sampling_nfe"] == 2000
  assert os.path.exists(os.path.join(out_dir, "samples.png"))
  assert not any(".tmp" in f for f in os.listdir(out_dir))
  # A third run finds the checkpoint complete and does nothing.
  json_path = os.path.join(workdir, "eval", "ckpt_2.json")
  mtime = os.stat(json_path).st_mtime_ns
  assert evaluate.eval(_config(**slow), workdir) == results
  assert os.stat(json_path).st_mtime_ns == mtime


def test_eval_batch_must_divide_devices(toy_run, tmp_path):
  workdir = _fresh_copy(toy_run, tmp_path)
  with pytest.raises(ValueError, match="eval.batch_size = 6 must be a positive multiple of the "
                                       "device count 4"):
    evaluate.eval(_config(**{"eval.batch_size": 6}), workdir)


def test_sample_mode_generate_and_interpolate_toy(toy_run, tmp_path):
  workdir = _fresh_copy(toy_run, tmp_path)
  config = _config(**{"sample.num": 10})
  paths = evaluate.sample(config, workdir)
  out = np.load(paths["npz"])
  assert out["samples"].shape == (10, 2) and np.all(np.isfinite(out["samples"]))
  assert paths["png"].endswith("generate_step20.png") and os.path.exists(paths["png"])
  config = _config(**{"sample.task": "interpolate", "sample.interpolation_steps": 5,
                      "sampling.rtol": 1e-3, "sampling.atol": 1e-3})
  out = np.load(evaluate.sample(config, workdir)["npz"])
  assert out["samples"].shape == (5, 2) and out["latents"].shape == (5, 2)
  # slerp keeps the endpoints: the path starts and ends at the two prior draws.
  z = np.asarray(builders.get_sde(config).prior_sampling(
      jax.random.fold_in(jax.random.PRNGKey(config.seed), 20), (2, 2)))
  np.testing.assert_allclose(out["latents"][[0, -1]], z, rtol=1e-5, atol=1e-6)


def test_slerp_endpoints_and_norm():
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((2, 3, 4, 4))
  path = evaluate.slerp(a, b, np.linspace(0, 1, 7))
  np.testing.assert_allclose(path[0], a, atol=1e-6)
  np.testing.assert_allclose(path[-1], b, atol=1e-6)
  norms = np.linalg.norm(path.reshape(7, -1), axis=1)
  assert norms.min() > 0.8 * min(np.linalg.norm(a), np.linalg.norm(b))  # no collapse to 0
