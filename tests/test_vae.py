"""The Stable Diffusion VAE (score_jax.models.vae) and the reader of diffusers folders
(score_jax.convert.vae), against diffusers' own code.

Fixtures in tests/data/vae/ (tests/data/make_vae_fixture.py, diffusers 0.42.1): a tiny
AutoencoderKL with random weights saved by diffusers (tiny/), diffusers' posterior and decoding
on two fixed 16x16 images in float64 and float32 (tiny_outputs.npz), and sd-vae-ft-mse's
tensor names, shapes and parameter count from diffusers' class on the meta device
(sd_vae_ft_mse_layout.json).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from score_jax.convert import vae as convert_vae
from score_jax.errors import UserError
from score_jax.models import vae as vae_lib

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "vae")
TINY = os.path.join(DATA, "tiny")
WEIGHTS = convert_vae.WEIGHTS_FILE
OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


@pytest.fixture(scope="module")
def tiny():
  """(vae, params, scaling_factor) read from tests/data/vae/tiny."""
  return convert_vae.load_vae(TINY)


@pytest.fixture(scope="module")
def outputs():
  return dict(np.load(os.path.join(DATA, "tiny_outputs.npz")))


def _sd_layout():
  with open(os.path.join(DATA, "sd_vae_ft_mse_layout.json")) as f:
    return json.load(f)


def _old_names(key):
  for new, old in OLD_NAMES.items():
    key = key.replace(f".{new}.", f".{old}.")
  return key


def _assert_close(ours, outputs, name):
  # Both evaluations are float32 roundings of the same function; diffusers' own float32 result
  # differs from its float64 one by e32 (1.4e-6 to 5.2e-6 here, against values up to 3.4). A
  # correct port sums in other orders and should land within a few e32; a mapping error (a
  # transposed kernel, the padding on the wrong side, another grouping) costs O(1e-1).
  ref = outputs[name]
  e32 = np.abs(outputs[name + "32"] - ref).max()
  err = np.abs(np.asarray(ours, np.float64) - ref).max()
  assert err <= 4 * e32, (name, err, e32)


def test_encode_and_decode_match_diffusers(tiny, outputs):
  vae, params, scaling_factor = tiny
  assert scaling_factor == 0.18215
  mean, logvar = vae.encode(params, outputs["x"])
  assert mean.shape == logvar.shape == (2, 8, 8, 4)
  _assert_close(mean, outputs, "mean")
  _assert_close(logvar, outputs, "logvar")
  decoded = vae.decode(params, outputs["mean"].astype(np.float32))
  assert decoded.shape == (2, 16, 16, 3)
  _assert_close(decoded, outputs, "decoded")


def test_posterior_clips_logvar_and_samples_with_its_key(tiny, outputs):
  vae, params, _ = tiny
  x = outputs["x"]
  posterior = vae.posterior(params, x)
  key = jax.random.PRNGKey(3)
  eps = jax.random.normal(key, posterior.mean.shape)
  np.testing.assert_allclose(posterior.sample(key), posterior.mean + jnp.exp(0.5 * posterior.logvar)
                             * eps, rtol=1e-6, atol=1e-6)
  assert not np.allclose(posterior.sample(jax.random.PRNGKey(4)), posterior.sample(key))
  np.testing.assert_array_equal(posterior.mode(), posterior.mean)
  np.testing.assert_allclose(posterior.var, posterior.std ** 2, rtol=1e-6)
  # quant_conv's last 4 outputs are the log-variance: push them past either end of the range.
  for shift, bound in ((1e3, 20.0), (-1e3, -30.0)):
    bias = params["quant_conv"]["bias"].at[4:].add(shift)
    moved = {**params, "quant_conv": {**params["quant_conv"], "bias": bias}}
    mean, logvar = vae.encode(moved, x)
    np.testing.assert_array_equal(logvar, bound)
    np.testing.assert_array_equal(mean, vae.encode(params, x)[0])


def test_every_tensor_is_used_exactly_once(tiny):
  vae, params, _ = tiny
  tensors = load_file(os.path.join(TINY, WEIGHTS))
  entries = convert_vae.plan({k: v.shape for k, v in tensors.items()}, params)
  keys = [key for _, key in entries]
  assert len(keys) == len(set(keys)) == len(tensors) == 124
  assert set(keys) == set(tensors)
  assert len(entries) == len(jax.tree_util.tree_leaves(params))
  # Values land where the plan says, in Flax's layout.
  conv = np.asarray(params["encoder"]["down_blocks_1"]["resnets_0"]["conv1"]["kernel"])
  np.testing.assert_array_equal(
      conv, tensors["encoder.down_blocks.1.resnets.0.conv1.weight"].transpose(2, 3, 1, 0))
  dense = np.asarray(params["decoder"]["mid_block"]["attentions_0"]["to_out"]["kernel"])
  np.testing.assert_array_equal(dense, tensors["decoder.mid_block.attentions.0.to_out.0.weight"].T)
  scale = np.asarray(params["decoder"]["conv_norm_out"]["scale"])
  np.testing.assert_array_equal(scale, tensors["decoder.conv_norm_out.weight"])


def test_old_attention_names_and_conv_shaped_projections(tiny, tmp_path):
  _, params, _ = tiny
  tensors = load_file(os.path.join(TINY, WEIGHTS))
  old = {}
  for key, value in tensors.items():
    renamed = _old_names(key)
    if renamed != key and key.endswith(".weight"):
      value = value[:, :, None, None]  # [out, in] -> a 1x1 convolution [out, in, 1, 1]
    old[renamed] = value
  assert sum(".proj_attn.weight" in k for k in old) == 2
  shutil.copy(os.path.join(TINY, "config.json"), tmp_path)
  save_file(old, str(tmp_path / WEIGHTS))
  _, params_old, _ = convert_vae.load_vae(str(tmp_path))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_old, params)


def test_sd_vae_ft_mse_layout_and_parameter_count():
  layout = _sd_layout()
  config = {**convert_vae.DIFFUSERS_DEFAULTS, **layout["config"]}
  kwargs, scaling_factor = convert_vae.module_arguments(config)
  assert scaling_factor == 0.18215  # diffusers' default; sd-vae-ft-mse's config.json omits it
  assert kwargs == {**vae_lib.SD_VAE_FT_MSE, "use_quant_conv": True, "use_post_quant_conv": True,
                    "mid_block_add_attention": True}
  vae = vae_lib.VAE(vae_lib.AutoencoderKL(**kwargs))
  shapes = vae.init_shapes((1, 8, 8, 3))  # jax.eval_shape: nothing allocated
  count = sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(shapes))
  assert count == layout["parameters"] == 83_653_863
  # Every one of diffusers' 248 tensors maps to one parameter of the right shape, under the
  # current names and under the old ones.
  tensors = layout["tensors"]
  entries = convert_vae.plan(tensors, shapes)
  assert sorted(key for _, key in entries) == sorted(tensors)
  old = {_old_names(k): v for k, v in tensors.items()}
  assert len(old) == len(tensors) and old != tensors
  assert len(convert_vae.plan(old, shapes)) == len(tensors)
  encode = functools.partial(vae.module.apply, method=vae_lib.AutoencoderKL.encode)
  mean, logvar = jax.eval_shape(encode, {"params": shapes},
                                jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert mean.shape == logvar.shape == (1, 8, 8, 4)  # 4 x H/8 x W/8


def _folder(tmp_path, config=None, tensors=None):
  """A copy of the tiny folder with its config updated by `config` and, if given, other
  tensors."""
  with open(os.path.join(TINY, "config.json")) as f:
    cfg = json.load(f)
  cfg.update(config or {})
  with open(tmp_path / "config.json", "w") as f:
    json.dump(cfg, f)
  if tensors is None:
    shutil.copy(os.path.join(TINY, WEIGHTS), tmp_path)
  else:
    save_file(tensors, str(tmp_path / WEIGHTS))
  return str(tmp_path)


def _tensors(change):
  tensors = load_file(os.path.join(TINY, WEIGHTS))
  change(tensors)
  return tensors


BAD_FOLDERS = {
    "no folder": (lambda p: str(p / "absent"), "does not exist"),
    "no config": (lambda p: str(p), "has no config.json"),
    "bad json": (lambda p: (p / "config.json").write_text("{oops") and str(p), "readable JSON"),
    "other class": (lambda p: _folder(p, {"_class_name": "VQModel"}), "not an AutoencoderKL"),
    "other blocks": (lambda p: _folder(p, {"down_block_types": ["AttnDownEncoderBlock2D"] * 2}),
                     "down_block_types"),
    "too few blocks": (lambda p: _folder(p, {"up_block_types": ["UpDecoderBlock2D"]}),
                       "one block per entry"),
    "groups": (lambda p: _folder(p, {"norm_num_groups": 32}), "does not divide"),
    "shifted": (lambda p: _folder(p, {"shift_factor": 0.1}), "shift_factor"),
    "no weights": (lambda p: _folder(p) and os.remove(p / WEIGHTS) or str(p), "has no"),
    "garbage weights": (lambda p: _folder(p) and (p / WEIGHTS).write_bytes(b"\0" * 64) and str(p),
                        "not a readable safetensors"),
    "surplus tensor": (lambda p: _folder(p, tensors=_tensors(
        lambda t: t.update({"encoder.extra.weight": np.zeros(3, np.float32)}))),
                       "1 unexpected: encoder.extra.weight"),
    "missing tensor": (lambda p: _folder(p, tensors=_tensors(
        lambda t: t.pop("decoder.conv_out.bias"))), "1 missing: decoder.conv_out.bias"),
    "both names": (lambda p: _folder(p, tensors=_tensors(
        lambda t: t.update({"encoder.mid_block.attentions.0.query.bias":
                            t["encoder.mid_block.attentions.0.to_q.bias"]}))),
                   "under both names"),
    "wrong shape": (lambda p: _folder(p, tensors=_tensors(
        lambda t: t.update({"quant_conv.weight": t["quant_conv.weight"][:, :4]}))),
                    "quant_conv.weight (8, 4, 1, 1) (expected (8, 8, 1, 1))"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_folders_fail_in_one_line(case, tmp_path):
  make, words = BAD_FOLDERS[case]
  folder = make(tmp_path)
  with pytest.raises(convert_vae.VAEFolderError) as info:
    convert_vae.load_vae(folder)
  message = str(info.value)
  assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
  assert words in message and "\n" not in message, message
