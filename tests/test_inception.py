"""Tests of the FID Inception, its weight files and the torch-free .pth reader."""

import collections
import io
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from score_jax.convert import inception as convert_inception
from score_jax.metrics import inception as inc
from score_jax import files
from score_jax.convert import torch_pickle

DATA = os.path.join(os.path.dirname(__file__), "data")


# ---------------------------------------------------------------------------
# Torch-free reader


def expected_fixture_tensors():
  """numpy twin of tests/data/make_torch_fixtures.py:tensors()."""
  a = np.arange(12, dtype=np.float32).reshape(3, 4) / 4
  return {
      "layer.conv.weight": a,
      "layer.conv.weight_t": a.T,
      "layer.slice": a[1:, 1:3],
      "half": np.linspace(-1, 1, 5).astype(np.float16),
      "bf16": np.array([1.5, -2.0, 3.25], dtype=ml_dtypes.bfloat16),
      "long": np.array([[1, -2], [3, 2**40]], dtype=np.int64),
      "uint8": np.arange(4, dtype=np.uint8),
      "flag": np.array([True, False]),
      "scalar": np.array(7.5, dtype=np.float64),
      "bn.num_batches_tracked": np.array(3, dtype=np.int64),
  }


@pytest.mark.parametrize("name", ["torch_zip.pth", "torch_legacy.pth"])
def test_reader_matches_genuine_torch_files(name):
  path = os.path.join(DATA, name)
  obj = torch_pickle.load(path)
  assert obj["step"] == 5 and obj["name"] == "fixture"
  assert isinstance(obj["model"], collections.OrderedDict)
  state = torch_pickle.load_state_dict(path, key="model")
  want = expected_fixture_tensors()
  assert list(state) == list(want)  # file order kept
  for k, v in want.items():
    assert state[k].dtype == v.dtype, k
    np.testing.assert_array_equal(state[k], v, err_msg=k)
  flat = torch_pickle.load_state_dict(path)
  assert "model.layer.conv.weight" in flat and int(flat["step"]) == 5
  with pytest.raises(KeyError, match="ema"):
    torch_pickle.load_state_dict(path, key="ema")


def test_writer_round_trip_and_format(tmp_path):
  state = {k: v for k, v in expected_fixture_tensors().items()}
  path = tmp_path / "w.pth"
  torch_pickle.save_state_dict(path, state)
  with zipfile.ZipFile(path) as zf:
    assert "archive/data.pkl" in zf.namelist()
  back = torch_pickle.load_state_dict(path)
  for k, v in state.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape
    np.testing.assert_array_equal(back[k], v)


def test_reader_refuses_code_and_garbage(tmp_path):
  evil = tmp_path / "evil.pth"
  buf = io.BytesIO()
  pickle.dump(os.getcwd, buf, protocol=2)  # a global outside the allow-list
  with zipfile.ZipFile(evil, "w") as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
  with pytest.raises(pickle.UnpicklingError, match="does not allow"):
    torch_pickle.load(evil)
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"\x00\x01 not a checkpoint")
  with pytest.raises(ValueError, match="not a torch checkpoint"):
    torch_pickle.load(junk)
  with pytest.raises(FileNotFoundError):
    torch_pickle.load(tmp_path / "missing.pth")


# ---------------------------------------------------------------------------
# Published layout (pytorch-fid's pt_inception-2015-12-05-6726825d.pth),
# written out independently of the Flax module: (name, in, out, kh, kw).


def published_convs():
  convs = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3),
           ("Conv2d_2b_3x3", 32, 64, 3, 3), ("Conv2d_3b_1x1", 64, 80, 1, 1),
           ("Conv2d_4a_3x3", 80, 192, 3, 3)]

  def block(prefix, rows):
    convs.extend((f"{prefix}.{n}", i, o, h, w) for n, i, o, h, w in rows)

  for name, cin, pf in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
    block(name, [("branch1x1", cin, 64, 1, 1), ("branch5x5_1", cin, 48, 1, 1),
                 ("branch5x5_2", 48, 64, 5, 5), ("branch3x3dbl_1", cin, 64, 1, 1),
                 ("branch3x3dbl_2", 64, 96, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3),
                 ("branch_pool", cin, pf, 1, 1)])
  block("Mixed_6a", [("branch3x3", 288, 384, 3, 3), ("branch3x3dbl_1", 288, 64, 1, 1),
                     ("branch3x3dbl_2", 64, 96, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3)])
  for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
    block(name, [("branch1x1", 768, 192, 1, 1), ("branch7x7_1", 768, c, 1, 1),
                 ("branch7x7_2", c, c, 1, 7), ("branch7x7_3", c, 192, 7, 1),
                 ("branch7x7dbl_1", 768, c, 1, 1), ("branch7x7dbl_2", c, c, 7, 1),
                 ("branch7x7dbl_3", c, c, 1, 7), ("branch7x7dbl_4", c, c, 7, 1),
                 ("branch7x7dbl_5", c, 192, 1, 7), ("branch_pool", 768, 192, 1, 1)])
  block("Mixed_7a", [("branch3x3_1", 768, 192, 1, 1), ("branch3x3_2", 192, 320, 3, 3),
                     ("branch7x7x3_1", 768, 192, 1, 1), ("branch7x7x3_2", 192, 192, 1, 7),
                     ("branch7x7x3_3", 192, 192, 7, 1), ("branch7x7x3_4", 192, 192, 3, 3)])
  for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
    block(name, [("branch1x1", cin, 320, 1, 1), ("branch3x3_1", cin, 384, 1, 1),
                 ("branch3x3_2a", 384, 384, 1, 3), ("branch3x3_2b", 384, 384, 3, 1),
                 ("branch3x3dbl_1", cin, 448, 1, 1), ("branch3x3dbl_2", 448, 384, 3, 3),
                 ("branch3x3dbl_3a", 384, 384, 1, 3), ("branch3x3dbl_3b", 384, 384, 3, 1),
                 ("branch_pool", cin, 192, 1, 1)])
  return convs


def published_layout():
  """{torch name: shape} of the published file (with BN step counters)."""
  shapes = {}
  for name, cin, cout, kh, kw in published_convs():
    shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
    for p in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.bn.{p}"] = (cout,)
    shapes[f"{name}.bn.num_batches_tracked"] = ()
  shapes["fc.weight"] = (1008, 2048)
  shapes["fc.bias"] = (1008,)
  return shapes


def synthetic_published_state(seed=0):
  rng = np.random.default_rng(seed)
  state = {}
  for k, shape in published_layout().items():
    if k.endswith("num_batches_tracked"):
      state[k] = np.array(0, np.int64)
    else:
      state[k] = rng.standard_normal(shape).astype(np.float16)
  return state


def test_layout_sizes():
  layout = published_layout()
  weights = {k: s for k, s in layout.items() if not k.endswith("num_batches_tracked")}
  assert len(weights) == 472
  assert sum(int(np.prod(s)) for s in weights.values()) == 23_885_392
  shapes = inc.param_shapes()
  assert len(shapes) == 472
  assert sum(int(np.prod(s)) for s in shapes.values()) == 23_885_392


def test_converter_maps_every_published_tensor(tmp_path):
  state = synthetic_published_state()
  src, dst = tmp_path / "pt_inception.pth", tmp_path / "inception.npz"
  torch_pickle.save_state_dict(src, state)
  assert convert_inception.main([str(src), str(dst)]) == 0
  params = inc.load_inception_params(dst)
  flat = files.flatten(params)
  used = set()
  for name, *_ in published_convs():
    base = name.replace(".", "/")
    np.testing.assert_array_equal(flat[f"{base}/conv/kernel"],
                                  state[f"{name}.conv.weight"].astype(np.float32).transpose(2, 3, 1, 0))
    used.add(f"{name}.conv.weight")
    for src_name, dst_name in (("weight", "scale"), ("bias", "bias"),
                               ("running_mean", "mean"), ("running_var", "var")):
      np.testing.assert_array_equal(flat[f"{base}/bn/{dst_name}"],
                                    state[f"{name}.bn.{src_name}"].astype(np.float32))
      used.add(f"{name}.bn.{src_name}")
    used.add(f"{name}.bn.num_batches_tracked")
  np.testing.assert_array_equal(flat["fc/kernel"], state["fc.weight"].astype(np.float32).T)
  np.testing.assert_array_equal(flat["fc/bias"], state["fc.bias"].astype(np.float32))
  used |= {"fc.weight", "fc.bias"}
  assert used == set(state)  # nothing in the file left unmapped
  assert len(flat) == 472 and all(v.dtype == np.float32 for v in flat.values())


def test_converter_refuses_bad_layouts():
  state = {k: np.zeros(s, np.float32) for k, s in published_layout().items()}
  missing = dict(state)
  del missing["Mixed_6c.branch7x7_2.bn.running_var"]
  with pytest.raises(ValueError, match=r"missing \(1\): Mixed_6c/branch7x7_2/bn/var"):
    inc.convert_torch_state_dict(missing)
  extra = dict(state, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
  with pytest.raises(ValueError, match="AuxLogits.fc.weight"):
    inc.convert_torch_state_dict(extra)
  wrong = dict(state, **{"Mixed_7c.branch_pool.conv.weight": np.zeros((192, 2048, 3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"wrong shape \(1\): Mixed_7c/branch_pool/conv/kernel"):
    inc.convert_torch_state_dict(wrong)
  fc = dict(state, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
  with pytest.raises(ValueError, match="fc/kernel"):
    inc.convert_torch_state_dict(fc)


# ---------------------------------------------------------------------------
# Weight files


def test_load_errors_say_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    inc.load_inception_params(tmp_path / "inception_fid.npz")
  msg = str(e.value)
  assert "python -m score_jax.convert.inception" in msg and inc.PUBLISHED_WEIGHTS in msg

  flat = {k: np.zeros(s, np.float32) for k, s in inc.param_shapes().items()}
  del flat["Mixed_5b/branch1x1/conv/kernel"]
  flat["Mixed_5b/branch5x5_1/bn/mean"] = np.zeros(7, np.float32)
  flat["extra/thing"] = np.zeros(3, np.float32)
  np.savez(tmp_path / "bad.npz", **flat)
  with pytest.raises(ValueError) as e:
    inc.load_inception_params(tmp_path / "bad.npz")
  msg = str(e.value)
  assert "missing (1): Mixed_5b/branch1x1/conv/kernel" in msg
  assert "unexpected (1): extra/thing" in msg
  assert "Mixed_5b/branch5x5_1/bn/mean: (7,) (expected (48,))" in msg

  torch_pickle.save_state_dict(tmp_path / "w.pth", {"a": np.zeros(2, np.float32)})
  for name in ("w.pth", os.path.join(DATA, "torch_legacy.pth")):
    with pytest.raises(ValueError, match="convert it first"):
      inc.load_inception_params(tmp_path / name)
  (tmp_path / "junk.npz").write_bytes(b"junk")
  with pytest.raises(ValueError, match="not a readable .npz"):
    inc.load_inception_params(tmp_path / "junk.npz")


# ---------------------------------------------------------------------------
# Resize


def test_resize_pytorch_method_equals_half_pixel_bilinear():
  x = jax.random.uniform(jax.random.PRNGKey(0), (1, 32, 24, 3))
  got = inc.resize_bilinear(x, 299, "pytorch")
  # Upsampling: jax.image.resize's triangle kernel without antialiasing is
  # half-pixel bilinear with edge clamping, i.e. F.interpolate(align_corners=False).
  want = jax.image.resize(x, (1, 299, 299, 3), "bilinear", antialias=False)
  np.testing.assert_allclose(got, want, atol=2e-6)


def _tf1_resize_loops(img, size):
  """TF1 resize_bilinear(align_corners=False), written out per pixel."""
  h, w, _ = img.shape
  out = np.zeros((size, size, img.shape[2]))
  for y in range(size):
    sy = y * h / size
    y0 = int(np.floor(sy)); y1 = min(y0 + 1, h - 1); fy = sy - y0
    for x in range(size):
      sx = x * w / size
      x0 = int(np.floor(sx)); x1 = min(x0 + 1, w - 1); fx = sx - x0
      top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
      bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
      out[y, x] = top * (1 - fy) + bot * fy
  return out


def test_resize_tf1_method_matches_loop_formula():
  img = np.random.default_rng(0).uniform(-1, 1, (7, 5, 2)).astype(np.float32)
  for size in (13, 3):  # up and down
    got = np.asarray(inc.resize_bilinear(jnp.asarray(img[None]), size, "tf1"))[0]
    np.testing.assert_allclose(got, _tf1_resize_loops(img, size), atol=1e-6)
  same = jnp.ones((1, 299, 299, 3))
  assert inc.resize_bilinear(same, 299, "tf1") is same
  with pytest.raises(ValueError, match="resize method"):
    inc.resize_bilinear(jnp.ones((1, 4, 4, 3)), 8, "nearest")


# ---------------------------------------------------------------------------
# Network


def test_shapes_at_full_resolution():
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
                        files.unflatten(inc.param_shapes()),
                        is_leaf=lambda s: isinstance(s, tuple))
  out = jax.eval_shape(inc.inception_features, params,
                       jax.ShapeDtypeStruct((5, 64, 48, 3), jnp.uint8))
  assert out["pool"].shape == (5, 2048) and out["logits"].shape == (5, 1008)
  assert out["pool"].dtype == jnp.float32


@pytest.fixture(scope="module")
def random_params():
  return inc.random_inception_params(seed=0)


def test_forward_finite_and_loader_round_trip(random_params, tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  out = inc.inception_features(random_params, images)
  assert out["pool"].shape == (2, inc.POOL_DIM) and out["logits"].shape == (2, inc.NUM_LOGITS)
  assert np.all(np.isfinite(out["pool"])) and np.all(np.isfinite(out["logits"]))
  assert np.all(np.asarray(out["pool"]) >= 0)  # mean of ReLU outputs
  assert float(jnp.std(out["pool"])) > 1e-3  # not collapsed
  # Different images give different features.
  assert not np.allclose(out["pool"][0], out["pool"][1])

  path = tmp_path / "inception.npz"
  inc.save_inception_params(path, random_params)
  loaded = inc.load_inception_params(path)
  compiled = inc.inception_features._cache_size()
  out2 = inc.inception_features(loaded, images)
  np.testing.assert_array_equal(out2["pool"], out["pool"])
  np.testing.assert_array_equal(out2["logits"], out["logits"])
  # A second call with the same shapes does not compile again.
  assert inc.inception_features._cache_size() == compiled


def test_forward_sharded_over_devices(random_params):
  n = jax.device_count()
  assert n >= 2, "conftest should simulate several CPU devices"
  images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  mesh = jax.make_mesh((n,), ("data",))
  sharded = jax.device_put(images, NamedSharding(mesh, P("data")))
  out = inc.inception_features(random_params, sharded)
  assert out["pool"].sharding.spec[0] == "data"
  assert len(out["pool"].addressable_shards) == n
  # Same numbers as the unsharded batch of 2 (the first two images agree with
  # test_forward_finite...: same seed and size).
  ref = inc.inception_features(random_params, images[:2])
  np.testing.assert_allclose(np.asarray(out["pool"])[:2], ref["pool"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["logits"])[:2], ref["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_matches_torchvision_fid_inception(tmp_path):
  """Against a torch build of pytorch-fid's network (needs torch + torchvision)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
    from torchvision.models import inception as tvi  # pylint: disable=import-outside-toplevel
  except Exception:  # pylint: disable=broad-except
    pytest.skip("torch and torchvision not importable")

  def avg(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

  class A(tvi.InceptionA):
    def forward(self, x):
      b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
      return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), b3,
                        self.branch_pool(avg(x))], 1)

  class C(tvi.InceptionC):
    def forward(self, x):
      b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
      bd = x
      for i in range(1, 6):
        bd = getattr(self, f"branch7x7dbl_{i}")(bd)
      return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg(x))], 1)

  class E(tvi.InceptionE):
    def __init__(self, c, use_max):
      super().__init__(c)
      self.use_max = use_max

    def forward(self, x):
      b3 = self.branch3x3_1(x)
      b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
      bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
      bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
      pool = F.max_pool2d(x, 3, 1, 1) if self.use_max else avg(x)
      return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)

  torch.manual_seed(0)
  m = tvi.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=True)
  m.Mixed_5b, m.Mixed_5c, m.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
  m.Mixed_6b, m.Mixed_6c, m.Mixed_6d, m.Mixed_6e = C(768, 128), C(768, 160), C(768, 160), C(768, 192)
  m.Mixed_7b, m.Mixed_7c = E(1280, False), E(2048, True)
  with torch.no_grad():
    for mod in m.modules():
      if isinstance(mod, torch.nn.BatchNorm2d):
        mod.running_mean.normal_(0, 0.1)
        mod.running_var.uniform_(0.5, 1.5)
        mod.weight.uniform_(0.5, 1.5)
    m.fc.bias.normal_(0, 0.1)
  m.eval()
  src = tmp_path / "pt.pth"
  torch.save(m.state_dict(), src, _use_new_zipfile_serialization=False)
  params = convert_inception.convert_pth(src, tmp_path / "inception.npz")
  images = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
  x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
  with torch.no_grad():
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
      x = getattr(m, name)(x)
    x = m.Conv2d_4a_3x3(m.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
    x = F.max_pool2d(x, 3, 2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(m, f"Mixed_{name}")(x)
    pool = x.mean((2, 3))
    logits = m.fc(pool)
  out = inc.inception_features(params, images, resize="pytorch")
  np.testing.assert_allclose(out["pool"], pool.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out["logits"], logits.numpy(), rtol=1e-4, atol=1e-3)
