"""The train state and its checkpoints' shapes: what train, evaluate, sample, `load_run`,
post-hoc EMA and the converters share (so no mode imports another)."""

from __future__ import annotations

import os
from typing import Any, Tuple

import flax
import jax
import jax.numpy as jnp

from score_jax import files
from score_jax.models import init_model
from score_jax.run import checkpoints
from score_jax.run.plan import Plan
from score_jax.run.settings import Settings

Array = jax.Array

__all__ = ["TrainState", "PhemaTrainState", "init_state", "abstract_state", "restore_ema_params",
           "save_config"]


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


def init_state(plan: Plan, rng: Array) -> TrainState:
  """A fresh train state, replicated over the mesh (with the post-hoc EMA profiles of
  plan.phema_gammas, if any)."""
  shape = plan.data.shape(1)

  @jax.jit
  def init(rng):
    params = init_model(rng, plan.model, shape)["params"]
    common = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=plan.tx.init(params),
                  ema_params=params)
    if plan.phema_gammas:
      return PhemaTrainState(**common, phema=tuple(params for _ in plan.phema_gammas))
    return TrainState(**common)

  return jax.device_put(init(rng), plan.replicated)


def abstract_state(plan: Plan) -> TrainState:
  """The train state's shapes, replicated over the mesh, without allocating it."""
  shapes = jax.eval_shape(lambda r: init_state(plan, r), jax.random.PRNGKey(0))
  # Shardings on the target let a checkpoint written on N devices load on M.
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=plan.replicated),
                      shapes)


def restore_ema_params(plan: Plan, ckpt_dir: str, step: int) -> Any:
  """The EMA parameters of checkpoint `step`, replicated over plan.mesh.

  A checkpoint with or without post-hoc EMA profiles (model.phema_sigma_rels)
  loads whether or not the settings track them: only ema_params is used.
  """
  template = abstract_state(plan)
  saved = checkpoints.saved_tree(ckpt_dir, step)
  count = len(saved["phema"]) if isinstance(saved, dict) and "phema" in saved else 0
  if count != len(getattr(template, "phema", ())):
    base = {k: getattr(template, k) for k in ("step", "params", "opt_state", "ema_params")}
    template = (PhemaTrainState(**base, phema=(template.ema_params,) * count) if count
                else TrainState(**base))
  return checkpoints.restore(ckpt_dir, step, template).ema_params


def save_config(settings: Settings, workdir: str) -> None:
  """Writes WORKDIR/config.json (the resolved config), atomically."""
  with files.atomic_write(os.path.join(workdir, "config.json"), "w") as f:
    f.write(settings.to_json())
