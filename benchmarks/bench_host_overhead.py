"""What the training loop's host work costs: logging, eval loss, checkpoints and sample grids on vs off.

  python benchmarks/bench_host_overhead.py                  # configs/digits.py, 1000 steps each
  python benchmarks/bench_host_overhead.py --steps 1000 --repeats 2

Runs score_jax's real training loop (train.train_and_evaluate on a temporary
workdir) twice on the same config, the small DDPM++ of configs/digits.py
(nf 16, 8x8 digits, batch 128):
  on   the config's own frequencies: log every 100 steps (TensorBoard, metrics.jsonl),
       eval loss every 500, a checkpoint every 500 (snapshot_freq_for_preemption)
       and every 1000 with a 64-sample grid (PNG + .npz; the config's sampler:
       Euler-Maruyama, 500 steps), and the final step's checkpoint and grid;
  off  every frequency 10^9 and snapshot_sampling off: only the final checkpoint.
Before both, a 2-step run with every event on fills a compilation cache (a
fresh folder), so neither measured run pays for compiling (the one-time
compile of the eval step and the sampler is what a run does once; main.py's
cache removes it on restarts) and the difference is the recurring work.

steps/s = (steps - 1) / (the call's end - the second batch's request): from
after the first step's dispatch to the end of train_and_evaluate (final
checkpoint written and closed; in 'on' also the final grid). The same span's
CPU seconds of the process (all threads) per step are printed too: the work
done, which other jobs on the cores do not change (wall time they do). The batch
requests of the 'on' run are timestamped (score_jax.data.datasets.Batches is
wrapped), so each log interval of 100 steps, which ends in a sync, is
timed: an interval with an event minus the median plain one is that event's
cost. The host-only parts are also timed alone: writing the grid (PNG and
.npz) and a checkpoint save (the blocking call, then to completion).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from score_jax.run import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # main.py's CPU compiler settings, before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import digits  # noqa: E402
from score_jax import plotting
from score_jax.run import checkpoints
from score_jax.data import datasets  # noqa: E402

NEVER = 10 ** 9


def run_training(config, workdir: str):
  """score_jax's training loop on `config` in `workdir`; returns the final train state.

  The only function here that touches score_jax's running layer (being
  refactored): settings-based train_and_evaluate if the settings layer is
  there, else the config-based one of earlier versions.
  """
  from score_jax.run import train  # pylint: disable=g-import-not-at-top
  try:
    from score_jax.run import settings  # pylint: disable=g-import-not-at-top
  except ImportError:
    return train.train_and_evaluate(config, workdir)
  return train.train_and_evaluate(settings.from_config(config), workdir)


class BatchClock(contextlib.AbstractContextManager):
  """Timestamps every batch each Batches iterator hands out, while active."""

  def __init__(self):
    self.times: Dict[int, List[float]] = {}
    self._original = None

  def __enter__(self):
    self._original = original = datasets.Batches.__next__
    times = self.times

    def timed_next(batches):
      times.setdefault(id(batches), []).append((time.perf_counter(), time.process_time()))
      return original(batches)

    datasets.Batches.__next__ = timed_next
    return self

  def __exit__(self, *exc):
    datasets.Batches.__next__ = self._original
    return False

  def train_times(self) -> List[tuple]:
    """(wall, CPU) times of the training iterator's requests: the iterator asked most often."""
    return max(self.times.values(), key=len) if self.times else []


def make_config(steps: int, events_on: bool):
  config = digits.get_config()
  t = config.training
  t.n_iters = steps
  if not events_on:
    t.log_freq = t.eval_freq = t.snapshot_freq = t.snapshot_freq_for_preemption = NEVER
    t.snapshot_sampling = False
  return config


def timed_run(config, workdir: str) -> Dict[str, Any]:
  with BatchClock() as clock:
    t0 = time.perf_counter()
    state = run_training(config, workdir)
    t_end, cpu_end = time.perf_counter(), time.process_time()
  stamps = clock.train_times()
  steps = int(config.training.n_iters)
  # The loop reads through datasets.Prefetch, which requests a few batches past the last
  # step (those it holds ahead): the first `steps` requests are the steps' batches.
  assert len(stamps) >= steps, (len(stamps), steps)
  stamps = stamps[:steps]
  times = [wall for wall, _ in stamps]
  # CPU seconds of this process (all threads): the work done, whatever else shares the cores.
  return {"state": state, "times": times, "t_end": t_end, "total_s": t_end - t0,
          "steps_per_s": (steps - 1) / (t_end - times[1]),
          "cpu_s_per_step": (cpu_end - stamps[1][1]) / (steps - 1)}


def interval_costs(run: Dict[str, Any], config) -> Dict[str, Any]:
  """Seconds of each log interval (steps after a sync up to the next sync) of the 'on' run."""
  t = config.training
  times, n, log = run["times"], int(t.n_iters), int(t.log_freq)
  # times[i] is the request of step i + 1's batch, made after step i's events
  # (and, at a log step, after its sync): [times[k], times[k + log]] holds steps
  # k + 1 .. k + log and the events of step k + log.
  bounds = list(range(log, n, log)) + [n]  # the first interval (compile, start-up) is left out
  intervals = {}
  for a, b in zip(bounds[:-1], bounds[1:]):
    stop = run["t_end"] if b == n else times[b]
    intervals[b] = stop - times[a]

  def events(step):
    names = ["log"]
    if step % t.eval_freq == 0:
      names.append("eval loss")
    if step % t.snapshot_freq == 0 or step % t.snapshot_freq_for_preemption == 0 or step == n:
      names.append("checkpoint")
    if (step % t.snapshot_freq == 0 or step == n) and t.snapshot_sampling:
      names.append("sample grid")
    return names

  plain = [s for s in intervals if events(s) == ["log"]]
  base = statistics.median(intervals[s] for s in plain)
  extra = {s: (events(s), intervals[s] - base) for s in intervals if s not in plain}
  return {"base_s": base, "step_s": base / log, "extra": extra, "plain_intervals": len(plain)}


def host_parts(state, workdir: str, num_samples: int, image_shape) -> Dict[str, float]:
  """Seconds of the host-only parts, timed alone: the grid files and a checkpoint save."""
  out: Dict[str, float] = {}
  x = np.random.default_rng(0).uniform(size=(num_samples,) + tuple(image_shape)).astype(np.float32)
  t0 = time.perf_counter()
  plotting.save_image_grid(os.path.join(workdir, "grid.png"), x)
  plotting.save_arrays(os.path.join(workdir, "grid.npz"), samples=x, nfe=np.asarray(500))
  out["grid_files_s"] = time.perf_counter() - t0
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "ckpt_alone"), keep_period=NEVER)
  try:
    for step in (1, 2):  # the first save pays one-time set-up; the second is the recurring cost
      jax.block_until_ready(state)
      t0 = time.perf_counter()
      ckpt.save(step, state)
      blocking = time.perf_counter() - t0
      ckpt.wait()
      out["checkpoint_blocking_s"], out["checkpoint_total_s"] = blocking, time.perf_counter() - t0
  finally:
    ckpt.close()
  return out


def main(argv: List[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=1000, help="training steps per run")
  parser.add_argument("--repeats", type=int, default=1, help="on/off pairs to run")
  args = parser.parse_args(argv)

  cache = tempfile.mkdtemp(prefix="host_overhead_cache_")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f}); configs/digits.py, "
        f"{args.steps} steps per run", flush=True)
  with tempfile.TemporaryDirectory(prefix="host_overhead_") as tmp:
    warm = make_config(2, True)
    t = warm.training
    t.log_freq = t.eval_freq = t.snapshot_freq = t.snapshot_freq_for_preemption = 1
    t0 = time.perf_counter()
    run_training(warm, os.path.join(tmp, "warm"))
    print(f"warm-up (compiles train step, eval step, sampler into the cache): "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    pairs = []
    for r in range(args.repeats):
      on_config = make_config(args.steps, True)
      on = timed_run(on_config, os.path.join(tmp, f"on{r}"))
      off = timed_run(make_config(args.steps, False), os.path.join(tmp, f"off{r}"))
      pairs.append((on, off))
      costs = interval_costs(on, on_config)
      print(f"\nrun {r + 1}: on {on['steps_per_s']:.3f} steps/s ({on['total_s']:.1f} s), "
            f"off {off['steps_per_s']:.3f} steps/s ({off['total_s']:.1f} s), "
            f"ratio on/off {on['steps_per_s'] / off['steps_per_s']:.3f}; CPU-s/step on "
            f"{on['cpu_s_per_step'] * 1e3:.0f} ms, off {off['cpu_s_per_step'] * 1e3:.0f} ms, "
            f"ratio off/on {off['cpu_s_per_step'] / on['cpu_s_per_step']:.3f} "
            f"(load average {os.getloadavg()[0]:.1f})", flush=True)
      print(f"  'on' log interval of {on_config.training.log_freq} steps with logging only: "
            f"{costs['base_s']:.2f} s (median of {costs['plain_intervals']}; "
            f"{costs['step_s'] * 1e3:.0f} ms/step)")
      for step, (names, extra) in sorted(costs["extra"].items()):
        print(f"  interval ending at step {step} ({', '.join(names)}): +{extra:.2f} s")
    parts = host_parts(pairs[-1][0]["state"], tmp, int(on_config.sampling.batch_size),
                       (on_config.data.image_size, on_config.data.image_size,
                        on_config.data.num_channels))
    print(f"\nhost-only parts timed alone: grid PNG + .npz {parts['grid_files_s'] * 1e3:.1f} ms; "
          f"checkpoint save {parts['checkpoint_blocking_s'] * 1e3:.0f} ms blocking, "
          f"{parts['checkpoint_total_s'] * 1e3:.0f} ms to completion")
    ratios = [on["steps_per_s"] / off["steps_per_s"] for on, off in pairs]
    cpu = [off["cpu_s_per_step"] / on["cpu_s_per_step"] for on, off in pairs]
    print(f"\nsteps/s ratio on/off over {len(ratios)} pair(s): {min(ratios):.3f}-{max(ratios):.3f}; "
          f"by CPU-s/step: {min(cpu):.3f}-{max(cpu):.3f} (target >= 0.95)")


if __name__ == "__main__":
  main(sys.argv[1:])
