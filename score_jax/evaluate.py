"""Evaluation and sampling modes: `eval(config, workdir)` and `sample(config, workdir)`.

`--mode=eval` evaluates the EMA parameters of every checkpoint in a range,
waiting for checkpoints that training has not written yet, so it can run
beside training:
  1. loss on the eval split ('test');
  2. likelihood on eval.bpd_dataset with the probability-flow ODE, eval.bpd_passes
     passes: bits/dim of uniformly dequantized 8-bit images, or (2-D toy data)
     the negative log-likelihood in nats per dimension; mean and standard error;
  3. eval.num_samples samples from the configured sampler, in rounds of
     eval.batch_size, written as array shards, plus a PNG grid (a scatter
     plot beside the data for 2-D data);
  4. FID, Inception Score and KID of those samples against the dataset's
     statistics, when eval.inception_path names an Inception weight file;
  5. for data.dataset 'digits', the digits FD, its floor and the classifier
     scores of those samples (score_jax/digits_metric.py: a small classifier
     trained in seconds, cached in WORKDIR/eval/digits_classifier.npz).
Results go to WORKDIR/eval/ckpt_<k>.json and TensorBoard (WORKDIR/eval/tensorboard).

Checkpoint indices: index k of eval.begin_ckpt..eval.end_ckpt is the
checkpoint of step k * training.snapshot_freq, the reference's numbering; the
index past the last multiple is the final step training.n_iters (e.g.
n_iters = 25, snapshot_freq = 10: k = 1, 2, 3 -> steps 10, 20, 25). An
end_ckpt beyond the end of training is clipped to it.

Files (k = checkpoint index, r = sampling round):
  WORKDIR/eval/ckpt_<k>.json            results (written last; atomic)
  WORKDIR/eval/ckpt_<k>/progress.json   finished units of work (atomic)
  WORKDIR/eval/ckpt_<k>/samples_<r>.npz 'samples' uint8 [n, H, W, C] (images)
                                        or float32 [n, D], 'labels', 'nfe'
  WORKDIR/eval/ckpt_<k>/features_<r>.npz Inception 'pool' [n, 2048], 'logits' [n, 1008]
  WORKDIR/eval/ckpt_<k>/samples.png     grid of the first samples

Resume: every file is written to a temporary name and renamed, so a file that
exists is complete. A restarted eval skips checkpoints whose JSON holds every
enabled metric, sampling rounds whose shard exists, Inception features whose
file exists, and likelihood batches recorded in progress.json; each round and
batch draws its randomness from fold_in(key, index), so redoing an interrupted
one gives the values it would have given. Shards hold exactly num_samples
samples in all (the last round is cut), whatever was interrupted.

Sharding: sampling, likelihood and loss batches are split over a 1-D mesh of
all devices (parameters replicated); eval.batch_size must divide by the
device count. With several processes each reads its slice of the data, and
process 0 gathers results and writes files (the workdir must be shared).

`--mode=sample` loads one checkpoint (config.sample.ckpt_step, default the
newest) and writes config.sample.num samples as PNG and .npz with any sampler;
config.sample.task picks unconditional generation, inpainting or
colorization of given images, or interpolation through the probability-flow
ODE. Class-conditional models take sample.class_label and
sampling.guidance_weight (classifier-free guidance).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import math
import os
import re
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from score_jax import builders, checkpoints, datasets, plotting, train
from score_jax.models import get_score_fn

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]
# (params, labels [B] or None) -> score_fn(x [B, ...], t [B]) -> [B, ...]
ScoreFactory = Callable[[Any, Optional[Array]], ScoreFn]

__all__ = [
    "eval",
    "sample",
    "evaluate_params",
    "checkpoint_steps",
    "wait_for_checkpoint",
    "restore_ema_params",
    "existing_step",
    "network_score_factory",
    "CheckpointWaitError",
]

_GRID_SIZE = 64  # images in the PNG grid
_SCATTER_POINTS = 8192  # toy samples in the scatter plot
# Streams of fold_in(root key, stream): each stage's randomness is independent.
_LOSS_STREAM, _LIKELIHOOD_STREAM, _SAMPLE_STREAM = 1, 2, 3


class CheckpointWaitError(RuntimeError):
  """A checkpoint eval waits for will not appear (or did not within the timeout)."""


# ----------------------------------------------------------------------------
# Checkpoints


def checkpoint_steps(config: ml_collections.ConfigDict) -> List[Tuple[int, int]]:
  """[(index k, training step)] of eval.begin_ckpt..eval.end_ckpt (module docstring).

  Raises:
    ValueError: begin_ckpt < 1 (no checkpoint precedes the first step), an
      empty range, or a range that starts after the end of training.
  """
  freq, n_iters = int(config.training.snapshot_freq), int(config.training.n_iters)
  begin, end = int(config.eval.begin_ckpt), int(config.eval.end_ckpt)
  last = math.ceil(n_iters / freq)  # index of the final step
  if begin < 1:
    raise ValueError(f"eval.begin_ckpt must be >= 1 (index k is step k * snapshot_freq = "
                     f"k * {freq}; training writes no checkpoint at step 0), got {begin}.")
  if end < begin:
    raise ValueError(f"eval.end_ckpt ({end}) is smaller than eval.begin_ckpt ({begin}).")
  if begin > last:
    raise ValueError(
        f"eval.begin_ckpt = {begin} is step {begin * freq}, after the end of training "
        f"(n_iters = {n_iters}, snapshot_freq = {freq}: indices 1..{last}). Use e.g. "
        f"--config.eval.begin_ckpt=1 --config.eval.end_ckpt={last}.")
  if end > last:
    logging.info("eval.end_ckpt = %d is past the end of training; evaluating up to index %d "
                 "(step %d).", end, last, n_iters)
  return [(k, min(k * freq, n_iters)) for k in range(begin, min(end, last) + 1)]


def _finished_steps(ckpt_dir: str) -> List[int]:
  """Steps of the complete checkpoints in ckpt_dir (orbax renames a checkpoint when done)."""
  if not os.path.isdir(ckpt_dir):
    return []
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
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
    steps = _finished_steps(ckpt_dir)
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
      logging.info("Waiting up to %.0f s for checkpoint step %d in %s (present: %s).",
                   timeout_s, step, ckpt_dir, steps)
      announced = True
    time.sleep(max(0.0, min(float(poll_s), remaining)))


def existing_step(ckpt_dir: str, step: int = -1) -> int:
  """`step` if ckpt_dir holds that checkpoint, the newest one's step if step < 0.

  Raises:
    FileNotFoundError: no checkpoint at all, or none of that step.
  """
  steps = _finished_steps(ckpt_dir)
  if not steps:
    raise FileNotFoundError(f"No checkpoint in {ckpt_dir}: train first (--mode=train).")
  if step < 0:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"No checkpoint of step {step} in {ckpt_dir}; present: {steps}.")
  return step


def _abstract_state(setup: train.Setup) -> train.TrainState:
  """The train state's shapes, replicated over the mesh, without allocating it."""
  shapes = jax.eval_shape(lambda r: train.init_state(setup, r), jax.random.PRNGKey(0))
  # Shardings on the target let a checkpoint written on N devices load on M.
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=setup.replicated),
                      shapes)


def restore_ema_params(setup: train.Setup, ckpt_dir: str, step: int) -> Any:
  """The EMA parameters of checkpoint `step`, replicated over setup.mesh."""
  ckpt = checkpoints.Checkpointer(ckpt_dir, async_save=False)
  try:
    return ckpt.restore(step, _abstract_state(setup)).ema_params
  finally:
    ckpt.close()


# ----------------------------------------------------------------------------
# Score functions


def network_score_factory(setup: train.Setup) -> ScoreFactory:
  """make(params, y) -> score_fn(x, t) of the config's network (labels y [B] or None)."""
  continuous = bool(setup.config.training.continuous)

  def make(params: Any, y: Optional[Array]) -> ScoreFn:
    base = get_score_fn(setup.sde, setup.model, {"params": params}, continuous=continuous)
    return lambda x, t: base(x, t, y)

  return make


def _guided(factory: ScoreFactory, params: Any, y: Optional[Array], weight: float,
            num_classes: int) -> ScoreFn:
  """The score to sample with: conditional on y for class-conditional models, with
  classifier-free guidance (1 + w) s(x, t, y) - w s(x, t, None) when w != 0.

  w = 0 (or an unconditional model) is the plain score: no second evaluation.
  y = None is the null label (the network's label num_classes).
  """
  if num_classes == 0:
    return factory(params, None)
  if weight == 0.0:
    return factory(params, y)
  from score_jax import controllable  # pylint: disable=g-import-not-at-top
  return controllable.classifier_free_guidance(lambda x, t, yy: factory(params, yy)(x, t), y,
                                               weight)


# ----------------------------------------------------------------------------
# Small helpers: files, gathering, data


def _write_json(path: str, obj: Dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)  # atomic: never a half-written result


def _read_json(path: str) -> Optional[Dict[str, Any]]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _fingerprint(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _to_host(x: Array) -> np.ndarray:
  """A (possibly multi-process) sharded array as one numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _global(sharding: NamedSharding, local: np.ndarray) -> Array:
  """This process's rows -> the global batch array, sharded along the mesh."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def _is_images(config: ml_collections.ConfigDict) -> bool:
  return len(builders.data_shape(config, 1)) == 4


def _num_classes(config: ml_collections.ConfigDict) -> int:
  return int(config.model.get("num_classes", 0) or 0)


def _to_uint8(x: np.ndarray, centered: bool) -> np.ndarray:
  """Model-space images -> uint8 [0, 255], rounded to the nearest level (as the data)."""
  x = datasets.inverse_scaler(centered)(np.asarray(x, np.float32))
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _check_batch(name: str, batch: int) -> int:
  n = jax.device_count()
  if batch < 1 or batch % n or batch % jax.process_count():
    raise ValueError(f"{name} = {batch} must be a positive multiple of the device count {n} "
                     f"(the batch is split over all devices); e.g. --config.{name}="
                     f"{max(1, math.ceil(batch / n)) * n}.")
  return batch


# ----------------------------------------------------------------------------
# Jitted, sharded computations


@dataclasses.dataclass(frozen=True)
class _Context:
  """What every stage of one eval run shares."""
  config: ml_collections.ConfigDict
  setup: train.Setup
  factory: ScoreFactory
  is_main: bool
  # Jitted functions by name, built once per run: later checkpoints reuse them.
  cache: Dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

  def cached(self, name: str, build: Callable[[], Any]) -> Any:
    if name not in self.cache:
      self.cache[name] = build()
    return self.cache[name]

  @property
  def rep(self) -> NamedSharding:
    return self.setup.replicated

  @property
  def bat(self) -> NamedSharding:
    return self.setup.batch_sharding


def _make_sampler(ctx: _Context, batch: int, weight: float):
  """(params, rng, y [B]) -> (samples [B, ...] sharded over the mesh, nfe), one jitted call."""
  config = ctx.config
  sampler = builders.get_sampler(config, ctx.setup.sde)
  shape = builders.data_shape(config, batch)
  num_classes = _num_classes(config)

  def run(params, rng, y):
    score_fn = _guided(ctx.factory, params, y, weight, num_classes)
    x, nfe = sampler(rng, score_fn, shape)
    return x, jnp.asarray(nfe, jnp.int32)

  # Sharding the output along the batch makes XLA partition the whole
  # sampling loop over the devices (the prior draw included).
  return jax.jit(run, in_shardings=(ctx.rep, ctx.rep, ctx.bat), out_shardings=(ctx.bat, ctx.rep))


def _make_loss_fn(ctx: _Context):
  """(params, rng, x [B, ...], y [B]) -> per-example loss [B] of the training objective."""
  loss_fn = builders.get_loss_fn(ctx.config, ctx.setup.sde, ctx.setup.model, train=False)
  use_labels = _num_classes(ctx.config) > 0

  def per_example(params, rng, x, y):
    return loss_fn(params, rng, x, y if use_labels else None)[1].per_example

  return jax.jit(per_example, in_shardings=(ctx.rep, ctx.rep, ctx.bat, ctx.bat),
                 out_shardings=ctx.bat)


def _likelihood_settings(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  e = config.eval
  return {"hutchinson": str(e.get("hutchinson", "rademacher")),
          "rtol": float(e.get("likelihood_rtol", 1e-5)), "atol": float(e.get("likelihood_atol", 1e-5)),
          "eps": float(e.get("likelihood_eps", 1e-5))}


def _make_likelihood_fn(ctx: _Context):
  """(params, rng, data [B, ...], y [B]) -> (value [B], nfe).

  Images: data are uint8; likelihood.bits_per_dim dequantizes them uniformly,
  (v + U) / 256, scales them like the training data and returns bits/dim of
  the 8-bit data. 2-D data: the value is -log p(x) / D in nats.
  """
  from score_jax import likelihood  # pylint: disable=g-import-not-at-top

  config = ctx.config
  s = _likelihood_settings(config)
  images = _is_images(config)
  centered = bool(config.data.centered)
  use_labels = _num_classes(config) > 0
  sde = ctx.setup.sde

  def run(params, rng, data, y):
    score_fn = ctx.factory(params, y if use_labels else None)
    if images:  # uint8 in, dequantized with rng inside: the same key gives the same noise
      value, _, nfe = likelihood.bits_per_dim(rng, sde, score_fn, data, centered, **s)
    else:
      logp, _, nfe = likelihood.log_likelihood(rng, sde, score_fn, data, **s)
      value = -logp / math.prod(data.shape[1:])
    return value, jnp.asarray(nfe, jnp.int32)

  return jax.jit(run, in_shardings=(ctx.rep, ctx.rep, ctx.bat, ctx.bat),
                 out_shardings=(ctx.bat, ctx.rep))



def _make_inception_fn(ctx: _Context, resize: str, precision: str):
  """(inception params, uint8 images [B, H, W, C]) -> {'pool', 'logits'}, sharded over the mesh."""
  from score_jax import inception  # pylint: disable=g-import-not-at-top

  def run(params, images):
    if images.shape[-1] == 1:  # gray-scale data: the same plane in R, G and B
      images = jnp.repeat(images, 3, axis=-1)
    return inception.inception_features(params, images, resize=resize, precision=precision)

  return jax.jit(run, in_shardings=(ctx.rep, ctx.bat), out_shardings=ctx.bat)


def _batched(fn: Callable[[np.ndarray], Dict[str, Array]], data: np.ndarray, batch: int,
             sharding: NamedSharding) -> Dict[str, np.ndarray]:
  """fn over data [N, ...] in fixed-size batches (the last one padded: one compilation)."""
  outs: Dict[str, List[np.ndarray]] = {}
  for start in range(0, data.shape[0], batch):
    chunk = data[start:start + batch]
    n = chunk.shape[0]
    if n < batch:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
    res = fn(_global(sharding, _local_rows(chunk)))
    for k, v in res.items():
      outs.setdefault(k, []).append(_to_host(v)[:n])
  return {k: np.concatenate(v) for k, v in outs.items()}


def _local_rows(a: np.ndarray) -> np.ndarray:
  """This process's contiguous slice of a global batch (all of it with one process)."""
  p, n = jax.process_index(), jax.process_count()
  rows = a.shape[0] // n
  return a[p * rows:(p + 1) * rows]


# ----------------------------------------------------------------------------
# Stages of one checkpoint's evaluation


class _Progress:
  """progress.json of one checkpoint: finished units of work, rewritten atomically."""

  def __init__(self, path: str, is_main: bool):
    self.path = path
    self.is_main = is_main
    self.data: Dict[str, Any] = _read_json(path) or {}

  def save(self) -> None:
    if self.is_main:
      _write_json(self.path, self.data)


def _loss_stage(ctx: _Context, params: Any, rng: Array, progress: _Progress) -> Dict[str, float]:
  """Mean per-example loss over the whole eval split ('test'), EMA parameters."""
  if "loss" in progress.data:
    return progress.data["loss"]
  fn = ctx.cached("loss", lambda: _make_loss_fn(ctx))
  total = count = 0.0
  for i, batch in enumerate(datasets.get_dataset(ctx.config, "test", evaluation=True)):
    x = _global(ctx.bat, batch["image"].astype(np.float32))
    y = _global(ctx.bat, batch["label"].astype(np.int32))
    per = _to_host(fn(params, jax.random.fold_in(rng, i), x, y))
    mask = _to_host(_global(ctx.bat, batch["mask"]))  # padding of the last batch
    total += float(np.sum(per[mask], dtype=np.float64))
    count += int(mask.sum())
  progress.data["loss"] = {"eval_loss": total / count, "eval_loss_examples": int(count)}
  progress.save()
  return progress.data["loss"]


def _likelihood_stage(ctx: _Context, params: Any, rng: Array,
                      progress: _Progress) -> Dict[str, Any]:
  """eval.bpd_passes passes of the likelihood over eval.bpd_dataset, resumable per batch.

  Pass p, batch i use the key fold_in(fold_in(rng, p), i) for dequantization
  and the Hutchinson probes, so a batch redone after an interruption gives
  the same values. Per-pass sums (of values and squares, in float64) go to
  progress.json after every batch.

  Returns (images; 'nll_nats_per_dim' etc. for 2-D data):
    bpd: mean over all passes and examples; bpd_stderr: standard error over
    the N test examples, sqrt(var / N) with the variance over all values
    (passes repeat the same examples, so N, not N * passes);
    bpd_passes: each pass's mean; likelihood_nfe: mean NFE per batch.
  """
  config = ctx.config
  images = _is_images(config)
  split = str(config.eval.bpd_dataset)
  batch = _check_batch("eval.batch_size", int(config.eval.batch_size))
  num_passes = int(config.eval.bpd_passes)
  settings = dict(_likelihood_settings(config), batch_size=batch, dataset=split)
  state = progress.data.get("likelihood")
  if state is None or state.get("settings") != settings:
    if state is not None:
      logging.warning("Likelihood settings changed since the last run; starting its passes anew.")
    state = {"settings": settings, "passes": []}
    progress.data["likelihood"] = state
  for p in range(num_passes):
    if p == len(state["passes"]):
      state["passes"].append({"next_batch": 0, "sum": 0.0, "sumsq": 0.0, "count": 0,
                              "nfe_sum": 0.0, "batches": 0, "done": False})
    rec = state["passes"][p]
    if rec["done"]:
      continue
    fn = ctx.cached("likelihood", lambda: _make_likelihood_fn(ctx))
    pass_key = jax.random.fold_in(rng, p)
    it = datasets.get_dataset(config, split, evaluation=True, raw=images, batch_size=batch,
                              start_step=rec["next_batch"])
    for i, b in enumerate(it, start=rec["next_batch"]):
      data = b["image"] if images else b["image"].astype(np.float32)
      value, nfe = fn(params, jax.random.fold_in(pass_key, i), _global(ctx.bat, data),
                      _global(ctx.bat, b["label"].astype(np.int32)))
      value = _to_host(value).astype(np.float64)
      mask = _to_host(_global(ctx.bat, b["mask"]))
      if not np.all(np.isfinite(value[mask])):
        raise FloatingPointError(f"Non-finite likelihood in pass {p}, batch {i}: the ODE solve "
                                 "failed (try a larger eval.likelihood_rtol / atol).")
      rec.update(next_batch=i + 1, sum=rec["sum"] + float(value[mask].sum()),
                 sumsq=rec["sumsq"] + float((value[mask]**2).sum()),
                 count=rec["count"] + int(mask.sum()), nfe_sum=rec["nfe_sum"] + float(nfe),
                 batches=rec["batches"] + 1)
      progress.save()
      logging.info("likelihood pass %d batch %d: running mean %.5f", p, i,
                   rec["sum"] / rec["count"])
    rec["done"] = True
    progress.save()
  passes = state["passes"][:num_passes]
  total = sum(r["sum"] for r in passes)
  sumsq = sum(r["sumsq"] for r in passes)
  count = sum(r["count"] for r in passes)
  mean = total / count
  var = max(sumsq / count - mean**2, 0.0)
  per_pass = count // num_passes
  name = "bpd" if images else "nll_nats_per_dim"
  return {name: mean, f"{name}_stderr": math.sqrt(var / per_pass),
          f"{name}_passes": [r["sum"] / r["count"] for r in passes],
          "likelihood_examples": per_pass,
          "likelihood_nfe": sum(r["nfe_sum"] for r in passes) / sum(r["batches"] for r in passes)}


def _shard_path(out_dir: str, kind: str, r: int) -> str:
  return os.path.join(out_dir, f"{kind}_{r}.npz")


def _round_sizes(num_samples: int, batch: int) -> List[int]:
  """Samples kept from each round: full batches, the last one cut to the total."""
  return [min(batch, num_samples - start) for start in range(0, num_samples, batch)]


def _shard_count(path: str) -> int:
  """Samples in a shard file, -1 if absent or unreadable."""
  try:
    with np.load(path) as f:
      return int(f["samples"].shape[0])
  except (OSError, KeyError, ValueError):
    return -1


def _sampling_settings(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """What fixes a round's samples: a change makes existing shards stale."""
  return {"sampling": config.sampling.to_dict(), "batch_size": int(config.eval.batch_size),
          "model": config.model.to_dict(), "seed": int(config.seed),
          "sde": str(config.training.sde), "continuous": bool(config.training.continuous)}


def _sampling_stage(ctx: _Context, params: Any, rng: Array, out_dir: str,
                    progress: _Progress) -> Dict[str, Any]:
  """Writes eval.num_samples samples as shards samples_<r>.npz, skipping finished rounds.

  Round r samples a full batch with key fold_in(rng, r) and keeps its first
  min(B, num_samples - r B) samples, so shards always add up to exactly
  num_samples. A shard of the wrong size (num_samples changed) is redone.
  Class-conditional models cycle through the labels.
  """
  config = ctx.config
  batch = _check_batch("eval.batch_size", int(config.eval.batch_size))
  sizes = _round_sizes(int(config.eval.num_samples), batch)
  settings = _fingerprint(_sampling_settings(config))
  old = progress.data.get("sampling_settings")
  if old is not None and old != settings and any(
      os.path.exists(_shard_path(out_dir, "samples", r)) for r in range(len(sizes))):
    raise ValueError(
        f"The sample shards in {out_dir} were made with other sampling settings (sampler, "
        "model, seed or eval.batch_size); mixing them would be wrong. Delete that folder "
        "or run with the original settings.")
  progress.data["sampling_settings"] = settings
  progress.save()
  num_classes = _num_classes(config)
  weight = float(config.sampling.get("guidance_weight", 0.0))
  # Decided before anything is written, and alike on every process: sampling is collective.
  todo = [r for r, n in enumerate(sizes) if _shard_count(_shard_path(out_dir, "samples", r)) != n]
  _sync(f"sampling_todo_{out_dir}")
  sample_fn = None
  new_samples, seconds, compile_s = 0, 0.0, 0.0
  for r in todo:
    n, path = sizes[r], _shard_path(out_dir, "samples", r)
    y = _global(ctx.bat, _local_rows(((r * batch + np.arange(batch)) % max(num_classes, 1))
                                     .astype(np.int32)))
    key = jax.random.fold_in(rng, r)
    if sample_fn is None:
      # Compiled ahead of the first round, so samples/s counts sampling only.
      start = time.perf_counter()
      sample_fn = ctx.cached("sampler", lambda: _make_sampler(ctx, batch, weight).lower(
          params, key, y).compile())
      compile_s = time.perf_counter() - start
    start = time.perf_counter()
    x, nfe = sample_fn(params, key, y)
    x = _to_host(x)[:n]
    seconds += time.perf_counter() - start
    if not np.all(np.isfinite(x)):
      raise FloatingPointError(f"Sampling round {r} produced non-finite values.")
    samples = _to_uint8(x, bool(config.data.centered)) if _is_images(config) else x
    arrays = {"samples": samples, "nfe": np.asarray(int(nfe))}
    if num_classes > 0:
      arrays["labels"] = _to_host(y)[:n]
    if ctx.is_main:
      plotting.save_arrays(path, **arrays)  # atomic: a shard on disk is a finished round
    new_samples += n
    logging.info("sampling round %d/%d: %d samples, %d score evaluations, %.1f s", r + 1,
                 len(sizes), n, int(nfe), seconds)
  _sync("sampling")
  if ctx.is_main:
    _write_picture(config, out_dir, len(sizes))
  result: Dict[str, Any] = {"num_samples": sum(sizes), "sampling_rounds": len(sizes)}
  all_nfe = []
  for r in range(len(sizes)):
    with np.load(_shard_path(out_dir, "samples", r)) as f:
      all_nfe.append(int(f["nfe"]))
  result["sampling_nfe"] = float(np.mean(all_nfe))
  if new_samples:  # this run's rounds only; a resumed run may have done none
    result["samples_per_s"] = new_samples / seconds
    result["sampling_compile_s"] = compile_s
  return result


def _write_picture(config: ml_collections.ConfigDict, out_dir: str, rounds: int) -> None:
  """samples.png: a grid of the first samples, or for 2-D data a scatter beside the test data."""
  path = os.path.join(out_dir, "samples.png")
  if _is_images(config):
    x = np.load(_shard_path(out_dir, "samples", 0))["samples"][:_GRID_SIZE]
    plotting.save_image_grid(path, x.astype(np.float32) / 255.0)
    return
  pts, total = [], 0
  for r in range(rounds):
    if total >= _SCATTER_POINTS:
      break
    pts.append(np.load(_shard_path(out_dir, "samples", r))["samples"])
    total += pts[-1].shape[0]
  data = next(iter(datasets.get_dataset(config, "test", evaluation=True, batch_size=_SCATTER_POINTS,
                                        process_index=0, process_count=1)))["image"]
  plotting.save_scatter(path, np.concatenate(pts)[:_SCATTER_POINTS], np.asarray(data),
                        title=f"{min(total, _SCATTER_POINTS)} samples")


def _inception_settings(config: ml_collections.ConfigDict) -> Tuple[str, str, int]:
  e = config.eval
  return (str(e.get("inception_resize", "tf1")), str(e.get("inception_precision", "highest")),
          int(e.get("inception_batch_size", 250)))


def _stats_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  path = str(config.eval.get("stats_path", "") or "")
  if path:
    return path
  name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(config.data.dataset))
  resize = _inception_settings(config)[0]
  return os.path.join(workdir, "eval", f"stats_{name}_{int(config.data.image_size)}_{resize}.npz")


def _dataset_stats(ctx: _Context, workdir: str, feature_fn, batch: int):
  """The cached Inception statistics of the training images, computed on first use."""
  from score_jax import metrics  # pylint: disable=g-import-not-at-top

  config = ctx.config
  stats_path = _stats_path(config, workdir)
  exists = os.path.exists(stats_path)
  _sync("stats_exists")  # every process must take the same branch: computing is collective
  if exists:
    return metrics.load_stats(stats_path)
  logging.info("Computing Inception statistics of the %s training images -> %s (once).",
               config.data.dataset, stats_path)
  # Every process reads whole global batches; _batched gives the devices their rows.
  train_images = (b["image"][b["mask"]] for b in datasets.get_dataset(
      config, "train", evaluation=True, raw=True, batch_size=batch, process_index=0,
      process_count=1))
  # Only process 0 writes the cache; the others keep theirs in a private file.
  path = stats_path if ctx.is_main else f"{stats_path}.process{jax.process_index()}"
  stats = metrics.dataset_stats(
      path, train_images, lambda images: _batched(feature_fn, images, batch, ctx.bat)["pool"],
      recompute=True, num_features_kept=int(config.eval.get("kid_dataset_features", 10_000)),
      max_images=int(config.eval.get("stats_num_images", 0) or 0) or None)
  if not ctx.is_main:
    os.remove(path)
  return stats


def _fid_stage(ctx: _Context, workdir: str, out_dir: str, rounds: int) -> Dict[str, Any]:
  """FID, IS and KID of the shards' samples against the training set's Inception statistics.

  Features of each shard are saved beside it (features_<r>.npz), so an
  interrupted run computes only the missing ones. The dataset statistics
  are computed once (all training images as uint8, eval.stats_num_images
  to cap) and cached in eval.stats_path (default WORKDIR/eval/stats_*.npz).
  """
  from score_jax import inception, metrics  # pylint: disable=g-import-not-at-top

  config = ctx.config
  weights = str(config.eval.get("inception_path", "") or "")
  params = jax.device_put(inception.load_inception_params(weights), ctx.rep)
  resize, precision, batch = _inception_settings(config)
  batch = _padded(batch)
  raw_fn = ctx.cached("inception", lambda: _make_inception_fn(ctx, resize, precision))
  feature_fn = lambda images: raw_fn(params, images)

  def features_done(r: int) -> bool:  # present and made from the shard as it is now
    path = _shard_path(out_dir, "features", r)
    if not os.path.exists(path):
      return False
    with np.load(path) as f:
      return f["pool"].shape[0] == _shard_count(_shard_path(out_dir, "samples", r))

  todo = {r for r in range(rounds) if not features_done(r)}
  _sync(f"features_todo_{out_dir}")  # decided alike on every process: Inception is collective
  pools, logits = [], []
  for r in range(rounds):
    path = _shard_path(out_dir, "features", r)
    if r in todo:
      with np.load(_shard_path(out_dir, "samples", r)) as f:
        feats = _batched(feature_fn, f["samples"], batch, ctx.bat)
      pool, logit = feats["pool"], feats["logits"]
      if ctx.is_main:
        plotting.save_arrays(path, pool=pool, logits=logit)
    else:
      with np.load(path) as f:
        pool, logit = f["pool"], f["logits"]
    pools.append(pool)
    logits.append(logit)
  pool, logit = np.concatenate(pools), np.concatenate(logits)

  stats = _dataset_stats(ctx, workdir, lambda x: raw_fn(params, x), batch)
  result: Dict[str, Any] = {
      "fid": metrics.fid_from_stats(*metrics.stats_from_features(pool), stats.mu, stats.sigma),
      "inception_score": metrics.inception_score(logit)[0],
      "fid_dataset_images": int(stats.num_images), "fid_resize": resize,
      "fid_precision": precision}
  if stats.features is not None and stats.features.shape[0] >= 2:
    result["kid"], result["kid_std"] = metrics.kid(pool, stats.features)
  else:
    logging.info("%s holds no feature rows: KID skipped.", stats_path)
  return result


def _digits_stage(ctx: _Context, workdir: str, out_dir: str, rounds: int) -> Dict[str, Any]:
  """digits FD, its floor and the classifier scores of the shards' samples (digits_metric.py).

  Host-side and cheap: every process computes the same numbers; process 0
  alone writes the classifier cache. Class-conditional shards add the
  accuracy with respect to the requested labels.
  """
  from score_jax import digits_metric  # pylint: disable=g-import-not-at-top

  metric = digits_metric.load_or_train(os.path.join(workdir, "eval", "digits_classifier.npz"),
                                       write=ctx.is_main)
  samples, labels = [], []
  for r in range(rounds):
    with np.load(_shard_path(out_dir, "samples", r)) as f:
      samples.append(f["samples"])
      if "labels" in f.files:
        labels.append(f["labels"])
  scores = metric.scores(np.concatenate(samples), np.concatenate(labels) if labels else None)
  return {**scores, "digits_fd_floor": metric.floor}


# ----------------------------------------------------------------------------
# One checkpoint, and the eval mode


def _enabled(config: ml_collections.ConfigDict) -> Dict[str, bool]:
  e = config.eval
  sampling = bool(e.enable_sampling)
  return {"loss": bool(e.enable_loss), "likelihood": bool(e.enable_bpd), "sampling": sampling,
          "fid": sampling and _is_images(config) and bool(e.get("inception_path", "")),
          "digits": sampling and str(config.data.dataset).lower() == "digits"}


def _result_keys(config: ml_collections.ConfigDict) -> List[str]:
  """Keys a finished checkpoint JSON holds for the enabled metrics."""
  on = _enabled(config)
  keys = []
  if on["loss"]:
    keys.append("eval_loss")
  if on["likelihood"]:
    keys.append("bpd" if _is_images(config) else "nll_nats_per_dim")
  if on["sampling"]:
    keys.append("num_samples")
  if on["fid"]:
    keys.append("fid")
  if on["digits"]:
    keys.append("digits_fd")
  return keys


def _eval_fingerprint(config: ml_collections.ConfigDict) -> str:
  """Everything that changes a checkpoint's results (not the waiting options)."""
  ev = {k: v for k, v in config.eval.to_dict().items()
        if k not in ("begin_ckpt", "end_ckpt", "wait_timeout_s", "poll_interval_s")}
  return _fingerprint({"eval": ev, "sampling": _sampling_settings(config),
                       "data": config.data.to_dict()})


def evaluate_params(config: ml_collections.ConfigDict, workdir: str, params: Any, *, index: int,
                    step: int, setup: Optional[train.Setup] = None,
                    score_factory: Optional[ScoreFactory] = None) -> Dict[str, Any]:
  """Evaluates one set of (EMA) parameters as checkpoint `index`; writes eval/ckpt_<index>.json.

  Runs the enabled stages (module docstring) and resumes from what
  WORKDIR/eval/ckpt_<index>/ already holds.

  Args:
    config: the run's config.
    workdir: the run's directory.
    params: network parameters, replicated over setup.mesh (or, with a
      score_factory, whatever pytree it takes).
    index, step: the checkpoint index and training step (names files, keys randomness).
    setup: from train.make_setup(config) (built if None).
    score_factory: make(params, y) -> score_fn(x, t); default: the config's
      network. Lets a closed-form score run through the same path (tests).
      The loss stage always uses the network.
  Returns:
    The results dict that was written.
  """
  setup = setup or train.make_setup(config)
  ctx = _Context(config, setup, score_factory or network_score_factory(setup),
                 jax.process_index() == 0)
  return _evaluate(ctx, workdir, params, index, step)


def _evaluate(ctx: _Context, workdir: str, params: Any, index: int, step: int) -> Dict[str, Any]:
  config = ctx.config
  on = _enabled(config)
  out_dir = os.path.join(workdir, "eval", f"ckpt_{index}")
  os.makedirs(out_dir, exist_ok=True)
  progress = _Progress(os.path.join(out_dir, "progress.json"), ctx.is_main)
  _sync(f"progress_{index}")  # all processes read progress before anyone writes it
  rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), step)
  result: Dict[str, Any] = {"ckpt": index, "step": step, "settings": _eval_fingerprint(config)}
  start = time.perf_counter()
  if on["loss"]:
    result.update(_loss_stage(ctx, params, jax.random.fold_in(rng, _LOSS_STREAM), progress))
    logging.info("ckpt %d (step %d): eval loss %.5g", index, step, result["eval_loss"])
  if on["likelihood"]:
    result.update(_likelihood_stage(ctx, params, jax.random.fold_in(rng, _LIKELIHOOD_STREAM),
                                    progress))
    name = "bpd" if _is_images(config) else "nll_nats_per_dim"
    logging.info("ckpt %d (step %d): %s %.4f +- %.4f", index, step, name, result[name],
                 result[f"{name}_stderr"])
  if on["sampling"]:
    result.update(_sampling_stage(ctx, params, jax.random.fold_in(rng, _SAMPLE_STREAM), out_dir,
                                  progress))
    if on["fid"]:
      result.update(_fid_stage(ctx, workdir, out_dir, result["sampling_rounds"]))
      logging.info("ckpt %d (step %d): FID %.3f, IS %.3f, KID %s", index, step, result["fid"],
                   result["inception_score"], result.get("kid"))
    elif not _is_images(config):
      logging.info("2-D data: no FID / IS / KID (they need images); see samples.png.")
    else:
      logging.info("eval.inception_path is not set: FID / IS / KID skipped. Convert the "
                   "published weights once with `python -m score_jax.inception convert "
                   "pt_inception-2015-12-05-6726825d.pth inception_fid.npz` and pass "
                   "--config.eval.inception_path=inception_fid.npz.")
    if on["digits"]:
      result.update(_digits_stage(ctx, workdir, out_dir, result["sampling_rounds"]))
      logging.info("ckpt %d (step %d): digits FD %.4f (floor %.4f), confident %.3f, "
                   "classifier score %.3f", index, step, result["digits_fd"],
                   result["digits_fd_floor"], result["digits_confident"],
                   result["digits_classifier_score"])
  result["seconds"] = time.perf_counter() - start
  if ctx.is_main:
    _write_json(os.path.join(workdir, "eval", f"ckpt_{index}.json"), result)
  return result


def _scalars(result: Dict[str, Any]) -> Dict[str, float]:
  names = ("eval_loss", "bpd", "bpd_stderr", "nll_nats_per_dim", "nll_nats_per_dim_stderr", "fid",
           "inception_score", "kid", "sampling_nfe", "samples_per_s", "digits_fd",
           "digits_fd_floor", "digits_fd_355", "digits_confident", "digits_classifier_score",
           "digits_class_balance", "digits_label_accuracy")
  return {f"eval/{k}": float(result[k]) for k in names if k in result}


def eval(config: ml_collections.ConfigDict, workdir: str) -> List[Dict[str, Any]]:  # pylint: disable=redefined-builtin
  """The eval mode: evaluates checkpoints eval.begin_ckpt..eval.end_ckpt of WORKDIR.

  Waits (eval.wait_timeout_s, polling every eval.poll_interval_s) for
  checkpoints training has not written yet; skips checkpoints whose results
  are complete; see the module docstring for stages, files and resume.

  Returns:
    The results of each checkpoint in the range, in order.

  Raises:
    CheckpointWaitError: a checkpoint did not appear in time or never will.
    FileNotFoundError / ValueError: eval.inception_path is set but missing or
      malformed (the message names the converter command).
  """
  setup = train.make_setup(config)
  _check_batch("eval.batch_size", int(config.eval.batch_size))
  is_main = jax.process_index() == 0
  ctx = _Context(config, setup, network_score_factory(setup), is_main)
  if _enabled(config)["fid"]:  # fail before hours of sampling, not after
    from score_jax import inception  # pylint: disable=g-import-not-at-top
    inception.load_inception_params(str(config.eval.inception_path))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  writer = plotting.MetricWriter(os.path.join(workdir, "eval")) if is_main else None
  fingerprint, keys = _eval_fingerprint(config), _result_keys(config)
  results = []
  try:
    for index, step in checkpoint_steps(config):
      done = _read_json(os.path.join(workdir, "eval", f"ckpt_{index}.json"))
      if done and done.get("settings") == fingerprint and all(k in done for k in keys):
        logging.info("ckpt %d (step %d) already evaluated; skipping.", index, step)
        results.append(done)
        continue
      wait_for_checkpoint(ckpt_dir, step, timeout_s=float(config.eval.get("wait_timeout_s", 0.0)),
                          poll_s=float(config.eval.get("poll_interval_s", 60.0)),
                          final_step=int(config.training.n_iters))
      params = restore_ema_params(setup, ckpt_dir, step)
      result = _evaluate(ctx, workdir, params, index, step)
      if writer is not None:
        writer.scalars(step, _scalars(result))
        writer.flush()
      results.append(result)
  finally:
    if writer is not None:
      writer.close()
  return results


# ----------------------------------------------------------------------------
# The sample mode

_TASKS = ("generate", "inpaint", "colorize", "interpolate")
_MASKS = ("left_half", "right_half", "top_half", "bottom_half", "center")


def load_images(path: str, image_size: int, num_channels: int) -> np.ndarray:
  """Images from a .npz (key 'images', 'samples' or its only array), an image file or a folder.

  Returns uint8 [N, image_size, image_size, num_channels]; image files are
  converted ('L' or 'RGB') and resized with Pillow (bicubic), float arrays
  in [0, 1] are scaled to 0..255.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def from_pil(img):
    img = img.convert("L" if num_channels == 1 else "RGB")
    if img.size != (image_size, image_size):
      img = img.resize((image_size, image_size), Image.BICUBIC)
    a = np.asarray(img, np.uint8)
    return a[..., None] if a.ndim == 2 else a

  if not os.path.exists(path):
    raise FileNotFoundError(f"sample.images_path {path!r} does not exist.")
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path)
                   if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp")))
    if not files:
      raise ValueError(f"No .png / .jpg images in {path}.")
    return np.stack([from_pil(Image.open(os.path.join(path, f))) for f in files])
  if path.endswith(".npz"):
    with np.load(path) as f:
      key = next((k for k in ("images", "samples") if k in f.files), None)
      if key is None and len(f.files) != 1:
        raise ValueError(f"{path} holds {f.files}; name the array 'images'.")
      a = np.asarray(f[key or f.files[0]])
    if a.ndim == 3:
      a = a[..., None]
    if a.dtype != np.uint8:
      a = np.clip(np.round(a.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    want = (image_size, image_size, num_channels)
    if a.ndim != 4 or a.shape[1:] != want:
      raise ValueError(f"{path}: images have shape {a.shape}, the model wants [N, *{want}].")
    return a
  return from_pil(Image.open(path))[None]


def inpainting_mask(spec: str, image_size: int, num_channels: int) -> np.ndarray:
  """float32 [H, W, C] with 1 on known pixels: a named mask (_MASKS) or an image/.npz file.

  A file mask is read like an image (nonzero = known), broadcast over channels.
  """
  h = w = image_size
  m = np.zeros((h, w), np.float32)
  if spec == "left_half":
    m[:, w // 2:] = 1.0
  elif spec == "right_half":
    m[:, :w // 2] = 1.0
  elif spec == "top_half":
    m[h // 2:] = 1.0
  elif spec == "bottom_half":
    m[:h // 2] = 1.0
  elif spec == "center":
    m[:] = 1.0
    m[h // 4:h - h // 4, w // 4:w - w // 4] = 0.0
  elif os.path.exists(spec):
    a = load_images(spec, image_size, 1)[0, ..., 0]
    m = (a > 0).astype(np.float32)
  else:
    raise ValueError(f"sample.mask {spec!r} is neither one of {_MASKS} (the part to fill in) "
                     "nor an existing mask file.")
  return np.repeat(m[..., None], num_channels, axis=-1)


def slerp(z0: np.ndarray, z1: np.ndarray, alphas: np.ndarray) -> np.ndarray:
  """Spherical interpolation [len(alphas), ...] between latents z0 and z1 (flattened angles).

  Gaussian latents concentrate on a sphere; slerp keeps intermediate points
  there, where linear interpolation would shrink their norm.
  """
  a, b = z0.reshape(-1).astype(np.float64), z1.reshape(-1).astype(np.float64)
  cos = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
  theta = np.arccos(np.clip(cos, -1.0, 1.0))
  out = []
  for t in alphas:
    if theta < 1e-6:
      v = (1 - t) * a + t * b
    else:
      v = (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)
    out.append(v.reshape(z0.shape))
  return np.stack(out).astype(np.float32)


def _padded(n: int) -> int:
  """n rounded up to a multiple of the device count (extra rows are cut afterwards)."""
  d = jax.device_count()
  return math.ceil(n / d) * d


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
  if a.shape[0] >= rows:
    return a[:rows]
  return np.concatenate([a, np.repeat(a[-1:], rows - a.shape[0], axis=0)])


def _sample_labels(config: ml_collections.ConfigDict, n: int) -> np.ndarray:
  num_classes = _num_classes(config)
  label = int(config.sample.get("class_label", -1))
  if num_classes == 0:
    if label >= 0:
      logging.warning("sample.class_label is ignored: the model is unconditional.")
    return np.zeros((n,), np.int32)
  if label >= num_classes:
    raise ValueError(f"sample.class_label {label} is not a class of this model (0..{num_classes - 1}).")
  return (np.full((n,), label) if label >= 0 else np.arange(n) % num_classes).astype(np.int32)


def _controlled(ctx: _Context, task: str, batch: int, weight: float):
  """Jitted (params, rng, y [B], images [B, ...] model space, mask [B, ...]) -> (x, nfe)."""
  from score_jax import controllable  # pylint: disable=g-import-not-at-top

  config = ctx.config
  sampler = builders.get_sampler(config, ctx.setup.sde)
  shape = builders.data_shape(config, batch)
  num_classes = _num_classes(config)

  def run(params, rng, y, images, mask):
    score_fn = _guided(ctx.factory, params, y, weight, num_classes)
    if task == "inpaint":
      constraint = controllable.inpainting(ctx.setup.sde, images, mask)
    else:  # the gray level (channel mean) is kept, the chroma is generated
      constraint = controllable.colorization(ctx.setup.sde, jnp.mean(images, -1, keepdims=True))
    x, nfe = sampler(rng, score_fn, shape, constraint=constraint)
    return x, jnp.asarray(nfe, jnp.int32)

  b = ctx.bat
  return jax.jit(run, in_shardings=(ctx.rep, ctx.rep, b, b, b), out_shardings=(b, ctx.rep))


def _make_ode(ctx: _Context, batch: int, weight: float, denoise: bool):
  """Jitted encode (params, y, x) -> z and decode (params, y, z) -> x along the probability flow."""
  from score_jax import sampling  # pylint: disable=g-import-not-at-top

  s, sde = ctx.config.sampling, ctx.setup.sde
  num_classes = _num_classes(ctx.config)
  tol = dict(rtol=float(s.rtol), atol=float(s.atol), eps=float(s.eps))
  shape = builders.data_shape(ctx.config, batch)

  def encode(params, y, x):
    return sampling.ode_encode(sde, _guided(ctx.factory, params, y, weight, num_classes), x, **tol)

  def decode(params, y, z):
    return sampling.ode_sample(jax.random.PRNGKey(0), sde,
                               _guided(ctx.factory, params, y, weight, num_classes), shape,
                               denoise=denoise, z=z, **tol)

  b, r = ctx.bat, ctx.rep
  return (jax.jit(encode, in_shardings=(r, b, b), out_shardings=(b, r)),
          jax.jit(decode, in_shardings=(r, b, b), out_shardings=(b, r)))


def sample(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, str]:
  """The sample mode: writes config.sample.num samples of one checkpoint (EMA parameters).

  sample.task:
    generate: unconditional (or class-conditional, sample.class_label,
      sampling.guidance_weight) samples with config.sampling's sampler.
    inpaint: fills the unknown part (sample.mask) of sample.images_path.
    colorize: colors gray versions of sample.images_path (RGB models).
    interpolate: sample.interpolation_steps points along a slerp between two
      latents of the probability-flow ODE: the encodings of the first two
      images of sample.images_path, or two prior draws when it is empty.
  Files: <out>/<task>_step<k>.png (grid, or scatter for 2-D data) and
  <task>_step<k>.npz ('samples' in model space, 'images' uint8 for image
  data, 'labels', and 'inputs' for inpaint / colorize), <out> =
  sample.output_dir or WORKDIR/sample.

  Returns:
    {'png': path, 'npz': path}.
  """
  s = config.sample
  task = str(s.get("task", "generate"))
  if task not in _TASKS:
    raise ValueError(f"Unknown sample.task {task!r}; choose from {_TASKS}.")
  images_data = _is_images(config)
  if task in ("inpaint", "colorize") and not images_data:
    raise ValueError(f"sample.task={task!r} needs image data; {config.data.dataset!r} is 2-D.")
  if task == "colorize" and int(config.data.num_channels) != 3:
    raise ValueError("sample.task='colorize' needs an RGB model (data.num_channels = 3).")
  if task in ("inpaint", "colorize") and not s.get("images_path", ""):
    raise ValueError(f"sample.task={task!r} needs sample.images_path (.npz, image file or folder).")
  _sample_labels(config, 1)  # a bad class label fails before the checkpoint loads
  if task in ("inpaint", "colorize") and str(config.sampling.method).lower() == "ode":
    raise ValueError(f"sample.task={task!r} needs a sampler with per-step projections: "
                     "sampling.method pc, ddim, heun or dpm_solver, not ode.")

  setup = train.make_setup(config, need_data=False)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  step = existing_step(ckpt_dir, int(s.get("ckpt_step", -1)))
  params = restore_ema_params(setup, ckpt_dir, step)
  ctx = _Context(config, setup, network_score_factory(setup), jax.process_index() == 0)
  weight = float(config.sampling.get("guidance_weight", 0.0))
  centered = bool(config.data.centered)
  rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), step)
  arrays: Dict[str, np.ndarray] = {}

  if task == "interpolate":
    steps_n = int(s.get("interpolation_steps", 8))
    if steps_n < 2:
      raise ValueError(f"sample.interpolation_steps must be >= 2, got {steps_n}.")
    n = _padded(steps_n)
    labels = _pad_rows(_sample_labels(config, 1), n)  # one class along the path
    y = _global(ctx.bat, _local_rows(labels))
    path = str(s.get("images_path", "") or "")
    encode, decode = _make_ode(ctx, n, weight, denoise=not path)
    if path:
      imgs = load_images(path, int(config.data.image_size), int(config.data.num_channels))
      if imgs.shape[0] < 2:
        raise ValueError(f"Interpolation needs two images in {path}, found {imgs.shape[0]}.")
      x0 = datasets.data_scaler(centered)(imgs[:2].astype(np.float32) / 255.0)
      z, _ = encode(params, y, _global(ctx.bat, _local_rows(_pad_rows(x0, n))))
      z0, z1 = _to_host(z)[:2]
      arrays["inputs"] = imgs[:2]
    else:
      z0, z1 = np.asarray(setup.sde.prior_sampling(rng, builders.data_shape(config, 2)))
    latents = slerp(z0, z1, np.linspace(0.0, 1.0, steps_n))
    x, nfe = decode(params, y, _global(ctx.bat, _local_rows(_pad_rows(latents, n))))
    x = _to_host(x)[:steps_n]
    arrays["latents"] = latents
    labels = labels[:steps_n]
  else:
    num = int(s.get("num", 64))
    if num < 1:
      raise ValueError(f"sample.num must be >= 1, got {num}.")
    n = _padded(num)
    labels = _pad_rows(_sample_labels(config, num), n)
    y = _global(ctx.bat, _local_rows(labels))
    if task == "generate":
      x, nfe = _make_sampler(ctx, n, weight)(params, rng, y)
    else:
      imgs = load_images(str(s.images_path), int(config.data.image_size),
                         int(config.data.num_channels))
      imgs = np.resize(imgs, (num,) + imgs.shape[1:])  # repeat the given images up to num
      data = datasets.data_scaler(centered)(imgs.astype(np.float32) / 255.0)
      mask = (inpainting_mask(str(s.get("mask", "right_half")), int(config.data.image_size),
                              int(config.data.num_channels))
              if task == "inpaint" else np.ones(imgs.shape[1:], np.float32))
      masks = np.broadcast_to(mask, data.shape)
      fn = _controlled(ctx, task, n, weight)
      x, nfe = fn(params, rng, y, _global(ctx.bat, _local_rows(_pad_rows(data, n))),
                  _global(ctx.bat, _local_rows(_pad_rows(np.ascontiguousarray(masks), n))))
      arrays["inputs"] = imgs
      if task == "inpaint":
        arrays["mask"] = mask
        shown_inputs = (imgs * mask).astype(np.uint8)  # the unknown part blacked out
      else:
        shown_inputs = np.repeat(np.round(imgs.mean(-1, keepdims=True)).astype(np.uint8), 3, -1)
    x = _to_host(x)[:num]
    labels = labels[:num]

  if not np.all(np.isfinite(x)):
    raise FloatingPointError("Sampling produced non-finite values.")
  out_dir = str(s.get("output_dir", "") or "") or os.path.join(workdir, "sample")
  base = os.path.join(out_dir, f"{task}_step{step}")
  arrays.update(samples=x.astype(np.float32), nfe=np.asarray(int(nfe)))
  if _num_classes(config) > 0:
    arrays["labels"] = labels
  if ctx.is_main:
    if images_data:
      arrays["images"] = _to_uint8(x, centered)
      shown = arrays["images"]
      if task in ("inpaint", "colorize"):  # inputs above their results
        shown = np.concatenate([shown_inputs[:_GRID_SIZE // 2], shown[:_GRID_SIZE // 2]])
      plotting.save_image_grid(base + ".png", shown.astype(np.float32) / 255.0,
                               ncols=len(x) if task == "interpolate" else None)
    else:
      data = next(iter(datasets.get_dataset(config, "test", evaluation=True, batch_size=2048,
                                            process_index=0, process_count=1)))["image"]
      plotting.save_scatter(base + ".png", x, np.asarray(data),
                            title=f"{task}, step {step}, {int(nfe)} score evaluations")
    plotting.save_arrays(base + ".npz", **arrays)
    logging.info("Wrote %s.png and .npz (%d samples, %d score evaluations).", base, len(x),
                 int(nfe))
  return {"png": base + ".png", "npz": base + ".npz"}
