"""The eval mode: `run(settings, workdir)`.

`--mode=eval` evaluates the EMA parameters of every checkpoint in a range,
waiting for checkpoints that training has not written yet, so it can run
beside training. It runs the metric units of score_jax.run.eval_metrics that
the plan enables, in the order of their METRICS table (one module each):
  loss        eval.enable_loss: the training objective on the eval split ('test');
  likelihood  eval.enable_bpd: eval.bpd_passes passes over eval.bpd_dataset with
              the probability-flow ODE: bits/dim of uniformly dequantized 8-bit
              images, or (2-D toy data) the negative log-likelihood in nats per
              dimension; mean and standard error;
  samples     eval.enable_sampling: eval.num_samples samples from the configured
              sampler, in rounds of eval.batch_size, written as array shards,
              plus a PNG grid (a scatter plot beside the data for 2-D data);
  fid         FID, Inception Score and KID of those samples against the
              dataset's statistics, with the Inception weights of
              eval.inception_path, or when it is empty those that
              `python -m score_jax.convert.inception SRC` put in its default
              location (~/.cache/score_jax/inception/; not for the digits);
  fd_dinov2   FD-DINOv2 (EDM2's) of those samples: the Frechet distance of DINOv2
              ViT-L/14 features against the dataset's, with the weights of
              eval.dinov2_path, or when it is empty those that
              `python -m score_jax.convert.dinov2 SRC` put in its default
              location (~/.cache/score_jax/dinov2/; not for the digits);
  digits      for data.dataset 'digits', the digits FD, its floor and the
              classifier scores of those samples (score_jax/metrics/digits.py: a
              small classifier trained in seconds, cached in
              WORKDIR/eval/digits_classifier.npz).
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
  WORKDIR/eval/ckpt_<k>/dinov2_<r>.npz  DINOv2 'features' [n, 1024]
  WORKDIR/eval/ckpt_<k>/samples.png     grid of the first samples

Resume: every file is written to a temporary name and renamed, so a file that
exists is complete. A restarted eval skips checkpoints whose JSON holds every
enabled metric, sampling rounds whose shard exists, Inception and DINOv2
features whose file exists, and likelihood batches recorded in progress.json; each round and
batch draws its randomness from fold_in(key, index), so redoing an interrupted
one gives the values it would have given. Shards hold exactly num_samples
samples in all (the last round is cut), whatever was interrupted.

Sharding: sampling, likelihood and loss batches are split over a 1-D mesh of
all devices (parameters replicated); eval.batch_size must divide by the
device count. With several processes each reads its slice of the data, and
process 0 gathers results and writes files (the workdir must be shared).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import jax

from score_jax import files
from score_jax.errors import WorkdirError
from score_jax.run import checkpoints, distributed, eval_metrics, writers
from score_jax.run import state as run_state
from score_jax.run.checkpoints import CheckpointWaitError
from score_jax.run.distributed import check_batch, sync
from score_jax.run.plan import Plan, checkpoint_range, make_plan
from score_jax.run.programs import Programs, ScoreFactory
from score_jax.run.settings import Settings

Array = jax.Array

__all__ = ["run", "evaluate", "evaluate_params", "checkpoint_steps", "scalars",
           "CheckpointWaitError"]


def checkpoint_steps(s: Settings) -> List[Tuple[int, int]]:
  """[(index k, training step)] of eval.begin_ckpt..eval.end_ckpt (module docstring).

  Raises:
    ConfigError: begin_ckpt < 1 (no checkpoint precedes the first step), an
      empty range, or a range that starts after the end of training.
  """
  return checkpoint_range(s.eval.begin_ckpt, s.eval.end_ckpt, s.training.snapshot_freq,
                          s.training.n_iters)


def evaluate_params(settings: Settings, workdir: str, params: Any, *, index: int, step: int,
                    plan: Optional[Plan] = None,
                    score_factory: Optional[ScoreFactory] = None) -> Dict[str, Any]:
  """Evaluates one set of (EMA) parameters as checkpoint `index`; writes eval/ckpt_<index>.json.

  Runs the enabled metrics (module docstring) and resumes from what
  WORKDIR/eval/ckpt_<index>/ already holds.

  Args:
    settings: the run's settings.
    workdir: the run's directory.
    params: network parameters, replicated over the plan's mesh (or, with a
      score_factory, whatever pytree it takes).
    index, step: the checkpoint index and training step (names files, keys randomness).
    plan: the run plan, `score_jax.run.plan.make_plan(settings)` (built if None).
    score_factory: make(params, y) -> score_fn(x, t); default: the settings'
      network. Lets a closed-form score run through the same path (tests).
      The loss always uses the network.
  Returns:
    The results dict that was written.
  """
  return evaluate(Programs(plan or make_plan(settings), score_factory), workdir, params, index,
                  step)


def evaluate(progs: Programs, workdir: str, params: Any, index: int, step: int) -> Dict[str, Any]:
  """Runs the metrics the plan enables on one checkpoint's parameters; writes its JSON."""
  plan = progs.plan
  on = eval_metrics.enabled(plan)
  out_dir = os.path.join(workdir, "eval", f"ckpt_{index}")
  os.makedirs(out_dir, exist_ok=True)
  progress = eval_metrics.Progress(os.path.join(out_dir, "progress.json"), distributed.is_main())
  sync(f"progress_{index}")  # all processes read progress before anyone writes it
  rng = jax.random.fold_in(jax.random.PRNGKey(plan.eval.seed), step)
  result: Dict[str, Any] = {"ckpt": index, "step": step, "settings": plan.eval.fingerprint}
  start = time.perf_counter()
  for name, metric in eval_metrics.METRICS.items():
    if name not in on:
      if metric.why_off is not None and all(n in on for n in metric.needs) and metric.needs:
        logging.info(metric.why_off(plan))
      continue
    key = None if metric.stream is None else jax.random.fold_in(rng, metric.stream)
    result.update(metric.compute(eval_metrics.Inputs(
        plan=plan, progs=progs, params=params, rng=key, workdir=workdir, out_dir=out_dir,
        progress=progress, index=index, step=step, results=dict(result))))
  result["seconds"] = time.perf_counter() - start
  if distributed.is_main():
    files.write_json(os.path.join(workdir, "eval", f"ckpt_{index}.json"), result)
  return result


def scalars(result: Dict[str, Any]) -> Dict[str, float]:
  """The TensorBoard scalars ('eval/<name>') of one checkpoint's results."""
  return {f"eval/{k}": float(result[k]) for k in eval_metrics.scalar_names() if k in result}


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
        "score_jax.convert --help).")


def run(settings: Settings, workdir: str) -> List[Dict[str, Any]]:
  """The eval mode: evaluates checkpoints eval.begin_ckpt..eval.end_ckpt of WORKDIR.

  Waits (eval.wait_timeout_s, polling every eval.poll_interval_s) for
  checkpoints a training run beside it has not written yet; fails at once
  on a workdir that was never trained; skips checkpoints whose results are
  complete; see the module docstring for metrics, files and resume.

  Returns:
    The results of each checkpoint in the range, in order.

  Raises:
    WorkdirError: the workdir was never trained.
    CheckpointWaitError: a checkpoint did not appear in time or never will.
    DamagedCheckpointError: a checkpoint of the range is damaged (its files cut short or
      lost); set eval.begin_ckpt / eval.end_ckpt around it.
    FileNotFoundError / ValueError: eval.inception_path is set but missing or
      malformed (the message names the converter command).

  Long stages (likelihood batches, sampling rounds, Inception features) show a
  progress bar with the time left and log the estimate once.
  """
  ckpt_dir = os.path.join(workdir, "checkpoints")
  _check_workdir(workdir, ckpt_dir)
  steps = checkpoint_steps(settings)  # a bad range fails before the plan is built
  plan = make_plan(settings)
  check_batch("eval.batch_size", plan.eval.batch_size)
  run_state.check_workdir(plan, workdir)  # a config the checkpoints do not fit fails at once
  from score_jax.run import load  # pylint: disable=g-import-not-at-top  # load_run's plan and guide
  return evaluate_checkpoints(Programs(plan, guide=load.load_guide(settings, plan)), workdir,
                              steps)


def evaluate_checkpoints(progs: Programs, workdir: str,
                         steps: Optional[List[Tuple[int, int]]] = None) -> List[Dict[str, Any]]:
  """The eval loop over [(index, step)] (default: the plan's checkpoint range); `run` is the
  entry."""
  plan = progs.plan
  ckpt_dir = os.path.join(workdir, "checkpoints")
  on = eval_metrics.enabled(plan)
  for name in on:  # fail before hours of sampling, not after
    if eval_metrics.METRICS[name].check is not None:
      eval_metrics.METRICS[name].check(plan)
  is_main = distributed.is_main()
  writer = writers.MetricWriter(os.path.join(workdir, "eval")) if is_main else None
  keys = [eval_metrics.METRICS[name].done_key(plan) for name in on]
  results = []
  try:
    for index, step in plan.eval.checkpoints() if steps is None else steps:
      done = files.read_json(os.path.join(workdir, "eval", f"ckpt_{index}.json"))
      if done and done.get("settings") == plan.eval.fingerprint and all(k in done for k in keys):
        logging.info("ckpt %d (step %d) already evaluated; skipping.", index, step)
        results.append(done)
        continue
      checkpoints.wait_for_checkpoint(ckpt_dir, step, timeout_s=plan.eval.wait_timeout_s,
                                      poll_s=plan.eval.poll_interval_s,
                                      final_step=plan.eval.n_iters)
      params = run_state.restore_ema_params(plan, ckpt_dir, step)
      result = evaluate(progs, workdir, params, index, step)
      if writer is not None:
        writer.scalars(step, scalars(result))
        writer.flush()
      results.append(result)
  finally:
    if writer is not None:
      writer.close()
  return results
