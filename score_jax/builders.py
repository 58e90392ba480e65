"""Config -> objects: the SDE, the optimizer, the training loss and the sampler.

The running layer (training, evaluation, sampling modes) reads configs only
through these functions and `score_jax.models.get_model`; everything below
them takes explicit arguments.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from score_jax import losses
from score_jax import sde as sde_lib
from score_jax.models import get_score_fn

Array = jax.Array

SDES: Mapping[str, Callable[[ml_collections.ConfigDict], sde_lib.SDE]] = {
    "vpsde": lambda c: sde_lib.VPSDE(c.model.beta_min, c.model.beta_max, c.model.num_scales),
    "subvpsde": lambda c: sde_lib.subVPSDE(c.model.beta_min, c.model.beta_max, c.model.num_scales),
    "vesde": lambda c: sde_lib.VESDE(c.model.sigma_min, c.model.sigma_max, c.model.num_scales),
}


def get_sde(config: ml_collections.ConfigDict) -> sde_lib.SDE:
  """The SDE named by config.training.sde, with the model section's schedule."""
  name = str(config.training.sde).lower()
  if name not in SDES:
    raise ValueError(f"Unknown training.sde {config.training.sde!r}; choose from {sorted(SDES)}.")
  return SDES[name](config)


def get_lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """lr * min(step / warmup, 1), the reference's linear warmup."""
  lr, warmup = float(config.optim.lr), int(config.optim.warmup)
  if warmup > 0:
    return optax.linear_schedule(0.0, lr, warmup)
  return optax.constant_schedule(lr)


def get_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam (or AdamW with weight decay) with warmup and global-norm clipping."""
  name = str(config.optim.optimizer).lower()
  if name not in ("adam", "adamw"):
    raise ValueError(f"Unknown optim.optimizer {config.optim.optimizer!r}; choose 'Adam' or 'AdamW'.")
  schedule = get_lr_schedule(config)
  kw = dict(b1=float(config.optim.beta1), b2=0.999, eps=float(config.optim.eps))
  if float(config.optim.weight_decay) > 0:
    opt = optax.adamw(schedule, weight_decay=float(config.optim.weight_decay), **kw)
  else:
    opt = optax.adam(schedule, **kw)
  chain = []
  if float(config.optim.grad_clip) > 0:
    chain.append(optax.clip_by_global_norm(float(config.optim.grad_clip)))
  chain.append(opt)
  return optax.chain(*chain)


LossFn = Callable[..., Tuple[Array, losses.LossAux]]


def get_loss_fn(config: ml_collections.ConfigDict, sde: sde_lib.SDE, model: nn.Module,
                *, train: bool) -> LossFn:
  """loss_fn(params, rng, x [B, ...], y [B] or None) -> (loss, LossAux).

  Continuous training uses denoising score matching with the configured
  weighting; discrete training uses the DDPM loss for VP and the SMLD loss
  for VE. With model.num_classes > 0 and training.class_dropout > 0, labels
  are replaced by the null label (num_classes) at that rate, which trains the
  unconditional model used by classifier-free guidance.
  """
  t_cfg = config.training
  continuous = bool(t_cfg.continuous)
  num_classes = int(config.model.get("num_classes", 0) or 0)
  class_dropout = float(t_cfg.get("class_dropout", 0.0))
  has_chain = isinstance(sde, (sde_lib.VESDE, sde_lib.VPSDE)) and not isinstance(sde, sde_lib.subVPSDE)
  if not continuous and not has_chain:
    raise ValueError(f"Discrete training (training.continuous=False) is defined for vpsde (DDPM) "
                     f"and vesde (SMLD), not {t_cfg.sde!r}.")
  if (t_cfg.likelihood_weighting or t_cfg.get("importance_weighting", False)) and not continuous:
    raise ValueError("likelihood/importance weighting apply to continuous training only.")

  def loss_fn(params, rng: Array, x: Array, y: Optional[Array] = None):
    rng_loss, rng_drop, rng_label = jax.random.split(rng, 3)
    if num_classes > 0 and y is not None and class_dropout > 0 and train:
      drop = jax.random.bernoulli(rng_label, class_dropout, y.shape)
      y = jnp.where(drop, num_classes, y)
    base = get_score_fn(sde, model, {"params": params}, continuous=continuous, train=train,
                        rng=rng_drop if train else None)
    score_fn = lambda xx, tt: base(xx, tt, y if num_classes > 0 else None)
    if continuous:
      return losses.dsm_loss(rng_loss, sde, score_fn, x, eps=float(t_cfg.eps),
                             reduce_mean=bool(t_cfg.reduce_mean),
                             likelihood_weighting=bool(t_cfg.likelihood_weighting),
                             importance_weighting=bool(t_cfg.get("importance_weighting", False)))
    if isinstance(sde, sde_lib.VESDE):
      return losses.smld_loss(rng_loss, sde, score_fn, x, reduce_mean=bool(t_cfg.reduce_mean))
    return losses.ddpm_loss(rng_loss, sde, score_fn, x, reduce_mean=bool(t_cfg.reduce_mean))

  return loss_fn


SamplerFn = Callable[[Array, Callable, Tuple[int, ...]], Tuple[Array, Array]]


# sampling.method -> (function in score_jax.fast_samplers, config.sampling keys it takes).
FAST_SAMPLERS: Mapping[str, Tuple[str, Tuple[str, ...]]] = {
    "ddim": ("ddim_sample", ("eta",)),
    "heun": ("heun_sample", ("s_churn",)),
    "dpm_solver": ("dpm_solver_pp_sample", ("order",)),
}


def get_sampler(config: ml_collections.ConfigDict, sde: sde_lib.SDE) -> SamplerFn:
  """sampler(rng, score_fn, shape, **extra) -> (x, nfe) for config.sampling.method.

  `extra` goes to the sampler function as is: z (a start state), and
  constraint (controllable.py; pc and the fast samplers, not ode).

  'pc' and 'ode' are the paper's samplers; 'ddim', 'heun' (EDM) and
  'dpm_solver' (DPM-Solver++ multistep) take sampling.num_steps score
  evaluations (0: the sampler's default) on sampling.schedule ('' = default).
  """
  from score_jax import fast_samplers, sampling  # leaves of the library; imported on use

  s = config.sampling
  method = str(s.method).lower()
  if method == "pc":
    return lambda rng, score_fn, shape, **extra: sampling.pc_sample(
        rng, sde, score_fn, shape, predictor=s.predictor, corrector=s.corrector, snr=float(s.snr),
        n_steps=int(s.n_steps_each), probability_flow=bool(s.probability_flow),
        denoise=bool(s.noise_removal), eps=float(s.eps), **extra)
  if method == "ode":
    return lambda rng, score_fn, shape, **extra: sampling.ode_sample(
        rng, sde, score_fn, shape, rtol=float(s.rtol), atol=float(s.atol),
        denoise=bool(s.noise_removal), eps=float(s.eps), **extra)
  if method in FAST_SAMPLERS:
    fn_name, options = FAST_SAMPLERS[method]
    kwargs = {"eps": float(s.eps), "denoise": bool(s.noise_removal)}
    if int(s.num_steps) > 0:
      kwargs["num_steps"] = int(s.num_steps)
    if str(s.get("schedule", "")):
      kwargs["schedule"] = str(s.schedule)
    for key in options:
      kwargs[key] = s[key]
    fn = getattr(fast_samplers, fn_name)
    return lambda rng, score_fn, shape, **extra: fn(rng, sde, score_fn, shape, **kwargs, **extra)
  raise ValueError(f"Unknown sampling.method {s.method!r}; choose from "
                   f"{sorted(['pc', 'ode'] + list(FAST_SAMPLERS))}.")


def data_shape(config: ml_collections.ConfigDict, batch: int) -> Tuple[int, ...]:
  """Shape of a batch of data: [B, D] for toy data, else [B, H, W, C]."""
  if str(config.data.dataset).lower() == "toy":
    return (batch, 2)
  return (batch, int(config.data.image_size), int(config.data.image_size),
          int(config.data.num_channels))


def check_config(config: ml_collections.ConfigDict, num_devices: int, process_count: int) -> None:
  """Fails early, before anything compiles, on values that cannot work."""
  b = int(config.training.batch_size)
  if b < 1:
    raise ValueError(f"training.batch_size must be >= 1, got {b}.")
  if b % num_devices:
    raise ValueError(f"training.batch_size = {b} does not divide across the {num_devices} devices; "
                     f"use a multiple of {num_devices} (e.g. --config.training.batch_size="
                     f"{math.ceil(b / num_devices) * num_devices}).")
  if b % process_count:
    raise ValueError(f"training.batch_size = {b} does not divide across {process_count} processes.")
  m = int(config.training.get("microbatches", 1))
  if m < 1 or b % (m * num_devices):
    raise ValueError(f"training.microbatches = {m} must be >= 1 and split training.batch_size = {b} "
                     f"into equal micro-batches that divide across the {num_devices} devices "
                     f"(batch_size a multiple of microbatches x devices = {max(m, 1) * num_devices}).")
  for key in ("n_iters", "snapshot_freq", "snapshot_freq_for_preemption", "log_freq", "eval_freq"):
    if int(config.training[key]) < 1:
      raise ValueError(f"training.{key} must be >= 1, got {config.training[key]}.")
  if not 0.0 <= float(config.model.ema_rate) < 1.0:
    raise ValueError(f"model.ema_rate must lie in [0, 1), got {config.model.ema_rate}.")
  get_sde(config)
