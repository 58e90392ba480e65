"""The builders a run plan is made of, and the jitted, sharded programs over a plan.

`get_sde`, `get_model`, `get_optimizer`, `get_loss_fn`, `get_sampler`, ... turn
settings into one object each; `score_jax.run.plan.make_plan` calls them once
at a mode's entry. `Programs(plan)` then hands out the jitted computations,
each built once and cached (they read the plan, never settings):

- `score_fn(params, y, weight)`: the network's score with class labels and
  classifier-free guidance (the one place labels and guidance are decided);
- `sampler(batch, weight)`, `controlled_sampler(task, batch, weight)`,
  `ode(batch, weight, denoise)` (encode / decode along the probability flow);
- `loss()` (per-example training objective), `likelihood()` (bits/dim or nats),
  `inception(resize, precision)` (FID features).

Train, eval, sample, the benchmarks, the notebook and the tests all build
their programs here. Batches are sharded over a 1-D mesh of all devices
(parameters replicated); sharding a program's output along the batch makes
XLA partition the whole sampling loop over the devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, Dict, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from score_jax import losses, models
from score_jax.data import augment
from score_jax.run import distributed, sampler_specs
from score_jax import sde as sde_lib
from score_jax.errors import ConfigError
from score_jax.run.settings import Settings

if TYPE_CHECKING:
  from score_jax.run.plan import Plan

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]
# (params, labels [B] or None) -> score_fn(x [B, ...], t [B]) -> [B, ...]
ScoreFactory = Callable[[Any, Optional[Array]], ScoreFn]
LossFn = Callable[..., Tuple[Array, losses.LossAux]]
SamplerFn = Callable[..., Tuple[Array, Array]]

__all__ = ["Setup", "Programs", "make_setup", "get_sde", "get_model", "get_optimizer",
           "get_lr_schedule", "get_loss_fn", "get_sampler", "get_dataset", "network_score_factory",
           "parameterization_kwargs", "get_time_distribution", "get_ema_decay", "get_augment",
           "Guide", "GuidedParams"]


def get_sde(s: Settings) -> sde_lib.SDE:
  """The SDE named by training.sde, with the model section's schedule."""
  m, name = s.model, s.training.sde.lower()
  if name == "vpsde":
    return sde_lib.VPSDE(m.beta_min, m.beta_max, m.num_scales)
  if name == "subvpsde":
    return sde_lib.subVPSDE(m.beta_min, m.beta_max, m.num_scales)
  if name == "rectified_flow":
    return sde_lib.RectifiedFlow(N=m.num_scales)
  return sde_lib.VESDE(m.sigma_min, m.sigma_max, m.num_scales)


def get_model(s: Settings) -> nn.Module:
  """The network of model.name from the model section: its architecture keys (settings
  refuses keys of another network), and the generic keys and data.centered where its
  constructor takes them (dropout, embedding_type, num_classes, remat)."""
  takes = set(models.network_arguments(s.model.name))
  generic = {**{k: getattr(s.model, k) for k in ("dropout", "embedding_type", "num_classes",
                                                  "remat")}, "centered": s.data.centered}
  return models.build_model(s.model.name, dtype=s.model.dtype, **dict(s.model.arch),
                            **{k: v for k, v in generic.items() if k in takes})


def get_lr_schedule(s: Settings) -> optax.Schedule:
  """lr * min(step / warmup, 1), the reference's linear warmup; or EDM's ramp-up in
  images, lr * min(nimg / (1000 lr_rampup_kimg), 1) with nimg = step * batch_size the
  images seen before the step."""
  if s.optim.lr_rampup_kimg > 0:
    lr, batch, ramp = s.optim.lr, s.training.batch_size, 1000.0 * s.optim.lr_rampup_kimg
    return lambda count: lr * jnp.minimum(jnp.asarray(count, jnp.float32) * batch / ramp, 1.0)
  if s.optim.warmup > 0:
    return optax.linear_schedule(0.0, s.optim.lr, s.optim.warmup)
  return optax.constant_schedule(s.optim.lr)


def get_ema_decay(s: Settings) -> Callable[[Array], Any]:
  """decay(step) of the parameters' EMA, e <- decay e + (1 - decay) p, at the update of
  step `step` (0-based): model.ema_rate, or with model.ema_halflife_kimg > 0 EDM's
  0.5 ** (batch / max(h, 1e-8)), h = min(1000 halflife_kimg, ema_rampup_ratio * nimg)
  (ratio 0: no ramp-up), nimg = step * batch_size the images seen before the step."""
  m, batch = s.model, s.training.batch_size
  if m.ema_halflife_kimg <= 0:
    return lambda step: m.ema_rate
  halflife = 1000.0 * m.ema_halflife_kimg

  def decay(step):
    h = halflife
    if m.ema_rampup_ratio > 0:
      h = jnp.minimum(h, m.ema_rampup_ratio * step.astype(jnp.float32) * batch)
    return 0.5 ** (batch / jnp.maximum(h, 1e-8))

  return decay


def get_optimizer(s: Settings) -> optax.GradientTransformation:
  """Adam (or AdamW with weight decay) with warmup and global-norm clipping."""
  o = s.optim
  schedule = get_lr_schedule(s)
  kw = dict(b1=o.beta1, b2=0.999, eps=o.eps)
  if o.weight_decay > 0:
    opt = optax.adamw(schedule, weight_decay=o.weight_decay, **kw)
  else:
    opt = optax.adam(schedule, **kw)
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  return optax.chain(*chain, opt)


def parameterization_kwargs(s: Settings) -> Dict[str, Any]:
  """models.get_score_fn's parameterization arguments from the model section."""
  return {"parameterization": s.model.parameterization, "sigma_data": s.model.sigma_data}


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


def get_loss_fn(s: Settings, sde: sde_lib.SDE, model: nn.Module, *, train: bool) -> LossFn:
  """loss_fn(params, rng, x [B, ...], y [B] or None, augment_labels=None) -> (loss, LossAux).

  augment_labels [B, L]: the labels of the augmentation applied to x
  (`get_augment`; the train step augments), the network's conditioning; None:
  zero labels.

  Continuous training uses denoising score matching with the configured
  weighting; discrete training the loss of the SDE's chain (DDPM for VP, SMLD
  for VE). With model.num_classes > 0 and training.class_dropout > 0, labels
  are replaced by the null label (num_classes) at that rate, which trains the
  unconditional model used by classifier-free guidance. Labels are ignored by
  unconditional models.
  """
  t = s.training
  num_classes = s.model.num_classes
  if not t.continuous and sde.chain is None:
    raise ConfigError(f"Discrete training (training.continuous=False) needs an SDE with a "
                      f"discrete chain: vpsde (DDPM) or vesde (SMLD), not {t.sde!r}.")
  time_distribution = get_time_distribution(s)

  def loss_fn(params, rng: Array, x: Array, y: Optional[Array] = None,
              augment_labels: Optional[Array] = None):
    rng_loss, rng_drop, rng_label = jax.random.split(rng, 3)
    y = y if num_classes > 0 else None
    if y is not None and t.class_dropout > 0 and train:
      drop = jax.random.bernoulli(rng_label, t.class_dropout, y.shape)
      y = jnp.where(drop, num_classes, y)
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
  fn = sampler_specs.SAMPLERS[s.sampling.method.lower()].function
  kwargs = sampler_specs.arguments(s.sampling, timesteps)
  return lambda rng, score_fn, shape, **extra: fn(rng, sde, score_fn, shape, **kwargs, **extra)


def make_setup(s: Settings, need_data: bool = True):
  """The run plan of settings (`score_jax.run.plan.make_plan`; the name of earlier versions)."""
  from score_jax.run import plan  # pylint: disable=g-import-not-at-top  # plan imports programs

  return plan.make_plan(s, need_data)


def Setup(s: Settings, sde: sde_lib.SDE, model: Optional[nn.Module],  # pylint: disable=invalid-name
          tx: Optional[optax.GradientTransformation], mesh: Optional[jax.sharding.Mesh]):
  """The plan of settings with these objects and no checks (`score_jax.run.plan.assemble`;
  the constructor of earlier versions)."""
  from score_jax.run import plan  # pylint: disable=g-import-not-at-top

  return plan.assemble(s, sde, model, tx, mesh)


def network_score_factory(plan: "Plan") -> ScoreFactory:
  """make(params, y) -> score_fn(x, t) of the plan's network (labels y [B] or None)."""
  kwargs = plan.score.kwargs()

  def make(params: Any, y: Optional[Array]) -> ScoreFn:
    base = models.get_score_fn(plan.sde, plan.model, {"params": params}, **kwargs)
    return lambda x, t: base(x, t, y)

  return make


class Guide(NamedTuple):
  """An autoguidance guide: a weaker model's score factory, parameters and whether
  it takes labels (`runs.load_guide` builds it from sample.guide_workdir)."""
  factory: ScoreFactory
  params: Any
  conditional: bool


class GuidedParams(NamedTuple):
  """The parameters of the main model and of its guide: `Programs.score_fn` then
  autoguides (a pytree, so both travel as arguments of the jitted programs)."""
  main: Any
  guide: Any


class Programs:
  """The jitted programs of one run, each built on first use and kept.

  factory: make(params, y) -> score_fn(x, t); default: the plan's network
  (`network_score_factory`). Another factory (a closed-form score in tests)
  runs through the same programs; the loss always uses the network.
  guide: an autoguidance guide; programs given `guided(params)` sample with it.
  """

  def __init__(self, plan: "Plan", factory: Optional[ScoreFactory] = None,
               guide: Optional[Guide] = None):
    self.plan = plan
    self.setup = plan  # the name of earlier versions
    self.factory = factory or network_score_factory(plan)
    self.guide = guide
    self._cache: Dict[Tuple, Any] = {}

  def guided(self, params: Any) -> Any:
    """params with the guide's (GuidedParams) when there is a guide, else params."""
    return params if self.guide is None else GuidedParams(params, self.guide.params)

  @property
  def rep(self) -> NamedSharding:
    return self.plan.replicated

  @property
  def bat(self) -> NamedSharding:
    return self.plan.batch_sharding

  def _cached(self, key: Tuple, build: Callable[[], Any]) -> Any:
    if key not in self._cache:
      self._cache[key] = build()
    return self._cache[key]

  def score_fn(self, params: Any, y: Optional[Array] = None, weight: float = 0.0) -> ScoreFn:
    """The score to sample with: conditional on y for class-conditional models, with
    classifier-free guidance (1 + w) s(x, t, y) - w s(x, t, None) when w != 0.

    Unconditional models ignore y; w = 0 is the plain score (no second
    evaluation); y = None is the null label (the network's label num_classes).
    sampling.guidance_interval (lo, hi) other than (0, 0) limits guidance to
    noise levels sigma^ = std / alpha in [lo, hi]. With GuidedParams, w is the
    autoguidance weight instead: (1 + w) s_main - w s_guide (unconditional
    models too; a conditional guide gets the same labels).
    """
    if isinstance(params, GuidedParams):
      from score_jax.samplers import controllable  # pylint: disable=g-import-not-at-top
      main = self.score_fn(params.main, y)
      if weight == 0.0 or self.guide is None:
        return main
      labels = y if self.guide.conditional and self.plan.score.num_classes > 0 else None
      return controllable.autoguidance(
          main, self.guide.factory(params.guide, labels), weight, sde=self.plan.sde,
          interval=self.plan.sampling.guidance_interval)
    if self.plan.score.num_classes == 0:
      return self.factory(params, None)
    if weight == 0.0:
      return self.factory(params, y)
    from score_jax.samplers import controllable  # pylint: disable=g-import-not-at-top
    conditional = lambda x, t, yy: self.factory(params, yy)(x, t)
    interval = self.plan.sampling.guidance_interval
    if interval is None:
      return controllable.classifier_free_guidance(conditional, y, weight)
    return controllable.classifier_free_guidance_interval(conditional, y, weight, self.plan.sde,
                                                          interval)

  def _batch_out(self, batch: int) -> NamedSharding:
    """Batch-sharded when the batch splits over the devices, else replicated."""
    return self.bat if batch % jax.device_count() == 0 else self.rep

  def put(self, a: Any) -> Array:
    """A global batch (numpy, alike on every process) as the programs' input of its size."""
    a = np.asarray(a)
    sharding = self._batch_out(a.shape[0])
    return distributed.global_array(sharding,
                                    distributed.local_rows(a) if sharding == self.bat else a)

  def sampler(self, batch: int, weight: float = 0.0, timesteps: Optional[Any] = None):
    """(params, rng, y [B]) -> (samples [B, ...], nfe), one jitted call (timesteps: an
    explicit grid for unipc, see `get_sampler`)."""

    def build():
      sampler = (self.plan.sampler if timesteps is None
                 else self.plan.sampler_on_grid(timesteps))
      shape = self.plan.data.shape(batch)

      def run(params, rng, y):
        x, nfe = sampler(rng, self.score_fn(params, y, weight), shape)
        return x, jnp.asarray(nfe, jnp.int32)

      out = self._batch_out(batch)
      return jax.jit(run, in_shardings=(self.rep, self.rep, out), out_shardings=(out, self.rep))

    grid = None if timesteps is None else tuple(np.asarray(timesteps).tolist())
    return self._cached(("sampler", batch, weight, grid), build)

  def controlled_sampler(self, task: str, batch: int, weight: float = 0.0):
    """Jitted (params, rng, y [B], images [B, ...] model space, mask [B, ...]) -> (x, nfe).

    task 'inpaint' keeps the images where mask is 1; 'colorize' keeps their
    gray level (channel mean) and generates the chroma.
    """
    from score_jax.samplers import controllable  # pylint: disable=g-import-not-at-top

    def build():
      sampler, sde = self.plan.sampler, self.plan.sde
      shape = self.plan.data.shape(batch)

      def run(params, rng, y, images, mask):
        if task == "inpaint":
          constraint = controllable.inpainting(sde, images, mask)
        else:
          constraint = controllable.colorization(sde, jnp.mean(images, -1, keepdims=True))
        x, nfe = sampler(rng, self.score_fn(params, y, weight), shape, constraint=constraint)
        return x, jnp.asarray(nfe, jnp.int32)

      b = self._batch_out(batch)
      return jax.jit(run, in_shardings=(self.rep, self.rep, b, b, b), out_shardings=(b, self.rep))

    return self._cached(("controlled", task, batch, weight), build)

  def ode(self, batch: int, weight: float = 0.0, denoise: bool = True):
    """Jitted encode (params, y, x) -> (z, nfe) and decode (params, y, z) -> (x, nfe)."""
    from score_jax import samplers as sampling  # pylint: disable=g-import-not-at-top

    def build():
      sde, tol = self.plan.sde, dict(self.plan.sampling.ode_tolerances)
      shape = self.plan.data.shape(batch)

      def encode(params, y, x):
        return sampling.ode_encode(sde, self.score_fn(params, y, weight), x, **tol)

      def decode(params, y, z):
        return sampling.ode_sample(jax.random.PRNGKey(0), sde, self.score_fn(params, y, weight),
                                   shape, denoise=denoise, z=z, **tol)

      b, r = self._batch_out(batch), self.rep
      return (jax.jit(encode, in_shardings=(r, b, b), out_shardings=(b, r)),
              jax.jit(decode, in_shardings=(r, b, b), out_shardings=(b, r)))

    return self._cached(("ode", batch, weight, denoise), build)

  def loss(self):
    """(params, rng, x [B, ...], y [B]) -> per-example loss [B] of the training objective."""

    def build():
      loss_fn = self.plan.eval_loss

      def per_example(params, rng, x, y):
        return loss_fn(params, rng, x, y)[1].per_example

      return jax.jit(per_example, in_shardings=(self.rep, self.rep, self.bat, self.bat),
                     out_shardings=self.bat)

    return self._cached(("loss",), build)

  def likelihood(self):
    """(params, rng, data [B, ...], y [B]) -> (value [B], nfe).

    Images: data are uint8; likelihood.bits_per_dim dequantizes them
    uniformly, (v + U) / 256, scales them like the training data and returns
    bits/dim of the 8-bit data. 2-D data: the value is -log p(x) / D in nats.
    """
    from score_jax import likelihood  # pylint: disable=g-import-not-at-top

    def build():
      kw, sde, data_spec = self.plan.eval.likelihood_kwargs(), self.plan.sde, self.plan.data

      def run(params, rng, data, y):
        score_fn = self.score_fn(params, y)
        if data_spec.is_images:  # uint8 in, dequantized with rng inside: same key, same noise
          value, _, nfe = likelihood.bits_per_dim(rng, sde, score_fn, data, data_spec.centered,
                                                  **kw)
        else:
          logp, _, nfe = likelihood.log_likelihood(rng, sde, score_fn, data, **kw)
          value = -logp / math.prod(data.shape[1:])
        return value, jnp.asarray(nfe, jnp.int32)

      return jax.jit(run, in_shardings=(self.rep, self.rep, self.bat, self.bat),
                     out_shardings=(self.bat, self.rep))

    return self._cached(("likelihood",), build)

  def inception(self, resize: str, precision: str):
    """(inception params, uint8 images [B, H, W, C]) -> {'pool', 'logits'}, sharded."""
    from score_jax.metrics import inception  # pylint: disable=g-import-not-at-top

    def build():
      def run(params, images):
        if images.shape[-1] == 1:  # gray-scale data: the same plane in R, G and B
          images = jnp.repeat(images, 3, axis=-1)
        return inception.inception_features(params, images, resize=resize, precision=precision)

      return jax.jit(run, in_shardings=(self.rep, self.bat), out_shardings=self.bat)

    return self._cached(("inception", resize, precision), build)


def get_dataset(s: Settings, split: str = "train", *, evaluation: bool = False,
                batch_size: Optional[int] = None, seed: Optional[int] = None, **kwargs: Any):
  """`datasets.get_dataset` with the run's batch size (training or eval), seed and classes."""
  from score_jax.data import datasets  # pylint: disable=g-import-not-at-top

  if batch_size is None:
    batch_size = s.eval.batch_size if evaluation else s.training.batch_size
  return datasets.get_dataset(s.data, split, batch_size=batch_size,
                              seed=s.seed if seed is None else seed,
                              num_classes=s.model.num_classes, evaluation=evaluation, **kwargs)
