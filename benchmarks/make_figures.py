"""Pictures of trained runs, small PNGs for the README and docs/.

  python benchmarks/make_figures.py --toy_workdir=runs/toy --digits_workdir=runs/digits \
      [--out=DIR] [--grid=48] [--samples=2048] [--seed=0]

--out defaults to a folder outside the repository ($TMPDIR/score_jax_figures);
--out=docs/figures replaces the figures the README and docs show (the first
line says which files it replaces). One line per figure with its seconds.

From a toy run (configs/toy.py), newest checkpoint, EMA parameters:
  toy_samples.png       samples of the configured sampler beside the test data
  toy_score_field.png   the learned score at a few t, as arrows: sigma_t * score,
                        the network's noise prediction up to sign (the score
                        itself grows like 1 / sigma_t and would not fit one scale)
  toy_density.png       exp(log p) from the likelihood (probability-flow ODE, exact
                        trace) on a --grid x --grid grid, beside a histogram of the data
  toy_trajectories.png  probability-flow ODE paths from prior draws at t = T to eps
  toy_loss.png          training loss (metrics.jsonl) and eval loss (eval/ckpt_*.json)
From a digits run (configs/digits.py):
  digits_samples.png    a grid of samples of the configured sampler
  digits_denoising.png  samples along the probability-flow ODE from t = T to eps
                        (times evenly spaced in log-SNR), then the denoised result
  digits_loss.png       as toy_loss.png
Either workdir may be left out. The config is the run's WORKDIR/config.json.
On two CPU cores the toy figures take a few minutes (mostly the density: 48 x 48
likelihood solves), the digits figures well under a minute. Class-conditional
runs: samples cycle through the classes; the score field and density are class 0's.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from score_jax.run import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # main.py's CPU compiler settings, before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from score_jax import likelihood, plotting
from score_jax.data import datasets
from score_jax.samplers import fast as fast_samplers
from score_jax.run import programs  # noqa: E402
from score_jax.run import builders
from score_jax.run import plan as plan_lib
from score_jax.samplers import probability_flow  # noqa: E402
from score_jax.sde import SDE  # noqa: E402

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

MAX_BYTES = 150_000  # a README figure above this is too heavy
DEFAULT_OUT = os.path.join(tempfile.gettempdir(), "score_jax_figures")  # not the repository
_COLORS = "viridis"

# ----------------------------------------------------------------------------
# What the figures show (tests/test_figures.py checks these against closed forms)


def plot_range(data: np.ndarray, margin: float = 0.15) -> Tuple[float, float]:
  """A square window [lo, hi]^2 around 2-D data (0.5-99.5 percentiles plus a margin)."""
  lo, hi = np.percentile(data, 0.5), np.percentile(data, 99.5)
  pad = margin * (hi - lo)
  return float(lo - pad), float(hi + pad)


def grid_points(lo: float, hi: float, n: int) -> Tuple[np.ndarray, np.ndarray]:
  """(axis [n] cell centres, points float32 [n * n, 2]); points[i * n + j] = (axis[j], axis[i])."""
  edges = np.linspace(lo, hi, n + 1)
  axis = 0.5 * (edges[1:] + edges[:-1])
  xx, yy = np.meshgrid(axis, axis)
  return axis, np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float32)


def score_field(score_fn: ScoreFn, points: np.ndarray, t: float) -> np.ndarray:
  """score_fn at points [N, D] and time t: [N, D]."""
  x = jnp.asarray(points)
  return np.asarray(jax.jit(score_fn)(x, jnp.full((x.shape[0],), t, x.dtype)))


def pf_trajectories(sde: SDE, score_fn: ScoreFn, z: Array, ts: Sequence[float],
                    rtol: float = 1e-5, atol: float = 1e-5) -> np.ndarray:
  """States [K, B, ...] of the probability-flow ODE started at z [B, ...] at time ts[0].

  The same adaptive solve as score_jax.samplers.pc.ode_sample (Tsit5, PID control,
  same first step), read out at ts by the solver's dense output; with
  ts[0] = T and ts[-1] = eps the last state is ode_sample(..., z=z, denoise=False).
  """
  z = jnp.asarray(z)
  ts = jnp.asarray(ts, z.dtype)

  @jax.jit
  def run(z, ts):
    def vector_field(t, x):
      return probability_flow.drift(sde, score_fn, x, jnp.full((x.shape[0],), t, x.dtype))
    ys, _ = probability_flow.solve(vector_field, z, ts[0], ts[-1], rtol, atol, ts=ts)
    return ys

  return np.asarray(run(z, ts))


def tweedie_denoise(sde: SDE, score_fn: ScoreFn, x: Array, t: float) -> np.ndarray:
  """E[x_0 | x_t] = (x + std(t)^2 score) / alpha(t), the samplers' final denoising step."""
  x = jnp.asarray(x)
  tt = jnp.full((x.shape[0],), t, x.dtype)
  alpha, std = sde.mean_coef(tt), sde.marginal_std(tt)
  shape = (-1,) + (1,) * (x.ndim - 1)
  out = (x + (std**2).reshape(shape) * score_fn(x, tt)) / alpha.reshape(shape)
  return np.asarray(out)


def log_density(sde: SDE, score_fn: ScoreFn, points: np.ndarray, eps: float = 1e-5,
                rtol: float = 1e-5, atol: float = 1e-5, batch: int = 4096) -> np.ndarray:
  """log p_eps at points [N, D] in nats: score_jax.likelihood with the exact trace."""
  fn = jax.jit(lambda x: likelihood.log_likelihood(jax.random.PRNGKey(0), sde, score_fn, x,
                                                   hutchinson="exact", rtol=rtol, atol=atol,
                                                   eps=eps)[0])
  return np.concatenate([np.asarray(fn(jnp.asarray(points[i:i + batch])))
                         for i in range(0, points.shape[0], batch)])


def loss_curve(workdir: str) -> Dict[str, np.ndarray]:
  """Training loss by step (metrics.jsonl; a resumed run's repeated steps keep the last
  record) and the eval loss of evaluated checkpoints (eval/ckpt_*.json), if any."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {path}: not a training run's workdir?")
  by_step: Dict[int, float] = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        by_step[int(record["step"])] = float(record["loss"])
  evals = {}
  for name in glob.glob(os.path.join(workdir, "eval", "ckpt_*.json")):
    with open(name) as f:
      record = json.load(f)
    if "eval_loss" in record:
      evals[int(record["step"])] = float(record["eval_loss"])
  steps = np.array(sorted(by_step), np.int64)
  eval_steps = np.array(sorted(evals), np.int64)
  return {"step": steps, "loss": np.array([by_step[s] for s in steps]),
          "eval_step": eval_steps, "eval_loss": np.array([evals[s] for s in eval_steps])}


def denoising_times(sde: SDE, num: int, eps: float) -> np.ndarray:
  """num times from T to eps, evenly spaced in log-SNR (where the picture changes)."""
  return np.asarray(fast_samplers.time_grid(sde, num - 1, "logSNR", eps), np.float64)


# ----------------------------------------------------------------------------
# Drawing


def _data_background(ax, data: np.ndarray, max_points: int = 1000) -> None:
  pts = data[:max_points]  # more points add file size, not information
  ax.scatter(pts[:, 0], pts[:, 1], s=1, c="0.75", alpha=0.6)


def draw_score_field(path: str, sde: SDE, score_fn: ScoreFn, data: np.ndarray,
                     times: Sequence[float], n: int = 15) -> None:
  lo, hi = plot_range(data)
  _, points = grid_points(lo, hi, n)
  fig, axes = plt.subplots(1, len(times), figsize=(2.6 * len(times), 2.9), squeeze=False)
  for ax, t in zip(axes[0], times):
    std = float(sde.marginal_std(jnp.full((1,), t))[0])
    v = std * score_field(score_fn, points, t)
    _data_background(ax, data)
    ax.quiver(points[:, 0], points[:, 1], v[:, 0], v[:, 1], np.hypot(v[:, 0], v[:, 1]),
              cmap=_COLORS, angles="xy", scale_units="xy", scale=np.abs(v).max() / (hi - lo) * n,
              width=0.006)
    ax.set(xlim=(lo, hi), ylim=(lo, hi), aspect="equal", xticks=[], yticks=[],
           title=f"t = {t:g}")
  fig.suptitle(r"learned score, $\sigma_t \cdot \nabla_x \log p_t(x)$")
  plotting.save_figure(path, fig, dpi=80)


def draw_density(path: str, logp: np.ndarray, axis: np.ndarray, data: np.ndarray,
                 lo: float, hi: float) -> None:
  n = axis.shape[0]
  density = np.exp(logp.reshape(n, n))
  hist, _, _ = np.histogram2d(data[:, 1], data[:, 0], bins=n, range=[[lo, hi], [lo, hi]],
                              density=True)
  # One color scale for both; a model density far more peaked than the data saturates.
  vmax = max(hist.max(), np.percentile(density, 99.0))
  fig, axes = plt.subplots(1, 2, figsize=(8, 4))
  for ax, img, title in ((axes[0], density, "model density (probability-flow ODE)"),
                         (axes[1], hist, f"data histogram ({len(data)} points)")):
    ax.imshow(img, origin="lower", extent=(lo, hi, lo, hi), cmap=_COLORS, vmin=0, vmax=vmax,
              interpolation="nearest")
    ax.set(title=title, xticks=[], yticks=[])
  plotting.save_figure(path, fig)


def draw_trajectories(path: str, paths: np.ndarray, data: np.ndarray) -> None:
  """paths [K, B, 2] from t = T (first) to eps (last)."""
  lo, hi = plot_range(np.concatenate([data, paths[0]]))
  fig, ax = plt.subplots(figsize=(4.2, 4.2))
  _data_background(ax, data)
  ax.plot(paths[:, :, 0], paths[:, :, 1], color="tab:blue", lw=0.4, alpha=0.35)
  ax.scatter(paths[0, :, 0], paths[0, :, 1], s=3, c="0.4", label="t = T (prior)")
  ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=3, c="tab:red", label="t = eps")
  ax.set(xlim=(lo, hi), ylim=(lo, hi), aspect="equal", xticks=[], yticks=[],
         title="probability-flow ODE trajectories")
  ax.legend(loc="lower right", fontsize=7, markerscale=2)
  plotting.save_figure(path, fig)


def draw_denoising(path: str, times: np.ndarray, frames: np.ndarray) -> None:
  """frames [K + 1, B, H, W, C] in [0, 1]: B rows, the states at times [K], then denoised."""
  cols, rows = frames.shape[0], frames.shape[1]
  fig, axes = plt.subplots(rows, cols, figsize=(0.9 * cols, 0.95 * rows + 0.3), squeeze=False)
  for j in range(cols):
    for i in range(rows):
      img = np.clip(frames[j, i], 0.0, 1.0)
      ax = axes[i, j]
      ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1,
                interpolation="nearest")
      ax.set(xticks=[], yticks=[])
    axes[0, j].set_title(f"t={times[j]:.2g}" if j < len(times) else "denoised", fontsize=7)
  plotting.save_figure(path, fig)


def draw_loss(path: str, curve: Dict[str, np.ndarray], title: str) -> None:
  fig, ax = plt.subplots(figsize=(5, 3.2))
  steps, loss = curve["step"], curve["loss"]
  ax.plot(steps, loss, color="tab:blue", lw=0.8, alpha=0.4, label="training loss")
  if len(loss) >= 5:  # a running mean over ~5% of the records
    w = max(len(loss) // 20, 2)
    smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
    ax.plot(steps[w - 1:], smooth, color="tab:blue", lw=1.5, label=f"mean of {w} records")
  if len(curve["eval_step"]):
    ax.plot(curve["eval_step"], curve["eval_loss"], "o-", color="tab:red", ms=4,
            label="eval loss (EMA, test split)")
  if np.all(loss > 0):
    ax.set_yscale("log")
  ax.set(xlabel="step", ylabel="loss", title=title)
  ax.legend(fontsize=7)
  plotting.save_figure(path, fig)


# ----------------------------------------------------------------------------
# From workdirs


def _network(workdir: str, step: int):
  """(config, sde, score_for(n) -> score_fn, sampler(rng, n) -> x) of a trained run."""
  from benchmarks import _workdir  # pylint: disable=g-import-not-at-top

  config = _workdir.load_settings(workdir)
  setup, params, step = _workdir.load_run(workdir, config, step)
  progs = programs.Programs(setup)
  sde, factory = setup.sde, progs.factory
  num_classes = config.model.num_classes

  def score_for(cycle: bool = True) -> ScoreFn:
    """The score; for class-conditional runs with labels 0, 1, 2, ... (cycle) or all 0."""
    if num_classes == 0:
      return factory(params, None)

    def score_fn(x, t):
      labels = jnp.arange(x.shape[0]) % num_classes if cycle else jnp.zeros(x.shape[:1])
      return factory(params, labels.astype(jnp.int32))(x, t)

    return score_fn

  sampler = builders.get_sampler(config, sde)

  def sample(rng, n: int) -> np.ndarray:
    shape = config.data.shape(n)
    x, _ = jax.jit(lambda r: sampler(r, score_for(), shape))(rng)
    return np.asarray(x)

  return config, sde, score_for, sample, step


def _test_data(config, n: int) -> np.ndarray:
  return np.asarray(next(iter(plan_lib.get_dataset(
      config, "test", evaluation=True, batch_size=n, process_index=0, process_count=1)))["image"])


TOY_FIGURES = ("toy_samples.png", "toy_score_field.png", "toy_density.png",
               "toy_trajectories.png", "toy_loss.png")
DIGITS_FIGURES = ("digits_samples.png", "digits_denoising.png", "digits_loss.png")


def _figure(out: str, name: str, draw: Callable[[str], None], files: List[str]) -> None:
  """draw(path) of out/name, then one line: the path, its seconds, and whether it replaced a
  file."""
  path = os.path.join(out, name)
  existed = os.path.exists(path)
  start = time.perf_counter()
  draw(path)
  files.append(path)
  print(f"  {path}: {time.perf_counter() - start:.1f} s"
        + ("  (replaced the file that was there)" if existed else ""), flush=True)


def toy_figures(workdir: str, out: str, *, grid: int = 48, samples: int = 2048,
                trajectories: int = 200, seed: int = 0, step: int = -1,
                likelihood_tol: float = 1e-5) -> List[str]:
  config, sde, score_for, sample, step = _network(workdir, step)
  eps = float(config.sampling.eps)
  rng = jax.random.PRNGKey(seed)
  data = _test_data(config, 4096)
  files: List[str] = []
  _figure(out, "toy_samples.png", lambda path: plotting.save_scatter(
      path, sample(jax.random.fold_in(rng, 0), samples)[:samples], data,
      title=f"toy: {config.data.toy_name}, step {step}, {config.sampling.method} sampler"),
      files)
  times = tuple(sde.T * f for f in (0.01, 0.1, 0.3, 1.0))
  _figure(out, "toy_score_field.png",
          lambda path: draw_score_field(path, sde, score_for(cycle=False), data, times), files)
  lo, hi = plot_range(data)
  axis, points = grid_points(lo, hi, grid)

  def density(path: str) -> None:
    logp = log_density(sde, score_for(cycle=False), points, eps=config.eval.likelihood_eps,
                       rtol=likelihood_tol, atol=likelihood_tol)
    draw_density(path, logp, axis, data, lo, hi)

  _figure(out, "toy_density.png", density, files)
  z = sde.prior_sampling(jax.random.fold_in(rng, 1), (trajectories, 2))
  _figure(out, "toy_trajectories.png", lambda path: draw_trajectories(
      path, pf_trajectories(sde, score_for(), z, np.linspace(sde.T, eps, 64)), data), files)
  _figure(out, "toy_loss.png", lambda path: draw_loss(
      path, loss_curve(workdir), f"toy ({config.data.toy_name}) training"), files)
  return files


def digits_figures(workdir: str, out: str, *, rows: int = 4, snapshots: int = 8,
                   grid_samples: int = 64, seed: int = 0, step: int = -1) -> List[str]:
  config, sde, score_for, sample, step = _network(workdir, step)
  eps = float(config.sampling.eps)
  to_unit = datasets.inverse_scaler(config.data.centered)
  rng = jax.random.PRNGKey(seed)
  files: List[str] = []
  _figure(out, "digits_samples.png", lambda path: plotting.save_image_grid(
      path, to_unit(sample(jax.random.fold_in(rng, 0), grid_samples))), files)
  times = denoising_times(sde, snapshots, eps)
  z = sde.prior_sampling(jax.random.fold_in(rng, 1), config.data.shape(rows))

  def denoising(path: str) -> None:
    score_fn = score_for()
    states = pf_trajectories(sde, score_fn, z, times)
    final = tweedie_denoise(sde, score_fn, states[-1], eps)
    draw_denoising(path, times, to_unit(np.concatenate([states, final[None]])))

  _figure(out, "digits_denoising.png", denoising, files)
  _figure(out, "digits_loss.png",
          lambda path: draw_loss(path, loss_curve(workdir), "digits training"), files)
  return files


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--toy_workdir", default="", help="a configs/toy.py run")
  parser.add_argument("--digits_workdir", default="", help="a configs/digits.py run")
  parser.add_argument("--out", default=DEFAULT_OUT,
                      help="folder to write (the docs' figures: --out=docs/figures)")
  parser.add_argument("--grid", type=int, default=48, help="density grid: grid x grid points")
  parser.add_argument("--samples", type=int, default=2048, help="toy samples in the scatter")
  parser.add_argument("--trajectories", type=int, default=200)
  parser.add_argument("--likelihood_tol", type=float, default=1e-5,
                      help="rtol = atol of the density's ODE solves")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if not (args.toy_workdir or args.digits_workdir):
    parser.error("give --toy_workdir and/or --digits_workdir")
  names = ((TOY_FIGURES if args.toy_workdir else ()) +
           (DIGITS_FIGURES if args.digits_workdir else ()))
  existing = [n for n in names if os.path.exists(os.path.join(args.out, n))]
  print(f"Writing {len(names)} figures to {args.out}"
        + (f"; this replaces {len(existing)} files there: {', '.join(existing)}" if existing
           else "") + (". The toy density takes most of the time (minutes on 2 CPU cores)."
                       if args.toy_workdir else "."), flush=True)
  os.makedirs(args.out, exist_ok=True)
  files = []
  start = time.perf_counter()
  if args.toy_workdir:
    files += toy_figures(args.toy_workdir, args.out, grid=args.grid, samples=args.samples,
                         trajectories=args.trajectories, seed=args.seed,
                         likelihood_tol=args.likelihood_tol)
  if args.digits_workdir:
    files += digits_figures(args.digits_workdir, args.out, seed=args.seed)
  for f in files:
    size = os.path.getsize(f)
    print(f"{f}: {size / 1000:.0f} KB" + ("  (over 150 KB)" if size > MAX_BYTES else ""))
  print(f"{len(files)} figures in {time.perf_counter() - start:.0f} s")
  return files


if __name__ == "__main__":
  main()
