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
from typing import Any, Optional, TypeVar

import jax
import orbax.checkpoint as ocp

T = TypeVar("T")


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the state the current config builds."""


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
