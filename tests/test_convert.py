"""The converter of the 2021 reference's checkpoints (score_jax.convert.reference).

Every paper config, in both reference formats, is checked on shapes only
(`jax.eval_shape`: nothing is allocated, 1024 px included): the reference's
tensors map one to one onto score_jax's parameters, and a file with a tensor
missing, one unexpected and one misshapen is refused with their names. Values
are checked on small networks: round trips through each reference layout;
genuine PyTorch checkpoints written by the reference's own code
(tests/data/reference/, made by tests/data/make_reference_checkpoints.py)
converted and run against the outputs the reference computed; and Flax
training states written here in the JAX reference's format (no genuine one is
stored) converted into a workdir that the eval/sample modes load.
"""

import functools
import importlib
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util
from jax import lax

import score_jax
from score_jax.convert import cli as convert_cli
from score_jax.convert import reference as convert
from score_jax.run import programs
from score_jax.run import builders
from score_jax.run import plan as plan_lib
from score_jax.convert import torch_pickle
from score_jax.run import train
from score_jax.run import state as run_state
from score_jax.run import sample as sample_mode
from score_jax.models import get_score_fn, init_model
from score_jax.run.settings import from_config as S

from helpers import main_command

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
  """Data of scikit-learn's digits (8x8x1, on disk), so make_plan's dataset checks pass."""
  return {"data.dataset": "digits", "data.image_size": 8, "data.num_channels": 1,
          "data.random_flip": False, **changes}


def _our_shapes(name):
  """score_jax's parameter shapes for a paper config, from jax.eval_shape."""
  config = _config(name)
  shape = (1, config.data.image_size, config.data.image_size, config.data.num_channels)
  return _param_shapes(builders.get_model(S(config)), shape)


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
# Flax reference files, written as the reference writes them (the PyTorch
# twin's files are genuine ones: see "Genuine PyTorch checkpoints" below)


def _write_flax_reference(path, model, ema, step):
  """A training checkpoint as the JAX reference writes it: raw weights `model`, EMA weights `ema`."""
  tree = lambda flat: traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  state = {"step": step, "optimizer": {"target": tree(model), "state": {"step": step, "param_states": {}}},
           "lr": 2e-4, "model_state": {}, "ema_rate": 0.9999, "params_ema": tree(ema),
           "rng": np.zeros(2, np.uint32)}
  with open(path, "wb") as f:
    f.write(serialization.msgpack_serialize(state))


def _flax_reference_file(tmp_path, config, step=1200, seed=0, perturb=None):
  """Writes a Flax reference checkpoint with random raw and EMA weights; returns (path, spec, raw, ema)."""
  spec = convert.reference_spec(config, "flax")
  ema_params = _random_params(spec, seed)
  raw_params = traverse_util.flatten_dict(_random_params(spec, seed + 1))
  for e in spec.entries:  # the Fourier features are constants: the same in both
    if not e.trainable:
      raw_params[e.ours] = traverse_util.flatten_dict(ema_params)[e.ours]
  raw_params = traverse_util.unflatten_dict(raw_params)
  ema, raw = convert.params_to_tensors(ema_params, spec), convert.params_to_tensors(raw_params, spec)
  if perturb:
    ema, raw = perturb(ema), perturb(raw)
  path = str(tmp_path / "checkpoint_1")
  _write_flax_reference(path, raw, ema, step)
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


@pytest.mark.parametrize("kind", sorted(TINY))
def test_flax_reference_files_read_back_ema_preferred(tmp_path, kind):
  """Fixture: msgpack training states written by this file's `_write_flax_reference` (no
  genuine JAX reference checkpoint is stored); random weights, EMA and raw ones differ."""
  config = _tiny(kind)
  path, spec, raw, ema = _flax_reference_file(tmp_path, config)
  tensors, step, used = convert.load_reference(path, spec)
  assert (step, used) == (1200, "ema")
  _assert_trees_equal(convert.tensors_to_params(tensors, spec), ema)
  tensors, _, used = convert.load_reference(path, spec, weights="model")
  assert used == "model"
  _assert_trees_equal(convert.tensors_to_params(tensors, spec), raw)


def _drop_add_reshape(tensors):
  names = list(tensors)
  tensors = dict(tensors)
  del tensors[names[5]]
  tensors[names[9]] = tensors[names[9]][..., None]
  tensors["Extra_0/kernel" if "/" in names[0] else "all_modules.99.weight"] = np.zeros(3, np.float32)
  return tensors


def test_perturbed_flax_file_is_refused_and_leaves_no_dst(tmp_path):
  """Fixture: a Flax training state written by `_write_flax_reference`, one tensor dropped,
  one reshaped, one added."""
  config = _tiny("ddpmpp")
  path, spec, _, _ = _flax_reference_file(tmp_path, config, perturb=_drop_add_reshape)
  names = list(convert.reference_shapes(spec))
  dst = str(tmp_path / "run")
  with pytest.raises(convert.ReferenceLayoutError) as err:
    convert.convert(path, dst, config, "flax")
  msg = str(err.value)
  assert f"1 missing: {names[5]}" in msg and f"{names[9]} " in msg and "Extra_0/kernel" in msg
  assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]  # no DST, no temp folder
  assert convert_cli.main(["convert", "--from=flax", f"--config={REPO}/configs/digits.py",
                       "--config.model.nf=8", path, dst]) == 1
  assert not os.path.exists(dst)


# ---------------------------------------------------------------------------
# Genuine PyTorch checkpoints: tests/data/reference/<name>/, written by the
# reference's own code (yang-song/score_sde_pytorch, commit and torch version
# in reference/manifest.json) through tests/data/make_reference_checkpoints.py:
# its network classes and configs (shrunk), DataParallel, random weights, its
# ExponentialMovingAverage, optimizer and save_checkpoint; and the outputs of
# its network and get_score_fn on fixed inputs, with the EMA and the raw weights.

GENUINE_DIR = os.path.join(REPO, "tests", "data", "reference")
# fixture -> the score_jax paper config of the reference config it shrinks; the
# changes (manifest.json) are applied to both.
GENUINE = {
    "ddpmpp_continuous": "vp_cifar",  # reference configs/vp/cifar10_ddpmpp_continuous.py
    "ddpmpp_trained": "vp_cifar",  # the same, after two of its training steps
    "ncsnpp_continuous": "ve_cifar",  # configs/ve/cifar10_ncsnpp_continuous.py
    "ncsnpp_discrete": "ve_cifar_discrete",  # configs/ve/cifar10_ncsnpp.py
    "ncsnpp_skip": "ve_ffhq256",  # configs/ve/ffhq_256_ncsnpp_continuous.py
    "ddpm": "ddpm_cifar",  # configs/vp/ddpm/cifar10.py
}
# A checkpoint saved after training began holds the learning rate its warmup
# set, lr * np.minimum(step / warmup, 1.0): a numpy float64, pickled as
# numpy(._)core.multiarray.scalar, which score_jax.convert.torch_pickle reads
# (ddpmpp_trained covers it).
GENUINE_CASES = sorted(GENUINE)
LOADABLE = sorted(GENUINE)
# Agreement: max |score_jax - reference| <= REL_TOL * max |reference|, for the
# network's output and the score. Both compute in float32 (eps 1.2e-7) through
# some 30 layers in different orders (XLA vs. ATen convolutions, GroupNorm and
# softmax reductions). Measured: network outputs up to 1.2e-6; VE scores up to
# 8e-7; VP scores up to 4e-6 (DDPM++) and 1.2e-5 (DDPM), as they divide by the
# noise's std at t = 0.013, where 1 - alphabar cancels in float32. The EMA and
# the raw weights' outputs differ by 0.24 to 0.55 of their size (0.07 after
# training steps, where the EMA has caught up).
REL_TOL = 1e-4


@functools.lru_cache(maxsize=None)
def _manifest():
  with open(os.path.join(GENUINE_DIR, "manifest.json")) as f:
    return json.load(f)


def _changes(name):
  return {k: tuple(v) if isinstance(v, list) else v
          for k, v in _manifest()["networks"][name]["changes"].items()}


def _genuine(name):
  """(score_jax config, checkpoint path, reference outputs) of genuine fixture `name`."""
  config = _config(GENUINE[name], **_changes(name))
  path = os.path.join(GENUINE_DIR, name, _manifest()["networks"][name]["checkpoint"])
  with np.load(os.path.join(GENUINE_DIR, name, "outputs.npz")) as f:
    outputs = dict(f)
  return config, path, outputs


def _config_flags(name):
  """The command line's --config and --config.* overrides of genuine fixture `name`."""
  return [f"--config={REPO}/configs/{GENUINE[name]}.py"] + [
      f"--config.{k}={v}" for k, v in _changes(name).items()]


_COMPILED = {}


def _outputs(name, params, ref):
  """score_jax's (network output, score) on the fixture's inputs, as the reference reports them.

  The reference's VE NCSN++ divides by sigma inside the network; score_jax's
  get_score_fn does: the network output is divided here to compare.
  """
  config = _genuine(name)[0]
  model, sde = builders.get_model(S(config)), builders.get_sde(S(config))
  continuous = bool(config.training.continuous)
  labels = ref["labels"]
  labels = labels.astype(np.int32) if np.issubdtype(labels.dtype, np.integer) else labels
  args = (params, ref["x"], ref["t"], labels)
  if name not in _COMPILED:
    def fn(params, x, t, labels):
      net = model.apply({"params": params}, x, labels)
      return net, get_score_fn(sde, model, {"params": params}, continuous=continuous)(x, t)
    _COMPILED[name] = jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})
  net, score = (np.asarray(a) for a in _COMPILED[name](*args))
  if config.model.scale_by_sigma:
    sigma = labels if continuous else convert.reference_spec(config, "pytorch").sigmas()[labels]
    net = net / np.asarray(sigma, np.float32)[:, None, None, None]
  return net, score


def _rel_err(ours, ref):
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("weights", ["ema", "model"])
@pytest.mark.parametrize("name", GENUINE_CASES)
def test_genuine_checkpoint_computes_the_reference_outputs(name, weights):
  """Fixture: tests/data/reference/<name>/ (make_reference_checkpoints.py, the reference's own
  code): its checkpoint and its network's and get_score_fn's outputs with the EMA weights
  (ema.copy_to) or the raw ones. Converted with --weights=<weights>, score_jax's network and
  get_score_fn give the same outputs, and not the other weights' outputs."""
  config, path, ref = _genuine(name)
  spec = convert.reference_spec(config, "pytorch")
  tensors, step, used = convert.load_reference(path, spec, weights=weights)
  assert (step, used) == (_manifest()["networks"][name]["step"], weights)
  net, score = _outputs(name, convert.tensors_to_params(tensors, spec), ref)
  assert _rel_err(net, ref[f"net_{weights}"]) < REL_TOL
  assert _rel_err(score, ref[f"score_{weights}"]) < REL_TOL
  other = "model" if weights == "ema" else "ema"
  assert _rel_err(score, ref[f"score_{other}"]) > 100 * REL_TOL


@pytest.mark.parametrize("name", LOADABLE)
def test_genuine_state_dict_is_the_spec_in_order_and_the_sigmas_buffer(name):
  """Fixture: tests/data/reference/<name>/checkpoint_<n>.pth (make_reference_checkpoints.py,
  the reference's own code). Its state dict is the buffer `sigmas` (the reference's get_sigmas
  of the config, float64), then the spec's tensors in the spec's order; the EMA list holds the
  trainable ones (not the Fourier features)."""
  config, path, _ = _genuine(name)
  spec = convert.reference_spec(config, "pytorch")
  obj = torch_pickle.load(path)
  assert sorted(obj) == ["ema", "model", "optimizer", "step"]
  names = list(obj["model"])
  assert names[0] == "module.sigmas" and obj["model"]["module.sigmas"].dtype == np.float64
  np.testing.assert_allclose(obj["model"]["module.sigmas"], spec.sigmas(), rtol=1e-12)
  assert [n[len("module."):] for n in names[1:]] == list(convert.reference_shapes(spec))
  trainable = [e for e in spec.entries if e.trainable]
  assert [s.shape for s in obj["ema"]["shadow_params"]] == [e.ref_shape for e in trainable]
  assert (len(trainable) < len(spec.entries)) == (config.model.embedding_type == "fourier")


def test_command_line_converts_a_genuine_checkpoint_the_eval_and_sample_modes_load(tmp_path, capsys):
  """Fixture: tests/data/reference/ncsnpp_continuous/ (make_reference_checkpoints.py, the
  reference's own code; VE NCSN++ with Fourier features, FIR, residual input pyramid).
  .pth -> workdir -> what --mode=eval / --mode=sample restore computes the reference's score."""
  name = "ncsnpp_continuous"
  config, path, ref = _genuine(name)
  freq = int(config.training.snapshot_freq)
  dst = str(tmp_path / "run")
  argv = ["convert", "--from=pytorch", *_config_flags(name), f"--step={2 * freq}", path, dst]
  assert convert_cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "ema weights" in out and f"--workdir={dst} --mode=sample" in out
  assert "--config.eval.begin_ckpt=2 --config.eval.end_ckpt=2" in out
  # The printed sample command, pasted, gives the conversion's config with its overrides.
  printed, workdir, mode = main_command(next(ln for ln in out.splitlines()
                                             if ln.startswith("Sample: ")))
  assert (printed.raw, workdir, mode) == (S(config).raw, dst, "sample")
  assert sorted(os.listdir(dst)) == ["checkpoints", "config.json"]
  assert os.listdir(tmp_path) == ["run"]  # no temp folder left
  # What --mode=eval / --mode=sample restore (make_plan without its dataset checks).
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  setup = plan_lib.assemble(S(config), builders.get_sde(S(config)), builders.get_model(S(config)),
                      builders.get_optimizer(S(config)), mesh)
  restored = jax.device_get(run_state.restore_ema_params(setup, os.path.join(dst, "checkpoints"),
                                                        2 * freq))
  _, score = _outputs(name, restored, ref)
  assert _rel_err(score, ref["score_ema"]) < REL_TOL
  # score_jax.load_run on the converted workdir: the reference's score in one call.
  run = score_jax.load_run(dst)
  assert run.step == 2 * freq and run.settings.model.name == config.model.name
  assert _rel_err(np.asarray(run.score_fn(ref["x"], ref["t"])), ref["score_ema"]) < REL_TOL
  # A second conversion into the same workdir is refused; the checkpoint stays.
  with pytest.raises(FileExistsError, match=f"already holds {2 * freq}"):
    convert.convert(path, dst, config, "pytorch")
  assert os.listdir(os.path.join(dst, "checkpoints")) == [str(2 * freq)]


def test_sigmas_buffer_of_another_config_is_refused_naming_the_keys(tmp_path, capsys):
  """Fixture: tests/data/reference/ncsnpp_continuous/ (make_reference_checkpoints.py, the
  reference's own code), trained with sigma_max 50 and 1000 noise levels. With another
  sigma_max and num_scales (the same network) it is refused, naming both values of each key
  and the overrides that fix it; with those overrides it converts."""
  name = "ncsnpp_continuous"
  config, path, _ = _genuine(name)
  with config.unlocked():
    config.model.sigma_max, config.model.num_scales = 90.0, 2000
  with pytest.raises(convert.ReferenceLayoutError) as err:
    convert.load_reference(path, convert.reference_spec(config, "pytorch"))
  msg = str(err.value)
  assert "model.sigma_max: 50 in the checkpoint, 90 in the config" in msg
  assert "model.num_scales: 1000 in the checkpoint, 2000 in the config" in msg
  assert "--config.model.sigma_max=50 --config.model.num_scales=1000" in msg
  assert "model.sigma_min:" not in msg  # that one agrees
  dst = str(tmp_path / "run")
  wrong = _config_flags(name) + ["--config.model.sigma_max=90", "--config.model.num_scales=2000"]
  assert convert_cli.main(["convert", "--from=pytorch", *wrong, path, dst]) == 1
  assert "--config.model.sigma_max=50 --config.model.num_scales=1000" in capsys.readouterr().err
  assert os.listdir(tmp_path) == []  # no DST, no temp folder
  fixed = wrong + ["--config.model.sigma_max=50", "--config.model.num_scales=1000"]
  assert convert_cli.main(["convert", "--from=pytorch", *fixed, path, dst]) == 0


def test_check_sigmas_tolerates_float32_and_names_what_differs():
  """No file: `check_sigmas` on buffers made here with the reference's get_sigmas formula."""
  spec = convert.reference_spec(_config("ve_celebahq256"), "pytorch")  # 348 .. 0.01, 2000 levels
  get_sigmas = lambda hi, lo, n: np.exp(np.linspace(np.log(hi), np.log(lo), n))
  convert.check_sigmas(get_sigmas(348, 0.01, 2000), spec)
  convert.check_sigmas(get_sigmas(348, 0.01, 2000).astype(np.float32), spec)
  with pytest.raises(convert.ReferenceLayoutError,
                     match=r"model.sigma_min: 0.002 in the checkpoint, 0.01 in the config\). "
                           r"Nothing was converted: .* override --config.model.sigma_min=0.002"):
    convert.check_sigmas(get_sigmas(348, 0.002, 2000), spec)
  with pytest.raises(convert.ReferenceLayoutError, match="not geometric"):
    convert.check_sigmas(np.linspace(348, 0.01, 2000), spec)
  with pytest.raises(convert.ReferenceLayoutError, match=r"shape \(2, 1000\)"):
    convert.check_sigmas(get_sigmas(348, 0.01, 2000).reshape(2, 1000), spec)


def _genuine_contents(name, monkeypatch):
  """Genuine fixture `name` as torch_pickle reads it; torch_pickle.load then returns this
  object (altered by the caller) instead of reading the file."""
  config, path, _ = _genuine(name)
  obj = torch_pickle.load(path)
  monkeypatch.setattr(torch_pickle, "load", lambda _: obj)
  return config, path, obj


def test_perturbed_pytorch_file_is_refused_and_leaves_no_dst(tmp_path, monkeypatch):
  """Fixture: tests/data/reference/ddpmpp_continuous/ (make_reference_checkpoints.py, the
  reference's own code), its state dict altered in memory after reading: one tensor dropped,
  one reshaped, one added."""
  name = "ddpmpp_continuous"
  config, path, obj = _genuine_contents(name, monkeypatch)
  model = obj["model"]
  names = [n for n in model if n != "module.sigmas"]
  del model[names[5]]
  model[names[9]] = model[names[9]][..., None]
  model["module.all_modules.99.weight"] = np.zeros(3, np.float32)
  dst = str(tmp_path / "run")
  with pytest.raises(convert.ReferenceLayoutError) as err:
    convert.convert(path, dst, config, "pytorch")
  msg = str(err.value)
  assert f"1 missing: {names[5][7:]}" in msg and f"{names[9][7:]} " in msg
  assert "1 unexpected: all_modules.99.weight" in msg  # the sigmas buffer is not unexpected
  assert os.listdir(tmp_path) == []  # no DST, no temp folder
  assert convert_cli.main(["convert", "--from=pytorch", *_config_flags(name), path, dst]) == 1
  assert not os.path.exists(dst)


def test_pytorch_ema_list_that_does_not_fit_is_refused(monkeypatch):
  """Fixture: tests/data/reference/ddpmpp_continuous/ (make_reference_checkpoints.py, the
  reference's own code), its EMA list altered in memory after reading."""
  config, path, obj = _genuine_contents("ddpmpp_continuous", monkeypatch)
  spec = convert.reference_spec(config, "pytorch")
  shadow = obj["ema"]["shadow_params"]
  i = [e.name for e in spec.entries if e.trainable].index("all_modules.2.weight")  # first conv
  shadow[i] = shadow[i].T.copy()
  with pytest.raises(convert.ReferenceLayoutError,
                     match=rf"ema.shadow_params.{i} \(3, 3, 3, 4\) \(for all_modules.2.weight \(4, 3, 3, 3\)\)"):
    convert.load_reference(path, spec)
  n = len(shadow)
  del shadow[-1]
  with pytest.raises(convert.ReferenceLayoutError, match=f"holds {n - 1} tensors, the model {n}"):
    convert.load_reference(path, spec)
  tensors, _, used = convert.load_reference(path, spec, weights="model")  # the raw ones still convert
  assert used == "model" and len(tensors) == len(spec.entries)


# ---------------------------------------------------------------------------
# Numbers: the layouts


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


def test_sample_setup_needs_no_dataset_on_disk(tmp_path):
  """A converted CIFAR-10 checkpoint samples without CIFAR-10 prepared; training still checks."""
  config = _config("digits", **{"data.dataset": "cifar10", "data.data_dir": str(tmp_path / "none")})
  with pytest.raises(Exception, match="cifar10"):
    plan_lib.make_plan(S(config))
  setup = plan_lib.make_plan(S(config), need_data=False)
  assert setup.model is not None and setup.sde.N == config.model.num_scales


@pytest.mark.slow  # sampling compiles the sampler and the network (~30 s on 2 CPU cores)
def test_sample_mode_samples_from_a_converted_checkpoint(tmp_path):
  # The dataset named is not on disk: sample mode must not need it.
  config = _config("digits", **{"model.num_scales": 8, "sample.num": 4, "data.dataset": "cifar10",
                                "data.data_dir": str(tmp_path / "no_data")})
  path, _, _, _ = _flax_reference_file(tmp_path, config, step=2000)
  dst = str(tmp_path / "run")
  convert.convert(path, dst, config, "flax")
  files = sample_mode.run(S(config), dst)
  with np.load(files["npz"]) as f:
    assert f["samples"].shape == (4, 8, 8, 1) and np.all(np.isfinite(f["samples"]))
