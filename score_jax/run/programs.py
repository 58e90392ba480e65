"""The jitted, sharded programs over a run plan.

`Programs(plan)` hands out the jitted computations, each built once and
cached (they read the plan, never settings):

- `score_fn(params, y, weight)`: the network's score with class labels and
  classifier-free guidance (the one place labels and guidance are decided);
- `sampler(batch, weight)`, `controlled_sampler(task, batch, weight)`,
  `ode(batch, weight, denoise)` (encode / decode along the probability flow);
- `loss()` (per-example training objective), `likelihood()` (bits/dim or nats),
  `inception(resize, precision)` (FID features), `dinov2(arch, precision)` (FD-DINOv2's).

Train, eval, sample, the benchmarks, the notebook and the tests all build
their programs here. Batches are sharded over all devices of the mesh
(parameters replicated, whatever training.sharding: training gathers its split
EMA parameters before it samples); sharding a program's output along the batch
makes XLA partition the whole sampling loop over the devices.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from score_jax import meanflow, models
from score_jax.run import distributed, sampler_specs

if TYPE_CHECKING:
  from score_jax.run.plan import Plan

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]
# (params, labels [B] or None) -> score_fn(x [B, ...], t [B]) -> [B, ...]
ScoreFactory = Callable[[Any, Optional[Array]], ScoreFn]

__all__ = ["Programs", "network_score_factory", "Guide", "GuidedParams"]


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

  def _sampler_input(self, params: Any, y: Optional[Array], weight: float) -> Callable:
    """What the configured sampler integrates: the score, or for the samplers of
    average-velocity networks (MeanFlow) u(z, r, t) of the plan's network."""
    if self.plan.sampling.method not in sampler_specs.AVERAGE_VELOCITY:
      return self.score_fn(params, y, weight)
    labels = y if self.plan.score.num_classes > 0 else None
    params = params.main if isinstance(params, GuidedParams) else params  # no guidance here
    return meanflow.network_u_fn(self.plan.model, {"params": params}, labels)

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
        x, nfe = sampler(rng, self._sampler_input(params, y, weight), shape)
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

  def dinov2(self, arch: Any, precision: str):
    """(DINOv2 params, uint8 images [B, H, W, C]) -> {'features'}, sharded; arch: the
    network's `score_jax.metrics.dinov2.Arch`."""
    from score_jax.metrics import dinov2  # pylint: disable=g-import-not-at-top

    def build():
      def run(params, images):
        if images.shape[-1] == 1:  # gray-scale data: the same plane in R, G and B
          images = jnp.repeat(images, 3, axis=-1)
        return {"features": dinov2.dinov2_features(params, images, arch=arch,
                                                   precision=precision)}

      return jax.jit(run, in_shardings=(self.rep, self.bat), out_shardings=self.bat)

    return self._cached(("dinov2", arch, precision), build)
