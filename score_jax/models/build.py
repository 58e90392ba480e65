"""The network registry: `MODELS` (config name -> Flax module), building a network from
explicit keyword arguments (no config reaches `models/`), initializing and counting it."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_jax.models.ddpm import DDPM
from score_jax.models.dit import DiT
from score_jax.models.edm2 import EDM2UNet
from score_jax.models.mlp import MLPScore
from score_jax.models.ncsnpp import NCSNpp
from score_jax.models.ncsnv2 import NCSNv2
from score_jax.models.song_unet import SongUNet

Array = jax.Array

__all__ = ["MODELS", "DTYPES", "network_arguments", "build_model", "init_model", "count_params"]

# Model name in config.model.name -> module class. DDPM++ is NCSN++ with
# other settings (the reference called both 'ncsnpp').
MODELS: Mapping[str, type] = {
    "ncsnpp": NCSNpp,
    "ddpmpp": NCSNpp,
    "ddpm": DDPM,
    "ncsnv2": NCSNv2,
    "ncsnv2_64": NCSNv2,
    "ncsnv2_128": NCSNv2,
    "ncsnv2_256": NCSNv2,
    "mlp": MLPScore,
    "song_unet": SongUNet,  # EDM's DDPM++ / NCSN++ (configs/edm_cifar_vp.py, edm_cifar_ve.py)
    "dit": DiT,  # Peebles & Xie's DiT, also SiT's network (configs/imagenet256_dit_xl2.py)
    "edm2_unet": EDM2UNet,  # EDM2's magnitude-preserving U-Net (configs/edm2_img64_s.py)
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def network_arguments(name: str) -> Tuple[str, ...]:
  """The keyword arguments `build_model(name, ...)` takes besides dtype: the network's
  constructor arguments (less Flax's name and parent), the declaration of its family's keys.
  Those not given keep the constructor's defaults."""
  cls = MODELS[name.lower()]
  return tuple(f.name for f in dataclasses.fields(cls)
               if f.init and f.name not in ("name", "parent", "dtype"))


def build_model(name: str, *, dtype: str = "float32", **kwargs: Any) -> nn.Module:
  """The network `name` (a key of MODELS) from explicit constructor arguments.

  Arguments not given keep the module's defaults, the CIFAR-10 paper settings
  of that family; `dtype` names the compute dtype. `score_jax.run.builders.get_model`
  passes the model section of a run's settings.

  Raises:
    ValueError: unknown model name or dtype, or an argument the network does not take.
  """
  key = name.lower()
  if key not in MODELS:
    raise ValueError(f"Unknown model {name!r}; choose from {sorted(MODELS)}.")
  if dtype not in DTYPES:
    raise ValueError(f"Unknown model dtype {dtype!r}; choose from {sorted(DTYPES)}.")
  fields = network_arguments(key)
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(f"The {name!r} network takes no argument(s) {unknown}; it takes "
                     f"{sorted(fields)}.")
  return MODELS[key](dtype=DTYPES[dtype], **kwargs)


def _dummy_inputs(shape: Sequence[int]):
  # Labels of 1: positive, so the log of the Fourier embedding is finite.
  return jnp.zeros(tuple(shape), jnp.float32), jnp.ones((shape[0],), jnp.float32)


def init_model(rng: Array, model: nn.Module, shape: Sequence[int]) -> Dict[str, Any]:
  """Initial variables of `model` for inputs of `shape` ([B, H, W, C] or [B, D])."""
  x, labels = _dummy_inputs(shape)
  params_rng, dropout_rng = jax.random.split(rng)
  return model.init({"params": params_rng, "dropout": dropout_rng}, x, labels, train=False)


def count_params(model: nn.Module, shape: Sequence[int]) -> int:
  """Number of parameters, from shapes only (`jax.eval_shape`: no memory, no FLOPs)."""
  shapes = jax.eval_shape(lambda r: init_model(r, model, shape), jax.random.PRNGKey(0))
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(shapes["params"]))
