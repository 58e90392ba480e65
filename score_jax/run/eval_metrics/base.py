"""The interface of an eval metric unit, and what the units share.

A unit is a `Metric`: what it needs (other units whose values it reads, a
random stream), whether the plan enables it, the value that marks it done in
WORKDIR/eval/ckpt_<k>.json, its TensorBoard scalars, and `compute(inputs)`
yielding its named values. `score_jax.run.eval_metrics.METRICS` lists the
units in the order they run; `score_jax.run.evaluate` runs the enabled ones.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import jax
import numpy as np
from jax.sharding import NamedSharding

from score_jax import files, plotting
from score_jax.run import distributed
from score_jax.run.distributed import global_array, local_rows, sync, to_host
from score_jax.run.plan import Plan
from score_jax.run.programs import Programs

Array = jax.Array

__all__ = ["Metric", "Inputs", "Progress", "Stage", "shard_path", "shard_count", "batched",
           "shard_features", "dataset_stats"]


class Progress:
  """progress.json of one checkpoint: finished units of work, rewritten atomically."""

  def __init__(self, path: str, is_main: bool):
    self.path = path
    self.is_main = is_main
    self.data: Dict[str, Any] = files.read_json(path) or {}

  def save(self) -> None:
    if self.is_main:
      files.write_json(self.path, self.data)


class Stage:
  """Progress of a long eval stage (likelihood batches, sampling rounds, Inception features):
  a tqdm bar on process 0 with the rate and the estimated time left, and one log line with
  the estimate once a unit has run compiled (the first one includes compiling).

    stage = Stage("likelihood", total=40, done=3)  # 3 done before a restart
    for ...:
      ...
      stage.step()
    stage.close()
  """

  def __init__(self, desc: str, total: int, done: int = 0, unit: str = "batch"):
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    self.desc, self.total, self.done, self.unit = desc, total, done, unit
    self.bar = tqdm(total=total, initial=done, desc=desc, unit=unit, dynamic_ncols=True,
                    disable=not distributed.is_main())
    self.steps, self.last = 0, time.perf_counter()

  def step(self) -> None:
    """One unit finished."""
    now = time.perf_counter()
    seconds, self.last = now - self.last, now
    self.steps += 1
    self.done += 1
    self.bar.update(1)
    left = self.total - self.done
    if self.steps == 2 and left > 0 and distributed.is_main():
      logging.info("%s: %.1f s per %s; about %s for the %d left.", self.desc, seconds, self.unit,
                   _duration(seconds * left), left)

  def close(self) -> None:
    self.bar.close()


def _duration(seconds: float) -> str:
  if seconds < 90:
    return f"{seconds:.0f} s"
  if seconds < 5400:
    return f"{seconds / 60:.0f} min"
  return f"{seconds / 3600:.1f} h"


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What a unit may take to evaluate one checkpoint."""
  plan: Plan
  progs: Programs
  params: Any  # the (EMA) parameters, replicated; GuidedParams are made where sampled
  rng: Optional[Array]  # the unit's own key, fold_in(checkpoint key, stream); None: no stream
  workdir: str
  out_dir: str  # WORKDIR/eval/ckpt_<k>: the checkpoint's files (sample shards, features)
  progress: Progress  # finished units of work, for resuming within a unit
  index: int  # checkpoint index k
  step: int  # its training step
  results: Mapping[str, Any]  # the values the units before it yielded


@dataclasses.dataclass(frozen=True)
class Metric:
  """One eval metric.

  enabled(plan): whether the plan asks for it (the units it needs must be on too).
  done_key(plan): the value whose presence in ckpt_<k>.json marks it computed.
  compute(inputs) -> {name: value}: its values (JSON-able; scalars named in `scalars`).
  needs: units whose values it reads from inputs.results (they run before it).
  stream: its random stream (fold_in of the checkpoint key); None: no randomness.
  scalars: the values that go to TensorBoard as eval/<name>.
  check(plan): fails early (before hours of sampling) on a missing input file.
  why_off(plan): a line logged when it is off while the units it needs ran.
  """
  enabled: Callable[[Plan], bool]
  done_key: Callable[[Plan], str]
  compute: Callable[[Inputs], Dict[str, Any]]
  needs: Tuple[str, ...] = ()
  stream: Optional[int] = None
  scalars: Tuple[str, ...] = ()
  check: Optional[Callable[[Plan], None]] = None
  why_off: Optional[Callable[[Plan], str]] = None


def shard_path(out_dir: str, kind: str, r: int) -> str:
  return os.path.join(out_dir, f"{kind}_{r}.npz")


def shard_count(path: str) -> int:
  """Samples in a shard file, -1 if absent or unreadable."""
  try:
    with np.load(path) as f:
      return int(f["samples"].shape[0])
  except (OSError, KeyError, ValueError):
    return -1


def batched(fn: Callable[[Array], Dict[str, Array]], data: np.ndarray, batch: int,
            sharding: NamedSharding) -> Dict[str, np.ndarray]:
  """fn over data [N, ...] in fixed-size batches (the last one padded: one compilation)."""
  outs: Dict[str, List[np.ndarray]] = {}
  for start in range(0, data.shape[0], batch):
    chunk = data[start:start + batch]
    n = chunk.shape[0]
    res = fn(global_array(sharding, local_rows(distributed.pad_rows(chunk, batch))))
    for k, v in res.items():
      outs.setdefault(k, []).append(to_host(v)[:n])
  return {k: np.concatenate(v) for k, v in outs.items()}


def shard_features(inputs: Inputs, kind: str, desc: str,
                   fn: Callable[[np.ndarray], Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
  """fn's outputs on the samples of every sampling round, concatenated in round order.

  Round r's outputs are saved beside its shard (<kind>_<r>.npz), so an interrupted run computes
  only the missing ones; a file whose row count differs from its shard's (num_samples
  changed) is redone.
  """
  out_dir, rounds = inputs.out_dir, inputs.results["sampling_rounds"]

  def done(r: int) -> bool:  # present and made from the shard as it is now
    path = shard_path(out_dir, kind, r)
    if not os.path.exists(path):
      return False
    with np.load(path) as f:
      return f[f.files[0]].shape[0] == shard_count(shard_path(out_dir, "samples", r))

  todo = {r for r in range(rounds) if not done(r)}
  sync(f"{kind}_todo_{out_dir}")  # decided alike on every process: the network is collective
  parts: Dict[str, List[np.ndarray]] = {}
  stage = Stage(desc, rounds, rounds - len(todo), unit="shard")
  for r in range(rounds):
    path = shard_path(out_dir, kind, r)
    if r in todo:
      with np.load(shard_path(out_dir, "samples", r)) as f:
        feats = fn(f["samples"])
      if distributed.is_main():
        plotting.save_arrays(path, **feats)
      stage.step()
    else:
      with np.load(path) as f:
        feats = {k: f[k] for k in f.files}
    for k, v in feats.items():
      parts.setdefault(k, []).append(v)
  stage.close()
  return {k: np.concatenate(v) for k, v in parts.items()}


def dataset_stats(plan: Plan, path: str, desc: str, features: Callable[[np.ndarray], np.ndarray],
                  batch: int, num_features_kept: int = 0):
  """The `score_jax.metrics.stats.Stats` of the training images' features, read from `path`,
  or computed once over every training image (uint8, eval.stats_num_images to cap) and cached
  there.

  features: uint8 images [n, H, W, C] -> [n, D] on the host (`batched` over the devices).
  """
  from score_jax.metrics import stats as metrics  # pylint: disable=g-import-not-at-top

  exists = os.path.exists(path)
  sync(f"stats_exists_{path}")  # every process must take the same branch: computing is collective
  if exists:
    return metrics.load_stats(path)
  logging.info("Computing %s statistics of the %s training images -> %s (once).", desc,
               plan.data.name, path)
  # Every process reads whole global batches; `batched` gives the devices their rows.
  batches = plan.data.batches("train", evaluation=True, raw=True, batch_size=batch,
                              process_index=0, process_count=1)
  cap = plan.eval.stats_num_images
  stage = Stage(f"{desc} features of the training images",
                min(len(batches), -(-cap // batch)) if cap else len(batches))

  def train_images():
    for b in batches:
      yield b["image"][b["mask"]]
      stage.step()
    stage.close()

  # Only process 0 writes the cache; the others keep theirs in a private file.
  own = path if distributed.is_main() else f"{path}.process{jax.process_index()}"
  stats = metrics.dataset_stats(own, train_images(), features, recompute=True,
                                num_features_kept=num_features_kept,
                                max_images=cap or None)
  if not distributed.is_main():
    os.remove(own)
  return stats
