"""One writer per workdir: `--mode=train` holds WORKDIR/.lock while it runs.

The lock is an `fcntl.flock` on WORKDIR/.lock, whose text names the holder
(pid, host, start time). The kernel drops a flock when its process ends, even
by SIGKILL, so a lock left by a killed training is taken over (with a
warning naming it); a live one makes a second training stop with one line
naming the holder. Only process 0 of a multi-process run takes it; the other
processes learn from process 0 whether it got it. The modes that only read
(eval, sample, `load_run`) never take it and are never stopped by it.

On file systems without flock the holder's pid is checked instead (a holder
on this host that is still alive keeps the lock).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from typing import Any, Dict, Iterator, Optional

from score_jax.errors import UserError
from score_jax.run import distributed

__all__ = ["WorkdirLockedError", "WorkdirLock", "hold"]

LOCK_NAME = ".lock"


class WorkdirLockedError(UserError, RuntimeError):
  """Another training holds the workdir."""


def _holder_text(info: Dict[str, Any]) -> str:
  if not info:
    return "a process that has not written its name yet"
  return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since "
          f"{info.get('since', '?')}")


def _read(fd: int) -> Dict[str, Any]:
  """The holder's record in the open lock file ({} if empty or unreadable)."""
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    return json.loads(os.read(fd, 4096).decode() or "{}")
  except (OSError, ValueError):
    return {}


def _alive_here(info: Dict[str, Any]) -> bool:
  """Whether the recorded holder is a live process on this host (not this process)."""
  pid = info.get("pid")
  if info.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


class WorkdirLock:
  """The lock on WORKDIR/.lock; `acquire` takes it or raises, `release` gives it back."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd: Optional[int] = None

  def acquire(self) -> "WorkdirLock":
    """Takes the lock (taking over one left by a process that ended).

    Raises:
      WorkdirLockedError: a live process holds it; the message names it.
    """
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        self._refuse(fd)
      except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
          os.close(fd)
          raise
        if _alive_here(_read(fd)):  # no flock here: the recorded holder decides
          self._refuse(fd)
      # A holder that released the lock removed the file first: if the path now
      # names another file (or none), this lock guards nothing; try again.
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    previous = _read(fd)
    if previous:
      logging.warning("Took over the lock %s of a training that ended without releasing it "
                      "(%s).", self.path, _holder_text(previous))
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(record) + "\n").encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def _refuse(self, fd: int) -> None:
    """Closes fd and raises the one-line error naming the holder recorded in it."""
    info = _read(fd)
    os.close(fd)
    raise WorkdirLockedError(
        f"{self.workdir} is in use by another training ({_holder_text(info)}; {self.path}). "
        f"Wait for it to end or stop it (kill {info.get('pid', 'PID')}), or train in another "
        "--workdir.")

  def release(self) -> None:
    """Removes the lock file, then drops the lock (a no-op if not held)."""
    if self._fd is None:
      return
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """with hold(workdir): ... runs the block as the workdir's only writer.

  Process 0 takes the lock; with several processes all of them stop (each with
  one line) when it could not.

  Raises:
    WorkdirLockedError: another training holds the workdir.
  """
  import jax  # pylint: disable=g-import-not-at-top

  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir).acquire()
    except WorkdirLockedError as e:
      error = e
  if distributed.any_process(error is not None) and error is None:  # process 0's failure
    error = WorkdirLockedError(f"Process 0 could not lock {workdir}: another training uses it "
                               "(process 0's message names it).")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
