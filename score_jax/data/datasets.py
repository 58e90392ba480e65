"""Training and evaluation data: deterministic, resumable, process-sharded, TensorFlow-free.

Datasets (config.data.dataset, case-insensitive; reference names accepted):
- 'toy': 2-D points, config.data.toy_name in TOY_NAMES ('gaussian_mixture',
  'checkerboard', 'swiss_roll', 'moons'); a fixed generated set of 65536
  train / 8192 test points (the same for every seed). Yields float32 [L, 2],
  unscaled (centered, flips and dequantization do not apply).
- 'digits': scikit-learn's 8x8 digits (ships with scikit-learn), uint8
  0..255, 1 channel, labels 0..9; test = every 5th image of each class
  (355), train = the other 1442; image_size a multiple of 8 (nearest-neighbour upsampling).
- tfds, prepared on disk beforehand (see below): 'cifar10', 'svhn_cropped'
  ('svhn'), 'celeb_a' ('celeba': center crop 140, then shorter side to
  image_size, bilinear), 'lsun/<category>' (or 'lsun' with
  config.data.category; reference recipe: image_size 128 -> shorter side to
  128 and center crop, otherwise center square crop and bicubic resize).
  Resizing is Pillow on uint8 (antialiased when shrinking, like the
  reference's tf.image.resize(antialias=True)); see score_jax/data/images.py.
- 'ffhq', 'celebahq': ProGAN/StyleGAN dataset_tool TFRecords at
  config.data.tfrecords_path or config.data.data_dir (a file, or a folder
  holding NAME-rXX.tfrecords files: the one for image_size is used).
- 'images' (also 'folder'): your own images at config.data.path: a folder
  of image files (one subfolder per class gives labels 0..K-1 in sorted
  folder-name order), EDM's dataset_tool layout (a folder or .zip with
  dataset.json labels), or an .npz of uint8 images (key 'images', optional
  'labels'). Each image is converted to data.num_channels (Pillow's L or RGB),
  center-cropped to a square and resized to image_size with Pillow's
  antialiased bicubic filter; see score_jax/data/image_files.py.
- 'latents': images encoded once by a VAE (`python -m score_jax.data.encode`)
  into the folder config.data.path; data.image_size and data.num_channels
  name the latent shape. Yields float32 latents [L, h, w, c], each drawn from
  its stored posterior with noise keyed by (seed, step, slot); raw=True gives
  the source images instead (FID statistics). See score_jax/data/latents.py.

Splits are 'train' and 'test'; 'test' is the dataset's evaluation split
(cifar10/svhn 'test', celeb_a/lsun 'validation' as in the reference,
ffhq/celebahq/images: the same examples as 'train').

Reading never needs TensorFlow and never downloads: tfds datasets prepared
as array_record are read with tfds's data sources, those prepared in the
default tfrecord format with our pure-Python TFRecord reader. A dataset that
is not on disk raises DatasetNotFoundError naming the dataset, the data_dir
and the `tfds build ...` command that prepares it.

Batches are dicts of numpy arrays for THIS process (L = global batch / process
count): 'image' float32 [L, H, W, C] in [0, 1], or [-1, 1] if centered (data
already scaled: do not apply data_scaler again), uint8 with raw=True; 'label'
int32 [L]; 'mask' bool [L]; 'index' int64 [L]. Order and noise are pure
functions of (seed, step), so `start_step=step` resumes exactly; see
score_jax/data/pipeline.py.
"""

from __future__ import annotations

import os
import types
from typing import Any, Callable, TypeVar

import numpy as np

from score_jax.data.digits import DIGITS_NUM_CLASSES, load_digits
from score_jax.errors import ConfigError
from score_jax.data.scaling import data_scaler
from score_jax.data.image_files import open_images
from score_jax.data import latents as latents_lib
from score_jax.data.latents import LatentSource, latent_transform, open_latents, read_meta
from score_jax.data.images import center_crop, crop_resize, resize, resize_small
from score_jax.data.pipeline import Batches, Transform
from score_jax.data.prefetch import Prefetch, to_device
from score_jax.data.sources import ArraySource, DatasetNotFoundError, RecordSource, Source
from score_jax.data.tfds_source import open_tfds
from score_jax.data.tfrecord_folder import open_tfrecord_images
from score_jax.data.toy import GAUSSIAN_MIXTURE, TOY_NAMES, TOY_NUM_CLASSES, sample_toy
from score_jax.data.transforms import image_transform

__all__ = [
    "ArraySource",
    "GAUSSIAN_MIXTURE",
    "Batches",
    "DatasetNotFoundError",
    "Prefetch",
    "DATASETS",
    "SPLITS",
    "TOY_NAMES",
    "data_scaler",
    "inverse_scaler",
    "open_source",
    "open_data",
    "check_classes",
    "make_batches",
    "to_device",
    "get_dataset",
    "num_examples",
]

SPLITS = ("train", "test")
DATASETS = ("toy", "digits", "cifar10", "svhn_cropped", "celeb_a", "lsun", "ffhq", "celebahq",
            "images", "latents")
# Reference-code and common spellings -> our names.
_ALIASES = {"svhn": "svhn_cropped", "celeba": "celeb_a", "celeb_a_hq": "celebahq", "celeba_hq": "celebahq",
            "folder": "images"}
# Toy sets are fixed data, not a function of the run's seed: runs with
# different seeds see the same distribution sample, in different orders.
_TOY_DATA_SEED = 20210112
_TOY_SIZES = {"train": 65536, "test": 8192}
# Per-example noise streams (0 is the shuffle stream in pipeline.py).
_TRAIN_STREAM, _EVAL_STREAM = 1, 2

ArrayT = TypeVar("ArrayT")


def inverse_scaler(centered: bool) -> Callable[[ArrayT], ArrayT]:
  """[-1, 1] -> [0, 1] if centered, else the identity; the inverse of data_scaler."""
  return data_scaler(centered).inverse


def _canonical(dataset: str, category: str) -> tuple[str, str]:
  """('LSUN', 'bedroom') or ('lsun/bedroom', '') -> ('lsun', 'bedroom'), with a clear error."""
  name = str(dataset).strip().lower()
  if name.startswith("lsun/"):
    name, category = "lsun", name.split("/", 1)[1]
  name = _ALIASES.get(name, name)
  if name not in DATASETS:
    raise ConfigError(f"Unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)} "
                     "(or 'lsun/<category>').")
  if name == "lsun" and not category:
    raise ConfigError("LSUN needs a category: dataset 'lsun/<category>' (e.g. 'lsun/church_outdoor') "
                     "or config.data.category.")
  return name, category


def _check_image_config(name: str, image_size: int, num_channels: int, channels: int) -> None:
  if not isinstance(image_size, (int, np.integer)) or image_size < 1:
    raise ConfigError(f"image_size must be a positive integer, got {image_size!r}.")
  if num_channels != channels:
    raise ConfigError(f"Dataset '{name}' has {channels} channel(s), but num_channels is {num_channels}.")


def _tfds_source(name: str, tfds_split: str, *, data_dir: str, image_size: int, num_channels: int,
                 fit: Callable[[np.ndarray], np.ndarray]) -> Source:
  records, features = open_tfds(name, tfds_split, data_dir=data_dir)
  _check_image_config(name, image_size, num_channels, features["image"].shape[-1])
  has_label = "label" in features
  num_classes = features["label"].num_classes if has_label else 0

  def to_example(ex: dict[str, Any]) -> tuple[np.ndarray, int]:
    return fit(np.asarray(ex["image"], np.uint8)), int(ex["label"]) if has_label else 0

  return RecordSource(records, to_example, shape=(image_size, image_size, num_channels),
                      num_classes=num_classes, name=name)


def open_source(dataset: str, split: str, *, image_size: int, num_channels: int, data_dir: str = "",
                category: str = "", toy_name: str = "gaussian_mixture", path: str = "") -> Source:
  """Opens one split of a dataset for random access (config-free).

  Args:
    dataset: a name in DATASETS or an alias ('svhn', 'celeba', 'lsun/bedroom', ...).
    split: 'train' or 'test'.
    image_size, num_channels: the images' final shape; checked against the data
      (tfds and digits images are resized to image_size; toy data ignores both).
    data_dir: tfds data_dir ('' = tfds default), or the TFRecord file/folder for ffhq/celebahq.
    category: the LSUN category when `dataset` is 'lsun'.
    toy_name: which toy distribution when `dataset` is 'toy'.
    path: the folder, zip or .npz when `dataset` is 'images'; the encoded folder for 'latents'.

  Returns:
    A Source: len(), read(indices) -> (data [n, *shape], labels int32 [n]), shape, num_classes.

  Raises:
    DatasetNotFoundError: data not on disk (nothing is downloaded).
    ValueError: unknown dataset/split, or a shape the data cannot give.
  """
  name, category = _canonical(dataset, category)
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; choose 'train' or 'test'.")
  if name == "toy":
    rng = np.random.default_rng([_TOY_DATA_SEED, SPLITS.index(split)])
    x, y = sample_toy(toy_name, _TOY_SIZES[split], rng)
    return ArraySource(x, y, num_classes=TOY_NUM_CLASSES[toy_name])
  if name == "digits":
    _check_image_config(name, image_size, num_channels, 1)
    if image_size % 8:
      raise ConfigError(f"digits are 8x8: image_size must be a multiple of 8, got {image_size}.")
    images, labels = load_digits(split)
    factor = image_size // 8
    images = np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)  # nearest upsampling
    return ArraySource(images, labels, num_classes=DIGITS_NUM_CLASSES)
  if name == "images":
    return open_images(path, image_size=image_size, num_channels=num_channels)
  if name == "latents":
    return open_latents(path, split, image_size=image_size, num_channels=num_channels)
  if name in ("ffhq", "celebahq"):
    return open_tfrecord_images(data_dir, image_size=image_size, num_channels=num_channels, name=name)
  if name in ("cifar10", "svhn_cropped"):
    fit = lambda im: resize(im, image_size, image_size)  # no-op at the native 32
    return _tfds_source(name, split, data_dir=data_dir, image_size=image_size,
                        num_channels=num_channels, fit=fit)
  tfds_split = {"train": "train", "test": "validation"}[split]
  if name == "celeb_a":
    if image_size > 140:
      raise ConfigError(f"celeb_a is center-cropped to 140 px; image_size {image_size} > 140.")
    fit = lambda im: resize_small(center_crop(im, 140), image_size)
    return _tfds_source(name, tfds_split, data_dir=data_dir, image_size=image_size,
                        num_channels=num_channels, fit=fit)
  # LSUN: the reference's two recipes.
  if image_size == 128:
    fit = lambda im: center_crop(resize_small(im, image_size), image_size)
  else:
    fit = lambda im: crop_resize(im, image_size)
  return _tfds_source(f"lsun/{category}", tfds_split, data_dir=data_dir, image_size=image_size,
                      num_channels=num_channels, fit=fit)


def make_batches(source: Source, *, batch_size: int, evaluation: bool = False, random_flip: bool = False,
                 uniform_dequantization: bool = False, centered: bool = False, raw: bool = False,
                 seed: int = 0, start_step: int = 0, process_index: int | None = None,
                 process_count: int | None = None, num_threads: int | None = None,
                 latent_norm: latents_lib.LatentNorm | None = None) -> Batches:
  """Batches of `source` for this process (config-free).

  Args:
    source: from open_source.
    batch_size: the GLOBAL batch size; must divide by process_count.
    evaluation: False: an infinite stream reshuffled every epoch (training, or
      eval loss during training). True: one ordered pass; the last batch is
      padded and 'mask' marks the real examples.
    random_flip: flip images left-right with probability 1/2.
    uniform_dequantization: y = (v + U) / 256 for uint8 v, U ~ U[0, 1), so 256 y - U = v.
    centered: scale [0, 1] -> [-1, 1] (after dequantization).
    raw: images stay uint8 [L, H, W, C], unflipped and not dequantized (bits/dim,
      FID statistics); the three flags above are ignored.
    seed: order and noise are functions of (seed, step).
    start_step: the step of the first batch: start_step=k gives exactly the
      batches k, k+1, ... of an iterator started at 0 (resume).
    process_index, process_count: this process and how many there are
      (defaults: jax.process_index(), jax.process_count()).
    num_threads: reader threads (default: 0 for in-memory data, else min(8, cpus)).
    latent_norm: a latent source's normalization, z = scale * raw + shift per channel (None:
      the VAE's scaling factor, no shift).

  Returns:
    A Batches iterator (see score_jax.data.pipeline.Batches).
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  is_images = len(source.shape) == 3 and not isinstance(source, LatentSource)
  if raw and not is_images:
    raise ValueError("raw=True yields uint8 images; this dataset is not an image dataset.")
  if isinstance(source, LatentSource):  # flips, dequantization and centering do not apply
    norm = latent_norm or latents_lib.latent_norm((), (), source.scaling_factor,
                                                   source.latent_shape[-1])
    transform = latent_transform(norm, seed=seed,
                                 stream=_EVAL_STREAM if evaluation else _TRAIN_STREAM)
  elif raw or not is_images:
    transform: Transform = lambda data, step, slots: data
  else:
    transform = image_transform(random_flip=random_flip, uniform_dequantization=uniform_dequantization,
                                centered=centered, seed=seed,
                                stream=_EVAL_STREAM if evaluation else _TRAIN_STREAM)
  if num_threads is None:
    num_threads = min(8, os.cpu_count() or 1) if source.needs_io else 0
  return Batches(source, global_batch_size=int(batch_size), infinite=not evaluation, seed=seed,
                 transform=transform, start_step=start_step, process_index=process_index,
                 process_count=process_count, num_threads=num_threads)


def _open(data: Any, split: str) -> Source:
  name, _ = _canonical(data.dataset, data.category)
  data_dir = data.data_dir
  if name in ("ffhq", "celebahq"):
    data_dir = data.tfrecords_path or data_dir  # the reference's key
  return open_source(data.dataset, split, image_size=data.image_size,
                     num_channels=data.num_channels, data_dir=data_dir, category=data.category,
                     toy_name=data.toy_name, path=data.path)


def check_classes(source: Source, num_classes: int, dataset: str) -> None:
  """A conditional model (num_classes > 0) has a class for every label of the data."""
  if num_classes <= 0:
    return
  if source.num_classes == 0:
    own = _ALIASES.get(dataset.lower(), dataset.lower()) == "images"
    hint = " (or put the images in class subfolders)" if own else ""
    raise ConfigError(f"model.num_classes is {num_classes} but dataset {dataset!r} has no labels; "
                      f"set model.num_classes = 0{hint}.")
  if num_classes < source.num_classes:
    raise ConfigError(f"model.num_classes is {num_classes} but dataset {dataset!r} has "
                      f"{source.num_classes} classes; set --config.model.num_classes="
                      f"{source.num_classes}.")


def open_data(data: Any, split: str = "train", num_classes: int = 0) -> Source:
  """The Source of a split of the dataset `data` (settings) names, checked against the
  model's classes (`num_classes`, 0: unconditional); see `open_source`."""
  source = _open(data, split)
  check_classes(source, num_classes, data.dataset)
  return source


def get_dataset(data: Any, split: str = "train", *, batch_size: int, seed: int,
                num_classes: int = 0, evaluation: bool = False, raw: bool = False,
                start_step: int = 0, process_index: int | None = None,
                process_count: int | None = None, num_threads: int | None = None) -> Batches:
  """Batches of a split of the dataset that data settings (`score_jax.run.settings.Data`) name.

  Reads data.{dataset, data_dir, path, image_size, num_channels, random_flip,
  centered, uniform_dequantization, toy_name, category, tfrecords_path} and for latents
  data.{latent_scale, latent_shift, vae_centered}.
  Random flips apply only to split 'train' with evaluation=False.

  Args:
    data: the run's data settings.
    split: 'train' or 'test'.
    batch_size: the global batch size (training.batch_size or eval.batch_size).
    seed: the run's seed (e.g. seed + pass for several bits/dim passes).
    num_classes: the model's classes (model.num_classes), checked against the dataset's.
    evaluation, raw, start_step, process_index, process_count, num_threads: see make_batches.

  Returns:
    A Batches iterator of dicts {'image', 'label', 'mask', 'index'} (module docstring).
  """
  source = _open(data, split)
  check_classes(source, num_classes, data.dataset)
  norm = None
  if isinstance(source, LatentSource):
    latents_lib.check_vae_centered(source.meta, data.vae_centered, data.path)
    norm = latents_lib.latent_norm(data.latent_scale, data.latent_shift, source.scaling_factor,
                                   source.latent_shape[-1])
    if raw:  # the images that were encoded
      source = _open(types.SimpleNamespace(**read_meta(data.path)["source"]), split)
  return make_batches(
      source, batch_size=batch_size, evaluation=evaluation,
      random_flip=data.random_flip and split == "train" and not evaluation,
      uniform_dequantization=data.uniform_dequantization, centered=data.centered,
      raw=raw, seed=seed, start_step=start_step,
      process_index=process_index, process_count=process_count, num_threads=num_threads,
      latent_norm=norm)


def num_examples(data: Any, split: str) -> int:
  """Number of examples in a split (all processes together) of the dataset `data` names."""
  return len(_open(data, split))
