"""Read a diffusers VAE folder (AutoencoderKL) into score_jax's Flax `AutoencoderKL`.

  vae, params, scaling_factor = load_vae("sd-vae-ft-mse")   # a folder, e.g. a hub snapshot
  mean, logvar = vae.encode(params, images)                 # NHWC in [-1, 1]
  latents = scaling_factor * mean                           # what a latent model sees
  images = vae.decode(params, latents / scaling_factor)

A diffusers VAE folder holds `config.json` (the AutoencoderKL constructor arguments; keys it
leaves out take diffusers' defaults, `DIFFUSERS_DEFAULTS`) and
`diffusion_pytorch_model.safetensors`, read with the `safetensors` package's numpy reader
(no torch). The map from tensors to parameters (`plan`) is derived from the Flax module's own
parameter tree (`jax.eval_shape`, nothing allocated): each parameter path names its diffusers
key (`down_blocks_0` -> `down_blocks.0`, `to_out` -> `to_out.0`, `kernel` and GroupNorm's
`scale` -> `weight`); convolutions go from OIHW to HWIO, the attention's projections from
[out, in] to [in, out]. Both generations of attention names are read: the current
`to_q`, `to_k`, `to_v`, `to_out.0` and the older `query`, `key`, `value`, `proj_attn` (of
diffusers' former AttentionBlock, under which the Stable Diffusion VAEs were first published;
diffusers itself still reads them), and those projections may be stored as 1x1 convolutions
([out, in, 1, 1]) as well as linear layers. Every tensor of
the file must be used exactly once and every parameter filled: anything else is a
`VAEFolderError` naming the tensors, and nothing is returned.

The scaling factor is returned, not applied: `VAE.encode` and `VAE.decode` work on the
autoencoder's own latents (see `score_jax.models.vae`). Folders whose latents need a shift or
per-channel statistics (shift_factor, latents_mean, latents_std: SD3, FLUX) are refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from score_jax.errors import UserError
from score_jax.models.vae import VAE, AutoencoderKL

__all__ = ["VAEFolderError", "CONFIG_FILE", "WEIGHTS_FILE", "DIFFUSERS_DEFAULTS", "read_config",
           "module_arguments", "diffusers_keys", "plan", "read_tensors", "tensors_to_params",
           "load_vae", "params_to_tensors", "save_vae"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

# AutoencoderKL's constructor defaults (diffusers 0.42.1), which config.json may leave out.
DIFFUSERS_DEFAULTS: Dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=0.18215,
    shift_factor=None, latents_mean=None, latents_std=None, force_upcast=True,
    use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True)

# Config keys that change nothing here: the tile size of diffusers' tiled decoding, and its
# float16 advice.
_IGNORED_KEYS = ("sample_size", "force_upcast")
# Module names whose index diffusers writes as a key component of its own (ModuleLists).
_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers")
_OLD_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

Shape = Tuple[int, ...]


class VAEFolderError(UserError, ValueError):
  """A folder that is not a diffusers AutoencoderKL this module reads (missing or malformed)."""


def _names(names: Sequence[str], limit: int = 8) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def read_config(folder: str) -> Dict[str, Any]:
  """config.json of a diffusers VAE folder, with diffusers' defaults for the keys it omits.

  Raises:
    VAEFolderError: no such folder, no or unreadable config.json, another class than
      AutoencoderKL.
  """
  if not os.path.isdir(folder):
    raise VAEFolderError(f"VAE folder {folder!r} does not exist or is not a folder: pass the "
                         f"folder holding {CONFIG_FILE} and {WEIGHTS_FILE}")
  path = os.path.join(folder, CONFIG_FILE)
  if not os.path.isfile(path):
    raise VAEFolderError(f"{folder!r} has no {CONFIG_FILE}: pass a diffusers AutoencoderKL "
                         f"folder (as written by save_pretrained, e.g. sd-vae-ft-mse)")
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise VAEFolderError(f"{path} is not readable JSON ({e}): replace it with the "
                         f"AutoencoderKL's config.json") from None
  if not isinstance(config, dict):
    raise VAEFolderError(f"{path} holds a {type(config).__name__}, not a JSON object of "
                         f"AutoencoderKL arguments")
  name = config.get("_class_name", "AutoencoderKL")
  if name != "AutoencoderKL":
    raise VAEFolderError(f"{path} describes a {name}, not an AutoencoderKL: score_jax reads "
                         f"the Stable Diffusion VAE (AutoencoderKL) only")
  unknown = sorted(k for k in config if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
  if unknown:
    logging.warning("%s: ignoring config keys unknown to score_jax: %s", path, ", ".join(unknown))
  return {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if k in DIFFUSERS_DEFAULTS}}


def module_arguments(config: Mapping[str, Any], where: str = CONFIG_FILE
                     ) -> Tuple[Dict[str, Any], float]:
  """(AutoencoderKL keyword arguments, scaling factor) from a config of `read_config`.

  Raises:
    VAEFolderError: a setting score_jax's AutoencoderKL does not have (other block types or
      activation, channels not divisible by the groups, shifted or standardized latents).
  """
  def bad(key: str, why: str) -> VAEFolderError:
    return VAEFolderError(f"{where}: {key} = {config[key]!r} {why}")

  try:
    channels = tuple(int(c) for c in config["block_out_channels"])
  except (TypeError, ValueError):
    raise bad("block_out_channels", "is not a list of integers") from None
  if not channels:
    raise bad("block_out_channels", "is empty: give one width per level")
  for key, kind in (("down_block_types", "DownEncoderBlock2D"),
                    ("up_block_types", "UpDecoderBlock2D")):
    types = config[key]
    if not isinstance(types, (list, tuple)) or len(types) != len(channels):
      raise bad(key, f"does not list one block per entry of block_out_channels {list(channels)}")
    if any(t != kind for t in types):
      raise bad(key, f"has blocks other than {kind}, the only kind score_jax's AutoencoderKL has")
  if config["act_fn"] != "silu":
    raise bad("act_fn", "is not 'silu', the only activation score_jax's AutoencoderKL has")
  for key in ("shift_factor", "latents_mean", "latents_std"):
    if config[key] is not None:
      raise bad(key, "shifts or standardizes the latents; score_jax reads VAEs whose latents "
                     "are only scaled (scaling_factor), such as sd-vae-ft-mse")
  ints = {}
  for key in ("in_channels", "out_channels", "layers_per_block", "latent_channels",
              "norm_num_groups"):
    if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] < 1:
      raise bad(key, "is not a positive integer")
    ints[key] = config[key]
  groups = ints["norm_num_groups"]
  if any(c % groups for c in channels):
    raise bad("norm_num_groups", f"does not divide every width of block_out_channels "
                                 f"{list(channels)}")
  scaling = config["scaling_factor"]
  if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not scaling > 0:
    raise bad("scaling_factor", "is not a positive number")
  flags = {}
  for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
    if not isinstance(config[key], bool):
      raise bad(key, "is not true or false")
    flags[key] = config[key]
  return dict(block_out_channels=channels, **ints, **flags), float(scaling)


def diffusers_keys(path: Sequence[str]) -> Tuple[str, ...]:
  """The names a Flax parameter path may have in a diffusers file: the current one first, then
  the pre-0.14 attention name where the parameter is an attention projection.

  ('decoder', 'mid_block', 'attentions_0', 'to_out', 'kernel') ->
  ('decoder.mid_block.attentions.0.to_out.0.weight',
   'decoder.mid_block.attentions.0.proj_attn.weight')
  """
  parts = []
  for name in path[:-1]:
    match = re.fullmatch(r"(\w+)_(\d+)", name)
    if match and match.group(1) in _LISTS:
      parts.extend(match.groups())
    elif name == "to_out":
      parts.extend(("to_out", "0"))
    else:
      parts.append(name)
  leaf = "bias" if path[-1] == "bias" else "weight"
  current = ".".join(parts + [leaf])
  keys = [current]
  for new, old in _OLD_ATTENTION.items():
    if f".{new}." in current:
      keys.append(current.replace(f".{new}.", f".{old}."))
  return tuple(keys)


def _expected_file_shape(shape: Shape) -> Shape:
  """A Flax parameter's shape as diffusers stores it: HWIO -> OIHW, [in, out] -> [out, in]."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _fits(file_shape: Shape, flax_shape: Shape) -> bool:
  expected = _expected_file_shape(flax_shape)
  if len(flax_shape) == 2:  # a linear layer, possibly saved as a 1x1 (or 1-wide 1-D) convolution
    return tuple(file_shape[:2]) == expected and all(d == 1 for d in file_shape[2:])
  return tuple(file_shape) == expected


def plan(file_shapes: Mapping[str, Sequence[int]], param_shapes: Any, where: str = WEIGHTS_FILE
         ) -> List[Tuple[Tuple[str, ...], str]]:
  """(Flax parameter path, diffusers key) for every parameter, each key of the file once.

  Args:
    file_shapes: the file's tensor shapes by key.
    param_shapes: the module's parameter tree (arrays or ShapeDtypeStructs).
    where: the file, for messages.

  Raises:
    VAEFolderError: a parameter with no tensor or two (both attention names), a tensor no
      parameter takes, or a tensor of another shape; the message names them.
  """
  flat = jax.tree_util.tree_flatten_with_path(param_shapes)[0]
  entries, missing, doubled, wrong = [], [], [], []
  for key_path, leaf in flat:
    path = tuple(k.key for k in key_path)
    found = [k for k in diffusers_keys(path) if k in file_shapes]
    if not found:
      missing.append(diffusers_keys(path)[0])
    elif len(found) > 1:
      doubled.append(" and ".join(found))
    elif not _fits(tuple(file_shapes[found[0]]), tuple(leaf.shape)):
      wrong.append(f"{found[0]} {tuple(file_shapes[found[0]])} (expected "
                   f"{_expected_file_shape(tuple(leaf.shape))})")
    else:
      entries.append((path, found[0]))
  used = {key for _, key in entries} | {k for d in doubled for k in d.split(" and ")}
  used |= {w.split(" ")[0] for w in wrong}
  unused = sorted(k for k in file_shapes if k not in used)
  parts = []
  if missing:
    parts.append(f"{len(missing)} missing: {_names(missing)}")
  if unused:
    parts.append(f"{len(unused)} unexpected: {_names(unused)}")
  if doubled:
    parts.append(f"{len(doubled)} under both names: {_names(doubled)}")
  if wrong:
    parts.append(f"{len(wrong)} with other shapes: {_names(wrong)}")
  if parts:
    raise VAEFolderError(f"{where} does not hold the AutoencoderKL its config.json describes "
                         f"({'; '.join(parts)}): use the folder's own config.json and weights")
  return entries


def read_tensors(path: str) -> Dict[str, np.ndarray]:
  """Every tensor of a safetensors file as a float32 numpy array (the numpy reader, no torch).

  Raises:
    VAEFolderError: no such file, not a safetensors file, or a dtype numpy cannot read
      (bfloat16) or that is not floating point.
  """
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel

  folder = os.path.dirname(path)
  if not os.path.isfile(path):
    other = [f for f in ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors")
             if os.path.isfile(os.path.join(folder, f))]
    hint = f" (it has {other[0]}: save the VAE with safe_serialization in float32)" if other else ""
    raise VAEFolderError(f"{folder!r} has no {os.path.basename(path)}{hint}: pass a diffusers "
                         f"AutoencoderKL folder holding its safetensors weights")
  tensors = {}
  try:
    with safe_open(path, framework="numpy") as f:
      for key in f.keys():
        tensors[key] = f.get_tensor(key)
  except (TypeError, ValueError) as e:  # numpy has no bfloat16
    raise VAEFolderError(f"{path}: cannot read a tensor with numpy ({e}): save the VAE in "
                         f"float32 or float16") from None
  except Exception as e:  # pylint: disable=broad-except  # SafetensorError and OSError
    raise VAEFolderError(f"{path} is not a readable safetensors file "
                         f"({type(e).__name__}: {e}): download it again") from None
  odd = sorted(k for k, v in tensors.items() if not np.issubdtype(v.dtype, np.floating))
  if odd:
    raise VAEFolderError(f"{path} has tensors that are not floating point: {_names(odd)}")
  return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def tensors_to_params(tensors: Mapping[str, np.ndarray], param_shapes: Any,
                      where: str = WEIGHTS_FILE) -> Any:
  """The parameter tree of `param_shapes`' structure filled from diffusers' tensors (numpy).

  Raises:
    VAEFolderError: as `plan`.
  """
  keys = dict(plan({k: v.shape for k, v in tensors.items()}, param_shapes, where))
  flat, treedef = jax.tree_util.tree_flatten_with_path(param_shapes)
  leaves = []
  for key_path, leaf in flat:
    value = tensors[keys[tuple(k.key for k in key_path)]]
    if len(leaf.shape) == 4:  # convolution OIHW -> HWIO
      value = value.transpose(2, 3, 1, 0)
    elif len(leaf.shape) == 2:  # linear [out, in], or a 1x1 convolution [out, in, 1, 1]
      value = value.reshape(value.shape[:2]).T
    assert value.shape == tuple(leaf.shape), (key_path, value.shape, leaf.shape)
    leaves.append(np.ascontiguousarray(value))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def load_vae(folder: str, *, dtype: Any = jnp.float32) -> Tuple[VAE, Any, float]:
  """A diffusers AutoencoderKL folder -> (vae, params, scaling_factor).

  Args:
    folder: holds config.json and diffusion_pytorch_model.safetensors.
    dtype: compute dtype of the module (parameters stay float32).

  Returns:
    `VAE` (vae.module is the Flax `AutoencoderKL`), its parameters (float32 jax arrays, the
    `params` collection) and the config's scaling factor, which neither encode nor decode
    applies (latents = scaling_factor * z).

  Raises:
    VAEFolderError: a missing or malformed folder, config or weights file (one line naming it).
  """
  config = read_config(folder)
  kwargs, scaling_factor = module_arguments(config, os.path.join(folder, CONFIG_FILE))
  weights = os.path.join(folder, WEIGHTS_FILE)
  tensors = read_tensors(weights)
  vae = VAE(AutoencoderKL(**kwargs, dtype=dtype))
  side = 2 ** (len(kwargs["block_out_channels"]) - 1)  # the smallest image the network takes
  param_shapes = vae.init_shapes((1, side, side, kwargs["in_channels"]))
  params = tensors_to_params(tensors, param_shapes, weights)
  n = sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))
  logging.info("Read the AutoencoderKL in %s: %d parameters, scaling factor %g.", folder, n,
               scaling_factor)
  return vae, jax.tree_util.tree_map(jnp.asarray, params), scaling_factor


def params_to_tensors(params: Any) -> Dict[str, np.ndarray]:
  """The inverse of `tensors_to_params`: float32 tensors under diffusers' current names
  (convolutions OIHW, linear layers [out, in])."""
  out = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    value = np.asarray(leaf, np.float32)
    if value.ndim == 4:  # HWIO -> OIHW
      value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2:  # [in, out] -> [out, in]
      value = value.T
    out[diffusers_keys(tuple(k.key for k in key_path))[0]] = np.ascontiguousarray(value)
  return out


def save_vae(folder: str, module: AutoencoderKL, params: Any, scaling_factor: float) -> None:
  """Writes an AutoencoderKL as a diffusers folder that `load_vae` (and diffusers'
  `AutoencoderKL.from_pretrained`) read: config.json and the float32 safetensors weights,
  each written atomically."""
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel

  from score_jax import files  # pylint: disable=import-outside-toplevel

  levels = len(module.block_out_channels)
  config = dict(DIFFUSERS_DEFAULTS, _class_name="AutoencoderKL",
                in_channels=module.in_channels, out_channels=module.out_channels,
                down_block_types=["DownEncoderBlock2D"] * levels,
                up_block_types=["UpDecoderBlock2D"] * levels,
                block_out_channels=[int(c) for c in module.block_out_channels],
                layers_per_block=module.layers_per_block,
                latent_channels=module.latent_channels, norm_num_groups=module.norm_num_groups,
                scaling_factor=float(scaling_factor), use_quant_conv=module.use_quant_conv,
                use_post_quant_conv=module.use_post_quant_conv,
                mid_block_add_attention=module.mid_block_add_attention, force_upcast=False)
  os.makedirs(folder, exist_ok=True)
  with files.atomic_write(os.path.join(folder, WEIGHTS_FILE)) as f:
    f.write(save(params_to_tensors(params), metadata={"format": "pt"}))
  files.write_json(os.path.join(folder, CONFIG_FILE), config)
