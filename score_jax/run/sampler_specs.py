"""The sampling.* settings each sampler takes, and how they become its arguments.

One declaration per sampler, `SAMPLERS` (sampling.method -> `Sampler`): the
sampler function and the settings it takes, each an `Option` (the field of
`settings.Sampling`, the function's argument, the values a config may give
it). `settings` checks a config's sampling section against the chosen
sampler's declaration; `builders.get_sampler` makes the function's arguments
from the same declaration. A new sampler is a math-layer function plus one
entry here.

The declarations live in the running layer rather than beside the samplers:
they speak of config keys, which the math layer never sees, and a config may
offer less than the function takes (DPM-Solver++'s order 1) or more
(schedule 'optimized': a grid the running layer fits to the model, see
`samplers.time_grids`).

A fixed time grid (`timesteps`, the fitted grid of schedule 'optimized')
replaces the settings that make a grid (num_steps, schedule, eps); they must
agree with it or be unset, else `arguments` raises a ConfigError. The other
settings (order, variant, denoising) still apply.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from score_jax import meanflow
from score_jax.errors import ConfigError
from score_jax.samplers import consistency, fast, ode, pc

__all__ = ["Option", "Sampler", "SAMPLERS", "AVERAGE_VELOCITY", "arguments", "spoken"]

_NOT_SET = object()


def spoken(values: Tuple[Any, ...]) -> str:
  """(1, 2, 3) -> '1, 2 or 3'; strings quoted."""
  words = [repr(v) for v in values]
  return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


@dataclasses.dataclass(frozen=True)
class Option:
  """One sampling.* setting a sampler takes.

  Attributes:
    key: the field of `settings.Sampling` (the config key sampling.<key>).
    arg: the sampler function's argument it sets.
    choices: the values a config may give it; () when `rule` decides.
    rule: (what the value must be, a test of the value), e.g. ('> 0', ...).
    unset: a value meaning "the sampler's own default": the argument is then
      not passed (num_steps 0, schedule '').
    as_arg: (setting, argument) pairs where the two differ.
    from_grid: the value a fixed time grid implies for the setting; a grid
      replaces the setting, which must then be unset or agree with it.
  """
  key: str
  arg: str
  choices: Tuple[Any, ...] = ()
  rule: Optional[Tuple[str, Callable[[Any], bool]]] = None
  unset: Any = _NOT_SET
  as_arg: Tuple[Tuple[Any, Any], ...] = ()
  from_grid: Optional[Callable[[np.ndarray], Any]] = None

  def allows(self, value: Any) -> bool:
    if self.choices:
      return value in self.choices
    return self.rule is None or bool(self.rule[1](value))

  @property
  def says(self) -> str:
    """What a value must be: '1, 2 or 3', '> 0'."""
    return spoken(self.choices) if self.choices else (self.rule[0] if self.rule else "any value")

  def is_unset(self, value: Any) -> bool:
    return self.unset is not _NOT_SET and value == self.unset

  def argument(self, value: Any) -> Any:
    return dict(self.as_arg).get(value, value)

  def agrees_with_grid(self, value: Any, implied: Any) -> bool:
    if self.is_unset(value):
      return True
    if isinstance(implied, float):
      return math.isclose(float(value), implied, rel_tol=1e-5)
    return value == implied


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A sampler: function(rng, sde, score_fn, shape, **arguments, z=..., constraint=...) ->
  (x, nfe), the settings it takes, the argument that takes a fixed time grid (None: it
  takes none), and the model section's keys it takes as arguments of the same names."""
  function: Callable[..., Tuple[Any, Any]]
  options: Tuple[Option, ...]
  grid_arg: Optional[str] = None
  model_args: Tuple[str, ...] = ()

  def option(self, key: str) -> Optional[Option]:
    return next((o for o in self.options if o.key == key), None)


def _positive(v: Any) -> bool:
  return v > 0


def _non_negative(v: Any) -> bool:
  return v >= 0


# Settings several samplers take alike.
_EPS = Option("eps", "eps", rule=("in (0, 1)", lambda v: 0.0 < v < 1.0),
              from_grid=lambda ts: float(ts[-1]))
_DENOISE = Option("noise_removal", "denoise")
_NUM_STEPS = Option("num_steps", "num_steps", rule=(">= 0 (0: the sampler's default)",
                                                    _non_negative),
                    unset=0, from_grid=lambda ts: int(ts.shape[0]) - 1)
_GRID_SCHEDULES = ("",) + tuple(fast.SCHEDULES)  # '': the sampler's default
_SCHEDULE = Option("schedule", "schedule", choices=_GRID_SCHEDULES, unset="")


def _fast(function: Callable, *options: Option, schedule: Option = _SCHEDULE,
          grid_arg: Optional[str] = None) -> Sampler:
  return Sampler(function, (_NUM_STEPS, schedule) + options + (_EPS, _DENOISE), grid_arg)


SAMPLERS: Mapping[str, Sampler] = {
    "pc": Sampler(pc.pc_sample, (
        Option("predictor", "predictor", choices=tuple(pc.PREDICTORS)),
        Option("corrector", "corrector", choices=tuple(pc.CORRECTORS)),
        Option("snr", "snr", rule=("> 0", _positive)),
        Option("n_steps_each", "n_steps", rule=(">= 1", lambda v: v >= 1)),
        Option("probability_flow", "probability_flow"),
        _EPS, _DENOISE)),
    "ode": Sampler(ode.ode_sample, (
        Option("rtol", "rtol", rule=("> 0", _positive)),
        Option("atol", "atol", rule=("> 0", _positive)),
        _EPS, _DENOISE)),
    "ddim": _fast(fast.ddim_sample, Option("eta", "eta", rule=(">= 0", _non_negative))),
    "heun": _fast(fast.heun_sample, Option("s_churn", "s_churn", rule=(">= 0", _non_negative))),
    "dpm_solver": _fast(fast.dpm_solver_pp_sample, Option("order", "order", choices=(2, 3))),
    # 'optimized' without a fitted grid (snapshot samples in training) is the logSNR grid.
    "unipc": _fast(fast.unipc_sample, Option("order", "order", choices=(1, 2, 3)),
                   Option("unipc_variant", "variant", choices=tuple(fast.UNIPC_VARIANTS)),
                   schedule=dataclasses.replace(
                       _SCHEDULE, choices=_GRID_SCHEDULES + ("optimized",),
                       as_arg=(("optimized", "logSNR"),), from_grid=lambda ts: "optimized"),
                   grid_arg="timesteps"),
    # MeanFlow's jumps along an average-velocity network (training.objective = 'meanflow'):
    # the programs pass u(z, r, t) where the others take a score.
    "meanflow": Sampler(meanflow.sampler, (dataclasses.replace(
        _NUM_STEPS, rule=(">= 0 (0: one step)", _non_negative), from_grid=None),)),
    # Consistency models' jumps to the data, re-noised between steps (iCT, ECT, sCT, sCD).
    "consistency": Sampler(consistency.consistency_sample, (
        dataclasses.replace(_NUM_STEPS, rule=(">= 0 (0: one step)", _non_negative),
                            from_grid=None),
        Option("consistency_sigmas", "sigmas",
               rule=("decreasing noise levels > 0, num_steps - 1 of them ((): the default)",
                     lambda v: isinstance(v, tuple) and all(
                         isinstance(a, (int, float)) and a > 0 for a in v) and all(
                             a > b for a, b in zip(v, v[1:]))),
               unset=())),
        model_args=("sigma_data",)),
}
# The samplers that take an average velocity u(z, r, t) instead of a score.
AVERAGE_VELOCITY = ("meanflow",)


def arguments(sampling: Any, timesteps: Optional[Any] = None) -> Dict[str, Any]:
  """The keyword arguments of sampling.method's function from the sampling settings.

  Args:
    sampling: a `settings.Sampling`.
    timesteps: a fixed time grid [N + 1] from T down to its last time, or None.

  Raises:
    ConfigError: the sampler takes no fixed grid, or a setting the grid
      replaces disagrees with it (num_steps != N, eps != its last time, a
      schedule other than 'optimized').
  """
  method = sampling.method.lower()
  spec = SAMPLERS[method]
  grid = None
  if timesteps is not None:
    if spec.grid_arg is None:
      takers = [m for m, s in SAMPLERS.items() if s.grid_arg is not None]
      raise ConfigError(f"sampling.method = {method!r} takes no fixed time grid (timesteps); "
                        f"{spoken(tuple(takers))} does.")
    grid = np.asarray(timesteps)
    if grid.ndim != 1 or grid.shape[0] < 2:
      raise ValueError(f"timesteps must be a 1-D grid of >= 2 times, got shape {grid.shape}.")
    _check_grid(spec, sampling, grid)
  kwargs: Dict[str, Any] = {}
  for opt in spec.options:
    value = getattr(sampling, opt.key)
    if (grid is not None and opt.from_grid is not None) or opt.is_unset(value):
      continue
    kwargs[opt.arg] = opt.argument(value)
  if grid is not None:
    kwargs[spec.grid_arg] = grid
  return kwargs


def _check_grid(spec: Sampler, sampling: Any, grid: np.ndarray) -> None:
  """The settings a fixed grid replaces agree with it (or are unset)."""
  ts = np.asarray(grid, np.float64)
  replaced = [opt for opt in spec.options if opt.from_grid is not None]
  wrong = []
  for opt in replaced:
    value, implied = getattr(sampling, opt.key), opt.from_grid(ts)
    if not opt.agrees_with_grid(value, implied):
      fix = repr(implied) + (f" or {opt.unset!r}" if opt.unset is not _NOT_SET else "")
      wrong.append(f"sampling.{opt.key} = {value!r} (the grid's: {implied!r}; set {fix})")
  if wrong:
    raise ConfigError(f"The fixed time grid (timesteps: {ts.shape[0] - 1} steps from {ts[0]:g} "
                      f"to {ts[-1]:g}) replaces {', '.join('sampling.' + o.key for o in replaced)}, and "
                      f"disagrees with {'; '.join(wrong)}.")
