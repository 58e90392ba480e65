"""Forward SDEs of score-based generative modeling, as immutable pytrees.

Each SDE is dx = f(x, t) dt + g(t) dw on [0, T] with a Gaussian transition
kernel p_0t(x_t | x_0) = N(alpha(t) x_0, std(t)^2 I). The classes carry the
method names of the 2021 reference code (`sde`, `marginal_prob`,
`prior_sampling`, `prior_logp`, `discretize`, `reverse`) so code ports by
import changes.

Conventions: `x` is [B, ...] of any rank, `t` is [B]; per-example scalars
(`std`, `diffusion`, `G`) are [B]. Float parameters are pytree leaves (a
jitted function taking an SDE does not recompile when they change); `N` is
static.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

__all__ = [
    "SDE",
    "VPSDE",
    "subVPSDE",
    "VESDE",
    "TutorialSDE",
    "RectifiedFlow",
    "TrigFlow",
    "ReverseSDE",
    "trigflow_time",
    "teacher_time",
    "trigflow_score_fn",
    "trigflow_velocity_fn",
    "batch_mul",
    "sum_except_batch",
]


def batch_mul(a: Array, x: Array) -> Array:
  """Multiplies a per-example vector a [B] into x [B, ...] (explicit broadcast)."""
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) * x


def sum_except_batch(x: Array) -> Array:
  """x [B, ...] -> [B]: the sum over all but the batch axis."""
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def _check_N(N) -> int:
  if isinstance(N, bool) or not isinstance(N, int) or N < 1:
    raise ValueError(f"N must be an integer >= 1 (number of discretization steps), got {N!r}.")
  return N


def _check_positive(name: str, value) -> float:
  value = float(value)
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
  return value


class SDE(abc.ABC):
  """Base class. Subclasses define the schedule; this class derives the rest.

  Subclasses implement `sde`, `mean_coef`, `marginal_std`, `prior_std` and
  the importance-sampling antiderivative pair `_iw_cumulative` /
  `_iw_inverse` of g(t)^2 / std(t)^2.
  """

  # Names of float fields (pytree leaves) and of static fields (aux data: a
  # new value retraces), `N` and, where a class sets it per object, `T`.
  _leaves: Tuple[str, ...] = ()
  _static: Tuple[str, ...] = ("N",)

  T: float = 1.0

  # The discrete chain of the paper that `discretize` follows, a capability
  # the discrete losses, ancestral sampling and the discrete score
  # parameterization ask for: 'ddpm' (VP: DDPM betas), 'smld' (VE: NCSN noise
  # levels), or None (the exact Gaussian transition on the grid).
  chain: Optional[str] = None

  # -- pytree plumbing ------------------------------------------------------
  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    jax.tree_util.register_pytree_node(cls, cls._flatten, cls._unflatten)

  def _flatten(self):
    return (tuple(getattr(self, k) for k in self._leaves),
            tuple(getattr(self, k) for k in self._static))

  @classmethod
  def _unflatten(cls, aux, children):
    # Bypasses __init__: validation ran when the user built the object, and
    # inside jit the leaves are tracers that cannot be validated.
    obj = object.__new__(cls)
    for k, v in zip(cls._leaves + cls._static, tuple(children) + tuple(aux)):
      object.__setattr__(obj, k, v)
    return obj

  def __setattr__(self, name, value):
    raise dataclasses.FrozenInstanceError(f"{type(self).__name__} is immutable; build a new one.")

  def _set(self, **kw):
    for k, v in kw.items():
      object.__setattr__(self, k, v)

  def __repr__(self):
    fields = ", ".join(f"{k}={getattr(self, k)}" for k in self._leaves + self._static)
    return f"{type(self).__name__}({fields})"

  def replace(self, **changes) -> "SDE":
    """A copy with some constructor arguments changed (validated again)."""
    kw = {k: getattr(self, k) for k in self._leaves + self._static}
    kw.update(changes)
    return type(self)(**kw)

  # -- schedule (subclass API) -----------------------------------------------
  @abc.abstractmethod
  def sde(self, x: Array, t: Array) -> Tuple[Array, Array]:
    """Returns (drift f(x, t) [B, ...], diffusion g(t) [B])."""

  @abc.abstractmethod
  def mean_coef(self, t: Array) -> Array:
    """alpha(t) [B]: the mean of p_0t(x_t | x_0) is alpha(t) x_0."""

  @abc.abstractmethod
  def marginal_std(self, t: Array) -> Array:
    """std(t) [B] of p_0t(x_t | x_0)."""

  @abc.abstractmethod
  def prior_std(self) -> Array:
    """Standard deviation of the prior N(0, prior_std^2 I) at t = T."""

  @abc.abstractmethod
  def _iw_cumulative(self, t: Array) -> Array:
    """An antiderivative of g(t)^2 / std(t)^2 (increasing in t)."""

  @abc.abstractmethod
  def _iw_inverse(self, c: Array) -> Array:
    """Inverse of `_iw_cumulative`."""

  # -- derived quantities ------------------------------------------------------
  def marginal_prob(self, x: Array, t: Array) -> Tuple[Array, Array]:
    """Mean [B, ...] and std [B] of p_0t(x_t | x_0 = x)."""
    return batch_mul(self.mean_coef(t), x), self.marginal_std(t)

  def log_snr(self, t: Array) -> Array:
    """lambda(t) = log(alpha(t) / std(t)), decreasing in t."""
    return jnp.log(self.mean_coef(t)) - jnp.log(self.marginal_std(t))

  @abc.abstractmethod
  def t_from_log_snr(self, lam: Array) -> Array:
    """Inverse of `log_snr`: the time t at which lambda(t) = lam."""

  def coef_derivatives(self, t: Array) -> Tuple[Array, Array]:
    """(d alpha / dt, d std / dt), each [B]: the velocity of x_t = alpha x_0 + std z
    is v = alpha' x_0 + std' z. By forward-mode autodiff of the schedule."""
    ones = jnp.ones_like(t)
    return (jax.jvp(self.mean_coef, (t,), (ones,))[1],
            jax.jvp(self.marginal_std, (t,), (ones,))[1])

  def prior_sampling(self, rng: Array, shape) -> Array:
    return self.prior_std() * jax.random.normal(rng, shape)

  def prior_logp(self, z: Array) -> Array:
    """log N(z; 0, prior_std^2 I) per example, [B]."""
    var = self.prior_std() ** 2
    d = math.prod(z.shape[1:])
    return -0.5 * d * jnp.log(2 * jnp.pi * var) - 0.5 * sum_except_batch(z**2) / var

  def discretize(self, x: Array, t: Array) -> Tuple[Array, Array]:
    """One step x_{i+1} = x_i + f + G z of a discrete chain on N steps.

    The default is the exact Gaussian transition of the SDE from t - T/N to
    t, so the chain's marginals equal the continuous ones at every grid
    point. VPSDE and VESDE override it with the DDPM and SMLD chains.

    Returns: f [B, ...], G [B].
    """
    s = jnp.maximum(t - self.T / self.N, 0.0)
    ratio = self.mean_coef(t) / self.mean_coef(s)
    var = self.marginal_std(t) ** 2 - ratio**2 * self.marginal_std(s) ** 2
    return batch_mul(ratio - 1.0, x), jnp.sqrt(jnp.maximum(var, 0.0))

  def corrector_alpha(self, t: Array) -> Array:
    """The alpha of the Langevin corrector's step size 2 alpha (snr |z|/|s|)^2, [B]."""
    return jnp.ones_like(t)

  def time_index(self, t: Array) -> Array:
    """Index i in [0, N-1] of the discrete step at time t (t = i T / (N-1)).

    Truncation like the reference, with a guard against float round-off just
    below an integer.
    """
    i = jnp.floor(t * (self.N - 1) / self.T + 1e-4).astype(jnp.int32)
    return jnp.clip(i, 0, self.N - 1)

  def sample_importance_time(self, rng: Array, shape, eps: float = 1e-5) -> Tuple[Array, Array]:
    """Samples t in [eps, T] with density p(t) proportional to g(t)^2 / std(t)^2.

    This is the importance distribution of the likelihood-weighted loss
    (Song et al. 2021b). Returns (t [shape], weight [shape]) with
    weight = Z / (T - eps), Z = int_eps^T g^2 / std^2 dt, so that for any h
    E_{t ~ U(eps, T)}[g^2 / std^2 * h(t)] = E_{t ~ p}[weight * h(t)].
    """
    c0 = self._iw_cumulative(jnp.asarray(eps, jnp.float32))
    c1 = self._iw_cumulative(jnp.asarray(self.T, jnp.float32))
    u = jax.random.uniform(rng, shape)
    t = self._iw_inverse(c0 + u * (c1 - c0))
    t = jnp.clip(t, eps, self.T)
    weight = jnp.full(shape, (c1 - c0) / (self.T - eps))
    return t, weight

  def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
    """The reverse-time SDE (or probability-flow ODE) for a score function."""
    return ReverseSDE(self, score_fn, probability_flow)


@dataclasses.dataclass(frozen=True)
class ReverseSDE:
  """dx = [f - g^2 s] dt + g dw_bar (SDE) or dx = [f - g^2 s / 2] dt (ODE).

  `sde` and `discretize` return drift-like terms for time running backwards
  from T: a reverse step is x_{i-1} = x_i - rev_f + rev_G z.
  """

  forward: SDE
  score_fn: ScoreFn
  probability_flow: bool = False

  @property
  def T(self) -> float:
    return self.forward.T

  @property
  def N(self) -> int:
    return self.forward.N

  def sde(self, x: Array, t: Array) -> Tuple[Array, Array]:
    drift, diffusion = self.forward.sde(x, t)
    score = self.score_fn(x, t)
    scale = 0.5 if self.probability_flow else 1.0
    drift = drift - batch_mul(scale * diffusion**2, score)
    diffusion = jnp.zeros_like(diffusion) if self.probability_flow else diffusion
    return drift, diffusion

  def discretize(self, x: Array, t: Array) -> Tuple[Array, Array]:
    f, G = self.forward.discretize(x, t)
    score = self.score_fn(x, t)
    scale = 0.5 if self.probability_flow else 1.0
    rev_f = f - batch_mul(scale * G**2, score)
    rev_G = jnp.zeros_like(G) if self.probability_flow else G
    return rev_f, rev_G


class VPSDE(SDE):
  """Variance preserving SDE: dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw.

  beta(t) = beta_min + t (beta_max - beta_min). Its discretization is the
  DDPM chain with betas = linspace(beta_min / N, beta_max / N, N).
  """

  _leaves = ("beta_min", "beta_max")
  chain = "ddpm"

  def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
    beta_min, beta_max = float(beta_min), float(beta_max)
    if not (math.isfinite(beta_min) and beta_min >= 0):
      raise ValueError(f"beta_min must be a finite number >= 0, got {beta_min!r}.")
    if not (math.isfinite(beta_max) and beta_max > beta_min):
      raise ValueError(
          f"beta_max must be finite and > beta_min (= {beta_min}), got {beta_max!r}.")
    self._set(beta_min=beta_min, beta_max=beta_max, N=_check_N(N))

  def beta(self, t: Array) -> Array:
    return self.beta_min + t * (self.beta_max - self.beta_min)

  def integrated_beta(self, t: Array) -> Array:
    """B(t) = int_0^t beta(s) ds."""
    return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

  def _t_from_integrated_beta(self, b: Array) -> Array:
    d = self.beta_max - self.beta_min
    # Solves d/2 t^2 + beta_min t - b = 0; written to stay exact as d -> 0.
    return 2.0 * b / (self.beta_min + jnp.sqrt(self.beta_min**2 + 2.0 * d * b))

  def sde(self, x, t):
    beta_t = self.beta(t)
    return batch_mul(-0.5 * beta_t, x), jnp.sqrt(beta_t)

  def mean_coef(self, t):
    return jnp.exp(-0.5 * self.integrated_beta(t))

  def marginal_std(self, t):
    return jnp.sqrt(-jnp.expm1(-self.integrated_beta(t)))

  def prior_std(self):
    return jnp.asarray(1.0)

  # Discrete DDPM chain.
  @property
  def discrete_betas(self) -> Array:
    return jnp.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N)

  @property
  def alphas(self) -> Array:
    return 1.0 - self.discrete_betas

  @property
  def alphas_cumprod(self) -> Array:
    return jnp.cumprod(self.alphas)

  @property
  def sqrt_alphas_cumprod(self) -> Array:
    return jnp.sqrt(self.alphas_cumprod)

  @property
  def sqrt_1m_alphas_cumprod(self) -> Array:
    return jnp.sqrt(1.0 - self.alphas_cumprod)

  def discretize(self, x, t):
    i = self.time_index(t)
    beta = self.discrete_betas[i]
    return batch_mul(jnp.sqrt(1.0 - beta) - 1.0, x), jnp.sqrt(beta)

  def corrector_alpha(self, t):
    return self.alphas[self.time_index(t)]

  def _iw_cumulative(self, t):
    # int beta / (1 - e^{-B}) dt = log(e^B - 1)
    return jnp.log(jnp.expm1(self.integrated_beta(t)))

  def _iw_inverse(self, c):
    return self._t_from_integrated_beta(jnp.log1p(jnp.exp(c)))

  def t_from_log_snr(self, lam: Array) -> Array:
    """Inverse of `log_snr`: e^{-B} = sigmoid(2 lambda)."""
    return self._t_from_integrated_beta(jnp.logaddexp(0.0, -2.0 * lam))


class subVPSDE(VPSDE):
  """Sub-variance preserving SDE (Song et al. 2021, eq. 29).

  dx = -beta(t) x / 2 dt + sqrt(beta(t) (1 - e^{-2 B(t)})) dw; the mean is
  the VP mean and std(t) = 1 - e^{-B(t)} (no square root). Its chain is the
  exact Gaussian transition on the grid (`SDE.discretize`); the corrector
  uses the DDPM alphas of the same beta schedule, since sub-VP shares the
  VP drift.
  """

  chain = None  # no DDPM chain: its variance is not the VP one

  def sde(self, x, t):
    beta_t = self.beta(t)
    discount = -jnp.expm1(-2.0 * self.integrated_beta(t))
    return batch_mul(-0.5 * beta_t, x), jnp.sqrt(beta_t * discount)

  def marginal_std(self, t):
    return -jnp.expm1(-self.integrated_beta(t))

  discretize = SDE.discretize

  def _iw_cumulative(self, t):
    # g^2/std^2 = beta (e^B + 1)/(e^B - 1); antiderivative 2 log(e^B - 1) - B.
    b = self.integrated_beta(t)
    return 2.0 * jnp.log(jnp.expm1(b)) - b

  def _iw_inverse(self, c):
    # e^c = u^2 / (1 + u) with u = e^B - 1 > 0; the positive root, written
    # without cancellation so that small t keeps its precision in float32.
    h = jnp.exp(0.5 * c)
    u = 0.5 * h * (h + jnp.sqrt(h**2 + 4.0))
    return self._t_from_integrated_beta(jnp.log1p(u))

  def t_from_log_snr(self, lam: Array) -> Array:
    # alpha / (1 - alpha^2) = e^lam with alpha = e^{-B/2}.
    e = jnp.exp(-lam)
    alpha = 2.0 / (e + jnp.sqrt(e**2 + 4.0))
    return self._t_from_integrated_beta(-2.0 * jnp.log(alpha))


class VESDE(SDE):
  """Variance exploding SDE: dx = sigma(t) sqrt(2 log(sigma_max/sigma_min)) dw.

  sigma(t) = sigma_min (sigma_max / sigma_min)^t. Following the reference,
  std(t) = sigma(t) (the sigma_min^2 offset of the exact variance is
  neglected). The discretization is the SMLD chain on geometric sigmas.
  """

  _leaves = ("sigma_min", "sigma_max")
  chain = "smld"

  def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
    sigma_min = _check_positive("sigma_min", sigma_min)
    sigma_max = float(sigma_max)
    if not (math.isfinite(sigma_max) and sigma_max > sigma_min):
      raise ValueError(
          f"sigma_max must be finite and > sigma_min (= {sigma_min}), got {sigma_max!r}.")
    self._set(sigma_min=sigma_min, sigma_max=sigma_max, N=_check_N(N))

  @property
  def _log_ratio(self):
    return jnp.log(self.sigma_max / self.sigma_min)

  def sigma(self, t: Array) -> Array:
    return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

  def sde(self, x, t):
    return jnp.zeros_like(x), self.sigma(t) * jnp.sqrt(2.0 * self._log_ratio)

  def mean_coef(self, t):
    return jnp.ones_like(t)

  def marginal_std(self, t):
    return self.sigma(t)

  def prior_std(self):
    return jnp.asarray(self.sigma_max)

  @property
  def discrete_sigmas(self) -> Array:
    return jnp.exp(jnp.linspace(jnp.log(self.sigma_min), jnp.log(self.sigma_max), self.N))

  def discretize(self, x, t):
    i = self.time_index(t)
    sigmas = self.discrete_sigmas
    sigma = sigmas[i]
    prev = jnp.where(i == 0, 0.0, sigmas[jnp.maximum(i - 1, 0)])
    return jnp.zeros_like(x), jnp.sqrt(sigma**2 - prev**2)

  def _iw_cumulative(self, t):
    # g^2 / sigma^2 = 2 log(sigma_max / sigma_min): uniform.
    return 2.0 * self._log_ratio * t

  def _iw_inverse(self, c):
    return c / (2.0 * self._log_ratio)

  def t_from_log_snr(self, lam: Array) -> Array:
    return (-lam - jnp.log(self.sigma_min)) / self._log_ratio


class TutorialSDE(SDE):
  """dx = sigma^t dw on [0, 1], the SDE of the score-based tutorial notes.

  std(t)^2 = (sigma^{2t} - 1) / (2 log sigma); prior N(0, std(1)^2 I).
  Its chain is the exact Gaussian transition on the grid.
  """

  _leaves = ("sigma",)

  def __init__(self, sigma: float = 25.0, N: int = 1000):
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 1.0):
      raise ValueError(f"sigma must be a finite number > 1, got {sigma!r}.")
    self._set(sigma=sigma, N=_check_N(N))

  @property
  def _log_sigma(self):
    return jnp.log(self.sigma)

  def sde(self, x, t):
    return jnp.zeros_like(x), self.sigma**t

  def mean_coef(self, t):
    return jnp.ones_like(t)

  def marginal_std(self, t):
    return jnp.sqrt(jnp.expm1(2.0 * t * self._log_sigma) / (2.0 * self._log_sigma))

  def prior_std(self):
    return self.marginal_std(jnp.asarray(self.T))

  def _iw_cumulative(self, t):
    # g^2 / std^2 = 2 log(sigma) v / (v - 1), v = sigma^{2t}; antiderivative log(v - 1).
    return jnp.log(jnp.expm1(2.0 * t * self._log_sigma))

  def _iw_inverse(self, c):
    return jnp.log1p(jnp.exp(c)) / (2.0 * self._log_sigma)

  def t_from_log_snr(self, lam: Array) -> Array:
    # std^2 = e^{-2 lam}
    return jnp.log1p(2.0 * self._log_sigma * jnp.exp(-2.0 * lam)) / (2.0 * self._log_sigma)


class RectifiedFlow(SDE):
  """The straight path of rectified flow / flow matching: x_t = (1 - t) x_0 + t z.

  alpha(t) = 1 - t, std(t) = t, log-SNR lambda(t) = log((1 - t) / t). The
  forward SDE with these marginals is dx = -x / (1 - t) dt + sqrt(2 t / (1 -
  t)) dw (the only one of the form f(t) x dt + g(t) dw: f = d log alpha / dt,
  g^2 = d std^2 / dt - 2 f std^2), so the reverse SDE, the probability-flow
  ODE (whose drift is the velocity E[z - x_0 | x_t]) and every sampler run on
  it. Its chain is the exact Gaussian transition on the grid.

  The ends: alpha(1) = 0 makes the drift, g, the log-SNR and the data
  prediction (x + std^2 s) / alpha singular at t = 1, and std(0) = 0 the
  score at t = 0. The path is therefore run on [eps, T] with T = 1 - 1e-3 by
  default (`T` in (0, 1), static; T = 1 is refused): the prior is N(0, T^2 I),
  the marginal at T of data at the origin. The marginal at T is
  (1 - T) x_0 + T z, so the prior's mismatch is a shift of (1 - T) E[x_0]
  (the VP SDE's alpha(1) is 6.4e-3: a larger one). Samplers, losses and the
  likelihood take eps > 0 as for every SDE.
  """

  _static = ("N", "T")

  def __init__(self, T: float = 0.999, N: int = 1000):
    T = float(T)
    if not (math.isfinite(T) and 0.0 < T < 1.0):
      raise ValueError(f"T must lie in (0, 1), got {T!r}: at t = 1 alpha = 1 - t is 0 and the "
                       "drift -x / (1 - t), the log-SNR and the data prediction are singular; "
                       "the default T = 0.999 stops the path just before.")
    self._set(T=T, N=_check_N(N))

  def sde(self, x, t):
    return batch_mul(-1.0 / (1.0 - t), x), jnp.sqrt(2.0 * t / (1.0 - t))

  def mean_coef(self, t):
    return 1.0 - t

  def marginal_std(self, t):
    return t

  def prior_std(self):
    return jnp.asarray(self.T)

  def log_snr(self, t):
    return jnp.log1p(-t) - jnp.log(t)

  def t_from_log_snr(self, lam: Array) -> Array:
    # (1 - t) / t = e^lam
    return jax.nn.sigmoid(-lam)

  def coef_derivatives(self, t):
    return -jnp.ones_like(t), jnp.ones_like(t)

  def _iw_cumulative(self, t):
    # g^2 / std^2 = 2 / (t (1 - t)); antiderivative 2 log(t / (1 - t)) = -2 lambda.
    return 2.0 * (jnp.log(t) - jnp.log1p(-t))

  def _iw_inverse(self, c):
    return jax.nn.sigmoid(0.5 * c)


class TrigFlow(SDE):
  """TrigFlow (Lu & Song 2024, sCM): x_t = cos(t) x_0 + sin(t) z, z ~ N(0, sigma_d^2 I).

  alpha(t) = cos t, std(t) = sigma_d sin t on t in [0, pi/2]; the log-SNR is
  lambda(t) = -log(sigma_d tan t), so EDM's noise level is sigma^ = sigma_d tan t
  and x_t = cos(t) x_edm (the paper's correspondence). The forward SDE with these
  marginals is dx = -tan(t) x dt + sigma_d sqrt(2 tan t) dw (f = d log alpha / dt,
  g^2 = d std^2 / dt - 2 f std^2), and the probability-flow ODE's drift is the
  velocity dx_t/dt = E[cos(t) z - sin(t) x_0 | x_t] that the paper's network
  sigma_d F(x_t / sigma_d, t) predicts (models.get_score_fn, 'trigflow').

  The end: as for `RectifiedFlow`, alpha(pi/2) = 0 makes the drift, g and the
  log-SNR singular there, so the path runs on [eps, T] with T = pi/2 - 1e-3 by
  default (static; T >= pi/2 is refused; alpha(T) = sin(1e-3), RectifiedFlow's
  1e-3). The prior is N(0, (sigma_d sin T)^2 I), the marginal at T of data at
  the origin. `sigma_data` is a float leaf. Its chain is the exact Gaussian
  transition on the grid.
  """

  _leaves = ("sigma_data",)
  _static = ("N", "T")

  def __init__(self, sigma_data: float = 0.5, T: float = 0.5 * math.pi - 1e-3, N: int = 1000):
    sigma_data = _check_positive("sigma_data", sigma_data)
    T = float(T)
    if not (math.isfinite(T) and 0.0 < T < 0.5 * math.pi):
      raise ValueError(f"T must lie in (0, pi/2), got {T!r}: at t = pi/2 alpha = cos t is 0 and "
                       "the drift -tan(t) x and the log-SNR are singular; the default "
                       "T = pi/2 - 1e-3 stops the path just before.")
    self._set(sigma_data=sigma_data, T=T, N=_check_N(N))

  def sde(self, x, t):
    tan = jnp.tan(t)
    return batch_mul(-tan, x), self.sigma_data * jnp.sqrt(2.0 * tan)

  def mean_coef(self, t):
    return jnp.cos(t)

  def marginal_std(self, t):
    return self.sigma_data * jnp.sin(t)

  def prior_std(self):
    return self.sigma_data * jnp.sin(jnp.asarray(self.T))

  def log_snr(self, t):
    return -jnp.log(jnp.tan(t)) - jnp.log(self.sigma_data)

  def t_from_log_snr(self, lam: Array) -> Array:
    # sigma_d tan t = e^-lam; arctan2 keeps both ends finite (e^-lam = inf gives pi/2).
    return jnp.arctan2(jnp.exp(-lam), self.sigma_data)

  def coef_derivatives(self, t):
    return -jnp.sin(t), self.sigma_data * jnp.cos(t)

  def _iw_cumulative(self, t):
    # g^2 / std^2 = 2 / (sin t cos t); antiderivative 2 log tan t.
    return 2.0 * jnp.log(jnp.tan(t))

  def _iw_inverse(self, c):
    return jnp.arctan(jnp.exp(0.5 * c))


# -- teachers in TrigFlow variables --------------------------------------------
#
# Any SDE here has x_s = alpha(s) x_0 + std(s) e, e ~ N(0, I). Scaled by
# 1 / r(s), r = sqrt(alpha^2 + std^2 / sigma_d^2), it is cos(t) x_0 + sin(t)
# sigma_d e with tan t = std / (alpha sigma_d): the TrigFlow state at t, for
# every x_0. The two processes therefore have the same marginals up to that
# scaling, p^trig_t(x) = r^D p_s(r x), and the time map is the one of equal
# log-SNR. A run trained on VP / VE / EDM / rectified flow becomes a TrigFlow
# teacher without retraining.


def trigflow_time(teacher: SDE, s: Array, sigma_data: float) -> Tuple[Array, Array]:
  """The TrigFlow time of the teacher's time s and the scale of its states.

  Args:
    teacher: the teacher's SDE.
    s: teacher times [B].
    sigma_data: TrigFlow's sigma_d.
  Returns:
    (t [B] = arctan(std(s) / (alpha(s) sigma_d)), r [B]) with x_trig = x_s / r,
    r = sqrt(alpha^2 + std^2 / sigma_d^2).
  """
  alpha, std = teacher.mean_coef(s), teacher.marginal_std(s)
  return jnp.arctan2(std, alpha * sigma_data), jnp.sqrt(alpha**2 + (std / sigma_data) ** 2)


def teacher_time(teacher: SDE, trig: TrigFlow, t: Array) -> Tuple[Array, Array]:
  """Inverse of `trigflow_time`: the teacher's time s [B] of TrigFlow time t [B] (equal
  log-SNR) and the scale r [B] = alpha(s) / cos(t) with x_s = r x_trig.

  The times t must map into the teacher's own range [eps, T] (VP's T = 1 reaches
  t = pi/2 - 3.2e-3 at sigma_d = 0.5; VE's sigma_max = 80, t = pi/2 - 6e-3).
  """
  s = teacher.t_from_log_snr(trig.log_snr(t))
  alpha, std = teacher.mean_coef(s), teacher.marginal_std(s)
  return s, jnp.sqrt(alpha**2 + (std / trig.sigma_data) ** 2)


def trigflow_score_fn(teacher: SDE, score_fn: ScoreFn, trig: TrigFlow) -> ScoreFn:
  """A teacher's score function in TrigFlow variables: r(s) score_s(r x, s), s = s(t).

  The chain rule of p^trig_t(x) = r^D p_s(r x); samplers, losses and likelihoods
  on `trig` take it like a TrigFlow network's score.
  """

  def fn(x: Array, t: Array, *args, **kwargs) -> Array:
    s, r = teacher_time(teacher, trig, t)
    return batch_mul(r, score_fn(batch_mul(r, x), s, *args, **kwargs))

  return fn


def trigflow_velocity_fn(teacher: SDE, score_fn: ScoreFn, trig: TrigFlow) -> ScoreFn:
  """The teacher's TrigFlow velocity dx_t/dt = E[cos(t) z - sin(t) x_0 | x_t], [B, ...].

  Written with the teacher's data prediction D = (x_s + std^2 s) / alpha as
  v = (cos(t) x_t - D) / sin(t), which stays finite as t -> pi/2 (v -> -D), where
  the PF-ODE drift -tan(t) (x + sigma_d^2 score) cancels two large terms.
  """

  def fn(x: Array, t: Array, *args, **kwargs) -> Array:
    s, r = teacher_time(teacher, trig, t)
    x_s = batch_mul(r, x)
    std = teacher.marginal_std(s)
    denoised = batch_mul(1.0 / teacher.mean_coef(s),
                         x_s + batch_mul(std**2, score_fn(x_s, s, *args, **kwargs)))
    return batch_mul(1.0 / jnp.sin(t), batch_mul(jnp.cos(t), x) - denoised)

  return fn
