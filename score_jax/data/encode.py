"""`python -m score_jax.data.encode --vae=VAE --config=CONFIG --out=DIR`: a config's image dataset
through a VAE, once, into the sharded latent dataset `data.dataset='latents'` reads.

  python -m score_jax.data.encode --vae=runs/digits_vae --config=configs/digits.py \\
      --config.data.image_size=16 --out=runs/digits_latents

CONFIG is any image config (digits, tfds datasets, your own folder with data.dataset='images',
...); its data section picks the images, brought to data.image_size and data.num_channels as
training would read them, without flips or dequantization, as pixels in [-1, 1] (or in [0, 1]
with --config.data.vae_centered=False, EDM2's convention). VAE is a diffusers AutoencoderKL
folder (`score_jax.convert.vae.load_vae`). The layout of DIR, and why the posterior's mean and
std are stored: score_jax/data/latents.py. Shards are written atomically, so running the same
command again continues at the missing shards; --process_index/--process_count split the
shards between processes (k mod count = index) that may run on several machines sharing DIR.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from score_jax import files
from score_jax.data import latents as latents_lib
from score_jax.errors import ConfigError

__all__ = ["encode_dataset", "encode_split", "make_meta", "to_vae_input", "main"]


def to_vae_input(images: np.ndarray, in_channels: int, centered: bool = True) -> np.ndarray:
  """uint8 [n, H, W, C] -> float32 [n, H, W, in_channels] in [-1, 1] (centered, latent
  diffusion's convention) or [0, 1] (EDM2's x / 255); gray images repeat their plane for an RGB
  VAE."""
  if centered:
    x = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  else:
    x = images.astype(np.float32) / np.float32(255.0)
  if x.shape[-1] == 1 and in_channels == 3:
    x = np.repeat(x, 3, axis=-1)
  return x


def make_meta(*, vae_folder: str, digest: str, scaling_factor: float,
              latent_shape: Sequence[int], source: Dict[str, Any], num_classes: int,
              class_names: Sequence[str], shard_size: int,
              sizes: Dict[str, int], vae_centered: bool = True) -> Dict[str, Any]:
  """The meta.json of a latent dataset (see score_jax/data/latents.py)."""
  return {
      "format": latents_lib.FORMAT,
      "vae": os.path.realpath(vae_folder),
      "vae_sha256": digest,
      "scaling_factor": float(scaling_factor),
      "vae_centered": bool(vae_centered),
      "latent_shape": [int(d) for d in latent_shape],
      "stored": "posterior mean and std of the unscaled latents, float32",
      "source": dict(source, num_classes=int(num_classes), class_names=list(class_names)),
      "shard_size": int(shard_size),
      "splits": {split: {"num_examples": int(n), "num_shards": -(-int(n) // int(shard_size))}
                 for split, n in sizes.items()},
  }


def _check_same(old: Dict[str, Any], new: Dict[str, Any], out: str) -> None:
  """A resumed encode must be the one that began: same VAE, data, shards."""
  keys = ("vae_sha256", "scaling_factor", "vae_centered", "latent_shape", "source", "shard_size",
          "splits")
  old = dict(old, vae_centered=old.get("vae_centered", True))  # not recorded before: [-1, 1]
  diff = [k for k in keys if old.get(k) != new.get(k)]
  if diff or old.get("format") != latents_lib.FORMAT:
    raise latents_lib.LatentsError(
        f"{out} holds latents made with other settings (different: {', '.join(diff) or 'format'}); "
        "encode into another --out folder, or delete this one to start over.")


def encode_split(source: Any, vae: Any, params: Any, out: str, split: str, *, shard_size: int,
                 batch_size: int = 64, process_index: int = 0, process_count: int = 1,
                 progress: bool = True, centered: bool = True) -> List[int]:
  """Encodes this process's missing shards of one split (k mod process_count = process_index).

  Args:
    source: the images (a score_jax.data Source of uint8 [H, W, C]).
    vae, params: `load_vae`'s VAE and parameters.
    out: the latent dataset's folder.
    split: 'train' or 'test' (the shards' file names).
    shard_size: examples per shard.
    batch_size: images per VAE call (the last one padded: one compilation).
    process_index, process_count: this process's share of the shards.
    progress: show a tqdm bar (examples).
    centered: pixels into the VAE in [-1, 1] (True) or [0, 1] (`to_vae_input`).

  Returns:
    The shards written by this call (those already on disk are skipped).
  """
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  n = len(source)
  num_shards = -(-n // shard_size)
  mine = [k for k in range(num_shards) if k % process_count == process_index]
  todo = [k for k in mine if not os.path.isfile(latents_lib.shard_path(out, split, k))]
  sizes = {k: min(shard_size, n - k * shard_size) for k in mine}
  in_channels = vae.module.in_channels
  dtype = None
  written = []
  with tqdm(total=sum(sizes.values()), initial=sum(sizes[k] for k in mine if k not in todo),
            desc=f"encoding {split}", unit="image", disable=not progress) as bar:
    for k in todo:
      indices = np.arange(k * shard_size, k * shard_size + sizes[k], dtype=np.int64)
      means, stds, labels = [], [], []
      for start in range(0, len(indices), batch_size):
        images, y = source.read(indices[start:start + batch_size])
        m = len(images)
        x = to_vae_input(images, in_channels, centered)
        if m < batch_size:
          x = np.concatenate([x, np.zeros((batch_size - m,) + x.shape[1:], x.dtype)])
        mean, logvar = vae.encode(params, x)
        means.append(np.asarray(mean)[:m])
        stds.append(np.exp(0.5 * np.asarray(logvar, np.float64)).astype(np.float32)[:m])
        labels.append(y)
        bar.update(m)
      mean = np.concatenate(means)
      if dtype is None:
        dtype = latents_lib.shard_dtype(mean.shape[1:])
      rows = np.empty(len(indices), dtype)
      rows["mean"], rows["std"], rows["label"] = mean, np.concatenate(stds), np.concatenate(labels)
      with files.atomic_write(latents_lib.shard_path(out, split, k)) as f:
        np.save(f, rows)
      written.append(k)
  return written


def encode_dataset(data: Any, vae_folder: str, out: str, *, splits: Sequence[str] = ("train",),
                   shard_size: int = 1024, batch_size: int = 64, process_index: int = 0,
                   process_count: int = 1, progress: bool = True) -> Dict[str, Any]:
  """Encodes the image data that `data` (the data settings) names into `out`.

  Writes out/meta.json (or checks that the one there describes the same encode), then this
  process's missing shards of every split. The pixels enter the VAE in [-1, 1], or in [0, 1]
  where data.vae_centered is False (EDM2's convention); meta.json records which.

  Returns:
    The meta.json contents, with 'written': {split: [shards written by this call]}.

  Raises:
    ConfigError: data that are not images, or a bad shard, batch or process setting.
    LatentsError: out holds latents of other settings.
    VAEFolderError, DatasetNotFoundError: from reading the VAE or the data.
  """
  from score_jax.convert.vae import load_vae  # pylint: disable=g-import-not-at-top
  from score_jax.data import datasets  # pylint: disable=g-import-not-at-top

  name = str(data.dataset).lower()
  if name in ("toy", "latents"):
    raise ConfigError(f"The encode reads images; data.dataset {data.dataset!r} is not an image "
                      "dataset (use an image config such as configs/digits.py).")
  for key, value in (("--shard_size", shard_size), ("--batch_size", batch_size),
                     ("--process_count", process_count)):
    if value < 1:
      raise ConfigError(f"{key} must be >= 1, got {value}.")
  if not 0 <= process_index < process_count:
    raise ConfigError(f"--process_index {process_index} is not in [0, {process_count}).")
  if not splits or any(s not in datasets.SPLITS for s in splits):
    raise ConfigError(f"--splits must name 'train' and/or 'test', got {list(splits)}.")
  vae, params, scaling = load_vae(vae_folder)
  module = vae.module
  sources = {split: datasets.open_data(data, split) for split in splits}
  channels = sources[splits[0]].shape[-1]
  if channels != module.in_channels and not (channels == 1 and module.in_channels == 3):
    raise ConfigError(f"The images have {channels} channel(s), the VAE in {vae_folder} takes "
                      f"{module.in_channels}; use data.num_channels = {module.in_channels}.")
  factor = 2 ** (len(module.block_out_channels) - 1)
  size = int(data.image_size)
  if size % factor:
    raise ConfigError(f"The VAE halves the resolution {len(module.block_out_channels) - 1} "
                      f"times; data.image_size = {size} must be a multiple of {factor}.")
  first = sources[splits[0]]
  meta = make_meta(vae_folder=vae_folder, digest=latents_lib.weights_digest(vae_folder),
                   scaling_factor=scaling,
                   latent_shape=(size // factor, size // factor, module.latent_channels),
                   source=latents_lib.source_settings(data), num_classes=first.num_classes,
                   class_names=getattr(first, "class_names", ()), shard_size=shard_size,
                   sizes={split: len(s) for split, s in sources.items()},
                   vae_centered=data.vae_centered)
  os.makedirs(out, exist_ok=True)
  meta_path = os.path.join(out, latents_lib.META_FILE)
  old = files.read_json(meta_path)
  if old is None:
    files.write_json(meta_path, meta)  # processes write the same bytes; the rename is atomic
  else:
    _check_same(old, meta, out)
  written = {}
  for split, source in sources.items():
    written[split] = encode_split(source, vae, params, out, split, shard_size=shard_size,
                                  batch_size=batch_size, process_index=process_index,
                                  process_count=process_count, progress=progress,
                                  centered=data.vae_centered)
  return dict(meta, written=written)


# ---------------------------------------------------------------------------
# Command line

_USAGE = ("python -m score_jax.data.encode --vae=VAE_FOLDER --config=IMAGE_CONFIG --out=DIR "
          "[--splits=train[,test]] [--shard_size=1024] [--batch_size=64] "
          "[--process_index=0 --process_count=1]")


def _define_flags(fv: Any, argv: List[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", None, "An image config; its data section names the "
                                  "images to encode.", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  flags.DEFINE_string("vae", None, "A diffusers AutoencoderKL folder (config.json and "
                      "diffusion_pytorch_model.safetensors).", flag_values=fv)
  flags.DEFINE_string("out", None, "The latent dataset's folder (data.path of the latent "
                      "config).", flag_values=fv)
  flags.DEFINE_list("splits", ["train"], "Splits to encode.", flag_values=fv)
  flags.DEFINE_integer("shard_size", 1024, "Examples per shard file.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 64, "Images per VAE call.", flag_values=fv)
  flags.DEFINE_integer("process_index", 0, "This process's index: it encodes the shards k with "
                       "k mod process_count = process_index.", flag_values=fv)
  flags.DEFINE_integer("process_count", 1, "Processes sharing the encode.", flag_values=fv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line; returns the exit status (score_jax.run.cli's conventions)."""
  from score_jax.run import cli  # pylint: disable=g-import-not-at-top
  from score_jax.run import settings as settings_lib  # pylint: disable=g-import-not-at-top

  argv = list(sys.argv if argv is None else argv)
  parsed = cli.parse(argv, _define_flags, _USAGE, 0, doc=__doc__)
  if parsed is None:
    return cli.USAGE_ERROR
  fv, _ = parsed
  if fv.config is None or not fv.vae or not fv.out:
    print(f"usage: {_USAGE}", file=sys.stderr)
    return cli.USAGE_ERROR
  logging.getLogger().setLevel(logging.INFO)

  def run() -> int:
    data = settings_lib.from_config(fv.config).data
    meta = encode_dataset(data, fv.vae, fv.out, splits=fv.splits, shard_size=fv.shard_size,
                          batch_size=fv.batch_size, process_index=fv.process_index,
                          process_count=fv.process_count)
    h, w, c = meta["latent_shape"]
    for split, done in meta["written"].items():
      info = meta["splits"][split]
      print(f"{split}: {info['num_examples']} images in {info['num_shards']} shards; this run "
            f"wrote {len(done)}.")
    print(f"Latents {h}x{w}x{c} (scaling factor {meta['scaling_factor']:g}) in {fv.out}. Train "
          f"on them with --config.data.dataset=latents --config.data.path={fv.out} "
          f"--config.data.image_size={h} --config.data.num_channels={c}"
          f"{'' if meta['vae_centered'] else ' --config.data.vae_centered=False'}.")
    return 0

  return cli.report_user_errors(run)


if __name__ == "__main__":
  from score_jax.run import xla_flags  # pylint: disable=g-import-not-at-top

  xla_flags.apply_defaults()
  sys.exit(main())
