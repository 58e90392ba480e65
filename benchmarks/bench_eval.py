"""Eval-mode throughput: samples/s of the configured sampler, Inception images/s, likelihood examples/s.

  python benchmarks/bench_eval.py --config=configs/digits.py [--config.eval.batch_size=64]
      [--rounds=3] [--inception_batch=16] [--likelihood] [--workdir=RUN]

Times the same jitted, mesh-sharded functions the eval mode runs (compiled
ahead of time, so compilation is reported apart), with the newest checkpoint
of --workdir if given, else freshly initialized parameters (the NFE of an
adaptive ODE solver depends on the parameters; the PC sampler's does not).
Prints each rate and what the paper's protocol would take at it: 50k samples,
their Inception features plus the training set's (once), and eval.bpd_passes
passes of bits/dim over the test split.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from score_jax.run import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # main.py's CPU compiler settings, before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from score_jax.run import checkpoints
from score_jax.data import datasets
from score_jax.run import distributed
from score_jax.run import programs
from score_jax.run import plan as plan_lib
from score_jax.run import settings
from score_jax.run import state as run_state

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/digits.py", "Configuration file.")
flags.DEFINE_string("workdir", "", "Run whose newest checkpoint to load (default: random init).")
flags.DEFINE_integer("rounds", 3, "Timed sampling rounds of eval.batch_size samples.")
flags.DEFINE_integer("inception_batch", 0, "Inception batch (0: eval.inception_batch_size).")
flags.DEFINE_integer("inception_iters", 2, "Timed Inception batches.")
flags.DEFINE_bool("likelihood", False, "Also time one bits/dim batch (probability-flow ODE).")
flags.DEFINE_integer("protocol_samples", 50_000, "Samples of the protocol to extrapolate to.")


def _timed(fn, *args, iters: int):
  """(compile seconds, seconds per call, last output) of an AOT-compiled fn."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))  # warm-up
  t0 = time.perf_counter()
  for _ in range(iters):
    out = compiled(*args)
  jax.block_until_ready(out)
  return compile_s, (time.perf_counter() - t0) / iters, out


def _hms(seconds: float) -> str:
  h, rem = divmod(int(seconds), 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def main(argv):
  del argv
  config = settings.from_config(FLAGS.config)
  setup = plan_lib.make_plan(config)
  progs = programs.Programs(setup)
  if FLAGS.workdir:
    ckdir = os.path.join(FLAGS.workdir, "checkpoints")
    step = checkpoints.existing_step(ckdir)
    params = run_state.restore_ema_params(setup, ckdir, step)
  else:
    params = run_state.init_state(setup, jax.random.PRNGKey(0)).ema_params
  batch = distributed.check_batch("eval.batch_size", config.eval.batch_size)
  n_dev = jax.device_count()
  print(f"devices: {n_dev} x {jax.devices()[0].device_kind}; config: {config.data.dataset}, "
        f"{config.model.name}, sampler {config.sampling.method}"
        + (f" ({config.sampling.predictor}/{config.sampling.corrector}, N={config.model.num_scales})"
           if config.sampling.method == "pc" else ""))
  rows = []

  y = progs.put(np.zeros((batch,), np.int32))
  sampler = progs.sampler(batch, config.sampling.guidance_weight)
  compile_s, round_s, (_, nfe) = _timed(sampler, params, jax.random.PRNGKey(1), y,
                                        iters=FLAGS.rounds)
  samples_per_s = batch / round_s
  sampling_total = FLAGS.protocol_samples / samples_per_s
  rows.append(("sampling", f"batch {batch}, NFE {int(nfe)}", compile_s, samples_per_s,
               f"{FLAGS.protocol_samples} samples: {_hms(sampling_total)}"))

  total = sampling_total
  images = config.data.is_images
  if images:
    from score_jax.metrics import inception
    resize, precision = config.eval.inception_resize, config.eval.inception_precision
    inc_batch = distributed.padded(FLAGS.inception_batch or config.eval.inception_batch_size)
    inc_params = jax.device_put(inception.random_inception_params(0), progs.rep)
    data = np.random.default_rng(0).integers(0, 256, config.data.shape(inc_batch), dtype=np.uint8)
    fn = progs.inception(resize, precision)
    compile_s, step_s, _ = _timed(fn, inc_params, progs.put(data), iters=FLAGS.inception_iters)
    images_per_s = inc_batch / step_s
    n_train = datasets.num_examples(config.data, "train")
    inc_total = (FLAGS.protocol_samples + n_train) / images_per_s
    total += inc_total
    rows.append(("inception", f"batch {inc_batch}, {precision}", compile_s, images_per_s,
                 f"{FLAGS.protocol_samples} samples + {n_train} train images: {_hms(inc_total)}"))

  if FLAGS.likelihood:
    fn = progs.likelihood()
    batch_data = next(iter(plan_lib.get_dataset(config, config.eval.bpd_dataset, evaluation=True,
                                                raw=images, batch_size=batch)))
    data = batch_data["image"] if images else batch_data["image"].astype(np.float32)
    compile_s, step_s, (_, nfe) = _timed(fn, params, jax.random.PRNGKey(2), progs.put(data), y,
                                         iters=1)
    per_s = batch / step_s
    n_test = datasets.num_examples(config.data, config.eval.bpd_dataset)
    passes = config.eval.bpd_passes
    ll_total = passes * n_test / per_s
    total += ll_total
    rows.append(("likelihood", f"batch {batch}, NFE {int(nfe)}", compile_s, per_s,
                 f"{passes} passes x {n_test}: {_hms(ll_total)}"))

  print(f"{'stage':<11} {'setting':<24} {'compile s':>9} {'per s':>10}  protocol time")
  for name, setting, compile_s, rate, protocol in rows:
    print(f"{name:<11} {setting:<24} {compile_s:9.1f} {rate:10.2f}  {protocol}")
  print(f"protocol total on this machine: {_hms(total)} ({n_dev} device(s))")


if __name__ == "__main__":
  app.run(main)
