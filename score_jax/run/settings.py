"""Config -> typed, validated settings: the one place that reads a ConfigDict.

`from_config(config)` turns an ml_collections ConfigDict (configs/*.py, or a
workdir's config.json) into a frozen `Settings` tree, one dataclass per
section (`training`, `sampling`, `eval`, `sample`, `data`, `model`,
`optim`). Everything below it (programs, train, evaluate, sample, convert)
takes settings, never a ConfigDict. Here, before anything compiles:

- every key of every section is checked against the keys something reads: an
  unknown key (`model.nff = 64`) is a `ConfigError` that names it and the
  section's valid keys. The model section also takes the architecture keys of
  model.name's network, its constructor's arguments (`models.network_arguments`,
  whose defaults hold for the keys not given); a key of another network is a
  `ConfigError` that names the network it belongs to.
- every value is checked for its type and range, section by section; the
  sampling options against the chosen sampler's declaration
  (`sampler_specs.SAMPLERS`: the settings each sampler takes and their values).

Every default lives in configs/default.py. A config that lacks keys (one
written by an older version into a workdir) is completed from that file
when it can be found, else the missing keys are an error.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
from typing import Any, Dict, Mapping, Optional, Tuple, get_type_hints

from score_jax.errors import ConfigError
from score_jax.run import sampler_specs

__all__ = ["Settings", "Training", "Sampling", "Eval", "Sample", "Data", "Model", "Optim",
           "from_config", "from_json", "default_config", "SDE_NAMES", "SAMPLING_METHODS"]

SDE_NAMES = ("vpsde", "subvpsde", "vesde", "rectified_flow", "trigflow")
# The samplers and the settings each takes: sampler_specs.SAMPLERS, which the sampling
# section is checked against.
SAMPLING_METHODS = tuple(sampler_specs.SAMPLERS)
UNIPC_VARIANTS = sampler_specs.SAMPLERS["unipc"].option("unipc_variant").choices
TASKS = ("generate", "inpaint", "colorize", "interpolate")
QUANTIZATIONS = ("truncate", "round")
NONFINITE_GRADS = ("skip", "zero")
DTYPES = ("float32", "bfloat16", "float16")
SHARDINGS = ("replicated", "fsdp")  # of the train state (score_jax.run.sharding)
# Network parameterizations (models.PARAMETERIZATIONS), DSM time distributions and
# weightings (losses.TIME_DISTRIBUTIONS, losses.WEIGHTINGS), spelled here so that
# settings import nothing heavy.
PARAMETERIZATIONS = ("default", "edm", "velocity", "sit_velocity", "trigflow", "consistency")
TIME_DISTRIBUTIONS = ("uniform", "lognormal_sigma", "logit_normal")
WEIGHTINGS = ("default", "edm", "velocity")
OBJECTIVES = ("denoising", "edm2", "meanflow", "ict", "ect", "sct", "scd")
# The diffusion objectives: a run of one is a score model (a teacher, a sampler's network).
DIFFUSION_OBJECTIVES = ("denoising", "edm2")
LR_DECAYS = ("none", "cosine", "inverse_sqrt")
# SongUNet's ways of combining MeanFlow's two times (models.song_unet.SECOND_TIME_MODES).
SECOND_TIME_MODES = ("add", "concat")
# Discrete consistency training (score_jax.consistency.METRICS, WEIGHTINGS).
CT_OBJECTIVES = ("ict", "ect")
CT_METRICS = ("l2", "pseudo_huber")
CT_WEIGHTINGS = ("uniform", "ict", "snr", "snrp1", "truncated_snr")
# The objectives that learn from a trained diffusion run (training.teacher_workdir).
TEACHER_OBJECTIVES = ("scd",)


@dataclasses.dataclass(frozen=True)
class Training:
  sde: str
  continuous: bool
  reduce_mean: bool
  likelihood_weighting: bool
  importance_weighting: bool
  batch_size: int
  microbatches: int
  sharding: str
  fsdp_size: int
  n_iters: int
  snapshot_freq: int
  snapshot_freq_for_preemption: int
  snapshot_sampling: bool
  phema_snapshot_freq: int
  log_freq: int
  eval_freq: int
  eps: float
  class_dropout: float
  time_distribution: str
  p_mean: float
  p_std: float
  logit_mean: float
  logit_std: float
  weighting: str
  objective: str
  meanflow_ratio: float
  meanflow_power: float
  meanflow_model_tangent: bool
  meanflow_c: float
  teacher_workdir: str
  teacher_step: int
  init_from_teacher: bool
  scm_p_mean: float
  scm_p_std: float
  scm_warmup_steps: int
  scm_tangent_c: float
  scm_adaptive_weighting: bool
  ct_metric: str
  ct_huber_c: float
  ct_weighting: str
  ct_rho: float
  ct_s0: int
  ct_s1: int
  ct_ect_q: float
  ct_ect_double: int
  ct_ect_k: float
  ct_ect_b: float


@dataclasses.dataclass(frozen=True)
class Sampling:
  method: str
  predictor: str
  corrector: str
  snr: float
  n_steps_each: int
  noise_removal: bool
  probability_flow: bool
  num_steps: int
  schedule: str
  eta: float
  order: int
  unipc_variant: str
  grid_batch_size: int
  grid_iters: int
  s_churn: float
  rtol: float
  atol: float
  eps: float
  guidance_weight: float
  guidance_interval: Tuple[float, float]
  consistency_sigmas: Tuple[float, ...]
  batch_size: int


@dataclasses.dataclass(frozen=True)
class Eval:
  begin_ckpt: int
  end_ckpt: int
  batch_size: int
  enable_sampling: bool
  num_samples: int
  enable_loss: bool
  enable_bpd: bool
  bpd_dataset: str
  bpd_passes: int
  hutchinson: str
  likelihood_rtol: float
  likelihood_atol: float
  likelihood_eps: float
  wait_timeout_s: float
  poll_interval_s: float
  quantization: str
  inception_path: str
  inception_resize: str
  inception_precision: str
  inception_batch_size: int
  stats_path: str
  stats_num_images: int
  kid_dataset_features: int
  dinov2_path: str
  dinov2_precision: str
  dinov2_batch_size: int
  dinov2_stats_path: str


@dataclasses.dataclass(frozen=True)
class Sample:
  ckpt_step: int
  num: int
  task: str
  images_path: str
  mask: str
  class_label: int
  interpolation_steps: int
  output_dir: str
  guide_workdir: str
  guide_step: int


@dataclasses.dataclass(frozen=True)
class Data:
  dataset: str
  data_dir: str
  path: str
  image_size: int
  num_channels: int
  random_flip: bool
  centered: bool
  uniform_dequantization: bool
  toy_name: str
  category: str
  tfrecords_path: str
  augment_p: float
  augment_xflip: float
  augment_yflip: float
  augment_rotate_int: float
  augment_translate_int: float
  augment_scale: float
  augment_rotate_frac: float
  augment_aniso: float
  augment_translate_frac: float
  # data.dataset = 'latents' (score_jax/data/latents.py): z = latent_scale * raw + latent_shift
  # per latent channel (empty: the VAE's scaling factor, no shift); the VAE that decodes
  # samples (empty: the one data.path's meta.json names); pixels in and out of the VAE in
  # [-1, 1] (True) or [0, 1] (False, EDM2's).
  latent_scale: Tuple[float, ...]
  latent_shift: Tuple[float, ...]
  vae: str
  vae_centered: bool

  def augment_kwargs(self) -> Dict[str, float]:
    """score_jax.data.augment.Augment's arguments: p and the probability multipliers."""
    prefix = "augment_"
    return {f.name[len(prefix):]: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name.startswith(prefix)}

  @property
  def is_toy(self) -> bool:
    return self.dataset.lower() == "toy"

  @property
  def is_images(self) -> bool:
    return not self.is_toy

  @property
  def is_latents(self) -> bool:
    """Images encoded by a VAE (data.path): the model sees latents, samples decode to images."""
    return self.dataset.lower() == "latents"

  def shape(self, batch: int) -> Tuple[int, ...]:
    """Shape of a batch of data: [B, 2] for toy data, else [B, H, W, C]."""
    if self.is_toy:
      return (batch, 2)
    return (batch, self.image_size, self.image_size, self.num_channels)


@dataclasses.dataclass(frozen=True)
class Model:
  name: str
  sigma_min: float
  sigma_max: float
  num_scales: int
  beta_min: float
  beta_max: float
  dropout: float
  embedding_type: str
  ema_rate: float
  ema_warmup: bool
  ema_halflife_kimg: float
  ema_rampup_ratio: float
  phema_sigma_rels: Tuple[float, ...]
  num_classes: int
  dtype: str
  remat: bool
  parameterization: str
  sigma_data: float
  trigflow_label_scale: float
  # Architecture keys of model.name's network, as given (tuples for lists): arguments of its
  # constructor (models.network_arguments), whose defaults hold for the keys not given. A key
  # of another network is an error.
  arch: Tuple[Tuple[str, Any], ...] = ()

  def get(self, key: str, default: Any = None) -> Any:
    """A generic or architecture key's value (default when the config does not set it)."""
    if key in _field_names(Model):
      return getattr(self, key)
    return dict(self.arch).get(key, default)

  @property
  def conditional_on_labels(self) -> bool:
    return self.num_classes > 0


@dataclasses.dataclass(frozen=True)
class Optim:
  optimizer: str
  lr: float
  beta1: float
  beta2: float
  eps: float
  weight_decay: float
  warmup: int
  lr_rampup_kimg: float
  grad_clip: float
  nonfinite_grads: str
  lr_decay: str
  ref_batches: int


@dataclasses.dataclass(frozen=True)
class Settings:
  """A run's validated settings; `raw` is the resolved config as plain dicts (config.json)."""
  seed: int
  training: Training
  sampling: Sampling
  eval: Eval
  sample: Sample
  data: Data
  model: Model
  optim: Optim
  raw: Mapping[str, Any] = dataclasses.field(compare=False, hash=False, repr=False,
                                             default_factory=dict)

  def to_json(self) -> str:
    return json.dumps(self.raw, indent=2, sort_keys=True, default=_json_default)

  def replace(self, **sections: Mapping[str, Any]) -> "Settings":
    """A copy with some keys changed, validated again: replace(sampling={'method': 'ode'})."""
    raw = json.loads(json.dumps(self.raw, default=_json_default))
    for section, changes in sections.items():
      if section == "seed":
        raw["seed"] = changes
        continue
      if section not in raw:
        raise ConfigError(f"Unknown config section {section!r}; sections: {sorted(_SECTIONS)}.")
      raw[section].update(changes)
    return _from_dict(raw)


_SECTIONS: Dict[str, type] = {"training": Training, "sampling": Sampling, "eval": Eval,
                              "sample": Sample, "data": Data, "model": Model, "optim": Optim}


def _field_names(cls: type) -> Tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(cls) if f.name != "arch")


def _json_default(value: Any) -> Any:
  if isinstance(value, tuple):
    return list(value)
  raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _family_keys() -> Dict[str, Tuple[str, ...]]:
  """model.name -> the model-section keys its network takes: its constructor's arguments
  (`models.network_arguments`) less `centered`, which data.centered sets."""
  from score_jax import models  # pylint: disable=g-import-not-at-top
  return {name: tuple(k for k in models.network_arguments(name) if k != "centered")
          for name in models.MODELS}


def _as_static(value: Any) -> Any:
  """Lists (e.g. fir_kernel = [1, 3, 3, 1]) -> tuples: settings and module fields are hashable."""
  if isinstance(value, (list, tuple)):
    return tuple(_as_static(v) for v in value)
  return value


def _convert(section: str, key: str, value: Any, typ: Any) -> Any:
  where = f"{section}.{key}" if section else key
  if typ is bool:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
      return bool(value)
    raise ConfigError(f"{where} must be True or False, got {value!r}.")
  if typ is int:
    if isinstance(value, bool) or not isinstance(value, int):
      if isinstance(value, float) and value.is_integer():
        return int(value)
      raise ConfigError(f"{where} must be an integer, got {value!r}.")
    return value
  if typ is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{where} must be a number, got {value!r}.")
    return float(value)
  if typ is str:
    if not isinstance(value, str):
      raise ConfigError(f"{where} must be a string, got {value!r}.")
    return value
  return value


_DEFAULT: Optional[Dict[str, Any]] = None


def default_config() -> Optional[Dict[str, Any]]:
  """configs/default.py's config as plain dicts, or None where the file is not found.

  The repository's configs/ folder sits beside the score_jax package (an
  editable install or a checkout on the path).
  """
  global _DEFAULT
  if _DEFAULT is None:
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # score_jax/
    path = os.path.join(os.path.dirname(package), "configs", "default.py")
    if not os.path.isfile(path):
      return None
    spec = importlib.util.spec_from_file_location("_score_jax_default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _DEFAULT = module.get_config().to_dict()
  return json.loads(json.dumps(_DEFAULT, default=_json_default))


def from_config(config: Any) -> Settings:
  """Validated settings of an ml_collections ConfigDict (or a plain nested dict).

  Raises:
    ConfigError: an unknown key, a missing one (with no configs/default.py to
      complete it from), or a value of the wrong type or range; the message
      names the key and the fix.
  """
  raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return _from_dict(json.loads(json.dumps(raw, default=_json_default)))


def from_json(path: str) -> Settings:
  """Settings of a workdir's config.json.

  A run written before keys of another network were refused may hold some: its
  network never received them, so they are dropped here (with a warning) and
  the run loads as it was trained.
  """
  with open(path) as f:
    raw = json.load(f)
  model = raw.get("model") if isinstance(raw, dict) else None
  if isinstance(model, dict):
    foreign = _keys_of_other_networks(model, _family_keys())
    if foreign:
      logging.warning("%s: %s belong to other networks than model.name = %r, which never "
                      "read them; ignored.", path, ", ".join(f"model.{k}" for k in foreign),
                      model["name"])
      raw["model"] = {k: v for k, v in model.items() if k not in foreign}
  return _from_dict(raw)


def _keys_of_other_networks(model: Mapping[str, Any],
                            families: Mapping[str, Tuple[str, ...]]) -> Tuple[str, ...]:
  """The keys of a model section that other networks than model.name's take (none where
  model.name is not a network)."""
  own = families.get(str(model.get("name", "")).lower())
  if own is None:
    return ()
  generic = set(_field_names(Model))
  return tuple(k for k in model if k not in own and k not in generic
               and any(k in keys for keys in families.values()))


def _complete(raw: Dict[str, Any]) -> Dict[str, Any]:
  """Fills keys the config lacks from configs/default.py (older workdirs' config.json)."""
  default = default_config()
  if default is None:
    return raw
  for section, values in default.items():
    if isinstance(values, dict):
      have = raw.setdefault(section, {})
      if not isinstance(have, dict):
        raise ConfigError(f"Config section {section!r} must be a ConfigDict, got {have!r}.")
      for key, value in values.items():
        have.setdefault(key, value)
    else:
      raw.setdefault(section, values)
  return raw


def _from_dict(raw: Dict[str, Any]) -> Settings:
  raw = _complete(raw)
  unknown_sections = sorted(set(raw) - set(_SECTIONS) - {"seed"})
  if unknown_sections:
    raise ConfigError(f"Unknown config section(s) {unknown_sections}; a config has the sections "
                      f"{sorted(_SECTIONS)} and 'seed'.")
  families = _family_keys()
  arch_keys = sorted({k for keys in families.values() for k in keys} - set(_field_names(Model)))
  sections: Dict[str, Any] = {}
  for section, cls in _SECTIONS.items():
    values = raw.get(section)
    if not isinstance(values, dict):
      raise ConfigError(f"The config has no section {section!r}; start configs from "
                        "configs/default.py's get_config().")
    names = _field_names(cls)
    allowed = set(names) | (set(arch_keys) if cls is Model else set())
    unknown = sorted(set(values) - allowed)
    if unknown:
      extra = ""
      if cls is Model:
        name = str(values.get("name", "")).lower()
        whose, keys = ((f"{name!r} (model.name)", [k for k in families[name] if k in arch_keys])
                       if name in families else ("the networks", arch_keys))
        extra = f" and the architecture keys of {whose}: {', '.join(keys)}"
      raise ConfigError(f"Unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}: nothing "
                        f"reads them. Valid keys of config.{section}: {', '.join(names)}{extra}.")
    missing = [k for k in names if k not in values]
    if missing:
      raise ConfigError(f"The config lacks {', '.join(f'{section}.{k}' for k in missing)}; start "
                        "configs from configs/default.py's get_config().")
    hints = get_type_hints(cls)
    kwargs = {k: _convert(section, k, _as_static(values[k]), hints[k]) for k in names}
    if cls is Model:
      kwargs["arch"] = tuple(sorted((k, _as_static(values[k])) for k in values if k in arch_keys))
    sections[section] = cls(**kwargs)
  seed = _convert("", "seed", raw.get("seed", 0), int)
  settings = Settings(seed=seed, raw=raw, **sections)
  _check(settings, families)
  return settings


def _choice(where: str, value: str, choices, *, lower: bool = False) -> None:
  v = value.lower() if lower else value
  if v not in choices:
    raise ConfigError(f"Unknown {where} {value!r}; choose from {sorted(choices)}.")


def _at_least(where: str, value: float, low: float) -> None:
  if not value >= low:
    raise ConfigError(f"{where} must be >= {low}, got {value}.")


def _check(s: Settings, families: Mapping[str, Tuple[str, ...]]) -> None:
  """Value checks that need no devices, no data and no network, section by section."""
  _check_training(s.training)
  _check_objective(s.training, s.model)
  _check_meanflow(s, families)
  _check_edm2(s, families)
  _check_scm(s)
  _check_ct(s)
  _check_teacher(s.training)
  _check_model(s.model, families)
  _check_sde(s.training, s.model)
  _check_optim(s.optim)
  _check_phema(s.training, s.model)
  _check_sampling(s.sampling, s.sample)
  _check_eval(s.eval)
  _check_sample(s.sample, s.model)
  _check_data(s.data, s.model, families)
  _check_augment(s.data, s.model)
  _check_latents(s)
  # Last: a network that cannot take the data or its augmentation is the error to show
  # first when model.name changes; the keys of the former network follow from it.
  _check_network_keys(s.model, families)


def _check_training(t: Training) -> None:
  _choice("training.sde", t.sde, SDE_NAMES, lower=True)
  for key in ("batch_size", "microbatches", "n_iters", "snapshot_freq",
              "snapshot_freq_for_preemption", "log_freq", "eval_freq"):
    _at_least(f"training.{key}", getattr(t, key), 1)
  _choice("training.sharding", t.sharding, SHARDINGS)
  _at_least("training.fsdp_size", t.fsdp_size, 0)
  if t.fsdp_size and t.sharding != "fsdp":
    raise ConfigError(f"training.fsdp_size = {t.fsdp_size} splits the state with "
                      "training.sharding = 'fsdp'; set it too, or training.fsdp_size = 0.")
  if not 0.0 < t.eps < 1.0:
    raise ConfigError(f"training.eps must lie in (0, 1), got {t.eps}.")
  if not 0.0 <= t.class_dropout < 1.0:
    raise ConfigError(f"training.class_dropout must lie in [0, 1), got {t.class_dropout}.")
  if (t.likelihood_weighting or t.importance_weighting) and not t.continuous:
    raise ConfigError("likelihood/importance weighting apply to continuous training only "
                      "(training.continuous = True).")
  if t.importance_weighting and not t.likelihood_weighting:
    raise ConfigError("training.importance_weighting samples times for the likelihood-weighted "
                      "loss; set training.likelihood_weighting = True too.")


def _check_model(m: Model, families: Mapping[str, Tuple[str, ...]]) -> None:
  """The network's name, dtype and generic options; SongUNet's second_time_mode; the EMA; the
  noise levels' counts."""
  _choice("model", m.name, families, lower=True)  # "Unknown model ..." (model.name)
  _choice("model.dtype", m.dtype, DTYPES)
  if m.remat and "remat" not in families[m.name.lower()]:
    able = ", ".join(name for name, keys in families.items() if "remat" in keys)
    raise ConfigError(f"model.remat (gradient checkpointing) is supported by {able}, not by "
                      f"{m.name!r}; set model.remat = False.")
  if not 0.0 <= m.ema_rate < 1.0:
    raise ConfigError(f"model.ema_rate must lie in [0, 1), got {m.ema_rate}.")
  _at_least("model.ema_halflife_kimg", m.ema_halflife_kimg, 0.0)
  _at_least("model.ema_rampup_ratio", m.ema_rampup_ratio, 0.0)
  _at_least("model.num_classes", m.num_classes, 0)
  _at_least("model.num_scales", m.num_scales, 1)
  mode = m.get("second_time_mode")
  if mode is not None and "second_time_mode" in families[m.name.lower()]:
    _choice("model.second_time_mode", mode, SECOND_TIME_MODES)
    if mode == "concat" and not m.get("second_time"):
      raise ConfigError("model.second_time_mode = 'concat' combines two times; set "
                        "model.second_time = True.")
    if mode == "concat" and m.embedding_type != "positional":
      raise ConfigError(f"model.second_time_mode = 'concat' embeds both times positionally; "
                        f"set model.embedding_type = 'positional' (got {m.embedding_type!r}).")


def _check_sde(t: Training, m: Model) -> None:
  """The noise schedule of training.sde (model.sigma_* for VE, model.beta_* for VP)."""
  if t.sde.lower() == "vesde" and not 0 < m.sigma_min < m.sigma_max:
    raise ConfigError(f"vesde needs 0 < model.sigma_min < model.sigma_max, got {m.sigma_min}, "
                      f"{m.sigma_max}.")
  if t.sde.lower() in ("vpsde", "subvpsde") and not 0 <= m.beta_min < m.beta_max:
    raise ConfigError(f"{t.sde} needs 0 <= model.beta_min < model.beta_max, got {m.beta_min}, "
                      f"{m.beta_max}.")
  if t.sde.lower() == "trigflow" and not t.continuous:
    raise ConfigError("trigflow has no discrete chain; set training.continuous = True.")


def _check_optim(o: Optim) -> None:
  _choice("optim.optimizer", o.optimizer, ("adam", "adamw"), lower=True)
  _choice("optim.nonfinite_grads", o.nonfinite_grads, NONFINITE_GRADS)
  _choice("optim.lr_decay", o.lr_decay, LR_DECAYS)
  for key in ("beta1", "beta2"):
    if not 0.0 <= getattr(o, key) < 1.0:
      raise ConfigError(f"optim.{key} must be in [0, 1), got {getattr(o, key)}.")
  if o.lr_decay == "inverse_sqrt" and o.ref_batches < 1:
    raise ConfigError(f"optim.lr_decay = 'inverse_sqrt' divides the rate by sqrt(max(step / "
                      f"optim.ref_batches, 1)); set optim.ref_batches >= 1 (EDM2: 70000 or "
                      f"35000), got {o.ref_batches}.")
  _at_least("optim.lr_rampup_kimg", o.lr_rampup_kimg, 0.0)
  if o.lr_rampup_kimg > 0 and o.warmup > 0:
    raise ConfigError("optim.lr_rampup_kimg (a ramp-up in images) and optim.warmup (in steps) "
                      "are two ramps of the learning rate; set optim.warmup = 0.")


def _check_sampling(c: Sampling, sample: Sample) -> None:
  """The keys every sampler shares, then the options of the samplers the run uses, each
  against its declaration (sampler_specs.SAMPLERS): sampling.method's, and the ODE's when
  sample.task = 'interpolate' (which encodes and decodes along it)."""
  _choice("sampling.method", c.method, sampler_specs.SAMPLERS, lower=True)
  _at_least("sampling.batch_size", c.batch_size, 1)
  _at_least("sampling.grid_batch_size", c.grid_batch_size, 1)
  _at_least("sampling.grid_iters", c.grid_iters, 0)
  interval = c.guidance_interval
  if not (isinstance(interval, tuple) and len(interval) == 2 and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in interval)):
    raise ConfigError("sampling.guidance_interval must be two numbers >= 0, (lo, hi) of sigma^ = "
                      f"std / alpha where guidance applies, or (0, 0) for everywhere; got "
                      f"{interval!r}.")
  used = [c.method.lower()] + (["ode"] if sample.task == "interpolate" else [])
  for method in dict.fromkeys(used):
    for option in sampler_specs.SAMPLERS[method].options:
      _check_sampler_option(c, method, option)


def _check_sampler_option(c: Sampling, method: str, option: sampler_specs.Option) -> None:
  value = getattr(c, option.key)
  if option.allows(value):
    return
  takers = tuple(m for m, spec in sampler_specs.SAMPLERS.items()
                 if m != method and spec.option(option.key) is not None
                 and spec.option(option.key).allows(value))
  hint = (f" ({value!r} is made for sampling.method={sampler_specs.spoken(takers)})"
          if takers else "")
  raise ConfigError(f"sampling.{option.key} must be {option.says} for {method}, got "
                    f"{value!r}{hint}.")


def _check_eval(e: Eval) -> None:
  _choice("eval.hutchinson", e.hutchinson, ("rademacher", "gaussian", "exact"))
  _choice("eval.quantization", e.quantization, QUANTIZATIONS)
  _choice("eval.inception_resize", e.inception_resize, ("tf1", "pytorch"))
  _choice("eval.inception_precision", e.inception_precision, ("highest", "high", "default"))
  _choice("eval.dinov2_precision", e.dinov2_precision, ("highest", "high", "default"))
  _choice("eval.bpd_dataset", e.bpd_dataset, ("train", "test"))
  for key in ("batch_size", "num_samples", "bpd_passes", "inception_batch_size",
              "dinov2_batch_size"):
    _at_least(f"eval.{key}", getattr(e, key), 1)
  _at_least("eval.wait_timeout_s", e.wait_timeout_s, 0.0)
  _at_least("eval.poll_interval_s", e.poll_interval_s, 0.0)


def _check_sample(sample: Sample, m: Model) -> None:
  _choice("sample.task", sample.task, TASKS)
  _at_least("sample.num", sample.num, 1)
  _at_least("sample.interpolation_steps", sample.interpolation_steps, 2)
  _at_least("sample.guide_step", sample.guide_step, -1)
  if sample.class_label >= max(m.num_classes, 1) and m.num_classes > 0:
    raise ConfigError(f"sample.class_label {sample.class_label} is not a class of this model "
                      f"(0..{m.num_classes - 1}).")


def _check_data(d: Data, m: Model, families: Mapping[str, Tuple[str, ...]]) -> None:
  """The data fit the network: 2-D points for the MLP, images it halves evenly for the rest."""
  if d.is_toy != (m.name.lower() == "mlp"):
    raise ConfigError(f"model.name {m.name!r} does not fit data.dataset {d.dataset!r}: 2-D toy "
                      "data needs model.name='mlp', image data an image network "
                      "(ncsnpp, ddpmpp, ddpm, ncsnv2, song_unet, dit).")
  if d.path and d.dataset.lower() not in ("images", "folder", "latents"):
    raise ConfigError(f"data.path is read only by data.dataset='images' (your own folder, zip or "
                      f".npz) and 'latents' (encoded images), not by {d.dataset!r}: set "
                      "--config.data.dataset=images, or leave data.path empty.")
  if d.is_images:
    _at_least("data.image_size", d.image_size, 1)
    _at_least("data.num_channels", d.num_channels, 1)
    if m.name.lower() == "dit":
      _check_dit(d, m)
    ch_mult = m.get("ch_mult")
    if ch_mult is not None and "ch_mult" in families[m.name.lower()]:
      factor = 2 ** (len(ch_mult) - 1)
      if d.image_size % factor:
        raise ConfigError(f"data.image_size = {d.image_size} must be divisible by {factor}, since "
                          f"the network halves the resolution {len(ch_mult) - 1} times "
                          f"(model.ch_mult = {tuple(ch_mult)}).")


def _check_dit(d: Data, m: Model) -> None:
  """DiT's size keys (models.dit.dit_dims) and a patch size that divides the image."""
  from score_jax.models import dit  # pylint: disable=g-import-not-at-top
  value = {f.name: m.get(f.name, f.default) for f in dataclasses.fields(dit.DiT) if f.init}
  try:
    dit.dit_dims(value["dit_size"], value["hidden_size"], value["depth"], value["num_heads"])
  except ValueError as e:
    raise ConfigError(f"model: {e}") from None
  patch = value["patch_size"]
  if not isinstance(patch, int) or patch < 1 or d.image_size % patch:
    raise ConfigError(f"model.patch_size = {patch!r} must be a positive divisor of "
                      f"data.image_size = {d.image_size}.")


def _check_latents(s: Settings) -> None:
  """Latent data (score_jax/data/latents.py): the normalization's values, one per latent
  channel; what acts on pixels has no meaning on latents; the latent keys none elsewhere."""
  d = s.data
  for key in ("latent_scale", "latent_shift"):
    values = getattr(d, key)
    if not isinstance(values, tuple) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in values):
      raise ConfigError(f"data.{key} must be a tuple of finite numbers (one per latent "
                        f"channel) or (), got {values!r}.")
  if not d.is_latents:
    given = [k for k in ("latent_scale", "latent_shift", "vae") if getattr(d, k)]
    if given:
      one = len(given) == 1
      raise ConfigError(f"{', '.join(f'data.{k}' for k in given)} appl{'ies' if one else 'y'} "
                        f"to data.dataset = 'latents' only; leave {'it' if one else 'them'} "
                        "empty.")
    return
  for key in ("latent_scale", "latent_shift"):
    n = len(getattr(d, key))
    if n not in (0, d.num_channels):
      raise ConfigError(f"data.{key} has {n} values, the latents data.num_channels = "
                        f"{d.num_channels} channels: give one per channel, or () for the VAE's "
                        "scaling factor.")
  if any(v == 0 for v in d.latent_scale):
    raise ConfigError(f"data.latent_scale must not hold 0 (decoding divides by it), got "
                      f"{d.latent_scale}.")
  for key in ("random_flip", "uniform_dequantization"):
    if getattr(d, key):
      raise ConfigError(f"data.{key} acts on pixels; data.dataset='latents' holds encoded images "
                        f"(flip or dequantize before encoding): set data.{key} = False.")
  if d.augment_p > 0:
    raise ConfigError("data.augment_p > 0 augments pixels, not latents: set data.augment_p = 0 "
                      "for data.dataset='latents'.")
  if s.eval.enable_bpd:
    raise ConfigError("eval.enable_bpd measures bits/dim of 8-bit pixels; latents have none: set "
                      "eval.enable_bpd = False for data.dataset='latents'.")
  if s.sample.task != "generate":
    raise ConfigError(f"sample.task = {s.sample.task!r} works on images in the model's space; "
                      "a latent model generates only: set sample.task = 'generate'.")


def _check_network_keys(m: Model, families: Mapping[str, Tuple[str, ...]]) -> None:
  """Every architecture key is one model.name's network takes: a key of another network
  would otherwise be set and silently unused."""
  foreign = _keys_of_other_networks(dict(m.arch, name=m.name), families)
  if not foreign:
    return
  by_owner: Dict[str, list] = {}
  for key in foreign:
    owner = "/".join(repr(name) for name, keys in families.items() if key in keys)
    by_owner.setdefault(owner, []).append(f"model.{key}")
  parts = [f"{', '.join(keys)} belong{'s' if len(keys) == 1 else ''} to {owner}"
           for owner, keys in by_owner.items()]
  raise ConfigError(f"{'; '.join(parts)}, not to {m.name!r} (model.name); remove "
                    f"{'it' if len(foreign) == 1 else 'them'}.")


def _check_augment(d: Data, m: Model) -> None:
  """EDM's augmentation: valid probabilities, image data, a network that takes its labels."""
  from score_jax.data import augment  # pylint: disable=g-import-not-at-top
  from score_jax.models import MODELS  # pylint: disable=g-import-not-at-top
  try:
    aug = augment.Augment(**d.augment_kwargs())
  except ValueError as e:
    raise ConfigError(f"data.augment_{e}") from e
  if not aug.enabled:
    return
  if not d.is_images:
    raise ConfigError("data.augment_p > 0 augments images; set data.augment_p = 0 for "
                      f"data.dataset {d.dataset!r}.")
  fields = {f.name: f for f in dataclasses.fields(MODELS[m.name.lower()])}
  if "augment_dim" not in fields:
    raise ConfigError(f"data.augment_p > 0 conditions the network on the augmentation labels, "
                      f"which {m.name!r} does not take; use model.name = 'song_unet', "
                      "'ncsnpp' or 'ddpmpp' (with model.augment_dim) or set data.augment_p = 0.")
  dim = m.get("augment_dim", fields["augment_dim"].default)
  if dim != aug.label_dim:
    raise ConfigError(f"The augmentation (data.augment_*) makes {aug.label_dim} labels but the "
                      f"network takes model.augment_dim = {dim}; set model.augment_dim = "
                      f"{aug.label_dim}.")


def _check_objective(t: Training, m: Model) -> None:
  """The network parameterization and the DSM loss's time distribution and weighting."""
  _choice("model.parameterization", m.parameterization, PARAMETERIZATIONS)
  _choice("training.time_distribution", t.time_distribution, TIME_DISTRIBUTIONS)
  _choice("training.weighting", t.weighting, WEIGHTINGS)
  if m.parameterization != "default":
    if not t.continuous:
      raise ConfigError(f"model.parameterization = {m.parameterization!r} is continuous-time; "
                        "set training.continuous = True.")
    if m.get("scale_by_sigma"):
      raise ConfigError(f"model.scale_by_sigma does not combine with model.parameterization = "
                        f"{m.parameterization!r}, which scales the output itself; set "
                        "model.scale_by_sigma = False.")
  if not (math.isfinite(m.sigma_data) and m.sigma_data > 0):
    raise ConfigError(f"model.sigma_data must be a finite number > 0, got {m.sigma_data}.")
  if not (math.isfinite(m.trigflow_label_scale) and m.trigflow_label_scale > 0):
    raise ConfigError(f"model.trigflow_label_scale must be a finite number > 0 (636.0: the "
                      f"[0, 999] label range; 1.0: the sCM paper's c_noise(t) = t), got "
                      f"{m.trigflow_label_scale}.")
  trigflow = t.sde.lower() == "trigflow"
  if m.parameterization == "trigflow" and not trigflow:
    raise ConfigError(f"model.parameterization = 'trigflow' is TrigFlow's network; set "
                      f"training.sde = 'trigflow' (got {t.sde!r}), or use 'velocity'.")
  if m.parameterization == "sit_velocity" and t.sde.lower() != "rectified_flow":
    raise ConfigError(f"model.parameterization = 'sit_velocity' is SiT's network on the linear "
                      f"interpolant; set training.sde = 'rectified_flow' (got {t.sde!r}).")
  if trigflow and t.time_distribution == "logit_normal":
    raise ConfigError("training.time_distribution = 'logit_normal' draws t in (0, 1), but "
                      "TrigFlow's t runs to pi/2; use 'lognormal_sigma' (the sCM paper's "
                      "ln(sigma_d tan t) ~ N(p_mean, p_std^2)) or 'uniform'.")
  if t.likelihood_weighting and t.weighting != "default":
    raise ConfigError(f"training.likelihood_weighting is a weighting of its own; it does not "
                      f"combine with training.weighting = {t.weighting!r}.")
  if t.importance_weighting and t.time_distribution != "uniform":
    raise ConfigError("training.importance_weighting samples t itself; set "
                      "training.time_distribution = 'uniform'.")
  if (t.time_distribution != "uniform" or t.weighting != "default") and not t.continuous:
    raise ConfigError("training.time_distribution and training.weighting apply to continuous "
                      "training (training.continuous = True).")
  for key in ("p_std", "logit_std"):
    if not getattr(t, key) > 0:
      raise ConfigError(f"training.{key} must be > 0, got {getattr(t, key)}.")


def _check_edm2(s: Settings, families: Mapping[str, Tuple[str, ...]]) -> None:
  """EDM2's loss (training.objective = 'edm2') trains EDM's preconditioned denoiser on EDM's
  process with a network that has EDM2's uncertainty head."""
  del families
  t, m = s.training, s.model
  if t.objective != "edm2":
    return
  name = "training.objective = 'edm2'"
  if t.sde.lower() != "vesde" or not t.continuous:
    raise ConfigError(f"{name} is on EDM's process x_0 + sigma z; set training.sde = 'vesde' "
                      f"and training.continuous = True (got {t.sde!r}, {t.continuous}).")
  if m.parameterization != "edm":
    raise ConfigError(f"{name} trains EDM's preconditioned denoiser; set "
                      f"model.parameterization = 'edm' (got {m.parameterization!r}).")
  if m.name.lower() != "edm2_unet":
    raise ConfigError(f"{name} learns EDM2's uncertainty u(sigma), which the 'edm2_unet' "
                      f"network has; set model.name = 'edm2_unet' (got {m.name!r}).")
  if s.data.augment_p > 0:
    raise ConfigError(f"{name} trains without EDM's augmentation (EDM2's network takes no "
                      f"augmentation labels); set data.augment_p = 0.")


def _check_meanflow(s: Settings, families: Mapping[str, Tuple[str, ...]]) -> None:
  """MeanFlow trains an average-velocity network on the rectified-flow path; its sampler
  needs one, and nothing that needs a score (the other samplers, the likelihood, the
  controllable tasks) runs on it."""
  t, m, c = s.training, s.model, s.sampling
  _choice("training.objective", t.objective, OBJECTIVES)
  meanflow = t.objective == "meanflow"
  if c.method.lower() == "meanflow" and not meanflow:
    raise ConfigError("sampling.method = 'meanflow' samples average-velocity networks; train "
                      "with training.objective = 'meanflow' or choose another sampler.")
  if not meanflow:
    return
  if t.sde.lower() != "rectified_flow" or not t.continuous:
    raise ConfigError("training.objective = 'meanflow' is on the rectified-flow path; set "
                      "training.sde = 'rectified_flow' and training.continuous = True.")
  if "second_time" not in families.get(m.name.lower(), ()):
    raise ConfigError(f"training.objective = 'meanflow' needs a network with a second time "
                      f"input; model.name = {m.name!r} has none (use 'mlp').")
  if not m.get("second_time"):
    raise ConfigError("training.objective = 'meanflow' needs the network's second time input; "
                      "set model.second_time = True.")
  if t.time_distribution != "logit_normal" or m.parameterization != "default":
    raise ConfigError("training.objective = 'meanflow' samples logit-normal times with a plain "
                      "network output; set training.time_distribution = 'logit_normal' and "
                      "model.parameterization = 'default'.")
  if not 0.0 <= t.meanflow_ratio <= 1.0:
    raise ConfigError(f"training.meanflow_ratio is the share of r < t in [0, 1], got "
                      f"{t.meanflow_ratio}.")
  _at_least("training.meanflow_power", t.meanflow_power, 0.0)
  if not t.meanflow_c > 0:
    raise ConfigError(f"training.meanflow_c must be > 0, got {t.meanflow_c}.")
  if c.method.lower() not in sampler_specs.AVERAGE_VELOCITY:
    raise ConfigError(f"A MeanFlow network gives an average velocity, not the score that "
                      f"sampling.method = {c.method!r} integrates; set sampling.method = "
                      "'meanflow'.")
  if c.guidance_weight != 0:
    raise ConfigError("Guidance is not implemented for MeanFlow; set "
                      "sampling.guidance_weight = 0.")
  if s.sample.task != "generate" or s.eval.enable_bpd:
    raise ConfigError("The controllable tasks and the likelihood need a score, which a MeanFlow "
                      "network does not give; set sample.task = 'generate' and "
                      "eval.enable_bpd = False.")


def _check_scm(s: Settings) -> None:
  """Continuous-time consistency models (score_jax.scm): a TrigFlow network sampled by the
  consistency sampler; nothing that needs a score of the whole path (the other samplers,
  the likelihood, the controllable tasks, guidance) runs on it."""
  t, m, c = s.training, s.model, s.sampling
  if t.objective not in ("sct", "scd"):
    return
  name = f"training.objective = {t.objective!r}"
  if t.sde.lower() != "trigflow" or m.parameterization != "trigflow" or not t.continuous:
    raise ConfigError(f"{name} trains a TrigFlow consistency model; set training.sde = "
                      "'trigflow', model.parameterization = 'trigflow' and training.continuous "
                      "= True.")
  if c.method.lower() != "consistency":
    raise ConfigError(f"{name} gives a consistency function, not the score that "
                      f"sampling.method = {c.method!r} integrates; set sampling.method = "
                      "'consistency'.")
  if c.guidance_weight != 0:
    raise ConfigError(f"Guidance is not implemented for {name}; set sampling.guidance_weight "
                      "= 0.")
  if s.sample.task != "generate" or s.eval.enable_bpd:
    raise ConfigError(f"The controllable tasks and the likelihood need a score, which a "
                      f"consistency model ({name}) does not give; set sample.task = 'generate' "
                      "and eval.enable_bpd = False.")
  if not t.scm_p_std > 0:
    raise ConfigError(f"training.scm_p_std must be > 0, got {t.scm_p_std}.")
  _at_least("training.scm_warmup_steps", t.scm_warmup_steps, 0)
  if not t.scm_tangent_c > 0:
    raise ConfigError(f"training.scm_tangent_c must be > 0 (the paper's 0.1), got "
                      f"{t.scm_tangent_c}.")


def _check_ct(s: Settings) -> None:
  """iCT / ECT train the 'consistency' parameterization on EDM's VE process; the consistency
  sampler takes it, and nothing that needs a true score runs on it."""
  t, m, c = s.training, s.model, s.sampling
  if t.objective not in CT_OBJECTIVES:
    return
  name = f"training.objective = {t.objective!r}"
  if t.sde.lower() != "vesde" or not t.continuous:
    raise ConfigError(f"{name} is on EDM's VE process; set training.sde = 'vesde' and "
                      "training.continuous = True.")
  if m.parameterization != "consistency":
    raise ConfigError(f"{name} trains a consistency function; set model.parameterization = "
                      f"'consistency' (got {m.parameterization!r}).")
  if c.method.lower() != "consistency":
    raise ConfigError(f"{name} trains a consistency model; set sampling.method = "
                      f"'consistency' (got {c.method!r}).")
  if c.guidance_weight != 0:
    raise ConfigError(f"Guidance is not implemented for {name}; set "
                      "sampling.guidance_weight = 0.")
  if s.sample.task != "generate" or s.eval.enable_bpd:
    raise ConfigError("The controllable tasks and the likelihood need a true score, which a "
                      "consistency model does not give; set sample.task = 'generate' and "
                      "eval.enable_bpd = False.")
  _choice("training.ct_metric", t.ct_metric, CT_METRICS)
  _choice("training.ct_weighting", t.ct_weighting, CT_WEIGHTINGS)
  _at_least("training.ct_huber_c", t.ct_huber_c, 0.0)
  if not t.ct_rho > 0:
    raise ConfigError(f"training.ct_rho must be > 0, got {t.ct_rho}.")
  if not 1 <= t.ct_s0 <= t.ct_s1:
    raise ConfigError(f"iCT's curriculum needs 1 <= training.ct_s0 <= training.ct_s1, got "
                      f"{t.ct_s0} and {t.ct_s1}.")
  if not t.ct_ect_q > 1:
    raise ConfigError(f"training.ct_ect_q (ECT's dt shrink factor) must be > 1, got "
                      f"{t.ct_ect_q}.")
  _at_least("training.ct_ect_double", t.ct_ect_double, 1)


def _check_teacher(t: Training) -> None:
  """A teacher run is named where the objective learns from one (and only there)."""
  _at_least("training.teacher_step", t.teacher_step, 0)
  if t.objective in TEACHER_OBJECTIVES and not t.teacher_workdir:
    raise ConfigError(f"training.objective = {t.objective!r} learns from a trained diffusion "
                      "run; set training.teacher_workdir to its workdir (a score_jax run or a "
                      "converted checkpoint, as load_run opens).")
  if t.init_from_teacher and not t.teacher_workdir:
    raise ConfigError("training.init_from_teacher = True needs training.teacher_workdir (the "
                      "run whose EMA weights start the training).")


def _check_phema(t: Training, m: Model) -> None:
  """Post-hoc EMA: distinct widths in (0, 1/sqrt(12)] (gamma >= 0), a snapshot interval."""
  rels = m.phema_sigma_rels
  limit = 1.0 / math.sqrt(12.0)  # score_jax.run.phema.SIGMA_REL_MAX: the uniform average
  if not (isinstance(rels, tuple) and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= limit for v in rels)
          and len(set(rels)) == len(rels)):
    raise ConfigError(f"model.phema_sigma_rels must be distinct relative EMA widths in (0, "
                      f"{limit:.4f}], e.g. (0.05, 0.1), or () for off; got {rels!r}.")
  _at_least("training.phema_snapshot_freq", t.phema_snapshot_freq, 1)


def check_devices(s: Settings, num_devices: int, process_count: int) -> None:
  """Batch sizes that split over the devices and processes (before anything compiles)."""
  b, m = s.training.batch_size, s.training.microbatches
  if b % num_devices:
    raise ConfigError(f"training.batch_size = {b} does not divide across the {num_devices} "
                      f"devices; use a multiple of {num_devices} (e.g. "
                      f"--config.training.batch_size={math.ceil(b / num_devices) * num_devices}).")
  if b % process_count:
    raise ConfigError(f"training.batch_size = {b} does not divide across {process_count} "
                      "processes.")
  if b % (m * num_devices):
    raise ConfigError(f"training.microbatches = {m} must split training.batch_size = {b} into "
                      f"equal micro-batches that divide across the {num_devices} devices "
                      f"(batch_size a multiple of microbatches x devices = {m * num_devices}).")
  f = s.training.fsdp_size
  if f and num_devices % f:
    raise ConfigError(f"training.fsdp_size = {f} does not divide the {num_devices} devices; use "
                      f"a divisor of {num_devices}, or 0 for all of them.")
