"""The eval mode: `run(settings, workdir)`.

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
     scores of those samples (score_jax/metrics/digits.py: a small classifier
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
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np

from score_jax import files, plotting
from score_jax.run import checkpoints, writers
from score_jax.run import distributed
from score_jax.run import quality as eval_quality
from score_jax.run import programs
from score_jax.run import grids
from score_jax.run import state as run_state
from score_jax.run.checkpoints import CheckpointWaitError
from score_jax.run.distributed import check_batch, global_array, local_rows, sync, to_host
from score_jax.errors import WorkdirError
from score_jax.run.programs import Programs, ScoreFactory, Setup
from score_jax.run.settings import Settings
from score_jax.data.scaling import to_uint8

Array = jax.Array

__all__ = ["run", "evaluate_params", "checkpoint_steps", "scalars",
           "CheckpointWaitError"]

_GRID_SIZE = 64  # images in the PNG grid
_SCATTER_POINTS = 8192  # toy samples in the scatter plot
# Streams of fold_in(root key, stream): each stage's randomness is independent.
_LOSS_STREAM, _LIKELIHOOD_STREAM, _SAMPLE_STREAM = 1, 2, 3


def checkpoint_steps(s: Settings) -> List[Tuple[int, int]]:
  """[(index k, training step)] of eval.begin_ckpt..eval.end_ckpt (module docstring).

  Raises:
    ConfigError: begin_ckpt < 1 (no checkpoint precedes the first step), an
      empty range, or a range that starts after the end of training.
  """
  from score_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top

  freq, n_iters = s.training.snapshot_freq, s.training.n_iters
  begin, end = s.eval.begin_ckpt, s.eval.end_ckpt
  last = math.ceil(n_iters / freq)  # index of the final step
  if begin < 1:
    raise ConfigError(f"eval.begin_ckpt must be >= 1 (index k is step k * snapshot_freq = "
                      f"k * {freq}; training writes no checkpoint at step 0), got {begin}.")
  if end < begin:
    raise ConfigError(f"eval.end_ckpt ({end}) is smaller than eval.begin_ckpt ({begin}).")
  if begin > last:
    raise ConfigError(
        f"eval.begin_ckpt = {begin} is step {begin * freq}, after the end of training "
        f"(n_iters = {n_iters}, snapshot_freq = {freq}: indices 1..{last}). Use e.g. "
        f"--config.eval.begin_ckpt=1 --config.eval.end_ckpt={last}.")
  if end > last:
    logging.info("eval.end_ckpt = %d is past the end of training; evaluating up to index %d "
                 "(step %d).", end, last, n_iters)
  return [(k, min(k * freq, n_iters)) for k in range(begin, min(end, last) + 1)]


def _fingerprint(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Progress:
  """progress.json of one checkpoint: finished units of work, rewritten atomically."""

  def __init__(self, path: str, is_main: bool):
    self.path = path
    self.is_main = is_main
    self.data: Dict[str, Any] = files.read_json(path) or {}

  def save(self) -> None:
    if self.is_main:
      files.write_json(self.path, self.data)


def _likelihood_settings(s: Settings) -> Dict[str, Any]:
  e = s.eval
  return {"hutchinson": e.hutchinson, "rtol": e.likelihood_rtol, "atol": e.likelihood_atol,
          "eps": e.likelihood_eps}


def _loss_stage(progs: Programs, params: Any, rng: Array, progress: _Progress) -> Dict[str, float]:
  """Mean per-example loss over the whole eval split ('test'), EMA parameters."""
  if "loss" in progress.data:
    return progress.data["loss"]
  fn = progs.loss()
  total = count = 0.0
  for i, batch in enumerate(programs.get_dataset(progs.settings, "test", evaluation=True)):
    x = global_array(progs.bat, batch["image"].astype(np.float32))
    y = global_array(progs.bat, batch["label"].astype(np.int32))
    per = to_host(fn(params, jax.random.fold_in(rng, i), x, y))
    mask = to_host(global_array(progs.bat, batch["mask"]))  # padding of the last batch
    total += float(np.sum(per[mask], dtype=np.float64))
    count += int(mask.sum())
  progress.data["loss"] = {"eval_loss": total / count, "eval_loss_examples": int(count)}
  progress.save()
  return progress.data["loss"]


def _likelihood_stage(progs: Programs, params: Any, rng: Array,
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
  s = progs.settings
  images = s.data.is_images
  split = s.eval.bpd_dataset
  batch = check_batch("eval.batch_size", s.eval.batch_size)
  num_passes = s.eval.bpd_passes
  settings = dict(_likelihood_settings(s), batch_size=batch, dataset=split)
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
    fn = progs.likelihood()
    pass_key = jax.random.fold_in(rng, p)
    it = programs.get_dataset(s, split, evaluation=True, raw=images, batch_size=batch,
                              start_step=rec["next_batch"])
    for i, b in enumerate(it, start=rec["next_batch"]):
      data = b["image"] if images else b["image"].astype(np.float32)
      value, nfe = fn(params, jax.random.fold_in(pass_key, i), global_array(progs.bat, data),
                      global_array(progs.bat, b["label"].astype(np.int32)))
      value = to_host(value).astype(np.float64)
      mask = to_host(global_array(progs.bat, b["mask"]))
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


def _round_sizes(num_samples: int, batch: int) -> List[int]:
  """Samples kept from each round: full batches, the last one cut to the total."""
  return [min(batch, num_samples - start) for start in range(0, num_samples, batch)]


def _sampling_settings(s: Settings) -> Dict[str, Any]:
  """What fixes a round's samples: a change makes existing shards stale."""
  out = {"sampling": s.raw["sampling"], "batch_size": s.eval.batch_size,
         "model": s.raw["model"], "seed": s.seed, "sde": s.training.sde,
         "continuous": s.training.continuous}
  if s.data.is_images and s.eval.quantization != "round":  # shards written before it existed rounded
    out["quantization"] = s.eval.quantization
  if s.sample.guide_workdir:  # autoguidance
    out["guide"] = [s.sample.guide_workdir, s.sample.guide_step]
  return out


def _sampling_stage(progs: Programs, params: Any, rng: Array, out_dir: str,
                    progress: _Progress) -> Dict[str, Any]:
  """Writes eval.num_samples samples as shards samples_<r>.npz, skipping finished rounds.

  Round r samples a full batch with key fold_in(rng, r) and keeps its first
  min(B, num_samples - r B) samples, so shards always add up to exactly
  num_samples. A shard of the wrong size (num_samples changed) is redone.
  Class-conditional models cycle through the labels.
  """
  s = progs.settings
  batch = check_batch("eval.batch_size", s.eval.batch_size)
  sizes = _round_sizes(s.eval.num_samples, batch)
  settings = _fingerprint(_sampling_settings(s))
  old = progress.data.get("sampling_settings")
  if old is not None and old != settings and any(
      os.path.exists(eval_quality.shard_path(out_dir, "samples", r)) for r in range(len(sizes))):
    raise ValueError(
        f"The sample shards in {out_dir} were made with other sampling settings (sampler, "
        "model, seed or eval.batch_size); mixing them would be wrong. Delete that folder "
        "or run with the original settings.")
  progress.data["sampling_settings"] = settings
  progress.save()
  num_classes = s.model.num_classes
  weight = s.sampling.guidance_weight
  params = progs.guided(params)  # with the autoguidance guide's, if any
  # Decided before anything is written, and alike on every process: sampling is collective.
  todo = [r for r, n in enumerate(sizes) if eval_quality.shard_count(eval_quality.shard_path(out_dir, "samples", r)) != n]
  sync(f"sampling_todo_{out_dir}")
  sample_fn = None
  new_samples, seconds, compile_s = 0, 0.0, 0.0
  for r in todo:
    n, path = sizes[r], eval_quality.shard_path(out_dir, "samples", r)
    y = global_array(progs.bat, local_rows(((r * batch + np.arange(batch)) % max(num_classes, 1))
                                     .astype(np.int32)))
    key = jax.random.fold_in(rng, r)
    if sample_fn is None:
      # Compiled ahead of the first round, so samples/s counts sampling only.
      start = time.perf_counter()
      timesteps = grids.grid_for(progs, params, out_dir, weight, rng)  # unipc 'optimized'
      sample_fn = progs.sampler(batch, weight, timesteps).lower(params, key, y).compile()
      compile_s = time.perf_counter() - start
    start = time.perf_counter()
    x, nfe = sample_fn(params, key, y)
    x = to_host(x)[:n]
    seconds += time.perf_counter() - start
    if not np.all(np.isfinite(x)):
      raise FloatingPointError(f"Sampling round {r} produced non-finite values.")
    samples = (to_uint8(x, s.data.centered, s.eval.quantization) if s.data.is_images else x)
    arrays = {"samples": samples, "nfe": np.asarray(int(nfe))}
    if num_classes > 0:
      arrays["labels"] = to_host(y)[:n]
    if distributed.is_main():
      plotting.save_arrays(path, **arrays)  # atomic: a shard on disk is a finished round
    new_samples += n
    logging.info("sampling round %d/%d: %d samples, %d score evaluations, %.1f s", r + 1,
                 len(sizes), n, int(nfe), seconds)
  sync("sampling")
  if distributed.is_main():
    _write_picture(s, out_dir, len(sizes))
  result: Dict[str, Any] = {"num_samples": sum(sizes), "sampling_rounds": len(sizes)}
  all_nfe = []
  for r in range(len(sizes)):
    with np.load(eval_quality.shard_path(out_dir, "samples", r)) as f:
      all_nfe.append(int(f["nfe"]))
  result["sampling_nfe"] = float(np.mean(all_nfe))
  if new_samples:  # this run's rounds only; a resumed run may have done none
    result["samples_per_s"] = new_samples / seconds
    result["sampling_compile_s"] = compile_s
  return result


def _write_picture(s: Settings, out_dir: str, rounds: int) -> None:
  """samples.png: a grid of the first samples, or for 2-D data a scatter beside the test data."""
  path = os.path.join(out_dir, "samples.png")
  if s.data.is_images:
    x = np.load(eval_quality.shard_path(out_dir, "samples", 0))["samples"][:_GRID_SIZE]
    plotting.save_image_grid(path, x.astype(np.float32) / 255.0)
    return
  pts, total = [], 0
  for r in range(rounds):
    if total >= _SCATTER_POINTS:
      break
    pts.append(np.load(eval_quality.shard_path(out_dir, "samples", r))["samples"])
    total += pts[-1].shape[0]
  data = next(iter(programs.get_dataset(s, "test", evaluation=True, batch_size=_SCATTER_POINTS,
                                        process_index=0, process_count=1)))["image"]
  plotting.save_scatter(path, np.concatenate(pts)[:_SCATTER_POINTS], np.asarray(data),
                        title=f"{min(total, _SCATTER_POINTS)} samples")


def _enabled(s: Settings) -> Dict[str, bool]:
  e = s.eval
  sampling = e.enable_sampling
  return {"loss": e.enable_loss, "likelihood": e.enable_bpd, "sampling": sampling,
          "fid": sampling and s.data.is_images and bool(e.inception_path),
          "digits": sampling and s.data.dataset.lower() == "digits"}


def _result_keys(s: Settings) -> List[str]:
  """Keys a finished checkpoint JSON holds for the enabled metrics."""
  on = _enabled(s)
  keys = []
  if on["loss"]:
    keys.append("eval_loss")
  if on["likelihood"]:
    keys.append("bpd" if s.data.is_images else "nll_nats_per_dim")
  if on["sampling"]:
    keys.append("num_samples")
  if on["fid"]:
    keys.append("fid")
  if on["digits"]:
    keys.append("digits_fd")
  return keys


def _eval_fingerprint(s: Settings) -> str:
  """Everything that changes a checkpoint's results (not the waiting options)."""
  ev = {k: v for k, v in s.raw["eval"].items()
        if k not in ("begin_ckpt", "end_ckpt", "wait_timeout_s", "poll_interval_s")}
  return _fingerprint({"eval": ev, "sampling": _sampling_settings(s), "data": s.raw["data"]})


def evaluate_params(settings: Settings, workdir: str, params: Any, *, index: int, step: int,
                    setup: Optional[Setup] = None,
                    score_factory: Optional[ScoreFactory] = None) -> Dict[str, Any]:
  """Evaluates one set of (EMA) parameters as checkpoint `index`; writes eval/ckpt_<index>.json.

  Runs the enabled stages (module docstring) and resumes from what
  WORKDIR/eval/ckpt_<index>/ already holds.

  Args:
    settings: the run's settings.
    workdir: the run's directory.
    params: network parameters, replicated over setup.mesh (or, with a
      score_factory, whatever pytree it takes).
    index, step: the checkpoint index and training step (names files, keys randomness).
    setup: from programs.make_setup(settings) (built if None).
    score_factory: make(params, y) -> score_fn(x, t); default: the settings'
      network. Lets a closed-form score run through the same path (tests).
      The loss stage always uses the network.
  Returns:
    The results dict that was written.
  """
  progs = Programs(setup or programs.make_setup(settings), score_factory)
  return _evaluate(progs, workdir, params, index, step)


def _evaluate(progs: Programs, workdir: str, params: Any, index: int, step: int) -> Dict[str, Any]:
  s = progs.settings
  on = _enabled(s)
  out_dir = os.path.join(workdir, "eval", f"ckpt_{index}")
  os.makedirs(out_dir, exist_ok=True)
  progress = _Progress(os.path.join(out_dir, "progress.json"), distributed.is_main())
  sync(f"progress_{index}")  # all processes read progress before anyone writes it
  rng = jax.random.fold_in(jax.random.PRNGKey(s.seed), step)
  result: Dict[str, Any] = {"ckpt": index, "step": step, "settings": _eval_fingerprint(s)}
  start = time.perf_counter()
  if on["loss"]:
    result.update(_loss_stage(progs, params, jax.random.fold_in(rng, _LOSS_STREAM), progress))
    logging.info("ckpt %d (step %d): eval loss %.5g", index, step, result["eval_loss"])
  if on["likelihood"]:
    result.update(_likelihood_stage(progs, params, jax.random.fold_in(rng, _LIKELIHOOD_STREAM),
                                    progress))
    name = "bpd" if s.data.is_images else "nll_nats_per_dim"
    logging.info("ckpt %d (step %d): %s %.4f +- %.4f", index, step, name, result[name],
                 result[f"{name}_stderr"])
  if on["sampling"]:
    result.update(_sampling_stage(progs, params, jax.random.fold_in(rng, _SAMPLE_STREAM), out_dir,
                                  progress))
    if on["fid"]:
      result.update(eval_quality.fid_stage(progs, workdir, out_dir, result["sampling_rounds"]))
      result["fid_quantization"] = s.eval.quantization
      logging.info("ckpt %d (step %d): FID %.3f, IS %.3f, KID %s (samples quantized by %s)",
                   index, step, result["fid"], result["inception_score"], result.get("kid"),
                   s.eval.quantization)
      eval_quality.warn_if_not_the_reference_network(s)
    elif not s.data.is_images:
      logging.info("2-D data: no FID / IS / KID (they need images); see samples.png.")
    else:
      logging.info("eval.inception_path is not set: FID / IS / KID skipped. Convert the "
                   "published weights once with `python -m score_jax.metrics.inception convert "
                   "pt_inception-2015-12-05-6726825d.pth inception_fid.npz` and pass "
                   "--config.eval.inception_path=inception_fid.npz.")
    if on["digits"]:
      result.update(eval_quality.digits_stage(progs, workdir, out_dir, result["sampling_rounds"]))
      logging.info("ckpt %d (step %d): digits FD %.4f (floor %.4f), confident %.3f, "
                   "classifier score %.3f", index, step, result["digits_fd"],
                   result["digits_fd_floor"], result["digits_confident"],
                   result["digits_classifier_score"])
  result["seconds"] = time.perf_counter() - start
  if distributed.is_main():
    files.write_json(os.path.join(workdir, "eval", f"ckpt_{index}.json"), result)
  return result


def scalars(result: Dict[str, Any]) -> Dict[str, float]:
  """The TensorBoard scalars ('eval/<name>') of one checkpoint's results."""
  names = ("eval_loss", "bpd", "bpd_stderr", "nll_nats_per_dim", "nll_nats_per_dim_stderr", "fid",
           "inception_score", "kid", "sampling_nfe", "samples_per_s", "digits_fd",
           "digits_fd_floor", "digits_fd_355", "digits_confident", "digits_classifier_score",
           "digits_class_balance", "digits_label_accuracy")
  return {f"eval/{k}": float(result[k]) for k in names if k in result}


def _check_workdir(workdir: str, ckpt_dir: str) -> None:
  """A workdir that was never trained (no config.json, no checkpoint) will get no checkpoint."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir {workdir} is a file, not a run's folder.")
  trained = (os.path.exists(os.path.join(workdir, "config.json"))
             or bool(checkpoints.finished_steps(ckpt_dir)))
  if not trained:
    raise WorkdirError(
        f"{workdir} holds no training run (no config.json, no checkpoint in {ckpt_dir}), so "
        "there is nothing to evaluate and nothing to wait for. Train first (--mode=train, "
        "eval can run beside it), or convert a released checkpoint (python -m "
        "score_jax.convert.reference).")


def run(settings: Settings, workdir: str) -> List[Dict[str, Any]]:
  """The eval mode: evaluates checkpoints eval.begin_ckpt..eval.end_ckpt of WORKDIR.

  Waits (eval.wait_timeout_s, polling every eval.poll_interval_s) for
  checkpoints a training run beside it has not written yet; fails at once
  on a workdir that was never trained; skips checkpoints whose results are
  complete; see the module docstring for stages, files and resume.

  Returns:
    The results of each checkpoint in the range, in order.

  Raises:
    WorkdirError: the workdir was never trained.
    CheckpointWaitError: a checkpoint did not appear in time or never will.
    FileNotFoundError / ValueError: eval.inception_path is set but missing or
      malformed (the message names the converter command).
  """
  ckpt_dir = os.path.join(workdir, "checkpoints")
  _check_workdir(workdir, ckpt_dir)
  steps = checkpoint_steps(settings)
  setup = programs.make_setup(settings)
  check_batch("eval.batch_size", settings.eval.batch_size)
  from score_jax.run import load as runs  # pylint: disable=g-import-not-at-top  # runs imports evaluate's peers
  progs = Programs(setup, guide=runs.load_guide(settings, setup))
  if _enabled(settings)["fid"]:  # fail before hours of sampling, not after
    from score_jax.metrics import inception  # pylint: disable=g-import-not-at-top
    inception.load_inception_params(settings.eval.inception_path)
  is_main = distributed.is_main()
  writer = writers.MetricWriter(os.path.join(workdir, "eval")) if is_main else None
  fingerprint, keys = _eval_fingerprint(settings), _result_keys(settings)
  results = []
  try:
    for index, step in steps:
      done = files.read_json(os.path.join(workdir, "eval", f"ckpt_{index}.json"))
      if done and done.get("settings") == fingerprint and all(k in done for k in keys):
        logging.info("ckpt %d (step %d) already evaluated; skipping.", index, step)
        results.append(done)
        continue
      checkpoints.wait_for_checkpoint(ckpt_dir, step, timeout_s=settings.eval.wait_timeout_s,
                                      poll_s=settings.eval.poll_interval_s,
                                      final_step=settings.training.n_iters)
      params = run_state.restore_ema_params(setup, ckpt_dir, step)
      result = _evaluate(progs, workdir, params, index, step)
      if writer is not None:
        writer.scalars(step, scalars(result))
        writer.flush()
      results.append(result)
  finally:
    if writer is not None:
      writer.close()
  return results
