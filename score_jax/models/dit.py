"""DiT: the Diffusion Transformer of Peebles & Xie (2023), "Scalable Diffusion Models with
Transformers" (facebookresearch/DiT).

The image x [B, H, W, C] is cut into p x p patches, each embedded linearly (a convolution of
kernel and stride p) and given a fixed 2-D sine-cosine position embedding; the noise label and
the class label are embedded into one vector c; `depth` transformer blocks with adaLN-Zero
conditioning follow, and a final adaLN layer maps each token back to its p x p patch.

- Noise label: 256 sinusoidal features [cos(t f_k), sin(t f_k)], f_k = 10000^(-k / 128),
  k = 0..127 (the authors' `TimestepEmbedder`, GLIDE's embedding), then Dense, SiLU, Dense.
  The label is the one `models.get_score_fn` gives every network (VP discrete: the DDPM step
  t (N - 1), continuous: 999 t, 'edm': c_noise, 'velocity' on rectified flow: 999 t,
  'sit_velocity': SiT's time 1 - t in [0, 1]).
- Class label: a table of num_classes + 1 rows; row num_classes is the null label that
  classifier-free guidance uses, as every network of the project: y = None means the null
  label, and training replaces labels by it at the rate training.class_dropout (the authors'
  `class_dropout_prob`, done outside the network here, `run.builders._training_labels`).
  num_classes = 0: unconditional, no table.
- Position embedding: per token at row r and column c of the patch grid, D / 2 features of c
  then D / 2 of r, each [sin(x w_k), cos(x w_k)] with w_k = 10000^(-k / (D / 4)): the
  authors' `get_2d_sincos_pos_embed` (MAE's), computed from the input's size in float64 and
  not a parameter (the authors keep it as a frozen parameter, `pos_embed`).
- Block (adaLN-Zero): (shift, scale, gate) x 2 = Dense(SiLU(c)), 6 D wide, zero-initialized;
  x += gate_1 * Attn(LN(x) (1 + scale_1) + shift_1), x += gate_2 * MLP(LN(x) (1 + scale_2) +
  shift_2), LayerNorm without affine parameters (eps 1e-6), multi-head attention with one qkv
  projection (output channels ordered (3, heads, head_dim), as timm's `Attention`) through
  `jax.nn.dot_product_attention`, MLP of width mlp_ratio D with tanh-approximated GELU.
- Final layer: x = Dense(LN(x) (1 + scale) + shift) to p * p * C_out features per token
  ((row, column, channel) order within the patch), modulation and Dense zero-initialized.

Output. `net.apply(variables, x, labels, y=None, train=False)` returns [B, H, W, C] float32,
the noise (or velocity, ...) prediction that the score function reads. With learn_sigma the
network has 2 C output channels, as the authors': the second C are the DDPM variance
interpolation v of improved DDPM (Sigma = exp(v log beta_t + (1 - v) log beta~_t), v mapped
from [-1, 1]), which the project's samplers do not use; they are returned by
`net.apply(variables, x, labels, y, full_output=True)` ([B, H, W, 2 C]: the C prediction
channels, then the C variance channels). They take no part in the project's losses (their
parameters receive no gradient), but converted checkpoints keep them.

Sizes (`DIT_SIZES`, the paper's Table 1): S 384 wide, 12 blocks, 6 heads; B 768/12/12;
L 1024/24/16; XL 1152/28/16, at patch size 2, 4 or 8 ('DiT-XL/2' is dit_size='XL',
patch_size=2). hidden_size, depth, num_heads > 0 override the preset (small networks for
tests and CPU runs). Parameter counts equal the authors' trainable parameters
(tests/test_dit.py; DiT-XL/2 on 32x32x4 latents with 1000 classes: 674,834,720, plus the
294,912 of the frozen position embedding in their count, 675,129,632).

Initialization as the authors': xavier-uniform Dense kernels and zero biases, the patch
embedding xavier-uniform as a [p p C, D] matrix, the class table and the noise MLP's kernels
N(0, 0.02^2), the adaLN modulations and the final Dense zero.

SiT (Ma et al. 2024) is this network trained as an interpolant (the project's rectified flow
with the 'sit_velocity' parameterization, SiT's time and sign): configs/imagenet256_sit_xl2.py,
score_jax.convert.sit.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_jax.models import layers

Array = jax.Array

__all__ = ["DiT", "DIT_SIZES", "dit_dims", "pos_embed_2d", "timestep_features"]

# The paper's sizes: name -> (hidden_size, depth, num_heads).
DIT_SIZES: Mapping[str, Tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}

_LN_EPS = 1e-6
_xavier = nn.initializers.xavier_uniform()
_small = nn.initializers.normal(stddev=0.02)
_zeros = nn.initializers.zeros


def dit_dims(dit_size: str, hidden_size: int = 0, depth: int = 0,
             num_heads: int = 0) -> Tuple[int, int, int]:
  """(hidden_size, depth, num_heads): the preset `dit_size`'s, each overridden where > 0.

  Raises:
    ValueError: unknown size, a non-positive override or heads that do not divide the width.
  """
  key = str(dit_size).upper()
  if key not in DIT_SIZES:
    raise ValueError(f"Unknown DiT size {dit_size!r}; choose from {list(DIT_SIZES)}.")
  for name, value in (("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads)):
    if value < 0:
      raise ValueError(f"DiT {name} must be >= 0 (0: the {key} preset's), got {value}.")
  preset = DIT_SIZES[key]
  dims = tuple(v if v > 0 else p for v, p in zip((hidden_size, depth, num_heads), preset))
  width, _, heads = dims
  if width % heads or width % 4:
    raise ValueError(f"DiT hidden_size {width} must be divisible by num_heads {heads} and by 4 "
                     "(the 2-D position embedding).")
  return dims  # type: ignore[return-value]


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """[sin(pos w_k), cos(pos w_k)], w_k = 10000^(-k / (dim / 2)): [len(pos), dim] float64."""
  omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = pos.reshape(-1).astype(np.float64)[:, None] * omega[None, :]
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def pos_embed_2d(dim: int, rows: int, cols: int) -> np.ndarray:
  """The fixed position embedding of a rows x cols patch grid: [rows cols, dim] float32, tokens
  in row-major order, the first dim / 2 features the column's, the rest the row's."""
  r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
  emb = np.concatenate([_sincos_1d(dim // 2, c), _sincos_1d(dim // 2, r)], axis=1)
  return emb.astype(np.float32)


def timestep_features(t: Array, dim: int = 256, max_period: float = 10000.0) -> Array:
  """[cos(t f_k), sin(t f_k)], f_k = max_period^(-k / (dim / 2)): [B] -> [B, dim] float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def _patch_init(key: Array, shape: Tuple[int, ...], dtype: Any = jnp.float32) -> Array:
  """Xavier-uniform of the kernel seen as a [p p C, D] matrix (the authors' patch embedding;
  a convolution's own fan would count p p D outputs)."""
  return _xavier(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)


def _layer_norm(name: str) -> nn.LayerNorm:
  # Statistics in float32 whatever the compute dtype (Flax promotes them).
  return nn.LayerNorm(epsilon=_LN_EPS, use_bias=False, use_scale=False, use_fast_variance=False,
                      name=name)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
  """x [B, T, D] * (1 + scale [B, D]) + shift [B, D]."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
  """One adaLN-Zero transformer block: x [B, T, D], c [B, D] -> [B, T, D]."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, c: Array) -> Array:
    b, t, d = x.shape
    def dense(features: int, name: str, init: Callable = _xavier) -> nn.Dense:
      return nn.Dense(features, dtype=self.dtype, kernel_init=init, bias_init=_zeros, name=name)

    mod = dense(6 * d, "adaLN_modulation", _zeros)(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)

    h = _modulate(_layer_norm("norm1")(x).astype(self.dtype), shift_msa, scale_msa)
    qkv = dense(3 * d, "qkv")(h).reshape(b, t, 3, self.num_heads, d // self.num_heads)
    a = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # [B, T, N, H]
    x = x + gate_msa[:, None, :] * dense(d, "proj")(a.reshape(b, t, d))

    h = _modulate(_layer_norm("norm2")(x).astype(self.dtype), shift_mlp, scale_mlp)
    h = nn.gelu(dense(int(d * self.mlp_ratio), "fc1")(h), approximate=True)
    return x + gate_mlp[:, None, :] * dense(d, "fc2")(h)


class DiT(nn.Module):
  """DiT (module docstring). Defaults: DiT-XL/2 with learned variance, unconditional.

  Attributes:
    dit_size: 'S' | 'B' | 'L' | 'XL' (`DIT_SIZES`).
    patch_size: p, the side of a patch (2, 4, 8 in the paper; it must divide H and W).
    hidden_size: the width D; 0: the preset's.
    depth: number of blocks; 0: the preset's.
    num_heads: attention heads; 0: the preset's.
    mlp_ratio: the MLP's width over D.
    num_classes: classes (the table has one more row, the null label); 0: unconditional.
    learn_sigma: 2 C output channels, the second C the learned variance (`full_output`).
    frequency_embedding_size: sinusoidal features of the noise label.
    remat: gradient checkpointing of every block (activations recomputed in the backward
      pass; the parameters' names do not change).
    second_time: a second noise label (`labels2`, MeanFlow's t - r) with an embedder of its
      own (`r_embedder`), added to the first's, for the few-step generators.
    dtype: compute dtype (parameters float32, output float32).
  """
  dit_size: str = "XL"
  patch_size: int = 2
  hidden_size: int = 0
  depth: int = 0
  num_heads: int = 0
  mlp_ratio: float = 4.0
  num_classes: int = 0
  learn_sigma: bool = True
  frequency_embedding_size: int = 256
  remat: bool = False
  second_time: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, labels: Array, y: Optional[Array] = None, train: bool = False,
               full_output: bool = False, labels2: Optional[Array] = None) -> Array:
    """x [B, H, W, C], labels [B] (noise labels), y [B] int class labels or None (the null
    label), labels2 [B] the second time (second_time: MeanFlow's t - r; None: 0) ->
    [B, H, W, C] float32 ([B, H, W, 2 C] with learn_sigma and full_output)."""
    del train  # no dropout: the authors' DiT has none (label dropout is the loss's)
    if labels2 is not None and not self.second_time:
      raise ValueError("labels2 needs a network built with second_time=True.")
    width, depth, heads = dit_dims(self.dit_size, self.hidden_size, self.depth, self.num_heads)
    p = int(self.patch_size)
    if x.ndim != 4:
      raise ValueError(f"DiT takes images [B, H, W, C], got shape {x.shape}.")
    batch, height, wid, channels = x.shape
    if p < 1 or height % p or wid % p:
      raise ValueError(f"DiT patch_size {p} must divide the image size {height}x{wid}.")
    if labels.shape != (batch,):
      raise ValueError(f"noise labels must have shape [{batch}], got {labels.shape}.")
    if full_output and not self.learn_sigma:
      raise ValueError("full_output returns the learned variance channels; the network has "
                       "learn_sigma=False.")
    rows, cols = height // p, wid // p
    dt = self.dtype

    h = nn.Conv(width, (p, p), strides=(p, p), padding="VALID", dtype=dt, kernel_init=_patch_init,
                bias_init=_zeros, name="x_embedder")(x.astype(dt))  # [B, rows, cols, D]
    pos = jnp.asarray(pos_embed_2d(width, rows, cols))  # [T, D], fixed
    h = h.reshape(batch, rows * cols, width) + pos[None].astype(dt)

    def embed_time(values: Array, name: str) -> Array:
      e = timestep_features(values, self.frequency_embedding_size)
      e = nn.Dense(width, dtype=dt, kernel_init=_small, bias_init=_zeros, name=f"{name}_0")(e)
      return nn.Dense(width, dtype=dt, kernel_init=_small, bias_init=_zeros,
                      name=f"{name}_2")(nn.silu(e))

    c = embed_time(labels, "t_embedder")
    if self.second_time:  # a second embedder of its own, added (None: r = t, the velocity)
      c = c + embed_time(jnp.zeros_like(labels) if labels2 is None else labels2, "r_embedder")
    layers.check_class_labels(y, self.num_classes)
    if self.num_classes > 0:
      if y is None:
        y = jnp.full((batch,), self.num_classes, jnp.int32)
      if y.shape != (batch,):
        raise ValueError(f"class labels must be integers of shape [{batch}], got {y.shape}.")
      table = nn.Embed(self.num_classes + 1, width, embedding_init=_small, name="y_embedder")
      c = c + table(y.astype(jnp.int32)).astype(dt)

    block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
    for i in range(depth):
      h = block_cls(heads, self.mlp_ratio, dt, name=f"blocks_{i}")(h, c)

    c_out = 2 * channels if self.learn_sigma else channels
    shift, scale = jnp.split(
        nn.Dense(2 * width, dtype=dt, kernel_init=_zeros, bias_init=_zeros,
                 name="final_adaLN_modulation")(nn.silu(c)), 2, axis=-1)
    h = _modulate(_layer_norm("final_norm")(h).astype(dt), shift, scale)
    h = nn.Dense(p * p * c_out, dtype=dt, kernel_init=_zeros, bias_init=_zeros,
                 name="final_linear")(h)  # [B, T, p p C_out]
    out = h.reshape(batch, rows, cols, p, p, c_out).transpose(0, 1, 3, 2, 4, 5)
    out = out.reshape(batch, height, wid, c_out).astype(jnp.float32)
    return out if full_output or not self.learn_sigma else out[..., :channels]
