"""A workdir's config.json as an ml_collections config file: `--config=WORKDIR/config.json`.

`score_jax.run.cli.check_config_argv` turns that flag into
`--config=<this file>:WORKDIR/config.json`; ml_collections then calls
`get_config(path)`. The resolved config holds every key, so `--config.<key>=`
overrides work on it as on the .py config it came from.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections


def _tuples(value: Any) -> Any:
  """JSON lists back to tuples (the configs' sequences; ml_collections overrides tuples)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def get_config(path: str) -> ml_collections.ConfigDict:
  """The ConfigDict stored in a workdir's config.json."""
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))
