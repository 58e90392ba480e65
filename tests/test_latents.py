"""The latent data pipeline: encode (score_jax.data.encode), the 'latents' dataset
(score_jax.data.latents) and decoding in sampling, with the tiny random diffusers VAE of
tests/data/vae/tiny (16x16 RGB -> 8x8x4 latents); the whole recipe (train_vae -> encode ->
train -> sample on the digits) as a slow test.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from score_jax.convert import vae as convert_vae
from score_jax.data import datasets, encode, latents
from score_jax.data.pipeline import example_rngs
from score_jax.data.scaling import to_uint8
from score_jax.errors import ConfigError
from score_jax.run import settings as settings_lib
from tests import helpers

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "data", "vae", "tiny")
N, SHARD = 12, 5  # shards of 5, 5 and 2 images


def _data(dataset, path, image_size, num_channels, **extra):
  """Data settings as score_jax.data.datasets reads them."""
  return types.SimpleNamespace(
      dataset=dataset, path=path, image_size=image_size, num_channels=num_channels,
      data_dir="", category="", toy_name="gaussian_mixture", tfrecords_path="",
      random_flip=False, uniform_dequantization=False, centered=False,
      **{"latent_scale": (), "latent_shift": (), "vae": "", "vae_centered": True, **extra})


@pytest.fixture(scope="module")
def tiny():
  return convert_vae.load_vae(TINY)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """(path of an .npz of 12 random 16x16 RGB uint8 images with labels 0..2, images, labels)."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (N, 16, 16, 3), dtype=np.uint8)
  y = np.arange(N, dtype=np.int64) % 3
  path = str(tmp_path_factory.mktemp("images") / "images.npz")
  np.savez(path, images=x, labels=y)
  return path, x, y


@pytest.fixture(scope="module")
def encoded(images, tmp_path_factory):
  """A latent dataset of the images, encoded in one run (batches of 4)."""
  out = str(tmp_path_factory.mktemp("latents") / "one_run")
  meta = encode.encode_dataset(_data("images", images[0], 16, 3), TINY, out, shard_size=SHARD,
                               batch_size=4, progress=False)
  return out, meta


def test_encode_stores_the_posterior_of_every_image(tiny, images, encoded):
  vae, params, scaling = tiny
  out, meta = encoded
  _, x, y = images
  assert meta["written"] == {"train": [0, 1, 2]}
  with open(os.path.join(out, "meta.json")) as f:
    on_disk = json.load(f)
  assert on_disk["scaling_factor"] == scaling == 0.18215
  assert on_disk["latent_shape"] == [8, 8, 4]
  assert on_disk["vae"] == os.path.realpath(TINY)
  assert on_disk["source"]["dataset"] == "images" and on_disk["source"]["image_size"] == 16
  assert on_disk["source"]["num_classes"] == 3
  assert on_disk["splits"] == {"train": {"num_examples": N, "num_shards": 3}}
  rows = np.concatenate([np.load(latents.shard_path(out, "train", k)) for k in range(3)])
  # Independent: all 12 images in one call, from the uint8 images by the documented map.
  mean, logvar = vae.encode(params, x.astype(np.float32) / 127.5 - 1.0)
  # The same float32 function on batches of 4 and of 12: equal up to summation order
  # (values O(1), float32 eps 1.2e-7; 1e-5 leaves room, a wrong image or scale costs O(1)).
  np.testing.assert_allclose(rows["mean"], np.asarray(mean), atol=1e-5)
  np.testing.assert_allclose(rows["std"], np.exp(0.5 * np.asarray(logvar)), rtol=1e-5)
  np.testing.assert_array_equal(rows["label"], y)


def test_encode_resumes_and_splits_between_processes(images, encoded, tmp_path):
  """Two processes' halves, and a resumed encode, give the one-run encode's files exactly."""
  one_run, _ = encoded
  data = _data("images", images[0], 16, 3)
  out = str(tmp_path / "two_processes")
  kw = dict(shard_size=SHARD, batch_size=4, process_count=2, progress=False)
  assert encode.encode_dataset(data, TINY, out, process_index=0, **kw)["written"] == {
      "train": [0, 2]}
  with pytest.raises(latents.LatentsError, match="lacks 1 of the 3 train shards.*again"):
    latents.open_latents(out, "train", image_size=8, num_channels=4)
  assert encode.encode_dataset(data, TINY, out, process_index=1, **kw)["written"] == {
      "train": [1]}
  names = ["meta.json"] + [f"train-{k:05d}.npy" for k in range(3)]
  assert filecmp.cmpfiles(one_run, out, names, shallow=False)[0] == names
  os.remove(latents.shard_path(out, "train", 1))  # a stopped encode: the same command resumes
  resumed = encode.encode_dataset(data, TINY, out, shard_size=SHARD, batch_size=4,
                                  progress=False)
  assert resumed["written"] == {"train": [1]}
  assert filecmp.cmpfiles(one_run, out, names, shallow=False)[0] == names
  assert not [f for f in os.listdir(out) if ".tmp" in f]  # atomic writes leave nothing behind
  with pytest.raises(latents.LatentsError, match=r"other settings \(different: shard_size\)"):
    encode.encode_dataset(data, TINY, out, shard_size=4, progress=False)


def test_latent_batches_are_posterior_draws_keyed_by_step_and_slot(encoded):
  out, meta = encoded
  data = _data("latents", out, 8, 4)
  rows = np.concatenate([np.load(latents.shard_path(out, "train", k)) for k in range(3)])
  batches = datasets.get_dataset(data, "train", batch_size=4, seed=7)
  first = [next(batches) for _ in range(4)]  # 16 draws: the stream crosses an epoch
  for step, b in enumerate(first):
    assert b["image"].shape == (4, 8, 8, 4) and b["image"].dtype == np.float32
    # The documented rule, computed here from the stored rows: z = s (mean + std eps) with eps
    # from the generator of (seed, stream 1, step, slot).
    eps = np.stack([g.standard_normal((8, 8, 4), dtype=np.float32)
                    for g in example_rngs(7, 1, step, np.arange(4))])
    r = rows[b["index"]]
    np.testing.assert_array_equal(
        b["image"], (np.float32(meta["scaling_factor"]) * (r["mean"] + r["std"] * eps)))
    np.testing.assert_array_equal(b["label"], r["label"])
  assert sorted(np.concatenate([b["index"] for b in first[:3]])) == list(range(N))  # an epoch
  resumed = datasets.get_dataset(data, "train", batch_size=4, seed=7, start_step=2)
  np.testing.assert_array_equal(next(resumed)["image"], first[2]["image"])
  halves = [next(datasets.get_dataset(data, "train", batch_size=4, seed=7, start_step=1,
                                      process_index=p, process_count=2)) for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), first[1]["image"])
  # raw=True reads the images that were encoded (FID statistics of the real data).
  raw = next(datasets.get_dataset(data, "train", batch_size=4, seed=7, raw=True,
                                  evaluation=True))
  assert raw["image"].dtype == np.uint8 and raw["image"].shape == (4, 16, 16, 3)


def test_a_missing_or_foreign_latent_folder_names_the_encode_command(encoded, tmp_path):
  with pytest.raises(datasets.DatasetNotFoundError, match="python -m score_jax.data.encode"):
    datasets.open_source("latents", "train", image_size=8, num_channels=4,
                         path=str(tmp_path / "nothing"))
  (tmp_path / "meta.json").write_text(json.dumps({"format": "something else"}))
  with pytest.raises(latents.LatentsError, match="not the meta.json of a latent dataset"):
    datasets.open_source("latents", "train", image_size=8, num_channels=4, path=str(tmp_path))
  with pytest.raises(ConfigError, match="image_size=8 --config.data.num_channels=4"):
    datasets.open_source("latents", "train", image_size=16, num_channels=3, path=encoded[0])
  cfg = helpers.config("digits_latent", **{"data.path": encoded[0], "data.random_flip": True})
  with pytest.raises(ConfigError, match="data.random_flip acts on pixels"):
    settings_lib.from_config(cfg)


def test_samples_of_a_latent_model_are_decoded_by_its_vae(tiny, encoded, tmp_path):
  from score_jax.run import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from score_jax.run import sample, sample_tasks  # pylint: disable=g-import-not-at-top

  vae, params, scaling = tiny
  cfg = helpers.config("digits_latent", **{"data.path": encoded[0]})
  plan = plan_lib.assemble(settings_lib.from_config(cfg), None, None, None,
                           jax.make_mesh((jax.device_count(),), ("data",)))
  assert plan.data.shape(3) == (3, 8, 8, 4) and plan.data.pixel_dataset == "images"
  z = np.random.default_rng(1).standard_normal((3, 8, 8, 4)).astype(np.float32)
  out = sample_tasks.TaskOutput(x=z, nfe=5, labels=np.zeros(3, np.int32), arrays={})
  paths = sample.write(plan, out, str(tmp_path), step=1)
  with np.load(paths["npz"]) as f:
    np.testing.assert_array_equal(f["samples"], z)  # the latents themselves are kept
    # Independent: the VAE's decoding of z / scaling, to uint8 as [-1, 1] images.
    expected = to_uint8(np.asarray(vae.decode(params, z / np.float32(scaling))), True, "round")
    np.testing.assert_array_equal(f["images"], expected)
    assert f["images"].shape == (3, 16, 16, 3)
  # Without a latent dataset: the VAE data.vae names, per-channel values, its RGB images.
  scale, shift = (0.5, 2.0, 1.0, 0.25), (0.1, -0.2, 0.0, 0.3)
  cfg = helpers.config("digits_latent", **{"data.path": "", "data.vae": TINY,
                                           "data.latent_scale": scale, "data.latent_shift": shift})
  plan = plan_lib.assemble(settings_lib.from_config(cfg), None, None, None,
                           jax.make_mesh((jax.device_count(),), ("data",)))
  assert plan.data.pixel_dataset == ""
  paths = sample.write(plan, out, str(tmp_path), step=1)
  with np.load(paths["npz"]) as f:
    raw = (z - np.float32(shift)) / np.float32(scale)
    expected = to_uint8(np.asarray(vae.decode(params, raw)), True, "round")
    np.testing.assert_array_equal(f["images"], expected)


def test_edm2_latents_of_unit_pixels_whitened_per_channel_and_decoded(tiny, images, encoded,
                                                                       tmp_path):
  """EDM2's StabilityVAEEncoder written out: [0, 1] pixels into the VAE (data.vae_centered =
  False), z = (mean + std eps) * scale + bias per channel, and decoding (z - bias) / scale
  through the VAE, clamp(0, 1) * 255 -> uint8; here through data.vae without a dataset."""
  vae, params, _ = tiny
  path, x, _ = images
  out = str(tmp_path / "unit")
  src = _data("images", path, 16, 3, vae_centered=False)
  meta = encode.encode_dataset(src, TINY, out, shard_size=N, batch_size=4, progress=False)
  assert meta["vae_centered"] is False
  rows = np.load(latents.shard_path(out, "train", 0))
  mean, _ = vae.encode(params, x[:4].astype(np.float32) / 255)  # EDM2: x / 255
  # The same float32 function and batch as the encode's first call (1e-5: see above).
  np.testing.assert_allclose(rows["mean"][:4], np.asarray(mean), atol=1e-5)
  # EDM2's constants (training/encoders.py), computed in float32 as EDM2 does.
  raw_mean, raw_std = np.float32([5.81, 3.25, 0.12, -2.15]), np.float32([4.17, 4.62, 3.71, 3.28])
  scale, shift = latents.edm2_norm()
  np.testing.assert_array_equal(np.float32(scale), np.float32(0.5) / raw_std)
  np.testing.assert_array_equal(np.float32(shift), np.float32(0) - raw_mean * np.float32(scale))
  norm = dict(latent_scale=scale, latent_shift=shift)
  data = _data("latents", out, 8, 4, vae_centered=False, **norm)
  b = next(datasets.get_dataset(data, "train", batch_size=4, seed=3))
  eps = np.stack([g.standard_normal((8, 8, 4), dtype=np.float32)
                  for g in example_rngs(3, 1, 0, np.arange(4))])
  r = rows[b["index"]]
  raw = r["mean"] + eps * r["std"]
  np.testing.assert_array_equal(b["image"], raw * np.float32(scale) + np.float32(shift))
  # The inverse undoes it up to float32 rounding of z (|z| <= ~10, so 1e-5 absolute).
  ln = latents.latent_norm(scale, shift, 0.18215, 4)
  np.testing.assert_allclose(ln.inverse(b["image"]), raw, atol=1e-5)
  with pytest.raises(ConfigError, match="vae_centered=False"):  # latents of [0, 1] pixels
    datasets.get_dataset(_data("latents", out, 8, 4, **norm), "train", batch_size=4, seed=3)
  with pytest.raises(ConfigError, match="data.latent_scale has 3 values.*4 channels"):
    datasets.get_dataset(_data("latents", out, 8, 4, vae_centered=False, latent_scale=scale[:3]),
                         "train", batch_size=4, seed=3)

  dec = latents.latent_decoder(_data("latents", "", 8, 4, vae=TINY, vae_centered=False, **norm))
  got = dec(b["image"])
  y = np.asarray(vae.decode(params, (b["image"] - np.float32(shift)) / np.float32(scale)))
  np.testing.assert_allclose(got, 2 * y - 1, atol=1e-6)  # [0, 1] -> [-1, 1], float32 eps
  assert got.shape == (4, 16, 16, 3)
  edm2 = (np.clip(y, 0, 1) * 255).astype(np.uint8)  # EDM2's decode
  ours = to_uint8(got, True, "truncate")
  # Truncation after the round trip through [-1, 1]: a value within float32 rounding of a level
  # may land one level lower or higher (expected ~1e-5 of the pixels), never further.
  diff = np.abs(ours.astype(int) - edm2)
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_data_vae_and_data_path_must_name_the_same_weights(tiny, encoded, tmp_path):
  vae, params, _ = tiny
  out, _ = encoded
  copy = shutil.copytree(TINY, str(tmp_path / "copy"))
  z = np.random.default_rng(2).standard_normal((3, 8, 8, 4)).astype(np.float32)  # compiled above
  own = latents.latent_decoder(_data("latents", out, 8, 4))(z)
  np.testing.assert_array_equal(latents.latent_decoder(_data("latents", out, 8, 4, vae=copy))(z),
                                own)  # the same bytes: data.vae is taken
  np.testing.assert_allclose(own, np.asarray(vae.decode(params, z / np.float32(0.18215))),
                             atol=1e-6)
  other = str(tmp_path / "other")
  convert_vae.save_vae(other, vae.module, jax.tree_util.tree_map(lambda a: a * 1.01, params),
                       0.18215)
  with pytest.raises(ConfigError, match="is not the VAE the latents .* were encoded with"):
    latents.latent_decoder(_data("latents", out, 8, 4, vae=other))
  with pytest.raises(ConfigError, match="set --config.data.vae=FOLDER"):
    latents.latent_decoder(_data("latents", "", 8, 4))
  cfg = helpers.config("digits", **{"data.vae": TINY})
  with pytest.raises(ConfigError, match="data.vae applies to data.dataset = 'latents' only"):
    settings_lib.from_config(cfg)
  cfg = helpers.config("digits_latent", **{"data.latent_shift": (0.0, 1.0)})
  with pytest.raises(ConfigError, match="data.latent_shift has 2 values"):
    settings_lib.from_config(cfg)


def test_save_vae_writes_a_folder_load_vae_reads_back(tiny, tmp_path):
  vae, params, scaling = tiny
  convert_vae.save_vae(str(tmp_path), vae.module, params, 0.5)
  vae2, params2, scaling2 = convert_vae.load_vae(str(tmp_path))
  assert scaling2 == 0.5 and vae2.module == vae.module
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # And the same tensors as the diffusers file it came from (names, layout and values).
  ours = convert_vae.read_tensors(os.path.join(str(tmp_path), convert_vae.WEIGHTS_FILE))
  theirs = convert_vae.read_tensors(os.path.join(TINY, convert_vae.WEIGHTS_FILE))
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k].reshape(theirs[k].shape), theirs[k])


def test_train_vae_kl_and_scaling_factor_against_independent_computations():
  from score_jax.data import train_vae  # pylint: disable=g-import-not-at-top

  # KL(N(m, v) || N(0, 1)) by quadrature of q log(q / p) on a fine grid (error < 1e-6 here).
  t = np.linspace(-12.0, 12.0, 200001)
  for m, logvar in ((0.0, 0.0), (1.5, -2.0), (-0.7, 1.0)):
    v = np.exp(logvar)
    q = np.exp(-0.5 * (t - m) ** 2 / v) / np.sqrt(2 * np.pi * v)
    log_ratio = -0.5 * (t - m) ** 2 / v - 0.5 * logvar + 0.5 * t ** 2
    quad = np.trapezoid(q * log_ratio, t)
    np.testing.assert_allclose(float(train_vae.kl_divergence(m, logvar)), quad, atol=1e-6)
  # The scaling factor is 1 / std of posterior draws: a stand-in VAE whose posterior is
  # N(3, 2^2) everywhere gives draws of std 2 (2e4 draws: relative error ~ 1 / sqrt(4e4)).
  fake = types.SimpleNamespace(encode=lambda params, x: (
      np.full(x.shape, 3.0, np.float32), np.full(x.shape, np.log(4.0), np.float32)))
  images = np.zeros((20, 1000), np.float32)
  scale = train_vae.scaling_factor(fake, None, images, jax.random.PRNGKey(0), batch_size=10)
  np.testing.assert_allclose(scale, 0.5, rtol=2e-2)


@pytest.mark.slow
def test_the_digits_latent_recipe_end_to_end(tmp_path):
  """train_vae -> encode -> train on latents -> sample: the decoded samples are digits by the
  digits classifier's judgement (score_jax.metrics.digits), which needs a VAE that
  reconstructs and a latent model that learned."""
  env = helpers.env(devices=1)
  run = lambda *args: subprocess.run([sys.executable, *args], cwd=helpers.ROOT, env=env,
                                     check=True, capture_output=True, text=True)
  vae, lat, work = (str(tmp_path / n) for n in ("vae", "latents", "run"))
  run("-m", "score_jax.data.train_vae", "--config=configs/digits.py",
      "--config.data.image_size=16", f"--out={vae}", "--steps=300")
  run("-m", "score_jax.data.encode", f"--vae={vae}", "--config=configs/digits.py",
      "--config.data.image_size=16", "--splits=train,test", f"--out={lat}")
  common = ["main.py", "--config=configs/digits_latent.py", f"--workdir={work}",
            f"--config.data.path={lat}", "--config.training.n_iters=1500",
            "--config.training.snapshot_freq=1500", "--config.training.snapshot_sampling=False",
            "--config.training.eval_freq=100000"]
  run(*common, "--mode=train")
  run(*common, "--mode=sample", "--config.sample.num=256")
  npz = [f for f in os.listdir(os.path.join(work, "sample")) if f.endswith(".npz")]
  with np.load(os.path.join(work, "sample", npz[0])) as f:
    assert f["samples"].shape == (256, 8, 8, 4) and f["images"].shape == (256, 16, 16, 1)
    images = f["images"]
  from score_jax.metrics import digits as digits_metric  # pylint: disable=g-import-not-at-top
  scores = digits_metric.load_or_train(str(tmp_path / "classifier.npz")).scores(images)
  # Real digits score ~0.95 confident; noise or blobs from a broken decoder score < 0.3.
  assert scores["digits_confident"] > 0.5, scores
  shutil.rmtree(work)
