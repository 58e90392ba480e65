"""Data layer: toy and digits statistics, preprocessing, determinism, resume, sharding, tfds, errors."""

import dataclasses
import json
import math
import os
import socket

import ml_collections
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from configs import default
from score_jax.data import datasets
from score_jax.run import settings
from score_jax.data import digits as digits_lib
from score_jax.data import tfrecord
from score_jax.data import tfrecord_folder
from score_jax.data import toy


def make_config(dataset="digits", **data):
  """A minimal config with the keys the data layer reads."""
  config = ml_collections.ConfigDict()
  config.seed = 42
  config.training = ml_collections.ConfigDict({"batch_size": 64})
  config.eval = ml_collections.ConfigDict({"batch_size": 100})
  config.model = ml_collections.ConfigDict({"num_classes": 0})
  config.data = ml_collections.ConfigDict({
      "dataset": dataset, "data_dir": "", "image_size": 8, "num_channels": 1, "random_flip": False,
      "centered": False, "uniform_dequantization": False, "toy_name": "gaussian_mixture"})
  config.data.update(data)
  return config


def _data(config):
  """The data settings of a minimal config (the keys the data layer reads)."""
  keys = {f.name for f in dataclasses.fields(settings.Data)}
  values = {**default.get_config().data.to_dict(), **config.data.to_dict()}
  return settings.Data(**{k: v for k, v in values.items() if k in keys})


def get_dataset(config, split="train", *, evaluation=False, batch_size=None, seed=None, **kwargs):
  """datasets.get_dataset with the minimal config's batch sizes, seed and classes."""
  if batch_size is None:
    batch_size = config.eval.batch_size if evaluation else config.training.batch_size
  return datasets.get_dataset(_data(config), split, evaluation=evaluation, batch_size=batch_size,
                              seed=config.seed if seed is None else seed,
                              num_classes=config.model.num_classes, **kwargs)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture
def no_network(monkeypatch):
  """Any attempt to open a connection or resolve a name fails the test."""

  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)


# --- toy data ---------------------------------------------------------------


def toy_train(name):
  source = datasets.open_source("toy", "train", image_size=0, num_channels=0, toy_name=name)
  return source.data, source.labels


def test_gaussian_mixture_statistics():
  x, y = toy_train("gaussian_mixture")
  mix = toy.GAUSSIAN_MIXTURE
  assert x.shape == (65536, 2) and x.dtype == np.float32
  # Mode weights (2:1 alternating) within ~7 standard errors.
  np.testing.assert_allclose(np.bincount(y, minlength=8) / len(y), mix.weights, atol=0.012)
  for k in range(8):
    xk = x[y == k].astype(np.float64)
    np.testing.assert_allclose(xk.mean(0), mix.means[k], atol=0.03)
    np.testing.assert_allclose(xk.std(0), mix.stds[k], rtol=0.05)
  # Modes are separated: the nearest mean is the label for ~all points.
  nearest = np.argmin(((x[:, None, :] - mix.means[None]) ** 2).sum(-1), axis=1)
  assert np.mean(nearest == y) > 0.999


def test_checkerboard_support_and_cells():
  x, y = toy_train("checkerboard")
  assert np.all(np.abs(x) <= 4.0)
  cells = np.floor(x / 2.0).astype(int)
  assert np.all((cells.sum(1) % 2) == 0), "points outside the black cells"
  np.testing.assert_allclose(np.bincount(y, minlength=8) / len(y), np.full(8, 1 / 8), atol=0.01)
  # The label names the cell.
  assert len({(tuple(c), l) for c, l in zip(cells[:2000], y[:2000])}) == 8


def test_swiss_roll_on_spiral_and_ranges():
  x, _ = toy.sample_swiss_roll(4096, np.random.default_rng(0), noise=0.0)
  t = 5.0 * np.linalg.norm(x.astype(np.float64), axis=1)
  assert t.min() >= 1.5 * math.pi - 1e-4 and t.max() <= 4.5 * math.pi + 1e-4
  np.testing.assert_allclose(x, np.stack([t * np.cos(t), t * np.sin(t)], -1) / 5.0, atol=1e-5)
  xd, yd = toy_train("swiss_roll")
  assert np.all(np.abs(xd) < 0.9 * math.pi + 1.2) and np.all(yd == 0)
  assert xd.std() > 1.0  # spread over the roll, not collapsed


def test_moons_shapes_and_ranges():
  x, y = toy.sample_moons(4096, np.random.default_rng(0), noise=0.0)
  p = x.astype(np.float64) / 2.0 + np.array([0.5, 0.25])  # back to sklearn's coordinates
  outer, inner = p[y == 0], p[y == 1]
  np.testing.assert_allclose(np.linalg.norm(outer, axis=1), 1.0, atol=1e-5)
  assert np.all(outer[:, 1] >= -1e-6)
  np.testing.assert_allclose(np.linalg.norm(inner - np.array([1.0, 0.5]), axis=1), 1.0, atol=1e-5)
  assert np.all(inner[:, 1] <= 0.5 + 1e-6)
  assert np.all(np.abs(x[:, 0]) <= 3 + 1e-5) and np.all(np.abs(x[:, 1]) <= 1.5 + 1e-5)
  xd, yd = toy_train("moons")
  assert abs(yd.mean() - 0.5) < 0.01


def test_toy_data_is_fixed_and_splits_differ():
  a = datasets.open_source("toy", "train", image_size=0, num_channels=0, toy_name="moons")
  b = datasets.open_source("toy", "train", image_size=0, num_channels=0, toy_name="moons")
  c = datasets.open_source("toy", "test", image_size=0, num_channels=0, toy_name="moons")
  np.testing.assert_array_equal(a.data, b.data)
  assert len(c) == 8192 and not np.array_equal(a.data[:8192], c.data)
  batch = next(get_dataset(make_config("toy", toy_name="moons"), "train",
                                    process_index=0, process_count=1))
  assert batch["image"].shape == (64, 2) and batch["image"].dtype == np.float32


# --- digits -----------------------------------------------------------------


def test_digits_shapes_values_labels_split():
  from sklearn.datasets import load_digits

  sk = load_digits()
  train_x, train_y = digits_lib.load_digits("train")
  test_x, test_y = digits_lib.load_digits("test")
  assert train_x.shape == (1442, 8, 8, 1) and test_x.shape == (355, 8, 8, 1)
  assert train_x.dtype == np.uint8 and train_y.dtype == np.int32
  levels = np.round(np.arange(17) * 255 / 16).astype(np.uint8)
  assert set(np.unique(train_x)) <= set(levels) and train_x.min() == 0 and train_x.max() == 255
  # Faithful: the 0..16 counts come back exactly.
  all_x = np.empty((1797, 8, 8), np.uint8)
  rank = np.zeros(1797, int)  # position within its class
  for c in range(10):
    rank[sk.target == c] = np.arange(np.sum(sk.target == c))
  is_test = rank % 5 == 4
  all_x[~is_test], all_x[is_test] = train_x[..., 0], test_x[..., 0]
  np.testing.assert_array_equal(np.round(all_x.astype(np.float64) * 16 / 255), sk.images)
  # Disjoint and covering, with the right labels, every class in both splits.
  np.testing.assert_array_equal(train_y, sk.target[~is_test])
  np.testing.assert_array_equal(test_y, sk.target[is_test])
  assert np.bincount(test_y, minlength=10).min() >= 30
  np.testing.assert_array_equal(digits_lib.load_digits("train")[0], train_x)  # deterministic
  # Nearest upsampling to 16.
  big = datasets.open_source("digits", "test", image_size=16, num_channels=1)
  np.testing.assert_array_equal(big.data[:, ::2, ::2], test_x)
  np.testing.assert_array_equal(big.data[:, 1::2, 1::2], test_x)


# --- preprocessing ----------------------------------------------------------


def test_scalers_are_exact_inverses():
  x = np.arange(256, dtype=np.float64) / 255.0
  for centered in (False, True):
    y = datasets.data_scaler(centered)(x)
    np.testing.assert_allclose(datasets.inverse_scaler(centered)(y), x, rtol=0, atol=1e-15)
  np.testing.assert_array_equal(datasets.data_scaler(True)(np.array([0.0, 0.5, 1.0])), [-1.0, 0.0, 1.0])
  np.testing.assert_array_equal(datasets.inverse_scaler(True)(np.array([-1.0, 0.0, 1.0])), [0.0, 0.5, 1.0])


def test_flip_only_on_train_stream():
  config = make_config(random_flip=True)
  raw_test = datasets.open_source("digits", "test", image_size=8, num_channels=1)
  raw_train = datasets.open_source("digits", "train", image_size=8, num_channels=1)

  def flipped(batch, source):
    ref = source.data[batch["index"]].astype(np.float32) / 255.0
    same = np.all(batch["image"] == ref, axis=(1, 2, 3))
    mirrored = np.all(batch["image"] == ref[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    return mirrored & ~same

  train = next(get_dataset(config, "train", process_index=0, process_count=1))
  frac = flipped(train, raw_train).mean()
  assert 0.25 < frac < 0.75
  for batch, source in [
      (next(get_dataset(config, "test", process_index=0, process_count=1)), raw_test),
      (next(get_dataset(config, "train", evaluation=True, process_index=0, process_count=1)), raw_train),
  ]:
    assert not flipped(batch, source).any()


@pytest.mark.parametrize("centered", [False, True])
def test_uniform_dequantization_bins(centered):
  config = make_config(uniform_dequantization=True, centered=centered)
  batch = next(get_dataset(config, "train", process_index=0, process_count=1))
  raw = next(get_dataset(config, "train", raw=True, process_index=0, process_count=1))
  assert raw["image"].dtype == np.uint8
  np.testing.assert_array_equal(raw["index"], batch["index"])
  y = datasets.inverse_scaler(centered)(batch["image"].astype(np.float64))
  v = raw["image"].astype(np.float64)
  u = y * 256.0 - v  # the noise; (x*255 + U)/256 = (v + U)/256
  assert u.min() >= 0.0 and u.max() < 1.0
  if not centered:  # exact: /256 is a power of two
    np.testing.assert_array_equal(np.floor(batch["image"] * np.float32(256)), raw["image"])
  assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
  assert datasets.data_scaler(centered)(0.0) <= batch["image"].min() and batch["image"].max() < 1.0


def test_dequantized_values_stay_in_their_bin_at_255():
  # float32 255 + U rounds up to 256 for U > 1 - 2^-17: ~6 of these 786k pixels.
  from score_jax.data.sources import ArraySource

  source = ArraySource(np.full((64, 64, 64, 3), 255, np.uint8), np.zeros(64, np.int32), num_classes=0)
  batch = next(datasets.make_batches(source, batch_size=64, uniform_dequantization=True, seed=0,
                                     process_index=0, process_count=1))
  assert batch["image"].max() < 1.0
  np.testing.assert_array_equal(np.floor(batch["image"] * np.float32(256)), 255)


# --- order, resume, sharding -------------------------------------------------


def test_determinism_and_seed_dependence():
  config = make_config(random_flip=True, uniform_dequantization=True)
  a = take(get_dataset(config, "train", process_index=0, process_count=1), 3)
  b = take(get_dataset(config, "train", process_index=0, process_count=1), 3)
  assert_batches_equal(a, b)
  c = take(get_dataset(config, "train", seed=7, process_index=0, process_count=1), 3)
  assert not np.array_equal(a[0]["index"], c[0]["index"])


def test_epochs_are_permutations_reshuffled_each_epoch():
  config = make_config()
  # 1442 train digits, batch 721: two batches per epoch.
  it = get_dataset(config, "train", batch_size=721, process_index=0, process_count=1)
  e0 = np.concatenate([b["index"] for b in take(it, 2)])
  e1 = np.concatenate([b["index"] for b in take(it, 2)])
  np.testing.assert_array_equal(np.sort(e0), np.arange(1442))
  np.testing.assert_array_equal(np.sort(e1), np.arange(1442))
  assert not np.array_equal(e0, e1)
  assert it.step == 4 and it.epoch == 2


def test_resume_from_start_step_across_epoch_boundary():
  config = make_config(random_flip=True, uniform_dequantization=True, centered=True)
  fresh = take(get_dataset(config, "train", process_index=0, process_count=1), 26)
  # Step 22 straddles the first epoch boundary (1442 / 64 = 22.5).
  resumed = get_dataset(config, "train", start_step=20, process_index=0, process_count=1)
  assert_batches_equal(take(resumed, 6), fresh[20:])
  threaded = get_dataset(config, "train", start_step=20, num_threads=2,
                                  process_index=0, process_count=1)
  assert_batches_equal(take(threaded, 6), fresh[20:])
  threaded.close()


def test_process_shards_disjoint_cover_and_match_one_process():
  config = make_config(random_flip=True, uniform_dequantization=True)
  shards = [list(get_dataset(config, "test", evaluation=True, process_index=p, process_count=2))
            for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == 4  # ceil(355 / 100)
  seen = [np.concatenate([b["index"][b["mask"]] for b in s]) for s in shards]
  assert not set(seen[0]) & set(seen[1])
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(355))
  assert all(b["image"].shape == (50, 8, 8, 1) for s in shards for b in s)
  # Training: the two local batches of a step are the single-process global batch.
  one = next(get_dataset(config, "train", process_index=0, process_count=1))
  two = [next(get_dataset(config, "train", process_index=p, process_count=2)) for p in range(2)]
  for k in one:
    np.testing.assert_array_equal(np.concatenate([two[0][k], two[1][k]]), one[k])


def test_eval_pass_pads_with_mask():
  config = make_config()
  batches = list(get_dataset(config, "test", evaluation=True, process_index=0, process_count=1))
  assert [b["mask"].sum() for b in batches] == [100, 100, 100, 55]
  assert datasets.num_examples(_data(config), "test") == 355
  assert datasets.num_examples(_data(config), "train") == 1442


# --- tfds -------------------------------------------------------------------


def test_cifar10_with_tfds_mock_data():
  config = make_config("cifar10", image_size=32, num_channels=3, random_flip=True, centered=True)
  config.training.batch_size = 8
  config.eval.batch_size = 4
  with tfds.testing.mock_data(num_examples=10):
    batch = next(get_dataset(config, "train", process_index=0, process_count=1))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["image"].min() < -0.5
    assert batch["label"].dtype == np.int32 and np.all((0 <= batch["label"]) & (batch["label"] < 10))
    passes = list(get_dataset(config, "test", evaluation=True, raw=True,
                                       process_index=0, process_count=1))
    assert len(passes) == 3 and sum(b["mask"].sum() for b in passes) == 10
    assert passes[0]["image"].dtype == np.uint8 and passes[0]["image"].shape == (4, 32, 32, 3)
    config.data.image_size = 16  # resized
    assert next(get_dataset(config, "train", process_index=0, process_count=1))["image"].shape == (8, 16, 16, 3)
    assert datasets.num_examples(_data(config), "train") == 10


def _prepare_fake_cifar10(data_dir, n_train=12, n_test=5):
  """A real on-disk 'cifar10' (array_record) made from generated images, without TF."""

  class FakeCifar10(tfds.image_classification.Cifar10, skip_registration=True):
    name = "cifar10"

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(n_train, 0), "test": self._generate_examples(n_test, 1)}

    def _generate_examples(self, n, seed):  # pylint: disable=arguments-differ
      rng = np.random.default_rng(seed)
      for i in range(n):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        yield i, {"id": f"{seed}_{i}", "image": PIL.Image.fromarray(image), "label": i % 10}

  builder = FakeCifar10(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return builder


def _to_tfrecord_format(builder):
  """Rewrites a prepared array_record dataset as the tfds-default tfrecord layout."""
  from array_record.python import array_record_module

  info_path = os.path.join(builder.data_path, "dataset_info.json")
  for name in os.listdir(builder.data_path):
    if ".array_record-" in name:
      path = os.path.join(builder.data_path, name)
      reader = array_record_module.ArrayRecordReader(path)
      records = reader.read_all()
      reader.close()
      tfrecord.write_tfrecord(path.replace(".array_record-", ".tfrecord-"), records)
      os.remove(path)
  with open(info_path) as f:
    info = json.load(f)
  info["fileFormat"] = "tfrecord"
  with open(info_path, "w") as f:
    json.dump(info, f)


def test_tfds_on_disk_array_record_and_tfrecord_without_tensorflow(tmp_path, no_network):
  builder = _prepare_fake_cifar10(tmp_path)
  config = make_config("cifar10", data_dir=str(tmp_path), image_size=32, num_channels=3)
  config.eval.batch_size = 4
  expected = [builder.as_data_source("test")[i]["image"] for i in range(5)]

  def read_test():
    batches = list(get_dataset(config, "test", evaluation=True, raw=True,
                                        process_index=0, process_count=1))
    return np.concatenate([b["image"][b["mask"]] for b in batches])

  np.testing.assert_array_equal(read_test(), np.stack(expected))
  _to_tfrecord_format(builder)
  assert tfds.builder("cifar10", data_dir=str(tmp_path)).info.file_format == tfds.core.FileFormat.TFRECORD
  np.testing.assert_array_equal(read_test(), np.stack(expected))  # same examples, same order
  assert datasets.num_examples(_data(config), "train") == 12


def test_missing_tfds_dataset_is_a_clear_error_without_network(tmp_path, no_network):
  for dataset, tfds_name in [("cifar10", "cifar10"), ("CELEBA", "celeb_a")]:
    config = make_config(dataset, data_dir=str(tmp_path), image_size=32, num_channels=3)
    with pytest.raises(datasets.DatasetNotFoundError) as e:
      get_dataset(config, "train", process_index=0, process_count=1)
    msg = str(e.value)
    assert f"'{tfds_name}'" in msg and str(tmp_path) in msg
    assert f"tfds build {tfds_name} --data_dir={tmp_path}" in msg
  assert os.listdir(tmp_path) in ([], ["downloads"])  # nothing fetched


# --- TFRecord folders (FFHQ / CelebA-HQ) -------------------------------------


def test_tfrecord_folder_picks_resolution_and_round_trips(tmp_path):
  rng = np.random.default_rng(0)
  images = {r: rng.integers(0, 256, (5, 2 ** r, 2 ** r, 3), dtype=np.uint8) for r in (2, 3)}
  for r, ims in images.items():
    tfrecord.write_tfrecord(tmp_path / f"ffhq-r{r:02d}.tfrecords",
                            [tfrecord_folder.encode_image_record(im) for im in ims])
  config = make_config("FFHQ", data_dir=str(tmp_path), image_size=8, num_channels=3)
  config.eval.batch_size = 5
  batch = next(get_dataset(config, "test", evaluation=True, raw=True, process_index=0, process_count=1))
  np.testing.assert_array_equal(batch["image"], images[3])
  config.data.image_size = 16
  with pytest.raises(datasets.DatasetNotFoundError, match=r"\[4, 8\].*image_size 16"):
    get_dataset(config, "train", process_index=0, process_count=1)
  with pytest.raises(datasets.DatasetNotFoundError, match="does not exist"):
    datasets.open_source("ffhq", "train", image_size=8, num_channels=3, data_dir=str(tmp_path / "nope"))
  # A damaged file is reported, not misread.
  bad = tmp_path / "bad.tfrecords"
  bad.write_bytes(b"\x05" + (tmp_path / "ffhq-r02.tfrecords").read_bytes()[1:])
  with pytest.raises(ValueError, match="CRC"):
    tfrecord.TFRecordFile(bad)


# --- bad configuration --------------------------------------------------------


def test_bad_config_values_are_clear_errors():
  with pytest.raises(ValueError, match="Unknown dataset 'imagenet'.*cifar10"):
    get_dataset(make_config("imagenet"), "train", process_index=0, process_count=1)
  with pytest.raises(ValueError, match="does not divide across 3 processes"):
    get_dataset(make_config(), "train", process_index=0, process_count=3)
  with pytest.raises(ValueError, match="1 channel.*num_channels is 3"):
    get_dataset(make_config(num_channels=3), "train", process_index=0, process_count=1)
  with pytest.raises(ValueError, match="multiple of 8"):
    get_dataset(make_config(image_size=12), "train", process_index=0, process_count=1)
  with pytest.raises(ValueError, match="Unknown split 'valid'"):
    get_dataset(make_config(), "valid", process_index=0, process_count=1)
  with pytest.raises(ValueError, match="Unknown toy dataset 'spiral'"):
    get_dataset(make_config("toy", toy_name="spiral"), "train", process_index=0, process_count=1)
  with pytest.raises(ValueError, match="LSUN needs a category"):
    get_dataset(make_config("lsun"), "train", process_index=0, process_count=1)
  config = make_config()
  config.model.num_classes = 5
  with pytest.raises(ValueError, match="num_classes is 5.*10 classes"):
    get_dataset(config, "train", process_index=0, process_count=1)
  with pytest.raises(ValueError, match="raw=True"):
    get_dataset(make_config("toy"), "train", raw=True, process_index=0, process_count=1)


# --- batch transform, prefetching -------------------------------------------


def _per_example_recipe(data, step, slots, *, random_flip, uniform_dequantization, centered, seed,
                        stream):
  """The transform written example by example (the pipeline's original form): the reference."""
  x = data.astype(np.float32)
  for k, s in enumerate(slots):
    rng = np.random.default_rng([seed, stream, step, int(s)])
    if random_flip and rng.random() < 0.5:
      x[k] = x[k][:, ::-1].copy()
    if uniform_dequantization:
      u = rng.random(x.shape[1:], dtype=np.float32)
      x[k] = np.minimum(x[k] + u, np.nextafter(x[k] + 1.0, np.float32(0.0)))
  x /= np.float32(256.0 if uniform_dequantization else 255.0)
  return x * 2.0 - 1.0 if centered else x


@pytest.mark.parametrize("shape", [(9, 8, 8, 1), (6, 32, 32, 3), (3, 160, 120, 3)])
def test_batch_transform_is_bitwise_the_per_example_recipe(shape):
  from score_jax.data.transforms import image_transform

  rng = np.random.default_rng(1)
  data = rng.integers(0, 256, shape, dtype=np.uint8)
  data[0] = 255  # the top bin, where float32 v + U can round up
  slots = np.arange(shape[0], dtype=np.int64) + 5
  for flags in range(8):
    kw = dict(random_flip=bool(flags & 1), uniform_dequantization=bool(flags & 2),
              centered=bool(flags & 4), seed=3, stream=1)
    got = image_transform(**kw)(data.copy(), 17, slots)
    want = _per_example_recipe(data.copy(), 17, slots, **kw)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=str(kw))
  before = data.copy()
  image_transform(random_flip=True, uniform_dequantization=True, centered=True, seed=3,
                  stream=1)(data, 17, slots)
  np.testing.assert_array_equal(data, before)  # the source's array is not written to


def test_batch_transform_flips_about_half_and_only_left_right():
  from score_jax.data.transforms import image_transform

  data = np.random.default_rng(2).integers(0, 256, (400, 4, 6, 3), dtype=np.uint8)
  out = image_transform(random_flip=True, uniform_dequantization=False, centered=False, seed=0,
                        stream=1)(data, 0, np.arange(400))
  v = np.round(out * 255.0).astype(np.uint8)
  same = np.all(v == data, axis=(1, 2, 3))
  mirrored = np.all(v == data[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored) and not np.any(same & mirrored)
  assert 160 < mirrored.sum() < 240  # Binomial(400, 1/2): mean 200, sd 10


def _digits_batches(split="train", **kw):
  """Config-free batches of the digits (make_batches over open_source)."""
  source = datasets.open_source("digits", split, image_size=8, num_channels=1)
  kw.setdefault("batch_size", 64)
  return datasets.make_batches(source, seed=42, process_index=0, process_count=1, **kw)


def test_prefetch_yields_the_same_batches_and_resumes_exactly():
  flags = dict(random_flip=True, uniform_dequantization=True, centered=True)
  fresh = take(_digits_batches(**flags), 26)  # step 22 straddles the first epoch boundary
  with datasets.Prefetch(_digits_batches(**flags), size=3) as it:
    assert it.step == 0
    assert_batches_equal(take(it, 26), fresh)
    assert it.step == 26
  with datasets.Prefetch(_digits_batches(start_step=20, num_threads=2, **flags), size=2) as it:
    assert it.step == 20
    assert_batches_equal(take(it, 6), fresh[20:])
    assert it.step == 26


def test_prefetch_puts_on_the_device_ends_and_reports_errors():
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), P("data"))
  host = list(_digits_batches("test", batch_size=100, evaluation=True))
  it = datasets.Prefetch(_digits_batches("test", batch_size=100, evaluation=True),
                         datasets.to_device(sharding))
  got = list(it)  # a finite pass ends with StopIteration, after all its batches
  assert len(got) == len(host) == 4
  for g, h in zip(got, host):
    assert isinstance(g["image"], jax.Array) and g["image"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(g["image"]), h["image"])
    np.testing.assert_array_equal(np.asarray(g["label"]), h["label"])
    np.testing.assert_array_equal(g["mask"], h["mask"])  # not put: stays numpy
  with pytest.raises(StopIteration):
    next(it)

  def failing():
    yield 1
    raise OSError("disk gone")

  it = datasets.Prefetch(failing(), put=lambda v: v * 10)
  assert next(it) == 10
  with pytest.raises(OSError, match="disk gone"):
    next(it)
  with pytest.raises(StopIteration):
    next(it)


def test_prefetch_close_stops_its_thread():
  import threading

  it = datasets.Prefetch(_digits_batches(), size=2)
  next(it)
  it.close()  # the thread was waiting for room in a full queue
  assert not any(t.name == "score_jax_prefetch" and t.is_alive() for t in threading.enumerate())
  with pytest.raises(StopIteration):
    next(it)
  with pytest.raises(ValueError, match="size"):
    datasets.Prefetch(iter([]), size=0)
