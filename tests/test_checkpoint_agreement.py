"""A config that contradicts a run's checkpoints is refused in one line that names the keys
(sample, eval and load_run share state.restore_ema_params; training checks before resuming)."""

import json
import os

import jax
import numpy as np
import pytest

import helpers
from score_jax.run import checkpoints, evaluate, load, sample, train
from score_jax.run import plan as plan_lib
from score_jax.run import state as run_state
from score_jax.run.checkpoints import CheckpointMismatchError
from score_jax.run.settings import from_config as S


def _one_line(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message
  return message


@pytest.mark.parametrize("mode", [sample, evaluate])
def test_sample_and_eval_with_another_network_name_the_key(mode, toy_run, tmp_path):
  """--mode=sample / eval with model.hidden_sizes overridden: the key, both values, the fix,
  before anything is written."""
  workdir = helpers.copy_run(toy_run[0], str(tmp_path / "run"))
  s = S(helpers.config("toy", helpers.TINY_TOY, **{"model.hidden_sizes": (64, 32)}))
  with pytest.raises(CheckpointMismatchError) as e:
    mode.run(s, workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert _one_line(e) == (
      f"model.hidden_sizes=(64,32) but the checkpoints in {ckpt_dir} were trained with "
      f"(32,32) ({os.path.join(workdir, 'config.json')}): use "
      "--config.model.hidden_sizes=(32,32) (or drop the override), or train a new run in "
      "another --workdir.")
  assert sorted(os.listdir(workdir)) == sorted(os.listdir(toy_run[0]))


def test_load_run_names_the_first_parameter_that_differs(toy_run, tmp_path):
  """A workdir whose own config.json does not fit its checkpoints (edited, or converted with
  another config): the first parameter that differs, with both shapes."""
  workdir = helpers.copy_run(toy_run[0], str(tmp_path / "run"))
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    raw = json.load(f)
  raw["model"]["hidden_sizes"] = [64, 32]
  with open(path, "w") as f:
    json.dump(raw, f)
  with pytest.raises(CheckpointMismatchError) as e:
    load.load_run(workdir)
  assert ("parameter Dense_0/bias is shape (32,) there and shape (64,) here"
          in _one_line(e))


def test_resume_with_another_network_is_refused_before_config_json_changes(toy_run, tmp_path):
  """Training on in a workdir with a changed shape: the same line, and config.json still
  holds the settings the checkpoints were trained with."""
  workdir = helpers.copy_run(toy_run[0], str(tmp_path / "run"))
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    before = f.read()
  s = S(helpers.config("toy", helpers.TINY_TOY, **{"model.hidden_sizes": (64, 32),
                                                   "training.n_iters": 30}))
  with pytest.raises(CheckpointMismatchError, match=r"^model.hidden_sizes=\(64,32\) but"):
    train.train_and_evaluate(s, workdir)
  with open(path) as f:
    assert f.read() == before
  assert checkpoints.finished_steps(os.path.join(workdir, "checkpoints")) == [10, 20]


def test_image_size_is_refused_even_where_the_parameters_fit(tmp_path):
  """An 8-px digits run sampled with data.image_size=16: a U-Net without attention has the
  same parameters at both sizes, so only the run's config can tell; the error names the
  size the checkpoints were trained at. The run's own size loads."""
  small = {"model.nf": 4, "model.ch_mult": (1,), "model.num_res_blocks": 1,
           "model.attn_resolutions": ()}
  s = S(helpers.config("digits", small))
  workdir = str(tmp_path / "digits")
  setup = plan_lib.make_plan(s, need_data=False)
  template = run_state.abstract_state(setup)
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), template)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ckpt.save(1, zeros)
  ckpt.close()
  run_state.save_config(s, workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")

  big = plan_lib.make_plan(S(helpers.config("digits", small, **{"data.image_size": 16})),
                           need_data=False)
  big_template = run_state.abstract_state(big)
  shapes = lambda t: jax.tree.map(lambda a: a.shape, t.ema_params)
  assert shapes(big_template) == shapes(template)
  with pytest.raises(CheckpointMismatchError) as e:  # as restore_ema_params checks
    run_state.check_checkpoint(big, ckpt_dir, 1, big_template)
  assert _one_line(e).startswith(
      f"data.image_size=16 but the checkpoints in {ckpt_dir} were trained with 8 (")
  assert "--config.data.image_size=8" in str(e.value)
  saved = run_state.check_checkpoint(setup, ckpt_dir, 1, template)
  assert saved["ema_params"].keys() == zeros.ema_params.keys()
