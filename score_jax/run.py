"""The one call main.py makes: dispatch a mode to the library."""

from __future__ import annotations

import logging

import ml_collections

MODES = ("train", "eval", "sample")


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
        coordinator_address: str = "", num_processes: int = 1, process_id: int = 0) -> None:
  """Runs `mode` ('train', 'eval' or 'sample') for `config` in `workdir`."""
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines
  init_distributed(coordinator_address, num_processes, process_id)
  if mode == "train":
    from score_jax import train
    train.train_and_evaluate(config, workdir)
  elif mode in ("eval", "sample"):
    from score_jax import evaluate
    getattr(evaluate, mode)(config, workdir)
  else:
    raise ValueError(f"Unknown mode {mode!r}; choose from {MODES}.")
