"""The converter of the 2021 reference's checkpoints (score_jax.convert).

Every paper config, in both reference formats, is checked on shapes only
(`jax.eval_shape`: nothing is allocated, 1024 px included): the reference's
tensors map one to one onto score_jax's parameters, and a file with a tensor
missing, one unexpected and one misshapen is refused with their names. Values
are checked on small networks: round trips through each reference layout,
files written in the reference's formats converted into a workdir that the
eval/sample modes load, and one forward pass against the PyTorch twin's
forward written out from its source (NCHW, OIHW kernels).
"""

import collections
import functools
import importlib
import itertools
import math
import os
import struct
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util
from jax import lax

from score_jax import builders, convert, evaluate, torch_pickle, train
from score_jax.models import get_model, init_model

PAPER_CONFIGS = ("vp_cifar", "vp_cifar_deep", "subvp_cifar", "subvp_cifar_deep", "ve_cifar",
                 "ve_cifar_deep", "ve_cifar_discrete", "ddpm_cifar", "ncsn_cifar", "ve_celeba64",
                 "ve_ffhq256", "ve_celebahq256", "ve_church256", "ve_bedroom256", "ve_ffhq1024")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, **changes):
  config = importlib.import_module(f"configs.{name}").get_config()
  with config.unlocked():
    for k, v in changes.items():
      section, key = k.split(".")
      config[section][key] = v
  return config


def _digits_data(**changes):
  """Data of scikit-learn's digits (8x8x1, on disk), so make_setup's dataset checks pass."""
  return {"data.dataset": "digits", "data.image_size": 8, "data.num_channels": 1,
          "data.random_flip": False, **changes}


def _our_shapes(name):
  """score_jax's parameter shapes for a paper config, from jax.eval_shape."""
  config = _config(name)
  shape = (1, config.data.image_size, config.data.image_size, config.data.num_channels)
  return _param_shapes(get_model(config), shape)


@functools.lru_cache(maxsize=None)
def _param_shapes(model, shape):
  # Cached by network: several paper configs share one (e.g. the four 256 px ones).
  tree = jax.eval_shape(lambda r: init_model(r, model, shape), jax.random.PRNGKey(0))["params"]
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def _random_params(spec, seed=0, scale=0.3):
  rng = np.random.default_rng(seed)
  params = {}
  for e in spec.entries:
    params[e.ours] = (scale * rng.standard_normal(e.shape)).astype(np.float32)
  return traverse_util.unflatten_dict(params)


def _assert_trees_equal(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


# ---------------------------------------------------------------------------
# Every paper config, shapes only


@pytest.mark.parametrize("fmt", convert.FORMATS)
@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_reference_layout_maps_onto_every_parameter(name, fmt):
  spec = convert.reference_spec(_config(name), fmt)
  expected = convert.reference_shapes(spec)
  assert len(expected) == len(spec.entries)  # reference names are unique
  convert.check_tensors(expected, spec)
  abstract = {n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in expected.items()}
  if name == "ncsn_cifar" and fmt == "pytorch":
    # The PyTorch twin narrows NCSNv2's third RefineBlock to nf (score_jax and
    # the JAX reference: 2 nf): refused, naming the tensors.
    with pytest.raises(convert.UnsupportedConfigError, match="--from=flax") as err:
      jax.eval_shape(lambda t: convert.tensors_to_params(t, spec), abstract)
    assert "refine3.msf.convs.0.weight (128, 256, 3, 3)" in str(err.value)
    assert "refine4.adapt_convs.1.1_1_conv.weight" in str(err.value)
    assert sum(math.prod(s) for s in expected.values()) == 29_694_083  # the twin's 29.69M
    return
  out = jax.eval_shape(lambda t: convert.tensors_to_params(t, spec), abstract)
  converted = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(out).items()}
  assert converted == _our_shapes(name)


@pytest.mark.parametrize("fmt", convert.FORMATS)
@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_file_with_missing_extra_or_misshapen_tensor_is_refused(name, fmt):
  spec = convert.reference_spec(_config(name), fmt)
  shapes = dict(convert.reference_shapes(spec))
  names = list(shapes)
  missing, misshapen = names[len(names) // 3], names[2 * len(names) // 3]
  del shapes[missing]
  shapes[misshapen] = shapes[misshapen] + (1,)
  extra = "all_modules.999.Conv_9.weight" if fmt == "pytorch" else "Conv_99/kernel"
  shapes[extra] = (3, 3)
  with pytest.raises(convert.ReferenceLayoutError) as err:
    convert.check_tensors(shapes, spec, "ckpt")
  msg = str(err.value)
  assert f"1 missing: {missing}" in msg
  assert f"1 unexpected: {extra}" in msg
  assert f"1 with other shapes: {misshapen} " in msg
  assert "nothing was converted" in msg


# ---------------------------------------------------------------------------
# Round trips with values (small widths: the same names and structure)


def _small(name):
  """The paper config at tiny width: same modules, names and resolutions, few channels."""
  nf = 2 if name == "ve_ffhq1024" else 4
  return _config(name, **{"model.nf": nf})


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_round_trip_through_each_reference_layout_is_identity(name):
  config = _small(name)
  for fmt in convert.FORMATS:
    spec = convert.reference_spec(config, fmt)
    params = _random_params(spec)
    if name == "ncsn_cifar" and fmt == "pytorch":
      with pytest.raises(convert.UnsupportedConfigError):
        convert.params_to_tensors(params, spec)
      continue
    tensors = convert.params_to_tensors(params, spec)
    assert list(tensors) == list(convert.reference_shapes(spec))  # names and file order
    convert.check_tensors({k: v.shape for k, v in tensors.items()}, spec)
    _assert_trees_equal(convert.tensors_to_params(tensors, spec), params)


@pytest.mark.parametrize("size", [128, 256])
def test_ncsnv2_larger_families_map_in_both_formats(size):
  """The 128 px and 256 px NCSNv2 (5 and 6 stages) have the same widths in both references."""
  config = _config("ncsn_cifar", **{"model.nf": 2, "data.image_size": size})
  convert.check_spec(convert.reference_spec(config, "flax"), config)
  for fmt in convert.FORMATS:
    spec = convert.reference_spec(config, fmt)
    params = _random_params(spec)
    _assert_trees_equal(convert.tensors_to_params(convert.params_to_tensors(params, spec), spec),
                        params)
  names = convert.reference_shapes(convert.reference_spec(config, "pytorch"))
  assert ("refine31.msf.convs.1.weight" in names) == (size == 256)


def test_unsupported_configs_are_refused():
  with pytest.raises(convert.UnsupportedConfigError, match="class-conditional"):
    convert.reference_spec(_config("vp_cifar", **{"model.num_classes": 10}), "flax")
  with pytest.raises(convert.UnsupportedConfigError, match="no reference checkpoints|released no"):
    convert.reference_spec(_config("toy"), "pytorch")
  with pytest.raises(ValueError, match="Unknown reference format"):
    convert.reference_spec(_config("vp_cifar"), "tf")


# ---------------------------------------------------------------------------
# Reference files, written as the reference writes them


class _TorchPickler(torch_pickle._OpWriter):  # pylint: disable=protected-access
  """torch.save's zip format for nested dicts, lists and tensors (as the reference's checkpoints)."""

  def __init__(self):
    super().__init__()
    self.blobs = []

  def obj(self, v):
    if isinstance(v, np.ndarray):
      self.tensor(v)
    elif isinstance(v, collections.OrderedDict):
      self.empty_ordered_dict()
      self.items(v.items())
    elif isinstance(v, dict):
      self.op(b"}")
      self.items(v.items())
    elif isinstance(v, list):
      self.op(b"]")
      if v:
        self.op(b"(")
        for x in v:
          self.obj(x)
        self.op(b"e")  # APPENDS
    elif isinstance(v, tuple):
      self.tuple_(v, self.obj)
    elif isinstance(v, bool):
      self.bool_(v)
    elif isinstance(v, int):
      self.int_(v)
    elif isinstance(v, float):
      self.op(b"G" + struct.pack(">d", v))
    elif isinstance(v, str):
      self.str_(v)
    else:
      raise TypeError(type(v))

  def items(self, items):
    items = list(items)
    if items:
      self.op(b"(")
      for k, x in items:
        self.obj(k)
        self.obj(x)
      self.op(b"u")  # SETITEMS

  def tensor(self, arr):
    arr = np.ascontiguousarray(arr)
    key = str(len(self.blobs))
    self.blobs.append((key, arr.astype("<f4").tobytes()))
    self.global_("torch._utils", "_rebuild_tensor_v2")
    self.op(b"((")
    self.str_("storage")
    self.global_("torch", "FloatStorage")
    self.str_(key)
    self.str_("cpu")
    self.int_(arr.size)
    self.op(b"tQ")
    self.int_(0)
    self.tuple_(arr.shape, self.int_)
    self.tuple_([s // 4 for s in arr.strides], self.int_)
    self.bool_(False)
    self.empty_ordered_dict()
    self.op(b"tR")

  def save(self, path, obj):
    self.obj(obj)
    self.op(b".")
    with zipfile.ZipFile(path, "w") as zf:
      zf.writestr("archive/data.pkl", self.buf.getvalue())
      zf.writestr("archive/byteorder", "little")
      for key, raw in self.blobs:
        zf.writestr(f"archive/data/{key}", raw)
      zf.writestr("archive/version", "3\n")


def _write_reference(path, spec, model, ema, step):
  """A training checkpoint as the reference writes it: raw weights `model`, EMA weights `ema`."""
  if spec.fmt == "pytorch":
    by_name = spec.by_name()
    trainable = [n for n in model if n not in by_name or by_name[n].trainable]
    state = {
        "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.999), "eps": 1e-8,
                                                     "weight_decay": 0, "amsgrad": False,
                                                     "params": list(range(len(trainable)))}]},
        "model": collections.OrderedDict((f"module.{k}", v) for k, v in model.items()),
        "ema": {"decay": 0.9999, "num_updates": step, "shadow_params": [ema[n] for n in trainable]},
        "step": step,
    }
    _TorchPickler().save(path, state)
    return
  tree = lambda flat: traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  state = {"step": step, "optimizer": {"target": tree(model), "state": {"step": step, "param_states": {}}},
           "lr": 2e-4, "model_state": {}, "ema_rate": 0.9999, "params_ema": tree(ema),
           "rng": np.zeros(2, np.uint32)}
  with open(path, "wb") as f:
    f.write(serialization.msgpack_serialize(state))


def _reference_file(tmp_path, config, fmt, step=1200, seed=0, perturb=None):
  """Writes a reference checkpoint with random raw and EMA weights; returns (path, spec, raw, ema)."""
  spec = convert.reference_spec(config, fmt)
  ema_params = _random_params(spec, seed)
  raw_params = traverse_util.flatten_dict(_random_params(spec, seed + 1))
  for e in spec.entries:  # the Fourier features are constants: the same in both
    if not e.trainable:
      raw_params[e.ours] = traverse_util.flatten_dict(ema_params)[e.ours]
  raw_params = traverse_util.unflatten_dict(raw_params)
  ema, raw = convert.params_to_tensors(ema_params, spec), convert.params_to_tensors(raw_params, spec)
  if perturb:
    ema, raw = perturb(ema), perturb(raw)
  path = str(tmp_path / ("checkpoint_1.pth" if fmt == "pytorch" else "checkpoint_1"))
  _write_reference(path, spec, raw, ema, step)
  return path, spec, raw_params, ema_params


TINY = {  # paper configs shrunk onto the 8x8 digits, one per code path
    "ddpmpp": ("vp_cifar", {"model.nf": 8, "model.ch_mult": (1, 2, 2), "model.num_res_blocks": 1,
                            "model.attn_resolutions": (4,)}),
    "ncsnpp_residual": ("ve_cifar", {"model.nf": 8, "model.ch_mult": (1, 2, 2),
                                     "model.num_res_blocks": 1, "model.attn_resolutions": (4,)}),
    "ncsnpp_skip_cat": ("ve_ffhq256", {"model.nf": 8, "model.ch_mult": (1, 2, 2),
                                       "model.num_res_blocks": 1, "model.attn_resolutions": (4,),
                                       "model.progressive_combine": "cat"}),
    "ddpm": ("ddpm_cifar", {"model.nf": 8, "model.ch_mult": (1, 2), "model.attn_resolutions": (4,)}),
    "ncsnv2": ("ncsn_cifar", {"model.nf": 4}),
}


def _tiny(kind):
  base, changes = TINY[kind]
  return _config(base, **_digits_data(), **changes)


@pytest.mark.parametrize("fmt", convert.FORMATS)
@pytest.mark.parametrize("kind", sorted(TINY))
def test_reference_files_read_back_ema_preferred(tmp_path, kind, fmt):
  config = _tiny(kind)
  if kind == "ncsnv2" and fmt == "pytorch":
    with pytest.raises(convert.UnsupportedConfigError, match="RefineBlock"):
      convert.check_compatible(convert.reference_spec(config, fmt))
    return
  path, spec, raw, ema = _reference_file(tmp_path, config, fmt)
  tensors, step, used = convert.load_reference(path, spec)
  assert (step, used) == (1200, "ema")
  _assert_trees_equal(convert.tensors_to_params(tensors, spec), ema)
  tensors, _, used = convert.load_reference(path, spec, weights="model")
  assert used == "model"
  _assert_trees_equal(convert.tensors_to_params(tensors, spec), raw)


def test_command_line_writes_a_workdir_the_eval_and_sample_modes_load(tmp_path, capsys):
  """digits' DDPM++ (the vp_cifar network, small): .pth -> workdir -> the modes' restore."""
  config = _config("digits")
  path, spec, _, ema = _reference_file(tmp_path, config, "pytorch", step=4000)
  dst = str(tmp_path / "run")
  argv = ["convert", "--from=pytorch", f"--config={REPO}/configs/digits.py", path, dst]
  assert convert.main(argv) == 0
  out = capsys.readouterr().out
  assert f"--workdir={dst} --mode=sample" in out
  k = 4000 // int(config.training.snapshot_freq)  # eval's checkpoint index of step 4000
  assert f"--config.eval.begin_ckpt={k} --config.eval.end_ckpt={k}" in out
  assert sorted(os.listdir(dst)) == ["checkpoints", "config.json"]
  assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(path), "run"])  # no temp left
  # What --mode=eval / --mode=sample restore (make_setup without its dataset checks).
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  setup = train.Setup(config, builders.get_sde(config), get_model(config),
                      builders.get_optimizer(config), mesh)
  restored = evaluate.restore_ema_params(setup, os.path.join(dst, "checkpoints"), 4000)
  _assert_trees_equal(jax.device_get(restored), ema)
  # A second conversion into the same workdir is refused; the checkpoint stays.
  with pytest.raises(FileExistsError, match="already holds 4000"):
    convert.convert(path, dst, config, "pytorch")
  assert os.listdir(os.path.join(dst, "checkpoints")) == ["4000"]


def _drop_add_reshape(tensors):
  names = list(tensors)
  tensors = dict(tensors)
  del tensors[names[5]]
  tensors[names[9]] = tensors[names[9]][..., None]
  tensors["Extra_0/kernel" if "/" in names[0] else "all_modules.99.weight"] = np.zeros(3, np.float32)
  return tensors


@pytest.mark.parametrize("fmt", convert.FORMATS)
def test_perturbed_file_is_refused_and_leaves_no_dst(tmp_path, fmt):
  config = _tiny("ddpmpp")
  path, spec, _, _ = _reference_file(tmp_path, config, fmt, perturb=_drop_add_reshape)
  names = list(convert.reference_shapes(spec))
  dst = str(tmp_path / "run")
  with pytest.raises(convert.ReferenceLayoutError) as err:
    convert.convert(path, dst, config, fmt)
  msg = str(err.value)
  assert f"1 missing: {names[5]}" in msg and f"{names[9]} " in msg
  assert ("Extra_0/kernel" if fmt == "flax" else "all_modules.99.weight") in msg
  assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]  # no DST, no temp folder
  assert convert.main(["convert", f"--from={fmt}", f"--config={REPO}/configs/digits.py",
                       "--config.model.nf=8", path, dst]) == 1
  assert not os.path.exists(dst)


def test_pytorch_ema_list_that_does_not_fit_is_refused(tmp_path):
  config = _tiny("ddpmpp")
  spec = convert.reference_spec(config, "pytorch")
  tensors = convert.params_to_tensors(_random_params(spec), spec)
  trainable = [n for n in tensors if spec.by_name()[n].trainable]
  assert len(trainable) == len(tensors)  # positional embedding: no Fourier W
  path = str(tmp_path / "bad.pth")
  shadow = [tensors[n] for n in trainable]
  i = trainable.index("all_modules.2.weight")  # the first conv, (8, 1, 3, 3)
  shadow[i] = shadow[i].T.copy()
  _TorchPickler().save(path, {"model": collections.OrderedDict(tensors),
                              "ema": {"shadow_params": shadow}, "step": 1})
  with pytest.raises(convert.ReferenceLayoutError,
                     match=rf"ema.shadow_params.{i} \(3, 3, 1, 8\) \(for all_modules.2.weight \(8, 1, 3, 3\)\)"):
    convert.load_reference(path, spec)
  _TorchPickler().save(path, {"model": collections.OrderedDict(tensors),
                              "ema": {"shadow_params": shadow[:-1]}, "step": 1})
  with pytest.raises(convert.ReferenceLayoutError,
                     match=f"holds {len(shadow) - 1} tensors, the model {len(shadow)}"):
    convert.load_reference(path, spec)


# ---------------------------------------------------------------------------
# Numbers: layouts and one forward pass against the PyTorch twin's forward


def test_conv_linear_and_nin_layouts_compute_the_reference_layers():
  config = _tiny("ddpmpp")
  spec = convert.reference_spec(config, "pytorch")
  tensors = convert.params_to_tensors(_random_params(spec, seed=3), spec)
  params = convert.tensors_to_params(tensors, spec)
  rng = np.random.default_rng(1)
  # First conv (all_modules.2): F.conv2d with OIHW weights on NCHW input.
  x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
  w, b = tensors["all_modules.2.weight"], tensors["all_modules.2.bias"]
  ref = lax.conv_general_dilated(x, w, (1, 1), [(1, 1), (1, 1)],
                                 dimension_numbers=("NCHW", "OIHW", "NCHW")) + b[None, :, None, None]
  ours = nn.Conv(8, (3, 3)).apply({"params": params["Conv_0"]}, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(ours.transpose(0, 3, 1, 2), ref, rtol=1e-5, atol=1e-5)
  # Time embedding (all_modules.0): nn.Linear computes x W^T + b.
  t = rng.standard_normal((2, 8)).astype(np.float32)
  ref = t @ tensors["all_modules.0.weight"].T + tensors["all_modules.0.bias"][None, :]
  ours = nn.Dense(32).apply({"params": params["Dense_0"]}, t)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  # The query NIN of the first attention block (16 channels at 4 px): W [in, out] over channels.
  name = next(n for n in tensors if n.endswith(".NIN_0.W"))
  h = rng.standard_normal((2, 16, 4, 4)).astype(np.float32)
  ref = np.einsum("bchw,cd->bdhw", h, tensors[name]) + tensors[name[:-1] + "b"][None, :, None, None]
  ours = nn.Dense(16).apply({"params": params["AttnBlock_0"]["Dense_0"]}, h.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(ours.transpose(0, 3, 1, 2), ref, rtol=1e-5, atol=1e-5)


def _pytorch_ddpmpp_forward(t, x, labels, *, nf, ch_mult, num_res_blocks, attn_resolutions,
                            centered):
  """The PyTorch twin's NCSNpp.forward for DDPM++ (positional embedding, BigGAN blocks without
  FIR, no pyramids, skip rescaling), written out from its source: NCHW, OIHW kernels, modules
  taken from `all_modules` in order."""
  index = itertools.count()
  nxt = lambda: f"all_modules.{next(index)}"
  act = jax.nn.silu

  def linear(h, p):
    return h @ t[p + ".weight"].T + t[p + ".bias"][None, :]

  def conv(h, p):
    w = t[p + ".weight"]
    pad = w.shape[-1] // 2
    return lax.conv_general_dilated(h, w, (1, 1), [(pad, pad)] * 2,
                                    dimension_numbers=("NCHW", "OIHW", "NCHW")) + t[p + ".bias"][None, :, None, None]

  def group_norm(h, p):
    b, c, hh, ww = h.shape
    g = min(c // 4, 32)
    hg = h.reshape(b, g, c // g, hh, ww)
    mean = hg.mean(axis=(2, 3, 4), keepdims=True)
    var = hg.var(axis=(2, 3, 4), keepdims=True)
    h = ((hg - mean) / jnp.sqrt(var + 1e-6)).reshape(b, c, hh, ww)
    return h * t[p + ".weight"][None, :, None, None] + t[p + ".bias"][None, :, None, None]

  def nin(h, p):
    return jnp.einsum("bchw,cd->bdhw", h, t[p + ".W"]) + t[p + ".b"][None, :, None, None]

  def resblock(x, temb, p, up=False, down=False):
    h = act(group_norm(x, p + ".GroupNorm_0"))
    if up:  # naive_upsample_2d
      h, x = (jnp.repeat(jnp.repeat(a, 2, axis=2), 2, axis=3) for a in (h, x))
    if down:  # naive_downsample_2d
      h, x = (a.reshape(a.shape[0], a.shape[1], a.shape[2] // 2, 2, a.shape[3] // 2, 2).mean(axis=(3, 5))
              for a in (h, x))
    h = conv(h, p + ".Conv_0")
    h = h + linear(act(temb), p + ".Dense_0")[:, :, None, None]
    h = act(group_norm(h, p + ".GroupNorm_1"))
    h = conv(h, p + ".Conv_1")
    if x.shape[1] != h.shape[1] or up or down:
      x = conv(x, p + ".Conv_2")
    return (x + h) / np.sqrt(2.0)

  def attn(x, p):
    b, c, hh, ww = x.shape
    h = group_norm(x, p + ".GroupNorm_0")
    q, k, v = (nin(h, f"{p}.NIN_{i}") for i in range(3))
    w = jnp.einsum("bchw,bcij->bhwij", q, k) * (c ** -0.5)
    w = jax.nn.softmax(w.reshape(b, hh, ww, hh * ww), axis=-1).reshape(b, hh, ww, hh, ww)
    h = nin(jnp.einsum("bhwij,bcij->bchw", w, v), p + ".NIN_3")
    return (x + h) / np.sqrt(2.0)

  half = nf // 2  # DDPM's sinusoidal embedding
  freqs = np.exp(-math.log(10000) / (half - 1) * np.arange(half))
  emb = labels[:, None] * freqs[None, :]
  temb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
  temb = linear(temb, nxt())
  temb = linear(act(temb), nxt())
  h = x if centered else 2 * x - 1.0
  hs = [conv(h, nxt())]
  for i_level in range(len(ch_mult)):
    for _ in range(num_res_blocks):
      h = resblock(hs[-1], temb, nxt())
      if h.shape[-1] in attn_resolutions:
        h = attn(h, nxt())
      hs.append(h)
    if i_level != len(ch_mult) - 1:
      hs.append(resblock(hs[-1], temb, nxt(), down=True))
  h = resblock(hs[-1], temb, nxt())
  h = attn(h, nxt())
  h = resblock(h, temb, nxt())
  for i_level in reversed(range(len(ch_mult))):
    for _ in range(num_res_blocks + 1):
      h = resblock(jnp.concatenate([h, hs.pop()], axis=1), temb, nxt())
    if h.shape[-1] in attn_resolutions:
      h = attn(h, nxt())
    if i_level != 0:
      h = resblock(h, temb, nxt(), up=True)
  h = act(group_norm(h, nxt()))
  h = conv(h, nxt())
  assert f"all_modules.{next(index)}.weight" not in t  # every module used
  return h


def _run_unoptimized(fn, *args):
  """fn(*args), jitted without XLA's backend optimizations: compiles in half the time on CPU."""
  return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def test_converted_ddpmpp_computes_the_pytorch_reference_forward():
  """DDPM++ (vp_cifar's network, small: 2 resolutions, attention at 4 px) from PyTorch tensors
  computes the twin's forward."""
  config = _config("digits", **{"model.nf": 8, "model.ch_mult": (1, 2)})
  spec = convert.reference_spec(config, "pytorch")
  tensors = convert.params_to_tensors(_random_params(spec, seed=5, scale=0.2), spec)
  params = convert.tensors_to_params(tensors, spec)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
  labels = np.asarray([3.0, 725.5], np.float32)
  m = config.model
  ref = _run_unoptimized(functools.partial(
      _pytorch_ddpmpp_forward, nf=m.nf, ch_mult=m.ch_mult, num_res_blocks=m.num_res_blocks,
      attn_resolutions=m.attn_resolutions, centered=config.data.centered), tensors, x, labels)
  model = get_model(config)
  ours = _run_unoptimized(model.apply, {"params": params}, x.transpose(0, 2, 3, 1), labels)
  assert float(jnp.std(ref)) > 0.1  # not a degenerate comparison
  np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), ref, rtol=1e-4, atol=1e-4)


def test_sample_setup_needs_no_dataset_on_disk(tmp_path):
  """A converted CIFAR-10 checkpoint samples without CIFAR-10 prepared; training still checks."""
  config = _config("digits", **{"data.dataset": "cifar10", "data.data_dir": str(tmp_path / "none")})
  with pytest.raises(Exception, match="cifar10"):
    train.make_setup(config)
  setup = train.make_setup(config, need_data=False)
  assert setup.model is not None and setup.sde.N == config.model.num_scales


@pytest.mark.slow  # sampling compiles the sampler and the network (~30 s on 2 CPU cores)
def test_sample_mode_samples_from_a_converted_checkpoint(tmp_path):
  # The dataset named is not on disk: sample mode must not need it.
  config = _config("digits", **{"model.num_scales": 8, "sample.num": 4, "data.dataset": "cifar10",
                                "data.data_dir": str(tmp_path / "no_data")})
  path, _, _, _ = _reference_file(tmp_path, config, "flax", step=2000)
  dst = str(tmp_path / "run")
  convert.convert(path, dst, config, "flax")
  files = evaluate.sample(config, dst)
  with np.load(files["npz"]) as f:
    assert f["samples"].shape == (4, 8, 8, 1) and np.all(np.isfinite(f["samples"]))
