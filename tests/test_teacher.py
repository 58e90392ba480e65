"""A run that learns from, or starts from, a trained run: training.teacher_workdir,
training.teacher_step and training.init_from_teacher (score_jax.run.plan.Teacher,
score_jax.run.state.teacher_params / start_from_teacher). The teacher is the session's tiny
toy run (conftest.py: toy_run); the objectives that distill from it have their own tests."""

import os

import jax
import numpy as np
import pytest

from helpers import TINY_TOY, config
from score_jax.errors import ConfigError, WorkdirError
from score_jax.run import plan as plan_lib
from score_jax.run import state as state_lib
from score_jax.run.load import load_run
from score_jax.run.settings import from_config as S


def _plan(teacher, **changes):
  return plan_lib.make_plan(S(config("toy", TINY_TOY, **{"training.teacher_workdir": teacher,
                                                         **changes})))


def _equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_a_fresh_run_starts_from_the_teachers_ema_weights(toy_run):
  workdir, _ = toy_run
  plan = _plan(workdir, **{"training.init_from_teacher": True, "training.teacher_step": 10})
  assert plan.teacher.workdir == workdir and plan.teacher.step == 10
  teacher = state_lib.teacher_params(plan)
  _equal(teacher, load_run(workdir, 10).params)  # checkpoint 10, not the newest (20)
  fresh = state_lib.init_state(plan, jax.random.PRNGKey(3))
  state = state_lib.start_from_teacher(plan, fresh, teacher)
  _equal(state.params, teacher)
  _equal(state.ema_params, teacher)
  _equal(state.opt_state, plan.tx.init(teacher))
  assert int(state.step) == 0
  # A network with a head around the teacher's ('net') keeps the head's initialization.
  wrapped = fresh.replace(params={"net": fresh.params, "head": {"w": np.ones(3, np.float32)}})
  plan_w = plan_lib.assemble(plan.settings, plan.sde, plan.model, plan.tx, plan.mesh,
                             plan.teacher)
  out = state_lib.start_from_teacher(plan_w, wrapped, teacher)
  _equal(out.params["net"], teacher)
  np.testing.assert_array_equal(out.params["head"]["w"], np.ones(3))


def test_a_teacher_that_does_not_fit_is_refused_in_one_line(toy_run, tmp_path):
  workdir, _ = toy_run
  with pytest.raises(WorkdirError, match="teacher_workdir .* has no config.json"):
    _plan(str(tmp_path))
  plan = _plan(workdir, **{"model.hidden_sizes": (16, 16), "training.init_from_teacher": True})
  fresh = state_lib.init_state(plan, jax.random.PRNGKey(0))
  with pytest.raises(ConfigError, match="init_from_teacher: the teacher's network"):
    state_lib.start_from_teacher(plan, fresh, state_lib.teacher_params(plan))
  with pytest.raises(ConfigError, match="needs training.teacher_workdir"):
    S(config("toy", TINY_TOY, **{"training.init_from_teacher": True}))
  with pytest.raises(ConfigError, match="num_classes"):
    _plan(workdir, **{"model.num_classes": 3})
  assert not os.path.exists(os.path.join(str(tmp_path), "checkpoints"))


def test_a_distilled_run_samples_without_its_teacher(toy_run, tmp_path):
  """Loading and sampling plans (need_data=False) do not read the teacher, which may be
  gone; only the distillation loss needs it, and says so when called without one."""
  changes = {"training.objective": "scd", "training.teacher_workdir": str(tmp_path / "gone")}
  s = S(config("toy_sct", TINY_TOY, **changes))
  plan = plan_lib.make_plan(s, need_data=False)
  assert plan.teacher is None
  with pytest.raises(ConfigError, match="distills a teacher"):
    plan.train_loss(None, jax.random.PRNGKey(0), np.zeros((2, 2), np.float32))
  with pytest.raises(WorkdirError, match="has no config.json"):
    plan_lib.make_plan(s)
