"""EDM's CIFAR-10 networks (SongUNet), configs and the converter of NVlabs/edm pickles.

Fixtures: tests/data/edm/<name>/ (made by tests/data/make_edm_fixtures.py with
EDM's own classes, construction and snapshot routine; random weights; EDM
commit and torch version in tests/data/edm/manifest.json):
network-snapshot-000000.pkl and EDM's outputs on fixed inputs (outputs.npz).
Full-size networks are only shape-evaluated (`jax.eval_shape`).
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import score_jax
from score_jax import models
from score_jax.convert import cli as convert_cli
from score_jax.convert import reference as convert
from score_jax.convert import edm as edm_convert
from score_jax.convert import edm_pickle
from score_jax.run import programs
from score_jax.run import builders
from score_jax.run import plan as plan_lib
from score_jax.run import train
from score_jax.run import state as run_state
from score_jax.models import song_unet
from score_jax.sde import VESDE
from score_jax.run.settings import from_config as S

from configs import edm_cifar_ve, edm_cifar_vp

HERE = os.path.dirname(os.path.abspath(__file__))
EDM = os.path.join(HERE, "data", "edm")
FIXTURES = ("ddpmpp_uncond", "ncsnpp_cond")
REL_TOL = 1e-5  # of the largest |output|, float32

# ---------------------------------------------------------------------------
# Full-size networks and configs


# (config, classes) -> EDM's parameter count (its Fourier frequencies are a buffer there).
EDM_COUNTS = {("vp", 0): 55_733_891, ("vp", 10): 55_733_891 + 1_408,
              ("ve", 0): 56_397_827, ("ve", 10): 56_397_827 + 2_816}
CONFIGS = {"vp": edm_cifar_vp, "ve": edm_cifar_ve}


@pytest.mark.parametrize("arch,classes", sorted(EDM_COUNTS))
def test_edm_cifar_parameter_counts_match_edm(arch, classes):
  config = CONFIGS[arch].get_config()
  config.model.num_classes = classes
  s = S(config)
  model = builders.get_model(s)
  assert isinstance(model, song_unet.SongUNet)
  total = models.count_params(model, s.data.shape(1))
  freqs = 128 if arch == "ve" else 0  # the NCSN++ frequencies: a parameter here, no gradient
  assert total - freqs == EDM_COUNTS[(arch, classes)]


def _tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config.data.image_size = 8
  config.training.batch_size = 4
  config.model.nf = 8
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = ()  # (the innermost decoder block always attends)
  config.optim.warmup = 0
  config.optim.lr_rampup_kimg = 0.0  # the ramp starts at lr 0: the first step must move the weights
  return config


def _host_params(model, shape):
  """Random parameters drawn on the host (`init` compiles for ~35 s on 2 CPU cores)."""
  shapes = jax.eval_shape(lambda r: models.init_model(r, model, shape), jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  scale = lambda s: 1 / np.sqrt(np.prod(s[:-1])) if len(s) > 1 else 0.1
  return jax.tree.map(lambda a: (rng.normal(size=a.shape) * scale(a.shape)).astype(np.float32),
                      shapes["params"])


@pytest.mark.slow  # ~15 s each on 2 CPU cores; the networks' outputs are tested fast below
@pytest.mark.parametrize("arch", ["ve", "vp"])
def test_edm_config_builds_and_a_training_step_runs(arch, fast_compile):
  """The config builds with EDM's settings; at tiny size a training step (the 'edm'
  parameterization, log-normal sigma, EDM weighting, EDM's augmentation, Adam, EMA) moves the
  weights, the augmentation labels' embedding among them (its gradient is zero unless the
  network received non-zero labels: Adam's first step leaves a weight with zero gradient
  where it is), and leaves the Fourier frequencies fixed. ~30 s on 2 CPU cores (compiling
  the step, most optimizations off: only which weights move matters) each."""
  s = S(CONFIGS[arch].get_config())
  assert (s.model.name, s.model.parameterization, s.training.time_distribution,
          s.training.weighting, s.training.batch_size) == ("song_unet", "edm", "lognormal_sigma",
                                                            "edm", 512)
  assert (s.optim.lr, s.optim.beta1, s.optim.eps, s.optim.grad_clip) == (1e-3, 0.9, 1e-8, 0.0)
  assert (s.sampling.method, s.sampling.schedule, s.sampling.num_steps) == ("heun", "edm", 17)
  sde = builders.get_sde(s)
  assert float(sde.marginal_std(jnp.ones(1))[0]) == pytest.approx(80.0)
  assert float(sde.marginal_std(jnp.full((1,), s.sampling.eps))[0]) == pytest.approx(0.002, rel=2e-5)

  setup = plan_lib.make_plan(S(_tiny(CONFIGS[arch].get_config())), need_data=False)
  params = _host_params(setup.model, setup.settings.data.shape(1))
  state = jax.device_put(run_state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                          opt_state=setup.tx.init(params), ema_params=params),
                         setup.replicated)
  x = np.random.default_rng(1).uniform(-1, 1, size=(4, 8, 8, 3)).astype(np.float32)
  xs, ys = train.global_batch(setup, {"image": x, "label": np.zeros((4,), np.int32)})
  state, metrics = train.make_train_step(setup)(
      state, xs, ys, jax.device_put(jax.random.PRNGKey(1), setup.replicated))
  assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), params, jax.device_get(state.params))
  assert moved["map_layer0"]["kernel"] and moved["dec_8x8_aux_conv"]["kernel"]
  assert moved["map_augment"]["kernel"]
  assert moved["enc_4x4_down"]["conv0"]["kernel"]
  if arch == "ve":
    assert moved["enc_4x4_aux_residual"]["kernel"]
    assert not moved["map_noise"]["freqs"]  # a buffer: no gradient, Adam leaves it


def test_edm_configs_train_on_edm_schedules_in_images():
  """EMA half-life 0.5 Mimg with ramp-up ratio 0.05 and the lr ramp-up over 10 Mimg, at batch 512."""
  s = S(edm_cifar_vp.get_config())
  assert (s.model.ema_halflife_kimg, s.model.ema_rampup_ratio) == (500.0, 0.05)
  assert (s.optim.lr_rampup_kimg, s.optim.warmup, s.training.batch_size) == (10_000.0, 0, 512)
  lr = builders.get_lr_schedule(s)
  np.testing.assert_allclose(float(lr(9_765)), 1e-3 * 9_765 * 512 / 1e7, rtol=1e-5)
  np.testing.assert_allclose(float(lr(100_000)), 1e-3, rtol=1e-6)


@pytest.mark.parametrize("ramp", ["warmup", "kimg"])
def test_cosine_lr_decay_multiplies_either_ramp(ramp):
  """optim.lr_decay = 'cosine': the ramp times (1 + cos(pi step / n_iters)) / 2, 0 from n_iters."""
  cfg = edm_cifar_vp.get_config()
  with cfg.unlocked():
    cfg.training.n_iters, cfg.optim.lr_decay = 1000, "cosine"
    if ramp == "warmup":
      cfg.optim.lr_rampup_kimg, cfg.optim.warmup = 0.0, 100
  s = S(cfg)
  ramp_lr = builders.get_lr_schedule(s.replace(optim={"lr_decay": "none"}))
  lr = builders.get_lr_schedule(s)
  for step in (0, 50, 250, 500, 999, 1000, 5000):
    want = float(ramp_lr(step)) * (1 + np.cos(np.pi * min(step / 1000, 1))) / 2
    # float32: the cosine factor is exact to ~1e-7 absolute, hence atol 1e-6 of the peak rate.
    np.testing.assert_allclose(float(lr(step)), want, rtol=1e-5, atol=1e-6 * s.optim.lr)
  assert float(lr(500)) > 0 and float(lr(1000)) == 0.0


def test_heun_config_spends_edm_35_evaluations():
  s = S(edm_cifar_vp.get_config())
  sde = builders.get_sde(s)
  sampler = builders.get_sampler(s, sde)
  score = lambda x, t, y=None: -x / (sde.marginal_std(t)[:, None, None, None] ** 2 + 0.25)
  x, nfe = sampler(jax.random.PRNGKey(0), score, (2, 4, 4, 3))
  assert nfe == 35 and bool(jnp.all(jnp.isfinite(x)))


def test_song_unet_refuses_what_it_does_not_implement():
  x, labels = jnp.ones((2, 8, 8, 3)), jnp.ones((2,))
  model = song_unet.SongUNet(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
  with pytest.raises(ValueError, match="augment_labels must have shape"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, labels,
                                      augment_labels=jnp.zeros((2, 4))))
  with pytest.raises(ValueError, match="class labels y were given"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, labels, jnp.zeros((2,), int)))
  for bad in (dict(encoder_type="skip"), dict(decoder_type="skip"), dict(embedding_type="x")):
    with pytest.raises(ValueError, match=next(iter(bad))):
      jax.eval_shape(lambda: song_unet.SongUNet(nf=8, ch_mult=(1, 2), **bad).init(
          jax.random.PRNGKey(0), x, labels))


# ---------------------------------------------------------------------------
# Fixtures written by EDM's code


@functools.lru_cache(maxsize=None)
def _manifest():
  with open(os.path.join(EDM, "manifest.json")) as f:
    return json.load(f)


def _pkl(name: str) -> str:
  return os.path.join(EDM, name, "network-snapshot-000000.pkl")


def _config(name: str) -> ml_collections.ConfigDict:
  """configs/edm_cifar_{vp,ve}.py shrunk as make_edm_fixtures.py shrinks EDM's train.py settings."""
  kw = _manifest()["fixtures"][name]
  net, iface = kw["network_kwargs"], kw["interface_kwargs"]
  config = (edm_cifar_ve if net["embedding_type"] == "fourier" else edm_cifar_vp).get_config()
  config.data.image_size = iface["img_resolution"]
  config.model.num_classes = iface["label_dim"]
  config.model.nf = net["model_channels"]
  config.model.ch_mult = tuple(net["channel_mult"])
  config.model.num_res_blocks = net["num_blocks"]
  config.model.attn_resolutions = tuple(net["attn_resolutions"])
  return config


def _overrides(name: str):
  config = _config(name)
  return [f"--config.data.image_size={config.data.image_size}",
          f"--config.model.num_classes={config.model.num_classes}",
          f"--config.model.nf={config.model.nf}",
          f"--config.model.ch_mult={config.model.ch_mult!r}".replace(" ", ""),
          f"--config.model.num_res_blocks={config.model.num_res_blocks}",
          f"--config.model.attn_resolutions={config.model.attn_resolutions!r}".replace(" ", "")]


@functools.lru_cache(maxsize=None)
def _converted(name: str):
  """(settings, model, params) of fixture `name`, through the converter's steps."""
  s = S(_config(name))
  model = builders.get_model(s)
  shape = s.data.shape(1)
  entries, buffers = edm_convert.edm_spec(model, shape[1], shape[3])
  edm_convert.check_spec(entries, model, shape)
  net = edm_convert.find_network(edm_pickle.load(_pkl(name)), name)
  assert edm_convert.check_init_kwargs(net, model, s, name) == []
  tensors = edm_pickle.state_dict(net)
  edm_convert.check_tensors(tensors, entries, buffers, name)
  return s, model, edm_convert.tensors_to_params(tensors, entries)


def _ref(name: str):
  return dict(np.load(os.path.join(EDM, name, "outputs.npz")))


def _rel_err(got, want) -> float:
  return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


@functools.lru_cache(maxsize=None)
def _apply(name: str):
  _, model, _ = _converted(name)
  return jax.jit(lambda p, x, labels, y, aug: model.apply({"params": p}, x, labels, y,
                                                          augment_labels=aug))


@pytest.mark.parametrize("name", FIXTURES)
def test_reader_rebuilds_the_snapshot_as_inert_records(name):
  obj = edm_pickle.load(_pkl(name))
  assert sorted(obj) == ["augment_pipe", "dataset_kwargs", "ema", "loss_fn"]
  net = obj["ema"]
  assert (net.class_name, net.version) == ("EDMPrecond", 6)
  assert net.module_src.startswith("# training/networks.py of NVlabs/edm")  # kept as text
  assert net.modules["model"].class_name == "SongUNet"
  assert type(net.modules["model"].modules["enc"]).torch_class == "torch.nn.ModuleDict"
  assert obj["loss_fn"].class_name == "EDMLoss" and obj["loss_fn"].state["P_mean"] == -1.2
  assert obj["augment_pipe"].init_kwargs["p"] == 0.12
  res = _config(name).data.image_size
  block = net.modules["model"].modules["enc"].modules[f"{res}x{res}_block0"]
  assert isinstance(block.state["skip_scale"], np.float64)  # a pickled numpy scalar
  # The map walks EDM's state dict in its order; the resampling filters are its buffers.
  s, model, _ = _converted(name)
  entries, buffers = edm_convert.edm_spec(model, s.data.image_size, 3)
  tensors = edm_pickle.state_dict(net)
  assert [n for n in tensors if n not in buffers] == [e.name for e in entries]
  assert len(tensors) == _manifest()["fixtures"][name]["tensors"]
  n_params = sum(v.size for n, v in tensors.items() if n not in buffers and "freqs" not in n)
  assert n_params == _manifest()["fixtures"][name]["parameters"]


@pytest.mark.parametrize("name", FIXTURES)
def test_converted_network_computes_edm_raw_network_output(name):
  """F(c_in x; c_noise) equals EDM's SongUNet on the same inputs, with and without the
  augmentation labels (zero labels are EDM's none: map_augment has no bias) and with the
  null class label num_classes (EDM's zero label). The noise label is what the 'edm' score
  function passes: c_noise, or exp(c_noise) for the Fourier network (which embeds its log)."""
  s, model, params = _converted(name)
  ref = _ref(name)
  fourier = model.embedding_type == "fourier"
  labels = jnp.exp(ref["c_noise"]) if fourier else jnp.asarray(ref["c_noise"])
  y = jnp.asarray(ref["class_labels"].argmax(1)) if model.num_classes else None
  f = functools.partial(_apply(name), params, ref["c_in_x"], labels)
  assert _rel_err(f(y, np.zeros_like(ref["augment_labels"])), ref["F"]) < REL_TOL
  assert _rel_err(f(y, ref["augment_labels"]), ref["F_aug"]) < REL_TOL
  if model.num_classes:
    null = jnp.full_like(y, model.num_classes)
    assert _rel_err(f(null, np.zeros_like(ref["augment_labels"])), ref["F_null"]) < REL_TOL


@functools.lru_cache(maxsize=None)
def _denoiser_fn(name: str):
  """EDM's D(x; sigma) from score_jax's score under the config's SDE and parameterization:
  D = (x + std^2 score) / alpha at the time whose sigma^ = std / alpha is sigma."""
  s, model, _ = _converted(name)
  sde = builders.get_sde(s)
  assert isinstance(sde, VESDE)

  @jax.jit
  def denoise(params, x, sigma, y):
    score_fn = models.get_score_fn(sde, model, {"params": params}, continuous=True,
                                   **builders.parameterization_kwargs(s))
    t = sde.t_from_log_snr(-jnp.log(sigma))
    std, alpha = sde.marginal_std(t), sde.mean_coef(t)
    score = score_fn(x, t, y)
    return (x + std[:, None, None, None] ** 2 * score) / alpha[:, None, None, None]

  return denoise


@pytest.mark.parametrize("name", FIXTURES)
def test_converted_network_computes_edm_denoiser(name):
  """EDM's D(x; sigma) at sigma = 0.002, 0.7, 80 through score_jax's 'edm' parameterization
  of the VE SDE (models.get_score_fn), per noise level to 1e-5 of its largest |D| plus two
  float32 roundings of x: D = x + sigma^2 score cancels most of x at sigma = 80 (|x| ~ 200,
  |D| ~ 1; measured 1.9e-5 and 2.5e-5 of |D| there, below 1e-6 at the other levels)."""
  s, model, params = _converted(name)
  ref = _ref(name)
  y = jnp.asarray(ref["class_labels"].argmax(1)) if model.num_classes else None
  denoise = functools.partial(_denoiser_fn(name), params, ref["x"], ref["sigma"])
  want = {"D": (y, ref["D"])}
  if model.num_classes:
    want["D_null"] = (jnp.full_like(y, model.num_classes), ref["D_null"])
  for key, (labels, d_ref) in want.items():
    d = np.asarray(denoise(labels))
    for i, sigma in enumerate(ref["sigma"]):
      tol = 1e-5 * np.abs(d_ref[i]).max() + 2 * np.finfo(np.float32).eps * np.abs(ref["x"][i]).max()
      assert np.abs(d[i] - d_ref[i]).max() <= tol, (key, sigma)


def test_command_line_converts_an_edm_snapshot_into_a_workdir(tmp_path, capsys):
  name = "ncsnpp_cond"
  dst = str(tmp_path / "run")
  argv = ["convert", "--from=edm", "--config=" + os.path.join(HERE, "..", "configs",
                                                              "edm_cifar_ve.py"),
          *_overrides(name), _pkl(name), dst]
  assert convert_cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "ema weights" in out and f"--workdir={dst} --mode=sample" in out
  assert sorted(os.listdir(dst)) == ["checkpoints", "config.json"]
  assert os.listdir(tmp_path) == ["run"]
  run = score_jax.load_run(dst)
  _, _, params = _converted(name)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(run.params))):
    np.testing.assert_array_equal(np.asarray(b), a)
  assert run.settings.model.parameterization == "edm"
  with pytest.raises(FileExistsError, match="already holds"):
    convert_cli.convert(_pkl(name), dst, _config(name), "edm")


def test_constructor_arguments_that_differ_are_named_with_the_overrides(tmp_path):
  name = "ddpmpp_uncond"
  config = _config(name)
  config.model.nf = 16
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.augment_dim = 0
  config.data.augment_p = 0.0  # (EDM's augmentation makes 9 labels: settings refuse 0)
  dst = str(tmp_path / "run")
  with pytest.raises(edm_convert.EDMLayoutError) as e:
    edm_convert.convert(_pkl(name), dst, config)
  msg = str(e.value)
  for part in ("model_channels=8 in the file, model.nf=16 in the config",
               "channel_mult=(1, 2, 2) in the file, model.ch_mult=(1, 2, 2, 2) in the config",
               "augment_dim=9 in the file, model.augment_dim=0 in the config",
               "--config.model.nf=8", "--config.model.ch_mult=\"(1, 2, 2)\"",
               "--config.model.augment_dim=9"):
    assert part in msg, part
  assert "num_res_blocks" not in msg and not os.path.exists(dst)
  # A training-only difference is reported and converted.
  config = _config(name)
  config.model.dropout = 0.2
  result = edm_convert.convert(_pkl(name), dst, config)
  assert result["notes"] == ["dropout=0.13 in the file, model.dropout=0.2 in the config "
                             "(training only; converted as is)"]
  # The config must be EDM's parameterization and network.
  config = _config(name)
  config.model.parameterization = "default"
  with pytest.raises(edm_convert.EDMLayoutError, match="parameterization='edm'"):
    edm_convert.convert(_pkl(name), str(tmp_path / "other"), config)


def test_partial_or_tampered_network_is_refused_with_names(tmp_path, monkeypatch):
  """The fixture as edm_pickle reads it, with a tensor removed, one added, one reshaped and a
  resampling filter changed: the converter names them and writes nothing."""
  name = "ncsnpp_cond"
  obj = edm_pickle.load(_pkl(name))
  model = obj["ema"].modules["model"]
  enc = model.modules["enc"].modules
  del enc["16x16_block0"].modules["conv1"].state["_parameters"]["bias"]
  enc["16x16_block0"].modules["conv1"].state["_parameters"]["extra"] = np.zeros(3, np.float32)
  affine = enc["8x8_block0"].modules["affine"].state["_parameters"]
  affine["weight"] = affine["weight"][:, :-1]
  monkeypatch.setattr(edm_pickle, "load", lambda _: obj)
  dst = str(tmp_path / "run")
  with pytest.raises(edm_convert.EDMLayoutError) as e:
    edm_convert.convert(_pkl(name), dst, _config(name))
  msg = str(e.value)
  assert "1 missing: model.enc.16x16_block0.conv1.bias" in msg
  assert "1 unexpected: model.enc.16x16_block0.conv1.extra" in msg
  assert "model.enc.8x8_block0.affine.weight (16, 31) (expected (16, 32))" in msg
  assert not os.path.exists(dst)

  monkeypatch.undo()
  obj = edm_pickle.load(_pkl(name))
  down = obj["ema"].modules["model"].modules["enc"].modules["8x8_down"].modules["conv0"]
  down.state["_buffers"]["resample_filter"] = np.full((1, 1, 4, 4), 1 / 16, np.float32)
  monkeypatch.setattr(edm_pickle, "load", lambda _: obj)
  with pytest.raises(edm_convert.EDMLayoutError,
                     match=r"resampling filters .* model\.enc\.8x8_down\.conv0\.resample_filter"):
    edm_convert.convert(_pkl(name), dst, _config(name))
  assert not os.path.exists(dst)


def test_reader_refuses_other_globals_and_runs_nothing(tmp_path, monkeypatch):
  # A file that would run a command when unpickled: refused, naming the global.
  marker = tmp_path / "ran"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  with pytest.raises(edm_pickle.EDMPickleError, match=r"needs (posix|nt)\.system, which this reader"):
    edm_pickle.loads(pickle.dumps({"ema": Evil()}, protocol=4), "evil.pkl")
  assert not marker.exists()

  # A persistent-class record whose module source would write a file: kept as text.
  src = f"open({str(marker)!r}, 'w').write('x')\n"
  package = types.ModuleType("torch_utils")
  module = types.ModuleType("torch_utils.persistence")

  def _reconstruct_persistent_obj(meta):  # stands in for EDM's, to write the record
    raise AssertionError("never called")

  _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
  _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
  module._reconstruct_persistent_obj = _reconstruct_persistent_obj
  package.persistence = module
  monkeypatch.setitem(sys.modules, "torch_utils", package)
  monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)

  class Record:
    def __reduce__(self):
      return (_reconstruct_persistent_obj, (dict(type="class", version=6, module_src=src,
                                                  class_name="EDMPrecond", state={"a": 1}),))

  data = pickle.dumps({"ema": Record()}, protocol=4)
  monkeypatch.undo()
  obj = edm_pickle.loads(data, "record.pkl")
  assert obj["ema"].module_src == src and obj["ema"].state == {"a": 1}
  assert not marker.exists()
  with pytest.raises(edm_convert.EDMLayoutError, match="no constructor arguments"):
    edm_convert.check_init_kwargs(obj["ema"], None, None)

  # Truncated or foreign files.
  with open(_pkl("ddpmpp_uncond"), "rb") as f:
    good = f.read()
  with pytest.raises(edm_pickle.EDMPickleError, match="cannot be read"):
    edm_pickle.loads(good[: len(good) // 2], "half.pkl")
  with pytest.raises(edm_pickle.EDMPickleError, match="not a Python pickle"):
    edm_pickle.loads(b"PK\x03\x04", "a.zip")
