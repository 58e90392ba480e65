"""SiT's networks in score_jax: the 'sit_velocity' parameterization and `--from=sit`.

Reference values come from willisma/SiT's own code (tests/data/make_sit_fixture.py, commit and
versions in tests/data/sit/manifest.json): a tiny SiT's train.py checkpoint, its network's
outputs, and its transport's drift, score, SDE drift and ODE steps at SiT's times s, which are
score_jax's t = 1 - s. The time direction and the sign are thereby checked against SiT's code.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import score_jax
from score_jax import losses, models, sde as sde_lib
from score_jax.convert import cli as convert_cli
from score_jax.convert import dit as dit_convert
from score_jax.convert import sit as sit_convert
from score_jax.convert import torch_pickle
from score_jax.errors import ConfigError
from score_jax.run import builders
from score_jax.run.plan import make_plan
from score_jax.run import programs
from score_jax.run.settings import from_config as S

from configs import imagenet256_sit_xl2

HERE = os.path.dirname(os.path.abspath(__file__))
SIT = os.path.join(HERE, "data", "sit")
CKPT = os.path.join(SIT, "0000001.pt")
CONFIG = os.path.join(HERE, "..", "configs", "imagenet256_sit_xl2.py")
# Float32 against float32, as tests/test_dit.py: two blocks of width 32 round to ~1e-7 of the
# largest |output| (measured here: 2.9e-7 and 3.3e-7 for the networks, 2.0e-7 for the score,
# 5.9e-7 and 3.2e-7 for the ODE and SDE drifts, whose x / (1 - t) terms cancel partly, 1.5e-7
# for the Euler steps); 1e-5 leaves room for other CPUs' summation
# orders and is far below a sign or time error (s for 1 - s changes the output by O(1)).
REL_TOL = 1e-5


@functools.lru_cache(maxsize=None)
def _manifest():
  with open(os.path.join(SIT, "manifest.json")) as f:
    return json.load(f)


def _overrides():
  tiny = _manifest()["tiny"]
  return {"data.image_size": tiny["input_size"], "data.num_channels": tiny["in_channels"],
          "model.num_classes": tiny["num_classes"], "model.hidden_size": tiny["hidden_size"],
          "model.depth": tiny["depth"], "model.num_heads": tiny["num_heads"],
          "model.patch_size": tiny["patch_size"], "model.dit_size": "S"}


def _config(**extra):
  config = imagenet256_sit_xl2.get_config()
  for key, value in {**_overrides(), **extra}.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def _ref():
  return dict(np.load(os.path.join(SIT, "outputs.npz")))


def _rel_err(got, want) -> float:
  return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


@functools.lru_cache(maxsize=None)
def _tiny():
  """(plan, {'ema': params, 'model': params}) of the fixture through the converter's steps:
  the run load_run makes of the converted workdir, without the disk (the slow tier goes
  through the command line and load_run)."""
  s = S(_config())
  sit_convert.check_config(s)
  plan = make_plan(s, need_data=False)
  entries = dit_convert.dit_spec(plan.model, s.data.num_channels)
  obj = torch_pickle.load(CKPT)
  params = {}
  for weights in ("ema", "model"):
    tensors, args = dit_convert.find_state_dict(obj, CKPT, weights)
    assert sit_convert.check_interpolant(args, CKPT) == []
    params[weights] = dit_convert.tensors_to_params(tensors, entries)
  return plan, params


@functools.lru_cache(maxsize=None)
def _score():
  """load_run's score function (programs.network_score_factory), jitted once."""
  plan, _ = _tiny()
  return jax.jit(lambda p, x, t, y: programs.network_score_factory(plan)(p, y)(x, t))


@functools.lru_cache(maxsize=None)
def _drifts():
  """(x, t, score) -> the probability-flow ODE's drift and the reverse SDE's (drift, g), which
  read the score at (x, t) only."""
  sde = _tiny()[0].sde

  def drifts(x, t, score):
    pf, _ = sde.reverse(lambda *_: score, probability_flow=True).sde(x, t)
    rev, g = sde.reverse(lambda *_: score).sde(x, t)
    return pf, rev, g

  return jax.jit(drifts)


def test_converted_network_computes_sits_outputs():
  """Both networks of the train.py checkpoint give SiT's forward outputs at its times 0 .. 1
  (fed as they are, no factor 1000) and with the null label."""
  plan, params = _tiny()
  assert plan.settings.model.get("learn_sigma")
  ref = _ref()
  apply = jax.jit(lambda p, x, t, y: plan.model.apply({"params": p}, x, t, y))  # one compile
  for weights in ("ema", "model"):
    out = apply(params[weights], ref["x"], ref["t"], ref["y"])
    assert out.shape == ref[weights].shape == (5, 8, 8, 4)
    assert _rel_err(out, ref[weights]) < REL_TOL, weights


def test_converted_run_follows_sits_transport():
  """At SiT's times s = 0.1 .. 0.9, i.e. score_jax's t = 1 - s, the run's score is SiT's
  `get_score_from_velocity`; the probability-flow ODE's drift dx/dt is minus SiT's ODE drift
  dx/ds; the reverse SDE is SiT's SBDM SDE (drift negated, g^2 / 2 = SiT's w); and two Euler
  steps of score_jax's probability-flow ODE from t = 0.9 to 0.5 land where SiT's ODE
  integrator's two Euler steps from s = 0.1 to 0.5 land."""
  _, params = _tiny()
  ref = _ref()
  x, y = jnp.asarray(ref["x"]), jnp.asarray(ref["y"])
  t = 1.0 - jnp.asarray(ref["transport_t"])
  score_fn = functools.partial(_score(), params["ema"], y=y)
  score = score_fn(x, t)
  drift_pf, drift_sde, g = _drifts()(x, t, score)
  assert _rel_err(score, ref["score"]) < REL_TOL
  assert _rel_err(-drift_pf, ref["drift"]) < REL_TOL
  assert _rel_err(-drift_sde, ref["sbdm_drift"]) < REL_TOL
  assert _rel_err(g**2 / 2, ref["sbdm_diffusion"]) < REL_TOL

  h = float(ref["ode_t"][1] - ref["ode_t"][0])
  tk = jnp.full(t.shape, 1.0 - ref["ode_t"][0], t.dtype)  # the dtype of t: no second compile
  xk = x
  for _ in range(2):  # dt = -h: score_jax's time runs from noise (t = 1) to data (t = 0)
    xk = xk - h * _drifts()(xk, tk, score_fn(xk, tk))[0]
    tk = tk - h
  assert _rel_err(xk, ref["ode_euler"]) < REL_TOL


# A Gaussian data distribution N(MU, SD^2 I) in 2-D: on the rectified flow x_t is
# N((1 - t) MU, ((1 - t)^2 SD^2 + t^2) I), so the score and SiT's ideal velocity are closed forms.
MU, SD = np.array([0.5, -1.0], np.float32), 0.7


class OracleSiT:
  """A 'network' in SiT's conventions: at label s (SiT's time, score_jax's t = 1 - s) its
  ideal velocity E[x_0 - z | x] = E[x_0 | x] - E[z | x] for the Gaussian data."""

  scale_by_sigma = False

  def apply(self, variables, x, labels, y=None, *, train=False, rngs=None):
    t = (1.0 - labels)[:, None]
    r = (x - (1.0 - t) * MU) / ((1.0 - t) ** 2 * SD**2 + t**2)  # [B, 2]
    return (MU + (1.0 - t) * SD**2 * r) - t * r


class LinearSiT:
  """F(x, s) = x W + s c: any network in SiT's conventions."""

  scale_by_sigma = False

  def apply(self, variables, x, labels, y=None, *, train=False, rngs=None):
    return x @ variables["w"] + labels[:, None] * variables["c"][None, :]


def test_sit_velocity_of_sits_ideal_network_is_the_exact_score():
  """Closed forms: SiT's ideal velocity network (OracleSiT) through 'sit_velocity' gives the
  exact score of Gaussian data on the rectified flow; and the flow-matching loss (weighting
  'velocity') of a 'sit_velocity' network is SiT's training loss 0.5 |F(x_s, s) - (x_0 - z)|^2
  at x_s = s x_0 + (1 - s) z (its transport.training_losses on the Linear path)."""
  sde = sde_lib.RectifiedFlow()
  gen = np.random.default_rng(0)
  t = gen.uniform(0.02, 0.98, 256).astype(np.float32)
  x0 = (MU + SD * gen.normal(size=(256, 2))).astype(np.float32)
  x = (1.0 - t)[:, None] * x0 + t[:, None] * gen.normal(size=(256, 2)).astype(np.float32)
  variables = {"w": np.array([[0.3, -0.7], [1.1, 0.2]], np.float32),
               "c": np.array([0.5, -1.0], np.float32)}
  oracle = models.get_score_fn(sde, OracleSiT(), {}, continuous=True,
                               parameterization="sit_velocity")
  net = models.get_score_fn(sde, LinearSiT(), variables, continuous=True,
                            parameterization="sit_velocity")

  @jax.jit
  def run(rng):
    aux = losses.dsm_loss(rng, sde, net, x0, weighting="velocity", reduce_mean=False,
                          time_distribution="uniform")[1]
    z = jax.random.normal(jax.random.split(rng)[1], x0.shape)  # dsm_loss's own noise
    return oracle(x, t), aux.per_example, aux.t, z

  got, per_example, tl, z = map(np.asarray, run(jax.random.PRNGKey(1)))
  var = ((1.0 - t) ** 2 * SD**2 + t**2)[:, None]
  exact = -(x - (1.0 - t)[:, None] * MU) / var
  # float32: the score -(x - s F) / t divides by t >= 0.02 a difference of O(1) terms, each
  # rounded to ~1e-7: errors ~1e-6 of |exact| + 1 / t (measured: 1.1e-7).
  scale = np.linalg.norm(exact, axis=-1, keepdims=True) + 1.0 / t[:, None]
  np.testing.assert_array_less(np.abs(got - exact) / scale, 1e-5)

  s = 1.0 - tl  # SiT's time
  x_s = s[:, None] * x0 + (1.0 - s)[:, None] * z  # SiT's ICPlan.compute_xt
  f = LinearSiT().apply(variables, x_s, s)
  want = 0.5 * np.sum((f - (x0 - z)) ** 2, -1)  # SiT's ut = d_alpha x_1 + d_sigma x_0
  # The loss forms F through the score (divisions by t and 1 - t): float32 cancellation
  # at t near 0 or 1 (measured: 5.4e-5 relative), as tests/test_rectified_flow.py's velocity
  # weighting check allows.
  np.testing.assert_allclose(per_example, want, rtol=2e-3, atol=1e-4)


def test_sit_config_and_refusals(tmp_path, capsys):
  """configs/imagenet256_sit_xl2.py is SiT's: DiT-XL/2 with the 'sit_velocity' network on the
  rectified flow. The parameterization off the rectified flow, another interpolant or
  prediction in train.py's arguments, another preset, the wrong learn_sigma and a config that
  is not SiT's stop with one line naming the fix."""
  s = S(imagenet256_sit_xl2.get_config())
  assert (s.training.sde, s.training.continuous, s.model.parameterization) == (
      "rectified_flow", True, "sit_velocity")
  assert s.model.name == "dit" and s.model.num_classes == 1000
  assert sit_convert.check_config(s) == []

  with pytest.raises(ConfigError, match="set training.sde = 'rectified_flow'"):
    S(_config(**{"training.sde": "vpsde"}))
  with pytest.raises(ValueError, match="'sit_velocity' parameterization is SiT's linear"):
    models.get_score_fn(sde_lib.VPSDE(), _tiny()[0].model, {}, continuous=True,
                        parameterization="sit_velocity")
  with pytest.raises(dit_convert.DiTLayoutError, match="model.parameterization='sit_velocity'"):
    sit_convert.check_config(S(_config(**{"model.parameterization": "velocity"})))

  args = torch_pickle.load(CKPT)["args"]  # train.py's argparse.Namespace, an inert record
  assert (args.model, args.path_type, args.prediction) == ("SiT-T/2", "Linear", "velocity")
  args.path_type = "GVP"
  with pytest.raises(dit_convert.DiTLayoutError, match="SiT's 'GVP' path"):
    sit_convert.check_interpolant(args, CKPT)
  args.path_type, args.prediction = "Linear", "noise"
  with pytest.raises(dit_convert.DiTLayoutError, match="predicts the 'noise'"):
    sit_convert.check_interpolant(args, CKPT)
  args.model = "SiT-S/2"  # 384 wide, 6 heads
  with pytest.raises(dit_convert.DiTLayoutError, match=r"trained as SiT-S/2 .*dit_size=S"):
    dit_convert.check_args(args, _tiny()[0].model, CKPT, "SiT")

  dit_config = os.path.join(HERE, "..", "configs", "imagenet256_dit_xl2.py")
  argv = ["convert", "--from=sit", "--config=" + dit_config,
          *[f"--config.{k}={v}" for k, v in _overrides().items()], CKPT, str(tmp_path / "run")]
  assert convert_cli.main(argv) == 1  # DiT's config: one line naming SiT's settings
  err = capsys.readouterr().err.strip()
  assert "model.parameterization='sit_velocity'" in err and len(err.splitlines()) == 1, err
  with pytest.raises(dit_convert.DiTLayoutError, match="set --config.model.learn_sigma=True"):
    sit_convert.convert(CKPT, str(tmp_path / "run"), _config(**{"model.learn_sigma": False}))
  assert not (tmp_path / "run").exists()


def test_a_released_state_dict_gives_the_ema_network(tmp_path):
  """A bare EMA state dict (the released SiT-XL-2-256x256.pt) reads as the EMA network of the
  train.py checkpoint; --weights=model needs a train.py checkpoint."""
  plan, params = _tiny()
  bare = str(tmp_path / "SiT-T-2-64x64.pt")
  torch_pickle.save_state_dict(bare, torch_pickle.load(CKPT)["ema"])
  tensors, args = dit_convert.find_state_dict(torch_pickle.load(bare), bare)
  assert args is None and len(tensors) == _manifest()["tensors"]
  got = dit_convert.tensors_to_params(tensors, dit_convert.dit_spec(plan.model, 4))
  for a, b in zip(jax.tree.leaves(params["ema"]), jax.tree.leaves(got)):
    np.testing.assert_array_equal(b, a)
  with pytest.raises(dit_convert.DiTLayoutError, match="bare state dict"):
    dit_convert.find_state_dict(torch_pickle.load(bare), bare, "model")


# ---------------------------------------------------------------------------
# The command line, load_run and the samplers (slow: a workdir on disk, a compile per sampler)


@pytest.mark.slow
def test_command_line_converts_sit_and_every_sampler_runs(tmp_path, capsys):
  """train.py's checkpoint -> `python -m score_jax.convert --from=sit` -> load_run (what
  --mode=sample and --mode=eval read): its score is SiT's at t = 1 - s, and every sampler of
  the rectified flow draws finite samples of the data's shape from it, with guidance."""
  dst = str(tmp_path / "run")
  argv = ["convert", "--from=sit", "--config=" + CONFIG,
          *[f"--config.{k}={v}" for k, v in _overrides().items()], CKPT, dst]
  assert convert_cli.main(argv) == 0
  assert "ema weights" in capsys.readouterr().out
  run = score_jax.load_run(dst)
  assert run.settings.model.parameterization == "sit_velocity"
  ref = _ref()
  score = jax.jit(run.score_fn)(jnp.asarray(ref["x"]), 1.0 - jnp.asarray(ref["transport_t"]),
                                jnp.asarray(ref["y"]))
  assert _rel_err(score, ref["score"]) < REL_TOL

  settings = {"ode": {}, "pc": {"sampling.predictor": "euler_maruyama",
                                "sampling.corrector": "none", "model.num_scales": 8},
              "ddim": {"sampling.num_steps": 4, "sampling.eta": 0.0},
              "heun": {"sampling.num_steps": 4}, "dpm_solver": {"sampling.num_steps": 4},
              "unipc": {"sampling.num_steps": 4}}
  y = jnp.array([1, 2])
  for method, extra in settings.items():
    plan = make_plan(S(_config(**{"sampling.method": method, **extra})), need_data=False)
    x, nfe = programs.Programs(plan).sampler(2, weight=0.5)(run.params, jax.random.PRNGKey(0), y)
    assert x.shape == (2, 8, 8, 4) and bool(jnp.all(jnp.isfinite(x))), method
    assert int(nfe) > 0, method
