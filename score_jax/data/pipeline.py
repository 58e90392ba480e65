"""Deterministic, resumable, process-sharded batching over a random-access source.

The global example stream is a pure function of (seed, step):
- infinite (training): positions q = step * B + slot (slot in [0, B)) run
  through the concatenation of per-epoch permutations; position q is example
  perm_e[q mod N] with e = q // N and perm_e = Generator(seed, e).permutation(N).
  Batches may straddle epochs, so no example is ever dropped, and the state is
  just the step: (epoch, index) = divmod(step * B, N).
- finite (evaluation): one ordered pass, q = step * B + slot for q < N; the
  last batch is padded with real examples (q mod N) whose mask is False, so
  shapes stay static and every example counts exactly once.
Process p of P takes slots [p B / P, (p + 1) B / P) of every global batch and
reads only those examples. The union over processes of step s is therefore
the global batch a single process would read, whatever P is, and
augmentation noise is keyed by (step, slot), not by process.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Callable, Iterator

import numpy as np

from score_jax.data.sources import Source

__all__ = ["Batches", "Transform", "example_rngs"]

# (data [L, ...], step, slots int64 [L]) -> processed data [L, ...]
Transform = Callable[[np.ndarray, int, np.ndarray], np.ndarray]

_SHUFFLE_STREAM = 0


def example_rngs(seed: int, stream: int, step: int, slots: np.ndarray) -> list[np.random.Generator]:
  """One generator per example, keyed by its global (step, slot): process-count invariant."""
  return [np.random.default_rng([seed, stream, step, int(s)]) for s in slots]


class Batches(Iterator[dict]):
  """Iterator of process-local batches; see the module docstring for the order.

  Each item is a dict of numpy arrays, L = local batch size:
    'image': the transformed data [L, ...];
    'label': int32 [L] (0 for unlabeled data);
    'mask':  bool [L], False only on the padding of a finite pass;
    'index': int64 [L] the example's index in the split (for checks and per-example logs).

  Attributes:
    step: the step of the next batch (start_step at first).
    global_batch_size, local_batch_size: B and B / process_count.
    num_batches: batches in a finite pass (None when infinite).
  """

  def __init__(self, source: Source, *, global_batch_size: int, infinite: bool, seed: int,
               transform: Transform, start_step: int = 0, process_index: int = 0,
               process_count: int = 1, num_threads: int = 0, prefetch: int = 2):
    if global_batch_size < 1:
      raise ValueError(f"batch size must be >= 1, got {global_batch_size}.")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count}).")
    if global_batch_size % process_count:
      raise ValueError(
          f"The global batch size {global_batch_size} does not divide across {process_count} "
          f"processes; use a multiple of {process_count}.")
    if len(source) == 0:
      raise ValueError("The dataset split is empty.")
    if start_step < 0:
      raise ValueError(f"start_step must be >= 0, got {start_step}.")
    self.source = source
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.infinite = infinite
    self.seed = int(seed)
    self.transform = transform
    self.process_index = process_index
    self.process_count = process_count
    self.num_examples = len(source)
    self.num_batches = None if infinite else -(-self.num_examples // global_batch_size)
    if self.num_batches is not None and start_step > self.num_batches:
      raise ValueError(f"start_step {start_step} is past the end of a {self.num_batches}-batch pass.")
    self.step = start_step
    self._perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()
    self._pool = (concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="score_jax_data")
                  if num_threads > 0 else None)
    self._prefetch = max(prefetch, num_threads)
    self._pending: collections.deque = collections.deque()  # (step, future), in step order

  @property
  def epoch(self) -> int:
    """The epoch of the next batch's first example (infinite streams)."""
    return self.step * self.global_batch_size // self.num_examples

  def _perm(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._perms:
        if len(self._perms) > 4:  # a batch spans few epochs; keep memory flat
          self._perms.pop(min(self._perms))
        rng = np.random.default_rng([self.seed, _SHUFFLE_STREAM, epoch])
        self._perms[epoch] = rng.permutation(self.num_examples)
      return self._perms[epoch]

  def plan(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices int64 [L], slots int64 [L], mask bool [L]) of this process at `step`."""
    n, b, l = self.num_examples, self.global_batch_size, self.local_batch_size
    slots = np.arange(self.process_index * l, (self.process_index + 1) * l, dtype=np.int64)
    q = step * b + slots
    if not self.infinite:
      return q % n, slots, q < n
    epochs = q // n
    indices = np.empty_like(q)
    for e in np.unique(epochs):
      sel = epochs == e
      indices[sel] = self._perm(int(e))[q[sel] % n]
    return indices, slots, np.ones(l, bool)

  def batch(self, step: int) -> dict:
    """The batch at `step` (pure: the same for every call and every thread)."""
    indices, slots, mask = self.plan(step)
    data, labels = self.source.read(indices)
    return {"image": self.transform(data, step, slots), "label": labels.astype(np.int32),
            "mask": mask, "index": indices}

  def __iter__(self) -> "Batches":
    return self

  def __len__(self) -> int:
    if self.num_batches is None:
      raise TypeError("An infinite (training) stream has no length.")
    return self.num_batches - self.step

  def __next__(self) -> dict:
    if self.num_batches is not None and self.step >= self.num_batches:
      raise StopIteration
    if self._pool is None:
      out = self.batch(self.step)
    else:
      # Batches are pure functions of their step, so preparing the next few in
      # threads changes nothing but speed (Pillow decodes without the GIL).
      next_submit = self._pending[-1][0] + 1 if self._pending else self.step
      last = self.step + self._prefetch
      if self.num_batches is not None:
        last = min(last, self.num_batches)
      for s in range(next_submit, last):
        self._pending.append((s, self._pool.submit(self.batch, s)))
      s, future = self._pending.popleft()
      assert s == self.step
      out = future.result()
    self.step += 1
    return out

  def close(self) -> None:
    """Stops the reader threads (pending batches are dropped)."""
    # getattr: __del__ also runs when __init__ raised before creating the pool.
    if getattr(self, "_pool", None) is not None:
      for _, f in self._pending:
        f.cancel()
      self._pending.clear()
      self._pool.shutdown(wait=False, cancel_futures=True)
      self._pool = None

  def __enter__(self) -> "Batches":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    self.close()
