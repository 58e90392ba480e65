"""EDM's CIFAR-10 U-Nets: DDPM++ and NCSN++ as Karras et al. (2022) train them.

`SongUNet` is the network that EDM (NVlabs/edm) trains on CIFAR-10 behind its
preconditioning, a re-implementation of the 2021 DDPM++ / NCSN++ with the
changes EDM made: three resolutions (channel multipliers 2, 2, 2), residual
blocks with a resampling path of their own, a fixed 1/sqrt(2) skip scale,
single-head attention inside the residual blocks, a mapping network of two
dense layers that also embeds class labels and EDM's 9 augmentation labels,
and no per-layer noise-level input other than the block's additive
embedding. The two settings:

| setting | embedding_type | channel_mult_noise | encoder_type | resample_filter | parameters |
|---------|----------------|--------------------|--------------|-----------------|------------|
| DDPM++  | positional     | 1                  | standard     | (1, 1)          | 55,733,891 |
| NCSN++  | fourier        | 2                  | residual     | (1, 3, 3, 1)    | 56,397,827 |

(32x32x3, 128 channels, 4 blocks per resolution, attention at 16x16,
augment_dim 9, unconditional; 10 classes add 1,408 / 2,816.) The NCSN++
network's 128 Fourier frequencies are a fixed buffer in EDM (not counted
there); here they are the parameter `map_noise/freqs`, so that checkpoints
carry them, and receive no gradient (`stop_gradient`), which keeps them
fixed under Adam and the EMA.

MeanFlow (second_time=True) gives the network a second time label, t - r;
second_time_mode='concat' combines the two as the MeanFlow authors' CIFAR-10
network does (configs/cifar10_meanflow.py), 'add' (the default) with a dense
layer of its own.

Inputs and labels. `net.apply(variables, x, labels, y=None, train=False,
augment_labels=None)`, x [B, H, W, C] NHWC, returns F [B, H, W, C] (float32).
The noise label is embedded as given by a positional embedding, and as
log(labels) by the Fourier embedding (the project's convention for Fourier
networks, as NCSN++'s). Under `parameterization='edm'` (models.utils.
get_score_fn) the network receives c_in x and c_noise = ln(sigma) / 4
(positional) or exp(c_noise) (Fourier), so both embed EDM's c_noise and F is
EDM's F(c_in x; c_noise). Class labels y are integers [B] (one-hot inside,
scaled by sqrt(num_classes) as EDM does; the null label num_classes and
y=None give the zero vector, EDM's dropped label) or float vectors
[B, num_classes]. augment_labels [B, augment_dim] condition the network on
the augmentation applied to its input; None (sampling) means zero.

Layers follow EDM's definitions: convolutions with optional resampling by
the separable filter outer(f, f) / sum(f)^2 (downsampling: the filter at
stride 2, then the convolution; upsampling: the transposed filter at stride
2 times 4, then the convolution; the residual encoder's "fused" downsampling
convolves first and filters after), GroupNorm with min(32, C // 4) groups and
eps 1e-6, and xavier-uniform initialization (the last convolution of each
branch scaled by 1e-5, the attention's qkv by sqrt(0.2)).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_jax.models import layers

Array = jax.Array

__all__ = ["SongUNet", "DDPMPP_CIFAR10", "NCSNPP_CIFAR10", "SECOND_TIME_MODES"]

# The two CIFAR-10 settings' keys that differ (the rest are the defaults).
DDPMPP_CIFAR10 = dict(embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                      resample_filter=(1, 1))
NCSNPP_CIFAR10 = dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                      resample_filter=(1, 3, 3, 1))

# How a second time label enters the mapping network (SongUNet.second_time_mode).
SECOND_TIME_MODES = ("add", "concat")

_SKIP_SCALE = math.sqrt(0.5)
_DN = ("NHWC", "HWIO", "NHWC")


def _xavier(scale: float = 1.0):
  """Xavier-uniform (limit sqrt(6 / (fan_in + fan_out))) times `scale`."""
  return nn.initializers.variance_scaling(scale**2, "fan_avg", "uniform")


def resample_kernel(f: Sequence[float]) -> np.ndarray:
  """The 2-D resampling filter outer(f, f) / sum(f)^2 (float32, [k, k])."""
  f = np.asarray(f, np.float64)
  if f.ndim != 1 or f.size < 1 or not np.all(np.isfinite(f)) or f.sum() == 0:
    raise ValueError(f"resample_filter must be a non-empty 1-D filter with a nonzero sum, got {f!r}.")
  return (np.outer(f, f) / f.sum() ** 2).astype(np.float32)


def _depthwise(x: Array, k2: np.ndarray, *, up: bool, pad: Optional[int] = None) -> Array:
  """Each channel filtered by k2 at stride 2: down (stride-2 correlation, padding
  `pad`, default (k - 1) // 2) or up (the transposed convolution with 4 k2 and
  padding (k - 1) // 2)."""
  c = x.shape[-1]
  k = k2.shape[0]
  p = (k - 1) // 2 if pad is None else pad
  if up:
    w = np.tile((4.0 * k2[::-1, ::-1])[:, :, None, None], (1, 1, 1, c))
    return jax.lax.conv_general_dilated(x, jnp.asarray(w, x.dtype), (1, 1),
                                        [(k - 1 - p, k - 1 - p)] * 2, lhs_dilation=(2, 2),
                                        dimension_numbers=_DN, feature_group_count=c)
  w = np.tile(k2[:, :, None, None], (1, 1, 1, c))
  return jax.lax.conv_general_dilated(x, jnp.asarray(w, x.dtype), (2, 2), [(p, p)] * 2,
                                      dimension_numbers=_DN, feature_group_count=c)


class Conv2d(nn.Module):
  """Convolution (kernel 1 or 3, 'same' padding) with optional 2x resampling.

  Parameters `kernel` [k, k, Cin, Cout] (HWIO) and `bias` [Cout].
  """
  features: int
  kernel_size: int = 3
  up: bool = False
  down: bool = False
  fused: bool = False  # down only: convolve (padding k//2 + (f-1)//2), then filter
  resample_filter: Tuple[int, ...] = (1, 1)
  init_scale: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.up and self.down:
      raise ValueError("Conv2d: up and down are exclusive.")
    if self.fused and not self.down:
      raise ValueError("Conv2d: fused resampling is implemented for downsampling only.")
    k = self.kernel_size
    kernel = self.param("kernel", _xavier(self.init_scale), (k, k, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x = x.astype(self.dtype)
    w = kernel.astype(self.dtype)
    k2 = resample_kernel(self.resample_filter) if (self.up or self.down) else None

    def conv(h, pad):
      return jax.lax.conv_general_dilated(h, w, (1, 1), [(pad, pad)] * 2, dimension_numbers=_DN)

    if self.fused:
      x = _depthwise(conv(x, k // 2 + (k2.shape[0] - 1) // 2), k2, up=False, pad=0)
    else:
      if self.up or self.down:
        x = _depthwise(x, k2, up=self.up)
      x = conv(x, k // 2)
    return x + bias.astype(self.dtype).reshape(1, 1, 1, -1)


def _group_norm(name: str, dtype: Any) -> Callable[[Array], Array]:
  """EDM's GroupNorm: min(32, C // 4) groups, eps 1e-6, two-pass variance."""
  return lambda x: nn.GroupNorm(num_groups=max(min(32, x.shape[-1] // 4), 1), epsilon=1e-6,
                                use_fast_variance=False, dtype=dtype, name=name)(x)


class UNetBlock(nn.Module):
  """EDM's U-Net block as SongUNet configures it.

  h = conv0(silu(norm0(x))) (resampling inside), h = silu(norm1(h + affine(emb))),
  h = conv1(dropout(h)), x = (h + skip(x)) / sqrt(2) with a 1x1 (resampling)
  skip where the width or resolution changes; with attention, single-head
  self-attention on norm2(x) (qkv one 1x1 convolution whose output channels
  interleave q, k, v: channel 3c + j), x = (proj(a) + x) / sqrt(2).
  """
  features: int
  up: bool = False
  down: bool = False
  attention: bool = False
  dropout: float = 0.0
  resample_filter: Tuple[int, ...] = (1, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool) -> Array:
    c, dt = self.features, self.dtype
    kw = dict(resample_filter=self.resample_filter, dtype=dt)
    orig = x
    h = Conv2d(c, 3, up=self.up, down=self.down, name="conv0", **kw)(
        nn.silu(_group_norm("norm0", dt)(x)))
    shift = nn.Dense(c, kernel_init=_xavier(), dtype=dt, name="affine")(emb)
    h = nn.silu(_group_norm("norm1", dt)(h + shift[:, None, None, :].astype(h.dtype)))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = Conv2d(c, 3, init_scale=1e-5, name="conv1", **kw)(h)
    if c != x.shape[-1] or self.up or self.down:
      orig = Conv2d(c, 1, up=self.up, down=self.down, name="skip", **kw)(x)
    x = (h + orig.astype(h.dtype)) * _SKIP_SCALE
    if self.attention:
      b, hh, ww, _ = x.shape
      qkv = Conv2d(3 * c, 1, init_scale=math.sqrt(0.2), name="qkv", **kw)(
          _group_norm("norm2", dt)(x))
      qkv = qkv.reshape(b, hh * ww, c, 3).astype(jnp.float32)
      q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]  # [B, HW, C]
      w = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k / math.sqrt(c)), axis=-1)
      a = jnp.einsum("bqk,bkc->bqc", w.astype(dt), v.astype(dt)).reshape(b, hh, ww, c)
      x = (Conv2d(c, 1, init_scale=1e-5, name="proj", **kw)(a) + x) * _SKIP_SCALE
    return x


class FourierEmbedding(nn.Module):
  """[sin(2 pi f x), cos(2 pi f x)] of fixed frequencies f ~ N(0, scale^2) (`freqs`, no gradient)."""
  num_channels: int
  scale: float = 16.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    freqs = self.param("freqs", nn.initializers.normal(stddev=self.scale),
                       (self.num_channels // 2,), jnp.float32)
    w = jax.lax.stop_gradient(freqs) * np.float32(2 * np.pi)
    x = x.astype(jnp.float32)[:, None] * w[None, :]
    return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=1)


def positional_embedding(x: Array, num_channels: int, max_positions: int = 10000) -> Array:
  """[sin(x f_k), cos(x f_k)], f_k = (1 / max_positions)^(k / (num_channels / 2 - 1))."""
  half = num_channels // 2
  k = jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1)
  freqs = (np.float32(1.0 / max_positions)) ** k
  x = x.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=1)


class SongUNet(nn.Module):
  """EDM's SongUNet. Defaults: EDM's CIFAR-10 DDPM++ (unconditional, 55,733,891 params).

  Attributes (EDM's names in parentheses, where they differ):
    nf (model_channels): base channel count.
    ch_mult (channel_mult): channel multiplier per resolution.
    num_res_blocks (num_blocks): blocks per resolution in the encoder (the
      decoder has one more).
    attn_resolutions: resolutions with self-attention.
    dropout: dropout rate inside the blocks (training only).
    embedding_type: 'positional' (DDPM++) | 'fourier' (NCSN++) noise embedding.
    channel_mult_noise: width of the noise embedding in units of nf (1 | 2).
    channel_mult_emb: width of the embedding vector in units of nf.
    encoder_type: 'standard' (DDPM++) | 'residual' (NCSN++: a downsampling
      convolution pyramid of the input added at each resolution).
    decoder_type: only 'standard' (EDM's CIFAR-10 networks).
    resample_filter: the 1-D resampling filter.
    fourier_scale: std of the Fourier frequencies at initialization.
    num_classes (label_dim): classes; 0 = unconditional.
    augment_dim: width of the augmentation labels; 0 = none.
    second_time: take a second label (`labels2`, MeanFlow's t - r; None: 0).
    second_time_mode: how the second label enters (with second_time): 'add', its
      positional embedding through a dense layer of its own (`map_noise2`) is added to
      the noise embedding; 'concat', the MeanFlow authors' CIFAR-10 network
      (Gsunshine/py-meanflow): the positional embeddings of labels and labels2 are
      concatenated in that order, [emb(t), emb(t - r)], 2 x nf * channel_mult_noise wide,
      and the class and augmentation label layers and map_layer0's input follow that
      width (the blocks see the mapping network's output, unchanged). 'concat' needs
      the positional embedding.
    dtype: compute dtype (parameters float32, output float32).
  """
  nf: int = 128
  ch_mult: Tuple[int, ...] = (2, 2, 2)
  num_res_blocks: int = 4
  attn_resolutions: Tuple[int, ...] = (16,)
  dropout: float = 0.13
  embedding_type: str = "positional"
  channel_mult_noise: int = 1
  channel_mult_emb: int = 4
  encoder_type: str = "standard"
  decoder_type: str = "standard"
  resample_filter: Tuple[int, ...] = (1, 1)
  fourier_scale: float = 16.0
  num_classes: int = 0
  augment_dim: int = 9
  second_time: bool = False
  second_time_mode: str = "add"
  dtype: Any = jnp.float32

  def _check(self) -> None:
    if self.embedding_type not in ("positional", "fourier"):
      raise ValueError(f"embedding_type must be positional | fourier, got {self.embedding_type!r}.")
    if self.encoder_type not in ("standard", "residual"):
      raise ValueError(f"encoder_type must be standard | residual (EDM's 'skip' encoder is not "
                       f"implemented), got {self.encoder_type!r}.")
    if self.decoder_type != "standard":
      raise ValueError(f"decoder_type must be 'standard' (EDM's 'skip' decoder is not "
                       f"implemented), got {self.decoder_type!r}.")
    resample_kernel(self.resample_filter)
    if self.second_time_mode not in SECOND_TIME_MODES:
      raise ValueError(f"second_time_mode must be add | concat, got {self.second_time_mode!r}.")
    if self.second_time_mode == "concat" and not self.second_time:
      raise ValueError("second_time_mode='concat' combines two times; set second_time=True.")
    if self.second_time_mode == "concat" and self.embedding_type != "positional":
      raise ValueError("second_time_mode='concat' embeds both times positionally (the MeanFlow "
                       "authors' network); set embedding_type='positional'.")

  def embed(self, labels: Array, y: Optional[Array], augment_labels: Optional[Array],
            batch: int, labels2: Optional[Array] = None) -> Array:
    """The mapping network: noise, class and augmentation labels -> emb [B, nf * channel_mult_emb]."""
    self._check()
    noise_ch = self.nf * self.channel_mult_noise
    emb_ch = self.nf * self.channel_mult_emb
    if labels.shape != (batch,):
      raise ValueError(f"noise labels must have shape [{batch}], got {labels.shape}.")
    if self.embedding_type == "fourier":
      emb = FourierEmbedding(noise_ch, self.fourier_scale, name="map_noise")(
          jnp.log(labels.astype(jnp.float32)))
    else:
      emb = positional_embedding(labels, noise_ch)
    if labels2 is not None and not self.second_time:
      raise ValueError("labels2 needs a network built with second_time=True.")
    if self.second_time:  # None: 0, MeanFlow's r = t
      labels2 = jnp.zeros_like(labels) if labels2 is None else labels2
      emb2 = positional_embedding(labels2, noise_ch)
      if self.second_time_mode == "concat":
        emb = jnp.concatenate([emb, emb2], axis=1)
        noise_ch = 2 * noise_ch  # the width the label layers add to
      else:
        emb = emb + nn.Dense(noise_ch, kernel_init=_xavier(), name="map_noise2")(emb2)
    layers.check_class_labels(y, self.num_classes)
    if self.num_classes > 0:
      emb = emb + nn.Dense(noise_ch, kernel_init=_xavier(), name="map_label")(
          layers.class_onehot(y, self.num_classes, batch))
    aug = layers.augment_input(augment_labels, self.augment_dim, batch)
    if self.augment_dim > 0:
      # Bias-free, so zero labels (and None, at sampling time) add nothing.
      emb = emb + nn.Dense(noise_ch, use_bias=False, kernel_init=_xavier(), name="map_augment")(aug)
    emb = nn.silu(nn.Dense(emb_ch, kernel_init=_xavier(), name="map_layer0")(emb))
    emb = nn.silu(nn.Dense(emb_ch, kernel_init=_xavier(), name="map_layer1")(emb))
    return emb.astype(self.dtype)

  @nn.compact
  def __call__(self, x: Array, labels: Array, y: Optional[Array] = None, train: bool = False,
               augment_labels: Optional[Array] = None,
               labels2: Optional[Array] = None) -> Array:
    self._check()
    if x.ndim != 4:
      raise ValueError(f"SongUNet takes images [B, H, W, C], got shape {x.shape}.")
    batch, res0, _, channels = x.shape
    factor = 2 ** (len(self.ch_mult) - 1)
    if res0 % factor:
      raise ValueError(f"image size {res0} must be divisible by {factor} (len(ch_mult) = "
                       f"{len(self.ch_mult)}).")
    emb = self.embed(labels, y, augment_labels, batch, labels2)
    dt, nf = self.dtype, self.nf
    block = lambda name, c, **kw: UNetBlock(c, dropout=self.dropout,
                                            resample_filter=self.resample_filter, dtype=dt,
                                            name=name, **kw)
    h = x.astype(dt)

    # Encoder.
    skips = []
    aux = h
    cout = channels
    for level, mult in enumerate(self.ch_mult):
      res = res0 >> level
      if level == 0:
        cout = nf
        h = Conv2d(cout, 3, dtype=dt, name=f"enc_{res}x{res}_conv")(h)
        skips.append(h)
      else:
        h = block(f"enc_{res}x{res}_down", cout, down=True)(h, emb, train)
        skips.append(h)
        if self.encoder_type == "residual":
          r = Conv2d(cout, 3, down=True, fused=True, resample_filter=self.resample_filter,
                     dtype=dt, name=f"enc_{res}x{res}_aux_residual")(aux)
          h = aux = (h + r) * _SKIP_SCALE
          skips[-1] = h
      for idx in range(self.num_res_blocks):
        cout = nf * mult
        h = block(f"enc_{res}x{res}_block{idx}", cout, attention=res in self.attn_resolutions)(
            h, emb, train)
        skips.append(h)

    # Decoder.
    for level in reversed(range(len(self.ch_mult))):
      res, mult = res0 >> level, self.ch_mult[level]
      if level == len(self.ch_mult) - 1:
        h = block(f"dec_{res}x{res}_in0", cout, attention=True)(h, emb, train)
        h = block(f"dec_{res}x{res}_in1", cout)(h, emb, train)
      else:
        h = block(f"dec_{res}x{res}_up", cout, up=True)(h, emb, train)
      for idx in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        cout = nf * mult
        attn = idx == self.num_res_blocks and res in self.attn_resolutions
        h = block(f"dec_{res}x{res}_block{idx}", cout, attention=attn)(h, emb, train)
    assert not skips
    h = nn.silu(_group_norm(f"dec_{res0}x{res0}_aux_norm", dt)(h))
    out = Conv2d(channels, 3, init_scale=1e-5, dtype=dt, name=f"dec_{res0}x{res0}_aux_conv")(h)
    return out.astype(jnp.float32)
