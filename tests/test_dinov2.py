"""FD-DINOv2: the DINOv2 ViT against facebookresearch/dinov2's code through EDM2's preprocessing
(tests/data/dinov2, made by tests/data/make_dinov2_fixture.py), its converter, and the eval
unit's FD against an independent Frechet distance (scipy.linalg.sqrtm, as EDM2 computes it)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from score_jax.convert import dinov2 as convert_dinov2
from score_jax.metrics import dinov2
from score_jax.run import evaluate, fid_stats
from score_jax.run import plan as plan_lib
from score_jax.run.settings import from_config as S

DATA = os.path.join(os.path.dirname(__file__), "data", "dinov2")
TINY_PTH = os.path.join(DATA, "vit_tiny.pth")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The fixture's tiny ViT converted by the command line: (npz path, params, arch)."""
  path = str(tmp_path_factory.mktemp("dinov2") / "vit_tiny.npz")
  assert convert_dinov2.main([TINY_PTH, path, "--num_heads=2"]) == 0
  params, arch = dinov2.load_dinov2_params(path)
  return path, params, arch


_ROWS = 24  # every ViT call below is padded to this batch: one compilation for the file


@functools.lru_cache(maxsize=None)
def _vit(arch):
  return jax.jit(lambda params, x: dinov2.DinoViT(arch).apply({"params": params}, x))


def _features(params, arch, images):
  """DINOv2 features of uint8 images, the resize compiled per size, the ViT once."""
  x = jax.jit(dinov2.preprocess)(jnp.asarray(images))
  n = x.shape[0]
  x = jnp.concatenate([x, jnp.zeros((_ROWS - n,) + x.shape[1:], x.dtype)])
  return np.asarray(_vit(arch)(params, x))[:n]


@pytest.fixture(scope="module")
def fixture():
  with np.load(os.path.join(DATA, "features.npz")) as f:
    return {k: f[k] for k in f.files}


def test_features_equal_dinov2_code_through_edm2_preprocessing(tiny, fixture):
  """Features of 32 px (upsampled) and 512 px (downsampled, antialiased) images equal the
  authors' code's. Tolerance: float32 through two blocks gives ~2e-5 on features of size ~2;
  dropping the position table's 0.1 offset, the antialiasing, or using a = -0.75 in the resize
  moves them by 3e-2 to 3e-1."""
  _, params, arch = tiny
  assert arch == dinov2.Arch(embed_dim=16, depth=2, num_heads=2, mlp_dim=64, patch_size=14,
                             pos_grid=37, layerscale=True)
  pos = dinov2.interpolate_pos_embed(jnp.asarray(params["pos_embed"]), (16, 16))
  np.testing.assert_allclose(np.asarray(pos), fixture["pos_embed_224"], atol=5e-5, rtol=0)
  for size in ("32", "512"):
    got = _features(params, arch, fixture[f"images_{size}"])
    np.testing.assert_allclose(got, fixture[f"features_{size}"], atol=1e-4, rtol=0,
                               err_msg=size)


def test_vitl14_layout_equals_the_published_one():
  """The converter maps every tensor of dinov2_vitl14 (names and shapes from the hub function
  itself) onto our ViT-L/14, and infers its architecture (16 heads of 64)."""
  with open(os.path.join(DATA, "vitl14_shapes.json")) as f:
    published = {k: tuple(v) for k, v in json.load(f).items()}
  assert len(published) == 343 and "mask_token" in published  # dropped: training only
  ours = convert_dinov2.converted_shapes(published)
  assert ours == dinov2.param_shapes(dinov2.VITL14)
  assert dinov2.arch_from_shapes(ours, 1024 // convert_dinov2.HEAD_DIM) == dinov2.VITL14
  n = sum(int(np.prod(s)) for s in published.values())
  assert n == 304_368_640  # the published ViT-L/14, mask token included
  assert sum(int(np.prod(s)) for s in ours.values()) == n - 1024


def test_weight_file_errors_say_what_to_do(tiny, tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m score_jax.convert.dinov2"):
    dinov2.load_dinov2_params(str(tmp_path / "absent.npz"))
  with pytest.raises(ValueError, match="convert it first"):
    dinov2.load_dinov2_params(TINY_PTH)  # the .pth itself, not converted
  from score_jax.convert import torch_pickle
  state = dict(torch_pickle.load_state_dict(TINY_PTH))
  state["register_tokens"] = np.zeros((1, 4, 16), np.float32)  # a *_reg model
  with pytest.raises(ValueError, match="register_tokens"):
    convert_dinov2.convert_torch_state_dict(state, 2)
  del state["register_tokens"], state["blocks.1.ls2.gamma"]
  with pytest.raises(ValueError, match=r"missing \(1\): blocks_1/ls2/gamma"):
    convert_dinov2.convert_torch_state_dict(state, 2)


def _digits_config(**changes):
  from configs import digits
  config = digits.get_config()
  base = {"model.nf": 8, "model.ch_mult": (1,), "model.attn_resolutions": (),
          "model.num_scales": 4, "eval.batch_size": 16, "eval.num_samples": 24,
          "eval.enable_loss": False, "eval.enable_bpd": False, "eval.dinov2_batch_size": 16,
          "eval.stats_num_images": 32}
  with config.unlocked():
    for k, v in {**base, **changes}.items():
      section, key = k.split(".")
      config[section][key] = v
  return config


def test_eval_writes_fd_dinov2_equal_to_scipy_frechet(tiny, tmp_path, monkeypatch):
  """--mode=eval's unit (weights from eval.dinov2_path), resuming a checkpoint whose sample
  shards exist (24 test-split digits: no sampler to compile): fd_dinov2 in the JSON equals
  EDM2's formula (scipy sqrtm) on the saved sample features and the cached dataset
  statistics, stored beside FID's under a distinct name."""
  from score_jax.data.digits import load_digits
  from score_jax.run import eval_metrics
  monkeypatch.delitem(eval_metrics.METRICS, "digits")  # its classifier is tested elsewhere
  path, params, arch = tiny
  config = _digits_config(**{"eval.dinov2_path": path})
  setup = plan_lib.make_plan(S(config))
  workdir = str(tmp_path)
  out_dir = os.path.join(workdir, "eval", "ckpt_1")
  os.makedirs(out_dir)
  digits = load_digits("test")[0][:24]  # uint8 [24, 8, 8, 1]
  for r, part in enumerate((digits[:16], digits[16:])):  # eval.batch_size 16: rounds of 16, 8
    np.savez(os.path.join(out_dir, f"samples_{r}.npz"), samples=part, nfe=np.int64(2))
  result = evaluate.evaluate_params(S(config), workdir, None, index=1, step=10, plan=setup)
  saved = json.load(open(os.path.join(workdir, "eval", "ckpt_1.json")))
  assert saved["fd_dinov2"] == result["fd_dinov2"] and saved["fd_dinov2_dataset_images"] == 32
  assert "eval/fd_dinov2" in evaluate.scalars(result)

  samples = np.concatenate([np.load(os.path.join(out_dir, f"samples_{r}.npz"))["samples"]
                            for r in range(2)])
  feats = np.concatenate([np.load(os.path.join(out_dir, f"dinov2_{r}.npz"))["features"]
                          for r in range(2)])
  assert samples.shape == (24, 8, 8, 1) and feats.shape == (24, 16)
  direct = _features(params, arch, np.repeat(samples, 3, axis=-1))  # gray: R = G = B
  np.testing.assert_allclose(feats, direct, atol=1e-5, rtol=0)

  stats_file = os.path.join(workdir, "eval", "stats_digits_8_dinov2.npz")
  with np.load(stats_file) as f:
    mu_ref, sigma_ref = f["mu"], f["sigma"]
  f64 = feats.astype(np.float64)
  mu, sigma = f64.mean(0), np.cov(f64, rowvar=False)
  covmean = scipy.linalg.sqrtm(sigma @ sigma_ref)
  expected = float(np.real(np.square(mu - mu_ref).sum()
                           + np.trace(sigma + sigma_ref - 2 * covmean)))
  # Eigenvalue route vs sqrtm of a product: agree to round-off of float64 16 x 16 matrices.
  assert result["fd_dinov2"] == pytest.approx(expected, rel=1e-6)
  assert expected > 0.01  # held-out digits against the training half: small, not zero

  # The statistics command finds the weights and the file eval computed (it keeps it).
  assert fid_stats.available(setup) == ["fd_dinov2"]
  written, stats = fid_stats._write(setup, workdir, "fd_dinov2")
  assert written == stats_file and np.array_equal(stats.mu, mu_ref)


def test_eval_finds_the_converted_weights_at_the_default_location(tmp_path, monkeypatch, capsys):
  import types
  from score_jax.run.eval_metrics import fd_dinov2
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  default = str(tmp_path / "cache" / "score_jax" / "dinov2" / "dinov2_vitl14.npz")
  assert dinov2.default_weights_path() == default
  plan = lambda name, path="": types.SimpleNamespace(
      eval=types.SimpleNamespace(dinov2_path=path),
      data=types.SimpleNamespace(name=name, pixel_dataset=name, is_images=True))
  assert not fd_dinov2.METRIC.enabled(plan("cifar10"))
  assert "python -m score_jax.convert.dinov2" in fd_dinov2.METRIC.why_off(plan("cifar10"))
  with pytest.raises(SystemExit):
    convert_dinov2.main(["--help"])
  assert "DST default" in capsys.readouterr().out
  assert convert_dinov2.main([TINY_PTH, "--num_heads=2"]) == 0  # SRC alone: the default location
  assert "finds them there" in capsys.readouterr().out
  assert fd_dinov2.weights_path(plan("cifar10")) == default and fd_dinov2.METRIC.enabled(
      plan("cifar10"))
  assert fd_dinov2.weights_path(plan("cifar10", "mine.npz")) == "mine.npz"  # the setting wins
  assert fd_dinov2.weights_path(plan("digits")) == ""
