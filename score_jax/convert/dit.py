"""Convert facebookresearch/DiT checkpoints into score_jax workdirs.

  python -m score_jax.convert --from=dit --config=configs/imagenet256_dit_xl2.py DiT-XL-2-256x256.pt runs/dit_xl2
  python main.py --config=runs/dit_xl2/config.json --workdir=runs/dit_xl2 --mode=sample

Two kinds of file are read, without torch (`score_jax.convert.torch_pickle`; nothing in the
file runs):

- a checkpoint of the authors' train.py, `torch.save({"model", "ema", "opt", "args"})`:
  --weights=ema (default) or model picks the network; "args" (an argparse.Namespace) names
  the preset ('DiT-XL/2'), whose head count is checked against the config (the tensors do not
  show it), and the class count;
- a released network (`DiT-XL-2-256x256.pt`, `DiT-XL-2-512x512.pt`): the EMA state dict itself.

The conversion maps every tensor onto score_jax's `DiT` (`dit_spec`, in the authors' state-dict
order, checked against `jax.eval_shape` of score_jax's initialization): the patch embedding
OIHW -> HWIO, linear layers [out, in] -> [in, out], the class table as it is. The authors'
`pos_embed` (a frozen parameter) must equal score_jax's fixed embedding for data.image_size
and model.patch_size; a missing, unexpected or misshapen tensor stops the conversion, naming
them, before anything is written. A class table without the null row (a network trained with
class_dropout_prob = 0) gets a zero row, and a warning. The workdir is written by
`score_jax.convert.workdir.write_workdir`: the weights as parameters and EMA parameters, a fresh
optimizer state, config.json.

The config must use model.name = 'dit' and DiT's diffusion, training.sde = 'vpsde' with
model.parameterization = 'default' (the network predicts the noise; the DDPM step index is its
time label with training.continuous = False); DiT's linear schedule, betas 1e-4 .. 0.02 over
1000 steps, is model.beta_min = 0.1, model.beta_max = 20, model.num_scales = 1000 (another
schedule is reported). With learn_sigma the variance channels are kept (models.dit). SiT's
checkpoints hold the same network under another interpolant (time running from noise to data,
velocity data - noise): `score_jax.convert.sit` (--from=sit) converts them with these steps.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from score_jax.convert import torch_pickle
from score_jax.convert.edm import tensors_to_params
from score_jax.convert.reference_layout import Entry, check_entries, mismatch
from score_jax.errors import UserError

__all__ = ["DiTLayoutError", "dit_spec", "check_spec", "find_state_dict", "check_args",
           "check_tensors", "tensors_to_params", "convert", "convert_network"]

_PRESET = r"^{family}-(S|B|L|XL)/(\d+)$"  # train.py's --model, e.g. 'DiT-XL/2', 'SiT-XL/2'
# DiT's DDPM schedule in score_jax's VP keys (linspace(beta_min / N, beta_max / N, N)).
_SCHEDULE = (("beta_min", 0.1), ("beta_max", 20.0), ("num_scales", 1000))


class DiTLayoutError(UserError, ValueError):
  """A DiT file does not hold this config's network."""


def dit_spec(model: Any, channels: int) -> List[Entry]:
  """The authors' tensors of score_jax DiT `model` for inputs of `channels` channels, in their
  state-dict order (pos_embed, a fixed value, apart)."""
  from score_jax.models.dit import dit_dims

  width, depth, _ = dit_dims(model.dit_size, model.hidden_size, model.depth, model.num_heads)
  p, mlp = int(model.patch_size), int(width * model.mlp_ratio)
  c_out = 2 * channels if model.learn_sigma else channels
  entries: List[Entry] = []

  def add(ours: Tuple[str, ...], name: str, shape: Tuple[int, ...], kind: str) -> None:
    if kind == "conv":
      ref = (shape[3], shape[2], shape[0], shape[1])
    elif kind == "dense":
      ref = (shape[1], shape[0])
    else:
      ref = shape
    entries.append(Entry(ours, shape, name, ref, kind))

  def dense(ours: Tuple[str, ...], name: str, cin: int, cout: int) -> None:
    add(ours + ("kernel",), f"{name}.weight", (cin, cout), "dense")
    add(ours + ("bias",), f"{name}.bias", (cout,), "plain")

  add(("x_embedder", "kernel"), "x_embedder.proj.weight", (p, p, channels, width), "conv")
  add(("x_embedder", "bias"), "x_embedder.proj.bias", (width,), "plain")
  dense(("t_embedder_0",), "t_embedder.mlp.0", model.frequency_embedding_size, width)
  dense(("t_embedder_2",), "t_embedder.mlp.2", width, width)
  if model.num_classes > 0:
    add(("y_embedder", "embedding"), "y_embedder.embedding_table.weight",
        (model.num_classes + 1, width), "plain")
  for i in range(depth):
    b = f"blocks_{i}"
    dense((b, "qkv"), f"blocks.{i}.attn.qkv", width, 3 * width)
    dense((b, "proj"), f"blocks.{i}.attn.proj", width, width)
    dense((b, "fc1"), f"blocks.{i}.mlp.fc1", width, mlp)
    dense((b, "fc2"), f"blocks.{i}.mlp.fc2", mlp, width)
    dense((b, "adaLN_modulation"), f"blocks.{i}.adaLN_modulation.1", width, 6 * width)
  dense(("final_linear",), "final_layer.linear", width, p * p * c_out)
  dense(("final_adaLN_modulation",), "final_layer.adaLN_modulation.1", width, 2 * width)
  return entries


def check_spec(entries: List[Entry], model: Any, shape: Tuple[int, ...]) -> None:
  """The map against `jax.eval_shape` of the network's initialization.

  Raises:
    RuntimeError: they disagree (a bug in this module).
  """
  check_entries(entries, model, shape, "score_jax.convert.dit's map and DiT's parameters")


def find_state_dict(obj: Any, source: str = "the file", weights: str = "ema"
                    ) -> Tuple[Dict[str, np.ndarray], Any]:
  """(the network's {name: array}, train.py's args or None) of a training checkpoint or of a
  released state dict."""
  if not isinstance(obj, Mapping):
    raise DiTLayoutError(f"{source} holds a {type(obj).__name__}, not a DiT checkpoint (a dict).")
  if "ema" in obj or "model" in obj:
    if weights not in obj:
      raise DiTLayoutError(f"{source} has no {weights!r} network (top-level keys: "
                           f"{sorted(map(str, obj))}); choose --weights=ema or model.")
    args = obj.get("args")
    obj = obj[weights]
  else:
    if weights != "ema":
      raise DiTLayoutError(f"{source} is a bare state dict (a released network, the EMA "
                           f"weights); --weights={weights} needs a train.py checkpoint.")
    args = None
  tensors = {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
  if not tensors:
    raise DiTLayoutError(f"{source}: the {weights!r} entry holds no tensors.")
  return tensors, args


def check_args(args: Any, model: Any, source: str = "the file", family: str = "DiT"
               ) -> List[str]:
  """train.py's arguments against the config: the preset's head count (the tensors cannot show
  it) and the class count. `family`: the presets' prefix ('DiT', or 'SiT' for SiT's train.py,
  whose presets have DiT's sizes). Returns notes for what cannot be checked.

  Raises:
    DiTLayoutError: a disagreement, naming both values.
  """
  from score_jax.models.dit import DIT_SIZES, dit_dims

  if args is None:
    return []
  notes = []
  width, depth, heads = dit_dims(model.dit_size, model.hidden_size, model.depth, model.num_heads)
  name = str(getattr(args, "model", ""))
  match = re.match(_PRESET.format(family=family), name)
  if match:
    size, patch = match.group(1), int(match.group(2))
    want = (DIT_SIZES[size], patch)
    if want != ((width, depth, heads), int(model.patch_size)):
      raise DiTLayoutError(
          f"{source} was trained as {name} (width, depth, heads {DIT_SIZES[size]}, patch {patch}) "
          f"but the config's DiT has {(width, depth, heads)}, patch {model.patch_size}; set "
          f"--config.model.dit_size={size} --config.model.patch_size={patch} (and "
          "model.hidden_size, depth, num_heads = 0).")
  else:
    notes.append(f"args.model = {name!r} is not one of {family}'s presets; the head count "
                 f"(model.num_heads = {heads}) is not checked")
  classes = getattr(args, "num_classes", None)
  if classes is not None and int(classes) != model.num_classes:
    raise DiTLayoutError(f"{source} was trained with {classes} classes, the config has "
                         f"model.num_classes = {model.num_classes}; set "
                         f"--config.model.num_classes={classes}.")
  return notes


def check_tensors(tensors: Mapping[str, np.ndarray], entries: List[Entry], pos_embed: np.ndarray,
                  num_classes: int, source: str = "the file") -> List[str]:
  """`tensors` must be exactly the entries and pos_embed (equal to the fixed embedding).
  A class table one row short (no null label) is padded with a zero row, in place. Returns
  notes.

  Raises:
    DiTLayoutError: naming every missing, unexpected and misshapen tensor, or a position
      embedding of another image size.
  """
  notes = []
  table = "y_embedder.embedding_table.weight"
  if num_classes > 0 and table in tensors and tensors[table].shape[0] == num_classes:
    t = np.asarray(tensors[table])
    tensors[table] = np.concatenate([t, np.zeros_like(t[:1])], axis=0)  # type: ignore[index]
    notes.append(f"the class table has no null label (trained with class_dropout_prob = 0): "
                 f"its row (label {num_classes}) is zero, and classifier-free guidance is "
                 "meaningless with this network")
  expected = {e.name: e.ref_shape for e in entries}
  expected["pos_embed"] = (1,) + tuple(pos_embed.shape)
  parts = mismatch({n: v.shape for n, v in tensors.items()}, expected)
  if parts:
    raise DiTLayoutError(f"{source} does not hold this config's DiT ({len(expected)} tensors "
                         "expected); nothing was converted. " + "; ".join(parts) + ".")
  found = np.asarray(tensors["pos_embed"], np.float64)[0]
  if not np.allclose(found, pos_embed, rtol=0.0, atol=1e-5):
    raise DiTLayoutError(f"{source}: pos_embed is not the 2-D sin-cos embedding of this config's "
                         "patch grid (data.image_size / model.patch_size); nothing was converted.")
  for e in entries:
    a = tensors[e.name]
    if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"):
      raise DiTLayoutError(f"{source}: {e.name} has dtype {a.dtype}, not floating point.")
  return notes


def _check_config(s: Any) -> List[str]:
  if s.model.name.lower() != "dit":
    raise DiTLayoutError(f"model.name={s.model.name!r}: DiT's networks convert into model.name="
                         "'dit' (configs/imagenet256_dit_xl2.py).")
  if s.training.sde.lower() != "vpsde" or s.model.parameterization != "default":
    raise DiTLayoutError(f"training.sde={s.training.sde!r}, model.parameterization="
                         f"{s.model.parameterization!r}: DiT's networks predict the noise of the "
                         "DDPM chain; set training.sde='vpsde' and "
                         "model.parameterization='default'.")
  notes = [f"model.{key} = {s.model.get(key)} (DiT's linear schedule has {value})"
           for key, value in _SCHEDULE if s.model.get(key) != value]
  if s.training.continuous:
    notes.append("training.continuous = True feeds the network 999 t and scales by the "
                 "continuous VP marginals; DiT's time labels are the DDPM steps of the discrete "
                 "chain (training.continuous = False)")
  return notes


def convert(src: str, dst: str, config: Any, *, weights: str = "ema",
            step: Optional[int] = None) -> Dict[str, Any]:
  """Converts DiT checkpoint `src` into score_jax workdir `dst`.

  Args:
    src: a train.py checkpoint (`<step>.pt`) or a released network (`DiT-XL-2-256x256.pt`).
    dst: workdir to create (or one without checkpoints).
    config: the config the network was trained with (configs/imagenet256_dit_xl2.py with
      overrides), a ConfigDict or settings.
    weights: 'ema' or 'model' (train.py checkpoints only).
    step: step to store the checkpoint at (default training.snapshot_freq).
  Returns:
    {'checkpoint': dst/checkpoints/<step>, 'step', 'weights', 'tensors': number converted,
     'notes': what was reported}.
  Raises:
    FileExistsError, FileNotFoundError, pickle.UnpicklingError, DiTLayoutError.
  """
  from score_jax.run import settings as settings_lib

  s = config if isinstance(config, settings_lib.Settings) else settings_lib.from_config(config)
  notes = _check_config(s)
  return convert_network(src, dst, s, notes, weights=weights, step=step)


def convert_network(src: str, dst: str, s: Any, notes: List[str], *, weights: str = "ema",
                    step: Optional[int] = None, family: str = "DiT",
                    check_run: Optional[Callable[[Any], List[str]]] = None) -> Dict[str, Any]:
  """The steps of `convert` after the config's check: DiT's network of settings `s` from `src`
  into workdir `dst`. `family` names train.py's presets ('DiT', 'SiT'); `check_run(args)`
  checks what else train.py's arguments say (SiT's interpolant) and returns notes. Returns and
  raises as `convert`."""
  from score_jax.convert.workdir import refuse_existing, write_converted
  from score_jax.models.dit import dit_dims, pos_embed_2d
  from score_jax.run import builders

  model = builders.get_model(s)
  shape = s.data.shape(1)
  entries = dit_spec(model, shape[3])
  check_spec(entries, model, shape)
  refuse_existing(dst)  # before the (long) read
  tensors, args = find_state_dict(torch_pickle.load(src), src, weights)
  notes = list(notes) + check_args(args, model, src, family)
  if check_run is not None and args is not None:
    notes += check_run(args)
  _check_learn_sigma(tensors, model, shape[3], src)
  width = dit_dims(model.dit_size, model.hidden_size, model.depth, model.num_heads)[0]
  p = int(model.patch_size)
  pos = pos_embed_2d(width, shape[1] // p, shape[2] // p).astype(np.float64)
  notes += check_tensors(tensors, entries, pos, model.num_classes, src)
  for note in notes:
    logging.warning("%s: %s.", src, note)
  params = tensors_to_params(tensors, entries)
  del tensors
  return write_converted(dst, s, params, step, weights=weights, tensors=len(entries),
                         notes=notes)


def _check_learn_sigma(tensors: Mapping[str, np.ndarray], model: Any, channels: int,
                       source: str) -> None:
  """The final layer's width says whether the file has the learned-variance channels."""
  w = tensors.get("final_layer.linear.weight")
  if w is None or w.ndim != 2:
    return  # check_tensors names it
  p = int(model.patch_size)
  found = {p * p * channels: False, 2 * p * p * channels: True}.get(int(w.shape[0]))
  if found is not None and found != bool(model.learn_sigma):
    raise DiTLayoutError(f"{source}'s final layer has {w.shape[0]} outputs per token: the "
                         f"network was built with learn_sigma={found}; set "
                         f"--config.model.learn_sigma={found}.")
