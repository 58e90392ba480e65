"""Settings -> the objects a run plan is made of, one builder each.

`get_sde`, `get_model`, `get_optimizer`, `get_lr_schedule`, `get_ema_decay`,
`get_augment`, `get_loss_fn` and `get_sampler` turn settings into one object
each; `score_jax.run.plan.make_plan` calls them once, at a mode's entry.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from score_jax import consistency, losses, meanflow, models, scm
from score_jax import sde as sde_lib
from score_jax.data import augment
from score_jax.errors import ConfigError
from score_jax.models.edm2 import forced_weight_normalization
from score_jax.models.logvar import WithLogvar
from score_jax.run import sampler_specs
from score_jax.run.settings import Settings

Array = jax.Array
LossFn = Callable[..., Tuple[Array, losses.LossAux]]


class LossContext(NamedTuple):
  """What a loss may need beyond the batch: the training step (curricula and warm-ups;
  evaluation passes the final one) and the teacher's EMA parameters (objectives that learn
  from a trained run; None otherwise)."""
  step: Any  # int32 [] completed optimizer steps
  teacher: Any = None
SamplerFn = Callable[..., Tuple[Array, Array]]

__all__ = ["get_sde", "get_model", "get_optimizer", "get_lr_schedule", "get_ema_decay",
           "get_augment", "get_time_distribution", "parameterization_kwargs", "get_loss_fn",
           "get_sampler", "LossFn", "LossContext", "SamplerFn"]


def get_sde(s: Settings) -> sde_lib.SDE:
  """The SDE named by training.sde, with the model section's schedule."""
  m, name = s.model, s.training.sde.lower()
  if name == "vpsde":
    return sde_lib.VPSDE(m.beta_min, m.beta_max, m.num_scales)
  if name == "subvpsde":
    return sde_lib.subVPSDE(m.beta_min, m.beta_max, m.num_scales)
  if name == "rectified_flow":
    return sde_lib.RectifiedFlow(N=m.num_scales)
  if name == "trigflow":
    return sde_lib.TrigFlow(m.sigma_data, N=m.num_scales)
  return sde_lib.VESDE(m.sigma_min, m.sigma_max, m.num_scales)


def get_model(s: Settings) -> nn.Module:
  """The network of model.name from the model section: its architecture keys (settings
  refuses keys of another network), and the generic keys and data.centered where its
  constructor takes them (dropout, embedding_type, num_classes, remat)."""
  takes = set(models.network_arguments(s.model.name))
  generic = {**{k: getattr(s.model, k) for k in ("dropout", "embedding_type", "num_classes",
                                                  "remat")}, "centered": s.data.centered}
  net = models.build_model(s.model.name, dtype=s.model.dtype, **dict(s.model.arch),
                           **{k: v for k, v in generic.items() if k in takes})
  if s.training.objective in ("sct", "scd") and s.training.scm_adaptive_weighting:
    return WithLogvar(net)  # the sCM loss weight's head beside the network
  return net


def get_lr_schedule(s: Settings) -> optax.Schedule:
  """lr * min(step / warmup, 1), the reference's linear warmup; or EDM's ramp-up in
  images, lr * min(nimg / (1000 lr_rampup_kimg), 1) with nimg = step * batch_size the
  images seen before the step. optim.lr_decay = 'cosine' multiplies either by
  (1 + cos(pi min(step / training.n_iters, 1))) / 2, 'inverse_sqrt' by
  1 / sqrt(max(step / optim.ref_batches, 1)): EDM2's `learning_rate_schedule` (its
  cur_nimg / (ref_batches batch_size) is step / ref_batches)."""
  o, batch = s.optim, s.training.batch_size
  if o.lr_rampup_kimg > 0:
    ramp_images = 1000.0 * o.lr_rampup_kimg
    ramp = lambda count: o.lr * jnp.minimum(
        jnp.asarray(count, jnp.float32) * batch / ramp_images, 1.0)
  elif o.warmup > 0:
    ramp = optax.linear_schedule(0.0, o.lr, o.warmup)
  else:
    ramp = optax.constant_schedule(o.lr)
  if o.lr_decay == "none":
    return ramp
  if o.lr_decay == "inverse_sqrt":
    ref = float(o.ref_batches)
    return lambda count: ramp(count) * jax.lax.rsqrt(
        jnp.maximum(jnp.asarray(count, jnp.float32) / ref, 1.0))
  cosine = optax.cosine_decay_schedule(1.0, max(s.training.n_iters, 1))
  return lambda count: ramp(count) * cosine(count)


def get_ema_decay(s: Settings) -> Callable[[Array], Any]:
  """decay(step) of the parameters' EMA, e <- decay e + (1 - decay) p, at the update of
  step `step` (0-based): model.ema_rate, or with model.ema_halflife_kimg > 0 EDM's
  0.5 ** (batch / max(h, 1e-8)), h = min(1000 halflife_kimg, ema_rampup_ratio * nimg)
  (ratio 0: no ramp-up), nimg = step * batch_size the images seen before the step.
  With model.ema_warmup either is capped by (1 + n) / (10 + n), n = step + 1 the number
  of updates so far, the PyTorch reference's ExponentialMovingAverage(use_num_updates=True):
  the EMA of a short run then forgets its random initialization."""
  m, batch = s.model, s.training.batch_size

  def decay(step):
    if m.ema_halflife_kimg <= 0:
      rate = m.ema_rate
    else:
      h = 1000.0 * m.ema_halflife_kimg
      if m.ema_rampup_ratio > 0:
        h = jnp.minimum(h, m.ema_rampup_ratio * step.astype(jnp.float32) * batch)
      rate = 0.5 ** (batch / jnp.maximum(h, 1e-8))
    if not m.ema_warmup:
      return rate
    n = step.astype(jnp.float32) + 1.0
    return jnp.minimum(rate, (1.0 + n) / (10.0 + n))

  return decay


def get_optimizer(s: Settings) -> optax.GradientTransformation:
  """Adam (or AdamW with weight decay) with warmup and global-norm clipping; for a network
  with magnitude-preserving weights (`forced_weight_norm`, EDM2's) the update ends with
  their projection back onto the sphere (models.edm2.forced_weight_normalization)."""
  o = s.optim
  schedule = get_lr_schedule(s)
  kw = dict(b1=o.beta1, b2=o.beta2, eps=o.eps)
  if o.weight_decay > 0:
    opt = optax.adamw(schedule, weight_decay=o.weight_decay, **kw)
  else:
    opt = optax.adam(schedule, **kw)
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  chain.append(opt)
  if getattr(models.MODELS[s.model.name.lower()], "forced_weight_norm", False):
    chain.append(forced_weight_normalization())
  return optax.chain(*chain)


def parameterization_kwargs(s: Settings) -> Dict[str, Any]:
  """models.get_score_fn's parameterization arguments from the model section."""
  return {"parameterization": s.model.parameterization, "sigma_data": s.model.sigma_data,
          "trigflow_label_scale": s.model.trigflow_label_scale}


def get_time_distribution(s: Settings) -> losses.TimeDistribution:
  """The DSM loss's time distribution of training.time_distribution and its parameters."""
  t = s.training
  loc, scale = {"lognormal_sigma": (t.p_mean, t.p_std),
                "logit_normal": (t.logit_mean, t.logit_std)}.get(t.time_distribution, (None, None))
  return losses.TimeDistribution(t.time_distribution, loc, scale)


def get_augment(s: Settings) -> Optional[augment.Augment]:
  """EDM's augmentation of the data.augment_* keys, or None when it is off."""
  aug = augment.Augment(**s.data.augment_kwargs())
  return aug if aug.enabled else None


def get_loss_fn(s: Settings, sde: sde_lib.SDE, model: nn.Module, *, train: bool,
                teacher: Any = None) -> LossFn:
  """loss_fn(params, rng, x [B, ...], y [B] or None, augment_labels=None, context=None)
  -> (loss, LossAux).

  augment_labels [B, L]: the labels of the augmentation applied to x
  (`get_augment`; the train step augments), the network's conditioning; None:
  zero labels. context: a `LossContext` (the step and the teacher's parameters), for the
  objectives that use them; None: the final step, no teacher. teacher: the teacher's plan
  (score_jax.run.plan.Teacher.plan) where training.teacher_workdir names one.

  Continuous training uses denoising score matching with the configured
  weighting; discrete training the loss of the SDE's chain (DDPM for VP, SMLD
  for VE). With model.num_classes > 0 and training.class_dropout > 0, labels
  are replaced by the null label (num_classes) at that rate, which trains the
  unconditional model used by classifier-free guidance. Labels are ignored by
  unconditional models.
  """
  t = s.training
  if not t.continuous and sde.chain is None:
    raise ConfigError(f"Discrete training (training.continuous=False) needs an SDE with a "
                      f"discrete chain: vpsde (DDPM) or vesde (SMLD), not {t.sde!r}.")
  if t.objective == "meanflow":
    return _meanflow_loss_fn(s, model, train=train)
  if t.objective == "edm2":
    return _edm2_loss_fn(s, sde, model, train=train)
  if t.objective in ("sct", "scd"):
    return _continuous_consistency_loss_fn(s, sde, model, train=train, teacher=teacher)
  if t.objective in ("ict", "ect"):
    return _discrete_consistency_loss_fn(s, sde, model, train=train)
  time_distribution = get_time_distribution(s)

  def loss_fn(params, rng: Array, x: Array, y: Optional[Array] = None,
              augment_labels: Optional[Array] = None, context: Optional[LossContext] = None):
    del context  # the denoising losses use neither the step nor a teacher
    rng_loss, rng_drop, rng_label = jax.random.split(rng, 3)
    y = _training_labels(s, y, rng_label, train)
    base = models.get_score_fn(sde, model, {"params": params}, continuous=t.continuous,
                               train=train, rng=rng_drop if train else None,
                               augment_labels=augment_labels, **parameterization_kwargs(s))
    score_fn = lambda xx, tt: base(xx, tt, y)
    if t.continuous:
      return losses.dsm_loss(rng_loss, sde, score_fn, x, eps=t.eps, reduce_mean=t.reduce_mean,
                             likelihood_weighting=t.likelihood_weighting,
                             importance_weighting=t.importance_weighting,
                             time_distribution=time_distribution, weighting=t.weighting,
                             sigma_data=s.model.sigma_data)
    discrete = losses.smld_loss if sde.chain == "smld" else losses.ddpm_loss
    return discrete(rng_loss, sde, score_fn, x, reduce_mean=t.reduce_mean)

  return loss_fn


def _training_labels(s: Settings, y: Optional[Array], rng: Array, train: bool) -> Optional[Array]:
  """The class labels a loss conditions on: None for unconditional models; in training, the
  null label (num_classes) at the rate training.class_dropout."""
  num_classes, rate = s.model.num_classes, s.training.class_dropout
  y = y if num_classes > 0 else None
  if y is not None and rate > 0 and train:
    y = jnp.where(jax.random.bernoulli(rng, rate, y.shape), num_classes, y)
  return y


def _edm2_loss_fn(s: Settings, sde: sde_lib.SDE, model: nn.Module, *, train: bool) -> LossFn:
  """get_loss_fn's loss for training.objective = 'edm2' (losses.edm2_loss): ln sigma ~
  N(p_mean, p_std^2), as EDM2 not truncated to the SDE's range, EDM's denoiser and the
  network's uncertainty head u(sigma) (`EDM2UNet.log_variance`). LossAux.t: the VE times of
  the sigmas."""
  t, sd = s.training, s.model.sigma_data

  def loss_fn(params, rng: Array, x: Array, y: Optional[Array] = None,
              augment_labels: Optional[Array] = None, context: Optional[LossContext] = None):
    del context
    if augment_labels is not None:
      raise ConfigError("training.objective = 'edm2' takes no augmentation labels (EDM2 "
                        "trains without augmentation); set data.augment_p = 0.")
    rng_s, rng_z, rng_drop, rng_label = jax.random.split(rng, 4)
    y = _training_labels(s, y, rng_label, train)
    variables = {"params": params}
    denoise = models.get_edm_denoiser_fn(model, variables, sigma_data=sd, train=train,
                                         rng=rng_drop if train else None)
    logvar = lambda sigma: model.apply(variables, 0.25 * jnp.log(sigma),
                                       method=type(model).log_variance)
    sigma = jnp.exp(t.p_mean + t.p_std * jax.random.normal(rng_s, (x.shape[0],)))
    z = jax.random.normal(rng_z, x.shape, x.dtype)
    loss, per_example = losses.edm2_loss(lambda xx, ss: denoise(xx, ss, y), logvar, x, sigma, z,
                                         sigma_data=sd)
    return loss, losses.LossAux(per_example, sde.t_from_log_snr(-jnp.log(sigma)))

  return loss_fn


def _meanflow_loss_fn(s: Settings, model: nn.Module, *, train: bool) -> LossFn:
  """get_loss_fn's loss for training.objective = 'meanflow' (score_jax.meanflow.loss)."""
  t = s.training

  def loss_fn(params, rng: Array, x: Array, y: Optional[Array] = None,
              augment_labels: Optional[Array] = None, context: Optional[LossContext] = None):
    del context
    rng_t, rng_e, rng_drop, rng_label = jax.random.split(rng, 4)
    y = _training_labels(s, y, rng_label, train)
    u_fn = meanflow.network_u_fn(model, {"params": params}, y, train=train,
                                 rngs={"dropout": rng_drop} if train else None,
                                 augment_labels=augment_labels)
    r, tt = meanflow.sample_times(rng_t, x.shape[0], ratio=t.meanflow_ratio, p_mean=t.logit_mean,
                                  p_std=t.logit_std)
    e = jax.random.normal(rng_e, x.shape, x.dtype)
    terms = meanflow.loss(u_fn, x, e, r, tt, power=t.meanflow_power, c=t.meanflow_c,
                         model_tangent=t.meanflow_model_tangent)
    return jnp.mean(terms.loss), losses.LossAux(terms.loss, tt)

  return loss_fn


def _continuous_consistency_loss_fn(s: Settings, sde: sde_lib.SDE, model: nn.Module, *,
                                    train: bool, teacher: Any = None) -> LossFn:
  """get_loss_fn's loss for training.objective = 'sct' / 'scd' (score_jax.scm.loss): the
  step sets the tangent warm-up, and sCD's velocity is the teacher's (its own SDE, network
  and parameterization, mapped onto TrigFlow time by sde.trigflow_velocity_fn; no dropout,
  its own precision) at the student's x_t."""
  t, sd = s.training, s.model.sigma_data
  label_scale = s.model.trigflow_label_scale
  distill = t.objective == "scd"
  t_min, t_max = 0.0, float(sde.T)
  if distill and teacher is None:
    # Sampling and loading a distilled run need no teacher; only its loss does.
    def no_teacher(*args, **kwargs):
      raise ConfigError("training.objective = 'scd' distills a teacher; set "
                        "training.teacher_workdir to a run that exists.")
    return no_teacher
  if distill:
    if t.init_from_teacher and not (isinstance(teacher.sde, sde_lib.TrigFlow)
                                    and teacher.score.parameterization == "trigflow"
                                    and float(teacher.sde.sigma_data) == float(sd)):
      raise ConfigError("training.init_from_teacher with 'scd' needs a TrigFlow teacher "
                        "(model.parameterization 'trigflow', the same model.sigma_data): "
                        "another family's network predicts another quantity; set "
                        "training.init_from_teacher = False.")
    # The student's times that the teacher's own range [0, T] covers (VE: sigma_min..max).
    lo, hi = sde_lib.trigflow_time(teacher.sde, jnp.array([0.0, teacher.sde.T]), sd)[0]
    t_min, t_max = float(lo), min(float(hi), t_max)
  weighted = isinstance(model, WithLogvar)

  def loss_fn(params, rng: Array, x: Array, y: Optional[Array] = None,
              augment_labels: Optional[Array] = None, context: Optional[LossContext] = None):
    rng_t, rng_z, rng_drop, rng_label = jax.random.split(rng, 4)
    y = _training_labels(s, y, rng_label, train)
    extra = {} if augment_labels is None else {"augment_labels": augment_labels}
    # One dropout key for F_theta and F^- (the same masks: the loss's value at theta^- =
    # theta is then ||g||^2).
    rngs = {"dropout": rng_drop} if train else None

    def F_fn(u: Array, tt: Array) -> Array:
      return model.apply({"params": params}, u, tt * label_scale, y, train=train, rngs=rngs,
                         **extra)

    step = t.n_iters if context is None else context.step
    tt = scm.sample_times(rng_t, x.shape[0], p_mean=t.scm_p_mean, p_std=t.scm_p_std,
                          sigma_data=sd, t_min=t_min, t_max=t_max)
    z = sd * jax.random.normal(rng_z, x.shape, x.dtype)
    v = None
    if distill:
      if context is None or context.teacher is None:
        raise ConfigError("The 'scd' loss needs the teacher's parameters (its LossContext), "
                          "which the training loop passes; set eval.enable_loss = False for "
                          "--mode=eval.")
      base = models.get_score_fn(teacher.sde, teacher.model, {"params": context.teacher},
                                 train=False, **teacher.score.kwargs())
      velocity = sde_lib.trigflow_velocity_fn(teacher.sde, base, sde)
      x_t = (jnp.cos(tt).reshape((-1,) + (1,) * (x.ndim - 1)) * x
             + jnp.sin(tt).reshape((-1,) + (1,) * (x.ndim - 1)) * z)
      v = jax.lax.stop_gradient(velocity(x_t, tt, y if teacher.score.num_classes else None))
    logvar = None
    if weighted:
      logvar = model.apply({"params": params}, tt, method=WithLogvar.log_variance)
    terms = scm.loss(F_fn, x, z, tt, sigma_data=sd, v=v,
                     r=scm.tangent_warmup(step, t.scm_warmup_steps), c=t.scm_tangent_c,
                     logvar=logvar)
    return jnp.mean(terms.loss), losses.LossAux(terms.loss, tt)

  return loss_fn


def _discrete_consistency_loss_fn(s: Settings, sde: sde_lib.SDE, model: nn.Module, *,
                                  train: bool) -> LossFn:
  """get_loss_fn's loss for training.objective 'ict' and 'ect' (score_jax.consistency).

  iCT draws the pair (sigma_i, sigma_{i+1}) of the curriculum's grid at the context's step
  (N(k) with K = training.n_iters) from the discretized lognormal; ECT draws ln t ~
  N(p_mean, p_std^2) and r(t) at that step. The target is the same network with
  stop-gradient parameters and the same dropout key.
  """
  t, m = s.training, s.model
  metric, weight = t.ct_metric, t.ct_weighting
  total = t.n_iters

  def loss_fn(params, rng: Array, x: Array, y: Optional[Array] = None,
              augment_labels: Optional[Array] = None, context: Optional[LossContext] = None):
    step = jnp.asarray(total if context is None else context.step, jnp.int32)
    rng_i, rng_z, rng_drop, rng_label = jax.random.split(rng, 4)
    y = _training_labels(s, y, rng_label, train)
    b = x.shape[0]
    kw = dict(train=train, rng=rng_drop if train else None, sigma_data=m.sigma_data,
              augment_labels=augment_labels)
    f_on = models.get_consistency_fn(sde, model, {"params": params}, **kw)
    f_tg = models.get_consistency_fn(sde, model, {"params": jax.lax.stop_gradient(params)}, **kw)
    if t.objective == "ict":
      n = consistency.ict_num_scales(step, total, t.ct_s0, t.ct_s1)
      logits = consistency.ict_index_logits(n, t.ct_s1 + 1, m.sigma_min, m.sigma_max, t.ct_rho,
                                            t.p_mean, t.p_std)
      i = jax.random.categorical(rng_i, logits, shape=(b,))
      lo = consistency.karras_sigmas(i, n, m.sigma_min, m.sigma_max, t.ct_rho)
      hi = consistency.karras_sigmas(i + 1, n, m.sigma_min, m.sigma_max, t.ct_rho)
    else:
      hi = jnp.exp(t.p_mean + t.p_std * jax.random.normal(rng_i, (b,)))
      lo = consistency.ect_r(hi, step, q=t.ct_ect_q, double=t.ct_ect_double, k=t.ct_ect_k,
                             b=t.ct_ect_b)
    z = jax.random.normal(rng_z, x.shape, x.dtype)
    c = consistency.ict_huber_c(math.prod(x.shape[1:]), t.ct_huber_c)
    terms = consistency.ct_loss(lambda xx, ss: f_on(xx, ss, y), lambda xx, ss: f_tg(xx, ss, y),
                                x, z, lo, hi, metric=metric, c=c, weight=weight)
    return jnp.mean(terms.loss), losses.LossAux(terms.loss, sde.t_from_log_snr(-jnp.log(hi)))

  return loss_fn


def get_sampler(s: Settings, sde: sde_lib.SDE, timesteps: Optional[Any] = None) -> SamplerFn:
  """sampler(rng, score_fn, shape, **extra) -> (x, nfe) for sampling.method.

  The sampler and its arguments come from its declaration in
  `sampler_specs.SAMPLERS`: the sampling.* settings it takes, each passed as
  its argument. `extra` goes to the sampler function as is: z (a start
  state), and constraint (controllable.py; pc and the fast samplers, not
  ode). timesteps: a fixed time grid for the samplers that take one (unipc),
  from `score_jax.samplers.time_grids` for schedule 'optimized' (which without
  one is the logSNR grid); it replaces sampling.num_steps, schedule and eps,
  which must agree with it or be unset (else a ConfigError).
  """
  spec = sampler_specs.SAMPLERS[s.sampling.method.lower()]
  fn = spec.function
  kwargs = sampler_specs.arguments(s.sampling, timesteps)
  kwargs.update({k: getattr(s.model, k) for k in spec.model_args})
  return lambda rng, score_fn, shape, **extra: fn(rng, sde, score_fn, shape, **kwargs, **extra)
