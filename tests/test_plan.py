"""The run plan (built once at a mode's entry), the eval metric units and the sample tasks."""

import dataclasses

import jax
import pytest

from configs import toy
from score_jax.errors import ConfigError
from score_jax.run import eval_metrics, evaluate, plan as plan_lib, programs, sample_tasks
from score_jax.run import builders
from score_jax.run import settings, train


def _settings(**changes):
  config = toy.get_config()
  with config.unlocked():
    config.model.hidden_sizes = (16,)
    config.training.batch_size = 8
    for key, value in changes.items():
      section, name = key.split(".")
      config[section][name] = value
  return settings.from_config(config)


def test_the_plan_builds_each_loss_once_and_the_steps_take_it(monkeypatch):
  built = []
  original = builders.get_loss_fn
  monkeypatch.setattr(builders, "get_loss_fn",
                      lambda *a, **k: built.append(k["train"]) or original(*a, **k))
  plan = plan_lib.make_plan(_settings(**{"model.phema_sigma_rels": (0.05, 0.1)}))
  assert sorted(built) == [False, True]
  train.make_train_step(plan)
  train.make_eval_step(plan)
  programs.Programs(plan).loss()
  assert sorted(built) == [False, True]  # the steps and programs read the plan's
  assert plan.phema_gammas == tuple(plan_lib.phema.sigma_rel_to_gamma(s) for s in (0.05, 0.1))
  assert plan.loop.n_iters == plan.settings.training.n_iters
  assert plan.data.shape(4) == (4, 2) and plan.augment is None
  with pytest.raises(dataclasses.FrozenInstanceError):
    plan.sde = None


def test_eval_runs_the_units_its_plan_enables_in_table_order():
  plan = plan_lib.assemble(_settings(**{"eval.enable_sampling": True, "eval.enable_bpd": True}),
                           None, None, None, None)
  assert eval_metrics.enabled(plan) == ["loss", "likelihood", "samples"]  # toy: no FID, digits
  off = plan_lib.assemble(_settings(**{"eval.enable_sampling": False}), None, None, None, None)
  assert "samples" not in eval_metrics.enabled(off)
  assert evaluate.scalars({"eval_loss": 1.0, "fid": 2.0, "seconds": 3.0}) == {
      "eval/eval_loss": 1.0, "eval/fid": 2.0}
  for name, metric in eval_metrics.METRICS.items():
    assert all(n in list(eval_metrics.METRICS)[:list(eval_metrics.METRICS).index(name)]
               for n in metric.needs), name


def test_sample_tasks_are_one_table_and_check_before_loading():
  assert set(sample_tasks.TASKS) == set(settings.TASKS)
  plan = plan_lib.assemble(_settings(**{"sample.task": "inpaint"}), None, None, None, None)
  with pytest.raises(ConfigError, match="needs image data"):
    sample_tasks.TASKS["inpaint"].check(plan)
  sample_tasks.TASKS["generate"].check(plan)
  assert list(sample_tasks.sample_labels(plan, 3)) == [0, 0, 0]


def test_checkpoint_range_of_the_plan_matches_the_eval_entry():
  s = _settings(**{"training.n_iters": 25, "training.snapshot_freq": 10, "eval.end_ckpt": 9})
  plan = plan_lib.assemble(s, None, None, None, jax.make_mesh((jax.device_count(),), ("data",)))
  assert plan.eval.checkpoints() == evaluate.checkpoint_steps(s) == [(1, 10), (2, 20), (3, 25)]


def test_nothing_below_the_mode_entries_reads_settings():
  """train, evaluate and sample read settings at their entry only; the rest takes the plan."""
  import inspect  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  from score_jax.run import sample, state  # pylint: disable=g-import-not-at-top
  from score_jax.run import grids

  below = [train.train, train.make_train_step, train.make_eval_step, train.apply_update,
           train._write_samples, evaluate.evaluate, evaluate.evaluate_checkpoints, sample.write,
           sample_tasks, programs.Programs, state.init_state, grids.grid_for,
           *eval_metrics.METRICS.values()]
  reads = re.compile(r"\bsettings\.\w|\.settings\b|\bSettings\b|\bs\.(training|model|data|eval|"
                     r"sampling|sample|optim|seed)\b")
  for obj in below:
    for unit in ([inspect.getmodule(obj.compute)] if isinstance(obj, eval_metrics.Metric)
                 else [obj]):
      source = inspect.getsource(unit)
      assert not reads.search(source), (unit, reads.search(source))
