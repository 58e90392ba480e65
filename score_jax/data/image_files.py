"""A researcher's own images: a folder, a dataset_tool .zip, or an .npz (data.dataset='images').

`data.path` names one of:
- a folder of image files (.png .jpg .jpeg .webp .bmp .gif .tif .tiff; found
  recursively, hidden files skipped). Images all in subfolders: the first
  folder of each file's relative path is its class, sorted class names ->
  labels 0..K-1. Images all at the top level: no labels. Both: an error.
- EDM's dataset_tool layout, as a folder or a .zip (read in place with
  `zipfile`): the image files plus a `dataset.json` holding
  {"labels": [["00000/img00000000.png", 6], ...]} (integer labels, K = the
  largest + 1) or {"labels": null}. Every image needs a label when labels are
  given. A .zip without dataset.json follows the folder rule.
- an .npz: uint8 images under the key 'images' (or the file's only array),
  [N, H, W, C] or [N, C, H, W] (C in 1, 3, 4) or gray [N, H, W]; optional
  integer labels [N] under 'labels'.
Files are taken in sorted order of their relative paths (the same order on
every machine), so index i names the same image everywhere.

Every image is brought to image_size x image_size x num_channels by one rule:
converted by Pillow to 'L' (num_channels 1) or 'RGB' (3; an alpha channel is
dropped, palette and 16-bit images converted), turned upright by its EXIF orientation, center-cropped to a square
of side min(H, W) and resized with Pillow's bicubic filter, antialiased when
shrinking (`images.crop_resize`; a no-op for square images of the right size).
Decoding happens when a batch is read, in the pipeline's threads.

The 'test' split is the same images as 'train' (FID reference statistics use
them too); hold out images by giving eval another data.path.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import threading
import zipfile
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

from score_jax.data.images import crop_resize
from score_jax.data.sources import ArraySource, DatasetNotFoundError, RecordSource, Source
from score_jax.errors import ConfigError, UserError

__all__ = ["IMAGE_EXTENSIONS", "ImageFilesError", "ImageFiles", "fit_image", "list_images",
           "open_images"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_MODES = {1: "L", 3: "RGB"}
_HOW = ("data.path names a folder of images (one subfolder per class for labels), a "
        "dataset_tool .zip, or an .npz of uint8 images")


class ImageFilesError(UserError, ValueError):
  """data.path holds something that is not a usable image dataset; the message says what."""


def _mode(num_channels: int) -> str:
  if num_channels not in _MODES:
    raise ConfigError(f"data.dataset='images' makes 1 (gray) or 3 (RGB) channels; "
                      f"data.num_channels is {num_channels}.")
  return _MODES[num_channels]


def fit_image(image, image_size: int, num_channels: int) -> np.ndarray:
  """A PIL image -> uint8 [image_size, image_size, num_channels] by the module's rule."""
  from PIL import ImageOps  # pylint: disable=g-import-not-at-top

  image = ImageOps.exif_transpose(image).convert(_mode(num_channels))
  a = np.asarray(image, np.uint8)
  a = a[..., None] if a.ndim == 2 else a
  return crop_resize(a, image_size)


@dataclasses.dataclass(frozen=True)
class ImageFiles:
  """The listing of an image folder or zip: what a Source reads, and its labels.

  Attributes:
    files: relative POSIX paths of the images, sorted.
    labels: int32 [N] (zeros when unlabeled).
    num_classes: 0 when unlabeled.
    class_names: the class folder names (label k is class_names[k]); () when
      unlabeled or labeled by dataset.json.
  """
  files: Tuple[str, ...]
  labels: np.ndarray
  num_classes: int
  class_names: Tuple[str, ...]


def _is_image(name: str) -> bool:
  base = name.rsplit("/", 1)[-1]
  return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def _labels_from_json(path: str, text: Optional[bytes], files: Sequence[str]):
  """(labels, num_classes) of dataset.json, or None when it has no labels."""
  try:
    labels = json.loads(text).get("labels") if text is not None else None
  except (ValueError, AttributeError) as e:
    raise ImageFilesError(f"{path}: dataset.json is not a JSON object with a 'labels' key ({e}).") from e
  if labels is None:
    return None
  try:
    by_name = {str(name).replace("\\", "/"): label for name, label in labels}
  except (TypeError, ValueError) as e:
    raise ImageFilesError(f"{path}: dataset.json 'labels' must be a list of [file, label] pairs.") from e
  missing = [f for f in files if f not in by_name]
  if missing:
    raise ImageFilesError(f"{path}: dataset.json gives no label for {len(missing)} image(s), e.g. "
                          f"{missing[0]!r}; label every image, or write \"labels\": null.")
  extra = sorted(set(by_name) - set(files))
  if extra:
    raise ImageFilesError(f"{path}: dataset.json labels {len(extra)} file(s) that are not images "
                          f"here, e.g. {extra[0]!r}.")
  values = [by_name[f] for f in files]
  if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
    bad = next(v for v in values if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0))
    raise ImageFilesError(f"{path}: dataset.json labels must be integers >= 0 (one class each); "
                          f"found {bad!r}.")
  labels = np.asarray(values, np.int32)
  return labels, int(labels.max()) + 1


def list_images(path: str, names: Sequence[str], read_json: Callable[[], Optional[bytes]]) -> ImageFiles:
  """The images among `names` (relative POSIX paths in a folder or zip) and their labels.

  Args:
    path: the folder or zip, for messages.
    names: every file in it, relative, '/'-separated.
    read_json: returns the bytes of its top-level dataset.json, or None when there is none.
  """
  files = tuple(sorted(n for n in names if _is_image(n)))
  if not files:
    raise ImageFilesError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}); {_HOW}.")
  text = read_json()
  if text is not None:
    found = _labels_from_json(path, text, files)
    if found is None:
      return ImageFiles(files, np.zeros(len(files), np.int32), 0, ())
    return ImageFiles(files, found[0], found[1], ())
  nested = ["/" in f for f in files]
  if not any(nested):
    return ImageFiles(files, np.zeros(len(files), np.int32), 0, ())
  if not all(nested):
    top = next(f for f, n in zip(files, nested) if not n)
    raise ImageFilesError(f"{path} has images both at its top level (e.g. {top!r}) and in "
                          "subfolders: put every image in a class subfolder (labels), or none.")
  folders = [f.split("/", 1)[0] for f in files]
  class_names = tuple(sorted(set(folders)))
  index = {c: k for k, c in enumerate(class_names)}
  labels = np.asarray([index[c] for c in folders], np.int32)
  return ImageFiles(files, labels, len(class_names), class_names)


class _Folder:
  """Reads files of a folder by relative path."""

  def __init__(self, root: str):
    self.root = root
    names = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
      dirnames[:] = [d for d in dirnames if not d.startswith(".")]
      rel = os.path.relpath(dirpath, root)
      for f in filenames:
        names.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
    self.names = names

  def read(self, name: str) -> bytes:
    with open(os.path.join(self.root, *name.split("/")), "rb") as f:
      return f.read()

  def read_json(self) -> Optional[bytes]:
    return self.read("dataset.json") if "dataset.json" in self.names else None


class _Zip:
  """Reads members of a zip by name, without extracting; one handle per thread."""

  def __init__(self, path: str):
    self.path = path
    self._local = threading.local()
    try:
      with zipfile.ZipFile(path) as z:
        self.names = [i.filename for i in z.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError) as e:
      raise ImageFilesError(f"{path} is not a readable zip file ({e}).") from e

  def read(self, name: str) -> bytes:
    z = getattr(self._local, "zip", None)
    if z is None:
      z = self._local.zip = zipfile.ZipFile(self.path)
    return z.read(name)

  def read_json(self) -> Optional[bytes]:
    return self.read("dataset.json") if "dataset.json" in self.names else None


def _decoder(store, path: str, image_size: int, num_channels: int) -> Callable[[str], np.ndarray]:
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top

  def decode(name: str) -> np.ndarray:
    try:
      with Image.open(io.BytesIO(store.read(name))) as image:
        return fit_image(image, image_size, num_channels)
    except (UnidentifiedImageError, OSError, ValueError, KeyError) as e:
      raise ImageFilesError(f"{path}: cannot read the image {name!r} ({e}); remove or replace it.") from e

  return decode


def _npz_source(path: str, image_size: int, num_channels: int) -> Source:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with np.load(path) as f:
      keys = list(f.files)
      key = "images" if "images" in keys else (keys[0] if len(keys) == 1 else None)
      if key is None:
        raise ImageFilesError(f"{path} holds the arrays {keys}; name the images 'images' "
                              "(and the labels, if any, 'labels').")
      images = np.asarray(f[key])
      labels = np.asarray(f["labels"]) if "labels" in keys and key != "labels" else None
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise ImageFilesError(f"{path} is not a readable .npz file ({e}).") from e
  if images.dtype != np.uint8:
    raise ImageFilesError(f"{path}: '{key}' is {images.dtype}; the images must be uint8 0..255.")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim == 4 and images.shape[-1] not in (1, 3, 4) and images.shape[1] in (1, 3, 4):
    images = images.transpose(0, 2, 3, 1)  # [N, C, H, W] -> [N, H, W, C]
  if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or len(images) == 0:
    raise ImageFilesError(f"{path}: '{key}' has shape {images.shape}; expected uint8 "
                          "[N, H, W, C] or [N, C, H, W] with C in 1, 3, 4 (or gray [N, H, W]).")
  num_classes = 0
  if labels is None:
    labels = np.zeros(len(images), np.int32)
  else:
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
      raise ImageFilesError(f"{path}: 'labels' must be integers >= 0 of shape ({len(images)},), "
                            f"got {labels.dtype} {labels.shape}.")
    num_classes = int(labels.max()) + 1
  shape = (image_size, image_size, num_channels)
  _mode(num_channels)
  if images.shape[1:] == shape:
    return ArraySource(images, labels, num_classes=num_classes)

  def fit(k: int) -> Tuple[np.ndarray, int]:
    a = images[k]
    return fit_image(Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a), image_size,
                     num_channels), int(labels[k])

  return RecordSource(range(len(images)), fit, shape=shape, num_classes=num_classes, name=path)


def open_images(path: str, *, image_size: int, num_channels: int) -> Source:
  """A Source over a folder, dataset_tool zip or .npz of images (see the module docstring).

  The source's `class_names` are the class folders in label order (else ()).

  Raises:
    ConfigError: data.path is empty, or num_channels not 1 or 3.
    DatasetNotFoundError: nothing at `path`.
    ImageFilesError: no images, an unreadable file, labels that do not match the images.
  """
  if not path:
    raise ConfigError("data.dataset='images' reads data.path, which is empty: pass "
                      "--config.data.path=DIR (a folder of images, a dataset_tool .zip or an .npz).")
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise DatasetNotFoundError(f"data.path {path} does not exist; {_HOW}.")
  _mode(num_channels)
  if os.path.isfile(path) and path.lower().endswith(".npz"):
    return _npz_source(path, image_size, num_channels)
  if os.path.isdir(path):
    store = _Folder(path)
  elif zipfile.is_zipfile(path):
    store = _Zip(path)
  else:
    raise ImageFilesError(f"data.path {path} is neither a folder, a .zip nor an .npz; {_HOW}.")
  listing = list_images(path, store.names, store.read_json)
  decode = _decoder(store, path, image_size, num_channels)
  decode(listing.files[0])  # an unreadable first file, or a bad setting, fails here, not in a thread
  files, labels = listing.files, listing.labels
  source = RecordSource(range(len(files)), lambda k: (decode(files[k]), int(labels[k])),
                        shape=(image_size, image_size, num_channels),
                        num_classes=listing.num_classes, name=path)
  source.class_names = listing.class_names
  return source
