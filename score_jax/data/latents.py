"""Latent datasets: images encoded once by a VAE, stored in shards, read like any dataset.

`python -m score_jax.data.encode --vae=VAE --config=CONFIG --out=DIR` runs the config's image
dataset through a diffusers AutoencoderKL folder (`score_jax.convert.vae.load_vae`) and writes

  DIR/meta.json               the VAE folder, its scaling factor and weights' SHA-256, the
                              latent shape, the source data (dataset, path, image size,
                              channels, classes) and the splits' sizes and shard counts
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

  z = scaling_factor * (mean + std * eps),  eps ~ N(0, I)

with a generator keyed by (seed, stream, step, slot), the same rule as the images'
augmentation noise: the same latents for any process count and on resume. Batches are NHWC
float32 [L, h, w, c] (h = w = image_size / 2^(levels - 1)); data.image_size and
data.num_channels name this latent shape (what the network sees), checked against meta.json.

`LatentDecoder` maps model-space samples back to images: vae.decode(z / scaling_factor), in
[-1, 1]; sampling, snapshot grids and FID decode through the VAE meta.json names. Gray source
data encoded by an RGB VAE (the three planes equal) decode to the mean of the three planes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from score_jax import files
from score_jax.data.pipeline import Transform, example_rngs
from score_jax.data.sources import DatasetNotFoundError
from score_jax.errors import ConfigError, UserError

__all__ = ["FORMAT", "META_FILE", "LatentsError", "LatentSource", "LatentDecoder",
           "ENCODE_COMMAND", "shard_path", "shard_dtype", "read_meta", "check_meta",
           "open_latents", "latent_transform", "latent_decoder", "source_settings",
           "weights_digest", "source_meta"]

FORMAT = "score_jax latents v1"
META_FILE = "meta.json"
ENCODE_COMMAND = ("python -m score_jax.data.encode --vae=VAE_FOLDER --config=IMAGE_CONFIG "
                  "--out=DIR")
# The keys of the data settings that name the source images (recorded in meta.json, so that
# the source can be read again: FID statistics of the real images).
SOURCE_KEYS = ("dataset", "data_dir", "path", "image_size", "num_channels", "category",
               "toy_name", "tfrecords_path")


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


def latent_transform(scaling_factor: float, *, seed: int, stream: int) -> Transform:
  """(mean | std [L, h, w, 2c], step, slots) -> scaling_factor * (mean + std * eps) [L, h, w, c],
  eps drawn per example from a generator keyed by (seed, stream, step, slot)."""

  def transform(data: np.ndarray, step: int, slots: np.ndarray) -> np.ndarray:
    c = data.shape[-1] // 2
    mean, std = data[..., :c], data[..., c:]
    eps = np.stack([rng.standard_normal(mean.shape[1:], dtype=np.float32)
                    for rng in example_rngs(seed, stream, step, slots)]) if len(slots) else \
        np.zeros_like(mean)
    return (np.float32(scaling_factor) * (mean + std * eps)).astype(np.float32)

  return transform


class LatentDecoder:
  """Model-space latents -> images in [-1, 1] through the VAE meta.json names.

  Attributes:
    num_channels: the images' channels (the source data's).
    image_size: the images' size.
  """

  def __init__(self, meta: Dict[str, Any], batch_size: int = 64):
    from score_jax.convert.vae import load_vae  # pylint: disable=g-import-not-at-top

    folder = meta["vae"]
    if not os.path.isdir(folder):
      raise LatentsError(f"The latents were made with the VAE {folder}, which is gone: put the "
                         f"folder back there (or edit 'vae' in the latent dataset's "
                         f"{META_FILE}).")
    self.vae, self.params, scaling = load_vae(folder)
    if abs(scaling - float(meta["scaling_factor"])) > 1e-12 * abs(scaling):
      raise LatentsError(f"The VAE in {folder} has scaling factor {scaling}, the latents "
                         f"{meta['scaling_factor']}: not the VAE they were encoded with.")
    self.scaling_factor = scaling
    self.num_channels = int(meta["source"]["num_channels"])
    self.image_size = int(meta["source"]["image_size"])
    self.batch_size = batch_size

  def __call__(self, z: np.ndarray) -> np.ndarray:
    """z float [N, h, w, c] (model space) -> images float32 [N, H, W, num_channels] in about
    [-1, 1], decoded in batches of min(batch_size, N) (the last one padded: one compilation
    per batch size)."""
    z = np.asarray(z, np.float32) / np.float32(self.scaling_factor)
    out = []
    b = min(self.batch_size, len(z))
    for start in range(0, len(z), b):
      chunk = z[start:start + b]
      n = len(chunk)
      if n < b:
        chunk = np.concatenate([chunk, np.zeros((b - n,) + chunk.shape[1:], chunk.dtype)])
      out.append(np.asarray(self.vae.decode(self.params, chunk))[:n])
    x = np.concatenate(out) if out else np.zeros((0,), np.float32)
    if self.num_channels == 1 and x.shape[-1] != 1:
      x = x.mean(axis=-1, keepdims=True)  # gray data encoded through an RGB VAE
    return x.astype(np.float32)


@functools.lru_cache(maxsize=4)
def _decoder(root: str, meta_text: str) -> LatentDecoder:
  return LatentDecoder(json.loads(meta_text))


def latent_decoder(root: str) -> LatentDecoder:
  """The (cached) decoder of the latent dataset in `root`."""
  meta = read_meta(root)
  return _decoder(os.path.realpath(os.path.expanduser(root)), json.dumps(meta, sort_keys=True))


def source_meta(root: str) -> Optional[Dict[str, Any]]:
  """meta.json's 'source' (the image data's settings), or None if root is no latent dataset."""
  try:
    return read_meta(root)["source"]
  except UserError:
    return None
