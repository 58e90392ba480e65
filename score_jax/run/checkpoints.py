"""Checkpoints with Orbax: periodic ones kept, the preemption one latest-only.

One `CheckpointManager` in WORKDIR/checkpoints keeps the newest checkpoint
plus every checkpoint whose step is a multiple of `keep_period`
(training.snapshot_freq); saves in between (training.
snapshot_freq_for_preemption, SIGTERM) replace each other. Orbax writes each
checkpoint to a temporary folder and renames it when complete, so a process
killed mid-write leaves the previous checkpoints intact and no half-written
one that restore would pick.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, List, Optional, TypeVar

import jax
import orbax.checkpoint as ocp

from score_jax.errors import UserError

T = TypeVar("T")

__all__ = ["Checkpointer", "CheckpointMismatchError", "CheckpointWaitError", "finished_steps",
           "wait_for_checkpoint", "existing_step", "restore", "saved_tree",
           "MissingCheckpointError"]


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint does not fit the state the current config builds."""


class CheckpointWaitError(UserError, RuntimeError):
  """A checkpoint eval waits for will not appear (or did not within the timeout)."""


class Checkpointer:
  """Saves and restores a train-state pytree by step."""

  def __init__(self, directory: str, *, keep_period: Optional[int] = None, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=1, keep_period=keep_period, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Starts saving `state` as checkpoint `step` (asynchronously; see `wait`)."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, step: int, template: T) -> T:
    """Restores checkpoint `step` into the structure, shapes and shardings of `template`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatchError(
          f"Checkpoint {step} in {self.directory} does not match the model and optimizer this "
          f"config builds ({type(e).__name__}: {e}). Use the config the run was trained with "
          "(WORKDIR/config.json), or a new --workdir.") from e

  def restore_latest(self, template: T) -> T:
    """The newest checkpoint restored into `template`, or `template` if there is none."""
    step = self.latest_step()
    if step is None:
      return template
    logging.info("Restoring checkpoint %d from %s", step, self.directory)
    return self.restore(step, template)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def finished_steps(ckpt_dir: str) -> List[int]:
  """Steps of the complete checkpoints in ckpt_dir (orbax renames a checkpoint when done)."""
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(ocp.utils.checkpoint_steps(ckpt_dir))


def wait_for_checkpoint(ckpt_dir: str, step: int, *, timeout_s: float, poll_s: float,
                        final_step: int) -> None:
  """Returns once checkpoint `step` exists in ckpt_dir, polling every poll_s seconds.

  A fresh directory listing each poll sees checkpoints a concurrent training
  run writes. Periodic checkpoints are never deleted, so a missing `step`
  with a later one present (or the final step written) will never appear:
  that raises at once instead of waiting out the timeout.

  Raises:
    CheckpointWaitError: the checkpoint cannot appear, or timeout_s passed.
  """
  deadline = time.monotonic() + float(timeout_s)
  announced = False
  while True:
    steps = finished_steps(ckpt_dir)
    if step in steps:
      return
    later = [s for s in steps if s > step]
    if later or final_step in steps:
      raise CheckpointWaitError(
          f"No checkpoint of step {step} in {ckpt_dir}, but training has moved past it "
          f"(checkpoints: {steps}); it will not appear. Was the run trained with another "
          "training.snapshot_freq? Set eval.begin_ckpt / eval.end_ckpt to existing ones.")
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      raise CheckpointWaitError(
          f"Waited {timeout_s:.0f} s for checkpoint step {step} in {ckpt_dir} (present: "
          f"{steps}). Raise --config.eval.wait_timeout_s to wait longer for training.")
    if not announced:
      logging.warning(
          "Waiting up to %.1f h for checkpoint step %d in %s, which a training run beside this "
          "eval writes (present now: %s). Stop with Ctrl-C; --config.eval.wait_timeout_s=0 "
          "evaluates only what exists.", timeout_s / 3600, step, ckpt_dir, steps or "none")
      announced = True
    time.sleep(max(0.0, min(float(poll_s), remaining)))


def existing_step(ckpt_dir: str, step: int = -1) -> int:
  """`step` if ckpt_dir holds that checkpoint, the newest one's step if step < 0.

  Raises:
    MissingCheckpointError (a FileNotFoundError): no checkpoint at all, or none of that step.
  """
  steps = finished_steps(ckpt_dir)
  if not steps:
    raise MissingCheckpointError(f"No checkpoint in {ckpt_dir}: train first (--mode=train), or "
                                 "convert a released one (python -m score_jax.convert).")
  if step < 0:
    return steps[-1]
  if step not in steps:
    raise MissingCheckpointError(f"No checkpoint of step {step} in {ckpt_dir}; present: {steps}.")
  return step


class MissingCheckpointError(UserError, FileNotFoundError):
  """A workdir holds no checkpoint (of the step asked for)."""


def saved_tree(ckpt_dir: str, step: int) -> Any:
  """The structure of checkpoint `step` as saved (nested dicts of array metadata; no array read)."""
  manager = ocp.CheckpointManager(os.path.abspath(ckpt_dir),
                                  item_handlers=ocp.StandardCheckpointHandler())
  try:
    tree = manager.item_metadata(step)
  finally:
    manager.close()
  return getattr(tree, "tree", tree)


def restore(ckpt_dir: str, step: int, template: T) -> T:
  """Checkpoint `step` of ckpt_dir restored into `template` (shapes and shardings), read once."""
  ckpt = Checkpointer(ckpt_dir, async_save=False)
  try:
    return ckpt.restore(step, template)
  finally:
    ckpt.close()
