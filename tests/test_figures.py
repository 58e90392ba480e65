"""benchmarks/make_figures.py: what the figures show, checked against exact scores and densities."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import make_figures as mf
from score_jax import analytic
from score_jax import samplers as sampling
from score_jax.run import train
from score_jax.run.settings import from_config as S
from score_jax import sde as sde_lib
from score_jax.data import toy as toy_data

SDE = sde_lib.VPSDE(0.1, 20.0, 500)
EPS = 1e-3


@pytest.fixture(scope="module")
def mixture():
  mix = toy_data.GAUSSIAN_MIXTURE
  return analytic.GaussianMixture.create(mix.weights, mix.means,
                                         stds=mix.stds[:, None] * np.ones((1, 2)))


@pytest.fixture(scope="module")
def data():
  return toy_data.sample_gaussian_mixture(2000, np.random.default_rng(0))[0]


def test_score_field_is_the_score_on_the_grid(mixture):
  axis, points = mf.grid_points(-2.0, 2.0, 4)
  np.testing.assert_allclose(axis, [-1.5, -0.5, 0.5, 1.5])
  np.testing.assert_array_equal(points[1], [-0.5, -1.5])  # x runs along rows of the image
  score_fn = analytic.score_fn(mixture, SDE)
  for t in (0.01, 0.5):
    field = mf.score_field(score_fn, points, t)
    exact = analytic.score(mixture, SDE, jnp.asarray(points), jnp.full((16,), t))
    np.testing.assert_allclose(field, exact, rtol=1e-5, atol=1e-6)


def test_trajectories_end_where_ode_sample_ends(mixture):
  score_fn = analytic.score_fn(mixture, SDE)
  z = SDE.prior_sampling(jax.random.PRNGKey(0), (16, 2))
  ts = np.linspace(SDE.T, EPS, 9)
  paths = mf.pf_trajectories(SDE, score_fn, z, ts)
  assert paths.shape == (9, 16, 2)
  np.testing.assert_array_equal(paths[0], z)
  end, _ = sampling.ode_sample(jax.random.PRNGKey(1), SDE, score_fn, (16, 2), denoise=False, z=z,
                               eps=EPS)
  # The same solver steps; the two programs differ by round-off only, which the flow amplifies
  # where it splits between modes (moving z by 1e-6 moves the end points by 8e-5).
  np.testing.assert_allclose(paths[-1], end, atol=2e-4)
  # The picture's last column is the samplers' final denoising step.
  denoised, _ = sampling.ode_sample(jax.random.PRNGKey(1), SDE, score_fn, (16, 2), z=z, eps=EPS)
  np.testing.assert_allclose(mf.tweedie_denoise(SDE, score_fn, paths[-1], EPS), denoised,
                             atol=2e-4)
  np.testing.assert_allclose(mf.tweedie_denoise(SDE, score_fn, end, EPS), denoised, atol=1e-5)


def test_trajectories_follow_the_exact_flow_in_between():
  """One Gaussian: the probability-flow ODE has a closed form at every t (dense output, rtol 1e-5)."""
  gauss = analytic.GaussianMixture.create(np.ones(1), np.array([[1.0, -2.0]]),
                                          covs=np.array([[[0.5, 0.2], [0.2, 0.3]]]))
  z = SDE.prior_sampling(jax.random.PRNGKey(2), (8, 2))
  ts = np.array([1.0, 0.7, 0.4, 0.2, 0.05, EPS])
  paths = mf.pf_trajectories(SDE, analytic.score_fn(gauss, SDE), z, ts)
  for k, t in enumerate(ts):
    exact = analytic.gaussian_flow_map(gauss, SDE, z, jnp.ones((8,)), jnp.full((8,), t))
    np.testing.assert_allclose(paths[k], exact, atol=2e-4)


def test_density_is_the_likelihood_on_the_grid(mixture):
  lo, hi = -5.0, 5.0
  axis, points = mf.grid_points(lo, hi, 6)
  logp = mf.log_density(SDE, analytic.score_fn(mixture, SDE), points, eps=1e-5)
  exact = analytic.log_prob(mixture, SDE, jnp.asarray(points), jnp.full((36,), 1e-5))
  # Solver tolerance 1e-5 on (x, log p) jointly; the far tail (log p down to -27) is relative.
  np.testing.assert_allclose(logp, exact, rtol=5e-4, atol=2e-3)


def test_denoising_times_run_from_T_to_eps():
  ts = mf.denoising_times(SDE, 8, EPS)
  assert ts.shape == (8,) and np.all(np.diff(ts) < 0)
  np.testing.assert_allclose([ts[0], ts[-1]], [SDE.T, EPS], rtol=1e-6)


def _fake_run(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(os.path.join(workdir, "eval"))
  records = [{"step": s, "loss": 1.0 / s} for s in (10, 20, 30)] + [{"step": 30, "loss": 0.5},
                                                                    {"step": 40, "loss": 0.2}]
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:  # step 30 again: a resumed run
    f.write("\n".join(json.dumps(r) for r in records) + "\n")
  for k, step in ((1, 20), (2, 40)):
    with open(os.path.join(workdir, "eval", f"ckpt_{k}.json"), "w") as f:
      json.dump({"step": step, "eval_loss": 0.3 / k}, f)
  return workdir


def test_loss_curve_keeps_the_last_record_of_a_step(tmp_path):
  curve = mf.loss_curve(_fake_run(tmp_path))
  np.testing.assert_array_equal(curve["step"], [10, 20, 30, 40])
  np.testing.assert_allclose(curve["loss"], [0.1, 0.05, 0.5, 0.2])
  np.testing.assert_array_equal(curve["eval_step"], [20, 40])
  np.testing.assert_allclose(curve["eval_loss"], [0.3, 0.15])


def _is_small_png(path):
  with open(path, "rb") as f:
    return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) < mf.MAX_BYTES


def test_figures_are_small_pngs(tmp_path, mixture, data):
  """Every drawing at its script default size, from exact scores: a PNG under 150 KB."""
  score_fn = analytic.score_fn(mixture, SDE)
  out = str(tmp_path / "figures")
  mf.draw_score_field(os.path.join(out, "field.png"), SDE, score_fn, data, (0.01, 0.1, 0.3, 1.0))
  lo, hi = mf.plot_range(data)
  axis, points = mf.grid_points(lo, hi, 48)
  logp = np.asarray(analytic.log_prob(mixture, SDE, jnp.asarray(points),
                                      jnp.full((points.shape[0],), 1e-5)))
  mf.draw_density(os.path.join(out, "density.png"), logp, axis, data, lo, hi)
  rng = np.random.default_rng(0)  # paths of the script's size: 200 curves of 64 points
  z, ends = rng.standard_normal((200, 2)), data[:200]
  bend = np.sin(np.linspace(0, np.pi, 64))[:, None, None] * rng.standard_normal((1, 200, 2))
  paths = z + np.linspace(0, 1, 64)[:, None, None] * (ends - z) + bend
  mf.draw_trajectories(os.path.join(out, "trajectories.png"), paths, data)
  frames = np.random.default_rng(0).uniform(0, 1, (9, 4, 8, 8, 1))  # the worst case: noise
  mf.draw_denoising(os.path.join(out, "denoising.png"), mf.denoising_times(SDE, 8, EPS), frames)
  mf.draw_loss(os.path.join(out, "loss.png"), mf.loss_curve(_fake_run(tmp_path)), "loss")
  files = sorted(os.listdir(out))
  assert files == ["denoising.png", "density.png", "field.png", "loss.png", "trajectories.png"]
  for f in files:
    assert _is_small_png(os.path.join(out, f)), (f, os.path.getsize(os.path.join(out, f)))


def _train_tiny(module, workdir, **changes):
  from score_jax.run import train
  config = module.get_config()
  base = {"training.n_iters": 20, "training.snapshot_freq": 20, "training.log_freq": 5,
          "training.eval_freq": 10**6, "training.snapshot_sampling": False,
          "model.num_scales": 20}
  with config.unlocked():
    for k, v in {**base, **changes}.items():
      section, key = k.split(".")
      config[section][key] = v
  train.train_and_evaluate(S(config), workdir)


@pytest.mark.slow  # ~2 minutes on 2 CPU cores: two tiny trainings, then every figure
def test_script_draws_every_figure_from_trained_runs(tmp_path, capsys):
  from configs import digits, toy
  toy_dir, digits_dir = str(tmp_path / "toy"), str(tmp_path / "digits")
  _train_tiny(toy, toy_dir, **{"model.hidden_sizes": (32, 32), "training.batch_size": 64})
  _train_tiny(digits, digits_dir, **{"training.batch_size": 8, "model.nf": 8, "model.ch_mult": (1,),
                                     "model.attn_resolutions": (), "model.dropout": 0.0})
  out = str(tmp_path / "figures")
  files = mf.main([f"--toy_workdir={toy_dir}", f"--digits_workdir={digits_dir}", f"--out={out}",
                   "--grid=12", "--samples=256", "--trajectories=32", "--likelihood_tol=1e-3"])
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith(f"Writing 8 figures to {out}.")  # nothing there to replace
  assert [ln.split(":")[0].strip() for ln in lines[1:9]] == files  # one line per figure
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  assert not os.path.abspath(mf.DEFAULT_OUT).startswith(root)  # outside the repository
  names = sorted(os.path.basename(f) for f in files)
  assert names == sorted(os.listdir(out)) == [
      "digits_denoising.png", "digits_loss.png", "digits_samples.png", "toy_density.png",
      "toy_loss.png", "toy_samples.png", "toy_score_field.png", "toy_trajectories.png"]
  for f in files:
    assert _is_small_png(f), f
