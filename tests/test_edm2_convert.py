"""The converter of NVlabs/edm2 network pickles (--from=edm2) and EDM2's generation presets.

Fixtures: tests/data/edm2_pickles/ (made by tests/data/make_edm2_pickles.py with EDM2's own
classes, snapshot routine and reconstruct_phema(); float16 weights as EDM2 pickles them;
EDM2's outputs on fixed inputs in *outputs.npz; commit and versions in manifest.json).
"""

from __future__ import annotations

import functools
import json
import math
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import score_jax
from score_jax import models
from score_jax.convert import cli as convert_cli
from score_jax.convert import edm2 as edm2_convert
from score_jax.convert import edm_pickle
from score_jax.errors import ConfigError
from score_jax.models.edm2 import EDM2UNet
from score_jax.run import builders
from score_jax.run.settings import from_config as S

from configs import edm2_presets

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "edm2_pickles")
CONFIG = os.path.join(HERE, "..", "configs", "edm2_presets.py")
VAE = os.path.join(HERE, "data", "vae", "tiny")  # 16x16x3 images <-> 8x8x4 latents
# name -> (pickle, outputs, preset whose data it has: 4 channels = img512, 3 = img64)
FIXTURES = {
    "snapshot": ("network-snapshot-0000008-0.050.pkl", "outputs.npz", "edm2-img512-s-autog-fid"),
    "phema": ("phema-0000016-0.080.pkl", "phema_outputs.npz", "edm2-img512-s-autog-fid"),
    "uncond": ("uncond/network-snapshot-0000008.pkl", "uncond/outputs.npz",
               "edm2-img64-s-autog-fid"),
}


def _manifest():
  with open(os.path.join(DATA, "manifest.json")) as f:
    return json.load(f)


def _pkl(name: str) -> str:
  return os.path.join(DATA, FIXTURES[name][0])


def _ref(name: str):
  return dict(np.load(os.path.join(DATA, FIXTURES[name][1])))


def _config(name: str):
  config = edm2_presets.get_config(FIXTURES[name][2])
  config.data.image_size = 8  # the fixtures' size; the network comes from the file
  config.sample.guide_workdir = ""
  config.sampling.guidance_weight = 0.0
  return config


@functools.lru_cache(maxsize=None)
def _converted(name: str):
  """(settings, model, params) of fixture `name` through the converter's steps, in memory."""
  obj = edm_pickle.load(_pkl(name))
  net = edm2_convert.find_network(obj, name)
  kw = edm2_convert.resolved_kwargs(net, name)
  config, _ = edm2_convert.config_for(_config(name), kw, name)
  s = S(config)
  model = builders.get_model(s)
  entries = edm2_convert.edm2_spec(kw)
  edm2_convert.check_spec(entries, model, s.data.shape(1))
  tensors = edm_pickle.state_dict(net)
  edm2_convert.check_tensors(tensors, entries, name)
  return s, model, edm2_convert.tensors_to_params(tensors, entries)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_reader_rebuilds_edm2_pickles_as_inert_records(name):
  obj = edm_pickle.load(_pkl(name))
  assert sorted(obj) == ["dataset_kwargs", "ema", "encoder", "loss_fn"]
  net = obj["ema"]
  assert (net.class_name, net.version, net.modules["unet"].class_name) == ("Precond", 6, "UNet")
  assert net.module_src.startswith("# training/networks_edm2.py of NVlabs/edm2")  # inert text
  assert obj["loss_fn"].class_name == "EDM2Loss" and obj["loss_fn"].state["P_mean"] == -0.4
  fixture = _manifest()["fixtures"]["uncond" if name == "uncond" else "cond"]
  tensors = edm_pickle.state_dict(net)
  assert len(tensors) == fixture["tensors"]
  assert {v.dtype for v in tensors.values()} == {np.dtype(np.float16)}  # as training_loop saves
  # EDM2 counts parameters without the Fourier buffers.
  assert sum(v.size for n, v in tensors.items()
             if not n.endswith(("freqs", "phases"))) == fixture["parameters"]
  enc = obj["encoder"]
  if name == "uncond":
    assert enc.class_name == "StandardRGBEncoder"
  else:  # numpy arrays in the pickle: EDM2's defaults, scale = 0.5 / raw_std, bias = -mean scale
    raw_mean, raw_std = np.float32([5.81, 3.25, 0.12, -2.15]), np.float32([4.17, 4.62, 3.71, 3.28])
    np.testing.assert_array_equal(enc.state["scale"], np.float32(0.5) / raw_std)
    np.testing.assert_array_equal(enc.state["bias"], -raw_mean * (np.float32(0.5) / raw_std))
  assert edm2_convert.edm2_spec(edm2_convert.resolved_kwargs(net))[0].name == "unet.out_gain"
  names = [e.name for e in edm2_convert.edm2_spec(edm2_convert.resolved_kwargs(net))]
  assert names == list(tensors)  # the map walks EDM2's state dict in its order


@functools.lru_cache(maxsize=None)
def _outputs_fn(model):
  """(params, x, sigma, y) -> (D, logvar): EDM2's denoiser from score_jax's score under the
  preset's VE SDE and 'edm' parameterization (D = x + sigma^2 score, alpha = 1), and u(sigma)."""
  s = S(edm2_presets.get_config("edm2-img64-s-fid"))
  sde = builders.get_sde(s)

  @jax.jit
  def fn(params, x, sigma, y):
    score_fn = models.get_score_fn(sde, model, {"params": params}, continuous=True,
                                   **builders.parameterization_kwargs(s))
    t = sde.t_from_log_snr(-jnp.log(sigma))
    std = sde.marginal_std(t)[:, None, None, None]
    d = x + std**2 * score_fn(x, t, y)
    logvar = model.apply({"params": params}, jnp.log(sigma) / 4, method=EDM2UNet.log_variance)
    return d, logvar

  return fn


def test_converted_networks_give_edm2_denoiser_and_logvar(fast_compile):
  """D(x; sigma) and u(sigma) at sigma = 0.002, 0.7, 80 (labels 1, 7, 3 and the zero label) of
  the snapshot, the reconstruct_phema output (one compilation for both) and the unconditional
  network.

  Against EDM2 on the same weights in float32 (`net.to(torch.float32)`, *_f32): per noise
  level to 1e-5 of its largest |D| plus two float32 roundings of |x| (D = x + sigma^2 score
  cancels most of x at sigma = 80); measured 7e-7 relative on the UNet's output. Against the
  float16 pickle as EDM2 runs it on the CPU: 2e-3 of |D|, since EDM2's MPConv then rounds each
  gain / sqrt(fan_in) to float16 (2^-11 relative; measured 3e-4 to 4e-4, the same as EDM2's own
  float16 vs float32 difference). logvar to 1e-6 absolute (|u| < 3, measured 5e-7).
  """
  for name in sorted(FIXTURES):
    _, model, params = _converted(name)
    ref = _ref(name)
    fn = functools.partial(_outputs_fn(model), params, ref["x"], ref["sigma"])
    ys = {"": None}
    if model.num_classes:
      y = jnp.asarray(ref["class_labels"].argmax(1))
      ys = {"": y, "_null": jnp.full_like(y, model.num_classes)}  # null label: EDM2's zero label
    for tag, y in ys.items():
      d, logvar = map(np.asarray, fn(y))
      for suffix, rel in (("_f32", 1e-5), ("", 2e-3)):
        want = ref["D" + tag + suffix]
        for i in range(len(ref["sigma"])):
          tol = (rel * np.abs(want[i]).max()
                 + 2 * np.finfo(np.float32).eps * np.abs(ref["x"][i]).max())
          assert np.abs(d[i] - want[i]).max() <= tol, (name, tag, suffix, ref["sigma"][i])
      np.testing.assert_allclose(logvar, ref["logvar_f32"], rtol=0, atol=1e-6)


def test_converted_config_takes_the_network_from_the_file():
  s, _, params = _converted("uncond")
  kwargs = _manifest()["fixtures"]["uncond"]["network_kwargs"]
  assert (s.model.name, s.model.num_classes, s.model.dropout) == ("edm2_unet", 0, 0.1)
  for key in ("model_channels", "channel_mult", "num_blocks", "attn_resolutions",
              "channels_per_head", "logvar_channels"):
    want = kwargs[key]
    assert s.model.get(key) == (tuple(want) if isinstance(want, list) else want), key
  # The preset's sampler and the converted weights (float16 -> float32 exactly) as read back.
  assert (s.sampling.method, s.sampling.num_steps) == ("heun", 31)
  tensors = edm_pickle.state_dict(edm_pickle.load(_pkl("uncond"))["ema"])
  got = params
  np.testing.assert_array_equal(np.asarray(got["unet"]["enc_8x8_conv"]["weight"]),
                                tensors["unet.enc.8x8_conv.weight"].astype(np.float32)
                                .transpose(2, 3, 1, 0))
  assert np.asarray(got["unet"]["out_gain"]).shape == ()


def test_command_line_converts_the_guide_of_an_autoguidance_preset(tmp_path, capsys):
  """The documented command for a preset's guide: converted into the preset's
  sample.guide_workdir, its config.json samples alone; load_run reads the weights back.
  (The main network's config.json is the preset's: guide_workdir and weight g - 1.)"""
  guide = str(tmp_path / "guide")
  argv = ["convert", "--from=edm2", f"--config={CONFIG}:edm2-img512-s-autog-fid",
          "--config.data.image_size=8", f"--config.sample.guide_workdir={guide}",
          "--config.data.latent_scale=()", f"--config.data.vae={VAE}", _pkl("snapshot"), guide]
  assert convert_cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "63 tensors, ema weights" in out and f"--workdir={guide} --mode=sample" in out
  run = score_jax.load_run(guide)
  assert (run.settings.sample.guide_workdir, run.settings.sampling.guidance_weight) == ("", 0.0)
  assert run.settings.model.get("model_channels") == 4 and run.settings.model.num_classes == 10
  _, _, params = _converted("snapshot")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(run.params))):
    np.testing.assert_array_equal(np.asarray(b), a)
  main = edm2_presets.get_config("edm2-img512-s-autog-fid")
  assert main.sampling.guidance_weight == pytest.approx(1.1)  # EDM2's guidance 2.10
  assert main.sample.guide_workdir == "runs/edm2-img512-s-autog-fid-guide"
  with pytest.raises(FileExistsError, match="already holds"):
    convert_cli.convert(_pkl("phema"), guide, _config("phema"), "edm2")
  # The file's encoder scale and bias (EDM2's defaults in the fixture) in config.json, where
  # the config left data.latent_scale empty; and in the preset, which sets them.
  enc = edm_pickle.load(_pkl("snapshot"))["encoder"].state
  for source in (run.settings.data, S(_config("snapshot")).data):
    np.testing.assert_array_equal(np.float32(source.latent_scale), enc["scale"])
    np.testing.assert_array_equal(np.float32(source.latent_shift), enc["bias"])
    assert source.vae_centered is False


@pytest.mark.slow  # ~16 s on 2 CPU cores, most of it compiling the sampler
def test_a_converted_img512_network_samples_images_through_data_vae(tmp_path):
  """--mode=sample of a converted latent network with data.vae and no data.path writes the
  latents decoded as EDM2 decodes them: vae.decode((z - bias) / scale), clamp(0, 1) * 255
  -> uint8 (the tiny VAE of tests/data/vae makes 16x16x3 images of the 8x8x4 latents)."""
  from score_jax.convert import vae as convert_vae  # pylint: disable=g-import-not-at-top
  from score_jax.run import sample  # pylint: disable=g-import-not-at-top
  from score_jax.run import settings as settings_lib  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "img512")
  config = _config("snapshot")
  config.data.vae = VAE
  edm2_convert.convert(_pkl("snapshot"), workdir, config)
  with open(os.path.join(workdir, "config.json")) as f:
    raw = json.load(f)
  assert raw["data"]["path"] == "" and raw["data"]["vae"] == VAE
  raw["sample"].update(num=2)
  raw["sampling"].update(num_steps=2, batch_size=2)
  paths = sample.run(settings_lib.from_config(raw), workdir)
  with np.load(paths["npz"]) as f:
    z, images = f["samples"], f["images"]
  assert z.shape == (2, 8, 8, 4) and images.shape == (2, 16, 16, 3)
  vae, params, _ = convert_vae.load_vae(VAE)
  enc = edm_pickle.load(_pkl("snapshot"))["encoder"].state
  y = np.asarray(vae.decode(params, (z - enc["bias"].reshape(-1)) / enc["scale"].reshape(-1)))
  edm2 = (np.clip(y, 0, 1) * 255).astype(np.uint8)
  # Through [-1, 1] and back: a value within float32 rounding of a level may truncate to the
  # next one (test_latents.py); never further, and rarely.
  diff = np.abs(images.astype(int) - edm2)
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-2
  assert os.path.isfile(paths["png"])


def test_bad_or_absent_files_are_refused_in_one_line(tmp_path, capsys):
  config = _config("phema")
  with pytest.raises(FileNotFoundError, match="No such file"):
    edm2_convert.convert(str(tmp_path / "absent.pkl"), str(tmp_path / "a"), config)
  text = tmp_path / "text.pkl"
  text.write_text("not a pickle")
  with pytest.raises(edm_pickle.EDMPickleError, match="not a Python pickle"):
    edm2_convert.convert(str(text), str(tmp_path / "b"), config)
  edm = os.path.join(HERE, "data", "edm", "ddpmpp_uncond", "network-snapshot-000000.pkl")
  with pytest.raises(edm2_convert.EDM2LayoutError, match="--from=edm"):
    edm2_convert.convert(edm, str(tmp_path / "c"), config)
  evil = tmp_path / "evil.pkl"
  evil.write_bytes(pickle.dumps({"ema": os.system}, protocol=4))
  argv = ["convert", "--from=edm2", f"--config={CONFIG}:edm2-img512-s-fid", str(evil),
          str(tmp_path / "d")]
  assert convert_cli.main(argv) != 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "refuses" in err[0], err
  for dst in "abcd":
    assert not os.path.exists(tmp_path / dst)
  # A file whose tensors do not fit its constructor arguments.
  obj = edm_pickle.load(_pkl("phema"))
  net = obj["ema"]
  kw = edm2_convert.resolved_kwargs(net)
  tensors = edm_pickle.state_dict(net)
  del tensors["unet.out_conv.weight"]
  tensors["unet.enc.8x8_conv.weight"] = tensors["unet.enc.8x8_conv.weight"][:, :3]
  with pytest.raises(edm2_convert.EDM2LayoutError, match=r"1 missing: unet.out_conv.weight.*"
                     r"unet.enc.8x8_conv.weight \(4, 3, 3, 3\) \(expected \(4, 5, 3, 3\)\)"):
    edm2_convert.check_tensors(tensors, edm2_convert.edm2_spec(kw), "f.pkl")


def test_unsupported_constructor_arguments_are_refused():
  net = edm_pickle.load(_pkl("phema"))["ema"]
  kw = edm2_convert.resolved_kwargs(net)
  config = _config("phema")
  new, notes = edm2_convert.config_for(config, kw)
  assert new.model.model_channels == 4 and "model.model_channels=4 from the file" in notes[2]
  cases = {
      "resample_filter": ([1, 3, 3, 1], "resample_filter=\\(1, 3, 3, 1\\).*\\[1, 1\\] only"),
      "embedding_type": ("fourier", "argument\\(s\\) \\['embedding_type'\\] that"),
      "img_resolution": (16, "img_resolution=16 in the file, data.image_size=8 in the config"
                             ".*--config.data.image_size=16"),
  }
  for key, (value, match) in cases.items():
    with pytest.raises(edm2_convert.EDM2LayoutError, match=match):
      edm2_convert.config_for(config, {**kw, key: value}, "f.pkl")
  pixels = _config("uncond")
  pixels.data.centered = False
  obj = edm_pickle.load(_pkl("uncond"))
  with pytest.raises(edm2_convert.EDM2LayoutError, match="data.centered=True"):
    edm2_convert.encoder_config(obj, pixels)
  # A latent config that sets another normalization than the file's encoder, or [-1, 1] pixels.
  obj = edm_pickle.load(_pkl("snapshot"))
  other = _config("snapshot")
  other.data.latent_shift = (0.0, 0.0, 0.0, 0.0)
  with pytest.raises(edm2_convert.EDM2LayoutError, match=r"latent_shift=.*latent_shift=\(0, 0, "
                     r"0, 0\); nothing was converted: set --config.data.latent_shift=\"\(\)\""):
    edm2_convert.encoder_config(obj, other)
  other = _config("snapshot")
  other.data.vae_centered = True
  with pytest.raises(edm2_convert.EDM2LayoutError, match="vae_centered=False"):
    edm2_convert.encoder_config(obj, other)


def test_presets_are_edm2s_generation_settings(fast_compile):
  """Every generate_images.py preset builds; the guided ones hold EDM2's guidance as
  guidance_weight g - 1 and a guide; the sampler is EDM2's 32-level Heun (63 NFE) on
  sigma_i = (80^(1/7) + i/31 (0.002^(1/7) - 80^(1/7)))^7 with a last Euler step to 0, compared
  on a Gaussian (closed-form D) with EDM2's edm_sampler written out below."""
  for name, p in edm2_presets.PRESETS.items():
    s = S(edm2_presets.get_config(name))
    assert s.model.name == "edm2_unet" and s.data.num_channels == (4 if "img512" in name else 3)
    assert s.sampling.guidance_weight == pytest.approx(p.guidance - 1.0)
    assert bool(s.sample.guide_workdir) == (p.gnet is not None)
    assert s.model.num_classes == (0 if "-uncond-" in p.net else 1000)
  with pytest.raises(ConfigError, match="Unknown EDM2 preset"):
    edm2_presets.get_config("edm2-img512-s")
  s = S(edm2_presets.get_config("edm2-img64-s-fid"))
  sde = builders.get_sde(s)
  var0 = 0.3  # data ~ N(0, var0 I): D(x; sigma) = x var0 / (var0 + sigma^2)
  score = lambda x, t, y=None: -x / (var0 + sde.marginal_std(t)[:, None, None, None] ** 2)
  z = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
  x, nfe = builders.get_sampler(s, sde)(jax.random.PRNGKey(0), score, z.shape, z=80.0 * z)
  assert nfe == 63
  # EDM2's edm_sampler (generate_images.py), float64, guidance 1, S_churn 0.
  i = np.arange(32, dtype=np.float64)
  t = (80 ** (1 / 7) + i / 31 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
  t = np.append(t, 0.0)
  denoise = lambda x, sigma: x * var0 / (var0 + sigma**2)
  xn = 80.0 * z.astype(np.float64)
  for k in range(32):
    d = (xn - denoise(xn, t[k])) / t[k]
    xe = xn + (t[k + 1] - t[k]) * d
    if k < 31:
      xe = xn + (t[k + 1] - t[k]) * (0.5 * d + 0.5 * (xe - denoise(xe, t[k + 1])) / t[k + 1])
    xn = xe
  # float32 over 63 evaluations, and the last level 0.0020000212 instead of 0.002.
  np.testing.assert_allclose(np.asarray(x), xn, rtol=1e-4, atol=1e-5)


# EDM2's Table 2 (img512, 1000 classes): parameters in millions, by model_channels.
EDM2_PARAMS_M = {128: 125, 192: 280, 256: 498, 320: 777, 384: 1119, 448: 1523}


def test_full_size_maps_count_edm2s_parameters():
  """The map of each released img512 size holds EDM2's parameter count (its Table 2, without
  the Fourier buffers; tests/test_edm2.py counts EDM2UNet's, and the converter checks the map
  against the network's jax.eval_shape at every conversion)."""
  for channels, millions in EDM2_PARAMS_M.items():
    # As train_edm2.py constructs them: channels, dropout, use_fp16 and the interface.
    kw = {**edm2_convert.BLOCK_DEFAULTS, **edm2_convert.UNET_DEFAULTS,
          **edm2_convert.PRECOND_DEFAULTS, "img_resolution": 64, "img_channels": 4,
          "label_dim": 1000, "model_channels": channels}
    entries = edm2_convert.edm2_spec(kw)
    assert round(sum(math.prod(e.ref_shape) for e in entries if e.trainable) / 1e6) == millions


@pytest.mark.slow
def test_converted_autoguidance_pair_guides_as_edm2(tmp_path):
  """The documented pair (main: the reconstruct_phema output, guide: the snapshot, preset
  edm2-img512-s-autog-fid) samples with EDM2's guided denoiser D_guide + g (D_main - D_guide),
  g = 2.10 (generate_images.py's ref_Dx.lerp(Dx, guidance)): score_jax's autoguided score at
  the fixtures' x, sigma and labels against that formula on EDM2's float32 outputs of the two
  networks. Tolerance: each D to 1e-5 of |D| (as above) times 1 + 2 g, plus float32 roundings
  of |x| amplified by the same factor (D = x + sigma^2 ((1 + w) s_main - w s_guide))."""
  from score_jax.run import load, programs  # pylint: disable=import-outside-toplevel
  main, guide = str(tmp_path / "main"), str(tmp_path / "guide")
  config = edm2_presets.get_config("edm2-img512-s-autog-fid")
  config.data.image_size = 8
  config.sample.guide_workdir = guide
  edm2_convert.convert(_pkl("phema"), main, config)
  edm2_convert.convert(_pkl("snapshot"), guide, config)
  run = score_jax.load_run(main)
  progs = programs.Programs(run.plan, guide=load.load_guide(run.settings, run.plan))
  ref_main, ref_guide = _ref("phema"), _ref("snapshot")
  x, sigma = ref_main["x"], ref_main["sigma"]
  y = jnp.asarray(ref_main["class_labels"].argmax(1))
  sde = run.plan.sde
  t = sde.t_from_log_snr(-jnp.log(jnp.asarray(sigma)))
  w = run.settings.sampling.guidance_weight
  score = progs.score_fn(progs.guided(run.params), y, w)(jnp.asarray(x), t)
  d = np.asarray(x + sde.marginal_std(t)[:, None, None, None] ** 2 * score)
  g = 2.10
  want = ref_guide["D_f32"] + g * (ref_main["D_f32"] - ref_guide["D_f32"])
  for i in range(len(sigma)):
    tol = (1 + 2 * g) * (1e-5 * np.abs(want[i]).max()
                         + 2 * np.finfo(np.float32).eps * np.abs(x[i]).max())
    assert np.abs(d[i] - want[i]).max() <= tol, sigma[i]
  # Guidance moves D: the pair differs from the main network alone.
  assert np.abs(want - ref_main["D_f32"]).max() > 1e-2
