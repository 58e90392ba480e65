"""The sample mode's tasks, one unit each: generate, inpaint, colorize, interpolate.

A task is a `Task`: `check(plan)` refuses what it cannot do before the
checkpoint loads, and `run(inputs)` samples and returns a `TaskOutput` (the
samples, their NFE and labels, extra arrays for the .npz, and the inputs to
show above them in the grid). `TASKS` is the one table (sample.task -> unit);
`score_jax.run.sample.run` writes the files. `load_images`, `inpainting_mask`
and `slerp` are the tasks' inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Dict, Optional

import jax
import numpy as np

from score_jax.data.scaling import data_scaler
from score_jax.errors import ConfigError, UserError
from score_jax.run.distributed import pad_rows, padded, to_host
from score_jax.run.plan import Plan
from score_jax.run.programs import Programs
from score_jax.run import grids

__all__ = ["Task", "TaskInputs", "TaskOutput", "TASKS", "sample_labels", "load_images",
           "inpainting_mask", "slerp", "test_images", "MASKS", "ImagesError", "MissingImagesError"]


class ImagesError(UserError, ValueError):
  """sample.images_path holds no usable images."""


class MissingImagesError(UserError, FileNotFoundError):
  """sample.images_path does not exist."""

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


def test_images(plan: Plan, num: int) -> np.ndarray:
  """The first `num` images of the dataset's test split, uint8 [n <= num, H, W, C]: what
  inpaint and colorize take when sample.images_path is empty."""
  logging.info("sample.images_path is empty: using the first %d test images of %s.", num,
               plan.data.name)
  out, n = [], 0
  for b in plan.data.batches("test", evaluation=True, raw=True, batch_size=num, process_index=0,
                             process_count=1):
    out.append(np.asarray(b["image"])[np.asarray(b["mask"])])
    n += len(out[-1])
    if n >= num:
      break
  return np.concatenate(out)[:num]


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


def sample_labels(plan: Plan, n: int) -> np.ndarray:
  """n labels: sample.class_label, or 0, 1, 2, ... in turn (0 for unconditional models)."""
  num_classes, label = plan.data.num_classes, plan.sample.class_label
  if num_classes == 0:
    if label >= 0:
      logging.warning("sample.class_label is ignored: the model is unconditional.")
    return np.zeros((n,), np.int32)
  if label >= num_classes:
    raise ConfigError(f"sample.class_label {label} is not a class of this model "
                      f"(0..{num_classes - 1}).")
  return (np.full((n,), label) if label >= 0 else np.arange(n) % num_classes).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class TaskInputs:
  """What a task samples with."""
  plan: Plan
  progs: Programs
  params: Any  # EMA parameters (GuidedParams with an autoguidance guide), replicated
  rng: jax.Array  # fold_in(PRNGKey(seed), checkpoint step)
  workdir: str
  put: Callable[[np.ndarray], jax.Array]  # a global batch -> the programs' sharded input


@dataclasses.dataclass(frozen=True)
class TaskOutput:
  """What a task made; `score_jax.run.sample.run` writes it."""
  x: np.ndarray  # [n, ...] samples in model space, on the host
  nfe: Any  # score evaluations per sample
  labels: np.ndarray  # int32 [n]
  arrays: Dict[str, np.ndarray]  # more arrays for the .npz ('inputs', 'mask', 'latents')
  shown_inputs: Optional[np.ndarray] = None  # uint8 images shown above the results
  ncols: Optional[int] = None  # the grid's columns (None: square)


@dataclasses.dataclass(frozen=True)
class Task:
  """A sample-mode task: check(plan) before the checkpoint loads, run(inputs) -> TaskOutput."""
  check: Callable[[Plan], None]
  run: Callable[[TaskInputs], TaskOutput]


def _no_check(plan: Plan) -> None:
  del plan


def _generate(inputs: TaskInputs) -> TaskOutput:
  """sample.num samples with the sampling section's sampler (class_label, guidance_weight)."""
  plan, progs = inputs.plan, inputs.progs
  num = plan.sample.num
  n = padded(num)
  labels = pad_rows(sample_labels(plan, num), n)
  weight = plan.sampling.guidance_weight
  timesteps = grids.grid_for(progs, inputs.params, os.path.join(inputs.workdir, "time_grids"),
                                  weight, inputs.rng)
  x, nfe = progs.sampler(n, weight, timesteps)(inputs.params, inputs.rng, inputs.put(labels))
  return TaskOutput(to_host(x)[:num], nfe, labels[:num], {})


def _check_controlled(task: str) -> Callable[[Plan], None]:
  def check(plan: Plan) -> None:
    if not plan.data.is_images:
      raise ConfigError(f"sample.task={task!r} needs image data; {plan.data.name!r} is 2-D.")
    if task == "colorize" and plan.data.num_channels != 3:
      raise ConfigError("sample.task='colorize' needs an RGB model (data.num_channels = 3).")
    if not plan.sampling.controllable:
      raise ConfigError(f"sample.task={task!r} needs a sampler with per-step projections: "
                        "sampling.method pc, ddim, heun, dpm_solver or unipc, not ode.")
  return check


def _controlled(inputs: TaskInputs, task: str, mask: np.ndarray):
  """Samples of `task` constrained by sample.images_path or the test images (repeated up to
  sample.num) and
  mask [H, W, C]: (samples [num, ...], nfe, labels [num], the given uint8 images)."""
  plan, progs = inputs.plan, inputs.progs
  num = plan.sample.num
  n = padded(num)
  labels = pad_rows(sample_labels(plan, num), n)
  if plan.sample.images_path:
    imgs = load_images(plan.sample.images_path, plan.data.image_size, plan.data.num_channels)
  else:
    imgs = test_images(plan, num)
  imgs = np.resize(imgs, (num,) + imgs.shape[1:])  # repeat the given images up to num
  data = data_scaler(plan.data.centered)(imgs.astype(np.float32) / 255.0)
  masks = np.ascontiguousarray(np.broadcast_to(mask, data.shape))
  fn = progs.controlled_sampler(task, n, plan.sampling.guidance_weight)
  x, nfe = fn(inputs.params, inputs.rng, inputs.put(labels), inputs.put(pad_rows(data, n)),
              inputs.put(pad_rows(masks, n)))
  return to_host(x)[:num], nfe, labels[:num], imgs


def _inpaint(inputs: TaskInputs) -> TaskOutput:
  """Fills the unknown part (sample.mask) of sample.images_path (or the test images)."""
  d = inputs.plan.data
  mask = inpainting_mask(inputs.plan.sample.mask, d.image_size, d.num_channels)
  x, nfe, labels, imgs = _controlled(inputs, "inpaint", mask)
  return TaskOutput(x, nfe, labels, {"inputs": imgs, "mask": mask},
                    shown_inputs=(imgs * mask).astype(np.uint8))  # the unknown part blacked out


def _colorize(inputs: TaskInputs) -> TaskOutput:
  """Colors gray versions of sample.images_path or the test images (RGB models)."""
  d = inputs.plan.data
  mask = np.ones((d.image_size, d.image_size, d.num_channels), np.float32)
  x, nfe, labels, imgs = _controlled(inputs, "colorize", mask)
  gray = np.repeat(np.round(imgs.mean(-1, keepdims=True)).astype(np.uint8), 3, -1)
  return TaskOutput(x, nfe, labels, {"inputs": imgs}, shown_inputs=gray)


def _interpolate(inputs: TaskInputs) -> TaskOutput:
  """sample.interpolation_steps points along a slerp between two latents of the
  probability-flow ODE: the encodings of the first two images of sample.images_path, or two
  prior draws when it is empty."""
  plan, progs, put = inputs.plan, inputs.progs, inputs.put
  steps_n, path = plan.sample.interpolation_steps, plan.sample.images_path
  n = padded(steps_n)
  labels = pad_rows(sample_labels(plan, 1), n)  # one class along the path
  y = put(labels)
  encode, decode = progs.ode(n, plan.sampling.guidance_weight, denoise=not path)
  arrays: Dict[str, np.ndarray] = {}
  if path:
    imgs = load_images(path, plan.data.image_size, plan.data.num_channels)
    if imgs.shape[0] < 2:
      raise ImagesError(f"Interpolation needs two images in {path}, found {imgs.shape[0]}.")
    x0 = data_scaler(plan.data.centered)(imgs[:2].astype(np.float32) / 255.0)
    z, _ = encode(inputs.params, y, put(pad_rows(x0, n)))
    z0, z1 = to_host(z)[:2]
    arrays["inputs"] = imgs[:2]
  else:
    z0, z1 = np.asarray(plan.sde.prior_sampling(inputs.rng, plan.data.shape(2)))
  latents = slerp(z0, z1, np.linspace(0.0, 1.0, steps_n))
  x, nfe = decode(inputs.params, y, put(pad_rows(latents, n)))
  arrays["latents"] = latents
  return TaskOutput(to_host(x)[:steps_n], nfe, labels[:steps_n], arrays, ncols=steps_n)


TASKS: Dict[str, Task] = {
    "generate": Task(_no_check, _generate),
    "inpaint": Task(_check_controlled("inpaint"), _inpaint),
    "colorize": Task(_check_controlled("colorize"), _colorize),
    "interpolate": Task(_no_check, _interpolate),
}
