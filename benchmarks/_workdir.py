"""What the scripts in benchmarks/ share: a trained run's settings and EMA parameters."""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Optional, Tuple

from score_jax.run import checkpoints
from score_jax.run import builders
from score_jax.run import plan as plan_lib
from score_jax.run import programs
from score_jax.run import settings
from score_jax.run import state as run_state


def load_settings(workdir: str, config_file: str = "") -> settings.Settings:
  """The run's resolved config (WORKDIR/config.json, written by training), or config_file's."""
  if config_file:
    spec = importlib.util.spec_from_file_location("run_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return settings.from_config(module.get_config())
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {path}: is {workdir!r} a training run's workdir? (Or pass "
                            "--config=configs/....py, the config it was trained with.)")
  return settings.from_json(path)


def load_run(workdir: str, s: settings.Settings,
             step: int = -1) -> Tuple[plan_lib.Plan, Any, int]:
  """(plan, EMA params replicated over the mesh, step) of checkpoint `step` (-1: the newest)."""
  setup = plan_lib.make_plan(s)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  step = checkpoints.existing_step(ckpt_dir, step)
  return setup, run_state.restore_ema_params(setup, ckpt_dir, step), step


def with_settings(setup: plan_lib.Plan, s: settings.Settings,
                  guide: Optional[programs.Guide] = None) -> programs.Programs:
  """The run's programs for settings `s` (and an autoguidance guide): other sampling settings
  (model.num_scales: the PC sampler's N) get their own SDE; the network and mesh stay."""
  return programs.Programs(plan_lib.assemble(s, builders.get_sde(s), setup.model, setup.tx, setup.mesh),
                           guide=guide)
