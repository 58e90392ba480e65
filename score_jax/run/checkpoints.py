"""Checkpoints with Orbax: periodic ones kept, the preemption one latest-only.

One `CheckpointManager` in WORKDIR/checkpoints keeps the newest checkpoint
plus every checkpoint whose step is a multiple of `keep_period`
(training.snapshot_freq); saves in between (training.
snapshot_freq_for_preemption, SIGTERM, Ctrl-C) replace each other. Orbax
writes each checkpoint to a temporary folder and renames it when complete, so
a process killed mid-write leaves the previous checkpoints intact and no
half-written one that restore would pick.

A checkpoint damaged afterwards (a truncated or missing file) is told apart
from one of another config by its own metadata: restoring the newest
(`restore_intact`, `Checkpointer.restore_latest`) skips damaged ones with a
warning naming them and the one used; an explicitly requested damaged one is a
`DamagedCheckpointError`. Training, the only writer, moves damaged checkpoints
newer than the one it resumes from to WORKDIR/checkpoints_damaged/ (never
deleting them), so that its own saves of those steps cannot collide with them.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import jax
import orbax.checkpoint as ocp

from score_jax.errors import UserError

T = TypeVar("T")

__all__ = ["Checkpointer", "CheckpointMismatchError", "CheckpointWaitError", "finished_steps",
           "wait_for_checkpoint", "existing_step", "restore", "restore_intact", "saved_tree",
           "MissingCheckpointError", "DamagedCheckpointError"]


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint does not fit the state the current config builds."""


class CheckpointWaitError(UserError, RuntimeError):
  """A checkpoint eval waits for will not appear (or did not within the timeout)."""


class DamagedCheckpointError(UserError, OSError):
  """A checkpoint whose files are incomplete or corrupt (truncated, missing)."""


def _first_line(e: BaseException, limit: int = 200) -> str:
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  text = text.split(" See full TensorStore details")[0]  # the rest is the store's whole spec
  return text if len(text) <= limit else text[:limit] + "..."


_DAMAGED_PATHS: set = set()  # checkpoint folders whose orphaned reads are muted


def _mute_orphaned_reads(path: str) -> None:
  """Silences the leftovers of reads that orbax leaves running after a failed restore of the
  checkpoint folder `path`.

  Reading a damaged checkpoint fails at the first bad array; orbax then closes its
  event loop while tensorstore still finishes the other reads. Their callbacks
  raise 'Event loop is closed' in a background thread, and their coroutines end
  with errors naming `path` that nobody awaits; Python prints each as a
  traceback ('Exception ignored in ...'). Those, and only those, are dropped:
  the damage is reported once, by the caller.
  """
  _DAMAGED_PATHS.add(os.path.abspath(path))
  previous = sys.unraisablehook
  if getattr(previous, "mutes_orphaned_reads", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    text = str(e)
    if isinstance(e, RuntimeError) and text == "Event loop is closed":
      return
    if any(p in text for p in _DAMAGED_PATHS):
      return
    previous(unraisable)

  hook.mutes_orphaned_reads = True
  sys.unraisablehook = hook


def _leaf_shapes(tree: Any) -> Dict[str, Tuple[int, ...]]:
  """{'params/Dense_0/kernel': shape} of a state or of its saved metadata (same key names)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    out[name] = tuple(getattr(leaf, "shape", ()))
  return out


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
    """Restores checkpoint `step` into the structure, shapes and shardings of `template`.

    Raises:
      CheckpointMismatchError: the checkpoint holds another structure or shapes.
      DamagedCheckpointError: its files are incomplete or corrupt.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except  # tensorstore raises bare Exception
      if "RESOURCE_EXHAUSTED" in str(e):  # out of memory: not the checkpoint's fault
        raise
      _mute_orphaned_reads(os.path.join(self.directory, str(step)))
      raise self._diagnose(step, template, e) from e

  def _diagnose(self, step: int, template: Any, e: Exception) -> UserError:
    """Why restoring `step` failed: its own metadata says whether it is another config's
    checkpoint (a mismatch) or one whose files are damaged."""
    path = os.path.join(self.directory, str(step))
    try:
      saved = saved_tree(self.directory, step)
    except DamagedCheckpointError as damaged:
      return damaged
    if (saved is None and isinstance(e, (ValueError, KeyError, TypeError))) or (
        saved is not None and _leaf_shapes(saved) != _leaf_shapes(template)):
      return CheckpointMismatchError(
          f"Checkpoint {step} in {self.directory} does not match the model and optimizer this "
          f"config builds ({type(e).__name__}: {_first_line(e)}). Use the config the run was "
          "trained with (WORKDIR/config.json), or a new --workdir.")
    return DamagedCheckpointError(f"Checkpoint {step} ({path}) is damaged: {_first_line(e)}")

  def restore_latest(self, template: T) -> T:
    """The newest intact checkpoint restored into `template`, or `template` if there is none.

    Damaged checkpoints newer than it are moved (process 0) to
    <directory>_damaged/ so that saves of their steps cannot collide with them.
    """
    if self.latest_step() is None:
      return template
    step, state, damaged = _restore_newest(self.directory, self.all_steps(),
                                           lambda s: self.restore(s, template))
    logging.info("Restored checkpoint %d from %s", step, self.directory)
    if damaged:
      self._set_aside(damaged)
    return state

  def _set_aside(self, steps: List[int]) -> None:
    """Moves checkpoints `steps` to <directory>_damaged/<step> (process 0), then rereads the
    directory on every process."""
    if jax.process_index() == 0:
      aside = self.directory + "_damaged"
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        dst, n = os.path.join(aside, str(step)), 1
        while os.path.exists(dst):
          dst, n = os.path.join(aside, f"{step}.{n}"), n + 1
        os.replace(os.path.join(self.directory, str(step)), dst)
        logging.warning("Moved the damaged checkpoint %d to %s (kept, not deleted).", step, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("checkpoints_set_aside")
    self._manager.reload()

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


def _restore_newest(ckpt_dir: str, steps: List[int],
                    restore_fn: Callable[[int], T]) -> Tuple[int, T, List[int]]:
  """(step, restore_fn(step), damaged newer steps) of the newest of `steps` that restores."""
  damaged: List[int] = []
  for step in reversed(steps):
    try:
      out = restore_fn(step)
    except DamagedCheckpointError as e:
      logging.warning("%s Trying the one before it.", e)
      damaged.append(step)
      continue
    if damaged:
      logging.warning("Using checkpoint %d of %s instead of the damaged %s.", step, ckpt_dir,
                      ", ".join(map(str, damaged)))
    return step, out, damaged
  raise DamagedCheckpointError(
      f"Every checkpoint in {ckpt_dir} is damaged (steps {steps}); move them away to start "
      "afresh, or use another --workdir.")


def restore_intact(ckpt_dir: str, restore_fn: Callable[[int], T], step: int = -1) -> Tuple[int, T]:
  """(step, restore_fn(step)) for checkpoint `step`, or with step < 0 the newest intact one.

  restore_fn(step) restores one checkpoint, raising DamagedCheckpointError
  where its files are damaged; with step < 0 those are skipped with a warning
  naming them and the one used instead.

  Raises:
    MissingCheckpointError: no checkpoint (of that step).
    DamagedCheckpointError: the step asked for, or every checkpoint, is damaged.
  """
  found = existing_step(ckpt_dir, step)
  if step >= 0:
    return found, restore_fn(found)
  found, out, _ = _restore_newest(ckpt_dir, finished_steps(ckpt_dir), restore_fn)
  return found, out


def saved_tree(ckpt_dir: str, step: int) -> Any:
  """The structure of checkpoint `step` as saved (nested dicts of array metadata; no array
  read); None where the checkpoint holds no tree metadata.

  Raises:
    DamagedCheckpointError: the metadata cannot be read.
  """
  manager = ocp.CheckpointManager(os.path.abspath(ckpt_dir),
                                  item_handlers=ocp.StandardCheckpointHandler())
  try:
    tree = manager.item_metadata(step)
  except Exception as e:  # pylint: disable=broad-except  # tensorstore raises bare Exception
    _mute_orphaned_reads(os.path.join(ckpt_dir, str(step)))
    raise DamagedCheckpointError(
        f"Checkpoint {step} ({os.path.join(os.path.abspath(ckpt_dir), str(step))}) is damaged: "
        f"its metadata cannot be read ({_first_line(e)})") from e
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
