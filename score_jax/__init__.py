"""score_jax: score-based generative modeling through SDEs, in JAX and Flax.

The math layer is importable from the top level: SDEs, losses, samplers,
likelihoods, controllable generation and closed-form test distributions.
Networks live in `score_jax.models`; the running layer in `score_jax.settings`
(config -> validated settings), `score_jax.programs` (settings -> jitted
programs), `score_jax.train`, `score_jax.evaluate` and `score_jax.sample`;
`load_run(workdir)` loads a trained or converted run.
"""

from score_jax import xla_flags as _xla_flags

_xla_flags.apply_at_import()  # before any JAX backend starts: XLA reads its flags only once

# pylint: disable=wrong-import-position
from score_jax import analytic, controllable, fast_samplers, likelihood, losses, sampling, sde
from score_jax.controllable import (classifier_free_guidance, classifier_guidance, colorization,
                                    inpainting)
from score_jax.fast_samplers import ddim_sample, dpm_solver_pp_sample, heun_sample, unipc_sample
from score_jax.likelihood import bits_per_dim, log_likelihood
from score_jax.sampling import ode_encode, ode_sample, pc_sample
from score_jax.sde import SDE, RectifiedFlow, TutorialSDE, VESDE, VPSDE, subVPSDE

__version__ = "0.1.0"


def load_run(workdir: str, step=None):
  """A trained or converted run: `.settings`, `.sde`, `.model`, `.params` (EMA), `.step`,
  `.score_fn(x, t, y=None)` (see `score_jax.runs`)."""
  from score_jax import runs  # pylint: disable=g-import-not-at-top  # the running layer, on use
  return runs.load_run(workdir, step)


__all__ = [
    "analytic", "controllable", "fast_samplers", "likelihood", "losses", "sampling", "sde",
    "SDE", "VPSDE", "subVPSDE", "VESDE", "TutorialSDE", "RectifiedFlow",
    "pc_sample", "ode_sample", "ode_encode", "ddim_sample", "heun_sample", "dpm_solver_pp_sample",
    "unipc_sample",
    "log_likelihood", "bits_per_dim",
    "inpainting", "colorization", "classifier_guidance", "classifier_free_guidance",
    "load_run",
]
