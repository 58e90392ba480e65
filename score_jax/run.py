"""The one call main.py makes: dispatch a mode to the library."""

from __future__ import annotations

import logging

import ml_collections

MODES = ("train", "eval", "sample")


def run(config: ml_collections.ConfigDict, workdir: str, mode: str) -> None:
  """Runs `mode` ('train', 'eval' or 'sample') for `config` in `workdir`."""
  logging.getLogger().setLevel(logging.INFO)
  if mode == "train":
    from score_jax import train
    train.train_and_evaluate(config, workdir)
  elif mode in ("eval", "sample"):
    from score_jax import evaluate
    getattr(evaluate, mode)(config, workdir)
  else:
    raise ValueError(f"Unknown mode {mode!r}; choose from {MODES}.")
