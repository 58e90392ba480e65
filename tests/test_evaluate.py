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

from score_jax import analytic
from score_jax.data import datasets
from score_jax.run import checkpoints
from score_jax.run import evaluate
from score_jax.run import programs
from score_jax.run import builders
from score_jax.run import plan as plan_lib
from score_jax.run import state as run_state
from score_jax.run import sample as sample_mode
from score_jax.run.settings import from_config as S
from score_jax.data import toy as toy_data

from helpers import TINY_TOY, config, copy_run, env as _env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The session's tiny toy run (helpers.TINY_TOY: 20 steps, checkpoints at 10 and 20, indices
# 1 and 2) with these eval settings.
TOY = {
    **TINY_TOY,
    "eval.begin_ckpt": 1, "eval.end_ckpt": 2, "eval.batch_size": 64,
    "eval.enable_loss": False, "eval.enable_bpd": False, "eval.enable_sampling": True,
    "eval.num_samples": 100, "eval.wait_timeout_s": 0.0,
}


def _config(base=TOY, **changes):
  return config("toy", base, **changes)


def _flags(overrides):
  out = []
  for k, v in overrides.items():
    v = f"({','.join(map(str, v))})" if isinstance(v, tuple) else v
    out.append(f"--config.{k}={v}")
  return out


@pytest.fixture
def toy_run(toy_run):
  """The session's toy run (conftest.py), trained with TOY's training settings: its workdir."""
  return toy_run[0]


def _fresh_copy(toy_run, tmp_path):
  """The trained run's checkpoints in a new workdir (each test evaluates from scratch)."""
  return copy_run(toy_run, str(tmp_path / "run"), checkpoints_only=True)


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
    checkpoints.wait_for_checkpoint(ckdir, 10, timeout_s=0.3, poll_s=0.1, final_step=20)

  def write_later():  # a checkpoint appears, complete, while eval waits (rename is atomic)
    time.sleep(0.5)
    shutil.copytree(os.path.join(src, "10"), os.path.join(ckdir, "10.tmp"))
    os.rename(os.path.join(ckdir, "10.tmp"), os.path.join(ckdir, "10"))

  thread = threading.Thread(target=write_later)
  thread.start()
  start = time.monotonic()
  checkpoints.wait_for_checkpoint(ckdir, 10, timeout_s=60, poll_s=0.1, final_step=20)
  thread.join()
  assert time.monotonic() - start < 30
  # Step 5 is not a snapshot and training moved past it: it will never appear.
  start = time.monotonic()
  with pytest.raises(evaluate.CheckpointWaitError, match="will not appear"):
    checkpoints.wait_for_checkpoint(ckdir, 5, timeout_s=60, poll_s=0.1, final_step=20)
  assert time.monotonic() - start < 5


@pytest.mark.slow  # ~19 s on 2 CPU cores (an eval process killed and rerun)
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

  # The restart, in this process, with the loss and likelihood stages on as well (they do not
  # change what the shards hold, so finished rounds stay valid).
  slow.update({"eval.enable_loss": True, "eval.enable_bpd": True, "eval.bpd_passes": 1,
               "eval.likelihood_rtol": 1e-3, "eval.likelihood_atol": 1e-3})
  results = evaluate.run(S(_config(**slow)), workdir)
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
  for key in ("eval_loss", "nll_nats_per_dim", "nll_nats_per_dim_stderr", "samples_per_s"):
    assert np.isfinite(result[key]), key
  assert result["likelihood_examples"] == 8192 and result["eval_loss_examples"] == 8192
  events = os.listdir(os.path.join(workdir, "eval", "tensorboard"))
  assert any(e.startswith("events.out.tfevents") for e in events)
  assert os.path.exists(os.path.join(out_dir, "samples.png"))
  assert not any(".tmp" in f for f in os.listdir(out_dir))
  # A third run finds the checkpoint complete and does nothing.
  json_path = os.path.join(workdir, "eval", "ckpt_2.json")
  mtime = os.stat(json_path).st_mtime_ns
  assert evaluate.run(S(_config(**slow)), workdir) == results
  assert os.stat(json_path).st_mtime_ns == mtime


def test_eval_batch_must_divide_devices(toy_run, tmp_path):
  workdir = _fresh_copy(toy_run, tmp_path)
  with pytest.raises(ValueError, match="eval.batch_size = 6 must be a positive multiple of the "
                                       "device count 4"):
    evaluate.run(S(_config(**{"eval.batch_size": 6})), workdir)


def test_sample_mode_generate_and_interpolate_toy(toy_run, tmp_path):
  workdir = _fresh_copy(toy_run, tmp_path)
  config = _config(**{"sample.num": 10})
  paths = sample_mode.run(S(config), workdir)
  out = np.load(paths["npz"])
  assert out["samples"].shape == (10, 2) and np.all(np.isfinite(out["samples"]))
  # Named by task, step, sampler and NFE, with the sampler's settings beside them.
  nfe = int(out["nfe"])
  assert os.path.basename(paths["png"]) == f"generate_step20_pc_nfe{nfe}.png"
  assert os.path.exists(paths["png"])
  with open(paths["json"]) as f:
    meta = json.load(f)
  assert (meta["sampler"], meta["nfe"], meta["step"], meta["num"]) == ("pc", nfe, 20, 10)
  assert meta["sampling"]["method"] == "pc"
  # Never overwritten: the next name of the same output gets a suffix.
  out_dir = os.path.dirname(paths["png"])
  assert sample_mode.output_base(out_dir, "generate", 20, "pc", nfe) == paths["png"][:-4] + "_2"
  assert sample_mode.output_base(out_dir, "generate", 20, "heun", nfe).endswith(
      f"generate_step20_heun_nfe{nfe}")
  config = _config(**{"sample.task": "interpolate", "sample.interpolation_steps": 5,
                      "sampling.rtol": 1e-3, "sampling.atol": 1e-3})
  out = np.load(sample_mode.run(S(config), workdir)["npz"])
  assert out["samples"].shape == (5, 2) and out["latents"].shape == (5, 2)
  # slerp keeps the endpoints: the path starts and ends at the two prior draws.
  z = np.asarray(builders.get_sde(S(config)).prior_sampling(
      jax.random.fold_in(jax.random.PRNGKey(config.seed), 20), (2, 2)))
  np.testing.assert_allclose(out["latents"][[0, -1]], z, rtol=1e-5, atol=1e-6)


def test_sample_mode_class_label_and_guidance(tmp_path):
  """A class-conditional toy network: labels are stored, and the guidance weight is applied."""
  workdir = str(tmp_path / "run")
  cond = {"model.num_classes": 8, "sample.num": 8, "sample.class_label": 3}
  _save_initial_checkpoint(_config(**cond), workdir, 20)
  plain = np.load(sample_mode.run(S(_config(**cond)), workdir)["npz"])
  assert plain["labels"].tolist() == [3] * 8 and np.all(np.isfinite(plain["samples"]))
  guided = np.load(sample_mode.run(S(_config(**cond, **{"sampling.guidance_weight": 3.0})), workdir)["npz"])
  assert np.abs(guided["samples"] - plain["samples"]).max() > 1e-3
  with pytest.raises(ValueError, match="not a class of this model"):
    sample_mode.run(S(_config(**{**cond, "sample.class_label": 8})), workdir)


def test_slerp_endpoints_and_norm():
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((2, 3, 4, 4))
  path = sample_mode.slerp(a, b, np.linspace(0, 1, 7))
  np.testing.assert_allclose(path[0], a, atol=1e-6)
  np.testing.assert_allclose(path[-1], b, atol=1e-6)
  norms = np.linalg.norm(path.reshape(7, -1), axis=1)
  assert norms.min() > 0.8 * min(np.linalg.norm(a), np.linalg.norm(b))  # no collapse to 0


def _digits_config(**changes):
  from configs import digits
  config = digits.get_config()
  base = {
      "training.batch_size": 8, "training.n_iters": 10, "training.snapshot_freq": 10,
      "model.nf": 8, "model.ch_mult": (1,), "model.num_res_blocks": 1, "model.attn_resolutions": (),
      "model.dropout": 0.0, "model.num_scales": 4,
      "eval.begin_ckpt": 1, "eval.end_ckpt": 1, "eval.batch_size": 8, "eval.num_samples": 12,
      "eval.enable_loss": True, "eval.enable_bpd": False, "eval.enable_sampling": True,
      "eval.inception_batch_size": 8, "eval.stats_num_images": 8, "eval.kid_dataset_features": 8,
      "eval.inception_precision": "default", "eval.wait_timeout_s": 0.0,
  }
  with config.unlocked():
    for k, v in {**base, **changes}.items():
      section, key = k.split(".")
      config[section][key] = v
  return config


def _save_initial_checkpoint(config, workdir, step):
  """A checkpoint of freshly initialized parameters (no training: the network's values do not matter)."""
  from score_jax.run import checkpoints
  setup = plan_lib.make_plan(S(config))
  ck = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  ck.save(step, run_state.init_state(setup, jax.random.PRNGKey(0)))
  ck.close()


@pytest.mark.slow  # ~2.5 min on 2 CPU cores: Inception at 299 px, and FID's 2048-d matrix roots
def test_digits_eval_fid_with_random_inception(tmp_path):
  from score_jax.metrics import inception
  workdir = str(tmp_path / "run")
  weights = str(tmp_path / "inception_random.npz")
  config = _digits_config(**{"eval.inception_path": weights})
  _save_initial_checkpoint(config, workdir, 10)
  with pytest.raises(FileNotFoundError, match="score_jax.convert.inception"):
    evaluate.run(S(config), workdir)  # configured but missing: fails before any work
  inception.save_inception_params(weights, inception.random_inception_params(0))
  (result,) = evaluate.run(S(config), workdir)
  for key in ("eval_loss", "fid", "inception_score", "kid"):
    assert np.isfinite(result[key]), key
  assert result["num_samples"] == 12 and result["fid_dataset_images"] == 8
  out_dir = os.path.join(workdir, "eval", "ckpt_1")
  shards = [np.load(os.path.join(out_dir, f"samples_{r}.npz"))["samples"] for r in range(2)]
  assert [s.shape for s in shards] == [(8, 8, 8, 1), (4, 8, 8, 1)] and shards[0].dtype == np.uint8
  feats = [np.load(os.path.join(out_dir, f"features_{r}.npz")) for r in range(2)]
  assert feats[1]["pool"].shape == (4, 2048) and feats[1]["logits"].shape == (4, 1008)
  stats = os.path.join(workdir, "eval", "stats_digits_8_tf1.npz")
  assert os.path.exists(stats)
  with open(os.path.join(out_dir, "samples.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  events = os.listdir(os.path.join(workdir, "eval", "tensorboard"))
  assert any(e.startswith("events.out.tfevents") for e in events)
  # Sample mode on the same checkpoint: inpainting keeps the known (right) half of given digits.
  from score_jax.data import datasets
  given = next(iter(plan_lib.get_dataset(S(config), "test", evaluation=True, raw=True,
                                         batch_size=4)))["image"]
  np.savez(str(tmp_path / "given.npz"), images=given)
  sample_config = _digits_config(**{"sample.task": "inpaint", "sample.num": 4,
                                    "sample.images_path": str(tmp_path / "given.npz"),
                                    "sample.mask": "left_half"})
  out = np.load(sample_mode.run(S(sample_config), workdir)["npz"])
  assert out["images"].shape == (4, 8, 8, 1)
  np.testing.assert_array_equal(out["images"][:, :, 4:], given[:, :, 4:])  # left half generated
  # Interpolation between two given digits through the probability-flow ODE: encoding then
  # decoding the endpoints gives the digits back.
  interp_config = _digits_config(**{"sample.task": "interpolate", "sample.interpolation_steps": 5,
                                    "sample.images_path": str(tmp_path / "given.npz"),
                                    "sampling.rtol": 1e-4, "sampling.atol": 1e-4})
  out = np.load(sample_mode.run(S(interp_config), workdir)["npz"])
  assert out["images"].shape == (5, 8, 8, 1) and out["latents"].shape == (5, 8, 8, 1)
  np.testing.assert_allclose(out["images"][[0, -1]].astype(int), given[:2].astype(int), atol=1)


def _mixture(mix):
  """analytic.GaussianMixture of the toy data module's isotropic mixture."""
  return analytic.GaussianMixture.create(mix.weights, mix.means, stds=mix.stds[:, None] * np.ones((1, 2)))


def _analytic_factory(sde):
  return lambda params, y: analytic.score_fn(params, sde)


def test_toy_nll_through_eval_matches_closed_form(tmp_path):
  """-log p(x) / D of the exact toy-mixture score, through the eval path, vs the mixture's density."""
  config = _config(**{"eval.enable_sampling": False, "eval.enable_bpd": True, "eval.bpd_passes": 2,
                      "eval.batch_size": 1024, "eval.hutchinson": "exact"})
  setup = plan_lib.make_plan(S(config))
  mix = _mixture(toy_data.GAUSSIAN_MIXTURE)
  result = evaluate.evaluate_params(S(config), str(tmp_path), mix, index=1, step=10, plan=setup,
                                    score_factory=_analytic_factory(setup.sde))
  from score_jax.data import datasets
  x = np.concatenate([b["image"] for b in plan_lib.get_dataset(S(config), "test", evaluation=True,
                                                                batch_size=8192)])
  eps = float(config.eval.likelihood_eps)
  exact = -np.asarray(analytic.log_prob(mix, setup.sde, jnp.asarray(x), jnp.full((len(x),), eps))) / 2
  assert result["likelihood_examples"] == len(x) == 8192
  # Exact trace: both passes solve the same ODE, up to solver tolerance (rtol 1e-5).
  np.testing.assert_allclose(result["nll_nats_per_dim_passes"], exact.mean(), atol=2e-3)
  np.testing.assert_allclose(result["nll_nats_per_dim"], exact.mean(), atol=2e-3)
  np.testing.assert_allclose(result["nll_nats_per_dim_stderr"], exact.std() / np.sqrt(len(x)),
                             rtol=0.05)
  saved = json.load(open(os.path.join(str(tmp_path), "eval", "ckpt_1.json")))
  assert saved["nll_nats_per_dim"] == result["nll_nats_per_dim"]


def _digits_gaussian(config):
  """A diagonal Gaussian model of the centered digits (mean and std per pixel, fitted)."""
  from score_jax.data import datasets
  train_images = np.concatenate([b["image"] for b in plan_lib.get_dataset(S(
      config), "train", evaluation=True, raw=True, batch_size=1442)]).astype(np.float64)
  y = datasets.data_scaler(True)((train_images + 0.5) / 256.0).reshape(len(train_images), -1)
  mean, std = y.mean(0), y.std(0) + 0.05
  return analytic.GaussianMixture.create(np.ones(1), mean[None], stds=std[None]), mean, std


def test_digits_bits_per_dim_through_eval_matches_closed_form(tmp_path):
  """bits/dim of a Gaussian model on dequantized digits: the eval path vs the closed form.

  For a diagonal Gaussian N(m, s^2) at t = eps and y = 2 (v + U) / 256 - 1,
  E_U[-log N(y)] = 0.5 log(2 pi s^2) + ((ybar - m)^2 + Var y) / (2 s^2) with
  ybar = 2 (v + 1/2) / 256 - 1 and Var y = (2/256)^2 / 12; bits/dim = that
  summed over pixels / (D ln 2) + 7 (the [-1, 1] scaling's Jacobian and the
  256 levels). The Jacobian of a diagonal Gaussian's score is diagonal, so the
  Rademacher estimator is exact and only dequantization noise remains.
  """
  config = _digits_config(**{"eval.enable_loss": False, "eval.enable_sampling": False,
                             "eval.enable_bpd": True, "eval.bpd_passes": 2, "eval.batch_size": 128})
  setup = plan_lib.make_plan(S(config))
  gauss, m, s = _digits_gaussian(config)
  result = evaluate.evaluate_params(S(config), str(tmp_path), gauss, index=1, step=10, plan=setup,
                                    score_factory=_analytic_factory(setup.sde))
  from score_jax.data import datasets
  v = np.concatenate([b["image"][b["mask"]] for b in plan_lib.get_dataset(S(
      config), "test", evaluation=True, raw=True, batch_size=128)]).astype(np.float64)
  v = v.reshape(len(v), -1)
  t = jnp.full((1,), float(config.eval.likelihood_eps))
  alpha = float(setup.sde.mean_coef(t)[0])
  std_t = float(setup.sde.marginal_std(t)[0])
  var = alpha**2 * s**2 + std_t**2  # the model's marginal at t = eps
  ybar = 2.0 * (v + 0.5) / 256.0 - 1.0
  nll = 0.5 * np.log(2 * np.pi * var) + ((ybar - alpha * m)**2 + (2.0 / 256.0)**2 / 12.0) / (2 * var)
  bpd = nll.sum(1) / (v.shape[1] * np.log(2.0)) + 7.0
  assert result["likelihood_examples"] == len(v) == 355
  np.testing.assert_allclose(result["bpd"], bpd.mean(), atol=2e-3)
  np.testing.assert_allclose(result["bpd_stderr"], bpd.std() / np.sqrt(len(v)), rtol=0.05)
  assert abs(result["bpd_passes"][0] - result["bpd_passes"][1]) < 1e-3  # noise: dequantization only


def test_interrupted_likelihood_resumes_per_batch_with_identical_result(tmp_path, monkeypatch):
  """Killed after 10 of 16 batches (2 passes x 8), the rerun does only the other 6, and the
  result equals an uninterrupted run's exactly (each batch's noise is keyed by pass and batch)."""
  config = _config(**{"eval.enable_sampling": False, "eval.enable_bpd": True, "eval.bpd_passes": 2,
                      "eval.batch_size": 1024, "eval.hutchinson": "rademacher",
                      "eval.likelihood_rtol": 1e-3, "eval.likelihood_atol": 1e-3})
  setup = plan_lib.make_plan(S(config))
  mix = _mixture(toy_data.GAUSSIAN_MIXTURE)
  factory = _analytic_factory(setup.sde)
  run = lambda workdir: evaluate.evaluate_params(S(config), workdir, mix, index=1, step=10, plan=setup,
                                                 score_factory=factory)
  reference = run(str(tmp_path / "straight"))

  calls = []
  make = programs.Programs.likelihood

  def counting(progs, fail_after=None):
    fn = make(progs)

    def wrapped(*args):
      if fail_after is not None and len(calls) == fail_after:
        raise KeyboardInterrupt("simulated kill")
      calls.append(1)
      return fn(*args)
    return wrapped

  workdir = str(tmp_path / "killed")
  monkeypatch.setattr(programs.Programs, "likelihood", lambda progs: counting(progs, fail_after=10))
  with pytest.raises(KeyboardInterrupt):
    run(workdir)
  progress = json.load(open(os.path.join(workdir, "eval", "ckpt_1", "progress.json")))
  passes = progress["likelihood"]["passes"]
  assert [p["done"] for p in passes] == [True, False] and passes[1]["next_batch"] == 2
  calls.clear()
  monkeypatch.setattr(programs.Programs, "likelihood", counting)
  resumed = run(workdir)
  assert len(calls) == 6
  for key in ("nll_nats_per_dim", "nll_nats_per_dim_stderr", "nll_nats_per_dim_passes"):
    assert resumed[key] == reference[key], key


def _image_setup(config):
  """A plan without the dataset checks of make_plan (for RGB shapes with no RGB data here)."""
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  return plan_lib.assemble(S(config), builders.get_sde(S(config)), None, None, mesh)


@pytest.mark.parametrize("task", ["inpaint", "colorize"])
def test_controlled_sampling_keeps_what_is_given(task):
  """The sample mode's inpainting/colorization wiring, with an exact Gaussian score (RGB 4x4)."""
  config = _digits_config(**{"data.num_channels": 3, "data.image_size": 4, "model.num_scales": 20})
  setup = _image_setup(config)
  d = 4 * 4 * 3
  gauss = analytic.GaussianMixture.create(np.ones(1), np.zeros((1, d)), stds=np.full((1, d), 0.5))
  progs = programs.Programs(setup, _analytic_factory(setup.sde))
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (8, 4, 4, 3)).astype(np.float32)
  mask = sample_mode.inpainting_mask("right_half", 4, 3)
  g = progs.put
  x, nfe = progs.controlled_sampler(task, 8, 0.0)(
      gauss, jax.random.PRNGKey(0), g(np.zeros(8, np.int32)), g(images),
      g(np.broadcast_to(mask, images.shape).copy()))
  x = np.asarray(x)
  assert x.shape == (8, 4, 4, 3) and np.all(np.isfinite(x)) and int(nfe) == 20
  if task == "inpaint":
    np.testing.assert_allclose(x[:, :, :2], images[:, :, :2], atol=1e-6)  # known: left half
    assert np.abs(x[:, :, 2:] - images[:, :, 2:]).mean() > 0.1  # generated, not copied
  else:
    np.testing.assert_allclose(x.mean(-1), images.mean(-1), atol=1e-5)  # gray level kept
    assert np.abs(x - images).mean() > 0.1


def test_inpainting_masks():
  m = sample_mode.inpainting_mask("top_half", 8, 1)
  assert m.shape == (8, 8, 1) and m[:4].sum() == 0 and m[4:].min() == 1
  c = sample_mode.inpainting_mask("center", 8, 3)
  assert c[2:6, 2:6].sum() == 0 and c.sum() == 3 * (64 - 16)
  with pytest.raises(ValueError, match="neither one of"):
    sample_mode.inpainting_mask("diagonal", 8, 1)


@pytest.mark.slow  # ~2 min: two processes exchange every batch through gloo on localhost
def test_two_process_eval_matches_one_process(toy_run, tmp_path):
  """jax.distributed on localhost: two processes with one device each write the results
  (loss, likelihood, every sample) of one process with two devices."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  overrides = {**TOY, "eval.begin_ckpt": 2, "eval.num_samples": 150, "eval.enable_loss": True,
               "eval.enable_bpd": True, "eval.bpd_passes": 1, "eval.batch_size": 128,
               "eval.likelihood_rtol": 1e-3, "eval.likelihood_atol": 1e-3}
  cmd = lambda workdir, *extra: [sys.executable, os.path.join(ROOT, "main.py"),
                                 "--config=" + os.path.join(ROOT, "configs/toy.py"),
                                 f"--workdir={workdir}", "--mode=eval", *_flags(overrides), *extra]
  single, multi = _fresh_copy(toy_run, tmp_path / "single"), _fresh_copy(toy_run, tmp_path / "multi")
  proc = subprocess.run(cmd(single), env=_env(2), cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  procs = [subprocess.Popen(cmd(multi, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                f"--process_id={i}"), env=_env(1), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  a, b = (json.load(open(os.path.join(w, "eval", "ckpt_2.json"))) for w in (single, multi))
  for key in ("eval_loss", "nll_nats_per_dim", "nll_nats_per_dim_stderr", "num_samples"):
    np.testing.assert_allclose(b[key], a[key], rtol=1e-6, err_msg=key)
  for r in range(2):
    x, y = (np.load(os.path.join(w, "eval", "ckpt_2", f"samples_{r}.npz"))["samples"]
            for w in (single, multi))
    np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6)


def test_long_eval_stages_say_how_long_the_rest_takes(caplog, monkeypatch):
  """A Stage logs, after its first compiled unit, the seconds per unit and the time left."""
  import logging  # pylint: disable=g-import-not-at-top
  from score_jax.run.eval_metrics import base  # pylint: disable=g-import-not-at-top

  clock = iter([0.0, 100.0, 140.0, 180.0])  # the first unit compiles: 100 s, then 40 s each
  monkeypatch.setattr(base.time, "perf_counter", lambda: next(clock))
  with caplog.at_level(logging.INFO):
    stage = base.Stage("likelihood (1 x 40 batches)", total=40, done=2)
    for _ in range(3):
      stage.step()
    stage.close()
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("likelihood")]
  assert lines == ["likelihood (1 x 40 batches): 40.0 s per batch; about 24 min for the 36 left."]
  assert stage.bar.n == 5
