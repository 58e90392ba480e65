"""Convert the 2021 reference's released checkpoints into score_jax checkpoints.

  python -m score_jax.convert --from=pytorch --config=configs/ve_cifar.py checkpoint_24.pth runs/ve_cifar
  python -m score_jax.convert --from=flax --config=configs/vp_cifar.py checkpoint_26 runs/vp_cifar
  python main.py --config=runs/ve_cifar/config.json --workdir=runs/ve_cifar --mode=sample

(`--from=edm` converts NVlabs/edm's network pickles the same way, through
`score_jax.convert.edm`: `--config=configs/edm_cifar_vp.py` or edm_cifar_ve.py.)

The reference (yang-song/score_sde, JAX/Flax, and its twin
yang-song/score_sde_pytorch) released trained weights of the paper's configs
in two formats:

* Flax (`checkpoint_<n>`): msgpack of the training state written by
  `flax.training.checkpoints`; the network under `params_ema` (EMA weights) and
  `optimizer.target`, with Flax's automatic module names
  (`ResnetBlockBigGANpp_3/Conv_0/kernel`). Read with `flax.serialization`.
* PyTorch (`checkpoint_<n>.pth`): a dict with `model` (the state dict of the
  DataParallel-wrapped network: `module.all_modules.<i>.<param>` for NCSN++,
  DDPM++ and DDPM, `module.res1.0.conv1.weight` etc. for NCSNv2, and the
  buffer `module.sigmas`), `ema` (`shadow_params`: the trainable tensors, in
  the order of `model.parameters()`, which skips buffers), `optimizer` and
  `step`. Read with the torch-free reader `score_jax.convert.torch_pickle`: torch is
  not needed.

Every PyTorch network registers the buffer `sigmas` = the reference's
`get_sigmas(config)`, exp(linspace(log sigma_max, log sigma_min, num_scales))
of its training config's model section. It is no network parameter (nothing
maps onto it) but it fixes three config keys: a buffer that differs from the
config's noise levels means the wrong --config, and the conversion stops
naming the file's and the config's values of model.sigma_max, sigma_min and
num_scales.

The map between a reference network and score_jax's is an explicit list of
`Entry`s, one per tensor, built by walking the config's architecture in the
reference's construction order (the order of `all_modules` and of
`model.parameters()`); `check_spec` compares it with `jax.eval_shape` of
score_jax's own initialization. Layouts: PyTorch convolutions are OIHW
(score_jax and Flax: HWIO), `nn.Linear` weights are [out, in] (Dense kernels
[in, out]), the reference's NIN layers are score_jax Dense layers with the same
[in, out] matrix, GroupNorm's weight is Flax's scale, and the Flax reference's
InstanceNorm++ parameters have shape [1, 1, 1, C] (score_jax [C]).

A file is converted only if its tensors are exactly the reference network's:
a missing, unexpected or differently shaped tensor stops the conversion with
an error naming it (`ReferenceLayoutError`). The result is a normal score_jax
workdir, DST/checkpoints/<step>, whose parameters and EMA parameters are both
the converted weights (EMA weights unless --weights=model), with a fresh
optimizer state; `--mode=sample` and `--mode=eval` load it. DST is written in
a temporary folder beside it and renamed into place; an existing checkpoint
is never overwritten.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from score_jax import files

__all__ = [
    "FORMATS",
    "Entry",
    "Spec",
    "ReferenceLayoutError",
    "UnsupportedConfigError",
    "reference_spec",
    "reference_shapes",
    "check_spec",
    "check_tensors",
    "check_sigmas",
    "check_compatible",
    "PYTORCH_BUFFERS",
    "tensors_to_params",
    "params_to_tensors",
    "load_reference",
    "convert",
]

from score_jax.convert.reference_layout import (  # pylint: disable=unused-import  # re-exported
    FORMATS, PYTORCH_BUFFERS, Entry, ReferenceLayoutError, Spec, UnsupportedConfigError, _get_sigmas,
    _names, _ref_layout_shape, _to_ours, _to_ref, as_settings, check_spec, mismatch,
    reference_shapes, reference_spec)
from score_jax.convert.workdir import refuse_existing, write_workdir

def check_tensors(found: Mapping[str, Sequence[int]], spec: Spec, source: str = "the checkpoint") -> None:
  """Checks that `found` ({name: shape}) holds exactly the spec's reference tensors.

  Raises:
    ReferenceLayoutError: naming every missing, unexpected and misshapen tensor.
  """
  expected = reference_shapes(spec)
  parts = mismatch(found, expected)
  if not parts:
    return
  raise ReferenceLayoutError(
      f"{source} is not a {spec.fmt} checkpoint of this config's {spec.family} network "
      f"({len(expected)} tensors expected); nothing was converted. " + "; ".join(parts) +
      ". Is --config the config the checkpoint was trained with (e.g. model.nf, ch_mult, "
      "num_res_blocks, data.image_size)?")


def check_sigmas(found: Any, spec: Spec, source: str = "the checkpoint") -> None:
  """Checks a PyTorch network's `sigmas` buffer against the config's noise levels.

  Args:
    found: the buffer (any array-like), as the reference's `get_sigmas(config)`
      made it at training time.
    spec: from `reference_spec(config, 'pytorch')`; nothing is checked where the
      config has no noise levels.
  Raises:
    ReferenceLayoutError: the buffer is not the config's get_sigmas (relative
      tolerance 1e-5: a float32 copy passes), naming the file's and the config's
      model.sigma_max, sigma_min and num_scales.
  """
  expected = spec.sigmas()
  if expected is None:
    return
  try:
    found = np.asarray(found, np.float64)
  except (TypeError, ValueError):
    raise ReferenceLayoutError(f"{source}: its sigmas buffer is not numeric ({type(found).__name__}); "
                               "nothing was converted.") from None
  if found.shape == expected.shape and np.allclose(found, expected, rtol=1e-5, atol=0.0):
    return
  sigma_max, sigma_min, num_scales = spec.noise_levels
  ours = {"sigma_max": sigma_max, "sigma_min": sigma_min, "num_scales": num_scales}
  if found.ndim != 1 or found.size < 2 or not np.all(np.isfinite(found)) or np.any(found <= 0):
    raise ReferenceLayoutError(
        f"{source}: its sigmas buffer (shape {found.shape}) is not a list of noise levels "
        f"get_sigmas could have made; this config's is {num_scales} levels from sigma_max="
        f"{sigma_max:g} down to sigma_min={sigma_min:g}. Nothing was converted.")
  theirs = {"sigma_max": float(found[0]), "sigma_min": float(found[-1]), "num_scales": int(found.size)}
  geometric = np.allclose(found, _get_sigmas(*theirs.values()), rtol=1e-5, atol=0.0)
  differ = [k for k in ours if not np.isclose(theirs[k], ours[k], rtol=1e-5, atol=0.0)]
  show = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
  if differ and geometric:
    keys = "; ".join(f"model.{k}: {show(theirs[k])} in the checkpoint, {show(ours[k])} in the config"
                     for k in differ)
    fix = " ".join(f"--config.model.{k}={show(theirs[k])}" for k in differ)
    raise ReferenceLayoutError(
        f"{source}: the network's sigmas buffer (the reference's get_sigmas of the config it was "
        f"trained with) does not match this config's noise levels ({keys}). Nothing was converted: "
        f"pass the config the checkpoint was trained with, or override {fix}.")
  raise ReferenceLayoutError(
      f"{source}: the network's sigmas buffer ({found.size} levels from {found[0]:g} to "
      f"{found[-1]:g}) is not get_sigmas(model.sigma_max={show(sigma_max)}, model.sigma_min="
      f"{show(sigma_min)}, model.num_scales={num_scales}) of this config"
      + ("" if geometric else ", nor of any other (the levels are not geometric)")
      + "; nothing was converted.")


def check_compatible(spec: Spec) -> None:
  """Checks that every reference tensor fits score_jax's tensor after the layout change.

  Raises:
    UnsupportedConfigError: the reference network's widths differ from
      score_jax's for this config (the PyTorch twin's NCSNv2 below 96 px).
  """
  bad = [f"{e.name} {e.ref_shape} (score_jax {'/'.join(e.ours)} {e.shape})" for e in spec.entries
         if _ref_layout_shape(e.kind, spec.fmt, e.shape) != e.ref_shape]
  if bad:
    hint = ""
    if spec.family == "ncsnv2":
      hint = (" score_jax's NCSNv2 follows the JAX reference, whose third RefineBlock is 2 nf "
              "wide; the PyTorch twin's is nf wide. Convert the JAX (--from=flax) checkpoint.")
    raise UnsupportedConfigError(
        f"The {spec.fmt} reference network of this config differs from score_jax's in "
        f"{len(bad)} tensors: {_names(bad)}.{hint}")


def tensors_to_params(tensors: Mapping[str, Any], spec: Spec) -> Dict[str, Any]:
  """Reference tensors -> score_jax's nested params (float32).

  Works on numpy arrays, and under `jax.eval_shape` on abstract arrays.
  Call `check_tensors` first; this checks only compatibility.
  """
  check_compatible(spec)
  params: Dict[str, Any] = {}
  for e in spec.entries:
    a = tensors[e.name]
    if isinstance(a, np.ndarray):
      if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"):
        raise ReferenceLayoutError(f"{e.name} has dtype {a.dtype}, not floating point.")
      a = np.ascontiguousarray(_to_ours(e.kind, spec.fmt, a.astype(np.float32)))
    else:
      a = _to_ours(e.kind, spec.fmt, a).astype(np.float32)
    node = params
    for key in e.ours[:-1]:
      node = node.setdefault(key, {})
    node[e.ours[-1]] = a
  return params


def params_to_tensors(params: Mapping[str, Any], spec: Spec) -> Dict[str, np.ndarray]:
  """score_jax params -> {reference name: array in the reference layout}, in file order."""
  check_compatible(spec)
  out: Dict[str, np.ndarray] = {}
  for e in spec.entries:
    node: Any = params
    for key in e.ours:
      node = node[key]
    out[e.name] = np.ascontiguousarray(_to_ref(e.kind, spec.fmt, np.asarray(node)))
  return out


# ---------------------------------------------------------------------------
# Reading reference files


def _flatten_flax(tree: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in files.flatten(tree).items()}


def _as_step(value: Any) -> Optional[int]:
  if value is None:
    return None
  try:
    return int(np.asarray(value).reshape(-1)[0])
  except (TypeError, ValueError, IndexError):
    return None


def _load_flax(path: str, spec: Spec, weights: str) -> Tuple[Dict[str, np.ndarray], Optional[int], str]:
  from flax import serialization

  with open(path, "rb") as f:
    raw = f.read()
  try:
    state = serialization.msgpack_restore(raw)
  except Exception as e:  # noqa: BLE001 - any decoding failure means "not this format"
    raise ReferenceLayoutError(f"{path} is not a Flax msgpack checkpoint ({type(e).__name__}: "
                               f"{e}); for a .pth file use --from=pytorch.") from None
  if not isinstance(state, Mapping):
    raise ReferenceLayoutError(f"{path}: expected a training state dict, found {type(state).__name__}.")
  target = state.get("optimizer", {}).get("target") if isinstance(state.get("optimizer"), Mapping) else None
  ema = state.get("params_ema")
  if weights == "ema" and ema is None and target is not None:
    logging.warning("%s has no params_ema; converting the raw weights (optimizer.target).", path)
  tree, used = (ema, "ema") if weights == "ema" and ema is not None else (target, "model")
  if tree is None:
    raise ReferenceLayoutError(f"{path} has neither params_ema nor optimizer.target (top-level "
                               f"keys: {sorted(state)}); it is not a score_sde training checkpoint.")
  if set(tree) == {"params"}:  # variables collection rather than bare params
    tree = tree["params"]
  tensors = _flatten_flax(tree)
  check_tensors({k: v.shape for k, v in tensors.items()}, spec,
                f"{path} ({'params_ema' if used == 'ema' else 'optimizer.target'})")
  return tensors, _as_step(state.get("step")), used


def _load_pytorch(path: str, spec: Spec, weights: str) -> Tuple[Dict[str, np.ndarray], Optional[int], str]:
  from score_jax.convert import torch_pickle

  try:
    obj = torch_pickle.load(path)
  except (pickle.UnpicklingError, ValueError, EOFError, KeyError) as e:
    raise ReferenceLayoutError(
        f"score_jax's torch-free reader cannot read {path} ({type(e).__name__}: {e}). For the "
        "reference's Flax checkpoint_<n> use --from=flax. A PyTorch checkpoint holding other "
        "objects than tensors can be slimmed with torch: "
        "c = torch.load(SRC); torch.save({'model': c['model'], 'ema': c['ema'], 'step': "
        "c['step']}, 'slim.pth').") from None
  if not isinstance(obj, Mapping):
    raise ReferenceLayoutError(f"{path}: expected a dict, found {type(obj).__name__}.")
  if "model" in obj:
    model = obj["model"]
  elif obj and all(isinstance(v, np.ndarray) for v in obj.values()):
    model = obj  # a bare state dict
  else:
    raise ReferenceLayoutError(f"{path} has no 'model' state dict (top-level keys: {sorted(map(str, obj))}).")
  model = collections.OrderedDict((str(k), np.asarray(v)) for k, v in model.items()
                                  if isinstance(v, np.ndarray))
  if model and all(k.startswith("module.") for k in model):  # DataParallel
    model = collections.OrderedDict((k[len("module."):], v) for k, v in model.items())
  expected = spec.by_name()
  # The buffers (sigmas) are not parameters; what is left is model.parameters()
  # in their order. A file without them (a slimmed state dict) is accepted.
  buffers = {n: model.pop(n) for n in PYTORCH_BUFFERS if n in model and n not in expected}
  check_tensors({k: v.shape for k, v in model.items()}, spec, f"{path} (model)")
  if "sigmas" in buffers:
    check_sigmas(buffers["sigmas"], spec, path)
  step = _as_step(obj.get("step"))
  ema = obj.get("ema")
  shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
  if weights != "ema" or shadow is None:
    if weights == "ema":
      logging.warning("%s has no EMA weights; converting the raw model weights.", path)
    return dict(model), step, "model"
  # The EMA keeps the trainable tensors in the order of model.parameters(),
  # which is the state dict's order without its buffers (removed above).
  order = [n for n in model if expected[n].trainable]
  if len(shadow) != len(order):
    raise ReferenceLayoutError(
        f"{path}: ema.shadow_params holds {len(shadow)} tensors, the model {len(order)} trainable "
        "ones; nothing was converted (convert the raw weights with --weights=model).")
  tensors = dict(model)
  bad = []
  for i, (name, value) in enumerate(zip(order, shadow)):
    value = np.asarray(value)
    if value.shape != model[name].shape:
      bad.append(f"ema.shadow_params.{i} {value.shape} (for {name} {model[name].shape})")
    tensors[name] = value
  if bad:
    raise ReferenceLayoutError(f"{path}: EMA tensors do not fit the model's: {_names(bad)}; "
                               "nothing was converted.")
  return tensors, step, "ema"


def load_reference(path: str, spec: Spec, weights: str = "ema"
                   ) -> Tuple[Dict[str, np.ndarray], Optional[int], str]:
  """Reads a reference checkpoint and checks its tensors against `spec`.

  Args:
    path: `checkpoint_<n>` (Flax) or `checkpoint_<n>.pth` (PyTorch) file.
    spec: from `reference_spec(config, fmt)`.
    weights: 'ema' (the EMA weights, or the raw ones with a warning where
      the file has none) or 'model' (the raw weights).
  Returns:
    ({reference name: array}, the file's training step or None, 'ema' | 'model').
  Raises:
    FileNotFoundError: no such file.
    ReferenceLayoutError: unreadable, or tensors missing, unexpected or misshapen.
  """
  if weights not in ("ema", "model"):
    raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No checkpoint file {path}.")
  loader = _load_pytorch if spec.fmt == "pytorch" else _load_flax
  return loader(path, spec, weights)


# ---------------------------------------------------------------------------
# Writing the score_jax workdir


def convert(src: str, dst: str, config: ml_collections.ConfigDict, fmt: str, *,
            weights: str = "ema", step: Optional[int] = None) -> Dict[str, Any]:
  """Converts a reference checkpoint into score_jax workdir `dst`.

  Args:
    src: the reference's `checkpoint_<n>` (fmt 'flax') or `.pth` (fmt 'pytorch').
    dst: workdir to create (or one without checkpoints).
    config: the paper config the checkpoint was trained with.
    fmt: 'pytorch' | 'flax'.
    weights: 'ema' (preferred) | 'model'.
    step: step to store the checkpoint at; default the file's training step
      (training.snapshot_freq where the file has none).
  Returns:
    {'checkpoint': dst/checkpoints/<step>, 'step': step, 'weights': 'ema' | 'model',
     'tensors': number converted}.
  Raises:
    FileExistsError, FileNotFoundError, ReferenceLayoutError, UnsupportedConfigError.
  """
  config = as_settings(config)
  spec = reference_spec(config, fmt)
  check_compatible(spec)
  check_spec(spec, config)
  refuse_existing(dst)  # before the (long) read
  tensors, file_step, used = load_reference(src, spec, weights)
  params = tensors_to_params(tensors, spec)
  del tensors
  if step is None:
    step = file_step if file_step else config.training.snapshot_freq
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}.")
  path = write_workdir(dst, config, params, int(step))
  return {"checkpoint": path, "step": int(step), "weights": used, "tensors": len(spec.entries)}
