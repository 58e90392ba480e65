"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", EDM2): choose the EMA length after training.

  python main.py --config=configs/toy.py --workdir=runs/toy --mode=train \\
      --config.model.phema_sigma_rels="(0.05,0.1)" --config.training.phema_snapshot_freq=200
  python -m score_jax.convert.phema --workdir=runs/toy --sigma_rel=0.08
  python main.py --config=runs/toy/phema/sigma_rel_0.0800/config.json \\
      --workdir=runs/toy/phema/sigma_rel_0.0800 --mode=sample

Training tracks power-function EMAs (model.phema_sigma_rels; EDM2 tracks
0.05 and 0.10) in the train state. The profile of exponent gamma after T
updates averages the parameters with weight (gamma + 1) tau^gamma /
T^(gamma + 1) over the training time tau in [0, T] (the parameters theta_t
held over the step (t - 1, t]); its update is e <- beta_t e + (1 - beta_t)
theta_t with beta_t = (1 - 1/t)^(gamma + 1), which gives theta_t the weight
(t^(gamma+1) - (t-1)^(gamma+1)) / T^(gamma+1), the profile's mass on that
step, exactly. The width of a profile is its standard deviation relative to
T, sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))), from 0 (gamma
-> inf) to 1/sqrt(12) (gamma = 0, the uniform average).

Every training.phema_snapshot_freq steps (and at the last step) the tracked
profiles are written to WORKDIR/phema/phema-<step>.npz. Any other profile
(sigma_rel, step T) is then a linear combination of the snapshots' profiles:
`solve_coefficients` finds the combination, with coefficients summing to 1,
whose averaging profile is closest in L2 over [0, T] to the target's (inner
products of truncated power functions in closed form, one small
least-squares system), and `reconstruct` applies the coefficients to the
stored parameters. The relative L2 residual of the profile bounds the error:
for each parameter, |reconstruction - direct EMA| <= residual * |p_target|
* |theta - c| (Cauchy-Schwarz over the steps, any constant c), so a small
residual means a close reconstruction. `write_workdir` stores the result as
a normal workdir (config.json + checkpoints/<T>, the reconstruction as the
EMA parameters) that --mode=eval, --mode=sample and `score_jax.load_run` read.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from score_jax import files
from score_jax.errors import ConfigError, UserError, WorkdirError

from score_jax.run.phema import (SIGMA_REL_MAX, NoSnapshotsError, Snapshot, _check_sigma_rel,
                                 _leaves, list_snapshots, sigma_rel_to_gamma, snapshot_dir)

__all__ = ["profile_inner_products", "solve_coefficients", "Reconstruction", "reconstruct",
           "write_workdir", "main"]

_MARKER = "phema.json"  # in a reconstructed workdir: where it came from, coefficients, residual


def profile_inner_products(gamma_a, t_a, gamma_b, t_b) -> np.ndarray:
  """<p_a, p_b> = integral over tau of p_a(tau) p_b(tau), broadcast over the arguments.

  p(tau) = (gamma + 1) tau^gamma / T^(gamma + 1) on [0, T], 0 after: the
  product integrates over [0, min(T_a, T_b)] to (gamma_a + 1)(gamma_b + 1) /
  (gamma_a + gamma_b + 1) min^(gamma_a + gamma_b + 1) / (T_a^(gamma_a + 1)
  T_b^(gamma_b + 1)), evaluated in logarithms (large exponents).
  """
  ga, ta, gb, tb = (np.asarray(v, np.float64) for v in (gamma_a, t_a, gamma_b, t_b))
  lo = np.minimum(ta, tb)
  log_ratio = (ga + gb + 1) * np.log(lo) - (ga + 1) * np.log(ta) - (gb + 1) * np.log(tb)
  return (ga + 1) * (gb + 1) / (ga + gb + 1) * np.exp(log_ratio)


def solve_coefficients(sigma_rels: Sequence[float], steps: Sequence[float], sigma_rel: float,
                       step: float) -> Tuple[np.ndarray, float]:
  """Coefficients x [n] of the source profiles whose combination best matches the target.

  Minimizes |sum_i x_i p_i - p_target|_L2 subject to sum_i x_i = 1 (so that
  parameters that never change are reproduced exactly): the stationarity
  conditions of the Lagrangian, [[G, 1], [1^T, 0]] [x; lambda] = [b; 1] with
  G_ij = <p_i, p_j> and b_i = <p_i, p_target>, solved by least squares
  (snapshots close in time make G nearly singular). Times are divided by the
  target's, which scales every inner product alike.

  Args:
    sigma_rels, steps: each source profile's relative width and time (steps > 0).
    sigma_rel, step: the target profile's.
  Returns:
    (x, residual): the coefficients, and |sum x_i p_i - p_target| / |p_target|.
  """
  src_g = np.asarray([sigma_rel_to_gamma(s) for s in sigma_rels], np.float64)
  src_t = np.asarray(steps, np.float64) / float(step)
  if src_g.shape != src_t.shape or src_g.ndim != 1 or not src_g.size:
    raise ValueError(f"sigma_rels and steps must be two equally long, non-empty lists, got "
                     f"{len(sigma_rels)} and {len(steps)}.")
  if not np.all(src_t > 0):
    raise ValueError(f"Source steps must be > 0, got {list(steps)}.")
  g = sigma_rel_to_gamma(sigma_rel)
  n = src_g.size
  gram = profile_inner_products(src_g[:, None], src_t[:, None], src_g[None, :], src_t[None, :])
  b = profile_inner_products(src_g, src_t, g, 1.0)
  kkt = np.zeros((n + 1, n + 1))
  kkt[:n, :n], kkt[:n, n], kkt[n, :n] = gram, 1.0, 1.0
  solution = np.linalg.lstsq(kkt, np.concatenate([b, [1.0]]), rcond=None)[0]
  x = solution[:n]
  x = x / x.sum()  # exact in theory; removes the solver's rounding of the constraint
  target_sq = (g + 1) ** 2 / (2 * g + 1)  # <p_target, p_target> at T = 1
  err_sq = x @ gram @ x - 2 * x @ b + target_sq
  return x, float(math.sqrt(max(err_sq, 0.0) / target_sq))


# ---------------------------------------------------------------------------
# Snapshots


@dataclasses.dataclass(frozen=True)
class Reconstruction:
  """The parameters of the EMA profile `sigma_rel` at `step`, made from stored snapshots."""
  sigma_rel: float
  step: int
  params: Dict[str, np.ndarray]  # flattened ('Dense_0/kernel' -> float32 array)
  snapshot_steps: Tuple[int, ...]  # [S] the snapshots used
  source_sigma_rels: Tuple[float, ...]  # [P] their profiles used
  coefficients: np.ndarray  # [S, P], summing to 1
  residual: float  # |sum x p - p_target| / |p_target|, L2 over [0, step]

  def summary(self) -> Dict[str, Any]:
    return {"sigma_rel": self.sigma_rel, "gamma": sigma_rel_to_gamma(self.sigma_rel),
            "step": self.step, "residual": self.residual,
            "snapshot_steps": list(self.snapshot_steps),
            "source_sigma_rels": list(self.source_sigma_rels),
            "coefficients": self.coefficients.tolist()}


def _select(snapshots: List[Snapshot], step: Optional[int],
            workdir: str) -> Tuple[int, List[Snapshot]]:
  """(the target step, the snapshots up to it) of --step (None or < 0: the newest)."""
  if not snapshots:
    raise NoSnapshotsError(
        f"{snapshot_dir(workdir)} holds no post-hoc EMA snapshots: train with "
        "--config.model.phema_sigma_rels='(0.05,0.1)' and "
        "--config.training.phema_snapshot_freq=<steps> to record them.")
  steps = [s.step for s in snapshots]
  if step is None or step < 0:
    step = steps[-1]
  if step not in steps:
    shown = steps if len(steps) <= 8 else steps[:3] + ["..."] + steps[-3:]
    raise NoSnapshotsError(f"No post-hoc EMA snapshot of step {step} in {snapshot_dir(workdir)}; "
                           f"present: {', '.join(map(str, shown))} ({len(steps)} snapshots).")
  return step, [s for s in snapshots if 0 < s.step <= step]


def _source_indices(snapshot: Snapshot, use: Optional[Sequence[float]]) -> List[int]:
  if use is None:
    return list(range(len(snapshot.sigma_rels)))
  indices = []
  for s in use:
    close = [i for i, r in enumerate(snapshot.sigma_rels) if math.isclose(r, s, rel_tol=1e-6)]
    if not close:
      raise ConfigError(f"Snapshot {snapshot.path} tracks sigma_rel {list(snapshot.sigma_rels)}, "
                        f"not {s}; choose the sources from those.")
    indices.append(close[0])
  return indices


def reconstruct(workdir: str, sigma_rel: float, step: Optional[int] = None,
                from_sigma_rels: Optional[Sequence[float]] = None) -> Reconstruction:
  """The EMA profile `sigma_rel` at snapshot `step` (default the newest), by least squares.

  Args:
    workdir: a run trained with model.phema_sigma_rels (snapshots in WORKDIR/phema).
    sigma_rel: the target's relative width, in (0, 1/sqrt(12)].
    step: the time of the target profile, a snapshot's step; the snapshots up
      to it are the sources.
    from_sigma_rels: the tracked profiles to use (default all).
  Raises:
    NoSnapshotsError: no snapshots (post-hoc EMA was off), or none of `step`.
    ConfigError: sigma_rel out of range, or a source the snapshots lack.
  """
  sigma_rel = _check_sigma_rel(sigma_rel)
  step, used = _select(list_snapshots(workdir), step, workdir)
  picks = [_source_indices(s, from_sigma_rels) for s in used]
  rels = [s.sigma_rels[i] for s, idx in zip(used, picks) for i in idx]
  times = [s.step for s, idx in zip(used, picks) for _ in idx]
  x, residual = solve_coefficients(rels, times, sigma_rel, step)
  total: Dict[str, np.ndarray] = {}
  k = 0
  for snapshot, idx in zip(used, picks):
    for i in idx:
      for name, value in snapshot.profile(i).items():
        term = x[k] * value.astype(np.float64)
        total[name] = total[name] + term if name in total else term
      k += 1
  params = {name: v.astype(np.float32) for name, v in total.items()}
  width = max(len(p) for p in picks)
  coefficients = np.full((len(used), width), np.nan)
  k = 0
  for row, idx in enumerate(picks):
    coefficients[row, :len(idx)] = x[k:k + len(idx)]
    k += len(idx)
  sources = tuple(used[-1].sigma_rels[i] for i in picks[-1])
  return Reconstruction(sigma_rel=sigma_rel, step=step, params=params,
                        snapshot_steps=tuple(s.step for s in used), source_sigma_rels=sources,
                        coefficients=coefficients, residual=residual)


def default_out(workdir: str, sigma_rel: float) -> str:
  return os.path.join(snapshot_dir(workdir), f"sigma_rel_{sigma_rel:.4f}")


def _check_out(out: str, workdir: str, sigma_rel: float, step: int) -> Optional[Dict[str, Any]]:
  """The marker of a previous reconstruction in `out` (None: out is new or empty); else raises."""
  from score_jax.run import checkpoints  # pylint: disable=g-import-not-at-top

  if os.path.exists(out) and not os.path.isdir(out):
    raise FileExistsError(f"--out {out} is a file; choose a new folder.")
  if not os.path.isdir(out) or not os.listdir(out):
    return None
  marker = files.read_json(os.path.join(out, _MARKER))
  if (marker is None or os.path.realpath(marker.get("workdir", "")) != os.path.realpath(workdir)
      or not math.isclose(marker.get("sigma_rel", -1.0), sigma_rel, rel_tol=1e-9)):
    raise FileExistsError(f"--out {out} exists and is not a post-hoc EMA reconstruction of "
                          f"sigma_rel {sigma_rel} from {workdir}; refusing to write into it. "
                          "Choose a new folder.")
  if step in checkpoints.finished_steps(os.path.join(out, "checkpoints")):
    raise FileExistsError(f"{out} already holds the reconstruction of step {step}; it is kept.")
  return marker


def write_workdir(workdir: str, result: Reconstruction, out: Optional[str] = None) -> str:
  """Writes `result` as checkpoint result.step of a normal workdir `out` (EMA params = result).

  out (default WORKDIR/phema/sigma_rel_<S>) gets WORKDIR's config.json, a
  checkpoint holding the reconstruction as params and EMA params (a fresh
  optimizer state; the tracked profiles of that step, so the state has the
  run's structure) and phema.json (sources, coefficients, residual per
  step). A new `out` is assembled in a temporary folder and renamed into
  place; an existing one must be a previous reconstruction of the same
  sigma_rel and workdir, which gets the new step beside its others.

  Returns:
    The checkpoint folder, out/checkpoints/<step>.
  Raises:
    FileExistsError: out holds something else, or this step already.
  """
  # pylint: disable-next=g-import-not-at-top
  from score_jax.run import checkpoints
  from score_jax.run import plan as plan_lib
  from score_jax.run import settings as settings_lib
  from score_jax.run import state as run_state

  workdir = os.path.abspath(workdir)
  out = os.path.abspath(out or default_out(workdir, result.sigma_rel))
  if out == workdir or out.startswith(os.path.join(workdir, "checkpoints") + os.sep):
    raise FileExistsError(f"--out {out} is the run's own workdir or checkpoints; choose a new "
                          "folder (the default is WORKDIR/phema/sigma_rel_<S>).")
  marker = _check_out(out, workdir, result.sigma_rel, result.step)
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise WorkdirError(f"{workdir} has no config.json: not a score_jax run.")
  settings = settings_lib.from_json(config_path)
  plan = plan_lib.make_plan(settings, need_data=False)
  template = run_state.abstract_state(plan)
  expected = {k: (v.shape, v.dtype) for k, v in _leaves(template.params).items()}
  got = {k: v.shape for k, v in result.params.items()}
  if {k: s for k, (s, _) in expected.items()} != got:
    raise UserError(f"The snapshots in {snapshot_dir(workdir)} do not fit the network of "
                    f"{config_path} (parameters {sorted(set(got) ^ set(expected))[:5]} or their "
                    "shapes differ); were they written by another run?")
  params = files.unflatten({k: result.params[k].astype(expected[k][1]) for k in expected})
  params = jax.device_put(params, plan.replicated)
  fields = dict(step=jnp.asarray(result.step, jnp.int32), params=params,
                opt_state=jax.jit(plan.tx.init)(params), ema_params=params)
  if isinstance(template, run_state.PhemaTrainState):
    snapshot = next(s for s in list_snapshots(workdir) if s.step == result.step)
    if len(snapshot.sigma_rels) != len(template.phema):
      raise UserError(f"{snapshot.path} holds {len(snapshot.sigma_rels)} profiles, the config "
                      f"{len(template.phema)}; were the snapshots written by another run?")
    fields["phema"] = tuple(jax.device_put(files.unflatten(snapshot.profile(i)), plan.replicated)
                            for i in range(len(template.phema)))
  state = template.replace(**fields)
  record = {"workdir": workdir, "sigma_rel": result.sigma_rel,
            "gamma": sigma_rel_to_gamma(result.sigma_rel),
            "steps": {**(marker or {}).get("steps", {}), str(result.step): result.summary()}}

  def save(folder: str) -> None:
    ck = checkpoints.Checkpointer(os.path.join(folder, "checkpoints"), keep_period=1,
                                  async_save=False)  # keeps every step
    try:
      ck.save(result.step, state)
    finally:
      ck.close()
    files.write_json(os.path.join(folder, _MARKER), record)

  if marker is not None:  # a previous reconstruction: orbax writes the new step atomically
    save(out)
  else:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.writing-", dir=os.path.dirname(out))
    try:
      run_state.save_config(settings, tmp)
      save(tmp)
      if os.path.isdir(out):
        os.rmdir(out)  # empty (checked); the rename then puts out in place complete
      os.rename(tmp, out)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  return os.path.join(out, "checkpoints", str(result.step))


# ---------------------------------------------------------------------------
# Command line


_USAGE = ("python -m score_jax.convert.phema --workdir=WORKDIR --sigma_rel=S [--step=N] [--out=DIR] "
          "[--from_sigma_rels=0.05,0.1]")


def _define_flags(fv: Any, argv: List[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("workdir", None, "A run trained with model.phema_sigma_rels.",
                      flag_values=fv)
  flags.DEFINE_float("sigma_rel", None, "Relative width of the EMA to reconstruct, in "
                     f"(0, {SIGMA_REL_MAX:.4f}].", flag_values=fv)
  flags.DEFINE_integer("step", None, "Snapshot step to reconstruct at (default: the newest).",
                       flag_values=fv)
  flags.DEFINE_string("out", None, "Workdir to write (default WORKDIR/phema/sigma_rel_<S>).",
                      flag_values=fv)
  flags.DEFINE_list("from_sigma_rels", None, "Tracked profiles to use (default: all).",
                    flag_values=fv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m score_jax.convert.phema ...`; returns the exit status (score_jax.run.cli)."""
  from score_jax.run import cli  # pylint: disable=g-import-not-at-top

  parsed = cli.parse(argv, _define_flags, _USAGE, 0, doc="\n\n".join(__doc__.split("\n\n")[:2]))
  if parsed is None or parsed[0].workdir is None or parsed[0].sigma_rel is None:
    if parsed is not None:
      print(f"usage: {_USAGE}", file=sys.stderr)
    return cli.USAGE_ERROR
  fv = parsed[0]

  def run() -> int:
    if not os.path.isdir(fv.workdir):
      raise WorkdirError(f"--workdir {fv.workdir} is not a folder.")
    try:
      use = None if fv.from_sigma_rels is None else [float(v) for v in fv.from_sigma_rels]
    except ValueError as e:
      raise ConfigError(f"--from_sigma_rels must be numbers, e.g. 0.05,0.1 ({e}).") from e
    sigma_rel = _check_sigma_rel(fv.sigma_rel)
    step, _ = _select(list_snapshots(fv.workdir), fv.step, fv.workdir)
    out = os.path.abspath(fv.out or default_out(fv.workdir, sigma_rel))
    _check_out(out, os.path.abspath(fv.workdir), sigma_rel, step)  # before reading the snapshots
    result = reconstruct(fv.workdir, sigma_rel, step, use)
    path = write_workdir(fv.workdir, result, out)
    out = os.path.dirname(os.path.dirname(path))
    print(f"Wrote {path}: EMA sigma_rel {result.sigma_rel:g} (gamma "
          f"{sigma_rel_to_gamma(result.sigma_rel):.4g}) at step {result.step}, from "
          f"{len(result.snapshot_steps)} snapshots (steps {result.snapshot_steps[0]}.."
          f"{result.snapshot_steps[-1]}) of the profiles {list(result.source_sigma_rels)}; "
          f"profile residual {result.residual:.3g} (relative L2).")
    cli.print_next_steps(out, result.step, "sample it or load it with score_jax.load_run")
    return 0

  return cli.report_user_errors(run)


if __name__ == "__main__":
  from score_jax.run import xla_flags  # pylint: disable=g-import-not-at-top
  xla_flags.apply_defaults()
  sys.exit(main())
