"""Writing converted parameters as a score_jax workdir, atomically (every converter's last step)."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, List, Mapping

import jax
import ml_collections

from score_jax.convert.reference_layout import _names, as_settings

__all__ = ["write_workdir", "existing_steps", "refuse_existing"]


def existing_steps(ckpt_dir: str) -> List[str]:
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(os.listdir(ckpt_dir))


def refuse_existing(dst: str) -> None:
  """Raises FileExistsError when dst/checkpoints already holds something: the converters call
  it before reading their (large) source, and `write_workdir` again before writing."""
  ckpt_dir = os.path.join(os.path.abspath(dst), "checkpoints")
  existing = existing_steps(ckpt_dir)
  if existing:
    raise FileExistsError(f"{ckpt_dir} already holds {_names(existing)}; refusing to write a "
                          "converted checkpoint beside (or over) them. Choose a new DST.")


def write_workdir(dst: str, config: ml_collections.ConfigDict, params: Mapping[str, Any],
                  step: int) -> str:
  """Writes `params` as checkpoint `step` of workdir `dst` (params = EMA params).

  The workdir is assembled in a temporary folder beside `dst` and renamed
  into place, so an interrupted conversion leaves no partial `dst`.

  Returns:
    The checkpoint folder, dst/checkpoints/<step>.
  Raises:
    FileExistsError: dst/checkpoints already holds something.
  """
  import jax.numpy as jnp
  from score_jax.run import checkpoints
  from score_jax.run import builders
  from score_jax.run import state as run_state

  config = as_settings(config)
  dst = os.path.abspath(dst)
  ckpt_dir = os.path.join(dst, "checkpoints")
  refuse_existing(dst)
  if os.path.exists(dst) and not os.path.isdir(dst):
    raise FileExistsError(f"{dst} exists and is not a folder.")
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.converting-", dir=parent)
  try:
    params = jax.device_put(params)
    tx = builders.get_optimizer(config)
    state = run_state.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                             opt_state=jax.jit(tx.init)(params), ema_params=params)
    ck = checkpoints.Checkpointer(os.path.join(tmp, "checkpoints"), async_save=False)
    try:
      ck.save(step, state)
    finally:
      ck.close()
    run_state.save_config(config, tmp)
    if not os.path.exists(dst):
      os.rename(tmp, dst)  # atomic: dst appears complete or not at all
    else:  # an existing workdir without checkpoints: move ours in
      os.rename(os.path.join(tmp, "checkpoints"), ckpt_dir)  # (replaces an empty folder)
      if not os.path.exists(os.path.join(dst, "config.json")):
        os.replace(os.path.join(tmp, "config.json"), os.path.join(dst, "config.json"))
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return os.path.join(ckpt_dir, str(step))


def write_converted(dst: str, settings: Any, params: Mapping[str, Any], step: Any, *,
                    weights: str, tensors: int, notes: List[str]) -> dict:
  """The network converters' last step: `params` as checkpoint `step` (None: the config's
  training.snapshot_freq) of workdir `dst` (write_workdir), and their summary."""
  step = settings.training.snapshot_freq if step is None else int(step)
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}.")
  path = write_workdir(dst, settings, params, step)
  return {"checkpoint": path, "step": step, "weights": weights, "tensors": tensors,
          "notes": notes}
