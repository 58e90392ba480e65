"""Training on your own images: a folder (class subfolders), a dataset_tool zip, an .npz."""

import glob
import io
import json
import os
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

import helpers
from score_jax.data import datasets
from score_jax.data.image_files import ImageFilesError
from score_jax.errors import ConfigError, UserError
from score_jax.run import entry
from score_jax.run import plan as plan_lib
from score_jax.run.settings import from_config

CLASSES = ("cat", "dog")  # sorted: cat = 0, dog = 1


def _pixels(seed, h, w):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _expected(a, size, gray=False):
  """Center square crop by hand, then Pillow's bicubic resize (the documented rule)."""
  h, w = a.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  im = Image.fromarray(a[top:top + s, left:left + s])
  if gray:
    im = im.convert("L")
  out = np.asarray(im.resize((size, size), Image.Resampling.BICUBIC))
  return out[..., None] if gray else out


def make_folder(root, n_per_class=6, shape=(10, 12)):
  """12 PNGs in two class folders (dog/ written first); returns {relative path: pixels}."""
  written = {}
  for c in reversed(CLASSES):
    os.makedirs(os.path.join(root, c))
    for i in range(n_per_class):
      a = _pixels(len(written), *shape)
      Image.fromarray(a).save(os.path.join(root, c, f"{i}.png"))
      written[f"{c}/{i}.png"] = a
  return written


def _open(path, size=8, channels=3):
  return datasets.open_source("images", "train", image_size=size, num_channels=channels, path=str(path))


def test_folder_reads_exact_pixels_and_class_labels(tmp_path):
  written = make_folder(tmp_path / "imgs")
  src = _open(tmp_path / "imgs")
  names = sorted(written)  # the source's order: sorted relative paths
  assert len(src) == 12 and src.num_classes == 2 and src.class_names == CLASSES
  x, y = src.read(np.arange(12))
  assert x.dtype == np.uint8 and x.shape == (12, 8, 8, 3)
  for k, name in enumerate(names):
    np.testing.assert_array_equal(x[k], _expected(written[name], 8))
    assert y[k] == CLASSES.index(name.split("/")[0])
  gray, _ = _open(tmp_path / "imgs", size=4, channels=1).read(np.array([7]))
  np.testing.assert_array_equal(gray[0], _expected(written[names[7]], 4, gray=True))
  # Flat folder: no labels; the plan names the classes of a class-folder set.
  flat = tmp_path / "flat"
  flat.mkdir()
  Image.fromarray(written[names[0]]).save(flat / "a.jpg", quality=95)
  Image.fromarray(written[names[1]]).save(flat / "b.webp")
  flat_src = _open(flat)
  assert len(flat_src) == 2 and flat_src.num_classes == 0 and flat_src.class_names == ()


def _dataset_tool_zip(path, written, labels):
  """EDM's dataset_tool layout: 00000/img00000000.png ... and dataset.json."""
  names = []
  with zipfile.ZipFile(path, "w") as z:
    for k, a in enumerate(written):
      name = f"{k // 10:05d}/img{k:08d}.png"
      buf = io.BytesIO()
      Image.fromarray(a).save(buf, format="png")
      z.writestr(name, buf.getvalue())
      names.append(name)
    if labels is not False:
      z.writestr("dataset.json", json.dumps(
          {"labels": None if labels is None else [[n, int(l)] for n, l in zip(names, labels)]}))
  return names


def test_dataset_tool_zip_and_npz(tmp_path):
  images = [_pixels(k, 8, 8) for k in range(12)]
  labels = np.array([5, 0, 2, 1, 0, 3, 4, 2, 1, 0, 5, 3])
  _dataset_tool_zip(tmp_path / "ds.zip", images, labels)
  src = _open(tmp_path / "ds.zip")
  x, y = src.read(np.arange(12))
  assert src.num_classes == 6  # the largest label + 1, as EDM
  np.testing.assert_array_equal(x, np.stack(images))  # 8x8 already: untouched
  np.testing.assert_array_equal(y, labels)
  _dataset_tool_zip(tmp_path / "unlabeled.zip", images, None)
  assert _open(tmp_path / "unlabeled.zip").num_classes == 0
  # .npz, channels first, resized by the same rule; labels kept.
  nchw = np.stack([_pixels(k, 12, 10) for k in range(5)]).transpose(0, 3, 1, 2)
  np.savez(tmp_path / "d.npz", images=nchw, labels=np.arange(5) % 2)
  src = _open(tmp_path / "d.npz")
  x, y = src.read(np.array([3, 1]))
  np.testing.assert_array_equal(x[0], _expected(nchw[3].transpose(1, 2, 0), 8))
  assert src.num_classes == 2 and list(y) == [1, 1]


def test_bad_data_are_one_line_user_errors(tmp_path):
  def error(path, match, **kw):
    with pytest.raises(UserError, match=match) as e:
      x = _open(path, **kw)
      x.read(np.arange(len(x)))
    assert "\n" not in str(e.value)

  error(tmp_path / "missing", "does not exist")
  (tmp_path / "empty").mkdir()
  error(tmp_path / "empty", "holds no images")
  written = make_folder(tmp_path / "mixed", n_per_class=1)
  Image.fromarray(written["cat/0.png"]).save(tmp_path / "mixed" / "top.png")
  error(tmp_path / "mixed", "both at its top level")
  make_folder(tmp_path / "broken", n_per_class=2)
  (tmp_path / "broken" / "dog" / "1.png").write_bytes(b"not a png")
  error(tmp_path / "broken", "cannot read the image 'dog/1.png'")
  _dataset_tool_zip(tmp_path / "short.zip", [_pixels(0, 8, 8)] * 3, [0, 1, 2])
  with zipfile.ZipFile(tmp_path / "short.zip", "a") as z:
    z.writestr("00000/img00000009.png", (tmp_path / "mixed" / "top.png").read_bytes())
  error(tmp_path / "short.zip", "no label for 1 image")
  np.savez(tmp_path / "f.npz", images=np.zeros((3, 8, 8, 3), np.float32))
  error(tmp_path / "f.npz", "must be uint8")
  np.savez(tmp_path / "l.npz", images=np.zeros((3, 8, 8, 3), np.uint8), labels=np.arange(2))
  error(tmp_path / "l.npz", "'labels' must be")
  error(tmp_path / "mixed", "1 \\(gray\\) or 3", channels=4)
  with pytest.raises(ConfigError, match="data.path is read only by data.dataset='images'"):
    from_config(helpers.config("digits", **{"data.path": str(tmp_path)}))
  make_folder(tmp_path / "ok", n_per_class=1)
  with pytest.raises(ConfigError, match="--config.model.num_classes=2"):
    datasets.open_data(_settings(tmp_path / "ok").data, "train", 1)


def _settings(path, **changes):
  return from_config(helpers.config("folder", **{"data.path": str(path), **TINY, **changes}))


TINY = {"data.image_size": 8, "model.nf": 8, "model.ch_mult": (1,), "model.num_res_blocks": 1,
        "model.attn_resolutions": (), "model.channel_mult_emb": 1, "model.dropout": 0.0,
        "training.batch_size": 4, "training.n_iters": 2, "training.snapshot_freq": 2,
        "training.snapshot_freq_for_preemption": 2, "training.log_freq": 1,
        "training.eval_freq": 100, "training.snapshot_sampling": False,
        "eval.batch_size": 4, "eval.stats_num_images": 0, "sampling.batch_size": 4}


def test_exact_resume_and_process_shards(tmp_path):
  make_folder(tmp_path / "imgs")
  s = _settings(tmp_path / "imgs")
  run = lambda **kw: [b for _, b in zip(range(7 - kw.get("start_step", 0)),
                                        plan_lib.get_dataset(s, "train", batch_size=4, **kw))]
  full, tail = run(), run(start_step=4)  # 7 steps of 4 over 12 images: three epochs
  for a, b in zip(full[4:], tail):
    for k in ("image", "label", "index"):
      np.testing.assert_array_equal(a[k], b[k])
  assert sorted(np.concatenate([b["index"] for b in full[:3]])) == list(range(12))  # an epoch
  halves = [run(process_index=p, process_count=2) for p in range(2)]
  for step in range(7):
    np.testing.assert_array_equal(np.concatenate([h[step]["image"] for h in halves]),
                                  full[step]["image"])


def test_train_on_a_folder_and_its_fid_statistics(tmp_path, fast_compile):
  """The real entry trains 2 steps on a class folder; reference statistics of the folder are
  the mean and covariance of its images' features (cheap features stand in for Inception)."""
  import jax.numpy as jnp
  from score_jax.metrics import stats as stats_lib
  from score_jax.run import fid_stats
  written = make_folder(tmp_path / "imgs")
  workdir = str(tmp_path / "run")
  config = helpers.config("folder", **{"data.path": str(tmp_path / "imgs"), **TINY,
                                       "model.num_classes": 2})
  entry.run(config, workdir, "train")
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  assert json.load(open(os.path.join(workdir, "config.json")))["data"]["path"] == str(tmp_path / "imgs")
  assert plan_lib.make_plan(_settings(tmp_path / "imgs")).data.class_names == CLASSES

  features = lambda x: {"pool": x.reshape(x.shape[0], -1)[:, :5].astype(jnp.float32)}
  path, st = fid_stats.write_stats(_settings(tmp_path / "imgs"), workdir, feature_fn=features, batch=8)
  assert os.path.basename(path).startswith("stats_images-imgs-") and os.path.exists(path)
  rows = np.stack([_expected(written[n], 8).reshape(-1)[:5] for n in sorted(written)]).astype(np.float64)
  np.testing.assert_allclose(st.mu, rows.mean(0), rtol=1e-12)
  np.testing.assert_allclose(st.sigma, np.cov(rows, rowvar=False), rtol=1e-9)
  np.testing.assert_allclose(stats_lib.load_stats(path).mu, rows.mean(0), rtol=1e-12)


@pytest.mark.slow  # about 3 minutes on 2 CPU cores: four main.py runs, Inception at 299 px
def test_newcomer_path_train_sample_fid_on_a_folder(tmp_path):
  """The README's commands on a generated folder: train, sample, FID statistics, eval FID."""
  import subprocess
  from score_jax.metrics import inception
  make_folder(tmp_path / "imgs", n_per_class=8)
  weights = str(tmp_path / "inception.npz")
  inception.save_inception_params(weights, inception.random_inception_params(0))
  workdir = str(tmp_path / "run")
  overrides = {**TINY, "data.path": str(tmp_path / "imgs"), "eval.inception_path": weights,
               "eval.begin_ckpt": 1, "eval.end_ckpt": 1, "eval.num_samples": 8,
               "eval.inception_batch_size": 8, "eval.wait_timeout_s": 0.0,
               "sample.num": 4, "sampling.num_steps": 2}
  flags = [f"--config.{k}={v}" for k, v in overrides.items()]  # str((1,)) = '(1,)'

  common = ["--config=" + os.path.join(helpers.ROOT, "configs/folder.py"), f"--workdir={workdir}"]

  def run(*args):
    proc = subprocess.run([sys.executable, *args, *common, *flags], cwd=helpers.ROOT,
                          env=helpers.env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc

  run("main.py", "--mode=train")
  common[0] = "--config=" + os.path.join(workdir, "config.json")  # as the README's next lines
  run("main.py", "--mode=sample")
  (written,) = glob.glob(os.path.join(workdir, "sample", "generate_step2_*_nfe*.npz"))
  with np.load(written) as f:
    assert f["images"].shape == (4, 8, 8, 3) and f["images"].dtype == np.uint8
  out = run("-m", "score_jax.run.fid_stats").stdout
  stats_path = out.split(":")[0]
  assert "16 training images" in out and os.path.exists(stats_path)
  before = os.stat(stats_path).st_mtime_ns
  run("main.py", "--mode=eval")
  result = json.load(open(os.path.join(workdir, "eval", "ckpt_1.json")))
  assert np.isfinite(result["fid"]) and result["fid_dataset_images"] == 16
  assert os.stat(stats_path).st_mtime_ns == before  # eval found the command's statistics
