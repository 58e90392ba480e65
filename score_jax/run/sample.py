"""The sample mode: `run(settings, workdir)` writes samples of one checkpoint.

`--mode=sample` loads one checkpoint (sample.ckpt_step, default the newest)
and writes sample.num samples as PNG and .npz with any sampler; sample.task
picks unconditional generation, inpainting or colorization of given images,
or interpolation through the probability-flow ODE. Class-conditional models
take sample.class_label and sampling.guidance_weight (classifier-free
guidance). `load_images`, `inpainting_mask` and `slerp` are its inputs.
"""

from __future__ import annotations

import logging
import os
from typing import Dict

import jax
import numpy as np

from score_jax import plotting
from score_jax.run import checkpoints
from score_jax.run import programs
from score_jax.run import load as runs
from score_jax.run import grids
from score_jax.run import state as run_state
from score_jax.run.distributed import global_array, is_main, local_rows, pad_rows, padded, to_host
from score_jax.errors import ConfigError, UserError
from score_jax.data.scaling import data_scaler, to_uint8
from score_jax.run.settings import Settings

__all__ = ["run", "load_images", "inpainting_mask", "slerp", "MASKS", "ImagesError", "MissingImagesError"]


class ImagesError(UserError, ValueError):
  """sample.images_path holds no usable images."""


class MissingImagesError(UserError, FileNotFoundError):
  """sample.images_path does not exist."""

_GRID_SIZE = 64  # images in the PNG grid
MASKS = ("left_half", "right_half", "top_half", "bottom_half", "center")


def load_images(path: str, image_size: int, num_channels: int) -> np.ndarray:
  """Images from a .npz (key 'images', 'samples' or its only array), an image file or a folder.

  Returns uint8 [N, image_size, image_size, num_channels]; image files are
  converted ('L' or 'RGB') and resized with Pillow (bicubic), float arrays
  in [0, 1] are scaled to 0..255.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def from_pil(img):
    img = img.convert("L" if num_channels == 1 else "RGB")
    if img.size != (image_size, image_size):
      img = img.resize((image_size, image_size), Image.BICUBIC)
    a = np.asarray(img, np.uint8)
    return a[..., None] if a.ndim == 2 else a

  if not os.path.exists(path):
    raise MissingImagesError(f"sample.images_path {path!r} does not exist.")
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path)
                   if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp")))
    if not files:
      raise ImagesError(f"No .png / .jpg images in {path}.")
    return np.stack([from_pil(Image.open(os.path.join(path, f))) for f in files])
  if path.endswith(".npz"):
    with np.load(path) as f:
      key = next((k for k in ("images", "samples") if k in f.files), None)
      if key is None and len(f.files) != 1:
        raise ImagesError(f"{path} holds {f.files}; name the array 'images'.")
      a = np.asarray(f[key or f.files[0]])
    if a.ndim == 3:
      a = a[..., None]
    if a.dtype != np.uint8:
      a = np.clip(np.round(a.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    want = (image_size, image_size, num_channels)
    if a.ndim != 4 or a.shape[1:] != want:
      raise ImagesError(f"{path}: images have shape {a.shape}, the model wants [N, *{want}].")
    return a
  return from_pil(Image.open(path))[None]


def inpainting_mask(spec: str, image_size: int, num_channels: int) -> np.ndarray:
  """float32 [H, W, C] with 1 on known pixels: a named mask (MASKS) or an image/.npz file.

  A file mask is read like an image (nonzero = known), broadcast over channels.
  """
  h = w = image_size
  m = np.zeros((h, w), np.float32)
  if spec == "left_half":
    m[:, w // 2:] = 1.0
  elif spec == "right_half":
    m[:, :w // 2] = 1.0
  elif spec == "top_half":
    m[h // 2:] = 1.0
  elif spec == "bottom_half":
    m[:h // 2] = 1.0
  elif spec == "center":
    m[:] = 1.0
    m[h // 4:h - h // 4, w // 4:w - w // 4] = 0.0
  elif os.path.exists(spec):
    a = load_images(spec, image_size, 1)[0, ..., 0]
    m = (a > 0).astype(np.float32)
  else:
    raise ConfigError(f"sample.mask {spec!r} is neither one of {MASKS} (the part to fill in) "
                     "nor an existing mask file.")
  return np.repeat(m[..., None], num_channels, axis=-1)


def slerp(z0: np.ndarray, z1: np.ndarray, alphas: np.ndarray) -> np.ndarray:
  """Spherical interpolation [len(alphas), ...] between latents z0 and z1 (flattened angles).

  Gaussian latents concentrate on a sphere; slerp keeps intermediate points
  there, where linear interpolation would shrink their norm.
  """
  a, b = z0.reshape(-1).astype(np.float64), z1.reshape(-1).astype(np.float64)
  cos = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
  theta = np.arccos(np.clip(cos, -1.0, 1.0))
  out = []
  for t in alphas:
    if theta < 1e-6:
      v = (1 - t) * a + t * b
    else:
      v = (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)
    out.append(v.reshape(z0.shape))
  return np.stack(out).astype(np.float32)


def _sample_labels(s: Settings, n: int) -> np.ndarray:
  num_classes = s.model.num_classes
  label = s.sample.class_label
  if num_classes == 0:
    if label >= 0:
      logging.warning("sample.class_label is ignored: the model is unconditional.")
    return np.zeros((n,), np.int32)
  if label >= num_classes:
    raise ConfigError(f"sample.class_label {label} is not a class of this model "
                      f"(0..{num_classes - 1}).")
  return (np.full((n,), label) if label >= 0 else np.arange(n) % num_classes).astype(np.int32)


def run(settings: Settings, workdir: str) -> Dict[str, str]:
  """The sample mode: writes sample.num samples of one checkpoint (EMA parameters).

  sample.task:
    generate: unconditional (or class-conditional, sample.class_label,
      sampling.guidance_weight) samples with the sampling section's sampler.
    inpaint: fills the unknown part (sample.mask) of sample.images_path.
    colorize: colors gray versions of sample.images_path (RGB models).
    interpolate: sample.interpolation_steps points along a slerp between two
      latents of the probability-flow ODE: the encodings of the first two
      images of sample.images_path, or two prior draws when it is empty.
  Files: <out>/<task>_step<k>.png (grid, or scatter for 2-D data) and
  <task>_step<k>.npz ('samples' in model space, 'images' uint8 for image
  data, 'labels', and 'inputs' for inpaint / colorize), <out> =
  sample.output_dir or WORKDIR/sample.

  Returns:
    {'png': path, 'npz': path}.
  """
  s, data_s = settings.sample, settings.data
  task = s.task
  images_data = data_s.is_images
  if task in ("inpaint", "colorize") and not images_data:
    raise ConfigError(f"sample.task={task!r} needs image data; {data_s.dataset!r} is 2-D.")
  if task == "colorize" and data_s.num_channels != 3:
    raise ConfigError("sample.task='colorize' needs an RGB model (data.num_channels = 3).")
  if task in ("inpaint", "colorize") and not s.images_path:
    raise ConfigError(f"sample.task={task!r} needs sample.images_path (.npz, image file or "
                      "folder).")
  _sample_labels(settings, 1)  # a bad class label fails before the checkpoint loads
  if task in ("inpaint", "colorize") and settings.sampling.method.lower() == "ode":
    raise ConfigError(f"sample.task={task!r} needs a sampler with per-step projections: "
                     "sampling.method pc, ddim, heun, dpm_solver or unipc, not ode.")

  setup = programs.make_setup(settings, need_data=False)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  step = checkpoints.existing_step(ckpt_dir, s.ckpt_step)
  progs = programs.Programs(setup, guide=runs.load_guide(settings, setup))
  params = progs.guided(run_state.restore_ema_params(setup, ckpt_dir, step))
  weight = settings.sampling.guidance_weight
  centered = data_s.centered
  size, channels = data_s.image_size, data_s.num_channels
  rng = jax.random.fold_in(jax.random.PRNGKey(settings.seed), step)
  put = lambda a: global_array(progs.bat, local_rows(a))
  arrays: Dict[str, np.ndarray] = {}

  if task == "interpolate":
    steps_n = s.interpolation_steps
    n = padded(steps_n)
    labels = pad_rows(_sample_labels(settings, 1), n)  # one class along the path
    y = put(labels)
    path = s.images_path
    encode, decode = progs.ode(n, weight, denoise=not path)
    if path:
      imgs = load_images(path, size, channels)
      if imgs.shape[0] < 2:
        raise ImagesError(f"Interpolation needs two images in {path}, found {imgs.shape[0]}.")
      x0 = data_scaler(centered)(imgs[:2].astype(np.float32) / 255.0)
      z, _ = encode(params, y, put(pad_rows(x0, n)))
      z0, z1 = to_host(z)[:2]
      arrays["inputs"] = imgs[:2]
    else:
      z0, z1 = np.asarray(setup.sde.prior_sampling(rng, data_s.shape(2)))
    latents = slerp(z0, z1, np.linspace(0.0, 1.0, steps_n))
    x, nfe = decode(params, y, put(pad_rows(latents, n)))
    x = to_host(x)[:steps_n]
    arrays["latents"] = latents
    labels = labels[:steps_n]
  else:
    num = s.num
    n = padded(num)
    labels = pad_rows(_sample_labels(settings, num), n)
    y = put(labels)
    if task == "generate":
      timesteps = grids.grid_for(progs, params, os.path.join(workdir, "time_grids"), weight,
                                      rng)
      x, nfe = progs.sampler(n, weight, timesteps)(params, rng, y)
    else:
      imgs = load_images(s.images_path, size, channels)
      imgs = np.resize(imgs, (num,) + imgs.shape[1:])  # repeat the given images up to num
      data = data_scaler(centered)(imgs.astype(np.float32) / 255.0)
      mask = (inpainting_mask(s.mask, size, channels)
              if task == "inpaint" else np.ones(imgs.shape[1:], np.float32))
      masks = np.broadcast_to(mask, data.shape)
      fn = progs.controlled_sampler(task, n, weight)
      x, nfe = fn(params, rng, y, put(pad_rows(data, n)),
                  put(pad_rows(np.ascontiguousarray(masks), n)))
      arrays["inputs"] = imgs
      if task == "inpaint":
        arrays["mask"] = mask
        shown_inputs = (imgs * mask).astype(np.uint8)  # the unknown part blacked out
      else:
        shown_inputs = np.repeat(np.round(imgs.mean(-1, keepdims=True)).astype(np.uint8), 3, -1)
    x = to_host(x)[:num]
    labels = labels[:num]

  if not np.all(np.isfinite(x)):
    raise FloatingPointError("Sampling produced non-finite values.")
  out_dir = s.output_dir or os.path.join(workdir, "sample")
  base = os.path.join(out_dir, f"{task}_step{step}")
  arrays.update(samples=x.astype(np.float32), nfe=np.asarray(int(nfe)))
  if settings.model.num_classes > 0:
    arrays["labels"] = labels
  if is_main():
    if images_data:
      arrays["images"] = to_uint8(x, centered, settings.eval.quantization)
      shown = arrays["images"]
      if task in ("inpaint", "colorize"):  # inputs above their results
        shown = np.concatenate([shown_inputs[:_GRID_SIZE // 2], shown[:_GRID_SIZE // 2]])
      plotting.save_image_grid(base + ".png", shown.astype(np.float32) / 255.0,
                               ncols=len(x) if task == "interpolate" else None)
    else:
      data = next(iter(programs.get_dataset(settings, "test", evaluation=True, batch_size=2048,
                                            process_index=0, process_count=1)))["image"]
      plotting.save_scatter(base + ".png", x, np.asarray(data),
                            title=f"{task}, step {step}, {int(nfe)} score evaluations")
    plotting.save_arrays(base + ".npz", **arrays)
    logging.info("Wrote %s.png and .npz (%d samples, %d score evaluations).", base, len(x),
                 int(nfe))
  return {"png": base + ".png", "npz": base + ".npz"}
