"""Post-hoc EMA (score_jax.run.phema) against closed forms, quadrature and explicit weighted sums."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

import score_jax
from configs import toy
from score_jax.convert import phema as phema_recon
from score_jax.run import phema
from score_jax.run import programs
from score_jax.run import plan as plan_lib
from score_jax.run import train
from score_jax.run import state as run_state
from score_jax.errors import ConfigError
from score_jax.run.settings import from_config as S


def _weights(gamma, T):
  """Exact weights [T] of theta_1..theta_T in the power EMA after T updates (independent of the
  code: the mass of (gamma + 1) tau^gamma / T^(gamma + 1) on each step (t - 1, t])."""
  t = np.arange(1, T + 1, dtype=np.float64)
  return (t ** (gamma + 1) - (t - 1) ** (gamma + 1)) / float(T) ** (gamma + 1)


def test_sigma_rel_and_gamma_are_inverse_and_the_profile_standard_deviation():
  # EDM2's two profiles: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94 (the paper's values).
  assert phema.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
  assert phema.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
  assert phema.sigma_rel_to_gamma(phema.SIGMA_REL_MAX) == pytest.approx(0.0, abs=1e-9)
  for s in (0.01, 0.05, 0.1, 0.2, 0.28):
    g = phema.sigma_rel_to_gamma(s)
    assert phema.gamma_to_sigma_rel(g) == pytest.approx(s, rel=1e-12)
    # sigma_rel is the std of the profile (g + 1) tau^g on [0, 1], by quadrature.
    mean = integrate.quad(lambda u: u * (g + 1) * u ** g, 0, 1)[0]
    var = integrate.quad(lambda u: (u - mean) ** 2 * (g + 1) * u ** g, 0, 1)[0]
    assert np.sqrt(var) == pytest.approx(s, rel=1e-8)
  for bad in (0.0, -0.1, 0.3, float("nan")):
    with pytest.raises(ConfigError, match="sigma_rel must lie in"):
      phema.sigma_rel_to_gamma(bad)


def test_jitted_power_ema_is_the_explicit_weighted_average_of_the_trajectory():
  T, rels = 60, (0.05, 0.1, 0.25)
  exps = [phema.sigma_rel_to_gamma(s) for s in rels]
  rng = np.random.default_rng(0)
  traj = np.cumsum(rng.normal(size=(T, 3, 5)), axis=0).astype(np.float32)  # theta_1..theta_T
  init = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)}  # theta_0: must get weight 0
  step = jax.jit(lambda prof, p, t: phema.update(prof, p, t, exps))
  prof = tuple(init for _ in rels)
  for t in range(1, T + 1):
    prof = step(prof, {"w": jnp.asarray(traj[t - 1])}, jnp.int32(t))
  for g, e in zip(exps, prof):
    w = _weights(g, T)
    assert w.sum() == pytest.approx(1.0, rel=1e-12)
    want = np.tensordot(w, traj.astype(np.float64), axes=1)
    # float32 recursion over 60 steps of values ~10: a few ulps of 10 per step.
    np.testing.assert_allclose(np.asarray(e["w"]), want, rtol=0, atol=2e-5)
    # and the weights are those of tau^gamma up to the discretization of each step:
    t = np.arange(1, T + 1.0)
    assert np.abs(w - t ** g / np.sum(t ** g)).max() < 0.1 * w.max()


def test_late_updates_keep_their_precision_in_float32():
  # At t = 10^6 the rate 1 - beta ~ (gamma + 1) / t is ~7e-6; 1 - 1/t in float32 would be off
  # by ~6%. The update on e = 0, p = 1 returns the rate itself.
  g = phema.sigma_rel_to_gamma(0.1)
  t = 1_000_000
  rate = phema.update(({"w": jnp.zeros(())},), {"w": jnp.ones(())}, jnp.int32(t), [g])[0]["w"]
  assert float(rate) == pytest.approx(1 - (1 - 1 / t) ** (g + 1), rel=1e-6)


def test_profile_inner_products_match_quadrature():
  for ga, ta, gb, tb in [(6.9, 0.7, 16.9, 1.0), (2.0, 1.0, 0.5, 0.3), (0.0, 0.4, 0.0, 0.9)]:
    f = lambda u: ((ga + 1) * u ** ga / ta ** (ga + 1)) * ((gb + 1) * u ** gb / tb ** (gb + 1))
    want = integrate.quad(f, 0, min(ta, tb), epsabs=0, epsrel=1e-12)[0]
    assert phema_recon.profile_inner_products(ga, ta, gb, tb) == pytest.approx(want, rel=1e-10)


def _synthetic_sources(traj, rels, every):
  """Exact power EMAs of traj [T, D] at steps every, 2 every, ..., T: (sigma_rels, steps,
  values)."""
  T = traj.shape[0]
  out = [(s, k, _weights(phema.sigma_rel_to_gamma(s), k) @ traj[:k])
         for k in range(every, T + 1, every) for s in rels]
  return [o[0] for o in out], [o[1] for o in out], np.stack([o[2] for o in out])


def test_least_squares_reconstructs_a_third_profile_on_a_synthetic_trajectory():
  T, D = 400, 200
  rng = np.random.default_rng(1)
  # A trajectory that drifts and jitters, like parameters under SGD.
  traj = np.cumsum(rng.normal(size=(T, D)) * 0.05, axis=0) + np.linspace(0, 1, T)[:, None]
  rels, steps, values = _synthetic_sources(traj, (0.05, 0.1), every=40)
  target = 0.075
  x, residual = phema_recon.solve_coefficients(rels, steps, target, T)
  assert x.sum() == pytest.approx(1.0, abs=1e-12)
  direct = _weights(phema.sigma_rel_to_gamma(target), T) @ traj
  recon = x @ values
  # The residual is the relative L2 distance of the profiles, checked by quadrature.
  g = phema.sigma_rel_to_gamma(target)
  p = lambda gg, tt, u: np.where(u <= tt, (gg + 1) * u ** gg / tt ** (gg + 1), 0.0)
  diff = lambda u: sum(xi * p(phema.sigma_rel_to_gamma(s), k, u)
                       for xi, s, k in zip(x, rels, steps)) - p(g, T, u)
  num = sum(integrate.quad(lambda u: diff(u) ** 2, a, a + 40, epsrel=1e-10)[0]
            for a in range(0, T, 40))
  den = integrate.quad(lambda u: p(g, T, u) ** 2, 0, T, epsrel=1e-12)[0]
  assert residual == pytest.approx(np.sqrt(num / den), rel=1e-4)
  assert residual < 0.05
  # Rigorous bound per parameter: the reconstruction's step weights differ from the target's by
  # dw with |dw|_2 <= residual |p_target|_2 and sum(dw) = 0, so |error| <= |dw|_2 |theta - mean|_2.
  dw = sum(xi * np.pad(_weights(phema.sigma_rel_to_gamma(s), k), (0, T - k))
           for xi, s, k in zip(x, rels, steps)) - _weights(g, T)
  np.testing.assert_allclose(recon, dw @ traj + direct, rtol=0, atol=1e-9)
  assert np.linalg.norm(dw) <= residual * np.sqrt(den) * (1 + 1e-6)
  bound = np.linalg.norm(dw) * np.linalg.norm(traj - traj.mean(0), axis=0)
  assert np.all(np.abs(recon - direct) <= bound)
  # Far better than the nearest tracked profile, and a tracked profile is found exactly.
  nearest = np.abs(values[-1] - direct).max()  # the 0.10 profile at T
  assert np.abs(recon - direct).max() < 0.05 * nearest
  x_same, res_same = phema_recon.solve_coefficients(rels, steps, 0.1, T)
  assert res_same < 1e-6 and abs(x_same[-1] - 1) < 1e-4


# ---------------------------------------------------------------------------
# A real toy run tracking three profiles


SOURCES, TARGET, T, EVERY = (0.05, 0.1), 0.075, 24, 4


@pytest.fixture(scope="module")
def phema_run(tmp_path_factory):
  """24 steps of the toy MLP with profiles 0.05, 0.10 and (tracked directly) 0.075, snapshots at
  every step; `sparse` holds the run's config.json and only every 4th snapshot."""
  config = toy.get_config()
  with config.unlocked():
    config.model.hidden_sizes = (32, 32)
    config.model.num_scales = 20
    config.sampling.batch_size = 64
    t = config.training
    t.batch_size, t.n_iters, t.snapshot_freq, t.snapshot_freq_for_preemption = 64, T, T, 10 ** 6
    t.log_freq, t.eval_freq, t.snapshot_sampling, t.phema_snapshot_freq = 10 ** 6, 10 ** 6, False, 1
    config.model.phema_sigma_rels = (*SOURCES, TARGET)
  root = tmp_path_factory.mktemp("phema")
  workdir = str(root / "run")
  train.train_and_evaluate(S(config), workdir)
  sparse = str(root / "sparse")
  os.makedirs(os.path.join(sparse, "phema"))
  shutil.copy(os.path.join(workdir, "config.json"), sparse)
  for s in phema.list_snapshots(workdir):
    if s.step % EVERY == 0:
      shutil.copy(s.path, os.path.join(sparse, "phema"))
  return workdir, sparse


def _flat(profile):
  names = sorted(profile)
  return np.concatenate([np.ravel(profile[k]).astype(np.float64) for k in names])


def test_a_real_run_tracks_power_emas_and_their_reconstruction_matches_the_tracked_one(phema_run):
  workdir, sparse = phema_run
  snaps = phema.list_snapshots(workdir)
  assert [s.step for s in snaps] == list(range(1, T + 1))
  assert snaps[-1].nimg == T * 64 and snaps[-1].sigma_rels == (*SOURCES, TARGET)
  # theta_t from two consecutive snapshots of the 0.10 profile: e_t = beta_t e_{t-1} + (1 - beta_t)
  # theta_t (beta_1 = 0). float32 storage errors (~1e-7 here) grow by 1 / (1 - beta_t) <= 4.
  g_src = phema.sigma_rel_to_gamma(0.1)
  e = np.stack([_flat(s.profile(1)) for s in snaps])
  beta = (1 - 1 / np.arange(1, T + 1)) ** (g_src + 1)
  prev = np.concatenate([np.zeros_like(e[:1]), e[:-1]])
  traj = (e - beta[:, None] * prev) / (1 - beta[:, None])
  # The directly tracked 0.075 and 0.05 profiles are the explicit weighted sums at every step.
  for index, rel in ((2, TARGET), (0, 0.05)):
    for s in snaps[::5] + snaps[-1:]:
      want = _weights(phema.sigma_rel_to_gamma(rel), s.step) @ traj[:s.step]
      np.testing.assert_allclose(_flat(s.profile(index)), want, rtol=0, atol=2e-6)
  # Reconstruction of 0.075 at T from the 0.05 and 0.10 snapshots every 4 steps.
  rec = phema_recon.reconstruct(sparse, TARGET, from_sigma_rels=SOURCES)
  assert rec.step == T and rec.snapshot_steps == tuple(range(EVERY, T + 1, EVERY))
  assert rec.source_sigma_rels == SOURCES and rec.coefficients.shape == (T // EVERY, 2)
  direct = _flat(snaps[-1].profile(2))
  err = np.abs(_flat(rec.params) - direct)
  # Tolerance: the bound |error_j| <= |dw|_2 |theta_j - mean_j|_2 of the synthetic test, with dw
  # the difference of the step weights (from the returned coefficients and the exact weights),
  # plus float32 rounding of the stored profiles and of theta recovered from them (2e-6).
  g = phema.sigma_rel_to_gamma(TARGET)
  dw = -_weights(g, T)
  for row, k in enumerate(rec.snapshot_steps):
    for col, s in enumerate(SOURCES):
      dw[:k] += rec.coefficients[row, col] * _weights(phema.sigma_rel_to_gamma(s), k)
  bound = np.linalg.norm(dw) * np.linalg.norm(traj - traj.mean(0), axis=0) + 2e-6
  assert np.all(err <= bound)
  np.testing.assert_allclose(_flat(rec.params) - direct, dw @ traj, rtol=0, atol=2e-6)
  nearest = np.abs(_flat(snaps[-1].profile(1)) - direct).max()
  assert err.max() < 0.1 * nearest
  assert rec.residual < 0.05


def test_command_line_writes_a_workdir_that_load_run_reads(phema_run, tmp_path, capsys):
  _, sparse = phema_run
  out = str(tmp_path / "out")
  argv = ["phema", f"--workdir={sparse}", f"--sigma_rel={TARGET}", f"--out={out}",
          "--from_sigma_rels=0.05,0.1"]
  assert phema_recon.main(argv + ["--step=20"]) == 0
  assert phema_recon.main(argv) == 0  # a second step into the same reconstruction
  printed = capsys.readouterr().out
  assert "profile residual" in printed and f"{out}/checkpoints/{T}" in printed
  for step in (20, T):
    run = score_jax.load_run(out, step)
    want = phema_recon.reconstruct(sparse, TARGET, step, SOURCES).params
    got = {k: np.asarray(v) for k, v in phema._leaves(run.params).items()}
    assert run.step == step and sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  # A config without the post-hoc EMA keys (eval or sample with the base config) reads it too.
  plain = plan_lib.make_plan(run.settings.replace(model={"phema_sigma_rels": ()}),
                              need_data=False)
  got = phema._leaves(run_state.restore_ema_params(plain, os.path.join(out, "checkpoints"), T))
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), want[k])
  # Writing the same step again, or into a folder that is not a reconstruction, is refused.
  assert phema_recon.main(argv) == 1
  assert "already holds the reconstruction of step 24" in capsys.readouterr().err
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  assert phema_recon.main(argv[:3] + [f"--out={other}"]) == 1
  assert "is not a post-hoc EMA reconstruction" in capsys.readouterr().err
  assert sorted(os.listdir(other)) == ["notes.txt"]


def test_errors_name_the_problem(phema_run, tmp_path, capsys):
  _, sparse = phema_run
  with pytest.raises(phema.NoSnapshotsError, match="phema_sigma_rels"):
    phema_recon.reconstruct(str(tmp_path), 0.1)
  with pytest.raises(phema.NoSnapshotsError, match="No post-hoc EMA snapshot of step 13"):
    phema_recon.reconstruct(sparse, 0.1, step=13)
  with pytest.raises(ConfigError, match="not 0.2"):
    phema_recon.reconstruct(sparse, 0.1, from_sigma_rels=(0.2,))
  assert phema_recon.main(["phema", f"--workdir={sparse}", "--sigma_rel=0.3"]) == 1
  assert "sigma_rel must lie in (0, 0.2887]" in capsys.readouterr().err
  assert phema_recon.main(["phema", f"--workdir={sparse}"]) == 2  # --sigma_rel is required
  for bad in ((0.05, 0.05), (0.5,), (0.0,)):
    config = toy.get_config()
    with config.unlocked():
      config.model.phema_sigma_rels = bad
    with pytest.raises(ConfigError, match="model.phema_sigma_rels must be distinct"):
      S(config)


@pytest.mark.slow  # two more toy runs and the sample mode's compilation (~40 s on 2 loaded cores)
def test_resume_is_exact_and_the_sample_mode_reads_a_reconstruction(phema_run, tmp_path):
  workdir, sparse = phema_run
  from score_jax.run.settings import from_json
  settings = from_json(os.path.join(workdir, "config.json"))
  resumed = str(tmp_path / "resumed")
  train.train_and_evaluate(settings.replace(training={"n_iters": T // 2}), resumed)
  train.train_and_evaluate(settings, resumed)  # resumes from the checkpoint of step 12
  assert [s.step for s in phema.list_snapshots(resumed)] == list(range(1, T + 1))
  for a, b in zip(phema.list_snapshots(workdir), phema.list_snapshots(resumed)):
    assert a.step == b.step
    for i in range(3):
      pa, pb = a.profile(i), b.profile(i)
      for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])
  out = str(tmp_path / "out")
  assert phema_recon.main(["phema", f"--workdir={sparse}", f"--sigma_rel={TARGET}", f"--out={out}"]) == 0
  from score_jax.run import sample as sample_mode
  base = from_json(os.path.join(out, "config.json")).replace(  # without the post-hoc EMA keys
      sample={"num": 64}, model={"phema_sigma_rels": ()})
  paths = sample_mode.run(base, out)
  with np.load(paths["npz"]) as z:
    assert z["samples"].shape == (64, 2) and np.all(np.isfinite(z["samples"]))
