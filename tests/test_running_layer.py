"""The running layer: settings read once, unknown keys refused, clear user errors, load_run."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default, toy, vp_cifar
import score_jax
from score_jax import analytic, models
from score_jax.data.scaling import to_uint8
from score_jax.run import checkpoints
from score_jax.run import evaluate
from score_jax.run import programs
from score_jax.run import builders
from score_jax.run import plan as plan_lib
from score_jax.run import settings
from score_jax.run import train
from score_jax.errors import ConfigError, UserError, WorkdirError

from helpers import TINY_TOY, config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _toy(**changes):
  return config("toy", TINY_TOY, **changes)


@pytest.mark.parametrize("section,key", [("model", "nff"), ("training", "n_iter"),
                                         ("sampling", "methd"), ("eval", "num_sample"),
                                         ("data", "image_sizes"), ("optim", "learning_rate"),
                                         ("sample", "count")])
def test_an_unread_key_in_any_section_is_an_error_that_names_it(section, key):
  config = vp_cifar.get_config()
  with config.unlocked():
    config[section][key] = 64
  with pytest.raises(ConfigError, match=rf"{section}\.{key}\b") as err:
    settings.from_config(config)
  first_valid = {"model": "name", "training": "sde", "sampling": "method", "eval": "begin_ckpt",
                 "data": "dataset", "optim": "optimizer", "sample": "ckpt_step"}[section]
  assert f"Valid keys of config.{section}: {first_valid}" in str(err.value)


def test_a_key_of_another_network_is_an_error_that_names_its_family():
  """An NCSNv2 key on a DDPM++ config is refused, naming the network that takes it; the
  DDPM++ network is built from its own constructor's keys."""
  config = vp_cifar.get_config()
  with config.unlocked():
    config.model.interpolation = "bilinear"  # an NCSNv2 argument
  with pytest.raises(ConfigError, match=r"model\.interpolation belongs to 'ncsnv2'/.*, not to "
                     r"'ddpmpp' \(model\.name\); remove it\.") as err:
    settings.from_config(config)
  assert "song_unet" not in str(err.value)
  config = vp_cifar.get_config()
  config.model.name = "song_unet"  # keeps DDPM++'s fir, progressive, ... keys
  with pytest.raises(ConfigError, match=r"model\.fir, .* belong to 'ncsnpp'/'ddpmpp'/'ddpm';"
                     r".*, not to 'song_unet' \(model\.name\); remove them\."):
    settings.from_config(config)
  s = settings.from_config(vp_cifar.get_config())
  assert set(dict(s.model.arch)) <= set(models.network_arguments("ddpmpp"))
  model = builders.get_model(s)
  assert isinstance(model, models.NCSNpp) and model.nf == vp_cifar.get_config().model.nf


def test_a_workdir_written_with_keys_of_another_network_still_loads(tmp_path, caplog):
  """Such keys were allowed before and never reached the network: a workdir's config.json
  that holds them loads, without them."""
  raw = vp_cifar.get_config().to_dict()
  raw["model"]["interpolation"] = "bilinear"
  path = tmp_path / "config.json"
  path.write_text(json.dumps(raw, default=list))
  s = settings.from_json(str(path))
  assert "interpolation" not in dict(s.model.arch) and "model.interpolation" in caplog.text
  assert s.model.arch == settings.from_config(vp_cifar.get_config()).model.arch


@pytest.mark.parametrize("changes,match", [
    ({"method": "dpm_solver", "order": 1},
     r"sampling\.order must be 2 or 3 for dpm_solver, got 1 \(1 is made for "
     r"sampling\.method='unipc'\)\."),
    ({"method": "unipc", "order": 0}, r"sampling\.order must be 1, 2 or 3 for unipc, got 0\."),
    ({"method": "heun", "s_churn": -1.0}, r"sampling\.s_churn must be >= 0 for heun"),
    ({"method": "ddim", "eta": -0.5}, r"sampling\.eta must be >= 0 for ddim"),
    ({"method": "ddim", "num_steps": -1}, r"sampling\.num_steps must be >= 0"),
    ({"method": "ode", "rtol": 0.0}, r"sampling\.rtol must be > 0 for ode"),
    ({"method": "pc", "corrector": "hmc"},
     r"sampling\.corrector must be 'langevin', 'ald' or 'none' for pc, got 'hmc'"),
    ({"method": "pc", "snr": 0.0}, r"sampling\.snr must be > 0 for pc"),
    ({"method": "heun", "eps": 1.5}, r"sampling\.eps must be in \(0, 1\) for heun"),
    # The interpolate task encodes and decodes along the ODE: its tolerances are the run's.
    ({"method": "pc", "atol": -1.0, "sample.task": "interpolate"},
     r"sampling\.atol must be > 0 for ode"),
])
def test_sampler_options_are_checked_against_the_chosen_samplers_declaration(changes, match):
  changes = {k if "." in k else f"sampling.{k}": v for k, v in changes.items()}
  with pytest.raises(ConfigError, match=match):
    settings.from_config(_toy(**changes))


def test_sampler_declarations_name_real_settings_and_arguments():
  import inspect  # pylint: disable=g-import-not-at-top
  from score_jax.run import sampler_specs  # pylint: disable=g-import-not-at-top
  fields = set(settings._field_names(settings.Sampling))
  for method, spec in sampler_specs.SAMPLERS.items():
    params = inspect.signature(spec.function).parameters
    for option in spec.options:
      assert option.key in fields and option.arg in params, (method, option)
    assert spec.grid_arg is None or spec.grid_arg in params
  assert settings.SAMPLING_METHODS == tuple(sampler_specs.SAMPLERS)
  # Options of a sampler not in use are not the run's: ddim takes no order.
  s = settings.from_config(_toy(**{"sampling.method": "ddim", "sampling.order": 7,
                                   "sampling.num_steps": 9, "sampling.eta": 0.5}))
  assert sampler_specs.arguments(s.sampling) == {"num_steps": 9, "eta": 0.5, "eps": 1e-3,
                                                 "denoise": True}
  s = s.replace(sampling={"method": "unipc", "order": 3, "schedule": "optimized"})
  assert sampler_specs.arguments(s.sampling) == {"num_steps": 9, "schedule": "logSNR",
                                                 "order": 3, "variant": "bh2", "eps": 1e-3,
                                                 "denoise": True}


def test_every_shipped_config_has_only_read_keys_and_wrong_types_are_refused():
  import glob  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    name = os.path.basename(path)[:-3]
    if not name.startswith("_"):  # __init__ and the shared family deltas (_families.py)
      settings.from_config(importlib.import_module(f"configs.{name}").get_config())
  # ConfigDicts keep their types; a config.json or a plain dict does not.
  raw = toy.get_config().to_dict()
  raw["training"]["n_iters"] = 1.5
  with pytest.raises(ConfigError, match="training.n_iters must be an integer"):
    settings.from_config(raw)
  raw = toy.get_config().to_dict()
  raw["training"]["continuous"] = "yes"
  with pytest.raises(ConfigError, match="training.continuous must be True or False"):
    settings.from_config(raw)


def test_every_default_lives_in_the_default_config():
  """A config lacking keys is completed from configs/default.py, with its values."""
  full = default.get_config().to_dict()
  partial = {k: v for k, v in full.items() if k != "eval"}
  partial["training"] = {"batch_size": 32}
  s = settings.from_config(ml_collections.ConfigDict(partial))
  assert s.training.batch_size == 32
  assert s.training.n_iters == full["training"]["n_iters"]
  assert s.eval.wait_timeout_s == full["eval"]["wait_timeout_s"]
  assert s.eval.quantization == "truncate"


def _main(*args, timeout=240):
  return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_main_refuses_an_unread_key_in_seconds_with_one_line(tmp_path):
  cfg = tmp_path / "typo.py"
  cfg.write_text("from configs import toy\n\n\ndef get_config():\n  config = toy.get_config()\n"
                 "  config.model.nff = 64\n  return config\n")
  start = time.perf_counter()
  proc = _main(f"--config={cfg}", f"--workdir={tmp_path / 'w'}", "--mode=train")
  seconds = time.perf_counter() - start
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "model.nff" in proc.stderr and "Traceback" not in proc.stderr
  assert proc.stderr.strip().count("\n") == 0 or "error:" in proc.stderr.strip().splitlines()[-1]
  assert not os.path.exists(tmp_path / "w"), "nothing is written before the config is valid"
  assert seconds < 60, seconds  # no compilation: interpreter and imports only


def test_eval_of_a_workdir_never_trained_fails_at_once(tmp_path):
  """The default waits 24 h for training beside it; a workdir nothing trains fails now."""
  s = settings.from_config(_toy(**{"eval.enable_sampling": False, "eval.begin_ckpt": 1,
                                   "eval.end_ckpt": 1}))
  assert s.eval.wait_timeout_s == 86_400.0
  start = time.perf_counter()
  with pytest.raises(WorkdirError, match="no training run"):
    evaluate.run(s, str(tmp_path / "never_trained"))
  assert time.perf_counter() - start < 5
  (tmp_path / "file").write_text("x")
  with pytest.raises(WorkdirError, match="is a file"):
    train.train_and_evaluate(s, str(tmp_path / "file"))
  assert isinstance(WorkdirError("x"), UserError)


def test_fid_quantization_truncates_like_the_reference_or_rounds():
  x = np.array([[0.0, 0.5019, 0.9999, 1.2, -0.1]], np.float32)  # [0, 1] model space
  np.testing.assert_array_equal(to_uint8(x, False, "truncate"),
                                np.clip(x * 255.0, 0, 255).astype(np.uint8))
  np.testing.assert_array_equal(to_uint8(x, False, "round"),
                                np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8))
  assert to_uint8(x, False, "truncate")[0, 1] == 127
  assert to_uint8(x, False, "round")[0, 1] == 128


def test_load_run_on_a_trained_workdir(toy_run):
  workdir, state = toy_run  # the session's (conftest.py): checkpoints at steps 10 and 20
  run = score_jax.load_run(workdir)
  assert run.step == 20 and run.config.model.name == "mlp"
  assert isinstance(run.sde, score_jax.VPSDE) and run.sde.N == 20
  for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(state.ema_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The score is the network's: -net(x, 999 t) / std(t) of the VP parameterization.
  x, t = jnp.ones((4, 2)), jnp.full((4,), 0.5)
  net = run.model.apply({"params": run.params}, x, 999.0 * t)
  np.testing.assert_allclose(np.asarray(run.score_fn(x, t)),
                             np.asarray(-net / run.sde.marginal_std(t)[:, None]), rtol=1e-5)
  # Three lines from a checkpoint to samples.
  samples, nfe = score_jax.dpm_solver_pp_sample(jax.random.PRNGKey(0), run.sde, run.score_fn,
                                                (64, 2), 10)
  assert samples.shape == (64, 2) and bool(jnp.all(jnp.isfinite(samples))) and int(nfe) == 10
  with pytest.raises(checkpoints.MissingCheckpointError, match="present: \\[10, 20\\]"):
    score_jax.load_run(workdir, step=5)
  with pytest.raises(WorkdirError, match="config.json"):
    score_jax.load_run(os.path.join(workdir, "checkpoints"))


def test_programs_guidance_is_decided_in_one_place():
  """Unconditional models ignore labels and guidance; w = 0 is the conditional score."""
  s = settings.from_config(_toy(**{"model.num_classes": 0}))
  setup = plan_lib.assemble(s, builders.get_sde(s), None, None, None)
  mix = analytic.example_mixture_2d()
  calls = []

  def factory(params, y):
    calls.append(y)
    return analytic.score_fn(mix, setup.sde)

  progs = programs.Programs(setup, factory)
  progs.score_fn(None, jnp.zeros((2,), jnp.int32), 3.0)
  assert calls == [None]


def test_inception_command_line_usage_and_user_errors(tmp_path, capsys):
  from score_jax.convert import inception  # pylint: disable=g-import-not-at-top
  assert inception.main([]) == 2
  assert "usage: python -m score_jax.convert.inception SRC [DST]" in capsys.readouterr().err
  assert inception.main(["a", "b", "c"]) == 2 and "usage:" in capsys.readouterr().err
  assert inception.main([str(tmp_path / "missing.pth"), str(tmp_path / "out.npz")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "Traceback" not in err
  assert not os.path.exists(tmp_path / "out.npz")


def test_main_reports_a_missing_dataset_and_a_file_workdir_in_one_line(tmp_path):
  missing = _main("--config=configs/vp_cifar.py", f"--workdir={tmp_path / 'w'}",
                  f"--config.data.data_dir={tmp_path / 'no_data'}", "--mode=train")
  assert missing.returncode == 1 and "Traceback" not in missing.stderr, missing.stderr[-2000:]
  assert "cifar10" in missing.stderr.strip().splitlines()[-1]
  (tmp_path / "a_file").write_text("x")
  clash = _main("--config=configs/toy.py", f"--workdir={tmp_path / 'a_file'}", "--mode=train")
  assert clash.returncode == 1 and "Traceback" not in clash.stderr
  assert "is a file, not a folder" in clash.stderr
