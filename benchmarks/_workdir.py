"""What the scripts in benchmarks/ share: a trained run's config and EMA parameters."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any, Callable, Optional, Tuple

import ml_collections

from score_jax import builders, evaluate, train


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the configs use (ch_mult, hidden_sizes, ...)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load_config(workdir: str, config_file: str = "") -> ml_collections.ConfigDict:
  """The run's resolved config (WORKDIR/config.json, written by training), or config_file's."""
  if config_file:
    spec = importlib.util.spec_from_file_location("run_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {path}: is {workdir!r} a training run's workdir? (Or pass "
                            "--config=configs/....py, the config it was trained with.)")
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def load_run(workdir: str, config: ml_collections.ConfigDict,
             step: int = -1) -> Tuple[train.Setup, Any, int]:
  """(setup, EMA params replicated over the mesh, step) of checkpoint `step` (-1: the newest)."""
  setup = train.make_setup(config)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  step = evaluate.existing_step(ckpt_dir, step)
  return setup, evaluate.restore_ema_params(setup, ckpt_dir, step), step


def score_factory(setup: train.Setup, config: Optional[ml_collections.ConfigDict] = None
                  ) -> Tuple[Any, Callable]:
  """(sde, make(params, y) -> score_fn) for `config` (default setup.config): a config with
  other sampling settings (model.num_scales: the PC sampler's N) gets its own SDE."""
  config = config or setup.config
  sde = builders.get_sde(config)
  return sde, evaluate.network_score_factory(dataclasses.replace(setup, config=config, sde=sde))
