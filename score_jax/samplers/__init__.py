"""Samplers: functions of an `SDE` and a `score_fn(x, t)`, never of a network or a config.

- `pc.py`: predictor-corrector sampling (`pc_sample`).
- `ode.py`: the probability-flow ODE (`ode_sample`, `ode_encode`).
- `fast.py`: few-step solvers (`ddim_sample`, `heun_sample`, `dpm_solver_pp_sample`,
  `unipc_sample`) on one step loop.
- `probability_flow.py`: the ODE's drift and its adaptive solve (also used by the likelihood).
- `consistency.py`: consistency models' one- and multistep sampling (`consistency_sample`).
- `controllable.py`: inpainting, colorization, classifier(-free) guidance, autoguidance.
- `time_grids.py`: time grids fitted to a model for the fast solvers.
"""

from score_jax.samplers.consistency import consistency_sample
from score_jax.samplers.controllable import (autoguidance, classifier_free_guidance,
                                             classifier_guidance, colorization, inpainting)
from score_jax.samplers.fast import ddim_sample, dpm_solver_pp_sample, heun_sample, unipc_sample
from score_jax.samplers.ode import ode_encode, ode_sample
from score_jax.samplers.pc import pc_sample

__all__ = ["pc_sample", "ode_sample", "ode_encode", "ddim_sample", "heun_sample",
           "dpm_solver_pp_sample", "unipc_sample", "inpainting", "colorization",
           "classifier_guidance", "classifier_free_guidance", "autoguidance", "consistency_sample"]
