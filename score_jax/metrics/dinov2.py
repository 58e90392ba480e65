"""The DINOv2 ViT (facebookresearch/dinov2) in Flax: the feature network of FD-DINOv2.

FD-DINOv2 (Stein et al. 2023; EDM2, Karras et al. 2024) is the Frechet distance of
`dinov2_features`, which follows EDM2's `calculate_metrics.DINOv2Detector` with its default
resize_mode='torch':
  * uint8 NHWC images -> float32, resized to 224 x 224 by PyTorch's
    `F.interpolate(mode='bicubic', antialias=True)` (separable, Keys cubic with a = -0.5
    widened by the downscale factor, taps cut at the border and renormalized; exact weights
    in `_antialiased_bicubic_matrix`), then x / 255, minus the ImageNet mean, over its std;
  * the ViT (`DinoViT`): 14 x 14 patches, a class token, the learned position table of the
    518 px pretraining (37 x 37) interpolated to the 16 x 16 grid as dinov2's
    `interpolate_pos_encoding` does (bicubic, a = -0.75, border taps clamped, no antialias,
    scale factor (16 + 0.1) / 37: the 0.1 offset is part of the published model's behaviour),
    pre-norm blocks (LayerNorm eps 1e-6, softmax attention, exact-GELU MLP, LayerScale), a
    final LayerNorm; the feature is the class token after that norm (1024-d for ViT-L/14).

Weight file (.npz, float32): one array per Flax parameter, "/"-joined paths named after the
published state dict (`patch_embed/proj/kernel` [14, 14, 3, D], `cls_token` [1, 1, D],
`pos_embed` [1, 1 + 37 * 37, D], `blocks_<i>/{norm1,norm2}/{scale,bias}`,
`blocks_<i>/attn/{qkv,proj}/{kernel,bias}`, `blocks_<i>/{ls1,ls2}/gamma`,
`blocks_<i>/mlp/{fc1,fc2}/{kernel,bias}`, `norm/{scale,bias}`), plus `num_heads` (the one
number the shapes do not give). The architecture is read from the file (`Arch`). Make it with
`python -m score_jax.convert.dinov2 dinov2_vitl14_pretrain.pth [DST]` (no torch needed);
without DST it goes to `default_weights_path()`, where eval looks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import zipfile
from typing import Any, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_jax import files

__all__ = [
    "Arch",
    "DinoViT",
    "VITL14",
    "check_shapes",
    "INPUT_SIZE",
    "PUBLISHED_WEIGHTS",
    "PUBLISHED_URL",
    "dinov2_features",
    "preprocess",
    "interpolate_pos_embed",
    "param_shapes",
    "arch_from_shapes",
    "save_dinov2_params",
    "load_dinov2_params",
    "default_weights_path",
]

INPUT_SIZE = 224  # EDM2's resize target
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POS_OFFSET = 0.1  # dinov2's interpolate_offset (hub default)
LN_EPS = 1e-6
PUBLISHED_WEIGHTS = "dinov2_vitl14_pretrain.pth"
PUBLISHED_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/" + PUBLISHED_WEIGHTS

Params = Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Arch:
  """A DINOv2 ViT's sizes: width, blocks, heads, MLP width, patch, pretraining grid."""
  embed_dim: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int = 14
  pos_grid: int = 37  # side of the position table (518 px / 14)
  layerscale: bool = True


VITL14 = Arch(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096)  # dinov2_vitl14


# ----------------------------------------------------------------------------
# Interpolation matrices (numpy, float64, built at trace time)


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a (PyTorch: -0.75 plain, -0.5 antialiased)."""
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _antialiased_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of `F.interpolate(size=out, mode='bicubic', antialias=True)` on one axis
  (align_corners=False): output i is centred at scale (i + 0.5), scale = in / out; taps within
  2 max(scale, 1) of it, kernel stretched by max(scale, 1), cut at the border, rows normalized."""
  scale = in_size / out_size
  support = 2.0 * max(scale, 1.0)
  stretch = max(scale, 1.0)
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    w = _keys_cubic((np.arange(lo, hi) - center + 0.5) / stretch, -0.5)
    m[i, lo:hi] = w / w.sum()
  return m


def _bicubic_matrix(in_size: int, out_size: int, scale_factor: float) -> np.ndarray:
  """[out, in] weights of `F.interpolate(scale_factor=s, mode='bicubic')` on one axis
  (align_corners=False, no antialias): source (i + 0.5) / s - 0.5, four taps, a = -0.75,
  indices clamped to the border."""
  src = (np.arange(out_size) + 0.5) / scale_factor - 0.5
  i0 = np.floor(src)
  t = src - i0
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  for k in range(4):
    idx = np.clip(i0.astype(np.int64) - 1 + k, 0, in_size - 1)
    np.add.at(m, (rows, idx), _keys_cubic(t - (k - 1), -0.75))
  return m


def interpolate_pos_embed(pos_embed: jax.Array, grid: Tuple[int, int]) -> jax.Array:
  """dinov2's `interpolate_pos_encoding`: [1, 1 + M * M, D] -> [1, 1 + h * w, D].

  The class token's entry is kept; the M x M table is resized by bicubic interpolation with
  scale factors ((h + 0.1) / M, (w + 0.1) / M) (the offset moves every sample, not only the
  size). Returned unchanged when the grid is already M x M.
  """
  n = pos_embed.shape[1] - 1
  m = math.isqrt(n)
  if m * m != n:
    raise ValueError(f"pos_embed holds {n} patch entries, not a square grid")
  h, w = grid
  if (h, w) == (m, m):
    return pos_embed
  mats = []
  for size in (h, w):
    scale = (size + POS_OFFSET) / m
    if math.floor(m * scale) != size:
      raise ValueError(f"grid {grid} is not reached from {m} with the offset {POS_OFFSET}")
    mats.append(jnp.asarray(_bicubic_matrix(m, size, scale), jnp.float32))
  table = pos_embed[0, 1:].reshape(m, m, -1).astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  table = jnp.einsum("ha,abd->hbd", mats[0], table, precision=hi)
  table = jnp.einsum("wb,hbd->hwd", mats[1], table, precision=hi)
  return jnp.concatenate([pos_embed[:, :1], table.reshape(1, h * w, -1)], axis=1)


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """EDM2's DINOv2 input: uint8 [B, H, W, 3] -> float32 [B, size, size, 3], resized (bicubic,
  antialiased, on 0..255 values, not rounded), / 255, ImageNet mean and std."""
  x = images.astype(jnp.float32)
  _, h, w, _ = x.shape
  hi = jax.lax.Precision.HIGHEST
  if h != size:
    x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(_antialiased_bicubic_matrix(h, size),
                                                jnp.float32), x, precision=hi)
  if w != size:
    x = jnp.einsum("pw,bowc->bopc", jnp.asarray(_antialiased_bicubic_matrix(w, size),
                                                jnp.float32), x, precision=hi)
  x = x / 255.0
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32).reshape(1, 1, 1, 3)
  return (x - mean) / jnp.asarray(IMAGENET_STD, jnp.float32).reshape(1, 1, 1, 3)


# ----------------------------------------------------------------------------
# Network


def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name=name)


class Attention(nn.Module):
  """Multi-head self-attention: one qkv projection split [3, heads, head_dim], softmax of
  q k^T / sqrt(head_dim), output projection."""
  num_heads: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):  # x: [B, N, D]
    b, n, d = x.shape
    dense = functools.partial(nn.Dense, precision=self.precision)
    qkv = dense(3 * d, name="qkv")(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, hd]
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, precision=self.precision)
    weights = jax.nn.softmax(logits * (d // self.num_heads) ** -0.5, axis=-1)
    out = jnp.einsum("bhqk,bkhc->bqhc", weights, v, precision=self.precision)
    return dense(d, name="proj")(out.reshape(b, n, d))


class PatchEmbed(nn.Module):
  """A p x p convolution of stride p: [B, H, W, 3] -> [B, H/p * W/p, D], rows then columns."""
  embed_dim: int
  patch_size: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID",
                precision=self.precision, name="proj")(x)
    return x.reshape(x.shape[0], -1, self.embed_dim)


class Mlp(nn.Module):
  """fc1, exact (erf) GELU, fc2."""
  hidden: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(self.hidden, precision=self.precision, name="fc1")(x), approximate=False)
    return nn.Dense(x.shape[-1], precision=self.precision, name="fc2")(h)


class LayerScale(nn.Module):
  """x * gamma, one learned factor per channel."""

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.ones, (x.shape[-1],))
    return x * gamma.reshape((1,) * (x.ndim - 1) + (-1,))


class Block(nn.Module):
  """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); the MLP: fc1, exact GELU, fc2."""
  num_heads: int
  mlp_dim: int
  layerscale: bool = True
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    def scale(name, h):
      return LayerScale(name=name)(h) if self.layerscale else h

    h = Attention(self.num_heads, self.precision, name="attn")(_layer_norm("norm1")(x))
    x = x + scale("ls1", h)
    h = Mlp(self.mlp_dim, self.precision, name="mlp")(_layer_norm("norm2")(x))
    return x + scale("ls2", h)


class DinoViT(nn.Module):
  """DINOv2 ViT on preprocessed images [B, H, W, 3] (H, W multiples of the patch size) ->
  the class token after the final norm [B, D]."""
  arch: Arch
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    a = self.arch
    p = a.patch_size
    b, h, w, _ = x.shape
    if h % p or w % p:
      raise ValueError(f"input {h} x {w} is not a multiple of the patch size {p}")
    x = PatchEmbed(a.embed_dim, p, self.precision, name="patch_embed")(x)  # [B, N, D]
    cls = self.param("cls_token", nn.initializers.zeros, (1, 1, a.embed_dim))
    pos = self.param("pos_embed", nn.initializers.zeros,
                     (1, 1 + a.pos_grid * a.pos_grid, a.embed_dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, a.embed_dim)), x], axis=1)
    x = x + interpolate_pos_embed(pos, (h // p, w // p))
    for i in range(a.depth):
      x = Block(a.num_heads, a.mlp_dim, a.layerscale, self.precision, name=f"blocks_{i}")(x)
    return _layer_norm("norm")(x)[:, 0]


_PRECISIONS = {
    "highest": jax.lax.Precision.HIGHEST,
    "high": jax.lax.Precision.HIGH,
    "default": jax.lax.Precision.DEFAULT,
}


@functools.partial(jax.jit, static_argnames=("arch", "precision"))
def dinov2_features(params: Params, images: jax.Array, *, arch: Arch = VITL14,
                    precision: str = "highest") -> jax.Array:
  """FD-DINOv2 features of uint8 images, as EDM2 computes them (module docstring).

  Pure and jitted: a batch sharded along its first axis gives sharded features.

  Args:
    params: the Flax params tree (`{"params": ...}` also accepted).
    images: [B, H, W, 3] uint8 (any size; resized to 224 x 224).
    arch: the network's sizes (`load_dinov2_params` returns them with the weights).
    precision: matmul / conv precision: "highest" (default: float32 on every backend),
      "high", "default" (fastest).
  Returns:
    [B, embed_dim] float32: the class token after the final norm.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
  if "params" in params and len(params) == 1:
    params = params["params"]
  model = DinoViT(arch, _PRECISIONS[precision])
  return model.apply({"params": params}, preprocess(images))


# ----------------------------------------------------------------------------
# Parameters: shapes, file format


def param_shapes(arch: Arch = VITL14) -> Dict[str, Tuple[int, ...]]:
  """Flat `{"a/b/c": shape}` of every parameter of `arch`, from the module itself."""
  return _param_shapes(arch)


@functools.lru_cache(maxsize=4)
def _param_shapes(arch: Arch) -> Dict[str, Tuple[int, ...]]:
  size = arch.pos_grid * arch.patch_size
  abstract = jax.eval_shape(DinoViT(arch).init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return {k: tuple(v.shape) for k, v in files.flatten(abstract["params"]).items()}


def arch_from_shapes(shapes: Mapping[str, Tuple[int, ...]], num_heads: int) -> Arch:
  """The `Arch` that flat parameter shapes (names as in this module) describe.

  Raises:
    ValueError: a shape the architecture needs is missing, or num_heads does not divide the
      width.
  """
  try:
    d = int(shapes["cls_token"][-1])
    n = int(shapes["pos_embed"][1]) - 1
    patch = int(shapes["patch_embed/proj/kernel"][0])
    mlp = int(shapes["blocks_0/mlp/fc1/kernel"][1])
  except (KeyError, IndexError) as e:
    raise ValueError(f"not DINOv2 ViT weights: no {e} among {sorted(shapes)[:8]} ...") from e
  depth = len({k.split("/")[0] for k in shapes if k.startswith("blocks_")})
  grid = math.isqrt(n)
  if num_heads < 1 or d % num_heads:
    raise ValueError(f"num_heads {num_heads} does not divide the width {d}")
  return Arch(embed_dim=d, depth=depth, num_heads=num_heads, mlp_dim=mlp, patch_size=patch,
              pos_grid=grid, layerscale="blocks_0/ls1/gamma" in shapes)


def check_shapes(shapes: Mapping[str, Tuple[int, ...]], arch: Arch, source: str) -> None:
  """Raises ValueError naming every missing, unexpected or mis-shaped array."""
  want = param_shapes(arch)
  missing = sorted(set(want) - set(shapes))
  extra = sorted(set(shapes) - set(want))
  bad = sorted(f"{k}: {tuple(shapes[k])} (expected {want[k]})"
               for k in set(want) & set(shapes) if tuple(shapes[k]) != want[k])
  if missing or extra or bad:
    lines = [f"{source} does not hold DINOv2 ViT weights of {arch}:"]
    for what, names in (("missing", missing), ("unexpected", extra), ("wrong shape", bad)):
      if names:
        lines.append(f"  {what} ({len(names)}): " + ", ".join(names[:20])
                     + (" ..." if len(names) > 20 else ""))
    raise ValueError("\n".join(lines))


def default_weights_path() -> str:
  """Where `python -m score_jax.convert.dinov2 SRC` writes the converted weights and where eval
  looks when eval.dinov2_path is empty: $XDG_CACHE_HOME (or ~/.cache)/score_jax/dinov2/
  dinov2_vitl14.npz."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "score_jax", "dinov2", "dinov2_vitl14.npz")


def _missing_file_message(path: str) -> str:
  return (f"DINOv2 weights not found at {path!r}. Nothing is downloaded at run time. Download "
          f"{PUBLISHED_URL} and convert it once (torch is not needed): python -m "
          f"score_jax.convert.dinov2 {PUBLISHED_WEIGHTS} {path}")


def save_dinov2_params(path: str | os.PathLike, params: Params, arch: Arch) -> None:
  """Writes params and arch.num_heads as the documented .npz (float32, "/"-joined names),
  through a temporary file and a rename."""
  if "params" in params and len(params) == 1:
    params = params["params"]
  flat = {k: np.asarray(v, np.float32) for k, v in files.flatten(params).items()}
  check_shapes({k: v.shape for k, v in flat.items()}, arch, "params to save")
  files.save_npz(os.fspath(path), num_heads=np.int64(arch.num_heads), **flat)


def load_dinov2_params(path: str | os.PathLike) -> Tuple[Params, Arch]:
  """(params tree of float32 numpy arrays, Arch) of a file `save_dinov2_params` wrote.

  Raises:
    FileNotFoundError: the file is missing (the message says how to make it).
    ValueError: the file is unreadable, a PyTorch file, or not DINOv2 ViT weights.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(_missing_file_message(path))
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as zf:
      if any(n == "data.pkl" or n.endswith("/data.pkl") for n in zf.namelist()):
        raise ValueError(f"{path} is a PyTorch file, not the .npz weight file; convert it "
                         f"first: python -m score_jax.convert.dinov2 {path}")
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: np.asarray(data[k]) for k in data.files}
  except Exception as e:  # zipfile.BadZipFile, ValueError, OSError, ...
    raise ValueError(f"{path} is not a readable .npz weight file ({e}); if it is the published "
                     f"{PUBLISHED_WEIGHTS}, convert it first: python -m score_jax.convert.dinov2 "
                     f"{path}") from e
  if "num_heads" not in flat:
    raise ValueError(f"{path} is not a converted DINOv2 weight file (no 'num_heads'); make one "
                     f"with python -m score_jax.convert.dinov2 {PUBLISHED_WEIGHTS}")
  num_heads = int(flat.pop("num_heads"))
  shapes = {k: v.shape for k, v in flat.items()}
  arch = arch_from_shapes(shapes, num_heads)
  check_shapes(shapes, arch, path)
  nonfinite = sorted(k for k, v in flat.items() if not np.all(np.isfinite(v)))
  if nonfinite:
    raise ValueError(f"{path}: non-finite values in {', '.join(nonfinite[:10])}")
  return files.unflatten({k: v.astype(np.float32) for k, v in flat.items()}), arch
