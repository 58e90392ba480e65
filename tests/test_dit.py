"""DiT (models/dit.py), its configs and the converter of facebookresearch/DiT checkpoints.

Reference values come from the authors' code (tests/data/make_dit_fixture.py, commit and
versions in tests/data/dit/manifest.json): the parameter counts of their twelve presets and a
tiny DiT's train.py checkpoint with their network's outputs on fixed inputs. Full-size
networks are only shape-evaluated (`jax.eval_shape`).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import score_jax
from score_jax import models
from score_jax.convert import cli as convert_cli
from score_jax.convert import dit as dit_convert
from score_jax.convert import torch_pickle
from score_jax.errors import ConfigError
from score_jax.run import builders
from score_jax.run.settings import from_config as S

from configs import imagenet256_dit_xl2, imagenet256_sit_xl2

HERE = os.path.dirname(os.path.abspath(__file__))
DIT = os.path.join(HERE, "data", "dit")
CKPT = os.path.join(DIT, "0000001.pt")
CONFIG = os.path.join(HERE, "..", "configs", "imagenet256_dit_xl2.py")
# Float32 against float32: two blocks of width 32 accumulate roundings of ~6e-8 of the
# activations' size (measured: 7e-7 and 9e-7 of the largest |output|); 1e-5 leaves room for
# other CPUs' summation orders and is far below any layout or formula error (a swapped sin/cos,
# head order or patch order changes the output by O(1)).
REL_TOL = 1e-5


@functools.lru_cache(maxsize=None)
def _manifest():
  with open(os.path.join(DIT, "manifest.json")) as f:
    return json.load(f)


def _tiny_overrides():
  tiny = _manifest()["tiny"]
  return {"data.image_size": tiny["input_size"], "data.num_channels": tiny["in_channels"],
          "model.num_classes": tiny["num_classes"], "model.hidden_size": tiny["hidden_size"],
          "model.depth": tiny["depth"], "model.num_heads": tiny["num_heads"],
          "model.patch_size": tiny["patch_size"], "model.dit_size": "S"}


def _tiny_config():
  config = imagenet256_dit_xl2.get_config()
  for key, value in _tiny_overrides().items():
    section, name = key.split(".")
    config[section][name] = value
  return config


@functools.lru_cache(maxsize=None)
def _tiny():
  """(settings, model, {'ema': params, 'model': params}) of the fixture, through the
  converter's steps."""
  s = S(_tiny_config())
  model = builders.get_model(s)
  entries = dit_convert.dit_spec(model, s.data.num_channels)
  dit_convert.check_spec(entries, model, s.data.shape(1))
  obj = torch_pickle.load(CKPT)
  params = {}
  for weights in ("ema", "model"):
    tensors, args = dit_convert.find_state_dict(obj, CKPT, weights)
    assert [n for n in tensors if n != "pos_embed"] == [e.name for e in entries]  # their order
    notes = dit_convert.check_args(args, model, CKPT)
    assert notes == ["args.model = 'DiT-T/2' is not one of DiT's presets; the head count "
                     "(model.num_heads = 4) is not checked"]
    p = s.data.image_size // model.patch_size
    pos = models.dit.pos_embed_2d(s.model.get("hidden_size"), p, p)
    assert dit_convert.check_tensors(tensors, entries, pos, model.num_classes, CKPT) == []
    params[weights] = dit_convert.tensors_to_params(tensors, entries)
  return s, model, params


@functools.lru_cache(maxsize=None)
def _apply():
  """The tiny network's full output (one compilation for both weight sets)."""
  _, model, _ = _tiny()
  return jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y, full_output=True))


def _ref():
  return dict(np.load(os.path.join(DIT, "outputs.npz")))


def _rel_err(got, want) -> float:
  return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


# ---------------------------------------------------------------------------
# Full-size networks


# Fast: each size once and each patch size once (the patch size changes the patch embedding
# and the final layer only); the rest in the slow tier.
_FAST_PRESETS = ("DiT-S/2", "DiT-B/4", "DiT-L/8", "DiT-XL/2")


@pytest.mark.parametrize("preset", [
    p if p in _FAST_PRESETS else pytest.param(p, marks=pytest.mark.slow)
    for p in ("DiT-S/2", "DiT-S/4", "DiT-S/8", "DiT-B/2", "DiT-B/4", "DiT-B/8", "DiT-L/2",
              "DiT-L/4", "DiT-L/8", "DiT-XL/2", "DiT-XL/4", "DiT-XL/8")])
def test_parameter_counts_equal_the_authors(preset):
  """The counts the authors' code gives (tests/data/make_dit_fixture.py: their DiT_models[preset]
  on 32x32x4 inputs with 1000 classes, built on torch's meta device, the parameters with
  requires_grad; their total adds the frozen pos_embed, tokens x width) equal score_jax's from
  shapes alone (models.count_params: jax.eval_shape, nothing allocated)."""
  size, patch = preset[len("DiT-"):].split("/")
  config = imagenet256_dit_xl2.get_config()
  config.model.dit_size, config.model.patch_size = size, int(patch)
  model = builders.get_model(S(config))
  want = _manifest()["parameter_counts"][preset]
  width = models.dit.DIT_SIZES[size][0]
  assert want["parameters"] - want["trainable"] == (32 // int(patch)) ** 2 * width
  assert models.count_params(model, (1, 32, 32, 4)) == want["trainable"]
  if preset == "DiT-XL/2":
    assert want["parameters"] == 675_129_632  # the paper's 675M


def test_sit_config_is_dit_xl2_on_the_rectified_flow():
  s = S(imagenet256_sit_xl2.get_config())
  d = S(imagenet256_dit_xl2.get_config())
  assert s.model.arch == d.model.arch and s.model.num_classes == 1000
  assert (s.training.sde, s.model.parameterization) == ("rectified_flow", "sit_velocity")
  assert (d.training.sde, d.training.continuous, d.model.parameterization) == (
      "vpsde", False, "default")


def test_settings_refuse_bad_dit_keys():
  config = _tiny_config()
  config.model.patch_size = 3
  with pytest.raises(ConfigError, match="model.patch_size = 3 must be a positive divisor"):
    S(config)
  config = _tiny_config()
  config.model.num_heads = 5
  with pytest.raises(ConfigError, match="hidden_size 32 must be divisible by num_heads 5"):
    S(config)
  config = _tiny_config()
  config.model.dit_size = "M"
  with pytest.raises(ConfigError, match="Unknown DiT size 'M'"):
    S(config)


# ---------------------------------------------------------------------------
# The authors' tiny network


def test_converted_network_computes_the_authors_outputs():
  """Both networks of the train.py checkpoint ('ema' and 'model') give the authors' outputs,
  all 2 C channels (noise and variance), at times 0 .. 999 (a fractional one among them) and
  with the null label (the last example)."""
  _, _, params = _tiny()
  ref = _ref()
  for weights in ("ema", "model"):
    out = _apply()(params[weights], ref["x"], ref["t"], ref["y"])
    assert out.shape == ref[weights].shape == (5, 8, 8, 8)
    assert _rel_err(out, ref[weights]) < REL_TOL, weights


def test_remat_keeps_the_parameter_names():
  """Gradient checkpointing wraps every block (the gradient's program recomputes them) without
  renaming their parameters: a checkpoint loads either way."""
  s, model, params = _tiny()
  shape = s.data.shape(1)
  plain = jax.eval_shape(lambda r: models.init_model(r, model, shape), jax.random.PRNGKey(0))
  remat = jax.eval_shape(lambda r: models.init_model(r, model.clone(remat=True), shape),
                         jax.random.PRNGKey(0))
  assert jax.tree.structure(plain) == jax.tree.structure(remat)
  assert jax.tree.map(lambda a: a.shape, plain) == jax.tree.map(lambda a: a.shape, remat)
  ref = _ref()
  loss = lambda p: jnp.sum(model.clone(remat=True).apply({"params": p}, ref["x"], ref["t"]))
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params["ema"]))  # traced only
  assert jaxpr.count("remat") >= s.model.get("depth")


def test_bfloat16_computes_in_bfloat16_with_float32_parameters():
  """model.dtype = bfloat16: parameters stay float32, the output is float32 and differs from the
  authors' float32 output by bfloat16 rounding. Measured 0.0073 of the largest |output| (8
  significant bits, 2^-9 ~ 0.002 per operation, over two blocks); the bounds say bfloat16 is
  used (> 1e-4) and only that (< 0.03)."""
  s, model, params = _tiny()
  ref = _ref()
  bf16 = model.clone(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda r: models.init_model(r, bf16, s.data.shape(1)),
                          jax.random.PRNGKey(0))
  assert {a.dtype for a in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  out = jax.jit(lambda p: bf16.apply({"params": p}, ref["x"], ref["t"], ref["y"],
                                     full_output=True))(params["ema"])
  assert out.dtype == jnp.float32
  assert 1e-4 < _rel_err(out, ref["ema"]) < 0.03


def test_command_line_converts_a_train_checkpoint_into_a_workdir(tmp_path, capsys):
  """train.py's checkpoint -> workdir -> load_run's score function (what --mode=sample uses):
  discrete VP with the DDPM step index as the time label, the network's first C channels the
  noise, score = -eps / sqrt(1 - alphabar_t), the authors' eps at their integer times."""
  dst = str(tmp_path / "run")
  overrides = [f"--config.{k}={v}" for k, v in _tiny_overrides().items()]
  argv = ["convert", "--from=dit", "--config=" + CONFIG, *overrides, CKPT, dst]
  assert convert_cli.main(argv) == 0
  assert "ema weights" in capsys.readouterr().out
  run = score_jax.load_run(dst)
  _, _, params = _tiny()
  for a, b in zip(jax.tree.leaves(params["ema"]), jax.tree.leaves(jax.device_get(run.params))):
    np.testing.assert_array_equal(np.asarray(b), a)
  assert run.settings.model.name == "dit" and run.settings.model.get("learn_sigma")
  ref = _ref()
  sde = run.sde
  t = jnp.asarray(ref["t"]) / (sde.N - 1)
  std = np.asarray(sde.sqrt_1m_alphas_cumprod[sde.time_index(t)])
  score = jax.jit(run.score_fn)(jnp.asarray(ref["x"]), t, jnp.asarray(ref["y"]))
  eps = -np.asarray(score) * std[:, None, None, None]
  keep = ref["t"] == np.round(ref["t"])  # the chain's labels are the integer steps
  assert _rel_err(eps[keep], ref["ema"][keep][..., :4]) < REL_TOL


def test_a_released_state_dict_converts_and_mismatches_are_named(tmp_path):
  """A bare EMA state dict (the released DiT-XL-2-*.pt) gives the same parameters; wrong
  heads, classes or image size, and --weights=model on a bare dict, stop the conversion."""
  s, model, params = _tiny()
  obj = torch_pickle.load(CKPT)
  bare = str(tmp_path / "DiT-T-2-64x64.pt")
  torch_pickle.save_state_dict(bare, obj["ema"])
  tensors, args = dit_convert.find_state_dict(torch_pickle.load(bare), bare)
  assert args is None and len(tensors) == _manifest()["tensors"]
  entries = dit_convert.dit_spec(model, 4)
  got = dit_convert.tensors_to_params(tensors, entries)
  for a, b in zip(jax.tree.leaves(params["ema"]), jax.tree.leaves(got)):
    np.testing.assert_array_equal(b, a)
  with pytest.raises(dit_convert.DiTLayoutError, match="bare state dict"):
    dit_convert.find_state_dict(torch_pickle.load(bare), bare, "model")

  args = obj["args"]  # train.py's argparse.Namespace, read as an inert record
  assert isinstance(args, torch_pickle.Namespace) and (args.model, args.image_size) == (
      "DiT-T/2", 64)
  args.model = "DiT-S/2"  # 384 wide, 6 heads
  with pytest.raises(dit_convert.DiTLayoutError, match=r"trained as DiT-S/2 .*dit_size=S"):
    dit_convert.check_args(args, model, CKPT)
  args.model, args.num_classes = "DiT-T/2", 1000
  with pytest.raises(dit_convert.DiTLayoutError, match="num_classes=1000"):
    dit_convert.check_args(args, model, CKPT)

  with pytest.raises(dit_convert.DiTLayoutError,
                     match=r"pos_embed \(1, 16, 32\) \(expected \(1, 64, 32\)\)"):
    dit_convert.check_tensors(dict(tensors), entries, models.dit.pos_embed_2d(32, 8, 8), 10)
  no_null = dict(tensors, **{"y_embedder.embedding_table.weight":
                             tensors["y_embedder.embedding_table.weight"][:10]})
  notes = dit_convert.check_tensors(no_null, entries, models.dit.pos_embed_2d(32, 4, 4), 10)
  assert "no null label" in notes[0]
  assert not no_null["y_embedder.embedding_table.weight"][10].any()
