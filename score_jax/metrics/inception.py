"""The FID InceptionV3 (TensorFlow graph of 2015-12-05) in Flax, with its weights.

Network: InceptionV3 as ported by pytorch-fid ("FID Inception"), which differs
from torchvision's InceptionV3 in the pooling of three block types, to match
the 2015 TensorFlow graph used by every FID/IS implementation:
  * Mixed_5b-d (A), Mixed_6b-e (C), Mixed_7b (E_1): the pool branch is a 3x3
    average pool, stride 1, padding 1, that does *not* count the padding
    (TF 'SAME' average pooling);
  * Mixed_7c (E_2): the pool branch is a 3x3 *max* pool, stride 1, padding 1.
Every conv is bias-free and followed by BatchNorm (eps 0.001, inference only:
running statistics) and ReLU. Outputs: `pool` = the 2048-d global average
pool ("pool_3", FID features) and `logits` = the 1008-way classifier
(Inception Score uses softmax over all 1008).

Input: NHWC images, either uint8 in [0, 255] (mapped by x / 127.5 - 1, as the
reference's `(x - 127.5) / 127.5`) or float already in [-1, 1]. Any size is
resized to 299 x 299 by bilinear interpolation, method chosen by `resize`:
  * "tf1" (default): TensorFlow 1 `tf.image.resize_bilinear(align_corners=False)`,
    source coordinate = dst * in/out (no half-pixel offset). This is the
    resize inside the 2015-12-05 graph and `tfgan.eval.preprocess_image`,
    i.e. the TF reference implementations (TTUR FID, TF-GAN used by score_sde).
  * "pytorch": `F.interpolate(mode="bilinear", align_corners=False)` of
    pytorch-fid: source = (dst + 0.5) * in/out - 0.5, clamped at 0. Use it to
    compare with statistics made by pytorch-fid.
Neither antialiases; they differ by a fraction of a pixel shift. FIDs from
different resize methods are not comparable at the 0.1 level: state which.

Weight file (.npz, float32): one array per Flax parameter, named by its path
joined with "/": `<layer>/conv/kernel` [kh, kw, in, out],
`<layer>/bn/{scale,bias,mean,var}` [out], `fc/kernel` [2048, 1008],
`fc/bias` [1008], with <layer> the published names (`Conv2d_1a_3x3`,
`Mixed_5b/branch1x1`, ...): 472 arrays, 23,885,392 numbers. Make it with
`python -m score_jax.convert.inception pt_inception-2015-12-05-6726825d.pth [DST]`
from pytorch-fid's published weights (PUBLISHED_URL; no torch needed); without
DST it goes to `default_weights_path()`, where eval looks.
"""

from __future__ import annotations

import functools
import os
import zipfile
from typing import Any, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_jax import files

__all__ = [
    "FIDInceptionV3",
    "inception_features",
    "load_inception_params",
    "save_inception_params",
    "convert_torch_state_dict",
    "random_inception_params",
    "resize_bilinear",
    "param_shapes",
    "INCEPTION_SIZE",
    "POOL_DIM",
    "NUM_LOGITS",
    "PUBLISHED_WEIGHTS",
    "PUBLISHED_URL",
    "default_weights_path",
]

INCEPTION_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
BN_EPS = 1e-3
PUBLISHED_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
PUBLISHED_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 + PUBLISHED_WEIGHTS)
RESIZE_METHODS = ("tf1", "pytorch")

Params = Dict[str, Any]


# ----------------------------------------------------------------------------
# Network


class FrozenBatchNorm(nn.Module):
  """Inference BatchNorm: (x - mean) / sqrt(var + eps) * scale + bias."""
  eps: float = BN_EPS

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    mul = scale * jax.lax.rsqrt(var + self.eps)  # [C]
    add = bias - mean * mul  # [C]
    return x * mul[None, None, None, :] + add[None, None, None, :]


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm -> ReLU, as torchvision's BasicConv2d."""
  features: int
  kernel: Tuple[int, int] = (1, 1)
  strides: Tuple[int, int] = (1, 1)
  padding: Tuple[int, int] = (0, 0)
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, strides=self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=self.precision, name="conv")(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_same(x):
  # 3x3 / stride 1 / pad 1, averaging only the real pixels (TF 'SAME').
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_valid(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(64, name="branch1x1")(x)
    b5 = conv(48, name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = conv(64, name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = conv(192, name="branch1x1")(x)
    b7 = conv(c7, name="branch7x7_1")(x)
    b7 = conv(c7, **row, name="branch7x7_2")(b7)
    b7 = conv(192, **col, name="branch7x7_3")(b7)
    bd = conv(c7, name="branch7x7dbl_1")(x)
    bd = conv(c7, **col, name="branch7x7dbl_2")(bd)
    bd = conv(c7, **row, name="branch7x7dbl_3")(bd)
    bd = conv(c7, **col, name="branch7x7dbl_4")(bd)
    bd = conv(192, **row, name="branch7x7dbl_5")(bd)
    bp = conv(192, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(192, name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = conv(192, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(nn.Module):
  """E block; `max_pool` selects the FID E_2 variant (Mixed_7c)."""
  max_pool: bool = False
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = conv(320, name="branch1x1")(x)
    b3 = conv(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, **row, name="branch3x3_2a")(b3),
                          conv(384, **col, name="branch3x3_2b")(b3)], axis=-1)
    bd = conv(448, name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, **row, name="branch3x3dbl_3a")(bd),
                          conv(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_same(x)
    bp = conv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """FID InceptionV3 on 299 x 299 inputs in [-1, 1] (resize happens outside).

  Returns {"pool": [B, 2048], "logits": [B, 1008]} in float32.
  """
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):  # x: [B, 299, 299, 3]
    p = dict(precision=self.precision)
    x = BasicConv2d(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3", **p)(x)
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3", **p)(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3", **p)(x)
    x = _max_pool_valid(x)
    x = BasicConv2d(80, name="Conv2d_3b_1x1", **p)(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3", **p)(x)
    x = _max_pool_valid(x)
    x = InceptionA(32, name="Mixed_5b", **p)(x)
    x = InceptionA(64, name="Mixed_5c", **p)(x)
    x = InceptionA(64, name="Mixed_5d", **p)(x)
    x = InceptionB(name="Mixed_6a", **p)(x)
    x = InceptionC(128, name="Mixed_6b", **p)(x)
    x = InceptionC(160, name="Mixed_6c", **p)(x)
    x = InceptionC(160, name="Mixed_6d", **p)(x)
    x = InceptionC(192, name="Mixed_6e", **p)(x)
    x = InceptionD(name="Mixed_7a", **p)(x)
    x = InceptionE(max_pool=False, name="Mixed_7b", **p)(x)
    x = InceptionE(max_pool=True, name="Mixed_7c", **p)(x)  # [B, 8, 8, 2048]
    pool = jnp.mean(x, axis=(1, 2))  # [B, 2048]
    logits = nn.Dense(NUM_LOGITS, precision=self.precision, name="fc")(pool)
    return {"pool": pool, "logits": logits}


# ----------------------------------------------------------------------------
# Resize and features


def _bilinear_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
  """[out, in] interpolation weights of one axis (rows sum to 1)."""
  if method not in RESIZE_METHODS:
    raise ValueError(f"resize method {method!r} not in {RESIZE_METHODS}")
  scale = in_size / out_size
  dst = np.arange(out_size, dtype=np.float64)
  if method == "tf1":
    src = dst * scale
  else:
    src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = src - i0
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), 1.0 - frac)
  np.add.at(m, (rows, i1), frac)
  return m.astype(np.float32)


def resize_bilinear(images: jax.Array, size: int = INCEPTION_SIZE,
                    method: str = "tf1") -> jax.Array:
  """Bilinear resize of [B, H, W, C] float images to [B, size, size, C].

  Exact separable interpolation matrices (no antialiasing), see the module
  docstring for the two `method`s. Identity when already `size` x `size`.
  """
  _, h, w, _ = images.shape
  if (h, w) == (size, size):
    return images
  mh = jnp.asarray(_bilinear_matrix(h, size, method))  # [S, H]
  mw = jnp.asarray(_bilinear_matrix(w, size, method))  # [S, W]
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", mh, images, precision=hi)
  return jnp.einsum("pw,bowc->bopc", mw, x, precision=hi)


_PRECISIONS = {
    "highest": jax.lax.Precision.HIGHEST,
    "high": jax.lax.Precision.HIGH,
    "default": jax.lax.Precision.DEFAULT,
}


@functools.partial(jax.jit, static_argnames=("resize", "precision"))
def inception_features(params: Params, images: jax.Array, *, resize: str = "tf1",
                       precision: str = "highest") -> Dict[str, jax.Array]:
  """Pool features and logits of a batch of images.

  Pure and jitted: pass a batch sharded along its first axis (e.g.
  `NamedSharding(mesh, P("data"))`) and the computation and outputs are
  sharded the same way; params may be replicated or uncommitted.

  Args:
    params: the Flax params tree (`{"params": ...}` also accepted).
    images: [B, H, W, 3], uint8 in [0, 255] or float in [-1, 1].
    resize: "tf1" (reference) or "pytorch" (pytorch-fid), see module doc.
    precision: conv/matmul precision: "highest" (default; f32 on every
      backend, needed for faithful features on TPU / TF32 GPUs), "high",
      "default" (fastest).
  Returns:
    {"pool": [B, 2048] float32, "logits": [B, 1008] float32}.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 127.5 - 1.0
  else:
    x = images.astype(jnp.float32)
  x = resize_bilinear(x, INCEPTION_SIZE, resize)
  if "params" in params and len(params) == 1:
    params = params["params"]
  model = FIDInceptionV3(precision=_PRECISIONS[precision])
  return model.apply({"params": params}, x)


# ----------------------------------------------------------------------------
# Parameters: shapes, file format, random init


@functools.lru_cache(maxsize=1)
def param_shapes() -> Dict[str, Tuple[int, ...]]:
  """Flat `{"a/b/c": shape}` of every parameter, from the module itself."""
  abstract = jax.eval_shape(
      FIDInceptionV3().init, jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32))
  return {k: tuple(v.shape) for k, v in _flatten(abstract["params"]).items()}


_flatten, _unflatten = files.flatten, files.unflatten


def _check_flat(flat: Mapping[str, Tuple[int, ...]], source: str) -> None:
  """Raises ValueError naming every missing, unexpected or mis-shaped array."""
  want = param_shapes()
  missing = sorted(set(want) - set(flat))
  extra = sorted(set(flat) - set(want))
  bad = sorted(f"{k}: {tuple(flat[k])} (expected {want[k]})"
               for k in set(want) & set(flat) if tuple(flat[k]) != want[k])
  if missing or extra or bad:
    lines = [f"{source} does not hold the FID Inception weights:"]
    if missing:
      lines.append(f"  missing ({len(missing)}): " + ", ".join(missing[:20])
                   + (" ..." if len(missing) > 20 else ""))
    if extra:
      lines.append(f"  unexpected ({len(extra)}): " + ", ".join(extra[:20])
                   + (" ..." if len(extra) > 20 else ""))
    if bad:
      lines.append(f"  wrong shape ({len(bad)}): " + "; ".join(bad[:20]))
    raise ValueError("\n".join(lines))


def default_weights_path() -> str:
  """Where `python -m score_jax.convert.inception SRC` writes the converted weights and where
  eval looks when eval.inception_path is empty: $XDG_CACHE_HOME (or
  ~/.cache)/score_jax/inception/inception_fid.npz."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "score_jax", "inception", "inception_fid.npz")


def _missing_file_message(path: str) -> str:
  return (
      f"FID Inception weights not found at {path!r}. Nothing is downloaded at "
      f"run time. Download pytorch-fid's published file ({PUBLISHED_URL}) and convert "
      f"it once (torch is not needed): python -m score_jax.convert.inception "
      f"{PUBLISHED_WEIGHTS} {path}")


def _looks_like_torch(path: str) -> bool:
  """A torch zip checkpoint (has <root>/data.pkl) or a legacy one (pickle)."""
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as zf:
      return any(n == "data.pkl" or n.endswith("/data.pkl") for n in zf.namelist())
  with open(path, "rb") as f:
    return f.read(2) == b"\x80\x02"  # pickle protocol 2: torch's legacy format


def save_inception_params(path: str | os.PathLike, params: Params) -> None:
  """Writes params as the documented .npz (float32, "/"-joined names).

  The file is written to `path + ".tmp"` then renamed, so readers never see a
  half-written file.
  """
  path = os.fspath(path)
  if "params" in params and len(params) == 1:
    params = params["params"]
  flat = {k: np.asarray(v, np.float32) for k, v in _flatten(params).items()}
  _check_flat({k: v.shape for k, v in flat.items()}, "params to save")
  files.save_npz(path, **flat)


def load_inception_params(path: str | os.PathLike) -> Params:
  """Loads the .npz written by `save_inception_params` / the converter.

  Returns:
    The Flax params tree (without the "params" collection wrapper), float32
    numpy arrays.
  Raises:
    FileNotFoundError: the file is missing (the message says how to make it).
    ValueError: the file is unreadable or its names/shapes are not the FID
      Inception's (each missing, unexpected, mis-shaped name is listed).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(_missing_file_message(path))
  if _looks_like_torch(path):
    raise ValueError(
        f"{path} is a PyTorch checkpoint, not the .npz weight file; convert it "
        f"first: python -m score_jax.convert.inception {path} inception_fid.npz")
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: np.asarray(data[k]) for k in data.files}
  except Exception as e:  # zipfile.BadZipFile, ValueError, OSError, ...
    raise ValueError(f"{path} is not a readable .npz weight file ({e}); "
                     f"{_missing_file_message(path)}") from e
  _check_flat({k: v.shape for k, v in flat.items()}, path)
  nonfinite = sorted(k for k, v in flat.items() if not np.all(np.isfinite(v)))
  if nonfinite:
    raise ValueError(f"{path}: non-finite values in {', '.join(nonfinite[:10])}")
  return _unflatten({k: v.astype(np.float32) for k, v in flat.items()})


def random_inception_params(seed: int = 0) -> Params:
  """Random FID-Inception params with O(1) activations (for tests/benchmarks).

  Conv kernels are He-normal, BatchNorm is the identity, fc is LeCun-normal.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for name, shape in param_shapes().items():
    leaf = name.rsplit("/", 1)[1]
    if leaf == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      gain = 2.0 if name.endswith("conv/kernel") else 1.0
      v = rng.standard_normal(shape) * np.sqrt(gain / fan_in)
    elif leaf in ("scale", "var"):
      v = np.ones(shape)
    else:
      v = np.zeros(shape)
    flat[name] = v.astype(np.float32)
  return _unflatten(flat)


# ----------------------------------------------------------------------------
# Converter from pytorch-fid's published state dict

_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean",
             "running_var": "var"}


def convert_torch_state_dict(state: Mapping[str, np.ndarray]) -> Params:
  """Maps pytorch-fid's FID Inception state dict onto this module's params.

  `<layer>.conv.weight` [O, I, kh, kw] -> `<layer>/conv/kernel` [kh, kw, I, O];
  `<layer>.bn.{weight,bias,running_mean,running_var}` ->
  `<layer>/bn/{scale,bias,mean,var}`; `fc.weight` [1008, 2048] -> `fc/kernel`
  [2048, 1008]; `fc.bias` -> `fc/bias`. `*.num_batches_tracked` counters carry
  no weights and are skipped; any other name is an error.

  Raises:
    ValueError: listing every unmapped source name, and every missing or
      mis-shaped destination parameter.
  """
  flat: Dict[str, np.ndarray] = {}
  unmapped = []
  for name, value in state.items():
    value = np.asarray(value)
    parts = name.split(".")
    if parts[-1] == "num_batches_tracked":
      continue
    if parts[:1] == ["fc"] and len(parts) == 2 and parts[1] in ("weight", "bias"):
      if parts[1] == "weight":
        flat["fc/kernel"] = value.T if value.ndim == 2 else value
      else:
        flat["fc/bias"] = value
    elif len(parts) >= 3 and parts[-2] == "conv" and parts[-1] == "weight":
      dst = "/".join(parts[:-2]) + "/conv/kernel"
      flat[dst] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    elif len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in _BN_NAMES:
      flat["/".join(parts[:-2]) + "/bn/" + _BN_NAMES[parts[-1]]] = value
    else:
      unmapped.append(name)
  if unmapped:
    raise ValueError(
        f"source weights hold {len(unmapped)} tensors that are not part of the "
        f"FID Inception: {', '.join(unmapped[:20])}" + (" ..." if len(unmapped) > 20 else ""))
  _check_flat({k: v.shape for k, v in flat.items()}, "converted source weights")
  return _unflatten({k: np.ascontiguousarray(v, dtype=np.float32)
                     for k, v in flat.items()})
