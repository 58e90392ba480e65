"""Convert NVlabs/edm2's networks (Precond over its magnitude-preserving UNet) into score_jax
workdirs.

  python -m score_jax.convert --from=edm2 --config=configs/edm2_presets.py:edm2-img64-s-fid \
      edm2-img64-s-1073741-0.075.pkl runs/edm2-img64-s-fid
  python main.py --config=runs/edm2-img64-s-fid/config.json --workdir=runs/edm2-img64-s-fid \
      --mode=sample

EDM2's released networks (`edm2-img512-{xs,s,m,l,xl,xxl}-<kimg>-<std>.pkl`,
`edm2-img64-...`, the post-hoc EMA reconstructions that its reconstruct_phema.py writes) and
its training snapshots (`network-snapshot-<kimg>-<std>.pkl`) are pickles of a dict
{'encoder', 'dataset_kwargs', 'loss_fn', 'ema'} whose 'ema' entry is the network, a `Precond`
holding a `UNet` as `unet`, in float16. They are read by `score_jax.convert.edm_pickle` (no
torch; nothing in the file runs). The conversion:

1. takes the network's constructor arguments (`_init_kwargs` of Precond, EDM2's defaults for
   those not given) as the config's network: model_channels, channel_mult,
   channel_mult_noise, channel_mult_emb, num_blocks, attn_resolutions, label_balance,
   concat_balance, logvar_channels and the block arguments channels_per_head, res_balance,
   attn_balance, clip_act become the model keys of the same names, label_dim model.num_classes,
   sigma_data model.sigma_data, dropout model.dropout (each value the config had otherwise is
   reported), so one config converts every size. img_resolution and img_channels must be the
   config's data.image_size and data.num_channels (they name the data, which the config
   chooses); use_fp16 is not kept (model.dtype is the compute dtype). An argument score_jax's
   `EDM2UNet` does not have, or a resample_filter other than [1, 1], stops the conversion;
2. maps every tensor onto score_jax's `EDM2UNet` (`edm2_spec`: EDM2's state-dict order,
   checked against `jax.eval_shape` of score_jax's initialization): convolutions
   [out, in, kh, kw] -> [kh, kw, in, out], linear layers [out, in] -> [in, out], the gains
   and the Fourier buffers (freqs, phases) as they are, float16 -> float32 (exact). A
   missing, unexpected or misshapen tensor stops it, naming them; nothing is written;
3. writes a normal workdir (`score_jax.convert.workdir.write_workdir`): the weights as
   parameters and EMA parameters, a fresh optimizer state, config.json.

The config must use model.name = 'edm2_unet' and model.parameterization = 'edm' on the VE
SDE (EDM2's preconditioning: c_in x and c_noise = ln(sigma) / 4 into the network, D = c_skip x
+ c_out F); EDM2's uncertainty u(sigma) is `EDM2UNet.log_variance(c_noise)`. The snapshot's
encoder sets the data's settings (`encoder_config`): StandardRGBEncoder (pixels in [-1, 1],
data.centered) or StabilityVAEEncoder (Stable Diffusion VAE latents of [0, 1] pixels,
data.vae_centered = False, normalized per channel as z = raw * scale + bias: the file's scale
and bias become data.latent_scale and data.latent_shift, refused where the config sets others).

Where `sample.guide_workdir` of the config is DST itself (the autoguidance guide of a preset
being converted), the written config.json samples without a guide: the guide's own run is
plain sampling.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from score_jax.convert import edm_pickle
from score_jax.convert.edm import _same, _show, tensors_to_params
from score_jax.convert.reference_layout import Entry, _names, check_entries, mismatch
from score_jax.errors import UserError

__all__ = ["EDM2LayoutError", "PRECOND_DEFAULTS", "UNET_DEFAULTS", "BLOCK_DEFAULTS",
           "edm2_spec", "check_spec", "find_network", "resolved_kwargs", "config_for",
           "check_tensors", "encoder_config", "convert"]

Shape = Tuple[int, ...]


class EDM2LayoutError(UserError, ValueError):
  """An EDM2 file does not hold a network this config and score_jax's EDM2UNet can take."""


# EDM2's constructor defaults (training/networks_edm2.py at the commit in
# tests/data/edm2_pickles/manifest.json), for arguments a pickle does not record.
PRECOND_DEFAULTS: Dict[str, Any] = dict(use_fp16=True, sigma_data=0.5, logvar_channels=128)
UNET_DEFAULTS: Dict[str, Any] = dict(
    model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_noise=None,
    channel_mult_emb=None, num_blocks=3, attn_resolutions=(16, 8), label_balance=0.5,
    concat_balance=0.5)
BLOCK_DEFAULTS: Dict[str, Any] = dict(resample_filter=(1, 1), channels_per_head=64, dropout=0.0,
                                      res_balance=0.3, attn_balance=0.3, clip_act=256)
_PRECOND_POSITIONAL = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data",
                       "logvar_channels")
# EDM2 argument -> score_jax config key, taken from the file.
_FROM_FILE = (
    ("label_dim", "model.num_classes"),
    ("sigma_data", "model.sigma_data"),
    ("logvar_channels", "model.logvar_channels"),
    ("dropout", "model.dropout"),
    *((k, f"model.{k}") for k in ("model_channels", "channel_mult", "channel_mult_noise",
                                  "channel_mult_emb", "num_blocks", "attn_resolutions",
                                  "label_balance", "concat_balance", "channels_per_head",
                                  "res_balance", "attn_balance", "clip_act")),
)
# EDM2 argument -> config key that must already hold the file's value (the data's shape).
_MUST_MATCH = (("img_resolution", "data.image_size"), ("img_channels", "data.num_channels"))
_IGNORED = ("use_fp16", "resample_filter")  # the compute dtype is model.dtype; filter checked


# ---------------------------------------------------------------------------
# Constructor arguments


def find_network(obj: Any, source: str = "the file", weights: str = "ema"
                 ) -> edm_pickle.PersistentObject:
  """The Precond network of a snapshot / released dict ('ema') or of a bare network pickle."""
  obj = edm_pickle.snapshot_network(
      obj, EDM2LayoutError, source=source, weights=weights, family="EDM2", kind="network pickle",
      weights_note="EDM2's network pickles hold one network ('ema', the EMA or post-hoc EMA "
                   "weights)")
  if obj.class_name != "Precond" or not isinstance(obj.modules.get("unet"),
                                                     edm_pickle.PersistentObject):
    what = (f"EDM's {obj.class_name} (convert it with --from=edm)"
            if obj.class_name in ("EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond")
            else f"a persistent {obj.class_name}")
    raise EDM2LayoutError(f"{source}: the network is {what}; --from=edm2 converts EDM2's "
                          "Precond over its UNet only.")
  if obj.modules["unet"].class_name != "UNet":
    raise EDM2LayoutError(f"{source}: Precond's unet is a {obj.modules['unet'].class_name}, not "
                          "EDM2's UNet.")
  return obj


def resolved_kwargs(net: edm_pickle.PersistentObject, source: str = "the file") -> Dict[str, Any]:
  """Precond's constructor arguments (its UNet's and blocks' among them), EDM2's defaults
  filled in. Raises EDM2LayoutError when none are recorded."""
  kw = net.init_kwargs
  if kw is None:
    raise EDM2LayoutError(f"{source}: the network records no constructor arguments "
                          "(_init_kwargs); it was not written by EDM2's persistent classes.")
  args = net.state.get("_init_args") or ()
  if not isinstance(args, (tuple, list)) or len(args) > len(_PRECOND_POSITIONAL):
    raise EDM2LayoutError(f"{source}: Precond's positional arguments {args!r} are not EDM2's.")
  kw.update(zip(_PRECOND_POSITIONAL, args))
  missing = [k for k in ("img_resolution", "img_channels", "label_dim") if k not in kw]
  if missing:
    raise EDM2LayoutError(f"{source}: Precond's recorded arguments lack {missing}.")
  return {**BLOCK_DEFAULTS, **UNET_DEFAULTS, **PRECOND_DEFAULTS, **kw}


def _get(config: Any, key: str) -> Any:
  section, name = key.split(".")
  return getattr(config, section).get(name)


def config_for(config: Any, kw: Mapping[str, Any], source: str = "the file"
               ) -> Tuple[Any, List[str]]:
  """`config` (a ConfigDict) with the network of constructor arguments `kw`.

  Returns:
    (a new ConfigDict, notes: each key whose value the file changed).
  Raises:
    EDM2LayoutError: an argument score_jax's EDM2UNet does not have, a resampling filter other
      than [1, 1], or an image size / channel count that is not the config's (named with the
      override that matches the file).
  """
  import ml_collections  # pylint: disable=g-import-not-at-top

  known = {k for k, _ in _FROM_FILE + _MUST_MATCH} | set(_IGNORED)
  unknown = sorted(k for k in kw if k not in known)
  if unknown:
    raise EDM2LayoutError(f"{source}: constructor argument(s) {unknown} that score_jax's "
                          "EDM2UNet does not have; nothing was converted.")
  if not _same(tuple(kw["resample_filter"]), (1, 1)):
    raise EDM2LayoutError(f"{source}: resample_filter={_show(kw['resample_filter'])}; score_jax's "
                          "EDM2UNet resamples with EDM2's default [1, 1] only.")
  differ = [(edm, key, kw[edm], _get(config, key)) for edm, key in _MUST_MATCH
            if not _same(kw[edm], _get(config, key))]
  if differ:
    what = "; ".join(f"{e}={_show(v)} in the file, {k}={_show(c)} in the config"
                     for e, k, v, c in differ)
    fix = " ".join(f"--config.{k}={_show(v)}" for _, k, v, _ in differ)
    raise EDM2LayoutError(f"{source}: the network's data shape differs from the config's: "
                          f"{what}. Nothing was converted: use the config of the network's data "
                          f"(img512 / img64) or override {fix}.")
  raw = config.to_dict()
  notes = []
  for edm, key in _FROM_FILE:
    section, name = key.split(".")
    value = kw[edm]
    value = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else value
    value = value.item() if isinstance(value, np.generic) else value
    if name not in raw[section]:
      notes.append(f"{key}={_show(value)} from the file (not in the config)")
    elif not _same(raw[section][name], value):
      notes.append(f"{key}={_show(value)} from the file (the config had "
                   f"{_show(raw[section][name])})")
    raw[section][name] = value
  return ml_collections.ConfigDict(raw), notes


def encoder_config(obj: Any, config: Any, source: str = "the file") -> Tuple[Any, List[str]]:
  """`config` with the data settings the snapshot's encoder implies, and notes.

  StandardRGBEncoder: pixels in [-1, 1] (data.centered must be True). StabilityVAEEncoder:
  latents of Stable Diffusion's VAE of [0, 1] pixels (data.vae_centered must be False),
  normalized per channel as z = raw * scale + bias: the file's scale and bias become
  data.latent_scale and data.latent_shift where the config leaves them empty (), and must
  agree with them (to 1e-6 relative, the file's values are kept) where it sets them.

  Raises:
    EDM2LayoutError: a config that contradicts the encoder (one line with the fix).
  """
  enc = obj.get("encoder") if isinstance(obj, Mapping) else None
  if not isinstance(enc, edm_pickle.PersistentObject):
    return config, []
  data = config.data
  if enc.class_name == "StandardRGBEncoder":
    if not data.centered:
      raise EDM2LayoutError(f"{source}: the network models pixels in [-1, 1] (EDM2's "
                            "StandardRGBEncoder); set --config.data.centered=True.")
    return config, []
  if enc.class_name != "StabilityVAEEncoder":
    return config, [f"EDM2 encoder {enc.class_name}"]
  scale = np.asarray(enc.state.get("scale"), np.float32).reshape(-1)
  bias = np.asarray(enc.state.get("bias"), np.float32).reshape(-1)
  if not scale.size or scale.shape != bias.shape:
    raise EDM2LayoutError(f"{source}: its StabilityVAEEncoder holds no per-channel scale and "
                          f"bias (scale {scale.shape}, bias {bias.shape}); nothing was converted.")
  if str(data.dataset).lower() != "latents" or data.vae_centered:
    raise EDM2LayoutError(f"{source}: the network models Stable Diffusion VAE latents of [0, 1] "
                          "pixels (EDM2's StabilityVAEEncoder); use an img512 preset, or set "
                          "--config.data.dataset=latents --config.data.vae_centered=False.")
  notes = [f"latents of {enc.state.get('vae_name')!r} (EDM2's StabilityVAEEncoder)"]
  for key, values in (("latent_scale", scale), ("latent_shift", bias)):
    given = tuple(data[key])
    if given and not (len(given) == len(values) and np.allclose(
        np.asarray(given, np.float64), values, rtol=1e-6, atol=1e-9)):
      raise EDM2LayoutError(
          f"{source}: its encoder normalizes the latents with {key}={_show(tuple(values))}, the "
          f"config sets data.{key}={_show(given)}; nothing was converted: set "
          f"--config.data.{key}=\"()\" to take the file's values.")
    data[key] = tuple(float(v) for v in values)
    if not given:
      notes.append(f"data.{key}={_show(tuple(values))} from the file")
  return config, notes


# ---------------------------------------------------------------------------
# The map


def edm2_spec(kw: Mapping[str, Any]) -> List[Entry]:
  """The tensors of EDM2's Precond of constructor arguments `kw` (`resolved_kwargs`), in its
  state-dict order, with their place and shape in score_jax's EDM2UNet
  (score_jax/models/edm2.py's docstring has the names)."""
  entries: List[Entry] = []

  def add(ours: Tuple[str, ...], name: str, shape: Shape, kind: str = "plain",
          trainable: bool = True) -> None:
    shape = tuple(int(d) for d in shape)
    if kind == "conv":
      ref: Shape = (shape[3], shape[2], shape[0], shape[1])
    elif kind == "dense":
      ref = (shape[1], shape[0])
    else:
      ref = shape
    entries.append(Entry(ours, shape, name, ref, kind, trainable))

  def conv(ours, name, cin, cout, k):
    if k:
      add(ours + ("weight",), f"{name}.weight", (k, k, cin, cout), "conv")
    else:
      add(ours + ("weight",), f"{name}.weight", (cin, cout), "dense")

  def fourier(ours, name, n):
    for part in ("freqs", "phases"):
      add(ours + (part,), f"{name}.{part}", (n,), trainable=False)

  mc, res0, img_ch = int(kw["model_channels"]), int(kw["img_resolution"]), int(kw["img_channels"])
  cblock = [mc * int(m) for m in kw["channel_mult"]]
  cnoise = mc * int(kw["channel_mult_noise"]) if kw["channel_mult_noise"] is not None else cblock[0]
  cemb = mc * int(kw["channel_mult_emb"]) if kw["channel_mult_emb"] is not None else max(cblock)
  attn_res = tuple(int(r) for r in kw["attn_resolutions"])
  cph = int(kw["channels_per_head"])
  u = ("unet",)

  def block(tag, cin, cout, flavor, attention=False):
    o = u + (tag,)
    name = f"unet.{tag.replace('_', '.', 1)}"
    add(o + ("emb_gain",), f"{name}.emb_gain", ())
    conv(o + ("conv_res0",), f"{name}.conv_res0", cout if flavor == "enc" else cin, cout, 3)
    conv(o + ("emb_linear",), f"{name}.emb_linear", cemb, cout, 0)
    conv(o + ("conv_res1",), f"{name}.conv_res1", cout, cout, 3)
    if cin != cout:
      conv(o + ("conv_skip",), f"{name}.conv_skip", cin, cout, 1)
    if attention and cout // cph:
      conv(o + ("attn_qkv",), f"{name}.attn_qkv", cout, 3 * cout, 1)
      conv(o + ("attn_proj",), f"{name}.attn_proj", cout, cout, 1)
    return cout

  add(u + ("out_gain",), "unet.out_gain", ())
  fourier(u + ("emb_fourier",), "unet.emb_fourier", cnoise)
  conv(u + ("emb_noise",), "unet.emb_noise", cnoise, cemb, 0)
  if kw["label_dim"]:
    conv(u + ("emb_label",), "unet.emb_label", int(kw["label_dim"]), cemb, 0)
  skips = []
  cout = img_ch + 1
  for level, channels in enumerate(cblock):
    r = res0 >> level
    if level == 0:
      conv(u + (f"enc_{r}x{r}_conv",), f"unet.enc.{r}x{r}_conv", cout, channels, 3)
      cout = channels
    else:
      cout = block(f"enc_{r}x{r}_down", cout, cout, "enc")
    skips.append(cout)
    for idx in range(int(kw["num_blocks"])):
      cout = block(f"enc_{r}x{r}_block{idx}", cout, channels, "enc", r in attn_res)
      skips.append(cout)
  for level, channels in reversed(list(enumerate(cblock))):
    r = res0 >> level
    if level == len(cblock) - 1:
      cout = block(f"dec_{r}x{r}_in0", cout, cout, "dec", True)
      cout = block(f"dec_{r}x{r}_in1", cout, cout, "dec")
    else:
      cout = block(f"dec_{r}x{r}_up", cout, cout, "dec")
    for idx in range(int(kw["num_blocks"]) + 1):
      cout = block(f"dec_{r}x{r}_block{idx}", cout + skips.pop(), channels, "dec",
                   r in attn_res)
  conv(u + ("out_conv",), "unet.out_conv", cout, img_ch, 3)
  fourier(("logvar_fourier",), "logvar_fourier", int(kw["logvar_channels"]))
  conv(("logvar_linear",), "logvar_linear", int(kw["logvar_channels"]), 1, 0)
  assert not skips
  return entries


def check_spec(entries: Sequence[Entry], model: Any, shape: Sequence[int]) -> None:
  """The map against `jax.eval_shape` of the network's initialization.

  Raises:
    RuntimeError: they disagree (a bug in this module or the network).
  """
  check_entries(entries, model, shape, "score_jax.convert.edm2's map and EDM2UNet's parameters")


def check_tensors(tensors: Mapping[str, np.ndarray], entries: Sequence[Entry],
                  source: str = "the file") -> None:
  """`tensors` ({EDM2 name: array}) must be exactly the entries, in floating point.

  Raises:
    EDM2LayoutError: naming every missing, unexpected and misshapen tensor.
  """
  expected = {e.name: e.ref_shape for e in entries}
  parts = mismatch({n: v.shape for n, v in tensors.items()}, expected)
  if parts:
    raise EDM2LayoutError(
        f"{source} does not hold the network its constructor arguments describe "
        f"({len(expected)} tensors expected); nothing was converted. " + "; ".join(parts) + ".")
  bad = [e.name for e in entries if not np.issubdtype(tensors[e.name].dtype, np.floating)]
  if bad:
    raise EDM2LayoutError(f"{source}: tensors that are not floating point: {_names(bad)}.")


# ---------------------------------------------------------------------------
# Conversion


def _check_config(s: Any) -> None:
  if s.model.name.lower() != "edm2_unet":
    raise EDM2LayoutError(f"model.name={s.model.name!r}: EDM2's networks convert into model.name="
                          "'edm2_unet' (configs/edm2_presets.py).")
  if s.model.parameterization != "edm" or s.training.sde != "vesde":
    raise EDM2LayoutError(f"model.parameterization={s.model.parameterization!r}, training.sde="
                          f"{s.training.sde!r}: EDM2's networks take EDM's preconditioning on "
                          "the VE SDE (model.parameterization='edm', training.sde='vesde').")


def convert(src: str, dst: str, config: Any, *, weights: str = "ema",
            step: Optional[int] = None) -> Dict[str, Any]:
  """Converts EDM2 network pickle `src` into score_jax workdir `dst`.

  Args:
    src: an EDM2 released network, reconstruct_phema.py output or training snapshot (.pkl).
    dst: workdir to create (or one without checkpoints).
    config: a ConfigDict with model.name 'edm2_unet' (configs/edm2_presets.py); its network
      keys are replaced by the file's (module docstring).
    weights: 'ema' (EDM2's pickles hold one network).
    step: step to store the checkpoint at (default training.snapshot_freq).
  Returns:
    {'checkpoint': dst/checkpoints/<step>, 'step', 'weights': 'ema', 'tensors': number
     converted, 'notes': the config keys taken from the file and the encoder}.
  Raises:
    FileExistsError, FileNotFoundError, edm_pickle.EDMPickleError, EDM2LayoutError.
  """
  from score_jax.convert.workdir import refuse_existing, write_converted
  from score_jax.run import builders
  from score_jax.run import settings as settings_lib

  if isinstance(config, settings_lib.Settings):
    raise TypeError("edm2.convert takes the config as a ConfigDict (the file sets its network).")
  _check_config(settings_lib.from_config(config))
  refuse_existing(dst)  # before the read
  obj = edm_pickle.load(src)
  net = find_network(obj, src, weights)
  kw = resolved_kwargs(net, src)
  config, notes = config_for(config, kw, src)
  guide = config.sample.get("guide_workdir", "")
  if guide and os.path.abspath(guide) == os.path.abspath(dst):
    config.sample.guide_workdir = ""  # converting a preset's guide: it samples alone
    config.sampling.guidance_weight = 0.0
    notes.append("sample.guide_workdir is DST itself (this is the guide): cleared, with "
                 "sampling.guidance_weight")
  config, more = encoder_config(obj, config, src)
  notes += more
  s = settings_lib.from_config(config)
  model = builders.get_model(s)
  shape = s.data.shape(1)
  entries = edm2_spec(kw)
  check_spec(entries, model, shape)
  tensors = edm_pickle.state_dict(net)
  check_tensors(tensors, entries, src)
  params = tensors_to_params(tensors, entries)
  del tensors, obj
  for note in notes:
    logging.info("%s: %s.", src, note)
  return write_converted(dst, s, params, step, weights="ema", tensors=len(entries),
                         notes=notes)
