"""Convert NVlabs/edm's networks (EDMPrecond over SongUNet) into score_jax workdirs.

  python -m score_jax.convert --from=edm --config=configs/edm_cifar_vp.py edm-cifar10-32x32-uncond-vp.pkl runs/edm_vp
  python main.py --config=runs/edm_vp/config.json --workdir=runs/edm_vp --mode=sample

EDM's released CIFAR-10 networks (`edm-cifar10-32x32-{cond,uncond}-{vp,ve}.pkl`;
vp: DDPM++, configs/edm_cifar_vp.py; ve: NCSN++, configs/edm_cifar_ve.py) and
its training snapshots (`network-snapshot-<kimg>.pkl`) are pickles of a dict
whose 'ema' entry is the EMA network, an `EDMPrecond` holding a `SongUNet`
as `model`. They are read by `score_jax.convert.edm_pickle` (no torch; nothing in
the file runs). The conversion:

1. checks the constructor arguments stored with the network (`_init_kwargs`
   of EDMPrecond and of its SongUNet, EDM's defaults for those not given)
   against the config: a network argument that differs from the config's key
   (model_channels vs model.nf, channel_mult vs model.ch_mult, label_dim vs
   model.num_classes, img_resolution vs data.image_size, sigma_data vs
   model.sigma_data, ...) stops it, naming both values and the
   --config.* overrides that match the file; a training-only one (dropout,
   label_dropout) is reported and converted;
2. maps every tensor of the SongUNet onto score_jax's `SongUNet`
   (`edm_spec`: an explicit list of `Entry`s, walked in EDM's construction
   order, compared with `jax.eval_shape` of score_jax's initialization):
   convolutions OIHW -> HWIO, linear layers [out, in] -> [in, out], GroupNorm
   weight -> scale, the Fourier frequencies (a buffer in EDM) -> the
   parameter `map_noise/freqs`; the resampling filters (buffers) must be the
   config's `resample_filter`. A missing, unexpected or misshapen tensor
   stops it, naming them; nothing is written;
3. writes a normal workdir (`score_jax.convert.workdir.write_workdir`): the EMA
   weights as parameters and EMA parameters, a fresh optimizer state,
   config.json.

The config must use `model.name = 'song_unet'` and `model.parameterization =
'edm'` (EDM's preconditioning with model.sigma_data): then score_jax's score
function gives the network EDM's inputs, c_in x and c_noise = ln(sigma) / 4,
and D(x; sigma) = c_skip x + c_out F is EDM's denoiser.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from score_jax.convert import edm_pickle
from score_jax.errors import UserError
# One tensor of the map (kind 'conv': OIHW <-> HWIO, 'dense': [out, in] <-> [in, out], 'plain';
# trainable False for the Fourier frequencies, a buffer in EDM), and the mismatch report.
from score_jax.convert.reference_layout import Entry, _names, check_entries, mismatch

__all__ = ["EDMLayoutError", "Entry", "EDM_PRECOND_DEFAULTS", "SONG_UNET_DEFAULTS", "edm_spec",
           "check_spec", "check_tensors", "check_init_kwargs", "find_network", "tensors_to_params",
           "convert"]

Shape = Tuple[int, ...]


class EDMLayoutError(UserError, ValueError):
  """An EDM file does not hold this config's network (tensors or constructor arguments)."""


# EDM's constructor defaults (training/networks.py at the commit in tests/data/edm/manifest.json),
# for arguments a pickle does not record.
EDM_PRECOND_DEFAULTS: Dict[str, Any] = dict(label_dim=0, use_fp16=False, sigma_min=0.0,
                                            sigma_max=float("inf"), sigma_data=0.5,
                                            model_type="DhariwalUNet")
SONG_UNET_DEFAULTS: Dict[str, Any] = dict(
    label_dim=0, augment_dim=0, model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4,
    num_blocks=4, attn_resolutions=(16,), dropout=0.10, label_dropout=0.0,
    embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
    decoder_type="standard", resample_filter=(1, 1))
_PRECOND_POSITIONAL = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min",
                       "sigma_max", "sigma_data", "model_type")


# ---------------------------------------------------------------------------
# The map


class _Walk:
  """Every tensor of an EDM SongUNet, in its state-dict order, and the fixed buffers."""

  def __init__(self, prefix: str):
    self.prefix = prefix
    self.entries: List[Entry] = []
    self.buffers: Dict[str, np.ndarray] = {}

  def add(self, ours: Tuple[str, ...], name: str, shape: Shape, kind: str,
          trainable: bool = True) -> None:
    shape = tuple(int(d) for d in shape)
    if kind == "conv":
      h, w, i, o = shape
      ref: Shape = (o, i, h, w)
    elif kind == "dense":
      ref = (shape[1], shape[0])
    else:
      ref = shape
    self.entries.append(Entry(ours, shape, self.prefix + name, ref, kind, trainable))

  def conv(self, ours, name, cin, cout, k, resample_filter=None):
    self.add(ours + ("kernel",), f"{name}.weight", (k, k, cin, cout), "conv")
    self.add(ours + ("bias",), f"{name}.bias", (cout,), "plain")
    if resample_filter is not None:
      from score_jax.models.song_unet import resample_kernel
      self.buffers[f"{self.prefix}{name}.resample_filter"] = resample_kernel(resample_filter)[None, None]

  def dense(self, ours, name, cin, cout, bias=True):
    self.add(ours + ("kernel",), f"{name}.weight", (cin, cout), "dense")
    if bias:
      self.add(ours + ("bias",), f"{name}.bias", (cout,), "plain")

  def norm(self, ours, name, c):
    self.add(ours + ("scale",), f"{name}.weight", (c,), "plain")
    self.add(ours + ("bias",), f"{name}.bias", (c,), "plain")


def edm_spec(model: Any, image_size: int, channels: int, prefix: str = "model."
             ) -> Tuple[List[Entry], Dict[str, np.ndarray]]:
  """The EDM tensors of score_jax SongUNet `model` for images of image_size x channels.

  Returns:
    (entries in EDM's state-dict order (names under `prefix`, EDMPrecond's
    'model.'), {name: value} of the buffers that must hold fixed values (the
    resampling filters)).
  """
  w = _Walk(prefix)
  nf, ch_mult, nrb = model.nf, tuple(model.ch_mult), model.num_res_blocks
  noise_ch, emb_ch = nf * model.channel_mult_noise, nf * model.channel_mult_emb
  filt = tuple(model.resample_filter)

  def block(ours, name, cin, cout, *, up=False, down=False, attention=False):
    o = (ours,)
    resample = filt if (up or down) else None
    w.norm(o + ("norm0",), f"{name}.norm0", cin)
    w.conv(o + ("conv0",), f"{name}.conv0", cin, cout, 3, resample)
    w.dense(o + ("affine",), f"{name}.affine", emb_ch, cout)
    w.norm(o + ("norm1",), f"{name}.norm1", cout)
    w.conv(o + ("conv1",), f"{name}.conv1", cout, cout, 3)
    if cout != cin or up or down:
      w.conv(o + ("skip",), f"{name}.skip", cin, cout, 1, resample)
    if attention:
      w.norm(o + ("norm2",), f"{name}.norm2", cout)
      w.conv(o + ("qkv",), f"{name}.qkv", cout, 3 * cout, 1)
      w.conv(o + ("proj",), f"{name}.proj", cout, cout, 1)

  if model.embedding_type == "fourier":
    w.add(("map_noise", "freqs"), "map_noise.freqs", (noise_ch // 2,), "plain", trainable=False)
  if model.num_classes:
    w.dense(("map_label",), "map_label", model.num_classes, noise_ch)
  if model.augment_dim:
    w.dense(("map_augment",), "map_augment", model.augment_dim, noise_ch, bias=False)
  w.dense(("map_layer0",), "map_layer0", noise_ch, emb_ch)
  w.dense(("map_layer1",), "map_layer1", emb_ch, emb_ch)

  skips = []
  cout = caux = channels
  for level, mult in enumerate(ch_mult):
    r = image_size >> level
    tag = f"{r}x{r}"
    if level == 0:
      cout = nf
      w.conv((f"enc_{tag}_conv",), f"enc.{tag}_conv", channels, cout, 3)
      skips.append(cout)
    else:
      block(f"enc_{tag}_down", f"enc.{tag}_down", cout, cout, down=True)
      skips.append(cout)
      if model.encoder_type == "residual":
        w.conv((f"enc_{tag}_aux_residual",), f"enc.{tag}_aux_residual", caux, cout, 3, filt)
        caux = cout
    for idx in range(nrb):
      cin, cout = cout, nf * mult
      block(f"enc_{tag}_block{idx}", f"enc.{tag}_block{idx}", cin, cout,
            attention=r in model.attn_resolutions)
      skips.append(cout)

  for level in reversed(range(len(ch_mult))):
    r = image_size >> level
    tag, mult = f"{r}x{r}", ch_mult[level]
    if level == len(ch_mult) - 1:
      block(f"dec_{tag}_in0", f"dec.{tag}_in0", cout, cout, attention=True)
      block(f"dec_{tag}_in1", f"dec.{tag}_in1", cout, cout)
    else:
      block(f"dec_{tag}_up", f"dec.{tag}_up", cout, cout, up=True)
    for idx in range(nrb + 1):
      cin, cout = cout + skips.pop(), nf * mult
      block(f"dec_{tag}_block{idx}", f"dec.{tag}_block{idx}", cin, cout,
            attention=idx == nrb and r in model.attn_resolutions)
    if level == 0:
      w.norm((f"dec_{tag}_aux_norm",), f"dec.{tag}_aux_norm", cout)
      w.conv((f"dec_{tag}_aux_conv",), f"dec.{tag}_aux_conv", cout, channels, 3)
  assert not skips
  return w.entries, w.buffers


def check_spec(entries: Sequence[Entry], model: Any, shape: Sequence[int]) -> None:
  """The walk against `jax.eval_shape` of the network's initialization.

  Raises:
    RuntimeError: they disagree (a bug in this module).
  """
  check_entries(entries, model, shape, "score_jax.convert.edm's map and SongUNet's parameters")


def check_tensors(tensors: Mapping[str, np.ndarray], entries: Sequence[Entry],
                  buffers: Mapping[str, np.ndarray], source: str = "the file") -> None:
  """`tensors` ({EDM name: array}) must be exactly the entries and buffers.

  Raises:
    EDMLayoutError: naming every missing, unexpected and misshapen tensor, and
      every resampling filter that is not the config's.
  """
  expected = {e.name: e.ref_shape for e in entries}
  expected.update({n: tuple(v.shape) for n, v in buffers.items()})
  parts = mismatch({n: v.shape for n, v in tensors.items()}, expected)
  if parts:
    raise EDMLayoutError(
        f"{source} does not hold this config's SongUNet ({len(expected)} tensors expected); "
        "nothing was converted. " + "; ".join(parts) + ".")
  bad = [n for n, v in buffers.items()
         if not np.allclose(np.asarray(tensors[n], np.float64), v, rtol=1e-6, atol=0.0)]
  if bad:
    raise EDMLayoutError(f"{source}: resampling filters that are not model.resample_filter's "
                         f"(normalized outer product): {_names(bad)}; nothing was converted.")
  for e in entries:
    a = tensors[e.name]
    if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"):
      raise EDMLayoutError(f"{source}: {e.name} has dtype {a.dtype}, not floating point.")


def tensors_to_params(tensors: Mapping[str, np.ndarray], entries: Sequence[Entry]) -> Dict[str, Any]:
  """EDM tensors -> score_jax's nested params (float32, score_jax layouts)."""
  params: Dict[str, Any] = {}
  for e in entries:
    a = np.asarray(tensors[e.name]).astype(np.float32)
    if e.kind == "conv":
      a = a.transpose(2, 3, 1, 0)
    elif e.kind == "dense":
      a = a.transpose(1, 0)
    node = params
    for key in e.ours[:-1]:
      node = node.setdefault(key, {})
    node[e.ours[-1]] = np.asarray(a, order="C")  # (ascontiguousarray makes 0-d 1-d)
  return params


# ---------------------------------------------------------------------------
# Constructor arguments


def _norm(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return tuple(_norm(v) for v in value)
  if isinstance(value, np.generic):
    return value.item()
  return value


def _same(a: Any, b: Any) -> bool:
  a, b = _norm(a), _norm(b)
  if isinstance(a, tuple) and isinstance(b, tuple):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, bool) or isinstance(b, bool):
    return a is b or a == b
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0) or a == b
  return a == b


def _show(value: Any) -> str:
  value = _norm(value)
  if isinstance(value, tuple):
    return "(" + ", ".join(_show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  if isinstance(value, str):
    return repr(value)
  if isinstance(value, float):
    return f"{value:g}"
  return str(value)


def _override(key: str, value: Any) -> str:
  text = _show(value)
  if isinstance(_norm(value), (tuple, str)):
    text = f"\"{text}\""
  return f"--config.{key}={text}"


# EDM argument -> (score_jax config key, the network's / settings' attribute).
_ARCH_KEYS = (
    ("img_resolution", "data.image_size"),
    ("img_channels", "data.num_channels"),
    ("label_dim", "model.num_classes"),
    ("model_channels", "model.nf"),
    ("channel_mult", "model.ch_mult"),
    ("channel_mult_emb", "model.channel_mult_emb"),
    ("num_blocks", "model.num_res_blocks"),
    ("attn_resolutions", "model.attn_resolutions"),
    ("embedding_type", "model.embedding_type"),
    ("channel_mult_noise", "model.channel_mult_noise"),
    ("encoder_type", "model.encoder_type"),
    ("decoder_type", "model.decoder_type"),
    ("resample_filter", "model.resample_filter"),
    ("augment_dim", "model.augment_dim"),
    ("sigma_data", "model.sigma_data"),
)
_TRAINING_KEYS = (("dropout", "model.dropout"), ("label_dropout", "training.class_dropout"))
# Arguments that leave the network's outputs alone here: the compute dtype is
# model.dtype, and EDMPrecond's sigma_min / sigma_max only bound its sampler.
_IGNORED = ("use_fp16", "sigma_min", "sigma_max", "model_type", "in_channels", "out_channels")


def _config_value(key: str, model: Any, s: Any) -> Any:
  section, name = key.split(".")
  if section == "data":
    return getattr(s.data, name)
  if section == "training":
    return getattr(s.training, name)
  if name == "sigma_data":
    return s.model.sigma_data
  return getattr(model, name)


def resolved_kwargs(net: edm_pickle.PersistentObject) -> Dict[str, Any]:
  """EDMPrecond's and its SongUNet's constructor arguments, EDM's defaults filled in."""
  precond = net.init_kwargs
  if precond is None:
    raise EDMLayoutError("the network records no constructor arguments (_init_kwargs); it was "
                         "not written by EDM's persistent classes.")
  args = net.state.get("_init_args") or ()
  if not isinstance(args, (tuple, list)) or len(args) > len(_PRECOND_POSITIONAL):
    raise EDMLayoutError(f"EDMPrecond's positional constructor arguments {args!r} are not "
                         "EDM's.")
  precond.update(zip(_PRECOND_POSITIONAL, args))
  out = {**SONG_UNET_DEFAULTS, **EDM_PRECOND_DEFAULTS, **precond}
  inner = net.modules.get("model")
  unet = inner.init_kwargs if isinstance(inner, edm_pickle.PersistentObject) else None
  if unet:  # what EDMPrecond passed on, the same values
    out.update({k: v for k, v in unet.items() if k not in ("img_resolution", "label_dim")})
  return out


def check_init_kwargs(net: edm_pickle.PersistentObject, model: Any, settings: Any,
                      source: str = "the file") -> List[str]:
  """Compares the network's constructor arguments with the config.

  Returns:
    Warnings for training-only arguments that differ (dropout, label_dropout).
  Raises:
    EDMLayoutError: an architecture argument differs (each named with the
      file's and the config's value and the override that matches the file),
      or an argument this converter does not know.
  """
  kw = resolved_kwargs(net)
  known = {k for k, _ in _ARCH_KEYS + _TRAINING_KEYS} | set(_IGNORED)
  unknown = sorted(k for k in kw if k not in known)
  if unknown:
    raise EDMLayoutError(f"{source}: constructor argument(s) {unknown} that score_jax's SongUNet "
                         "does not have; nothing was converted.")
  if kw.get("model_type") != "SongUNet":
    raise EDMLayoutError(f"{source}: model_type={kw.get('model_type')!r}; score_jax converts EDM's "
                         "SongUNet (DDPM++ / NCSN++) networks only.")
  differ = [(edm, key, kw[edm], _config_value(key, model, settings)) for edm, key in _ARCH_KEYS
            if not _same(kw[edm], _config_value(key, model, settings))]
  if differ:
    what = "; ".join(f"{edm}={_show(v)} in the file, {key}={_show(c)} in the config"
                     for edm, key, v, c in differ)
    fix = " ".join(_override(key, v) for _, key, v, _ in differ)
    raise EDMLayoutError(
        f"{source}: the network's constructor arguments (_init_kwargs) differ from the config's: "
        f"{what}. Nothing was converted: pass the config the network was trained with, or "
        f"override {fix}.")
  notes = [f"{edm}={_show(kw[edm])} in the file, {key}={_show(_config_value(key, model, settings))} "
           "in the config (training only; converted as is)"
           for edm, key in _TRAINING_KEYS if not _same(kw[edm], _config_value(key, model, settings))]
  if kw["sigma_min"] or kw["sigma_max"] != float("inf"):
    notes.append(f"EDMPrecond's supported noise range [{_show(kw['sigma_min'])}, "
                 f"{_show(kw['sigma_max'])}] is not kept: the sampler's range is the config's SDE "
                 "(model.sigma_min, model.sigma_max)")
  return notes


# ---------------------------------------------------------------------------
# Conversion


def find_network(obj: Any, source: str = "the file", weights: str = "ema"
                 ) -> edm_pickle.PersistentObject:
  """The EDMPrecond network of a snapshot dict ('ema') or of a bare network pickle."""
  obj = edm_pickle.snapshot_network(
      obj, EDMLayoutError, source=source, weights=weights, family="EDM", kind="network snapshot",
      weights_note="EDM's network pickles hold only the EMA network ('ema')")
  if obj.class_name != "EDMPrecond":
    raise EDMLayoutError(
        f"{source}: the network is an EDM {obj.class_name}; score_jax converts EDM-preconditioned "
        "networks (EDMPrecond) only (VPPrecond, VEPrecond and iDDPMPrecond scale their inputs "
        "and noise labels otherwise).")
  inner = obj.modules.get("model")
  if not isinstance(inner, edm_pickle.PersistentObject) or inner.class_name != "SongUNet":
    name = inner.class_name if isinstance(inner, edm_pickle.PersistentObject) else type(inner).__name__
    raise EDMLayoutError(f"{source}: EDMPrecond's model is a {name}; score_jax converts SongUNet "
                         "(DDPM++ / NCSN++) networks only.")
  return obj


def _check_config(s: Any) -> None:
  if s.model.name.lower() != "song_unet":
    raise EDMLayoutError(f"model.name={s.model.name!r}: EDM's networks convert into model.name="
                         "'song_unet' (configs/edm_cifar_vp.py for DDPM++, edm_cifar_ve.py for "
                         "NCSN++).")
  if s.model.parameterization != "edm":
    raise EDMLayoutError(f"model.parameterization={s.model.parameterization!r}: EDM's networks "
                         "are trained with EDM's preconditioning; set model.parameterization="
                         "'edm'.")


def convert(src: str, dst: str, config: Any, *, weights: str = "ema",
            step: Optional[int] = None) -> Dict[str, Any]:
  """Converts EDM network pickle `src` into score_jax workdir `dst`.

  Args:
    src: an EDM network snapshot or released network (.pkl).
    dst: workdir to create (or one without checkpoints).
    config: the config the network was trained with (configs/edm_cifar_vp.py /
      edm_cifar_ve.py, with overrides), a ConfigDict or settings.
    weights: 'ema' (EDM's pickles hold only the EMA network).
    step: step to store the checkpoint at (default training.snapshot_freq).
  Returns:
    {'checkpoint': dst/checkpoints/<step>, 'step', 'weights': 'ema', 'tensors': number
     converted, 'notes': the training-only differences}.
  Raises:
    FileExistsError, FileNotFoundError, edm_pickle.EDMPickleError, EDMLayoutError.
  """
  from score_jax.convert.workdir import refuse_existing, write_converted
  from score_jax.run import builders
  from score_jax.run import settings as settings_lib

  s = config if isinstance(config, settings_lib.Settings) else settings_lib.from_config(config)
  _check_config(s)
  model = builders.get_model(s)
  shape = s.data.shape(1)
  entries, buffers = edm_spec(model, shape[1], shape[3])
  check_spec(entries, model, shape)
  refuse_existing(dst)  # before the (long) read
  net = find_network(edm_pickle.load(src), src, weights)
  notes = check_init_kwargs(net, model, s, src)
  for note in notes:
    logging.warning("%s: %s.", src, note)
  tensors = edm_pickle.state_dict(net)
  check_tensors(tensors, entries, buffers, src)
  params = tensors_to_params(tensors, entries)
  del tensors
  return write_converted(dst, s, params, step, weights="ema", tensors=len(entries),
                         notes=notes)
