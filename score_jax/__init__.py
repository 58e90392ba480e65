"""score_jax: score-based generative modeling through SDEs, in JAX and Flax.

The house, by role:

- the math, at the top: `sde` (VE, VP, sub-VP, rectified flow), `losses`,
  `likelihood`, `analytic` (closed-form test distributions);
- `samplers/`: PC, the probability-flow ODE, fast solvers, controllable generation;
- `models/`: the networks and `models.score`, the one place a network becomes a score;
- `data/`: datasets, pipeline, augmentation, scaling;
- `metrics/`: Inception features, FID / IS / KID, the digits FD;
- `run/`: settings, the run plan, train / evaluate / sample, checkpoints, `load_run`;
- `convert/`: the 2021 and EDM checkpoints, post-hoc EMA reconstruction.

The math and the samplers are importable from the top level;
`load_run(workdir)` loads a trained or converted run.
"""

from score_jax import analytic, likelihood, losses, samplers, sde
from score_jax.likelihood import bits_per_dim, log_likelihood
from score_jax.samplers import (autoguidance, classifier_free_guidance, classifier_guidance,
                                colorization, ddim_sample, dpm_solver_pp_sample, heun_sample,
                                inpainting, ode_encode, ode_sample, pc_sample, unipc_sample)
from score_jax.sde import SDE, RectifiedFlow, TrigFlow, TutorialSDE, VESDE, VPSDE, subVPSDE

__version__ = "0.1.0"


def load_run(workdir: str, step=None):
  """A trained or converted run: `.settings`, `.sde`, `.model`, `.params` (EMA), `.step`,
  `.score_fn(x, t, y=None)` (see `score_jax.run.load`)."""
  from score_jax.run import load  # pylint: disable=g-import-not-at-top  # the running layer, on use
  return load.load_run(workdir, step)


__all__ = [
    "analytic", "likelihood", "losses", "samplers", "sde",
    "SDE", "VPSDE", "subVPSDE", "VESDE", "TutorialSDE", "RectifiedFlow", "TrigFlow",
    "pc_sample", "ode_sample", "ode_encode", "ddim_sample", "heun_sample", "dpm_solver_pp_sample",
    "unipc_sample",
    "log_likelihood", "bits_per_dim",
    "inpainting", "colorization", "classifier_guidance", "classifier_free_guidance",
    "autoguidance",
    "load_run",
]
