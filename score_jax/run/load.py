"""One public way to load a run: `load_run(workdir, step=None)`.

    import score_jax
    run = score_jax.load_run("runs/digits")              # newest checkpoint, EMA weights
    x, nfe = score_jax.dpm_solver_pp_sample(key, run.sde, run.score_fn, (16, 8, 8, 1), 20)

Works on any workdir that holds a config.json and orbax checkpoints: one
written by `--mode=train`, or one made by `python -m score_jax.convert` from a
released reference checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np

from score_jax.run import checkpoints
from score_jax.run import programs
from score_jax.run.plan import Plan, make_plan
from score_jax import sde as sde_lib
from score_jax.run import settings as settings_lib
from score_jax.errors import ConfigError, WorkdirError

Array = jax.Array

__all__ = ["Run", "load_run", "load_guide"]


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained run: its settings, SDE, network, EMA parameters and score function."""
  workdir: str
  settings: settings_lib.Settings
  plan: Plan  # the run plan (its settings, SDE, network, samplers, ...)
  params: Any  # the EMA parameters, replicated over the devices
  step: int

  @property
  def config(self) -> settings_lib.Settings:
    """The run's resolved config (WORKDIR/config.json) as validated settings."""
    return self.settings

  @property
  def sde(self) -> sde_lib.SDE:
    return self.plan.sde

  @property
  def model(self) -> nn.Module:
    return self.plan.model

  @property
  def programs(self) -> programs.Programs:
    """The run's jitted programs (samplers, likelihood, ...), built on first use."""
    return programs.Programs(self.plan)

  def score_fn(self, x: Array, t: Array, y: Optional[Array] = None) -> Array:
    """s(x, t) ~ grad_x log p_t(x) of the EMA network; y: class labels [B] (conditional models)."""
    return programs.network_score_factory(self.plan)(self.params, y)(x, t)


def load_run(workdir: str, step: Optional[int] = None) -> Run:
  """Loads WORKDIR's config and the EMA parameters of checkpoint `step` (default: the newest
  intact one; damaged newer ones are skipped with a warning).

  Raises:
    WorkdirError: no such folder, or no config.json in it.
    MissingCheckpointError: no checkpoint (of that step).
    DamagedCheckpointError: checkpoint `step` (or every one) is damaged.
    CheckpointMismatchError: the checkpoint does not fit the config's network.
  """
  from score_jax.run import state as run_state

  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise WorkdirError(f"{workdir} has no config.json: not a score_jax run (train one with "
                       "main.py --mode=train, or convert a checkpoint with python -m "
                       "score_jax.convert.reference).")
  s = settings_lib.from_json(path)
  plan = make_plan(s, need_data=False)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  found, params = checkpoints.restore_intact(
      ckpt_dir, lambda k: run_state.restore_ema_params(plan, ckpt_dir, k),
      -1 if step is None else step)
  return Run(workdir=workdir, settings=s, plan=plan, params=params, step=found)


def load_guide(settings: settings_lib.Settings,
               plan: Plan) -> Optional[programs.Guide]:
  """The autoguidance guide of sample.guide_workdir / sample.guide_step, or None (off).

  The guide is any run of the same SDE and data shape (an earlier checkpoint
  of the same run, a smaller network); sampling.guidance_weight is its weight.

  Raises:
    ConfigError: the guide's SDE or data shape differs from the settings'.
    WorkdirError, MissingCheckpointError: as for `load_run`.
  """
  s = settings.sample
  if not s.guide_workdir:
    return None
  if settings.sampling.guidance_weight == 0.0:
    logging.warning("sample.guide_workdir is set but sampling.guidance_weight = 0: no guide.")
    return None
  guide = load_run(s.guide_workdir, s.guide_step)
  t = np.linspace(0.0, 1.0, 11) * (plan.sde.T - 1e-3) + 1e-3
  same_sde = type(guide.sde) is type(plan.sde) and guide.sde.T == plan.sde.T and all(
      np.allclose(np.asarray(f(guide.sde)(t)), np.asarray(f(plan.sde)(t)), rtol=1e-6)
      for f in (lambda e: e.mean_coef, lambda e: e.marginal_std))
  if not same_sde:
    raise ConfigError(f"The guide {s.guide_workdir} has another SDE "
                      f"({guide.settings.training.sde}) than this run "
                      f"({settings.training.sde}); autoguidance needs the same one.")
  if guide.settings.data.shape(1) != settings.data.shape(1):
    raise ConfigError(f"The guide {s.guide_workdir} models data of shape "
                      f"{guide.settings.data.shape(1)[1:]}, this run {settings.data.shape(1)[1:]}.")
  logging.info("Autoguidance: guide %s at step %d, weight %g.", s.guide_workdir, guide.step,
               settings.sampling.guidance_weight)
  return programs.Guide(programs.network_score_factory(guide.plan), guide.params,
                        guide.settings.model.num_classes > 0)
