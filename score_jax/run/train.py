"""Training: train state, the jitted data-parallel step, and the training loop.

One code path from one CPU to a pod: a ('data', 'fsdp') device mesh over all
devices, the batch split over all of them, the train state replicated or split
along 'fsdp' (training.sharding; score_jax.run.sharding). Resume order (the
one place it is decided): the newest complete checkpoint in
WORKDIR/checkpoints (damaged newer ones are skipped with a warning and moved
to WORKDIR/checkpoints_damaged/), else a fresh initialization from
config.seed. The data position is a pure function of the step, so a resumed
run reads exactly the batches an uninterrupted one would.

Workdir safety: a training holds WORKDIR/.lock while it runs (score_jax.run.
lock), so a second one on the same workdir stops at once. SIGTERM and Ctrl-C
(SIGINT) save a checkpoint of the step in progress and stop: SIGTERM returns
normally (main.py exits with 0), Ctrl-C raises `TrainingInterrupted` (a
KeyboardInterrupt; main.py exits with 130); a second Ctrl-C aborts at once
without saving.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from score_jax import plotting
from score_jax.data import augment
from score_jax.run import checkpoints, writers
from score_jax.data import datasets
from score_jax.run import distributed
from score_jax.run import lock
from score_jax.run import phema
from score_jax.run import programs
from score_jax.run import sharding
from score_jax.run import progress
from score_jax.run.plan import Plan, make_plan
from score_jax.run.builders import LossContext
from score_jax.run.state import (PhemaTrainState, TrainState, abstract_state, check_workdir,
                                 init_state, save_config, start_from_teacher, teacher_params)
from score_jax.errors import UserError, WorkdirError
from score_jax.run.settings import Settings

Array = jax.Array


class NonFiniteLossError(UserError, FloatingPointError):
  """Training produced a non-finite loss or gradient."""


class TrainingInterrupted(KeyboardInterrupt):
  """Ctrl-C stopped training after saving a checkpoint (the message says which)."""


def apply_update(plan: Plan, state: TrainState, grads) -> TrainState:
  """The state after one optimizer step with grads: the plan's optimizer, then the EMA (and
  the post-hoc EMA profiles)."""
  updates, opt_state = plan.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  rate = plan.ema_decay(state.step)
  ema = jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, state.ema_params, params)
  new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
  if isinstance(state, PhemaTrainState):
    new = new.replace(phema=phema.update(state.phema, params, new.step, plan.phema_gammas))
  return new


def zero_nonfinite(grads):
  """EDM's treatment of non-finite gradients (optim.nonfinite_grads = 'zero'): NaN
  entries become 0, +inf 1e5 and -inf -1e5, the bounds of NVlabs/edm's training loop."""
  return jax.tree.map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5), grads)


def make_train_step(plan: Plan, teacher: Any = None):
  """The jitted step (state, x, y, root_key) -> (state, metrics); `state` is donated.

  teacher: the teacher's EMA parameters (`score_jax.run.state.teacher_params`) where the
  plan has one; the loss gets them and the step in its `LossContext`.

  Keys come from fold_in(root_key, step): nothing random lives in the state.
  With training.microbatches = m > 1 the batch runs as m equal micro-batches
  in a `lax.scan` whose losses and gradients are averaged: the gradient of
  the same batch-mean loss (each micro-batch draws its own times, noise and
  dropout), with one micro-batch's activations alive at a time.
  A step whose loss or gradient norm is not finite leaves the state unchanged
  and reports finite=False, so the last good state is what gets saved; with
  optim.nonfinite_grads = 'zero' (EDM) it is taken with `zero_nonfinite` grads
  instead and reports finite=True (the state stays finite).
  With EDM's augmentation on (data.augment_*), the batch is augmented here, on
  the device, and the network gets its labels.
  """
  schedule, aug = plan.lr_schedule, plan.augment
  # The state replicated, or split along the mesh's 'fsdp' axis (training.sharding): one
  # program, with the parameters' all-gather and the gradients' reduce-scatter marked
  # by sharding constraints (XLA inserts the collectives), and the update, EMA and
  # optimizer moments computed on each device's shards alone.
  rep = plan.replicated
  st = jax.tree.map(lambda a: a.sharding, abstract_state(plan))
  fsdp = sharding.fsdp_size(plan.mesh) > 1
  grad_fn = jax.value_and_grad(plan.train_loss, has_aux=True)
  microbatches = plan.loop.microbatches
  zero_mode = plan.loop.zero_nonfinite_grads

  def loss_and_grads(params, rng: Array, x: Array, y: Optional[Array], context: LossContext):
    """Mean loss over the batch and its gradient, accumulated over micro-batches."""
    a = None
    if aug is not None:
      x, a = augment.augment(jax.random.fold_in(rng, 1), x, aug)
    if microbatches == 1:
      (loss, _), grads = grad_fn(params, rng, x, y, a, context)
      return loss, grads
    # Micro-batch j holds examples j, j + m, j + 2m, ...: each device's
    # contiguous shard of the batch contributes equally to every micro-batch.
    split = lambda a: jnp.swapaxes(a.reshape((-1, microbatches) + a.shape[1:]), 0, 1)
    keys = jax.random.split(rng, microbatches)

    def body(carry, inputs):
      key, xm, ym, am = inputs
      (loss, _), grads = grad_fn(params, key, xm, ym, am, context)
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    # A rolled loop, so that one micro-batch's activations are alive at a time
    # (unrolled, XLA schedules them side by side and the memory saving is gone).
    (loss, grads), _ = jax.lax.scan(body, zeros, (keys, split(x), split(y), jax.tree.map(split, a)))
    return jax.tree.map(lambda a: a / microbatches, (loss, grads))

  def step_fn(state: TrainState, x: Array, y: Array, root_key: Array, teacher: Any):
    rng = jax.random.fold_in(root_key, state.step)
    params = state.params
    if fsdp:  # ZeRO-3: the network runs on whole parameters, each device keeps its shards
      params = jax.lax.with_sharding_constraint(params, rep)
    loss, grads = loss_and_grads(params, rng, x, y, LossContext(state.step, teacher))
    if fsdp:  # each device reduces only the gradients of its own shards
      grads = jax.lax.with_sharding_constraint(grads, st.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if zero_mode:
      new, finite = apply_update(plan, state, zero_nonfinite(grads)), jnp.ones((), bool)
    else:
      # A branch rather than a where over every array of the state: the update
      # then writes in place into the donated state (less memory, a faster step).
      new = jax.lax.cond(finite, functools.partial(apply_update, plan), lambda s, _: s, state,
                         grads)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), "finite": finite}
    return new, metrics

  bat = plan.batch_sharding
  if teacher is None:
    return jax.jit(functools.partial(step_fn, teacher=None), in_shardings=(st, bat, bat, rep),
                   out_shardings=(st, rep), donate_argnums=(0,))
  return _WithTeacher(jax.jit(step_fn, in_shardings=(st, bat, bat, rep, rep),
                              out_shardings=(st, rep), donate_argnums=(0,)), teacher)


class _WithTeacher:
  """A jitted function of (..., teacher) called, and lowered, as one of (...): the teacher's
  parameters are an argument of the compiled step, not constants inside it."""

  def __init__(self, jitted, teacher: Any):
    self._jitted, self._teacher = jitted, teacher

  def __call__(self, *args):
    return self._jitted(*args, self._teacher)

  def lower(self, *args):
    return self._jitted.lower(*args, self._teacher)


def make_eval_step(plan: Plan, teacher: Any = None):
  """(state, x, y, rng) -> loss of the EMA parameters without dropout (teacher: as for
  `make_train_step`)."""
  loss_fn = plan.eval_loss
  rep, bat = plan.replicated, plan.batch_sharding
  st = jax.tree.map(lambda a: a.sharding, abstract_state(plan))

  def eval_fn(state: TrainState, x: Array, y: Array, rng: Array, teacher: Any):
    return loss_fn(state.ema_params, rng, x, y, None, LossContext(state.step, teacher))[0]

  if teacher is None:
    return jax.jit(functools.partial(eval_fn, teacher=None), in_shardings=(st, bat, bat, rep),
                   out_shardings=rep)
  return _WithTeacher(jax.jit(eval_fn, in_shardings=(st, bat, bat, rep, rep),
                              out_shardings=rep), teacher)


def global_batch(plan: Plan, batch: Dict[str, np.ndarray]) -> Tuple[Array, Array]:
  """Process-local numpy batch -> globally sharded arrays."""
  make = lambda a: jax.make_array_from_process_local_data(plan.batch_sharding, a)
  return make(np.asarray(batch["image"], np.float32)), make(np.asarray(batch["label"], np.int32))


class _StopFlag:
  """Set by SIGTERM (preemption) or Ctrl-C (SIGINT): the loop saves a checkpoint and stops.

  A second Ctrl-C aborts at once, saving nothing more: under Python's own
  SIGINT handling (main.py) the process is ended by SIGINT, without waiting
  for work queued on the accelerator; under another handler (a notebook
  kernel) that handler is restored and KeyboardInterrupt raised.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal: Optional[int] = None  # the first stop signal received
    self._previous: Dict[int, Any] = {}

  @property
  def requested(self) -> bool:
    return self.signal is not None

  @property
  def name(self) -> str:
    return "Ctrl-C" if self.signal == signal.SIGINT else "SIGTERM"

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
    return self

  def _handler(self, signum, frame):
    if signum == signal.SIGINT and self.signal == signal.SIGINT:
      previous = self._previous.pop(signal.SIGINT)
      if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
      signal.signal(signal.SIGINT, previous)
      raise KeyboardInterrupt
    if self.signal is None:
      self.signal = signum

  def wait(self, x: Array) -> None:
    """Waits for x to be computed, announcing a stop requested meanwhile at once."""
    announced = False
    while not x.is_ready():
      if self.requested and not announced:
        logging.warning("%s: stopping once the snapshot sampling in progress ends%s.", self.name,
                        " (Ctrl-C again aborts at once)" if self.signal == signal.SIGINT else "")
        announced = True
      time.sleep(0.05)

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    return False


def _append_jsonl(path: str, record: Dict[str, Any]) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def prepare_workdir(workdir: str) -> None:
  """Creates workdir, or fails with a clear message where a file stands in its place."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir {workdir} is a file, not a folder; pick another path.")
  os.makedirs(workdir, exist_ok=True)


def train_and_evaluate(settings: Settings, workdir: str) -> TrainState:
  """Trains as the settings say, resuming from WORKDIR/checkpoints if present.

  Writes WORKDIR/config.json, checkpoints/, samples/ (PNG grids or scatter
  plots and .npz arrays at each snapshot), tensorboard/ event files,
  metrics.jsonl (one line per log step) and, with model.phema_sigma_rels,
  phema/ (post-hoc EMA snapshots, score_jax.run.phema); holds WORKDIR/.lock
  meanwhile. Returns the final state.

  Raises:
    WorkdirLockedError: another training runs in the workdir.
    TrainingInterrupted: Ctrl-C stopped it (after saving a checkpoint).
  """
  prepare_workdir(workdir)
  with lock.hold(workdir):
    plan = make_plan(settings)
    check_workdir(plan, workdir)  # before config.json is replaced by these settings
    if jax.process_index() == 0:
      save_config(settings, workdir)
    return train(plan, workdir)


def train(plan: Plan, workdir: str) -> TrainState:
  """The training loop of a plan (`train_and_evaluate` is the entry); returns the final state."""
  is_main = jax.process_index() == 0
  loop = plan.loop
  n_iters = loop.n_iters

  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  keep_period=loop.snapshot_freq)
  split = sharding.fsdp_size(plan.mesh) > 1  # the state split over the devices (fsdp)
  phema_writer = (phema.SnapshotWriter(workdir, loop.phema_sigma_rels, loop.batch_size, is_main,
                                       plan.replicated if split else None)
                  if loop.phema_sigma_rels else None)
  root_key = jax.random.PRNGKey(loop.seed)
  init_key, train_key, sample_key, eval_key = jax.random.split(root_key, 4)
  state = init_state(plan, init_key)
  state = ckpt.restore_latest(state)
  start = int(state.step)
  teacher = teacher_params(plan)
  if start > 0:
    logging.info("Resumed from step %d.", start)
  elif loop.init_from_teacher:
    state = start_from_teacher(plan, state, teacher)

  # Batches are read, transformed and put on the devices in a background thread,
  # ahead of the step that takes them (the same batches in the same order).
  train_iter = datasets.Prefetch(plan.data.batches("train", start_step=start),
                                 put=lambda batch: global_batch(plan, batch))
  eval_iter = None
  train_step = make_train_step(plan, teacher)
  eval_step = make_eval_step(plan, teacher)
  num_samples = loop.sample_batch_size
  progs = programs.Programs(plan)
  sample_fn = progs.sampler(num_samples)
  # The programs take whole parameters: EMA parameters split over the devices (fsdp) are
  # gathered for snapshot sampling.
  whole = (jax.jit(lambda tree: tree, out_shardings=plan.replicated) if split
           else lambda tree: tree)
  writer = writers.MetricWriter(workdir) if is_main else None
  train_key = jax.device_put(train_key, plan.replicated)
  images_per_step = loop.batch_size

  last_time, last_step = time.perf_counter(), start
  pending: Optional[Dict[str, Array]] = None
  all_finite: Optional[Array] = None
  step = start

  def check_finite(all_finite, metrics, step):
    if not bool(all_finite):
      raise NonFiniteLossError(
          f"Loss or gradient became non-finite by step {step} (loss={float(metrics['loss'])}, "
          f"grad_norm={float(metrics['grad_norm'])}). The last good checkpoint in "
          f"{ckpt.directory} is untouched; lower optim.lr, check the data scaling, or raise "
          "training.eps.")

  # XLA:CPU runs the simulated devices' all-reduces on a shared thread pool; with several
  # steps queued, their participants can wait on each other for good (a hang, or XLA's
  # rendezvous abort). On a CPU mesh each step finishes before the next is dispatched
  # (the batch is still prepared ahead, in the Prefetch thread); accelerators queue freely.
  one_in_flight = plan.mesh.devices.flat[0].platform == "cpu" and plan.mesh.size > 1

  multi_process = jax.process_count() > 1
  stopped = None  # the stop signal's name, once honored
  bar_context = progress.progress_bar(n_iters, start, is_main, "train")
  try:
    with _StopFlag() as stop, bar_context as bar:
      # Steps are counted on the host: reading state.step would wait for every step.
      while step < n_iters:
        step += 1  # the step this iteration completes
        x, y = next(train_iter)
        state, metrics = train_step(state, x, y, train_key)
        if one_in_flight:
          jax.block_until_ready(metrics["loss"])
        if phema_writer is not None and (step % loop.phema_snapshot_freq == 0 or step == n_iters):
          phema_writer.save(step, state)  # before the next step donates the state
        pending = metrics
        # Sticky on the device (no sync): any non-finite step since the start
        # stops the run at the next check, before a checkpoint is written.
        all_finite = metrics["finite"] if all_finite is None else all_finite & metrics["finite"]
        snapshot = step % loop.snapshot_freq == 0 or step == n_iters
        preempt = step % loop.snapshot_freq_for_preemption == 0
        log = step % loop.log_freq == 0 or snapshot or preempt
        # Several processes agree at log steps, so that all save and stop together.
        stopping = (log and distributed.any_process(stop.requested) if multi_process
                    else stop.requested)
        if log or stopping:
          metrics = jax.device_get(metrics)
          check_finite(all_finite, metrics, step)
          now = time.perf_counter()
          steps_per_s = (step - last_step) / max(now - last_time, 1e-9)
          last_time, last_step = now, step
          record = {"step": step, "loss": float(metrics["loss"]),
                    "grad_norm": float(metrics["grad_norm"]), "lr": float(metrics["lr"]),
                    "steps_per_s": steps_per_s, "images_per_s": steps_per_s * images_per_step}
          if is_main:
            writer.scalars(step, {k: v for k, v in record.items() if k != "step"})
            _append_jsonl(os.path.join(workdir, "metrics.jsonl"), record)
            bar.set_postfix(loss=f"{record['loss']:.4g}", it_s=f"{steps_per_s:.2f}",
                            img_s=f"{record['images_per_s']:.1f}")
        if step % loop.eval_freq == 0 and loop.eval_loss:
          if eval_iter is None:
            eval_iter = plan.data.batches("test", start_step=step // loop.eval_freq)
          ex, ey = global_batch(plan, next(eval_iter))
          eval_loss = float(eval_step(state, ex, ey, jax.random.fold_in(eval_key, step)))
          if is_main:
            writer.scalars(step, {"eval_loss": eval_loss})
        bar.update(1)
        if snapshot or preempt or stopping:
          ckpt.save(step, state)
        if snapshot and loop.snapshot_sampling and not stopping:
          _write_samples(progs, whole(state.ema_params), sample_fn, num_samples,
                         jax.random.fold_in(sample_key, step), workdir, step, is_main, stop)
          # A stop requested while sampling (its checkpoint is saved already): stop now.
          stopping = stop.requested and not multi_process
        if stopping:
          stopped = stop.name
          break
    if pending is not None:
      check_finite(all_finite, jax.device_get(pending), step)
  finally:
    train_iter.close()
    ckpt.close()
    if phema_writer is not None:
      phema_writer.close()
    if writer is not None:
      writer.close()
  if stopped is not None:
    message = (f"{stopped}: saved checkpoint {step} in {ckpt.directory}; run the same command "
               "to resume.")
    if stopped == "Ctrl-C":
      raise TrainingInterrupted(message)
    logging.warning(message)
  return state


def _write_samples(progs: programs.Programs, ema_params: Any, sample_fn, num_samples: int,
                   rng: Array, workdir: str, step: int, is_main: bool, stop: _StopFlag) -> None:
  """Samples with the EMA parameters (replicated); writes samples/step_<k>.{png,npz} on
  process 0.

  Class-conditional models get the labels 0, 1, 2, ... in turn.
  """
  data = progs.plan.data
  y = np.arange(num_samples, dtype=np.int32) % max(data.num_classes, 1)
  x, nfe = sample_fn(ema_params, rng, progs.put(y))
  stop.wait(x)
  x = distributed.to_host(x)
  if not is_main:
    return
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  base = os.path.join(out_dir, f"step_{step}")
  title = f"step {step}, {int(nfe)} score evaluations"
  if x.ndim == 2:
    points = next(iter(data.batches("test", evaluation=True, batch_size=1024, process_index=0,
                                    process_count=1)))["image"]
    plotting.save_scatter(base + ".png", x, np.asarray(points), title=title)
  else:
    plotting.save_image_grid(base + ".png", data.to_unit(x))  # latents: decoded by the VAE
  plotting.save_arrays(base + ".npz", samples=x, nfe=np.asarray(nfe))
