"""A network with a learned loss weight: the adaptive weighting head of the continuous-time
consistency objective (score_jax.scm; Lu & Song 2024, after EDM2's uncertainty weighting).

`WithLogvar(net)` is called exactly as `net` (same arguments, same output), and adds a method
`log_variance(t [B]) -> [B]`: Fourier features of the TrigFlow time and one linear layer. Its
parameters are {'net': <net's>, 'logvar': {...}}, so the head trains, averages (EMA),
checkpoints and restores with the network, and a run of the bare network initializes 'net'
(score_jax.run.state.start_from_teacher).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["WithLogvar"]


class WithLogvar(nn.Module):
  """`net` plus a log-variance head u(t); the loss weight is e^{-u(t)} (module docstring).

  Attributes:
    net: the network; `__call__` is its call.
    channels: number of Fourier features of the head.
  """
  net: nn.Module
  channels: int = 128

  def setup(self):
    # Zero-initialized: u = 0, weight 1, at the start of training.
    self.logvar = nn.Dense(1, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)

  @property
  def scale_by_sigma(self) -> bool:
    return bool(getattr(self.net, "scale_by_sigma", False))

  @property
  def embedding_type(self) -> str:
    return getattr(self.net, "embedding_type", "positional")

  def __call__(self, x: Array, labels: Array, y: Optional[Array] = None, *, train: bool = False,
               **kwargs: Any) -> Array:
    """The network's output for (x, labels, y) (its own arguments)."""
    if self.is_initializing():  # create the head's parameters with the network's
      self.log_variance(jnp.full((x.shape[0],), 0.5, jnp.float32))
    return self.net(x, labels, y, train=train, **kwargs)

  def log_variance(self, t: Array) -> Array:
    """u(t) [B] float32 for TrigFlow times t [B] in (0, pi/2): fixed random Fourier features
    of EDM2's noise label ln(tan t) / 4 (the training times are log-normal in tan t, so the
    label is spread evenly), sqrt(2) cos(2 pi (f c + phi)), f ~ N(0, 1), phi ~ U(0, 1)
    (a fixed seed: no parameters), then a linear layer."""
    c = 0.25 * jnp.log(jnp.tan(t.astype(jnp.float32)))
    key_f, key_p = jax.random.split(jax.random.PRNGKey(0))
    freqs = jax.random.normal(key_f, (self.channels,), jnp.float32)
    phases = jax.random.uniform(key_p, (self.channels,), jnp.float32)
    feats = jnp.sqrt(2.0) * jnp.cos(2.0 * jnp.pi * (c[:, None] * freqs[None] + phases[None]))
    return self.logvar(feats)[:, 0].astype(jnp.float32)
