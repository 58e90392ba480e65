"""Turning a network into a score function: the one place that parameterizes a score.

`get_score_fn` is the only place that knows how a network's output and
labels relate to an SDE (label conversion, output scaling, discrete vs.
continuous time); losses and samplers only ever see the `score_fn` it
returns.

Label and output conventions (as in the 2021 reference):

| SDE            | training   | labels fed to the net        | score                        |
|----------------|------------|------------------------------|------------------------------|
| VP, sub-VP     | continuous | 999 t                        | -net / std(t)                |
| sub-VP         | discrete   | 999 t (sub-VP has no chain)  | -net / std(t)                |
| VP             | discrete   | t (N - 1)                    | -net / sqrt(1 - alphabar_i)  |
| VE             | continuous | sigma(t)                     | net / sigma(t) [*]           |
| VE             | discrete   | round((T - t)(N - 1)) (int)  | net / sigma_i [*]            |
| other SDEs     | continuous | 999 t                        | -net / std(t)                |

[*] only when the network's `scale_by_sigma` is set (NCSN++ VE, NCSNv2),
else net. The reference divided by sigma inside the network, which needed
the noise schedule there; dividing here keeps networks schedule-free. VE
discrete labels index the noise levels from the largest (0) to the smallest
(N - 1), the order of the reference's `get_sigmas`; i = N - 1 - label
indexes the increasing `VESDE.discrete_sigmas`.

The table is `parameterization='default'`. Two more, continuous time, any SDE:

- 'edm' (Karras et al. 2022): in the scaled variables x^ = x / alpha(t),
  sigma^ = std(t) / alpha(t) the denoiser is D(x^; sigma^) = c_skip x^ + c_out
  F(c_in x^; c_noise) with c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd /
  sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma^) / 4,
  sd = sigma_data, and score = (alpha D - x) / std^2. Written with r = alpha
  sqrt(sigma^2 + sd^2) = sqrt(std^2 + sd^2 alpha^2): F receives x / r and
  score = -x / r^2 + sd alpha F / (std r), finite as alpha -> 0. Networks
  with Fourier embeddings (of log labels) receive labels exp(c_noise), the
  others c_noise, so that every network embeds c_noise as EDM's do.
- 'velocity' (rectified flow / flow matching): F predicts v = alpha' x_0 +
  std' z, the time derivative of x_t = alpha x_0 + std z (z - x_0 for
  `RectifiedFlow`); solving for z, score = -(alpha v - alpha' x) / (std det)
  with det = alpha std' - std alpha' (RectifiedFlow: -(x + (1 - t) v) / t).
  Labels as in the table's continuous rows.
- 'sit_velocity' (SiT, Ma et al. 2024), on `RectifiedFlow` only: a velocity network trained
  on SiT's linear interpolant, whose time runs the other way, x_s = s x_0 + (1 - s) z (s = 0
  noise, s = 1 data; willisma/SiT transport/path.py `ICPlan`), predicting its time
  derivative x_0 - z. At score_jax's time t the path is SiT's at s = 1 - t, so the network
  receives the label s = 1 - t as it is (SiT embeds its t in [0, 1] without DiT's factor
  1000) and score_jax's velocity z - x_0 is v = -F(x, 1 - t); the score is then the
  'velocity' formula's, -(x + (1 - t) v) / t = -(x - s F) / (1 - s) (SiT's own
  `get_score_from_velocity`, (s F - x) / (1 - s)).
- 'trigflow' (Lu & Song 2024), on `TrigFlow` only: the network F sees x_t / sigma_d
  and sigma_d F predicts the velocity cos(t) z - sin(t) x_0 (z ~ N(0, sigma_d^2 I)),
  the drift of the probability-flow ODE; score = -(sin(t) x + cos(t) sigma_d F) /
  (sigma_d^2 sin t), the 'velocity' formula with det = sigma_d. sigma_d is the SDE's
  `sigma_data`. The time label is the paper's identity c_noise(t) = t, scaled by
  999 / (pi / 2) into the [0, 999] range the networks' embeddings expect. The same
  F gives the consistency function f(x_t, t) = cos(t) x_t - sin(t) sigma_d F.
- 'consistency' (Song et al. 2023, "Consistency Models", eq. 8 and their appendix C; the
  iCT and ECT models), on `VESDE` only (EDM's x = x_0 + sigma z): the consistency function
  f(x, sigma) = c_skip x + c_out F(c_in x, c_noise) with EDM's coefficients moved by
  eps = sigma_min so that f(x, sigma_min) = x (the boundary condition):
  c_skip = sd^2 / ((sigma - eps)^2 + sd^2), c_out = (sigma - eps) sd / sqrt(sigma^2 + sd^2),
  c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4 (the authors' JAX code,
  openai/consistency_models_cifar10 jcm/models/utils.py, offsets c_skip and c_out only).
  Labels as 'edm'. Its data prediction is f, i.e. score = (f - x) / sigma^2, written as
  (-(sigma - eps)^2 / ((sigma - eps)^2 + sd^2) x + c_out F) / sigma^2 (no cancellation of
  c_skip x against x; finite for every sigma >= sigma_min > 0). `get_consistency_fn` gives
  f itself, in sigma, for the consistency losses.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_jax.sde import SDE, RectifiedFlow, TrigFlow, VESDE, VPSDE, batch_mul

Array = jax.Array
ScoreFn = Callable[..., Array]  # (x [B, ...], t [B], y=None) -> score [B, ...]

__all__ = ["PARAMETERIZATIONS", "get_score_fn", "get_consistency_fn", "consistency_coefficients",
           "get_edm_denoiser_fn"]

PARAMETERIZATIONS = ("default", "edm", "velocity", "sit_velocity", "trigflow", "consistency")

# TrigFlow time t in [0, pi/2] -> network label in [0, 999].
TRIGFLOW_LABEL_SCALE = 999.0 / (0.5 * math.pi)

def get_score_fn(sde: SDE, model: nn.Module, variables: Mapping[str, Any], *, continuous: bool,
                 train: bool = False, rng: Optional[Array] = None,
                 parameterization: str = "default", sigma_data: float = 0.5,
                 augment_labels: Optional[Array] = None,
                 trigflow_label_scale: float = TRIGFLOW_LABEL_SCALE) -> ScoreFn:
  """Turns a network into a score function s(x, t) ~ grad_x log p_t(x) for `sde`.

  Args:
    sde: the forward SDE the network was (or is being) trained for.
    model: the network module (NCSNpp, DDPM, NCSNv2, MLPScore).
    variables: its variables, e.g. {'params': ...}. Gradients with respect to
      them flow through the returned closure.
    continuous: continuous-time training (else the discrete DDPM / SMLD labels).
    train: dropout on (needs `rng`).
    rng: dropout key; the same key gives the same dropout masks.
    parameterization: 'default' (the table above), 'edm', 'velocity', 'sit_velocity',
      'trigflow' or 'consistency' (module docstring; continuous time only).
    sigma_data: EDM's sigma_data (standard deviation of the data), for 'edm' and
      'consistency'.
    augment_labels: [B, augment_dim] labels of the augmentation applied to the
      batch (score_jax.data.augment), passed to networks that take them (SongUNet);
      None: not passed (the network's zero labels).
  Returns:
    score_fn(x [B, ...], t [B], y=None) -> score [B, ...] (float32), where y
    are optional class labels [B] for class-conditional networks.
  Raises:
    ValueError: a combination the parameterization does not support.
  """
  scale_by_sigma = bool(getattr(model, "scale_by_sigma", False))
  rngs = {"dropout": rng} if rng is not None else None
  extra = {} if augment_labels is None else {"augment_labels": augment_labels}

  def net(x: Array, labels: Array, y: Optional[Array]) -> Array:
    return model.apply(variables, x, labels, y, train=train, rngs=rngs, **extra)

  def std_of(x: Array, t: Array) -> Array:
    return sde.marginal_prob(jnp.zeros_like(x), t)[1]

  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(f"Unknown parameterization {parameterization!r}; choose from "
                     f"{list(PARAMETERIZATIONS)}.")
  if parameterization != "default":
    if not continuous:
      raise ValueError(f"The {parameterization!r} parameterization is continuous-time; use "
                       "continuous=True (training.continuous = True).")
    if scale_by_sigma:
      raise ValueError(f"scale_by_sigma does not combine with the {parameterization!r} "
                       "parameterization, which scales the output itself; set "
                       "model.scale_by_sigma = False.")
    if parameterization == "edm":
      return _edm_score_fn(sde, net, float(sigma_data),
                           getattr(model, "embedding_type", "positional") == "fourier")
    if parameterization == "trigflow":
      return _trigflow_score_fn(sde, net, float(trigflow_label_scale))
    if parameterization == "sit_velocity":
      return _sit_velocity_score_fn(sde, net)
    if parameterization == "consistency":
      return _consistency_score_fn(sde, net, float(sigma_data),
                                   getattr(model, "embedding_type", "positional") == "fourier")
    return _velocity_score_fn(sde, net)

  if sde.chain == "smld" or isinstance(sde, VESDE):
    if continuous:
      def score_fn(x: Array, t: Array, y: Optional[Array] = None) -> Array:
        sigma = std_of(x, t)  # [B]
        out = net(x, sigma, y)
        return batch_mul(1.0 / sigma, out) if scale_by_sigma else out
    else:
      def score_fn(x: Array, t: Array, y: Optional[Array] = None) -> Array:
        labels = jnp.round((sde.T - t) * (sde.N - 1)).astype(jnp.int32)  # [B], 0 = sigma_max
        out = net(x, labels, y)
        if not scale_by_sigma:
          return out
        sigma = sde.discrete_sigmas[sde.N - 1 - labels]
        return batch_mul(1.0 / sigma, out)
    return score_fn

  if scale_by_sigma:
    raise ValueError(f"scale_by_sigma applies to VE SDEs only; with {type(sde).__name__} the "
                     "score is already -net / std. Set model.scale_by_sigma = False.")

  if sde.chain == "ddpm" and not continuous:
    def score_fn(x: Array, t: Array, y: Optional[Array] = None) -> Array:
      labels = t * (sde.N - 1)  # fractional step, as the reference
      out = net(x, labels, y)
      std = sde.sqrt_1m_alphas_cumprod[sde.time_index(t)]
      return batch_mul(-1.0 / std, out)
    return score_fn

  if not continuous and not isinstance(sde, VPSDE):
    raise ValueError(f"No discrete-time parameterization for {type(sde).__name__}; "
                     "use continuous=True.")

  # VP / sub-VP continuous (and sub-VP 'discrete', which has no chain of its
  # own: the reference also used continuous labels there), and any other SDE
  # with a Gaussian kernel: the network predicts the noise z of x_t = mean + std z.
  def score_fn(x: Array, t: Array, y: Optional[Array] = None) -> Array:
    out = net(x, t * 999.0, y)
    return batch_mul(-1.0 / std_of(x, t), out)

  return score_fn


def _edm_score_fn(sde: SDE, net: Callable, sigma_data: float, fourier: bool) -> ScoreFn:
  """EDM's preconditioning on any SDE (module docstring)."""
  if not (math.isfinite(sigma_data) and sigma_data > 0):
    raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data!r}.")

  def score_fn(x: Array, t: Array, y: Optional[Array] = None) -> Array:
    alpha, std = sde.mean_coef(t), sde.marginal_std(t)  # [B]
    r = jnp.sqrt(std**2 + (sigma_data * alpha) ** 2)  # alpha sqrt(sigma^2 + sd^2)
    c_noise = -0.25 * sde.log_snr(t)  # ln(sigma^) / 4
    out = net(batch_mul(1.0 / r, x), jnp.exp(c_noise) if fourier else c_noise, y)
    return batch_mul(-1.0 / r**2, x) + batch_mul(sigma_data * alpha / (std * r), out)

  return score_fn


def get_edm_denoiser_fn(model: nn.Module, variables: Mapping[str, Any], *, sigma_data: float,
                        train: bool = False, rng: Optional[Array] = None) -> Callable[..., Array]:
  """EDM's preconditioned denoiser in sigma on EDM's process x = x_0 + sigma z (the 'edm'
  parameterization on `VESDE`, where alpha = 1): D(x, sigma, y) = c_skip x + c_out F(c_in x;
  c_noise) with the coefficients of the module docstring, computed as they are (EDM2's loss
  compares D with x_0 directly; going through the score would cancel c_skip x against x).

  Returns:
    denoise(x [B, ...], sigma [B], y=None) -> D [B, ...] float32.
  """
  if not (math.isfinite(sigma_data) and sigma_data > 0):
    raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data!r}.")
  fourier = getattr(model, "embedding_type", "positional") == "fourier"
  rngs = {"dropout": rng} if rng is not None else None
  sd = float(sigma_data)

  def denoise(x: Array, sigma: Array, y: Optional[Array] = None) -> Array:
    sigma = sigma.astype(jnp.float32)
    r = jnp.sqrt(sigma**2 + sd**2)
    c_noise = 0.25 * jnp.log(sigma)
    out = model.apply(variables, batch_mul(1.0 / r, x), jnp.exp(c_noise) if fourier else c_noise,
                      y, train=train, rngs=rngs)
    return batch_mul(sd**2 / r**2, x) + batch_mul(sigma * sd / r, out)

  return denoise


def _velocity_score_fn(sde: SDE, net: Callable) -> ScoreFn:
  """Velocity prediction v = alpha' x_0 + std' z on any SDE (module docstring)."""

  def score_fn(x: Array, t: Array, y: Optional[Array] = None) -> Array:
    alpha, std = sde.mean_coef(t), sde.marginal_std(t)
    d_alpha, d_std = sde.coef_derivatives(t)
    labels = std if (sde.chain == "smld" or isinstance(sde, VESDE)) else t * 999.0
    v = net(x, labels, y)
    det = alpha * d_std - std * d_alpha  # > 0: the log-SNR decreases
    return batch_mul(d_alpha / (std * det), x) - batch_mul(alpha / (std * det), v)

  return score_fn


def _sit_velocity_score_fn(sde: SDE, net: Callable) -> ScoreFn:
  """SiT's velocity network F(x, s), s = 1 - t, on the rectified-flow path (module docstring)."""
  if not isinstance(sde, RectifiedFlow):
    raise ValueError(f"The 'sit_velocity' parameterization is SiT's linear interpolant, the "
                     f"rectified-flow path (sde.RectifiedFlow), not {type(sde).__name__}'s.")

  def score_fn(x: Array, t: Array, y: Optional[Array] = None) -> Array:
    s = 1.0 - t  # SiT's time, its label as it is
    out = net(x, s, y)  # x_0 - z, SiT's velocity; score_jax's is its negative
    return batch_mul(-1.0 / t, x - batch_mul(s, out))

  return score_fn


def _trigflow_score_fn(sde: SDE, net: Callable, label_scale: float) -> ScoreFn:
  """TrigFlow's velocity network sigma_d F(x_t / sigma_d, t) (module docstring)."""
  if not isinstance(sde, TrigFlow):
    raise ValueError(f"The 'trigflow' parameterization is TrigFlow's (sde.TrigFlow), not "
                     f"{type(sde).__name__}'s; use 'velocity' for a velocity network on it.")
  sd = sde.sigma_data

  def score_fn(x: Array, t: Array, y: Optional[Array] = None) -> Array:
    v = sd * net(x / sd, t * label_scale, y)
    sin, cos = jnp.sin(t), jnp.cos(t)  # [B]
    return batch_mul(-1.0 / (sd**2 * sin), batch_mul(sin, x) + batch_mul(cos, v))

  return score_fn


def consistency_coefficients(sigma: Array, sigma_min: float, sigma_data: float
                             ) -> Tuple[Array, Array, Array, Array]:
  """(c_skip, c_out, c_in, c_noise) of the consistency function at noise levels sigma.

  c_skip = sd^2 / ((sigma - eps)^2 + sd^2), c_out = (sigma - eps) sd / sqrt(sigma^2 + sd^2),
  c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4, eps = sigma_min, sd = sigma_data
  (module docstring): c_skip(eps) = 1 and c_out(eps) = 0.
  """
  shifted = sigma - sigma_min
  r = jnp.sqrt(sigma**2 + sigma_data**2)
  c_skip = sigma_data**2 / (shifted**2 + sigma_data**2)
  return c_skip, shifted * sigma_data / r, 1.0 / r, 0.25 * jnp.log(sigma)


def _check_consistency(sde: SDE, sigma_data: float) -> None:
  if not isinstance(sde, VESDE):
    raise ValueError(f"The 'consistency' parameterization is on EDM's process x_0 + sigma z "
                     f"(sde.VESDE), not {type(sde).__name__}.")
  if not (math.isfinite(sigma_data) and sigma_data > 0):
    raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data!r}.")


def _consistency_parts(sde: SDE, net: Callable, sigma_data: float, fourier: bool):
  """(x, sigma, y) -> (c_skip, c_out, F) of the consistency function."""
  _check_consistency(sde, sigma_data)
  eps = sde.sigma_min

  def parts(x: Array, sigma: Array, y: Optional[Array]):
    c_skip, c_out, c_in, c_noise = consistency_coefficients(sigma, eps, sigma_data)
    out = net(batch_mul(c_in, x), jnp.exp(c_noise) if fourier else c_noise, y)
    return c_skip, c_out, out

  return parts


def _consistency_score_fn(sde: SDE, net: Callable, sigma_data: float, fourier: bool) -> ScoreFn:
  """The score whose data prediction x + sigma^2 s is the consistency function."""
  parts = _consistency_parts(sde, net, sigma_data, fourier)
  eps = sde.sigma_min

  def score_fn(x: Array, t: Array, y: Optional[Array] = None) -> Array:
    sigma = sde.marginal_std(t)  # [B]
    _, c_out, out = parts(x, sigma, y)
    shifted2 = (sigma - eps) ** 2
    skip_m1 = -shifted2 / (shifted2 + sigma_data**2)  # c_skip - 1
    return batch_mul(1.0 / sigma**2, batch_mul(skip_m1, x) + batch_mul(c_out, out))

  return score_fn


def get_consistency_fn(sde: SDE, model: nn.Module, variables: Mapping[str, Any], *,
                       train: bool = False, rng: Optional[Array] = None, sigma_data: float = 0.5,
                       augment_labels: Optional[Array] = None
                       ) -> Callable[..., Array]:
  """The 'consistency' parameterization's f(x, sigma) itself (module docstring), in sigma.

  Args:
    sde: a `VESDE`; its sigma_min is the boundary eps, f(x, eps) = x.
    model, variables, train, rng, augment_labels: as `get_score_fn`.
    sigma_data: the coefficients' sd.
  Returns:
    f(x [B, ...], sigma [B], y=None) -> [B, ...], the consistency function.
  Raises:
    ValueError: not a VESDE, or a network with scale_by_sigma.
  """
  if getattr(model, "scale_by_sigma", False):
    raise ValueError("scale_by_sigma does not combine with the 'consistency' "
                     "parameterization; set model.scale_by_sigma = False.")
  rngs = {"dropout": rng} if rng is not None else None
  extra = {} if augment_labels is None else {"augment_labels": augment_labels}

  def net(x: Array, labels: Array, y: Optional[Array]) -> Array:
    return model.apply(variables, x, labels, y, train=train, rngs=rngs, **extra)

  parts = _consistency_parts(sde, net, float(sigma_data),
                             getattr(model, "embedding_type", "positional") == "fourier")

  def f(x: Array, sigma: Array, y: Optional[Array] = None) -> Array:
    c_skip, c_out, out = parts(x, sigma, y)
    return batch_mul(c_skip, x) + batch_mul(c_out, out)

  return f
