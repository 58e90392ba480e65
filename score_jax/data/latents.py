"""Latent datasets: images encoded once by a VAE, stored in shards, read like any dataset.

`python -m score_jax.data.encode --vae=VAE --config=CONFIG --out=DIR` runs the config's image
dataset through a diffusers AutoencoderKL folder (`score_jax.convert.vae.load_vae`) and writes

  DIR/meta.json               the VAE folder, its scaling factor and weights' SHA-256, the
                              pixel range into it (vae_centered), the latent shape, the
                              source data (dataset, path, image size, channels, classes) and
                              the splits' sizes and shard counts
  DIR/<split>-<k>.npy         shard k of a split: examples [k S, min((k + 1) S, N)) (S =
                              shard_size) as a structured array with fields 'mean' and
                              'std' (float32 [h, w, c], the posterior N(mean, std^2) of the
                              unscaled latent) and 'label' (int32)

Each shard is written atomically (`score_jax.files.atomic_write`), so a shard on disk is
complete: a stopped encode continues at the shards that are missing, and several processes
(--process_index/--process_count) encode disjoint shards (k mod count = index) into the same
DIR. The posterior's mean and std are stored rather than one sample, so that training draws a
fresh latent from the posterior every time it sees an example (the autoencoder was trained on
such draws; EDM2 keeps its latents the same way), at twice the storage of a single draw.
Shards are plain .npy files, memory-mapped when read: a dataset larger than memory reads only
the examples of each batch.

`data.dataset = 'latents'` with `data.path = DIR` trains on them (`open_latents`): the pipeline
(score_jax/data/pipeline.py) orders, shards and resumes exactly as for images, and
`latent_transform` draws each example's latent

  z = scale * (mean + std * eps) + shift,  eps ~ N(0, I)

per channel (`LatentNorm`: data.latent_scale and data.latent_shift, one number per latent
channel; empty: the VAE's scaling factor and no shift, latent diffusion's rule; EDM2's
per-channel whitening is `edm2_norm()`), with a generator keyed by (seed, stream, step, slot),
the same rule as the images' augmentation noise: the same latents for any process count and on
resume. Batches are NHWC float32 [L, h, w, c] (h = w = image_size / 2^(levels - 1));
data.image_size and data.num_channels name this latent shape (what the network sees), checked
against meta.json.

`LatentDecoder` maps model-space samples back to images, vae.decode((z - shift) / scale), in
[-1, 1]. Pixels enter and leave the VAE in [-1, 1] (data.vae_centered = True, diffusers' and
latent diffusion's convention) or in [0, 1] (False: EDM2's StabilityVAEEncoder); the encode
records which in meta.json. Sampling, snapshot grids and FID decode through data.vae, or where
that is empty the VAE meta.json names (`latent_decoder`); with both set they must be the same
weights. Gray source data encoded by an RGB VAE (the three planes equal) decode to the mean of
the three planes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from score_jax import files
from score_jax.data.pipeline import Transform, example_rngs
from score_jax.data.sources import DatasetNotFoundError
from score_jax.errors import ConfigError, UserError

__all__ = ["FORMAT", "META_FILE", "LatentsError", "LatentSource", "LatentDecoder", "LatentNorm",
           "ENCODE_COMMAND", "EDM2_RAW_MEAN", "EDM2_RAW_STD", "EDM2_FINAL_STD", "edm2_norm",
           "latent_norm", "shard_path", "shard_dtype", "read_meta", "check_meta",
           "check_vae_centered", "open_latents", "latent_transform", "latent_decoder",
           "source_settings", "weights_digest", "source_meta"]

FORMAT = "score_jax latents v1"
META_FILE = "meta.json"
ENCODE_COMMAND = ("python -m score_jax.data.encode --vae=VAE_FOLDER --config=IMAGE_CONFIG "
                  "--out=DIR")
# The keys of the data settings that name the source images (recorded in meta.json, so that
# the source can be read again: FID statistics of the real images).
SOURCE_KEYS = ("dataset", "data_dir", "path", "image_size", "num_channels", "category",
               "toy_name", "tfrecords_path")

# EDM2's normalization of Stable Diffusion VAE latents (NVlabs/edm2 training/encoders.py,
# StabilityVAEEncoder's defaults): the assumed per-channel mean and std of the raw latents of
# [0, 1] pixels, brought to mean 0 and std EDM2_FINAL_STD.
EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)
EDM2_FINAL_STD = 0.5


class LatentNorm(NamedTuple):
  """A per-channel affine map of raw latents to the model's: z = scale * raw + shift."""
  scale: np.ndarray  # float32 [c]
  shift: np.ndarray  # float32 [c]

  def forward(self, raw: np.ndarray) -> np.ndarray:
    """raw [..., c] -> z [..., c], float32."""
    return (np.asarray(raw, np.float32) * self.scale + self.shift).astype(np.float32)

  def inverse(self, z: np.ndarray) -> np.ndarray:
    """z [..., c] -> raw [..., c], float32 (EDM2's decode: (z - bias) / scale)."""
    return ((np.asarray(z, np.float32) - self.shift) / self.scale).astype(np.float32)


def edm2_norm() -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
  """(data.latent_scale, data.latent_shift) of EDM2's img512 networks: scale = final_std /
  raw_std and shift = -raw_mean * scale, computed in float32 as EDM2 computes them, so that
  the float32 values the pipeline uses are EDM2's bit for bit."""
  scale = np.float32(EDM2_FINAL_STD) / np.asarray(EDM2_RAW_STD, np.float32)
  shift = np.float32(0.0) - np.asarray(EDM2_RAW_MEAN, np.float32) * scale
  return tuple(float(v) for v in scale), tuple(float(v) for v in shift)


def latent_norm(scale: Sequence[float], shift: Sequence[float], scaling_factor: float,
                channels: int) -> LatentNorm:
  """The normalization of data.latent_scale and data.latent_shift (empty: scaling_factor, the
  VAE's, for every channel; no shift) for latents of `channels` channels.

  Raises:
    ConfigError: a length other than `channels`.
  """
  for key, values in (("latent_scale", scale), ("latent_shift", shift)):
    if len(values) not in (0, channels):
      raise ConfigError(f"data.{key} has {len(values)} values; the latents have {channels} "
                        f"channels: give one per channel, or () for the VAE's scaling factor.")
  s = np.asarray(scale, np.float32) if len(scale) else np.full(channels, scaling_factor,
                                                                 np.float32)
  b = np.asarray(shift, np.float32) if len(shift) else np.zeros(channels, np.float32)
  return LatentNorm(s, b)


class LatentsError(UserError, ValueError):
  """DIR is not a complete latent dataset, or holds one of other settings; the message says
  which and how to fix it."""


def shard_path(root: str, split: str, k: int) -> str:
  return os.path.join(root, f"{split}-{k:05d}.npy")


def shard_dtype(latent_shape: Sequence[int]) -> np.dtype:
  """One example of a shard: the posterior's mean and std and the label."""
  shape = tuple(int(d) for d in latent_shape)
  return np.dtype([("mean", np.float32, shape), ("std", np.float32, shape),
                   ("label", np.int32)])


def weights_digest(vae_folder: str) -> str:
  """SHA-256 of the VAE's weights file: which VAE made the latents, wherever it is kept."""
  from score_jax.convert.vae import WEIGHTS_FILE  # pylint: disable=g-import-not-at-top

  h = hashlib.sha256()
  with open(os.path.join(vae_folder, WEIGHTS_FILE), "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      h.update(chunk)
  return h.hexdigest()


def source_settings(data: Any) -> Dict[str, Any]:
  """The data settings' keys that name the source images (SOURCE_KEYS), as plain values; the
  paths made absolute, so that the images are found again from any working directory."""
  out = {k: getattr(data, k) if not isinstance(data, dict) else data[k] for k in SOURCE_KEYS}
  for k in ("data_dir", "path", "tfrecords_path"):
    if out[k]:
      out[k] = os.path.abspath(os.path.expanduser(out[k]))
  return out


def read_meta(root: str) -> Dict[str, Any]:
  """DIR/meta.json, checked to be a latent dataset's.

  Raises:
    ConfigError: root is empty.
    DatasetNotFoundError: no such folder or no meta.json (the message gives the encode
      command).
    LatentsError: a meta.json of something else.
  """
  if not root:
    raise ConfigError("data.dataset='latents' reads data.path, which is empty: pass "
                      f"--config.data.path=DIR, a folder written by {ENCODE_COMMAND}.")
  root = os.path.expanduser(root)
  path = os.path.join(root, META_FILE)
  if not os.path.isfile(path):
    what = "does not exist" if not os.path.exists(root) else f"has no {META_FILE}"
    raise DatasetNotFoundError(f"data.path {root} {what}: encode the images first with "
                               f"{ENCODE_COMMAND}.")
  try:
    meta = files.read_json(path)
  except ValueError as e:
    raise LatentsError(f"{path} is not readable JSON ({e}); encode again into an empty folder "
                       f"with {ENCODE_COMMAND}.") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise LatentsError(f"{path} is not the meta.json of a latent dataset ({FORMAT!r}); "
                       f"point data.path at a folder written by {ENCODE_COMMAND}.")
  return meta


def check_meta(meta: Dict[str, Any], image_size: int, num_channels: int, root: str) -> None:
  """data.image_size and data.num_channels must be the latents' shape (h, w, c)."""
  h, w, c = meta["latent_shape"]
  if (image_size, image_size, num_channels) != (h, w, c):
    raise ConfigError(f"The latents in {root} are {h}x{w}x{c}; set --config.data.image_size={h} "
                      f"--config.data.num_channels={c} (data.image_size and data.num_channels "
                      f"name the latent shape for data.dataset='latents'), got "
                      f"{image_size} and {num_channels}.")


class LatentSource:
  """A split of a latent dataset (see the module docstring), read from memory-mapped shards.

  read(indices) returns float32 [n, h, w, 2 c]: the posterior mean in the first c channels and
  its std in the last c (`latent_transform` turns them into latents), and int32 labels.
  """

  needs_io = False  # memory-mapped reads are cheap; no reader threads

  def __init__(self, root: str, split: str, meta: Dict[str, Any]):
    self.root, self.split, self.meta = root, split, meta
    splits = meta["splits"]
    if split not in splits:  # like data.dataset='images': one set serves both splits
      split = "train"
    info = splits[split]
    self.num_examples = int(info["num_examples"])
    self.shard_size = int(meta["shard_size"])
    self.num_shards = int(info["num_shards"])
    self.latent_shape = tuple(int(d) for d in meta["latent_shape"])
    self.shape = self.latent_shape[:2] + (2 * self.latent_shape[2],)
    self.num_classes = int(meta["source"]["num_classes"])
    self.class_names = tuple(meta["source"].get("class_names", ()))
    self.scaling_factor = float(meta["scaling_factor"])
    missing = [k for k in range(self.num_shards)
               if not os.path.isfile(shard_path(root, split, k))]
    if missing:
      raise LatentsError(
          f"{root} lacks {len(missing)} of the {self.num_shards} {split} shards (e.g. "
          f"{os.path.basename(shard_path(root, split, missing[0]))}): the encode stopped early; "
          f"run the same encode command again (it continues at the missing shards).")
    self._split = split
    self._lock = threading.Lock()
    self._shards: Dict[int, np.ndarray] = {}
    self._dtype = shard_dtype(self.latent_shape)

  def __len__(self) -> int:
    return self.num_examples

  def _shard(self, k: int) -> np.ndarray:
    with self._lock:
      if k not in self._shards:
        path = shard_path(self.root, self._split, k)
        a = np.load(path, mmap_mode="r")
        n = min(self.shard_size, self.num_examples - k * self.shard_size)
        if a.dtype != self._dtype or a.shape != (n,):
          raise LatentsError(f"{path} holds {a.dtype} {a.shape}, expected {n} examples of "
                             f"{self._dtype}; delete it and run the encode command again.")
        self._shards[k] = a
      return self._shards[k]

  def read(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    c = self.latent_shape[2]
    data = np.empty((len(indices),) + self.shape, np.float32)
    labels = np.empty(len(indices), np.int32)
    shards, offsets = np.divmod(indices, self.shard_size)
    for k in np.unique(shards):
      sel = np.flatnonzero(shards == k)
      rows = self._shard(int(k))[offsets[sel]]
      data[sel, ..., :c] = rows["mean"]
      data[sel, ..., c:] = rows["std"]
      labels[sel] = rows["label"]
    return data, labels


def check_vae_centered(meta: Dict[str, Any], vae_centered: bool, root: str) -> None:
  """data.vae_centered must be the pixel range the latents were encoded from (meta.json's
  'vae_centered'; latent datasets written before it was recorded are [-1, 1])."""
  encoded = bool(meta.get("vae_centered", True))
  if encoded != bool(vae_centered):
    ranges = {True: "[-1, 1]", False: "[0, 1]"}
    raise ConfigError(f"The latents in {root} were encoded from pixels in {ranges[encoded]}; set "
                      f"--config.data.vae_centered={encoded} (got {bool(vae_centered)}).")


def open_latents(root: str, split: str, *, image_size: int, num_channels: int) -> LatentSource:
  """The Source of a split of the latent dataset in `root` (data.path), checked against the
  latent shape the settings give (data.image_size, data.num_channels).

  Raises:
    ConfigError, DatasetNotFoundError, LatentsError: see `read_meta`, `check_meta`, and a
      missing or malformed shard.
  """
  meta = read_meta(root)
  root = os.path.expanduser(root)
  check_meta(meta, image_size, num_channels, root)
  return LatentSource(root, split, meta)


def latent_transform(norm: LatentNorm, *, seed: int, stream: int) -> Transform:
  """(mean | std [L, h, w, 2c], step, slots) -> norm.forward(mean + std * eps) [L, h, w, c]
  (scale * raw + shift per channel), eps drawn per example from a generator keyed by (seed,
  stream, step, slot)."""

  def transform(data: np.ndarray, step: int, slots: np.ndarray) -> np.ndarray:
    c = data.shape[-1] // 2
    mean, std = data[..., :c], data[..., c:]
    eps = np.stack([rng.standard_normal(mean.shape[1:], dtype=np.float32)
                    for rng in example_rngs(seed, stream, step, slots)]) if len(slots) else \
        np.zeros_like(mean)
    return norm.forward(mean + std * eps)

  return transform


class LatentDecoder:
  """Model-space latents -> images in [-1, 1]: vae.decode(norm.inverse(z)).

  Attributes:
    norm: the latents' normalization (`LatentNorm`).
    vae_centered: pixels leave the VAE in [-1, 1] (True) or in [0, 1] (False, EDM2's), mapped
      to [-1, 1].
    num_channels: the images' channels (the source data's; 1 averages an RGB VAE's planes).
    factor: the VAE's upsampling: images are factor x the latents' size.
  """

  def __init__(self, vae_folder: str, norm: LatentNorm, *, vae_centered: bool = True,
               num_channels: Optional[int] = None, batch_size: int = 64):
    from score_jax.convert.vae import load_vae  # pylint: disable=g-import-not-at-top

    self.vae, self.params, self.scaling_factor = load_vae(vae_folder)
    module = self.vae.module
    if module.latent_channels != len(norm.scale):
      raise ConfigError(f"The VAE in {vae_folder} has {module.latent_channels} latent channels, "
                        f"the latent normalization (data.latent_scale / latent_shift) "
                        f"{len(norm.scale)}: not the VAE of these latents.")
    self.norm, self.vae_centered = norm, bool(vae_centered)
    self.num_channels = module.out_channels if num_channels is None else int(num_channels)
    self.factor = 2 ** (len(module.block_out_channels) - 1)
    self.batch_size = batch_size

  def __call__(self, z: np.ndarray) -> np.ndarray:
    """z float [N, h, w, c] (model space) -> images float32 [N, factor h, factor w,
    num_channels] in about [-1, 1], decoded in batches of min(batch_size, N) (the last one
    padded: one compilation per batch size)."""
    z = self.norm.inverse(z)
    out = []
    b = min(self.batch_size, len(z))
    for start in range(0, len(z), b):
      chunk = z[start:start + b]
      n = len(chunk)
      if n < b:
        chunk = np.concatenate([chunk, np.zeros((b - n,) + chunk.shape[1:], chunk.dtype)])
      out.append(np.asarray(self.vae.decode(self.params, chunk))[:n])
    x = np.concatenate(out) if out else np.zeros((0,), np.float32)
    if not self.vae_centered:  # [0, 1] -> [-1, 1]
      x = np.float32(2.0) * x - np.float32(1.0)
    if self.num_channels == 1 and x.shape[-1] != 1:
      x = x.mean(axis=-1, keepdims=True)  # gray data encoded through an RGB VAE
    return x.astype(np.float32)


@functools.lru_cache(maxsize=8)
def _digest(folder: str, size: int, mtime: float) -> str:  # (size, mtime): a rewritten file
  del size, mtime
  return weights_digest(folder)


def _cached_digest(folder: str) -> str:
  from score_jax.convert.vae import WEIGHTS_FILE  # pylint: disable=g-import-not-at-top

  st = os.stat(os.path.join(folder, WEIGHTS_FILE))
  return _digest(os.path.realpath(folder), st.st_size, st.st_mtime)


@functools.lru_cache(maxsize=4)
def _decoder(folder: str, scale: Tuple[float, ...], shift: Tuple[float, ...],
             vae_centered: bool, num_channels: Optional[int]) -> LatentDecoder:
  norm = LatentNorm(np.asarray(scale, np.float32), np.asarray(shift, np.float32))
  return LatentDecoder(folder, norm, vae_centered=vae_centered, num_channels=num_channels)


def latent_decoder(data: Any) -> LatentDecoder:
  """The (cached) decoder of latent data settings `data` (data.vae, data.path,
  data.latent_scale, data.latent_shift, data.vae_centered).

  The VAE is data.vae where set, else the one the latent dataset's meta.json (data.path)
  names; with both, data.vae must hold the weights the latents were encoded with (their
  SHA-256 in meta.json) and the meta.json's pixel range must be data.vae_centered. Without a
  latent dataset the images have the VAE's output channels.

  Raises:
    ConfigError: neither data.vae nor data.path, or settings that contradict meta.json.
    LatentsError, DatasetNotFoundError, VAEFolderError: a gone or malformed VAE or dataset.
  """
  # pylint: disable-next=g-import-not-at-top
  from score_jax.convert.vae import module_arguments, read_config

  vae = os.path.expanduser(data.vae) if data.vae else ""
  meta = read_meta(data.path) if data.path else None
  if meta is None and not vae:
    raise ConfigError("Latent samples decode through a VAE: set --config.data.vae=FOLDER (a "
                      "diffusers AutoencoderKL folder) or --config.data.path=DIR (a latent "
                      "dataset, whose meta.json names its VAE).")
  num_channels = None
  if meta is not None:
    root = os.path.expanduser(data.path)
    check_vae_centered(meta, data.vae_centered, root)
    num_channels = int(meta["source"]["num_channels"])
    if not vae and not os.path.isdir(meta["vae"]):
      raise LatentsError(f"The latents were made with the VAE {meta['vae']}, which is gone: put "
                         f"the folder back there, or set --config.data.vae to a copy of it.")
  kwargs, scaling = module_arguments(read_config(vae or meta["vae"]), vae or meta["vae"])
  if meta is not None:
    if vae and _cached_digest(vae) != meta["vae_sha256"]:
      raise ConfigError(f"data.vae {vae} is not the VAE the latents in {root} were encoded "
                        f"with (its weights differ from those of {meta['vae']}); set "
                        f"--config.data.vae={meta['vae']}, or leave data.vae empty.")
    if abs(scaling - float(meta["scaling_factor"])) > 1e-12 * abs(scaling):
      raise LatentsError(f"The VAE in {vae or meta['vae']} has scaling factor {scaling}, the "
                         f"latents {meta['scaling_factor']}: not the VAE they were encoded with.")
    vae = vae or meta["vae"]
  if kwargs["latent_channels"] != data.num_channels:
    raise ConfigError(f"The VAE in {vae} makes {kwargs['latent_channels']}-channel latents, "
                      f"data.num_channels is {data.num_channels}: use the VAE of the model's "
                      "latents.")
  norm = latent_norm(data.latent_scale, data.latent_shift, scaling, data.num_channels)
  return _decoder(os.path.realpath(vae), tuple(float(v) for v in norm.scale),
                  tuple(float(v) for v in norm.shift), bool(data.vae_centered), num_channels)


def source_meta(root: str) -> Optional[Dict[str, Any]]:
  """meta.json's 'source' (the image data's settings), or None if root is no latent dataset."""
  try:
    return read_meta(root)["source"]
  except UserError:
    return None
