"""Layers shared by the score networks (NHWC layout throughout).

Initialization follows the reference: DDPM's variance scaling (fan_avg,
uniform) for convolutions and dense layers, with scale 0 meaning 1e-10 so
that residual branches start almost switched off.

Every module takes `dtype`, the compute dtype; parameters are always
created in float32 (mixed precision keeps the master weights exact).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_jax.models import up_or_down_sampling as fir_ops

Array = jax.Array
Dtype = Any
Activation = Callable[[Array], Array]

__all__ = [
    "default_init",
    "get_act",
    "conv1x1",
    "conv3x3",
    "dense",
    "group_norm",
    "get_timestep_embedding",
    "GaussianFourierProjection",
    "ClassEmbedding",
    "check_class_labels",
    "class_onehot",
    "AttnBlock",
    "Upsample",
    "Downsample",
    "Combine",
    "ResnetBlockDDPM",
    "ResnetBlockBigGAN",
]


def default_init(scale: float = 1.0) -> Callable[..., Array]:
  """The DDPM initializer: variance scaling, fan_avg, uniform; scale 0 -> 1e-10."""
  scale = 1e-10 if scale == 0 else scale
  return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


_ACTIVATIONS = {
    "elu": nn.elu,
    "relu": nn.relu,
    "lrelu": lambda x: nn.leaky_relu(x, negative_slope=0.2),
    "swish": nn.swish,
    "silu": nn.swish,
}


def get_act(name: str) -> Activation:
  """Activation function by name: elu, relu, lrelu (slope 0.2), swish/silu."""
  try:
    return _ACTIVATIONS[name.lower()]
  except KeyError:
    raise ValueError(f"Unknown nonlinearity {name!r}; choose from {sorted(_ACTIVATIONS)}.") from None


def conv3x3(x: Array, features: int, *, stride: int = 1, use_bias: bool = True,
            init_scale: float = 1.0, dtype: Dtype = jnp.float32) -> Array:
  """3x3 convolution with DDPM init, 'SAME' padding (TF semantics for stride 2).

  Must be called inside a compact module: the Conv becomes its submodule.
  """
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding="SAME", use_bias=use_bias,
                 kernel_init=default_init(init_scale), dtype=dtype)(x)


def conv1x1(x: Array, features: int, *, use_bias: bool = True, init_scale: float = 1.0,
            dtype: Dtype = jnp.float32) -> Array:
  """1x1 convolution with DDPM init (a per-pixel dense layer)."""
  return nn.Conv(features, (1, 1), use_bias=use_bias, kernel_init=default_init(init_scale),
                 dtype=dtype)(x)


def dense(x: Array, features: int, *, init_scale: float = 1.0, dtype: Dtype = jnp.float32) -> Array:
  """Dense layer over the last axis with DDPM init.

  Also the reference's NIN (network-in-network, a 1x1 projection): same
  parameters (W [Cin, Cout], b [Cout]) and the same computation.
  """
  return nn.Dense(features, kernel_init=default_init(init_scale), dtype=dtype)(x)


def group_norm(x: Array, num_groups: Optional[int] = None, dtype: Dtype = jnp.float32) -> Array:
  """GroupNorm with eps 1e-6; num_groups defaults to min(C // 4, 32) as in NCSN++."""
  c = x.shape[-1]
  groups = min(c // 4, 32) if num_groups is None else num_groups
  return nn.GroupNorm(num_groups=max(groups, 1), epsilon=1e-6, dtype=dtype)(x)


def get_timestep_embedding(timesteps: Array, embedding_dim: int,
                           max_positions: int = 10000) -> Array:
  """Sinusoidal embedding of (possibly fractional) time steps, as in DDPM.

  Args:
    timesteps: [B] float or int.
    embedding_dim: D.
  Returns:
    [B, D] float32: [sin(t f_k), cos(t f_k)] with geometric frequencies
    f_k = max_positions^(-k / (D/2 - 1)); zero-padded when D is odd.
  """
  if timesteps.ndim != 1:
    raise ValueError(f"timesteps must have shape [B], got {timesteps.shape}.")
  half_dim = embedding_dim // 2
  # log(max_positions) / (half_dim - 1): the highest frequency is 1.
  scale = math.log(max_positions) / max(half_dim - 1, 1)
  freqs = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * -scale)
  emb = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, [(0, 0), (0, 1)])
  return emb


class GaussianFourierProjection(nn.Module):
  """Random Fourier features [sin(2 pi W x), cos(2 pi W x)], W ~ N(0, scale^2).

  W is a parameter (so it is saved with checkpoints and counted, as in the
  reference) but receives no gradient unless `trainable`.
  x [B] -> [B, 2 * embedding_size].
  """
  embedding_size: int = 256
  scale: float = 1.0
  trainable: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = self.param("W", nn.initializers.normal(stddev=self.scale), (self.embedding_size,),
                   jnp.float32)
    if not self.trainable:
      w = jax.lax.stop_gradient(w)
    x_proj = x.astype(jnp.float32)[:, None] * w[None, :] * (2 * np.pi)
    return jnp.concatenate([jnp.sin(x_proj), jnp.cos(x_proj)], axis=-1)


class ClassEmbedding(nn.Module):
  """Class-label embedding with an extra "null" label for classifier-free guidance.

  Labels 0..num_classes-1 are classes; label `num_classes` (also used when
  y is None) means "no class", which training reaches by label dropout.
  y [B] int or None -> [B, features].
  """
  num_classes: int
  features: int

  @nn.compact
  def __call__(self, y: Optional[Array], batch_size: int) -> Array:
    if y is None:
      y = jnp.full((batch_size,), self.num_classes, jnp.int32)
    if y.shape != (batch_size,):
      raise ValueError(f"class labels must have shape [{batch_size}], got {y.shape}.")
    return nn.Embed(self.num_classes + 1, self.features,
                    embedding_init=nn.initializers.normal(stddev=1.0))(y)


def check_class_labels(y: Optional[Array], num_classes: int) -> None:
  """Raises when class labels are given to an unconditional network."""
  if y is not None and num_classes <= 0:
    raise ValueError("class labels y were given but the network has num_classes = 0 "
                     "(unconditional); set model.num_classes.")


def class_onehot(y: Optional[Array], num_classes: int, batch: int) -> Array:
  """EDM's class conditioning input: float32 [batch, num_classes] one-hot vectors times
  sqrt(num_classes). y: int [batch] (the null label num_classes gives zeros), float
  [batch, num_classes] (used as is), or None (zeros: unconditional)."""
  if y is None:
    onehot = jnp.zeros((batch, num_classes), jnp.float32)
  elif y.ndim == 1:
    onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)  # num_classes -> zeros
  else:
    onehot = y.astype(jnp.float32)
  if onehot.shape != (batch, num_classes):
    raise ValueError(f"class labels must have shape [{batch}] or [{batch}, {num_classes}], "
                     f"got {y.shape}.")
  return onehot * np.float32(math.sqrt(num_classes))


def augment_input(augment_labels: Optional[Array], augment_dim: int, batch: int) -> Array:
  """The augmentation labels (score_jax.data.augment) as float32 [batch, augment_dim]: zeros for
  None (sampling); raises when they are given to a network without them or misshapen."""
  if augment_labels is None:
    return jnp.zeros((batch, augment_dim), jnp.float32)
  if augment_dim <= 0:
    raise ValueError("augment_labels were given but the network has augment_dim = 0.")
  if augment_labels.shape != (batch, augment_dim):
    raise ValueError(f"augment_labels must have shape [{batch}, {augment_dim}], got "
                     f"{augment_labels.shape}.")
  return augment_labels.astype(jnp.float32)


class AttnBlock(nn.Module):
  """Single-head self-attention over all H x W positions, with a residual.

  x [B, H, W, C] -> [B, H, W, C]. Logits and softmax are computed in float32
  whatever the compute dtype.
  """
  skip_rescale: bool = False
  init_scale: float = 0.0
  num_groups: Optional[int] = None
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return _maybe_remat(self, _attn_block, x)


def _attn_block(m: AttnBlock, x: Array) -> Array:
  b, h, w, c = x.shape
  hn = group_norm(x, m.num_groups, m.dtype).reshape(b, h * w, c)
  q = dense(hn, c, init_scale=0.1, dtype=m.dtype)
  k = dense(hn, c, init_scale=0.1, dtype=m.dtype)
  v = dense(hn, c, init_scale=0.1, dtype=m.dtype)
  logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32) * (c**-0.5)
  attn = jax.nn.softmax(logits, axis=-1).astype(m.dtype)
  out = jnp.einsum("bij,bjc->bic", attn, v)
  out = dense(out, c, init_scale=m.init_scale, dtype=m.dtype).reshape(b, h, w, c)
  if m.skip_rescale:
    return (x + out) / np.sqrt(2.0)
  return x + out


class Upsample(nn.Module):
  """2x upsampling: nearest (+ 3x3 conv) or FIR (+ fused FIR conv).

  x [B, H, W, C] -> [B, 2H, 2W, out_ch or C].
  """
  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Tuple[int, ...] = (1, 3, 3, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_ch = self.out_ch or x.shape[-1]
    if not self.fir:
      h = fir_ops.naive_upsample_2d(x, 2)
      if self.with_conv:
        h = conv3x3(h, out_ch, dtype=self.dtype)
    elif not self.with_conv:
      h = fir_ops.upsample_2d(x, self.fir_kernel, factor=2)
    else:
      h = fir_ops.Conv2d(out_ch, kernel=3, up=True, resample_kernel=self.fir_kernel,
                         kernel_init=default_init(), dtype=self.dtype)(x)
    return h


class Downsample(nn.Module):
  """2x downsampling: average pool / strided 3x3 conv, or FIR (+ fused FIR conv).

  x [B, H, W, C] -> [B, H/2, W/2, out_ch or C].
  """
  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Tuple[int, ...] = (1, 3, 3, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_ch = self.out_ch or x.shape[-1]
    if not self.fir:
      if self.with_conv:
        # TF 'SAME' with stride 2 pads (0, 1): the reference's explicit padding.
        return conv3x3(x, out_ch, stride=2, dtype=self.dtype)
      return fir_ops.naive_downsample_2d(x, 2)
    if not self.with_conv:
      return fir_ops.downsample_2d(x, self.fir_kernel, factor=2)
    return fir_ops.Conv2d(out_ch, kernel=3, down=True, resample_kernel=self.fir_kernel,
                          kernel_init=default_init(), dtype=self.dtype)(x)


class Combine(nn.Module):
  """Merges a skip input x into y through a 1x1 conv: 'cat' or 'sum'.

  x [B, H, W, Cx], y [B, H, W, Cy] -> [B, H, W, 2 Cy] (cat) or [B, H, W, Cy] (sum).
  """
  method: str = "cat"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    h = conv1x1(x, y.shape[-1], dtype=self.dtype)
    if self.method == "cat":
      return jnp.concatenate([h, y], axis=-1)
    if self.method == "sum":
      return h + y
    raise ValueError(f"Combine method {self.method!r} not recognized (cat | sum).")


def _add_temb(h: Array, temb: Optional[Array], act: Activation, dtype: Dtype) -> Array:
  """Adds a per-channel bias computed from the (noise/class) embedding temb [B, E]."""
  if temb is None:
    return h
  bias = dense(act(temb.astype(dtype)), h.shape[-1], dtype=dtype)
  return h + bias[:, None, None, :]


def _maybe_remat(module: nn.Module, fn: Callable[..., Array], *args,
                 static_argnums: Tuple[int, ...] = ()) -> Array:
  """fn(module, *args), under gradient checkpointing when module.remat.

  With remat the block's activations are not kept for the backward pass but
  recomputed from its input: less memory per training step, about one more
  forward pass of compute. Parameter names and values are the same either
  way. static_argnums index fn's arguments (module = 0), e.g. the train flag.
  """
  if not module.remat:
    return fn(module, *args)
  return nn.remat(fn, static_argnums=static_argnums)(module, *args)


def _residual(x: Array, h: Array, skip_rescale: bool) -> Array:
  return (x + h) / np.sqrt(2.0) if skip_rescale else x + h


def _resnet_branch(h: Array, out_ch: int, temb: Optional[Array], train: bool, *,
                   act: Activation, dropout: float, init_scale: float,
                   num_groups: Optional[int], dtype: Dtype) -> Array:
  """The residual branch after its first norm/act: conv, +temb, norm, act, dropout, conv.

  Called from a compact residual block, whose submodules it creates.
  """
  h = conv3x3(h, out_ch, dtype=dtype)
  h = _add_temb(h, temb, act, dtype)
  h = act(group_norm(h, num_groups, dtype))
  h = nn.Dropout(dropout)(h, deterministic=not train)
  # init_scale 0: the branch starts (almost) switched off, the block ~ identity.
  return conv3x3(h, out_ch, init_scale=init_scale, dtype=dtype)


class ResnetBlockDDPM(nn.Module):
  """The DDPM residual block (GroupNorm, act, conv, +temb, GroupNorm, act, dropout, conv).

  With skip_rescale=False, num_groups=32 and init_scale=0 it is Ho et al.'s
  block; the defaults of DDPM++ use skip_rescale and min(C // 4, 32) groups.
  x [B, H, W, C], temb [B, E] or None -> [B, H, W, out_ch or C].
  """
  act: Activation
  out_ch: Optional[int] = None
  conv_shortcut: bool = False
  dropout: float = 0.1
  skip_rescale: bool = False
  init_scale: float = 0.0
  num_groups: Optional[int] = None
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array, temb: Optional[Array] = None, train: bool = False) -> Array:
    return _maybe_remat(self, _ddpm_block, x, temb, train, static_argnums=(3,))


def _ddpm_block(m: ResnetBlockDDPM, x: Array, temb: Optional[Array], train: bool) -> Array:
  c = x.shape[-1]
  out_ch = m.out_ch or c
  h = m.act(group_norm(x, m.num_groups, m.dtype))
  h = _resnet_branch(h, out_ch, temb, train, act=m.act, dropout=m.dropout,
                     init_scale=m.init_scale, num_groups=m.num_groups, dtype=m.dtype)
  if c != out_ch:
    if m.conv_shortcut:
      x = conv3x3(x, out_ch, dtype=m.dtype)
    else:
      x = dense(x, out_ch, init_scale=0.1, dtype=m.dtype)  # the reference's NIN
  return _residual(x, h, m.skip_rescale)


class ResnetBlockBigGAN(nn.Module):
  """BigGAN-style residual block that can resample (up or down by 2) inside.

  Resampling happens after the first norm/activation on the residual branch
  and on the skip branch (FIR or naive), so the skip needs a 1x1 conv.
  x [B, H, W, C], temb [B, E] or None -> [B, H', W', out_ch or C].
  """
  act: Activation
  up: bool = False
  down: bool = False
  out_ch: Optional[int] = None
  dropout: float = 0.1
  fir: bool = False
  fir_kernel: Tuple[int, ...] = (1, 3, 3, 1)
  skip_rescale: bool = True
  init_scale: float = 0.0
  num_groups: Optional[int] = None
  dtype: Dtype = jnp.float32
  remat: bool = False

  def _resample(self, x: Array) -> Array:
    if self.up:
      if self.fir:
        return fir_ops.upsample_2d(x, self.fir_kernel, factor=2)
      return fir_ops.naive_upsample_2d(x, 2)
    if self.down:
      if self.fir:
        return fir_ops.downsample_2d(x, self.fir_kernel, factor=2)
      return fir_ops.naive_downsample_2d(x, 2)
    return x

  @nn.compact
  def __call__(self, x: Array, temb: Optional[Array] = None, train: bool = False) -> Array:
    return _maybe_remat(self, _biggan_block, x, temb, train, static_argnums=(3,))


def _biggan_block(m: ResnetBlockBigGAN, x: Array, temb: Optional[Array], train: bool) -> Array:
  c = x.shape[-1]
  out_ch = m.out_ch or c
  h = m.act(group_norm(x, m.num_groups, m.dtype))
  h = m._resample(h)
  x = m._resample(x)
  h = _resnet_branch(h, out_ch, temb, train, act=m.act, dropout=m.dropout,
                     init_scale=m.init_scale, num_groups=m.num_groups, dtype=m.dtype)
  if c != out_ch or m.up or m.down:
    x = conv1x1(x, out_ch, dtype=m.dtype)
  return _residual(x, h, m.skip_rescale)
