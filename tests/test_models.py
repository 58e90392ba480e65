"""Tests of the score networks, FIR resampling and the network -> score map.

Full-size paper networks are only shape-evaluated (`jax.eval_shape`); the
behavioural tests run small members of every family, with parameters drawn
on the host (cheap) instead of through `init` (whose many RNG calls compile
slowly on CPU), and one jitted apply per (network, train) pair, cached.
"""

from __future__ import annotations

import functools
import importlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import models
from score_jax.run import programs
from score_jax.run import builders
from score_jax.run.settings import from_config as S
from score_jax.models import layers
from score_jax.models import up_or_down_sampling as fir
from score_jax.models.build import init_model
from score_jax.sde import TutorialSDE, VESDE, VPSDE, subVPSDE

import helpers

# ---------------------------------------------------------------------------
# FIR resampling
# ---------------------------------------------------------------------------


def _upfirdn1d_numpy(x: np.ndarray, k: np.ndarray, up: int, down: int, pad0: int,
                     pad1: int) -> np.ndarray:
  """Independent 1-D upfirdn on the last axis: full np.convolve, then index.

  Zero-insert (length n * up), pad, convolve (true convolution), keep every
  down-th sample: out[i] = full[i * down + len(k) - 1] of the padded signal.
  """
  n = x.shape[-1]
  xu = np.zeros(x.shape[:-1] + (n * up,))
  xu[..., ::up] = x
  # Padding with possibly negative amounts (crop).
  if pad0 >= 0:
    xu = np.concatenate([np.zeros(x.shape[:-1] + (pad0,)), xu], axis=-1)
  else:
    xu = xu[..., -pad0:]
  if pad1 >= 0:
    xu = np.concatenate([xu, np.zeros(x.shape[:-1] + (pad1,))], axis=-1)
  else:
    xu = xu[..., :pad1]
  full = np.apply_along_axis(lambda r: np.convolve(r, k), -1, xu)
  out_len = (xu.shape[-1] - len(k)) // down + 1
  idx = np.arange(out_len) * down + len(k) - 1
  return full[..., idx]


def _upfirdn2d_numpy(x, k, up, down, pad0, pad1):
  """Separable 2-D reference on NHWC: 1-D upfirdn along W, then along H."""
  y = np.moveaxis(x, 3, 1)  # [B, C, H, W]
  y = _upfirdn1d_numpy(y, k, up, down, pad0, pad1)
  y = np.swapaxes(_upfirdn1d_numpy(np.swapaxes(y, -1, -2), k, up, down, pad0, pad1), -1, -2)
  return np.moveaxis(y, 1, 3)


@pytest.mark.parametrize("k,up,down,pad", [
    ((1.0, 3.0, 3.0, 1.0), 2, 1, (2, 1)),
    ((1.0, 3.0, 3.0, 1.0), 1, 2, (1, 1)),
    ((1.0, 2.0, 4.0), 2, 1, (1, 2)),  # asymmetric: catches a missing kernel flip
    ((1.0, 2.0, 4.0), 1, 3, (2, 0)),
    ((0.5, -1.0, 2.0, 0.25), 3, 2, (3, -1)),  # negative pad crops
])
def test_upfirdn2d_matches_numpy_convolution(k, up, down, pad):
  x = np.random.default_rng(0).normal(size=(2, 9, 7, 3))
  got = np.asarray(fir.upfirdn2d(jnp.asarray(x, jnp.float32), np.asarray(k), up=up, down=down,
                                 pad=pad))
  want = _upfirdn2d_numpy(x, np.asarray(k), up, down, *pad)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_upfirdn2d_separable_kernel_equals_its_outer_product():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 8, 8, 2)), jnp.float32)
  k = np.array([1.0, 2.0, 4.0])
  a = fir.upfirdn2d(x, k, up=2, pad=(1, 2))
  b = fir.upfirdn2d(x, np.outer(k, k), up=2, pad=(1, 2))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_fir_resampling_keeps_a_constant_image_constant():
  x = jnp.full((1, 16, 16, 2), 3.0)
  up = np.asarray(jax.jit(lambda x: fir.upsample_2d(x, (1, 3, 3, 1)))(x))
  down = np.asarray(jax.jit(lambda x: fir.downsample_2d(x, (1, 3, 3, 1)))(x))
  assert up.shape == (1, 32, 32, 2) and down.shape == (1, 8, 8, 2)
  # Zero padding only touches the outermost samples.
  np.testing.assert_allclose(up[:, 2:-2, 2:-2], 3.0, rtol=1e-6)
  np.testing.assert_allclose(down[:, 1:-1, 1:-1], 3.0, rtol=1e-6)
  assert np.all(down[:, 0] < 3.0)  # the border does see the zero padding


def test_box_kernel_is_nearest_upsampling_and_block_average():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 4, 3)), jnp.float32)
  np.testing.assert_allclose(np.asarray(fir.upsample_2d(x, (1, 1))),
                             np.repeat(np.repeat(np.asarray(x), 2, 1), 2, 2), rtol=1e-6, atol=1e-6)
  block_mean = np.asarray(x).reshape(2, 3, 2, 2, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(np.asarray(fir.downsample_2d(x, (1, 1))), block_mean, rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(fir.naive_upsample_2d(x)),
                             np.asarray(fir.upsample_2d(x, None)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(fir.naive_downsample_2d(x)), block_mean, rtol=1e-6,
                             atol=1e-6)


def test_down_of_up_follows_the_filter_frequency_response():
  """[1,3,3,1]/8 = ((1 + z) / 2)^3 has |H(w)| = cos(w/2)^3 and linear phase.

  Upsampling x = cos(w n + phi) makes the component at w/2 and its image at
  w/2 + pi; after both filters and decimation the image folds back, so
  down(up(x)) = [cos(w/4)^6 + sin(w/4)^6] x per axis, with no shift (the
  padding of the reference centres both filters).
  """
  n = np.arange(32)
  wh, ww = 0.7, 0.3
  x = np.cos(wh * n + 0.3)[:, None] * np.cos(ww * n + 1.1)[None, :]
  down_up = jax.jit(lambda v: fir.downsample_2d(fir.upsample_2d(v, (1, 3, 3, 1)), (1, 3, 3, 1)))
  y = np.asarray(down_up(jnp.asarray(x[None, :, :, None], jnp.float32)))[0, :, :, 0]
  gain = lambda w: np.cos(w / 4)**6 + np.sin(w / 4)**6
  np.testing.assert_allclose(y[4:-4, 4:-4], (gain(wh) * gain(ww) * x)[4:-4, 4:-4], atol=1e-5)


def _conv_same(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_fused_resampling_convolutions_commute_with_convolution():
  """Convolution and FIR filtering are both shift-invariant: fusing them must
  equal resampling then convolving (up) or convolving then resampling (down),
  away from the borders."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(1, 16, 16, 2)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 3)), jnp.float32)
  up = jax.jit(lambda x, w: fir.upsample_conv_2d(x, w, (1, 3, 3, 1)))(x, w)
  up_ref = jax.jit(lambda x, w: _conv_same(fir.upsample_2d(x, (1, 3, 3, 1)), w))(x, w)
  assert up.shape == (1, 32, 32, 3)
  np.testing.assert_allclose(np.asarray(up)[:, 4:-4, 4:-4], np.asarray(up_ref)[:, 4:-4, 4:-4],
                             atol=1e-4)
  down = jax.jit(lambda x, w: fir.conv_downsample_2d(x, w, (1, 3, 3, 1)))(x, w)
  down_ref = jax.jit(lambda x, w: fir.downsample_2d(_conv_same(x, w), (1, 3, 3, 1)))(x, w)
  assert down.shape == (1, 8, 8, 3)
  np.testing.assert_allclose(np.asarray(down)[:, 2:-2, 2:-2],
                             np.asarray(down_ref)[:, 2:-2, 2:-2], atol=1e-4)


def test_fir_conv2d_module_with_identity_kernel_is_pure_resampling():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 8, 8, 3)), jnp.float32)
  delta = np.zeros((3, 3, 3, 3), np.float32)
  delta[1, 1] = np.eye(3)
  for up, ref in ((True, fir.upsample_2d), (False, fir.downsample_2d)):
    conv = fir.Conv2d(3, up=up, down=not up)
    shapes = jax.eval_shape(conv.init, jax.random.PRNGKey(0), x)
    assert shapes["params"]["kernel"].shape == (3, 3, 3, 3)
    out = jax.jit(conv.apply)({"params": {"kernel": delta, "bias": np.zeros(3, np.float32)}}, x)
    want = jax.jit(lambda x: ref(x, (1, 3, 3, 1)))(x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


def test_timestep_embedding_matches_closed_form():
  t = jnp.array([0.0, 3.0, 999.0])
  emb = np.asarray(layers.get_timestep_embedding(t, 8))
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 3)
  arg = np.asarray(t)[:, None] * freqs[None, :]
  np.testing.assert_allclose(emb, np.concatenate([np.sin(arg), np.cos(arg)], 1), rtol=2e-4,
                             atol=2e-4)
  assert layers.get_timestep_embedding(t, 7).shape == (3, 7)


def test_gaussian_fourier_projection_is_fixed_unless_trainable():
  proj = layers.GaussianFourierProjection(embedding_size=4, scale=16.0)
  x = jnp.array([0.1, 2.0])
  variables = proj.init(jax.random.key(0, impl="rbg"), x)
  w = np.asarray(variables["params"]["W"])
  out = np.asarray(proj.apply(variables, x))
  arg = 2 * np.pi * np.asarray(x)[:, None] * w[None, :]
  np.testing.assert_allclose(out, np.concatenate([np.sin(arg), np.cos(arg)], 1), rtol=1e-4,
                             atol=1e-4)
  grad = jax.grad(lambda v: proj.apply(v, x).sum())(variables)
  assert np.all(np.asarray(grad["params"]["W"]) == 0)
  trainable = layers.GaussianFourierProjection(embedding_size=4, scale=16.0, trainable=True)
  grad = jax.grad(lambda v: trainable.apply(v, x).sum())(variables)
  assert np.any(np.asarray(grad["params"]["W"]) != 0)


def test_default_init_zero_scale_means_tiny_not_zero():
  w = layers.default_init(0.0)(jax.random.key(0, impl="rbg"), (3, 3, 8, 8))
  assert 0 < float(jnp.abs(w).max()) < 1e-4


# ---------------------------------------------------------------------------
# Parameter counts of the paper configurations (shape evaluation only)
# ---------------------------------------------------------------------------

# The reference's counts (shared/REFERENCE.md), in millions.
PAPER_PARAMS = {
    "ve_cifar": 62.76,
    "ve_cifar_deep": 107.59,
    "ve_cifar_discrete": 62.69,
    "vp_cifar": 61.80,
    "vp_cifar_deep": 106.63,
    "subvp_cifar": 61.80,
    "subvp_cifar_deep": 106.63,
    "ddpm_cifar": 35.22,
    "ncsn_cifar": 33.97,  # the reference's JAX NCSNv2 (its PyTorch twin: 29.69M)
    "ve_celeba64": 62.76,
    "ve_ffhq256": 65.57,
    "ve_celebahq256": 65.57,
    "ve_church256": 65.57,
    "ve_bedroom256": 65.57,
    "ve_ffhq1024": 105.79,
}


@functools.lru_cache(maxsize=None)
def _param_shapes(model, shape):
  """Parameter shapes by shape evaluation; cached, since several configs share a network."""
  return jax.eval_shape(lambda r: init_model(r, model, shape), jax.random.PRNGKey(0))["params"]


def _num_params(model, shape):
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(_param_shapes(model, shape)))


def _config(name):
  return importlib.import_module(f"configs.{name}").get_config()


def _image_shape(config):
  s = config.data.image_size
  return (1, s, s, config.data.num_channels)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_config_parameter_count(name):
  config = _config(name)
  model = builders.get_model(S(config))
  n = _num_params(model, _image_shape(config))
  if name == "ve_cifar":  # the public helper agrees
    assert models.count_params(model, _image_shape(config)) == n
  want = PAPER_PARAMS[name] * 1e6
  # The table rounds to 0.01M; the bar is 0.1%.
  assert abs(n - want) <= 0.001 * want, f"{name}: {n / 1e6:.4f}M vs {PAPER_PARAMS[name]}M"
  assert abs(n - want) <= 0.005e6 + 1, f"{name}: {n} outside the table's rounding"


def test_ddpm_256px_parameter_count():
  config = _config("ddpm_cifar")
  config.data.image_size = 256
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  n = models.count_params(builders.get_model(S(config)), _image_shape(config))
  assert abs(n - 111.57e6) <= 0.005e6 + 1


def test_fourier_projection_is_counted_like_the_reference():
  """The fixed W of the Fourier features (nf values) is a parameter."""
  config = _config("ve_cifar")
  shapes = _param_shapes(builders.get_model(S(config)), _image_shape(config))
  assert shapes["GaussianFourierProjection_0"]["W"].shape == (128,)


# ---------------------------------------------------------------------------
# Small members of every family: behaviour
# ---------------------------------------------------------------------------

_NC = 3  # classes of the conditional test networks
_TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_classes=_NC)

# name -> (module, input shape, has dropout)
SMALL = {
    # NCSN++ cont.: FIR, BigGAN blocks, residual input pyramid, Fourier embedding.
    "ncsnpp": (models.NCSNpp(**_TINY), (2, 8, 8, 3), True),
    # Pyramids of the 256 px nets with 'cat' combination, positional embedding.
    "ncsnpp_skip": (models.NCSNpp(**_TINY, progressive="output_skip", progressive_input="input_skip",
                                  progressive_combine="cat", embedding_type="positional"),
                    (2, 8, 8, 3), True),
    # DDPM-type blocks with FIR resampling convolutions and residual pyramids.
    "ncsnpp_residual": (models.NCSNpp(**_TINY, resblock_type="ddpm", progressive="residual"),
                        (2, 8, 8, 3), True),
    # DDPM++: no FIR, no pyramid, positional embedding, centered input.
    "ddpmpp": (models.NCSNpp(**_TINY, fir=False, progressive_input="none",
                             embedding_type="positional", scale_by_sigma=False, centered=True),
               (2, 8, 8, 3), True),
    "ddpm": (models.DDPM(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                         num_classes=_NC), (2, 8, 8, 3), True),
    "ncsnv2": (models.NCSNv2(nf=8, num_classes=_NC), (2, 8, 8, 3), False),
    "mlp": (models.MLPScore(hidden_sizes=(32, 32), dropout=0.1, num_classes=_NC), (2, 2), True),
}

_LABELS = jnp.array([0.5, 3.0])  # positive: the Fourier embedding takes the log


_random_variables = helpers.random_variables


@functools.lru_cache(maxsize=None)
def _apply(name, train, dtype_name="float32"):
  model = SMALL[name][0]
  if dtype_name != "float32":
    model = model.clone(dtype=jnp.dtype(dtype_name))
  return jax.jit(lambda v, x, t, y, r: model.apply(v, x, t, y, train=train, rngs={"dropout": r}))


@functools.lru_cache(maxsize=None)
def _small(name):
  model, shape, has_dropout = SMALL[name]
  x = np.random.default_rng(5).normal(size=shape).astype(np.float32)
  if len(shape) == 4 and not getattr(model, "centered", True):
    x = (x + 2.0) / 4.0  # roughly [0, 1] data for networks that expect it
  return _random_variables(model, shape), jnp.asarray(x), has_dropout


@pytest.mark.parametrize("name", sorted(SMALL))
def test_output_shape_finite_and_per_example(name, key):
  variables, x, _ = _small(name)
  y = jnp.array([0, 1])
  out = _apply(name, False)(variables, x, _LABELS, y, key)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  assert float(jnp.std(out)) > 1e-3  # not a constant
  # Changing example 1 must not change example 0 (no mixing across the batch).
  x2 = x.at[1].set(x[1] * 2.0 + 1.0)
  out2 = _apply(name, False)(variables, x2, _LABELS, y, key)
  np.testing.assert_allclose(np.asarray(out2[0]), np.asarray(out[0]), rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(out2[1]), np.asarray(out[1]))


# The NCSN++ variants share their residual blocks (where dropout is) with
# "ncsnpp" and "ncsnpp_residual"; training-mode compilation is the slowest step.
@pytest.mark.parametrize("name", ["ncsnpp", "ncsnpp_residual", "ddpm", "ncsnv2", "mlp"])
def test_dropout_only_in_training_and_deterministic_given_rngs(name, fast_compile):
  variables, x, has_dropout = _small(name)
  y = jnp.array([0, 1])
  # RngBitGenerator keys: dropout masks compile several times faster on CPU
  # than with threefry, and the semantics under test are the same.
  k1, k2 = jax.random.key(1, impl="rbg"), jax.random.key(2, impl="rbg")
  ev = _apply(name, False)
  tr = _apply(name, True)
  e1 = np.asarray(ev(variables, x, _LABELS, y, jax.random.PRNGKey(1)))
  e2 = np.asarray(ev(variables, x, _LABELS, y, jax.random.PRNGKey(2)))
  np.testing.assert_array_equal(e1, e2)  # evaluation ignores the dropout key
  t1a, t1b = np.asarray(tr(variables, x, _LABELS, y, k1)), np.asarray(tr(variables, x, _LABELS, y, k1))
  np.testing.assert_array_equal(t1a, t1b)  # same key, same masks
  t2 = np.asarray(tr(variables, x, _LABELS, y, k2))
  if has_dropout:
    assert not np.allclose(t1a, t2, atol=1e-4)
    assert not np.allclose(t1a, e1, atol=1e-4)
  else:
    np.testing.assert_allclose(t1a, e1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(t2, e1, rtol=1e-6, atol=1e-6)


# DDPM blocks, FIR resampling convolutions, attention, residual pyramids in one network;
# test_remat_keeps_block_gradients covers each block kind (BigGAN included) alone.
@pytest.mark.parametrize("name", ["ncsnpp_residual"])
def test_remat_keeps_parameters_and_outputs(name, fast_compile):
  """Gradient checkpointing changes what is stored, not what is computed.

  Same parameter tree (checkpoints stay interchangeable) and the same
  training-mode outputs with dropout on (the recomputed blocks draw the same
  masks), to float32 round-off of a different operation order.
  """
  model, shape, _ = SMALL[name]
  variables, x, _ = _small(name)
  remat = model.clone(remat=True)
  tree = lambda m: jax.tree_util.tree_structure(
      jax.eval_shape(lambda r: init_model(r, m, shape), jax.random.PRNGKey(0)))
  assert tree(remat) == tree(model)
  y, key = jnp.array([0, 1]), jax.random.key(3, impl="rbg")
  out = lambda m: jax.jit(lambda v: m.apply(v, x, _LABELS, y, train=True, rngs={"dropout": key}))(
      variables)
  np.testing.assert_allclose(np.asarray(out(remat)), np.asarray(out(model)), rtol=1e-5, atol=1e-5)
  # The jaxpr really checkpoints each residual / attention block.
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(remat.apply(v, x, _LABELS, y))))(variables))
  assert jaxpr.count("remat") >= 4


@pytest.mark.parametrize("block", ["biggan_up", "ddpm", "attn"])
def test_remat_keeps_block_gradients(block, fast_compile):
  """Training-mode gradients (parameters and input) of each block kind, with and without remat."""
  make = {
      "biggan_up": lambda r: layers.ResnetBlockBigGAN(act=nn.swish, up=True, fir=True, out_ch=8,
                                                      remat=r),
      "ddpm": lambda r: layers.ResnetBlockDDPM(act=nn.swish, out_ch=8, remat=r),
      "attn": lambda r: layers.AttnBlock(init_scale=1.0, remat=r),
  }[block]
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 8)), jnp.float32)
  temb = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16)), jnp.float32)
  args = (x,) if block == "attn" else (x, temb, True)
  rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.key(1, impl="rbg")}
  variables = make(False).init(rngs, *args)
  variables = jax.tree_util.tree_map(  # O(1) weights: every path matters
      lambda v: jnp.asarray(np.random.default_rng(v.size).normal(size=v.shape) / np.sqrt(
          max(v.shape[0] if v.ndim == 1 else np.prod(v.shape[:-1]), 1)), jnp.float32), variables)

  def grads(r):
    loss = lambda v, x: jnp.sum(make(r).apply(v, x, *args[1:], rngs={"dropout": rngs["dropout"]})**2)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)

  g0, g1 = grads(False), grads(True)
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    assert float(jnp.abs(a).max()) > 0
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_remat_is_refused_by_networks_without_it():
  for name in ("ncsn_cifar", "toy"):  # NCSNv2, MLP
    config = _config(name)
    with config.unlocked():
      config.model.remat = True
    with pytest.raises(ValueError, match="model.remat"):
      builders.get_model(S(config))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_class_conditioning_changes_the_output(name, key):
  variables, x, _ = _small(name)
  f = _apply(name, False)
  outs = [np.asarray(f(variables, x, _LABELS, jnp.array([c, c]), key)) for c in range(_NC + 1)]
  for i in range(len(outs)):
    for j in range(i + 1, len(outs)):
      assert not np.allclose(outs[i], outs[j], atol=1e-4), (i, j)


def test_noise_label_changes_the_output(key):
  variables, x, _ = _small("ncsnpp")
  f = _apply("ncsnpp", False)
  y = jnp.array([0, 0])
  a = f(variables, x, jnp.array([0.5, 0.5]), y, key)
  b = f(variables, x, jnp.array([20.0, 20.0]), y, key)
  assert not np.allclose(np.asarray(a), np.asarray(b), atol=1e-4)


@pytest.mark.parametrize("name", [pytest.param("ncsnpp", marks=pytest.mark.slow), "mlp"])
def test_bfloat16_compute_keeps_float32_params_and_output(name, key):
  variables, x, _ = _small(name)
  model = SMALL[name][0].clone(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda r: init_model(r, model, x.shape), jax.random.PRNGKey(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes))
  y = jnp.array([0, 1])
  lo = _apply(name, False, "bfloat16")(variables, x, _LABELS, y, key)
  hi = _apply(name, False)(variables, x, _LABELS, y, key)
  assert lo.dtype == jnp.float32
  rel = float(jnp.linalg.norm(lo - hi) / jnp.linalg.norm(hi))
  assert rel < 0.1, rel  # bfloat16 has ~3 significant digits
  assert rel > 0  # the computation really ran in bfloat16


def test_unconditional_network_rejects_class_labels():
  model = models.MLPScore(hidden_sizes=(8,))
  shapes = jax.eval_shape(lambda r: init_model(r, model, (2, 2)), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="num_classes"):
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 2)), _LABELS, jnp.array([0, 1])), shapes)


def test_missing_class_label_is_the_null_label(key):
  """y=None (unconditional use) equals passing the null label num_classes."""
  variables, x, _ = _small("mlp")
  model = SMALL["mlp"][0]
  none = jax.jit(lambda v, x, t: model.apply(v, x, t, None))(variables, x, _LABELS)
  null = _apply("mlp", False)(variables, x, _LABELS, jnp.array([_NC, _NC]), key)
  np.testing.assert_array_equal(np.asarray(none), np.asarray(null))
  emb = layers.ClassEmbedding(num_classes=2, features=3)
  v = emb.init(key, None, 2)
  assert v["params"]["Embed_0"]["embedding"].shape == (3, 3)  # classes + null
  np.testing.assert_array_equal(np.asarray(emb.apply(v, None, 2)),
                                np.asarray(emb.apply(v, jnp.array([2, 2]), 2)))


# ---------------------------------------------------------------------------
# get_model
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_get_model_reads_the_config(name):
  config = _config(name)
  model = builders.get_model(S(config))
  assert type(model) is models.MODELS[config.model.name]
  for field in ("nf", "ch_mult", "num_res_blocks", "fir", "embedding_type", "scale_by_sigma"):
    if hasattr(model, field) and field in config.model:
      assert getattr(model, field) == (tuple(config.model[field]) if isinstance(
          config.model[field], (list, tuple)) else config.model[field])
  assert model.centered == config.data.centered


def test_get_model_dtype_and_errors():
  config = _config("vp_cifar")
  config.model.dtype = "bfloat16"
  config.model.fir_kernel = [1, 3, 3, 1]  # lists become hashable tuples
  model = builders.get_model(S(config))
  assert model.dtype == jnp.bfloat16 and model.fir_kernel == (1, 3, 3, 1)
  hash(model)
  config.model.dtype = "float64x"
  with pytest.raises(ValueError, match="dtype"):
    builders.get_model(S(config))
  config.model.dtype = "float32"
  config.model.name = "unet9000"
  with pytest.raises(ValueError, match="Unknown model"):
    builders.get_model(S(config))


# ---------------------------------------------------------------------------
# get_score_fn: the parameterization of each SDE, against the formulas
# ---------------------------------------------------------------------------


class _Stub(nn.Module):
  """Outputs labels + 2 (+ 100 y) everywhere: the score then reveals the labels and scaling."""
  scale_by_sigma: bool = False
  integer_labels: bool = False

  @nn.compact
  def __call__(self, x, labels, y=None, *, train=False):
    assert jnp.issubdtype(labels.dtype, jnp.integer) == self.integer_labels, labels.dtype
    out = labels.astype(jnp.float32) + 2.0
    if y is not None:
      out = out + 100.0 * y
    return jnp.broadcast_to(out.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape) + 0.0 * x


B0, B1, N = 0.1, 20.0, 1000
_T = np.array([1e-3, 0.25, 0.5, 0.999])


def _vp_std(t):
  return np.sqrt(1 - np.exp(-0.5 * t**2 * (B1 - B0) - t * B0))


def _subvp_std(t):
  return 1 - np.exp(-0.5 * t**2 * (B1 - B0) - t * B0)


def _check_score(sde, stub, continuous, t, want):
  x = jnp.zeros((len(t), 4, 4, 3))
  score_fn = models.get_score_fn(sde, stub, {}, continuous=continuous)
  got = np.asarray(jax.jit(score_fn)(x, jnp.asarray(t, jnp.float32)))
  assert got.shape == x.shape
  np.testing.assert_allclose(got[:, 0, 0, 0], want, rtol=2e-4)
  np.testing.assert_allclose(got, np.broadcast_to(got[:, :1, :1, :1], got.shape))


def test_score_vp_continuous():
  _check_score(VPSDE(B0, B1, N), _Stub(), True, _T, -(999 * _T + 2) / _vp_std(_T))


@pytest.mark.parametrize("continuous", [True, False])
def test_score_subvp_uses_continuous_labels(continuous):
  _check_score(subVPSDE(B0, B1, N), _Stub(), continuous, _T, -(999 * _T + 2) / _subvp_std(_T))


def test_score_vp_discrete():
  i = np.array([0, 1, 500, 999])
  t = i / (N - 1)  # the times ddpm_loss gives for step i
  alphabar = np.cumprod(1 - np.linspace(B0 / N, B1 / N, N))
  want = -(t * (N - 1) + 2) / np.sqrt(1 - alphabar[i])
  _check_score(VPSDE(B0, B1, N), _Stub(), False, t, want)


@pytest.mark.parametrize("scale_by_sigma", [True, False])
def test_score_ve_continuous(scale_by_sigma):
  sigma = 0.01 * (50.0 / 0.01)**_T
  want = (sigma + 2) / sigma if scale_by_sigma else sigma + 2
  _check_score(VESDE(0.01, 50.0, N), _Stub(scale_by_sigma=scale_by_sigma), True, _T, want)


@pytest.mark.parametrize("scale_by_sigma", [True, False])
def test_score_ve_discrete(scale_by_sigma):
  i = np.array([0, 1, 500, 999])
  t = i / (N - 1)  # the times smld_loss gives for noise level i
  label = N - 1 - i  # the reference's index: 0 = sigma_max
  sigma_i = 0.01 * (50.0 / 0.01)**(i / (N - 1))
  want = (label + 2) / sigma_i if scale_by_sigma else label + 2.0
  _check_score(VESDE(0.01, 50.0, N), _Stub(scale_by_sigma=scale_by_sigma, integer_labels=True),
               False, t, want)


def test_score_other_sde_predicts_noise():
  sde = TutorialSDE(25.0)
  std = np.sqrt((25.0**(2 * _T) - 1) / (2 * np.log(25.0)))
  _check_score(sde, _Stub(), True, _T, -(999 * _T + 2) / std)
  with pytest.raises(ValueError, match="discrete"):
    models.get_score_fn(sde, _Stub(), {}, continuous=False)


def test_score_rejects_sigma_scaling_for_vp():
  with pytest.raises(ValueError, match="scale_by_sigma"):
    models.get_score_fn(VPSDE(), _Stub(scale_by_sigma=True), {}, continuous=True)


def test_score_fn_passes_class_labels():
  x = jnp.zeros((2, 4, 4, 3))
  score_fn = models.get_score_fn(VESDE(), _Stub(), {}, continuous=True)
  t = jnp.array([0.5, 0.5])
  diff = score_fn(x, t, jnp.array([1.0, 0.0])) - score_fn(x, t)
  np.testing.assert_allclose(np.asarray(diff[:, 0, 0, 0]), [100.0, 0.0], rtol=1e-5)


def test_score_fn_with_a_network_dropout_grads_and_one_compilation(key):
  model, shape, _ = SMALL["mlp"]
  variables, x, _ = _small("mlp")
  sde = VPSDE()
  t = jnp.array([0.3, 0.7])
  y = jnp.array([0, 2])

  def run(v, x, t, rng, train):
    return models.get_score_fn(sde, model, v, continuous=True, train=train, rng=rng)(x, t, y)

  ev = jax.jit(functools.partial(run, train=False))
  tr = jax.jit(functools.partial(run, train=True))
  k1, k2 = jax.random.split(key)
  np.testing.assert_array_equal(np.asarray(tr(variables, x, t, k1)), np.asarray(tr(variables, x, t, k1)))
  assert not np.allclose(np.asarray(tr(variables, x, t, k1)), np.asarray(tr(variables, x, t, k2)))
  np.testing.assert_array_equal(np.asarray(ev(variables, x, t, k1)), np.asarray(ev(variables, x, t, k2)))
  ev(variables, x, t * 0.5, k1)
  assert ev._cache_size() == 1  # new times and keys do not recompile
  # Gradients with respect to the parameters flow through the closure.
  grads = jax.grad(lambda v: jnp.sum(ev(v, x, t, k1)**2))(variables)
  assert all(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(grads))
