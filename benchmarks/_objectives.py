"""The train-step objectives the JVP benchmarks compare (bench_jvp.py, accelerator.py).

Each is a set of config overrides on a network's config: 'denoising' (the config's own
diffusion step, the baseline) and the few-step generators whose loss differentiates the
network with jax.jvp. No JAX here: accelerator.py's parent process reads the names.

To add an objective, add an entry to OBJECTIVES; both scripts then measure it. An entry
marked optional is skipped, with a note, while the settings reject it (score_jax's
ConfigError), so a row for an objective that is not in the library yet appears without
code changes once it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List


@dataclasses.dataclass(frozen=True)
class Objective:
  """A train step to measure: config overrides (dotted key -> value) on the network's config.

  optional: the settings may not know this objective yet; a ConfigError then skips the row
  with a printed note instead of stopping the run.
  """
  name: str
  overrides: Dict[str, Any]
  optional: bool = False


# Architecture keys that only some networks have: an override sets them where the network's
# config holds them (SongUNet has no model.scale_by_sigma).
IF_PRESENT = ("model.scale_by_sigma",)

# In table order; the first is the baseline of the ratios.
OBJECTIVES: List[Objective] = [
    Objective("denoising", {}),
    Objective("meanflow", {
        "training.sde": "rectified_flow",
        "training.objective": "meanflow",
        "training.time_distribution": "logit_normal",
        "training.logit_mean": -0.4,
        "training.logit_std": 1.0,
        "training.weighting": "default",
        "model.parameterization": "default",
        "model.scale_by_sigma": False,
        "model.second_time": True,
        "sampling.method": "meanflow",
        "sampling.num_steps": 1,
        "eval.enable_bpd": False,
    }),
    # sCT (continuous-time consistency training on TrigFlow, Lu & Song 2024): one JVP of the
    # network in (x_t, t), the adaptive-weighting head beside it.
    Objective("sct", {
        "training.sde": "trigflow",
        "model.parameterization": "trigflow",
        "model.trigflow_label_scale": 1.0,
        "training.time_distribution": "lognormal_sigma",
        "training.objective": "sct",
        "model.scale_by_sigma": False,
        "sampling.method": "consistency",
        "sampling.num_steps": 1,
        "eval.enable_bpd": False,
    }),
]



def get(name: str) -> Objective:
  """The objective called name."""
  for objective in OBJECTIVES:
    if objective.name == name:
      return objective
  raise KeyError(f"Unknown objective {name!r}; choose from {[o.name for o in OBJECTIVES]}.")


def apply(config: Any, objective: Objective) -> Any:
  """config (an ml_collections.ConfigDict) with the objective's overrides set, in place."""
  for key, value in objective.overrides.items():
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = getattr(node, part)
    if key in IF_PRESENT and leaf not in node:
      continue
    setattr(node, leaf, value)
  return config
