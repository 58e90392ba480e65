"""The train state and its checkpoints' shapes: what train, evaluate, sample, `load_run`,
post-hoc EMA and the converters share (so no mode imports another)."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import flax
import jax
import jax.numpy as jnp

from score_jax import files
from score_jax.errors import ConfigError
from score_jax.models import init_model
from score_jax.run import checkpoints
from score_jax.run.plan import Plan
from score_jax.run import settings as settings_lib
from score_jax.run.settings import Settings

Array = jax.Array

__all__ = ["TrainState", "PhemaTrainState", "init_state", "abstract_state", "restore_ema_params",
           "teacher_params", "start_from_teacher", "check_checkpoint", "check_workdir",
           "save_config"]

# Settings that fix the data's shape or the network's inputs: a checkpoint only fits the
# values it was trained with, whether or not they change a parameter's shape (a
# convolutional network takes any image size, and samples noise at a size it never saw).
SHAPE_KEYS = (("data", "image_size"), ("data", "num_channels"), ("model", "num_classes"))


@flax.struct.dataclass
class TrainState:
  step: Array  # int32 [] completed optimizer steps
  params: Any
  opt_state: Any
  ema_params: Any


@flax.struct.dataclass
class PhemaTrainState(TrainState):
  """The train state with the power-function EMAs of model.phema_sigma_rels (score_jax.run.phema)."""
  phema: Tuple[Any, ...]  # one parameter tree per profile, float32 like ema_params


def _init_fn(plan: Plan):
  """rng -> a fresh train state (unplaced), with the post-hoc EMA profiles of
  plan.phema_gammas, if any."""
  shape = plan.data.shape(1)

  def init(rng):
    params = init_model(rng, plan.model, shape)["params"]
    common = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=plan.tx.init(params),
                  ema_params=params)
    if plan.phema_gammas:
      return PhemaTrainState(**common, phema=tuple(params for _ in plan.phema_gammas))
    return TrainState(**common)

  return init


def init_state(plan: Plan, rng: Array) -> TrainState:
  """A fresh train state laid over the mesh as plan.state_shardings says (replicated, or
  split along the 'fsdp' axis: then no device ever holds the whole state), with the
  post-hoc EMA profiles of plan.phema_gammas, if any."""
  init = _init_fn(plan)
  shardings = jax.tree.map(lambda a: a.sharding, abstract_state(plan))
  # Every leaf its own buffer: the train step donates the state, and params, ema_params
  # (and the profiles) start equal.
  return jax.jit(lambda r: jax.tree.map(jnp.copy, init(r)), out_shardings=shardings)(rng)


def abstract_state(plan: Plan) -> TrainState:
  """The train state's shapes and shardings over plan.mesh (`init_state`'s), without
  allocating it."""
  shapes = jax.eval_shape(_init_fn(plan), jax.random.PRNGKey(0))
  # Shardings on the target let a checkpoint written on N devices load on M.
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                      plan.state_shardings(shapes))


def restore_ema_params(plan: Plan, ckpt_dir: str, step: int) -> Any:
  """The EMA parameters of checkpoint `step`, replicated over plan.mesh (whatever the
  training's sharding: evaluation and sampling take whole parameters).

  A checkpoint with or without post-hoc EMA profiles (model.phema_sigma_rels)
  loads whether or not the settings track them: only ema_params is used.

  Raises:
    CheckpointMismatchError: the checkpoint does not fit the settings (`check_checkpoint`).
  """
  template = abstract_state(plan)
  saved = check_checkpoint(plan, ckpt_dir, step, template)
  count = len(saved["phema"]) if isinstance(saved, dict) and "phema" in saved else 0
  if count != len(getattr(template, "phema", ())):
    base = {k: getattr(template, k) for k in ("step", "params", "opt_state", "ema_params")}
    template = (PhemaTrainState(**base, phema=(template.ema_params,) * count) if count
                else TrainState(**base))
  # Read whole onto every device (no gather afterwards); the rest keeps the training's layout.
  whole = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=plan.replicated),
                       template.ema_params)
  return checkpoints.restore(ckpt_dir, step, template.replace(ema_params=whole)).ema_params


def teacher_params(plan: Plan) -> Optional[Any]:
  """The EMA parameters of plan's teacher (training.teacher_workdir, at training.teacher_step
  or its newest intact checkpoint), replicated over plan.mesh; None without a teacher.

  Raises:
    MissingCheckpointError, DamagedCheckpointError, CheckpointMismatchError: as load_run.
  """
  teacher = plan.teacher
  if teacher is None:
    return None
  ckpt_dir = os.path.join(teacher.workdir, "checkpoints")
  step, params = checkpoints.restore_intact(
      ckpt_dir, lambda k: restore_ema_params(teacher.plan, ckpt_dir, k),
      -1 if teacher.step is None else teacher.step)
  logging.info("Teacher: %s at step %d.", teacher.workdir, step)
  return params


def start_from_teacher(plan: Plan, state: TrainState, teacher: Any) -> TrainState:
  """A fresh state whose parameters (and EMA, post-hoc EMA profiles) are the teacher's
  (training.init_from_teacher), with the optimizer state of those parameters.

  The teacher's tree must be the network's, or the network's 'net' subtree (a network
  with a head of its own around the teacher's, whose other parameters keep their
  initialization).

  Raises:
    ConfigError: the teacher's parameters do not fit the network.
  """
  params = state.params
  fits = lambda a, b: _shapes(a) == _shapes(b) and (
      jax.tree.structure(a) == jax.tree.structure(b))
  if fits(params, teacher):
    params = teacher
  elif isinstance(params, dict) and "net" in params and fits(params["net"], teacher):
    params = {**params, "net": teacher}
  else:
    raise ConfigError(f"training.init_from_teacher: the teacher's network "
                      f"({type(plan.teacher.plan.model).__name__}) does not fit this run's "
                      f"({type(plan.model).__name__}); use the teacher's model settings or set "
                      "training.init_from_teacher = False.")
  # Copies: the train step donates the state, whose buffers must be neither the teacher's
  # (the step's argument too) nor shared between leaves (a head's parameters kept from
  # `state`, already on the mesh, in both params and ema_params).
  params = jax.tree.map(lambda p, like: jnp.array(p, like.dtype, copy=True), params,
                        state.params)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  new = state.replace(params=params, opt_state=plan.tx.init(params), ema_params=copy(params))
  if isinstance(state, PhemaTrainState):
    new = new.replace(phema=tuple(copy(params) for _ in state.phema))
  return jax.device_put(new, plan.state_shardings(new))


def check_workdir(plan: Plan, workdir: str) -> None:
  """Refuses settings that WORKDIR's newest checkpoint with readable metadata does not fit
  (`check_checkpoint`); nothing to check where there is no checkpoint yet. Training calls it
  before it writes config.json (which then still names what the checkpoints were trained
  with), eval before it waits for checkpoints."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for step in reversed(checkpoints.finished_steps(ckpt_dir)):
    try:
      check_checkpoint(plan, ckpt_dir, step)
      return
    except checkpoints.DamagedCheckpointError:
      continue  # restoring skips it too, with a warning naming it


def check_checkpoint(plan: Plan, ckpt_dir: str, step: int,
                     template: Optional[TrainState] = None) -> Any:
  """Checks that checkpoint `step` fits plan's settings before anything is read; returns
  the saved tree (`checkpoints.saved_tree`).

  Two comparisons, with the run's own config (the config.json beside ckpt_dir) where
  there is one: the SHAPE_KEYS (image size, channels, classes), which must agree even
  where the parameters would fit; and the EMA parameters' shapes against those the
  settings' network has, whose mismatch names the model keys that differ from the run's
  config or else the first parameter that differs.

  Raises:
    CheckpointMismatchError: in one line, with the keys (or parameter) and the fix.
  """
  ckpt_dir = os.path.abspath(ckpt_dir)
  saved = checkpoints.saved_tree(ckpt_dir, step)
  config_path = os.path.join(os.path.dirname(ckpt_dir), "config.json")
  trained = _trained_settings(config_path)
  mine = plan.settings
  if trained is not None:
    differ = [(f"{a}.{k}", getattr(getattr(mine, a), k), getattr(getattr(trained, a), k))
              for a, k in SHAPE_KEYS
              if getattr(getattr(mine, a), k) != getattr(getattr(trained, a), k)]
    if mine.data.shape(1) == trained.data.shape(1):  # e.g. 2-D toy data has no image size
      differ = [d for d in differ if not d[0].startswith("data.")]
    if differ:
      raise _keys_error(differ, ckpt_dir, config_path)
  if template is None:
    template = abstract_state(plan)
  wanted = _shapes(template.ema_params)
  have = _shapes(saved.get("ema_params", {})) if isinstance(saved, dict) else {}
  if wanted == have:
    return saved
  if trained is not None:
    differ = [(f"model.{k}", mine.model.get(k), trained.model.get(k))
              for k in _model_keys(mine.model, trained.model)
              if mine.model.get(k) != trained.model.get(k)]
    if differ:
      raise _keys_error(differ, ckpt_dir, config_path)
  path = next(p for p in sorted(set(wanted) | set(have)) if wanted.get(p) != have.get(p))
  show = lambda shape: "absent" if shape is None else f"shape {shape}"
  raise checkpoints.CheckpointMismatchError(
      f"Checkpoint {step} in {ckpt_dir} does not fit the network these settings build: "
      f"parameter {path} is {show(have.get(path))} there and {show(wanted.get(path))} here. "
      "Check model.name, the model's architecture keys (model.nf, model.ch_mult, "
      "model.hidden_sizes, ...), data.num_channels and model.num_classes against the run's "
      f"config{'' if trained is None else ' ' + config_path}.")


def _trained_settings(path: str) -> Optional[Settings]:
  """The settings of a run's config.json, or None where there is none (or it does not load)."""
  if not os.path.isfile(path):
    return None
  try:
    return settings_lib.from_json(path)
  except (ValueError, OSError) as e:  # a hand-edited file: the parameter check still runs
    logging.warning("Cannot compare with %s (%s); checking the parameters' shapes only.", path, e)
    return None


def _model_keys(*models: settings_lib.Model) -> List[str]:
  """The model keys that shape a network: its name, embedding, classes and architecture."""
  keys = ["name", "embedding_type", "num_classes"]
  for m in models:
    keys += [k for k, _ in m.arch if k not in keys]
  return keys


def _keys_error(differ: List[Tuple[str, Any, Any]], ckpt_dir: str,
                config_path: str) -> checkpoints.CheckpointMismatchError:
  """'data.image_size=16 but the checkpoints in W/checkpoints were trained with 8 (...)'."""
  flag = lambda v: "(" + ",".join(map(str, v)) + ")" if isinstance(v, tuple) else str(v)
  mine = ", ".join(f"{k}={flag(a)}" for k, a, _ in differ)
  theirs = (flag(differ[0][2]) if len(differ) == 1
            else ", ".join(f"{k}={flag(b)}" for k, _, b in differ))
  use = " ".join(f"--config.{k}={flag(b)}" for k, _, b in differ)
  plural = "s" if len(differ) > 1 else ""
  return checkpoints.CheckpointMismatchError(
      f"{mine} but the checkpoints in {ckpt_dir} were trained with {theirs} ({config_path}): "
      f"use {use} (or drop the override{plural}), or train a new run in another --workdir.")


def _shapes(tree: Any) -> Dict[str, Tuple[int, ...]]:
  """'Dense_0/kernel' -> shape, for every array of a parameter tree (or its saved metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
          for path, leaf in leaves}


def save_config(settings: Settings, workdir: str) -> None:
  """Writes WORKDIR/config.json (the resolved config), atomically."""
  with files.atomic_write(os.path.join(workdir, "config.json"), "w") as f:
    f.write(settings.to_json())
