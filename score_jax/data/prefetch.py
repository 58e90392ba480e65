"""Prefetching: the next batches prepared (and put on the device) while the step runs.

`Prefetch(batches, put, size)` runs `put(next(batches))` in one background
thread, up to `size` items ahead of the consumer, and hands the items out in
their order. It changes when a batch is prepared, never which: wrapped
around a `Batches` started at `start_step=k` it yields exactly the batches
k, k+1, ... of that iterator, so resuming stays exact. `put` is where a
batch goes to the device (`to_device(sharding)`); the host-to-device copy
then overlaps the previous step instead of following it.

An exception raised while preparing an item is raised by the `next()` that
would have returned it; a finite iterator's end is a StopIteration there too.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator, Mapping, Optional

__all__ = ["Prefetch", "to_device"]

_END = object()  # the wrapped iterator is exhausted


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


class Prefetch(Iterator[Any]):
  """Iterator of put(item) for the items of `iterator`, prepared `size` ahead in a thread.

  Attributes:
    step: the step of the next item handed out, when the wrapped iterator has
      a `step` attribute (a Batches): its start step plus the items handed out.
  """

  def __init__(self, iterator: Iterator[Any], put: Optional[Callable[[Any], Any]] = None,
               size: int = 2):
    if size < 1:
      raise ValueError(f"size must be >= 1, got {size}.")
    self.iterator = iterator
    self._put = put if put is not None else (lambda item: item)
    self._start_step = getattr(iterator, "step", None)
    self._taken = 0
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=self._work, name="score_jax_prefetch", daemon=True)
    self._thread.start()

  @property
  def step(self) -> Optional[int]:
    return None if self._start_step is None else self._start_step + self._taken

  def _offer(self, item: Any) -> bool:
    """Queues item, waiting for room; False when close() was called meanwhile."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def _work(self) -> None:
    try:
      while not self._stop.is_set():
        try:
          item = next(self.iterator)
        except StopIteration:
          self._offer(_END)
          return
        if not self._offer(self._put(item)):
          return
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      self._offer(_Failure(e))

  def __iter__(self) -> "Prefetch":
    return self

  def __next__(self) -> Any:
    if self._done:
      raise StopIteration
    while True:
      try:
        item = self._queue.get(timeout=0.1)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          self._done = True  # closed, or the thread died without a word
          raise StopIteration from None
    if item is _END:
      self._done = True
      raise StopIteration
    if isinstance(item, _Failure):
      self._done = True
      raise item.error
    self._taken += 1
    return item

  def close(self) -> None:
    """Stops the thread (prepared items are dropped) and closes the wrapped iterator."""
    self._stop.set()
    self._done = True
    thread = getattr(self, "_thread", None)
    if thread is not None and thread is not threading.current_thread():
      while thread.is_alive():
        try:  # make room, so a thread waiting to queue an item sees the stop
          self._queue.get_nowait()
        except queue.Empty:
          pass
        thread.join(timeout=0.05)
    close = getattr(self.iterator, "close", None)
    if close is not None:
      close()

  def __enter__(self) -> "Prefetch":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def to_device(sharding: Any, dtypes: Optional[Mapping[str, Any]] = None) -> Callable[[dict], dict]:
  """A `put` for Prefetch: a process-local batch dict -> global jax arrays sharded by `sharding`.

  Args:
    sharding: e.g. NamedSharding(mesh, P("data")); the batch's first axis is sharded.
    dtypes: {key: dtype} of the entries to put (default: 'image' float32 and
      'label' int32); other entries stay numpy arrays on the host.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  dtypes = dict(dtypes) if dtypes is not None else {"image": np.float32, "label": np.int32}

  def put(batch: dict) -> dict:
    out = dict(batch)
    for key, dtype in dtypes.items():
      out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(batch[key], dtype))
    return out

  return put
