"""score_jax: score-based generative modeling through SDEs, in JAX and Flax."""

from score_jax import losses, sde
from score_jax.sde import SDE, TutorialSDE, VESDE, VPSDE, subVPSDE

__version__ = "0.1.0"

__all__ = ["losses", "sde", "SDE", "VPSDE", "subVPSDE", "VESDE", "TutorialSDE"]
