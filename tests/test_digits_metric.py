"""The digits FD and classifier scores (score_jax/metrics/digits.py), and their eval stage."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage

from score_jax import analytic
from score_jax.metrics import digits as digits_metric
from score_jax.metrics import stats as metrics
from score_jax.run import checkpoints
from score_jax.run import evaluate
from score_jax.run import programs
from score_jax.run import builders
from score_jax.run import plan as plan_lib
from score_jax.run import train
from score_jax.run import sample as sample_mode
from score_jax.run.settings import from_config as S
from score_jax.data.digits import load_digits


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("digits") / "digits_classifier.npz")


@pytest.fixture(scope="module")
def metric(cache):
  return digits_metric.load_or_train(cache)


def _corruptions(seed=0):
  """uint8 [N, 8, 8, 1] image sets that are not digits, or poor ones."""
  rng = np.random.default_rng(seed)
  train_images = load_digits("train")[0][:1000, ..., 0].astype(np.float64)
  as_uint8 = lambda a: np.clip(np.round(a), 0, 255).astype(np.uint8)[..., None]
  return {
      "uniform noise": as_uint8(rng.uniform(0, 255, (1000, 8, 8))),
      "shuffled pixels": as_uint8(np.stack([rng.permutation(x.reshape(-1)).reshape(8, 8)
                                            for x in train_images])),
      "blurred (sigma 1 px)": as_uint8(np.stack([scipy.ndimage.gaussian_filter(x, 1.0)
                                                 for x in train_images])),
      "mean digit": as_uint8(np.repeat(train_images.mean(0)[None], 100, axis=0)),
  }


def test_classifier_is_accurate_on_the_held_out_half(metric):
  """Held-out accuracy > 95%. The 8x8 digits are easy: an MLP gets 97-99% (measured 98.6% with
  seed 0, 97.7-98.6% over seeds 0-3), so 95% leaves room for seeds and XLA versions while any
  broken feature pipeline (wrong scaling, transposed images, train/test mix-up) falls far below."""
  x, y = load_digits("test")
  _, logits = metric.features(x)
  accuracy = float(np.mean(logits.argmax(1) == y))
  assert accuracy > 0.95
  assert metric.reference["digits_label_accuracy"] == accuracy
  # Real held-out digits: recognizable, every class equally present.
  assert metric.reference["digits_confident"] > 0.9
  assert metric.reference["digits_class_balance"] > 0.99


def test_floor_is_far_below_non_digits(metric):
  """Held-out real digits sit at the floor; noise, shuffled pixels, blur and the mean digit are
  20x and more above it, and few of them are classified with confidence."""
  floor = metric.floor
  assert 0.0 < floor < 0.5
  for name, images in _corruptions().items():
    s = metric.scores(images)
    assert s["digits_fd"] > 20 * floor, (name, s["digits_fd"], floor)
    assert s["digits_classifier_score"] < metric.reference["digits_classifier_score"] / 2, name
    if name != "mean digit":  # one image 100 times: it may well look like some digit
      assert s["digits_confident"] < 0.5, (name, s["digits_confident"])
      assert s["digits_fd_355"] > 20 * floor, name  # at the floor's N as well


def test_class_balance_and_label_accuracy_see_mode_collapse(metric):
  x, y = load_digits("test")
  assert "digits_fd_355" not in metric.scores(x[:354])
  np.testing.assert_allclose(metric.scores(x)["digits_fd_355"], metric.floor, rtol=1e-12)
  half = y < 5  # a generator that only draws 0-4
  s = metric.scores(x[half], y[half])
  np.testing.assert_allclose(s["digits_class_balance"], np.log(5) / np.log(10), atol=0.03)
  assert sum(s["digits_class_counts"][5:]) <= 0.05 * half.sum()
  assert s["digits_fd"] > 10 * metric.floor
  assert s["digits_label_accuracy"] > 0.95
  wrong = metric.scores(x, (y + 1) % 10)  # samples that ignore the requested class
  assert wrong["digits_label_accuracy"] < 0.05


def _fd_sqrtm(f1, f2):
  """pytorch-fid's formula with scipy.linalg.sqrtm (the route metrics.py avoids), in float64.

  ReLU units that are zero on every image of both sets add nothing to the distance; they
  are dropped so that S1 S2 is not singular (sqrtm is inaccurate there)."""
  live = (f1.max(0) > 0) | (f2.max(0) > 0)
  f1, f2 = f1[:, live], f2[:, live]
  mu1, mu2 = f1.mean(0), f2.mean(0)
  s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  return float(((mu1 - mu2)**2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_fd_matches_scipy_sqrtm(metric):
  train_feats, _ = metric.features(load_digits("train")[0])
  test_feats, _ = metric.features(load_digits("test")[0])
  # scipy's sqrtm of the near-singular S1 S2 (64 ReLU features, 355 images) is good to a few
  # 1e-7 absolute here (1.9e-7 seen), i.e. ~2e-6 of the 0.12 floor; a formula error is O(1).
  np.testing.assert_allclose(metric.floor, _fd_sqrtm(test_feats, train_feats), rtol=1e-5)
  blurred = _corruptions()["blurred (sigma 1 px)"]
  np.testing.assert_allclose(metric.fd(blurred),
                             _fd_sqrtm(metric.features(blurred)[0], train_feats), rtol=1e-5)
  # The cached statistics are those of the train features, and digits_fd is the library call.
  np.testing.assert_allclose(metric.mu, train_feats.mean(0), atol=1e-9)
  np.testing.assert_allclose(metric.sigma, np.cov(train_feats, rowvar=False), atol=1e-8)
  assert digits_metric.digits_fd(blurred, metric) == metric.fd(blurred)


def test_training_is_deterministic_and_seeded():
  short = digits_metric.ClassifierSettings(steps=50)
  a = digits_metric.train_classifier(short)
  b = digits_metric.train_classifier(short)
  c = digits_metric.train_classifier(digits_metric.ClassifierSettings(steps=50, seed=1))
  leaves = lambda p: [np.asarray(v) for v in jax.tree.leaves(p)]
  for u, v in zip(leaves(a), leaves(b)):
    np.testing.assert_array_equal(u, v)
  assert any(not np.array_equal(u, v) for u, v in zip(leaves(a), leaves(c)))


def test_cache_is_reused_and_retrained_when_settings_change(metric, cache):
  mtime = os.stat(cache).st_mtime_ns
  again = digits_metric.load_or_train(cache)
  assert os.stat(cache).st_mtime_ns == mtime  # read, not rewritten
  assert again.reference == metric.reference
  images = load_digits("test")[0][:50]
  np.testing.assert_array_equal(again.features(images)[0], metric.features(images)[0])
  other = digits_metric.ClassifierSettings(steps=50)
  retrained = digits_metric.load_or_train(cache, other, write=False)
  assert os.stat(cache).st_mtime_ns == mtime  # write=False: another process's view
  assert retrained.settings == other and retrained.floor != metric.floor
  assert not [f for f in os.listdir(os.path.dirname(cache)) if ".tmp" in f]


def test_upsampled_and_float_images_give_the_same_features(metric):
  x = load_digits("test")[0][:20]
  f8, _ = metric.features(x)
  up = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)  # data.image_size = 16
  np.testing.assert_allclose(metric.features(up)[0], f8, atol=1e-5)
  np.testing.assert_allclose(metric.features(x.astype(np.float32) / 255.0)[0], f8, atol=1e-6)
  with pytest.raises(ValueError, match="gray-scale"):
    metric.features(np.zeros((2, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match=r"8k"):
    metric.features(np.zeros((2, 12, 12, 1), np.uint8))


def test_digits_eval_reports_fd_in_json_and_tensorboard_scalars(tmp_path, metric, cache):
  """The eval path's digits stage, with a Gaussian model of the digits as the score (no network):
  the per-checkpoint JSON holds the digits numbers of exactly the samples in the shards."""
  from configs import digits
  config = digits.get_config()
  changes = {"model.nf": 8, "model.ch_mult": (1,), "model.attn_resolutions": (),
             "model.num_scales": 20, "eval.batch_size": 32, "eval.num_samples": 48,
             "eval.enable_loss": False, "eval.enable_bpd": False}
  with config.unlocked():
    for k, v in changes.items():
      section, key = k.split(".")
      config[section][key] = v
  assert config.eval.enable_sampling  # the digits config samples in --mode=eval
  setup = plan_lib.make_plan(S(config))
  x = load_digits("train")[0].reshape(-1, 64).astype(np.float64) / 255.0 * 2.0 - 1.0  # centered
  gauss = analytic.GaussianMixture.create(np.ones(1), x.mean(0)[None], stds=x.std(0)[None] + 0.05)
  workdir = str(tmp_path)
  # The classifier the eval finds in its cache: the fixture's (no second training).
  os.makedirs(os.path.join(workdir, "eval"))
  shutil.copy(cache, os.path.join(workdir, "eval", "digits_classifier.npz"))
  result = evaluate.evaluate_params(S(config), workdir, gauss, index=1, step=10, plan=setup,
                                    score_factory=lambda params, y: analytic.score_fn(params,
                                                                                      setup.sde))
  saved = json.load(open(os.path.join(workdir, "eval", "ckpt_1.json")))
  out_dir = os.path.join(workdir, "eval", "ckpt_1")
  samples = np.concatenate([np.load(os.path.join(out_dir, f"samples_{r}.npz"))["samples"]
                            for r in range(2)])
  expected = metric.scores(samples)
  for key in ("digits_fd", "digits_confident", "digits_classifier_score", "digits_class_balance",
              "digits_class_counts"):
    assert saved[key] == result[key] == pytest.approx(expected[key], rel=1e-6), key
  assert saved["digits_fd_floor"] == pytest.approx(metric.floor, rel=1e-9)
  assert sum(saved["digits_class_counts"]) == 48
  # A per-pixel Gaussian draws blobs, not digits: far above the floor.
  assert saved["digits_fd"] > 10 * metric.floor
  scalars = evaluate.scalars(result)
  for key in ("digits_fd", "digits_fd_floor", "digits_confident", "digits_classifier_score"):
    assert f"eval/{key}" in scalars


def test_benchmark_rows_override_existing_config_keys():
  """benchmarks/digits_fd.py: every row changes keys the digits config has (a typo would
  silently add a key and measure the default sampler) and builds its sampler."""
  import argparse  # pylint: disable=g-import-not-at-top
  from benchmarks import digits_fd  # pylint: disable=g-import-not-at-top
  from configs import digits  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  args = argparse.Namespace(samplers=["config", "pc_em", "pc_langevin", "ode", *digits_fd._FAST],
                            nfe=[10], pc_nfe=[50], ode_tol=[1e-3], guide_step=1000,
                            guide_weights=[1.0], cfg_weights=[0.5], guidance_interval=[0.1, 5.0],
                            workdir="runs/digits", guided_only=False)
  rows = digits_fd._variants(args)
  base = 4 + len(digits_fd._FAST)
  assert len(rows) == 3 * base  # each unguided row, autoguided and with classifier-free guidance
  labels = set()
  for label, overrides in rows:
    labels.add(label)
    for key, value in overrides.items():
      section, name = key.split(".")
      assert name in config[section], key
    changed = digits_fd._with(config, overrides)
    for key, value in overrides.items():
      section, name = key.split(".")
      assert changed[section][name] == value
    builders.get_sampler(S(changed), builders.get_sde(S(changed)))
  assert len(labels) == len(rows)  # rows are told apart
  args.guided_only = True
  assert digits_fd._variants(args) == rows[base:]
