"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models"), its learned uncertainty head, and forced weight normalization.

`EDM2UNet` (model.name 'edm2_unet') is the network F of EDM2's `Precond`: the U-Net and the
uncertainty head u(sigma). EDM2's preconditioning itself (c_skip, c_out, c_in, c_noise =
ln(sigma) / 4, sigma_data 0.5) is the project's 'edm' parameterization
(`score_jax.models.score`), which feeds the network c_in x and the noise label c_noise as is
(this network has no `embedding_type`, so it receives c_noise, not exp(c_noise)).

Layers (EDM2's equation numbers):
- `MPConv`: a convolution or linear layer whose weight is normalized in every forward,
  w / (1e-4 + |w_o| / sqrt(fan_in)) per output channel o (EDM2's `normalize`), then scaled by
  gain / sqrt(fan_in) (eq. 47, 66): each output channel has unit norm, so unit-variance inputs
  give unit-variance outputs. Forced weight normalization, the projection of the stored
  weights onto that sphere, is part of the optimizer (`forced_weight_normalization`, chained
  last by `score_jax.run.builders.get_optimizer` for this network) and of the initialization
  (weights start as normalize(randn)).
- `mp_silu` (SiLU / 0.596, eq. 81), `mp_sum` (eq. 88), `mp_cat` (eq. 103), `MPFourier`
  (sqrt(2) cos(freqs c + phases), eq. 75; freqs = 2 pi N(0, 1), phases = 2 pi U(0, 1), fixed:
  parameters here so that checkpoints carry them, under `stop_gradient`, so Adam and the EMA
  leave them), pixel norm (`normalize` over channels), cosine attention (q, k, v pixel-normed
  per head), the extra all-ones input channel, no biases, no group norm.
- `Block`: EDM2's encoder / decoder block (Figure 21): resampling (2x2 average / nearest, the
  filter [1, 1]), a 1x1 skip convolution where the width changes (encoder: before the pixel
  norm; decoder: on the main branch), the residual branch conv-silu-(emb modulation)-silu-
  dropout-conv, `mp_sum` with res_balance 0.3, optional attention with attn_balance 0.3, and
  activations clipped to +-256.

Layout. Images NHWC. `net.apply(variables, x [B, H, W, C], labels [B], y=None, train=False)`
returns F [B, H, W, C] float32 with labels = c_noise; y: integer classes [B] (the null label
num_classes and y=None give EDM2's zero label) or float [B, num_classes].
`net.apply(variables, c_noise [B], method=EDM2UNet.log_variance)` gives u [B] float32.
Compute in `dtype` (float32 / bfloat16) on the image path; the embeddings, weight
normalization and the uncertainty head in float32, as EDM2's fp16 code.

Parameter names, EDM2 (`training/networks_edm2.py`, `Precond`) -> here. Weights are stored
with the output channel LAST, [kh, kw, in, out] for convolutions (EDM2: [out, in, kh, kw],
transpose (2, 3, 1, 0)) and [in, out] for linear layers (EDM2: [out, in], transposed):

  unet.emb_fourier.{freqs,phases}        unet/emb_fourier/{freqs,phases}
  unet.emb_noise.weight                  unet/emb_noise/weight
  unet.emb_label.weight                  unet/emb_label/weight          (num_classes > 0)
  unet.enc.{R}x{R}_conv.weight           unet/enc_{R}x{R}_conv/weight
  unet.enc.{R}x{R}_{down,blockI}.P       unet/enc_{R}x{R}_{down,blockI}/P
  unet.dec.{R}x{R}_{in0,in1,up,blockI}.P unet/dec_{R}x{R}_{in0,in1,up,blockI}/P
  unet.out_conv.weight                   unet/out_conv/weight
  unet.out_gain                          unet/out_gain                  (scalar)
  logvar_fourier.{freqs,phases}          logvar_fourier/{freqs,phases}
  logvar_linear.weight                   logvar_linear/weight

with a block's P one of emb_gain (scalar), conv_res0.weight, emb_linear.weight,
conv_res1.weight, conv_skip.weight, attn_qkv.weight, attn_proj.weight (a '.' of EDM2's name
is a '/' here, and enc. / dec. are the prefixes enc_ / dec_). EDM2 counts its parameters
without the Fourier buffers: `count_params` here counts them too (2 x (noise channels +
logvar_channels) more).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from score_jax.models import layers

Array = jax.Array

__all__ = ["EDM2UNet", "MPUNet", "Block", "MPConv", "MPFourier", "normalize", "mp_silu",
           "mp_sum", "mp_cat", "is_mp_weight", "project_weights", "forced_weight_normalization",
           "PRESETS", "preset"]

_EPS = 1e-4  # EDM2's normalize() eps


def normalize(x: Array, axis: Sequence[int], eps: float = _EPS) -> Array:
  """EDM2's normalize: x / (eps + |x| / sqrt(n)) with |x| the norm over `axis` (float32) and n
  the number of elements it covers: unit root-mean-square over those axes."""
  axis = tuple(a % x.ndim for a in axis)
  n = math.prod(x.shape[a] for a in axis)
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True))
  return x / (eps + norm * np.float32(1.0 / math.sqrt(n))).astype(x.dtype)


def normalize_weight(w: Array) -> Array:
  """An MP weight normalized per output channel (the last axis): over all the other axes."""
  return normalize(w, tuple(range(w.ndim - 1)))


def mp_silu(x: Array) -> Array:
  """Magnitude-preserving SiLU (EDM2 eq. 81)."""
  return nn.silu(x) / 0.596  # Python floats keep the activations' dtype (bfloat16)


def mp_sum(a: Array, b: Array, t: float = 0.5) -> Array:
  """Magnitude-preserving sum (1 - t) a + t b, rescaled (EDM2 eq. 88)."""
  return (a + t * (b - a)) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: Array, b: Array, t: float = 0.5) -> Array:
  """Magnitude-preserving concatenation along the channel (last) axis (EDM2 eq. 103)."""
  na, nb = a.shape[-1], b.shape[-1]
  c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
  wa = c / math.sqrt(na) * (1 - t)
  wb = c / math.sqrt(nb) * t
  return jnp.concatenate([wa * a, wb * b], axis=-1)


def _mp_weight_init(key: Array, shape: Tuple[int, ...], dtype: Any = jnp.float32) -> Array:
  # EDM2 draws randn; projected at once (forced weight normalization from the start).
  return normalize_weight(jax.random.normal(key, shape, dtype))


class MPFourier(nn.Module):
  """sqrt(2) cos(freqs x + phases) [B, num_channels] float32 of x [B] (EDM2 eq. 75); freqs and
  phases fixed (no gradient)."""
  num_channels: int
  bandwidth: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    freqs = self.param("freqs", lambda k, s: 2 * np.pi * self.bandwidth * jax.random.normal(k, s),
                       (self.num_channels,))
    phases = self.param("phases", lambda k, s: 2 * np.pi * jax.random.uniform(k, s),
                        (self.num_channels,))
    freqs, phases = jax.lax.stop_gradient(freqs), jax.lax.stop_gradient(phases)
    y = x.astype(jnp.float32)[:, None] * freqs[None, :] + phases[None, :]
    return jnp.cos(y) * math.sqrt(2)


class MPConv(nn.Module):
  """Magnitude-preserving convolution ('SAME' padding, kernel (k, k)) or linear layer
  (kernel ()), no bias: the weight [*kernel, in, out] normalized per output channel and scaled
  by gain / sqrt(fan_in) in every call (EDM2 eq. 47, 66), cast to the input's dtype."""
  features: int
  kernel: Tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x: Array, gain: Any = 1.0) -> Array:
    w = self.param("weight", _mp_weight_init, tuple(self.kernel) + (x.shape[-1], self.features),
                   jnp.float32)
    fan_in = math.prod(w.shape[:-1])
    w = normalize_weight(w) * (gain / np.float32(math.sqrt(fan_in)))
    w = w.astype(x.dtype)
    if not self.kernel:
      return x @ w
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _resample(x: Array, mode: str) -> Array:
  """EDM2's resampling with its filter [1, 1]: 2x2 average pooling ('down'), nearest-neighbour
  upsampling ('up'), or nothing ('keep')."""
  if mode == "keep":
    return x
  b, h, w, c = x.shape
  if mode == "down":
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).astype(x.dtype)
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Block(nn.Module):
  """EDM2's U-Net block (Figure 21), flavor 'enc' or 'dec' (module docstring)."""
  out_channels: int
  flavor: str = "enc"
  resample_mode: str = "keep"
  attention: bool = False
  channels_per_head: int = 64
  dropout: float = 0.0
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: Optional[float] = 256.0

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
    cout, enc = self.out_channels, self.flavor == "enc"
    skip = x.shape[-1] != cout
    emb_gain = self.param("emb_gain", nn.initializers.zeros, (), jnp.float32)
    # Main branch.
    x = _resample(x, self.resample_mode)
    if enc:
      if skip:
        x = MPConv(cout, (1, 1), name="conv_skip")(x)
      x = normalize(x, (-1,))  # pixel norm
    # Residual branch.
    y = MPConv(cout, (3, 3), name="conv_res0")(mp_silu(x))
    c = MPConv(cout, (), name="emb_linear")(emb, gain=emb_gain) + 1.0  # [B, cout] float32
    y = mp_silu(y * c[:, None, None, :].astype(y.dtype))
    if self.dropout > 0:
      y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = MPConv(cout, (3, 3), name="conv_res1")(y)
    # Connect the branches.
    if not enc and skip:
      x = MPConv(cout, (1, 1), name="conv_skip")(x)
    x = mp_sum(x, y, t=self.res_balance)
    # Cosine self-attention: q, k, v pixel-normed per head.
    if self.attention:
      heads = cout // self.channels_per_head
      b, h, w, _ = x.shape
      qkv = MPConv(3 * cout, (1, 1), name="attn_qkv")(x)
      # EDM2's channel order: (head, channel, q/k/v), q/k/v fastest.
      qkv = normalize(qkv.reshape(b, h * w, heads, cout // heads, 3), (3,))
      q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]  # [B, HW, heads, ch]
      logits = jnp.einsum("bqhc,bkhc->bhqk", q, k / math.sqrt(cout // heads),
                          preferred_element_type=jnp.float32)
      a = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      y = jnp.einsum("bhqk,bkhc->bqhc", a, v).reshape(b, h, w, cout)
      y = MPConv(cout, (1, 1), name="attn_proj")(y)
      x = mp_sum(x, y, t=self.attn_balance)
    if self.clip_act is not None:
      x = jnp.clip(x, -self.clip_act, self.clip_act)
    return x


class MPUNet(nn.Module):
  """EDM2's U-Net F(x, c_noise, y) (EDM2's `UNet`; attributes as its arguments, label_dim =
  num_classes, image size and channels from the input)."""
  model_channels: int = 192
  channel_mult: Tuple[int, ...] = (1, 2, 3, 4)
  channel_mult_noise: Optional[int] = None
  channel_mult_emb: Optional[int] = None
  num_blocks: int = 3
  attn_resolutions: Tuple[int, ...] = (16, 8)
  label_balance: float = 0.5
  concat_balance: float = 0.5
  num_classes: int = 0
  dropout: float = 0.0
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: Optional[float] = 256.0
  channels_per_head: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, c_noise: Array, y: Optional[Array] = None,
               train: bool = False) -> Array:
    if x.ndim != 4:
      raise ValueError(f"EDM2UNet takes images [B, H, W, C], got shape {x.shape}.")
    batch, res0, _, img_channels = x.shape
    levels = len(self.channel_mult)
    if res0 % (2 ** (levels - 1)):
      raise ValueError(f"image size {res0} must be divisible by {2 ** (levels - 1)} "
                       f"(len(channel_mult) = {levels}).")
    if c_noise.shape != (batch,):
      raise ValueError(f"noise labels must have shape [{batch}], got {c_noise.shape}.")
    mc = self.model_channels
    cblock = [mc * m for m in self.channel_mult]
    cnoise = mc * self.channel_mult_noise if self.channel_mult_noise is not None else cblock[0]
    cemb = mc * self.channel_mult_emb if self.channel_mult_emb is not None else max(cblock)
    out_gain = self.param("out_gain", nn.initializers.zeros, (), jnp.float32)

    # Embedding (float32).
    emb = MPConv(cemb, (), name="emb_noise")(MPFourier(cnoise, name="emb_fourier")(c_noise))
    layers.check_class_labels(y, self.num_classes)
    if self.num_classes > 0:
      lab = MPConv(cemb, (), name="emb_label")(
          layers.class_onehot(y, self.num_classes, batch))
      emb = mp_sum(emb, lab, t=self.label_balance)
    emb = mp_silu(emb)

    blk = dict(dropout=self.dropout, res_balance=self.res_balance,
               attn_balance=self.attn_balance, clip_act=self.clip_act,
               channels_per_head=self.channels_per_head)
    # Encoder.
    h = x.astype(self.dtype)
    h = jnp.concatenate([h, jnp.ones_like(h[..., :1])], axis=-1)
    skips = []
    cout = img_channels + 1
    for level, channels in enumerate(cblock):
      res = res0 >> level
      if level == 0:
        cout = channels
        h = MPConv(cout, (3, 3), name=f"enc_{res}x{res}_conv")(h)
      else:
        h = Block(cout, "enc", "down", name=f"enc_{res}x{res}_down", **blk)(h, emb, train)
      skips.append(h)
      for idx in range(self.num_blocks):
        cout = channels
        h = Block(cout, "enc", attention=res in self.attn_resolutions,
                  name=f"enc_{res}x{res}_block{idx}", **blk)(h, emb, train)
        skips.append(h)
    # Decoder.
    for level in reversed(range(levels)):
      res, channels = res0 >> level, cblock[level]
      if level == levels - 1:
        h = Block(cout, "dec", attention=True, name=f"dec_{res}x{res}_in0", **blk)(h, emb, train)
        h = Block(cout, "dec", name=f"dec_{res}x{res}_in1", **blk)(h, emb, train)
      else:
        h = Block(cout, "dec", "up", name=f"dec_{res}x{res}_up", **blk)(h, emb, train)
      for idx in range(self.num_blocks + 1):
        h = mp_cat(h, skips.pop(), t=self.concat_balance)
        cout = channels
        h = Block(cout, "dec", attention=res in self.attn_resolutions,
                  name=f"dec_{res}x{res}_block{idx}", **blk)(h, emb, train)
    out = MPConv(img_channels, (3, 3), name="out_conv")(h, gain=out_gain)
    return out.astype(jnp.float32)


_UNET_ARGS = tuple(f.name for f in dataclasses.fields(MPUNet)
                   if f.init and f.name not in ("parent", "name"))


class EDM2UNet(nn.Module):
  """EDM2's network: the MP U-Net (`unet`) and the uncertainty head u(c_noise)
  (`logvar_fourier`, `logvar_linear`); the module docstring has the calls and names.

  Attributes: EDM2's `UNet` arguments (num_classes = label_dim), `logvar_channels` (EDM2's
  128), `dtype` the compute dtype.
  """
  model_channels: int = 192
  channel_mult: Tuple[int, ...] = (1, 2, 3, 4)
  channel_mult_noise: Optional[int] = None
  channel_mult_emb: Optional[int] = None
  num_blocks: int = 3
  attn_resolutions: Tuple[int, ...] = (16, 8)
  label_balance: float = 0.5
  concat_balance: float = 0.5
  num_classes: int = 0
  dropout: float = 0.0
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: Optional[float] = 256.0
  channels_per_head: int = 64
  logvar_channels: int = 128
  dtype: Any = jnp.float32

  # score_jax.run.builders.get_optimizer chains forced_weight_normalization() for it.
  forced_weight_norm: ClassVar[bool] = True

  def setup(self):
    # The U-Net's attributes are this module's of the same names (lists as tuples).
    self.unet = MPUNet(**{name: tuple(v) if isinstance(v, list) else v
                          for name in _UNET_ARGS for v in [getattr(self, name)]})
    self.logvar_fourier = MPFourier(self.logvar_channels)
    self.logvar_linear = MPConv(1, ())

  def __call__(self, x: Array, labels: Array, y: Optional[Array] = None, *,
               train: bool = False) -> Array:
    """F(c_in x; c_noise) [B, H, W, C] float32 for x [B, H, W, C] and labels = c_noise [B]."""
    if self.is_initializing():  # the head's parameters with the network's
      self.log_variance(labels)
    return self.unet(x, labels, y, train)

  def log_variance(self, c_noise: Array) -> Array:
    """EDM2's u(sigma) [B] float32 at c_noise = ln(sigma) / 4 [B]."""
    return self.logvar_linear(self.logvar_fourier(c_noise.astype(jnp.float32)))[:, 0]


# ------------------------------------------------------------------ forced weight normalization


def is_mp_weight(path: Tuple[Any, ...]) -> bool:
  """Whether a parameter at `path` (jax.tree_util key path) is an MPConv weight."""
  last = path[-1] if path else None
  return getattr(last, "key", getattr(last, "name", None)) == "weight"


def project_weights(params: Any) -> Any:
  """Every MP weight of `params` normalized per output channel (EDM2's normalize(): its rows
  then have norm ~ sqrt(fan_in)); the other parameters unchanged."""
  return jax.tree_util.tree_map_with_path(
      lambda p, w: normalize_weight(w).astype(w.dtype) if is_mp_weight(p) else w, params)


def forced_weight_normalization() -> optax.GradientTransformation:
  """An optax transformation, chained last, that makes the update land on the sphere: the new
  MP weights are normalize(params + update), EDM2's forced weight normalization (EDM2 does it
  at the next training forward, here right after the update; the same weights reach every
  forward). Needs `params` in update()."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("forced_weight_normalization needs the parameters in update().")

    def one(path, u, p):
      if not is_mp_weight(path):
        return u
      return (normalize_weight(p + u) - p).astype(u.dtype)

    return jax.tree_util.tree_map_with_path(one, updates, params), state

  return optax.GradientTransformation(init, update)


# ------------------------------------------------------------------ presets (train_edm2.py)


class Preset(NamedTuple):
  """One of EDM2's configuration presets (train_edm2.py `config_presets`)."""
  channels: int  # model_channels
  lr: float  # ref_lr
  decay: int  # ref_batches
  dropout: float
  p_mean: float
  p_std: float
  duration: int  # training images
  batch: int


PRESETS = {
    "img512-xs": Preset(128, 0.0120, 70000, 0.00, -0.4, 1.0, 2048 << 20, 2048),
    "img512-s": Preset(192, 0.0100, 70000, 0.00, -0.4, 1.0, 2048 << 20, 2048),
    "img512-m": Preset(256, 0.0090, 70000, 0.10, -0.4, 1.0, 2048 << 20, 2048),
    "img512-l": Preset(320, 0.0080, 70000, 0.10, -0.4, 1.0, 1792 << 20, 2048),
    "img512-xl": Preset(384, 0.0070, 70000, 0.10, -0.4, 1.0, 1280 << 20, 2048),
    "img512-xxl": Preset(448, 0.0065, 70000, 0.10, -0.4, 1.0, 896 << 20, 2048),
    "img64-s": Preset(192, 0.0100, 35000, 0.00, -0.8, 1.6, 1024 << 20, 2048),
    "img64-m": Preset(256, 0.0090, 35000, 0.10, -0.8, 1.6, 2048 << 20, 2048),
    "img64-l": Preset(320, 0.0080, 35000, 0.10, -0.8, 1.6, 1024 << 20, 2048),
    "img64-xl": Preset(384, 0.0070, 35000, 0.10, -0.8, 1.6, 640 << 20, 2048),
}


def preset(name: str) -> Preset:
  """EDM2's preset `name` ('img512-s', 'img64-xl', ...)."""
  if name not in PRESETS:
    raise ValueError(f"Unknown EDM2 preset {name!r}; choose from {sorted(PRESETS)}.")
  return PRESETS[name]
