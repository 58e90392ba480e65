"""Settings -> the run plan: every object a run uses, built once at the entry.

`make_plan(settings)` (the modes' entries and `load_run` call it) checks the
settings against the devices and the data, then builds the SDE, the network,
the optimizer, the loss functions (training and evaluation), the EMA decay
and post-hoc EMA exponents, the augmentation, the configured sampler and the
device mesh, and copies the numbers the loops need (batch sizes, n_iters,
frequencies, seeds, eval and sample options) into small frozen specs. Train,
evaluate and sample take the plan and never read settings; `Plan.settings`
is kept only to write config.json and for `load_run(...).settings`.

    plan = make_plan(settings)
    plan.train_loss(params, rng, x, y)          # built here, once
    plan.loop.n_iters, plan.data.shape(8), plan.eval.num_samples
    programs.Programs(plan).sampler(64)         # the jitted programs over the plan
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from score_jax import models
from score_jax import sde as sde_lib
from score_jax.data import augment as augment_lib
from score_jax.errors import ConfigError, WorkdirError
from score_jax.run import builders, phema, sampler_specs, sharding
from score_jax.run.settings import (DIFFUSION_OBJECTIVES, Data, Eval, Sample, Settings,
                                   check_devices, from_json)

Array = jax.Array

__all__ = ["Plan", "Teacher", "DataSpec", "ScoreSpec", "SamplingSpec", "TimeGridSpec", "TrainLoop",
           "EvalSpec", "SampleSpec", "make_plan", "assemble", "data_spec", "get_dataset",
           "check_network", "checkpoint_range", "fingerprint", "mesh_fsdp_size"]


def fingerprint(obj: Any) -> str:
  """A short stable hash of a JSON-able object (what results were made with)."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _take(cls: type, section: Any, **extra: Any) -> Any:
  """cls with the fields of the same names from a settings section, plus `extra`."""
  names = [f.name for f in dataclasses.fields(cls) if f.name not in extra]
  return cls(**{n: getattr(section, n) for n in names}, **extra)


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The data of a run: its shape and where batches come from."""
  source: Data  # what score_jax.data.datasets reads (dataset name, folder, size, scaling)
  num_classes: int  # the model's classes, checked against the dataset's
  seed: int
  train_batch_size: int
  eval_batch_size: int
  # Label k's name where the data names its classes (class subfolders of data.path); filled
  # by make_plan when it reads the data, else ().
  class_names: Tuple[str, ...] = ()

  @property
  def is_images(self) -> bool:
    return self.source.is_images

  @property
  def centered(self) -> bool:
    return self.source.centered

  @property
  def is_latents(self) -> bool:
    return self.source.is_latents

  @property
  def pixel_dataset(self) -> str:
    """The dataset the images come from: data.dataset, or for latents the encoded one's."""
    if not self.is_latents:
      return self.source.dataset
    from score_jax.data import latents  # pylint: disable=g-import-not-at-top
    source = latents.source_meta(self.source.path) if self.source.path else None
    return "" if source is None else str(source["dataset"])

  def to_images(self, x: Any, quantization: str) -> Any:
    """Model-space samples [N, ...] -> uint8 images [N, H, W, C]: the data scaler's inverse, or
    for latents the VAE's decoding (score_jax.data.latents.latent_decoder: data.vae, else the
    VAE of data.path's latents)."""
    from score_jax.data.scaling import to_uint8  # pylint: disable=g-import-not-at-top

    if not self.is_latents:
      return to_uint8(x, self.centered, quantization)
    from score_jax.data import latents  # pylint: disable=g-import-not-at-top
    return to_uint8(latents.latent_decoder(self.source)(x), True, quantization)

  def to_unit(self, x: Any) -> Any:
    """Model-space samples -> float images in [0, 1] (unclipped), decoded for latents."""
    from score_jax.data.scaling import data_scaler  # pylint: disable=g-import-not-at-top

    if not self.is_latents:
      return data_scaler(self.centered).inverse(x)
    from score_jax.data import latents  # pylint: disable=g-import-not-at-top
    return data_scaler(True).inverse(latents.latent_decoder(self.source)(x))

  @property
  def name(self) -> str:
    """The dataset's name; for your own images (data.path) 'images-<base name>-<hash of the
    absolute path>', and 'latents-<base name>-<hash>' for latents, so that results and cached
    FID statistics of two folders never mix."""
    if self.source.dataset.lower() not in ("images", "folder", "latents") or not self.source.path:
      return self.source.dataset
    path = os.path.realpath(os.path.expanduser(self.source.path))
    base = os.path.splitext(os.path.basename(path.rstrip(os.sep)))[0]
    kind = "latents" if self.is_latents else "images"
    return f"{kind}-{base}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"

  @property
  def image_size(self) -> int:
    return self.source.image_size

  @property
  def num_channels(self) -> int:
    return self.source.num_channels

  def shape(self, batch: int) -> Tuple[int, ...]:
    """[B, 2] for 2-D toy data, else [B, H, W, C]."""
    return self.source.shape(batch)

  def batches(self, split: str = "train", *, evaluation: bool = False,
              batch_size: Optional[int] = None, seed: Optional[int] = None, **kwargs: Any):
    """`datasets.get_dataset` with the run's batch size (training or eval), seed and classes."""
    from score_jax.data import datasets  # pylint: disable=g-import-not-at-top

    if batch_size is None:
      batch_size = self.eval_batch_size if evaluation else self.train_batch_size
    return datasets.get_dataset(self.source, split, batch_size=batch_size,
                                seed=self.seed if seed is None else seed,
                                num_classes=self.num_classes, evaluation=evaluation, **kwargs)


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
  """How the network becomes a score (models.get_score_fn's options)."""
  continuous: bool
  parameterization: str
  sigma_data: float
  num_classes: int  # 0: unconditional, labels ignored
  trigflow_label_scale: float = 999.0 / (0.5 * math.pi)  # 'trigflow' networks' time label

  def kwargs(self) -> Dict[str, Any]:
    return {"continuous": self.continuous, "parameterization": self.parameterization,
            "sigma_data": self.sigma_data, "trigflow_label_scale": self.trigflow_label_scale}


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
  """The options of the configured sampler that the programs around it need."""
  method: str
  guidance_weight: float
  guidance_interval: Optional[Tuple[float, float]]  # None: guidance at every noise level
  ode_tolerances: Tuple[Tuple[str, float], ...]  # rtol, atol, eps of the probability-flow ODE
  controllable: bool  # projections per step (inpaint, colorize): not ode, consistency, meanflow
  time_grid: Optional[TimeGridSpec]  # a grid fitted to the model; None: the sampler's own


@dataclasses.dataclass(frozen=True)
class TimeGridSpec:
  """sampling.schedule = 'optimized' with unipc: the grid to fit (score_jax.samplers.time_grids)."""
  order: int
  variant: str
  num_steps: int  # 0: the sampler's default
  eps: float
  guidance_interval: Tuple[float, float]
  guide: Optional[Tuple[str, int]]  # the autoguidance guide's workdir and step
  batch_size: int
  iters: int
  seed: int


@dataclasses.dataclass(frozen=True)
class TrainLoop:
  """The training loop's numbers."""
  n_iters: int
  batch_size: int
  microbatches: int
  snapshot_freq: int
  snapshot_freq_for_preemption: int
  snapshot_sampling: bool
  log_freq: int
  eval_freq: int
  phema_snapshot_freq: int
  phema_sigma_rels: Tuple[float, ...]  # () : post-hoc EMA off
  eval_loss: bool  # the eval split's loss every eval_freq steps
  sample_batch_size: int  # the snapshot grids' samples
  zero_nonfinite_grads: bool  # EDM: non-finite gradients zeroed, else the step is skipped
  init_from_teacher: bool  # a fresh run starts from the teacher's EMA weights
  seed: int


@dataclasses.dataclass(frozen=True)
class EvalSpec(Eval):
  """The eval mode's options (the eval section's keys) with what they are resolved against:
  the checkpoint numbering of training, the seed, and the fingerprints of the results."""
  snapshot_freq: int  # of training: checkpoint index k is step k * snapshot_freq
  n_iters: int
  seed: int
  fingerprint: str  # of everything that changes a checkpoint's results
  sampling_fingerprint: str  # of what fixes a sampling round's samples

  def likelihood_kwargs(self) -> Dict[str, Any]:
    return {"hutchinson": self.hutchinson, "rtol": self.likelihood_rtol,
            "atol": self.likelihood_atol, "eps": self.likelihood_eps}

  def checkpoints(self) -> List[Tuple[int, int]]:
    """[(index k, training step)] of begin_ckpt..end_ckpt (see score_jax.run.evaluate).

    Raises:
      ConfigError: begin_ckpt < 1 (no checkpoint precedes the first step), an
        empty range, or a range that starts after the end of training.
    """
    return checkpoint_range(self.begin_ckpt, self.end_ckpt, self.snapshot_freq, self.n_iters)


def checkpoint_range(begin: int, end: int, freq: int, n_iters: int) -> List[Tuple[int, int]]:
  """[(index k, training step)] of checkpoint indices begin..end: k is step k * freq, and the
  index past the last multiple the final step n_iters (score_jax.run.evaluate's numbering)."""
  last = math.ceil(n_iters / freq)  # index of the final step
  if begin < 1:
    raise ConfigError(f"eval.begin_ckpt must be >= 1 (index k is step k * snapshot_freq = "
                      f"k * {freq}; training writes no checkpoint at step 0), got {begin}.")
  if end < begin:
    raise ConfigError(f"eval.end_ckpt ({end}) is smaller than eval.begin_ckpt ({begin}).")
  if begin > last:
    raise ConfigError(
        f"eval.begin_ckpt = {begin} is step {begin * freq}, after the end of training "
        f"(n_iters = {n_iters}, snapshot_freq = {freq}: indices 1..{last}). Use e.g. "
        f"--config.eval.begin_ckpt=1 --config.eval.end_ckpt={last}.")
  if end > last:
    logging.info("eval.end_ckpt = %d is past the end of training; evaluating up to index %d "
                 "(step %d).", end, last, n_iters)
  return [(k, min(k * freq, n_iters)) for k in range(begin, min(end, last) + 1)]


@dataclasses.dataclass(frozen=True)
class SampleSpec(Sample):
  """The sample mode's options (the sample section's keys) with the seed and quantization."""
  quantization: str  # how samples become uint8 images (eval.quantization)
  seed: int


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """Everything a run builds once from its settings; the modes consume it."""
  settings: Settings  # for config.json, load_run(...).settings and the checkpoint check
  sde: sde_lib.SDE
  model: nn.Module
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  data: DataSpec
  score: ScoreSpec
  train_loss: builders.LossFn  # loss_fn(params, rng, x, y, augment_labels) with dropout
  eval_loss: builders.LossFn  # the same objective without dropout or label dropout
  lr_schedule: optax.Schedule
  ema_decay: Callable[[Array], Any]  # decay(step) of the parameters' EMA
  phema_gammas: Tuple[float, ...]  # exponents of the post-hoc EMA profiles (empty: off)
  augment: Optional[augment_lib.Augment]  # None: off
  sampler: builders.SamplerFn  # the configured sampler
  sampler_on_grid: Callable[[Any], builders.SamplerFn]  # the same on an explicit time grid
  sampling: SamplingSpec
  loop: TrainLoop
  eval: EvalSpec
  sample: SampleSpec
  teacher: Optional["Teacher"] = None  # the run training.teacher_workdir names, if any

  @property
  def replicated(self) -> NamedSharding:
    return sharding.replicated(self.mesh)

  @property
  def batch_sharding(self) -> NamedSharding:
    """The batch's first axis over all devices (every axis of the mesh)."""
    return sharding.batch_sharding(self.mesh)

  def state_shardings(self, tree: Any) -> Any:
    """The train state's sharding per array of `tree` (score_jax.run.sharding): split
    along the mesh's 'fsdp' axis (training.sharding = 'fsdp'), else replicated."""
    return sharding.state_shardings(tree, self.mesh)


@dataclasses.dataclass(frozen=True, eq=False)
class Teacher:
  """A trained run an objective learns from (training.teacher_workdir): its workdir, the
  checkpoint to use (None: the newest intact one) and its own plan (SDE, network,
  parameterization); its weights are read where a training starts
  (score_jax.run.state.teacher_params)."""
  workdir: str
  step: Optional[int]
  plan: "Plan"


def _sampling_fingerprint(s: Settings) -> Dict[str, Any]:
  """What fixes an eval sampling round's samples: a change makes existing shards stale."""
  out = {"sampling": s.raw["sampling"], "batch_size": s.eval.batch_size,
         "model": s.raw["model"], "seed": s.seed, "sde": s.training.sde,
         "continuous": s.training.continuous}
  if s.data.is_images and s.eval.quantization != "round":  # older shards were rounded
    out["quantization"] = s.eval.quantization
  if s.sample.guide_workdir:  # autoguidance
    out["guide"] = [s.sample.guide_workdir, s.sample.guide_step]
  return out


def _eval_fingerprint(s: Settings) -> str:
  """Everything that changes a checkpoint's results (not the waiting options)."""
  ev = {k: v for k, v in s.raw["eval"].items()
        if k not in ("begin_ckpt", "end_ckpt", "wait_timeout_s", "poll_interval_s")}
  return fingerprint({"eval": ev, "sampling": _sampling_fingerprint(s), "data": s.raw["data"]})


def data_spec(s: Settings) -> DataSpec:
  """The data of a run (a plan's `data`; also alone, for its batches)."""
  return DataSpec(s.data, s.model.num_classes, s.seed, s.training.batch_size, s.eval.batch_size)


def get_dataset(s: Settings, split: str = "train", **kwargs: Any):
  """The run's batches of split: `data_spec(s).batches(split, ...)`."""
  return data_spec(s).batches(split, **kwargs)


def _time_grid(s: Settings) -> Optional[TimeGridSpec]:
  from score_jax.run import grids

  if not grids.wanted(s):
    return None
  c = s.sampling
  return TimeGridSpec(order=c.order, variant=c.unipc_variant, num_steps=c.num_steps, eps=c.eps,
                      guidance_interval=tuple(c.guidance_interval),
                      guide=(s.sample.guide_workdir, s.sample.guide_step),
                      batch_size=c.grid_batch_size, iters=c.grid_iters, seed=s.seed)


def assemble(s: Settings, sde: sde_lib.SDE, model: Optional[nn.Module],
             tx: Optional[optax.GradientTransformation],
             mesh: Optional[jax.sharding.Mesh], teacher: Optional[Teacher] = None) -> Plan:
  """The plan of settings with these objects, without checks (`make_plan` checks and builds
  them; tests pass None for what they do not use)."""
  t, smp = s.training, s.sampling
  interval = tuple(smp.guidance_interval)
  return Plan(
      settings=s, sde=sde, model=model, tx=tx, mesh=mesh,
      data=data_spec(s),
      score=ScoreSpec(t.continuous, s.model.parameterization, s.model.sigma_data,
                      s.model.num_classes, s.model.trigflow_label_scale),
      train_loss=builders.get_loss_fn(s, sde, model, train=True,
                                      teacher=None if teacher is None else teacher.plan),
      eval_loss=builders.get_loss_fn(s, sde, model, train=False,
                                     teacher=None if teacher is None else teacher.plan),
      lr_schedule=builders.get_lr_schedule(s),
      ema_decay=builders.get_ema_decay(s),
      phema_gammas=phema.gammas(s),
      augment=builders.get_augment(s),
      sampler=builders.get_sampler(s, sde),
      sampler_on_grid=lambda timesteps: builders.get_sampler(s, sde, timesteps),
      sampling=SamplingSpec(
          method=smp.method.lower(), guidance_weight=smp.guidance_weight,
          guidance_interval=None if interval == (0.0, 0.0) else interval,
          ode_tolerances=(("rtol", smp.rtol), ("atol", smp.atol), ("eps", smp.eps)),
          controllable=smp.method.lower() not in (
              ("ode", "consistency") + sampler_specs.AVERAGE_VELOCITY),
          time_grid=_time_grid(s)),
      loop=_take(TrainLoop, t, phema_sigma_rels=s.model.phema_sigma_rels,
                 eval_loss=s.eval.enable_loss, sample_batch_size=smp.batch_size,
                 zero_nonfinite_grads=s.optim.nonfinite_grads == "zero", seed=s.seed),
      eval=_take(EvalSpec, s.eval, snapshot_freq=t.snapshot_freq, n_iters=t.n_iters, seed=s.seed,
                 fingerprint=_eval_fingerprint(s),
                 sampling_fingerprint=fingerprint(_sampling_fingerprint(s))),
      sample=_take(SampleSpec, s.sample, quantization=s.eval.quantization, seed=s.seed),
      teacher=teacher)


def _log_data(s: Settings, source: Any) -> None:
  """What the run trains on: the number of examples and the classes (names where known)."""
  if not s.data.is_images:
    return
  classes = ""
  if source.num_classes:
    names = ", ".join(f"{k}={n}" for k, n in enumerate(source.class_names))
    classes = f", {source.num_classes} classes" + (f" ({names})" if names else "")
    if not s.model.num_classes:
      classes += (f"; unconditional training (model.num_classes = 0): set "
                  f"--config.model.num_classes={source.num_classes} to train on the labels")
  logging.info("Data: %s, %d images%s.", data_spec(s).name, len(source), classes)


def check_network(s: Settings, model: nn.Module) -> None:
  """The network maps data of the settings' shape to that shape (shapes only: no compile)."""
  shape = s.data.shape(2)
  try:
    out = jax.eval_shape(lambda r: model.apply(models.init_model(r, model, shape),
                                               jnp.zeros(shape), jnp.ones((2,))),
                         jax.random.PRNGKey(0))
  except Exception as e:  # noqa: BLE001 - re-raised with the config context
    raise ConfigError(f"The network {s.model.name!r} cannot take data of shape {shape[1:]} "
                      f"(data.image_size / data.num_channels): {e}") from e
  if out.shape != shape:
    raise ConfigError(f"The network {s.model.name!r} maps data of shape {shape[1:]} to "
                      f"{out.shape[1:]}; check data.image_size and data.num_channels.")


def _teacher(s: Settings, mesh: jax.sharding.Mesh) -> Optional[Teacher]:
  """The run training.teacher_workdir names, planned on the same mesh (its weights are read
  later, where a training starts); None where none is named.

  Raises:
    WorkdirError: the folder holds no config.json.
    ConfigError: the teacher is not a diffusion run, or models data of another shape.
  """
  t = s.training
  if not t.teacher_workdir:
    return None
  path = os.path.join(t.teacher_workdir, "config.json")
  if not os.path.isfile(path):
    raise WorkdirError(f"training.teacher_workdir = {t.teacher_workdir} has no config.json: not "
                       "a score_jax run (train one with main.py --mode=train, or convert a "
                       "checkpoint with python -m score_jax.convert).")
  ts = from_json(path)
  if ts.training.objective not in DIFFUSION_OBJECTIVES:
    raise ConfigError(f"The teacher {t.teacher_workdir} was trained with training.objective = "
                      f"{ts.training.objective!r}; a teacher is a diffusion run "
                      f"({' or '.join(repr(o) for o in DIFFUSION_OBJECTIVES)}).")
  if ts.data.shape(1) != s.data.shape(1):
    raise ConfigError(f"The teacher {t.teacher_workdir} models data of shape "
                      f"{ts.data.shape(1)[1:]}, this run {s.data.shape(1)[1:]}; use a teacher "
                      "of the same data.")
  if ts.model.num_classes != s.model.num_classes:
    raise ConfigError(f"The teacher {t.teacher_workdir} has model.num_classes = "
                      f"{ts.model.num_classes}, this run {s.model.num_classes}; set the same.")
  # Its own plan, without data and without a teacher of its own (the same mesh).
  plan = make_plan(ts, need_data=False, mesh=mesh)
  return Teacher(t.teacher_workdir, t.teacher_step or None, plan)


def mesh_fsdp_size(s: Settings, num_devices: int) -> int:
  """The length of the mesh's 'fsdp' axis: training.fsdp_size (0: all devices) with
  training.sharding = 'fsdp', else 1."""
  if s.training.sharding != "fsdp":
    return 1
  return s.training.fsdp_size or num_devices


def make_plan(s: Settings, need_data: bool = True, *,
              model: Optional[nn.Module] = None,
              mesh: Optional[jax.sharding.Mesh] = None) -> Plan:
  """Checks the settings against the devices and data, then builds the plan.

  need_data=False skips the dataset check: sampling from a checkpoint, e.g.
  one converted from the reference, needs no data. model, mesh: reuse these
  (another plan's, e.g. other sampling settings for the same network); a mesh
  is a `sharding.make_mesh` ('data', 'fsdp'), possibly of some devices only.
  """
  from score_jax.data import datasets  # pylint: disable=g-import-not-at-top

  check_devices(s, jax.device_count(), jax.process_count())
  sde, model = builders.get_sde(s), model or builders.get_model(s)
  mesh = mesh or sharding.make_mesh(mesh_fsdp_size(s, jax.device_count()))
  # Sampling and evaluation without data need the network only, not the teacher it learned
  # from (which may be gone).
  teacher = _teacher(s, mesh) if need_data else None
  plan = assemble(s, sde, model, builders.get_optimizer(s), mesh,  # refuses discrete training
                  teacher)
  if need_data:                                                     # without a chain (the loss)
    # An unknown or missing dataset, or labels the model lacks classes for: a clear error here.
    source = datasets.open_data(s.data, "train", s.model.num_classes)
    _log_data(s, source)
    if source.class_names:
      plan = dataclasses.replace(plan, data=dataclasses.replace(
          plan.data, class_names=tuple(source.class_names)))
  check_network(s, model)
  return plan
