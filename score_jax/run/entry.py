"""The one call main.py makes: dispatch a mode to the library."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
from typing import Dict, Optional

import ml_collections

MODES = ("train", "eval", "sample")
CACHE_MAX_BYTES = 4 << 30  # least recently used programs are evicted beyond this


def _host_key() -> str:
  """A short hash of this machine's CPU model and features.

  Cached XLA:CPU programs are native code for the CPU that compiled them, so
  machines sharing a home directory get separate cache folders.
  """
  info = platform.machine() + platform.processor()
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      info += "".join(sorted({line for line in f if line.startswith(("model name", "flags"))}))
  except OSError:
    info += platform.node()
  return hashlib.sha256(info.encode()).hexdigest()[:12]


def default_compilation_cache_dir() -> str:
  """$XDG_CACHE_HOME (or ~/.cache)/score_jax/jax_cache/<host key>."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "score_jax", "jax_cache", _host_key())


class CompilationCacheStats:
  """Counts JAX's persistent-cache events from the moment it is created."""

  def __init__(self):
    import jax

    self.counts: Dict[str, float] = {}
    jax.monitoring.register_event_listener(lambda name, **_: self._add(name, 1))
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **_: self._add(name, secs))

  def _add(self, name: str, amount: float) -> None:
    """Events count 1 each; durations add their seconds."""
    if name.startswith("/jax/compilation_cache/"):
      self.counts[name] = self.counts.get(name, 0) + amount

  @property
  def loaded(self) -> int:
    return int(self.counts.get("/jax/compilation_cache/cache_hits", 0))

  @property
  def written(self) -> int:
    return int(self.counts.get("/jax/compilation_cache/cache_misses", 0))

  @property
  def seconds_saved(self) -> float:
    return float(self.counts.get("/jax/compilation_cache/compile_time_saved_sec", 0.0))


def enable_compilation_cache(path: Optional[str]) -> Optional[CompilationCacheStats]:
  """Keeps compiled programs in `path` across runs; None if caching is off.

  `path` 'auto' means $JAX_COMPILATION_CACHE_DIR when set, else
  `default_compilation_cache_dir()`; '' or 'none' turns the cache off. Must be
  called before JAX compiles anything. Programs that took under a second to
  compile are not stored. A folder that cannot be created only costs the cache
  (a warning), never the run. JAX keys entries by program, compiler flags and
  versions, so a changed config or library compiles afresh.
  """
  import jax

  if path is None or path.strip().lower() in ("", "none"):
    return None
  if path == "auto":
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_compilation_cache_dir()
  path = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    logging.warning("Compilation cache off: cannot create %s (%s).", path, e)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  # JAX's size limit needs filelock (a dependency); a limit the user set wins.
  if (jax.config.jax_compilation_cache_max_size == -1 and
      importlib.util.find_spec("filelock") is not None):
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
  logging.info("Compilation cache: %s", path)
  return CompilationCacheStats()


def init_distributed(coordinator_address: str = "", num_processes: int = 1,
                     process_id: int = 0) -> None:
  """Joins a multi-process run before JAX is used.

  With num_processes > 1, every process calls this with the same coordinator
  (process 0's host:port). CPU processes communicate through gloo. On TPU pods
  and SLURM clusters pass num_processes=-1: JAX reads the cluster's settings.
  """
  import jax

  if num_processes == 1:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if num_processes < 0:
    jax.distributed.initialize()
    return
  if not coordinator_address:
    raise ValueError("--num_processes > 1 needs --coordinator_address=HOST:PORT of process 0.")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id must lie in [0, {num_processes}), got {process_id}.")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def run(config: ml_collections.ConfigDict, workdir: str, mode: str, *,
        coordinator_address: str = "", num_processes: int = 1, process_id: int = 0,
        compilation_cache: Optional[str] = None) -> None:
  """Runs `mode` ('train', 'eval' or 'sample') for `config` in `workdir`.

  compilation_cache: folder for compiled programs kept across runs (see
  `enable_compilation_cache`; main.py passes 'auto'); None leaves JAX's own
  setting.
  """
  from score_jax.run import settings as settings_lib  # pylint: disable=g-import-not-at-top

  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines
  if mode not in MODES:
    raise ValueError(f"Unknown mode {mode!r}; choose from {MODES}.")
  settings = settings_lib.from_config(config)  # every key and value checked, nothing compiled
  stats = enable_compilation_cache(compilation_cache)
  init_distributed(coordinator_address, num_processes, process_id)
  try:
    if mode == "train":
      from score_jax.run import train  # pylint: disable=g-import-not-at-top
      train.train_and_evaluate(settings, workdir)
      print_trained_next_steps(workdir)
    elif mode == "eval":
      from score_jax.run import evaluate  # pylint: disable=g-import-not-at-top
      evaluate.run(settings, workdir)
    else:
      from score_jax.run import sample  # pylint: disable=g-import-not-at-top
      sample.run(settings, workdir)
  finally:
    if stats is not None:
      logging.info("Compilation cache: %d programs loaded (%.1f s of compiling saved), %d stored.",
                   stats.loaded, stats.seconds_saved, stats.written)


def print_trained_next_steps(workdir: str) -> None:
  """After --mode=train (`run`), process 0 prints the commands that sample and evaluate the newest
  checkpoint (score_jax.run.cli.next_steps: they name WORKDIR/config.json)."""
  import jax

  from score_jax.run import checkpoints, cli  # pylint: disable=g-import-not-at-top

  steps = checkpoints.finished_steps(os.path.join(workdir, "checkpoints"))
  if jax.process_index() == 0 and steps and os.path.exists(os.path.join(workdir, "config.json")):
    cli.print_next_steps(workdir, steps[-1], "evaluate the checkpoints by index "
                         "(--config.eval.begin_ckpt / end_ckpt)")
