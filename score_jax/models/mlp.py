"""A small MLP score model for low-dimensional data (2-D toys, flattened digits)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_jax.models import layers

Array = jax.Array

__all__ = ["MLPScore"]


class MLPScore(nn.Module):
  """Residual MLP conditioned on a noise-label embedding (and optionally a class).

  Each hidden layer computes h <- h + W2 act(W1 act(h) + U temb) (a 1x1
  version of the DDPM residual block without normalization), so depth does
  not hurt optimization on small problems.

  Attributes:
    hidden_sizes: width of each residual layer; the width is hidden_sizes[0]
      throughout when all are equal, else a dense projection joins layers.
    nf: size of the label embedding (Fourier: 2 nf features).
    embedding_type: 'fourier' (of log labels) | 'positional' (of labels),
      with the same label conventions as the image networks.
    fourier_scale: std of the Fourier features.
    nonlinearity: activation name.
    dropout: dropout rate inside residual layers.
    num_classes: class conditioning (0 = none).
    scale_by_sigma: score = net / sigma; applied by get_score_fn.
    second_time: take a second label (`labels2`, MeanFlow's t - r; None: 0) whose own
      embedding is added to the first's.
    dtype: compute dtype.
  """
  hidden_sizes: Tuple[int, ...] = (256, 256, 256)
  nf: int = 64
  embedding_type: str = "positional"
  fourier_scale: float = 16.0
  nonlinearity: str = "swish"
  dropout: float = 0.0
  num_classes: int = 0
  scale_by_sigma: bool = False
  second_time: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, labels: Array, y: Optional[Array] = None, *,
               train: bool = False, labels2: Optional[Array] = None) -> Array:
    """x [B, D], labels [B], y [B] int or None, labels2 [B] (with second_time) -> [B, D]
    float32."""
    if x.ndim != 2:
      raise ValueError(f"MLPScore expects x of shape [B, D], got {x.shape}.")
    if not self.hidden_sizes:
      raise ValueError("hidden_sizes must name at least one layer.")
    layers.check_class_labels(y, self.num_classes)
    if labels2 is not None and not self.second_time:
      raise ValueError("labels2 needs a network built with second_time=True.")
    act = layers.get_act(self.nonlinearity)
    dtype = self.dtype
    width = self.hidden_sizes[0]
    temb = self._embed(labels, width, act)
    if self.second_time:  # None: 0, MeanFlow's r = t, the instantaneous velocity
      temb = temb + self._embed(jnp.zeros_like(labels) if labels2 is None else labels2, width,
                                act)
    if self.num_classes > 0:
      temb = temb + layers.ClassEmbedding(self.num_classes, width)(y, x.shape[0]).astype(dtype)

    h = layers.dense(x.astype(dtype), width, dtype=dtype)
    for size in self.hidden_sizes:
      if h.shape[-1] != size:
        h = layers.dense(h, size, dtype=dtype)
      r = layers.dense(act(h), size, dtype=dtype)
      r = r + layers.dense(act(temb), size, dtype=dtype)
      r = nn.Dropout(self.dropout)(act(r), deterministic=not train)
      h = h + layers.dense(r, size, dtype=dtype)
    out = layers.dense(act(h), x.shape[-1], dtype=dtype)
    return out.astype(jnp.float32)

  def _embed(self, labels: Array, width: int, act: Callable[[Array], Array]) -> Array:
    """[B] labels -> [B, width]: the embedding, then two dense layers."""
    if self.embedding_type == "fourier":
      temb = layers.GaussianFourierProjection(self.nf, scale=self.fourier_scale)(
          jnp.log(labels.astype(jnp.float32)))
    elif self.embedding_type == "positional":
      temb = layers.get_timestep_embedding(labels, self.nf)
    else:
      raise ValueError(f"embedding_type must be fourier | positional, got {self.embedding_type!r}.")
    temb = layers.dense(temb, width, dtype=self.dtype)
    return layers.dense(act(temb), width, dtype=self.dtype)
